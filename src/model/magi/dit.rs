//! The MAGI-1 DiT (SandAI-org/MAGI-1 `inference/model/dit`), on weights under the upstream
//! names.
//!
//! What differs from the Wan DiT (see `shared/docs/MAGI1.md` §1.1): the adaLN has no
//! shift/scale, only two tanh gates per layer applied before a post-norm; self- and
//! cross-attention run in parallel from one LayerNorm and share one output projection
//! whose input is re-interleaved for 8 tensor-parallel ranks; queries and keys get a
//! per-head LayerNorm with zero-centred gamma (`w + 1`); keys/values are grouped (GQA);
//! RoPE covers 3/4 of the head (t, h, w) with learned bands; the caption reaches the
//! model only through cross-attention, each chunk attending to its own caption.
//!
//! A forward holds one or more chunks of `chunk_width` latent frames ("denoising ranges"),
//! each with its own timestep, caption and range of keys; keys of earlier chunks come from
//! a [`MagiKvCache`], as upstream's `InferenceParams` keeps them.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::MagiModelConfig;
use crate::cache::Plan;
use crate::model::kernels::{Group, sdpa_tokens};

/// PyTorch `LayerNorm` over the last axis, optionally with zero-centred gamma; always in
/// f32 (upstream runs the q/k norms, post-norms and the final norm in f32).
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn new(dim: usize, eps: f64, one_plus: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        if one_plus {
            weight = (weight + 1.0)?;
        }
        Ok(Self {
            weight,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if crate::model::kernels::f32_kernels(&[&x, &self.weight, &self.bias]) {
            return crate::model::kernels::layer_norm(&x, &self.weight, &self.bias, self.eps);
        }
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((o, i), "weight")?, None))
}

fn linear_f32(i: usize, o: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get((o, i), "weight")?.to_dtype(DType::F32)?;
    let b = if bias {
        Some(vb.get(o, "bias")?.to_dtype(DType::F32)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

struct Layer {
    ada: Linear,
    ln_qkv: Norm,
    q: Linear,
    qx: Linear,
    k: Linear,
    v: Linear,
    kv_xattn: Linear,
    proj: Linear,
    q_norm: Norm,
    qx_norm: Norm,
    k_norm: Norm,
    kx_norm: Norm,
    attn_post: Norm,
    mlp_ln: Norm,
    fc1: Linear,
    fc2: Linear,
    mlp_post: Norm,
}

impl Layer {
    fn new(c: &MagiModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let hd = c.kv_channels;
        let qd = c.num_attention_heads * hd;
        let kvd = c.num_query_groups * hd;
        let eps = c.layernorm_epsilon;
        let p1 = c.apply_layernorm_1p;
        let sa = vb.pp("self_attention");
        let qkv = sa.pp("linear_qkv");
        let fc1_out = if c.gated_linear_unit {
            2 * c.ffn_hidden_size
        } else {
            c.ffn_hidden_size
        };
        Ok(Self {
            ada: linear_f32(
                c.cond_dim(),
                2 * c.gate_dim(),
                true,
                vb.pp("ada_modulate_layer.proj.0"),
            )?,
            ln_qkv: Norm::new(d, eps, false, qkv.pp("layer_norm"))?,
            q: linear_no_bias(d, qd, qkv.pp("q"))?,
            qx: linear_no_bias(d, qd, qkv.pp("qx"))?,
            k: linear_no_bias(d, kvd, qkv.pp("k"))?,
            v: linear_no_bias(d, kvd, qkv.pp("v"))?,
            kv_xattn: linear_no_bias(c.xattn_dim(), 2 * kvd, sa.pp("linear_kv_xattn"))?,
            proj: linear_f32(2 * qd, d, false, sa.pp("linear_proj"))?,
            q_norm: Norm::new(hd, eps, p1, sa.pp("q_layernorm"))?,
            qx_norm: Norm::new(hd, eps, p1, sa.pp("q_layernorm_xattn"))?,
            k_norm: Norm::new(hd, eps, p1, sa.pp("k_layernorm"))?,
            kx_norm: Norm::new(hd, eps, p1, sa.pp("k_layernorm_xattn"))?,
            attn_post: Norm::new(d, eps, p1, vb.pp("self_attn_post_norm"))?,
            mlp_ln: Norm::new(d, eps, false, vb.pp("mlp.layer_norm"))?,
            fc1: linear_no_bias(d, fc1_out, vb.pp("mlp.linear_fc1"))?,
            fc2: linear_no_bias(c.ffn_hidden_size, d, vb.pp("mlp.linear_fc2"))?,
            mlp_post: Norm::new(d, eps, p1, vb.pp("mlp_post_norm"))?,
        })
    }
}

/// Per-layer keys/values of earlier chunks, `[capacity, kv_heads, 2 * head_dim]` per layer
/// (keys then values per head), as upstream's `InferenceParams.key_value_memory_dict`.
pub struct MagiKvCache {
    layers: Vec<Tensor>,
    capacity: usize,
}

impl MagiKvCache {
    /// Room for `capacity` tokens in every layer.
    pub fn new(dit: &MagiDit, capacity: usize) -> candle_core::Result<Self> {
        let c = &dit.cfg;
        let layers = (0..c.num_layers)
            .map(|_| {
                Tensor::zeros(
                    (capacity, c.num_query_groups, 2 * c.kv_channels),
                    dit.dtype,
                    &dit.device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the first `rows` tokens of every layer: what was at `rows..` moves to the
    /// front (a long walk drops the chunks no key range reaches any more).
    pub fn drop_front(&mut self, rows: usize) -> candle_core::Result<()> {
        let rows = rows.min(self.capacity);
        if rows == 0 {
            return Ok(());
        }
        for l in self.layers.iter_mut() {
            let (_, g, w) = l.dims3()?;
            let fresh = Tensor::zeros((rows, g, w), l.dtype(), l.device())?;
            *l = Tensor::cat(&[&l.narrow(0, rows, self.capacity - rows)?, &fresh], 0)?;
        }
        Ok(())
    }
}

/// How a forward uses the cache (upstream: `inference_params` with `update_kv_cache`, and
/// `_full_adjust_key_and_value` taken when the forward extracts a prefix, re-forwards the
/// clean chunk first or has `slice_point > 0`).
pub struct CacheUse<'a> {
    pub cache: &'a mut MagiKvCache,
    /// Whether the cache is read (`[0, slice_point * chunk_tokens)` before this forward's
    /// keys) and written at all.
    pub active: bool,
    /// Whether this forward's keys/values are written at `slice_point * chunk_tokens`.
    pub update: bool,
    /// Trailing chunks not written (the appended "nearly clean" copy of the distill model).
    pub skip_last_chunks: usize,
}

/// One forward: `chunks` consecutive chunks of the latent `x`.
pub struct MagiInput<'a> {
    /// `[1, C, T, H, W]` latents (T a multiple of the chunk count).
    pub x: &'a Tensor,
    /// Per chunk, upstream's timestep (0 = noise, 1 = clean).
    pub t: &'a [f64],
    /// Per chunk caption embeddings `[chunks, L, caption_channels]`.
    pub captions: &'a Tensor,
    /// Per chunk, the valid caption positions (`[chunks, L]`, 0 or 1).
    pub caption_mask: &'a Tensor,
    /// Condition on the null caption's adaLN row (`caption_dropout_mask = True`: the
    /// unconditional pass) instead of the text row.
    pub null_condition: bool,
    /// Per chunk, the key range `[start, end)` in `[cached keys | this forward's keys]`.
    pub kv_range: &'a [(usize, usize)],
    /// Chunks before this forward's first one whose keys are cached.
    pub slice_point: usize,
    /// Chunks of the video before the cache's first one (dropped from it by a long walk):
    /// the positions of this forward's frames start after `chunk_offset + slice_point`
    /// chunks.
    pub chunk_offset: usize,
    /// Denoising steps of the schedule (the distill model embeds the step size).
    pub num_steps: usize,
    /// The distill model's shortcut interval (only used with 12 steps).
    pub distill_interval: Option<f64>,
    /// Checked before every layer: once set, the forward stops with [`CANCELLED`].
    pub cancel: Option<&'a AtomicBool>,
    /// Per chunk, which of its tokens go through the transformer (MotionCache); `None`:
    /// all. The others keep the keys/values the cache holds for them (the forward must
    /// write the cache) and their output is 0.
    pub tokens: Option<&'a [Plan]>,
}

/// The rows a forward computes when its input's [`MagiInput::tokens`] leaves some out.
struct Selection {
    /// Per chunk, its rows among the computed ones.
    counts: Vec<usize>,
    /// The computed rows (forward-local token indices), ascending.
    rows: Tensor,
    /// For every token of the forward, where its keys/values come from in
    /// `[cached rows of the forward's tokens (written) | computed rows]`.
    merge: Tensor,
    /// For every token, `1 + its computed row`, or 0 (a zero row) when not computed.
    scatter: Tensor,
    written: usize,
}

impl Selection {
    /// `None` when every token is computed.
    fn new(
        plans: Option<&[Plan]>,
        chunk_tokens: usize,
        written_chunks: usize,
        device: &Device,
    ) -> candle_core::Result<Option<Self>> {
        let Some(plans) = plans else { return Ok(None) };
        if plans.iter().all(|p| *p == Plan::Full) {
            return Ok(None);
        }
        let written = written_chunks * chunk_tokens;
        let n = plans.len() * chunk_tokens;
        let (mut rows, mut counts) = (Vec::new(), Vec::with_capacity(plans.len()));
        for (i, plan) in plans.iter().enumerate() {
            let start = rows.len();
            match plan {
                Plan::Full => rows.extend((0..chunk_tokens).map(|k| (i * chunk_tokens + k) as u32)),
                Plan::Skip => {}
                Plan::Tokens(t) => {
                    if t.windows(2).any(|w| w[0] >= w[1])
                        || t.last().is_some_and(|&k| k as usize >= chunk_tokens)
                    {
                        candle_core::bail!(
                            "chunk {i}: token selection is not ascending below {chunk_tokens}"
                        );
                    }
                    rows.extend(t.iter().map(|&k| (i * chunk_tokens) as u32 + k));
                }
            }
            if (i + 1) * chunk_tokens > written && rows.len() - start != chunk_tokens {
                candle_core::bail!(
                    "chunk {i} is not written to the cache: it must be computed whole"
                );
            }
            counts.push(rows.len() - start);
        }
        let mut merge: Vec<u32> = (0..n as u32).collect();
        let mut scatter = vec![0u32; n];
        for (j, &r) in rows.iter().enumerate() {
            merge[r as usize] = (written + j) as u32;
            scatter[r as usize] = j as u32 + 1;
        }
        let m = rows.len();
        if m == 0 {
            candle_core::bail!("a forward with no token to compute");
        }
        Ok(Some(Self {
            counts,
            rows: Tensor::from_vec(rows, m, device)?,
            merge: Tensor::from_vec(merge, n, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            written,
        }))
    }

    /// Query groups of the computed rows, chunk by chunk, with `keys(i)` of chunk `i`.
    fn groups(&self, keys: impl Fn(usize) -> (usize, usize)) -> Vec<Group> {
        let mut start = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &q_len)| {
                let (k_start, keys) = keys(i);
                let g = Group {
                    q_start: start,
                    q_len,
                    k_start,
                    keys,
                };
                start += q_len;
                g
            })
            .collect()
    }
}

/// The message of a forward stopped by [`MagiInput::cancel`].
pub const CANCELLED: &str = "MAGI-1 forward cancelled";

/// The MAGI-1 DiT.
pub struct MagiDit {
    cfg: MagiModelConfig,
    distill: bool,
    /// `[hidden, C * pt * ph * pw]`, f32.
    x_embedder: Tensor,
    t_1: Linear,
    t_2: Linear,
    y_xattn: Linear,
    y_adaln: Linear,
    /// `[caption_max_length, caption_channels]`, f32.
    null_caption: Tensor,
    /// Learned RoPE frequencies, host f32.
    bands: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Norm,
    final_linear: Linear,
    dtype: DType,
    device: Device,
}

impl MagiDit {
    /// Builds the DiT on weights under the upstream names; `distill` is the engine
    /// config's flag (the distilled checkpoints add a step-size embedding).
    pub fn new(cfg: &MagiModelConfig, distill: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = cfg;
        let d = c.hidden_size;
        let (pt, p) = (c.t_patch_size, c.patch_size);
        let x_embedder = vb
            .get((d, c.in_channels, pt, p, p), "x_embedder.weight")?
            .to_dtype(DType::F32)?
            .reshape((d, c.in_channels * pt * p * p))?;
        let cd = c.cond_dim();
        let nb = c.kv_channels / 8;
        let bands = vb
            .get(nb, "rope.bands")?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let layers = (0..c.num_layers)
            .map(|i| Layer::new(c, vb.pp(format!("videodit_blocks.layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ye = vb.pp("y_embedder");
        Ok(Self {
            cfg: c.clone(),
            distill,
            x_embedder,
            t_1: linear_f32(256, cd, true, vb.pp("t_embedder.mlp.0"))?,
            t_2: linear_f32(cd, cd, true, vb.pp("t_embedder.mlp.2"))?,
            y_xattn: linear_f32(
                c.caption_channels,
                c.xattn_dim(),
                true,
                ye.pp("y_proj_xattn.0"),
            )?,
            y_adaln: linear_f32(c.caption_channels, cd, true, ye.pp("y_proj_adaln.0"))?,
            null_caption: ye
                .get(
                    (c.caption_max_length, c.caption_channels),
                    "null_caption_embedding",
                )?
                .to_dtype(DType::F32)?,
            bands,
            layers,
            final_norm: Norm::new(
                d,
                c.layernorm_epsilon,
                c.apply_layernorm_1p,
                vb.pp("videodit_blocks.final_layernorm"),
            )?,
            final_linear: linear_f32(
                d,
                p * p * pt * c.out_channels,
                false,
                vb.pp("final_linear.linear"),
            )?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &MagiModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' (and the KV cache's) data type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The null caption embedding `[caption_max_length, caption_channels]` (the
    /// unconditional and clean-chunk caption; upstream treats its first 50 rows as valid).
    pub fn null_caption(&self) -> &Tensor {
        &self.null_caption
    }

    /// The patch embedding (upstream's `x_embedder`: a bias-free Conv3d with kernel =
    /// stride) of latents `[1, C, T, H, W]`: `[T/pt * H/p * W/p, hidden]` f32, tokens
    /// frame-major. MAGI-1's MotionCache measures change on it.
    pub fn embed_patches(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (pt, p) = (c.t_patch_size, c.patch_size);
        let (_, ch, frames, hh, ww) = x.dims5()?;
        let (gt, gh, gw) = (frames / pt, hh / p, ww / p);
        let s = gt * gh * gw;
        let mut x = (x.to_dtype(DType::F32)? * c.x_rescale_factor)?;
        if c.half_channel_vae {
            x = Tensor::cat(&[&x, &x], 1)?;
        }
        let ch = if c.half_channel_vae { 2 * ch } else { ch };
        let patches = x
            .reshape(vec![ch, gt, pt, gh, p, gw, p])?
            .permute(vec![1, 3, 5, 0, 2, 4, 6])?
            .reshape((s, ch * pt * p * p))?;
        patches.matmul(&self.x_embedder.t()?)
    }

    /// Upstream's sinusoidal timestep embedding (256 wide, `[cos | sin]`, argument
    /// `t * 1000`), computed in f32 as upstream does.
    fn timestep_embedding(&self, t: &[f32]) -> candle_core::Result<Tensor> {
        let half = 128usize;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln() as f32) * i as f32 / half as f32).exp())
            .collect();
        let mut v = Vec::with_capacity(t.len() * 2 * half);
        for &ti in t {
            let args: Vec<f32> = freqs.iter().map(|f| ti * f * 1000.0).collect();
            v.extend(args.iter().map(|a| a.cos()));
            v.extend(args.iter().map(|a| a.sin()));
        }
        let e = Tensor::from_vec(v, (t.len(), 2 * half), &self.device)?;
        self.t_2
            .forward(&candle_nn::ops::silu(&self.t_1.forward(&e)?)?)
    }

    /// `[S, 3 * bands]` sin and cos of the RoPE angles of the last `t * h * w` positions of a
    /// `t_total x h x w` grid (upstream's `LearnableRotaryEmbeddingCat.get_embed` with
    /// `in_pixels=False` and its multi-resolution rescale).
    fn rope(
        &self,
        t_total: usize,
        t: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rf = ((h * w) as f64 / 256.0).sqrt();
        let ref_shape = [t_total as f64, h as f64 / rf, w as f64 / rf];
        let axis = |n: usize, centre: bool, r: f64| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let mut x = i as f32;
                    if centre {
                        x -= ((n - 1) as f64 / 2.0) as f32;
                    }
                    if n != 1 {
                        x = x / (n - 1) as f32 * (r - 1.0) as f32;
                    }
                    x
                })
                .collect()
        };
        let (at, ah, aw) = (
            axis(t_total, false, ref_shape[0]),
            axis(h, true, ref_shape[1]),
            axis(w, true, ref_shape[2]),
        );
        let nb = self.bands.len();
        let s = t * h * w;
        let mut sin = Vec::with_capacity(s * 3 * nb);
        let mut cos = Vec::with_capacity(s * 3 * nb);
        for &ft in &at[t_total - t..] {
            for &fh in &ah {
                for &fw in &aw {
                    for g in [ft, fh, fw] {
                        for &b in &self.bands {
                            let a = g * b;
                            sin.push(a.sin());
                            cos.push(a.cos());
                        }
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(sin, (s, 3 * nb), &self.device)?,
            Tensor::from_vec(cos, (s, 3 * nb), &self.device)?,
        ))
    }

    /// Runs one forward; returns the velocity `[1, C, T, H, W]` (f32).
    pub fn forward(&self, inp: &MagiInput, cache: Option<CacheUse>) -> candle_core::Result<Tensor> {
        crate::model::kernels::on_pool(&self.device, || self.forward_here(inp, cache))
    }

    /// [`Self::forward`] on the calling thread.
    fn forward_here(
        &self,
        inp: &MagiInput,
        mut cache: Option<CacheUse>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (pt, p) = (c.t_patch_size, c.patch_size);
        let (b, _, frames, hh, ww) = inp.x.dims5()?;
        let chunks = inp.t.len();
        if b != 1 || chunks == 0 || frames % (chunks * pt) != 0 || hh % p != 0 || ww % p != 0 {
            candle_core::bail!(
                "MAGI-1 input {:?} does not split into {chunks} chunks of patches {pt}x{p}x{p}",
                inp.x.shape()
            );
        }
        if inp.kv_range.len() != chunks || inp.captions.dim(0)? != chunks {
            candle_core::bail!(
                "{chunks} chunks but {} key ranges and {} captions",
                inp.kv_range.len(),
                inp.captions.dim(0)?
            );
        }
        let (gt, gh, gw) = (frames / pt, hh / p, ww / p);
        let s = gt * gh * gw;
        let chunk_tokens = s / chunks;

        let mut x = self.embed_patches(inp.x)?;

        // RoPE over the cached chunks' frames too; this forward's rows are the last ones.
        let frames_per_chunk = gt / chunks;
        let t_total = gt + frames_per_chunk * (inp.slice_point + inp.chunk_offset);
        let (mut sin, mut cos) = self.rope(t_total, gt, gh, gw)?;
        let written_chunks = match &cache {
            Some(u) if u.active && u.update => chunks - u.skip_last_chunks.min(chunks),
            _ => 0,
        };
        let sel = Selection::new(inp.tokens, chunk_tokens, written_chunks, &self.device)?;
        if let Some(sel) = &sel {
            x = x.index_select(&sel.rows, 0)?;
            sin = sin.index_select(&sel.rows, 0)?;
            cos = cos.index_select(&sel.rows, 0)?;
        }

        // Condition per chunk: timestep (+ distill step size) + the null caption's adaLN row.
        let tf: Vec<f32> = inp.t.iter().map(|&t| t as f32).collect();
        let mut temb = self.timestep_embedding(&tf)?;
        if self.distill {
            let factor = match (inp.num_steps, inp.distill_interval) {
                (12, Some(iv)) => 4.0 / iv * 2.0,
                _ => inp.num_steps as f64 / 4.0 * 2.0,
            };
            temb = (temb + self.timestep_embedding(&vec![factor as f32; chunks])?)?;
        }
        let row = c.caption_max_length - if inp.null_condition { 1 } else { 2 };
        let adaln = self
            .y_adaln
            .forward(&self.null_caption.narrow(0, row, 1)?)?;
        let condition = temb.broadcast_add(&adaln)?;
        let cond_act = candle_nn::ops::silu(&condition)?;

        // Captions: projected, packed to their valid rows per chunk.
        let y = self.y_xattn.forward(&inp.captions.to_dtype(DType::F32)?)?;
        let y = candle_nn::ops::silu(&y)?;
        let mask = inp.caption_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut rows = Vec::new();
        let mut cross_groups = Vec::with_capacity(chunks);
        let mut caption_keys = Vec::with_capacity(chunks);
        for (i, m) in mask.iter().enumerate() {
            let start = rows.len();
            rows.extend(
                m.iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(j, _)| (i * m.len() + j) as u32),
            );
            if rows.len() == start {
                candle_core::bail!("chunk {i} has an empty caption");
            }
            cross_groups.push(Group {
                q_start: i * chunk_tokens,
                q_len: chunk_tokens,
                k_start: start,
                keys: rows.len() - start,
            });
            caption_keys.push((start, rows.len() - start));
        }
        let n_rows = rows.len();
        let idx = Tensor::from_vec(rows, n_rows, &self.device)?;
        let y_flat = y
            .reshape((chunks * mask[0].len(), y.dim(2)?))?
            .index_select(&idx, 0)?
            .to_dtype(self.dtype)?;

        // Self-attention key ranges over [cached | this forward's] keys.
        let cached = match &cache {
            Some(u) if u.active => inp.slice_point * chunk_tokens,
            _ => 0,
        };
        let mut self_groups: Vec<Group> = inp
            .kv_range
            .iter()
            .enumerate()
            .map(|(i, &(a, e))| Group {
                q_start: i * chunk_tokens,
                q_len: chunk_tokens,
                k_start: a,
                keys: e.saturating_sub(a),
            })
            .collect();
        if let Some(sel) = &sel {
            self_groups = sel.groups(|i| (self_groups[i].k_start, self_groups[i].keys));
            cross_groups = sel.groups(|i| caption_keys[i]);
        }
        if let Some(u) = &cache
            && u.active
        {
            let written = if u.update {
                s.saturating_sub(u.skip_last_chunks * chunk_tokens)
            } else {
                0
            };
            if cached + written > u.cache.capacity {
                candle_core::bail!(
                    "KV cache of {} tokens cannot hold {cached} cached + {written} new",
                    u.cache.capacity
                );
            }
        }

        x = x.to_dtype(self.dtype)?;
        for (l, layer) in self.layers.iter().enumerate() {
            if inp.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                candle_core::bail!("{CANCELLED}");
            }
            let layer_cache = cache.as_mut().map(|u| (&mut *u, l));
            x = self.layer_forward(
                layer,
                &x,
                LayerCtx {
                    chunks,
                    chunk_tokens,
                    sin: &sin,
                    cos: &cos,
                    y_flat: &y_flat,
                    cross_groups: &cross_groups,
                    self_groups: &self_groups,
                    cond_act: &cond_act,
                    slice_point: inp.slice_point,
                    sel: sel.as_ref(),
                },
                layer_cache,
            )?;
        }

        let x = self.final_norm.forward(&x)?;
        let mut out = self.final_linear.forward(&x)?;
        if let Some(sel) = &sel {
            let zero = Tensor::zeros((1, out.dim(1)?), out.dtype(), out.device())?;
            out = Tensor::cat(&[&zero, &out], 0)?.index_select(&sel.scatter, 0)?;
        }
        let co = c.out_channels;
        let v = out
            .reshape(vec![gt, gh, gw, pt, p, p, co])?
            .permute(vec![6, 0, 3, 1, 4, 2, 5])?
            .reshape((1, co, gt * pt, gh * p, gw * p))?;
        let v = if c.half_channel_vae {
            v.narrow(1, 0, co / 2)?
        } else {
            v
        };
        v / c.x_rescale_factor
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        cx: LayerCtx,
        cache: Option<(&mut CacheUse, usize)>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (heads, groups, hd) = (c.num_attention_heads, c.num_query_groups, c.kv_channels);
        let s = x.dim(0)?;
        let h = layer.ln_qkv.forward(x)?.to_dtype(self.dtype)?;

        // Queries and keys: per-head norm (f32), RoPE on the first 3/4 of the head.
        let rope = |t: &Tensor| apply_rope(t, cx.cos, cx.sin);
        let q = layer.q.forward(&h)?.reshape((s, heads, hd))?;
        let q = rope(&layer.q_norm.forward(&q)?)?.to_dtype(self.dtype)?;
        let k = layer.k.forward(&h)?.reshape((s, groups, hd))?;
        let k = rope(&layer.k_norm.forward(&k)?)?.to_dtype(self.dtype)?;
        let v = layer.v.forward(&h)?.reshape((s, groups, hd))?;
        let mut kv = Tensor::cat(&[&k, &v], 2)?;

        let kv_all = match cache {
            Some((u, l)) if u.active => {
                let start = cx.slice_point * cx.chunk_tokens;
                let buf = &u.cache.layers[l];
                if let Some(sel) = cx.sel {
                    // the tokens not computed keep the keys/values the cache holds
                    let old = buf.narrow(0, start, sel.written)?.to_dtype(kv.dtype())?;
                    kv = Tensor::cat(&[&old, &kv], 0)?.index_select(&sel.merge, 0)?;
                }
                if u.update {
                    let n = cx.chunks * cx.chunk_tokens - u.skip_last_chunks * cx.chunk_tokens;
                    buf.slice_set(
                        &kv.narrow(0, 0, n)?.to_dtype(buf.dtype())?.contiguous()?,
                        0,
                        start,
                    )?;
                }
                if start > 0 {
                    Tensor::cat(&[&buf.narrow(0, 0, start)?.to_dtype(kv.dtype())?, &kv], 0)?
                } else {
                    kv
                }
            }
            _ => kv,
        };
        let keys = kv_all.narrow(2, 0, hd)?;
        let vals = kv_all.narrow(2, hd, hd)?;
        let core = attention(&q, &keys, &vals, heads, cx.self_groups)?;

        // Cross-attention on each chunk's caption.
        let qx = layer.qx.forward(&h)?.reshape((s, heads, hd))?;
        let qx = layer.qx_norm.forward(&qx)?.to_dtype(self.dtype)?;
        let ny = cx.y_flat.dim(0)?;
        let kvx = layer
            .kv_xattn
            .forward(cx.y_flat)?
            .reshape((ny, groups, 2 * hd))?;
        let kx = layer
            .kx_norm
            .forward(&kvx.narrow(2, 0, hd)?)?
            .to_dtype(self.dtype)?;
        let vx = kvx.narrow(2, hd, hd)?;
        let cross = attention(&qx, &kx, &vx, heads, cx.cross_groups)?;

        // One output projection over [self | cross], re-interleaved for 8 ranks.
        let qd = heads * hd;
        let a = Tensor::cat(&[&core, &cross], 1)?
            .reshape((s, 2, 8, qd / 8))?
            .transpose(1, 2)?
            .reshape((s, 2 * qd))?
            .to_dtype(DType::F32)?;
        let a = layer.proj.forward(&a)?;

        // Gates per chunk: tanh(Linear(SiLU(condition))).
        let gates = layer.ada.forward(cx.cond_act)?.tanh()?;
        let d = c.hidden_size;
        let gate = |t: &Tensor, i: usize| -> candle_core::Result<Tensor> {
            let g = gates.narrow(1, i * d, d)?;
            let Some(sel) = cx.sel else {
                return t
                    .reshape((cx.chunks, cx.chunk_tokens, d))?
                    .broadcast_mul(&g.unsqueeze(1)?)?
                    .reshape((s, d));
            };
            let mut parts = Vec::with_capacity(cx.chunks);
            let mut start = 0;
            for (c, &n) in sel.counts.iter().enumerate() {
                if n > 0 {
                    parts.push(t.narrow(0, start, n)?.broadcast_mul(&g.narrow(0, c, 1)?)?);
                }
                start += n;
            }
            Tensor::cat(&parts, 0)
        };
        let x32 = x.to_dtype(DType::F32)?;
        let x1 = (layer.attn_post.forward(&gate(&a, 0)?)? + x32)?.to_dtype(self.dtype)?;

        let hm = layer.mlp_ln.forward(&x1)?.to_dtype(self.dtype)?;
        let f = layer.fc1.forward(&hm)?;
        let f = if c.gated_linear_unit {
            let n = f.dim(1)? / 2;
            (candle_nn::ops::silu(&f.narrow(1, 0, n)?)? * f.narrow(1, n, n)?)?
        } else {
            f.gelu_erf()?
        };
        let f = layer.fc2.forward(&f)?.to_dtype(DType::F32)?;
        (layer.mlp_post.forward(&gate(&f, 1)?)? + x1.to_dtype(DType::F32)?)?.to_dtype(self.dtype)
    }
}

struct LayerCtx<'a> {
    chunks: usize,
    chunk_tokens: usize,
    sin: &'a Tensor,
    cos: &'a Tensor,
    y_flat: &'a Tensor,
    cross_groups: &'a [Group],
    self_groups: &'a [Group],
    cond_act: &'a Tensor,
    slice_point: usize,
    sel: Option<&'a Selection>,
}

/// Rotate-half RoPE (flash-attn's non-interleaved `apply_rotary_emb`) on the first
/// `2 * cos.dim(1)` dims of `x` `[S, heads, hd]`; the rest pass through.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = cos.dim(1)?;
    let hd = x.dim(D::Minus1)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    let mut parts = vec![o1, o2];
    if 2 * half < hd {
        parts.push(x.narrow(2, 2 * half, hd - 2 * half)?);
    }
    Tensor::cat(&parts, 2)
}

/// Grouped-query attention `[S, heads, hd]` against `[L, kv_heads, hd]` keys/values, query
/// rows in `groups`; returns `[S, heads * hd]`.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    groups: &[Group],
) -> candle_core::Result<Tensor> {
    let (s, _, hd) = q.dims3()?;
    let (l, kvh, _) = k.dims3()?;
    let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.transpose(0, 1)?; // [kvh, L, hd]
        t.unsqueeze(1)?
            .broadcast_as((kvh, heads / kvh, l, hd))?
            .reshape((1, heads, l, hd))?
            .contiguous()
    };
    // Token-major queries and output: no head split or merge (see `sdpa_tokens`).
    sdpa_tokens(
        &q.reshape((s, heads * hd))?,
        None,
        &expand(k)?,
        &expand(v)?,
        groups,
    )
}
