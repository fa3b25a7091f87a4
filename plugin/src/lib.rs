//! GStreamer plugin `motioncache`: the `motioncachesrc` element generates video live with a
//! streaming autoregressive diffusion model (SkyReels-V2 diffusion forcing or MAGI-1) and
//! MotionCache token-level caching, and pushes frames as each causal block (MAGI-1: chunk)
//! finishes.
//!
//! The element is thin glue over [`motioncache::pipeline`]; everything it does a Rust
//! program can also do with that API directly.

use gst::glib;

pub mod motioncachesrc;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    motioncachesrc::register(plugin)
}

gst::plugin_define!(
    motioncache,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
