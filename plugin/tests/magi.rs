//! MAGI-1 through `motioncachesrc` (issue 15): the tiny MAGI-1 directory of the parity
//! fixtures (`tests/fixtures/magi/tiny`, random weights under the upstream names) streams
//! chunk by chunk at the model's own size and rate, `num-buffers` ends it after whole
//! chunks, a prompt change while playing changes the frames, properties that do not apply
//! to MAGI-1 are refused (at start: ignored) with a warning that says so, and a MAGI-1
//! directory without its T5 is an error that names the file.

mod common;

use std::path::PathBuf;

use common::*;
use gst::prelude::*;

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/magi/tiny")
        .canonicalize()
        .expect("tests/fixtures/magi/tiny")
        .display()
        .to_string()
}

/// A source on the tiny MAGI-1 model (no `fast_props`: its settings are the model's).
fn magi_src(props: &[(&str, &str)]) -> gst::Element {
    init();
    let el = gst::ElementFactory::make("motioncachesrc")
        .property("model", tiny())
        .build()
        .expect("motioncachesrc");
    for (k, v) in props {
        el.set_property_from_str(k, v);
    }
    el
}

#[test]
fn magi_streams_chunks_at_the_model_size_and_rate() {
    with_timeout(240, || {
        // 20 frames: three chunks of 8 (whole chunks), guidance-scale ignored with a warning.
        let pipeline = launch(&format!(
            "motioncachesrc model=\"{}\" num-buffers=20 guidance-scale=3 ! \
             video/x-raw,format=RGB ! fakesink name=sink",
            tiny()
        ));
        let sink = pipeline.by_name("sink").unwrap();
        let caps = std::sync::Arc::new(std::sync::Mutex::new(None));
        let c = caps.clone();
        sink.static_pad("sink").unwrap().add_probe(
            gst::PadProbeType::EVENT_DOWNSTREAM,
            move |_, info| {
                if let Some(gst::PadProbeData::Event(ev)) = &info.data
                    && let gst::EventView::Caps(e) = ev.view()
                {
                    *c.lock().unwrap() = Some(e.caps().to_owned());
                }
                gst::PadProbeReturn::Ok
            },
        );
        let out = run(&pipeline, 120);
        assert!(out.eos && out.errors.is_empty(), "{:?}", out.errors);
        let caps = caps.lock().unwrap().clone().expect("caps");
        let s = caps.structure(0).unwrap();
        assert_eq!(s.get::<i32>("width").unwrap(), 64);
        assert_eq!(s.get::<i32>("height").unwrap(), 64);
        assert_eq!(
            s.get::<gst::Fraction>("framerate").unwrap(),
            gst::Fraction::new(24, 1)
        );
        assert_eq!(out.stats.len(), 3, "chunks: {:?}", out.stats);
        for (i, st) in out.stats.iter().enumerate() {
            assert_eq!(st.block_index, i as u64);
            // 2 latent frames per chunk, 8 steps each.
            assert_eq!((st.frames, st.steps), (2, 8), "{st:?}");
        }
        let w = out.warnings.join("\n");
        assert!(
            w.contains("'guidance-scale'") && w.contains("MAGI-1") && w.contains("ignored"),
            "{w}"
        );
    });
}

#[test]
fn magi_prompt_change_while_playing_changes_the_frames() {
    with_timeout(240, || {
        const FRAMES: usize = 48;
        let run = |change: bool| {
            let src = magi_src(&[("seed", "7")]);
            let mut h = gst_check::Harness::with_element(&src, None, Some("src"));
            h.play();
            let first = h.pull().expect("buffer").map_readable().unwrap().to_vec();
            if change {
                src.set_property("prompt", "a white triangle moving down on a green field");
            }
            let mut last = Vec::new();
            for _ in 1..FRAMES {
                last = h.pull().expect("buffer").map_readable().unwrap().to_vec();
            }
            (first, last)
        };
        let (a0, a1) = run(false);
        let (b0, b1) = run(true);
        assert!(mean_abs_diff(&a0, &b0) < 0.01, "same seed: first frames");
        let d = mean_abs_diff(&a1, &b1);
        assert!(d > 0.5, "the new prompt did not change the frames ({d})");
    });
}

#[test]
fn magi_refuses_properties_that_do_not_apply() {
    with_timeout(240, || {
        let out = while_playing(
            &format!("model=\"{}\"", tiny()),
            |src| {
                src.set_property("shift", 5.0f64);
                src.set_property("min-update-ratio", 0.5f64);
                // MAGI-1's cache properties apply while playing
                src.set_property_from_str("cache-mode", "teacache");
                src.set_property("motion-threshold", 0.01f64);
                assert_eq!(src.property::<f64>("shift"), -1.0, "value kept");
            },
            1,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let w = out.warnings.join("\n");
        for p in ["'shift'", "'min-update-ratio'"] {
            assert!(
                w.contains(p) && w.contains("does not apply to MAGI-1"),
                "{p}: {w}"
            );
        }
        for p in ["'cache-mode'", "'motion-threshold'"] {
            assert!(!w.contains(p), "{p}: {w}");
        }
    });
}

#[test]
fn magi_directory_without_its_t5_is_an_error_naming_it() {
    with_timeout(120, || {
        let dir = std::env::temp_dir().join(format!("mc-magi-no-t5-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(PathBuf::from(tiny()).join("config.json")).unwrap(),
        )
        .unwrap();
        cfg["runtime_config"]["load"] = tiny().into();
        cfg["runtime_config"]["vae_pretrained"] = format!("{}/vae", tiny()).into();
        cfg["runtime_config"]["t5_pretrained"] = "missing-t5".into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let pipeline = launch(&format!(
            "motioncachesrc model=\"{}\" num-buffers=1 ! fakesink",
            dir.display()
        ));
        let out = run(&pipeline, 60);
        let e = out.errors.join("\n");
        assert!(
            e.contains("missing-t5") && e.contains("t5_pretrained"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

/// MAGI-1's MotionCache behind the same properties: `none` computes every token of every
/// step; `motioncache` at a threshold the tiny model reaches reuses whole chunks and
/// token subsets (its stats say which), `teacache` whole chunks only; a chunk-wise phase
/// longer than the schedule is an error naming the property.
#[test]
fn magi_cache_modes_reuse_and_report_it() {
    with_timeout(400, || {
        let stats = |extra: &str| {
            let pipeline = launch(&format!(
                "motioncachesrc model=\"{}\" num-buffers=16 seed=1 {extra} ! fakesink sync=false",
                tiny()
            ));
            let out = run(&pipeline, 120);
            assert!(
                out.eos && out.errors.is_empty(),
                "{extra}: {:?}",
                out.errors
            );
            assert_eq!(out.stats.len(), 2, "{extra}: {:?}", out.stats);
            out.stats
        };
        for st in stats("cache-mode=none") {
            assert_eq!(st.recomputed_fraction, 1.0, "{st:?}");
            assert_eq!((st.full, st.partial, st.skipped), (8, 0, 0), "{st:?}");
        }
        let mc = stats("cache-mode=motioncache motion-threshold=0.1");
        let partial: u32 = mc.iter().map(|s| s.partial).sum();
        let skipped: u32 = mc.iter().map(|s| s.skipped).sum();
        assert!(partial > 0 && skipped > 0, "{mc:?}");
        for st in &mc {
            assert!(st.recomputed_fraction < 0.9, "{st:?}");
            assert_eq!(st.full + st.partial + st.skipped, 8, "{st:?}");
        }
        for st in stats("cache-mode=teacache motion-threshold=0.1") {
            assert_eq!(st.partial, 0, "{st:?}");
            assert!(st.skipped > 0, "{st:?}");
        }
        let pipeline = launch(&format!(
            "motioncachesrc model=\"{}\" num-buffers=8 cache-mode=motioncache \
             uniform-updates=30 ! fakesink",
            tiny()
        ));
        let out = run(&pipeline, 60);
        let e = out.errors.join("\n");
        assert!(e.contains("uniform-updates") && e.contains("30"), "{e}");
    });
}
