//! Generator settings: the sampling schedule, guidance and cache settings.

use crate::cache::CacheSettings;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorSettings {
    /// Denoising steps per block.
    pub steps: usize,
    /// Flow-matching sigma shift.
    pub shift: f64,
    /// Classifier-free guidance scale; guidance runs when it is above 1.
    pub guidance_scale: f64,
    /// Latent frames per causal block (1 = no block-causal mask, as in diffusers).
    pub causal_block_size: usize,
    /// Asynchronous lag in steps between consecutive blocks (0 = synchronous).
    pub ar_step: usize,
    /// Latent frames the model sees at once (diffusers' base_num_frames, in latent
    /// frames).
    pub window: usize,
    /// Latent frames of history carried into the next window.
    pub overlap: usize,
    /// Noise level added to history frames (reference: 20; 0 = off).
    pub addnoise_condition: f64,
    /// The model's fps class for `inject_sample_info` (SkyReels: 0 = 16 fps, 1 = 24 fps).
    pub fps_class: u32,
    /// Latent frames to produce in all; `None` = endless.
    pub total_frames: Option<usize>,
    pub cache: CacheSettings,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        Self {
            steps: 10,
            shift: 8.0,
            guidance_scale: 6.0,
            causal_block_size: 3,
            ar_step: 0,
            window: 9,
            overlap: 3,
            addnoise_condition: 0.0,
            fps_class: 1,
            total_frames: None,
            cache: CacheSettings::default(),
        }
    }
}

impl GeneratorSettings {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > 1000 {
            return Err(Error::setting("steps", self.steps, "must be in 1..=1000"));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(Error::setting(
                "shift",
                self.shift,
                "must be a positive number",
            ));
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(Error::setting(
                "guidance-scale",
                self.guidance_scale,
                "must be a finite number >= 0",
            ));
        }
        let bs = self.causal_block_size;
        if bs == 0 {
            return Err(Error::setting(
                "causal-block-size",
                bs,
                "must be at least 1",
            ));
        }
        if self.window == 0 || !self.window.is_multiple_of(bs) {
            return Err(Error::setting(
                "window",
                self.window,
                format!("must be a positive multiple of the causal block size {bs}"),
            ));
        }
        if !self.overlap.is_multiple_of(bs) || self.overlap >= self.window {
            return Err(Error::setting(
                "overlap",
                self.overlap,
                format!(
                    "must be a multiple of the causal block size {bs} and smaller than the window {}",
                    self.window
                ),
            ));
        }
        if !(self.addnoise_condition.is_finite()
            && (0.0..1000.0).contains(&self.addnoise_condition))
        {
            return Err(Error::setting(
                "addnoise-condition",
                self.addnoise_condition,
                "must be in [0, 1000)",
            ));
        }
        if self.fps_class > 1 {
            return Err(Error::setting(
                "fps class",
                self.fps_class,
                "must be 0 or 1",
            ));
        }
        if let Some(t) = self.total_frames
            && t == 0
        {
            return Err(Error::setting("total-frames", t, "must be at least 1"));
        }
        self.cache.validate(self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        assert!(GeneratorSettings::default().validate().is_ok());
        let bad = |s: GeneratorSettings, name: &str| {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        };
        bad(
            GeneratorSettings {
                steps: 0,
                ..Default::default()
            },
            "steps",
        );
        bad(
            GeneratorSettings {
                window: 10,
                ..Default::default()
            },
            "window",
        );
        bad(
            GeneratorSettings {
                overlap: 9,
                ..Default::default()
            },
            "overlap",
        );
        bad(
            GeneratorSettings {
                guidance_scale: f64::NAN,
                ..Default::default()
            },
            "guidance-scale",
        );
    }
}
