//! Building blocks of the Wan 2.1 VAE: causal 3D convolution (im2col over a chunk's frames
//! with the causal history in front, see [`super::conv`]), channel RMS norm, residual and attention blocks, spatial/temporal resampling, and the
//! encoder/decoder stacks.
//!
//! Activations inside this module are channels-last, `[B, T, H, W, C]`: the convolutions
//! (see [`super::conv`]) gather runs of contiguous channels, the RMS norms reduce the last
//! dimension, and a chunk's frames are contiguous along T for the causal caches.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{ConvLayer, Geometry};

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
    /// The last input frames of the layer, `[B, n, H, W, C]`.
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

/// Wan's `CausalConv3d`: a 3D convolution whose temporal padding is all in front (zeros, or
/// the cached last frames of the previous chunk), so frame t only sees frames <= t.
#[derive(Debug, Clone)]
pub(crate) struct CausalConv3d {
    conv: ConvLayer,
    /// Zero frames in front when there is no history (2 * temporal padding).
    front_pad: usize,
}

impl CausalConv3d {
    /// Kernel `(kt, k, k)`, temporal padding `pad_t` (all in front), spatial padding `pad_hw`.
    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        stride_t: usize,
        (pad_t, pad_hw): (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            conv: ConvLayer::conv3d(c_in, c_out, kernel, stride_t, pad_hw, vb)?,
            front_pad: 2 * pad_t,
        })
    }

    /// Without history (zero padding in front): the whole sequence at once.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.front_pad == 0 {
            return self.conv.forward(x);
        }
        self.conv.forward(&x.pad_with_zeros(1, self.front_pad, 0)?)
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
            return self.conv.forward(x);
        }
        let padded = match history.as_ref() {
            Some(h) => {
                let hist_len = h.dim(1)?;
                Tensor::cat(&[h, x], 1)?.pad_with_zeros(
                    1,
                    self.front_pad.saturating_sub(hist_len),
                    0,
                )?
            }
            None => x.pad_with_zeros(1, self.front_pad, 0)?,
        };
        let len = padded.dim(1)?;
        // `copy` so that the cache does not keep the whole chunk's buffer alive.
        *history = Some(padded.narrow(1, len - CACHE_T, CACHE_T)?.copy()?);
        self.conv.forward(&padded)
    }
}

/// Wan's `RMS_norm` over channels: `x / max(||x||_2, 1e-12) * sqrt(C) * gamma`, which is
/// `x / sqrt(mean(x^2)) * gamma`: candle's rms_norm over the (last) channel dimension, whose
/// sums are in f32 for half-precision inputs as diffusers' are.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    gamma: Tensor,
}

/// Stands in for F.normalize's `max(norm, 1e-12)`: only all-zero pixels see it.
const RMS_EPS: f32 = 1e-24;

impl RmsNorm {
    /// `images`: the attention block's norm has gamma `[C, 1, 1]`, the others `[C, 1, 1, 1]`.
    pub(crate) fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        Ok(Self {
            gamma: gamma.flatten_all()?,
        })
    }

    /// `x`: channels last.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::model::kernels::f32_kernels(&[x, &self.gamma]) {
            return crate::model::kernels::rms_norm(x, &self.gamma, RMS_EPS);
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.gamma, RMS_EPS)
    }

    /// `silu(self.forward(x))`, fused on the CPU.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if crate::model::kernels::f32_kernels(&[x, &self.gamma]) {
            return crate::model::kernels::rms_norm_silu(x, &self.gamma, RMS_EPS);
        }
        self.forward(x)?.silu()
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
                (1, 1),
                1,
                (0, 0),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: CausalConv3d::new(in_dim, out_dim, (3, 3), 1, (1, 1), vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: CausalConv3d::new(out_dim, out_dim, (3, 3), 1, (1, 1), vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let y = self.norm1.forward_silu(x)?;
        let y = self.conv1.forward_cached(&y, cache)?;
        let y = self.norm2.forward_silu(&y)?;
        let y = self.conv2.forward_cached(&y, cache)?;
        y + h
    }
}

/// Wan's `AttentionBlock`: single-head self-attention over the pixels of each frame.
#[derive(Debug, Clone)]
pub(crate) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: ConvLayer,
    proj: ConvLayer,
    dim: usize,
}

impl AttentionBlock {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: ConvLayer::conv2d(dim, dim * 3, 1, 1, (0, 0), vb.pp("to_qkv"))?,
            proj: ConvLayer::conv2d(dim, dim, 1, 1, (0, 0), vb.pp("proj"))?,
            dim,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h, w, c) = x.dims5()?;
        let qkv = self.to_qkv.forward(&self.norm.forward(x)?)?;
        // q, k, v are consecutive channel groups of each pixel.
        let qkv = qkv.reshape((b * t, h * w, 3 * c))?;
        let dtype = x.dtype();
        // Scores and softmax in f32: cheap at these sizes, and safe in half precision.
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)?
                .to_dtype(DType::F32)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? * (self.dim as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.to_dtype(dtype)?;
        let out = self.proj.forward(&out.reshape((b, t, h, w, c))?)?;
        out + x
    }
}

/// Nearest-neighbour 2x upsampling of `[B, T, H, W, C]` (diffusers' "nearest-exact" with
/// scale 2 picks the same source pixels).
fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, t, h, w, c) = x.dims5()?;
    x.reshape((b * t, h, 1, w, 1, c))?
        .broadcast_as((b * t, h, 2, w, 2, c))?
        .contiguous()?
        .reshape((b, t, 2 * h, 2 * w, c))
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
    conv: ConvLayer,
    /// Upsample3d: (dim -> 2*dim, kernel (3,1,1)); downsample3d: (dim -> dim, kernel
    /// (3,1,1), stride 2 in time, no padding).
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    pub(crate) fn new(dim: usize, mode: ResampleMode, vb: VarBuilder) -> Result<Self> {
        let (conv, time_conv) = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let conv = ConvLayer::conv2d(dim, dim / 2, 3, 1, (1, 1), vb.pp("resample.1"))?;
                let time_conv = if mode == ResampleMode::Upsample3d {
                    Some(CausalConv3d::new(
                        dim,
                        dim * 2,
                        (3, 1),
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
                let conv = ConvLayer::conv2d(dim, dim, 3, 2, (0, 1), vb.pp("resample.1"))?;
                let time_conv = if mode == ResampleMode::Downsample3d {
                    Some(CausalConv3d::new(
                        dim,
                        dim,
                        (3, 1),
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
            ResampleMode::Upsample2d => self.conv.forward(&upsample_nearest2x(x)?),
            ResampleMode::Upsample3d => {
                let x = self.upsample_time(x, cache)?;
                self.conv.forward(&upsample_nearest2x(&x)?)
            }
            ResampleMode::Downsample2d => self.conv.forward(x),
            ResampleMode::Downsample3d => {
                let x = self.conv.forward(x)?;
                self.downsample_time(&x, cache)
            }
        }
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
                let (b, t, h, w, c2) = y.dims5()?;
                let c = c2 / 2;
                Some(
                    y.reshape((b, t, h, w, 2, c))?
                        .permute((0, 1, 4, 2, 3, 5))?
                        .contiguous()?
                        .reshape((b, 2 * t, h, w, c))?,
                )
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
            time_conv.conv.forward(&Tensor::cat(&[prev, x], 1)?)?
        } else {
            if t % 2 != 1 {
                candle_core::bail!(
                    "temporal downsampling: the first chunk needs an odd number of frames, got {t}"
                )
            }
            let first = x.narrow(1, 0, 1)?;
            if t > 1 {
                Tensor::cat(&[first, time_conv.conv.forward(x)?], 1)?
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
            (3, 3),
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
                (3, 3),
                1,
                (1, 1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// One chunk `[B, T, H, W, C]`: the first chunk must have 1 + 2^d*k frames and later
    /// ones 2^d*k (d = temporal downsampling levels), as diffusers' 1, 4, 4, .. split.
    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        cache.rewind();
        let mut x = self.conv_in.forward_cached(x, cache)?;
        for layer in &self.down_blocks {
            x = layer.forward(&x, cache)?;
        }
        let x = self.mid_block.forward(&x, cache)?;
        let x = self.norm_out.forward_silu(&x)?;
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
        let conv_in =
            CausalConv3d::new(cfg.z_channels, dims[0], (3, 3), 1, (1, 1), vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(dims[0], vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            let vb = vb.pp("up_blocks").pp(i);
            // Every upsampler but the last halves the channels (Wan 2.1).
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_dim = dims[i + 1];
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..cfg.num_res_blocks + 1 {
                resnets.push(ResidualBlock::new(in_dim, out_dim, vb.pp("resnets").pp(j))?);
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
                (3, 3),
                1,
                (1, 1),
                vb.pp("conv_out"),
            )?,
        })
    }

    /// One chunk of latent frames `[B, T, h, w, z]` (any T >= 1) -> pixel frames.
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
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward_cached(&x, cache)
    }
}

/// A 1x1x1 causal conv (`quant_conv`, `post_quant_conv`), optionally keeping only the first
/// `keep` output channels (the encoder's mean).
pub(crate) fn pointwise_conv(
    c_in: usize,
    c_out: usize,
    keep: usize,
    vb: VarBuilder,
) -> Result<ConvLayer> {
    let w = vb.get((c_out, c_in, 1, 1, 1), "weight")?;
    let b = vb.get(c_out, "bias")?;
    ConvLayer::from_weight(
        w.narrow(0, 0, keep)?,
        b.narrow(0, 0, keep)?,
        Geometry::POINT,
    )
}

/// `[B, C, T, H, W]` -> `[B, T, H, W, C]`.
pub(crate) fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 4, 1))?.contiguous()
}

/// `[B, T, H, W, C]` -> `[B, C, T, H, W]`.
pub(crate) fn from_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 4, 1, 2, 3))?.contiguous()
}
