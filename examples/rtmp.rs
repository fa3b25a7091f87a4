//! Streams `motioncachesrc` live to an RTMP server.
//!
//! ```sh
//! cargo run --release -p gst-plugin-motioncache --example motioncache-rtmp -- \
//!     rtmp://127.0.0.1:1935/live/motioncache [SECONDS] [PROMPT]
//! ```
//! Watch with `ffplay rtmp://127.0.0.1:1935/live/motioncache`. Without SECONDS it runs
//! until the process is stopped.

use std::time::Duration;

use gst::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before gst::init starts any thread.
    unsafe { motioncache::cpu::tune_threads() };
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        eprintln!("usage: motioncache-rtmp RTMP_URL [SECONDS] [PROMPT]");
        std::process::exit(2);
    };
    let seconds: Option<u64> = args.next().map(|s| s.parse()).transpose()?;
    let prompt = args.next();

    gst::init()?;
    gstmotioncache::plugin_register_static()?;
    let pipeline = gst::parse::launch(
        "motioncachesrc name=src is-live=true ! videoconvert ! \
         x264enc tune=zerolatency speed-preset=ultrafast key-int-max=24 ! h264parse ! \
         flvmux streamable=true ! rtmp2sink name=sink",
    )?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let src = pipeline.by_name("src").ok_or("no src")?;
    if let Some(p) = prompt {
        src.set_property("prompt", p);
    }
    pipeline
        .by_name("sink")
        .ok_or("no sink")?
        .set_property("location", &url);

    pipeline.set_state(gst::State::Playing)?;
    println!("streaming to {url}");
    if let Some(s) = seconds {
        // A controlled end: EOS lets the muxer and the server finish the stream.
        let p = pipeline.downgrade();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(s));
            if let Some(p) = p.upgrade() {
                p.send_event(gst::event::Eos::new());
            }
        });
    }
    let bus = pipeline.bus().ok_or("no bus")?;
    let mut result = Ok(());
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "motioncache-stats") {
                    println!(
                        "block {:>4}: {:.3} s, {:.1}% tokens recomputed, {:.1}% of vanilla FLOPs",
                        s.get::<u64>("block-index")?,
                        s.get::<f64>("wall-time")?,
                        100.0 * s.get::<f64>("recomputed-fraction")?,
                        100.0 * s.get::<f64>("flops-ratio")?,
                    );
                }
            }
            gst::MessageView::Warning(w) => eprintln!("warning: {} ({:?})", w.error(), w.debug()),
            gst::MessageView::Error(e) => {
                result = Err(format!("{} ({:?})", e.error(), e.debug()).into());
                break;
            }
            gst::MessageView::Eos(_) => break,
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null)?;
    result
}
