//! Configuration of the SkyReels-V2 / Wan 2.1 diffusion-forcing transformer, read from a
//! diffusers `transformer/config.json` or from an original SkyReels-V2 `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The transformer's hyper-parameters, in diffusers' vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: bool,
    pub eps: f64,
    pub rope_max_seq_len: usize,
    /// SkyReels-V2 DF-1.3B adds an fps embedding to the 6-way modulation.
    pub inject_sample_info: bool,
    /// Frames per causal block the checkpoint was configured with (diffusers
    /// `num_frame_per_block`); 1 means no block-causal mask.
    pub num_frame_per_block: usize,
}

impl TransformerConfig {
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The 1.3B SkyReels-V2-DF configuration.
    pub fn skyreels_v2_df_1_3b() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: 12,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 8960,
            num_layers: 30,
            cross_attn_norm: true,
            qk_norm: true,
            eps: 1e-6,
            rope_max_seq_len: 1024,
            inject_sample_info: true,
            num_frame_per_block: 1,
        }
    }

    /// Reads either layout of `config.json`; the layout is recognised by its keys.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|reason| Error::model(path, reason))
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        let cfg = if value.get("num_attention_heads").is_some() {
            let d: DiffusersConfig = serde_json::from_value(value)
                .map_err(|e| format!("not a transformer config: {e}"))?;
            d.into_config()?
        } else if value.get("num_heads").is_some() {
            let o: OriginalConfig = serde_json::from_value(value)
                .map_err(|e| format!("not a SkyReels-V2 config: {e}"))?;
            o.into_config()?
        } else {
            return Err(
                "neither a diffusers transformer config (num_attention_heads) nor an original \
                 SkyReels-V2 config (num_heads)"
                    .into(),
            );
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        // Every size decides an allocation (the RoPE tables hold rope_max_seq_len rows, the
        // weights dim x ffn_dim...): out of range is an error, not an out-of-memory abort.
        let dim = self
            .num_attention_heads
            .saturating_mul(self.attention_head_dim);
        for (key, v, hi) in [
            ("rope_max_seq_len", self.rope_max_seq_len, 1 << 16),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("attention_head_dim", self.attention_head_dim, 1024),
            ("num_attention_heads x attention_head_dim", dim, 1 << 16),
            ("in_channels", self.in_channels, 1024),
            ("out_channels", self.out_channels, 1024),
            ("text_dim", self.text_dim, 1 << 16),
            ("freq_dim", self.freq_dim, 1 << 16),
            ("ffn_dim", self.ffn_dim, 1 << 18),
            ("num_layers", self.num_layers, 1024),
            ("num_frame_per_block", self.num_frame_per_block, 64),
        ] {
            if !(1..=hi).contains(&v) {
                return Err(format!("{key} = {v} is outside 1..={hi}"));
            }
        }
        if self.patch_size.iter().any(|&p| p > 16) {
            return Err(format!(
                "patch_size {:?} is outside 1..=16",
                self.patch_size
            ));
        }
        if !self.attention_head_dim.is_multiple_of(2) || self.attention_head_dim < 6 {
            return Err(format!(
                "attention_head_dim {} must be even and at least 6 (3D RoPE)",
                self.attention_head_dim
            ));
        }
        if self.patch_size.contains(&0) {
            return Err(format!("patch_size {:?} has a zero", self.patch_size));
        }
        if self.num_layers == 0 || self.num_attention_heads == 0 {
            return Err("num_layers and num_attention_heads must be positive".into());
        }
        if self.num_frame_per_block == 0 {
            return Err("num_frame_per_block must be at least 1".into());
        }
        Ok(())
    }
}

fn default_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope() -> usize {
    1024
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_freq() -> usize {
    256
}

fn patch3(p: &[usize]) -> std::result::Result<[usize; 3], String> {
    match p {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(format!("patch_size must have 3 entries, got {p:?}")),
    }
}

#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(default = "default_patch")]
    patch_size: Vec<usize>,
    num_attention_heads: usize,
    attention_head_dim: usize,
    in_channels: usize,
    #[serde(default)]
    out_channels: Option<usize>,
    text_dim: usize,
    #[serde(default = "default_freq")]
    freq_dim: usize,
    ffn_dim: usize,
    num_layers: usize,
    #[serde(default = "default_true")]
    cross_attn_norm: bool,
    #[serde(default)]
    qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default)]
    image_dim: Option<usize>,
    #[serde(default)]
    added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope")]
    rope_max_seq_len: usize,
    #[serde(default)]
    inject_sample_info: bool,
    #[serde(default = "default_one")]
    num_frame_per_block: usize,
}

impl DiffusersConfig {
    fn into_config(self) -> std::result::Result<TransformerConfig, String> {
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return Err("image-conditioned (I2V) transformers are not supported".into());
        }
        let qk_norm = match self.qk_norm.as_deref() {
            None => false,
            Some("rms_norm_across_heads") => true,
            Some(other) => return Err(format!("qk_norm {other:?} is not supported")),
        };
        Ok(TransformerConfig {
            patch_size: patch3(&self.patch_size)?,
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: self.attention_head_dim,
            in_channels: self.in_channels,
            out_channels: self.out_channels.unwrap_or(self.in_channels),
            text_dim: self.text_dim,
            freq_dim: self.freq_dim,
            ffn_dim: self.ffn_dim,
            num_layers: self.num_layers,
            cross_attn_norm: self.cross_attn_norm,
            qk_norm,
            eps: self.eps,
            rope_max_seq_len: self.rope_max_seq_len,
            inject_sample_info: self.inject_sample_info,
            num_frame_per_block: self.num_frame_per_block,
        })
    }
}

/// `config.json` as the original SkyReels-V2 / Wan code writes it.
#[derive(Deserialize)]
struct OriginalConfig {
    #[serde(default = "default_patch")]
    patch_size: Vec<usize>,
    #[serde(default)]
    model_type: Option<String>,
    dim: usize,
    ffn_dim: usize,
    #[serde(default = "default_freq")]
    freq_dim: usize,
    #[serde(default = "default_text_dim")]
    text_dim: usize,
    in_dim: usize,
    out_dim: usize,
    num_heads: usize,
    num_layers: usize,
    #[serde(default = "default_true")]
    qk_norm: bool,
    #[serde(default = "default_true")]
    cross_attn_norm: bool,
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default)]
    inject_sample_info: bool,
    #[serde(default = "default_one")]
    num_frame_per_block: usize,
}

fn default_text_dim() -> usize {
    4096
}

impl OriginalConfig {
    fn into_config(self) -> std::result::Result<TransformerConfig, String> {
        if let Some(t) = self.model_type.as_deref()
            && t != "t2v"
        {
            return Err(format!("model_type {t:?} is not supported (only t2v)"));
        }
        if self.num_heads == 0 || !self.dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "dim {} is not divisible by num_heads {}",
                self.dim, self.num_heads
            ));
        }
        Ok(TransformerConfig {
            patch_size: patch3(&self.patch_size)?,
            num_attention_heads: self.num_heads,
            attention_head_dim: self.dim / self.num_heads,
            in_channels: self.in_dim,
            out_channels: self.out_dim,
            text_dim: self.text_dim,
            freq_dim: self.freq_dim,
            ffn_dim: self.ffn_dim,
            num_layers: self.num_layers,
            cross_attn_norm: self.cross_attn_norm,
            qk_norm: self.qk_norm,
            eps: self.eps,
            rope_max_seq_len: 1024,
            inject_sample_info: self.inject_sample_info,
            num_frame_per_block: self.num_frame_per_block,
        })
    }
}

/// Maps a diffusers parameter name to the original SkyReels-V2 name of the same tensor.
/// Note the swap: diffusers `norm2` (the affine cross-attention norm) is the original
/// `norm3`.
pub fn diffusers_to_original_name(name: &str) -> String {
    const TOP: &[(&str, &str)] = &[
        (
            "condition_embedder.time_embedder.linear_1",
            "time_embedding.0",
        ),
        (
            "condition_embedder.time_embedder.linear_2",
            "time_embedding.2",
        ),
        (
            "condition_embedder.text_embedder.linear_1",
            "text_embedding.0",
        ),
        (
            "condition_embedder.text_embedder.linear_2",
            "text_embedding.2",
        ),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("fps_projection.net.0.proj", "fps_projection.0"),
        ("fps_projection.net.2", "fps_projection.2"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out", "head.head"),
    ];
    const BLOCK: &[(&str, &str)] = &[
        ("attn1.to_out.0", "self_attn.o"),
        ("attn1.to_q", "self_attn.q"),
        ("attn1.to_k", "self_attn.k"),
        ("attn1.to_v", "self_attn.v"),
        ("attn1.norm_q", "self_attn.norm_q"),
        ("attn1.norm_k", "self_attn.norm_k"),
        ("attn2.to_out.0", "cross_attn.o"),
        ("attn2.to_q", "cross_attn.q"),
        ("attn2.to_k", "cross_attn.k"),
        ("attn2.to_v", "cross_attn.v"),
        ("attn2.norm_q", "cross_attn.norm_q"),
        ("attn2.norm_k", "cross_attn.norm_k"),
        ("norm2", "norm3"),
        ("ffn.net.0.proj", "ffn.0"),
        ("ffn.net.2", "ffn.2"),
        ("scale_shift_table", "modulation"),
    ];
    if let Some(rest) = name.strip_prefix("blocks.")
        && let Some((idx, param)) = rest.split_once('.')
    {
        for (d, o) in BLOCK {
            if let Some(tail) = param.strip_prefix(d) {
                return format!("blocks.{idx}.{o}{tail}");
            }
        }
        return name.to_string();
    }
    for (d, o) in TOP {
        if let Some(tail) = name.strip_prefix(d) {
            return format!("{o}{tail}");
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_with_norm_swap() {
        assert_eq!(
            diffusers_to_original_name("blocks.3.norm2.weight"),
            "blocks.3.norm3.weight"
        );
        assert_eq!(
            diffusers_to_original_name("blocks.0.attn2.to_out.0.bias"),
            "blocks.0.cross_attn.o.bias"
        );
        assert_eq!(
            diffusers_to_original_name("scale_shift_table"),
            "head.modulation"
        );
        assert_eq!(
            diffusers_to_original_name("blocks.1.scale_shift_table"),
            "blocks.1.modulation"
        );
        assert_eq!(
            diffusers_to_original_name("condition_embedder.time_proj.weight"),
            "time_projection.1.weight"
        );
        assert_eq!(
            diffusers_to_original_name("patch_embedding.weight"),
            "patch_embedding.weight"
        );
    }

    #[test]
    fn both_layouts_parse_to_the_same_config() {
        let d = r#"{"_class_name":"SkyReelsV2Transformer3DModel","patch_size":[1,2,2],
            "num_attention_heads":12,"attention_head_dim":128,"in_channels":16,"out_channels":16,
            "text_dim":4096,"freq_dim":256,"ffn_dim":8960,"num_layers":30,"cross_attn_norm":true,
            "qk_norm":"rms_norm_across_heads","eps":1e-6,"inject_sample_info":true}"#;
        let o = r#"{"_class_name":"WanModel","dim":1536,"eps":1e-06,"ffn_dim":8960,"freq_dim":256,
            "in_dim":16,"model_type":"t2v","num_heads":12,"num_layers":30,"out_dim":16,
            "text_len":512,"inject_sample_info":true}"#;
        let a = TransformerConfig::from_json(d).unwrap();
        let b = TransformerConfig::from_json(o).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, TransformerConfig::skyreels_v2_df_1_3b());
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(TransformerConfig::from_json("{").is_err());
        assert!(TransformerConfig::from_json("{}").is_err());
        let bad = r#"{"num_attention_heads":2,"attention_head_dim":5,"in_channels":4,
            "text_dim":8,"ffn_dim":8,"num_layers":1}"#;
        assert!(
            TransformerConfig::from_json(bad)
                .unwrap_err()
                .contains("attention_head_dim")
        );
    }
}
