//! The diffusion-forcing step matrix (SkyReels-V2 `generate_timestep_matrix`): which
//! denoising step every causal block is at in every iteration, synchronous (`ar_step = 0`,
//! all blocks in lockstep) or asynchronous (`ar_step > 0`, each block `ar_step` steps
//! behind the previous one: a denoising wave).
//!
//! Rows are kept per causal block; [`StepMatrix::frame_rows`] expands them to frames as the
//! reference does.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct StepMatrix {
    /// Per iteration, per block: index into the step template `[999, t_1 .. t_n, 0]`.
    /// 0 = not started, `steps + 1` = finished.
    pub index: Vec<Vec<usize>>,
    /// Per iteration, per block: whether the block takes a solver step.
    pub update: Vec<Vec<bool>>,
    /// Per iteration: the window of blocks the model sees, `[start, end)`.
    pub valid: Vec<(usize, usize)>,
    pub steps: usize,
    pub num_blocks: usize,
}

impl StepMatrix {
    /// `num_blocks` causal blocks, `steps` denoising steps, a model window of
    /// `base_num_blocks` blocks, the first `pre_ready_blocks` blocks already clean.
    pub fn new(
        num_blocks: usize,
        steps: usize,
        base_num_blocks: usize,
        ar_step: usize,
        pre_ready_blocks: usize,
    ) -> Result<Self> {
        if num_blocks == 0 {
            return Err(Error::setting(
                "num_blocks",
                0,
                "at least one block is needed",
            ));
        }
        if base_num_blocks == 0 {
            return Err(Error::setting(
                "base_num_blocks",
                0,
                "the window holds no block",
            ));
        }
        if base_num_blocks < num_blocks {
            let min = steps.div_ceil(base_num_blocks);
            if ar_step < min {
                return Err(Error::setting(
                    "ar-step",
                    ar_step,
                    format!(
                        "must be at least {min} for {steps} steps over a window of {base_num_blocks} blocks"
                    ),
                ));
            }
        }
        let n_iter = steps + 1;
        let mut pre = vec![0usize; num_blocks];
        for p in pre.iter_mut().take(pre_ready_blocks.min(num_blocks)) {
            *p = n_iter;
        }
        let mut index = Vec::new();
        let mut update = Vec::new();
        while !pre.iter().all(|&p| p >= n_iter - 1) {
            let mut row = vec![0i64; num_blocks];
            for i in 0..num_blocks {
                row[i] = if i == 0 || pre[i - 1] >= n_iter - 1 {
                    pre[i] as i64 + 1
                } else {
                    row[i - 1] - ar_step as i64
                };
            }
            let row: Vec<usize> = row
                .iter()
                .map(|&r| r.clamp(0, n_iter as i64) as usize)
                .collect();
            update.push(
                row.iter()
                    .zip(&pre)
                    .map(|(&r, &p)| r != p && r != n_iter)
                    .collect(),
            );
            index.push(row.clone());
            pre = row;
        }
        let mut terminal = base_num_blocks;
        let valid = update
            .iter()
            .map(|m: &Vec<bool>| {
                if terminal < num_blocks && m[terminal] {
                    terminal += 1;
                }
                (
                    terminal.saturating_sub(base_num_blocks),
                    terminal.min(num_blocks),
                )
            })
            .collect();
        Ok(Self {
            index,
            update,
            valid,
            steps,
            num_blocks,
        })
    }

    pub fn iterations(&self) -> usize {
        self.index.len()
    }

    /// The model timestep of step-template index `i` given the schedule's timesteps.
    pub fn timestep(&self, i: usize, timesteps: &[i64]) -> i64 {
        if i == 0 {
            999
        } else if i > self.steps {
            0
        } else {
            timesteps[i - 1]
        }
    }

    pub fn is_finished(&self, i: usize) -> bool {
        i > self.steps
    }

    /// Per-frame rows `(timesteps, update)` for iteration `it`, the reference's layout.
    pub fn frame_rows(&self, it: usize, block: usize, timesteps: &[i64]) -> (Vec<i64>, Vec<bool>) {
        let mut t = Vec::with_capacity(self.num_blocks * block);
        let mut u = Vec::with_capacity(self.num_blocks * block);
        for b in 0..self.num_blocks {
            for _ in 0..block {
                t.push(self.timestep(self.index[it][b], timesteps));
                u.push(self.update[it][b]);
            }
        }
        (t, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_is_lockstep() {
        let m = StepMatrix::new(3, 4, 3, 0, 0).unwrap();
        assert_eq!(m.iterations(), 4);
        for (i, row) in m.index.iter().enumerate() {
            assert!(row.iter().all(|&r| r == i + 1));
        }
        assert!(m.update.iter().all(|r| r.iter().all(|&u| u)));
    }

    #[test]
    fn async_wave_lags_by_ar_step() {
        let m = StepMatrix::new(3, 4, 3, 2, 0).unwrap();
        // Block 1 starts 2 iterations after block 0, block 2 another 2 later.
        assert_eq!(m.index[0], vec![1, 0, 0]);
        assert_eq!(m.index[2], vec![3, 1, 0]);
        assert_eq!(m.index[4], vec![5, 3, 1]);
        // Every block is updated exactly `steps` times.
        for b in 0..3 {
            assert_eq!(m.update.iter().filter(|r| r[b]).count(), 4);
        }
    }

    #[test]
    fn too_small_ar_step_is_an_error() {
        assert!(StepMatrix::new(6, 10, 3, 1, 0).is_err());
        assert!(StepMatrix::new(6, 10, 3, 4, 0).is_ok());
    }
}
