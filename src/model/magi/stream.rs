//! MAGI-1 from prompt to frames (upstream `MagiPipeline._run`, text to video): the T5
//! caption with its special tokens per chunk, the chunk-wise walk, and each finished chunk
//! decoded by the ViT VAE with the pipeline's tiling (`post_chunk_process`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::caption::text_preprocessing;
use super::config::MagiConfig;
use super::dit::MagiDit;
use super::files::MagiFiles;
use super::text::{SpecialTokens, load_t5_tokenizer};
use super::vae::{MagiVae, MagiVaeTiling};
use super::walk::{MagiWalk, PromptCaption, WalkCacheSettings, WalkNoise};
use crate::cache::magi::MagiCacheParams;
use crate::cache::{CacheMode, CacheSettings, Plan};
use crate::error::{Error, Result};
use crate::generate::{BlockStats, NoiseRng};
use crate::model::t5::{T5Config, T5Encoder};
use crate::model::tokenizer::{PromptCoverage, PromptTokenizer};
use crate::model::weights::{mmap_safetensors, pth_var_builder, pytorch_files, safetensors_files};

/// A loaded MAGI-1 model: DiT, VAE, T5 encoder and tokenizer, special tokens.
pub struct MagiModel {
    pub files: MagiFiles,
    dit: Arc<MagiDit>,
    vae: MagiVae,
    t5: T5Encoder,
    tokenizer: PromptTokenizer,
    specials: SpecialTokens,
}

impl MagiModel {
    /// Loads the MAGI-1 directory `dir` (see [`MagiFiles`]); every file is located before
    /// anything is read, so that a missing one is named.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let files = MagiFiles::locate(dir)?;
        let specials_path = files.special_tokens.clone();
        let spiece = files.t5_dir.join("spiece.model");
        if !spiece.is_file() {
            return Err(Error::model(
                &spiece,
                "missing T5 tokenizer (the SentencePiece model of the t5-v1_1-xxl folder)",
            ));
        }
        let cfg = &files.config;
        let vb = mmap_safetensors(&files.dit_weights, dtype, device)?;
        let dit = MagiDit::new(&cfg.model_config, cfg.engine_config.distill, vb).map_err(|e| {
            Error::model(
                &files.dit_weights[0],
                format!("weights do not match {}: {e}", files.config_path.display()),
            )
        })?;
        // The VAE and the text encoder run in f32 as upstream's (small next to the DiT;
        // the T5 is asked for in float by the pipeline).
        let vae = MagiVae::load(&files.vae_dir, DType::F32, device)?;
        let (t5_cfg, t5) = load_t5(&files.t5_dir, device)?;
        let tokenizer = load_t5_tokenizer(&spiece)?;
        let specials = SpecialTokens::from_npz(&specials_path, device)?;

        let mc = &cfg.model_config;
        let mismatch = |what: String| Err(Error::model(&files.config_path, what));
        if vae.config.z_chans != mc.latent_channels() {
            return mismatch(format!(
                "the DiT takes {} latent channels but the VAE ({}) makes {}",
                mc.latent_channels(),
                files.vae_dir.display(),
                vae.config.z_chans
            ));
        }
        if t5_cfg.d_model != mc.caption_channels {
            return mismatch(format!(
                "the DiT takes captions of {} channels but the T5 ({}) makes {}",
                mc.caption_channels,
                files.t5_dir.display(),
                t5_cfg.d_model
            ));
        }
        if specials.other_tokens.dim(1)? != mc.caption_channels {
            return Err(Error::model(
                &specials_path,
                format!(
                    "special tokens of width {} for captions of {} channels",
                    specials.other_tokens.dim(1)?,
                    mc.caption_channels
                ),
            ));
        }
        Ok(Self {
            files,
            dit: Arc::new(dit),
            vae,
            t5,
            tokenizer,
            specials,
        })
    }

    pub fn config(&self) -> &MagiConfig {
        &self.files.config
    }

    pub fn dit(&self) -> &Arc<MagiDit> {
        &self.dit
    }

    pub fn vae(&self) -> &MagiVae {
        &self.vae
    }

    /// Pixels per latent: `(spatial, temporal)`.
    pub fn factors(&self) -> (usize, usize) {
        self.vae.factors()
    }

    /// Tokens per latent frame side: the VAE's factor times the DiT's patch.
    pub fn pixel_multiple(&self) -> usize {
        self.vae.factors().0 * self.dit.config().patch_size
    }

    /// What the T5 tokenizer does not read of the prompt (cleaned as
    /// [`MagiModel::encode_prompt`] cleans it) at `caption_max_length`.
    pub fn prompt_coverage(&self, prompt: &str) -> Result<PromptCoverage> {
        let len = self.dit.config().caption_max_length;
        self.tokenizer.coverage(&text_preprocessing(prompt), len)
    }

    /// The prompt's T5 caption `([caption_max_length, D], mask [caption_max_length])`:
    /// upstream's `T5Embedder.get_text_embeddings`: the prompt cleaned by IF's
    /// `clean_caption` twice ([`text_preprocessing`]), padded to `caption_max_length`,
    /// truncated, the encoder run with the attention mask.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let len = self.dit.config().caption_max_length;
        let text = text_preprocessing(prompt);
        let tokens = self.tokenizer.encode_cleaned(&[text.as_str()], len)?;
        let (ids, mask) = tokens.to_tensors(self.t5.device())?;
        let n = tokens.seq_lens()[0].max(1);
        // Only the real tokens: padded keys are masked and their outputs are masked in
        // the cross-attention, so they are left at zero.
        let hidden = self
            .t5
            .forward(&ids.narrow(1, 0, n)?, &mask.narrow(1, 0, n)?)?;
        let hidden = hidden.squeeze(0)?.to_dtype(DType::F32)?;
        let d = hidden.dim(1)?;
        let hidden = if n < len {
            Tensor::cat(
                &[
                    &hidden,
                    &Tensor::zeros((len - n, d), DType::F32, hidden.device())?,
                ],
                0,
            )?
        } else {
            hidden
        };
        let mask = mask.squeeze(0)?.to_dtype(DType::F32)?;
        Ok((hidden, mask))
    }

    /// Upstream's `decode_chunk`: `latents / scale_factor` through the VAE with the
    /// pipeline's tiling; `[1, C, T, h, w]` -> `[3, 4T, H, W]` (about [-1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let rc = &self.config().runtime_config;
        let z = (latents.to_dtype(DType::F32)? / rc.scale_factor)?;
        let video = self
            .vae
            .decode_tiled(&z, &MagiVaeTiling::pipeline(rc.fps))?;
        Ok(video.squeeze(0)?)
    }
}

/// The T5 encoder of a MAGI-1 T5 folder, in f32: `config.json` and the weights as
/// safetensors (`model.safetensors` or its shards) or, as transformers saves them without
/// safetensors, PyTorch pickles (`pytorch_model.bin` or the shards of its index).
pub fn load_t5(dir: &Path, device: &Device) -> Result<(T5Config, T5Encoder)> {
    let config = dir.join("config.json");
    let cfg = T5Config::from_json_file(&config)?;
    let (vb, first) = match safetensors_files(dir, &["model"]) {
        Ok(files) => (
            mmap_safetensors(&files, DType::F32, device)?,
            files[0].clone(),
        ),
        Err(_) => {
            let files = pytorch_files(dir, &["pytorch_model"]).map_err(|_| {
                Error::model(
                    dir,
                    "no T5 encoder weights: expected model.safetensors, \
                     model.safetensors.index.json, pytorch_model.bin or \
                     pytorch_model.bin.index.json",
                )
            })?;
            (
                pth_var_builder(&files, DType::F32, device)?,
                files[0].clone(),
            )
        }
    };
    let t5 = T5Encoder::new(&cfg, vb)
        .map_err(|e| Error::model(&first, format!("does not match {}: {e}", config.display())))?;
    Ok((cfg, t5))
}

/// The settings of one MAGI-1 stream.
#[derive(Debug, Clone)]
pub struct MagiStreamSettings {
    /// Denoising steps per chunk (a multiple of `window_size` and of the key-range stages).
    pub steps: usize,
    /// Chunks to make; `None`: endless.
    pub chunks: Option<usize>,
    /// `(width, height)` in pixels (multiples of [`MagiModel::pixel_multiple`]).
    pub size: (usize, usize),
    /// The cache ([`CacheSettings::for_magi`]; see [`walk_cache`]).
    pub cache: CacheSettings,
}

impl MagiStreamSettings {
    /// What `settings` ask of a MAGI-1 stream of `chunk_width` latent frames per chunk at
    /// `(width, height)`: their steps and cache, `total_frames` as whole chunks.
    pub fn from_generator(
        settings: &crate::generate::GeneratorSettings,
        chunk_width: usize,
        size: (usize, usize),
    ) -> Self {
        Self {
            steps: settings.steps,
            chunks: settings
                .total_frames
                .map(|f| f.div_ceil(chunk_width.max(1))),
            size,
            cache: settings.cache.clone(),
        }
    }
}

/// What a walk runs for `cache`: `vanilla` and `none` are upstream's walk (which already
/// keeps finished chunks' keys and values, computed once by the clean re-forward: exact
/// reuse); `teacache` and `flowcache` reuse whole chunks after the warm-up (their
/// thresholds); `motioncache` is MotionCache4MAGI-1's three phases with upstream's walk
/// and correct key ranges; `motioncache-reference` reproduces the reference code.
pub fn walk_cache(cache: &CacheSettings) -> Option<WalkCacheSettings> {
    let motion = MagiCacheParams {
        chunk_threshold: cache.motion_threshold,
        token_threshold: cache.motion_threshold,
        warmup_steps: cache.warmup_steps,
        chunk_steps: cache.uniform_updates,
        weight_floor: cache.weight_floor,
        weight_power: 1.0,
    };
    let chunk_level = MagiCacheParams {
        chunk_threshold: cache.threshold(),
        chunk_steps: usize::MAX,
        ..motion.clone()
    };
    let (params, reference) = match cache.mode {
        CacheMode::Vanilla | CacheMode::None => return None,
        CacheMode::TeaCache | CacheMode::FlowCache => (chunk_level, false),
        CacheMode::MotionCache => (motion, false),
        CacheMode::MotionCacheReference => (motion, true),
    };
    Some(WalkCacheSettings { params, reference })
}

/// Per unfinished chunk: what its forwards computed.
#[derive(Default)]
struct ChunkTally {
    full: usize,
    partial: usize,
    skipped: usize,
    tokens: usize,
    per_token: Vec<u32>,
}

/// A finished chunk: its index, clean latents `[1, C, chunk_width, h, w]` and what making it
/// took.
pub struct MagiChunk {
    pub index: usize,
    pub latents: Tensor,
    pub stats: BlockStats,
}

/// A running MAGI-1 video.
pub struct MagiStream {
    model: Arc<MagiModel>,
    walk: MagiWalk,
    steps: usize,
    grid: (usize, usize, usize),
    /// What the forwards of each unfinished chunk computed.
    passes: BTreeMap<usize, ChunkTally>,
    last_emit: Instant,
    compute: Duration,
    poisoned: bool,
}

impl MagiStream {
    /// A new video of `prompt` from the seeded noise `seed`.
    pub fn new(
        model: Arc<MagiModel>,
        prompt: &str,
        settings: &MagiStreamSettings,
        seed: u64,
    ) -> Result<Self> {
        let noise = WalkNoise::Seeded(NoiseRng::new(seed));
        Self::with_noise(model, prompt, settings, noise)
    }

    /// Like [`MagiStream::new`] with any noise source (explicit noise for parity runs).
    pub fn with_noise(
        model: Arc<MagiModel>,
        prompt: &str,
        settings: &MagiStreamSettings,
        noise: WalkNoise,
    ) -> Result<Self> {
        let mut cfg = model.config().clone();
        let rc = &cfg.runtime_config;
        let window = rc.window_size.max(1);
        let stages = rc.noise2clean_kvrange.len().max(1);
        if settings.steps == 0
            || !settings.steps.is_multiple_of(window)
            || !settings.steps.is_multiple_of(stages)
        {
            return Err(Error::setting(
                "steps",
                settings.steps,
                format!(
                    "MAGI-1 needs a positive multiple of window_size {window} and of the {stages} \
                     key-range stages of {}",
                    model.files.config_path.display()
                ),
            ));
        }
        let chunk_width = rc.chunk_width;
        cfg.runtime_config.num_steps = settings.steps;
        let (w, h) = settings.size;
        let m = model.pixel_multiple();
        if w == 0 || h == 0 || !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            return Err(Error::setting(
                "size",
                format!("{w}x{h}"),
                format!("MAGI-1 frames are multiples of {m} pixels per side"),
            ));
        }
        let s = model.factors().0;
        let latent = (model.dit.config().latent_channels(), h / s, w / s);
        let (text, mask) = model.encode_prompt(prompt)?;
        let (null, null_mask) = PromptCaption::null_of(&model.dit)?;
        let caption = PromptCaption {
            text,
            mask,
            specials: model.specials.clone(),
            null,
            null_mask,
        };
        let mut walk = MagiWalk::streaming(
            model.dit.clone(),
            &cfg,
            latent,
            settings.chunks,
            noise,
            caption,
        )?;
        settings.cache.validate(settings.steps)?;
        walk.set_cache(walk_cache(&settings.cache))
            .map_err(|e| Error::setting("cache-mode", settings.cache.mode.name(), e.to_string()))?;
        let p = model.dit.config().patch_size;
        let pt = model.dit.config().t_patch_size.max(1);
        let grid = (chunk_width / pt, latent.1 / p, latent.2 / p);
        Ok(Self {
            model,
            walk,
            steps: settings.steps,
            grid,
            passes: BTreeMap::new(),
            last_emit: Instant::now(),
            compute: Duration::ZERO,
            poisoned: false,
        })
    }

    pub fn model(&self) -> &Arc<MagiModel> {
        &self.model
    }

    /// Replaces the prompt: from the next forward, every unfinished chunk follows it.
    pub fn set_prompt(&mut self, prompt: &str) -> Result<()> {
        let (text, mask) = self.model.encode_prompt(prompt)?;
        Ok(self.walk.set_prompt(text, mask)?)
    }

    /// Denoising steps per chunk of this stream.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// New cache settings, from the next step.
    pub fn set_cache(&mut self, cache: &CacheSettings) -> Result<()> {
        cache.validate(self.steps)?;
        self.walk
            .set_cache(walk_cache(cache))
            .map_err(|e| Error::setting("cache-mode", cache.mode.name(), e.to_string()))
    }

    /// Runs the walk until the next chunk is finished; `None` when the video is complete.
    /// `cancel` is checked before every DiT layer; after [`Error::Cancelled`] (or any error)
    /// the stream must be dropped.
    pub fn next_chunk(&mut self, cancel: &AtomicBool) -> Result<Option<MagiChunk>> {
        if self.poisoned {
            return Err(Error::setting(
                "stream",
                "stopped",
                "an earlier error or cancellation left it unusable; create a new one",
            ));
        }
        loop {
            if cancel.load(Ordering::SeqCst) {
                self.poisoned = true;
                return Err(Error::Cancelled);
            }
            let started = Instant::now();
            let passes = if self.model.config().runtime_config.cfg_number == 3 {
                3
            } else {
                1
            };
            let step = match self.walk.step_cancellable(Some(cancel)) {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(None),
                Err(_) if cancel.load(Ordering::SeqCst) => {
                    self.poisoned = true;
                    return Err(Error::Cancelled);
                }
                Err(e) => {
                    self.poisoned = true;
                    return Err(e.into());
                }
            };
            self.compute += started.elapsed();
            // Every chunk of this step's window went through `passes` forwards, of the
            // tokens its plan names.
            let (gt, gh, gw) = self.grid;
            let tokens = gt * gh * gw;
            for (j, c) in (step.denoised.0..step.denoised.1).enumerate() {
                let t = self.passes.entry(c).or_default();
                t.per_token.resize(tokens, 0);
                let plan = step.plans.get(j).unwrap_or(&Plan::Full);
                t.tokens += plan.count(tokens) * passes;
                match plan {
                    Plan::Full => {
                        t.full += passes;
                        t.per_token.iter_mut().for_each(|n| *n += passes as u32);
                    }
                    Plan::Skip => t.skipped += passes,
                    Plan::Tokens(ks) => {
                        t.partial += passes;
                        for &k in ks {
                            t.per_token[k as usize] += passes as u32;
                        }
                    }
                }
            }
            if let Some((index, latents)) = step.finished {
                let t = self.passes.remove(&index).unwrap_or_default();
                let forwards = t.full + t.partial + t.skipped;
                let cw = self.model.config().runtime_config.chunk_width;
                let now = Instant::now();
                let per_token = self.chunk_flops() / tokens as f64;
                let stats = BlockStats {
                    index,
                    frames: cw,
                    steps: self.steps,
                    full_forwards: t.full,
                    partial_forwards: t.partial,
                    skipped_forwards: t.skipped,
                    tokens_recomputed: t.tokens,
                    tokens_total: tokens * forwards,
                    token_recomputes: t.per_token,
                    grid: self.grid,
                    flops: t.tokens as f64 * per_token,
                    vanilla_flops: forwards as f64 * self.chunk_flops(),
                    wall: now - self.last_emit,
                    compute: std::mem::take(&mut self.compute),
                };
                self.last_emit = now;
                return Ok(Some(MagiChunk {
                    index,
                    latents,
                    stats,
                }));
            }
        }
    }

    /// Linear-layer FLOPs of one forward over one chunk's tokens (attention left out).
    fn chunk_flops(&self) -> f64 {
        let c = self.model.dit.config();
        let (gt, gh, gw) = self.grid;
        let tokens = (gt * gh * gw) as f64;
        let d = c.hidden_size as f64;
        let q = (c.num_attention_heads * c.kv_channels) as f64;
        let kv = (c.num_query_groups * c.kv_channels) as f64;
        let ffn = c.ffn_hidden_size as f64 * if c.gated_linear_unit { 3.0 } else { 2.0 };
        let per_token = d * (2.0 * q + 2.0 * kv) + 2.0 * q * d + ffn * d;
        2.0 * tokens * per_token * c.num_layers as f64
    }
}
