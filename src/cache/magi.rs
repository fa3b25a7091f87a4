//! MotionCache for MAGI-1: the variant of the method that the paper runs on MAGI-1
//! (ywlq/MotionCache, folder MotionCache4MAGI-1), which differs from the SkyReels-V2 one.
//!
//! - **Metric.** The change of a chunk between two consecutive global steps is measured on
//!   its patch-embedded noisy input (`x_embedder`, [`MagiDit::embed_patches`]):
//!   `r = mean|m - m_prev| / (mean|m_prev| + 1e-8)`. There is no polynomial and no
//!   timestep modulation (MAGI-1's adaLN has neither shift nor scale).
//! - **Phases**, by the chunk's own denoising count `c`: `c < warmup` computes;
//!   `c < warmup + chunk_steps` is chunk-wise (TeaCache-style: `A += r`, the whole chunk is
//!   reused while `A` stays under the chunk threshold, and computed with `A = 0` when it
//!   reaches it); after that token-wise: `A_k += r * w_k` per token, tokens under the
//!   token threshold are reused, the others recomputed and reset to 0.
//! - **Motion weights** `w_k` come from the latent frame differences `|x_f - x_(f-1)|`
//!   (the previous frame may lie in the previous chunk), averaged over channels and over
//!   the patch, min-max normalised per frame onto `[floor, 1]`; frame 0 of the video keeps
//!   1. They are recomputed for every chunk of the window after every step.
//! - **Reuse** adds the chunk's (or token's) latent delta from its last integrated step.
//!
//! This module holds the decisions; the walk (`model::magi::walk`) does the forwards and
//! the integration.
//!
//! [`MagiDit::embed_patches`]: crate::model::magi::MagiDit::embed_patches

use candle_core::{D, DType, Tensor};

use super::Plan;

/// The settings of MAGI-1's MotionCache (the reference's names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct MagiCacheParams {
    /// Accumulated chunk change under which a chunk-wise step is reused (`rel_l1_thresh`).
    pub chunk_threshold: f64,
    /// Accumulated weighted change under which a token is reused
    /// (`token_rel_l1_thresh`).
    pub token_threshold: f64,
    /// Steps of each chunk computed in full (`warmup_steps`).
    pub warmup_steps: usize,
    /// Steps of the chunk-wise phase after the warm-up (`chunk_wise_only_steps`).
    pub chunk_steps: usize,
    /// Lowest motion weight (`temporal_weight_floor`).
    pub weight_floor: f64,
    /// Power applied to the normalised motion before the floor (`temporal_weight_power`;
    /// 1 = linear).
    pub weight_power: f64,
}

impl Default for MagiCacheParams {
    /// The reference's defaults (`addconfig/config.yaml`), which the paper's MAGI-1 rows
    /// use.
    fn default() -> Self {
        Self {
            chunk_threshold: 0.0065,
            token_threshold: 0.0065,
            warmup_steps: 5,
            chunk_steps: 20,
            weight_floor: 0.6,
            weight_power: 1.0,
        }
    }
}

/// The phase of a chunk at its `count`-th denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagiPhase {
    Warmup,
    ChunkWise,
    TokenWise,
}

impl MagiCacheParams {
    pub fn phase(&self, count: usize) -> MagiPhase {
        if count < self.warmup_steps {
            MagiPhase::Warmup
        } else if count < self.warmup_steps.saturating_add(self.chunk_steps) {
            MagiPhase::ChunkWise
        } else {
            MagiPhase::TokenWise
        }
    }
}

/// The cache state of one chunk while it is in the window.
#[derive(Debug, Clone)]
pub struct MagiChunkCache {
    /// Accumulated chunk change (chunk-wise phase), in f64 as the reference's Python float.
    acc_chunk: f64,
    /// Whether the last chunk-wise decision reused the chunk.
    chunk_reused: bool,
    /// Accumulated weighted change per token (token-wise phase), f32.
    acc_tokens: Vec<f32>,
    /// Which tokens the last token-wise decision reused.
    reused: Vec<bool>,
}

impl MagiChunkCache {
    pub fn new(tokens: usize) -> Self {
        Self {
            acc_chunk: 0.0,
            chunk_reused: false,
            acc_tokens: vec![0.0; tokens],
            reused: vec![false; tokens],
        }
    }

    /// The chunk accumulator (for tests and statistics).
    pub fn chunk_accumulator(&self) -> f64 {
        self.acc_chunk
    }

    /// The token accumulators (for tests and statistics).
    pub fn token_accumulators(&self) -> &[f32] {
        &self.acc_tokens
    }

    /// Decides the chunk's step. `count` is the chunk's denoising count before the step,
    /// `change` its metric change since the previous global step, or `None` where no
    /// decision is taken (the walk's first and last global steps, and a chunk's first step
    /// in the window): the chunk is then computed unless a token-wise chunk still has a
    /// token mask, which carries over, as in the reference. `weights` are the chunk's
    /// motion weights, one per token (only read in the token-wise phase).
    pub fn decide(
        &mut self,
        p: &MagiCacheParams,
        count: usize,
        change: Option<f32>,
        weights: &[f32],
    ) -> Plan {
        let phase = p.phase(count);
        match change {
            None => self.chunk_reused = false,
            Some(r) => match phase {
                MagiPhase::Warmup => {
                    self.chunk_reused = false;
                    self.acc_chunk = 0.0;
                }
                MagiPhase::ChunkWise => {
                    let acc = self.acc_chunk + r as f64;
                    self.chunk_reused = acc < p.chunk_threshold;
                    self.acc_chunk = if self.chunk_reused { acc } else { 0.0 };
                    self.acc_tokens.fill(0.0);
                    self.reused.fill(false);
                }
                MagiPhase::TokenWise => {
                    self.chunk_reused = false;
                    self.acc_chunk = 0.0;
                    let threshold = p.token_threshold as f32;
                    for ((acc, reused), &w) in self
                        .acc_tokens
                        .iter_mut()
                        .zip(&mut self.reused)
                        .zip(weights)
                    {
                        let a = *acc + r * w;
                        *reused = a < threshold;
                        *acc = if *reused { a } else { 0.0 };
                    }
                }
            },
        }
        match phase {
            MagiPhase::Warmup => Plan::Full,
            MagiPhase::ChunkWise if self.chunk_reused => Plan::Skip,
            MagiPhase::ChunkWise => Plan::Full,
            MagiPhase::TokenWise => {
                let computed: Vec<u32> = (0..self.reused.len() as u32)
                    .filter(|&k| !self.reused[k as usize])
                    .collect();
                if computed.is_empty() {
                    Plan::Skip
                } else if computed.len() == self.reused.len() {
                    Plan::Full
                } else {
                    Plan::Tokens(computed)
                }
            }
        }
    }
}

/// The relative L1 change `mean|m - prev| / (mean|prev| + 1e-8)` of a chunk's metric, in
/// f32 as the reference computes it.
pub fn metric_change(m: &Tensor, prev: &Tensor) -> candle_core::Result<f32> {
    let m = m.to_dtype(DType::F32)?;
    let prev = prev.to_dtype(DType::F32)?;
    let num = (&m - &prev)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    let den = prev.abs()?.mean_all()?.to_scalar::<f32>()?;
    Ok(num / (den + 1e-8))
}

/// Motion weights of one latent frame `[C, H, W]` against the frame before it: one per
/// `patch` x `patch` token, row-major, `floor + (1 - floor) * n^power` with `n` the
/// min-max normalised mean absolute difference; all 1 when the frame's differences are
/// uniform.
pub fn frame_weights(
    frame: &Tensor,
    before: &Tensor,
    patch: usize,
    floor: f64,
    power: f64,
) -> candle_core::Result<Vec<f32>> {
    let (_, h, w) = frame.dims3()?;
    if patch == 0 || h % patch != 0 || w % patch != 0 {
        candle_core::bail!("frame {h}x{w} is not a multiple of the patch size {patch}")
    }
    let d = (frame.to_dtype(DType::F32)? - before.to_dtype(DType::F32)?)?
        .abs()?
        .mean(0)?
        .reshape((h / patch, patch, w / patch, patch))?
        .mean(D::Minus1)?
        .mean(1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let lo = d.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi <= lo {
        return Ok(vec![1.0; d.len()]);
    }
    let (floor, power) = (floor as f32, power as f32);
    Ok(d.into_iter()
        .map(|x| {
            let mut n = (x - lo) / (hi - lo);
            if power != 1.0 {
                n = n.powf(power);
            }
            floor + (1.0 - floor) * n
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_counts() {
        let p = MagiCacheParams::default();
        assert_eq!(p.phase(4), MagiPhase::Warmup);
        assert_eq!(p.phase(5), MagiPhase::ChunkWise);
        assert_eq!(p.phase(24), MagiPhase::ChunkWise);
        assert_eq!(p.phase(25), MagiPhase::TokenWise);
    }

    #[test]
    fn chunk_wise_accumulates_until_the_threshold() {
        let p = MagiCacheParams::default();
        let mut c = MagiChunkCache::new(4);
        assert_eq!(c.decide(&p, 5, Some(0.004), &[1.0; 4]), Plan::Skip);
        assert_eq!(c.decide(&p, 6, Some(0.002), &[1.0; 4]), Plan::Skip);
        // 0.004 + 0.002 + 0.001 >= 0.0065: computed, and the accumulator restarts
        assert_eq!(c.decide(&p, 7, Some(0.001), &[1.0; 4]), Plan::Full);
        assert_eq!(c.chunk_accumulator(), 0.0);
        // no decision: computed whatever the accumulator says
        assert_eq!(c.decide(&p, 8, None, &[1.0; 4]), Plan::Full);
    }

    #[test]
    fn token_wise_recomputes_the_moving_tokens_and_carries_the_mask() {
        let p = MagiCacheParams::default();
        let mut c = MagiChunkCache::new(4);
        let w = [0.6, 1.0, 0.6, 1.0];
        // 0.006 * 0.6 and 0.006 * 1.0 both stay under 0.0065: every token reused
        assert_eq!(c.decide(&p, 25, Some(0.006), &w), Plan::Skip);
        // 0.0036 + 0.0036 = 0.0072 and 0.006 + 0.006: all recomputed
        assert_eq!(c.decide(&p, 26, Some(0.006), &w), Plan::Full);
        assert_eq!(c.token_accumulators(), &[0.0; 4]);
        assert_eq!(c.decide(&p, 27, Some(0.007), &w), Plan::Tokens(vec![1, 3]));
        // without a decision the last mask holds
        assert_eq!(c.decide(&p, 28, None, &w), Plan::Tokens(vec![1, 3]));
    }

    #[test]
    fn weights_span_floor_to_one_per_frame() {
        let dev = candle_core::Device::Cpu;
        let before = Tensor::zeros((2, 4, 4), DType::F32, &dev).unwrap();
        // one 2x2 patch moves by 1, one by 0.5, the others not at all
        let mut v = vec![0f32; 32];
        for c in 0..2 {
            for (y, x, val) in [(0, 0, 1.0), (0, 1, 1.0), (1, 0, 1.0), (1, 1, 1.0)] {
                v[c * 16 + y * 4 + x] = val;
            }
            for (y, x) in [(2, 2), (2, 3), (3, 2), (3, 3)] {
                v[c * 16 + y * 4 + x] = -0.5;
            }
        }
        let frame = Tensor::from_vec(v, (2, 4, 4), &dev).unwrap();
        let w = frame_weights(&frame, &before, 2, 0.6, 1.0).unwrap();
        for (got, want) in w.iter().zip([1.0, 0.6, 0.6, 0.8]) {
            assert!((got - want).abs() < 1e-6, "{w:?}");
        }
        let same = frame_weights(&before, &before, 2, 0.6, 1.0).unwrap();
        assert_eq!(same, vec![1.0; 4]);
        assert!(frame_weights(&frame, &before, 3, 0.6, 1.0).is_err());
    }
}
