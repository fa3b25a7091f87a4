//! Block-step and token-level reuse policies (being written).

use candle_core::Tensor;

use super::{BlockPolicy, CacheSettings, Plan, StepInfo};

macro_rules! full_policy {
    ($name:ident) => {
        #[derive(Default)]
        pub struct $name;
        impl BlockPolicy for $name {
            fn plan(&mut self, _: &CacheSettings, _: &StepInfo) -> candle_core::Result<Plan> {
                Ok(Plan::Full)
            }
            fn observe(
                &mut self,
                _: &CacheSettings,
                _: &StepInfo,
                _: &Plan,
                _: &Tensor,
                _: &Tensor,
            ) -> candle_core::Result<()> {
                Ok(())
            }
        }
    };
}
full_policy!(TeaCacheState);
full_policy!(FlowCacheState);
full_policy!(MotionCacheState);
