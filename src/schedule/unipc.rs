//! Flow-matching UniPC (diffusers `UniPCMultistepScheduler` with `use_flow_sigmas`,
//! `prediction_type="flow_prediction"`, `predict_x0`, bh2), with the schedule split from
//! the per-frame solver state: diffusion forcing keeps one [`UniPcState`] per latent frame,
//! all sharing one [`FlowSchedule`].

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Scheduler settings, as in diffusers' `scheduler/scheduler_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub flow_shift: f64,
    pub use_flow_sigmas: bool,
    pub prediction_type: String,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub final_sigmas_type: String,
    pub disable_corrector: Vec<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            solver_order: 2,
            flow_shift: 8.0,
            use_flow_sigmas: true,
            prediction_type: "flow_prediction".into(),
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            final_sigmas_type: "zero".into(),
            disable_corrector: vec![],
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("malformed scheduler config: {e}")))?;
        cfg.validate().map_err(|r| Error::model(path, r))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.use_flow_sigmas || self.prediction_type != "flow_prediction" {
            return Err(format!(
                "only flow-matching UniPC is supported (use_flow_sigmas=true, \
                 prediction_type=flow_prediction), got use_flow_sigmas={} prediction_type={}",
                self.use_flow_sigmas, self.prediction_type
            ));
        }
        if !(1..=100_000).contains(&self.num_train_timesteps) {
            return Err(format!(
                "num_train_timesteps = {} is outside 1..=100000",
                self.num_train_timesteps
            ));
        }
        if !(self.flow_shift.is_finite() && self.flow_shift > 0.0 && self.flow_shift <= 100.0) {
            return Err(format!(
                "flow_shift = {} is outside (0, 100]",
                self.flow_shift
            ));
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(format!(
                "solver_order {} is not in 1..=3",
                self.solver_order
            ));
        }
        if self.solver_type != "bh1" && self.solver_type != "bh2" {
            return Err(format!(
                "solver_type {:?} is not bh1 or bh2",
                self.solver_type
            ));
        }
        if self.final_sigmas_type != "zero" && self.final_sigmas_type != "sigma_min" {
            return Err(format!(
                "final_sigmas_type {:?} unknown",
                self.final_sigmas_type
            ));
        }
        if !self.predict_x0 {
            return Err("predict_x0=false is not supported".into());
        }
        Ok(())
    }
}

/// Timesteps and sigmas of one sampling run.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSchedule {
    /// Integer timesteps as the model sees them, `steps` entries.
    pub timesteps: Vec<i64>,
    /// `steps + 1` sigmas (the last is the final sigma), stored as f32 like diffusers.
    pub sigmas: Vec<f32>,
    cfg: SchedulerConfig,
}

impl FlowSchedule {
    /// `sigmas = linspace(1, 1/T, steps+1)[:-1]`, shifted by `s*sigma/(1+(s-1)*sigma)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize, shift: f64) -> Result<Self> {
        if steps == 0 {
            return Err(Error::setting("steps", steps, "must be at least 1"));
        }
        if !(shift > 0.0 && shift.is_finite()) {
            return Err(Error::setting("shift", shift, "must be a positive number"));
        }
        let t = cfg.num_train_timesteps as f64;
        let end = 1.0 / t;
        let mut sig: Vec<f64> = (0..steps)
            .map(|i| 1.0 + (end - 1.0) * i as f64 / steps as f64)
            .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        // diffusers nudges the first sigma below 1 so that log(alpha) stays finite.
        if (sig[0] - 1.0).abs() < 1e-6 {
            sig[0] -= 1e-6;
        }
        let timesteps = sig.iter().map(|s| (s * t) as i64).collect();
        let last = if cfg.final_sigmas_type == "sigma_min" {
            sig[steps - 1]
        } else {
            0.0
        };
        let mut sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).collect();
        sigmas.push(last as f32);
        Ok(Self {
            timesteps,
            sigmas,
            cfg: cfg.clone(),
        })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// diffusers' `index_for_timestep`: the second match when a timestep repeats.
    fn index_for(&self, t: i64) -> usize {
        let m: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == t)
            .collect();
        match m.len() {
            0 => self.timesteps.len() - 1,
            1 => m[0],
            _ => m[1],
        }
    }

    /// The sigma the solver uses at model timestep `t`.
    pub fn sigma_at(&self, t: i64) -> f64 {
        self.sigmas[self.index_for(t)] as f64
    }

    fn lambda(&self, i: usize) -> f64 {
        let s = self.sigmas[i] as f64;
        (1.0 - s).ln() - s.ln()
    }
}

/// Multistep state of one latent frame.
#[derive(Debug, Clone, Default)]
pub struct UniPcState {
    step_index: Option<usize>,
    model_outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    lower_order_nums: usize,
    this_order: usize,
    alias_last_sample: bool,
}

impl UniPcState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state as diffusers' and SkyReels' diffusion-forcing loops use it: they pass a
    /// view of the latents (`latents[:, :, idx]`) and then write the result into that view,
    /// so after a step without corrector the stored `last_sample` *is* the step's output.
    /// The reference output depends on this, so the generator reproduces it.
    pub fn diffusion_forcing() -> Self {
        Self {
            alias_last_sample: true,
            ..Self::default()
        }
    }

    /// The index of the step the next call to [`UniPcState::step`] takes (None before the
    /// first step).
    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// One solver step: `model_output` is the flow (velocity) prediction at `timestep`
    /// for `sample`; returns the sample at the next sigma.
    pub fn step(
        &mut self,
        s: &FlowSchedule,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cfg = &s.cfg;
        let idx = *self.step_index.get_or_insert_with(|| s.index_for(timestep));
        if idx >= s.steps() {
            candle_core::bail!("scheduler stepped past its {} steps", s.steps());
        }
        let sigma = s.sigmas[idx] as f64;
        let x0 = (sample - (model_output * sigma)?)?;

        let use_corrector =
            idx > 0 && !cfg.disable_corrector.contains(&(idx - 1)) && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.corrector(s, idx, &x0, last)?,
            _ => sample.clone(),
        };

        if self.model_outputs.len() == cfg.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        let mut order = cfg.solver_order;
        if cfg.lower_order_final {
            order = order.min(s.steps() - idx);
        }
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predictor(s, idx, &sample)?;
        if self.alias_last_sample && !use_corrector {
            self.last_sample = Some(prev.clone());
        }
        if self.lower_order_nums < cfg.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(idx + 1);
        Ok(prev)
    }

    /// Shared UniPC coefficients: (h, rks, b) for a step from sigma index `s0` to `t`
    /// using the previous indices `prev` (most recent first).
    fn coefficients(
        s: &FlowSchedule,
        t: usize,
        s0: usize,
        prev: &[usize],
        order: usize,
    ) -> (f64, Vec<f64>, Vec<f64>, f64) {
        let h = s.lambda(t) - s.lambda(s0);
        let mut rks: Vec<f64> = prev
            .iter()
            .map(|&si| (s.lambda(si) - s.lambda(s0)) / h)
            .collect();
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if s.cfg.solver_type == "bh1" {
            hh
        } else {
            hh.exp_m1()
        };
        let mut b = Vec::with_capacity(order);
        let mut factorial = 1.0;
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, rks, b, b_h)
    }

    fn predictor(&self, s: &FlowSchedule, idx: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let order = self.this_order;
        let m = &self.model_outputs;
        let m0 = &m[m.len() - 1];
        let prev: Vec<usize> = (1..order).map(|i| idx - i).collect();
        let (h_phi_1, rks, b, b_h) = Self::coefficients(s, idx + 1, idx, &prev, order);
        let sigma_t = s.sigmas[idx + 1] as f64;
        let alpha_t = 1.0 - sigma_t;
        let sigma_s0 = s.sigmas[idx] as f64;
        let mut x_t = ((x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        if order >= 2 {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let r = r_matrix(&rks, order);
                solve(&sub(&r, order - 1), &b[..order - 1])
            };
            let mut res: Option<Tensor> = None;
            for (k, rho) in rhos.iter().enumerate() {
                let mi = &m[m.len() - 2 - k];
                let d1 = ((mi - m0)? / rks[k])?;
                let term = (d1 * *rho)?;
                res = Some(match res {
                    Some(r) => (r + term)?,
                    None => term,
                });
            }
            if let Some(r) = res {
                x_t = (x_t - (r * (alpha_t * b_h))?)?;
            }
        }
        Ok(x_t)
    }

    fn corrector(
        &self,
        s: &FlowSchedule,
        idx: usize,
        model_t: &Tensor,
        last: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let order = self.this_order;
        let m = &self.model_outputs;
        let m0 = &m[m.len() - 1];
        let prev: Vec<usize> = (1..order).map(|i| idx - (i + 1)).collect();
        let (h_phi_1, rks, b, b_h) = Self::coefficients(s, idx, idx - 1, &prev, order);
        let sigma_t = s.sigmas[idx] as f64;
        let alpha_t = 1.0 - sigma_t;
        let sigma_s0 = s.sigmas[idx - 1] as f64;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&r_matrix(&rks, order), &b)
        };
        let x_t = ((last * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let mut corr = ((model_t - m0)? * rhos[order - 1])?;
        for k in 0..order - 1 {
            let mi = &m[m.len() - 2 - k];
            let d1 = ((mi - m0)? / rks[k])?;
            corr = (corr + (d1 * rhos[k])?)?;
        }
        x_t - (corr * (alpha_t * b_h))?
    }
}

/// `R[i][j] = rks[j]^i` for i, j < order.
fn r_matrix(rks: &[f64], order: usize) -> Vec<Vec<f64>> {
    (0..order)
        .map(|i| (0..order).map(|j| rks[j].powi(i as i32)).collect())
        .collect()
}

fn sub(m: &[Vec<f64>], n: usize) -> Vec<Vec<f64>> {
    m[..n].iter().map(|r| r[..n].to_vec()).collect()
}

/// Gaussian elimination with partial pivoting for the tiny UniPC systems (order <= 3).
#[allow(clippy::needless_range_loop)]
fn solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(r, &bi)| {
            let mut r = r.clone();
            r.push(bi);
            r
        })
        .collect();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap_or(c);
        m.swap(c, p);
        for r in c + 1..n {
            let f = m[r][c] / m[c][c];
            for k in c..=n {
                m[r][k] -= f * m[c][k];
            }
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| m[r][k] * x[k]).sum();
        x[r] = (m[r][n] - s) / m[r][r];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_small_system() {
        let x = solve(&[vec![2.0, 1.0], vec![1.0, 3.0]], &[3.0, 5.0]);
        assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
    }

    #[test]
    fn schedule_shape_and_shift() {
        let s = FlowSchedule::new(&SchedulerConfig::default(), 10, 8.0).unwrap();
        assert_eq!(s.timesteps.len(), 10);
        assert_eq!(s.sigmas.len(), 11);
        assert_eq!(s.timesteps[0], 999);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]));
        assert!(FlowSchedule::new(&SchedulerConfig::default(), 0, 8.0).is_err());
        assert!(FlowSchedule::new(&SchedulerConfig::default(), 5, -1.0).is_err());
    }
}
