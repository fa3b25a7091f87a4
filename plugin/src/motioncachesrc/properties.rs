//! The element's property specifications (names, ranges, defaults, blurbs, and whether a
//! property may change while PLAYING), as gst-inspect shows them.

use gst::glib;
use gst::prelude::*;

use super::settings::*;

/// Largest frame rate the element offers.
pub const MAX_FPS: i32 = 240;

/// Largest frame width or height the element offers.
pub const MAX_SIDE: i32 = motioncache::pipeline::MAX_FRAME_SIDE as i32;

fn int_prop(name: &str, nick: &str, blurb: &str, max: i32, mutable: bool) -> glib::ParamSpec {
    let b = glib::ParamSpecInt::builder(name)
        .nick(nick)
        .blurb(blurb)
        .minimum(MODEL_DEFAULT)
        .maximum(max)
        .default_value(MODEL_DEFAULT);
    if mutable {
        b.mutable_playing().build()
    } else {
        b.mutable_ready().build()
    }
}

fn float_prop(name: &str, nick: &str, blurb: &str, max: f64, mutable: bool) -> glib::ParamSpec {
    let b = glib::ParamSpecDouble::builder(name)
        .nick(nick)
        .blurb(blurb)
        .minimum(MODEL_DEFAULT_F)
        .maximum(max)
        .default_value(MODEL_DEFAULT_F);
    if mutable {
        b.mutable_playing().build()
    } else {
        b.mutable_ready().build()
    }
}

pub fn specs() -> Vec<glib::ParamSpec> {
    vec![
        glib::ParamSpecString::builder("model")
            .nick("Model")
            .blurb(
                "Model directory (diffusers SkyReels-V2 DF pipeline, original SkyReels-V2 \
                 layout or MAGI-1); empty = the tiny model embedded in the plugin",
            )
            .default_value(Some(DEFAULT_MODEL))
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("prompt")
            .nick("Prompt")
            .blurb("Text the video follows; a change applies from the next block")
            .default_value(Some(DEFAULT_PROMPT))
            .mutable_playing()
            .build(),
        glib::ParamSpecString::builder("negative-prompt")
            .nick("Negative prompt")
            .blurb(
                "What guidance steers away from (used when guidance-scale > 1); a \
                 change applies from the next block",
            )
            .default_value(Some(DEFAULT_NEGATIVE_PROMPT))
            .mutable_playing()
            .build(),
        glib::ParamSpecUInt64::builder("seed")
            .nick("Seed")
            .blurb("Seed of the initial noise (same seed and settings = same video)")
            .default_value(DEFAULT_SEED)
            .mutable_ready()
            .build(),
        int_prop(
            "steps",
            "Steps",
            "Denoising steps per block (-1 = the model's default)",
            1000,
            false,
        ),
        float_prop(
            "guidance-scale",
            "Guidance scale",
            "Classifier-free guidance scale, guidance runs above 1 (negative = the \
             model's default)",
            100.0,
            true,
        ),
        float_prop(
            "shift",
            "Shift",
            "Flow-matching sigma shift (negative = the model's default)",
            100.0,
            false,
        ),
        int_prop(
            "causal-block-size",
            "Causal block size",
            "Latent frames per causal block, the unit frames are pushed in (-1 = the \
             model's default)",
            64,
            false,
        ),
        int_prop(
            "ar-step",
            "AR step",
            "Asynchronous lag in steps between consecutive blocks, 0 = synchronous \
             (-1 = the model's default)",
            1000,
            false,
        ),
        int_prop(
            "window",
            "Window",
            "Latent frames the model sees at once, a multiple of causal-block-size \
             (-1 = the model's default)",
            1024,
            false,
        ),
        int_prop(
            "overlap",
            "Overlap",
            "Latent frames of history carried into the next window, a multiple of \
             causal-block-size smaller than the window (-1 = the model's default)",
            1024,
            false,
        ),
        int_prop(
            "width",
            "Width",
            "Frame width in pixels, a multiple of the model's spatial stride (-1 = what \
             downstream caps ask for, the model's native width when they leave it open)",
            MAX_SIDE,
            false,
        ),
        int_prop(
            "height",
            "Height",
            "Frame height in pixels, a multiple of the model's spatial stride (-1 = what \
             downstream caps ask for, the model's native height when they leave it open)",
            MAX_SIDE,
            false,
        ),
        gst::ParamSpecFraction::builder("fps")
            .nick("Frame rate")
            .blurb(
                "Output frame rate; 0/1 = the model's native rate unless downstream \
                 asks for another",
            )
            .minimum(gst::Fraction::new(0, 1))
            .maximum(gst::Fraction::new(MAX_FPS, 1))
            .default_value(gst::Fraction::new(DEFAULT_FPS.0, DEFAULT_FPS.1))
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("device")
            .nick("Device")
            .blurb("Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature)")
            .default_value(Some(DEFAULT_DEVICE))
            .mutable_ready()
            .build(),
        glib::ParamSpecEnum::builder_with_default("dtype", DEFAULT_DTYPE)
            .nick("Data type")
            .blurb(
                "Floating-point type of the model weights and activations (auto = bf16 \
                 on CUDA, f32 on the CPU)",
            )
            .mutable_ready()
            .build(),
        glib::ParamSpecEnum::builder_with_default("cache-mode", DEFAULT_CACHE_MODE)
            .nick("Cache mode")
            .blurb("What the generator reuses between denoising steps")
            .mutable_playing()
            .build(),
        int_prop(
            "warmup-steps",
            "Warmup steps",
            "Full steps per block before any reuse (-1 = the cache mode's default for \
             this schedule: motioncache a tenth of the steps, at least 2; the reference \
             and the chunk-level modes 5; at most steps). MAGI-1: full steps of every \
             chunk (motioncache 5/64 of the steps, the reference 5)",
            1000,
            true,
        ),
        float_prop(
            "motion-threshold",
            "Motion threshold",
            "Reuse threshold of the cached modes: the accumulated (motion-weighted, for \
             motioncache) rescaled modulation distance at which a token (or, for \
             teacache and flowcache, a whole block) is recomputed; with a calibrated \
             model it reads as the relative output change tolerated. Higher = more \
             reuse, faster (negative = the mode's default: motioncache 0.5 / steps, 0.05 at \
             10 steps; the others 0.1). \
             MAGI-1: the threshold of the accumulated relative change of a chunk's \
             patch-embedded input, chunk-wise and (motion-weighted) token-wise, and of \
             teacache/flowcache's whole-chunk reuse (default 0.0065)",
            1e6,
            true,
        ),
        int_prop(
            "refresh-interval",
            "Refresh interval",
            "A token is recomputed at least every N of its steps, 0 = no limit (-1 = \
             the mode's default: motioncache a third of the steps, the reference none)",
            1000,
            true,
        ),
        int_prop(
            "uniform-updates",
            "Uniform updates",
            "Refreshes with uniform weights before motion weights apply (-1 = the \
             mode's default: motioncache 0, its motion comes from the predicted clean \
             latent; the reference 6). MAGI-1: steps of the chunk-wise phase (whole-chunk \
             reuse) after the warm-up, before token-wise reuse (motioncache 20/64 of the \
             steps, the reference 20)",
            1000,
            true,
        ),
        float_prop(
            "weight-floor",
            "Weight floor",
            "Floor of the motion weights, in [0, 1]: a static token accumulates at \
             least this fraction of a moving one's distance (negative = the mode's \
             default: motioncache 0.1, the reference 0.6; MAGI-1 0.6, from latent frame \
             differences)",
            1.0,
            true,
        ),
        float_prop(
            "min-update-ratio",
            "Minimum update ratio",
            "Skip the pass when fewer than this fraction of tokens need it, in [0, 1] \
             (negative = the mode's default: motioncache 0, 0.1 from 20 steps on; the \
             reference 0.4)",
            1.0,
            true,
        ),
        float_prop(
            "max-update-ratio",
            "Maximum update ratio",
            "Recompute every token of the block when at least this fraction of them need \
             it, in [0, 1] (1 = only when all do; negative = the mode's default: \
             motioncache 0.8, the reference 1)",
            1.0,
            true,
        ),
        float_prop(
            "temporal-consistency",
            "Temporal consistency",
            "Threshold of the per-position vote across a block's frames, 0 = off, in \
             [0, 1] (negative = the mode's default: motioncache off, the reference 0.5)",
            1.0,
            true,
        ),
        glib::ParamSpecEnum::builder_with_default("kv-refresh", DEFAULT_KV_REFRESH)
            .nick("Key/value refresh")
            .blurb(
                "Whether the tokens a partial pass reuses refresh their keys/values (their \
                 hidden states estimated from this step's input and their last \
                 computations, for the key and value projections alone) or keep those of \
                 the step they were last computed at, as the reference does; auto = the \
                 cache mode's default (motioncache on, the reference off). Not used by \
                 MAGI-1",
            )
            .mutable_playing()
            .build(),
        int_prop(
            "kv-refresh-window",
            "Key/value refresh window",
            "With kv-refresh, only the reused tokens computed within the last N of their \
             block's steps refresh their keys/values, 0 = every reused token (-1 = the \
             mode's default: motioncache 2 from 20 steps on, 0 below). Not used by MAGI-1",
            1000,
            true,
        ),
        glib::ParamSpecEnum::builder_with_default("full-first-block", DEFAULT_FULL_FIRST_BLOCK)
            .nick("Full first block")
            .blurb(
                "Whether the video's first block goes through the transformer in full at \
                 every step (nothing but the prompt conditions it, and every later frame is \
                 conditioned on it) or is cached like the others; auto = the cache mode's \
                 default (motioncache on, the reference off). Used by motioncache and \
                 motioncache-reference, not by MAGI-1",
            )
            .mutable_playing()
            .build(),
        glib::ParamSpecEnum::builder_with_default("overlay", DEFAULT_OVERLAY)
            .nick("Overlay")
            .blurb(
                "Draw the cache over the output: recompute = tint each token by how \
                 often it went through the transformer in its block",
            )
            .mutable_playing()
            .build(),
        glib::ParamSpecBoolean::builder("is-live")
            .nick("Is live")
            .blurb(
                "Act as a live source: frames are timestamped and paced in real time \
                 (needed for RTMP and other live sinks)",
            )
            .default_value(DEFAULT_IS_LIVE)
            .mutable_ready()
            .build(),
        glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
            .nick("Statistics")
            .blurb(
                "Statistics of the last finished block (the fields of the \
                 motioncache-stats element message)",
            )
            .read_only()
            .build(),
    ]
}
