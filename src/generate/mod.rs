//! The streaming diffusion-forcing generator: owns the transformer and the cache policy,
//! yields every causal block's final latents as soon as the block is finished, and keeps
//! going window after window (overlap frames stay as conditioning, K/V of blocks that left
//! the window are dropped) for as long as asked.
//!
//! One *segment* is one run of the step matrix over a window of latent frames, as in
//! diffusers' long-video loop; the first `overlap` frames of every later segment are the
//! last frames of the one before. Each row of the step matrix is one batched transformer
//! forward (see `segment.rs`).

mod noise;
mod residual;
mod segment;
mod settings;

pub use noise::NoiseRng;
pub use settings::GeneratorSettings;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::transformer::{Context, KvCache, Transformer};
use crate::schedule::SchedulerConfig;

use segment::Segment;

/// Statistics of one finished block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockStats {
    /// Global index of the block in the video.
    pub index: usize,
    /// Latent frames in the block.
    pub frames: usize,
    /// Denoising steps the block took.
    pub steps: usize,
    /// Transformer passes over the block (per branch) that computed every token.
    pub full_forwards: usize,
    /// Passes that computed a subset of tokens.
    pub partial_forwards: usize,
    /// Passes skipped entirely (all tokens reused).
    pub skipped_forwards: usize,
    /// Tokens that went through the transformer / tokens that a full pass would process,
    /// over the block's denoising passes.
    pub tokens_recomputed: usize,
    pub tokens_total: usize,
    /// How often each token of the block (frame-major, post-patch grid) went through the
    /// transformer, over its steps and guidance branches.
    pub token_recomputes: Vec<u32>,
    /// Post-patch grid of the block `(frames, height, width)`.
    pub grid: (usize, usize, usize),
    /// Transformer-layer FLOPs done for this block and what diffusers' full-window
    /// recompute would have done for it.
    pub flops: f64,
    pub vanilla_flops: f64,
    /// Wall time since the previous block was emitted, and the part of it spent making
    /// this block: the generator (transformer, cache policy, solver) and, once
    /// `VideoStream::decode` has run, the VAE decode. The rest is the caller's (waiting on
    /// a full queue, a paused pipeline).
    pub wall: Duration,
    pub compute: Duration,
}

impl BlockStats {
    pub fn recomputed_fraction(&self) -> f64 {
        if self.tokens_total == 0 {
            1.0
        } else {
            self.tokens_recomputed as f64 / self.tokens_total as f64
        }
    }

    pub fn flops_ratio(&self) -> f64 {
        if self.vanilla_flops == 0.0 {
            1.0
        } else {
            self.flops / self.vanilla_flops
        }
    }
}

/// A finished causal block.
#[derive(Debug, Clone)]
pub struct FinishedBlock {
    /// `[C, frames, H, W]`, f32, in the model's latent space (not denormalised).
    pub latents: Tensor,
    pub stats: BlockStats,
}

/// Where initial noise comes from.
pub enum NoiseSource {
    /// Gaussian noise from a seeded stream (also used for `addnoise_condition`).
    Seed(u64),
    /// Explicit initial noise per segment, `[C, frames, H, W]` each (for parity with a
    /// reference run); the seed drives `addnoise_condition` only.
    Explicit {
        segments: VecDeque<Tensor>,
        seed: u64,
    },
}

/// The streaming generator. Not `Clone`; one per video stream.
pub struct Generator {
    model: Arc<Transformer>,
    scheduler: SchedulerConfig,
    settings: GeneratorSettings,
    /// The cond and uncond contexts stacked for batched forwards.
    stacked: Context,
    text_len: usize,
    latent: (usize, usize, usize),
    noise: NoiseSource,
    rng: NoiseRng,
    seg: Option<Segment>,
    /// Kept across segments: every block's keys/values are written before anything reads
    /// them, so a window's cache can start from the last one's allocation.
    kv: Option<KvCache>,
    history: Option<Tensor>,
    produced_frames: usize,
    next_global_block: usize,
    ready: VecDeque<FinishedBlock>,
    last_emit: Instant,
    compute: Duration,
    poisoned: bool,
    /// Calibration samples (modulation distance, output distance) when recording.
    distances: Option<Vec<(f64, f64)>>,
}

impl Generator {
    /// `cond` and `negative` are text contexts `[1, text_len, text_dim]` (the negative is
    /// used when `guidance_scale > 1`); `latent` is `(channels, height, width)` of the
    /// latent frames.
    pub fn new(
        model: Arc<Transformer>,
        scheduler: SchedulerConfig,
        settings: GeneratorSettings,
        cond: &Tensor,
        negative: Option<&Tensor>,
        latent: (usize, usize, usize),
        noise: NoiseSource,
    ) -> Result<Self> {
        settings.validate()?;
        scheduler
            .validate()
            .map_err(|r| Error::setting("scheduler", "config", r))?;
        let cfg = model.config();
        if latent.0 != cfg.in_channels {
            return Err(Error::setting(
                "latent channels",
                latent.0,
                format!("the transformer expects {}", cfg.in_channels),
            ));
        }
        model.grid(settings.causal_block_size, latent.1, latent.2)?;
        let text_len = cond.dim(cond.rank() - 2)?;
        let stacked = Self::contexts(&model, cond, negative)?;
        let seed = match &noise {
            NoiseSource::Seed(s) => *s,
            NoiseSource::Explicit { seed, .. } => *seed,
        };
        Ok(Self {
            model,
            scheduler,
            settings,
            stacked,
            text_len,
            latent,
            noise,
            rng: NoiseRng::new(seed.wrapping_add(0x5eed)),
            seg: None,
            kv: None,
            history: None,
            produced_frames: 0,
            next_global_block: 0,
            ready: VecDeque::new(),
            last_emit: Instant::now(),
            compute: Duration::ZERO,
            poisoned: false,
            distances: None,
        })
    }

    fn contexts(model: &Transformer, cond: &Tensor, negative: Option<&Tensor>) -> Result<Context> {
        let c = model.context(cond)?;
        let n = match negative {
            Some(n) => model.context(n)?,
            None => model.context(&cond.zeros_like()?)?,
        };
        Ok(Context::stack(&[&c, &n])?)
    }

    pub fn settings(&self) -> &GeneratorSettings {
        &self.settings
    }

    /// Replaces the settings. Guidance and cache settings apply from the next transformer
    /// pass; the schedule (steps, shift, block size, ar_step, window, overlap) from the
    /// next window.
    pub fn set_settings(&mut self, s: GeneratorSettings) -> Result<()> {
        s.validate()?;
        self.model
            .grid(s.causal_block_size, self.latent.1, self.latent.2)?;
        self.settings = s;
        Ok(())
    }

    /// Replaces the text contexts (a new prompt); applies from the next transformer pass.
    /// Blocks already finished keep the keys/values they were computed with.
    pub fn set_contexts(&mut self, cond: &Tensor, negative: Option<&Tensor>) -> Result<()> {
        self.stacked = Self::contexts(&self.model, cond, negative)?;
        Ok(())
    }

    /// Records, for every fully computed block-step after a block's first, the relative L1
    /// distance of the block's timestep modulation from its previous step and that of its
    /// transformer output: the samples a cache's rescale polynomial is fitted to
    /// (`motioncache-bench calibrate`). Meant for `cache-mode none`.
    pub fn record_distances(&mut self, on: bool) {
        self.distances = on.then(Vec::new);
    }

    /// The samples recorded so far (see [`Generator::record_distances`]).
    pub fn take_distances(&mut self) -> Vec<(f64, f64)> {
        self.distances
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Latent frames emitted so far.
    pub fn produced_frames(&self) -> usize {
        self.produced_frames
    }

    /// Runs until the next causal block is finished and returns it; `None` when
    /// `total_frames` were produced. `cancel` is checked before every transformer layer;
    /// after [`Error::Cancelled`] (or any error) the generator must be dropped.
    pub fn next_block(&mut self, cancel: &AtomicBool) -> Result<Option<FinishedBlock>> {
        if self.poisoned {
            return Err(Error::setting(
                "generator",
                "stopped",
                "an earlier error or cancellation left it unusable; create a new one",
            ));
        }
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Ok(Some(b));
            }
            if self.seg.is_none() {
                if let Some(total) = self.settings.total_frames
                    && self.produced_frames >= total
                {
                    return Ok(None);
                }
                let started = Instant::now();
                let s = self.start_segment();
                self.compute += started.elapsed();
                match s {
                    Ok(s) => self.seg = Some(s),
                    Err(e) => {
                        self.poisoned = true;
                        return Err(e);
                    }
                }
            }
            let started = Instant::now();
            let r = self.iterate(cancel);
            self.compute += started.elapsed();
            if let Err(e) = r {
                self.poisoned = true;
                return Err(e);
            }
        }
    }

    fn start_segment(&mut self) -> Result<Segment> {
        let s = self.settings.clone();
        let (c, h, w) = self.latent;
        let bs = s.causal_block_size;
        let (prefix, history) = match self.history.take() {
            Some(hist) => (hist.dim(1)?, Some(hist)),
            None => (0, None),
        };
        let mut frames = s.window;
        if let Some(total) = s.total_frames {
            let left = total - self.produced_frames;
            frames = frames.min(left + prefix);
            frames -= frames % bs;
        }
        let blocks = frames / bs;
        if blocks == 0 || blocks * bs <= prefix {
            return Err(Error::setting(
                "total-frames",
                s.total_frames.unwrap_or(0),
                "leaves less than one causal block to generate",
            ));
        }
        let noise = self.initial_noise(c, frames, h, w)?;
        let (gf, gh, gw) = self.model.grid(bs, h, w)?;
        let capacity = blocks * gf * gh * gw;
        let kv = match self.kv.take() {
            Some(kv) if kv.capacity() >= capacity => kv,
            _ => self.model.kv_cache(2, capacity)?,
        };
        Segment::new(
            &self.model,
            &self.scheduler,
            s,
            &noise,
            history.as_ref(),
            self.next_global_block.saturating_sub(prefix / bs),
            kv,
        )
    }

    fn initial_noise(&mut self, c: usize, f: usize, h: usize, w: usize) -> Result<Tensor> {
        let dev = self.model.device().clone();
        match &mut self.noise {
            NoiseSource::Seed(seed) => {
                // One stream per segment so that a window's noise does not depend on how
                // many addnoise draws came before it.
                let mut r = NoiseRng::new(*seed);
                *seed = seed.wrapping_add(0x9E37_79B9);
                Ok(r.randn((c, f, h, w), &dev)?)
            }
            NoiseSource::Explicit { segments, .. } => {
                let n = segments.pop_front().ok_or_else(|| {
                    Error::setting("noise", "explicit", "ran out of explicit initial noise")
                })?;
                if n.dims() != [c, f, h, w] {
                    return Err(Error::setting(
                        "noise",
                        format!("{:?}", n.dims()),
                        format!("expected [{c}, {f}, {h}, {w}]"),
                    ));
                }
                Ok(n.to_device(&dev)?.to_dtype(DType::F32)?)
            }
        }
    }

    /// One row of the step matrix; at the end of a segment, carries its history into the
    /// next one.
    fn iterate(&mut self, cancel: &AtomicBool) -> Result<()> {
        let Some(mut seg) = self.seg.take() else {
            return Ok(());
        };
        let env = segment::Env {
            model: &self.model,
            settings: &self.settings,
            stacked: &self.stacked,
            text_len: self.text_len,
            rng: &mut self.rng,
            cancel,
            distances: self.distances.as_mut(),
        };
        // The whole row on the pool: the small parallel loops of its steps outside the
        // forward start there too (see `kernels::on_pool`).
        let device = self.model.device().clone();
        let finished = crate::model::kernels::on_pool(&device, || seg.row(env))?;
        for (b, latents, mut stats) in finished {
            stats.wall = self.last_emit.elapsed();
            stats.compute = std::mem::take(&mut self.compute);
            self.last_emit = Instant::now();
            self.ready.push_back(FinishedBlock { latents, stats });
            self.produced_frames += seg.block_frames();
            self.next_global_block = seg.first_global() + b + 1;
        }
        if !seg.done() {
            self.seg = Some(seg);
            return Ok(());
        }
        let (history, next_block, kv) = seg.finish()?;
        if let Some(h) = history {
            self.history = Some(h);
            self.next_global_block = next_block;
        }
        self.kv = Some(kv);
        Ok(())
    }
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}
