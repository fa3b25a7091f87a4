//! `motioncachesrc` behaviour: caps, segment, timestamps, EOS, live mode, runtime changes,
//! stopping, seeking.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

fn harness(props: &[(&str, &str)]) -> gst_check::Harness {
    let src = new_src();
    for (k, v) in props {
        src.set_property_from_str(k, v);
    }
    gst_check::Harness::with_element(&src, None, Some("src"))
}

fn next_event(h: &mut gst_check::Harness, t: gst::EventType) -> gst::Event {
    loop {
        let ev = h.pull_event().expect("an event within the harness timeout");
        if ev.type_() == t {
            return ev;
        }
    }
}

#[test]
fn caps_segment_timestamps_and_eos() {
    with_timeout(240, || {
        let mut h = harness(&[("num-buffers", "7")]);
        h.play();
        let caps = match next_event(&mut h, gst::EventType::Caps).view() {
            gst::EventView::Caps(c) => c.caps_owned(),
            _ => unreachable!(),
        };
        let info = gst_video::VideoInfo::from_caps(&caps).expect("raw video caps");
        assert_eq!(info.format(), gst_video::VideoFormat::Rgb, "{caps}");
        assert!(info.width() > 0 && info.height() > 0);
        let fps = info.fps();
        assert!(fps.numer() > 0, "fixed framerate expected: {caps}");
        match next_event(&mut h, gst::EventType::Segment).view() {
            gst::EventView::Segment(s) => {
                let seg = s.segment();
                assert_eq!(seg.format(), gst::Format::Time);
                assert_eq!(seg.rate(), 1.0);
            }
            _ => unreachable!(),
        }
        let frame_ns = |n: u64| {
            gst::ClockTime::SECOND
                .mul_div_floor(n * fps.denom() as u64, fps.numer() as u64)
                .unwrap()
        };
        for n in 0..7u64 {
            let b = h.pull().expect("buffer");
            assert_eq!(b.size(), info.size());
            assert_eq!(b.pts(), Some(frame_ns(n)), "frame {n}");
            assert_eq!(
                b.duration(),
                Some(frame_ns(n + 1) - frame_ns(n)),
                "frame {n}"
            );
            assert_eq!(b.offset(), n);
            assert_eq!(b.offset_end(), n + 1);
        }
        next_event(&mut h, gst::EventType::Eos);
        // the model actually drew something: not a constant frame
        assert_eq!(h.buffers_in_queue(), 0);
    });
}

#[test]
fn i420_negotiated_for_encoders() {
    with_timeout(240, || {
        let mut h = harness(&[("num-buffers", "2")]);
        h.set_sink_caps_str("video/x-raw,format=I420");
        h.play();
        let b = h.pull().expect("buffer");
        let caps = h
            .sinkpad()
            .expect("harness sink pad")
            .current_caps()
            .expect("caps");
        let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        assert_eq!(info.format(), gst_video::VideoFormat::I420);
        assert_eq!(
            info.colorimetry().matrix(),
            gst_video::VideoColorMatrix::Bt601,
            "{caps}"
        );
        assert_eq!(b.size(), info.size());
        let map = b.map_readable().unwrap();
        let y = &map[..info.width() as usize];
        assert!(
            y.iter().all(|&v| (16..=235).contains(&v)),
            "limited-range luma: {y:?}"
        );
    });
}

#[test]
fn frames_are_not_constant_and_stats_are_posted() {
    with_timeout(240, || {
        let pipeline = launch(&format!(
            "motioncachesrc name=src num-buffers=6 {} ! fakesink",
            fast_launch()
        ));
        let out = run(&pipeline, 200);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos);
        assert!(!out.stats.is_empty(), "no motioncache-stats message");
        for (i, s) in out.stats.iter().enumerate() {
            assert_eq!(s.block_index, i as u64);
            assert!(s.frames > 0 && s.wall_time > 0.0 && s.steps == 4, "{s:?}");
            assert!((0.0..=1.0).contains(&s.recomputed_fraction), "{s:?}");
            assert!(s.flops_ratio > 0.0, "{s:?}");
        }
        let src = pipeline.by_name("src").unwrap();
        let stats = src.property::<gst::Structure>("stats");
        assert!(parse_stats(&stats).is_some(), "{stats}");
    });
}

/// With num-buffers the generator makes the blocks those frames need and no more, even
/// while the pipeline stays in PLAYING after EOS (the embedded model: 7 frames = 7 latent
/// frames = 3 blocks of 3).
#[test]
fn generation_stops_at_num_buffers() {
    with_timeout(240, || {
        let pipeline = launch(&format!(
            "motioncachesrc num-buffers=7 {} ! fakesink",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        let mut out = Outcome::default();
        while let Some(msg) = bus.timed_pop(gst::ClockTime::from_seconds(120)) {
            if record(&mut out, &msg) {
                break;
            }
        }
        assert!(out.eos && out.errors.is_empty(), "{:?}", out.errors);
        // Time for a generator that did not stop to make more blocks.
        drain(&bus, &mut out, Duration::from_millis(1500));
        pipeline.set_state(gst::State::Null).unwrap();
        assert_eq!(out.stats.len(), 3, "blocks generated: {:?}", out.stats);
    });
}

#[test]
fn live_mode_paces_and_answers_latency() {
    with_timeout(300, || {
        let pipeline = launch(&format!(
            "motioncachesrc is-live=true num-buffers=12 {} ! fakesink sync=true",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        let started = Instant::now();
        pipeline.set_state(gst::State::Playing).unwrap();
        let mut out = Outcome::default();
        let mut latency = None;
        while let Some(msg) = bus.timed_pop(gst::ClockTime::from_seconds(120)) {
            if latency.is_none() && !out.stats.is_empty() {
                let mut q = gst::query::Latency::new();
                assert!(pipeline.query(&mut q), "latency query answered");
                latency = Some(q.result());
            }
            if record(&mut out, &msg) {
                break;
            }
        }
        let elapsed = started.elapsed();
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos);
        let (live, min, max) = latency.expect("latency queried");
        assert!(live);
        assert!(min > gst::ClockTime::ZERO, "block latency {min}");
        // Bounded: the queue of finished blocks on top of the block latency.
        let max = max.expect("a bounded max latency");
        assert!(max > min, "max latency {max} <= min {min}");
        // 12 frames at the model's rate (24 fps or less) cannot leave faster than real time
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    });
}

/// A live pause stops the generator on its full queue; the latency it answers afterwards
/// is still the blocks' compute time, not the pause.
#[test]
fn latency_after_a_live_pause_is_compute_time() {
    with_timeout(300, || {
        let pipeline = launch(&format!(
            "motioncachesrc is-live=true {} ! fakesink sync=true",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        let mut out = Outcome::default();
        let wait_blocks = |out: &mut Outcome, n: usize| {
            let end = Instant::now() + Duration::from_secs(120);
            while out.stats.len() < n && Instant::now() < end {
                if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
                    record(out, &msg);
                }
            }
            assert!(out.stats.len() >= n, "{} blocks", out.stats.len());
        };
        pipeline.set_state(gst::State::Playing).unwrap();
        wait_blocks(&mut out, 2);
        pipeline.set_state(gst::State::Paused).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        pipeline.set_state(gst::State::Playing).unwrap();
        let seen = out.stats.len();
        wait_blocks(&mut out, seen + 3);
        let mut q = gst::query::Latency::new();
        assert!(pipeline.query(&mut q), "latency query answered");
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let (live, min, _) = q.result();
        assert!(live);
        // A block of the embedded model at 4 steps computes in well under a second here;
        // counting the pause would make it more than two.
        assert!(
            min < gst::ClockTime::from_seconds(1),
            "latency {min} after a 2 s pause"
        );
        assert!(
            out.stats.iter().any(|s| s.wall_time >= 1.5),
            "the pause shows in some block's wall time: {:?}",
            out.stats
        );
    });
}

/// Runs until `until` blocks were posted, calling `at` once when block `change_at` is seen.
fn run_blocks(
    pipeline: &gst::Pipeline,
    until: u64,
    change_at: u64,
    mut at: impl FnMut(),
) -> Outcome {
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut out = Outcome::default();
    let mut changed = false;
    let end = Instant::now() + Duration::from_secs(200);
    while Instant::now() < end {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        if record(&mut out, &msg) {
            break;
        }
        if let Some(last) = out.stats.last() {
            if !changed && last.block_index >= change_at {
                at();
                changed = true;
            }
            if last.block_index >= until {
                break;
            }
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    out
}

#[test]
fn runtime_motion_threshold_changes_statistics() {
    with_timeout(300, || {
        let pipeline = launch(&format!(
            "motioncachesrc name=src cache-mode=motioncache warmup-steps=1 motion-threshold=0 \
             refresh-interval=0 min-update-ratio=0 {} ! fakesink sync=false",
            fast_launch()
        ));
        let src = pipeline.by_name("src").unwrap();
        let out = run_blocks(&pipeline, 9, 1, || {
            src.set_property("motion-threshold", 1000.0f64);
        });
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert!(out.stats.len() >= 10, "{} blocks", out.stats.len());
        let first = &out.stats[1];
        let last = out.stats.last().unwrap();
        // threshold 0: every token recomputes at every step; 1000: after the one warmup
        // step almost nothing does
        assert!(
            last.recomputed_fraction < first.recomputed_fraction - 0.2,
            "before {first:?} after {last:?}"
        );
        assert!(
            last.flops_ratio < first.flops_ratio,
            "before {first:?} after {last:?}"
        );
        assert_eq!(src.property::<f64>("motion-threshold"), 1000.0);
    });
}

/// `full-first-block`: auto (motioncache's default, on) runs the video's first block in
/// full at every step whatever the threshold, the next block reuses; off caches the first
/// block like the others.
#[test]
fn full_first_block_property_decides_the_first_block() {
    with_timeout(300, || {
        let blocks = |extra: &str| {
            let pipeline = launch(&format!(
                "motioncachesrc cache-mode=motioncache warmup-steps=1 motion-threshold=1000 \
                 refresh-interval=0 {extra} {} ! fakesink sync=false",
                fast_launch()
            ));
            let out = run_blocks(&pipeline, 1, u64::MAX, || {});
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert!(out.stats.len() >= 2, "{} blocks", out.stats.len());
            out.stats
        };
        let auto = blocks("");
        assert_eq!(
            (auto[0].full, auto[0].partial, auto[0].skipped),
            (auto[0].steps, 0, 0),
            "{:?}",
            auto[0]
        );
        assert!(auto[1].skipped > 0, "{:?}", auto[1]);
        let off = blocks("full-first-block=off");
        assert!(
            off[0].skipped > 0 && off[0].full < off[0].steps,
            "{:?}",
            off[0]
        );
    });
}

fn pull_frames(h: &mut gst_check::Harness, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let b = h.pull().expect("buffer");
            b.map_readable().unwrap().to_vec()
        })
        .collect()
}

#[test]
fn prompt_change_changes_frames() {
    with_timeout(400, || {
        const FRAMES: usize = 30;
        let run = |change: bool| {
            let mut h = harness(&[("seed", "7")]);
            h.play();
            let mut frames = pull_frames(&mut h, 1);
            if change {
                h.element().unwrap().set_property(
                    "prompt",
                    "a white triangle moving down on a plain green background",
                );
            }
            frames.extend(pull_frames(&mut h, FRAMES - 1));
            frames
        };
        let same = run(false);
        let changed = run(true);
        let first = mean_abs_diff(&same[0], &changed[0]);
        assert!(
            first < 0.01,
            "same seed, same prompt: first frames differ by {first}"
        );
        let last = mean_abs_diff(&same[FRAMES - 1], &changed[FRAMES - 1]);
        assert!(
            last > 0.5,
            "the new prompt did not change the frames ({last})"
        );
    });
}

/// Names of this process's threads that are still running: a thread that has exited but
/// is not reaped yet (state Z or X in its `stat`) does not count.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                .filter_map(|stat| {
                    let open = stat.find('(')?;
                    let close = stat.rfind(')')?;
                    let state = stat[close + 1..].split_whitespace().next()?;
                    (!matches!(state, "Z" | "X" | "x")).then(|| stat[open + 1..close].to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `thread_names` until `ok` holds or 10 s have passed; a thread that leaked stays,
/// one that was joined leaves /proc as soon as the (possibly CPU-throttled) kernel reaps it.
fn thread_names_when(ok: impl Fn(&[String]) -> bool) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut names = thread_names();
    while !ok(&names) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        names = thread_names();
    }
    names
}

#[test]
fn stop_is_prompt_and_restarts_do_not_leak() {
    with_timeout(400, || {
        let pipeline = launch(&format!(
            "motioncachesrc name=src {} ! fakesink sync=false",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        let mut rss_after_first = 0;
        let mut baseline = 0;
        for cycle in 0..5 {
            pipeline.set_state(gst::State::Playing).unwrap();
            // wait for the first block, then stop while the next one is being generated
            let msg = bus
                .timed_pop_filtered(
                    gst::ClockTime::from_seconds(120),
                    &[gst::MessageType::Element, gst::MessageType::Error],
                )
                .expect("a first block");
            assert!(!matches!(msg.view(), gst::MessageView::Error(_)), "{msg:?}");
            let t = Instant::now();
            pipeline.set_state(gst::State::Null).unwrap();
            let took = t.elapsed();
            assert!(
                took < Duration::from_secs(3),
                "PLAYING -> NULL took {took:?}"
            );
            while bus.pop().is_some() {}
            // The thread is joined by then; the kernel may list an exited thread for a
            // moment after its join returned (it is reaped after waking the joiner).
            let names = thread_names_when(|n| {
                !n.iter().any(|n| n == "motioncache-gen") && (cycle == 0 || n.len() <= baseline + 1)
            });
            assert!(
                !names.iter().any(|n| n == "motioncache-gen"),
                "generator thread left after cycle {cycle}: {names:?}"
            );
            // The first cycle starts thread pools (GStreamer's task pool, the matmul
            // pool) that live on; after that every cycle must end where it began.
            if cycle == 0 {
                rss_after_first = rss_kib();
                baseline = names.len();
            } else {
                // one more is a GLib pool thread on its way out
                assert!(
                    names.len() <= baseline + 1,
                    "cycle {cycle}: threads {names:?}, {baseline} after the first cycle"
                );
            }
        }
        let grown = rss_kib().saturating_sub(rss_after_first);
        assert!(
            grown < 64 * 1024,
            "RSS grew by {grown} KiB over 4 start/stop cycles"
        );
    });
}

#[test]
fn flushing_seek_is_refused_and_playback_continues() {
    with_timeout(300, || {
        let pipeline = launch(&format!(
            "motioncachesrc num-buffers=15 {} ! fakesink sync=false",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(120),
            &[gst::MessageType::Element],
        )
        .expect("a first block");
        let seek = pipeline.seek_simple(
            gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
            gst::ClockTime::from_seconds(1),
        );
        assert!(seek.is_err(), "a generator cannot seek");
        let mut out = Outcome::default();
        while let Some(msg) = bus.timed_pop(gst::ClockTime::from_seconds(120)) {
            if record(&mut out, &msg) {
                break;
            }
        }
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos, "playback went on to EOS after the refused seek");
    });
}

/// The model is loaded once and kept across READY <-> PAUSED (no Progress "load-model"
/// on the second start), and loaded again after NULL.
#[test]
fn model_is_kept_across_ready_paused_and_released_in_null() {
    with_timeout(240, || {
        let pipeline = launch(&format!("motioncachesrc {} ! fakesink", fast_launch()));
        let bus = pipeline.bus().unwrap();
        let to = |state: gst::State| {
            pipeline.set_state(state).unwrap();
            let (r, now, _) = pipeline.state(gst::ClockTime::from_seconds(60));
            assert!(r.is_ok() && now == state, "{r:?} {now:?}");
        };
        let loads = || {
            let mut n = 0;
            while let Some(m) = bus.pop() {
                if let gst::MessageView::Progress(p) = m.view()
                    && p.get().0 == gst::ProgressType::Start
                {
                    n += 1;
                }
            }
            n
        };
        to(gst::State::Paused);
        to(gst::State::Ready);
        to(gst::State::Paused);
        assert_eq!(loads(), 1, "one load for two starts");
        to(gst::State::Null);
        to(gst::State::Paused);
        assert_eq!(loads(), 1, "loaded again after NULL");
        to(gst::State::Null);
    });
}

/// A property set while `start()` loads the model (here from a bus sync handler on the
/// load's Progress message) is not lost: the stream follows it as if it had been set first.
#[test]
fn a_prompt_set_while_the_model_loads_is_used() {
    with_timeout(300, || {
        const PROMPT: &str = "a white triangle moving down on a plain green background";
        let first_frames = |during_load: bool| {
            let mut h = harness(&[("seed", "7")]);
            let el = h.element().unwrap();
            if during_load {
                let bus = gst::Bus::new();
                let weak = el.downgrade();
                bus.set_sync_handler(move |_, m| {
                    if let gst::MessageView::Progress(p) = m.view()
                        && p.get().0 == gst::ProgressType::Start
                        && let Some(e) = weak.upgrade()
                    {
                        e.set_property("prompt", PROMPT);
                    }
                    gst::BusSyncReply::Drop
                });
                el.set_bus(Some(&bus));
            } else {
                el.set_property("prompt", PROMPT);
            }
            h.play();
            pull_frames(&mut h, 3)
        };
        let from_start = first_frames(false);
        let during = first_frames(true);
        let d = mean_abs_diff(&from_start[2], &during[2]);
        assert!(d < 0.01, "the prompt set during loading was not used ({d})");
    });
}
