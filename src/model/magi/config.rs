//! MAGI-1's settings, read from the upstream `MagiConfig` JSON (`model_config`,
//! `runtime_config`, `engine_config`; e.g. `example/4.5B/4.5B_distill_config.json` of
//! SandAI-org/MAGI-1). Unknown keys are ignored, missing optional ones take the upstream
//! dataclass defaults.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The DiT's hyper-parameters (`model_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MagiModelConfig {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub ffn_hidden_size: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    #[serde(default = "one")]
    pub num_query_groups: usize,
    /// Head dimension.
    pub kv_channels: usize,
    #[serde(default = "eps")]
    pub layernorm_epsilon: f64,
    /// Zero-centred gamma: the norms multiply by `weight + 1`.
    #[serde(default)]
    pub apply_layernorm_1p: bool,
    #[serde(default = "one_f")]
    pub x_rescale_factor: f64,
    /// 24B: the 16 VAE channels are duplicated on input, half the output is kept.
    #[serde(default)]
    pub half_channel_vae: bool,
    #[serde(default)]
    pub params_dtype: Option<String>,
    #[serde(default = "two")]
    pub patch_size: usize,
    #[serde(default = "one")]
    pub t_patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(default = "quarter")]
    pub cond_hidden_ratio: f64,
    #[serde(default = "caption_channels")]
    pub caption_channels: usize,
    #[serde(default = "caption_max_length")]
    pub caption_max_length: usize,
    #[serde(default = "one_f")]
    pub xattn_cond_hidden_ratio: f64,
    #[serde(default = "one_f")]
    pub cond_gating_ratio: f64,
    /// SwiGLU MLP (24B) instead of GELU (4.5B).
    #[serde(default)]
    pub gated_linear_unit: bool,
}

/// The sampling settings (`runtime_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MagiRuntimeConfig {
    /// 1: one pass with the caption (distill); 3: the base model's three-pass guidance.
    pub cfg_number: usize,
    #[serde(default = "cfg_t_range")]
    pub cfg_t_range: Vec<f64>,
    #[serde(default = "prev_chunk_scales")]
    pub prev_chunk_scales: Vec<f64>,
    #[serde(default = "text_scales")]
    pub text_scales: Vec<f64>,
    /// Chunks (itself included) a chunk at each stage attends to.
    #[serde(default)]
    pub noise2clean_kvrange: Vec<usize>,
    #[serde(default = "minus_one")]
    pub clean_chunk_kvrange: i64,
    #[serde(default = "one_f")]
    pub clean_t: f64,
    #[serde(default = "num_frames")]
    pub num_frames: usize,
    #[serde(default)]
    pub video_size_h: Option<usize>,
    #[serde(default)]
    pub video_size_w: Option<usize>,
    #[serde(default = "num_steps")]
    pub num_steps: usize,
    #[serde(default = "window_size")]
    pub window_size: usize,
    #[serde(default = "fps")]
    pub fps: usize,
    #[serde(default = "chunk_width")]
    pub chunk_width: usize,
    #[serde(default = "scale_factor")]
    pub scale_factor: f64,
    #[serde(default = "temporal_downsample_factor")]
    pub temporal_downsample_factor: usize,
    /// The DiT checkpoint folder (holding `inference_weight[.distill]/`).
    #[serde(default)]
    pub load: Option<String>,
    /// The VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`).
    #[serde(default)]
    pub vae_pretrained: Option<String>,
    /// The T5 folder (DeepFloyd t5-v1_1-xxl).
    #[serde(default)]
    pub t5_pretrained: Option<String>,
}

/// The engine settings that change the maths (`engine_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MagiEngineConfig {
    /// The distilled model: its timestep embedding adds a step-size embedding.
    #[serde(default)]
    pub distill: bool,
    /// fp8-quantised weights (flashinfer `bmm_fp8`): not supported here.
    #[serde(default)]
    pub fp8_quant: bool,
    #[serde(default = "nearly_clean")]
    pub distill_nearly_clean_chunk_threshold: f64,
    #[serde(default = "shortcut_mode")]
    pub shortcut_mode: String,
}

/// The three parts of an upstream `MagiConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MagiConfig {
    pub model_config: MagiModelConfig,
    pub runtime_config: MagiRuntimeConfig,
    pub engine_config: MagiEngineConfig,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn one_f() -> f64 {
    1.0
}
fn eps() -> f64 {
    1e-6
}
fn quarter() -> f64 {
    0.25
}
fn caption_channels() -> usize {
    4096
}
fn caption_max_length() -> usize {
    800
}
fn cfg_t_range() -> Vec<f64> {
    vec![0.0, 0.0217, 0.1, 0.3, 0.999]
}
fn prev_chunk_scales() -> Vec<f64> {
    vec![1.5; 5]
}
fn text_scales() -> Vec<f64> {
    vec![7.5; 5]
}
fn minus_one() -> i64 {
    -1
}
fn num_frames() -> usize {
    128
}
fn num_steps() -> usize {
    64
}
fn window_size() -> usize {
    4
}
fn fps() -> usize {
    24
}
fn chunk_width() -> usize {
    6
}
fn scale_factor() -> f64 {
    0.18215
}
fn temporal_downsample_factor() -> usize {
    4
}
fn nearly_clean() -> f64 {
    0.3
}
fn shortcut_mode() -> String {
    "8,16,16".into()
}

impl MagiModelConfig {
    /// Width of the timestep / caption condition (`hidden * cond_hidden_ratio`).
    pub fn cond_dim(&self) -> usize {
        (self.hidden_size as f64 * self.cond_hidden_ratio) as usize
    }

    /// Width of the projected caption (`hidden * xattn_cond_hidden_ratio`).
    pub fn xattn_dim(&self) -> usize {
        (self.hidden_size as f64 * self.xattn_cond_hidden_ratio) as usize
    }

    /// Width of each gate (`hidden * cond_gating_ratio`).
    pub fn gate_dim(&self) -> usize {
        (self.hidden_size as f64 * self.cond_gating_ratio) as usize
    }

    /// Latent channels the model takes and returns (half the embedder's for
    /// `half_channel_vae`).
    pub fn latent_channels(&self) -> usize {
        if self.half_channel_vae {
            self.in_channels / 2
        } else {
            self.in_channels
        }
    }

    /// Checks what the forward relies on; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::model(path, what));
        let q = self.num_attention_heads * self.kv_channels;
        if self.num_attention_heads == 0 || self.kv_channels == 0 || self.num_layers == 0 {
            return bad("model_config: heads, kv_channels and num_layers must be > 0".into());
        }
        if self.num_query_groups == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_query_groups)
        {
            return bad(format!(
                "model_config: num_attention_heads {} is not a multiple of num_query_groups {}",
                self.num_attention_heads, self.num_query_groups
            ));
        }
        // The output projection's input is re-interleaved for 8 tensor-parallel ranks.
        if !q.is_multiple_of(8) {
            return bad(format!(
                "model_config: heads x kv_channels = {q} is not a multiple of 8 (the \
                 checkpoint's output projection is laid out for 8 ranks)"
            ));
        }
        if self.gate_dim() != self.hidden_size {
            return bad(format!(
                "model_config: cond_gating_ratio {} (gates must be hidden_size wide)",
                self.cond_gating_ratio
            ));
        }
        if !self.kv_channels.is_multiple_of(8) {
            return bad(format!(
                "model_config: kv_channels {} is not a multiple of 8 (RoPE covers 3/4 of \
                 the head in three axes)",
                self.kv_channels
            ));
        }
        if self.half_channel_vae
            && (!self.in_channels.is_multiple_of(2) || !self.out_channels.is_multiple_of(2))
        {
            return bad("model_config: half_channel_vae needs even in/out channels".into());
        }
        Ok(())
    }
}

impl MagiConfig {
    /// Reads and checks an upstream `MagiConfig` JSON.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: MagiConfig = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("not a MAGI-1 config: {e}")))?;
        cfg.model_config.validate(path)?;
        if cfg.engine_config.fp8_quant {
            return Err(Error::model(
                path,
                "fp8-quantised MAGI-1 checkpoints (engine_config.fp8_quant) are not supported; \
                 use the bf16 4.5B_distill or 4.5B_base weights",
            ));
        }
        if ![1, 3].contains(&cfg.runtime_config.cfg_number) {
            return Err(Error::model(
                path,
                format!(
                    "runtime_config.cfg_number {} (expected 1 or 3)",
                    cfg.runtime_config.cfg_number
                ),
            ));
        }
        Ok(cfg)
    }
}
