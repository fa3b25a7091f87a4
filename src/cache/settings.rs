//! Cache settings: one plain struct with the reference defaults, validated.

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
    /// Chunk level with a motion-free per-block budget (FlowCache-style).
    FlowCache,
    /// Token level, motion aware.
    #[default]
    MotionCache,
}

impl CacheMode {
    pub const ALL: [CacheMode; 5] = [
        CacheMode::Vanilla,
        CacheMode::None,
        CacheMode::TeaCache,
        CacheMode::FlowCache,
        CacheMode::MotionCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Vanilla => "vanilla",
            CacheMode::None => "none",
            CacheMode::TeaCache => "teacache",
            CacheMode::FlowCache => "flowcache",
            CacheMode::MotionCache => "motioncache",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::setting(
                    "cache-mode",
                    s,
                    "expected vanilla, none, teacache, flowcache or motioncache",
                )
            })
    }
}

/// How the step distance is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DistanceMode {
    /// One scalar per block-step.
    Global,
    /// One value per token.
    #[default]
    Token,
}

/// Per-frame normalisation of the motion weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightNorm {
    Mean,
    Max,
    #[default]
    MaxRescale,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub mode: CacheMode,
    /// Full steps per block before any reuse.
    pub warmup_steps: usize,
    /// Accumulated weighted distance that triggers a token's recompute (MotionCache).
    pub motion_threshold: f64,
    /// A token is recomputed at least every N of its steps (0 = no limit).
    pub refresh_interval: usize,
    /// Phase-1 refreshes (uniform weights) before motion weights apply.
    pub uniform_updates: usize,
    /// Floor of the max-rescale normalisation.
    pub weight_floor: f64,
    /// Skip the forward when fewer than this fraction of tokens need it.
    pub min_update_ratio: f64,
    /// Threshold of the per-position vote across the block's frames (0 = off).
    pub temporal_consistency: f64,
    pub distance_mode: DistanceMode,
    pub weight_norm: WeightNorm,
    /// Rescale polynomial of the relative modulation distance, highest power first
    /// (TeaCache's fit for Wan 2.1 1.3B by default).
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
        Self {
            mode: CacheMode::MotionCache,
            // The reference's `warmup_steps = 4` runs steps 0..=4 in full: five full steps.
            warmup_steps: 5,
            motion_threshold: 0.1,
            refresh_interval: 0,
            uniform_updates: 6,
            weight_floor: 0.6,
            min_update_ratio: 0.4,
            temporal_consistency: 0.5,
            distance_mode: DistanceMode::Token,
            weight_norm: WeightNorm::MaxRescale,
            rescale: WAN_1_3B_RESCALE.to_vec(),
            teacache_threshold: 0.1,
            flowcache_threshold: 0.1,
        }
    }
}

impl CacheSettings {
    pub fn with_mode(mode: CacheMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// The reference defaults for a schedule of `steps` steps: five warm-up steps at 20
    /// steps or more (the reference runs 50), a quarter of the steps for short schedules.
    pub fn for_steps(steps: usize) -> Self {
        Self {
            warmup_steps: if steps >= 20 { 5 } else { (steps / 4).max(1) },
            ..Self::default()
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
        assert!(
            CacheMode::parse("fast")
                .unwrap_err()
                .to_string()
                .contains("cache-mode")
        );
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
