//! GObject/GStreamer glue of `motioncachesrc`: properties, caps, start/stop, create.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gst::glib;
use gst::glib::translate::ToGlibPtr;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use motioncache::generate::{BlockStats, GeneratorSettings};
use motioncache::pipeline::{ModelInfo, Pipeline, SizeRange, parse_device};

use super::convert::{I420Planes, Layout, rgb_to_i420, rgb_to_packed};
use super::properties::{self, MAX_FPS};
use super::settings::*;
use super::worker::{Callbacks, Popped, Worker};
use super::{CacheModeProp, DTypeProp, FullFirstBlockProp, KvRefreshProp, OverlayProp};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "motioncachesrc",
        gst::DebugColorFlags::empty(),
        Some("Streaming diffusion video generator"),
    )
});

/// Finished blocks waiting for the streaming thread; two let generation of the next block
/// overlap with pushing the current one without letting a stalled pipeline pile up video.
const QUEUE_BLOCKS: usize = 2;

/// Minimum spacing of "falling behind real time" warnings.
const BEHIND_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What the worker reports, read by the `stats` property and the latency query.
#[derive(Default)]
struct BlockReport {
    last: Option<BlockStats>,
    /// Pixel frames per block, known after the first block.
    frames_per_block: Option<usize>,
    /// Compute time (generation and decode, not waiting) of the slowest block so far: what
    /// a live pipeline must budget as latency.
    max_compute: Duration,
    /// The latency last answered to a query, to notice when it must grow.
    reported: Option<gst::ClockTime>,
}

/// Created once the model is loaded (start), dropped in stop(); the generator starts when
/// the caps fix the frame size (set_caps).
struct State {
    pipeline: Arc<Pipeline>,
    info: ModelInfo,
    /// The properties' generator settings (validated); the stream's length is added when
    /// it starts.
    generator: GeneratorSettings,
    worker: Option<Arc<Worker>>,
    /// Frame size the worker generates.
    size: (usize, usize),
    video: Option<(gst_video::VideoInfo, Layout)>,
    /// Frames of the block being pushed.
    pending: VecDeque<Vec<u8>>,
    /// Frames pushed since start: the timestamp clock.
    frame: u64,
    /// Live mode: running time and pts of the first frame pushed in PLAYING.
    live_origin: Option<(gst::ClockTime, gst::ClockTime)>,
    last_behind_warning: Option<Instant>,
}

/// What a loaded model depends on: the `model`, `device` and `dtype` properties.
type ModelKey = (String, String, DTypeProp);

#[derive(Default)]
pub struct MotionCacheSrc {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    report: Arc<Mutex<BlockReport>>,
    /// The loaded model, kept across READY <-> PAUSED while its key is unchanged and
    /// dropped in NULL.
    model: Mutex<Option<(ModelKey, Arc<Pipeline>)>>,
    /// The model load in progress: its cancel flag, set by a state change down from
    /// PAUSED. The loader holds this lock from its look at the flag to the running state,
    /// so a state change either cancels it before or comes after it.
    loading: Mutex<Option<Arc<AtomicBool>>>,
    /// Signalled (with `loading`) when a load ends and by unlock(): negotiate() waits on
    /// it on the streaming thread, so state changes never wait for a load.
    load_done: Condvar,
    /// Between unlock() and unlock_stop(): the streaming thread must return.
    unlocked: AtomicBool,
    /// Between start() and stop(): READY-only properties are refused.
    started: AtomicBool,
    /// Why set_caps refused the caps, posted by negotiate() instead of a generic error.
    caps_problem: Mutex<Option<gst::ErrorMessage>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[glib::object_subclass]
impl ObjectSubclass for MotionCacheSrc {
    const NAME: &'static str = "GstMotionCacheSrc";
    type Type = super::MotionCacheSrc;
    type ParentType = gst_base::PushSrc;
}

/// Reads a string property value without trusting it to be UTF-8 (glib's own accessors
/// panic on invalid UTF-8, and C callers can pass anything).
fn string_value(value: &glib::Value) -> Result<String, String> {
    // SAFETY: the value holds a G_TYPE_STRING (checked by GObject against the pspec);
    // the pointer is valid for the duration of this call and copied out.
    unsafe {
        let ptr = glib::gobject_ffi::g_value_get_string(value.to_glib_none().0);
        if ptr.is_null() {
            return Ok(String::new());
        }
        let c = CStr::from_ptr(ptr);
        c.to_str()
            .map(str::to_owned)
            .map_err(|_| String::from_utf8_lossy(c.to_bytes()).into_owned())
    }
}

impl ObjectImpl for MotionCacheSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(properties::specs);
        PROPERTIES.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_format(gst::Format::Time);
        obj.set_live(DEFAULT_IS_LIVE);
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let name = pspec.name();
        // Settings before state, as in start(): a change either lands before start() takes
        // its final look at the settings, or sees the running worker.
        let mut settings = lock(&self.settings);
        let (running, pipeline) = lock(&self.state)
            .as_ref()
            .map(|s| {
                (
                    (
                        s.worker.clone(),
                        s.info.defaults.clone(),
                        s.info.unused_settings,
                    ),
                    s.pipeline.clone(),
                )
            })
            .unzip();
        let started = self.started.load(Ordering::SeqCst);
        if started && !pspec.flags().contains(gst::PARAM_FLAG_MUTABLE_PLAYING) {
            drop(settings);
            self.warn(format!(
                "property '{name}' cannot change while the element is running (set it in the \
                 READY or NULL state); the change is refused"
            ));
            return;
        }

        let unused = lock(&self.state)
            .as_ref()
            .filter(|s| s.info.unused_settings.contains(&name))
            .map(|s| (s.info.family, s.info.name.clone()));
        if let Some((family, model)) = unused {
            drop(settings);
            self.warn(format!(
                "property '{name}' does not apply to {} models (model {model}); the change is \
                 refused",
                family.name()
            ));
            return;
        }

        let old = settings.clone();
        let s = &mut *settings;
        match name {
            "model" | "prompt" | "negative-prompt" | "device" => {
                let v = match string_value(value) {
                    Ok(v) => v,
                    Err(lossy) => {
                        drop(settings);
                        self.warn(format!(
                            "property '{name}' is not valid UTF-8 ({lossy:?}); the change is \
                             refused"
                        ));
                        return;
                    }
                };
                match name {
                    "model" => s.model = v,
                    "prompt" => s.prompt = v,
                    "negative-prompt" => s.negative_prompt = v,
                    _ => s.device = v,
                }
            }
            "seed" => s.seed = value.get().expect("type checked upstream"),
            "steps" => s.steps = value.get().expect("type checked upstream"),
            "guidance-scale" => s.guidance_scale = value.get().expect("type checked upstream"),
            "shift" => s.shift = value.get().expect("type checked upstream"),
            "causal-block-size" => {
                s.causal_block_size = value.get().expect("type checked upstream")
            }
            "ar-step" => s.ar_step = value.get().expect("type checked upstream"),
            "window" => s.window = value.get().expect("type checked upstream"),
            "overlap" => s.overlap = value.get().expect("type checked upstream"),
            "width" => s.width = value.get().expect("type checked upstream"),
            "height" => s.height = value.get().expect("type checked upstream"),
            "fps" => {
                let f: gst::Fraction = value.get().expect("type checked upstream");
                s.fps = (f.numer(), f.denom());
            }
            "dtype" => s.dtype = value.get::<DTypeProp>().expect("type checked upstream"),
            "cache-mode" => {
                s.cache_mode = value.get::<CacheModeProp>().expect("type checked upstream")
            }
            "warmup-steps" => s.warmup_steps = value.get().expect("type checked upstream"),
            "motion-threshold" => s.motion_threshold = value.get().expect("type checked upstream"),
            "refresh-interval" => s.refresh_interval = value.get().expect("type checked upstream"),
            "uniform-updates" => s.uniform_updates = value.get().expect("type checked upstream"),
            "weight-floor" => s.weight_floor = value.get().expect("type checked upstream"),
            "min-update-ratio" => s.min_update_ratio = value.get().expect("type checked upstream"),
            "max-update-ratio" => s.max_update_ratio = value.get().expect("type checked upstream"),
            "temporal-consistency" => {
                s.temporal_consistency = value.get().expect("type checked upstream")
            }
            "kv-refresh" => {
                s.kv_refresh = value.get::<KvRefreshProp>().expect("type checked upstream")
            }
            "kv-refresh-window" => {
                s.kv_refresh_window = value.get().expect("type checked upstream")
            }
            "full-first-block" => {
                s.full_first_block = value
                    .get::<FullFirstBlockProp>()
                    .expect("type checked upstream")
            }
            "is-live" => {
                s.is_live = value.get().expect("type checked upstream");
                self.obj().set_live(s.is_live);
            }
            "overlay" => {
                s.overlay = value.get::<OverlayProp>().expect("type checked upstream");
                if let Some((Some(worker), _, _)) = &running {
                    worker.set_overlay(s.overlay == OverlayProp::Recompute);
                }
            }
            _ => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "{name} set to {value:?}");
        let empty_prompt = name == "prompt" && settings.prompt.trim().is_empty();
        // Words the loaded model cannot read (once loaded, start() checks the prompts);
        // the negative prompt's once guidance turns on.
        let unread = match (name, &pipeline) {
            ("prompt" | "negative-prompt", Some(p)) if !empty_prompt => {
                self.prompt_warning(p, name, &settings)
            }
            ("guidance-scale", Some(p)) if guidance(p, &old) <= 1.0 => {
                self.prompt_warning(p, "negative-prompt", &settings)
            }
            _ => None,
        };
        let problem = running.and_then(|(worker, defaults, unused)| {
            if settings.prompt != old.prompt || settings.negative_prompt != old.negative_prompt {
                // Before the stream starts, it reads the prompts from the settings.
                if let Some(w) = worker {
                    w.set_prompts(settings.prompt.clone(), settings.negative_prompt.clone());
                }
                return None;
            }
            match settings.without(unused).generator_settings(&defaults) {
                Ok(mut g) => {
                    if let Some(state) = lock(&self.state).as_mut() {
                        // The stream's length (from num-buffers) is not a property here.
                        g.total_frames = state.generator.total_frames;
                        state.generator = g.clone();
                    }
                    if let Some(w) = worker {
                        w.set_settings(g);
                    }
                    None
                }
                Err(e) => {
                    *settings = old;
                    Some(format!("{e}; '{name}' keeps its previous value"))
                }
            }
        });
        // Messages go out after the lock is released: a bus sync handler may read
        // properties.
        drop(settings);
        if empty_prompt {
            // Allowed (an unconditioned video), but almost never what the user meant.
            self.warn("property 'prompt' is empty: the video follows no text".into());
        }
        if let Some(p) = problem {
            self.warn(p);
        }
        if let Some(w) = unread {
            self.warn(w);
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = lock(&self.settings);
        match pspec.name() {
            "model" => s.model.to_value(),
            "prompt" => s.prompt.to_value(),
            "negative-prompt" => s.negative_prompt.to_value(),
            "seed" => s.seed.to_value(),
            "steps" => s.steps.to_value(),
            "guidance-scale" => s.guidance_scale.to_value(),
            "shift" => s.shift.to_value(),
            "causal-block-size" => s.causal_block_size.to_value(),
            "ar-step" => s.ar_step.to_value(),
            "window" => s.window.to_value(),
            "overlap" => s.overlap.to_value(),
            "width" => s.width.to_value(),
            "height" => s.height.to_value(),
            "fps" => gst::Fraction::new(s.fps.0, s.fps.1).to_value(),
            "device" => s.device.to_value(),
            "dtype" => s.dtype.to_value(),
            "cache-mode" => s.cache_mode.to_value(),
            "warmup-steps" => s.warmup_steps.to_value(),
            "motion-threshold" => s.motion_threshold.to_value(),
            "refresh-interval" => s.refresh_interval.to_value(),
            "uniform-updates" => s.uniform_updates.to_value(),
            "weight-floor" => s.weight_floor.to_value(),
            "min-update-ratio" => s.min_update_ratio.to_value(),
            "max-update-ratio" => s.max_update_ratio.to_value(),
            "temporal-consistency" => s.temporal_consistency.to_value(),
            "kv-refresh" => s.kv_refresh.to_value(),
            "kv-refresh-window" => s.kv_refresh_window.to_value(),
            "full-first-block" => s.full_first_block.to_value(),
            "is-live" => s.is_live.to_value(),
            "overlay" => s.overlay.to_value(),
            "stats" => {
                let r = lock(&self.report);
                match &r.last {
                    Some(b) => stats_structure(b).to_value(),
                    None => gst::Structure::new_empty("motioncache-stats").to_value(),
                }
            }
            name => unimplemented!("property {name}"),
        }
    }
}

/// The `motioncache-stats` structure of a block (element message and `stats` property).
fn stats_structure(b: &BlockStats) -> gst::Structure {
    gst::Structure::builder("motioncache-stats")
        .field("block-index", b.index as u64)
        .field("frames", b.frames as u32)
        .field("wall-time", b.wall.as_secs_f64())
        .field("compute-time", b.compute.as_secs_f64())
        .field("recomputed-fraction", b.recomputed_fraction())
        .field("flops-ratio", b.flops_ratio())
        .field("steps", b.steps as u32)
        .field("full-forwards", b.full_forwards as u32)
        .field("partial-forwards", b.partial_forwards as u32)
        .field("skipped-forwards", b.skipped_forwards as u32)
        .build()
}

impl GstObjectImpl for MotionCacheSrc {}

impl ElementImpl for MotionCacheSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "MotionCache video generator",
                "Source/Video",
                "Generates video from a text prompt with a streaming autoregressive diffusion \
                 model (SkyReels-V2 diffusion forcing or MAGI-1) and MotionCache token caching, \
                 pushing frames as each causal block (MAGI-1: chunk) finishes",
                "motioncache developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list(FORMATS)
                .framerate_range(gst::Fraction::new(0, 1)..=gst::Fraction::new(i32::MAX, 1))
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid pad template"),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if matches!(
            transition,
            gst::StateChange::PausedToReady | gst::StateChange::ReadyToNull
        ) {
            // Before the base class stops: a model load still running is abandoned (its
            // thread finishes reading in the background and drops the result), so the
            // state change does not wait for it.
            let loading = lock(&self.loading).take();
            if let Some(cancel) = loading {
                cancel.store(true, Ordering::SeqCst);
                self.progress(gst::ProgressType::Canceled, "Model loading cancelled");
            }
        }
        let r = self.parent_change_state(transition);
        if transition == gst::StateChange::ReadyToNull {
            // NULL releases everything, the model included.
            lock(&self.model).take();
        }
        r
    }
}

const FORMATS: [gst_video::VideoFormat; 4] = [
    gst_video::VideoFormat::Rgb,
    gst_video::VideoFormat::I420,
    gst_video::VideoFormat::Rgba,
    gst_video::VideoFormat::Bgrx,
];

impl MotionCacheSrc {
    /// A warning on the bus and in the debug log (no bus yet: the log only).
    fn warn(&self, msg: String) {
        gst::warning!(CAT, imp = self, "{msg}");
        gst::element_imp_warning!(self, gst::LibraryError::Settings, ["{}", msg]);
    }

    /// What the model does not read of the `prompt` or `negative-prompt` property (the
    /// latter only where guidance runs), as a warning.
    fn prompt_warning(&self, pipeline: &Pipeline, name: &str, s: &Settings) -> Option<String> {
        let text = match name {
            "prompt" => &s.prompt,
            _ => {
                if guidance(pipeline, s) <= 1.0 || s.negative_prompt.trim().is_empty() {
                    return None;
                }
                &s.negative_prompt
            }
        };
        match pipeline.prompt_warning(name, text) {
            Ok(w) => w,
            Err(e) => {
                gst::debug!(CAT, imp = self, "cannot check property '{name}': {e}");
                None
            }
        }
    }

    fn progress(&self, kind: gst::ProgressType, text: &str) {
        let msg = gst::message::Progress::builder(kind, "load-model", text)
            .src(&*self.obj())
            .build();
        let _ = self.obj().post_message(msg);
    }

    /// Caps of what the loaded model produces: the size the `width` / `height` properties
    /// fix, else any size in the model's range (the native size preferred by fixate()).
    fn model_caps(
        &self,
        info: &ModelInfo,
        range: SizeRange,
        fixed: (Option<usize>, Option<usize>),
        fps: Option<(i32, i32)>,
    ) -> gst::Caps {
        let side = |fixed: Option<usize>, max: usize| -> glib::SendValue {
            match fixed {
                Some(v) => (v as i32).to_send_value(),
                None => gst::IntRange::with_step(
                    range.multiple as i32,
                    max as i32,
                    range.multiple as i32,
                )
                .to_send_value(),
            }
        };
        let (w, h) = (
            side(fixed.0, range.max_width),
            side(fixed.1, range.max_height),
        );
        let base = |formats: &[gst_video::VideoFormat]| {
            let b = gst_video::VideoCapsBuilder::new()
                .format_list(formats.iter().copied())
                .field("width", w.clone())
                .field("height", h.clone())
                .pixel_aspect_ratio(gst::Fraction::new(1, 1));
            match fps {
                Some((n, d)) => b.framerate(gst::Fraction::new(n, d)),
                None => {
                    let max = MAX_FPS.max(info.fps_num / info.fps_den.max(1) + 1);
                    b.framerate_range(gst::Fraction::new(1, 1)..=gst::Fraction::new(max, 1))
                }
            }
        };
        let mut caps = base(&FORMATS[..1]).build();
        {
            let caps = caps.get_mut().expect("new caps are writable");
            // BT.601 limited range is what convert.rs writes.
            caps.append(base(&FORMATS[1..2]).field("colorimetry", "bt601").build());
            caps.append(base(&FORMATS[2..]).build());
        }
        caps
    }

    fn native_fps(info: &ModelInfo) -> gst::Fraction {
        if info.fps_num > 0 && info.fps_den > 0 {
            gst::Fraction::new(info.fps_num, info.fps_den)
        } else {
            gst::Fraction::new(24, 1)
        }
    }

    /// What start() can check at once, before a thread loads the model: the device and
    /// that the model directory exists.
    fn load_target(settings: &Settings) -> Result<candle_core::Device, gst::ErrorMessage> {
        let device = parse_device(&settings.device).map_err(|e| {
            gst::error_msg!(gst::ResourceError::Settings, ["property 'device': {}", e])
        })?;
        if !settings.model.is_empty() && !Path::new(&settings.model).is_dir() {
            return Err(gst::error_msg!(
                gst::ResourceError::NotFound,
                [
                    "cannot load model {}: no such model directory (property 'model')",
                    settings.model
                ]
            ));
        }
        Ok(device)
    }

    /// Loads the model of `settings` (on the loader thread), with Progress messages.
    fn load(
        &self,
        settings: &Settings,
        device: &candle_core::Device,
    ) -> Result<Pipeline, gst::ErrorMessage> {
        let what = if settings.model.is_empty() {
            "the embedded tiny model".to_string()
        } else {
            settings.model.clone()
        };
        self.progress(
            gst::ProgressType::Start,
            &format!("Loading {what} on {}", settings.device),
        );
        let loaded = if settings.model.is_empty() {
            Pipeline::load_embedded(device, settings.dtype(device))
        } else {
            Pipeline::load(Path::new(&settings.model), device, settings.dtype(device))
        };
        match loaded {
            Ok(p) => {
                self.progress(gst::ProgressType::Complete, &format!("Loaded {what}"));
                Ok(p)
            }
            Err(e) => {
                self.progress(gst::ProgressType::Error, &format!("Cannot load {what}"));
                Err(gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    ["cannot load model {}: {}", what, e]
                ))
            }
        }
    }

    /// The worker's per-block callback: statistics message, `stats`, latency updates.
    fn callbacks(&self) -> Callbacks {
        let weak = self.obj().downgrade();
        let report = self.report.clone();
        let weak_warn = weak.clone();
        Callbacks {
            on_block: Box::new(move |stats, frames| {
                let grown = {
                    let mut r = lock(&report);
                    r.last = Some(stats.clone());
                    r.frames_per_block = Some(frames);
                    r.max_compute = r.max_compute.max(stats.compute);
                    let need = gst::ClockTime::from_nseconds(r.max_compute.as_nanos() as u64);
                    r.reported.is_some_and(|rep| need > rep + rep / 10)
                };
                let Some(obj) = weak.upgrade() else { return };
                gst::debug!(CAT, obj = obj, "block finished: {stats:?}");
                let msg = gst::message::Element::builder(stats_structure(stats))
                    .src(&obj)
                    .build();
                let _ = obj.post_message(msg);
                obj.notify("stats");
                if grown && obj.is_live() {
                    let _ = obj.post_message(gst::message::Latency::builder().src(&obj).build());
                }
            }),
            on_warning: Box::new(move |msg| {
                if let Some(obj) = weak_warn.upgrade() {
                    obj.imp().warn(msg);
                }
            }),
        }
    }

    /// The running state on a loaded model, with the properties' settings validated
    /// against its defaults (the caller holds the settings lock); the generator starts
    /// when the caps are set.
    fn begin(&self, settings: &Settings, pipeline: Arc<Pipeline>) -> Result<(), gst::ErrorMessage> {
        let info = pipeline.info().clone();
        let generator = settings
            .without(info.unused_settings)
            .generator_settings(&info.defaults)
            .map_err(|e| {
                gst::error_msg!(
                    gst::LibraryError::Settings,
                    [
                        "{} (model {}: steps {}, causal-block-size {}, window {}, overlap {}, ar-step {})",
                        e,
                        info.name,
                        info.defaults.steps,
                        info.defaults.causal_block_size,
                        info.defaults.window,
                        info.defaults.overlap,
                        info.defaults.ar_step
                    ]
                )
            })?;
        let range = pipeline.size_range();
        let (fw, fh) = settings.fixed_size();
        for (name, v, max) in [
            ("width", fw, range.max_width),
            ("height", fh, range.max_height),
        ] {
            if let Some(v) = v
                && (v > max || !v.is_multiple_of(range.multiple))
            {
                return Err(gst::error_msg!(
                    gst::LibraryError::Settings,
                    [
                        "property '{}' = {} cannot be made by model {}: {}",
                        name,
                        v,
                        info.name,
                        range.describe()
                    ]
                ));
            }
        }
        *lock(&self.report) = BlockReport::default();
        *lock(&self.state) = Some(State {
            size: (info.width, info.height),
            pipeline,
            info,
            generator,
            worker: None,
            video: None,
            pending: VecDeque::new(),
            frame: 0,
            live_origin: None,
            last_behind_warning: None,
        });
        Ok(())
    }

    /// Starts generating `size` frames with the current settings. The caller holds the
    /// settings and state locks.
    fn start_stream(
        &self,
        settings: &Settings,
        s: &mut State,
        size: (usize, usize),
    ) -> Result<(), gst::ErrorMessage> {
        let pipeline = &s.pipeline;
        let mut generator = settings
            .without(s.info.unused_settings)
            .generator_settings(&s.info.defaults)
            .map_err(|e| {
                gst::error_msg!(
                    gst::LibraryError::Settings,
                    ["cannot start generating: {}", e]
                )
            })?;
        // With num-buffers the generator stops once it has made that many frames (whole
        // causal blocks) instead of filling its queue after EOS.
        let num_buffers = self.obj().property::<i32>("num-buffers");
        if num_buffers > 0 {
            generator.total_frames =
                Some(pipeline.latent_frames_for(num_buffers as usize, generator.causal_block_size));
        }
        let memory = pipeline
            .check_memory(&generator, size)
            .map_err(|e| gst::error_msg!(gst::ResourceError::NoSpaceLeft, ["{}", e]))?;
        let stream = pipeline
            .stream_at(
                &settings.prompt,
                &settings.negative_prompt,
                generator.clone(),
                settings.seed,
                size,
            )
            .map_err(|e| {
                gst::error_msg!(
                    gst::LibraryError::Settings,
                    ["cannot start generating: {}", e]
                )
            })?;
        let worker = Worker::spawn(stream, QUEUE_BLOCKS, self.callbacks()).map_err(|e| {
            gst::error_msg!(
                gst::CoreError::Thread,
                ["cannot start the generator thread: {}", e]
            )
        })?;
        worker.set_overlay(settings.overlay == OverlayProp::Recompute);
        gst::info!(
            CAT,
            imp = self,
            "generating: model {} {}x{} (native {}x{}), about {} MiB beyond the weights, {:?}",
            s.info.name,
            size.0,
            size.1,
            s.info.width,
            s.info.height,
            memory.total() >> 20,
            generator
        );
        s.worker = Some(Arc::new(worker));
        s.size = size;
        s.generator = generator;
        Ok(())
    }

    /// Creates the running state on a loaded model. The settings lock is held from the
    /// look at the properties to the running state: a property set while the model
    /// loaded is in `self.settings`, and set_property (settings lock first) either lands
    /// before this look or sees the state. Returns a warning for the caller to post once
    /// it holds no lock.
    fn finish_start(&self, pipeline: Arc<Pipeline>) -> Result<Option<String>, gst::ErrorMessage> {
        let now = lock(&self.settings);
        let info = pipeline.info().clone();
        let mut warnings = Vec::new();
        if now.prompt.trim().is_empty() {
            warnings.push("property 'prompt' is empty: the video follows no text".to_string());
        }
        warnings.extend(
            ["prompt", "negative-prompt"]
                .into_iter()
                .filter_map(|name| self.prompt_warning(&pipeline, name, &now)),
        );
        self.begin(&now, pipeline)?;
        let unused: Vec<String> = info
            .unused_settings
            .iter()
            .filter(|n| now.is_set(n))
            .map(|n| format!("'{n}'"))
            .collect();
        if !unused.is_empty() {
            warnings.push(format!(
                "{} {} not apply to {} models (model {}): ignored",
                if unused.len() == 1 {
                    "property"
                } else {
                    "properties"
                },
                unused.join(", ") + if unused.len() == 1 { " does" } else { " do" },
                info.family.name(),
                info.name
            ));
        }
        Ok((!warnings.is_empty()).then(|| warnings.join("; ")))
    }

    /// Live latency, (min, max): a frame can leave only when its whole block is finished,
    /// so min is the slowest block's generation time (before the first block: the block's
    /// duration); the queue holds `QUEUE_BLOCKS` finished blocks on top of that, so max
    /// adds their duration.
    fn latency(&self) -> Option<(gst::ClockTime, gst::ClockTime)> {
        let (fps, block) = {
            let state = lock(&self.state);
            let s = state.as_ref()?;
            let fps = match &s.video {
                Some((v, _)) => v.fps(),
                None => Self::native_fps(&s.info),
            };
            (fps, s.generator.causal_block_size)
        };
        let mut r = lock(&self.report);
        let measured = gst::ClockTime::from_nseconds(r.max_compute.as_nanos() as u64);
        let frames = r.frames_per_block.unwrap_or(block) as u64;
        let estimate = if fps.numer() > 0 {
            gst::ClockTime::SECOND
                .mul_div_ceil(frames * fps.denom() as u64, fps.numer() as u64)
                .unwrap_or(gst::ClockTime::ZERO)
        } else {
            gst::ClockTime::ZERO
        };
        let latency = if r.last.is_some() { measured } else { estimate };
        r.reported = Some(latency);
        Some((latency, latency + estimate * QUEUE_BLOCKS as u64))
    }

    /// Live mode: the warning (rate-limited) to post when frames leave later than real
    /// time allows. The caller posts it after releasing the state lock (a bus sync handler
    /// may call back into the element).
    fn check_real_time(&self, state: &mut State, pts: gst::ClockTime) -> Option<String> {
        let obj = self.obj();
        let now = obj.current_running_time()?;
        let (rt0, pts0) = *state.live_origin.get_or_insert((now, pts));
        let elapsed = now.saturating_sub(rt0);
        let produced = pts.saturating_sub(pts0);
        let late = elapsed.saturating_sub(produced);
        let budget = lock(&self.report).reported.unwrap_or(gst::ClockTime::ZERO)
            + gst::ClockTime::from_mseconds(500);
        if late > budget
            && state
                .last_behind_warning
                .is_none_or(|t| t.elapsed() > BEHIND_WARNING_INTERVAL)
        {
            state.last_behind_warning = Some(Instant::now());
            let r = lock(&self.report);
            let gen_fps = match (r.frames_per_block, r.max_compute.as_secs_f64()) {
                (Some(f), w) if w > 0.0 => format!("{:.1}", f as f64 / w),
                _ => "?".into(),
            };
            drop(r);
            let want = state
                .video
                .as_ref()
                .map(|(v, _)| v.fps())
                .unwrap_or(gst::Fraction::new(0, 1));
            return Some(format!(
                "generation falls behind real time: {late} late (about {gen_fps} fps generated, \
                 {want} fps requested); lower steps, use a faster cache-mode or raise \
                 motion-threshold"
            ));
        }
        None
    }
}

/// The guidance scale the properties give on `pipeline`'s model (0 where they are
/// invalid: no guidance runs until they are valid).
fn guidance(pipeline: &Pipeline, s: &Settings) -> f64 {
    s.without(pipeline.info().unused_settings)
        .generator_settings(&pipeline.info().defaults)
        .map_or(0.0, |g| g.guidance_scale)
}

impl BaseSrcImpl for MotionCacheSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        self.started.store(true, Ordering::SeqCst);
        let settings = lock(&self.settings).clone();
        let key: ModelKey = (
            settings.model.clone(),
            settings.device.clone(),
            settings.dtype,
        );
        let cached = lock(&self.model)
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, p)| p.clone());
        if let Some(p) = cached {
            gst::debug!(CAT, imp = self, "model kept from the previous start");
            let warning = self.finish_start(p)?;
            if let Some(w) = warning {
                self.warn(w);
            }
            return Ok(());
        }
        // Drop a model of other properties before loading the new one.
        lock(&self.model).take();
        let device = Self::load_target(&settings)?;
        let cancel = Arc::new(AtomicBool::new(false));
        *lock(&self.loading) = Some(cancel.clone());
        let obj = self.obj().clone();
        std::thread::Builder::new()
            .name("motioncache-load".into())
            .spawn(move || {
                let imp = obj.imp();
                let loaded = imp.load(&settings, &device);
                let mut loading = lock(&imp.loading);
                if cancel.load(Ordering::SeqCst) {
                    gst::debug!(CAT, obj = obj, "model load cancelled, result dropped");
                    return;
                }
                let started = loaded.and_then(|p| {
                    let p = Arc::new(p);
                    *lock(&imp.model) = Some((key, p.clone()));
                    imp.finish_start(p)
                });
                // Done: negotiate() goes on with the running state, or, when the start
                // failed, returns once the error that says why is on the bus (before the
                // base class's own "not-negotiated").
                match started {
                    Ok(warning) => {
                        *loading = None;
                        drop(loading);
                        imp.load_done.notify_all();
                        if let Some(w) = warning {
                            imp.warn(w);
                        }
                    }
                    Err(e) => {
                        drop(loading);
                        imp.post_error_message(e);
                        let mut loading = lock(&imp.loading);
                        if !cancel.load(Ordering::SeqCst) {
                            *loading = None;
                        }
                        drop(loading);
                        imp.load_done.notify_all();
                    }
                }
            })
            .map_err(|e| {
                gst::error_msg!(
                    gst::CoreError::Thread,
                    ["cannot start the model loading thread: {}", e]
                )
            })?;
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.started.store(false, Ordering::SeqCst);
        if let Some(cancel) = lock(&self.loading).take() {
            cancel.store(true, Ordering::SeqCst);
        }
        let state = lock(&self.state).take();
        if let Some(w) = state.and_then(|s| s.worker) {
            w.shutdown();
        }
        gst::info!(CAT, imp = self, "stopped");
        Ok(())
    }

    fn is_seekable(&self) -> bool {
        false
    }

    fn do_seek(&self, segment: &mut gst::Segment) -> bool {
        // A generator cannot seek; only the start-up segment (time 0, rate 1) is accepted.
        let ok = segment.rate() == 1.0
            && segment
                .downcast_ref::<gst::ClockTime>()
                .is_some_and(|s| s.start().is_none_or(|t| t.is_zero()));
        if !ok {
            gst::warning!(CAT, imp = self, "refusing seek to {segment:?}");
        }
        ok
    }

    fn caps(&self, filter: Option<&gst::Caps>) -> Option<gst::Caps> {
        let (fps, fixed) = {
            let s = lock(&self.settings);
            (s.fixed_fps(), s.fixed_size())
        };
        let caps = match lock(&self.state).as_ref() {
            Some(s) => self.model_caps(&s.info, s.pipeline.size_range(), fixed, fps),
            None => self.obj().src_pad().pad_template_caps(),
        };
        Some(match filter {
            Some(f) => f.intersect_with_mode(&caps, gst::CapsIntersectMode::First),
            None => caps,
        })
    }

    fn fixate(&self, mut caps: gst::Caps) -> gst::Caps {
        // What downstream leaves open: the model's native size and rate.
        let native = lock(&self.state)
            .as_ref()
            .map(|s| (s.info.width, s.info.height, Self::native_fps(&s.info)));
        caps.truncate();
        {
            let caps = caps.make_mut();
            if let Some((w, h, fps)) = native
                && let Some(s) = caps.structure_mut(0)
            {
                s.fixate_field_nearest_int("width", w as i32);
                s.fixate_field_nearest_int("height", h as i32);
                s.fixate_field_nearest_fraction("framerate", fps);
            }
        }
        self.parent_fixate(caps)
    }

    fn negotiate(&self) -> Result<(), gst::LoggableError> {
        // The streaming thread waits here for the model load that start() began.
        {
            let mut loading = lock(&self.loading);
            while loading.is_some() && !self.unlocked.load(Ordering::SeqCst) {
                loading = self
                    .load_done
                    .wait(loading)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        if self.unlocked.load(Ordering::SeqCst) {
            return Err(gst::loggable_error!(CAT, "flushing while the model loads"));
        }
        if lock(&self.state).is_none() {
            // The loader posted why.
            return Err(gst::loggable_error!(CAT, "the model could not be loaded"));
        }
        lock(&self.caps_problem).take();
        self.parent_negotiate().inspect_err(|_| {
            // set_caps said why, or no caps met downstream's at all.
            if let Some(problem) = lock(&self.caps_problem).take() {
                self.post_error_message(problem);
                return;
            }
            let ours = self.caps(None).map(|c| c.to_string()).unwrap_or_default();
            let theirs = self.obj().src_pad().peer_query_caps(None).to_string();
            let sizes = lock(&self.state)
                .as_ref()
                .map(|s| s.pipeline.size_range().describe())
                .unwrap_or_default();
            gst::element_imp_error!(
                self,
                gst::CoreError::Negotiation,
                [
                    "cannot meet the downstream caps: this model generates {} ({}), \
                     downstream accepts {}",
                    ours,
                    sizes,
                    theirs
                ]
            );
        })
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_video::VideoInfo::from_caps(caps)
            .map_err(|_| gst::loggable_error!(CAT, "cannot parse caps {caps}"))?;
        let layout = Layout::from_format(info.format())
            .ok_or_else(|| gst::loggable_error!(CAT, "unsupported format in {caps}"))?;
        let size = (info.width() as usize, info.height() as usize);
        // A new size restarts the generator: the old one stops first, with no lock held
        // (its last block's callback may post messages).
        let old = lock(&self.state).as_mut().and_then(|s| {
            if s.size != size {
                s.pending.clear();
                s.worker.take()
            } else {
                None
            }
        });
        if let Some(w) = old {
            gst::info!(
                CAT,
                imp = self,
                "frame size changes to {}x{}: restarting",
                size.0,
                size.1
            );
            w.shutdown();
        }
        // Settings before state, as everywhere.
        let settings = lock(&self.settings);
        let mut state = lock(&self.state);
        let s = state
            .as_mut()
            .ok_or_else(|| gst::loggable_error!(CAT, "caps set before start"))?;
        let range = s.pipeline.size_range();
        let problem = if !range.contains(size.0, size.1) {
            Some(gst::error_msg!(
                gst::CoreError::Negotiation,
                [
                    "cannot make {}x{} frames with model {}: {}",
                    size.0,
                    size.1,
                    s.info.name,
                    range.describe()
                ]
            ))
        } else if info.fps().numer() <= 0 {
            Some(gst::error_msg!(
                gst::CoreError::Negotiation,
                ["a frame rate of {} is not supported", info.fps()]
            ))
        } else if s.worker.is_none() || s.size != size {
            self.start_stream(&settings, s, size).err()
        } else {
            None
        };
        if let Some(p) = problem {
            let text = p.to_string();
            *lock(&self.caps_problem) = Some(p);
            return Err(gst::loggable_error!(CAT, "caps {caps} refused: {text}"));
        }
        gst::debug!(CAT, imp = self, "caps set: {caps}");
        s.video = Some((info, layout));
        Ok(())
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        match query.view_mut() {
            gst::QueryViewMut::Latency(q) => {
                let live = self.obj().is_live();
                match self.latency() {
                    Some((min, max)) if live => {
                        gst::debug!(CAT, imp = self, "latency {min}, max {max}");
                        q.set(true, min, max);
                        true
                    }
                    Some(_) => {
                        q.set(false, gst::ClockTime::ZERO, gst::ClockTime::NONE);
                        true
                    }
                    None => false,
                }
            }
            _ => BaseSrcImplExt::parent_query(self, query),
        }
    }

    fn times(&self, buffer: &gst::BufferRef) -> (Option<gst::ClockTime>, Option<gst::ClockTime>) {
        // Live: base class waits on the clock until each frame's time (pseudo-live, like
        // videotestsrc is-live=true).
        if self.obj().is_live()
            && let Some(pts) = buffer.pts()
        {
            return (Some(pts), buffer.duration().map(|d| pts + d));
        }
        (None, None)
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.unlocked.store(true, Ordering::SeqCst);
        {
            // Under the lock, so that a negotiate() about to wait cannot miss it.
            let _loading = lock(&self.loading);
            self.load_done.notify_all();
        }
        if let Some(w) = lock(&self.state).as_ref().and_then(|s| s.worker.as_ref()) {
            w.set_flushing(true);
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.unlocked.store(false, Ordering::SeqCst);
        if let Some(w) = lock(&self.state).as_ref().and_then(|s| s.worker.as_ref()) {
            w.set_flushing(false);
        }
        Ok(())
    }
}

impl PushSrcImpl for MotionCacheSrc {
    fn create(
        &self,
        _buffer: Option<&mut gst::BufferRef>,
    ) -> Result<CreateSuccess, gst::FlowError> {
        let (rgb, index, info, layout, size) = loop {
            let (worker, expect) = {
                let mut state = lock(&self.state);
                let Some(s) = state.as_mut() else {
                    return Err(gst::FlowError::Flushing);
                };
                let (Some((info, layout)), Some(worker)) = (s.video.clone(), s.worker.clone())
                else {
                    return Err(gst::FlowError::NotNegotiated);
                };
                if let Some(frame) = s.pending.pop_front() {
                    let index = s.frame;
                    s.frame += 1;
                    break (frame, index, info, layout, s.size);
                }
                (worker, (info.width() as usize, info.height() as usize))
            };
            match worker.pop() {
                Popped::Block(block) => {
                    if (block.width, block.height) != expect
                        || block
                            .frames
                            .iter()
                            .any(|f| f.len() != block.width * block.height * 3)
                    {
                        gst::element_imp_error!(
                            self,
                            gst::StreamError::Format,
                            [
                                "the model produced {}x{} frames, the caps say {}x{}",
                                block.width,
                                block.height,
                                expect.0,
                                expect.1
                            ]
                        );
                        return Err(gst::FlowError::Error);
                    }
                    if let Some(s) = lock(&self.state).as_mut() {
                        s.pending.extend(block.frames);
                    }
                }
                Popped::Flushing => return Err(gst::FlowError::Flushing),
                Popped::Ended => return Err(gst::FlowError::Eos),
                Popped::Failed(e) => {
                    gst::element_imp_error!(
                        self,
                        gst::LibraryError::Failed,
                        ["video generation failed: {}", e]
                    );
                    return Err(gst::FlowError::Error);
                }
            }
        };

        let fps = info.fps();
        let at = |n: u64| {
            gst::ClockTime::SECOND
                .mul_div_floor(n * fps.denom() as u64, fps.numer() as u64)
                .unwrap_or(gst::ClockTime::ZERO)
        };
        let (pts, end) = (at(index), at(index + 1));
        let mut buffer = gst::Buffer::with_size(info.size()).map_err(|_| gst::FlowError::Error)?;
        {
            let b = buffer.get_mut().expect("new buffer is writable");
            b.set_pts(pts);
            b.set_duration(end - pts);
            b.set_offset(index);
            b.set_offset_end(index + 1);
        }
        let mut frame = gst_video::VideoFrame::from_buffer_writable(buffer, &info)
            .map_err(|_| gst::FlowError::Error)?;
        let (w, h) = size;
        let strides: Vec<usize> = frame.plane_stride().iter().map(|s| *s as usize).collect();
        let [p0, p1, p2, _] = frame.planes_data_mut();
        match layout {
            Layout::I420 => rgb_to_i420(
                &rgb,
                w,
                h,
                I420Planes {
                    y: (p0, strides[0]),
                    u: (p1, strides[1]),
                    v: (p2, strides[2]),
                },
            ),
            packed => rgb_to_packed(&rgb, w, h, packed, p0, strides[0]),
        }
        let buffer = frame.into_buffer();

        if self.obj().is_live() {
            let behind = lock(&self.state)
                .as_mut()
                .and_then(|s| self.check_real_time(s, pts));
            if let Some(msg) = behind {
                self.warn(msg);
            }
        }
        gst::trace!(CAT, imp = self, "frame {index} at {pts}");
        Ok(CreateSuccess::NewBuffer(buffer))
    }
}
