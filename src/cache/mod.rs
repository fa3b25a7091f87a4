//! Cache policies: per attention block, branch and denoising step they decide which tokens
//! go through the transformer. `none` computes every active block in full (exact reuse of
//! finished blocks only), `teacache` and `flowcache` decide per block-step, `motioncache`
//! per token (arXiv 2605.01725).

mod motion;
mod settings;

pub use motion::{ChunkState, FlowCacheState, MotionCacheState, TeaCacheState};
pub use settings::{CacheMode, CacheSettings, DistanceMode, WAN_1_3B_RESCALE, WeightNorm};

use candle_core::Tensor;

/// What a forward of one attention block does at one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Every token goes through the transformer.
    Full,
    /// No token does: every output is `input + cached residual`.
    Skip,
    /// Only these tokens (sorted block-local indices) do; the others reuse their residual.
    Tokens(Vec<u32>),
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
    /// Output tokens `[tokens_per_frame, dim]` of the last frame of the block before this
    /// one (same branch), as of its latest forward: frame 0's motion reference.
    pub prev_last_frame: Option<&'a Tensor>,
}

/// Per (branch, block) cache state; dropped when the block is finished.
pub trait BlockPolicy: Send {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan>;
    /// Called after the forward with the block's transformer input and output tokens
    /// (`[tokens, dim]`), whatever the plan was. Chunk-level policies need nothing from it.
    fn observe(
        &mut self,
        _s: &CacheSettings,
        _info: &StepInfo,
        _plan: &Plan,
        _x_in: &Tensor,
        _x_out: &Tensor,
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
        CacheMode::TeaCache => Box::new(motion::TeaCacheState::default()),
        CacheMode::FlowCache => Box::new(motion::FlowCacheState::default()),
        CacheMode::MotionCache => Box::new(MotionCacheState::default()),
    }
}
