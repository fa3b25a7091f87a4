//! Cache settings: one plain struct, defaults per mode and schedule length, validated.

use crate::error::{Error, Result};

/// Which computation the generator does per block-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Full-window recompute every iteration, as diffusers does (the speed baseline).
    Vanilla,
    /// Exact: finished blocks' K/V computed once, not-started blocks skipped.
    None,
    /// Chunk level: skip a whole block-step while the accumulated rescaled modulation
    /// distance stays under `teacache_threshold`.
    TeaCache,
    /// Chunk level with exact reuse of finished blocks and a forced last step
    /// (FlowCache-style).
    FlowCache,
    /// Token level, motion aware: this project's MotionCache (motion from the predicted
    /// clean latent, phases scaled to the schedule, a low weight floor).
    #[default]
    MotionCache,
    /// Token level as the public reference implementation computes it (ywlq/MotionCache,
    /// the paper's settings): five full steps, six uniform refreshes, motion weights from
    /// the mixed transformer output, stale residuals, no recompute of finished blocks at
    /// t = 0.
    MotionCacheReference,
}

impl CacheMode {
    pub const ALL: [CacheMode; 6] = [
        CacheMode::Vanilla,
        CacheMode::None,
        CacheMode::TeaCache,
        CacheMode::FlowCache,
        CacheMode::MotionCache,
        CacheMode::MotionCacheReference,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Vanilla => "vanilla",
            CacheMode::None => "none",
            CacheMode::TeaCache => "teacache",
            CacheMode::FlowCache => "flowcache",
            CacheMode::MotionCache => "motioncache",
            CacheMode::MotionCacheReference => "motioncache-reference",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            Error::setting(
                "cache-mode",
                s,
                "expected vanilla, none, teacache, flowcache, motioncache or motioncache-reference",
            )
        })
    }
}

/// How the step distance is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DistanceMode {
    /// One scalar per block-step.
    #[default]
    Global,
    /// One value per frame (every token of a frame shares its timestep).
    Token,
    /// Per token: the token's own observed rate of change (relative change of its residual
    /// per unit of sigma, measured whenever it is computed) times the sigma the step
    /// advances. The accumulated value estimates how far the token's reused residual is
    /// from a fresh one, without a fitted polynomial.
    Observed,
}

/// Per-frame normalisation of the motion weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightNorm {
    /// `d / mean(d)`.
    Mean,
    /// `d / max(d)`.
    Max,
    /// `floor + (1 - floor) (d - min) / (max - min)`: the reference's; every frame spans
    /// `[floor, 1]` whatever its motion.
    MaxRescale,
    /// `clamp(d / mean(d), floor, 1)`: tokens that move more than the frame's average get
    /// weight 1, still ones the floor; a frame without motion keeps weights near 1 (no
    /// reason to prefer any token).
    MeanClamp,
    /// `floor + (1 - floor) clamp((d - mean) / (max - mean), 0, 1)`: tokens at or below
    /// the frame's average motion (the background, whose clean-latent estimate still
    /// flickers a little) get the floor, the most moving token 1.
    #[default]
    AboveMean,
}

/// Where the motion weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MotionSource {
    /// Inter-frame differences of the block's transformer output (fresh and reused tokens
    /// mixed), relative to the previous frame's magnitude: the reference.
    Output,
    /// Inter-frame differences of the predicted clean latent `x0 = x_t - sigma * v` (after
    /// guidance), pooled per token: follows the content, not the noise.
    #[default]
    CleanLatent,
}

/// What a reused token's output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reuse {
    /// `input + last residual` (TeaCache, the reference).
    #[default]
    Residual,
    /// `input + r1 + (r1 - r0) * (sigma - sigma1) / (sigma1 - sigma0)`: the residual
    /// extrapolated to this step from the token's last two computed residuals (first
    /// order, as TaylorSeer-style caches do), clamped to at most one interval ahead.
    Forecast,
}

/// Which model's variant of the method the settings drive: their defaults and the
/// meaning of some fields differ (see [`CacheSettings::for_magi`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheVariant {
    /// SkyReels-V2 / Wan 2.1: per-block policies inside the generator.
    #[default]
    Wan,
    /// MAGI-1: the three-phase chunk / token cache of MotionCache4MAGI-1
    /// ([`crate::cache::magi`]).
    Magi,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub mode: CacheMode,
    pub variant: CacheVariant,
    /// Full steps per block before any reuse.
    pub warmup_steps: usize,
    /// Accumulated weighted distance that triggers a token's recompute (MotionCache).
    pub motion_threshold: f64,
    /// A token is recomputed at least every N of its steps (0 = no limit).
    pub refresh_interval: usize,
    /// Phase-1 refreshes (uniform weights) before motion weights apply.
    pub uniform_updates: usize,
    /// Floor of the weight normalisation.
    pub weight_floor: f64,
    /// Skip the forward when fewer than this fraction of tokens need it.
    pub min_update_ratio: f64,
    /// Recompute every token of the block when at least this fraction of them need it
    /// (1 = only when all do).
    pub max_update_ratio: f64,
    /// Threshold of the per-position vote across the block's frames (0 = off).
    pub temporal_consistency: f64,
    /// Whether a block's last step is always computed in full.
    pub full_last_step: bool,
    /// Whether the video's first block is computed in full at every step, as if all its
    /// steps were warm-up (MotionCache; see [`CacheSettings::for_schedule`]).
    pub full_first_block: bool,
    pub distance_mode: DistanceMode,
    pub weight_norm: WeightNorm,
    pub motion_source: MotionSource,
    pub reuse: Reuse,
    /// Whether a finished block's K/V are recomputed once from its final latents at t = 0
    /// (exact; what diffusers' every-row recompute gives). The reference keeps the K/V of
    /// the block's last forward instead.
    pub commit_finished: bool,
    /// Whether the tokens a partial forward reuses get keys/values of the current step
    /// (their hidden states estimated from this step's input and their last computation,
    /// see [`crate::model::transformer::KvRefresh`]) instead of keeping those of the step
    /// they were last computed at, as the reference does.
    pub kv_refresh: bool,
    /// With `kv_refresh`, refresh only the reused tokens computed within this many of the
    /// block's steps before the current one (0: every reused token; `motioncache`'s
    /// default is [`LONG_KV_REFRESH_WINDOW`] from [`LONG_SCHEDULE_STEPS`] steps on, 0
    /// below).
    pub kv_refresh_window: usize,
    /// Rescale polynomial of the relative modulation distance, highest power first
    /// (TeaCache's fit for Wan 2.1 1.3B by default; `motioncache-bench calibrate` fits
    /// one per model).
    pub rescale: Vec<f64>,
    /// TeaCache: accumulated distance below which a block-step is skipped.
    pub teacache_threshold: f64,
    /// FlowCache: accumulated distance below which a block-step is skipped.
    pub flowcache_threshold: f64,
}

pub const WAN_1_3B_RESCALE: [f64; 5] = [
    -5.21862437e4,
    9.23041404e3,
    -5.28275948e2,
    1.36987616e1,
    -4.99875664e-2,
];

impl Default for CacheSettings {
    fn default() -> Self {
        Self::for_schedule(CacheMode::MotionCache, 50)
    }
}

/// `motioncache`'s default threshold times the step count (see
/// [`CacheSettings::scaled_threshold`]).
pub const MOTIONCACHE_THRESHOLD_STEPS: f64 = 0.5;

/// From this many steps on, `motioncache` forecasts a reused token's residual
/// (`Reuse::Forecast`) and max-rescales the motion weights of each frame to
/// `[weight_floor, 1]` (`WeightNorm::MaxRescale`); below, it keeps the last residual and
/// gives the floor to every token at or below the frame's mean motion
/// (`WeightNorm::AboveMean`). Measured on the embedded model at 10 steps (the forecast 2.7
/// dB worse at the default threshold; max-rescale maybe as good, 22.2 dB at 0.70 token
/// work against above-mean's 23.9 dB at 0.80 and 15.2 dB at 0.54 on two prompts, but the
/// element's prompt adherence was measured with above-mean) and at 50 (the forecast 1-2 dB
/// better at every threshold from 0.01 to 0.03, max-rescale another 1.4 dB at 0.37 token
/// work); 20 is a choice between the two, not a measurement.
pub const LONG_SCHEDULE_STEPS: usize = 20;

/// `motioncache`'s minimum update ratio from [`LONG_SCHEDULE_STEPS`] steps on: a block-step
/// that would recompute fewer than a tenth of its tokens reuses them all and lets their
/// distances accumulate to the next step. Measured on the paper schedule (embedded model,
/// two prompts, after the CPU forward's fused kernels): at thresholds 0.02-0.04 0 to 0.22
/// dB less PSNR, transformer time per FLOP 1.09-1.15 of vanilla's where 0.0 gave
/// 1.18-1.24 (many passes of a few tokens cost more per FLOP than large ones). At 10 steps
/// it changed nothing measurable (0.0 kept, the element's adherence was measured so).
/// The reference's 0.4 (four prompts on "paper", 2026-12-07; docs/measurements.md, "The
/// reference margin on paper, three rounds") was 6-7% faster at 30-32.5 dB but level at
/// 35 dB, 14% slower at 40 dB and 8.6 dB worse at the default threshold (0.01); 0.2 was
/// level with 0.1 from 30 dB up.
pub const LONG_MIN_UPDATE_RATIO: f64 = 0.1;

/// `motioncache`'s maximum update ratio: a block-step that would recompute at least this
/// fraction of its tokens recomputes them all. The few tokens it would have reused cost
/// little to compute, and reused they leave the block's pass with stale keys/values and
/// residuals (the largest error of token-level reuse); a whole pass is also faster per
/// FLOP than a partial one. Measured on the embedded model (four prompts, 2026-12-05):
/// at the element's 10 steps 0.5 to 0.8 gave the same frames, 0.73 dB more PSNR at
/// thresholds 0.025 and 0.0375 (25.58 against 24.85, 22.55 against 21.81 dB) and 0.3 dB
/// at the default 0.05 for at most 0.006 more of vanilla's FLOPs; 0.9 and 0.95 gained less.
/// On the paper's 50 steps single prompts move by several dB either way with any setting
/// (trajectories diverge); 0.8 gave 44.6 against 42.8 dB at 0.01 and 32.0 against 29.4 dB
/// at 0.02 (one prompt), 0.6 and 0.7 lost 2 dB at 0.01 (one prompt 12 dB), 0.9 changed
/// little.
pub const MAX_UPDATE_RATIO: f64 = 0.8;

/// `motioncache`'s key/value refresh window from [`LONG_SCHEDULE_STEPS`] steps on: of the
/// tokens a partial forward reuses, only those computed within the last two of their
/// block's steps refresh their keys/values (see [`CacheSettings::kv_refresh_window`]).
/// A token reused for longer keeps the keys/values of its last computation: its estimated
/// hidden state (this step's input plus the changes the layers made to it then) drifts
/// from the true one as the steps since then grow, and refreshing it from that estimate
/// gained nothing measurable. Measured on the embedded model, paper schedule (four
/// prompts, 2026-12-07): 0.210 of diffusers' FLOPs and 26.4 dB at threshold 0.05 where
/// every reused token refreshing gave 0.223 and 25.5 dB, 0.179 and 18.9 dB at 0.075
/// against 0.192 and 18.3 dB, 0.258 and 33.3 dB at 0.03 against 0.266 and 34.3 dB, 0.306
/// and 42.1 dB at 0.02 against 0.311 and 42.1 dB; windows of 1 and 3 steps saved as much
/// or less for less PSNR (two prompts: 19.3 and 20.1 dB at 0.05 against 21.7 dB). At the
/// element's 10 steps a window of 2 saved at most 0.006 of the FLOPs for up to 0.24 dB
/// (1: 1.5 dB less at 0.075), so there every reused token refreshes.
pub const LONG_KV_REFRESH_WINDOW: usize = 2;

/// The reference's warm-up: `warmup_steps = 4` runs steps 0..=4 in full, five full steps
/// (fewer when the schedule is shorter).
const REFERENCE_WARMUP: usize = 5;

impl CacheSettings {
    /// The defaults of `mode` for a schedule of `steps` denoising steps (Wan 2.1's rescale
    /// polynomial; models replace it with their own).
    ///
    /// `motioncache`'s phases scale with the schedule, so that every schedule from 8 to 50
    /// steps reaches the token-level phase: a tenth of the steps (at least 2) in full, then
    /// motion weights at once (they come from the predicted clean latent, which is
    /// meaningful from the first steps), and a staleness bound of a third of the steps.
    /// Its threshold scales too ([`Self::scaled_threshold`], 0.05 at 10 steps).
    /// Threshold 0.05 and weight floor 0.1 were chosen on the embedded model (10 steps):
    /// they keep the vanilla run's prompt adherence while moving tokens are recomputed
    /// about twice as often as static ones. At 10 steps reused tokens keep their last
    /// residual (the first-order forecast, `Reuse::Forecast`, lost the prompt's colour in
    /// two of three streams at the same settings, and 2.7 dB of PSNR); from
    /// [`LONG_SCHEDULE_STEPS`] steps on their residual is forecast from the last two
    /// computed ones, which the finer steps keep accurate (the paper's 50 steps: 1 to 2 dB
    /// more PSNR at the same token work and time), and each frame's motion weights span
    /// `[weight_floor, 1]` (max-rescaled, as the reference does with its floor 0.6); a
    /// block-step that would recompute fewer than [`LONG_MIN_UPDATE_RATIO`] of its tokens
    /// is skipped there.
    /// At every schedule and threshold, the tokens a partial forward reuses refresh their
    /// keys/values (`kv_refresh`): stale keys/values of reused neighbours were the largest
    /// error of token-level reuse on the embedded model (paper schedule, two prompts: exact
    /// keys/values for every token would give 35.9 dB at threshold 0.02 against 21.8 dB;
    /// refreshed from forecast hidden states 28.8 dB, and 37.3 against 30.2 dB at 0.01, for
    /// 0.02 more of vanilla's FLOPs). Its time per FLOP, 1.1-1.3 of vanilla's on
    /// 2026-12-05 (Intel Xeon VM), was that of the passes without it on 2026-12-06 08:10
    /// (2-core AMD EPYC VM, interleaved runs: 1.01 against 1.03-1.04 at 10 steps, 1.07-1.09
    /// against 1.07-1.11 at 50), so it pays at every threshold measured: at 10 steps (four prompts, first
    /// block in full) 30.4 dB at 0.417 of diffusers' FLOPs (0.05) against 26.6 dB at 0.398,
    /// 32.0 against 28.5 dB at 0.0375, 26.5 dB at 0.388 (0.1) where 0.075 without it gives
    /// 24.7 dB at 0.376; on the paper schedule (two prompts) 30.6 dB at 0.280 (0.025)
    /// against 21.6 dB at 0.259, 27.1 dB at 0.03 in the time 0.025 takes without it.
    /// From [`LONG_SCHEDULE_STEPS`] steps on only the reused tokens computed within the last
    /// [`LONG_KV_REFRESH_WINDOW`] of their block's steps refresh.
    /// The video's first block is computed in full at every step (`full_first_block`):
    /// nothing conditions it but the prompt, and every later frame is conditioned on it, so
    /// an error there does not stay there. On the embedded model (four prompts, 2026-12-06)
    /// the per-frame PSNR against vanilla fell along the video, and at threshold 0.0225 on
    /// the paper schedule one prompt's first block took another course that every later
    /// frame followed (15.6 dB from the first frame on). With the first block in full,
    /// "paper" gave 31.7 dB at 0.267 of diffusers' FLOPs (threshold 0.025) where it had
    /// 32.0 dB at 0.288 (0.02) and 19.9 dB at 0.234 (0.025), 23.5 dB at 0.200 (0.05, the
    /// reference setting: 17.0 dB at 0.205); the element's 10 steps 32.3 dB at 0.480
    /// (0.025) where it had 32.7 dB at 0.537 (0.01875), and 26.6 dB at the default 0.05
    /// (18.7 dB). Half the threshold in the first block instead gave less (28.3 dB at 0.0225
    /// on "paper", against 31.8); the first new block of every window (after a slide) in
    /// full as well cost 0.04 more FLOPs on "paper" for the same PSNR. A long stream pays
    /// it once.
    /// The chunk-level modes and the reference keep the reference's five full steps.
    pub fn for_schedule(mode: CacheMode, steps: usize) -> Self {
        let steps = steps.max(1);
        let long = steps >= LONG_SCHEDULE_STEPS;
        let reference = Self {
            mode,
            variant: CacheVariant::Wan,
            warmup_steps: REFERENCE_WARMUP.min(steps),
            motion_threshold: 0.1,
            refresh_interval: 0,
            uniform_updates: 6,
            weight_floor: 0.6,
            min_update_ratio: 0.4,
            max_update_ratio: 1.0,
            temporal_consistency: 0.5,
            full_last_step: false,
            full_first_block: false,
            distance_mode: DistanceMode::Global,
            weight_norm: WeightNorm::MaxRescale,
            motion_source: MotionSource::Output,
            reuse: Reuse::Residual,
            commit_finished: false,
            kv_refresh: false,
            kv_refresh_window: 0,
            rescale: WAN_1_3B_RESCALE.to_vec(),
            teacache_threshold: 0.1,
            flowcache_threshold: 0.1,
        };
        match mode {
            CacheMode::MotionCacheReference => reference,
            CacheMode::MotionCache => Self {
                warmup_steps: Self::scaled_warmup(steps),
                motion_threshold: Self::scaled_threshold(steps),
                refresh_interval: steps.div_ceil(3).max(2),
                uniform_updates: 0,
                weight_floor: 0.1,
                min_update_ratio: if long { LONG_MIN_UPDATE_RATIO } else { 0.0 },
                max_update_ratio: MAX_UPDATE_RATIO,
                temporal_consistency: 0.0,
                full_last_step: false,
                full_first_block: true,
                distance_mode: DistanceMode::Token,
                weight_norm: if long {
                    WeightNorm::MaxRescale
                } else {
                    WeightNorm::AboveMean
                },
                motion_source: MotionSource::CleanLatent,
                reuse: if long {
                    Reuse::Forecast
                } else {
                    Reuse::Residual
                },
                commit_finished: true,
                kv_refresh: true,
                kv_refresh_window: if long { LONG_KV_REFRESH_WINDOW } else { 0 },
                ..reference
            },
            // Chunk-level baselines and the exact modes: finished blocks recomputed once at
            // t = 0 (`none` is exact; FlowCache reuses finished chunks), FlowCache forces a
            // block's last step.
            CacheMode::FlowCache => Self {
                commit_finished: true,
                full_last_step: true,
                ..reference
            },
            CacheMode::Vanilla | CacheMode::None | CacheMode::TeaCache => Self {
                commit_finished: true,
                ..reference
            },
        }
    }

    /// `motioncache`'s warm-up for `steps` steps: a tenth, at least 2 (so that a
    /// forecast, when chosen, has two computed residuals), never more than the schedule.
    pub fn scaled_warmup(steps: usize) -> usize {
        ((steps as f64 * 0.1).round() as usize).max(2).min(steps)
    }

    /// `motioncache`'s threshold for `steps` steps: `0.5 / steps` (0.05 at the embedded
    /// model's 10 steps, 0.01 at the paper's 50). A token's step distances add up to about
    /// the same total over a schedule whatever its length (finer steps, smaller
    /// distances), so a fixed threshold would recompute a token about equally often at 10
    /// and at 50 steps: five times less of the work at 50, far past the quality the
    /// threshold gives at 10 (the embedded model at 0.05: 18 dB at 10 steps, 14 dB at 50).
    /// Scaled, the recomputed fraction stays in one range: 0.53 at 10 steps, 0.69 at 50
    /// (with the spread weights of [`LONG_SCHEDULE_STEPS`] and more; 0.55 with the 10-step
    /// weights).
    pub fn scaled_threshold(steps: usize) -> f64 {
        MOTIONCACHE_THRESHOLD_STEPS / steps.max(1) as f64
    }

    /// MAGI-1's defaults of `mode` for `steps` steps. The fields mean there:
    /// `warmup_steps` the full steps of every chunk, `uniform_updates` the steps of the
    /// chunk-wise phase that follows (whole-chunk reuse), `motion_threshold` the threshold
    /// of both the chunk-wise and the token-wise accumulators, `weight_floor` the lowest
    /// motion weight; `teacache_threshold` / `flowcache_threshold` those of the chunk-level
    /// baselines (whole-chunk reuse after the warm-up). `motioncache-reference` keeps the
    /// reference's numbers (5 + 20 steps, 0.0065, floor 0.6, for its 64-step schedule);
    /// `motioncache` scales the phases to the schedule (5/64 and 20/64 of the steps).
    pub fn for_magi(mode: CacheMode, steps: usize) -> Self {
        let steps = steps.max(1);
        let (warmup, chunk) = match mode {
            CacheMode::MotionCacheReference => (5, 20),
            _ => (
                ((steps as f64 * 5.0 / 64.0).round() as usize).max(1),
                (steps as f64 * 20.0 / 64.0).round() as usize,
            ),
        };
        let warmup = warmup.min(steps);
        Self {
            variant: CacheVariant::Magi,
            warmup_steps: warmup,
            uniform_updates: chunk.min(steps - warmup),
            motion_threshold: 0.0065,
            weight_floor: 0.6,
            teacache_threshold: 0.0065,
            flowcache_threshold: 0.0065,
            ..Self::for_schedule(mode, steps)
        }
    }

    /// `mode`'s defaults for `steps` steps for this model (its variant and rescale
    /// polynomial; the rest of `self` is not kept): what "the mode's default" means for a
    /// model.
    pub fn defaults_for(&self, mode: CacheMode, steps: usize) -> Self {
        match self.variant {
            CacheVariant::Magi => Self::for_magi(mode, steps),
            CacheVariant::Wan => Self {
                rescale: self.rescale.clone(),
                ..Self::for_schedule(mode, steps)
            },
        }
    }

    pub fn with_mode(mode: CacheMode) -> Self {
        Self::for_schedule(mode, 50)
    }

    /// The threshold the mode compares its accumulated distance against.
    pub fn threshold(&self) -> f64 {
        match self.mode {
            CacheMode::TeaCache => self.teacache_threshold,
            CacheMode::FlowCache => self.flowcache_threshold,
            _ => self.motion_threshold,
        }
    }

    /// Sets the threshold of the current mode.
    pub fn set_threshold(&mut self, t: f64) {
        match self.mode {
            CacheMode::TeaCache => self.teacache_threshold = t,
            CacheMode::FlowCache => self.flowcache_threshold = t,
            _ => self.motion_threshold = t,
        }
    }

    /// Checks every field; `steps` is the denoising step count the settings will run with.
    pub fn validate(&self, steps: usize) -> Result<()> {
        let finite_nonneg = |name: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::setting(name, v, "must be a finite number >= 0"))
            }
        };
        finite_nonneg("motion-threshold", self.motion_threshold)?;
        finite_nonneg("teacache-threshold", self.teacache_threshold)?;
        finite_nonneg("flowcache-threshold", self.flowcache_threshold)?;
        if self.mode != CacheMode::Vanilla
            && self.mode != CacheMode::None
            && self.warmup_steps > steps
        {
            return Err(Error::setting(
                "warmup-steps",
                self.warmup_steps,
                format!("larger than the {steps} denoising steps"),
            ));
        }
        if self.variant == CacheVariant::Magi
            && matches!(
                self.mode,
                CacheMode::MotionCache | CacheMode::MotionCacheReference
            )
            && self.warmup_steps + self.uniform_updates > steps
        {
            return Err(Error::setting(
                "uniform-updates",
                self.uniform_updates,
                format!(
                    "MAGI-1's chunk-wise phase after {} warm-up steps runs past the {steps} \
                     denoising steps",
                    self.warmup_steps
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.weight_floor) {
            return Err(Error::setting(
                "weight-floor",
                self.weight_floor,
                "must be in [0, 1]",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_update_ratio) {
            return Err(Error::setting(
                "min-update-ratio",
                self.min_update_ratio,
                "must be in [0, 1]",
            ));
        }
        if !(0.0..=1.0).contains(&self.max_update_ratio) {
            return Err(Error::setting(
                "max-update-ratio",
                self.max_update_ratio,
                "must be in [0, 1]",
            ));
        }
        if !(0.0..=1.0).contains(&self.temporal_consistency) {
            return Err(Error::setting(
                "temporal-consistency",
                self.temporal_consistency,
                "must be in [0, 1] (0 = off)",
            ));
        }
        if self.rescale.is_empty() || self.rescale.iter().any(|c| !c.is_finite()) {
            return Err(Error::setting(
                "rescale",
                format!("{:?}", self.rescale),
                "needs at least one finite coefficient",
            ));
        }
        Ok(())
    }

    /// The model-specific rescale polynomial at `x` (Horner, highest power first).
    ///
    /// A fitted polynomial only holds on the distances it was fitted on: Wan 2.1's is
    /// negative below about 0.004 and above about 0.11 (at 0.2 it gives -21), and
    /// accumulating such values would cancel real change and skip steps forever. Where the
    /// polynomial is negative (or not finite) the raw distance is used instead.
    pub fn rescaled(&self, x: f64) -> f64 {
        let y = self.rescale.iter().fold(0.0, |acc, c| acc * x + c);
        if y.is_finite() && y >= 0.0 { y } else { x }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        assert!(CacheSettings::default().validate(50).is_ok());
        for steps in [1, 2, 8, 10, 50] {
            for mode in CacheMode::ALL {
                assert!(
                    CacheSettings::for_schedule(mode, steps)
                        .validate(steps)
                        .is_ok()
                );
            }
        }
        let e = CacheSettings {
            motion_threshold: -1.0,
            ..Default::default()
        }
        .validate(50)
        .unwrap_err()
        .to_string();
        assert!(e.contains("motion-threshold") && e.contains("-1"), "{e}");
        let e = CacheSettings {
            warmup_steps: 20,
            ..Default::default()
        }
        .validate(10)
        .unwrap_err()
        .to_string();
        assert!(e.contains("warmup-steps"), "{e}");
        let e = CacheSettings {
            weight_floor: 1.5,
            ..Default::default()
        }
        .validate(10)
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight-floor"), "{e}");
        assert!(CacheMode::parse("motioncache").is_ok());
        assert_eq!(
            CacheMode::parse("motioncache-reference").unwrap(),
            CacheMode::MotionCacheReference
        );
        assert!(
            CacheMode::parse("fast")
                .unwrap_err()
                .to_string()
                .contains("cache-mode")
        );
    }

    #[test]
    fn magi_defaults_and_phase_errors() {
        for steps in [4, 8, 12, 24, 64] {
            for mode in CacheMode::ALL {
                let s = CacheSettings::for_magi(mode, steps);
                assert!(s.validate(steps).is_ok(), "{mode:?} {steps}");
                assert_eq!(s.defaults_for(mode, steps), s);
            }
        }
        let m = CacheSettings::for_magi(CacheMode::MotionCache, 64);
        assert_eq!((m.warmup_steps, m.uniform_updates), (5, 20));
        assert_eq!(m.motion_threshold, 0.0065);
        let m = CacheSettings::for_magi(CacheMode::MotionCache, 8);
        assert_eq!((m.warmup_steps, m.uniform_updates), (1, 3));
        let r = CacheSettings::for_magi(CacheMode::MotionCacheReference, 8);
        assert_eq!((r.warmup_steps, r.uniform_updates), (5, 3));
        let e = CacheSettings {
            uniform_updates: 60,
            ..CacheSettings::for_magi(CacheMode::MotionCache, 64)
        }
        .validate(64)
        .unwrap_err()
        .to_string();
        assert!(e.contains("uniform-updates") && e.contains("60"), "{e}");
    }

    #[test]
    fn phases_scale_with_the_schedule() {
        assert_eq!(CacheSettings::scaled_warmup(8), 2);
        assert_eq!(CacheSettings::scaled_warmup(10), 2);
        assert_eq!(CacheSettings::scaled_warmup(50), 5);
        let at = |steps| CacheSettings::for_schedule(CacheMode::MotionCache, steps);
        assert!((at(10).motion_threshold - 0.05).abs() < 1e-12);
        assert!((at(50).motion_threshold - 0.01).abs() < 1e-12);
        assert_eq!(
            (at(10).reuse, at(50).reuse),
            (Reuse::Residual, Reuse::Forecast)
        );
        assert_eq!(
            (at(10).weight_norm, at(50).weight_norm),
            (WeightNorm::AboveMean, WeightNorm::MaxRescale)
        );
        let r = CacheSettings::for_schedule(CacheMode::MotionCacheReference, 50);
        assert_eq!((r.warmup_steps, r.uniform_updates), (5, 6));
        assert_eq!(r.motion_threshold, 0.1);
        let r = CacheSettings::for_schedule(CacheMode::MotionCacheReference, 3);
        assert_eq!(r.warmup_steps, 3);
    }

    #[test]
    fn rescale_polynomial() {
        let s = CacheSettings {
            rescale: vec![2.0, 0.0, 1.0],
            ..Default::default()
        };
        assert_eq!(s.rescaled(3.0), 19.0);
        // Wan 2.1's fit inside its range, and the raw distance where it turns negative.
        let w = CacheSettings::default();
        assert!(
            (w.rescaled(0.05) - 0.1419).abs() < 1e-3,
            "{}",
            w.rescaled(0.05)
        );
        assert_eq!(w.rescaled(0.2), 0.2);
        assert_eq!(w.rescaled(0.001), 0.001);
    }
}
