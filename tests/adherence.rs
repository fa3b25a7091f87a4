//! Does the embedded default model follow its prompts for as long as it streams? Frames from
//! the Rust pipeline at the element's default settings (MotionCache included), for the
//! held-out prompts of tools/tiny/data.py (`TEST_SCENES`, never drawn in training), measured
//! with simple image analysis:
//!
//! * the object = bright pixels (the training data draws bright objects over dark
//!   backgrounds): visible in a frame when it covers at least 20 pixels;
//! * its colour: the mean over the stream, classified against the training colours *and*
//!   colours the model does not know (orange, purple, cyan, pink), so a nearly-yellow
//!   object is not counted as yellow;
//! * its direction per window of 8 frames: the circular shift that best maps each frame's
//!   object mask onto the next (the frame wraps around, so centroids would jump);
//! * the background: colour of the pixels away from the object against the five background
//!   colours, and its pattern (plain, vertical stripes, checkered) from how the pixels vary
//!   along rows and columns.
//!
//! Issue 18's bars ([`ISSUE_18`]): visible in at least 90% of frames, colour right in 85% of
//! streams, direction right in 80% of windows, background colour and pattern right in 70%
//! of streams, static prompts static in 80% of windows. CI asserts them on 24-frame streams
//! of the held-out prompts (the fifth export measured colour 14/16, background 14/16,
//! direction 36/36, static 12/12) and the shipped model's floor on training scenes
//! ([`SHIPPED`]: it measured colour 12/12, background 8/12, direction 27/27, static 9/9),
//! so that a regression of the model or of the cache's defaults fails. The long version
//! (96 frames = 12 s, issue 18's measure; the fifth export: colour 15/16, background
//! 14/16, direction 130/144, static 48/48, visible 100%) is
//! `cargo test --release --test adherence -- --ignored --nocapture`.
//! `MOTIONCACHE_ADHERENCE_MODEL=DIR` measures a model directory (e.g. a training
//! checkpoint exported by tools/tiny/export.py) instead of the embedded one.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use motioncache::pipeline::Pipeline;

/// Object colours: the training palette (tools/tiny/data.py) and colours it lacks.
const PALETTE: [(&str, [f64; 3]); 10] = [
    ("red", [235.0, 35.0, 35.0]),
    ("green", [40.0, 210.0, 40.0]),
    ("blue", [45.0, 90.0, 255.0]),
    ("yellow", [245.0, 225.0, 30.0]),
    ("white", [245.0, 245.0, 245.0]),
    ("magenta", [230.0, 40.0, 230.0]),
    ("orange", [250.0, 140.0, 20.0]),
    ("purple", [140.0, 50.0, 230.0]),
    ("cyan", [30.0, 220.0, 230.0]),
    ("pink", [250.0, 150.0, 190.0]),
];

/// Background colours of tools/tiny/data.py: (name, dark shade, light shade).
const BACKGROUNDS: [(&str, [f64; 3], [f64; 3]); 5] = [
    ("gray", [70.0, 70.0, 70.0], [115.0, 115.0, 115.0]),
    ("blue", [15.0, 20.0, 80.0], [40.0, 50.0, 140.0]),
    ("green", [10.0, 60.0, 20.0], [30.0, 110.0, 45.0]),
    ("red", [80.0, 15.0, 15.0], [140.0, 40.0, 40.0]),
    ("black", [5.0, 5.0, 5.0], [45.0, 45.0, 45.0]),
];

/// tools/tiny/data.py `TEST_SCENES`: (colour, shape, direction or "static", pattern,
/// background colour).
const SCENES: [(&str, &str, &str, &str, &str); 16] = [
    ("red", "triangle", "right", "checkered", "green"),
    ("green", "triangle", "left", "striped", "blue"),
    ("blue", "square", "down", "striped", "gray"),
    ("yellow", "square", "up", "striped", "black"),
    ("white", "triangle", "down", "plain", "blue"),
    ("magenta", "circle", "left", "checkered", "black"),
    ("red", "circle", "down", "checkered", "gray"),
    ("green", "square", "up", "checkered", "red"),
    ("blue", "triangle", "left", "plain", "red"),
    ("yellow", "circle", "right", "striped", "green"),
    ("white", "square", "right", "striped", "black"),
    ("magenta", "triangle", "up", "plain", "green"),
    ("green", "circle", "static", "checkered", "blue"),
    ("white", "triangle", "static", "plain", "red"),
    ("magenta", "square", "static", "striped", "gray"),
    ("yellow", "circle", "static", "plain", "black"),
];

/// Scenes from the training distribution (none of them in `TEST_SCENES`): the model's
/// fit, as opposed to its generalisation to unseen combinations.
const TRAIN_SCENES: [(&str, &str, &str, &str, &str); 12] = [
    ("red", "circle", "right", "striped", "blue"),
    ("yellow", "square", "left", "checkered", "green"),
    ("white", "triangle", "up", "plain", "black"),
    ("green", "circle", "static", "striped", "red"),
    ("blue", "circle", "right", "plain", "black"),
    ("magenta", "square", "down", "striped", "green"),
    ("green", "triangle", "up", "plain", "gray"),
    ("yellow", "triangle", "down", "checkered", "blue"),
    ("red", "square", "left", "plain", "green"),
    ("white", "circle", "left", "checkered", "red"),
    ("blue", "square", "static", "checkered", "black"),
    ("red", "triangle", "static", "striped", "gray"),
];

const WINDOW: usize = 8;

fn prompt(p: &(&str, &str, &str, &str, &str)) -> String {
    let (c, s, d, pat, bg) = p;
    if *d == "static" {
        format!("a static {c} {s} on a {pat} {bg} background")
    } else {
        format!("a {c} {s} moving {d} on a {pat} {bg} background")
    }
}

fn dist(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>()
}

/// One stream's reading.
#[derive(Debug)]
struct Analysis {
    visible: f64,
    colour: Option<&'static str>,
    /// Per window of `WINDOW` frames: left/right/up/down/static.
    directions: Vec<&'static str>,
    background: &'static str,
    pattern: &'static str,
}

fn bright(p: &[u8]) -> bool {
    *p.iter().max().unwrap() as f64 > 0.62 * 255.0
}

/// The object's displacement from frame `a` to frame `b` (masks, `w x h`): the circular
/// shift within +-8 pixels that maps most of `a`'s object pixels onto `b`'s.
fn shift(a: &[bool], b: &[bool], w: usize, h: usize) -> Option<(i64, i64)> {
    let n: usize = a.iter().filter(|&&x| x).count();
    if n < 20 || b.iter().filter(|&&x| x).count() < 20 {
        return None;
    }
    let mut best = (0usize, 0i64, 0i64);
    for dy in -8i64..=8 {
        for dx in -8i64..=8 {
            let mut hit = 0;
            for y in 0..h {
                for x in 0..w {
                    if a[y * w + x] {
                        let (tx, ty) = (
                            (x as i64 + dx).rem_euclid(w as i64) as usize,
                            (y as i64 + dy).rem_euclid(h as i64) as usize,
                        );
                        hit += b[ty * w + tx] as usize;
                    }
                }
            }
            // Ties go to the smaller shift (static objects read as static).
            let better = hit > best.0
                || (hit == best.0 && dx.abs() + dy.abs() < best.1.abs() + best.2.abs());
            if better {
                best = (hit, dx, dy);
            }
        }
    }
    Some((best.1, best.2))
}

fn analyse(frames: &[Vec<u8>], w: usize, h: usize) -> Analysis {
    let masks: Vec<Vec<bool>> = frames
        .iter()
        .map(|f| f.chunks_exact(3).map(bright).collect())
        .collect();
    let visible = masks
        .iter()
        .filter(|m| m.iter().filter(|&&x| x).count() >= 20)
        .count() as f64
        / frames.len().max(1) as f64;
    // Colour: mean of the object pixels over the stream.
    let (mut col, mut n) = ([0f64; 3], 0usize);
    for (f, m) in frames.iter().zip(&masks) {
        for (p, &b) in f.chunks_exact(3).zip(m) {
            if b {
                for c in 0..3 {
                    col[c] += p[c] as f64;
                }
                n += 1;
            }
        }
    }
    let colour = (n > 0).then(|| {
        let m = col.map(|c| c / n as f64);
        PALETTE
            .iter()
            .min_by(|a, b| dist(&m, &a.1).total_cmp(&dist(&m, &b.1)))
            .unwrap()
            .0
    });
    // Direction per window: the sum of frame-to-frame shifts.
    let mut directions = Vec::new();
    for win in masks.chunks(WINDOW).filter(|c| c.len() >= 2) {
        let (mut sx, mut sy, mut k) = (0i64, 0i64, 0usize);
        for pair in win.windows(2) {
            if let Some((dx, dy)) = shift(&pair[0], &pair[1], w, h) {
                sx += dx;
                sy += dy;
                k += 1;
            }
        }
        let d = if k == 0 {
            "none"
        } else {
            let (mx, my) = (sx as f64 / k as f64, sy as f64 / k as f64);
            if mx.abs().max(my.abs()) < 0.75 {
                "static"
            } else if mx.abs() >= my.abs() {
                if mx > 0.0 { "right" } else { "left" }
            } else if my > 0.0 {
                "down"
            } else {
                "up"
            }
        };
        directions.push(d);
    }
    let (background, pattern) = read_background(frames, &masks, w, h);
    Analysis {
        visible,
        colour,
        directions,
        background,
        pattern,
    }
}

/// Background colour and pattern from the pixels at least 3 pixels away from the object.
fn read_background(
    frames: &[Vec<u8>],
    masks: &[Vec<bool>],
    w: usize,
    h: usize,
) -> (&'static str, &'static str) {
    let (mut col, mut n) = ([0f64; 3], 0usize);
    // Luminance sums per column and per row, and the overall variance, per frame.
    let (mut var_cols, mut var_rows, mut var_all) = (0f64, 0f64, 0f64);
    for (f, m) in frames.iter().zip(masks) {
        let near = |x: usize, y: usize| {
            (-3i64..=3).any(|dy| {
                (-3i64..=3).any(|dx| {
                    let xx = (x as i64 + dx).rem_euclid(w as i64) as usize;
                    let yy = (y as i64 + dy).rem_euclid(h as i64) as usize;
                    m[yy * w + xx]
                })
            })
        };
        let (mut cs, mut cn) = (vec![0f64; w], vec![0usize; w]);
        let (mut rs, mut rn) = (vec![0f64; h], vec![0usize; h]);
        let mut lum = Vec::new();
        for y in 0..h {
            for x in 0..w {
                if near(x, y) {
                    continue;
                }
                let p = &f[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for c in 0..3 {
                    col[c] += p[c] as f64;
                }
                n += 1;
                let l = (p[0] as f64 + p[1] as f64 + p[2] as f64) / 3.0;
                cs[x] += l;
                cn[x] += 1;
                rs[y] += l;
                rn[y] += 1;
                lum.push(l);
            }
        }
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
            v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64
        };
        let means = |s: &[f64], n: &[usize]| -> Vec<f64> {
            s.iter()
                .zip(n)
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| s / *n as f64)
                .collect()
        };
        var_cols += var(&means(&cs, &cn));
        var_rows += var(&means(&rs, &rn));
        var_all += var(&lum);
    }
    let m = col.map(|c| c / n.max(1) as f64);
    let background = BACKGROUNDS
        .iter()
        .min_by(|a, b| {
            let ma = [0, 1, 2].map(|i| (a.1[i] + a.2[i]) / 2.0);
            let mb = [0, 1, 2].map(|i| (b.1[i] + b.2[i]) / 2.0);
            dist(&m, &ma).total_cmp(&dist(&m, &mb))
        })
        .unwrap()
        .0;
    let k = frames.len().max(1) as f64;
    let (vc, vr, va) = (var_cols / k, var_rows / k, var_all / k);
    // Two shades 45-100 apart in luminance: a textured background has a standard
    // deviation of about 20-50; vertical stripes put it all into the column means,
    // a checkerboard into neither.
    let pattern = if va.sqrt() < 8.0 {
        "plain"
    } else if vc > 0.5 * va && vr < 0.25 * va {
        "striped"
    } else {
        "checkered"
    };
    (background, pattern)
}

/// Minimum rates, as fractions: visible frames, right colour, right direction, right
/// background, static windows of static prompts.
struct Bars {
    visible: f64,
    colour: f64,
    direction: f64,
    background: f64,
    still: f64,
}

const ISSUE_18: Bars = Bars {
    visible: 0.9,
    colour: 0.85,
    direction: 0.8,
    background: 0.7,
    still: 0.8,
};

/// The shipped model's floor on `TRAIN_SCENES`: colour and background one stream below what it
/// measured, direction and stillness at issue 18's bars.
const SHIPPED: Bars = Bars {
    visible: 0.9,
    colour: 0.9,
    direction: 0.8,
    background: 0.58,
    still: 0.8,
};

/// Streams every prompt of `scenes` for `frames` frames at the element's defaults and
/// checks `bars`.
fn check(scenes: &[(&str, &str, &str, &str, &str)], frames_per_stream: usize, bars: &Bars) {
    let p = Arc::new(match std::env::var_os("MOTIONCACHE_ADHERENCE_MODEL") {
        Some(dir) => Pipeline::load(std::path::Path::new(&dir), &Device::Cpu, DType::F32).unwrap(),
        None => Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap(),
    });
    println!("model: {}", p.info().name);
    let mut settings = p.info().defaults.clone();
    let (w, h) = (p.info().width, p.info().height);
    settings.total_frames = Some(frames_per_stream);
    let cancel = AtomicBool::new(false);
    let (mut visible, mut colour_ok, mut bg_ok, mut n) = (0.0, 0usize, 0usize, 0usize);
    let (mut dir_ok, mut windows, mut static_ok, mut static_windows) = (0, 0, 0, 0);
    for (i, spec) in scenes.iter().enumerate() {
        let text = prompt(spec);
        let mut s = p
            .stream(&text, "", settings.clone(), 100 + i as u64)
            .unwrap();
        let mut frames = Vec::new();
        while let Some(b) = s.next_block(&cancel).unwrap() {
            frames.extend(b.frames);
        }
        frames.truncate(frames_per_stream);
        let a = analyse(&frames, w, h);
        n += 1;
        visible += a.visible;
        colour_ok += (a.colour == Some(spec.0)) as usize;
        bg_ok += (a.background == spec.4 && a.pattern == spec.3) as usize;
        let hits = a.directions.iter().filter(|d| **d == spec.2).count();
        if spec.2 == "static" {
            static_ok += hits;
            static_windows += a.directions.len();
        } else {
            dir_ok += hits;
            windows += a.directions.len();
        }
        println!(
            "{text:?}: visible {:.0}%, colour {:?}, background {} {}, directions {:?}",
            100.0 * a.visible,
            a.colour,
            a.pattern,
            a.background,
            a.directions
        );
    }
    let visible = visible / n as f64;
    let colour = colour_ok as f64 / n as f64;
    let bg = bg_ok as f64 / n as f64;
    let dir = dir_ok as f64 / windows.max(1) as f64;
    let stat = static_ok as f64 / static_windows.max(1) as f64;
    println!(
        "{frames_per_stream}-frame streams: visible {:.0}% of frames, colour {:.0}% ({colour_ok}/{n}), background {:.0}% ({bg_ok}/{n}), direction {:.0}% ({dir_ok}/{windows} windows), static {:.0}% ({static_ok}/{static_windows} windows)",
        100.0 * visible,
        100.0 * colour,
        100.0 * bg,
        100.0 * dir,
        100.0 * stat
    );
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    assert!(
        visible >= bars.visible,
        "object visible in {} of frames < {}",
        pct(visible),
        pct(bars.visible)
    );
    assert!(
        colour >= bars.colour,
        "colour right in {} of streams < {}",
        pct(colour),
        pct(bars.colour)
    );
    assert!(
        dir >= bars.direction,
        "direction right in {} of windows < {}",
        pct(dir),
        pct(bars.direction)
    );
    assert!(
        bg >= bars.background,
        "background right in {} of streams < {}",
        pct(bg),
        pct(bars.background)
    );
    assert!(
        stat >= bars.still,
        "static prompts static in {} of windows < {}",
        pct(stat),
        pct(bars.still)
    );
}

#[test]
fn embedded_model_follows_training_prompts() {
    check(&TRAIN_SCENES, 24, &SHIPPED);
}

#[test]
fn embedded_model_follows_held_out_prompts() {
    check(&SCENES, 24, &ISSUE_18);
}

#[test]
#[ignore = "issue 18's measure (96-frame streams, about 2 minutes in release, CI runs the 24-frame version): run by hand; figures in models/tiny/README.md"]
fn embedded_model_follows_held_out_prompts_for_long_streams() {
    check(&SCENES, 96, &ISSUE_18);
}

/// A synthetic scene in the training data's style: a square of `colour` moving by
/// (`dx`, `dy`) per frame on a torus over a two-shade background.
fn scene(
    colour: [u8; 3],
    (dx, dy): (i64, i64),
    bg: usize,
    pattern: &str,
    frames: usize,
) -> Vec<Vec<u8>> {
    let (w, h) = (64usize, 64usize);
    let (_, dark, light) = BACKGROUNDS[bg];
    (0..frames as i64)
        .map(|t| {
            let mut f = vec![0u8; w * h * 3];
            for y in 0..h {
                for x in 0..w {
                    let on = match pattern {
                        "striped" => (x / 8) % 2 == 1,
                        "checkered" => (x / 8 + y / 8) % 2 == 1,
                        _ => false,
                    };
                    let c = if on { light } else { dark };
                    let ox = (x as i64 - 10 - dx * t).rem_euclid(w as i64);
                    let oy = (y as i64 - 20 - dy * t).rem_euclid(h as i64);
                    let p = if ox < 12 && oy < 12 {
                        colour
                    } else {
                        c.map(|v| v as u8)
                    };
                    f[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&p);
                }
            }
            f
        })
        .collect()
}

/// The analysis itself, on synthetic scenes: colours (known and unknown), directions across
/// the wrap-around, static objects, background colours and patterns.
#[test]
fn analysis_reads_synthetic_scenes() {
    let a = analyse(&scene([235, 35, 35], (4, 0), 1, "striped", 24), 64, 64);
    assert_eq!(a.colour, Some("red"));
    assert_eq!(a.directions, vec!["right"; 3]);
    assert_eq!((a.background, a.pattern), ("blue", "striped"));
    assert_eq!(a.visible, 1.0);
    let a = analyse(&scene([245, 225, 30], (0, -3), 2, "checkered", 16), 64, 64);
    assert_eq!(a.colour, Some("yellow"));
    assert_eq!(a.directions, vec!["up"; 2]);
    assert_eq!((a.background, a.pattern), ("green", "checkered"));
    let a = analyse(&scene([250, 140, 20], (0, 0), 4, "plain", 8), 64, 64);
    assert_eq!(
        a.colour,
        Some("orange"),
        "an unknown colour is not read as a known one"
    );
    assert_eq!(a.directions, vec!["static"]);
    assert_eq!((a.background, a.pattern), ("black", "plain"));
    let a = analyse(&scene([245, 245, 245], (-5, 0), 3, "plain", 8), 64, 64);
    assert_eq!(a.directions, vec!["left"]);
    assert_eq!(a.background, "red");
    let a = analyse(&scene([45, 90, 255], (0, 4), 0, "checkered", 8), 64, 64);
    assert_eq!(a.directions, vec!["down"]);
    assert_eq!((a.background, a.pattern), ("gray", "checkered"));
    let empty = vec![vec![20u8; 64 * 64 * 3]; 4];
    let e = analyse(&empty, 64, 64);
    assert_eq!(e.colour, None);
    assert_eq!(e.visible, 0.0);
}
