//! Behaviour of the cache policies inside the generator (random tiny transformer from the
//! core fixtures; tools/fixtures/core.py).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use motioncache::cache::{
    BlockPolicy, CacheMode, CacheSettings, MotionCacheState, MotionSource, Observation, Plan,
    StepInfo,
};
use motioncache::generate::{BlockStats, Generator, GeneratorSettings, NoiseSource};
use motioncache::model::Transformer;
use motioncache::model::loader::load_transformer;
use motioncache::schedule::SchedulerConfig;

mod common;
use common::rel_l2;

fn model() -> Arc<Transformer> {
    let dir = common::repo().join("tests/fixtures/core/dit_b");
    Arc::new(load_transformer(&dir, DType::F32, &Device::Cpu).unwrap())
}

/// An asynchronous run over two windows; returns the latents and per-block stats.
fn run(m: &Arc<Transformer>, cache: CacheSettings) -> (Tensor, Vec<BlockStats>) {
    let dev = Device::Cpu;
    let ctx = Tensor::randn(0f32, 1., (1, 8, 16), &dev).unwrap();
    // Same contexts for every run: derive them from a fixed seed.
    let mut rng = motioncache::generate::NoiseRng::new(3);
    let ctx = rng.randn(ctx.shape(), &dev).unwrap();
    let neg = rng.randn(ctx.shape(), &dev).unwrap();
    let settings = GeneratorSettings {
        steps: 12,
        shift: 8.0,
        guidance_scale: 4.0,
        causal_block_size: 3,
        ar_step: 3,
        window: 9,
        overlap: 3,
        addnoise_condition: 0.0,
        fps_class: 1,
        total_frames: Some(15),
        cache,
    };
    let mut g = Generator::new(
        m.clone(),
        SchedulerConfig::default(),
        settings,
        &ctx,
        Some(&neg),
        (8, 16, 16),
        NoiseSource::Seed(11),
    )
    .unwrap();
    let cancel = AtomicBool::new(false);
    let mut lat = Vec::new();
    let mut stats = Vec::new();
    while let Some(b) = g.next_block(&cancel).unwrap() {
        lat.push(b.latents);
        stats.push(b.stats);
    }
    (Tensor::cat(&lat, 1).unwrap(), stats)
}

fn recomputed(stats: &[BlockStats]) -> usize {
    stats.iter().map(|s| s.tokens_recomputed).sum()
}

#[test]
fn none_equals_vanilla() {
    let m = model();
    let (a, sa) = run(&m, CacheSettings::with_mode(CacheMode::None));
    let (b, sb) = run(&m, CacheSettings::with_mode(CacheMode::Vanilla));
    assert!(rel_l2(&a, &b) < 1e-5, "none vs vanilla {}", rel_l2(&a, &b));
    let fa: f64 = sa.iter().map(|s| s.flops).sum();
    let fb: f64 = sb.iter().map(|s| s.flops).sum();
    assert!(fa < fb * 0.8, "exact reuse does less work: {fa} vs {fb}");
}

#[test]
fn threshold_zero_and_long_warmup_equal_none() {
    let m = model();
    let (none, _) = run(&m, CacheSettings::with_mode(CacheMode::None));
    let zero = CacheSettings {
        motion_threshold: 0.0,
        ..CacheSettings::with_mode(CacheMode::MotionCache)
    };
    let (a, sa) = run(&m, zero);
    assert_eq!(rel_l2(&a, &none), 0.0);
    assert!(sa.iter().all(|s| s.recomputed_fraction() == 1.0));
    let warm = CacheSettings {
        warmup_steps: 12,
        ..CacheSettings::with_mode(CacheMode::MotionCache)
    };
    let (b, _) = run(&m, warm);
    assert_eq!(rel_l2(&b, &none), 0.0);
}

#[test]
fn motioncache_reuses_and_higher_threshold_never_recomputes_more() {
    let m = model();
    let mut last = usize::MAX;
    let mut counts = Vec::new();
    for t in [0.02, 0.05, 0.1, 0.3, 1.0] {
        let s = CacheSettings {
            motion_threshold: t,
            warmup_steps: 3,
            uniform_updates: 2,
            refresh_interval: 0,
            ..CacheSettings::with_mode(CacheMode::MotionCache)
        };
        let (_, st) = run(&m, s);
        let r = recomputed(&st);
        counts.push((t, r));
        assert!(
            r <= last,
            "threshold {t}: {r} tokens recomputed, more than {last}: {counts:?}"
        );
        last = r;
    }
    let total: usize = run(&m, CacheSettings::with_mode(CacheMode::None))
        .1
        .iter()
        .map(|s| s.tokens_total)
        .sum();
    assert!(
        last < total / 2,
        "a high threshold reuses most tokens: {counts:?} of {total}"
    );
}

#[test]
fn chunk_policies_skip_whole_steps() {
    let m = model();
    for mode in [CacheMode::TeaCache, CacheMode::FlowCache] {
        let s = CacheSettings {
            teacache_threshold: 0.3,
            flowcache_threshold: 0.3,
            warmup_steps: 3,
            ..CacheSettings::with_mode(mode)
        };
        let (_, st) = run(&m, s);
        let skipped: usize = st.iter().map(|s| s.skipped_forwards).sum();
        let partial: usize = st.iter().map(|s| s.partial_forwards).sum();
        assert!(skipped > 0, "{mode:?} skipped nothing");
        assert_eq!(partial, 0, "{mode:?} is chunk level");
    }
}

#[test]
fn selective_forward_matches_full_forward() {
    let m = model();
    let dev = Device::Cpu;
    let mut rng = motioncache::generate::NoiseRng::new(5);
    let ctx = m.context(&rng.randn((1, 8, 16), &dev).unwrap()).unwrap();
    let (gf, gh, gw) = m.grid(3, 8, 6).unwrap();
    let lat0 = rng.randn((8, 3, 8, 6), &dev).unwrap();
    let lat1 = rng.randn((8, 3, 8, 6), &dev).unwrap();
    let md = m.modulation(&[700.0; 3], 1).unwrap();
    // Block 0 gives the prefix K/V; block 1 is the block under test.
    let t0 = m.all_tokens(0, gf, gh, gw).unwrap();
    let mut kv0 = None;
    m.forward_layers(&m.patchify(&lat0).unwrap(), &md, &t0, &mut kv0, None, &ctx)
        .unwrap();
    let prefix = kv0.unwrap();
    let t1 = m.all_tokens(gf, gf, gh, gw).unwrap();
    let x1 = m.patchify(&lat1).unwrap();
    let mut kv = None;
    let full = m
        .forward_layers(&x1, &md, &t1, &mut kv, Some(&prefix), &ctx)
        .unwrap();
    let n = t1.len() as u32;
    // Every token selected == full forward.
    let all: Vec<u32> = (0..n).collect();
    let sub = m.subset(&t1, &all).unwrap();
    let mut kv_all = kv.clone();
    let y = m
        .forward_layers(&x1, &md, &sub, &mut kv_all, Some(&prefix), &ctx)
        .unwrap();
    assert!(rel_l2(&y, &full) < 1e-5);
    // A subset with the other tokens' K/V current == full forward at those tokens.
    let idx: Vec<u32> = (0..n).filter(|i| i % 3 == 1).collect();
    let sub = m.subset(&t1, &idx).unwrap();
    let it = Tensor::new(idx.as_slice(), &dev).unwrap();
    let mut kv_sub = kv.clone();
    let ys = m
        .forward_layers(
            &x1.index_select(&it, 0).unwrap(),
            &md,
            &sub,
            &mut kv_sub,
            Some(&prefix),
            &ctx,
        )
        .unwrap();
    let want = full.index_select(&it, 0).unwrap();
    assert!(
        rel_l2(&ys, &want) < 1e-5,
        "subset error {}",
        rel_l2(&ys, &want)
    );
    // With stale K/V for the others the subset result differs (the test can fail).
    let lat_other = rng.randn((8, 3, 8, 6), &dev).unwrap();
    let mut kv_stale = None;
    m.forward_layers(
        &m.patchify(&lat_other).unwrap(),
        &md,
        &t1,
        &mut kv_stale,
        Some(&prefix),
        &ctx,
    )
    .unwrap();
    let ys2 = m
        .forward_layers(
            &x1.index_select(&it, 0).unwrap(),
            &md,
            &sub,
            &mut kv_stale,
            Some(&prefix),
            &ctx,
        )
        .unwrap();
    assert!(rel_l2(&ys2, &want) > 1e-3);
}

/// The policy's plans over 40 steps of a block of 3 frames of 8 tokens whose left half
/// changes from frame to frame while the right half is static.
fn plans_on_half_moving_block(s: &CacheSettings) -> Vec<Plan> {
    let dev = Device::Cpu;
    let (frames, tpf, dim) = (3usize, 8usize, 4usize);
    let mut st = MotionCacheState::default();
    let mut rng = motioncache::generate::NoiseRng::new(9);
    let mut plans = Vec::new();
    for step in 0..40 {
        // Modulation drifts steadily so that distance accumulates.
        let m = Tensor::full(1.0f32 + 0.03 * step as f32, (frames, 6, dim), &dev).unwrap();
        let info = StepInfo {
            step,
            steps: 40,
            modulation: &m,
            frames,
            tokens_per_frame: tpf,
            has_residual: true,
            sigma: 1.0 - step as f64 / 40.0,
            first_block: false,
        };
        let plan = st.plan(s, &info).unwrap();
        let mut rows = Vec::new();
        for f in 0..frames {
            for p in 0..tpf {
                let moving = p < tpf / 2;
                for _ in 0..dim {
                    let v = if moving {
                        1.0 + f as f64 + 0.5 * rng.normal().abs()
                    } else {
                        1.0
                    };
                    rows.push(v as f32);
                }
            }
        }
        let x = Tensor::from_vec(rows, (frames * tpf, dim), &dev).unwrap();
        let x0 = Tensor::zeros((2, frames, 2, tpf), DType::F32, &dev).unwrap();
        let obs = Observation {
            x_in: &x,
            x_out: &x,
            prev_last_out: None,
            x0: &x0,
            prev_x0_last: None,
            patch: (1, 1),
            rates: &[],
        };
        st.observe(s, &info, &plan, &obs).unwrap();
        plans.push(plan);
    }
    plans
}

/// Settings under which phase 2 (motion weights) starts at step 4.
fn phase2_settings() -> CacheSettings {
    CacheSettings {
        warmup_steps: 2,
        uniform_updates: 2,
        motion_threshold: 0.1,
        temporal_consistency: 0.0,
        min_update_ratio: 0.0,
        max_update_ratio: 1.0,
        refresh_interval: 0,
        motion_source: MotionSource::Output,
        ..Default::default()
    }
}

/// Phase-2 recompute counts follow motion (see [`plans_on_half_moving_block`]).
#[test]
fn moving_region_is_recomputed_more_often() {
    let (frames, tpf) = (3usize, 8usize);
    let mut counts = vec![0usize; frames * tpf];
    for plan in &plans_on_half_moving_block(&phase2_settings())[2 + 2 + 2..] {
        match plan {
            Plan::Tokens(t) => t.iter().for_each(|&i| counts[i as usize] += 1),
            Plan::Full => counts.iter_mut().for_each(|c| *c += 1),
            Plan::Skip => {}
        }
    }
    let moving: usize = (0..frames * tpf)
        .filter(|i| i % tpf < tpf / 2)
        .map(|i| counts[i])
        .sum();
    let fixed: usize = (0..frames * tpf)
        .filter(|i| i % tpf >= tpf / 2)
        .map(|i| counts[i])
        .sum();
    assert!(
        moving > fixed,
        "moving {moving} vs static {fixed}: {counts:?}"
    );
}

/// `max_update_ratio`: a block-step that would recompute at least that fraction of the
/// tokens recomputes all of them; below it, the same partial plans as without the bound.
#[test]
fn max_update_ratio_turns_nearly_full_passes_into_full_ones() {
    let n = 3 * 8;
    let free = plans_on_half_moving_block(&phase2_settings());
    let partial = |p: &Plan| matches!(p, Plan::Tokens(t) if t.len() >= n / 2);
    let first = free
        .iter()
        .position(partial)
        .expect("the unbounded policy recomputes half the block at some step");
    let bounded = plans_on_half_moving_block(&CacheSettings {
        max_update_ratio: 0.5,
        ..phase2_settings()
    });
    // Identical up to the first such step, which becomes a full pass.
    assert_eq!(bounded[..first], free[..first]);
    assert_eq!(bounded[first], Plan::Full, "{:?}", free[first]);
    for (i, p) in bounded.iter().enumerate() {
        assert!(
            !partial(p),
            "step {i}: {p:?} recomputes half or more but not all"
        );
    }
    // A bound above every partial pass of the unbounded policy changes nothing.
    let largest = free
        .iter()
        .filter_map(|p| match p {
            Plan::Tokens(t) => Some(t.len()),
            _ => None,
        })
        .max()
        .expect("partial passes");
    let above = plans_on_half_moving_block(&CacheSettings {
        max_update_ratio: (largest as f64 + 0.5) / n as f64,
        ..phase2_settings()
    });
    assert_eq!(above, free, "bound above {largest} of {n} tokens");
}

/// Cancellation reaches into a transformer pass: with the flag set, the layer loop stops
/// (no output); without it, the same batch gives the plain forward's output.
#[test]
fn a_pass_stops_at_the_next_layer_when_cancelled() {
    use motioncache::model::transformer::{BatchBuilder, BatchItem};
    let m = model();
    let dev = Device::Cpu;
    let mut rng = motioncache::generate::NoiseRng::new(9);
    let ctx = m.context(&rng.randn((1, 8, 16), &dev).unwrap()).unwrap();
    let (gf, gh, gw) = m.grid(3, 8, 6).unwrap();
    let x = m.patchify(&rng.randn((8, 3, 8, 6), &dev).unwrap()).unwrap();
    let md = m.modulation(&[500.0; 3], 1).unwrap();
    let toks = m.all_tokens(0, gf, gh, gw).unwrap();
    let n = toks.len();
    let cache = m.kv_cache(1, n).unwrap();
    let mut bb = BatchBuilder::default();
    bb.push(
        BatchItem {
            x: x.clone(),
            modulation: &md,
            tokens: &toks,
            branch: 0,
            first: 0,
            keys: 0..n,
        },
        &cache,
        ctx.len(),
    )
    .unwrap();
    let batch = bb.build().unwrap();
    let stop = AtomicBool::new(true);
    let stopped = m
        .forward_batch_until(&batch, &cache, &ctx, Some(&stop))
        .unwrap();
    assert!(stopped.is_none(), "a cancelled pass returned an output");
    let go = AtomicBool::new(false);
    let y = m
        .forward_batch_until(&batch, &cache, &ctx, Some(&go))
        .unwrap()
        .expect("an output")
        .y;
    let mut kv = None;
    let reference = m
        .forward_layers(&x, &md, &toks, &mut kv, None, &ctx)
        .unwrap();
    assert!(rel_l2(&y, &reference) < 1e-6);
}

/// A key/value refresh from hidden states of the same step is exact: a subset of a block's
/// tokens computed against keys/values the other tokens only refreshed (in an empty cache)
/// gives the full forward's outputs at those tokens.
#[test]
fn kv_refresh_from_current_hidden_states_is_exact() {
    use motioncache::model::transformer::{BatchBuilder, BatchItem, RefreshItem};
    let m = model();
    let dev = Device::Cpu;
    let mut rng = motioncache::generate::NoiseRng::new(11);
    let ctx = m.context(&rng.randn((1, 8, 16), &dev).unwrap()).unwrap();
    let (gf, gh, gw) = m.grid(3, 8, 6).unwrap();
    let x = m.patchify(&rng.randn((8, 3, 8, 6), &dev).unwrap()).unwrap();
    let md = m.modulation(&[700.0; 3], 1).unwrap();
    let toks = m.all_tokens(0, gf, gh, gw).unwrap();
    let n = toks.len();
    let item = |x: Tensor, tokens| BatchItem {
        x,
        modulation: &md,
        tokens,
        branch: 0,
        first: 0,
        keys: 0..n,
    };
    let full_cache = m.kv_cache(1, n).unwrap();
    let mut bb = BatchBuilder::default();
    bb.record_hidden();
    bb.push(item(x.clone(), &toks), &full_cache, ctx.len())
        .unwrap();
    let full = m
        .forward_batch_until(&bb.build().unwrap(), &full_cache, &ctx, None)
        .unwrap()
        .expect("an output");
    let hidden = full.hidden.as_ref().expect("hidden states");

    let picked: Vec<u32> = (0..n as u32).filter(|i| i % 3 == 1).collect();
    let rest: Vec<u32> = (0..n as u32).filter(|i| i % 3 != 1).collect();
    let sub = m.subset(&toks, &picked).unwrap();
    let others = m.subset(&toks, &rest).unwrap();
    let pi = Tensor::new(picked.as_slice(), &dev).unwrap();
    let ri = Tensor::new(rest.as_slice(), &dev).unwrap();
    let deltas = hidden.index_select(&ri, 0).unwrap();
    let run = |refresh: bool| {
        let cache = m.kv_cache(1, n).unwrap();
        let mut bb = BatchBuilder::default();
        bb.push(
            item(x.index_select(&pi, 0).unwrap(), &sub),
            &cache,
            ctx.len(),
        )
        .unwrap();
        if refresh {
            bb.push_refresh(
                RefreshItem {
                    est: Tensor::cat(&[&x.index_select(&ri, 0).unwrap(), &deltas], 1).unwrap(),
                    modulation: &md,
                    tokens: &others,
                    branch: 0,
                    first: 0,
                },
                &cache,
                m.config().num_layers,
            )
            .unwrap();
        }
        m.forward_batch(&bb.build().unwrap(), &cache, &ctx).unwrap()
    };
    let want = full.y.index_select(&pi, 0).unwrap();
    let err = rel_l2(&run(true), &want);
    assert!(err < 1e-5, "refreshed: rel L2 {err}");
    // The same on the code paths of other devices (estimates summed and joined by tensor
    // ops instead of the fused norm).
    motioncache::model::kernels::force_device_paths(Some(4096));
    let err = rel_l2(&run(true), &want);
    motioncache::model::kernels::force_device_paths(None);
    assert!(err < 1e-4, "refreshed on the device paths: rel L2 {err}");
    // Without the refresh the other tokens' keys/values are missing (zero): not the same.
    let err = rel_l2(&run(false), &want);
    assert!(err > 1e-2, "without the refresh: rel L2 {err}");
}
