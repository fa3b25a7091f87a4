//! MAGI-1 (Sand AI, SandAI-org/MAGI-1): the chunk-wise autoregressive DiT on weights
//! under the upstream names, and its settings (see `shared/docs/MAGI1.md`).

pub mod config;
pub mod dit;
pub mod vae;
pub mod walk;

pub use config::{MagiConfig, MagiEngineConfig, MagiModelConfig, MagiRuntimeConfig};
pub use dit::{CacheUse, MagiDit, MagiInput, MagiKvCache};

use std::path::Path;

use candle_core::{DType, Device};

use super::weights::{mmap_safetensors, safetensors_files};
use crate::error::{Error, Result};

/// Loads a MAGI-1 DiT folder: the upstream `MagiConfig` JSON as `config.json` and the
/// weights as published (`inference_weight.distill/` or `inference_weight/`, a
/// `model.safetensors` or the shards of `model.safetensors.index.json`), or directly in the
/// folder. Returns the settings and the DiT.
pub fn load_dit(dir: &Path, dtype: DType, dev: &Device) -> Result<(MagiConfig, MagiDit)> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::model(
            &cfg_path,
            "missing MAGI-1 config (a MagiConfig JSON)",
        ));
    }
    let cfg = MagiConfig::from_file(&cfg_path)?;
    let weights_dir = ["inference_weight.distill", "inference_weight"]
        .iter()
        .map(|d| dir.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    let files = safetensors_files(&weights_dir, &["model", "diffusion_pytorch_model"])?;
    let vb = mmap_safetensors(&files, dtype, dev)?;
    let dit = MagiDit::new(&cfg.model_config, cfg.engine_config.distill, vb).map_err(|e| {
        Error::model(
            &files[0],
            format!("weights do not match {}: {e}", cfg_path.display()),
        )
    })?;
    Ok((cfg, dit))
}
