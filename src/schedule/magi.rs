//! MAGI-1's schedule (upstream `inference/pipeline/video_generate.py`): timesteps from 0
//! (noise) to 1 (clean) as `t^2` through the SD3 shift, computed in f32 exactly as upstream
//! does (its step 3N/4 lands at 0.30000001 in f32, just above the 0.3 cut-off of the
//! distill model's nearly-clean path), the distill shortcut intervals, and the staggered
//! chunk window of the walk.

/// `torch.linspace(start, end, steps)` in f32 (the first half counted from `start`, the
/// second from `end`, as ATen does).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// The `num_steps + 1` timesteps of a walk (`init_t` with the default "sd3" transform and
/// shift 3; the 12-step shortcut schedule of the distill model per `shortcut_mode`).
pub fn timesteps(num_steps: usize, shortcut_mode: &str, shift: f64) -> Vec<f32> {
    let t = if num_steps == 12 {
        let base: Vec<f32> = linspace_f32(0.0, 1.0, 5).iter().map(|x| x / 4.0).collect();
        let accu = linspace_f32(0.0, 1.0, 5);
        let base: Vec<f32> = if shortcut_mode == "16,16,8" {
            base[..3].to_vec()
        } else {
            vec![base[0], base[2], base[3]]
        };
        accu.iter()
            .flat_map(|a| base.iter().map(move |b| b + a))
            .take(num_steps + 1)
            .collect()
    } else {
        linspace_f32(0.0, 1.0, num_steps + 1)
    };
    let inv = 1.0 / shift;
    let (a, b) = (inv as f32, (inv - 1.0) as f32);
    t.iter()
        .map(|&x| {
            let x = x * x;
            a * x / (1.0 + b * x)
        })
        .collect()
}

/// Shortcut interval per denoising index (`init_intervel`): ones, or `[2, 1, 1]` repeated
/// (`[1, 1, 2]` for "16,16,8") when the step count is a multiple of 3.
pub fn intervals(num_steps: usize, shortcut_mode: &str) -> Vec<f64> {
    if !num_steps.is_multiple_of(3) {
        return vec![1.0; num_steps];
    }
    let pat: [f64; 3] = if shortcut_mode == "16,16,8" {
        [1.0, 1.0, 2.0]
    } else {
        [2.0, 1.0, 1.0]
    };
    pat.iter().copied().cycle().take(num_steps).collect()
}

/// One stage of the walk: the chunks `[chunk_start, chunk_end)` in the window and the
/// stages `[t_start, t_end)` they are at (upstream `generate_sequences`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub chunk_start: usize,
    pub chunk_end: usize,
    pub t_start: usize,
    pub t_end: usize,
}

/// The stages of a walk over `chunks` chunks with `window` chunks in flight, starting at
/// chunk `offset` (the prefix video's clean chunks).
pub fn stages(chunks: usize, window: usize, offset: usize) -> Vec<Stage> {
    (offset..chunks + window - 1)
        .map(|i| stage(i - offset, chunks, window, offset))
        .collect()
}

/// Stage `k` (from 0) of the walk of [`stages`]; `chunks` may be `usize::MAX` for an
/// endless walk, whose stages never reach a last chunk.
pub fn stage(k: usize, chunks: usize, window: usize, offset: usize) -> Stage {
    let i = k + offset;
    Stage {
        chunk_start: offset.max((i + 1).saturating_sub(window)),
        chunk_end: chunks.min(i + 1),
        t_start: (i + 1).saturating_sub(chunks),
        t_end: window.min(k + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_match_upstream_examples() {
        // video_generate.py, Example 2: chunk_num 8, window 4.
        let s = stages(8, 4, 0);
        let col = |f: fn(&Stage) -> usize| s.iter().map(f).collect::<Vec<_>>();
        assert_eq!(col(|x| x.chunk_start), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(col(|x| x.chunk_end), [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8]);
        assert_eq!(col(|x| x.t_start), [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(col(|x| x.t_end), [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]);
        // Example 3: offset 2.
        let s = stages(8, 4, 2);
        let col = |f: fn(&Stage) -> usize| s.iter().map(f).collect::<Vec<_>>();
        assert_eq!(col(|x| x.chunk_start), [2, 2, 2, 2, 3, 4, 5, 6, 7]);
        assert_eq!(col(|x| x.chunk_end), [3, 4, 5, 6, 7, 8, 8, 8, 8]);
        assert_eq!(col(|x| x.t_start), [0, 0, 0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(col(|x| x.t_end), [1, 2, 3, 4, 4, 4, 4, 4, 4]);
        // An endless walk's stages are those of any long enough finite one.
        for k in 0..20 {
            assert_eq!(stage(k, usize::MAX, 4, 0), stages(40, 4, 0)[k]);
        }
    }

    #[test]
    fn schedule_hits_the_f32_value_upstream_does() {
        let t = timesteps(8, "8,16,16", 3.0);
        assert_eq!(t.len(), 9);
        // The last one is 1.0000001 in f32, upstream as here.
        assert!(t[0] == 0.0 && (t[8] - 1.0).abs() < 1e-6, "{t:?}");
        // 0.30000001 in f32: above the distill model's 0.3 threshold.
        assert!(t[6] as f64 > 0.3, "{}", t[6]);
        assert_eq!(intervals(12, "8,16,16")[..3], [2.0, 1.0, 1.0]);
        assert_eq!(timesteps(12, "8,16,16", 3.0).len(), 13);
    }
}
