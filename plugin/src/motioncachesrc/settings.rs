//! The element's property values and their mapping onto the core's generator settings.
//!
//! Numeric schedule and cache properties use -1 for "the model's default" (the model
//! directory's defaults, `ModelInfo::defaults`), so a property only overrides what the user
//! actually set and gst-inspect shows an honest default.

use candle_core::DType;
use motioncache::cache::CacheMode;
use motioncache::generate::GeneratorSettings;

use super::{CacheModeProp, DTypeProp, FullFirstBlockProp, KvRefreshProp, OverlayProp};

pub const DEFAULT_MODEL: &str = "";
pub const DEFAULT_PROMPT: &str = "a red circle moving right on a striped blue background";
pub const DEFAULT_NEGATIVE_PROMPT: &str = "";
pub const DEFAULT_SEED: u64 = 0;
/// "Use the model's default" for integer and float properties.
pub const MODEL_DEFAULT: i32 = -1;
pub const MODEL_DEFAULT_F: f64 = -1.0;
pub const DEFAULT_FPS: (i32, i32) = (0, 1);
pub const DEFAULT_DEVICE: &str = "cpu";
pub const DEFAULT_DTYPE: DTypeProp = DTypeProp::Auto;
pub const DEFAULT_CACHE_MODE: CacheModeProp = CacheModeProp::MotionCache;
pub const DEFAULT_IS_LIVE: bool = false;
pub const DEFAULT_OVERLAY: OverlayProp = OverlayProp::None;
pub const DEFAULT_KV_REFRESH: KvRefreshProp = KvRefreshProp::Auto;
pub const DEFAULT_FULL_FIRST_BLOCK: FullFirstBlockProp = FullFirstBlockProp::Auto;

/// Property values as the user set them (Clone: copied under a short lock).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Model directory; empty = the embedded tiny model.
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: i32,
    pub guidance_scale: f64,
    pub shift: f64,
    pub causal_block_size: i32,
    pub ar_step: i32,
    pub window: i32,
    pub overlap: i32,
    /// Frame size; -1 = negotiated (the model's native size when downstream leaves it
    /// open).
    pub width: i32,
    pub height: i32,
    /// Output frame rate; 0/1 = the model's native rate (or what downstream asks for).
    pub fps: (i32, i32),
    pub device: String,
    pub dtype: DTypeProp,
    pub cache_mode: CacheModeProp,
    pub warmup_steps: i32,
    pub motion_threshold: f64,
    pub refresh_interval: i32,
    pub uniform_updates: i32,
    pub weight_floor: f64,
    pub min_update_ratio: f64,
    pub max_update_ratio: f64,
    pub temporal_consistency: f64,
    pub kv_refresh: KvRefreshProp,
    pub kv_refresh_window: i32,
    pub full_first_block: FullFirstBlockProp,
    pub is_live: bool,
    pub overlay: OverlayProp,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            prompt: DEFAULT_PROMPT.to_string(),
            negative_prompt: DEFAULT_NEGATIVE_PROMPT.to_string(),
            seed: DEFAULT_SEED,
            steps: MODEL_DEFAULT,
            guidance_scale: MODEL_DEFAULT_F,
            shift: MODEL_DEFAULT_F,
            causal_block_size: MODEL_DEFAULT,
            ar_step: MODEL_DEFAULT,
            window: MODEL_DEFAULT,
            overlap: MODEL_DEFAULT,
            width: MODEL_DEFAULT,
            height: MODEL_DEFAULT,
            fps: DEFAULT_FPS,
            device: DEFAULT_DEVICE.to_string(),
            dtype: DEFAULT_DTYPE,
            cache_mode: DEFAULT_CACHE_MODE,
            warmup_steps: MODEL_DEFAULT,
            motion_threshold: MODEL_DEFAULT_F,
            refresh_interval: MODEL_DEFAULT,
            uniform_updates: MODEL_DEFAULT,
            weight_floor: MODEL_DEFAULT_F,
            min_update_ratio: MODEL_DEFAULT_F,
            max_update_ratio: MODEL_DEFAULT_F,
            temporal_consistency: MODEL_DEFAULT_F,
            kv_refresh: DEFAULT_KV_REFRESH,
            kv_refresh_window: MODEL_DEFAULT,
            full_first_block: DEFAULT_FULL_FIRST_BLOCK,
            is_live: DEFAULT_IS_LIVE,
            overlay: DEFAULT_OVERLAY,
        }
    }
}

/// A non-negative property value overrides the default; -1 keeps it.
fn int_or(v: i32, default: usize) -> usize {
    usize::try_from(v).unwrap_or(default)
}

fn float_or(v: f64, default: f64) -> f64 {
    if v < 0.0 { default } else { v }
}

impl Settings {
    /// The generator settings these properties ask for on top of the model's defaults,
    /// validated (the error names the property and the value). Endless stream:
    /// `num-buffers` on the element ends it.
    pub fn generator_settings(
        &self,
        defaults: &GeneratorSettings,
    ) -> motioncache::Result<GeneratorSettings> {
        let d = defaults;
        let mut s = d.clone();
        s.steps = int_or(self.steps, d.steps);
        s.guidance_scale = float_or(self.guidance_scale, d.guidance_scale);
        s.shift = float_or(self.shift, d.shift);
        s.causal_block_size = int_or(self.causal_block_size, d.causal_block_size);
        s.ar_step = int_or(self.ar_step, d.ar_step);
        s.window = int_or(self.window, d.window);
        s.overlap = int_or(self.overlap, d.overlap);
        s.total_frames = None;

        // -1 = the selected mode's default for this schedule (so a cache mode switched
        // while playing brings its own defaults), with the model's rescale polynomial.
        let mode = cache_mode(self.cache_mode);
        let m = d.cache.defaults_for(mode, s.steps);
        s.cache = m.clone();
        let c = &mut s.cache;
        c.warmup_steps = int_or(self.warmup_steps, m.warmup_steps);
        let threshold = float_or(self.motion_threshold, m.threshold());
        c.set_threshold(threshold);
        c.refresh_interval = int_or(self.refresh_interval, m.refresh_interval);
        c.uniform_updates = int_or(self.uniform_updates, m.uniform_updates);
        c.weight_floor = float_or(self.weight_floor, m.weight_floor);
        c.min_update_ratio = float_or(self.min_update_ratio, m.min_update_ratio);
        c.max_update_ratio = float_or(self.max_update_ratio, m.max_update_ratio);
        c.temporal_consistency = float_or(self.temporal_consistency, m.temporal_consistency);
        match self.kv_refresh {
            KvRefreshProp::Auto => {}
            KvRefreshProp::On => c.kv_refresh = true,
            KvRefreshProp::Off => c.kv_refresh = false,
        }
        c.kv_refresh_window = int_or(self.kv_refresh_window, m.kv_refresh_window);
        match self.full_first_block {
            FullFirstBlockProp::Auto => {}
            FullFirstBlockProp::On => c.full_first_block = true,
            FullFirstBlockProp::Off => c.full_first_block = false,
        }
        s.validate()?;
        Ok(s)
    }

    /// The data type on `device`: `auto` is bf16 on CUDA (f32 matmuls there are about
    /// 10x slower) and f32 on the CPU (whose matmuls have no bf16 kernel).
    pub fn dtype(&self, device: &candle_core::Device) -> DType {
        match self.dtype {
            DTypeProp::Auto if device.is_cpu() => DType::F32,
            DTypeProp::Auto => DType::BF16,
            DTypeProp::F32 => DType::F32,
            DTypeProp::F16 => DType::F16,
            DTypeProp::BF16 => DType::BF16,
        }
    }

    /// Whether the property `name` differs from its default (a value the user set).
    pub fn is_set(&self, name: &str) -> bool {
        let d = Settings::default();
        match name {
            "negative-prompt" => self.negative_prompt != d.negative_prompt,
            "steps" => self.steps != d.steps,
            "guidance-scale" => self.guidance_scale != d.guidance_scale,
            "shift" => self.shift != d.shift,
            "causal-block-size" => self.causal_block_size != d.causal_block_size,
            "ar-step" => self.ar_step != d.ar_step,
            "window" => self.window != d.window,
            "overlap" => self.overlap != d.overlap,
            "cache-mode" => self.cache_mode != d.cache_mode,
            "warmup-steps" => self.warmup_steps != d.warmup_steps,
            "motion-threshold" => self.motion_threshold != d.motion_threshold,
            "refresh-interval" => self.refresh_interval != d.refresh_interval,
            "uniform-updates" => self.uniform_updates != d.uniform_updates,
            "weight-floor" => self.weight_floor != d.weight_floor,
            "min-update-ratio" => self.min_update_ratio != d.min_update_ratio,
            "max-update-ratio" => self.max_update_ratio != d.max_update_ratio,
            "temporal-consistency" => self.temporal_consistency != d.temporal_consistency,
            "kv-refresh" => self.kv_refresh != d.kv_refresh,
            "kv-refresh-window" => self.kv_refresh_window != d.kv_refresh_window,
            "full-first-block" => self.full_first_block != d.full_first_block,
            _ => false,
        }
    }

    /// These settings with the properties `names` back at their defaults (what a model
    /// that ignores them runs with).
    pub fn without(&self, names: &[&str]) -> Settings {
        let d = Settings::default();
        let mut s = self.clone();
        for name in names {
            match *name {
                "negative-prompt" => s.negative_prompt = d.negative_prompt.clone(),
                "steps" => s.steps = d.steps,
                "guidance-scale" => s.guidance_scale = d.guidance_scale,
                "shift" => s.shift = d.shift,
                "causal-block-size" => s.causal_block_size = d.causal_block_size,
                "ar-step" => s.ar_step = d.ar_step,
                "window" => s.window = d.window,
                "overlap" => s.overlap = d.overlap,
                "cache-mode" => s.cache_mode = d.cache_mode,
                "warmup-steps" => s.warmup_steps = d.warmup_steps,
                "motion-threshold" => s.motion_threshold = d.motion_threshold,
                "refresh-interval" => s.refresh_interval = d.refresh_interval,
                "uniform-updates" => s.uniform_updates = d.uniform_updates,
                "weight-floor" => s.weight_floor = d.weight_floor,
                "min-update-ratio" => s.min_update_ratio = d.min_update_ratio,
                "max-update-ratio" => s.max_update_ratio = d.max_update_ratio,
                "temporal-consistency" => s.temporal_consistency = d.temporal_consistency,
                "kv-refresh" => s.kv_refresh = d.kv_refresh,
                "kv-refresh-window" => s.kv_refresh_window = d.kv_refresh_window,
                "full-first-block" => s.full_first_block = d.full_first_block,
                _ => {}
            }
        }
        s
    }

    /// The fixed output rate the user asked for, if any.
    pub fn fixed_fps(&self) -> Option<(i32, i32)> {
        (self.fps.0 > 0 && self.fps.1 > 0).then_some(self.fps)
    }

    /// The frame width and height the user fixed, if any.
    pub fn fixed_size(&self) -> (Option<usize>, Option<usize>) {
        let side = |v: i32| usize::try_from(v).ok().filter(|&v| v > 0);
        (side(self.width), side(self.height))
    }

    /// The prompts the generator should use.
    pub fn prompts(&self) -> (String, String) {
        (self.prompt.clone(), self.negative_prompt.clone())
    }
}

pub fn cache_mode(p: CacheModeProp) -> CacheMode {
    match p {
        CacheModeProp::Vanilla => CacheMode::Vanilla,
        CacheModeProp::None => CacheMode::None,
        CacheModeProp::TeaCache => CacheMode::TeaCache,
        CacheModeProp::FlowCache => CacheMode::FlowCache,
        CacheModeProp::MotionCache => CacheMode::MotionCache,
        CacheModeProp::MotionCacheReference => CacheMode::MotionCacheReference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_auto_is_f32_on_the_cpu_and_explicit_types_are_kept() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(Settings::default().dtype, DTypeProp::Auto);
        assert_eq!(Settings::default().dtype(&cpu), DType::F32);
        let bf16 = Settings {
            dtype: DTypeProp::BF16,
            ..Default::default()
        };
        assert_eq!(bf16.dtype(&cpu), DType::BF16);
    }

    #[test]
    fn defaults_follow_the_model_and_overrides_apply() {
        let model = GeneratorSettings {
            steps: 8,
            ..Default::default()
        };
        let s = Settings::default().generator_settings(&model).unwrap();
        assert_eq!(s.steps, 8);
        // motioncache's warm-up scaled to 8 steps
        assert_eq!(s.cache.warmup_steps, 2);
        assert_eq!(s.cache.mode, CacheMode::MotionCache);
        assert_eq!(s.total_frames, None);
        // The reference mode's own defaults, clamped to the schedule.
        let r = Settings {
            cache_mode: CacheModeProp::MotionCacheReference,
            ..Default::default()
        }
        .generator_settings(&model)
        .unwrap();
        assert_eq!((r.cache.warmup_steps, r.cache.uniform_updates), (5, 6));
        // kv-refresh: auto = the mode's (motioncache on at every schedule and threshold,
        // the reference off), else forced.
        assert!(s.cache.kv_refresh && !r.cache.kv_refresh);
        let kv = |mode: CacheModeProp, t: f64, kv: KvRefreshProp| {
            Settings {
                cache_mode: mode,
                motion_threshold: t,
                kv_refresh: kv,
                ..Default::default()
            }
            .generator_settings(&model)
            .unwrap()
            .cache
            .kv_refresh
        };
        let (mc, reference) = (
            CacheModeProp::MotionCache,
            CacheModeProp::MotionCacheReference,
        );
        assert!(kv(mc, 0.01, KvRefreshProp::Auto) && kv(mc, 10.0, KvRefreshProp::Auto));
        assert!(!kv(mc, 0.01, KvRefreshProp::Off) && !kv(reference, 0.1, KvRefreshProp::Auto));
        assert!(kv(reference, 0.1, KvRefreshProp::On));
        let off = Settings {
            kv_refresh: KvRefreshProp::Off,
            ..Default::default()
        };
        assert!(off.is_set("kv-refresh") && !off.without(&["kv-refresh"]).is_set("kv-refresh"));
        // kv-refresh-window: -1 = the mode's (motioncache 2 from 20 steps on, every reused
        // token below; the reference 0), else as set.
        let window = |mode: CacheModeProp, steps: i32, w: i32| {
            Settings {
                cache_mode: mode,
                steps,
                kv_refresh_window: w,
                ..Default::default()
            }
            .generator_settings(&model)
            .unwrap()
            .cache
            .kv_refresh_window
        };
        assert_eq!(window(mc, -1, -1), 0);
        assert_eq!(window(mc, 50, -1), 2);
        assert_eq!(window(reference, 50, -1), 0);
        assert_eq!(window(mc, 50, 0), 0);
        assert_eq!(window(mc, 10, 3), 3);
        let w = Settings {
            kv_refresh_window: 1,
            ..Default::default()
        };
        assert!(w.is_set("kv-refresh-window"));
        assert!(
            !w.without(&["kv-refresh-window"])
                .is_set("kv-refresh-window")
        );
        // full-first-block: auto = the mode's (motioncache on, the reference off).
        assert!(s.cache.full_first_block && !r.cache.full_first_block);
        let first = |mode: CacheModeProp, p: FullFirstBlockProp| {
            Settings {
                cache_mode: mode,
                full_first_block: p,
                ..Default::default()
            }
            .generator_settings(&model)
            .unwrap()
            .cache
            .full_first_block
        };
        assert!(!first(CacheModeProp::MotionCache, FullFirstBlockProp::Off));
        assert!(first(
            CacheModeProp::MotionCacheReference,
            FullFirstBlockProp::On
        ));

        let user = Settings {
            steps: 3,
            motion_threshold: 0.5,
            cache_mode: CacheModeProp::TeaCache,
            ..Default::default()
        };
        let s = user.generator_settings(&model).unwrap();
        assert_eq!(s.steps, 3);
        // TeaCache's warm-up (5 steps) is clamped to the user's 3 steps
        assert_eq!(s.cache.warmup_steps, 3);
        // motion-threshold is the threshold of whichever cached mode runs
        assert_eq!(s.cache.threshold(), 0.5);
        assert_eq!(s.cache.mode, CacheMode::TeaCache);
    }

    #[test]
    fn invalid_combinations_name_the_property() {
        let model = GeneratorSettings::default();
        let e = Settings {
            steps: 4,
            warmup_steps: 9,
            ..Default::default()
        }
        .generator_settings(&model)
        .unwrap_err()
        .to_string();
        assert!(e.contains("warmup-steps"), "{e}");
        let e = Settings {
            overlap: 2,
            ..Default::default()
        }
        .generator_settings(&model)
        .unwrap_err()
        .to_string();
        assert!(e.contains("overlap"), "{e}");
    }
}
