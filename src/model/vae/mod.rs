//! The Wan 2.1 video VAE (diffusers `AutoencoderKLWan`, original `WanVAE_` in SkyReels-V2
//! `skyreels_v2_infer/modules/vae.py`): a causal 3D convolutional autoencoder, 8x spatial and
//! 4x temporal compression in the real model (1 + 4k frames <-> 1 + k latent frames).
//!
//! Tensors at this API are laid out like diffusers: `[B, C, T, H, W]`. Pixels are in
//! [-1, 1]. Latents out of [`WanVae::encode`] and into [`WanVae::decode`] are unnormalised;
//! the diffusion model works on [`WanVae::normalize_latents`]' output.
//!
//! Because every temporal operation is causal, decoding a latent video chunk by chunk with
//! the per-layer feature cache gives the same frames as decoding it at once
//! ([`VaeStreamDecoder`]), which is what lets finished diffusion-forcing blocks be shown
//! before the rest of the video exists.

pub(crate) mod conv;
mod layers;

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use conv::ConvLayer;
use layers::{
    Decoder3d, Encoder3d, FeatCache, StackConfig, from_channels_last, pointwise_conv,
    to_channels_last,
};

/// diffusers encodes the first frame alone, then chunks of this many frames (frames past the
/// last full chunk are dropped), whatever the temporal compression.
const ENCODE_CHUNK_FRAMES: usize = 4;

/// Latent frames per chunk in [`WanVae::decode`]: any value gives the same frames (the
/// cache makes chunks exact); this bounds the memory of long videos.
const DECODE_CHUNK_LATENT_FRAMES: usize = 4;

fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_num_res_blocks() -> usize {
    2
}
fn default_temperal_downsample() -> Vec<bool> {
    vec![false, true, true]
}
fn default_latents_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn default_latents_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}
fn default_rgb() -> usize {
    3
}
fn default_scale_factor_temporal() -> Option<usize> {
    Some(4)
}
fn default_scale_factor_spatial() -> Option<usize> {
    Some(8)
}

/// diffusers `vae/config.json` of `AutoencoderKLWan`; defaults are diffusers' (the Wan 2.1
/// VAE). `temperal_*` is diffusers' spelling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    /// Decoder width; `None` means `base_dim`.
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_num_res_blocks")]
    pub num_res_blocks: usize,
    /// Scales (1, 1/2, ..) at which the encoder adds attention after its residual blocks.
    /// diffusers' decoder ignores it, and so does this one.
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// Per level but the last: whether the encoder halves time there (the decoder doubles
    /// it at the mirrored level).
    #[serde(default = "default_temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    /// Training only; ignored.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_latents_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "default_latents_std")]
    pub latents_std: Vec<f64>,
    /// Wan 2.2's residual up/down blocks: not supported.
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    /// Wan 2.2's pixel patchify: not supported.
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// Informational in diffusers (derived here from `temperal_downsample`).
    #[serde(default = "default_scale_factor_temporal")]
    pub scale_factor_temporal: Option<usize>,
    /// Informational in diffusers (derived here from `dim_mult`).
    #[serde(default = "default_scale_factor_spatial")]
    pub scale_factor_spatial: Option<usize>,
}

impl Default for WanVaeConfig {
    /// The Wan 2.1 VAE (what `Wan2.1_VAE.pth` holds).
    fn default() -> Self {
        Self {
            base_dim: default_base_dim(),
            decoder_base_dim: None,
            z_dim: default_z_dim(),
            dim_mult: default_dim_mult(),
            num_res_blocks: default_num_res_blocks(),
            attn_scales: Vec::new(),
            temperal_downsample: default_temperal_downsample(),
            dropout: 0.0,
            latents_mean: default_latents_mean(),
            latents_std: default_latents_std(),
            is_residual: false,
            in_channels: default_rgb(),
            out_channels: default_rgb(),
            patch_size: None,
            scale_factor_temporal: default_scale_factor_temporal(),
            scale_factor_spatial: default_scale_factor_spatial(),
        }
    }
}

impl WanVaeConfig {
    /// Reads a diffusers `vae/config.json`.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what this implementation does not support (Wan 2.2 variants) and
    /// inconsistent sizes.
    pub fn validate(&self) -> Result<()> {
        if self.is_residual {
            candle_core::bail!(
                "Wan VAE config: is_residual = true (the Wan 2.2 VAE) is not supported, only Wan 2.1"
            )
        }
        if let Some(p) = self.patch_size
            && p != 1
        {
            candle_core::bail!(
                "Wan VAE config: patch_size = {p} (the Wan 2.2 VAE) is not supported, only Wan 2.1"
            )
        }
        let levels = self.dim_mult.len();
        if levels == 0 || self.base_dim == 0 || self.z_dim == 0 {
            candle_core::bail!(
                "Wan VAE config: base_dim {}, z_dim {} and dim_mult {:?} must be non-empty and non-zero",
                self.base_dim,
                self.z_dim,
                self.dim_mult
            )
        }
        if self.temperal_downsample.len() + 1 < levels {
            candle_core::bail!(
                "Wan VAE config: temperal_downsample {:?} needs an entry for each of the {} levels but the last (dim_mult {:?})",
                self.temperal_downsample,
                levels,
                self.dim_mult
            )
        }
        if self.dim_mult.contains(&0) {
            candle_core::bail!("Wan VAE config: dim_mult {:?} has a zero", self.dim_mult)
        }
        // Sizes decide allocations: out of range is an error, not an out-of-memory abort.
        let widest = self.dim_mult.iter().max().copied().unwrap_or(1);
        for (key, v, hi) in [
            ("base_dim", self.base_dim, 4096),
            ("decoder_base_dim", self.decoder_base_dim.unwrap_or(1), 4096),
            ("z_dim", self.z_dim, 1024),
            ("dim_mult", widest, 64),
            ("levels of dim_mult", levels, 8),
            ("num_res_blocks", self.num_res_blocks.max(1), 16),
            ("in_channels", self.in_channels, 64),
            ("out_channels", self.out_channels, 64),
        ] {
            if !(1..=hi).contains(&v) {
                candle_core::bail!("Wan VAE config: {key} = {v} is outside 1..={hi}")
            }
        }
        // Checked here, at load, rather than at the first decode.
        let zc = self.z_dim;
        if self.latents_mean.len() != zc || self.latents_std.len() != zc {
            candle_core::bail!(
                "Wan VAE config: latents_mean ({}) and latents_std ({}) need z_dim = {zc} values",
                self.latents_mean.len(),
                self.latents_std.len()
            )
        }
        if self.latents_std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || self.latents_mean.iter().any(|m| !m.is_finite())
        {
            candle_core::bail!(
                "Wan VAE config: latents_mean must be finite and latents_std finite and positive"
            )
        }
        Ok(())
    }

    /// Pixels per latent pixel along height and width.
    pub fn spatial_compression(&self) -> usize {
        1 << self.dim_mult.len().saturating_sub(1)
    }

    /// Temporal levels that halve time (`temperal_downsample` over the levels but the last).
    fn temporal_levels(&self) -> usize {
        let levels = self.dim_mult.len().saturating_sub(1);
        self.temperal_downsample
            .iter()
            .take(levels)
            .filter(|&&t| t)
            .count()
    }

    /// Pixel frames per latent frame after the first (the first latent frame is one pixel
    /// frame): 4 for Wan 2.1, 1 without temporal compression.
    pub fn temporal_compression(&self) -> usize {
        1 << self.temporal_levels()
    }

    /// Latent frames that `encode` makes from `pixel_frames` frames (diffusers drops the
    /// frames past the last full chunk of 4).
    pub fn latent_frames(&self, pixel_frames: usize) -> usize {
        if pixel_frames == 0 {
            return 0;
        }
        let chunks = (pixel_frames - 1) / ENCODE_CHUNK_FRAMES;
        1 + chunks * ENCODE_CHUNK_FRAMES / self.temporal_compression()
    }

    /// Pixel frames that decoding `latent_frames` latent frames gives.
    pub fn pixel_frames(&self, latent_frames: usize) -> usize {
        if latent_frames == 0 {
            0
        } else {
            1 + (latent_frames - 1) * self.temporal_compression()
        }
    }

    fn levels(&self) -> usize {
        self.dim_mult.len()
    }

    fn encoder_stack(&self) -> StackConfig {
        StackConfig {
            in_channels: self.in_channels,
            out_channels: 0,
            dim: self.base_dim,
            z_channels: 2 * self.z_dim,
            dim_mult: self.dim_mult.clone(),
            num_res_blocks: self.num_res_blocks,
            attn_scales: self.attn_scales.clone(),
            temporal: self.temperal_downsample[..self.levels() - 1].to_vec(),
        }
    }

    fn decoder_stack(&self) -> StackConfig {
        let mut temporal = self.temperal_downsample[..self.levels() - 1].to_vec();
        temporal.reverse();
        StackConfig {
            in_channels: 0,
            out_channels: self.out_channels,
            dim: self.decoder_base_dim.unwrap_or(self.base_dim),
            z_channels: self.z_dim,
            dim_mult: self.dim_mult.clone(),
            num_res_blocks: self.num_res_blocks,
            attn_scales: Vec::new(),
            temporal,
        }
    }
}

/// The original `Wan2.1_VAE.pth` name of a diffusers `AutoencoderKLWan` parameter, for
/// `VarBuilder::rename_f` (the model asks for diffusers names; the file holds original ones).
///
/// The original keeps each residual block's layers in a `residual` Sequential (0 norm1,
/// 2 conv1, 3 norm2, 6 conv2) with a `shortcut`, the middle as a Sequential (resnet,
/// attention, resnet), the heads as (norm, SiLU, conv), and the decoder's up blocks as one
/// flat `upsamples` Sequential of `num_res_blocks + 1` residual blocks plus a `Resample` per
/// level. Names it does not know are returned unchanged. Valid for `attn_scales = []` (the
/// original decoder adds attention blocks where diffusers' does not).
pub fn original_vae_name(cfg: &WanVaeConfig, name: &str) -> String {
    fn resnet_part(rest: &str) -> Option<String> {
        let (part, tail) = rest.split_once('.')?;
        let orig = match part {
            "norm1" => "residual.0",
            "conv1" => "residual.2",
            "norm2" => "residual.3",
            "conv2" => "residual.6",
            "conv_shortcut" => "shortcut",
            _ => return None,
        };
        Some(format!("{orig}.{tail}"))
    }
    fn index_and_rest(s: &str) -> Option<(usize, &str)> {
        let (idx, rest) = s.split_once('.')?;
        Some((idx.parse().ok()?, rest))
    }
    let map = || -> Option<String> {
        if let Some(rest) = name.strip_prefix("quant_conv.") {
            return Some(format!("conv1.{rest}"));
        }
        if let Some(rest) = name.strip_prefix("post_quant_conv.") {
            return Some(format!("conv2.{rest}"));
        }
        let (side, rest) = name.split_once('.')?;
        if side != "encoder" && side != "decoder" {
            return None;
        }
        if let Some(r) = rest.strip_prefix("conv_in.") {
            return Some(format!("{side}.conv1.{r}"));
        }
        if let Some(r) = rest.strip_prefix("norm_out.") {
            return Some(format!("{side}.head.0.{r}"));
        }
        if let Some(r) = rest.strip_prefix("conv_out.") {
            return Some(format!("{side}.head.2.{r}"));
        }
        if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
            let (i, r) = index_and_rest(r)?;
            return Some(format!("{side}.middle.{}.{}", 2 * i, resnet_part(r)?));
        }
        if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
            return Some(format!("{side}.middle.1.{r}"));
        }
        if let Some(r) = rest.strip_prefix("down_blocks.") {
            let (i, r) = index_and_rest(r)?;
            let r = resnet_part(r).unwrap_or_else(|| r.to_string());
            return Some(format!("{side}.downsamples.{i}.{r}"));
        }
        if let Some(r) = rest.strip_prefix("up_blocks.") {
            let (block, r) = index_and_rest(r)?;
            // Each level but the last ends with its upsampler.
            let start = block * (cfg.num_res_blocks + 2);
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = index_and_rest(r)?;
                return Some(format!(
                    "{side}.upsamples.{}.{}",
                    start + j,
                    resnet_part(r)?
                ));
            }
            if let Some(r) = r.strip_prefix("upsamplers.0.") {
                let idx = start + cfg.num_res_blocks + 1;
                return Some(format!("{side}.upsamples.{idx}.{r}"));
            }
        }
        None
    };
    map().unwrap_or_else(|| name.to_string())
}

/// The decoding half, shared with the streaming decoders.
#[derive(Debug)]
struct DecoderPart {
    post_quant_conv: ConvLayer,
    decoder: Decoder3d,
}

/// The Wan 2.1 VAE.
#[derive(Debug, Clone)]
pub struct WanVae {
    cfg: WanVaeConfig,
    encoder: Arc<Encoder3d>,
    /// `quant_conv` restricted to the mean half of its output.
    quant_conv_mean: ConvLayer,
    decoding: Arc<DecoderPart>,
    dtype: DType,
    device: Device,
}

impl WanVae {
    /// Builds the model from diffusers names (`encoder.down_blocks.0.conv1.weight`, ..).
    /// Weights are used in `vb`'s dtype (f32, f16 or bf16). A missing or wrongly shaped
    /// tensor is an error naming it.
    pub fn new(cfg: &WanVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        let encoder = Encoder3d::new(&cfg.encoder_stack(), vb.pp("encoder"))?;
        let quant_conv_mean = pointwise_conv(2 * z, 2 * z, z, vb.pp("quant_conv"))?;
        let post_quant_conv = pointwise_conv(z, z, z, vb.pp("post_quant_conv"))?;
        let decoder = Decoder3d::new(&cfg.decoder_stack(), vb.pp("decoder"))?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Arc::new(encoder),
            quant_conv_mean,
            decoding: Arc::new(DecoderPart {
                post_quant_conv,
                decoder,
            }),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Builds the model from the original `Wan2.1_VAE.pth` names (see [`original_vae_name`]),
    /// e.g. with `VarBuilder::from_pth(path, dtype, device)`.
    pub fn new_original(cfg: &WanVaeConfig, vb: VarBuilder) -> Result<Self> {
        if !cfg.attn_scales.is_empty() {
            candle_core::bail!(
                "Wan VAE: original weight names are only mapped for attn_scales = [] (got {:?})",
                cfg.attn_scales
            )
        }
        let map_cfg = cfg.clone();
        let vb = vb.rename_f(move |name| original_vae_name(&map_cfg, name));
        Self::new(cfg, vb)
    }

    pub fn config(&self) -> &WanVaeConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels `[B, in_channels, T, H, W]` in [-1, 1] -> latent mean `[B, z_dim, T', H/s,
    /// W/s]` (diffusers' `latent_dist.mode()`, unnormalised), in the model's dtype.
    ///
    /// As diffusers: the first frame is encoded alone, then chunks of 4 frames with the
    /// causal cache; frames past the last full chunk are dropped, so T = 1 + 4k frames use
    /// them all (T' = [`WanVaeConfig::latent_frames`]). H and W must be multiples of the
    /// spatial compression.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let (_, c, t, h, w) = video.dims5()?;
        let s = self.cfg.spatial_compression();
        if c != self.cfg.in_channels || t == 0 || h % s != 0 || w % s != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "Wan VAE encode: expected [B, {}, T >= 1, H, W] with H, W multiples of {s}, got {:?}",
                self.cfg.in_channels,
                video.dims()
            )
        }
        let x = to_channels_last(&video.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        let mut cache = FeatCache::default();
        let chunks = (t - 1) / ENCODE_CHUNK_FRAMES;
        let mut outs = Vec::with_capacity(chunks + 1);
        outs.push(self.encoder.forward(&x.narrow(1, 0, 1)?, &mut cache)?);
        for i in 0..chunks {
            let chunk = x.narrow(1, 1 + i * ENCODE_CHUNK_FRAMES, ENCODE_CHUNK_FRAMES)?;
            outs.push(self.encoder.forward(&chunk, &mut cache)?);
        }
        let out = Tensor::cat(&outs, 1)?;
        let mean = self.quant_conv_mean.forward(&out)?;
        from_channels_last(&mean)
    }

    /// Latents `[B, z_dim, T', h, w]` (unnormalised) -> pixels `[B, out_channels,
    /// 1 + (T'-1)*tc, h*s, w*s]` clamped to [-1, 1], in the model's dtype: the whole video
    /// at once, equal to diffusers' `decode` (which feeds the first latent frame alone, then
    /// one frame at a time).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let t = z.dim(2)?;
        let mut stream = self.stream_decoder();
        let mut outs = Vec::new();
        let mut start = 0;
        while start < t {
            let n = DECODE_CHUNK_LATENT_FRAMES.min(t - start);
            outs.push(stream.decode_next(&z.narrow(2, start, n)?)?);
            start += n;
        }
        if outs.is_empty() {
            candle_core::bail!("Wan VAE decode: no latent frames in {:?}", z.dims())
        }
        Tensor::cat(&outs, 2)
    }

    /// A decoder for a latent video arriving in chunks (e.g. one diffusion-forcing block at
    /// a time); it owns its cache and a handle on the weights, so it can live beside or
    /// apart from this `WanVae`.
    pub fn stream_decoder(&self) -> VaeStreamDecoder {
        VaeStreamDecoder {
            part: self.decoding.clone(),
            cfg: self.cfg.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            cache: FeatCache::default(),
            latent_frames: 0,
        }
    }

    fn stats(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let zc = self.cfg.z_dim;
        if self.cfg.latents_mean.len() != zc || self.cfg.latents_std.len() != zc {
            candle_core::bail!(
                "Wan VAE config: latents_mean ({}) and latents_std ({}) need z_dim = {zc} values",
                self.cfg.latents_mean.len(),
                self.cfg.latents_std.len()
            )
        }
        if z.rank() != 5 || z.dim(1)? != zc {
            candle_core::bail!(
                "Wan VAE: latents must be [B, {zc}, T, h, w], got {:?}",
                z.dims()
            )
        }
        let mean: Vec<f32> = self.cfg.latents_mean.iter().map(|&v| v as f32).collect();
        let inv_std: Vec<f32> = self
            .cfg
            .latents_std
            .iter()
            .map(|&v| (1.0 / v) as f32)
            .collect();
        let mean = Tensor::from_vec(mean, (1, zc, 1, 1, 1), z.device())?.to_dtype(z.dtype())?;
        let inv_std =
            Tensor::from_vec(inv_std, (1, zc, 1, 1, 1), z.device())?.to_dtype(z.dtype())?;
        Ok((mean, inv_std))
    }

    /// VAE latents -> the diffusion model's space: `(z - mean) * (1 / std)`, as the
    /// SkyReels-V2 pipelines do with encoded prefix/condition videos.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (mean, inv_std) = self.stats(z)?;
        z.broadcast_sub(&mean)?.broadcast_mul(&inv_std)
    }

    /// The diffusion model's latents -> VAE latents before decoding: `z / (1 / std) + mean`,
    /// as the SkyReels-V2 diffusion-forcing pipeline does (division by the reciprocal kept
    /// for parity).
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (mean, inv_std) = self.stats(z)?;
        z.broadcast_div(&inv_std)?.broadcast_add(&mean)
    }
}

/// Decodes a latent video chunk by chunk, carrying each causal layer's last frames (and the
/// temporal upsamplers' first-frame state) from one chunk to the next, so that the
/// concatenated outputs equal [`WanVae::decode`] of the whole latent video.
///
/// Frame counts: the very first latent frame gives 1 pixel frame and every later one
/// [`WanVaeConfig::temporal_compression`] frames (4 for Wan 2.1), whatever the chunking.
#[derive(Debug)]
pub struct VaeStreamDecoder {
    part: Arc<DecoderPart>,
    cfg: WanVaeConfig,
    dtype: DType,
    device: Device,
    cache: FeatCache,
    latent_frames: usize,
}

impl VaeStreamDecoder {
    /// Latents `[B, z_dim, n, h, w]` (n >= 1, unnormalised; batch and size fixed for the
    /// stream) -> the next pixel frames `[B, out_channels, m, h*s, w*s]` clamped to [-1, 1],
    /// with m = n*tc, or 1 + (n-1)*tc for the stream's first chunk.
    pub fn decode_next(&mut self, z_block: &Tensor) -> Result<Tensor> {
        let dims = z_block.dims();
        if dims.len() != 5 || dims[1] != self.cfg.z_dim || dims[2] == 0 {
            candle_core::bail!(
                "Wan VAE decode: expected latents [B, {}, n >= 1, h, w], got {dims:?}",
                self.cfg.z_dim
            )
        }
        let n = dims[2];
        let z = to_channels_last(&z_block.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        let x = self.part.post_quant_conv.forward(&z)?;
        let out = match self.part.decoder.forward(&x, &mut self.cache) {
            Ok(out) => out,
            Err(e) => {
                // A failed chunk leaves the cache half updated: start over next time.
                self.reset();
                return Err(e);
            }
        };
        self.latent_frames += n;
        from_channels_last(&out.clamp(-1f32, 1f32)?)
    }

    /// Forgets the previous chunks: the next chunk starts a new video.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.latent_frames = 0;
    }

    /// Latent frames decoded since the start (or the last reset).
    pub fn latent_frames_decoded(&self) -> usize {
        self.latent_frames
    }
}
