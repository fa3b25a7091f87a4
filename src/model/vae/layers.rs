//! Building blocks of the Wan 2.1 VAE: causal 3D convolution made of 2D convolutions,
//! channel RMS norm, residual and attention blocks, spatial/temporal resampling, and the
//! encoder/decoder stacks.
//!
//! Activations inside this module are laid out `[B, T, C, H, W]` (time before channels), so
//! that all frames of a chunk form one `[B*T, C, H, W]` batch for `conv2d` without copies.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Frames a causal convolution keeps from the previous chunk (temporal kernel 3, padding 2
/// in front): diffusers' `CACHE_T`.
const CACHE_T: usize = 2;

/// State carried from one chunk to the next, one slot per cached layer, visited in the
/// same order on every call (like diffusers' `feat_cache` list and `feat_idx` counter).
#[derive(Debug, Default, Clone)]
pub(crate) struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

#[derive(Debug, Default, Clone)]
struct Slot {
    /// The layer has seen the first chunk (temporal resampling treats it specially).
    started: bool,
    /// The last input frames of the layer, `[B, n, C, H, W]`.
    frames: Option<Tensor>,
}

impl FeatCache {
    /// Starts a pass over the layers for one chunk.
    pub(crate) fn rewind(&mut self) {
        self.idx = 0;
    }

    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.idx = 0;
    }

    fn next_slot(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::default());
        }
        let slot = &mut self.slots[self.idx];
        self.idx += 1;
        slot
    }
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// `[B, T, C, H, W]` -> `[B*T, C, H, W]`.
fn frames_as_batch(x: &Tensor) -> Result<(Tensor, (usize, usize))> {
    let (b, t, c, h, w) = x.dims5()?;
    Ok((x.reshape((b * t, c, h, w))?, (b, t)))
}

/// `[B*T, C, H, W]` -> `[B, T, C, H, W]`.
fn batch_as_frames(x: &Tensor, (b, t): (usize, usize)) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    x.reshape((b, t, c, h, w))
}

/// A 2D convolution (weight `[C_out, C_in, kh, kw]`, symmetric padding).
///
/// candle's CPU conv2d has no bf16 kernel: with bf16 weights on the CPU the weights are kept
/// in f32 and the input is widened for the convolution and narrowed after it (what candle's
/// own bf16 matmul does on the CPU).
#[derive(Debug, Clone)]
pub(crate) struct Conv2dLayer {
    weight: Tensor,
    /// `[1, C_out, 1, 1]`
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2dLayer {
    fn from_weight(weight: Tensor, bias: Tensor, padding: usize, stride: usize) -> Result<Self> {
        let c_out = weight.dim(0)?;
        let weight = if weight.dtype() == DType::BF16 && weight.device().is_cpu() {
            weight.to_dtype(DType::F32)?
        } else {
            weight
        };
        let bias = bias.to_dtype(weight.dtype())?.reshape((1, c_out, 1, 1))?;
        Ok(Self {
            weight: weight.contiguous()?,
            bias,
            padding,
            stride,
        })
    }

    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        padding: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        Self::from_weight(weight, bias, padding, stride)
    }

    /// `x`: `[N, C_in, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xc = x.to_dtype(self.weight.dtype())?;
        xc.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

/// Wan's `CausalConv3d`: a 3D convolution whose temporal padding is all in front (zeros, or
/// the cached last frames of the previous chunk), so frame t only sees frames <= t.
///
/// candle has no Conv3d. The `kt` temporal taps are stacked along channels (the input frames
/// t, t+1, .., t+kt-1 concatenated) and convolved with the kernel reshaped to
/// `[C_out, kt*C_in, kh, kw]`: one `conv2d` over all frames of the chunk at once, which
/// gives the matrix multiply a `kt` times longer inner dimension than one conv per tap.
#[derive(Debug, Clone)]
pub(crate) struct CausalConv3d {
    /// The kernel as `[C_out, kt*C_in, kh, kw]`.
    conv: Conv2dLayer,
    kt: usize,
    stride_t: usize,
    /// Zero frames in front when there is no history (2 * temporal padding).
    front_pad: usize,
}

impl CausalConv3d {
    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize, usize),
        stride_t: usize,
        padding: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        let w = vb.get((c_out, c_in, kt, kh, kw), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let weight = w
            .permute((0, 2, 1, 3, 4))?
            .reshape((c_out, kt * c_in, kh, kw))?;
        Ok(Self {
            conv: Conv2dLayer::from_weight(weight, bias, padding.1, 1)?,
            kt,
            stride_t,
            front_pad: 2 * padding.0,
        })
    }

    /// The convolution over `x` `[B, T, C, H, W]` already holding its temporal history:
    /// output frame j sees input frames `j*stride .. j*stride + kt`.
    fn conv_frames(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        if t < self.kt {
            candle_core::bail!(
                "causal conv: {t} frames (history included) for a temporal kernel of {}",
                self.kt
            )
        }
        let t_out = (t - self.kt) / self.stride_t + 1;
        let taps = if self.kt == 1 && self.stride_t == 1 {
            x.clone()
        } else {
            let mut taps = Vec::with_capacity(self.kt);
            for k in 0..self.kt {
                let tap = if self.stride_t == 1 {
                    x.narrow(1, k, t_out)?
                } else {
                    let ids: Vec<u32> = (0..t_out)
                        .map(|j| (k + j * self.stride_t) as u32)
                        .collect();
                    let ids = Tensor::new(ids.as_slice(), x.device())?;
                    x.index_select(&ids, 1)?
                };
                taps.push(tap);
            }
            Tensor::cat(&taps, 2)?
        };
        let taps = taps.reshape((b * t_out, self.kt * c, h, w))?;
        batch_as_frames(&self.conv.forward(&taps)?, (b, t_out))
    }

    /// Without history: zero padding in front (the first chunk, or a whole sequence).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.front_pad > 0 {
            x.pad_with_zeros(1, self.front_pad, 0)?
        } else {
            x.clone()
        };
        self.conv_frames(&x)
    }

    /// One chunk of a stream: the slot holds the last `CACHE_T` input frames of the
    /// previous chunks (zero frames standing in for the missing ones), so that a stream
    /// cut into chunks gives the same frames as the whole sequence at once.
    fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let slot = cache.next_slot();
        self.forward_with_history(x, &mut slot.frames)
    }

    fn forward_with_history(&self, x: &Tensor, history: &mut Option<Tensor>) -> Result<Tensor> {
        if self.front_pad == 0 {
            return self.conv_frames(x);
        }
        let padded = match history.as_ref() {
            Some(h) => {
                let hist_len = h.dim(1)?;
                Tensor::cat(&[h, x], 1)?.pad_with_zeros(1, self.front_pad.saturating_sub(hist_len), 0)?
            }
            None => x.pad_with_zeros(1, self.front_pad, 0)?,
        };
        let len = padded.dim(1)?;
        // `copy` so that the cache does not keep the whole chunk's buffer alive.
        *history = Some(padded.narrow(1, len - CACHE_T, CACHE_T)?.copy()?);
        self.conv_frames(&padded)
    }
}

/// Wan's `RMS_norm` over channels: `x / max(||x||_2, 1e-12) * sqrt(C) * gamma`, computed in
/// f32 for half-precision inputs as diffusers does.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    /// `gamma * sqrt(C)`, shaped `[1, C, 1, 1]` to broadcast over `[N, C, H, W]`.
    scale: Tensor,
}

impl RmsNorm {
    /// `images`: the attention block's norm has gamma `[C, 1, 1]`, the others `[C, 1, 1, 1]`.
    pub(crate) fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        let scale = (gamma.reshape((1, dim, 1, 1))? * (dim as f64).sqrt())?;
        Ok(Self { scale })
    }

    /// `x`: `[N, C, H, W]`.
    fn forward_nchw(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if is_half(dtype) {
            x.to_dtype(DType::F32)?
        } else {
            x.clone()
        };
        let norm = xf.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
        xf.broadcast_div(&norm)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.scale)
    }

    /// `x`: `[B, T, C, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xb, bt) = frames_as_batch(x)?;
        batch_as_frames(&self.forward_nchw(&xb)?, bt)
    }
}

/// Wan's `ResidualBlock`: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))` with
/// causal 3x3x3 convolutions (dropout is inference-time identity).
#[derive(Debug, Clone)]
pub(crate) struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_dim != out_dim {
            Some(CausalConv3d::new(
                in_dim,
                out_dim,
                (1, 1, 1),
                1,
                (0, 0),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: CausalConv3d::new(in_dim, out_dim, (3, 3, 3), 1, (1, 1), vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: CausalConv3d::new(out_dim, out_dim, (3, 3, 3), 1, (1, 1), vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let y = self.norm1.forward(x)?.silu()?;
        let y = self.conv1.forward_cached(&y, cache)?;
        let y = self.norm2.forward(&y)?.silu()?;
        let y = self.conv2.forward_cached(&y, cache)?;
        y + h
    }
}

/// Wan's `AttentionBlock`: single-head self-attention over the pixels of each frame.
#[derive(Debug, Clone)]
pub(crate) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2dLayer,
    proj: Conv2dLayer,
    dim: usize,
}

impl AttentionBlock {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: Conv2dLayer::new(dim, dim * 3, 1, 0, 1, vb.pp("to_qkv"))?,
            proj: Conv2dLayer::new(dim, dim, 1, 0, 1, vb.pp("proj"))?,
            dim,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xb, bt) = frames_as_batch(x)?;
        let (n, c, h, w) = xb.dims4()?;
        let qkv = self.to_qkv.forward(&self.norm.forward_nchw(&xb)?)?;
        // [N, 3C, HW] -> [N, HW, 3C]: q, k, v are consecutive channel groups.
        let qkv = qkv.reshape((n, 3 * c, h * w))?.transpose(1, 2)?;
        let dtype = x.dtype();
        // Scores and softmax in f32: cheap at these sizes, and safe in half precision.
        let q = qkv.narrow(D::Minus1, 0, c)?.to_dtype(DType::F32)?.contiguous()?;
        let k = qkv.narrow(D::Minus1, c, c)?.to_dtype(DType::F32)?.contiguous()?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?.to_dtype(DType::F32)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (self.dim as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.to_dtype(dtype)?;
        let out = out.transpose(1, 2)?.reshape((n, c, h, w))?;
        let out = self.proj.forward(&out)?;
        batch_as_frames(&out, bt)? + x
    }
}

/// Nearest-neighbour 2x upsampling of `[N, C, H, W]` (diffusers' "nearest-exact" with scale
/// 2 picks the same source pixels).
fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((n, c, 2 * h, 2 * w))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResampleMode {
    Upsample2d,
    Upsample3d,
    Downsample2d,
    Downsample3d,
}

/// Wan's `Resample`: spatial 2x up/down (a 2D conv per frame) and, in the 3D modes, a
/// temporal 2x up/down made of a causal convolution over time.
#[derive(Debug, Clone)]
pub(crate) struct Resample {
    mode: ResampleMode,
    /// `resample.1`: the 2D conv (3x3, padding 1 after upsampling; stride 2 after a
    /// right/bottom zero pad when downsampling).
    conv: Conv2dLayer,
    /// Upsample3d: (dim -> 2*dim, kernel (3,1,1)); downsample3d: (dim -> dim, kernel
    /// (3,1,1), stride 2 in time, no padding).
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    pub(crate) fn new(dim: usize, mode: ResampleMode, vb: VarBuilder) -> Result<Self> {
        let (conv, time_conv) = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let conv = Conv2dLayer::new(dim, dim / 2, 3, 1, 1, vb.pp("resample.1"))?;
                let time_conv = if mode == ResampleMode::Upsample3d {
                    Some(CausalConv3d::new(
                        dim,
                        dim * 2,
                        (3, 1, 1),
                        1,
                        (1, 0),
                        vb.pp("time_conv"),
                    )?)
                } else {
                    None
                };
                (conv, time_conv)
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                let conv = Conv2dLayer::new(dim, dim, 3, 0, 2, vb.pp("resample.1"))?;
                let time_conv = if mode == ResampleMode::Downsample3d {
                    Some(CausalConv3d::new(
                        dim,
                        dim,
                        (3, 1, 1),
                        2,
                        (0, 0),
                        vb.pp("time_conv"),
                    )?)
                } else {
                    None
                };
                (conv, time_conv)
            }
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        match self.mode {
            ResampleMode::Upsample2d => self.spatial(x),
            ResampleMode::Upsample3d => {
                let x = self.upsample_time(x, cache)?;
                self.spatial(&x)
            }
            ResampleMode::Downsample2d => self.spatial(x),
            ResampleMode::Downsample3d => {
                let x = self.spatial(x)?;
                self.downsample_time(&x, cache)
            }
        }
    }

    fn spatial(&self, x: &Tensor) -> Result<Tensor> {
        let (xb, bt) = frames_as_batch(x)?;
        let y = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                self.conv.forward(&upsample_nearest2x(&xb)?)?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                let padded = xb.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                self.conv.forward(&padded)?
            }
        };
        batch_as_frames(&y, bt)
    }

    /// Each frame becomes two: the time conv doubles the channels and the two halves are
    /// consecutive output frames. The stream's very first frame is passed through alone
    /// (diffusers' "Rep" marker), and the time conv's history starts after it with zeros,
    /// exactly as diffusers' cache does when it decodes frame by frame.
    fn upsample_time(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let Some(time_conv) = &self.time_conv else {
            candle_core::bail!("upsample3d without time_conv")
        };
        let slot = cache.next_slot();
        let (first, rest) = if slot.started {
            (None, Some(x.clone()))
        } else {
            slot.started = true;
            let t = x.dim(1)?;
            let rest = if t > 1 {
                Some(x.narrow(1, 1, t - 1)?)
            } else {
                None
            };
            (Some(x.narrow(1, 0, 1)?), rest)
        };
        let doubled = match rest {
            Some(rest) => {
                let y = time_conv.forward_with_history(&rest, &mut slot.frames)?;
                let (b, t, c2, h, w) = y.dims5()?;
                Some(y.reshape((b, t * 2, c2 / 2, h, w))?)
            }
            None => None,
        };
        match (first, doubled) {
            (Some(f), Some(d)) => Tensor::cat(&[f, d], 1),
            (Some(f), None) => Ok(f),
            (None, Some(d)) => Ok(d),
            (None, None) => candle_core::bail!("upsample3d: empty chunk"),
        }
    }

    /// Stride-2 causal time conv without padding. The stream's first frame passes through
    /// alone; later windows start at even frames (0,1,2), (2,3,4), .., so a chunk after the
    /// first carries the previous chunk's last frame in front and must have an even length.
    fn downsample_time(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let Some(time_conv) = &self.time_conv else {
            candle_core::bail!("downsample3d without time_conv")
        };
        let slot = cache.next_slot();
        let t = x.dim(1)?;
        let last = x.narrow(1, t - 1, 1)?.copy()?;
        let out = if slot.started {
            if t % 2 != 0 {
                candle_core::bail!(
                    "temporal downsampling: a chunk after the first needs an even number of frames, got {t}"
                )
            }
            let prev = slot
                .frames
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("downsample3d: missing cache".into()))?;
            time_conv.conv_frames(&Tensor::cat(&[prev, x], 1)?)?
        } else {
            if t % 2 != 1 {
                candle_core::bail!(
                    "temporal downsampling: the first chunk needs an odd number of frames, got {t}"
                )
            }
            let first = x.narrow(1, 0, 1)?;
            if t > 1 {
                Tensor::cat(&[first, time_conv.conv_frames(x)?], 1)?
            } else {
                first
            }
        };
        slot.started = true;
        slot.frames = Some(last);
        Ok(out)
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Residual(ResidualBlock),
    Attention(AttentionBlock),
    Resample(Resample),
}

impl Layer {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        match self {
            Layer::Residual(l) => l.forward(x, cache),
            Layer::Attention(l) => l.forward(x),
            Layer::Resample(l) => l.forward(x, cache),
        }
    }
}

/// Residual block, attention, residual block (`mid_block`).
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResidualBlock,
    attention: AttentionBlock,
    resnet1: ResidualBlock,
}

impl MidBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet0: ResidualBlock::new(dim, dim, vb.pp("resnets.0"))?,
            attention: AttentionBlock::new(dim, vb.pp("attentions.0"))?,
            resnet1: ResidualBlock::new(dim, dim, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = self.resnet0.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward(&x, cache)
    }
}

/// The layer sizes both stacks are built from (validated configuration).
#[derive(Debug, Clone)]
pub(crate) struct StackConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub dim: usize,
    pub z_channels: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    /// Per level (all but the last): temporal 2x down (encoder) or up (decoder, already
    /// reversed).
    pub temporal: Vec<bool>,
}

/// `WanEncoder3d` (non-residual, Wan 2.1).
#[derive(Debug, Clone)]
pub(crate) struct Encoder3d {
    conv_in: CausalConv3d,
    down_blocks: Vec<Layer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder3d {
    pub(crate) fn new(cfg: &StackConfig, vb: VarBuilder) -> Result<Self> {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|u| cfg.dim * u)
            .collect();
        let conv_in = CausalConv3d::new(
            cfg.in_channels,
            dims[0],
            (3, 3, 3),
            1,
            (1, 1),
            vb.pp("conv_in"),
        )?;
        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::new();
        let mut scale = 1.0;
        let levels = cfg.dim_mult.len();
        for i in 0..levels {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let vb = vb_down.pp(down_blocks.len());
                down_blocks.push(Layer::Residual(ResidualBlock::new(in_dim, out_dim, vb)?));
                if cfg.attn_scales.contains(&scale) {
                    let vb = vb_down.pp(down_blocks.len());
                    down_blocks.push(Layer::Attention(AttentionBlock::new(out_dim, vb)?));
                }
                in_dim = out_dim;
            }
            if i != levels - 1 {
                let mode = if cfg.temporal[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                let vb = vb_down.pp(down_blocks.len());
                down_blocks.push(Layer::Resample(Resample::new(out_dim, mode, vb)?));
                scale /= 2.0;
            }
        }
        let out_dim = dims[levels];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(out_dim, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::new(
                out_dim,
                cfg.z_channels,
                (3, 3, 3),
                1,
                (1, 1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// One chunk `[B, T, C, H, W]`: the first chunk must have 1 + 2^d*k frames and later
    /// ones 2^d*k (d = temporal downsampling levels), as diffusers' 1, 4, 4, .. split.
    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        cache.rewind();
        let mut x = self.conv_in.forward_cached(x, cache)?;
        for layer in &self.down_blocks {
            x = layer.forward(&x, cache)?;
        }
        let x = self.mid_block.forward(&x, cache)?;
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward_cached(&x, cache)
    }
}

/// One decoder up block: `num_res_blocks + 1` residual blocks and, but for the last level,
/// an upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

/// `WanDecoder3d` (non-residual, Wan 2.1).
#[derive(Debug, Clone)]
pub(crate) struct Decoder3d {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder3d {
    pub(crate) fn new(cfg: &StackConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[levels - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|u| cfg.dim * u)
            .collect();
        let conv_in = CausalConv3d::new(
            cfg.z_channels,
            dims[0],
            (3, 3, 3),
            1,
            (1, 1),
            vb.pp("conv_in"),
        )?;
        let mid_block = MidBlock::new(dims[0], vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            let vb = vb.pp("up_blocks").pp(i);
            // Every upsampler but the last halves the channels (Wan 2.1).
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_dim = dims[i + 1];
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..cfg.num_res_blocks + 1 {
                resnets.push(ResidualBlock::new(
                    in_dim,
                    out_dim,
                    vb.pp("resnets").pp(j),
                )?);
                in_dim = out_dim;
            }
            let upsampler = if i != levels - 1 {
                let mode = if cfg.temporal[i] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                };
                Some(Resample::new(out_dim, mode, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let out_dim = dims[levels];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: RmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::new(
                out_dim,
                cfg.out_channels,
                (3, 3, 3),
                1,
                (1, 1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// One chunk of latent frames `[B, T, z, h, w]` (any T >= 1) -> pixel frames.
    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        cache.rewind();
        let mut x = self.conv_in.forward_cached(x, cache)?;
        x = self.mid_block.forward(&x, cache)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, cache)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, cache)?;
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward_cached(&x, cache)
    }
}

/// A 1x1x1 causal conv (`quant_conv`, `post_quant_conv`) as a matrix multiply over
/// channels, optionally keeping only the first `keep` output channels (the encoder's mean).
#[derive(Debug, Clone)]
pub(crate) struct PointwiseConv {
    /// `[C_out, C_in]`
    weight: Tensor,
    /// `[C_out, 1]`
    bias: Tensor,
}

impl PointwiseConv {
    pub(crate) fn new(c_in: usize, c_out: usize, keep: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((c_out, c_in, 1, 1, 1), "weight")?;
        let b = vb.get(c_out, "bias")?;
        Ok(Self {
            weight: w.reshape((c_out, c_in))?.narrow(0, 0, keep)?.contiguous()?,
            bias: b.narrow(0, 0, keep)?.reshape((keep, 1))?,
        })
    }

    /// `x`: `[B, T, C, H, W]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        let x = x.reshape((b * t, c, h * w))?;
        let y = self
            .weight
            .broadcast_left(b * t)?
            .matmul(&x)?
            .broadcast_add(&self.bias)?;
        let keep = self.weight.dim(0)?;
        y.reshape((b, t, keep, h, w))
    }
}

/// `[B, C, T, H, W]` <-> `[B, T, C, H, W]`.
pub(crate) fn swap_channels_time(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 1, 3, 4))?.contiguous()
}
