//! Streaming autoregressive video diffusion (SkyReels-V2 diffusion forcing) with
//! MotionCache, a token-level motion-aware cache (arXiv 2605.01725), in candle.
//!
//! The crate knows nothing of GStreamer: `gst-plugin-motioncache` is thin glue over
//! [`generate`].

pub mod cache;
pub mod cpu;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod overlay;
pub mod pipeline;
pub mod schedule;

pub use error::{Error, Result};
