//! Cache policies: per attention block, branch and denoising step they decide which tokens
//! go through the transformer. `none` computes every active block in full (exact reuse of
//! finished blocks only), `teacache` and `flowcache` decide per block-step, `motioncache`
//! and `motioncache-reference` per token (arXiv 2605.01725).

mod chunk;
pub mod magi;
mod motion;
mod settings;

pub use chunk::ChunkState;
pub use motion::{MotionCacheState, clean_latent_motion, output_motion};
pub use settings::{
    CacheMode, CacheSettings, CacheVariant, DistanceMode, LONG_KV_REFRESH_WINDOW,
    LONG_MIN_UPDATE_RATIO, LONG_SCHEDULE_STEPS, MotionSource, Reuse, WAN_1_3B_RESCALE, WeightNorm,
};

use candle_core::Tensor;

/// What a forward of one attention block does at one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Every token goes through the transformer.
    Full,
    /// No token does: every output is reused (see [`Reuse`]).
    Skip,
    /// Only these tokens (sorted block-local indices) do; the others are reused.
    Tokens(Vec<u32>),
}

impl Plan {
    /// Tokens the plan computes out of `n`.
    pub fn count(&self, n: usize) -> usize {
        match self {
            Plan::Full => n,
            Plan::Skip => 0,
            Plan::Tokens(t) => t.len(),
        }
    }
}

/// What a policy sees before a block-step.
pub struct StepInfo<'a> {
    /// 0-based index of this step among the block's steps.
    pub step: usize,
    /// Steps of the block in all.
    pub steps: usize,
    /// `[frames, 6, dim]` timestep modulation of the block's frames at this step.
    pub modulation: &'a Tensor,
    /// Latent frames (post-patch) of the block and tokens per frame.
    pub frames: usize,
    pub tokens_per_frame: usize,
    /// Whether a residual from an earlier forward exists for every token.
    pub has_residual: bool,
    /// The block's noise level at this step.
    pub sigma: f64,
    /// Whether this is the video's first block: nothing generated before conditions it,
    /// and every later frame is conditioned on it.
    pub first_block: bool,
}

/// What a policy sees after a block-step.
pub struct Observation<'a> {
    /// The block's transformer input and output tokens, `[tokens, dim]`.
    pub x_in: &'a Tensor,
    pub x_out: &'a Tensor,
    /// Output tokens `[tokens_per_frame, dim]` of the last frame of the block before this
    /// one (same branch) at its latest forward: frame 0's reference for output motion.
    pub prev_last_out: Option<&'a Tensor>,
    /// The guided prediction of the block's clean latents, `[C, frames, H, W]`.
    pub x0: &'a Tensor,
    /// The previous block's clean latents (or latest prediction of them), last frame
    /// `[C, H, W]`: frame 0's reference for clean-latent motion.
    pub prev_x0_last: Option<&'a Tensor>,
    /// Spatial patch size `(ph, pw)` of the transformer.
    pub patch: (usize, usize),
    /// The tokens computed at this step whose residual was known before, with how fast
    /// their residual changed since (relative change per unit of sigma).
    pub rates: &'a [(u32, f32)],
}

/// Per (branch, block) cache state; dropped when the block is finished.
pub trait BlockPolicy: Send {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan>;
    /// Called after the step (guidance included) whatever the plan was. Chunk-level
    /// policies need nothing from it.
    fn observe(
        &mut self,
        _s: &CacheSettings,
        _info: &StepInfo,
        _plan: &Plan,
        _obs: &Observation,
    ) -> candle_core::Result<()> {
        Ok(())
    }
}

/// Computes everything, always.
pub struct NoCache;

impl BlockPolicy for NoCache {
    fn plan(&mut self, _: &CacheSettings, _: &StepInfo) -> candle_core::Result<Plan> {
        Ok(Plan::Full)
    }
}

/// A fresh policy state for a block that starts denoising.
pub fn block_policy(mode: CacheMode) -> Box<dyn BlockPolicy> {
    match mode {
        CacheMode::Vanilla | CacheMode::None => Box::new(NoCache),
        CacheMode::TeaCache | CacheMode::FlowCache => Box::new(ChunkState::default()),
        CacheMode::MotionCache | CacheMode::MotionCacheReference => {
            Box::new(MotionCacheState::default())
        }
    }
}

/// Relative L1 distance `mean|a - b| / (mean|b| + 1e-8)` of two tensors `[frames, ...]`
/// (modulations `[frames, 6, dim]`): one value per frame, or the global value repeated per
/// frame.
pub fn rel_l1(a: &Tensor, b: &Tensor, mode: DistanceMode) -> candle_core::Result<Vec<f64>> {
    use candle_core::{D, DType};
    let frames = a.dim(0)?;
    let a = a.to_dtype(DType::F32)?.flatten_from(1)?;
    let b = b.to_dtype(DType::F32)?.flatten_from(1)?;
    let num = (&a - &b)?.abs()?.mean(D::Minus1)?.to_vec1::<f32>()?;
    let den = b.abs()?.mean(D::Minus1)?.to_vec1::<f32>()?;
    Ok(match mode {
        DistanceMode::Global => {
            let n = num.iter().map(|&x| x as f64).sum::<f64>();
            let d = den.iter().map(|&x| x as f64).sum::<f64>();
            vec![n / (d + 1e-8 * frames as f64); frames]
        }
        DistanceMode::Token | DistanceMode::Observed => num
            .iter()
            .zip(&den)
            .map(|(n, d)| *n as f64 / (*d as f64 + 1e-8))
            .collect(),
    })
}
