//! The reuse policies: chunk-level TeaCache / FlowCache and token-level MotionCache.
//!
//! All three measure how much a block's timestep modulation moved since its previous step
//! (relative L1, rescaled by the model's polynomial) and accumulate it; MotionCache weights
//! the accumulation per token by how much that token moves between frames.

use candle_core::{D, DType, Tensor};

use super::{BlockPolicy, CacheSettings, DistanceMode, Plan, StepInfo, WeightNorm};

/// Relative L1 distance `mean|a - b| / (mean|b| + 1e-8)` of two modulation tensors
/// `[frames, 6, dim]`: one value per frame, or the global value repeated per frame.
fn rel_l1(a: &Tensor, b: &Tensor, mode: DistanceMode) -> candle_core::Result<Vec<f64>> {
    let frames = a.dim(0)?;
    let a = a.to_dtype(DType::F32)?.flatten_from(1)?;
    let b = b.to_dtype(DType::F32)?.flatten_from(1)?;
    let num = (&a - &b)?.abs()?;
    let den = b.abs()?;
    Ok(match mode {
        DistanceMode::Global => {
            let n = num.mean_all()?.to_scalar::<f32>()? as f64;
            let d = den.mean_all()?.to_scalar::<f32>()? as f64;
            vec![n / (d + 1e-8); frames]
        }
        DistanceMode::Token => {
            let n = num.mean(D::Minus1)?.to_vec1::<f32>()?;
            let d = den.mean(D::Minus1)?.to_vec1::<f32>()?;
            n.iter()
                .zip(&d)
                .map(|(n, d)| *n as f64 / (*d as f64 + 1e-8))
                .collect()
        }
    })
}

/// Chunk-level reuse (TeaCache / FlowCache): the whole block is computed or reused.
#[derive(Default)]
pub struct ChunkState {
    prev: Option<Tensor>,
    acc: f64,
    /// FlowCache forces the block's last step to be computed; TeaCache does not.
    force_last: bool,
}

pub type TeaCacheState = ChunkState;

/// FlowCache's per-block decision (the block's final step is always computed).
pub struct FlowCacheState(ChunkState);

impl Default for FlowCacheState {
    fn default() -> Self {
        Self(ChunkState {
            force_last: true,
            ..ChunkState::default()
        })
    }
}

impl ChunkState {
    fn decide(
        &mut self,
        s: &CacheSettings,
        info: &StepInfo,
        threshold: f64,
    ) -> candle_core::Result<Plan> {
        let forced = info.step < s.warmup_steps
            || !info.has_residual
            || threshold <= 0.0
            || (self.force_last && info.step + 1 >= info.steps);
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

impl BlockPolicy for ChunkState {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan> {
        let t = s.teacache_threshold;
        self.decide(s, info, t)
    }
}

impl BlockPolicy for FlowCacheState {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan> {
        let t = s.flowcache_threshold;
        self.0.decide(s, info, t)
    }
}

/// MotionCache state of one block in one guidance branch.
#[derive(Default)]
pub struct MotionCacheState {
    prev: Option<Tensor>,
    /// Accumulated weighted distance per token.
    acc: Vec<f64>,
    /// Steps since each token was last recomputed.
    age: Vec<usize>,
    /// Motion weights per token (phase 2).
    weights: Option<Vec<f64>>,
    refreshes: usize,
    phase2: bool,
}

impl MotionCacheState {
    /// Motion weights from the block's output tokens `[frames * tpf, dim]`: per spatial
    /// token the channel-mean absolute change from the previous frame relative to that
    /// frame's channel-mean magnitude; frame 0 compares with the previous block's last frame
    /// (block 0 copies frame 1). Normalised per frame.
    pub fn motion_weights(
        s: &CacheSettings,
        x_out: &Tensor,
        frames: usize,
        tpf: usize,
        prev_last_frame: Option<&Tensor>,
    ) -> candle_core::Result<Vec<f64>> {
        let x = x_out.to_dtype(DType::F32)?;
        let dim = x.dim(1)?;
        let x = x.reshape((frames, tpf, dim))?;
        let mut d: Vec<Vec<f64>> = Vec::with_capacity(frames);
        let diff = |cur: &Tensor, prev: &Tensor| -> candle_core::Result<Vec<f64>> {
            let num = (cur - prev)?.abs()?.mean(D::Minus1)?.to_vec1::<f32>()?;
            let den = prev.abs()?.mean(D::Minus1)?.to_vec1::<f32>()?;
            Ok(num
                .iter()
                .zip(&den)
                .map(|(n, d)| *n as f64 / (*d as f64 + 1e-8))
                .collect())
        };
        for f in 0..frames {
            let cur = x.get(f)?;
            let row = if f > 0 {
                diff(&cur, &x.get(f - 1)?)?
            } else if let Some(p) = prev_last_frame.filter(|p| p.dims() == [tpf, dim]) {
                diff(&cur, &p.to_dtype(DType::F32)?)?
            } else {
                Vec::new() // filled from frame 1 below
            };
            d.push(row);
        }
        if d[0].is_empty() {
            d[0] = if frames > 1 {
                d[1].clone()
            } else {
                vec![1.0; tpf]
            };
        }
        let mut w = Vec::with_capacity(frames * tpf);
        for row in d {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let min = row.iter().cloned().fold(f64::MAX, f64::min);
            let mean = row.iter().sum::<f64>() / row.len().max(1) as f64;
            w.extend(row.iter().map(|&v| match s.weight_norm {
                WeightNorm::Mean => v / (mean + 1e-8),
                WeightNorm::Max => v / (max + 1e-8),
                WeightNorm::MaxRescale => {
                    s.weight_floor + (1.0 - s.weight_floor) * (v - min) / (max - min + 1e-8)
                }
            }));
        }
        Ok(w)
    }
}

impl BlockPolicy for MotionCacheState {
    fn plan(&mut self, s: &CacheSettings, info: &StepInfo) -> candle_core::Result<Plan> {
        let n = info.frames * info.tokens_per_frame;
        if self.acc.len() != n {
            self.acc = vec![0.0; n];
            self.age = vec![0; n];
            self.weights = None;
        }
        let prev = self.prev.replace(info.modulation.clone());
        let warm = info.step < s.warmup_steps || !info.has_residual || s.motion_threshold <= 0.0;
        let Some(prev) = prev.filter(|_| !warm) else {
            return Ok(Plan::Full);
        };
        let dist: Vec<f64> = rel_l1(info.modulation, &prev, s.distance_mode)?
            .into_iter()
            .map(|d| s.rescaled(d))
            .collect();
        let tpf = info.tokens_per_frame;
        let mut need = vec![false; n];
        for i in 0..n {
            let w = match (&self.weights, self.phase2) {
                (Some(w), true) => w[i],
                _ => 1.0,
            };
            self.acc[i] += dist[i / tpf] * w;
            self.age[i] += 1;
            need[i] = self.acc[i] >= s.motion_threshold;
        }
        // Temporal consistency: a position is recomputed in every frame of the block when
        // more than the threshold fraction of its frames select it, and in none otherwise.
        if s.temporal_consistency > 0.0 && info.frames > 1 {
            for pos in 0..tpf {
                let votes = (0..info.frames).filter(|f| need[f * tpf + pos]).count();
                let on = votes as f64 / info.frames as f64 > s.temporal_consistency;
                for f in 0..info.frames {
                    need[f * tpf + pos] = on;
                }
            }
        }
        // Staleness bound: tokens not recomputed for `refresh_interval` steps go anyway.
        let mut forced = false;
        if s.refresh_interval > 0 {
            for (nd, &age) in need.iter_mut().zip(&self.age) {
                if age >= s.refresh_interval && !*nd {
                    *nd = true;
                    forced = true;
                }
            }
        }
        let sel: Vec<u32> = (0..n as u32).filter(|&i| need[i as usize]).collect();
        let ratio = sel.len() as f64 / n as f64;
        if !forced && ratio > 0.0 && ratio < s.min_update_ratio {
            // Too few tokens to pay for a forward: reuse all, keep accumulating.
            return Ok(Plan::Skip);
        }
        for &i in &sel {
            self.acc[i as usize] = 0.0;
            self.age[i as usize] = 0;
        }
        Ok(if sel.is_empty() {
            Plan::Skip
        } else if sel.len() == n {
            Plan::Full
        } else {
            Plan::Tokens(sel)
        })
    }

    fn observe(
        &mut self,
        s: &CacheSettings,
        info: &StepInfo,
        plan: &Plan,
        _x_in: &Tensor,
        x_out: &Tensor,
    ) -> candle_core::Result<()> {
        let warm = info.step < s.warmup_steps;
        if warm || matches!(plan, Plan::Full) {
            self.age.iter_mut().for_each(|a| *a = 0);
        }
        if warm {
            // The last warm-up step seeds the cache: phase 1 starts from here.
            if info.step + 1 == s.warmup_steps {
                self.acc.iter_mut().for_each(|a| *a = 0.0);
                self.refreshes = 0;
                self.phase2 = s.uniform_updates == 0;
            }
        } else if !self.phase2 && *plan != Plan::Skip {
            self.refreshes += 1;
            if self.refreshes >= s.uniform_updates {
                self.phase2 = true;
            }
        }
        if self.phase2 {
            self.weights = Some(Self::motion_weights(
                s,
                x_out,
                info.frames,
                info.tokens_per_frame,
                info.prev_last_frame,
            )?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn info<'a>(step: usize, m: &'a Tensor, frames: usize, tpf: usize) -> StepInfo<'a> {
        StepInfo {
            step,
            steps: 50,
            modulation: m,
            frames,
            tokens_per_frame: tpf,
            has_residual: true,
            prev_last_frame: None,
        }
    }

    #[test]
    fn moving_region_gets_higher_weights() {
        // Two frames of 4 tokens; only token 1 changes between frames.
        let dev = Device::Cpu;
        let f0 = Tensor::new(&[[1f32, 1.], [1., 1.], [1., 1.], [1., 1.]], &dev).unwrap();
        let f1 = Tensor::new(&[[1f32, 1.], [3., 3.], [1., 1.], [1., 1.]], &dev).unwrap();
        let x = Tensor::cat(&[f0, f1], 0).unwrap();
        let s = CacheSettings::default();
        let w = MotionCacheState::motion_weights(&s, &x, 2, 4, None).unwrap();
        assert!(
            (w[5] - 1.0).abs() < 1e-6,
            "moving token gets the top weight"
        );
        assert!(
            (w[4] - s.weight_floor).abs() < 1e-6,
            "static token gets the floor"
        );
        // Block 0: frame 0 copies frame 1's weights.
        assert_eq!(w[..4], w[4..]);
    }

    #[test]
    fn warmup_is_full_and_min_ratio_skips() {
        let dev = Device::Cpu;
        let s = CacheSettings {
            warmup_steps: 2,
            ..Default::default()
        };
        let mut st = MotionCacheState::default();
        let x = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        for step in 0..2 {
            let m = Tensor::full(1.0f32 + step as f32, (2, 6, 2), &dev).unwrap();
            let i = info(step, &m, 2, 4);
            assert_eq!(st.plan(&s, &i).unwrap(), Plan::Full);
            st.observe(&s, &i, &Plan::Full, &x, &x).unwrap();
        }
        // A tiny modulation change: the polynomial is near zero, nothing crosses 0.1.
        let m = Tensor::full(2.0001f32, (2, 6, 2), &dev).unwrap();
        let i = info(2, &m, 2, 4);
        assert_eq!(st.plan(&s, &i).unwrap(), Plan::Skip);
    }
}
