//! Finding and opening weight files: single safetensors, sharded safetensors with an index
//! json, or PyTorch pickles; memory-mapped, with errors that name the file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::error::{Error, Result};

/// The safetensors files of a model: `stem.safetensors`, or the shards listed in
/// `stem.safetensors.index.json`.
pub fn safetensors_files(dir: &Path, stems: &[&str]) -> Result<Vec<PathBuf>> {
    for stem in stems {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            return shards_from_index(&index);
        }
    }
    Err(Error::model(
        dir,
        format!(
            "no weights found: expected one of {}",
            stems
                .iter()
                .map(|s| format!("{s}.safetensors or {s}.safetensors.index.json"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(index, format!("malformed index JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model(index, "no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    if files.is_empty() {
        return Err(Error::model(index, "weight_map lists no files"));
    }
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::model(
                &p,
                format!("shard listed in {} is missing", index.display()),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// The PyTorch pickles of a model as transformers saves them without safetensors:
/// `stem.bin`, or the shards listed in `stem.bin.index.json`.
pub fn pytorch_files(dir: &Path, stems: &[&str]) -> Result<Vec<PathBuf>> {
    for stem in stems {
        let single = dir.join(format!("{stem}.bin"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.bin.index.json"));
        if index.is_file() {
            return shards_from_index(&index);
        }
    }
    Err(Error::model(
        dir,
        format!(
            "no PyTorch weights found: expected one of {}",
            stems
                .iter()
                .map(|s| format!("{s}.bin or {s}.bin.index.json"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Tensors of several PyTorch pickles, each read from its file when asked for (the files
/// are zip archives: nothing is mapped, a tensor's bytes are read and converted).
struct PthShards(Vec<candle_core::pickle::PthTensors>);

impl PthShards {
    fn find(&self, name: &str) -> candle_core::Result<Tensor> {
        for shard in &self.0 {
            if let Some(t) = shard.get(name)? {
                return Ok(t);
            }
        }
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        }
        .bt())
    }
}

impl SimpleBackend for PthShards {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: expected {s:?}, got {:?}",
                t.shape()
            );
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.find(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.tensor_infos().contains_key(name))
    }
}

/// A VarBuilder over PyTorch pickle files (see [`pytorch_files`]); an unreadable file is
/// an error naming it.
pub fn pth_var_builder(
    files: &[PathBuf],
    dtype: DType,
    dev: &Device,
) -> Result<VarBuilder<'static>> {
    let shards = files
        .iter()
        .map(|f| {
            candle_core::pickle::PthTensors::new(f, None)
                .map_err(|e| Error::model(f, format!("cannot read PyTorch weights: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VarBuilder::from_backend(
        Box::new(PthShards(shards)),
        dtype,
        dev.clone(),
    ))
}

/// Memory-maps safetensors files after checking each parses (a truncated file is an error
/// naming it, not a crash later).
pub fn mmap_safetensors(
    files: &[PathBuf],
    dtype: DType,
    dev: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        check_safetensors(f)?;
    }
    // SAFETY: the files are only read; modifying them while the model is loaded is
    // outside what the loader can guard against, as with every mmap-based loader.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, dev) }
        .map_err(|e| Error::model(&files[0], format!("cannot map weights: {e}")))
}

/// Parses the header and checks that the data section is as long as the header says.
pub fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| Error::model(path, "truncated safetensors file (no header)"))?;
    let hlen = u64::from_le_bytes(n);
    // Header values are untrusted: sums saturate instead of overflowing.
    if hlen > 100_000_000 || 8 + hlen > len {
        return Err(Error::model(
            path,
            "truncated or corrupt safetensors header",
        ));
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact(&mut h)
        .map_err(|_| Error::model(path, "truncated safetensors header"))?;
    let v: serde_json::Value = serde_json::from_slice(&h)
        .map_err(|e| Error::model(path, format!("corrupt safetensors header: {e}")))?;
    let mut end = 0u64;
    if let Some(o) = v.as_object() {
        for (k, t) in o {
            if k == "__metadata__" {
                continue;
            }
            if let Some(off) = t.get("data_offsets").and_then(|d| d.as_array())
                && let Some(e) = off.get(1).and_then(|e| e.as_u64())
            {
                end = end.max(e);
            }
        }
    }
    let needed = (8 + hlen).saturating_add(end);
    if needed > len {
        return Err(Error::model(
            path,
            format!("truncated safetensors file: {len} bytes, header needs {needed}"),
        ));
    }
    Ok(())
}

/// Tensor names from the header only (no need to read the data).
pub fn header_names(files: &[PathBuf]) -> Result<Vec<String>> {
    use std::io::Read;
    let mut names = Vec::new();
    for path in files {
        check_safetensors(path)?;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
        let mut h = vec![0u8; u64::from_le_bytes(n) as usize];
        f.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&h)
            .map_err(|e| Error::model(path, format!("corrupt safetensors header: {e}")))?;
        if let Some(o) = v.as_object() {
            names.extend(o.keys().filter(|k| *k != "__metadata__").cloned());
        }
    }
    Ok(names)
}
