//! Where a MAGI-1 model's files are. A MAGI-1 directory holds the upstream `MagiConfig`
//! JSON as `config.json` (e.g. `example/4.5B/4.5B_distill_config.json` of the GitHub
//! repository); its `runtime_config` names the DiT checkpoint (`load`), the VAE
//! (`vae_pretrained`) and the T5 (`t5_pretrained`) folders, relative to the directory when
//! not absolute. Missing entries fall back to `inference_weight*/`, `vae/` and `t5/` in the
//! directory itself. The folders are those of the published checkpoint repository
//! (sand-ai/MAGI-1 `ckpt/magi/4.5B_distill`, `ckpt/vae`, `ckpt/t5/t5-v1_1-xxl`).

use std::path::{Path, PathBuf};

use super::config::MagiConfig;
use crate::error::{Error, Result};
use crate::model::weights::safetensors_files;

/// The files of a MAGI-1 directory, located and checked to exist.
#[derive(Debug, Clone)]
pub struct MagiFiles {
    pub config_path: PathBuf,
    pub config: MagiConfig,
    /// The DiT's safetensors (one file or the shards of its index).
    pub dit_weights: Vec<PathBuf>,
    /// The VAE folder (checked to hold `config.json`).
    pub vae_dir: PathBuf,
    /// The T5 folder (checked to hold `config.json`): `t5_pretrained` itself or its
    /// `t5-v1_1-xxl/` (where upstream's `T5Embedder` looks).
    pub t5_dir: PathBuf,
    /// Upstream's special-token table (`example/assets/special_tokens.npz` of the GitHub
    /// repository), found beside the config, in its `example/assets/`, or in the DiT
    /// checkpoint folder.
    pub special_tokens: PathBuf,
}

/// Whether `dir` looks like a MAGI-1 directory: its `config.json` has a `model_config`.
pub fn is_magi_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("model_config").is_some() && v.get("runtime_config").is_some())
}

fn resolve(dir: &Path, entry: &Option<String>, fallback: &str) -> PathBuf {
    match entry {
        Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
        Some(p) => dir.join(p),
        None => dir.join(fallback),
    }
}

impl MagiFiles {
    /// Locates every file of the MAGI-1 directory `dir`; an error names what is missing.
    pub fn locate(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::model(
                &config_path,
                "missing MAGI-1 config (the upstream MagiConfig JSON)",
            ));
        }
        let config = MagiConfig::from_file(&config_path)?;
        let rc = &config.runtime_config;
        let dit_weights = dit_weight_files(dir, &config_path, &config)?;
        let folder = |entry: &Option<String>, fallback: &str, what: &str, key: &str| {
            let d = resolve(dir, entry, fallback);
            // Upstream's T5Embedder reads `<t5_pretrained>/t5-v1_1-xxl/`.
            let nested = d.join("t5-v1_1-xxl");
            if d.join("config.json").is_file() {
                Ok(d)
            } else if key == "t5_pretrained" && nested.join("config.json").is_file() {
                Ok(nested)
            } else {
                Err(Error::model(
                    d.join("config.json"),
                    format!(
                        "missing MAGI-1 {what} (runtime_config.{key} in {})",
                        config_path.display()
                    ),
                ))
            }
        };
        let vae_dir = folder(&rc.vae_pretrained, "vae", "VAE", "vae_pretrained")?;
        let t5_dir = folder(&rc.t5_pretrained, "t5", "T5 text encoder", "t5_pretrained")?;
        let ckpt = resolve(dir, &rc.load, ".");
        let special_tokens = [
            dir.join("special_tokens.npz"),
            dir.join("example/assets/special_tokens.npz"),
            ckpt.join("special_tokens.npz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::model(
                dir.join("special_tokens.npz"),
                "missing MAGI-1 special-token table (copy example/assets/special_tokens.npz of \
                 the SandAI-org/MAGI-1 repository beside the config)",
            )
        })?;
        Ok(Self {
            config_path,
            config,
            dit_weights,
            vae_dir,
            t5_dir,
            special_tokens,
        })
    }
}

/// The DiT's safetensors of the MAGI-1 directory `dir` with settings `config` (read from
/// `config_path`): under `runtime_config.load` (default: `dir`), in
/// `inference_weight.distill/` or `inference_weight/` (the distill folder first for a
/// distill config).
pub fn dit_weight_files(
    dir: &Path,
    config_path: &Path,
    config: &MagiConfig,
) -> Result<Vec<PathBuf>> {
    let ckpt = resolve(dir, &config.runtime_config.load, ".");
    let sub: &[&str] = if config.engine_config.distill {
        &["inference_weight.distill", "inference_weight"]
    } else {
        &["inference_weight", "inference_weight.distill"]
    };
    let weights_dir = sub
        .iter()
        .map(|s| ckpt.join(s))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            Error::model(
                ckpt.join(sub[0]),
                format!(
                    "missing MAGI-1 DiT weights folder (runtime_config.load in {} points to {})",
                    config_path.display(),
                    ckpt.display()
                ),
            )
        })?;
    safetensors_files(&weights_dir, &["model", "diffusion_pytorch_model"])
}
