//! Chunk-level reuse (TeaCache / FlowCache): the whole block is computed or reused.
//!
//! Both accumulate the rescaled step distance of the block's timestep modulation and
//! compute the block when the sum reaches the threshold. FlowCache also forces the block's
//! last step (its settings say so: `full_last_step`) and, in the generator, reuses finished
//! blocks exactly; the reference's per-block TeaCache recomputes finished blocks every row.

use candle_core::Tensor;

use super::{BlockPolicy, CacheSettings, DistanceMode, Plan, StepInfo, rel_l1};

#[derive(Default)]
pub struct ChunkState {
    prev: Option<Tensor>,
    acc: f64,
}

impl BlockPolicy for ChunkState {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan> {
        let threshold = s.threshold();
        let forced = info.step < s.warmup_steps
            || !info.has_residual
            || threshold <= 0.0
            || (s.full_last_step && info.step + 1 >= info.steps);
        let plan = match (&self.prev, forced) {
            (Some(prev), false) => {
                let d = rel_l1(info.modulation, prev, DistanceMode::Global)?[0];
                self.acc += s.rescaled(d);
                if self.acc >= threshold {
                    self.acc = 0.0;
                    Plan::Full
                } else {
                    Plan::Skip
                }
            }
            _ => {
                self.acc = 0.0;
                Plan::Full
            }
        };
        self.prev = Some(info.modulation.clone());
        Ok(plan)
    }
}
