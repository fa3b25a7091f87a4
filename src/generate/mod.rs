//! The streaming diffusion-forcing generator: owns the transformer and the cache policy,
//! yields every causal block's final latents as soon as the block is finished, and keeps
//! going window after window (overlap frames stay as conditioning, K/V of blocks that left
//! the window are dropped) for as long as asked.
//!
//! One *segment* is one run of the step matrix over a window of latent frames, as in
//! diffusers' long-video loop; the first `overlap` frames of every later segment are the
//! last frames of the one before.

mod noise;
mod settings;

pub use noise::NoiseRng;
pub use settings::GeneratorSettings;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::cache::{BlockPolicy, CacheMode, Plan, StepInfo, block_policy};
use crate::error::{Error, Result};
use crate::model::transformer::{BlockKv, Context, FrameModulation, TokenSet, Transformer};
use crate::schedule::{FlowSchedule, SchedulerConfig, StepMatrix, UniPcState};

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
    /// Transformer-layer FLOPs done for this block and what diffusers' full-window
    /// recompute would have done for it.
    pub flops: f64,
    pub vanilla_flops: f64,
    /// Wall time since the previous block was emitted.
    pub wall: Duration,
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

/// Per classifier-free-guidance branch state of a segment.
struct Branch {
    /// Concatenated K/V of the leading `committed` blocks (finished, computed once).
    finished: Option<BlockKv>,
    committed: usize,
    /// Latest K/V of every not-finished block.
    active: Vec<Option<BlockKv>>,
    /// `out - in` of the transformer stack per block, `[tokens, dim]`.
    residual: Vec<Option<Tensor>>,
    policy: Vec<Option<Box<dyn BlockPolicy>>>,
    steps_done: Vec<usize>,
    /// Output tokens of each block's last frame at its latest forward (motion reference
    /// for the next block's first frame).
    last_frame: Vec<Option<Tensor>>,
}

impl Branch {
    fn new(blocks: usize) -> Self {
        Self {
            finished: None,
            committed: 0,
            active: (0..blocks).map(|_| None).collect(),
            residual: vec![None; blocks],
            policy: (0..blocks).map(|_| None).collect(),
            steps_done: vec![0; blocks],
            last_frame: vec![None; blocks],
        }
    }
}

struct Segment {
    /// Latents per block `[C, bs, H, W]`.
    latents: Vec<Tensor>,
    solvers: Vec<UniPcState>,
    matrix: StepMatrix,
    schedule: FlowSchedule,
    it: usize,
    prefix_blocks: usize,
    /// Global index of block 0 of the segment (prefix blocks included).
    first_global: usize,
    tokens: Vec<TokenSet>,
    branches: [Branch; 2],
    stats: Vec<BlockStats>,
    emitted: Vec<bool>,
    settings: GeneratorSettings,
    /// Post-patch grid `(frames per block, h, w)`.
    grid: (usize, usize, usize),
}

/// The streaming generator. Not `Clone`; one per video stream.
pub struct Generator {
    model: Arc<Transformer>,
    scheduler: SchedulerConfig,
    settings: GeneratorSettings,
    contexts: [Context; 2],
    has_negative: bool,
    text_len: usize,
    latent: (usize, usize, usize),
    noise: NoiseSource,
    rng: NoiseRng,
    seg: Option<Segment>,
    history: Option<Tensor>,
    produced_frames: usize,
    next_global_block: usize,
    ready: VecDeque<FinishedBlock>,
    last_emit: Instant,
    poisoned: bool,
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
        let c = model.context(cond)?;
        let n = match negative {
            Some(n) => model.context(n)?,
            None => model.context(&cond.zeros_like()?)?,
        };
        let seed = match &noise {
            NoiseSource::Seed(s) => *s,
            NoiseSource::Explicit { seed, .. } => *seed,
        };
        Ok(Self {
            model,
            scheduler,
            settings,
            contexts: [c, n],
            has_negative: negative.is_some(),
            text_len,
            latent,
            noise,
            rng: NoiseRng::new(seed.wrapping_add(0x5eed)),
            seg: None,
            history: None,
            produced_frames: 0,
            next_global_block: 0,
            ready: VecDeque::new(),
            last_emit: Instant::now(),
            poisoned: false,
        })
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
        let c = self.model.context(cond)?;
        let n = match negative {
            Some(n) => self.model.context(n)?,
            None => self.model.context(&cond.zeros_like()?)?,
        };
        self.contexts = [c, n];
        self.has_negative = negative.is_some();
        Ok(())
    }

    /// Latent frames emitted so far.
    pub fn produced_frames(&self) -> usize {
        self.produced_frames
    }

    /// Runs until the next causal block is finished and returns it; `None` when
    /// `total_frames` were produced. `cancel` is checked before every transformer pass;
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
                match self.start_segment() {
                    Ok(s) => self.seg = Some(s),
                    Err(e) => {
                        self.poisoned = true;
                        return Err(e);
                    }
                }
            }
            if let Err(e) = self.iterate(cancel) {
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
        let dev = self.model.device().clone();
        let noise = match &mut self.noise {
            NoiseSource::Seed(_) => self.rng_initial(c, frames, h, w)?,
            NoiseSource::Explicit { segments, .. } => {
                let n = segments.pop_front().ok_or_else(|| {
                    Error::setting("noise", "explicit", "ran out of explicit initial noise")
                })?;
                if n.dims() != [c, frames, h, w] {
                    return Err(Error::setting(
                        "noise",
                        format!("{:?}", n.dims()),
                        format!("expected [{c}, {frames}, {h}, {w}]"),
                    ));
                }
                n.to_device(&dev)?.to_dtype(DType::F32)?
            }
        };
        let mut latents = Vec::with_capacity(blocks);
        for b in 0..blocks {
            latents.push(noise.narrow(1, b * bs, bs)?.contiguous()?);
        }
        if let Some(hist) = history {
            for (b, l) in latents.iter_mut().enumerate().take(prefix / bs) {
                *l = hist.narrow(1, b * bs, bs)?.contiguous()?;
            }
        }
        let schedule = FlowSchedule::new(&self.scheduler, s.steps, s.shift)?;
        let matrix = StepMatrix::new(blocks, s.steps, blocks, s.ar_step, prefix / bs)?;
        let (gf, gh, gw) = self.model.grid(bs, h, w)?;
        let tokens = (0..blocks)
            .map(|b| self.model.all_tokens(b * gf, gf, gh, gw))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let first_global = self.next_global_block.saturating_sub(prefix / bs);
        let stats = (0..blocks)
            .map(|b| BlockStats {
                index: first_global + b,
                frames: bs,
                ..Default::default()
            })
            .collect();
        let mut emitted = vec![false; blocks];
        for e in emitted.iter_mut().take(prefix / bs) {
            *e = true;
        }
        Ok(Segment {
            latents,
            solvers: vec![UniPcState::diffusion_forcing(); blocks],
            matrix,
            schedule,
            it: 0,
            prefix_blocks: prefix / bs,
            first_global,
            tokens,
            branches: [Branch::new(blocks), Branch::new(blocks)],
            stats,
            emitted,
            settings: s,
            grid: (gf, gh, gw),
        })
    }

    fn rng_initial(&mut self, c: usize, f: usize, h: usize, w: usize) -> Result<Tensor> {
        let dev = self.model.device().clone();
        let seed_rng = match &mut self.noise {
            NoiseSource::Seed(seed) => {
                // One stream per segment so that a window's noise does not depend on how
                // many addnoise draws came before it.
                let r = NoiseRng::new(*seed);
                *seed = seed.wrapping_add(0x9E37_79B9);
                r
            }
            NoiseSource::Explicit { .. } => unreachable!("only called for seeded noise"),
        };
        let mut r = seed_rng;
        Ok(r.randn((c, f, h, w), &dev)?)
    }

    /// One row of the step matrix: every needed transformer pass, guidance, solver steps.
    fn iterate(&mut self, cancel: &AtomicBool) -> Result<()> {
        let Some(mut seg) = self.seg.take() else {
            return Ok(());
        };
        let res = self.iterate_segment(&mut seg, cancel);
        match res {
            Ok(done) => {
                if !done {
                    self.seg = Some(seg);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Returns true when the segment is complete.
    fn iterate_segment(&mut self, seg: &mut Segment, cancel: &AtomicBool) -> Result<bool> {
        let it = seg.it;
        let blocks = seg.latents.len();
        let row = seg.matrix.index[it].clone();
        let upd = seg.matrix.update[it].clone();
        let (v0, v1) = seg.matrix.valid[it];
        let steps = seg.matrix.steps;
        let timesteps = seg.schedule.timesteps.clone();
        let live = &self.settings;
        let cfg_on = live.guidance_scale > 1.0;
        let nbranch = if cfg_on { 2 } else { 1 };
        let mode = live.cache.mode;
        let causal = seg.settings.causal_block_size > 1;
        let (gf, gh, gw) = seg.grid;
        let block_tokens = gf * gh * gw;
        let window_tokens = (v1 - v0) * block_tokens;

        // Vanilla accounting: diffusers runs the whole window, every branch, dense
        // attention over all of it.
        for b in v0..v1 {
            let f = nbranch as f64
                * self
                    .model
                    .layer_flops(block_tokens, window_tokens, self.text_len);
            let tgt = attribution(seg, b);
            seg.stats[tgt].vanilla_flops += f;
        }

        let mut preds: Vec<Vec<Option<Tensor>>> = vec![vec![None; blocks]; nbranch];
        if mode == CacheMode::Vanilla || !causal {
            // The whole window in one forward per branch, as diffusers does, with fresh K/V
            // and the prefix re-noised every pass: block-causal attention groups, or one
            // group when causal_block_size is 1 (diffusers then attends bidirectionally).
            let cond_noise = self.prefix_noise(seg, v0, v1)?;
            let mut xs = Vec::new();
            let mut ts = Vec::new();
            for b in v0..v1 {
                let (x, t) = model_input(
                    seg,
                    b,
                    &row,
                    &timesteps,
                    &cond_noise,
                    self.settings.addnoise_condition,
                )?;
                xs.push(x);
                ts.extend(t);
            }
            let x = Tensor::cat(&xs, 1)?;
            let mut toks = self.model.all_tokens(v0 * gf, (v1 - v0) * gf, gh, gw)?;
            if causal {
                toks.groups = Some(vec![block_tokens; v1 - v0]);
            }
            let grid = ((v1 - v0) * gf, gh, gw);
            let modulation = self
                .model
                .modulation(&ts_grid(&ts, grid.0), self.settings.fps_class)?;
            for (br, pred_row) in preds.iter_mut().enumerate() {
                check(cancel)?;
                let mut kv = None;
                let (pred, _, _) = forward_block(
                    &self.model,
                    &self.contexts[br],
                    &x,
                    &modulation,
                    &toks,
                    None,
                    &mut kv,
                    None,
                    grid,
                )?;
                for b in v0..v1 {
                    let keys = if causal {
                        (b - v0 + 1) * block_tokens
                    } else {
                        window_tokens
                    };
                    let tgt = attribution(seg, b);
                    seg.stats[tgt].flops +=
                        self.model.layer_flops(block_tokens, keys, self.text_len);
                    if upd[b] {
                        seg.stats[b].full_forwards += 1;
                        seg.stats[b].tokens_recomputed += block_tokens;
                        seg.stats[b].tokens_total += block_tokens;
                    }
                    pred_row[b] = Some(pred.narrow(
                        1,
                        (b - v0) * seg.settings.causal_block_size,
                        seg.settings.causal_block_size,
                    )?);
                }
            }
        } else {
            if mode == CacheMode::TeaCache {
                // Per-block TeaCache as in the reference: no reuse of finished blocks, their
                // K/V are recomputed every row.
                for br in seg.branches.iter_mut() {
                    br.finished = None;
                    br.committed = 0;
                }
            }
            for (br, pred_row) in preds.iter_mut().enumerate() {
                for b in v0..v1 {
                    if !upd[b] {
                        continue;
                    }
                    // Finished blocks before this one: K/V computed once, at t = 0 (or the
                    // addnoise level for history frames).
                    while seg.branches[br].committed < b
                        && seg.matrix.is_finished(row[seg.branches[br].committed])
                    {
                        check(cancel)?;
                        self.commit(seg, br, seg.branches[br].committed, &row, &timesteps)?;
                    }
                    check(cancel)?;
                    let mut prefix_refs: Vec<&BlockKv> = Vec::new();
                    let branch = &seg.branches[br];
                    if let Some(f) = &branch.finished {
                        prefix_refs.push(f);
                    }
                    for a in branch.committed..b {
                        match &branch.active[a] {
                            Some(kv) => prefix_refs.push(kv),
                            None => {
                                return Err(Error::Candle(candle_core::Error::Msg(format!(
                                    "block {a} has no keys/values before block {b}"
                                ))));
                            }
                        }
                    }
                    let prefix = BlockKv::concat(&prefix_refs)?;
                    let keys = prefix.as_ref().map(|p| p.tokens()).unwrap_or(0) + block_tokens;
                    let x = seg.latents[b].clone();
                    let ts = vec![
                        seg.matrix.timestep(row[b], &timesteps) as f64;
                        seg.settings.causal_block_size
                    ];
                    let branch = &mut seg.branches[br];
                    if branch.policy[b].is_none() {
                        branch.policy[b] = Some(block_policy(mode));
                    }
                    let modulation = self
                        .model
                        .modulation(&ts_grid(&ts, gf), self.settings.fps_class)?;
                    let info = StepInfo {
                        step: branch.steps_done[b],
                        steps,
                        modulation: &modulation.proj,
                        frames: gf,
                        tokens_per_frame: gh * gw,
                        has_residual: branch.residual[b].is_some(),
                        prev_last_frame: if b > 0 {
                            branch.last_frame[b - 1].as_ref()
                        } else {
                            None
                        },
                    };
                    let cache = &self.settings.cache;
                    let mut plan = match branch.policy[b].as_mut() {
                        Some(p) => p.plan(cache, &info)?,
                        None => Plan::Full,
                    };
                    if plan != Plan::Full
                        && (branch.residual[b].is_none() || branch.active[b].is_none())
                    {
                        plan = Plan::Full;
                    }
                    let (pred, x_in, x_out) = forward_block(
                        &self.model,
                        &self.contexts[br],
                        &x,
                        &modulation,
                        &seg.tokens[b],
                        prefix.as_ref(),
                        &mut branch.active[b],
                        Some((&plan, &mut branch.residual[b])),
                        seg.grid,
                    )?;
                    if let Some(p) = branch.policy[b].as_mut() {
                        p.observe(cache, &info, &plan, &x_in, &x_out)?;
                    }
                    let tpf = gh * gw;
                    branch.last_frame[b] = Some(x_out.narrow(0, (gf - 1) * tpf, tpf)?);
                    branch.steps_done[b] += 1;
                    let n = match &plan {
                        Plan::Full => block_tokens,
                        Plan::Skip => 0,
                        Plan::Tokens(t) => t.len(),
                    };
                    let st = &mut seg.stats[b];
                    match &plan {
                        Plan::Full => st.full_forwards += 1,
                        Plan::Skip => st.skipped_forwards += 1,
                        Plan::Tokens(_) => st.partial_forwards += 1,
                    }
                    st.tokens_recomputed += n;
                    st.tokens_total += block_tokens;
                    st.flops += self.model.layer_flops(n, keys, self.text_len);
                    pred_row[b] = Some(pred);
                }
            }
        }

        // Guidance and solver steps for the blocks this row updates.
        let g = self.settings.guidance_scale;
        for b in v0..v1 {
            if !upd[b] {
                continue;
            }
            let cond = preds[0][b].take().ok_or_else(|| missing(b))?;
            let pred = if cfg_on {
                let unc = preds[1][b].take().ok_or_else(|| missing(b))?;
                (&unc + ((cond - &unc)? * g)?)?
            } else {
                cond
            };
            let t = seg.matrix.timestep(row[b], &timesteps);
            seg.latents[b] = seg.solvers[b].step(&seg.schedule, &pred, t, &seg.latents[b])?;
            seg.stats[b].steps += 1;
        }
        // Blocks that took their last step are finished: emit them in order.
        for b in 0..blocks {
            if upd[b] && row[b] == steps {
                for br in seg.branches.iter_mut() {
                    br.policy[b] = None;
                    br.residual[b] = None;
                }
            }
        }
        for b in 0..blocks {
            if seg.emitted[b] {
                continue;
            }
            let finished = (upd[b] && row[b] == steps) || seg.matrix.is_finished(row[b]);
            if !finished {
                break;
            }
            seg.emitted[b] = true;
            let mut stats = seg.stats[b].clone();
            stats.wall = self.last_emit.elapsed();
            self.last_emit = Instant::now();
            self.ready.push_back(FinishedBlock {
                latents: seg.latents[b].clone(),
                stats,
            });
            self.produced_frames += seg.settings.causal_block_size;
            self.next_global_block = seg.first_global + b + 1;
        }
        seg.it += 1;
        if seg.it < seg.matrix.iterations() {
            return Ok(false);
        }
        // Segment done: carry the history into the next one.
        let ov = seg.settings.overlap;
        if ov > 0 {
            let bs = seg.settings.causal_block_size;
            let nb = ov / bs;
            let parts: Vec<&Tensor> = seg.latents[blocks - nb..].iter().collect();
            self.history = Some(Tensor::cat(&parts, 1)?);
            self.next_global_block = seg.first_global + blocks;
        }
        let _ = seg.prefix_blocks;
        Ok(true)
    }

    /// Noise for the history frames' `addnoise_condition` perturbation, `[C, frames, H, W]`
    /// per prefix block (fresh on every call, as the reference draws it every iteration).
    fn prefix_noise(&mut self, seg: &Segment, v0: usize, v1: usize) -> Result<Vec<Option<Tensor>>> {
        let mut out = vec![None; seg.latents.len()];
        if self.settings.addnoise_condition <= 0.0 {
            return Ok(out);
        }
        for (b, o) in out
            .iter_mut()
            .enumerate()
            .take(seg.prefix_blocks.min(v1))
            .skip(v0)
        {
            let l = &seg.latents[b];
            *o = Some(self.rng.randn(l.shape(), l.device())?);
        }
        Ok(out)
    }

    /// Computes finished block `b`'s K/V once and appends it to the branch's finished
    /// prefix.
    fn commit(
        &mut self,
        seg: &mut Segment,
        br: usize,
        b: usize,
        row: &[usize],
        timesteps: &[i64],
    ) -> Result<()> {
        let noise = self.prefix_noise(seg, b, b + 1)?;
        let (x, ts) = model_input(
            seg,
            b,
            row,
            timesteps,
            &noise,
            self.settings.addnoise_condition,
        )?;
        let branch = &mut seg.branches[br];
        let mut kv = None;
        let (gf, gh, gw) = seg.grid;
        let keys = branch.finished.as_ref().map(|f| f.tokens()).unwrap_or(0) + gf * gh * gw;
        forward_block(
            &self.model,
            &self.contexts[br],
            &x,
            &self
                .model
                .modulation(&ts_grid(&ts, gf), self.settings.fps_class)?,
            &seg.tokens[b],
            branch.finished.as_ref(),
            &mut kv,
            None,
            seg.grid,
        )?;
        let kv = kv.ok_or_else(|| missing(b))?;
        branch.finished = match branch.finished.take() {
            Some(f) => BlockKv::concat(&[&f, &kv])?,
            None => Some(kv),
        };
        branch.committed = b + 1;
        branch.active[b] = None;
        let flops = self.model.layer_flops(gf * gh * gw, keys, self.text_len);
        let tgt = attribution(seg, b);
        seg.stats[tgt].flops += flops;
        Ok(())
    }
}

/// Where the cost of work on block `b` is booked: on `b` itself until it is emitted, after
/// that (and for history blocks) on the earliest block not emitted yet.
fn attribution(seg: &Segment, b: usize) -> usize {
    if !seg.emitted[b] {
        return b;
    }
    seg.emitted.iter().position(|e| !e).unwrap_or(b)
}

fn missing(b: usize) -> Error {
    Error::Candle(candle_core::Error::Msg(format!(
        "no prediction for block {b}"
    )))
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Per-grid-frame timesteps from per-latent-frame timesteps (temporal patch size > 1 takes
/// every p-th).
fn ts_grid(ts: &[f64], grid_frames: usize) -> Vec<f64> {
    let step = (ts.len() / grid_frames.max(1)).max(1);
    ts.iter().step_by(step).copied().take(grid_frames).collect()
}

/// The model input of block `b` at this row: its latents (history frames perturbed by
/// `addnoise_condition`) and per-frame timesteps.
fn model_input(
    seg: &Segment,
    b: usize,
    row: &[usize],
    timesteps: &[i64],
    noise: &[Option<Tensor>],
    addnoise: f64,
) -> Result<(Tensor, Vec<f64>)> {
    let bs = seg.settings.causal_block_size;
    let mut t = seg.matrix.timestep(row[b], timesteps) as f64;
    let mut x = seg.latents[b].clone();
    if addnoise > 0.0 && b < seg.prefix_blocks {
        if let Some(n) = &noise[b] {
            let k = 0.001 * addnoise;
            x = ((x * (1.0 - k))? + (n * k)?)?;
        }
        t = addnoise;
    }
    Ok((x, vec![t; bs]))
}

/// Patch-embeds a block, runs the transformer layers per the plan, and applies the head.
/// Returns (prediction `[C, F, H, W]`, transformer input tokens, output tokens).
#[allow(clippy::too_many_arguments)]
fn forward_block(
    model: &Transformer,
    ctx: &Context,
    latents: &Tensor,
    m: &FrameModulation,
    toks: &TokenSet,
    prefix: Option<&BlockKv>,
    kv: &mut Option<BlockKv>,
    plan: Option<(&Plan, &mut Option<Tensor>)>,
    grid: (usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let x_in = model.patchify(latents)?;
    let x_out = match plan {
        None => model.forward_layers(&x_in, m, toks, kv, prefix, ctx)?,
        Some((Plan::Full, residual)) => {
            let out = model.forward_layers(&x_in, m, toks, kv, prefix, ctx)?;
            *residual = Some((&out - &x_in)?);
            out
        }
        Some((Plan::Skip, residual)) => match residual {
            Some(r) => (&x_in + &*r)?,
            None => return Err(missing(0)),
        },
        Some((Plan::Tokens(idx), residual)) => {
            let r = residual.as_ref().ok_or_else(|| missing(0))?;
            let sub = model.subset(toks, idx)?;
            let ix = sub.idx.clone().ok_or_else(|| missing(0))?;
            let xs = x_in.index_select(&ix, 0)?;
            let ys = model.forward_layers(&xs, m, &sub, kv, prefix, ctx)?;
            let (n, d) = ys.dims2()?;
            let ixb = ix.reshape((n, 1))?.broadcast_as((n, d))?.contiguous()?;
            let new_r = r.scatter(&ixb, &(&ys - &xs)?, 0)?;
            let out = (&x_in + &new_r)?;
            *residual = Some(new_r);
            out
        }
    };
    let pred = model.head(&x_out, &m.temb, grid)?;
    Ok((pred, x_in, x_out))
}
