//! Records `motioncachesrc` to an MP4 file while changing the prompt and the MotionCache
//! threshold at runtime, and prints every block's statistics from the bus.
//!
//! ```sh
//! cargo run --release -p gst-plugin-motioncache --example motioncache-runtime-tweaks -- \
//!     [OUT.mp4] [FRAMES] [MODEL_DIR]
//! ```

use gst::prelude::*;

const PROMPTS: [&str; 3] = [
    "a red circle moving right on a striped blue background",
    "a yellow square moving left on a checkered gray background",
    "a white triangle moving down on a plain green background",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before gst::init starts any thread.
    unsafe { motioncache::cpu::tune_threads() };
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .unwrap_or_else(|| "motioncache-tweaks.mp4".into());
    let frames: u32 = args.next().map(|f| f.parse()).transpose()?.unwrap_or(96);
    let model = args.next().unwrap_or_default();

    gst::init()?;
    gstmotioncache::plugin_register_static()?;
    let pipeline = gst::parse::launch(&format!(
        "motioncachesrc name=src num-buffers={frames} ! videoconvert ! x264enc ! mp4mux ! \
         filesink location=\"{out}\""
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let src = pipeline.by_name("src").ok_or("no src")?;
    src.set_property("model", &model);
    src.set_property("prompt", PROMPTS[0]);

    pipeline.set_state(gst::State::Playing)?;
    println!(
        "{:>5} {:>6} {:>8} {:>11} {:>8} {:>5} {:>5} {:>5}  settings",
        "block", "frames", "wall s", "recomputed", "flops", "full", "part", "skip"
    );
    let bus = pipeline.bus().ok_or("no bus")?;
    let mut result = Ok(());
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                let Some(s) = e.structure().filter(|s| s.name() == "motioncache-stats") else {
                    continue;
                };
                let block: u64 = s.get("block-index")?;
                println!(
                    "{block:>5} {:>6} {:>8.3} {:>10.1}% {:>7.1}% {:>5} {:>5} {:>5}  threshold {} prompt {:?}",
                    s.get::<u32>("frames")?,
                    s.get::<f64>("wall-time")?,
                    100.0 * s.get::<f64>("recomputed-fraction")?,
                    100.0 * s.get::<f64>("flops-ratio")?,
                    s.get::<u32>("full-forwards")?,
                    s.get::<u32>("partial-forwards")?,
                    s.get::<u32>("skipped-forwards")?,
                    src.property::<f64>("motion-threshold"),
                    src.property::<String>("prompt"),
                );
                // Every few blocks: a new prompt, and alternately more and less reuse.
                // Both apply from the next block the generator starts.
                if block % 4 == 3 {
                    let next = PROMPTS[(block as usize / 4 + 1) % PROMPTS.len()];
                    src.set_property("prompt", next);
                    let t = if (block / 4).is_multiple_of(2) {
                        0.3
                    } else {
                        0.05
                    };
                    src.set_property("motion-threshold", t);
                }
            }
            gst::MessageView::Warning(w) => eprintln!("warning: {} ({:?})", w.error(), w.debug()),
            gst::MessageView::Error(e) => {
                result = Err(format!("{} ({:?})", e.error(), e.debug()).into());
                break;
            }
            gst::MessageView::Eos(_) => {
                println!("wrote {out}");
                break;
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null)?;
    result
}
