//! MAGI-1's chunk-wise sampling walk (upstream `SampleTransport.walk` and
//! `VideoDiTModel.forward_dispatcher`), text to video.
//!
//! `window` chunks are in flight, staggered by stages of `num_steps / window` steps: every
//! forward holds the chunks of the current stage, each at its own timestep; the oldest
//! chunk finishes (and is returned) every `num_steps / window` forwards once the window is
//! full. At the first step of a stage the chunk that just finished is re-forwarded first at
//! `clean_t` with the null caption, which writes its keys/values into the cache; later
//! forwards read them from there (`slice_point`). The distill model (one pass) mixes in a
//! "nearly clean" copy of its oldest chunk while that chunk's `t` is above 0.3; the base
//! model combines three passes (text, null text, no context) with per-`t` guidance scales.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Tensor};

use super::config::MagiConfig;
use super::dit::{CacheUse, MagiDit, MagiInput, MagiKvCache};
use super::text::{SpecialTokens, pad_special_tokens_chunk};
use crate::cache::Plan;
use crate::cache::magi::{MagiCacheParams, MagiChunkCache, frame_weights, metric_change};
use crate::generate::NoiseRng;
use crate::schedule::magi::{intervals, stage, timesteps};

/// Per-chunk captions: the text caption of each chunk (special tokens included) and the
/// null caption, embeddings `[chunks, L, caption_channels]` with masks `[chunks, L]`.
pub struct MagiCaptions {
    pub text: Tensor,
    pub text_mask: Tensor,
    pub null: Tensor,
    pub null_mask: Tensor,
}

/// One prompt for every chunk, as upstream's text-to-video pipeline builds the captions
/// (`_process_txt_embeddings` with `PAD_HQ=1 PAD_DURATION=1`): chunk `i` gets
/// `[DURATION_k, HQ, prompt...]` with `k` the chunks left (8 or more for an endless walk).
pub struct PromptCaption {
    /// The T5 output `[L, caption_channels]` and its mask `[L]` (1 for real tokens).
    pub text: Tensor,
    pub mask: Tensor,
    pub specials: SpecialTokens,
    /// The null caption `[L, caption_channels]` and its mask `[L]` (upstream: the model's
    /// `null_caption_embedding`, its first 50 rows valid).
    pub null: Tensor,
    pub null_mask: Tensor,
}

impl PromptCaption {
    /// The null caption of `dit`, valid on its first 50 rows (`_process_null_embeddings`).
    pub fn null_of(dit: &MagiDit) -> candle_core::Result<(Tensor, Tensor)> {
        let null = dit.null_caption().clone();
        let l = null.dim(0)?;
        let valid = l.min(50);
        let mut m = vec![1f32; valid];
        m.resize(l, 0.0);
        Ok((null, Tensor::from_vec(m, l, dit.device())?))
    }
}

/// Where the chunks' captions come from.
pub enum WalkCaptions {
    /// Given per chunk (a finite walk over exactly that many chunks).
    PerChunk(MagiCaptions),
    /// One prompt, the special tokens per chunk; [`MagiWalk::set_prompt`] replaces it.
    Prompt(PromptCaption),
}

/// Where the chunks' initial noise comes from.
pub enum WalkNoise {
    /// `[1, C, chunks * chunk_width, H, W]`: every chunk's noise (a finite walk).
    Explicit(Tensor),
    /// Standard normal noise of a seeded stream, drawn per chunk as it enters the window.
    Seeded(NoiseRng),
}

/// MotionCache on a walk (MAGI-1's variant, [`crate::cache::magi`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WalkCacheSettings {
    pub params: MagiCacheParams,
    /// Reproduce the reference code (ywlq/MotionCache, MotionCache4MAGI-1) rather than
    /// upstream MAGI-1: no clean-chunk re-forward (a finished chunk keeps the keys/values
    /// of its last denoising step, computed with the text caption), no nearly-clean mix,
    /// and its key-range bug (a partially recomputed chunk that is not the oldest in the
    /// window attends with the oldest chunk's key range).
    pub reference: bool,
}

/// The cache state of a walk.
struct WalkCache {
    settings: WalkCacheSettings,
    /// Per chunk (global index) in the window.
    states: HashMap<usize, MagiChunkCache>,
    /// The previous step's metric of each chunk then in the window.
    prev_metric: HashMap<usize, Tensor>,
    /// Motion weights per global latent frame, one per token of the frame (1 until set).
    weights: HashMap<usize, Vec<f32>>,
    /// Per chunk: its latent delta at its last integrated step and that step's `dt`.
    last_delta: HashMap<usize, (Tensor, f64)>,
    /// The nearly-clean copy's output (the oldest chunk without context) at its last
    /// forward, and that chunk: reused while the chunk is recomputed only in part.
    near_alone: Option<(usize, Tensor)>,
}

/// What one step of the walk produced.
pub struct WalkStep {
    /// The guided velocity of the chunks denoised at this step (the re-forwarded clean
    /// chunk excluded), `[1, C, frames, H, W]`.
    pub velocity: Tensor,
    /// The chunks denoised at this step, `[start, end)`.
    pub denoised: (usize, usize),
    /// A chunk that finished at this step: its index and clean latents `[1, C, width, H, W]`.
    pub finished: Option<(usize, Tensor)>,
    /// Per denoised chunk, what the cache had it compute (all `Full` without the cache).
    pub plans: Vec<Plan>,
}

/// A text-to-video walk, finite or endless. An endless walk (and a long finite one) keeps
/// only the chunks its key ranges still reach: the latents and the KV cache of older
/// chunks are dropped, positions stay those of the whole video.
pub struct MagiWalk {
    dit: Arc<MagiDit>,
    cfg: MagiConfig,
    captions: WalkCaptions,
    noise: WalkNoise,
    /// Chunks in the video; `None`: endless.
    chunks: Option<usize>,
    /// `(C, H, W)` of a latent frame.
    latent: (usize, usize, usize),
    /// Latents `[1, C, held * chunk_width, H, W]` of chunks `base..base + held`.
    x: Option<Tensor>,
    base: usize,
    ts: Vec<f32>,
    intervals: Vec<f64>,
    cache: MagiKvCache,
    /// Denoising steps taken per chunk, from chunk `base`.
    counts: Vec<usize>,
    step: usize,
    chunk_tokens: usize,
    /// The most chunks (itself included) any chunk attends to; `None`: every earlier one.
    reach: Option<usize>,
    cache_state: Option<WalkCache>,
}

/// Upstream's `prev_chunks_scale` (env, default 0.7): weight of the nearly-clean chunk's
/// output with context against its copy without.
const PREV_CHUNKS_SCALE: f64 = 0.7;

impl MagiWalk {
    /// A walk from the initial noise `[1, C, chunks * chunk_width, H, W]` with captions
    /// per chunk.
    pub fn new(
        dit: Arc<MagiDit>,
        cfg: &MagiConfig,
        noise: Tensor,
        captions: MagiCaptions,
    ) -> candle_core::Result<Self> {
        let (_, c, frames, h, w) = noise.dims5()?;
        let cw = cfg.runtime_config.chunk_width;
        if cw == 0 || frames % cw != 0 {
            candle_core::bail!("{frames} latent frames are not chunks of {cw}");
        }
        let chunks = frames / cw;
        for (name, t) in [("text", &captions.text), ("null", &captions.null)] {
            if t.dim(0)? != chunks {
                candle_core::bail!("{} {name} captions for {chunks} chunks", t.dim(0)?);
            }
        }
        Self::build(
            dit,
            cfg,
            (c, h, w),
            Some(chunks),
            WalkNoise::Explicit(noise),
            WalkCaptions::PerChunk(captions),
        )
    }

    /// A walk of `chunks` chunks (`None`: endless) of `(C, H, W)` latent frames, noise
    /// drawn per chunk.
    pub fn streaming(
        dit: Arc<MagiDit>,
        cfg: &MagiConfig,
        latent: (usize, usize, usize),
        chunks: Option<usize>,
        noise: WalkNoise,
        caption: PromptCaption,
    ) -> candle_core::Result<Self> {
        Self::build(
            dit,
            cfg,
            latent,
            chunks,
            noise,
            WalkCaptions::Prompt(caption),
        )
    }

    fn build(
        dit: Arc<MagiDit>,
        cfg: &MagiConfig,
        latent: (usize, usize, usize),
        chunks: Option<usize>,
        noise: WalkNoise,
        captions: WalkCaptions,
    ) -> candle_core::Result<Self> {
        let rc = &cfg.runtime_config;
        let cw = rc.chunk_width;
        let window = rc.window_size.max(1);
        if cw == 0 || rc.num_steps == 0 || !rc.num_steps.is_multiple_of(window) {
            candle_core::bail!(
                "num_steps {} is not a positive multiple of window_size {window} (chunk_width {cw})",
                rc.num_steps
            );
        }
        if !rc.noise2clean_kvrange.is_empty()
            && !rc.num_steps.is_multiple_of(rc.noise2clean_kvrange.len())
        {
            candle_core::bail!(
                "num_steps {} is not a multiple of the {} key-range stages",
                rc.num_steps,
                rc.noise2clean_kvrange.len()
            );
        }
        if chunks == Some(0) {
            candle_core::bail!("a walk of no chunks");
        }
        let (_, h, w) = latent;
        let p = dit.config().patch_size;
        let chunk_tokens = cw * (h / p) * (w / p);
        let n2c = &rc.noise2clean_kvrange;
        let reach = (!n2c.is_empty()).then(|| {
            let clean = if rc.clean_chunk_kvrange < 0 {
                n2c[n2c.len() - 1]
            } else {
                rc.clean_chunk_kvrange as usize
            };
            n2c.iter().copied().chain([clean]).max().unwrap_or(1).max(1)
        });
        // The cache holds the chunks a forward reads or writes: up to `reach - 1` before
        // the first one, and the `window` (+ the re-forwarded clean one) it runs.
        let held = match (reach, chunks) {
            (Some(r), Some(n)) => n.min(r + window),
            (Some(r), None) => r + window,
            (None, Some(n)) => n,
            (None, None) => candle_core::bail!(
                "an endless MAGI-1 walk needs noise2clean_kvrange (without it every chunk \
                 attends to all earlier ones); give the video a length"
            ),
        };
        let mode = &cfg.engine_config.shortcut_mode;
        Ok(Self {
            cache: MagiKvCache::new(&dit, held * chunk_tokens)?,
            dit,
            cfg: cfg.clone(),
            captions,
            noise,
            chunks,
            latent,
            x: None,
            base: 0,
            ts: timesteps(rc.num_steps, mode, 3.0),
            intervals: intervals(rc.num_steps, mode),
            counts: Vec::new(),
            step: 0,
            chunk_tokens,
            reach,
            cache_state: None,
        })
    }

    /// Turns MotionCache on (or off with `None`) from the next step. Changed settings keep
    /// the chunks' accumulated state (turning the reference behaviour on or off starts
    /// them afresh).
    pub fn set_cache(&mut self, settings: Option<WalkCacheSettings>) -> candle_core::Result<()> {
        let Some(settings) = settings else {
            self.cache_state = None;
            return Ok(());
        };
        if self.cfg.runtime_config.cfg_number != 1 {
            candle_core::bail!(
                "MotionCache for MAGI-1 runs the distill model's single pass; this config has \
                 cfg_number {}",
                self.cfg.runtime_config.cfg_number
            );
        }
        match &mut self.cache_state {
            Some(c) if c.settings.reference == settings.reference => c.settings = settings,
            c => {
                *c = Some(WalkCache {
                    settings,
                    states: HashMap::new(),
                    prev_metric: HashMap::new(),
                    weights: HashMap::new(),
                    last_delta: HashMap::new(),
                    near_alone: None,
                })
            }
        }
        Ok(())
    }

    /// Forwards in the whole walk; `None` for an endless one.
    pub fn total_steps(&self) -> Option<usize> {
        let rc = &self.cfg.runtime_config;
        let window = rc.window_size.max(1);
        self.chunks
            .map(|n| rc.num_steps / window * (n + window - 1))
    }

    /// Chunks in the video (`None`: endless).
    pub fn chunks(&self) -> Option<usize> {
        self.chunks
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The latents of the chunks held (from [`MagiWalk::first_held`]) as they stand.
    pub fn latents(&self) -> Option<&Tensor> {
        self.x.as_ref()
    }

    /// The first chunk whose latents and keys are still held.
    pub fn first_held(&self) -> usize {
        self.base
    }

    /// Replaces the prompt (a walk with [`WalkCaptions::Prompt`]): from the next forward,
    /// every chunk not finished yet follows it.
    pub fn set_prompt(&mut self, text: Tensor, mask: Tensor) -> candle_core::Result<()> {
        match &mut self.captions {
            WalkCaptions::Prompt(p) => {
                p.text = text;
                p.mask = mask;
                Ok(())
            }
            WalkCaptions::PerChunk(_) => {
                candle_core::bail!("this walk's captions are given per chunk")
            }
        }
    }

    /// The captions of chunks `cs..ce`: `(text, text mask, null, null mask)`.
    fn caption_rows(
        &self,
        cs: usize,
        ce: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
        match &self.captions {
            WalkCaptions::PerChunk(c) => Ok((
                c.text.narrow(0, cs, ce - cs)?,
                c.text_mask.narrow(0, cs, ce - cs)?,
                c.null.narrow(0, cs, ce - cs)?,
                c.null_mask.narrow(0, cs, ce - cs)?,
            )),
            WalkCaptions::Prompt(p) => {
                let (mut text, mut masks) = (Vec::new(), Vec::new());
                for c in cs..ce {
                    // Chunks left, this one included (at least 8 in an endless walk).
                    let left = self.chunks.map_or(8, |n| n - c);
                    let (e, m) = pad_special_tokens_chunk(&p.text, &p.mask, &p.specials, left)?;
                    text.push(e);
                    masks.push(m);
                }
                let n = ce - cs;
                let null = p.null.unsqueeze(0)?.repeat((n, 1, 1))?;
                let null_mask = p.null_mask.unsqueeze(0)?.repeat((n, 1))?;
                Ok((
                    Tensor::stack(&text, 0)?,
                    Tensor::stack(&masks, 0)?,
                    null,
                    null_mask,
                ))
            }
        }
    }

    /// Forgets chunks before `first` (latents, keys, step counts).
    fn drop_before(&mut self, first: usize) -> candle_core::Result<()> {
        if first <= self.base {
            return Ok(());
        }
        let n = first - self.base;
        let cw = self.cfg.runtime_config.chunk_width;
        if let Some(x) = &self.x {
            let held = x.dim(2)? / cw;
            self.x = (held > n)
                .then(|| x.narrow(2, n * cw, (held - n) * cw))
                .transpose()?;
        }
        self.cache.drop_front(n * self.chunk_tokens)?;
        self.counts.drain(..n.min(self.counts.len()));
        self.base = first;
        Ok(())
    }

    /// Makes sure chunks up to `end` (exclusive) are held, drawing their noise.
    fn grow_to(&mut self, end: usize) -> candle_core::Result<()> {
        let cw = self.cfg.runtime_config.chunk_width;
        let (c, h, w) = self.latent;
        let dev = self.dit.device().clone();
        loop {
            let held = match &self.x {
                Some(x) => x.dim(2)? / cw,
                None => 0,
            };
            let next = self.base + held;
            if next >= end {
                return Ok(());
            }
            let chunk = match &mut self.noise {
                WalkNoise::Explicit(all) => all.narrow(2, next * cw, cw)?,
                WalkNoise::Seeded(rng) => rng.randn((1, c, cw, h, w), &dev)?,
            };
            let chunk = chunk.to_dtype(DType::F32)?.to_device(&dev)?;
            self.x = Some(match &self.x {
                Some(x) => Tensor::cat(&[x, &chunk], 2)?,
                None => chunk,
            });
            self.counts.push(0);
        }
    }

    /// One forward and its Euler step; `None` once a finite walk is over.
    pub fn step(&mut self) -> candle_core::Result<Option<WalkStep>> {
        self.step_cancellable(None)
    }

    /// [`MagiWalk::step`] checking `cancel` before every DiT layer: once it is set the
    /// step fails with [`super::dit::CANCELLED`] and the walk must be dropped.
    pub fn step_cancellable(
        &mut self,
        cancel: Option<&AtomicBool>,
    ) -> candle_core::Result<Option<WalkStep>> {
        if self.total_steps().is_some_and(|t| self.step >= t) {
            return Ok(None);
        }
        let rc = &self.cfg.runtime_config;
        let (cw, num_steps, clean_t) = (rc.chunk_width, rc.num_steps, rc.clean_t);
        let window = rc.window_size.max(1);
        let per_stage = num_steps / window;
        let (k_stage, idx) = (self.step / per_stage, self.step % per_stage);
        let st = stage(k_stage, self.chunks.unwrap_or(usize::MAX), window, 0);
        let (cs, ce) = (st.chunk_start, st.chunk_end);
        let reference = self
            .cache_state
            .as_ref()
            .is_some_and(|c| c.settings.reference);
        let clean = cs > 0 && idx == 0 && !reference;
        // The window's chunks (the finished one first when it is re-forwarded).
        let first = if clean { cs - 1 } else { cs };
        if let Some(r) = self.reach {
            self.drop_before((first + 1).saturating_sub(r))?;
        }
        self.grow_to(ce)?;
        let base = self.base;
        let Some(all) = self.x.clone() else {
            candle_core::bail!("no chunk held at step {}", self.step)
        };
        let x_chunk = all.narrow(2, (first - base) * cw, (ce - first) * cw)?;

        let mut t: Vec<f64> = Vec::new();
        let mut denoise_steps: Vec<usize> = Vec::new();
        if clean {
            t.push(clean_t as f32 as f64);
            denoise_steps.push(num_steps);
        }
        for i in (st.t_start..st.t_end).rev() {
            let k = i * per_stage + idx;
            denoise_steps.push(k);
            t.push(self.ts[k] as f64);
        }
        // Captions: the null caption (its first chunk's) for the clean chunk.
        let (mut text, mut text_mask, mut null, mut null_mask) = self.caption_rows(cs, ce)?;
        if clean {
            let (_, _, c0, m0) = self.caption_rows(0, 1)?;
            text = Tensor::cat(&[&c0, &text], 0)?;
            text_mask = Tensor::cat(&[&m0, &text_mask], 0)?;
            null = Tensor::cat(&[&c0, &null], 0)?;
            null_mask = Tensor::cat(&[&m0, &null_mask], 0)?;
        }
        let slice_point = first - base;
        let mut kv_range = self.kv_ranges(slice_point, &denoise_steps);
        let near = !reference
            && t[usize::from(clean)] > self.cfg.engine_config.distill_nearly_clean_chunk_threshold;
        let plans = self.plan_chunks(cs, ce, &all)?;
        let mut forward_plans = Vec::new();
        if clean {
            forward_plans.push(Plan::Full);
        }
        forward_plans.extend(plans.iter().cloned());
        if reference {
            // the reference's sparse forward of a chunk that is not the oldest in the window
            // attends with the oldest chunk's key range
            for j in 1..plans.len() {
                if matches!(plans[j], Plan::Tokens(_)) {
                    kv_range[j] = kv_range[0];
                }
            }
        }
        let fwd = Fwd {
            x: &x_chunk,
            t: &t,
            kv_range: &kv_range,
            slice_point,
            chunk_offset: base,
            clean,
            near,
            num_steps,
            interval: self.intervals[idx],
            cancel,
            first: cs,
            tokens: self
                .cache_state
                .is_some()
                .then_some(forward_plans.as_slice()),
        };
        let v = if !clean && plans.iter().all(|p| *p == Plan::Skip) {
            // every chunk reuses its last delta: no forward at all
            x_chunk.zeros_like()?
        } else if self.cfg.runtime_config.cfg_number == 3 {
            self.three_pass(&fwd, (&text, &text_mask), (&null, &null_mask))?
        } else {
            self.one_pass(&fwd, &text, &text_mask)?
        };

        // Euler on the denoised chunks.
        let skip = usize::from(clean) * cw;
        let frames = (ce - cs) * cw;
        let v = v.narrow(2, skip, frames)?;
        let x = x_chunk.narrow(2, skip, frames)?;
        let mut parts = Vec::with_capacity(ce - cs);
        for (j, i) in (st.t_start..st.t_end).rev().enumerate() {
            let k = i * per_stage + idx;
            let dt = (self.ts[k + 1] - self.ts[k]) as f64;
            let xj = x.narrow(2, j * cw, cw)?;
            let fresh = (v.narrow(2, j * cw, cw)? * dt)?;
            let c = cs + j;
            // What a reused token adds: the reference its last delta `v dt_old`, ours its
            // last velocity times this step's `dt` (the schedule's steps grow with `t^2`: an
            // old delta under-steps and keeps the change metric flat).
            let delta = match (&plans[j], self.cache_state.as_ref()) {
                (Plan::Full, _) | (_, None) => fresh,
                (plan, Some(cache)) => {
                    let Some((last, last_dt)) = cache.last_delta.get(&c) else {
                        candle_core::bail!("chunk {c} reuses a step it never computed")
                    };
                    let reused = if reference {
                        last.clone()
                    } else {
                        (last * (dt / last_dt))?
                    };
                    match plan {
                        Plan::Tokens(tokens) => {
                            let mask = self.token_mask(tokens)?.broadcast_as(reused.shape())?;
                            mask.where_cond(&fresh, &reused)?
                        }
                        _ => reused,
                    }
                }
            };
            if let Some(cache) = self.cache_state.as_mut() {
                cache.last_delta.insert(c, (delta.clone(), dt));
            }
            parts.push((xj + delta)?);
        }
        let x_new = Tensor::cat(&parts, 2)?;
        let all = all.slice_assign(
            &[
                0..1,
                0..all.dim(1)?,
                (cs - base) * cw..(ce - base) * cw,
                0..all.dim(3)?,
                0..all.dim(4)?,
            ],
            &x_new,
        )?;
        for c in cs..ce {
            self.counts[c - base] += 1;
        }
        self.update_weights(cs, ce, &all)?;
        let finished = if self.counts[cs - base] == num_steps {
            Some((cs, all.narrow(2, (cs - base) * cw, cw)?))
        } else {
            None
        };
        self.x = Some(all);
        self.step += 1;
        if let (Some((c, _)), Some(cache)) = (&finished, self.cache_state.as_mut()) {
            cache.states.remove(c);
            cache.last_delta.remove(c);
        }
        Ok(Some(WalkStep {
            velocity: v,
            denoised: (cs, ce),
            finished,
            plans,
        }))
    }

    /// What the cache has each chunk of `cs..ce` compute at this step (all `Full`
    /// without it). `all`: the held latents before the step.
    fn plan_chunks(
        &mut self,
        cs: usize,
        ce: usize,
        all: &Tensor,
    ) -> candle_core::Result<Vec<Plan>> {
        let total = self.total_steps();
        let (step, base, ct) = (self.step, self.base, self.chunk_tokens);
        let cw = self.cfg.runtime_config.chunk_width;
        let Some(cache) = self.cache_state.as_mut() else {
            return Ok(vec![Plan::Full; ce - cs]);
        };
        // no decision at the walk's first and last steps (the reference's)
        let decide = step > 0 && total.is_none_or(|t| step + 1 < t);
        let tokens_per_frame = ct / cw;
        let mut metrics = HashMap::new();
        let mut plans = Vec::with_capacity(ce - cs);
        for c in cs..ce {
            let m = self
                .dit
                .embed_patches(&all.narrow(2, (c - base) * cw, cw)?)?;
            let r = match cache.prev_metric.get(&c) {
                Some(prev) if decide => Some(metric_change(&m, prev)?),
                _ => None,
            };
            metrics.insert(c, m);
            let weights: Vec<f32> = (c * cw..(c + 1) * cw)
                .flat_map(|f| match cache.weights.get(&f) {
                    Some(w) => w.clone(),
                    None => vec![1.0; tokens_per_frame],
                })
                .collect();
            let state = cache
                .states
                .entry(c)
                .or_insert_with(|| MagiChunkCache::new(ct));
            let count = self.counts[c - base];
            plans.push(state.decide(&cache.settings.params, count, r, &weights));
        }
        cache.prev_metric = metrics;
        Ok(plans)
    }

    /// After a step: the motion weights of the frames of chunks `cs..ce` from the held
    /// latents `all` (a frame whose predecessor is no longer held keeps its weights).
    fn update_weights(&mut self, cs: usize, ce: usize, all: &Tensor) -> candle_core::Result<()> {
        let cw = self.cfg.runtime_config.chunk_width;
        let first = self.base * cw;
        let p = self.dit.config().patch_size;
        let Some(cache) = self.cache_state.as_mut() else {
            return Ok(());
        };
        let params = &cache.settings.params;
        for f in (cs * cw..ce * cw).filter(|&f| f > first) {
            let frame = |g: usize| all.narrow(2, g - first, 1)?.squeeze(2)?.squeeze(0);
            let w = frame_weights(
                &frame(f)?,
                &frame(f - 1)?,
                p,
                params.weight_floor,
                params.weight_power,
            )?;
            cache.weights.insert(f, w);
        }
        cache.weights.retain(|&f, _| f >= first);
        Ok(())
    }

    /// `[1, 1, chunk_width, H, W]` true where a token of `tokens` (chunk-local, frame-major)
    /// lies.
    fn token_mask(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let cw = self.cfg.runtime_config.chunk_width;
        let (_, h, w) = self.latent;
        let p = self.dit.config().patch_size;
        let (gh, gw) = (h / p, w / p);
        let mut m = vec![0u8; cw * h * w];
        for &k in tokens {
            let k = k as usize;
            let (f, y, x) = (k / (gh * gw), (k / gw) % gh, k % gw);
            for dy in 0..p {
                let row = f * h * w + (y * p + dy) * w + x * p;
                m[row..row + p].fill(1);
            }
        }
        Tensor::from_vec(m, (1, 1, cw, h, w), self.dit.device())
    }

    /// Key ranges (`generate_kvrange_for_denoising_video`): each chunk sees itself and the
    /// chunks before it up to its stage's range (`clean_chunk_kvrange` for a clean chunk),
    /// all of them without `noise2clean_kvrange`.
    fn kv_ranges(&self, slice_point: usize, denoise_steps: &[usize]) -> Vec<(usize, usize)> {
        let rc = &self.cfg.runtime_config;
        let n2c = &rc.noise2clean_kvrange;
        let ct = self.chunk_tokens;
        denoise_steps
            .iter()
            .enumerate()
            .map(|(j, &k)| {
                let end = slice_point + j + 1;
                let range = if n2c.is_empty() {
                    end
                } else if k == rc.num_steps {
                    if rc.clean_chunk_kvrange < 0 {
                        n2c[n2c.len() - 1]
                    } else {
                        rc.clean_chunk_kvrange as usize
                    }
                } else {
                    n2c[k / (rc.num_steps / n2c.len())]
                };
                (end.saturating_sub(range) * ct, end * ct)
            })
            .collect()
    }

    /// One DiT forward of `f`; `cache`: `None` without the cache, else whether it writes
    /// and how many trailing chunks it leaves out.
    fn forward(
        &mut self,
        f: &Fwd,
        caps: (&Tensor, &Tensor),
        null_condition: bool,
        cache: Option<(bool, usize)>,
    ) -> candle_core::Result<Tensor> {
        let inp = MagiInput {
            x: f.x,
            t: f.t,
            captions: caps.0,
            caption_mask: caps.1,
            null_condition,
            kv_range: f.kv_range,
            slice_point: f.slice_point,
            chunk_offset: f.chunk_offset,
            num_steps: f.num_steps,
            distill_interval: Some(f.interval),
            cancel: f.cancel,
            tokens: f.tokens,
        };
        let cache = cache.map(|(update, skip)| CacheUse {
            cache: &mut self.cache,
            // Always written, although upstream's first stage reads nothing from it: a
            // cache turned on mid-walk then finds every chunk's keys and values.
            active: true,
            update,
            skip_last_chunks: skip,
        });
        self.dit.forward(&inp, cache)
    }

    /// The distill model's single pass with the caption, with the nearly-clean copy of
    /// the oldest noisy chunk while its `t` is above the threshold.
    fn one_pass(&mut self, f: &Fwd, text: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        // A reused oldest chunk takes nothing from the copy.
        let s = usize::from(f.clean);
        let oldest = f.tokens.and_then(|p| p.get(s));
        let copy_unused = oldest == Some(&Plan::Skip);
        if !f.near || copy_unused {
            return self.forward(f, (text, mask), false, Some((true, 0)));
        }
        let cw = self.cfg.runtime_config.chunk_width;
        let frames = f.x.dim(2)?;
        // A chunk recomputed in part mixes with the copy's last output (the copy is a
        // whole chunk's forward; its input is the chunk's, whose change is small enough
        // for most of its tokens to be reused).
        let stored = match (oldest, self.cache_state.as_ref()) {
            (Some(Plan::Tokens(_)), Some(c)) => c
                .near_alone
                .as_ref()
                .filter(|(chunk, _)| *chunk == f.first)
                .map(|(_, t)| t.clone()),
            _ => None,
        };
        if let Some(alone) = stored {
            let out = self.forward(f, (text, mask), false, Some((true, 0)))?;
            return Self::mix_oldest(&out, &alone, s, cw);
        }
        let copy = f.x.narrow(2, s * cw, cw)?;
        let x = Tensor::cat(&[f.x, &copy], 2)?;
        let max = f.kv_range.iter().map(|r| r.0.max(r.1)).max().unwrap_or(0);
        let mut kv = f.kv_range.to_vec();
        kv.push((max, max + self.chunk_tokens));
        let mut t = f.t.to_vec();
        t.push(f.t[s]);
        let text = Tensor::cat(&[text, &text.narrow(0, s, 1)?], 0)?;
        let mask = Tensor::cat(&[mask, &mask.narrow(0, s, 1)?], 0)?;
        let tokens = f.tokens.map(|p| {
            let mut p = p.to_vec();
            p.push(Plan::Full);
            p
        });
        let with_copy = Fwd {
            x: &x,
            t: &t,
            kv_range: &kv,
            tokens: tokens.as_deref(),
            ..*f
        };
        let out = self.forward(&with_copy, (&text, &mask), false, Some((true, 1)))?;
        let alone = out.narrow(2, frames, cw)?;
        if let Some(c) = self.cache_state.as_mut() {
            c.near_alone = Some((f.first, alone.clone()));
        }
        Self::mix_oldest(&out.narrow(2, 0, frames)?, &alone, s, cw)
    }

    /// `out` with its chunk `s` mixed as `0.7 out + 0.3 alone` (upstream's nearly-clean
    /// mix).
    fn mix_oldest(
        out: &Tensor,
        alone: &Tensor,
        s: usize,
        cw: usize,
    ) -> candle_core::Result<Tensor> {
        let frames = out.dim(2)?;
        let ctx = out.narrow(2, s * cw, cw)?;
        let mixed = ((ctx * PREV_CHUNKS_SCALE)? + (alone * (1.0 - PREV_CHUNKS_SCALE))?)?;
        let mut parts = Vec::new();
        if s > 0 {
            parts.push(out.narrow(2, 0, s * cw)?);
        }
        parts.push(mixed);
        let rest = frames - (s + 1) * cw;
        if rest > 0 {
            parts.push(out.narrow(2, (s + 1) * cw, rest)?);
        }
        Tensor::cat(&parts, 2)
    }

    /// The base model's three passes: (a) context + text, (b) context + null text (this
    /// one writes the cache), (c) every denoised chunk alone with the null text; combined
    /// per chunk as `(1 - p) c + (p - s) b + s a` with `(p, s)` from the chunk's `t` bin.
    fn three_pass(
        &mut self,
        f: &Fwd,
        text: (&Tensor, &Tensor),
        null: (&Tensor, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let skip = usize::from(f.near);
        let a = self.forward(f, text, false, Some((false, skip)))?;
        let b = self.forward(f, null, true, Some((true, skip)))?;
        let rc = self.cfg.runtime_config.clone();
        let cw = rc.chunk_width;
        let s = usize::from(f.clean);
        let n = f.t.len() - s;
        let mut parts = Vec::with_capacity(n + 1);
        if s > 0 {
            parts.push(f.x.narrow(2, 0, cw)?);
        }
        for j in s..s + n {
            let xj = f.x.narrow(2, j * cw, cw)?;
            let range = [(0, self.chunk_tokens)];
            let alone = Fwd {
                x: &xj,
                t: &f.t[j..j + 1],
                kv_range: &range,
                slice_point: 0,
                chunk_offset: 0,
                clean: false,
                tokens: None,
                ..*f
            };
            let c = self.forward(
                &alone,
                (&null.0.narrow(0, j, 1)?, &null.1.narrow(0, j, 1)?),
                true,
                None,
            )?;
            let (p, sc) = cfg_scales(&rc, f.t[j]);
            let g = ((c * (1.0 - p))?
                + (b.narrow(2, j * cw, cw)? * (p - sc))?
                + (a.narrow(2, j * cw, cw)? * sc)?)?;
            parts.push(g);
        }
        Tensor::cat(&parts, 2)
    }
}

/// Arguments shared by the passes of one step.
#[derive(Clone, Copy)]
struct Fwd<'b> {
    x: &'b Tensor,
    t: &'b [f64],
    kv_range: &'b [(usize, usize)],
    slice_point: usize,
    chunk_offset: usize,
    clean: bool,
    near: bool,
    num_steps: usize,
    interval: f64,
    cancel: Option<&'b AtomicBool>,
    /// Per chunk of `x`, the tokens the cache computes; `Some` also makes every forward
    /// write its keys/values (a reused token keeps its last ones).
    tokens: Option<&'b [Plan]>,
    /// The first denoised chunk (global index).
    first: usize,
}

/// `(prev_chunk_scale, text_scale)` of the bin of `cfg_t_range` (shifted down by 1e-7)
/// that `t` falls in (`get_cfg_scale`).
fn cfg_scales(rc: &super::config::MagiRuntimeConfig, t: f64) -> (f64, f64) {
    let bins = &rc.cfg_t_range;
    let i = bins
        .iter()
        .filter(|&&b| (b as f32 - 1e-7f32) < t as f32)
        .count()
        .saturating_sub(1)
        .min(rc.prev_chunk_scales.len().saturating_sub(1));
    (rc.prev_chunk_scales[i], rc.text_scales[i])
}
