//! Quality of a cached video against the uncached one: PSNR over all frames and pixels at
//! once (as the MotionCache reference measures it) and SSIM (Gaussian window 11, sigma
//! 1.5, data range 1, per channel, averaged over the valid region, channels and frames).

use crate::error::{Error, Result};

/// A frame sequence of packed RGB24 frames of one size.
pub struct Frames<'a> {
    pub frames: &'a [Vec<u8>],
    pub width: usize,
    pub height: usize,
}

fn check(a: &Frames, b: &Frames) -> Result<()> {
    if a.frames.len() != b.frames.len() || a.width != b.width || a.height != b.height {
        return Err(Error::setting(
            "frames",
            format!("{} x {}x{}", a.frames.len(), a.width, a.height),
            format!(
                "cannot compare with {} x {}x{}",
                b.frames.len(),
                b.width,
                b.height
            ),
        ));
    }
    let n = a.width * a.height * 3;
    if a.frames.iter().chain(b.frames).any(|f| f.len() != n) {
        return Err(Error::setting(
            "frames",
            "size",
            format!("every frame must hold {n} bytes"),
        ));
    }
    Ok(())
}

/// PSNR in dB (infinite for identical videos).
pub fn psnr(a: &Frames, b: &Frames) -> Result<f64> {
    check(a, b)?;
    let mut se = 0f64;
    let mut n = 0usize;
    for (x, y) in a.frames.iter().zip(b.frames) {
        for (p, q) in x.iter().zip(y) {
            let d = (*p as f64 - *q as f64) / 255.0;
            se += d * d;
        }
        n += x.len();
    }
    let mse = se / n.max(1) as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    })
}

fn gaussian() -> [f64; 11] {
    let mut k = [0f64; 11];
    let mut s = 0.0;
    for (i, v) in k.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * 1.5 * 1.5)).exp();
        s += *v;
    }
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// Separable valid-region filtering of a `w x h` plane.
fn blur(p: &[f64], w: usize, h: usize, k: &[f64; 11]) -> (Vec<f64>, usize, usize) {
    let (ow, oh) = (w - 10, h - 10);
    let mut tmp = vec![0f64; ow * h];
    for y in 0..h {
        for x in 0..ow {
            tmp[y * ow + x] = (0..11).map(|i| k[i] * p[y * w + x + i]).sum();
        }
    }
    let mut out = vec![0f64; ow * oh];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..11).map(|i| k[i] * tmp[(y + i) * ow + x]).sum();
        }
    }
    (out, ow, oh)
}

/// Mean SSIM; frames must be at least 11x11.
pub fn ssim(a: &Frames, b: &Frames) -> Result<f64> {
    check(a, b)?;
    let (w, h) = (a.width, a.height);
    if w < 11 || h < 11 {
        return Err(Error::setting(
            "frames",
            format!("{w}x{h}"),
            "SSIM needs at least 11x11",
        ));
    }
    let k = gaussian();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut total = 0.0;
    let mut count = 0usize;
    for (x, y) in a.frames.iter().zip(b.frames) {
        for c in 0..3 {
            let px: Vec<f64> = (0..w * h).map(|i| x[i * 3 + c] as f64 / 255.0).collect();
            let py: Vec<f64> = (0..w * h).map(|i| y[i * 3 + c] as f64 / 255.0).collect();
            let xx: Vec<f64> = px.iter().map(|v| v * v).collect();
            let yy: Vec<f64> = py.iter().map(|v| v * v).collect();
            let xy: Vec<f64> = px.iter().zip(&py).map(|(a, b)| a * b).collect();
            let (mx, ow, oh) = blur(&px, w, h, &k);
            let (my, _, _) = blur(&py, w, h, &k);
            let (sxx, _, _) = blur(&xx, w, h, &k);
            let (syy, _, _) = blur(&yy, w, h, &k);
            let (sxy, _, _) = blur(&xy, w, h, &k);
            for i in 0..ow * oh {
                let (mx, my) = (mx[i], my[i]);
                let vx = sxx[i] - mx * mx;
                let vy = syy[i] - my * my;
                let cov = sxy[i] - mx * my;
                total += ((2.0 * mx * my + c1) * (2.0 * cov + c2))
                    / ((mx * mx + my * my + c1) * (vx + vy + c2));
                count += 1;
            }
        }
    }
    Ok(total / count.max(1) as f64)
}

/// How selective a token-level cache was: the mean recompute count of tokens in moving
/// regions and of static tokens, over decoded blocks (their statistics and RGB24 frames,
/// `width x height`, in order). Every token of every frame (the first frame of the video is
/// skipped) is ranked by how much its pixels changed since the previous frame: the top
/// tenth, when it changed by more than 4/255 on average, is *moving*; the lower half is
/// *static* (the rank, not a fixed level, so that a model whose background flickers a little
/// is still measured). Returns `(moving, static)` means, or `None` when either kind is absent.
pub fn motion_selectivity(
    blocks: &[(crate::generate::BlockStats, Vec<Vec<u8>>)],
    width: usize,
    height: usize,
) -> Option<(f64, f64)> {
    // (pixel change, recompute count) of every token of every frame.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut prev: Option<&Vec<u8>> = None;
    for (stats, frames) in blocks {
        let (gf, gh, gw) = stats.grid;
        if gf * gh * gw == 0 || stats.token_recomputes.len() != gf * gh * gw {
            continue;
        }
        let nf = frames.len();
        for (i, f) in frames.iter().enumerate() {
            let Some(p) = prev.replace(f) else { continue };
            if f.len() < width * height * 3 || p.len() != f.len() {
                continue;
            }
            let g = (i * gf / nf.max(1)).min(gf - 1);
            let mut diff = vec![0f64; gh * gw];
            let mut count = vec![0usize; gh * gw];
            for y in 0..height {
                let ty = (y * gh / height).min(gh - 1);
                for x in 0..width {
                    let t = ty * gw + (x * gw / width).min(gw - 1);
                    let o = (y * width + x) * 3;
                    for c in 0..3 {
                        diff[t] += (f[o + c] as f64 - p[o + c] as f64).abs();
                    }
                    count[t] += 3;
                }
            }
            for t in 0..gh * gw {
                let d = diff[t] / count[t].max(1) as f64;
                samples.push((d, stats.token_recomputes[g * gh * gw + t] as f64));
            }
        }
    }
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = samples.len();
    let mean = |s: &[(f64, f64)]| s.iter().map(|v| v.1).sum::<f64>() / s.len() as f64;
    let moving: Vec<(f64, f64)> = samples[n - n / 10..]
        .iter()
        .copied()
        .filter(|v| v.0 > 4.0)
        .collect();
    let fixed = &samples[..n / 2];
    (!moving.is_empty() && !fixed.is_empty()).then(|| (mean(&moving), mean(fixed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> u8) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    v.push(f(x, y, c));
                }
            }
        }
        v
    }

    #[test]
    fn identical_and_known_values() {
        let a = vec![frame(16, 16, |x, y, c| {
            ((x * 13 + y * 7 + c * 50) % 256) as u8
        })];
        let fa = Frames {
            frames: &a,
            width: 16,
            height: 16,
        };
        assert!(psnr(&fa, &fa).unwrap().is_infinite());
        assert!((ssim(&fa, &fa).unwrap() - 1.0).abs() < 1e-12);
        // Every value off by 1/255: MSE = (1/255)^2 -> PSNR = 20 log10(255) = 48.13 dB.
        let b = vec![
            a[0].iter()
                .map(|v| v.saturating_add(1).max(1))
                .collect::<Vec<u8>>(),
        ];
        let a2 = vec![b[0].iter().map(|v| v - 1).collect::<Vec<u8>>()];
        let fb = Frames {
            frames: &b,
            width: 16,
            height: 16,
        };
        let fa2 = Frames {
            frames: &a2,
            width: 16,
            height: 16,
        };
        assert!((psnr(&fa2, &fb).unwrap() - 48.1308).abs() < 1e-3);
        // Noise lowers SSIM well below 1.
        let n = vec![frame(16, 16, |x, y, c| {
            (((x * 97 + y * 31 + c * 11) * 2654435761usize) % 256) as u8
        })];
        let fn_ = Frames {
            frames: &n,
            width: 16,
            height: 16,
        };
        assert!(ssim(&fa, &fn_).unwrap() < 0.5);
        let wrong = Frames {
            frames: &n,
            width: 8,
            height: 32,
        };
        assert!(psnr(&fa, &wrong).is_err());
    }
}
