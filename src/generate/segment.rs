//! One window of the step matrix, row by row. A row is five steps:
//!
//! 1. [`Segment::plan`]: per guidance branch and block, what the transformer does: recompute
//!    a finished block's keys/values once (`Commit`), compute a block per its cache plan
//!    (`Compute`: all tokens or a subset; reused blocks need no work), or, in `vanilla`, the
//!    whole window as diffusers does (`Window`);
//! 2. [`Segment::forward`]: all of it as one batched transformer forward, both branches
//!    and every block together, against the window's preallocated key/value cache; with
//!    `kv_refresh`, the tokens a partial forward reuses rewrite their keys/values from
//!    their forecast hidden states in the same pass;
//! 3. [`Segment::outputs`]: every updated block's output tokens (computed tokens fresh,
//!    reused ones `input + residual`), residual caches updated;
//! 4. [`Segment::predict`]: the output head for all of them at once;
//! 5. [`Segment::step_blocks`]: guidance, the cache policies' observation (the predicted
//!    clean latent, the outputs), the solver step; then finished blocks are emitted in order.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicBool;

use candle_core::Tensor;

use crate::cache::{
    BlockPolicy, CacheMode, CacheSettings, DistanceMode, Observation, Plan, StepInfo, block_policy,
    rel_l1,
};
use crate::error::{Error, Result};
use crate::model::transformer::{
    BatchBuilder, BatchItem, Context, Forward, FrameModulation, KvCache, RefreshItem, TokenSet,
    Transformer,
};
use crate::schedule::{FlowSchedule, SchedulerConfig, StepMatrix, UniPcState};

use super::residual::{ResidualStore, is_host};
use super::{BlockStats, GeneratorSettings, NoiseRng, check};

/// What a row needs from the generator.
pub(super) struct Env<'a> {
    pub model: &'a Transformer,
    /// The live settings (guidance and cache apply from the next row).
    pub settings: &'a GeneratorSettings,
    /// The cond and uncond contexts stacked (see `Context::stack`).
    pub stacked: &'a Context,
    pub text_len: usize,
    pub rng: &'a mut NoiseRng,
    pub cancel: &'a AtomicBool,
    /// Calibration samples, when recorded (see `Generator::record_distances`).
    pub distances: Option<&'a mut Vec<(f64, f64)>>,
}

/// Per classifier-free-guidance branch state of a segment.
struct Branch {
    /// Cache policy of each block in progress, with the mode it was made for.
    policy: Vec<Option<(CacheMode, Box<dyn BlockPolicy>)>>,
    residual: Vec<Option<ResidualStore>>,
    steps_done: Vec<usize>,
    /// The block's region of the key/value cache holds keys/values of all its tokens.
    has_kv: Vec<bool>,
    /// ... computed from its final latents (finished and history blocks).
    committed: Vec<bool>,
    /// Output tokens of each block's last frame at its latest forward (reference motion).
    last_out: Vec<Option<Tensor>>,
    /// Modulation and output of each block's previous full step (calibration).
    previous: Vec<Option<(Tensor, Tensor)>>,
    /// Per block, with `kv_refresh`: each token's hidden states at the inputs of the layers
    /// after the first minus its patch embedding, at its last computations (see
    /// `KvRefresh::deltas`), kept and forecast as the output residuals are.
    hidden: Vec<Option<ResidualStore>>,
}

impl Branch {
    fn new(blocks: usize) -> Self {
        Self {
            policy: (0..blocks).map(|_| None).collect(),
            residual: (0..blocks).map(|_| None).collect(),
            steps_done: vec![0; blocks],
            has_kv: vec![false; blocks],
            committed: vec![false; blocks],
            last_out: vec![None; blocks],
            previous: vec![None; blocks],
            hidden: (0..blocks).map(|_| None).collect(),
        }
    }

    /// Forget everything cached about block `b` (its next forward is full).
    fn reset(&mut self, b: usize) {
        self.policy[b] = None;
        self.residual[b] = None;
        self.has_kv[b] = false;
        self.committed[b] = false;
        self.hidden[b] = None;
    }
}

/// One unit of transformer work in a row.
#[derive(Debug, Clone, PartialEq)]
enum Work {
    /// Keys/values of a finished (or history) block from its final latents; the output is
    /// not needed.
    Commit { branch: usize, block: usize },
    /// A block in progress, all tokens (`Plan::Full`) or some (`Plan::Tokens`).
    Compute {
        branch: usize,
        block: usize,
        plan: Plan,
    },
    /// Blocks `b0..b1` in one item, block-causal groups (bidirectional when the block size
    /// is 1), every row afresh: the vanilla computation.
    Window { branch: usize, b0: usize, b1: usize },
}

/// The row's indices into the step matrix and what the live settings say about it.
struct Row {
    index: Vec<usize>,
    update: Vec<bool>,
    v0: usize,
    v1: usize,
    branches: usize,
    cache: CacheSettings,
    vanilla: bool,
    guidance: f64,
    fps_class: u32,
    addnoise: f64,
}

/// A row's per-block inputs.
struct Inputs {
    /// Per block: the patch-embedded tokens `[tokens, dim]`.
    tokens: Vec<Option<Tensor>>,
    /// Per block: timestep conditioning at this row.
    modulation: Vec<Option<FrameModulation>>,
}

/// What step 3 gives step 5 per (branch, block).
struct BlockOut {
    x_in: Tensor,
    x_out: Tensor,
    plan: Plan,
    step: usize,
    /// Computed tokens' residual change rates (see `ResidualStore::rates`).
    rates: Vec<(u32, f32)>,
}

pub(super) struct Segment {
    /// Latents per block `[C, bs, H, W]`.
    latents: Vec<Tensor>,
    solvers: Vec<UniPcState>,
    matrix: StepMatrix,
    schedule: FlowSchedule,
    it: usize,
    prefix_blocks: usize,
    /// Global index of block 0 of the segment (prefix blocks included).
    first_global: usize,
    /// All tokens of each block (RoPE tables at its window position).
    tokens: Vec<TokenSet>,
    /// All tokens of the window with block-causal groups (vanilla), built once.
    window_tokens: Option<(usize, usize, TokenSet)>,
    branches: [Branch; 2],
    stats: Vec<BlockStats>,
    emitted: Vec<bool>,
    /// The schedule as it was when the segment started.
    settings: GeneratorSettings,
    /// Post-patch grid `(frames per block, h, w)`.
    grid: (usize, usize, usize),
    kv: KvCache,
    /// Last frame of each block's clean latents (final or latest prediction), `[C, H, W]`.
    x0_last: Vec<Option<Tensor>>,
    /// A block's timestep conditioning by timestep (its bits) and fps class: every block
    /// steps through the same few timesteps, each of which would otherwise run the
    /// embedding's three small matrix multiplies again every row.
    modulations: HashMap<(u64, u32), FrameModulation>,
}

impl Segment {
    pub fn new(
        model: &Transformer,
        scheduler: &SchedulerConfig,
        s: GeneratorSettings,
        noise: &Tensor,
        history: Option<&Tensor>,
        first_global: usize,
        kv: KvCache,
    ) -> Result<Self> {
        let bs = s.causal_block_size;
        let frames = noise.dim(1)?;
        let blocks = frames / bs;
        let prefix = history.map_or(Ok(0), |h| h.dim(1))?;
        let mut latents = Vec::with_capacity(blocks);
        for b in 0..blocks {
            latents.push(noise.narrow(1, b * bs, bs)?.contiguous()?);
        }
        let mut x0_last = vec![None; blocks];
        if let Some(hist) = history {
            for (b, l) in latents.iter_mut().enumerate().take(prefix / bs) {
                *l = hist.narrow(1, b * bs, bs)?.contiguous()?;
                x0_last[b] = Some(l.narrow(1, bs - 1, 1)?.squeeze(1)?);
            }
        }
        let schedule = FlowSchedule::new(scheduler, s.steps, s.shift)?;
        let matrix = StepMatrix::new(blocks, s.steps, blocks, s.ar_step, prefix / bs)?;
        let (_, h, w) = noise.dims4().map(|(_, f, h, w)| (f, h, w))?;
        let (gf, gh, gw) = model.grid(bs, h, w)?;
        let tokens = (0..blocks)
            .map(|b| model.all_tokens(b * gf, gf, gh, gw))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let stats = (0..blocks)
            .map(|b| BlockStats {
                index: first_global + b,
                frames: bs,
                grid: (gf, gh, gw),
                token_recomputes: vec![0; gf * gh * gw],
                ..Default::default()
            })
            .collect();
        let mut emitted = vec![false; blocks];
        for e in emitted.iter_mut().take(prefix / bs) {
            *e = true;
        }
        Ok(Self {
            latents,
            solvers: vec![UniPcState::diffusion_forcing(); blocks],
            matrix,
            schedule,
            it: 0,
            prefix_blocks: prefix / bs,
            first_global,
            tokens,
            window_tokens: None,
            branches: [Branch::new(blocks), Branch::new(blocks)],
            stats,
            emitted,
            settings: s,
            grid: (gf, gh, gw),
            kv,
            x0_last,
            modulations: HashMap::new(),
        })
    }

    /// Whether block `b` is the video's first generated block (not history).
    fn is_first_block(&self, b: usize) -> bool {
        self.first_global == 0 && b == self.prefix_blocks
    }

    pub fn block_frames(&self) -> usize {
        self.settings.causal_block_size
    }

    pub fn first_global(&self) -> usize {
        self.first_global
    }

    pub fn done(&self) -> bool {
        self.it >= self.matrix.iterations()
    }

    fn block_tokens(&self) -> usize {
        self.grid.0 * self.grid.1 * self.grid.2
    }

    /// The history for the next segment (the last `overlap` frames), the global index of
    /// the next block, and the cache for reuse.
    pub fn finish(self) -> Result<(Option<Tensor>, usize, KvCache)> {
        let blocks = self.latents.len();
        let ov = self.settings.overlap;
        let next = self.first_global + blocks;
        if ov == 0 {
            return Ok((None, next, self.kv));
        }
        let nb = ov / self.settings.causal_block_size;
        let parts: Vec<&Tensor> = self.latents[blocks - nb..].iter().collect();
        Ok((Some(Tensor::cat(&parts, 1)?), next, self.kv))
    }

    /// One row of the step matrix; returns the blocks it finished, in order.
    pub fn row(&mut self, mut env: Env) -> Result<Vec<(usize, Tensor, BlockStats)>> {
        let row = self.row_info(env.settings);
        self.account_vanilla(&row, &env);
        let inputs = self.inputs(&row, &mut env)?;
        let work = self.plan(&row, &inputs)?;
        check(env.cancel)?;
        let (y, ranges) = self.forward(&row, &work, &inputs, &env)?;
        let outs = self.outputs(&row, &work, &inputs, &y, &ranges)?;
        let preds = self.predict(&row, &inputs, &outs, env.model)?;
        if let Some(d) = env.distances.as_mut() {
            self.record(&inputs, &outs, d)?;
        }
        self.step_blocks(&row, &inputs, outs, preds)?;
        self.it += 1;
        self.emit(&row)
    }

    fn row_info(&self, live: &GeneratorSettings) -> Row {
        let it = self.it;
        let (v0, v1) = self.matrix.valid[it];
        let causal = self.settings.causal_block_size > 1;
        Row {
            index: self.matrix.index[it].clone(),
            update: self.matrix.update[it].clone(),
            v0,
            v1,
            branches: if live.guidance_scale > 1.0 { 2 } else { 1 },
            cache: live.cache.clone(),
            vanilla: live.cache.mode == CacheMode::Vanilla || !causal,
            guidance: live.guidance_scale,
            fps_class: live.fps_class,
            addnoise: live.addnoise_condition,
        }
    }

    /// What diffusers would do for this row: the whole window, every branch, dense
    /// attention over all of it.
    fn account_vanilla(&mut self, row: &Row, env: &Env) {
        let bt = self.block_tokens();
        let window = (row.v1 - row.v0) * bt;
        for b in row.v0..row.v1 {
            let f = row.branches as f64 * env.model.layer_flops(bt, window, env.text_len);
            let tgt = self.attribution(b);
            self.stats[tgt].vanilla_flops += f;
        }
    }

    /// Step 1: the row's transformer work.
    fn plan(&mut self, row: &Row, inputs: &Inputs) -> Result<Vec<Work>> {
        let mut work = Vec::new();
        if row.vanilla {
            for br in 0..row.branches {
                for b in row.v0..row.v1 {
                    // Nothing cached survives a vanilla row: the next cached row starts full.
                    self.branches[br].reset(b);
                }
                work.push(Work::Window {
                    branch: br,
                    b0: row.v0,
                    b1: row.v1,
                });
            }
            return Ok(work);
        }
        let (gf, gh, gw) = self.grid;
        let steps = self.matrix.steps;
        for br in 0..2 {
            if br >= row.branches {
                // Guidance is off this row: what branch 1 cached goes stale.
                for b in row.v0..row.v1 {
                    if row.update[b] {
                        self.branches[br].reset(b);
                    }
                }
                continue;
            }
            let mut computed = Vec::new();
            for b in row.v0..row.v1 {
                if !row.update[b] {
                    continue;
                }
                let first_block = self.is_first_block(b);
                let branch = &mut self.branches[br];
                if branch.policy[b]
                    .as_ref()
                    .is_none_or(|(m, _)| *m != row.cache.mode)
                {
                    branch.policy[b] = Some((row.cache.mode, block_policy(row.cache.mode)));
                }
                let modulation = &inputs.modulation[b]
                    .as_ref()
                    .ok_or_else(|| missing_input(b))?
                    .proj;
                let sigma = self
                    .schedule
                    .sigma_at(self.matrix.timestep(row.index[b], &self.schedule.timesteps));
                let info = StepInfo {
                    step: branch.steps_done[b],
                    steps,
                    modulation,
                    frames: gf,
                    tokens_per_frame: gh * gw,
                    has_residual: branch.residual[b].is_some(),
                    sigma,
                    first_block,
                };
                let mut plan = match branch.policy[b].as_mut() {
                    Some((_, p)) => p.plan(&row.cache, &info)?,
                    None => Plan::Full,
                };
                if plan != Plan::Full && (branch.residual[b].is_none() || !branch.has_kv[b]) {
                    plan = Plan::Full;
                }
                if plan != Plan::Skip {
                    computed.push(b);
                }
                work.push(Work::Compute {
                    branch: br,
                    block: b,
                    plan,
                });
            }
            // Finished and history blocks before a computed block need their keys/values
            // from the final latents: once (exact reuse), or every row (TeaCache, as the
            // reference's per-block TeaCache recomputes them).
            let Some(&last) = computed.last() else {
                continue;
            };
            let branch = &mut self.branches[br];
            for a in row.v0..last {
                if !self.matrix.is_finished(row.index[a]) {
                    continue;
                }
                let every_row = row.cache.mode == CacheMode::TeaCache;
                let needed = !branch.has_kv[a]
                    || every_row
                    || (row.cache.commit_finished && !branch.committed[a]);
                if needed {
                    work.push(Work::Commit {
                        branch: br,
                        block: a,
                    });
                }
            }
        }
        Ok(work)
    }

    /// The model input of block `b` at this row: its latents (history frames perturbed by
    /// `addnoise_condition`, with fresh noise) and its timestep.
    fn block_input(&self, row: &Row, b: usize, rng: &mut NoiseRng) -> Result<(Tensor, f64)> {
        let mut t = self.matrix.timestep(row.index[b], &self.schedule.timesteps) as f64;
        let mut x = self.latents[b].clone();
        if row.addnoise > 0.0 && b < self.prefix_blocks {
            let n = rng.randn(x.shape(), x.device())?;
            let k = 0.001 * row.addnoise;
            x = ((x * (1.0 - k))? + (n * k)?)?;
            t = row.addnoise;
        }
        Ok((x, t))
    }

    /// Inputs, tokens and modulation of every block of the window the row may touch: all
    /// of them in vanilla, the started ones otherwise (blocks that have not started are
    /// never computed under the block-causal mask).
    fn inputs(&mut self, row: &Row, env: &mut Env) -> Result<Inputs> {
        let blocks = self.latents.len();
        let need: Vec<bool> = (0..blocks)
            .map(|b| (row.v0..row.v1).contains(&b) && (row.vanilla || row.index[b] > 0))
            .collect();
        let gf = self.grid.0;
        let mut tokens = vec![None; blocks];
        let mut keys = vec![None; blocks];
        // One conditioning computation for the row's timesteps not seen before.
        let mut new = Vec::new();
        for b in (0..blocks).filter(|&b| need[b]) {
            let (xb, t) = self.block_input(row, b, env.rng)?;
            tokens[b] = Some(env.model.patchify(&xb)?);
            let key = (t.to_bits(), row.fps_class);
            if !self.modulations.contains_key(&key) && !new.contains(&t) {
                new.push(t);
            }
            keys[b] = Some(key);
        }
        if !new.is_empty() {
            let ts: Vec<f64> = new
                .iter()
                .flat_map(|&t| std::iter::repeat_n(t, gf))
                .collect();
            let m = env.model.modulation(&ts, row.fps_class)?;
            for (i, &t) in new.iter().enumerate() {
                let block = FrameModulation {
                    temb: m.temb.narrow(0, i * gf, gf)?,
                    proj: m.proj.narrow(0, i * gf, gf)?,
                };
                self.modulations.insert((t.to_bits(), row.fps_class), block);
            }
        }
        let modulation = keys
            .iter()
            .map(|k| k.and_then(|k| self.modulations.get(&k).cloned()))
            .collect();
        Ok(Inputs { tokens, modulation })
    }

    /// Step 2: one batched forward of all the row's work. Returns the output tokens and
    /// each work item's rows in them.
    fn forward(
        &mut self,
        row: &Row,
        work: &[Work],
        inputs: &Inputs,
        env: &Env,
    ) -> Result<(Option<Forward>, Vec<Range<usize>>)> {
        let bt = self.block_tokens();
        let (gf, gh, gw) = self.grid;
        if work.iter().any(|w| matches!(w, Work::Window { .. })) {
            let key = (row.v0, row.v1);
            if self
                .window_tokens
                .as_ref()
                .is_none_or(|(a, b, _)| (*a, *b) != key)
            {
                let mut t = env
                    .model
                    .all_tokens(row.v0 * gf, (row.v1 - row.v0) * gf, gh, gw)?;
                if self.settings.causal_block_size > 1 {
                    t.groups = Some(vec![bt; row.v1 - row.v0]);
                }
                self.window_tokens = Some((row.v0, row.v1, t));
            }
        }
        // Window items: their blocks' inputs and conditioning, concatenated once.
        let window = match work.iter().find_map(|w| match w {
            Work::Window { b0, b1, .. } => Some((*b0, *b1)),
            _ => None,
        }) {
            Some((b0, b1)) => {
                let xs: Vec<Tensor> = (b0..b1)
                    .map(|b| inputs.tokens[b].clone().ok_or_else(|| missing_input(b)))
                    .collect::<Result<_>>()?;
                let ms: Vec<&FrameModulation> = (b0..b1)
                    .map(|b| {
                        inputs.modulation[b]
                            .as_ref()
                            .ok_or_else(|| missing_input(b))
                    })
                    .collect::<Result<_>>()?;
                let temb: Vec<&Tensor> = ms.iter().map(|m| &m.temb).collect();
                let proj: Vec<&Tensor> = ms.iter().map(|m| &m.proj).collect();
                Some((
                    Tensor::cat(&xs, 0)?,
                    FrameModulation {
                        temb: Tensor::cat(&temb, 0)?,
                        proj: Tensor::cat(&proj, 0)?,
                    },
                ))
            }
            None => None,
        };
        let subsets: Vec<Option<TokenSet>> = work
            .iter()
            .map(|w| match w {
                Work::Compute {
                    block,
                    plan: Plan::Tokens(idx),
                    ..
                } => env.model.subset(&self.tokens[*block], idx).map(Some),
                _ => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        // With `kv_refresh`, the tokens a partial forward reuses refresh their keys/values.
        let kv_refresh = row.cache.kv_refresh;
        let refresh: Vec<Option<(Vec<u32>, TokenSet)>> = work
            .iter()
            .map(|w| match w {
                Work::Compute {
                    branch,
                    block,
                    plan: Plan::Tokens(idx),
                } if kv_refresh => {
                    let Some(hidden) = &self.branches[*branch].hidden[*block] else {
                        return Ok(None);
                    };
                    let mut rest = complement(idx, bt);
                    // With a window, only the tokens computed within its last steps.
                    let window = row.cache.kv_refresh_window;
                    if window > 0 {
                        let since = self.sigma_at_index(row.index[*block].saturating_sub(window));
                        rest = hidden.computed_since(rest, since);
                    }
                    if rest.is_empty() {
                        Ok(None)
                    } else {
                        let set = env.model.subset(&self.tokens[*block], &rest)?;
                        Ok(Some((rest, set)))
                    }
                }
                _ => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut bb = BatchBuilder::default();
        if kv_refresh {
            bb.record_hidden();
        }
        for (w, set) in work.iter().zip(&refresh) {
            let (
                Some((rest, set)),
                Work::Compute {
                    branch, block: b, ..
                },
            ) = (set, w)
            else {
                continue;
            };
            let ix = set.idx.as_ref().ok_or_else(|| missing_input(*b))?;
            let hidden = self.branches[*branch].hidden[*b]
                .as_ref()
                .ok_or_else(|| missing_input(*b))?;
            let x = inputs.tokens[*b]
                .as_ref()
                .ok_or_else(|| missing_input(*b))?;
            let sigma = self.sigma(row, *b);
            let tgt = self.attribution(*b);
            self.stats[tgt].flops += env.model.refresh_flops(set.len());
            bb.push_refresh(
                RefreshItem {
                    est: hidden.predict_rows(sigma, row.cache.reuse, ix, rest, Some(x))?,
                    modulation: inputs.modulation[*b]
                        .as_ref()
                        .ok_or_else(|| missing_input(*b))?,
                    tokens: set,
                    branch: *branch,
                    first: b * bt,
                },
                &self.kv,
                env.model.config().num_layers,
            )?;
        }
        let mut ranges = Vec::with_capacity(work.len());
        for (w, sub) in work.iter().zip(&subsets) {
            if let Work::Compute {
                plan: Plan::Skip, ..
            } = w
            {
                // Reused whole: no transformer work, keys/values untouched.
                ranges.push(bb.len()..bb.len());
                continue;
            }
            let item = match w {
                Work::Commit { branch, block } | Work::Compute { branch, block, .. } => {
                    let b = *block;
                    let x = inputs.tokens[b].clone().ok_or_else(|| missing_input(b))?;
                    let (x, tokens) = match sub {
                        Some(sub) => {
                            let ix = sub.idx.as_ref().ok_or_else(|| missing_input(b))?;
                            (x.index_select(ix, 0)?, sub)
                        }
                        None => (x, &self.tokens[b]),
                    };
                    let keys = 0..(b + 1) * bt;
                    let tgt = self.attribution(b);
                    self.stats[tgt].flops +=
                        env.model
                            .layer_flops(tokens.len(), keys.len(), env.text_len);
                    BatchItem {
                        x,
                        modulation: inputs.modulation[b]
                            .as_ref()
                            .ok_or_else(|| missing_input(b))?,
                        tokens,
                        branch: *branch,
                        first: b * bt,
                        keys,
                    }
                }
                Work::Window { branch, b0, b1 } => {
                    for b in *b0..*b1 {
                        let keys = if self.settings.causal_block_size > 1 {
                            (b - b0 + 1) * bt
                        } else {
                            (b1 - b0) * bt
                        };
                        let tgt = self.attribution(b);
                        self.stats[tgt].flops += env.model.layer_flops(bt, keys, env.text_len);
                    }
                    let (x, modulation) = window.as_ref().ok_or_else(|| missing_input(*b0))?;
                    BatchItem {
                        x: x.clone(),
                        modulation,
                        tokens: &self
                            .window_tokens
                            .as_ref()
                            .ok_or_else(|| missing_input(*b0))?
                            .2,
                        branch: *branch,
                        first: b0 * bt,
                        keys: b0 * bt..b1 * bt,
                    }
                }
            };
            ranges.push(bb.push(item, &self.kv, env.text_len)?);
        }
        if bb.is_empty() {
            return Ok((None, ranges));
        }
        let batch = bb.build()?;
        let f = env
            .model
            .forward_batch_until(&batch, &self.kv, env.stacked, Some(env.cancel))?
            .ok_or(Error::Cancelled)?;
        Ok((Some(f), ranges))
    }

    /// Step 3: every updated block's output tokens per branch; residual caches and the
    /// bookkeeping of keys/values, plans and statistics.
    fn outputs(
        &mut self,
        row: &Row,
        work: &[Work],
        inputs: &Inputs,
        f: &Option<Forward>,
        ranges: &[Range<usize>],
    ) -> Result<Vec<Vec<Option<BlockOut>>>> {
        let y = &f.as_ref().map(|f| f.y.clone());
        let hidden = f.as_ref().and_then(|f| f.hidden.as_ref());
        let blocks = self.latents.len();
        let bt = self.block_tokens();
        let mut outs: Vec<Vec<Option<BlockOut>>> = (0..row.branches)
            .map(|_| (0..blocks).map(|_| None).collect())
            .collect();
        let rows = |r: &Range<usize>| -> Result<Tensor> {
            match y {
                Some(y) => Ok(y.narrow(0, r.start, r.len())?),
                None => Err(Error::Candle(candle_core::Error::Msg(
                    "transformer work without a forward".into(),
                ))),
            }
        };
        let missing = missing_input;
        for (w, r) in work.iter().zip(ranges) {
            match w {
                Work::Commit { branch, block } => {
                    let br = &mut self.branches[*branch];
                    br.has_kv[*block] = true;
                    br.committed[*block] = true;
                }
                Work::Window { branch, b0, b1 } => {
                    let y = rows(r)?;
                    let window = outs[*branch].iter_mut().enumerate().take(*b1).skip(*b0);
                    for (b, out) in window {
                        self.branches[*branch].has_kv[b] = true;
                        if !row.update[b] {
                            continue;
                        }
                        let x_in = inputs.tokens[b].clone().ok_or_else(|| missing(b))?;
                        let step = self.branches[*branch].steps_done[b];
                        *out = Some(BlockOut {
                            x_in,
                            x_out: y.narrow(0, (b - b0) * bt, bt)?,
                            plan: Plan::Full,
                            step,
                            rates: Vec::new(),
                        });
                    }
                }
                Work::Compute {
                    branch,
                    block,
                    plan,
                } => {
                    let b = *block;
                    let x_in = inputs.tokens[b].clone().ok_or_else(|| missing(b))?;
                    let sigma = self.sigma(row, b);
                    let br = &mut self.branches[*branch];
                    // Residual change rates feed only the observed distance; they cost
                    // two reads back to the host per block-step.
                    let want_rates = row.cache.distance_mode == DistanceMode::Observed;
                    let mut rates = Vec::new();
                    let x_out = match plan {
                        Plan::Skip => {
                            let store = br.residual[b].as_ref().ok_or_else(|| missing(b))?;
                            (&x_in + store.predict(sigma, row.cache.reuse)?)?
                        }
                        Plan::Full => {
                            let y = rows(r)?;
                            // The block's rows. A store keeps host rows in its own
                            // buffers; elsewhere a copy, as a view would keep the whole
                            // batch's hidden states alive as long as the store.
                            let own = match hidden {
                                Some(h) => {
                                    let block = h.narrow(0, r.start, r.len())?;
                                    Some(match is_host(&block) {
                                        true => block,
                                        false => block.copy()?,
                                    })
                                }
                                None => None,
                            };
                            br.hidden[b] = match (br.hidden[b].take(), own) {
                                (_, None) => None,
                                (Some(mut old), Some(h)) => {
                                    old.update_all(h, sigma)?;
                                    Some(old)
                                }
                                (None, Some(h)) => Some(ResidualStore::new(h, sigma)?),
                            };
                            let res = (&y - &x_in)?;
                            match br.residual[b].as_mut() {
                                Some(s) => {
                                    if want_rates {
                                        rates = s
                                            .rates(None, &res, sigma)?
                                            .into_iter()
                                            .enumerate()
                                            .map(|(i, r)| (i as u32, r))
                                            .collect();
                                    }
                                    s.update_all(res, sigma)?
                                }
                                None => br.residual[b] = Some(ResidualStore::new(res, sigma)?),
                            }
                            br.has_kv[b] = true;
                            y
                        }
                        Plan::Tokens(idx) => {
                            let y = rows(r)?;
                            let store = br.residual[b].as_mut().ok_or_else(|| missing(b))?;
                            let ix = Tensor::new(idx.as_slice(), store.device())?;
                            let m = y.dim(0)?;
                            if want_rates {
                                let fresh = (&y - x_in.index_select(&ix, 0)?)?;
                                rates = idx
                                    .iter()
                                    .copied()
                                    .zip(store.rates(Some((&ix, idx)), &fresh, sigma)?)
                                    .collect();
                            }
                            let x_out =
                                store.apply_tokens(&x_in, &y, &ix, idx, sigma, row.cache.reuse)?;
                            br.hidden[b] = match (br.hidden[b].take(), hidden) {
                                (Some(mut old), Some(h)) => {
                                    old.update_tokens(&ix, idx, &h.narrow(0, r.start, m)?, sigma)?;
                                    Some(old)
                                }
                                _ => None,
                            };
                            x_out
                        }
                    };
                    let step = br.steps_done[b];
                    outs[*branch][b] = Some(BlockOut {
                        x_in,
                        x_out,
                        plan: plan.clone(),
                        step,
                        rates,
                    });
                }
            }
        }
        // Statistics of the updated blocks.
        for (brn, per_block) in outs.iter().enumerate() {
            for (b, o) in per_block.iter().enumerate() {
                let Some(o) = o else { continue };
                self.branches[brn].steps_done[b] += 1;
                let st = &mut self.stats[b];
                match &o.plan {
                    Plan::Full => {
                        st.full_forwards += 1;
                        st.token_recomputes.iter_mut().for_each(|c| *c += 1);
                    }
                    Plan::Skip => st.skipped_forwards += 1,
                    Plan::Tokens(t) => {
                        st.partial_forwards += 1;
                        for &i in t {
                            st.token_recomputes[i as usize] += 1;
                        }
                    }
                }
                st.tokens_recomputed += o.plan.count(bt);
                st.tokens_total += bt;
            }
        }
        Ok(outs)
    }

    /// Calibration samples of this row's fully computed blocks.
    fn record(
        &mut self,
        inputs: &Inputs,
        outs: &[Vec<Option<BlockOut>>],
        samples: &mut Vec<(f64, f64)>,
    ) -> Result<()> {
        for (br, per_block) in outs.iter().enumerate() {
            for (b, o) in per_block.iter().enumerate() {
                let Some(o) = o.as_ref().filter(|o| o.plan == Plan::Full) else {
                    continue;
                };
                let m = inputs.modulation[b]
                    .as_ref()
                    .ok_or_else(|| missing_input(b))?;
                let prev = self.branches[br].previous[b].replace((m.proj.clone(), o.x_out.clone()));
                if let Some((pm, po)) = prev {
                    let dm = rel_l1(&m.proj, &pm, DistanceMode::Global)?[0];
                    let out = o.x_out.unsqueeze(0)?;
                    let dy = rel_l1(&out, &po.unsqueeze(0)?, DistanceMode::Global)?[0];
                    samples.push((dm, dy));
                }
            }
        }
        Ok(())
    }

    /// Step 4: the output head for every updated block of every branch in one call.
    fn predict(
        &self,
        row: &Row,
        inputs: &Inputs,
        outs: &[Vec<Option<BlockOut>>],
        model: &Transformer,
    ) -> Result<Vec<Vec<Option<Tensor>>>> {
        let (gf, gh, gw) = self.grid;
        let bt = self.block_tokens();
        let mut xs = Vec::new();
        let mut tembs = Vec::new();
        let mut which = Vec::new();
        for (br, per_block) in outs.iter().enumerate() {
            for (b, o) in per_block.iter().enumerate() {
                if let Some(o) = o {
                    let m = inputs.modulation[b].as_ref().ok_or_else(|| {
                        Error::Candle(candle_core::Error::Msg(format!(
                            "no modulation for block {b}"
                        )))
                    })?;
                    xs.push(o.x_out.clone());
                    tembs.push(m.temb.clone());
                    which.push((br, b));
                }
            }
        }
        let mut preds: Vec<Vec<Option<Tensor>>> =
            vec![vec![None; self.latents.len()]; row.branches];
        if xs.is_empty() {
            return Ok(preds);
        }
        let counts = vec![gh * gw; gf * xs.len()];
        let out = model.head_tokens(&Tensor::cat(&xs, 0)?, &Tensor::cat(&tembs, 0)?, &counts)?;
        for (i, (br, b)) in which.into_iter().enumerate() {
            preds[br][b] = Some(model.unpatchify(&out.narrow(0, i * bt, bt)?, self.grid)?);
        }
        Ok(preds)
    }

    /// Step 5: guidance, the policies' observation, the solver step.
    fn step_blocks(
        &mut self,
        row: &Row,
        inputs: &Inputs,
        outs: Vec<Vec<Option<BlockOut>>>,
        mut preds: Vec<Vec<Option<Tensor>>>,
    ) -> Result<()> {
        let (gf, gh, gw) = self.grid;
        let patch = (self.latents[0].dim(2)? / gh, self.latents[0].dim(3)? / gw);
        let tpf = gh * gw;
        let steps = self.matrix.steps;
        for b in row.v0..row.v1 {
            if !row.update[b] {
                continue;
            }
            let missing = || {
                Error::Candle(candle_core::Error::Msg(format!(
                    "no prediction for block {b}"
                )))
            };
            let cond = preds[0][b].take().ok_or_else(missing)?;
            let pred = if row.branches == 2 {
                let unc = preds[1][b].take().ok_or_else(missing)?;
                (&unc + ((cond - &unc)? * row.guidance)?)?
            } else {
                cond
            };
            let t = self.matrix.timestep(row.index[b], &self.schedule.timesteps);
            let sigma = self.sigma(row, b);
            let x0 = (&self.latents[b] - (&pred * sigma)?)?;
            let modulation = &inputs.modulation[b].as_ref().ok_or_else(missing)?.proj;
            let first_block = self.is_first_block(b);
            for (br, per_block) in outs.iter().enumerate() {
                let Some(o) = &per_block[b] else { continue };
                let branch = &mut self.branches[br];
                if let Some((_, p)) = branch.policy[b].as_mut() {
                    let info = StepInfo {
                        step: o.step,
                        steps,
                        modulation,
                        frames: gf,
                        tokens_per_frame: tpf,
                        has_residual: true,
                        sigma,
                        first_block,
                    };
                    let prev_last_out = if b > 0 {
                        branch.last_out[b - 1].as_ref()
                    } else {
                        None
                    };
                    let prev_x0_last = if b > 0 {
                        self.x0_last[b - 1].as_ref()
                    } else {
                        None
                    };
                    let obs = Observation {
                        x_in: &o.x_in,
                        x_out: &o.x_out,
                        prev_last_out,
                        x0: &x0,
                        prev_x0_last,
                        patch,
                        rates: &o.rates,
                    };
                    p.observe(&row.cache, &info, &o.plan, &obs)?;
                }
                branch.last_out[b] = Some(o.x_out.narrow(0, (gf - 1) * tpf, tpf)?);
            }
            self.x0_last[b] = Some(x0.narrow(1, x0.dim(1)? - 1, 1)?.squeeze(1)?);
            self.latents[b] = self.solvers[b].step(&self.schedule, &pred, t, &self.latents[b])?;
            self.stats[b].steps += 1;
            if row.index[b] == steps {
                // Finished: nothing of its cache is needed any more but its keys/values.
                for br in self.branches.iter_mut() {
                    br.policy[b] = None;
                    br.residual[b] = None;
                    br.hidden[b] = None;
                }
                let l = &self.latents[b];
                self.x0_last[b] = Some(l.narrow(1, l.dim(1)? - 1, 1)?.squeeze(1)?);
            }
        }
        Ok(())
    }

    /// Blocks that took their last step are finished: returns them in order.
    fn emit(&mut self, row: &Row) -> Result<Vec<(usize, Tensor, BlockStats)>> {
        let steps = self.matrix.steps;
        let mut out = Vec::new();
        for b in 0..self.latents.len() {
            if self.emitted[b] {
                continue;
            }
            let finished =
                (row.update[b] && row.index[b] == steps) || self.matrix.is_finished(row.index[b]);
            if !finished {
                break;
            }
            self.emitted[b] = true;
            out.push((b, self.latents[b].clone(), self.stats[b].clone()));
        }
        Ok(out)
    }

    /// The solver's sigma for block `b` at this row.
    fn sigma(&self, row: &Row, b: usize) -> f64 {
        self.sigma_at_index(row.index[b])
    }

    /// The solver's sigma of a block at step index `i`.
    fn sigma_at_index(&self, i: usize) -> f64 {
        let t = self.matrix.timestep(i, &self.schedule.timesteps);
        self.schedule.sigma_at(t)
    }

    /// Where the cost of work on block `b` is booked: on `b` itself until it is emitted,
    /// after that (and for history blocks) on the earliest block not emitted yet.
    fn attribution(&self, b: usize) -> usize {
        if !self.emitted[b] {
            return b;
        }
        self.emitted.iter().position(|e| !e).unwrap_or(b)
    }
}

/// The indices of `0..n` not in `idx` (sorted ascending).
fn complement(idx: &[u32], n: usize) -> Vec<u32> {
    let mut taken = vec![false; n];
    for &i in idx {
        if let Some(t) = taken.get_mut(i as usize) {
            *t = true;
        }
    }
    (0..n as u32).filter(|&i| !taken[i as usize]).collect()
}

fn missing_input(b: usize) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("no input for block {b}")))
}
