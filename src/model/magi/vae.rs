//! MAGI-1's transformer VAE (SandAI-org/MAGI-1 `inference/model/vae`, `ViTVAE` with
//! `model_type "vit"`), on weights under the upstream names (`encoder.*`, `decoder.*` of
//! `diffusion_pytorch_model.safetensors`, settings from the `ddconfig` of `config.json`), and
//! the upstream tiling (`inference/infra/parallelism/tile_parallel.py`, `TileProcessor`).
//!
//! Decoder: `Linear(z -> D)` per latent, a cls token, a learned position embedding resized
//! (trilinear, `align_corners=False`) from its training grid to the latent grid, ViT blocks
//! (`x += proj(attn(LN(q), LN(k), LN(v)))` with a parameter-free LN that divides by
//! `std + 1e-5`, then `x += fc2(gelu(fc1(LayerNorm(x))))`), a LayerNorm, the cls token dropped,
//! every token unpatched to `D / (pt ph pw)` channels of its `pt x ph x pw` pixels, and a
//! `Conv3d(k 3, pad 1)` to RGB. Encoder: the patchify `Conv3d` (kernel = stride = patch), cls,
//! resized position embedding, blocks, LayerNorm, `Linear(D -> 2z)`, cls dropped; the mean
//! half is the latent (`DiagonalGaussianDistribution.mode()`, as the pipeline's patched
//! encode).
//!
//! Tiling ([`MagiVaeTiling`]): the latent (or video) is cut into overlapping tiles, each
//! decoded (encoded) on its own, and each tile's first rows/columns/frames are linearly
//! blended with the end of the previous tile along that axis, then cropped and
//! concatenated. Tiled output differs from a whole decode, so it is part of the reference.

use crate::model::vae::conv::ConvLayer;
use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::super::weights::{mmap_safetensors, safetensors_files};
use crate::error::{Error, Result};
use crate::model::kernels::sdpa;

/// The upstream `ddconfig` (the keyword arguments of `ViTEncoder` / `ViTDecoder`); missing
/// keys take the upstream defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MagiVaeConfig {
    #[serde(default = "d_video_size")]
    pub video_size: usize,
    #[serde(default = "d_video_length")]
    pub video_length: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default = "d_patch_length")]
    pub patch_length: usize,
    #[serde(default = "d_in_chans")]
    pub in_chans: usize,
    #[serde(default = "d_z_chans")]
    pub z_chans: usize,
    #[serde(default = "yes")]
    pub double_z: bool,
    #[serde(default = "d_embed_dim")]
    pub embed_dim: usize,
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_num_heads")]
    pub num_heads: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default = "yes")]
    pub with_cls_token: bool,
    #[serde(default)]
    pub norm_code: bool,
    #[serde(default)]
    pub ln_in_attn: bool,
    #[serde(default)]
    pub conv_last_layer: bool,
    #[serde(default)]
    pub use_rope: bool,
    #[serde(default)]
    pub use_final_proj: bool,
}

fn d_video_size() -> usize {
    256
}
fn d_video_length() -> usize {
    16
}
fn d_patch_size() -> usize {
    8
}
fn d_patch_length() -> usize {
    4
}
fn d_in_chans() -> usize {
    3
}
fn d_z_chans() -> usize {
    4
}
fn d_embed_dim() -> usize {
    768
}
fn d_depth() -> usize {
    12
}
fn d_num_heads() -> usize {
    12
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn yes() -> bool {
    true
}

impl MagiVaeConfig {
    /// The position-embedding grid the weights were trained on, `(t, h, w)` in latents.
    pub fn pos_grid(&self) -> (usize, usize, usize) {
        let s = self.video_size / self.patch_size;
        (self.video_length / self.patch_length, s, s)
    }

    fn unsupported(&self) -> Option<&'static str> {
        if self.use_rope {
            Some("use_rope")
        } else if self.use_final_proj {
            Some("use_final_proj")
        } else if self.norm_code {
            Some("norm_code")
        } else if !self.conv_last_layer {
            Some("conv_last_layer false (upstream asserts it)")
        } else if !self.double_z {
            Some("double_z false")
        } else {
            None
        }
    }
}

/// The tile geometry of `TileProcessor` (pixel sizes and overlap factors as upstream takes
/// them). [`MagiVaeTiling::pipeline`] is what the MAGI-1 pipeline passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MagiVaeTiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_min_length: usize,
    pub spatial_tile_overlap_factor: f64,
    pub temporal_tile_overlap_factor: f64,
}

impl MagiVaeTiling {
    /// `decode_chunk` / `encode_prefix_video`: 256 x 256 px tiles, overlap 0.25 (stride 192
    /// px, 64 px blend), `fps / 2` frames per temporal tile, no temporal overlap.
    pub fn pipeline(fps: usize) -> Self {
        Self {
            tile_sample_min_height: 256,
            tile_sample_min_width: 256,
            tile_sample_min_length: fps / 2,
            spatial_tile_overlap_factor: 0.25,
            temporal_tile_overlap_factor: 0.0,
        }
    }
}

/// Python's `int(n * f)` for a non-negative product.
fn trunc(n: usize, f: f64) -> usize {
    (n as f64 * f) as usize
}

/// `min(a, b, extent)` rows of `b` along `axis` blended with the last rows of `a`:
/// `b[k] = a[-e + k] (1 - k/e) + b[k] k/e` (`TileProcessor.blend_t/v/h`).
fn blend(a: &Tensor, b: &Tensor, axis: usize, extent: usize) -> candle_core::Result<Tensor> {
    let (la, lb) = (a.dim(axis)?, b.dim(axis)?);
    let e = la.min(lb).min(extent);
    if e == 0 {
        return Ok(b.clone());
    }
    let w: Vec<f32> = (0..e).map(|k| (k as f64 / e as f64) as f32).collect();
    let mut shape = vec![1usize; b.rank()];
    shape[axis] = e;
    let w = Tensor::from_vec(w, shape, b.device())?.to_dtype(b.dtype())?;
    let one_minus = w.affine(-1.0, 1.0)?;
    let head = (a.narrow(axis, la - e, e)?.broadcast_mul(&one_minus)?
        + b.narrow(axis, 0, e)?.broadcast_mul(&w)?)?;
    if e == lb {
        Ok(head)
    } else {
        Tensor::cat(&[&head, &b.narrow(axis, e, lb - e)?], axis)
    }
}

/// `x.narrow(axis, 0, min(len, dim))`: Python's `[:len]`.
fn head(x: &Tensor, axis: usize, len: usize) -> candle_core::Result<Tensor> {
    x.narrow(axis, 0, len.min(x.dim(axis)?))
}

/// `x[start : start + len]` along `axis`, clipped as Python slicing.
fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> candle_core::Result<Tensor> {
    let n = x.dim(axis)?;
    let start = start.min(n);
    x.narrow(axis, start, len.min(n - start))
}

/// PyTorch `interpolate(mode="linear"-per-axis, align_corners=False)` from `n_in` to
/// `n_out` samples as a `[n_out, n_in]` matrix (same index and weight arithmetic, in f32).
fn interp_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    let scale = n_in as f32 / n_out as f32;
    for d in 0..n_out {
        let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
        let i0 = src as usize;
        let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        m[d * n_in + i0] += l0;
        m[d * n_in + i1] += l1;
    }
    m
}

/// Resizes `x` along `axis` by the matrix of [`interp_matrix`].
fn resize_axis(x: &Tensor, axis: usize, n_out: usize) -> candle_core::Result<Tensor> {
    let n_in = x.dim(axis)?;
    if n_in == n_out {
        return Ok(x.clone());
    }
    let m = Tensor::from_vec(interp_matrix(n_in, n_out), (n_out, n_in), x.device())?
        .to_dtype(x.dtype())?;
    let moved = x.transpose(0, axis)?.contiguous()?;
    let mut dims = moved.dims().to_vec();
    let rest = moved.elem_count() / n_in;
    let y = m.matmul(&moved.reshape((n_in, rest))?)?;
    dims[0] = n_out;
    y.reshape(dims)?.transpose(0, axis)?.contiguous()
}

/// The parameter-free `ManualLayerNorm`: `(x - mean) / (std_biased + 1e-5)` over the last axis.
fn manual_ln(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let std = xc.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    xc.broadcast_div(&(std + 1e-5)?)?.to_dtype(dtype)
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get((o, i), "weight")?;
    let b = if bias { Some(vb.get(o, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

fn layer_norm(dim: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(dim, 1e-5, vb)
}

struct Block {
    /// `norm1` (only without `ln_in_attn`).
    norm1: Option<LayerNorm>,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    qkv_norm: bool,
}

impl Block {
    fn new(c: &MagiVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = c.embed_dim;
        let hidden = (d as f64 * c.mlp_ratio) as usize;
        Ok(Self {
            norm1: if c.ln_in_attn {
                None
            } else {
                Some(layer_norm(d, vb.pp("norm1"))?)
            },
            qkv: linear(d, 3 * d, c.qkv_bias, vb.pp("attn.qkv"))?,
            proj: linear(d, d, true, vb.pp("attn.proj"))?,
            norm2: layer_norm(d, vb.pp("norm2"))?,
            fc1: linear(d, hidden, true, vb.pp("mlp.fc1"))?,
            fc2: linear(hidden, d, true, vb.pp("mlp.fc2"))?,
            heads: c.num_heads,
            qkv_norm: c.ln_in_attn,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let mut qkv = self.qkv.forward(x)?.reshape((b, n, 3, self.heads, hd))?;
        if self.qkv_norm {
            qkv = manual_ln(&qkv)?;
        }
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            let get = |i: usize| -> candle_core::Result<Tensor> {
                qkv.i((bi, .., i))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()
            };
            let o = sdpa(&get(0)?, &get(1)?, &get(2)?)?; // [1, heads, n, hd]
            outs.push(o.transpose(1, 2)?.reshape((1, n, c))?);
        }
        self.proj.forward(&Tensor::cat(&outs, 0)?)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = match &self.norm1 {
            Some(n) => self.attention(&n.forward(x)?)?,
            None => self.attention(x)?,
        };
        let x = (x + a)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        x + m
    }
}

/// The token trunk shared by encoder and decoder: cls token, position embedding, blocks,
/// final LayerNorm, cls dropped.
struct Trunk {
    cls_token: Option<Tensor>,
    /// `[1, 1 + t h w, D]` (the cls row first when there is a cls token).
    pos_embed: Tensor,
    grid: (usize, usize, usize),
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Trunk {
    fn new(c: &MagiVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = c.embed_dim;
        let grid = c.pos_grid();
        let ncls = usize::from(c.with_cls_token);
        Ok(Self {
            cls_token: if c.with_cls_token {
                Some(vb.get((1, 1, d), "cls_token")?)
            } else {
                None
            },
            pos_embed: vb.get((1, grid.0 * grid.1 * grid.2 + ncls, d), "pos_embed")?,
            grid,
            blocks: (0..c.depth)
                .map(|i| Block::new(c, vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            norm: layer_norm(d, vb.pp("norm"))?,
        })
    }

    /// `resize_pos_embed` (trilinear, `align_corners=False`) to `(t, h, w)`; the cls row kept.
    fn pos_embed(&self, (t, h, w): (usize, usize, usize)) -> candle_core::Result<Tensor> {
        if (t, h, w) == self.grid {
            return Ok(self.pos_embed.clone());
        }
        let ncls = usize::from(self.cls_token.is_some());
        let d = self.pos_embed.dim(2)?;
        let (gt, gh, gw) = self.grid;
        let p = self
            .pos_embed
            .i((0, ncls..))?
            .reshape((gt, gh, gw, d))?
            .to_dtype(DType::F32)?;
        let p = resize_axis(&p, 0, t)?;
        let p = resize_axis(&p, 1, h)?;
        let p = resize_axis(&p, 2, w)?;
        let p = p
            .reshape((1, t * h * w, d))?
            .to_dtype(self.pos_embed.dtype())?;
        if ncls == 1 {
            Tensor::cat(&[&self.pos_embed.narrow(1, 0, 1)?, &p], 1)
        } else {
            Ok(p)
        }
    }

    /// `x`: `[B, t h w, D]` tokens of a `(t, h, w)` grid -> `[B, t h w, D]`.
    fn forward(&self, x: &Tensor, grid: (usize, usize, usize)) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let mut x = match &self.cls_token {
            Some(cls) => Tensor::cat(&[&cls.broadcast_as((b, 1, cls.dim(2)?))?, x], 1)?,
            None => x.clone(),
        };
        x = x.broadcast_add(&self.pos_embed(grid)?)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        x = self.norm.forward(&x)?;
        if self.cls_token.is_some() {
            x = x.narrow(1, 1, x.dim(1)? - 1)?;
        }
        Ok(x)
    }
}

struct Decoder {
    proj_in: Linear,
    trunk: Trunk,
    /// `last_layer`: `Conv3d(C_u -> 3, k 3, pad 1)`.
    conv: ConvLayer,
    unpatch_channels: usize,
    pt: usize,
    ps: usize,
}

impl Decoder {
    fn new(c: &MagiVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let cu = c.embed_dim / (c.patch_size * c.patch_size * c.patch_length);
        let conv = ConvLayer::conv3d(cu, 3, (3, 3), 1, 1, vb.pp("last_layer"))?;
        Ok(Self {
            proj_in: linear(c.z_chans, c.embed_dim, true, vb.pp("proj_in"))?,
            trunk: Trunk::new(c, vb.clone())?,
            conv,
            unpatch_channels: cu,
            pt: c.patch_length,
            ps: c.patch_size,
        })
    }

    /// `ViTDecoder.forward`: `[B, z, t, h, w]` -> `[B, 3, t pt, h ps, w ps]`.
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, t, h, w) = z.dims5()?;
        let x = z.permute((0, 2, 3, 4, 1))?.reshape((b, t * h * w, c))?;
        let x = self.proj_in.forward(&x)?;
        let x = self.trunk.forward(&x, (t, h, w))?;
        // B (t h w) (pt ph pw C) -> B (t pt) (h ph) (w pw) C, channels last
        let (pt, ps, cu) = (self.pt, self.ps, self.unpatch_channels);
        let x = x
            .reshape((b * t, h, w, pt, ps, ps * cu))?
            .permute((0, 3, 1, 4, 2, 5))?
            .contiguous()?
            .reshape((b, t * pt, h * ps, w * ps, cu))?;
        self.conv3(&x)?.permute((0, 4, 1, 2, 3))?.contiguous()
    }

    /// `Conv3d(C_u -> 3, k 3, stride 1, pad 1)` on channels-last `[B, T, H, W, C_u]`: the
    /// shared convolution with the two zero frames of temporal padding put around `x`.
    fn conv3(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&x.pad_with_zeros(1, 1, 1)?)
    }
}

struct Encoder {
    /// `[pt ph pw C_in, D]`, rows in `(dt, dy, dx, c)` order.
    patch_w: Tensor,
    patch_b: Tensor,
    trunk: Trunk,
    last_layer: Linear,
    pt: usize,
    ps: usize,
    z: usize,
}

impl Encoder {
    fn new(c: &MagiVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (pt, ps, d) = (c.patch_length, c.patch_size, c.embed_dim);
        let w = vb.get((d, c.in_chans, pt, ps, ps), "patch_embed.proj.weight")?;
        Ok(Self {
            patch_w: w
                .permute((2, 3, 4, 1, 0))?
                .reshape((pt * ps * ps * c.in_chans, d))?
                .contiguous()?,
            patch_b: vb.get(d, "patch_embed.proj.bias")?,
            trunk: Trunk::new(c, vb.clone())?,
            last_layer: linear(d, 2 * c.z_chans, true, vb.pp("last_layer"))?,
            pt,
            ps,
            z: c.z_chans,
        })
    }

    /// `ViTEncoder.forward` and the posterior's mean: `[B, C, T, H, W]` ->
    /// `[B, z, T/pt, H/ps, W/ps]` (remainders dropped, as the strided Conv3d does).
    fn forward_mean(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let (pt, ps) = (self.pt, self.ps);
        let (lt, lh, lw) = (t / pt, h / ps, w / ps);
        if lt == 0 || lh == 0 || lw == 0 {
            candle_core::bail!(
                "MAGI VAE encode: input {:?} smaller than one patch",
                x.dims()
            )
        }
        let x = x
            .narrow(2, 0, lt * pt)?
            .narrow(3, 0, lh * ps)?
            .narrow(4, 0, lw * ps)?
            .permute((0, 2, 3, 4, 1))?
            .contiguous()?
            .reshape((b * lt, pt, lh, ps, lw, ps * c))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * lt * lh * lw, pt * ps * ps * c))?;
        let x = x
            .matmul(&self.patch_w.to_dtype(x.dtype())?)?
            .broadcast_add(&self.patch_b.to_dtype(x.dtype())?)?;
        let x = x.reshape((b, lt * lh * lw, ()))?;
        let x = self.trunk.forward(&x, (lt, lh, lw))?;
        let x = self.last_layer.forward(&x)?;
        x.reshape((b, lt, lh, lw, 2 * self.z))?
            .narrow(4, 0, self.z)?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }
}

/// MAGI-1's ViT VAE: [`MagiVae::decode`] / [`MagiVae::encode`] of one tile as upstream
/// `ViTVAE.decode` / the pipeline's patched encode, and their tiled versions.
pub struct MagiVae {
    pub config: MagiVaeConfig,
    encoder: Encoder,
    decoder: Decoder,
}

impl MagiVae {
    /// Loads a folder in the published layout: `config.json` (`_class_name` `ViTVAE`, a
    /// `ddconfig`, `model_type` `vit`) and `diffusion_pytorch_model.safetensors` (or its
    /// sharded index).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(&cfg_path, format!("malformed JSON: {e}")))?;
        if let Some(name) = v.get("_class_name").and_then(|n| n.as_str())
            && name != "ViTVAE"
        {
            return Err(Error::model(
                &cfg_path,
                format!("_class_name is {name:?}, expected \"ViTVAE\""),
            ));
        }
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("vit");
        if model_type != "vit" {
            return Err(Error::model(
                &cfg_path,
                format!("model_type {model_type:?} is not supported (only \"vit\")"),
            ));
        }
        let dd = v
            .get("ddconfig")
            .ok_or_else(|| Error::model(&cfg_path, "no \"ddconfig\" object"))?;
        let config: MagiVaeConfig = serde_json::from_value(dd.clone())
            .map_err(|e| Error::model(&cfg_path, format!("bad ddconfig: {e}")))?;
        if let Some(what) = config.unsupported() {
            return Err(Error::model(
                &cfg_path,
                format!("unsupported MAGI VAE setting: {what}"),
            ));
        }
        let unpatch = config.patch_size * config.patch_size * config.patch_length;
        if unpatch == 0
            || config.num_heads == 0
            || !config.embed_dim.is_multiple_of(unpatch)
            || !config.embed_dim.is_multiple_of(config.num_heads)
        {
            return Err(Error::model(
                &cfg_path,
                format!(
                    "embed_dim {} must divide by num_heads {} and by the patch volume {unpatch}",
                    config.embed_dim, config.num_heads
                ),
            ));
        }
        let files = safetensors_files(dir, &["diffusion_pytorch_model", "model"])?;
        let vb = mmap_safetensors(&files, dtype, device)?;
        let build = || -> candle_core::Result<(Encoder, Decoder)> {
            Ok((
                Encoder::new(&config, vb.pp("encoder"))?,
                Decoder::new(&config, vb.pp("decoder"))?,
            ))
        };
        let (encoder, decoder) = build().map_err(|e| {
            Error::model(
                &files[0],
                format!("weights do not match {}: {e}", cfg_path.display()),
            )
        })?;
        Ok(Self {
            config,
            encoder,
            decoder,
        })
    }

    /// Spatial and temporal downsampling (`patch_size`, `patch_length`).
    pub fn factors(&self) -> (usize, usize) {
        (self.config.patch_size, self.config.patch_length)
    }

    /// `ViTVAE.decode`: latent `[B, z, T, h, w]` -> pixels `[B, 3, 4T, 8h, 8w]` (upstream
    /// scale: about [-1, 1], not clamped). A single latent frame (T = 1) gives one frame.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let x = self.decoder.forward(latent)?;
        Ok(if latent.dim(2)? == 1 {
            x.narrow(2, 0, 1)?
        } else {
            x
        })
    }

    /// The pipeline's encode (`VaeHelper.patch_vae_encode`): video `[B, 3, T, H, W]` in
    /// [-1, 1] -> the posterior's mean `[B, z, T/4, H/8, W/8]`. A single frame is repeated to
    /// 4 frames and the first latent frame kept.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = video.dims5()?;
        if t == 1 {
            let x = video.broadcast_as((b, c, 4, h, w))?.contiguous()?;
            return Ok(self.encoder.forward_mean(&x)?.narrow(2, 0, 1)?);
        }
        Ok(self.encoder.forward_mean(video)?)
    }

    /// `TileProcessor.tiled_decode` (what `VaeHelper.decode` runs, spatial tiling allowed;
    /// `sr_ratio` 1): latent tiles of `tile_sample_min_* / factor` latents at strides
    /// `int(tile * (1 - overlap))`, each decoded by [`MagiVae::decode`]; each decoded tile's
    /// first `int(tile_px * overlap)` frames/rows/columns blended linearly with the end of
    /// the (unblended) previous tile along t, then h, then w; each tile cropped to
    /// `tile_px - blend` and the crops concatenated.
    pub fn decode_tiled(&self, latent: &Tensor, tiling: &MagiVaeTiling) -> Result<Tensor> {
        let (sdf, tdf) = self.factors();
        let (so, to) = (
            tiling.spatial_tile_overlap_factor,
            tiling.temporal_tile_overlap_factor,
        );
        let tl = [
            tiling.tile_sample_min_length / tdf,
            tiling.tile_sample_min_height / sdf,
            tiling.tile_sample_min_width / sdf,
        ];
        let factor = [to, so, so];
        let stride: Vec<usize> = (0..3).map(|a| trunc(tl[a], 1.0 - factor[a])).collect();
        let real = [tl[0] * tdf, tl[1] * sdf, tl[2] * sdf];
        let blend_px: Vec<usize> = (0..3).map(|a| trunc(real[a], factor[a])).collect();
        let limit: Vec<usize> = (0..3).map(|a| real[a] - blend_px[a]).collect();
        let frames = self.tiles(latent, &tl, &stride, |t| self.decode(t))?;
        let counts = frames.counts;
        let mut out = Vec::with_capacity(frames.tiles.len());
        for (idx, tile) in frames.tiles.iter().enumerate() {
            let pos = undot(idx, counts);
            let mut tile = tile.clone();
            for a in 0..3 {
                if pos[a] > 0 {
                    let mut p = pos;
                    p[a] -= 1;
                    tile = blend(&frames.tiles[dot(p, counts)], &tile, 2 + a, blend_px[a])?;
                }
            }
            out.push(crop(&tile, &limit)?);
        }
        Ok(assemble(&out, counts)?)
    }

    /// `TileProcessor.tiled_encode` (`ViTVAE.tiled_encode_3d` with spatial tiling, as
    /// `VaeHelper.encode` calls it; its uint8 -> [-1, 1] scaling is the caller's): video
    /// tiles of `tile_sample_min_*` pixels at strides `int(tile * (1 - overlap))`, each
    /// encoded by [`MagiVae::encode`]; latent tiles blended over `int(tile_latent * overlap)`
    /// rows with the previous tile *after* that one's own blending (upstream blends in
    /// place), cropped to `tile_latent - blend` and concatenated.
    pub fn encode_tiled(&self, video: &Tensor, tiling: &MagiVaeTiling) -> Result<Tensor> {
        let (sdf, tdf) = self.factors();
        let (so, to) = (
            tiling.spatial_tile_overlap_factor,
            tiling.temporal_tile_overlap_factor,
        );
        let ts = [
            tiling.tile_sample_min_length,
            tiling.tile_sample_min_height,
            tiling.tile_sample_min_width,
        ];
        let tl = [ts[0] / tdf, ts[1] / sdf, ts[2] / sdf];
        let factor = [to, so, so];
        let stride: Vec<usize> = (0..3).map(|a| trunc(ts[a], 1.0 - factor[a])).collect();
        let blend_l: Vec<usize> = (0..3).map(|a| trunc(tl[a], factor[a])).collect();
        let limit: Vec<usize> = (0..3).map(|a| tl[a] - blend_l[a]).collect();
        let mut frames = self.tiles(video, &ts, &stride, |t| self.encode(t))?;
        let counts = frames.counts;
        let mut out = Vec::with_capacity(frames.tiles.len());
        for idx in 0..frames.tiles.len() {
            let pos = undot(idx, counts);
            let mut tile = frames.tiles[idx].clone();
            for a in 0..3 {
                if pos[a] > 0 {
                    let mut p = pos;
                    p[a] -= 1;
                    tile = blend(&frames.tiles[dot(p, counts)], &tile, 2 + a, blend_l[a])?;
                }
            }
            out.push(crop(&tile, &limit)?);
            frames.tiles[idx] = tile;
        }
        Ok(assemble(&out, counts)?)
    }

    /// Cuts `x` into tiles of `size` at `stride` along (t, h, w) and maps each through `f`.
    fn tiles(
        &self,
        x: &Tensor,
        size: &[usize; 3],
        stride: &[usize],
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tiles> {
        if stride.iter().chain(size.iter()).any(|&s| s == 0) {
            return Err(Error::setting(
                "tiling",
                format!("tile {size:?}, stride {stride:?}"),
                "tile sizes must be at least one latent and strides non-zero",
            ));
        }
        let dims = x.dims();
        let counts = [
            dims[2].div_ceil(stride[0]),
            dims[3].div_ceil(stride[1]),
            dims[4].div_ceil(stride[2]),
        ];
        let mut tiles = Vec::with_capacity(counts.iter().product());
        for idx in 0..counts.iter().product() {
            let p = undot(idx, counts);
            let t = slice(x, 2, p[0] * stride[0], size[0])?;
            let t = slice(&t, 3, p[1] * stride[1], size[1])?;
            let t = slice(&t, 4, p[2] * stride[2], size[2])?;
            tiles.push(f(&t)?);
        }
        Ok(Tiles { tiles, counts })
    }
}

struct Tiles {
    tiles: Vec<Tensor>,
    counts: [usize; 3],
}

fn undot(idx: usize, counts: [usize; 3]) -> [usize; 3] {
    [
        idx / (counts[1] * counts[2]),
        (idx / counts[2]) % counts[1],
        idx % counts[2],
    ]
}

fn dot(p: [usize; 3], counts: [usize; 3]) -> usize {
    (p[0] * counts[1] + p[1]) * counts[2] + p[2]
}

fn crop(x: &Tensor, limit: &[usize]) -> candle_core::Result<Tensor> {
    head(&head(&head(x, 2, limit[0])?, 3, limit[1])?, 4, limit[2])
}

/// Concatenates cropped tiles: along w within a row, rows along h, frames along t.
fn assemble(tiles: &[Tensor], counts: [usize; 3]) -> candle_core::Result<Tensor> {
    let mut frames = Vec::with_capacity(counts[0]);
    for f in 0..counts[0] {
        let mut rows = Vec::with_capacity(counts[1]);
        for i in 0..counts[1] {
            let row: Vec<&Tensor> = (0..counts[2])
                .map(|j| &tiles[dot([f, i, j], counts)])
                .collect();
            rows.push(Tensor::cat(&row, 4)?);
        }
        frames.push(Tensor::cat(&rows, 3)?);
    }
    Tensor::cat(&frames, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matrix_matches_pytorch_linear() {
        // torch.nn.functional.interpolate(torch.arange(2.).view(1, 1, 2), size=5,
        // mode="linear", align_corners=False) = [0, 0.1, 0.5, 0.9, 1]
        let m = interp_matrix(2, 5);
        let y: Vec<f32> = (0..5).map(|d| m[d * 2 + 1]).collect();
        for (a, b) in y.iter().zip([0.0, 0.1, 0.5, 0.9, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        // identity at equal sizes
        assert_eq!(
            interp_matrix(3, 3),
            vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]
        );
    }

    #[test]
    fn tile_index_round_trip() {
        let c = [3, 2, 4];
        for i in 0..24 {
            assert_eq!(dot(undot(i, c), c), i);
        }
    }
}
