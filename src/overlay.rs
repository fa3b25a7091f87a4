//! Shows the cache at work: tints each token's pixels by how often the token went through
//! the transformer while its block was denoised, so a viewer sees recomputation follow the
//! motion (element property `overlay=recompute`).

use crate::generate::BlockStats;

/// The tint colour (RGB) of recomputed tokens.
pub const TINT: [u8; 3] = [255, 0, 200];

/// How strongly a token is tinted: 0 for the least recomputed token of the block (the
/// warm-up every token gets), `max_alpha` for one recomputed at every step of every
/// guidance branch.
fn alpha(count: u32, least: u32, full: u32, max_alpha: f32) -> f32 {
    if full <= least {
        return 0.0;
    }
    max_alpha * (count.saturating_sub(least)) as f32 / (full - least) as f32
}

/// Tints `frames` (packed RGB24, `width x height`, the block's decoded frames in order) by
/// the block's per-token recompute counts.
pub fn tint_recomputed(frames: &mut [Vec<u8>], width: usize, height: usize, stats: &BlockStats) {
    let (gf, gh, gw) = stats.grid;
    let tokens = gf * gh * gw;
    if tokens == 0 || stats.token_recomputes.len() != tokens || frames.is_empty() {
        return;
    }
    // Passes over the block in all (steps x branches): a token computed in every one.
    let full = (stats.tokens_total / tokens) as u32;
    let least = stats.token_recomputes.iter().copied().min().unwrap_or(0);
    let nf = frames.len();
    for (i, f) in frames.iter_mut().enumerate() {
        if f.len() < width * height * 3 {
            continue;
        }
        // Pixel frame -> grid frame (a latent frame may decode to several pixel frames).
        let g = (i * gf / nf).min(gf - 1);
        for y in 0..height {
            let ty = (y * gh / height).min(gh - 1);
            for x in 0..width {
                let tx = (x * gw / width).min(gw - 1);
                let c = stats.token_recomputes[(g * gh + ty) * gw + tx];
                let a = alpha(c, least, full, 0.7);
                if a <= 0.0 {
                    continue;
                }
                let p = &mut f[(y * width + x) * 3..(y * width + x) * 3 + 3];
                for (v, t) in p.iter_mut().zip(TINT) {
                    *v = (*v as f32 * (1.0 - a) + t as f32 * a).round() as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tints_the_recomputed_token_only() {
        // One grid frame of 2x2 tokens over a 4x4 image; token (0, 1) recomputed at every
        // one of 10 passes, the others at 2 (warm-up).
        let stats = BlockStats {
            grid: (1, 2, 2),
            token_recomputes: vec![2, 10, 2, 2],
            tokens_total: 40,
            ..Default::default()
        };
        let mut frames = vec![vec![0u8; 4 * 4 * 3]; 2];
        tint_recomputed(&mut frames, 4, 4, &stats);
        for f in &frames {
            // Pixel (x=3, y=0) is in token (0, 1): tinted; (0, 0) is not.
            assert!(f[3 * 3] > 100 && f[3 * 3 + 2] > 100, "{:?}", &f[..12]);
            assert_eq!(&f[..3], &[0, 0, 0]);
            assert_eq!(&f[(3 * 4) * 3..(3 * 4) * 3 + 3], &[0, 0, 0]);
        }
    }
}
