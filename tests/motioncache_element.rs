//! MotionCache at the element's defaults on the embedded model: the token-level phase is
//! reached in every block after the first, and recomputation follows the motion: tokens in
//! moving regions (the tenth of each frame's tokens whose pixels changed most, see
//! `metrics::motion_selectivity`) go through the transformer at least twice as often as
//! static ones (the lower half), in the blocks after the first (which is computed in full,
//! `full_first_block`). Measured 2.03x (17.25 against 8.52 recomputes per token over a
//! block's 10 steps x 2 guidance branches; 2.00x counting the first block) since the
//! reused tokens refresh their keys/values at 10 steps too (2.10x before); a static token's
//! floor is about 8 (two warm-up steps and the staleness bound's two per branch), a moving
//! token's ceiling 20. Before the
//! first block was computed in full, 2.14x on the fifth export with `max_update_ratio` 0.8
//! (2.18x without it, 2.16x on the fourth export, 2.09x on the third).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use motioncache::cache::CacheMode;
use motioncache::metrics::motion_selectivity;
use motioncache::pipeline::Pipeline;

#[test]
fn token_level_at_the_element_defaults_and_follows_motion() {
    let p = Arc::new(Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap());
    let mut s = p.info().defaults.clone();
    assert_eq!(s.cache.mode, CacheMode::MotionCache);
    s.total_frames = Some(4 * s.window);
    let (w, h) = (p.info().width, p.info().height);
    let mut stream = p
        .stream(
            "a red circle moving right on a striped blue background",
            "",
            s,
            7,
        )
        .unwrap();
    let cancel = AtomicBool::new(false);
    let mut blocks = Vec::new();
    while let Some(b) = stream.next_block(&cancel).unwrap() {
        blocks.push((b.stats, b.frames));
    }
    for (i, (st, _)) in blocks.iter().enumerate() {
        println!(
            "block {}: full {} partial {} skipped {}, recomputed {:.3}",
            st.index,
            st.full_forwards,
            st.partial_forwards,
            st.skipped_forwards,
            st.recomputed_fraction()
        );
        if i > 0 {
            assert!(
                st.partial_forwards > 0,
                "block {}: no token-level step: {st:?}",
                st.index
            );
        }
    }
    // The video's first block is computed in full at every step (`full_first_block`), like
    // a warm-up: it makes no per-token decision, so selectivity is measured after it.
    let all = motion_selectivity(&blocks, w, h).expect("moving and static tokens");
    let (moving, fixed) = motion_selectivity(&blocks[1..], w, h).expect("moving and static tokens");
    println!(
        "mean recomputes after the first block: moving {moving:.2}, static {fixed:.2} ({:.2}x; \
         {:.2}x with the first block)",
        moving / fixed,
        all.0 / all.1
    );
    assert!(
        moving >= 2.0 * fixed,
        "moving tokens recomputed {moving:.2} times, static {fixed:.2}: less than twice"
    );
}

/// Issue 13's "every schedule": at 8 to 50 steps, with the element's other defaults, every
/// block after the first is mostly decided per token after its warm-up (more partial passes
/// than full ones among the passes after the warm-up steps; a pass that would recompute at
/// least `max_update_ratio` of the tokens runs in full and counts as full here).
#[test]
fn token_level_at_every_step_count() {
    let p = Arc::new(Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap());
    for steps in [8, 12, 25, 50] {
        let mut s = p.info().defaults.clone();
        s.steps = steps;
        s.cache = s.cache.defaults_for(CacheMode::MotionCache, steps);
        let warmup = s.cache.warmup_steps;
        s.total_frames = Some(2 * s.window - s.overlap);
        let mut stream = p
            .stream(
                "a yellow square moving left on a checkered green background",
                "",
                s,
                3,
            )
            .unwrap();
        let cancel = AtomicBool::new(false);
        let mut i = 0;
        while let Some(b) = stream.next_block(&cancel).unwrap() {
            let st = &b.stats;
            println!(
                "{steps} steps, block {}: full {} partial {} skipped {}",
                st.index, st.full_forwards, st.partial_forwards, st.skipped_forwards
            );
            if i > 0 {
                // Passes per step: one per guidance branch.
                let branches =
                    (st.full_forwards + st.partial_forwards + st.skipped_forwards) / st.steps;
                let full_after_warmup = st.full_forwards - warmup * branches;
                assert!(
                    st.partial_forwards > full_after_warmup,
                    "{steps} steps, block {}: not mostly token level after {warmup} warm-up \
                     steps: {st:?}",
                    st.index
                );
            }
            i += 1;
        }
        assert!(i > 1, "{steps} steps: only {i} block(s)");
    }
}

/// The memory estimate counts the key/value refresh's hidden states where the settings
/// keep them: every layer after the first, twice, per guidance branch and window token.
#[test]
fn memory_estimate_counts_the_kv_refresh_states() {
    use motioncache::cache::CacheSettings;
    let p = Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap();
    let mut s = p.info().defaults.clone();
    s.steps = 50;
    s.cache = p
        .info()
        .defaults
        .cache
        .defaults_for(CacheMode::MotionCache, 50);
    assert!(s.cache.kv_refresh);
    let size = (p.info().width, p.info().height);
    let on = p.memory_estimate(&s, size).unwrap();
    s.cache.kv_refresh = false;
    let off = p.memory_estimate(&s, size).unwrap();
    assert_eq!(off.kv_refresh, 0);
    // The tiny model: 4 layers of 128 values, f32; 64x64 frames -> 16x16 latents (VAE
    // stride 4) -> 8x8 tokens per latent frame.
    let tokens = (s.window * (size.0 / 8) * (size.1 / 8)) as u64;
    assert_eq!(on.kv_refresh, 2 * 2 * 3 * tokens * 128 * 4);
    assert_eq!(on.total() - off.total(), on.kv_refresh);
    let reference = CacheSettings::for_schedule(CacheMode::MotionCacheReference, 50);
    s.cache = reference;
    assert_eq!(p.memory_estimate(&s, size).unwrap().kv_refresh, 0);
}
