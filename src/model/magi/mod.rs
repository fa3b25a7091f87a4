//! MAGI-1 (Sand AI, SandAI-org/MAGI-1): the chunk-wise autoregressive DiT on weights
//! under the upstream names, and its settings (see `shared/docs/MAGI1.md`).

pub mod caption;
pub mod config;
pub mod dit;
pub mod files;
pub mod stream;
pub mod text;
pub mod vae;
pub mod walk;

pub use config::{MagiConfig, MagiEngineConfig, MagiModelConfig, MagiRuntimeConfig};
pub use dit::{CacheUse, MagiDit, MagiInput, MagiKvCache};
pub use files::{MagiFiles, is_magi_dir};

use std::path::Path;

use candle_core::{DType, Device};

use super::weights::mmap_safetensors;
use crate::error::{Error, Result};

/// Loads the DiT of a MAGI-1 directory (see [`files`]): the upstream `MagiConfig` JSON as
/// `config.json` and the weights as published (`inference_weight.distill/` or
/// `inference_weight/` under `runtime_config.load`, a `model.safetensors` or the shards of
/// `model.safetensors.index.json`). Returns the settings and the DiT.
pub fn load_dit(dir: &Path, dtype: DType, dev: &Device) -> Result<(MagiConfig, MagiDit)> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::model(
            &cfg_path,
            "missing MAGI-1 config (a MagiConfig JSON)",
        ));
    }
    let cfg = MagiConfig::from_file(&cfg_path)?;
    let files = files::dit_weight_files(dir, &cfg_path, &cfg)?;
    let vb = mmap_safetensors(&files, dtype, dev)?;
    let dit = MagiDit::new(&cfg.model_config, cfg.engine_config.distill, vb).map_err(|e| {
        Error::model(
            &files[0],
            format!("weights do not match {}: {e}", cfg_path.display()),
        )
    })?;
    Ok((cfg, dit))
}
