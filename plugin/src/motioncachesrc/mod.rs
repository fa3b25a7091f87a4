//! `motioncachesrc`: a live video source that runs a streaming diffusion generator.
//!
//! `imp.rs` is the GObject/GStreamer glue; `settings.rs` maps the properties onto
//! generator settings; `worker.rs` runs the generator on its own thread into a bounded
//! queue; `convert.rs` writes the model's RGB frames in the negotiated format.

use gst::glib;
use gst::prelude::*;

mod convert;
mod imp;
mod properties;
mod settings;
mod worker;

pub use settings::{DEFAULT_PROMPT, Settings};

glib::wrapper! {
    pub struct MotionCacheSrc(ObjectSubclass<imp::MotionCacheSrc>)
        @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

/// The cache policy (property `cache-mode`), one value per `motioncache::cache::CacheMode`.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstMotionCacheMode")]
pub enum CacheModeProp {
    #[enum_value(
        name = "Vanilla: recompute the whole window at every step, as diffusers does (baseline; \
                MAGI-1: upstream's walk)",
        nick = "vanilla"
    )]
    Vanilla = 0,
    #[enum_value(
        name = "None: exact, finished blocks' K/V computed once, nothing reused (MAGI-1: \
                upstream's walk, which already does that)",
        nick = "none"
    )]
    None = 1,
    #[enum_value(
        name = "TeaCache: skip whole block-steps while the modulation distance stays small \
                (MAGI-1: reuse whole chunks while their input changes little)",
        nick = "teacache"
    )]
    TeaCache = 2,
    #[enum_value(
        name = "FlowCache: chunk-level skipping with a per-block budget",
        nick = "flowcache"
    )]
    FlowCache = 3,
    #[enum_value(
        name = "MotionCache: token-level, motion-aware reuse (motion from the predicted clean \
                latent, phases scaled to the schedule; MAGI-1: MotionCache4MAGI-1's three \
                phases with correct key ranges)",
        nick = "motioncache"
    )]
    MotionCache = 4,
    #[enum_value(
        name = "MotionCache as the reference implementation computes it (the paper's \
                settings: 5 full steps, 6 uniform refreshes, stale residuals; MAGI-1: \
                MotionCache4MAGI-1 with its key-range bug, no clean-chunk re-forward)",
        nick = "motioncache-reference"
    )]
    MotionCacheReference = 5,
}

/// What the element draws over its output (property `overlay`).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstMotionCacheOverlay")]
pub enum OverlayProp {
    #[enum_value(name = "None: the generated frames as they are", nick = "none")]
    None = 0,
    #[enum_value(
        name = "Recompute: tint each token by how often the cache recomputed it in its block",
        nick = "recompute"
    )]
    Recompute = 1,
}

/// Whether reused tokens refresh their keys/values (property `kv-refresh`).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstMotionCacheKvRefresh")]
pub enum KvRefreshProp {
    #[enum_value(
        name = "Auto: the cache mode's default (motioncache on, the reference off)",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(
        name = "On: tokens a partial pass reuses get keys/values of the current step",
        nick = "on"
    )]
    On = 1,
    #[enum_value(
        name = "Off: reused tokens keep the keys/values of their last computation",
        nick = "off"
    )]
    Off = 2,
}

/// Whether the video's first block skips token-level reuse (property `full-first-block`).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstMotionCacheFullFirstBlock")]
pub enum FullFirstBlockProp {
    #[enum_value(
        name = "Auto: the cache mode's default (motioncache on, the reference off)",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(
        name = "On: the video's first block goes through the transformer in full at every step",
        nick = "on"
    )]
    On = 1,
    #[enum_value(
        name = "Off: the first block is cached like every other block",
        nick = "off"
    )]
    Off = 2,
}

/// Floating-point type the model runs in (property `dtype`).
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstMotionCacheDType")]
pub enum DTypeProp {
    #[enum_value(
        name = "Auto: bf16 on CUDA (tensor cores), f32 on the CPU",
        nick = "auto"
    )]
    Auto = 3,
    #[enum_value(name = "F32: 32-bit float", nick = "f32")]
    F32 = 0,
    #[enum_value(name = "F16: 16-bit float", nick = "f16")]
    F16 = 1,
    #[enum_value(name = "BF16: bfloat16", nick = "bf16")]
    BF16 = 2,
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    CacheModeProp::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    DTypeProp::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    OverlayProp::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    KvRefreshProp::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    FullFirstBlockProp::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "motioncachesrc",
        gst::Rank::NONE,
        MotionCacheSrc::static_type(),
    )
}
