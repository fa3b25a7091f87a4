//! umT5 text encoder (transformers' `UMT5EncoderModel`, the SkyReels-V2 / Wan 2.1 text
//! encoder), the T5 v1.1 encoder (transformers' `T5EncoderModel`, MAGI-1's DeepFloyd
//! t5-v1_1-xxl) and the prompt-to-context step of the SkyReels-V2 diffusion-forcing pipeline.
//!
//! umT5 and T5 v1.1 differ only in the relative-position bias: umT5 gives *every* layer its
//! own table, T5 (and mT5) has one table, in layer 0
//! (`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`), whose bias all
//! layers add. [`UMT5Config::model_type`] (`"umt5"` / `"t5"` / `"mt5"` in transformers'
//! `config.json`) says which; without it [`UMT5Encoder::new`] looks for layer 1's table in the
//! weights. [`T5Config`] / [`T5Encoder`] are the same types under the T5 names.
//!
//! Neither scales the attention logits by `1/sqrt(d_kv)` (T5 folds it into the weights).
//!
//! Numerics: the residual stream, the RMS norms, the position bias, the padding mask and the
//! softmax are kept in f32 whatever the weight dtype; the projections run in the weight dtype.
//! With f16 weights the gated FFN product and its output projection `wo` run in f32 as well
//! (transformers keeps `wo` in f32 for the same reason, `_keep_in_fp32_modules`): T5-family
//! FFN activations overflow f16's 65504. That costs the `wo` weights twice their f16 memory
//! (about 2 GB more for umt5-xxl); bf16 has f32's range and keeps `wo` in bf16.
//! transformers runs the residual stream in the weight dtype, so bf16/f16 outputs differ from
//! its half-precision outputs by rounding (ours are closer to f32). The attention logits
//! `q k^T` are computed in the weight dtype; umT5 does not scale them, which f16 tolerates for
//! the released weights but is the remaining place an f16 run could overflow.
//!
//! Weight names: transformers' (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q`,
//! ...) through [`UMT5Encoder::new`], the original `models_t5_umt5-xxl-enc-bf16.pth` names
//! (`token_embedding.weight`, `blocks.N.attn.q`, ...) through [`UMT5Encoder::new_original`]
//! or [`hf_to_original_name`] with `VarBuilder::rename_f`.

use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::{Embedding, Linear, VarBuilder, linear_no_bias};

use super::tokenizer::PromptTokenizer;

fn default_vocab_size() -> usize {
    250112
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    1024
}
fn default_num_layers() -> usize {
    8
}
fn default_num_heads() -> usize {
    6
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "gated-gelu".to_string()
}
fn default_pad_token_id() -> u32 {
    0
}
fn default_eos_token_id() -> u32 {
    1
}

/// `text_encoder/config.json` of a diffusers pipeline; defaults are transformers'
/// `UMT5Config` defaults (umt5-small), so a config must name the sizes it differs in.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct UMT5Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (umT5), `"relu"`, or `[gated-]ACT` with ACT one of `gelu`, `gelu_new`,
    /// `gelu_pytorch_tanh`, `relu`, `silu`, `swish`.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: u32,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    /// transformers' `model_type`: `"umt5"` (a relative-position bias table per layer) or
    /// `"t5"` / `"mt5"` (layer 0's table shared by all layers). `None` (or another value):
    /// decided from the weights, see [`UMT5Config::shared_relative_bias`].
    #[serde(default)]
    pub model_type: Option<String>,
}

/// The T5 (v1.1) names of the shared T5 / umT5 config (see the module docs).
pub type T5Config = UMT5Config;
/// The T5 (v1.1) names of the shared T5 / umT5 encoder (see the module docs).
pub type T5Encoder = UMT5Encoder;

impl Default for UMT5Config {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            d_model: default_d_model(),
            d_kv: default_d_kv(),
            d_ff: default_d_ff(),
            num_layers: default_num_layers(),
            num_heads: default_num_heads(),
            relative_attention_num_buckets: default_num_buckets(),
            relative_attention_max_distance: default_max_distance(),
            layer_norm_epsilon: default_eps(),
            feed_forward_proj: default_feed_forward_proj(),
            pad_token_id: default_pad_token_id(),
            eos_token_id: default_eos_token_id(),
            model_type: None,
        }
    }
}

impl UMT5Config {
    /// umt5-xxl encoder as used by Wan 2.1 / SkyReels-V2 (`umt5_xxl` in the original code);
    /// the original checkpoint comes without a config file.
    pub fn umt5_xxl() -> Self {
        Self {
            vocab_size: 256384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            ..Self::default()
        }
    }

    /// Reads a transformers `config.json`; the error names the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            candle_core::Error::msg(format!("cannot read umT5 config {}: {e}", path.display()))
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| {
            candle_core::Error::msg(format!("invalid umT5 config {}: {e}", path.display()))
        })?;
        cfg.feed_forward().map_err(|e| {
            candle_core::Error::msg(format!("invalid umT5 config {}: {e}", path.display()))
        })?;
        Ok(cfg)
    }

    /// Whether all layers add layer 0's relative-position bias (T5, mT5: `Some(true)`) or each
    /// has its own table (umT5: `Some(false)`), from [`Self::model_type`]; `None` when the
    /// config does not say, and [`UMT5Encoder::new`] decides from the weights (shared when
    /// layer 1 has no `relative_attention_bias`).
    pub fn shared_relative_bias(&self) -> Option<bool> {
        match self.model_type.as_deref() {
            Some("t5" | "mt5") => Some(true),
            Some("umt5") => Some(false),
            _ => None,
        }
    }

    /// Width of the attention projections (`num_heads * d_kv`, not necessarily `d_model`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            Some(_) => bail!("unsupported feed_forward_proj {proj:?}"),
            None => (false, proj),
        };
        // transformers maps "gated-gelu" (and only that spelling) to the tanh approximation.
        let act = match (gated, act) {
            (true, "gelu") => Activation::GeluTanh,
            (_, "gelu") => Activation::GeluErf,
            (_, "gelu_new" | "gelu_pytorch_tanh") => Activation::GeluTanh,
            (_, "relu") => Activation::Relu,
            (_, "silu" | "swish") => Activation::Silu,
            _ => bail!("unsupported feed_forward_proj {proj:?}"),
        };
        Ok((gated, act))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    GeluTanh,
    GeluErf,
    Relu,
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Maps a transformers `UMT5EncoderModel` tensor name to its name in the original
/// SkyReels-V2 / Wan `models_t5_umt5-xxl-enc-bf16.pth`; unknown names pass through.
/// Use with `VarBuilder::rename_f` (see [`UMT5Encoder::new_original`]).
pub fn hf_to_original_name(name: &str) -> String {
    match name {
        "shared.weight" | "encoder.embed_tokens.weight" => return "token_embedding.weight".into(),
        "encoder.final_layer_norm.weight" => return "norm.weight".into(),
        _ => {}
    }
    let Some(rest) = name.strip_prefix("encoder.block.") else {
        return name.to_string();
    };
    let Some((n, rest)) = rest.split_once('.') else {
        return name.to_string();
    };
    let mapped = match rest {
        "layer.0.layer_norm.weight" => "norm1.weight",
        "layer.0.SelfAttention.q.weight" => "attn.q.weight",
        "layer.0.SelfAttention.k.weight" => "attn.k.weight",
        "layer.0.SelfAttention.v.weight" => "attn.v.weight",
        "layer.0.SelfAttention.o.weight" => "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight" => "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight" => "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight" => "ffn.fc2.weight",
        _ => return name.to_string(),
    };
    format!("blocks.{n}.{mapped}")
}

/// Bucket of a relative position `key - query` for bidirectional (encoder) attention,
/// exactly as transformers computes it (f32 logarithm, truncation toward zero).
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let n = relative_position.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // Mirrors torch's op order and precision: log of an f32 ratio divided by a scalar
        // that torch rounds to f32, then `.long()` truncates.
        let ratio = (n as f32 / max_exact as f32).ln();
        let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
        let scaled = ratio / denom * (half - max_exact) as f32;
        let large = (max_exact + scaled as i64).min(half - 1);
        bucket += large;
    }
    bucket as u32
}

/// `[q_len * k_len]` bucket indices for queries and keys at positions `0..len`.
fn bucket_indices(len: usize, cfg: &UMT5Config, device: &Device) -> Result<Tensor> {
    let mut idx = Vec::with_capacity(len * len);
    for q in 0..len as i64 {
        for k in 0..len as i64 {
            idx.push(relative_position_bucket(
                k - q,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            ));
        }
    }
    Tensor::from_vec(idx, len * len, device)
}

/// T5's layer norm: RMS only (no mean, no bias), computed in f32.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    /// `x` is the f32 residual stream; returns the weight dtype (the projections' input).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct UMT5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `None` in T5's layers after the first (they add layer 0's bias).
    relative_attention_bias: Option<Embedding>,
    num_heads: usize,
    d_kv: usize,
}

impl UMT5Attention {
    fn new(cfg: &UMT5Config, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.inner_dim();
        let relative_attention_bias = if has_bias {
            let table = vb.pp("relative_attention_bias").get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
            Some(Embedding::new(table, cfg.num_heads))
        } else {
            None
        };
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `[1, H, L, L]` f32 bias of this layer's table.
    fn position_bias(&self, buckets: &Tensor, len: usize) -> Result<Tensor> {
        let Some(table) = &self.relative_attention_bias else {
            bail!("T5: this layer has no relative_attention_bias table");
        };
        table
            .forward(buckets)?
            .to_dtype(DType::F32)?
            .reshape((len, len, self.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// `x`: normed `[B, L, d_model]` in the weight dtype; `mask`: additive f32 `[B, 1, 1, L]`;
    /// `shared_bias`: layer 0's `[1, H, L, L]` bias for T5 (`None`: this layer's own table).
    /// Returns the f32 `[B, L, d_model]` attention output.
    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        shared_bias: Option<&Tensor>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        let bias = match shared_bias {
            Some(bias) => bias.clone(),
            None => self.position_bias(buckets, l)?,
        };
        // T5 / umT5 do not scale the logits by 1/sqrt(d_kv).
        let scores = q
            .matmul(&k.t()?.contiguous()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(&bias)?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?;
        self.o.forward(&out)?.to_dtype(DType::F32)
    }
}

#[derive(Debug, Clone)]
struct UMT5FeedForward {
    /// `wi_0` when gated (its output goes through the activation), else `wi`.
    wi: Linear,
    /// `wi_1`, the linear half of the gated product.
    wi_linear: Option<Linear>,
    wo: Linear,
    act: Activation,
    /// f16 weights: product and `wo` in f32 (see the module docs).
    f32_out: bool,
}

impl UMT5FeedForward {
    fn new(cfg: &UMT5Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let f32_out = vb.dtype() == DType::F16;
        let wo_vb = if f32_out {
            vb.pp("wo").set_dtype(DType::F32)
        } else {
            vb.pp("wo")
        };
        let wo = linear_no_bias(cfg.d_ff, cfg.d_model, wo_vb)?;
        let (wi, wi_linear) = if gated {
            (
                linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?),
            )
        } else {
            (linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?, None)
        };
        Ok(Self {
            wi,
            wi_linear,
            wo,
            act,
            f32_out,
        })
    }

    /// `x`: normed input in the weight dtype; returns f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let up = |t: Tensor| -> Result<Tensor> {
            if self.f32_out {
                t.to_dtype(DType::F32)
            } else {
                Ok(t)
            }
        };
        let mut h = self.act.apply(&up(self.wi.forward(x)?)?)?;
        if let Some(lin) = &self.wi_linear {
            h = (h * up(lin.forward(x)?)?)?;
        }
        self.wo.forward(&h)?.to_dtype(DType::F32)
    }
}

#[derive(Debug, Clone)]
struct UMT5Block {
    attn_norm: T5LayerNorm,
    attn: UMT5Attention,
    ff_norm: T5LayerNorm,
    ff: UMT5FeedForward,
}

impl UMT5Block {
    fn new(cfg: &UMT5Config, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let sa = vb.pp("layer.0");
        let ff = vb.pp("layer.1");
        Ok(Self {
            attn_norm: T5LayerNorm::new(cfg.d_model, eps, sa.pp("layer_norm"))?,
            attn: UMT5Attention::new(cfg, has_bias, sa.pp("SelfAttention"))?,
            ff_norm: T5LayerNorm::new(cfg.d_model, eps, ff.pp("layer_norm"))?,
            ff: UMT5FeedForward::new(cfg, ff.pp("DenseReluDense"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        shared_bias: Option<&Tensor>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let x =
            (x + self
                .attn
                .forward(&self.attn_norm.forward(x)?, buckets, shared_bias, mask)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

/// The umT5 / T5 v1.1 encoder stack (`UMT5EncoderModel` / `T5EncoderModel`): embedding,
/// blocks, final norm.
#[derive(Debug, Clone)]
pub struct UMT5Encoder {
    embed_tokens: Embedding,
    blocks: Vec<UMT5Block>,
    /// T5: every layer adds layer 0's bias (resolved from the config or the weights).
    shared_relative_bias: bool,
    final_layer_norm: T5LayerNorm,
    cfg: UMT5Config,
    dtype: DType,
    device: Device,
}

impl UMT5Encoder {
    /// Weights in transformers names, `vb` at the root of `model.safetensors`. The token
    /// embedding is read from `shared.weight`, or `encoder.embed_tokens.weight` if only
    /// that is stored (both are the same tied tensor). The weights' dtype is `vb`'s.
    /// T5 or umT5 bias layout: [`UMT5Config::shared_relative_bias`], else shared when the
    /// weights have no `encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight`.
    pub fn new(cfg: &UMT5Config, vb: VarBuilder) -> Result<Self> {
        cfg.feed_forward()?;
        let embed_name = if vb.contains_tensor("shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let table = vb
            .pp(embed_name)
            .get((cfg.vocab_size, cfg.d_model), "weight")?;
        let enc = vb.pp("encoder");
        let shared_relative_bias = cfg.shared_relative_bias().unwrap_or_else(|| {
            cfg.num_layers > 1
                && !vb.contains_tensor(
                    "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
                )
        });
        let blocks = (0..cfg.num_layers)
            .map(|i| UMT5Block::new(cfg, i == 0 || !shared_relative_bias, enc.pp("block").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(table, cfg.d_model),
            blocks,
            shared_relative_bias,
            final_layer_norm: T5LayerNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                enc.pp("final_layer_norm"),
            )?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Weights in the original SkyReels-V2 / Wan names (`models_t5_umt5-xxl-enc-bf16.pth`,
    /// e.g. from `VarBuilder::from_pth`); `cfg` is usually [`UMT5Config::umt5_xxl`].
    pub fn new_original(cfg: &UMT5Config, vb: VarBuilder) -> Result<Self> {
        Self::new(cfg, vb.rename_f(hf_to_original_name))
    }

    pub fn config(&self) -> &UMT5Config {
        &self.cfg
    }

    /// `true` for T5 (all layers add layer 0's relative-position bias), `false` for umT5.
    pub fn shares_relative_bias(&self) -> bool {
        self.shared_relative_bias
    }

    /// dtype of the weights and of the output.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `input_ids`: `[B, L]` integer ids; `attention_mask`: `[B, L]`, 1 for real tokens and
    /// 0 for padding (any dtype). Returns `last_hidden_state` `[B, L, d_model]` in the
    /// weight dtype. Outputs at padded positions are whatever the model computes there (as
    /// in transformers); [`encode_prompts`] zeroes them.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if attention_mask.dims() != [b, l] {
            bail!(
                "umT5: attention_mask shape {:?} does not match input_ids {:?}",
                attention_mask.shape(),
                input_ids.shape()
            );
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let keep = attention_mask
            .to_device(&self.device)?
            .to_dtype(DType::F32)?;
        // Additive mask, f32::MIN where masked, like transformers' eager path.
        let mask = ((keep.ones_like()? - keep)? * f32::MIN as f64)?.reshape((b, 1, 1, l))?;
        let buckets = bucket_indices(l, &self.cfg, &self.device)?;
        let mut x = self.embed_tokens.forward(&ids)?.to_dtype(DType::F32)?;
        let shared_bias = match (self.shared_relative_bias, self.blocks.first()) {
            (true, Some(first)) => Some(first.attn.position_bias(&buckets, l)?),
            _ => None,
        };
        for block in &self.blocks {
            x = block.forward(&x, &buckets, shared_bias.as_ref(), &mask)?;
        }
        self.final_layer_norm.forward(&x)?.to_dtype(self.dtype)
    }
}

/// Zeroes every position at or after each sequence's length and pads (or cuts) to
/// `max_len` positions: `hidden` `[B, L, D]` -> `[B, max_len, D]`, as the reference pipelines
/// do to the encoder output (`u[:v]` then zero padding).
pub fn zero_after_lengths(hidden: &Tensor, seq_lens: &[usize], max_len: usize) -> Result<Tensor> {
    let (b, l, d) = hidden.dims3()?;
    if seq_lens.len() != b {
        bail!(
            "zero_after_lengths: {} lengths for a batch of {b}",
            seq_lens.len()
        );
    }
    let hidden = if l > max_len {
        hidden.narrow(1, 0, max_len)?
    } else {
        hidden.clone()
    };
    let l = l.min(max_len);
    let keep: Vec<f32> = seq_lens
        .iter()
        .flat_map(|&n| (0..max_len).map(move |i| if i < n.min(l) { 1.0 } else { 0.0 }))
        .collect();
    let keep =
        Tensor::from_vec(keep, (b, max_len, 1), hidden.device())?.to_dtype(hidden.dtype())?;
    let padded = if l < max_len {
        let zeros = Tensor::zeros((b, max_len - l, d), hidden.dtype(), hidden.device())?;
        Tensor::cat(&[&hidden, &zeros], 1)?
    } else {
        hidden
    };
    padded.broadcast_mul(&keep)
}

/// diffusers' `SkyReelsV2DiffusionForcingPipeline._get_t5_prompt_embeds`: clean and tokenize
/// each prompt (truncated to `max_sequence_length` tokens including EOS), encode, zero the
/// output after each prompt's real tokens and pad to `max_sequence_length` (512 in the
/// pipeline). Returns `[B, max_sequence_length, d_model]` in the encoder's dtype.
///
/// Only the first `max(real lengths)` positions are run through the encoder: padded keys are
/// masked and the bias depends only on relative positions, so the real tokens' outputs are
/// the same as with the full padded input, at a fraction of the cost for short prompts.
pub fn encode_prompts(
    encoder: &UMT5Encoder,
    tokenizer: &PromptTokenizer,
    prompts: &[&str],
    max_sequence_length: usize,
) -> Result<Tensor> {
    let tokens = tokenizer
        .encode(prompts, max_sequence_length)
        .map_err(candle_core::Error::wrap)?;
    let seq_lens = tokens.seq_lens();
    let longest = seq_lens.iter().copied().max().unwrap_or(0).max(1);
    let (ids, mask) = tokens.to_tensors(encoder.device())?;
    let ids = ids.i((.., ..longest))?;
    let mask = mask.i((.., ..longest))?;
    let hidden = encoder.forward(&ids, &mask)?;
    zero_after_lengths(&hidden, &seq_lens, max_sequence_length)
}
