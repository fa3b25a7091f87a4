//! The SkyReels-V2 / Wan 2.1 diffusion-forcing DiT (diffusers
//! `SkyReelsV2Transformer3DModel`), organised for block-causal generation with a K/V cache.
//!
//! Unlike a whole-window forward with a dense block-causal mask, the forward here runs one
//! *attention block* (a causal block of latent frames, or any subset of its tokens) at a
//! time against the keys/values of the blocks before it. Under the block-causal mask this
//! is the same computation as diffusers' full-window forward, and it is what lets finished
//! blocks be computed once and not-started blocks not at all.
//!
//! Tensors inside a forward carry no batch dimension: hidden states are `[tokens, dim]`,
//! keys/values `[1, heads, tokens, head_dim]`.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::TransformerConfig;

/// Cross-attention keys/values of one text context, computed once per prompt.
#[derive(Clone)]
pub struct Context {
    layers: Vec<(Tensor, Tensor)>,
}

/// Timestep conditioning of the frames of one attention block.
#[derive(Clone)]
pub struct FrameModulation {
    /// `[frames, dim]`, f32: conditions the output head.
    pub temb: Tensor,
    /// `[frames, 6, dim]`, f32: the 6-way modulation of every layer (time projection, plus
    /// the fps embedding where the model injects it). MotionCache measures its step
    /// distance on this tensor.
    pub proj: Tensor,
}

/// Which tokens of an attention block a forward processes.
#[derive(Clone)]
pub struct TokenSet {
    /// Sorted token indices within the block; `None` for all of them.
    pub idx: Option<Tensor>,
    /// Number of processed tokens in each frame of the block, in frame order.
    pub frame_counts: Vec<usize>,
    /// RoPE tables of the processed tokens, `[tokens, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Block-causal attention inside the set: the token counts of consecutive attention
    /// groups, each attending to the prefix and to the groups up to itself. `None`: one
    /// group (every token sees every token of the set).
    pub groups: Option<Vec<usize>>,
}

impl TokenSet {
    pub fn len(&self) -> usize {
        self.frame_counts.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keys and values of one attention block for every layer.
#[derive(Clone)]
pub struct BlockKv {
    /// Per layer `(k, v)`, each `[1, heads, tokens, head_dim]`, keys already rotated.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl BlockKv {
    pub fn tokens(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Concatenates several blocks' keys/values along the token axis, layer by layer.
    pub fn concat(blocks: &[&BlockKv]) -> candle_core::Result<Option<BlockKv>> {
        let Some(first) = blocks.first() else {
            return Ok(None);
        };
        if blocks.len() == 1 {
            return Ok(Some((*first).clone()));
        }
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let ks: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].0).collect();
            let vs: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].1).collect();
            layers.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        Ok(Some(BlockKv { layers }))
    }
}

/// 3D rotary position tables: one per axis (frame, height, width), as pairs of cos/sin of
/// `head_dim / 2` complex pairs split (t, h, w); for head_dim 128 that is (22, 21, 21).
struct Rope {
    cos: [Tensor; 3],
    sin: [Tensor; 3],
}

impl Rope {
    fn new(head_dim: usize, max_len: usize, dev: &Device) -> candle_core::Result<Self> {
        let h_dim = 2 * (head_dim / 6);
        let t_dim = head_dim - 2 * h_dim;
        let mk = |dim: usize| -> candle_core::Result<(Tensor, Tensor)> {
            let half = dim / 2;
            let mut c = Vec::with_capacity(max_len * half);
            let mut s = Vec::with_capacity(max_len * half);
            for p in 0..max_len {
                for j in 0..half {
                    // diffusers computes the angles in f64, then casts to f32.
                    let freq = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                    let a = p as f64 * freq;
                    c.push(a.cos() as f32);
                    s.push(a.sin() as f32);
                }
            }
            Ok((
                Tensor::from_vec(c, (max_len, half), dev)?,
                Tensor::from_vec(s, (max_len, half), dev)?,
            ))
        };
        let (ct, st) = mk(t_dim)?;
        let (ch, sh) = mk(h_dim)?;
        let (cw, sw) = mk(h_dim)?;
        Ok(Self {
            cos: [ct, ch, cw],
            sin: [st, sh, sw],
        })
    }

    /// Tables for all tokens of `frames` frames starting at absolute frame `f0`, raster
    /// order (frame, row, column): `[frames * h * w, head_dim / 2]` each.
    fn tables(
        &self,
        f0: usize,
        frames: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let build = |t: &[Tensor; 3]| -> candle_core::Result<Tensor> {
            let max = t[0].dim(0)?;
            if f0 + frames > max || h > max || w > max {
                candle_core::bail!(
                    "rope positions out of range: frames {f0}..{} rows {h} cols {w} (max {max})",
                    f0 + frames
                );
            }
            let (dt, dh, dw) = (t[0].dim(1)?, t[1].dim(1)?, t[2].dim(1)?);
            let tf = t[0]
                .narrow(0, f0, frames)?
                .reshape((frames, 1, 1, dt))?
                .broadcast_as((frames, h, w, dt))?;
            let th = t[1]
                .narrow(0, 0, h)?
                .reshape((1, h, 1, dh))?
                .broadcast_as((frames, h, w, dh))?;
            let tw = t[2]
                .narrow(0, 0, w)?
                .reshape((1, 1, w, dw))?
                .broadcast_as((frames, h, w, dw))?;
            Tensor::cat(&[tf, th, tw], 3)?.reshape((frames * h * w, dt + dh + dw))
        };
        Ok((build(&self.cos)?, build(&self.sin)?))
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// diffusers' FP32LayerNorm: the normalisation itself always runs in f32.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn plain(dim: usize, eps: f64, dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, DType::F32, dev)?,
            bias: Tensor::zeros(dim, DType::F32, dev)?,
            eps: eps as f32,
        })
    }
    fn affine(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }
    /// Returns f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?, &self.weight, &self.bias, self.eps)
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl Attention {
    fn new(cfg: &TransformerConfig, kv_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let (norm_q, norm_k) = if cfg.qk_norm {
            (
                Some(RmsNorm::new(dim, cfg.eps, vb.pp("norm_q"))?),
                Some(RmsNorm::new(dim, cfg.eps, vb.pp("norm_k"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: candle_nn::linear(dim, dim, vb.pp("to_q"))?,
            to_k: candle_nn::linear(kv_dim, dim, vb.pp("to_k"))?,
            to_v: candle_nn::linear(kv_dim, dim, vb.pp("to_v"))?,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q,
            norm_k,
        })
    }

    fn q(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let q = self.to_q.forward(x)?;
        match &self.norm_q {
            Some(n) => n.forward(&q),
            None => Ok(q),
        }
    }

    fn k(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.to_k.forward(x)?;
        match &self.norm_k {
            Some(n) => n.forward(&k),
            None => Ok(k),
        }
    }
}

/// `[tokens, heads * head_dim]` -> `[1, heads, tokens, head_dim]`, contiguous.
fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (n, d) = x.dims2()?;
    x.reshape((1, n, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}

fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, n, hd) = x.dims4()?;
    x.transpose(1, 2)?.reshape((n, h * hd))
}

/// Per-frame affine map of tokens sorted by frame: `x * mul[f] (+ add[f])` for the tokens
/// of frame `f` (`mul`, `add`: `[frames, dim]`). One broadcast op when every frame has the
/// same number of tokens (full forwards), else the rows are expanded per token.
fn per_frame_affine(
    x: &Tensor,
    counts: &[usize],
    mul: &Tensor,
    add: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (n, d) = x.dims2()?;
    let frames = counts.len();
    if frames > 0 && counts.iter().all(|&c| c == counts[0]) {
        let x3 = x.reshape((frames, n / frames, d))?;
        let mut y = x3.broadcast_mul(&mul.unsqueeze(1)?)?;
        if let Some(a) = add {
            y = y.broadcast_add(&a.unsqueeze(1)?)?;
        }
        return y.reshape((n, d));
    }
    let idx: Vec<u32> = counts
        .iter()
        .enumerate()
        .flat_map(|(f, &c)| std::iter::repeat_n(f as u32, c))
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let y = (x * mul.index_select(&idx, 0)?)?;
    match add {
        Some(a) => y + a.index_select(&idx, 0)?,
        None => Ok(y),
    }
}

struct Layer {
    attn1: Attention,
    attn2: Attention,
    norm1: LayerNorm,
    norm2: Option<LayerNorm>,
    norm3: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `[6, dim]`, f32.
    scale_shift_table: Tensor,
    heads: usize,
}

impl Layer {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let dev = vb.device().clone();
        Ok(Self {
            attn1: Attention::new(cfg, dim, vb.pp("attn1"))?,
            attn2: Attention::new(cfg, dim, vb.pp("attn2"))?,
            norm1: LayerNorm::plain(dim, cfg.eps, &dev)?,
            norm2: if cfg.cross_attn_norm {
                Some(LayerNorm::affine(dim, cfg.eps, vb.pp("norm2"))?)
            } else {
                None
            },
            norm3: LayerNorm::plain(dim, cfg.eps, &dev)?,
            ffn_in: candle_nn::linear(dim, cfg.ffn_dim, vb.pp("ffn.net.0.proj"))?,
            ffn_out: candle_nn::linear(cfg.ffn_dim, dim, vb.pp("ffn.net.2"))?,
            scale_shift_table: vb
                .get((1, 6, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?
                .squeeze(0)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// One transformer block over the tokens `toks` of an attention block.
    ///
    /// `own` holds this layer's keys/values of *all* tokens of the attention block; the
    /// processed tokens' new keys/values are written into it (all of it for a full
    /// forward). `prefix` are the keys/values of the blocks this one attends to.
    fn forward(
        &self,
        x: &Tensor,
        proj: &Tensor,
        toks: &TokenSet,
        own: &mut Option<(Tensor, Tensor)>,
        prefix: Option<&(Tensor, Tensor)>,
        ctx: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        // [frames, 6, dim]: the layer's table plus the per-frame timestep projection.
        let m = proj.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?;
        let counts = &toks.frame_counts;
        let modulate = |h: &Tensor, shift: usize, scale: usize| {
            let sc = (m.i((.., scale))? + 1.0)?;
            per_frame_affine(h, counts, &sc, Some(&m.i((.., shift))?.contiguous()?))
        };
        let gated_add = |x: &Tensor, y: &Tensor, gate: usize| -> candle_core::Result<Tensor> {
            let g = per_frame_affine(
                &y.to_dtype(DType::F32)?,
                counts,
                &m.i((.., gate))?.contiguous()?,
                None,
            )?;
            (x.to_dtype(DType::F32)? + g)?.to_dtype(dtype)
        };

        // Self-attention.
        let h = modulate(&self.norm1.forward(x)?, 0, 1)?.to_dtype(dtype)?;
        let q = split_heads(&self.attn1.q(&h)?, self.heads)?;
        let k = split_heads(&self.attn1.k(&h)?, self.heads)?;
        let v = split_heads(&self.attn1.to_v.forward(&h)?, self.heads)?;
        let q = candle_nn::rotary_emb::rope_i(
            &q,
            &toks.cos.to_dtype(dtype)?,
            &toks.sin.to_dtype(dtype)?,
        )?;
        let k = candle_nn::rotary_emb::rope_i(
            &k,
            &toks.cos.to_dtype(dtype)?,
            &toks.sin.to_dtype(dtype)?,
        )?;
        let (k_all, v_all) = match (&toks.idx, own.take()) {
            (Some(idx), Some((k_old, v_old))) => {
                let (_, heads, n, hd) = k.dims4()?;
                let ix = idx
                    .reshape((1, 1, n, 1))?
                    .broadcast_as((1, heads, n, hd))?
                    .contiguous()?;
                (k_old.scatter(&ix, &k, 2)?, v_old.scatter(&ix, &v, 2)?)
            }
            (Some(_), None) => {
                candle_core::bail!(
                    "selective forward of a block whose keys/values were never computed"
                )
            }
            (None, _) => (k, v),
        };
        let (keys, values) = match prefix {
            Some((pk, pv)) => (
                Tensor::cat(&[pk, &k_all], 2)?,
                Tensor::cat(&[pv, &v_all], 2)?,
            ),
            None => (k_all.clone(), v_all.clone()),
        };
        *own = Some((k_all, v_all));
        let a = match &toks.groups {
            None => super::kernels::sdpa(&q, &keys, &values)?,
            Some(sizes) => {
                let mut groups = Vec::with_capacity(sizes.len());
                let (mut start, prefix_len) = (0, prefix.map_or(Ok(0), |(pk, _)| pk.dim(2))?);
                for &len in sizes {
                    groups.push(super::kernels::Group {
                        q_start: start,
                        q_len: len,
                        keys: prefix_len + start + len,
                    });
                    start += len;
                }
                super::kernels::sdpa_grouped(&q, &keys, &values, &groups)?
            }
        };
        let a = merge_heads(&a)?;
        let a = self.attn1.to_out.forward(&a)?;
        let x = gated_add(x, &a, 2)?;

        // Cross-attention on the text context (all positions, padding included).
        let h = match &self.norm2 {
            Some(n) => n.forward(&x)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let q = split_heads(&self.attn2.q(&h)?, self.heads)?;
        let a = merge_heads(&super::kernels::sdpa(&q, &ctx.0, &ctx.1)?)?;
        let x = (&x + self.attn2.to_out.forward(&a)?)?;

        // Feed-forward.
        let h = modulate(&self.norm3.forward(&x)?, 3, 4)?.to_dtype(dtype)?;
        let f = self
            .ffn_out
            .forward(&super::kernels::gelu(&self.ffn_in.forward(&h)?)?)?;
        gated_add(&x, &f, 5)
    }
}

/// The diffusion-forcing DiT.
pub struct Transformer {
    cfg: TransformerConfig,
    patch_w: Tensor,
    patch_b: Tensor,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    fps: Option<(Tensor, Linear, Linear)>,
    layers: Vec<Layer>,
    norm_out: LayerNorm,
    /// `[2, dim]`, f32.
    head_table: Tensor,
    proj_out: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Transformer {
    /// Builds the model from weights in diffusers names (use `VarBuilder::rename_f` with
    /// [`super::config::diffusers_to_original_name`] for original SkyReels-V2 names).
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let dev = vb.device().clone();
        let [pt, ph, pw] = cfg.patch_size;
        let patch_in = cfg.in_channels * pt * ph * pw;
        let patch_w = vb
            .get((dim, cfg.in_channels, pt, ph, pw), "patch_embedding.weight")?
            .reshape((dim, patch_in))?;
        let patch_b = vb.get(dim, "patch_embedding.bias")?;
        let ce = vb.pp("condition_embedder");
        let fps = if cfg.inject_sample_info {
            Some((
                vb.get((2, dim), "fps_embedding.weight")?,
                candle_nn::linear(dim, dim, vb.pp("fps_projection.net.0.proj"))?,
                candle_nn::linear(dim, 6 * dim, vb.pp("fps_projection.net.2"))?,
            ))
        } else {
            None
        };
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_w,
            patch_b,
            // The time embedder stays in f32 in diffusers (`_keep_in_fp32_modules`).
            time_1: f32_linear(cfg.freq_dim, dim, ce.pp("time_embedder.linear_1"))?,
            time_2: f32_linear(dim, dim, ce.pp("time_embedder.linear_2"))?,
            time_proj: candle_nn::linear(dim, 6 * dim, ce.pp("time_proj"))?,
            text_1: candle_nn::linear(cfg.text_dim, dim, ce.pp("text_embedder.linear_1"))?,
            text_2: candle_nn::linear(dim, dim, ce.pp("text_embedder.linear_2"))?,
            fps,
            layers,
            norm_out: LayerNorm::plain(dim, cfg.eps, &dev)?,
            head_table: vb
                .get((1, 2, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?
                .squeeze(0)?,
            proj_out: candle_nn::linear(dim, cfg.out_channels * pt * ph * pw, vb.pp("proj_out"))?,
            rope: Rope::new(cfg.attention_head_dim, cfg.rope_max_seq_len, &dev)?,
            dtype: vb.dtype(),
            device: dev,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Projects a text context `[1, text_len, text_dim]` (or `[text_len, text_dim]`) and
    /// precomputes every layer's cross-attention keys/values.
    pub fn context(&self, encoder_hidden_states: &Tensor) -> candle_core::Result<Context> {
        let c = match encoder_hidden_states.rank() {
            3 => encoder_hidden_states.squeeze(0)?,
            2 => encoder_hidden_states.clone(),
            _ => candle_core::bail!(
                "text context must be [1, len, dim], got {:?}",
                encoder_hidden_states.shape()
            ),
        };
        let c = c.to_dtype(self.dtype)?;
        let c = self.text_2.forward(&self.text_1.forward(&c)?.gelu()?)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let k = split_heads(&l.attn2.k(&c)?, l.heads)?;
                let v = split_heads(&l.attn2.to_v.forward(&c)?, l.heads)?;
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Context { layers })
    }

    /// Timestep (and fps) conditioning for frames with the given timesteps. `fps_class` is
    /// the model's fps class (SkyReels: 0 for 16 fps, 1 otherwise), used when the model
    /// injects sample info.
    pub fn modulation(
        &self,
        timesteps: &[f64],
        fps_class: u32,
    ) -> candle_core::Result<FrameModulation> {
        let f = timesteps.len();
        let dim = self.cfg.dim();
        let half = self.cfg.freq_dim / 2;
        // Sinusoidal embedding with cos first (flip_sin_to_cos), computed in f64.
        let mut e = Vec::with_capacity(f * self.cfg.freq_dim);
        for &t in timesteps {
            let angles: Vec<f64> = (0..half)
                .map(|j| t / 10000f64.powf(j as f64 / half as f64))
                .collect();
            e.extend(angles.iter().map(|a| a.cos() as f32));
            e.extend(angles.iter().map(|a| a.sin() as f32));
        }
        let e = Tensor::from_vec(e, (f, self.cfg.freq_dim), &self.device)?;
        let temb = self.time_2.forward(&self.time_1.forward(&e)?.silu()?)?;
        let mut proj = self
            .time_proj
            .forward(&temb.to_dtype(self.dtype)?.silu()?)?
            .to_dtype(DType::F32)?
            .reshape((f, 6, dim))?;
        if let Some((table, p0, p2)) = &self.fps {
            let emb = table.i(fps_class as usize)?.unsqueeze(0)?;
            let add = p2
                .forward(&p0.forward(&emb)?.silu()?)?
                .to_dtype(DType::F32)?;
            proj = proj.broadcast_add(&add.reshape((1, 6, dim))?)?;
        }
        Ok(FrameModulation {
            temb: temb.to_dtype(DType::F32)?,
            proj,
        })
    }

    /// Latent grid `[C, F, H, W]` -> post-patch grid size `(F', H', W')`.
    pub fn grid(
        &self,
        frames: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let [pt, ph, pw] = self.cfg.patch_size;
        if !frames.is_multiple_of(pt) || !h.is_multiple_of(ph) || !w.is_multiple_of(pw) {
            candle_core::bail!(
                "latent size {frames}x{h}x{w} is not a multiple of the patch size {:?}",
                self.cfg.patch_size
            );
        }
        Ok((frames / pt, h / ph, w / pw))
    }

    /// Patch embedding: latents `[C, F, H, W]` -> tokens `[F'*H'*W', dim]` in raster order.
    pub fn patchify(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (c, f, h, w) = latents.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "latents have {c} channels, the transformer expects {}",
                self.cfg.in_channels
            );
        }
        let [pt, ph, pw] = self.cfg.patch_size;
        let (gf, gh, gw) = self.grid(f, h, w)?;
        let patches = latents
            .to_dtype(self.dtype)?
            .reshape(vec![c, gf, pt, gh, ph, gw, pw])?
            .permute(vec![1, 3, 5, 0, 2, 4, 6])?
            .reshape((gf * gh * gw, c * pt * ph * pw))?;
        patches
            .matmul(&self.patch_w.t()?)?
            .broadcast_add(&self.patch_b)
    }

    /// Output head and unpatchify: tokens `[N, dim]` of a `(F', H', W')` grid -> the
    /// prediction `[C_out, F, H, W]` (f32).
    pub fn head(
        &self,
        x: &Tensor,
        temb: &Tensor,
        grid: (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (gf, gh, gw) = grid;
        let counts = vec![gh * gw; gf];
        let xn = self.norm_out.forward(x)?;
        let shift = temb.broadcast_add(&self.head_table.i(0)?.unsqueeze(0)?)?;
        let scale = (temb.broadcast_add(&self.head_table.i(1)?.unsqueeze(0)?)? + 1.0)?;
        let h = per_frame_affine(&xn, &counts, &scale, Some(&shift))?;
        let out = self
            .proj_out
            .forward(&h.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.out_channels;
        out.reshape(vec![gf, gh, gw, pt, ph, pw, c])?
            .permute(vec![6, 0, 3, 1, 4, 2, 5])?
            .reshape((c, gf * pt, gh * ph, gw * pw))
    }

    /// Token set of all tokens of `frames` grid frames starting at absolute grid frame
    /// `f0` (the RoPE temporal position).
    pub fn all_tokens(
        &self,
        f0: usize,
        frames: usize,
        gh: usize,
        gw: usize,
    ) -> candle_core::Result<TokenSet> {
        let (cos, sin) = self.rope.tables(f0, frames, gh, gw)?;
        Ok(TokenSet {
            idx: None,
            frame_counts: vec![gh * gw; frames],
            cos,
            sin,
            groups: None,
        })
    }

    /// A subset of `all` (which must be a full token set): `idx` sorted ascending.
    pub fn subset(&self, all: &TokenSet, idx: &[u32]) -> candle_core::Result<TokenSet> {
        let per = all.frame_counts.first().copied().unwrap_or(1).max(1);
        let mut counts = vec![0usize; all.frame_counts.len()];
        for &i in idx {
            let f = i as usize / per;
            if f >= counts.len() {
                candle_core::bail!("token index {i} outside a block of {} tokens", all.len());
            }
            counts[f] += 1;
        }
        let t = Tensor::new(idx, &self.device)?;
        if all.groups.is_some() {
            candle_core::bail!("a subset of a token set with several attention groups");
        }
        Ok(TokenSet {
            cos: all.cos.index_select(&t, 0)?,
            sin: all.sin.index_select(&t, 0)?,
            idx: Some(t),
            frame_counts: counts,
            groups: None,
        })
    }

    /// Runs tokens `x` (`[n, dim]`, the patch embeddings of the tokens in `toks`) through
    /// every layer. `kv` receives the block's keys/values (for a subset, it must hold the
    /// block's earlier keys/values, which are updated at the processed tokens); `prefix`
    /// are the keys/values of the blocks this one attends to.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        modulation: &FrameModulation,
        toks: &TokenSet,
        kv: &mut Option<BlockKv>,
        prefix: Option<&BlockKv>,
        ctx: &Context,
    ) -> candle_core::Result<Tensor> {
        if x.dim(0)? != toks.len() {
            candle_core::bail!(
                "forward of {:?} tokens with a token set of {}",
                x.shape(),
                toks.len()
            );
        }
        let mut old = kv.take().map(|b| b.layers.into_iter());
        let mut new_layers = Vec::with_capacity(self.layers.len());
        let mut x = x.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut own = old.as_mut().and_then(|it| it.next());
            let p = prefix.map(|p| &p.layers[l]);
            x = layer.forward(&x, &modulation.proj, toks, &mut own, p, &ctx.layers[l])?;
            match own {
                Some(o) => new_layers.push(o),
                None => candle_core::bail!("layer {l} produced no keys/values"),
            }
        }
        *kv = Some(BlockKv { layers: new_layers });
        Ok(x)
    }

    /// FLOPs (multiply-adds x 2) of the transformer layers for `n` query tokens attending
    /// to `keys` self-attention keys and `text_len` context positions.
    pub fn layer_flops(&self, n: usize, keys: usize, text_len: usize) -> f64 {
        let d = self.cfg.dim() as f64;
        let n = n as f64;
        let per_layer = 2.0 * n * d * d * 4.0 // q, k, v, out
            + 2.0 * n * keys as f64 * d * 2.0 // scores and weighted sum
            + 2.0 * n * d * d * 2.0 // cross q, out
            + 2.0 * n * text_len as f64 * d * 2.0
            + 2.0 * n * d * self.cfg.ffn_dim as f64 * 2.0;
        per_layer * self.cfg.num_layers as f64
    }
}

fn f32_linear(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get((o, i), "weight")?.to_dtype(DType::F32)?;
    let b = vb.get(o, "bias")?.to_dtype(DType::F32)?;
    Ok(Linear::new(w, Some(b)))
}
