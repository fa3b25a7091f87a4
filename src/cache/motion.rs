//! Token-level MotionCache: the rescaled step distance of the block's modulation is
//! accumulated per token, weighted by how much the token moves between frames; tokens whose
//! sum reaches the threshold are recomputed, the others reused.
//!
//! One state machine serves both variants; the settings choose the reference's behaviour
//! (`motioncache-reference`: five full steps, six uniform refreshes, weights from the mixed
//! transformer output rescaled to `[0.6, 1]` per frame, a 0.5 temporal vote and a 0.4
//! minimum ratio) or this project's default (`motioncache`: a tenth of the steps in full,
//! weights at once from the predicted clean latent with a low floor, no vote or minimum
//! ratio, a staleness bound).

use candle_core::{DType, Tensor};

use super::{
    BlockPolicy, CacheSettings, DistanceMode, MotionSource, Observation, Plan, StepInfo,
    WeightNorm, rel_l1,
};

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
    /// Observed rate of change per token (`DistanceMode::Observed`).
    rates: Vec<f64>,
    prev_sigma: Option<f64>,
}

/// Raw per-token motion of the block's transformer output `[frames * tpf, dim]` (the
/// reference): the channel-mean absolute change from the previous frame relative to that
/// frame's channel-mean magnitude; frame 0 compares with the previous block's last frame
/// (block 0: frame 0 copies frame 1; a missing previous frame gives a flat row).
pub fn output_motion(
    x_out: &Tensor,
    frames: usize,
    tpf: usize,
    prev_last: Option<&Tensor>,
) -> candle_core::Result<Vec<Vec<f64>>> {
    let x = x_out.to_dtype(DType::F32)?;
    let dim = x.dim(1)?;
    let x = x.reshape((frames, tpf, dim))?;
    // Per token (row): mean|cur - prev| / mean|prev|.
    let diff = |cur: &Tensor, prev: &Tensor| rel_l1(cur, prev, DistanceMode::Token);
    let mut d: Vec<Vec<f64>> = Vec::with_capacity(frames);
    for f in 0..frames {
        let cur = x.get(f)?;
        let row = if f > 0 {
            diff(&cur, &x.get(f - 1)?)?
        } else if let Some(p) = prev_last.filter(|p| p.dims() == [tpf, dim]) {
            diff(&cur, &p.to_dtype(DType::F32)?)?
        } else {
            Vec::new()
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
    Ok(d)
}

/// Raw per-token motion of the predicted clean latent `x0` `[C, F, H, W]`: the mean
/// absolute change from the previous frame over the token's channels and patch pixels.
/// Frame 0 compares with `prev_last` `[C, H, W]` (the previous block's clean latent),
/// else copies frame 1.
pub fn clean_latent_motion(
    x0: &Tensor,
    prev_last: Option<&Tensor>,
    patch: (usize, usize),
) -> candle_core::Result<Vec<Vec<f64>>> {
    let x0 = x0.to_dtype(DType::F32)?;
    let (c, f, h, w) = x0.dims4()?;
    let (ph, pw) = patch;
    if f == 0 || h % ph != 0 || w % pw != 0 {
        candle_core::bail!("clean latent {:?} does not fit patch {patch:?}", x0.shape());
    }
    let prev = match prev_last.filter(|p| p.dims() == [c, h, w]) {
        Some(p) => Some(p.to_dtype(DType::F32)?.unsqueeze(1)?),
        None => None,
    };
    // [C, F, H, W] differences along time; frame 0 against the previous block.
    let d = if f > 1 {
        let later = (x0.narrow(1, 1, f - 1)? - x0.narrow(1, 0, f - 1)?)?;
        let first = match &prev {
            Some(p) => (x0.narrow(1, 0, 1)? - p)?,
            None => later.narrow(1, 0, 1)?,
        };
        Tensor::cat(&[first, later], 1)?
    } else {
        match &prev {
            Some(p) => (x0 - p)?,
            None => x0.ones_like()?,
        }
    };
    // Mean |d| over channels and each token's ph x pw pixels: [F, H/ph, W/pw].
    let (gh, gw) = (h / ph, w / pw);
    let m = d
        .abs()?
        .mean(0)?
        .reshape((f, gh, ph, gw, pw))?
        .mean(4)?
        .mean(2)?;
    let v = m.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.chunks(gh * gw)
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect())
}

/// Normalises raw per-frame motion rows into weights, frame-major.
pub(crate) fn normalise(s: &CacheSettings, rows: &[Vec<f64>]) -> Vec<f64> {
    let mut w = Vec::with_capacity(rows.iter().map(Vec::len).sum());
    for row in rows {
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let min = row.iter().cloned().fold(f64::MAX, f64::min);
        let mean = row.iter().sum::<f64>() / row.len().max(1) as f64;
        w.extend(row.iter().map(|&v| match s.weight_norm {
            WeightNorm::Mean => v / (mean + 1e-8),
            WeightNorm::Max => v / (max + 1e-8),
            WeightNorm::MaxRescale => {
                s.weight_floor + (1.0 - s.weight_floor) * (v - min) / (max - min + 1e-8)
            }
            WeightNorm::MeanClamp => (v / (mean + 1e-12)).clamp(s.weight_floor, 1.0),
            WeightNorm::AboveMean => {
                s.weight_floor
                    + (1.0 - s.weight_floor) * ((v - mean) / (max - mean + 1e-12)).clamp(0.0, 1.0)
            }
        }));
    }
    w
}

impl MotionCacheState {
    /// Motion weights for the block after a step, per the settings' source and
    /// normalisation.
    pub fn motion_weights(
        s: &CacheSettings,
        info: &StepInfo,
        obs: &Observation,
    ) -> candle_core::Result<Vec<f64>> {
        let rows = match s.motion_source {
            MotionSource::Output => output_motion(
                obs.x_out,
                info.frames,
                info.tokens_per_frame,
                obs.prev_last_out,
            )?,
            MotionSource::CleanLatent => clean_latent_motion(obs.x0, obs.prev_x0_last, obs.patch)?,
        };
        if rows.len() != info.frames || rows.iter().any(|r| r.len() != info.tokens_per_frame) {
            candle_core::bail!(
                "motion rows {}x{} for a block of {}x{} tokens",
                rows.len(),
                rows.first().map_or(0, Vec::len),
                info.frames,
                info.tokens_per_frame
            );
        }
        Ok(normalise(s, &rows))
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
        if self.rates.len() != n {
            self.rates = vec![0.0; n];
        }
        let prev = self.prev.replace(info.modulation.clone());
        let prev_sigma = self.prev_sigma.replace(info.sigma);
        let warm = info.step < s.warmup_steps
            || !info.has_residual
            || s.motion_threshold <= 0.0
            || (s.full_first_block && info.first_block);
        let last = s.full_last_step && info.step + 1 >= info.steps;
        let Some(prev) = prev.filter(|_| !warm && !last) else {
            return Ok(Plan::Full);
        };
        let tpf = info.tokens_per_frame;
        let dist: Vec<f64> = if s.distance_mode == DistanceMode::Observed {
            let ds = prev_sigma.map_or(0.0, |p| (p - info.sigma).abs());
            self.rates.iter().map(|r| r * ds).collect()
        } else {
            let per_frame: Vec<f64> = rel_l1(info.modulation, &prev, s.distance_mode)?
                .into_iter()
                .map(|d| s.rescaled(d))
                .collect();
            (0..n).map(|i| per_frame[i / tpf]).collect()
        };
        let mut need = vec![false; n];
        for i in 0..n {
            let w = match (&self.weights, self.phase2) {
                (Some(w), true) => w[i],
                _ => 1.0,
            };
            self.acc[i] += dist[i] * w;
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
        let mut sel: Vec<u32> = (0..n as u32).filter(|&i| need[i as usize]).collect();
        let ratio = sel.len() as f64 / n as f64;
        if !forced && ratio > 0.0 && ratio < s.min_update_ratio {
            // Too few tokens to pay for a forward: reuse all, keep accumulating.
            return Ok(Plan::Skip);
        }
        if ratio >= s.max_update_ratio {
            // So few left to reuse that all are recomputed: no stale neighbours.
            sel = (0..n as u32).collect();
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
        obs: &Observation,
    ) -> candle_core::Result<()> {
        if self.rates.len() == info.frames * info.tokens_per_frame {
            for &(i, r) in obs.rates {
                if let Some(x) = self.rates.get_mut(i as usize) {
                    *x = r as f64;
                }
            }
        }
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
            self.weights = Some(Self::motion_weights(s, info, obs)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn moving_region_gets_higher_weights() {
        // Two frames of 4 tokens; only token 1 changes between frames.
        let dev = Device::Cpu;
        let f0 = Tensor::new(&[[1f32, 1.], [1., 1.], [1., 1.], [1., 1.]], &dev).unwrap();
        let f1 = Tensor::new(&[[1f32, 1.], [3., 3.], [1., 1.], [1., 1.]], &dev).unwrap();
        let x = Tensor::cat(&[f0, f1], 0).unwrap();
        let s = CacheSettings::for_schedule(super::super::CacheMode::MotionCacheReference, 50);
        let w = normalise(&s, &output_motion(&x, 2, 4, None).unwrap());
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
    fn clean_latent_motion_follows_the_moving_patch() {
        // [C=2, F=2, H=4, W=4], patch 2x2: 4 tokens per frame; only the top-left patch
        // changes from frame 0 to frame 1; the previous block's last frame equals frame 0.
        let dev = Device::Cpu;
        let mut v = vec![0f32; 2 * 2 * 4 * 4];
        for c in 0..2 {
            for y in 0..2 {
                for x in 0..2 {
                    v[((c * 2 + 1) * 4 + y) * 4 + x] = 1.0;
                }
            }
        }
        let x0 = Tensor::from_vec(v, (2, 2, 4, 4), &dev).unwrap();
        let prev = x0.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let rows = clean_latent_motion(&x0, Some(&prev), (2, 2)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], vec![0.0; 4]);
        assert_eq!(rows[1], vec![1.0, 0.0, 0.0, 0.0]);
        let s = CacheSettings::for_schedule(super::super::CacheMode::MotionCache, 10);
        let w = normalise(&s, &rows);
        assert!((w[4] - 1.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w[5], s.weight_floor);
    }

    fn info<'a>(step: usize, m: &'a Tensor, frames: usize, tpf: usize) -> StepInfo<'a> {
        StepInfo {
            step,
            steps: 50,
            modulation: m,
            frames,
            tokens_per_frame: tpf,
            has_residual: true,
            sigma: 0.5,
            first_block: false,
        }
    }

    /// An observation of a block whose output equals its input (nothing moves).
    fn still<'a>(x: &'a Tensor, x0: &'a Tensor) -> Observation<'a> {
        Observation {
            x_in: x,
            x_out: x,
            prev_last_out: None,
            x0,
            prev_x0_last: None,
            patch: (2, 1),
            rates: &[],
        }
    }

    #[test]
    fn warmup_is_full_and_min_ratio_skips() {
        let dev = Device::Cpu;
        let s = CacheSettings {
            warmup_steps: 2,
            ..CacheSettings::for_schedule(super::super::CacheMode::MotionCacheReference, 50)
        };
        let mut st = MotionCacheState::default();
        let x = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        let x0 = Tensor::zeros((2, 2, 4, 2), DType::F32, &dev).unwrap();
        let obs = still(&x, &x0);
        for step in 0..2 {
            let m = Tensor::full(1.0f32 + step as f32, (2, 6, 2), &dev).unwrap();
            let i = info(step, &m, 2, 4);
            assert_eq!(st.plan(&s, &i).unwrap(), Plan::Full);
            st.observe(&s, &i, &Plan::Full, &obs).unwrap();
        }
        // A tiny modulation change: the polynomial is near zero, nothing crosses 0.1.
        let m = Tensor::full(2.0001f32, (2, 6, 2), &dev).unwrap();
        let i = info(2, &m, 2, 4);
        assert_eq!(st.plan(&s, &i).unwrap(), Plan::Skip);
    }

    /// With `full_first_block`, the video's first block goes through the transformer in
    /// full at every step after the warm-up, however little its modulation moved; a later
    /// block, or the first one with the setting off, reuses its tokens on the same inputs.
    #[test]
    fn first_block_is_full_after_warmup() {
        let dev = Device::Cpu;
        let on = CacheSettings {
            warmup_steps: 2,
            refresh_interval: 0,
            ..CacheSettings::for_schedule(super::super::CacheMode::MotionCache, 10)
        };
        assert!(on.full_first_block, "motioncache's default");
        let off = CacheSettings {
            full_first_block: false,
            ..on.clone()
        };
        let x = Tensor::zeros((8, 2), DType::F32, &dev).unwrap();
        let x0 = Tensor::zeros((2, 2, 4, 2), DType::F32, &dev).unwrap();
        let obs = still(&x, &x0);
        let plans = |s: &CacheSettings, first_block: bool| -> Vec<Plan> {
            let mut st = MotionCacheState::default();
            (0..6)
                .map(|step| {
                    let m = Tensor::full(2.0f32 + 1e-4 * step as f32, (2, 6, 2), &dev).unwrap();
                    let i = StepInfo {
                        first_block,
                        ..info(step, &m, 2, 4)
                    };
                    let p = st.plan(s, &i).unwrap();
                    st.observe(s, &i, &p, &obs).unwrap();
                    p
                })
                .collect()
        };
        let warm = [Plan::Full, Plan::Full];
        assert_eq!(plans(&on, true), vec![Plan::Full; 6]);
        for (s, first) in [(&on, false), (&off, true), (&off, false)] {
            let p = plans(s, first);
            assert_eq!(p[..2], warm, "first block {first}");
            assert_eq!(
                p[2..],
                vec![Plan::Skip; 4],
                "first block {first}, {:?}",
                s.full_first_block
            );
        }
    }
}
