//! `motioncache-bench calibrate`: fits a model's rescale polynomial, as TeaCache fits its
//! coefficients: run the model uncached (`none`) on a few prompts and both schedules,
//! record per block-step the relative L1 change of the timestep modulation (what the
//! caches measure) and of the transformer output (what reuse gets wrong), and fit the
//! output change as a polynomial of the modulation change by least squares. With
//! `--write` the coefficients go into the directory's motioncache.json as `cache_rescale`,
//! so every cache threshold of that model reads as "relative output change tolerated".

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use motioncache::cache::{CacheMode, CacheSettings};
use motioncache::generate::NoiseSource;

use super::BoxResult;
use super::run::{ELEMENT_WINDOWS, PROMPTS, scenarios};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Model directory (its motioncache.json is what --write updates).
    #[arg(long)]
    pub model: PathBuf,
    /// Polynomial degree.
    #[arg(long, default_value_t = 4)]
    pub degree: usize,
    /// Prompts to run (1 to 4).
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Write `cache_rescale` into MODEL/motioncache.json.
    #[arg(long)]
    pub write: bool,
}

/// Least-squares polynomial fit, highest power first; `None` when the samples cannot
/// determine it (too few, or all at one distance).
pub fn fit(samples: &[(f64, f64)], degree: usize) -> Option<Vec<f64>> {
    let n = degree + 1;
    if samples.len() < 2 * n {
        return None;
    }
    // Fit in x / xmax for conditioning, then scale the coefficients back.
    let xmax = samples.iter().map(|s| s.0.abs()).fold(0.0, f64::max);
    if xmax.is_nan() || xmax <= 0.0 {
        return None;
    }
    let mut a = vec![vec![0.0f64; n + 1]; n];
    for &(x, y) in samples {
        let t = x / xmax;
        let pw: Vec<f64> = (0..n).map(|k| t.powi(k as i32)).collect();
        for i in 0..n {
            for j in 0..n {
                a[i][j] += pw[i] * pw[j];
            }
            a[i][n] += pw[i] * y;
        }
    }
    // Gaussian elimination with partial pivoting.
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, p);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row[c..].iter_mut().zip(&pivot[c..]) {
                    *x -= f * p;
                }
            }
        }
    }
    // Ascending coefficients in t -> in x -> highest power first.
    let coef: Vec<f64> = (0..n)
        .map(|k| a[k][n] / a[k][k] / xmax.powi(k as i32))
        .collect();
    if coef.iter().any(|c| !c.is_finite()) {
        return None;
    }
    Some(coef.into_iter().rev().collect())
}

pub fn run(a: Args) -> BoxResult<()> {
    let p = super::load_model(Some(&a.model))?;
    let mut samples = Vec::new();
    let cancel = AtomicBool::new(false);
    let size = (p.info().width, p.info().height);
    let neg = p.encode_prompt("")?;
    for (name, mut s) in scenarios(&p, ELEMENT_WINDOWS) {
        s.cache = CacheSettings::for_schedule(CacheMode::None, s.steps);
        for (i, prompt) in PROMPTS.iter().take(a.prompts.clamp(1, 4)).enumerate() {
            let cond = p.encode_prompt(prompt)?;
            let mut st = p.stream_with_contexts(
                &cond,
                &neg,
                s.clone(),
                NoiseSource::Seed(2048 + i as u64),
                size,
            )?;
            let g = st
                .generator()
                .ok_or("calibrate fits SkyReels-V2's cache policies; this is not one")?;
            g.record_distances(true);
            while g.next_block(&cancel)?.is_some() {}
            let got = g.take_distances();
            eprintln!("{name} prompt {i}: {} samples", got.len());
            samples.extend(got);
        }
    }
    let Some(coef) = fit(&samples, a.degree) else {
        return Err(format!(
            "calibrate: {} samples cannot fit a degree-{} polynomial (too few steps, or no change); nothing written",
            samples.len(),
            a.degree
        )
        .into());
    };
    let eval = |x: f64| coef.iter().fold(0.0, |acc, c| acc * x + c);
    let mean_y = samples.iter().map(|s| s.1).sum::<f64>() / samples.len() as f64;
    let ss_tot: f64 = samples.iter().map(|s| (s.1 - mean_y).powi(2)).sum();
    let ss_res: f64 = samples.iter().map(|s| (s.1 - eval(s.0)).powi(2)).sum();
    let (xmin, xmax) = samples.iter().fold((f64::MAX, f64::MIN), |(lo, hi), s| {
        (lo.min(s.0), hi.max(s.0))
    });
    println!(
        "{} samples, modulation distance {xmin:.4}..{xmax:.4}, R^2 {:.3}",
        samples.len(),
        1.0 - ss_res / ss_tot.max(1e-30)
    );
    println!("cache_rescale = {coef:?}");
    for x in [xmin, (xmin + xmax) / 2.0, xmax] {
        println!("  rescaled({x:.4}) = {:.4}", eval(x));
    }
    if a.write {
        let path = a.model.join("motioncache.json");
        let mut v: serde_json::Value = if path.is_file() {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            serde_json::json!({})
        };
        let obj = v
            .as_object_mut()
            .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
        obj.insert("cache_rescale".into(), serde_json::json!(coef));
        std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote cache_rescale into {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_a_known_polynomial_and_refuses_too_few_samples() {
        let truth = [3.0, -2.0, 0.5]; // 3x^2 - 2x + 0.5
        let s: Vec<(f64, f64)> = (1..40)
            .map(|i| {
                let x = i as f64 * 0.01;
                (x, truth.iter().fold(0.0, |a, c| a * x + c))
            })
            .collect();
        let c = fit(&s, 2).unwrap();
        for (a, b) in c.iter().zip(truth) {
            assert!((a - b).abs() < 1e-6, "{c:?}");
        }
        assert!(fit(&s[..3], 2).is_none());
        assert!(fit(&[(0.0, 1.0); 20], 2).is_none());
    }
}
