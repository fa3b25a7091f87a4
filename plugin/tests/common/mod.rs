//! Shared helpers of the element tests: plugin registration, timeouts, fast settings.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, mpsc};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("gst::init");
        gstmotioncache::plugin_register_static().expect("register the motioncache plugin");
    });
}

/// Runs `f` on its own thread and fails the test if it has not finished after `secs`
/// (so a hang shows up as a failure instead of a stuck CI job). Tests of one binary run
/// one at a time: each generator uses every core, and the thread/memory checks count
/// process-wide.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    init();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without a value"),
        },
    }
}

/// Settings that keep the tests short; `MOTIONCACHE_TEST_MODEL` points the tests at a
/// model directory instead of the embedded model (development only).
pub fn fast_props() -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("steps", "4".to_string()),
        ("guidance-scale", "1".to_string()),
    ];
    if let Ok(m) = std::env::var("MOTIONCACHE_TEST_MODEL") {
        p.push(("model", m));
    }
    p
}

/// The same as a gst-launch fragment.
pub fn fast_launch() -> String {
    fast_props()
        .into_iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn configure(el: &gst::Element) {
    for (k, v) in fast_props() {
        el.set_property_from_str(k, &v);
    }
}

pub fn new_src() -> gst::Element {
    init();
    let el = gst::ElementFactory::make("motioncachesrc")
        .build()
        .expect("motioncachesrc");
    configure(&el);
    el
}

/// Stats of one `motioncache-stats` element message.
#[derive(Debug, Clone)]
pub struct Stats {
    pub block_index: u64,
    pub frames: u32,
    pub wall_time: f64,
    pub recomputed_fraction: f64,
    pub flops_ratio: f64,
    pub steps: u32,
    pub full: u32,
    pub partial: u32,
    pub skipped: u32,
}

pub fn parse_stats(s: &gst::StructureRef) -> Option<Stats> {
    if s.name() != "motioncache-stats" {
        return None;
    }
    Some(Stats {
        block_index: s.get("block-index").expect("block-index u64"),
        frames: s.get("frames").expect("frames u32"),
        wall_time: s.get("wall-time").expect("wall-time f64"),
        recomputed_fraction: s
            .get("recomputed-fraction")
            .expect("recomputed-fraction f64"),
        flops_ratio: s.get("flops-ratio").expect("flops-ratio f64"),
        steps: s.get("steps").expect("steps u32"),
        full: s.get("full-forwards").expect("full-forwards u32"),
        partial: s.get("partial-forwards").expect("partial-forwards u32"),
        skipped: s.get("skipped-forwards").expect("skipped-forwards u32"),
    })
}

/// What a pipeline run posted.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stats: Vec<Stats>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub eos: bool,
}

fn describe(err: &glib::Error, debug: Option<glib::GString>) -> String {
    format!(
        "{err} ({})",
        debug.map(|d| d.to_string()).unwrap_or_default()
    )
}

/// Records one bus message; true when the run is over (EOS or error).
pub fn record(out: &mut Outcome, msg: &gst::Message) -> bool {
    use gst::MessageView;
    match msg.view() {
        MessageView::Eos(_) => {
            out.eos = true;
            true
        }
        MessageView::Error(e) => {
            out.errors.push(describe(&e.error(), e.debug()));
            true
        }
        MessageView::Warning(w) => {
            out.warnings.push(describe(&w.error(), w.debug()));
            false
        }
        MessageView::Element(e) => {
            if let Some(s) = e.structure().and_then(parse_stats) {
                out.stats.push(s);
            }
            false
        }
        _ => false,
    }
}

/// Plays `pipeline` until EOS or an error (or `secs`), returns what the bus said, leaves
/// the pipeline in NULL.
pub fn run(pipeline: &gst::Pipeline, secs: u64) -> Outcome {
    let mut out = Outcome::default();
    let bus = pipeline.bus().expect("pipeline bus");
    if pipeline.set_state(gst::State::Playing).is_err() {
        // the error message on the bus says why
        drain(&bus, &mut out, Duration::from_millis(200));
        pipeline.set_state(gst::State::Null).expect("to NULL");
        return out;
    }
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        if record(&mut out, &msg) {
            break;
        }
    }
    pipeline.set_state(gst::State::Null).expect("to NULL");
    drain(&bus, &mut out, Duration::ZERO);
    out
}

pub fn drain(bus: &gst::Bus, out: &mut Outcome, wait: Duration) {
    let end = Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64)) {
            Some(m) => {
                record(out, &m);
            }
            None => break,
        }
    }
}

/// Mean absolute difference of two frames' bytes.
pub fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// Plays `motioncachesrc name=src {src_props} ! fakesink` until its first block, runs `f`
/// on the element, then collects messages for `secs` and stops.
pub fn while_playing(src_props: &str, f: impl FnOnce(&gst::Element), secs: u64) -> Outcome {
    let pipeline = launch(&format!(
        "motioncachesrc name=src {src_props} ! fakesink sync=false"
    ));
    let src = pipeline.by_name("src").unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(60),
        &[gst::MessageType::Element],
    )
    .expect("a first block");
    f(&src);
    let mut out = Outcome::default();
    drain(&bus, &mut out, Duration::from_secs(secs));
    pipeline.set_state(gst::State::Null).unwrap();
    out
}

pub fn launch(desc: &str) -> gst::Pipeline {
    init();
    gst::parse::launch(desc)
        .unwrap_or_else(|e| panic!("cannot build {desc}: {e}"))
        .downcast::<gst::Pipeline>()
        .expect("a pipeline")
}

/// The process's resident set (VmRSS), in KiB.
/// [`rss_kib`] after returning the allocator's free memory to the system (glibc's
/// `malloc_trim`): what is left is memory in use, not the free pools of the per-thread
/// arenas that glibc opens when threads contend (their size depends on the machine's load,
/// which made the cycle test fail on CI with 13 MB of free pools and no leak).
pub fn rss_kib_in_use() -> u64 {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: malloc_trim only releases free heap memory; any thread may call it.
    unsafe { malloc_trim(0) };
    rss_kib()
}

pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes allocated through the C library's malloc and not freed, over all arenas and
/// mmapped chunks (glibc's `malloc_info`: the system memory of the arenas less their free
/// chunks, plus mmapped chunks), in KiB: the Rust heap and GStreamer's and GLib's
/// allocations, without the pages fragmentation keeps (which the resident set holds).
pub fn malloc_in_use_kib() -> u64 {
    use std::ffi::{c_char, c_int, c_void};
    unsafe extern "C" {
        fn open_memstream(buf: *mut *mut c_char, len: *mut usize) -> *mut c_void;
        fn malloc_info(options: c_int, stream: *mut c_void) -> c_int;
        fn fclose(stream: *mut c_void) -> c_int;
        fn free(p: *mut c_void);
    }
    let (mut buf, mut len) = (std::ptr::null_mut::<c_char>(), 0usize);
    // SAFETY: open_memstream owns `buf` until fclose, after which it is a malloc'd,
    // NUL-terminated string of `len` bytes that we copy and free.
    let xml = unsafe {
        let f = open_memstream(&mut buf, &mut len);
        assert!(!f.is_null(), "open_memstream failed");
        let rc = malloc_info(0, f);
        fclose(f);
        assert_eq!(rc, 0, "malloc_info failed");
        let xml =
            String::from_utf8_lossy(std::slice::from_raw_parts(buf as *const u8, len)).into_owned();
        free(buf.cast());
        xml
    };
    // The process's totals follow the last arena's </heap>.
    let totals = &xml[xml.rfind("</heap>").map_or(0, |i| i + 7)..];
    let size = |tag: &str| -> u64 {
        let at = totals
            .find(tag)
            .unwrap_or_else(|| panic!("malloc_info without {tag}: {xml}"));
        let rest = &totals[at + tag.len()..];
        let from = rest.find("size=\"").expect("a size attribute") + 6;
        let to = rest[from..].find('"').expect("a closing quote");
        rest[from..from + to].parse().expect("a size in bytes")
    };
    let free = size("<total type=\"fast\"") + size("<total type=\"rest\"");
    (size("<system type=\"current\"") - free + size("<total type=\"mmap\"")) / 1024
}

/// The system allocator, counting the bytes live on the Rust heap: the element, the model
/// and candle (the plugin is registered statically in every test binary), not GStreamer's C side.
struct Counting;

static RUST_HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            RUST_HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            RUST_HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        RUST_HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            RUST_HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            RUST_HEAP_BYTES.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

pub fn rust_heap_kib() -> u64 {
    (RUST_HEAP_BYTES.load(Ordering::Relaxed) / 1024) as u64
}
