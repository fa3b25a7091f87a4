//! `motioncache-bench`: speed and quality of every cache mode, measured in one run on one
//! machine so that the ratios hold on a noisy machine.
//!
//!     motioncache-bench [run] [--model DIR] [--out DIR] [--sweep] [--diffusers FILE]
//!         [--reference FILE] [--scenarios paper,element-default] [--modes a,b] ...
//!     motioncache-bench calibrate [--model DIR] [--write]
//!     motioncache-bench report [--out DIR] [--diffusers FILE] [--reference FILE]
//!     motioncache-bench forward [--config 1.3b|tiny|PATH] ...
//!     motioncache-bench ops [--device cuda] [--size 540p|tiny]
//!     motioncache-bench make-model [--config 1.3b|tiny] --out DIR
//!
//! `run` generates the same videos (same prompts and seeds) in every mode on two schedules
//! (the paper's asynchronous setting and the model's defaults), decodes them, and reports
//! per mode: transformer and VAE seconds, speedups over vanilla, none and diffusers, FLOPs
//! and token work against vanilla, PSNR / SSIM of the frames against vanilla's. `--sweep`
//! runs every cached mode at several thresholds and reports the speed/quality frontiers.
//! Writes bench.json, bench.md and bench.png into the output folder.
//!
//! `calibrate` fits a model's rescale polynomial of the modulation distance from its own
//! uncached runs and (with `--write`) stores it in the directory's motioncache.json.
//!
//! `forward` is the transformer-forward microbenchmark (candle vs PyTorch, see forward.rs);
//! `ops` checks a 540P run's largest operations on a device (ops.rs); `make-model` writes a
//! random-weight pipeline directory of a real model's sizes (make_model.rs).

mod calibrate;
mod forward;
mod forward_magi;
mod make_model;
mod ops;
mod plot;
mod report;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "motioncache-bench",
    about = "Speed and quality of MotionCache and its baselines, measured in one run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::Args,
}

#[derive(Subcommand)]
enum Command {
    /// Every mode on both schedules (the default command).
    Run(run::Args),
    /// Fit a model's rescale polynomial from its own uncached runs.
    Calibrate(calibrate::Args),
    /// The report of an earlier run again, with new diffusers or reference timings.
    Report(report::Args),
    /// One transformer forward in candle and in PyTorch.
    Forward(forward::Args),
    /// The largest operations of a 540P run on a device, checked against the CPU.
    Ops(ops::Args),
    /// A pipeline directory with random weights at a real model's sizes.
    MakeModel(make_model::Args),
}

fn main() {
    // SAFETY: first thing in main, no other thread exists yet.
    unsafe { motioncache::cpu::tune_threads() };
    let cli = Cli::parse();
    let r = match cli.command {
        None => run::run(cli.run),
        Some(Command::Run(a)) => run::run(a),
        Some(Command::Calibrate(a)) => calibrate::run(a),
        Some(Command::Report(a)) => report::run(a),
        Some(Command::Forward(a)) => forward::run(a),
        Some(Command::Ops(a)) => ops::run(a),
        Some(Command::MakeModel(a)) => make_model::run(a),
    };
    if let Err(e) = r {
        eprintln!("motioncache-bench: {e}");
        std::process::exit(1);
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The model: a directory, or the embedded one.
fn load_model(
    dir: Option<&std::path::Path>,
) -> BoxResult<std::sync::Arc<motioncache::pipeline::Pipeline>> {
    use candle_core::{DType, Device};
    use motioncache::pipeline::Pipeline;
    let dev = Device::Cpu;
    Ok(std::sync::Arc::new(match dir {
        Some(d) => Pipeline::load(d, &dev, DType::F32)?,
        None => Pipeline::load_embedded(&dev, DType::F32)?,
    }))
}
