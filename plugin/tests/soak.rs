//! A long live stream (issue 17, item 5): at least 10 minutes of video in live mode, with
//! memory flat after warm-up (resident set growth under 5%) and timestamps without gaps.
//! Memory is the floor of the samples (every 5 s) in the minute after warm-up against the
//! floor in the last minute (a stream's memory rises and falls by 2.5 MB with the blocks in
//! flight; a leak raises the floor): the live Rust heap and all memory malloc'd and not
//! freed (Rust, GStreamer, GLib) within 5%, the resident set after `malloc_trim` within
//! 10%. The resident set's floor moves by up to 2 MB between minutes with the heap flat
//! (pages kept by fragmentation: the arenas grew from 37.5 to 38.4 MB over 16 minutes
//! here); untrimmed, it crept +1.6 MB in one 10-minute CI run.
//!
//! CI runs it at a small frame size (32x32, the element's default settings otherwise),
//! started by `scripts/test.sh` beside the other tests (it is ignored by a plain
//! `cargo test`: it takes ten minutes of wall time but little CPU);
//! `MOTIONCACHE_SOAK_SECS` (default 600) and `MOTIONCACHE_SOAK_SIZE` (default 32x32)
//! set a longer run (the README reports one at the model's native size).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

/// What the sink saw: frames, and the first timestamp problem.
#[derive(Default)]
struct Seen {
    frames: u64,
    origin: Option<gst::ClockTime>,
    problem: Option<String>,
}

#[test]
#[ignore = "10 minutes of wall time: scripts/test.sh runs it beside the other tests"]
fn ten_minutes_live_with_flat_memory_and_no_gaps() {
    let secs: u64 = std::env::var("MOTIONCACHE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let size = std::env::var("MOTIONCACHE_SOAK_SIZE").unwrap_or_else(|_| "32x32".into());
    let (w, h) = size.split_once('x').expect("MOTIONCACHE_SOAK_SIZE is WxH");
    let (w, h) = (w.to_string(), h.to_string());
    with_timeout(secs + 300, move || {
        let model = std::env::var("MOTIONCACHE_TEST_MODEL")
            .map(|m| format!("model=\"{m}\""))
            .unwrap_or_default();
        let pipeline = launch(&format!(
            "motioncachesrc is-live=true {model} ! video/x-raw,width={w},height={h} ! \
             fakesink name=sink sync=true"
        ));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let fps = Arc::new(Mutex::new(None::<gst::Fraction>));
        let sinkpad = pipeline
            .by_name("sink")
            .unwrap()
            .static_pad("sink")
            .unwrap();
        {
            let seen = seen.clone();
            let fps = fps.clone();
            sinkpad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
                let Some(buf) = info.buffer() else {
                    return gst::PadProbeReturn::Ok;
                };
                let rate = *fps.lock().unwrap().get_or_insert_with(|| {
                    let caps = pad.current_caps().expect("caps before buffers");
                    gst_video::VideoInfo::from_caps(&caps).unwrap().fps()
                });
                let at = |n: u64| {
                    gst::ClockTime::SECOND
                        .mul_div_floor(n * rate.denom() as u64, rate.numer() as u64)
                        .unwrap()
                };
                let mut s = seen.lock().unwrap();
                let n = s.frames;
                // Live: the base class shifts the stream to the running time of its first
                // frame; from there every frame follows the last.
                let origin = *s.origin.get_or_insert(buf.pts().unwrap_or_default());
                let want = (origin + at(n), at(n + 1) - at(n), n);
                let got = (buf.pts(), buf.duration(), buf.offset());
                if s.problem.is_none() && got != (Some(want.0), Some(want.1), want.2) {
                    s.problem = Some(format!("frame {n}: got {got:?}, expected {want:?}"));
                }
                s.frames += 1;
                gst::PadProbeReturn::Ok
            });
        }
        let bus = pipeline.bus().unwrap();
        let started = Instant::now();
        pipeline.set_state(gst::State::Playing).unwrap();
        let mut out = Outcome::default();
        // (seconds, RSS after malloc_trim, live Rust heap, malloc'd in use) every 5 s
        let mut mem: Vec<(u64, u64, u64, u64)> = Vec::new();
        let mut next_sample = Duration::from_secs(5);
        while started.elapsed() < Duration::from_secs(secs) {
            if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(200))
                && record(&mut out, &msg)
            {
                break;
            }
            if started.elapsed() >= next_sample {
                mem.push((
                    started.elapsed().as_secs(),
                    rss_kib_in_use(),
                    rust_heap_kib(),
                    malloc_in_use_kib(),
                ));
                next_sample += Duration::from_secs(5);
            }
        }
        pipeline.set_state(gst::State::Null).unwrap();
        let elapsed = started.elapsed();
        let s = seen.lock().unwrap();
        let rate = fps.lock().unwrap().expect("frames arrived");
        let video = gst::ClockTime::SECOND
            .mul_div_floor(s.frames * rate.denom() as u64, rate.numer() as u64)
            .unwrap();
        // Memory in use rises and falls with the blocks in flight; a leak raises its floor.
        // Warm-up is the first minute (or the first sixth of a short run); the floor right
        // after it is compared with the floor of the last minute (or sixth).
        let span = 60.min(secs / 6);
        let floor = |from: u64, to: u64| {
            let w: Vec<_> = mem.iter().filter(|m| (from..to).contains(&m.0)).collect();
            assert!(!w.is_empty(), "no memory sample in {from}-{to} s: {mem:?}");
            (
                w.iter().map(|m| m.1).min().unwrap(),
                w.iter().map(|m| m.2).min().unwrap(),
                w.iter().map(|m| m.3).min().unwrap(),
            )
        };
        let end = mem.last().expect("memory samples").0;
        let (rss_warm, heap_warm, malloc_warm) = floor(span, 2 * span);
        let (rss_end, heap_end, malloc_end) = floor(end.saturating_sub(span), end + 1);
        let rss_peak = mem.iter().map(|m| m.1).max().unwrap();
        println!(
            "soak: {w}x{h}, {} frames = {video} of video in {elapsed:?}; lowest RSS (after \
             malloc_trim) {rss_warm} KiB after warm-up, {rss_end} KiB at the end, peak \
             {rss_peak} KiB; lowest Rust heap {heap_warm} -> {heap_end} KiB, malloc'd in use \
             {malloc_warm} -> {malloc_end} KiB; {} blocks; {} warnings",
            s.frames,
            out.stats.len(),
            out.warnings.len()
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(!out.eos, "an endless stream ended");
        assert!(
            s.problem.is_none(),
            "{}",
            s.problem.as_deref().unwrap_or("")
        );
        // Live: the video made is the wall time, less the first block's latency.
        assert!(
            video + gst::ClockTime::from_seconds(5)
                >= gst::ClockTime::from_seconds(secs.min(elapsed.as_secs())),
            "{video} of video in {elapsed:?}"
        );
        assert!(
            heap_end < heap_warm + heap_warm / 20,
            "the Rust heap grew from {heap_warm} KiB after warm-up to {heap_end} KiB: {mem:?}"
        );
        assert!(
            malloc_end < malloc_warm + malloc_warm / 20,
            "memory in use grew from {malloc_warm} KiB after warm-up to {malloc_end} KiB: {mem:?}"
        );
        assert!(
            rss_end < rss_warm + rss_warm / 10,
            "RSS grew from {rss_warm} KiB after warm-up to {rss_end} KiB: {mem:?}"
        );
    });
}
