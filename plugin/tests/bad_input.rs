//! Bad input never panics and never hangs: each case gives an element error or a warning
//! that names the problem (issue 5, item 6).

mod common;

use common::*;
use gst::glib;
use gst::prelude::*;

/// Tries to start `desc`; returns what the bus said.
fn try_start(desc: &str) -> Outcome {
    let pipeline = launch(desc);
    let out = run(&pipeline, 60);
    drop(pipeline);
    out
}

fn assert_error_names(out: &Outcome, needles: &[&str]) {
    let all = out.errors.join("\n");
    assert!(
        !out.errors.is_empty(),
        "expected an element error; warnings {:?}",
        out.warnings
    );
    for n in needles {
        assert!(all.contains(n), "error does not name {n:?}: {all}");
    }
}

fn src_desc(props: &str) -> String {
    format!(
        "motioncachesrc num-buffers=3 {} {props} ! fakesink",
        fast_launch()
    )
}

#[test]
fn missing_model_directory() {
    with_timeout(60, || {
        let out = try_start(&src_desc("model=/nonexistent/motioncache-model"));
        assert_error_names(&out, &["/nonexistent/motioncache-model"]);
    });
}

#[test]
fn malformed_model_directory() {
    with_timeout(60, || {
        let dir = std::env::temp_dir().join(format!("mc-bad-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model_index.json"), "{ this is not json").unwrap();
        let out = try_start(&src_desc(&format!("model={}", dir.display())));
        assert_error_names(&out, &["model_index.json"]);

        // valid index, components missing
        std::fs::write(
            dir.join("model_index.json"),
            r#"{"_class_name": "SkyReelsV2DiffusionForcingPipeline"}"#,
        )
        .unwrap();
        let out = try_start(&src_desc(&format!("model={}", dir.display())));
        assert_error_names(&out, &["transformer"]);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn unknown_device() {
    with_timeout(60, || {
        let out = try_start(&src_desc("device=tpu7"));
        assert_error_names(&out, &["device", "tpu7"]);
    });
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_cpu_build() {
    with_timeout(60, || {
        let out = try_start(&src_desc("device=cuda:0"));
        assert_error_names(&out, &["device", "cuda"]);
    });
}

#[test]
fn out_of_range_values_are_rejected_by_the_param_specs() {
    with_timeout(60, || {
        let src = new_src();
        let warnings = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let w = warnings.clone();
        let handler = glib::log_set_handler(
            Some("GLib-GObject"),
            glib::LogLevels::LEVEL_WARNING | glib::LogLevels::LEVEL_CRITICAL,
            false,
            false,
            move |_, _, msg| w.lock().unwrap().push(msg.to_string()),
        );
        // What gst-launch does with `steps=5000` (glib's Rust setter panics instead).
        let set = |name: &str, value: &str| unsafe {
            use gst::glib::translate::ToGlibPtr;
            let name = std::ffi::CString::new(name).unwrap();
            let value = std::ffi::CString::new(value).unwrap();
            let obj: *mut glib::gobject_ffi::GObject =
                src.upcast_ref::<glib::Object>().to_glib_none().0;
            gst::ffi::gst_util_set_object_arg(obj, name.as_ptr(), value.as_ptr());
        };
        set("steps", "5000");
        set("weight-floor", "3.5");
        set("guidance-scale", "-20");
        glib::log_remove_handler(Some("GLib-GObject"), handler);
        assert_eq!(src.property::<i32>("steps"), 4, "steps keeps its value");
        assert_eq!(src.property::<f64>("weight-floor"), -1.0);
        assert_eq!(src.property::<f64>("guidance-scale"), 1.0);
        let w = warnings.lock().unwrap().join("\n");
        for name in ["steps", "weight-floor", "guidance-scale"] {
            assert!(w.contains(name), "GLib warning names {name}: {w}");
        }
    });
}

#[test]
fn inconsistent_settings_fail_start_naming_the_property() {
    with_timeout(120, || {
        let out = try_start(&src_desc("causal-block-size=3 window=9 overlap=2"));
        assert_error_names(&out, &["overlap", "2"]);
        let out = try_start(&src_desc("warmup-steps=9"));
        assert_error_names(&out, &["warmup-steps", "9"]);
        // The error states the model's own schedule, a consistent set to start from.
        let out = try_start(&src_desc("causal-block-size=4 window=9"));
        assert_error_names(
            &out,
            &["window", "causal-block-size 3, window 9, overlap 3"],
        );
    });
}

/// [`while_playing`] on the fast test settings plus `props`.
fn while_playing_fast(props: &str, f: impl FnOnce(&gst::Element), secs: u64) -> Outcome {
    while_playing(&format!("{} {props}", fast_launch()), f, secs)
}

#[test]
fn invalid_runtime_change_is_refused_with_a_warning() {
    with_timeout(120, || {
        let out = while_playing_fast(
            "",
            |src| {
                src.set_property("warmup-steps", 100i32);
                assert_eq!(src.property::<i32>("warmup-steps"), -1, "value reverted");
            },
            2,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let w = out.warnings.join("\n");
        assert!(w.contains("warmup-steps") && w.contains("100"), "{w}");
        assert!(!out.stats.is_empty(), "generation went on");
    });
}

#[test]
fn ready_only_change_while_playing_is_refused() {
    with_timeout(120, || {
        let out = while_playing_fast(
            "",
            |src| {
                src.set_property("steps", 9i32);
                src.set_property("device", "cpu");
                assert_eq!(src.property::<i32>("steps"), 4, "value kept");
            },
            1,
        );
        let w = out.warnings.join("\n");
        assert!(w.contains("'steps'") && w.contains("'device'"), "{w}");
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    });
}

#[test]
fn non_utf8_prompt_is_refused() {
    with_timeout(120, || {
        let out = while_playing_fast(
            "",
            |src| {
                let before = src.property::<String>("prompt");
                // C callers can pass any bytes; glib's Rust accessors would panic on them.
                unsafe {
                    use glib::translate::ToGlibPtr;
                    let mut v: glib::gobject_ffi::GValue = std::mem::zeroed();
                    glib::gobject_ffi::g_value_init(&mut v, glib::gobject_ffi::G_TYPE_STRING);
                    glib::gobject_ffi::g_value_set_string(
                        &mut v,
                        c"a red \xff\xfe circle".as_ptr(),
                    );
                    let obj: *mut glib::gobject_ffi::GObject =
                        src.upcast_ref::<glib::Object>().to_glib_none().0;
                    glib::gobject_ffi::g_object_set_property(obj, c"prompt".as_ptr(), &v);
                    glib::gobject_ffi::g_value_unset(&mut v);
                }
                assert_eq!(src.property::<String>("prompt"), before);
            },
            1,
        );
        let w = out.warnings.join("\n");
        assert!(w.contains("'prompt'") && w.contains("UTF-8"), "{w}");
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    });
}

#[test]
fn empty_prompt_warns_and_still_runs() {
    with_timeout(120, || {
        let out = try_start(&src_desc("prompt=\"\""));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos);
        let w = out.warnings.join("\n");
        assert!(w.contains("'prompt'") && w.contains("empty"), "{w}");
    });
}

#[test]
fn words_the_model_cannot_read_warn_and_it_still_runs() {
    with_timeout(120, || {
        // At the start: the words outside the embedded model's vocabulary are named.
        let out = try_start(&src_desc(
            "prompt=\"a cat running on the blue background\" negative-prompt=\"blurry\"",
        ));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos);
        let w = out.warnings.join("\n");
        assert!(
            w.contains("property 'prompt': \"cat\", \"running\", \"the\" are not in the vocabulary of model tiny (embedded)"),
            "{w}"
        );
        // The negative prompt is not used without guidance (the tests' guidance-scale 1).
        assert!(!w.contains("negative-prompt"), "{w}");

        // While playing: a new prompt is checked when it is set; a caption the model
        // reads in full warns of nothing.
        let out = while_playing_fast(
            "prompt=\"a red circle moving right on a striped blue background\"",
            |src| {
                src.set_property("prompt", "a purple circle moving right");
                // Unused until guidance turns on; then it is checked once.
                src.set_property("negative-prompt", "ugly");
                src.set_property("guidance-scale", 5.0f64);
                src.set_property("guidance-scale", 4.0f64);
            },
            1,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let w = out.warnings.join("\n");
        assert!(w.contains("property 'prompt': \"purple\" is not"), "{w}");
        assert!(
            w.contains("property 'negative-prompt': \"ugly\" is not"),
            "{w}"
        );
        assert_eq!(out.warnings.len(), 2, "{w}");
    });
}

#[test]
fn caps_that_cannot_be_met() {
    with_timeout(120, || {
        // Within the template (any size, rate): refused at negotiation, by the element.
        for caps in ["video/x-raw,width=17", "video/x-raw,framerate=1000/1"] {
            let out = try_start(&format!(
                "motioncachesrc num-buffers=3 {} ! {caps} ! fakesink",
                fast_launch()
            ));
            let all = out.errors.join("\n");
            assert!(
                all.contains("cannot meet the downstream caps"),
                "{caps}: {all}"
            );
        }
        // Outside the template: refused when linking.
        let desc = format!(
            "motioncachesrc num-buffers=3 {} ! video/x-raw,format=NV12 ! fakesink",
            fast_launch()
        );
        match gst::parse::launch(&desc) {
            Err(e) => assert!(e.to_string().contains("NV12"), "{e}"),
            Ok(p) => {
                let out = run(p.downcast_ref::<gst::Pipeline>().unwrap(), 60);
                let all = out.errors.join("\n");
                assert!(all.contains("cannot meet the downstream caps"), "{all}");
            }
        }
    });
}
