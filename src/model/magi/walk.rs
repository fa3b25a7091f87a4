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

use candle_core::Tensor;

use super::config::MagiConfig;
use super::dit::{CacheUse, MagiDit, MagiInput, MagiKvCache};
use crate::schedule::magi::{Stage, intervals, stages, timesteps};

/// Per-chunk captions: the text caption of each chunk (special tokens included) and the
/// null caption, embeddings `[chunks, L, caption_channels]` with masks `[chunks, L]`.
pub struct MagiCaptions {
    pub text: Tensor,
    pub text_mask: Tensor,
    pub null: Tensor,
    pub null_mask: Tensor,
}

/// What one step of the walk produced.
pub struct WalkStep {
    /// The guided velocity of the chunks denoised at this step (the re-forwarded clean
    /// chunk excluded), `[1, C, frames, H, W]`.
    pub velocity: Tensor,
    /// A chunk that finished at this step: its index and clean latents `[1, C, width, H, W]`.
    pub finished: Option<(usize, Tensor)>,
}

/// A text-to-video walk over `chunks` chunks.
pub struct MagiWalk<'a> {
    dit: &'a MagiDit,
    cfg: MagiConfig,
    captions: MagiCaptions,
    /// `[1, C, chunks * chunk_width, H, W]` latents of every chunk.
    x: Tensor,
    ts: Vec<f32>,
    intervals: Vec<f64>,
    stages: Vec<Stage>,
    cache: MagiKvCache,
    counts: Vec<usize>,
    step: usize,
    total: usize,
    chunk_tokens: usize,
}

/// Upstream's `prev_chunks_scale` (env, default 0.7): weight of the nearly-clean chunk's
/// output with context against its copy without.
const PREV_CHUNKS_SCALE: f64 = 0.7;

impl<'a> MagiWalk<'a> {
    /// A walk from the initial noise `[1, C, chunks * chunk_width, H, W]`.
    pub fn new(
        dit: &'a MagiDit,
        cfg: &MagiConfig,
        noise: Tensor,
        captions: MagiCaptions,
    ) -> candle_core::Result<Self> {
        let rc = &cfg.runtime_config;
        let (_, _, frames, h, w) = noise.dims5()?;
        let cw = rc.chunk_width;
        if cw == 0 || frames % cw != 0 {
            candle_core::bail!("{frames} latent frames are not chunks of {cw}");
        }
        let chunks = frames / cw;
        let window = rc.window_size.max(1);
        if !rc.num_steps.is_multiple_of(window) {
            candle_core::bail!(
                "num_steps {} is not a multiple of window_size {window}",
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
        for (name, t) in [("text", &captions.text), ("null", &captions.null)] {
            if t.dim(0)? != chunks {
                candle_core::bail!("{} {name} captions for {chunks} chunks", t.dim(0)?);
            }
        }
        let p = dit.config().patch_size;
        let chunk_tokens = cw * (h / p) * (w / p);
        let per_stage = rc.num_steps / window;
        let mode = &cfg.engine_config.shortcut_mode;
        Ok(Self {
            dit,
            cfg: cfg.clone(),
            captions,
            cache: MagiKvCache::new(dit, frames * (h / p) * (w / p))?,
            x: noise,
            ts: timesteps(rc.num_steps, mode, 3.0),
            intervals: intervals(rc.num_steps, mode),
            stages: stages(chunks, window, 0),
            counts: vec![0; chunks],
            step: 0,
            total: per_stage * (chunks + window - 1),
            chunk_tokens,
        })
    }

    /// Forwards in the whole walk.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// The latents of every chunk as they stand.
    pub fn latents(&self) -> &Tensor {
        &self.x
    }

    /// One forward and its Euler step; `None` once the walk is over.
    pub fn step(&mut self) -> candle_core::Result<Option<WalkStep>> {
        if self.step >= self.total {
            return Ok(None);
        }
        let rc = self.cfg.runtime_config.clone();
        let cw = rc.chunk_width;
        let per_stage = rc.num_steps / rc.window_size.max(1);
        let (stage, idx) = (self.step / per_stage, self.step % per_stage);
        let st = self.stages[stage];
        let (cs, ce) = (st.chunk_start, st.chunk_end);
        let clean = cs > 0 && idx == 0;

        // The window's chunks (the finished one first when it is re-forwarded).
        let first = if clean { cs - 1 } else { cs };
        let x_chunk = self.x.narrow(2, first * cw, (ce - first) * cw)?;
        let mut t: Vec<f64> = Vec::new();
        let mut denoise_steps: Vec<usize> = Vec::new();
        if clean {
            t.push(rc.clean_t as f32 as f64);
            denoise_steps.push(rc.num_steps);
        }
        for i in (st.t_start..st.t_end).rev() {
            let k = i * per_stage + idx;
            denoise_steps.push(k);
            t.push(self.ts[k] as f64);
        }
        // Captions: the null caption (its first chunk's) for the clean chunk.
        let caps = &self.captions;
        let (mut text, mut text_mask) = (
            caps.text.narrow(0, cs, ce - cs)?,
            caps.text_mask.narrow(0, cs, ce - cs)?,
        );
        let (mut null, mut null_mask) = (
            caps.null.narrow(0, cs, ce - cs)?,
            caps.null_mask.narrow(0, cs, ce - cs)?,
        );
        if clean {
            let (c0, m0) = (caps.null.narrow(0, 0, 1)?, caps.null_mask.narrow(0, 0, 1)?);
            text = Tensor::cat(&[&c0, &text], 0)?;
            text_mask = Tensor::cat(&[&m0, &text_mask], 0)?;
            null = Tensor::cat(&[&c0, &null], 0)?;
            null_mask = Tensor::cat(&[&m0, &null_mask], 0)?;
        }
        let slice_point = first;
        let kv_range = self.kv_ranges(slice_point, &denoise_steps);
        let near =
            t[usize::from(clean)] > self.cfg.engine_config.distill_nearly_clean_chunk_threshold;
        let fwd = Fwd {
            x: &x_chunk,
            t: &t,
            kv_range: &kv_range,
            slice_point,
            clean,
            near,
            num_steps: rc.num_steps,
            interval: self.intervals[idx],
        };
        let v = if rc.cfg_number == 3 {
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
            parts.push((xj + (v.narrow(2, j * cw, cw)? * dt)?)?);
        }
        let x_new = Tensor::cat(&parts, 2)?;
        self.x = self.x.slice_assign(
            &[
                0..1,
                0..self.x.dim(1)?,
                cs * cw..ce * cw,
                0..self.x.dim(3)?,
                0..self.x.dim(4)?,
            ],
            &x_new,
        )?;
        for c in cs..ce {
            self.counts[c] += 1;
        }
        let finished = if self.counts[cs] == rc.num_steps {
            Some((cs, self.x.narrow(2, cs * cw, cw)?))
        } else {
            None
        };
        self.step += 1;
        Ok(Some(WalkStep {
            velocity: v,
            finished,
        }))
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
            num_steps: f.num_steps,
            distill_interval: Some(f.interval),
        };
        let cache = cache.map(|(update, skip)| CacheUse {
            cache: &mut self.cache,
            active: f.clean || f.slice_point > 0,
            update,
            skip_last_chunks: skip,
        });
        self.dit.forward(&inp, cache)
    }

    /// The distill model's single pass with the caption, with the nearly-clean copy of
    /// the oldest noisy chunk while its `t` is above the threshold.
    fn one_pass(&mut self, f: &Fwd, text: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        if !f.near {
            return self.forward(f, (text, mask), false, Some((true, 0)));
        }
        let cw = self.cfg.runtime_config.chunk_width;
        let s = usize::from(f.clean);
        let frames = f.x.dim(2)?;
        let copy = f.x.narrow(2, s * cw, cw)?;
        let x = Tensor::cat(&[f.x, &copy], 2)?;
        let max = f.kv_range.iter().map(|r| r.0.max(r.1)).max().unwrap_or(0);
        let mut kv = f.kv_range.to_vec();
        kv.push((max, max + self.chunk_tokens));
        let mut t = f.t.to_vec();
        t.push(f.t[s]);
        let text = Tensor::cat(&[text, &text.narrow(0, s, 1)?], 0)?;
        let mask = Tensor::cat(&[mask, &mask.narrow(0, s, 1)?], 0)?;
        let with_copy = Fwd {
            x: &x,
            t: &t,
            kv_range: &kv,
            ..*f
        };
        let out = self.forward(&with_copy, (&text, &mask), false, Some((true, 1)))?;
        let ctx = out.narrow(2, s * cw, cw)?;
        let alone = out.narrow(2, frames, cw)?;
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
                clean: false,
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
    clean: bool,
    near: bool,
    num_steps: usize,
    interval: f64,
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
