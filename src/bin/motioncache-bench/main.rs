//! `motioncache-bench`: speed and quality of every cache mode, measured in one run on one
//! machine so that the ratios hold on a noisy machine.
//!
//! For each scenario (the paper's asynchronous setting and the model's defaults) and each
//! prompt it generates the same video (same seed) in every mode, decodes it, and reports
//! per mode: wall seconds, speedup over vanilla and over none, transformer FLOPs done /
//! vanilla FLOPs, mean recomputed-token fraction, and PSNR / SSIM of the frames against
//! vanilla's. Writes bench.json, bench.md and bench.png into the output folder.
//!
//!     cargo run --release --features bench --bin motioncache-bench -- [--model DIR]
//!         [--out DIR] [--quick] [--diffusers FILE]
//!
//! `--quick` runs two of the four prompts; `--diffusers FILE` adds the seconds that
//! tools/bench_diffusers.py measured for diffusers on the same model and schedules.
//!
//! `motioncache-bench forward ...` is the transformer-forward microbenchmark (candle vs
//! PyTorch, see forward.rs).

mod forward;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device};
use motioncache::cache::{CacheMode, CacheSettings, DistanceMode};
use motioncache::generate::GeneratorSettings;
use motioncache::metrics::{Frames, psnr, ssim};
use motioncache::pipeline::Pipeline;

const PROMPTS: [&str; 4] = [
    "a red circle moving right on a striped blue background",
    "a yellow square moving left on a checkered green background",
    "a white triangle moving up on a plain black background",
    "a static green circle on a striped red background",
];

struct Mode {
    name: &'static str,
    cache: CacheSettings,
}

/// The modes with the reference settings (warm-up 5 full steps at 50 steps; proportionally
/// fewer for short schedules).
fn modes(steps: usize, model: &CacheSettings) -> Vec<Mode> {
    let base = |mode| CacheSettings {
        mode,
        distance_mode: DistanceMode::Global,
        rescale: model.rescale.clone(),
        ..CacheSettings::for_steps(steps)
    };
    vec![
        Mode {
            name: "vanilla",
            cache: base(CacheMode::Vanilla),
        },
        Mode {
            name: "none",
            cache: base(CacheMode::None),
        },
        Mode {
            name: "teacache-slow",
            cache: CacheSettings {
                teacache_threshold: 0.1,
                ..base(CacheMode::TeaCache)
            },
        },
        Mode {
            name: "teacache-fast",
            cache: CacheSettings {
                teacache_threshold: 0.2,
                ..base(CacheMode::TeaCache)
            },
        },
        Mode {
            name: "flowcache-slow",
            cache: CacheSettings {
                flowcache_threshold: 0.1,
                ..base(CacheMode::FlowCache)
            },
        },
        Mode {
            name: "flowcache-fast",
            cache: CacheSettings {
                flowcache_threshold: 0.15,
                ..base(CacheMode::FlowCache)
            },
        },
        Mode {
            name: "motioncache-slow",
            cache: CacheSettings {
                motion_threshold: 0.1,
                ..base(CacheMode::MotionCache)
            },
        },
        Mode {
            name: "motioncache-fast",
            cache: CacheSettings {
                motion_threshold: 0.2,
                ..base(CacheMode::MotionCache)
            },
        },
    ]
}

struct Outcome {
    seconds: f64,
    frames: Vec<Vec<u8>>,
    flops: f64,
    vanilla_flops: f64,
    recomputed: usize,
    total: usize,
}

fn generate(
    p: &Arc<Pipeline>,
    prompt: &str,
    s: &GeneratorSettings,
    seed: u64,
) -> motioncache::Result<Outcome> {
    let cond = p.encode_prompt(prompt)?;
    let neg = p.encode_prompt("")?;
    let size = (p.info().width, p.info().height);
    let cancel = AtomicBool::new(false);
    let start = Instant::now();
    let mut st = p.stream_with_contexts(
        &cond,
        &neg,
        s.clone(),
        motioncache::generate::NoiseSource::Seed(seed),
        size,
    )?;
    let mut o = Outcome {
        seconds: 0.0,
        frames: Vec::new(),
        flops: 0.0,
        vanilla_flops: 0.0,
        recomputed: 0,
        total: 0,
    };
    while let Some(b) = st.next_block(&cancel)? {
        o.flops += b.stats.flops;
        o.vanilla_flops += b.stats.vanilla_flops;
        o.recomputed += b.stats.tokens_recomputed;
        o.total += b.stats.tokens_total;
        o.frames.extend(b.frames);
    }
    o.seconds = start.elapsed().as_secs_f64();
    Ok(o)
}

#[derive(Clone)]
struct Row {
    mode: String,
    schedule: String,
    seconds: f64,
    speedup_vs_vanilla: f64,
    speedup_vs_none: f64,
    flops_ratio: f64,
    recomputed_fraction: f64,
    psnr_db: f64,
    ssim: f64,
}

fn main() {
    // SAFETY: first thing in main, no other thread exists yet.
    unsafe { motioncache::cpu::tune_threads() };
    if let Err(e) = run() {
        eprintln!("motioncache-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut model: Option<PathBuf> = None;
    let mut out = PathBuf::from("bench-out");
    let mut quick = false;
    let mut diffusers: Option<PathBuf> = None;
    let mut only_modes: Option<Vec<String>> = None;
    let mut only_scenarios: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("forward") {
        args.next();
        return forward::run(&mut args);
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next().map(PathBuf::from),
            "--out" => {
                out = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--out needs a folder")?
            }
            "--quick" => quick = true,
            "--diffusers" => diffusers = args.next().map(PathBuf::from),
            "--modes" => {
                only_modes = Some(
                    args.next()
                        .ok_or("--modes needs a comma list")?
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            "--scenarios" => {
                only_scenarios = Some(
                    args.next()
                        .ok_or("--scenarios needs a comma list")?
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            "-h" | "--help" => {
                println!(
                    "motioncache-bench [--model DIR] [--out DIR] [--quick] [--diffusers FILE] [--modes a,b] [--scenarios paper,element-default]\n       motioncache-bench forward --help"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    let dev = Device::Cpu;
    let p = Arc::new(match &model {
        Some(d) => Pipeline::load(d, &dev, DType::F32)?,
        None => Pipeline::load_embedded(&dev, DType::F32)?,
    });
    let d = p.info().defaults.clone();
    let prompts: &[&str] = if quick { &PROMPTS[..2] } else { &PROMPTS };
    // The paper's setting: 50 steps, guidance 6, asynchronous ar_step 5, blocks of 5 latent
    // frames over a 25-frame window, 5 frames of overlap history with addnoise 20; 35
    // latent frames so that the window slides once.
    let paper = GeneratorSettings {
        steps: 50,
        shift: 8.0,
        guidance_scale: 6.0,
        causal_block_size: 5,
        ar_step: 5,
        window: 25,
        overlap: 5,
        addnoise_condition: 20.0,
        fps_class: 1,
        total_frames: Some(35),
        cache: CacheSettings::default(),
    };
    let element = GeneratorSettings {
        total_frames: Some(d.window * 2 - d.overlap),
        ..d.clone()
    };
    let scenarios: Vec<(&str, GeneratorSettings)> =
        [("paper", paper), ("element-default", element)]
            .into_iter()
            .filter(|(n, _)| {
                only_scenarios
                    .as_ref()
                    .is_none_or(|o| o.iter().any(|x| x == n))
            })
            .collect();
    println!(
        "model: {} ({}x{} @ {} fps), {} prompts, {} threads",
        p.info().name,
        p.info().width,
        p.info().height,
        p.info().fps_num,
        prompts.len(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut rows = Vec::new();
    for (sname, base) in &scenarios {
        let mut per_mode: Vec<(String, Vec<Outcome>)> = Vec::new();
        // vanilla and none are the references of the ratios: always run.
        for m in modes(base.steps, &d.cache).into_iter().filter(|m| {
            m.name == "vanilla"
                || m.name == "none"
                || only_modes
                    .as_ref()
                    .is_none_or(|o| o.iter().any(|x| x == m.name))
        }) {
            let mut s = base.clone();
            s.cache = m.cache.clone();
            let mut outs = Vec::new();
            for (i, prompt) in prompts.iter().enumerate() {
                let o = generate(&p, prompt, &s, 1024 + i as u64)?;
                eprintln!("{sname} {:<17} prompt {i}: {:.2} s", m.name, o.seconds);
                outs.push(o);
            }
            per_mode.push((m.name.to_string(), outs));
        }
        let secs = |i: usize| per_mode[i].1.iter().map(|o| o.seconds).sum::<f64>();
        let (van, non) = (secs(0), secs(1));
        for (i, (name, outs)) in per_mode.iter().enumerate() {
            let (mut ps, mut ss) = (0.0, 0.0);
            for (o, v) in outs.iter().zip(&per_mode[0].1) {
                let a = Frames {
                    frames: &o.frames,
                    width: p.info().width,
                    height: p.info().height,
                };
                let b = Frames {
                    frames: &v.frames,
                    width: p.info().width,
                    height: p.info().height,
                };
                ps += psnr(&a, &b)?.min(99.0);
                ss += ssim(&a, &b)?;
            }
            let n = outs.len() as f64;
            let flops: f64 = outs.iter().map(|o| o.flops).sum();
            let vflops: f64 = outs.iter().map(|o| o.vanilla_flops).sum();
            let rec: usize = outs.iter().map(|o| o.recomputed).sum();
            let tot: usize = outs.iter().map(|o| o.total).sum();
            rows.push(Row {
                mode: name.clone(),
                schedule: sname.to_string(),
                seconds: secs(i),
                speedup_vs_vanilla: van / secs(i),
                speedup_vs_none: non / secs(i),
                flops_ratio: flops / vflops,
                recomputed_fraction: rec as f64 / tot.max(1) as f64,
                psnr_db: ps / n,
                ssim: ss / n,
            });
        }
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "mode": r.mode, "schedule": r.schedule, "seconds": r.seconds,
                "speedup_vs_vanilla": r.speedup_vs_vanilla, "speedup_vs_none": r.speedup_vs_none,
                "flops_ratio": r.flops_ratio, "recomputed_fraction": r.recomputed_fraction,
                "psnr_db": r.psnr_db, "ssim": r.ssim,
            })
        })
        .collect();
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&json)?)?;
    let mut md = String::from(
        "| schedule | mode | seconds | speedup vs vanilla | speedup vs none | FLOPs / vanilla | recomputed | PSNR (dB) | SSIM |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2}x | {:.2}x | {:.3} | {:.3} | {:.2} | {:.4} |\n",
            r.schedule,
            r.mode,
            r.seconds,
            r.speedup_vs_vanilla,
            r.speedup_vs_none,
            r.flops_ratio,
            r.recomputed_fraction,
            r.psnr_db,
            r.ssim
        ));
    }
    if let Some(f) = diffusers {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        md.push_str("\n| schedule | diffusers vanilla seconds | our vanilla seconds | ours faster by |\n|---|---|---|---|\n");
        for r in rows.iter().filter(|r| r.mode == "vanilla") {
            if let Some(s) = v.get(&r.schedule).and_then(|s| s.as_f64()) {
                md.push_str(&format!(
                    "| {} | {:.2} | {:.2} | {:.2}x |\n",
                    r.schedule,
                    s,
                    r.seconds,
                    s / r.seconds
                ));
            }
        }
    }
    std::fs::write(out.join("bench.md"), &md)?;
    print!("{md}");
    plot(&rows, &out.join("bench.png"))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Speedup against PSNR, one point per mode and schedule.
fn plot(rows: &[Row], path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok());
    let labels = match font {
        Some(f) => plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(f.into_boxed_slice()),
        )
        .is_ok(),
        None => false,
    };
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite: Vec<&Row> = rows.iter().filter(|r| r.psnr_db.is_finite()).collect();
    let xmax = finite
        .iter()
        .map(|r| r.speedup_vs_vanilla)
        .fold(1.0, f64::max)
        * 1.15;
    let ymin = finite
        .iter()
        .map(|r| r.psnr_db)
        .fold(99.0, f64::min)
        .min(20.0)
        - 2.0;
    let mut b = ChartBuilder::on(&root);
    b.margin(20).x_label_area_size(40).y_label_area_size(50);
    if labels {
        b.caption(
            "speed vs quality (PSNR against vanilla)",
            ("sans-serif", 22),
        );
    }
    let mut chart = b.build_cartesian_2d(0.0..xmax, ymin..100.0)?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("speedup over vanilla")
            .y_desc("PSNR (dB, 99 = identical)");
    } else {
        mesh.disable_x_mesh().disable_y_mesh();
    }
    mesh.draw()?;
    let colours = [
        RED,
        BLUE,
        GREEN,
        MAGENTA,
        CYAN,
        BLACK,
        RGBColor(255, 140, 0),
        RGBColor(120, 60, 0),
    ];
    for (i, r) in finite.iter().enumerate() {
        let c = colours[i % colours.len()];
        let marker = if r.schedule == "paper" { 6 } else { 4 };
        chart.draw_series(std::iter::once(Circle::new(
            (r.speedup_vs_vanilla, r.psnr_db),
            marker,
            c.filled(),
        )))?;
        if labels {
            chart.draw_series(std::iter::once(Text::new(
                format!("{} ({})", r.mode, r.schedule),
                (r.speedup_vs_vanilla, r.psnr_db),
                ("sans-serif", 12),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}
