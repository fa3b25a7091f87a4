//! Does the embedded default model follow its prompts? Frames from the Rust pipeline for a
//! list of prompts, measured with simple image analysis: the object's pixels (the training
//! data draws bright objects over dark backgrounds), their mean colour classified against
//! the training palette, their centroid track for the direction, and the mean inter-frame
//! difference for moving against static prompts.
//!
//! The thresholds are the (colour >= 80%, direction >= 70%, static well below
//! moving). The measured rates are printed (`cargo test --test adherence -- --nocapture`)
//! and go into models/tiny/README.md.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use motioncache::cache::{CacheMode, CacheSettings};
use motioncache::generate::{GeneratorSettings, NoiseSource};
use motioncache::pipeline::Pipeline;

/// The object colours of tools/tiny/data.py.
const PALETTE: [(&str, [f64; 3]); 6] = [
    ("red", [235.0, 35.0, 35.0]),
    ("green", [40.0, 210.0, 40.0]),
    ("blue", [45.0, 90.0, 255.0]),
    ("yellow", [245.0, 225.0, 30.0]),
    ("white", [245.0, 245.0, 245.0]),
    ("magenta", [230.0, 40.0, 230.0]),
];

/// (colour, shape, direction or "static", pattern, background colour): every colour and
/// direction at least twice, plus static scenes (tools/tiny/export.py evaluates the same).
const PROMPTS: [(&str, &str, &str, &str, &str); 15] = [
    ("red", "circle", "left", "striped", "blue"),
    ("green", "square", "right", "plain", "gray"),
    ("blue", "triangle", "up", "checkered", "black"),
    ("yellow", "circle", "down", "plain", "red"),
    ("white", "square", "left", "checkered", "green"),
    ("magenta", "triangle", "right", "striped", "gray"),
    ("red", "square", "up", "plain", "black"),
    ("green", "circle", "down", "striped", "red"),
    ("blue", "circle", "right", "plain", "green"),
    ("yellow", "triangle", "left", "checkered", "blue"),
    ("white", "circle", "up", "striped", "red"),
    ("magenta", "square", "down", "plain", "blue"),
    ("red", "circle", "static", "plain", "gray"),
    ("blue", "square", "static", "striped", "black"),
    ("yellow", "triangle", "static", "checkered", "green"),
];

fn prompt(p: &(&str, &str, &str, &str, &str)) -> String {
    let (c, s, d, pat, bg) = p;
    if *d == "static" {
        format!("a static {c} {s} on a {pat} {bg} background")
    } else {
        format!("a {c} {s} moving {d} on a {pat} {bg} background")
    }
}

struct Analysis {
    colour: Option<&'static str>,
    direction: &'static str,
    /// Mean absolute inter-frame difference, [0, 1].
    diff: f64,
}

/// Frames: RGB24, `w x h`.
fn analyse(frames: &[Vec<u8>], w: usize, h: usize) -> Analysis {
    let mut cents = Vec::new();
    let mut col = [0f64; 3];
    let mut ncol = 0usize;
    for f in frames {
        let (mut sx, mut sy, mut n) = (0f64, 0f64, 0usize);
        for y in 0..h {
            for x in 0..w {
                let p = &f[(y * w + x) * 3..(y * w + x) * 3 + 3];
                // Object pixels: bright (the backgrounds are dark by construction).
                if *p.iter().max().unwrap() as f64 > 0.62 * 255.0 {
                    sx += x as f64;
                    sy += y as f64;
                    n += 1;
                    for c in 0..3 {
                        col[c] += p[c] as f64;
                    }
                }
            }
        }
        if n >= 8 {
            cents.push((sx / n as f64, sy / n as f64));
            ncol += n;
        }
    }
    let diff = frames
        .windows(2)
        .map(|p| {
            p[0].iter()
                .zip(&p[1])
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / (p[0].len() as f64 * 255.0)
        })
        .sum::<f64>()
        / (frames.len().max(2) - 1) as f64;
    let colour = (ncol > 0).then(|| {
        let m = col.map(|c| c / ncol as f64);
        PALETTE
            .iter()
            .min_by(|a, b| dist(&m, &a.1).total_cmp(&dist(&m, &b.1)))
            .unwrap()
            .0
    });
    let direction = match (cents.first(), cents.last()) {
        (Some(a), Some(b)) if cents.len() >= 2 => {
            let (dx, dy) = (b.0 - a.0, b.1 - a.1);
            if dx.abs().max(dy.abs()) < 2.0 {
                "static"
            } else if dx.abs() >= dy.abs() {
                if dx > 0.0 { "right" } else { "left" }
            } else if dy > 0.0 {
                "down"
            } else {
                "up"
            }
        }
        _ => "static",
    };
    Analysis {
        colour,
        direction,
        diff,
    }
}

fn dist(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>()
}

#[test]
fn embedded_model_follows_prompts() {
    let p = Arc::new(Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap());
    let d = p.info().defaults.clone();
    let (w, h) = (p.info().width, p.info().height);
    let settings = GeneratorSettings {
        ar_step: 0,
        total_frames: Some(d.window),
        cache: CacheSettings::with_mode(CacheMode::None),
        ..d
    };
    let neg = p.encode_prompt("").unwrap();
    let cancel = AtomicBool::new(false);
    let (mut colour_ok, mut dir_ok, mut n, mut n_moving) = (0, 0, 0, 0);
    let (mut moving_diff, mut static_diff) = (Vec::new(), Vec::new());
    for spec in &PROMPTS {
        for seed in [0u64, 1] {
            let text = prompt(spec);
            let cond = p.encode_prompt(&text).unwrap();
            let mut s = p
                .stream_with_contexts(
                    &cond,
                    &neg,
                    settings.clone(),
                    NoiseSource::Seed(seed),
                    (w, h),
                )
                .unwrap();
            let mut frames = Vec::new();
            while let Some(b) = s.next_block(&cancel).unwrap() {
                frames.extend(b.frames);
            }
            let a = analyse(&frames, w, h);
            n += 1;
            colour_ok += (a.colour == Some(spec.0)) as usize;
            if spec.2 == "static" {
                static_diff.push(a.diff);
            } else {
                n_moving += 1;
                dir_ok += (a.direction == spec.2) as usize;
                moving_diff.push(a.diff);
            }
            println!(
                "{text:?} seed {seed}: colour {:?}, direction {}, diff {:.4}",
                a.colour, a.direction, a.diff
            );
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let colour_rate = colour_ok as f64 / n as f64;
    let dir_rate = dir_ok as f64 / n_moving as f64;
    let (md, sd) = (mean(&moving_diff), mean(&static_diff));
    println!(
        "colour {:.0}% ({colour_ok}/{n}), direction {:.0}% ({dir_ok}/{n_moving}), mean frame difference moving {md:.4} static {sd:.4}",
        100.0 * colour_rate,
        100.0 * dir_rate
    );
    assert!(
        colour_rate >= 0.8,
        "colour matches {:.0}% < 80%",
        100.0 * colour_rate
    );
    assert!(
        dir_rate >= 0.7,
        "direction matches {:.0}% < 70%",
        100.0 * dir_rate
    );
    assert!(
        sd < 0.5 * md,
        "static scenes move too: {sd:.4} vs moving {md:.4}"
    );
}

/// The analysis itself, on synthetic frames: it must find a red square moving right, a
/// static white one, and nothing in an empty dark scene.
#[test]
fn analysis_reads_synthetic_scenes() {
    let (w, h) = (32usize, 32usize);
    let scene = |colour: [u8; 3], dx: isize| -> Vec<Vec<u8>> {
        (0..6)
            .map(|t| {
                let mut f = vec![20u8; w * h * 3];
                let x0 = 6 + dx * t;
                for y in 10..18 {
                    for x in x0..x0 + 8 {
                        let i = (y * w + x as usize) * 3;
                        f[i..i + 3].copy_from_slice(&colour);
                    }
                }
                f
            })
            .collect()
    };
    let a = analyse(&scene([235, 35, 35], 2), w, h);
    assert_eq!((a.colour, a.direction), (Some("red"), "right"));
    let s = analyse(&scene([245, 245, 245], 0), w, h);
    assert_eq!((s.colour, s.direction), (Some("white"), "static"));
    assert!(s.diff < 1e-9 && a.diff > 0.01);
    let e = analyse(&vec![vec![20u8; w * h * 3]; 4], w, h);
    assert_eq!(e.colour, None);
}
