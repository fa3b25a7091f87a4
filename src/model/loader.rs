//! Loading model directories: the diffusers pipeline layout and the original SkyReels-V2
//! layout. A missing, truncated or mismatched file is an error that names the file.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::{TransformerConfig, diffusers_to_original_name};
use super::transformer::Transformer;
use super::weights::{header_names, mmap_safetensors, safetensors_files};
use crate::error::{Error, Result};

/// Loads a transformer from a folder holding `config.json` and its weights (diffusers
/// `transformer/` or an original SkyReels-V2 folder); the naming scheme of the weights is
/// detected from their names.
pub fn load_transformer(dir: &Path, dtype: DType, dev: &Device) -> Result<Transformer> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::model(&cfg_path, "missing transformer config"));
    }
    let cfg = TransformerConfig::from_file(&cfg_path)?;
    let files = safetensors_files(dir, &["diffusion_pytorch_model", "model"])?;
    let names = header_names(&files)?;
    let vb = mmap_safetensors(&files, dtype, dev)?;
    transformer_from(&cfg, &cfg_path, vb, &names, &files[0])
}

/// The transformer of `cfg` on weights `vb` (tensor `names`, first file `weights`), in
/// either naming scheme: the original SkyReels-V2 names are detected and mapped. The one
/// place a transformer is built from files, for directories and the embedded model.
pub(crate) fn transformer_from(
    cfg: &TransformerConfig,
    cfg_path: &Path,
    vb: VarBuilder<'static>,
    names: &[String],
    weights: &Path,
) -> Result<Transformer> {
    let original = names.iter().any(|n| n.starts_with("time_embedding."))
        && !names.iter().any(|n| n.starts_with("condition_embedder."));
    let vb = if original {
        vb.rename_f(diffusers_to_original_name)
    } else {
        vb
    };
    Transformer::new(cfg, vb).map_err(|e| {
        Error::model(
            weights,
            format!("weights do not match {}: {e}", cfg_path.display()),
        )
    })
}
