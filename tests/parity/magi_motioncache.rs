//! MAGI-1's MotionCache against the reference (ywlq/MotionCache, MotionCache4MAGI-1, run by
//! `tools/fixtures/magi_motioncache.py` on the tiny distill model, 4 chunks, 64 steps, the
//! reference's thresholds): every (step, chunk) decision of its walk (compute / whole-chunk
//! reuse / token subset), its accumulators, its change metric and its motion weights.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, IndexOp, Tensor};
use motioncache::cache::Plan;
use motioncache::cache::magi::{MagiCacheParams, MagiChunkCache, frame_weights, metric_change};
use motioncache::model::magi::load_dit;

use crate::common;

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/magi")
}

struct Record {
    step: usize,
    chunk: usize,
    count: usize,
    decided: bool,
    r: Option<f32>,
    decision: String,
    recomputed: Vec<u32>,
    acc_chunk_after: Option<f64>,
}

struct Reference {
    records: Vec<Record>,
    /// Per global step: the window `[start, end)` of chunks and its records.
    steps: Vec<((usize, usize), Vec<usize>)>,
    tensors: HashMap<String, Tensor>,
    params: MagiCacheParams,
    chunk_width: usize,
    tokens_per_frame: usize,
}

fn reference() -> Reference {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("motioncache_ref.json")).expect("motioncache_ref.json"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        dir().join("motioncache_ref.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("motioncache_ref.safetensors");
    let run = &doc["runs"]["a"];
    let n = |v: &serde_json::Value| v.as_u64().expect("integer") as usize;
    let records = run["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Record {
            step: n(&r["step"]),
            chunk: n(&r["chunk"]),
            count: n(&r["count"]),
            decided: r["decided"].as_bool().unwrap(),
            r: r["r"].as_f64().map(|x| x as f32),
            decision: r["decision"].as_str().unwrap().to_string(),
            recomputed: r["recomputed_tokens"]
                .as_array()
                .map(|t| t.iter().map(|x| n(x) as u32).collect())
                .unwrap_or_default(),
            acc_chunk_after: r["acc_chunk_after"].as_f64(),
        })
        .collect();
    let steps = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let w = s["window"].as_array().unwrap();
            (
                (n(&w[0]), n(&w[1])),
                s["records"].as_array().unwrap().iter().map(n).collect(),
            )
        })
        .collect();
    let cfg = &doc["addconfig"];
    let params = MagiCacheParams {
        chunk_threshold: cfg["rel_l1_thresh"].as_f64().unwrap(),
        token_threshold: cfg["token_rel_l1_thresh"].as_f64().unwrap(),
        warmup_steps: n(&cfg["warmup_steps"]),
        chunk_steps: n(&cfg["chunk_wise_only_steps"]),
        weight_floor: cfg["temporal_weight_floor"].as_f64().unwrap(),
        weight_power: cfg["temporal_weight_power"].as_f64().unwrap(),
    };
    assert_eq!(
        params,
        MagiCacheParams::default(),
        "the reference's defaults"
    );
    let derived = &doc["derived"];
    Reference {
        records,
        steps,
        tensors,
        params,
        chunk_width: n(&derived["chunk_width"]),
        tokens_per_frame: n(&derived["tokens_per_frame"]),
    }
}

fn plan_name(p: &Plan) -> &'static str {
    match p {
        Plan::Full => "compute",
        Plan::Skip => "skip",
        Plan::Tokens(_) => "partial",
    }
}

/// Replays the decisions of the reference's walk from the given changes and weights;
/// checks each against the record and returns how many were of each kind.
fn replay(
    fx: &Reference,
    change: impl Fn(usize) -> Option<f32>,
    weights: impl Fn(usize) -> Vec<f32>,
    exact_accumulators: bool,
) -> BTreeMap<&'static str, usize> {
    let acc_tok = &fx.tensors["a.token_acc_after"];
    let mut states: HashMap<usize, MagiChunkCache> = HashMap::new();
    let mut counts = BTreeMap::new();
    for (k, rec) in fx.records.iter().enumerate() {
        let w = weights(k);
        let state = states
            .entry(rec.chunk)
            .or_insert_with(|| MagiChunkCache::new(w.len()));
        let r = if rec.decided { change(k) } else { None };
        let plan = state.decide(&fx.params, rec.count, r, &w);
        let at = format!("record {k} (step {}, chunk {})", rec.step, rec.chunk);
        assert_eq!(plan_name(&plan), rec.decision, "{at}: {plan:?}");
        if let Plan::Tokens(t) = &plan {
            assert_eq!(t, &rec.recomputed, "{at}: recomputed tokens");
        }
        if let Some(want) = rec.acc_chunk_after {
            let got = state.chunk_accumulator();
            let tol = if exact_accumulators { 1e-12 } else { 1e-6 };
            assert!(
                (got - want).abs() <= tol,
                "{at}: chunk accumulator {got} vs {want}"
            );
        }
        let want = acc_tok.i(k).unwrap().to_vec1::<f32>().unwrap();
        for (t, (g, w)) in state.token_accumulators().iter().zip(&want).enumerate() {
            let tol = if exact_accumulators { 1e-9 } else { 1e-6 };
            assert!(
                (g - w).abs() <= tol,
                "{at}: token {t} accumulator {g} vs {w}"
            );
        }
        *counts.entry(plan_name(&plan)).or_insert(0) += 1;
    }
    counts
}

#[test]
fn magi_motioncache_decisions_replay_the_reference() {
    let fx = reference();
    let w_tok = &fx.tensors["a.w_tok"];
    let counts = replay(
        &fx,
        |k| fx.records[k].r,
        |k| w_tok.i(k).unwrap().to_vec1::<f32>().unwrap(),
        true,
    );
    // the fixture exercises every kind of decision
    assert_eq!(counts["compute"], 130);
    assert_eq!(counts["skip"], 69);
    assert_eq!(counts["partial"], 57);
}

/// Our change metric (the tiny DiT's patch embedding) and motion weights, computed on the
/// reference's own trajectory (its latents after every step), match the recorded ones,
/// and the decisions they give are the reference's.
#[test]
fn magi_motioncache_metric_and_weights_match_the_reference() {
    let fx = reference();
    let dev = candle_core::Device::Cpu;
    let (cfg, dit) = load_dit(&dir().join("tiny"), DType::F32, &dev).unwrap();
    let patch = cfg.model_config.patch_size;
    let cw = fx.chunk_width;
    let after = &fx.tensors["a.latent_after"];
    // [C, T, H, W]: the whole video's latents as the walk goes
    let mut video = fx.tensors["noise"].squeeze(0).unwrap();
    let frames = video.dim(1).unwrap();
    let mut frame_w: Vec<Vec<f32>> = vec![vec![1.0; fx.tokens_per_frame]; frames];
    let mut prev_metric: HashMap<usize, Tensor> = HashMap::new();
    let mut changes: HashMap<usize, f32> = HashMap::new();
    let mut weights: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut worst_r = 0f32;
    let mut worst_w = 0f32;
    for ((start, end), recs) in &fx.steps {
        // before the step: the metric of every window chunk, against the previous step's
        let mut metric = HashMap::new();
        for i in *start..*end {
            let x = video.narrow(1, i * cw, cw).unwrap().unsqueeze(0).unwrap();
            metric.insert(i, dit.embed_patches(&x).unwrap());
        }
        for &k in recs {
            let rec = &fx.records[k];
            if let Some(prev) = prev_metric.get(&rec.chunk) {
                let r = metric_change(&metric[&rec.chunk], prev).unwrap();
                let want = rec
                    .r
                    .expect("a recorded change where a previous metric exists");
                worst_r = worst_r.max((r - want).abs() / want.abs());
                changes.insert(k, r);
            }
            let w: Vec<f32> = (0..cw)
                .flat_map(|f| frame_w[rec.chunk * cw + f].clone())
                .collect();
            let want = fx.tensors["a.w_tok"]
                .i(k)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, w) in w.iter().zip(&want) {
                worst_w = worst_w.max((g - w).abs());
            }
            weights.insert(k, w);
        }
        prev_metric = metric;
        // after the step: its latents, then the weights of the window's frames
        for &k in recs {
            let c = fx.records[k].chunk;
            let new = after.i(k).unwrap().squeeze(0).unwrap();
            let (ch, _, h, w) = video.dims4().unwrap();
            video = video
                .slice_assign(&[0..ch, c * cw..(c + 1) * cw, 0..h, 0..w], &new)
                .unwrap();
        }
        for f in (start * cw..end * cw).filter(|&f| f > 0) {
            frame_w[f] = frame_weights(
                &video.i((.., f)).unwrap(),
                &video.i((.., f - 1)).unwrap(),
                patch,
                fx.params.weight_floor,
                fx.params.weight_power,
            )
            .unwrap();
        }
    }
    assert!(
        worst_r <= 1e-4,
        "change metric: worst relative error {worst_r:.2e}"
    );
    assert!(worst_w <= 1e-5, "motion weights: worst error {worst_w:.2e}");
    replay(
        &fx,
        |k| changes.get(&k).copied(),
        |k| weights[&k].clone(),
        false,
    );
}

/// The reference's whole walk (4 chunks, 64 steps) from its noise and captions on our
/// walk with the reference-reproducing setting: every chunk's latents after every step
/// and the final latents; with `caching` also every decision. Run "b" has both thresholds
/// at 0 (no reuse: what remains are the reference's semantic changes), run "a" the
/// reference's defaults.
fn walk_matches(run: &str, caching: bool) {
    use motioncache::model::magi::walk::{
        MagiCaptions, MagiWalk, PromptCaption, WalkCacheSettings,
    };
    let fx = reference();
    let dev = candle_core::Device::Cpu;
    let (mut cfg, dit) = load_dit(&dir().join("tiny"), DType::F32, &dev).unwrap();
    cfg.runtime_config.num_steps = 64;
    let caps = &fx.tensors["captions"];
    let lengths: Vec<i64> = fx.tensors["caption_lengths"].to_vec1().unwrap();
    let chunks = lengths.len();
    let l = caps.dim(1).unwrap();
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..l).map(move |j| if (j as i64) < n { 1.0 } else { 0.0 }))
        .collect();
    let (null, null_mask) = PromptCaption::null_of(&dit).unwrap();
    let captions = MagiCaptions {
        text: caps.clone(),
        text_mask: Tensor::from_vec(mask, (chunks, l), &dev).unwrap(),
        null: null.unsqueeze(0).unwrap().repeat((chunks, 1, 1)).unwrap(),
        null_mask: null_mask.unsqueeze(0).unwrap().repeat((chunks, 1)).unwrap(),
    };
    let mut params = fx.params.clone();
    if !caching {
        params.chunk_threshold = 0.0;
        params.token_threshold = 0.0;
    }
    let noise = fx.tensors["noise"].clone();
    let mut walk = MagiWalk::new(std::sync::Arc::new(dit), &cfg, noise, captions).unwrap();
    walk.set_cache(Some(WalkCacheSettings {
        params,
        reference: true,
    }))
    .unwrap();
    assert_eq!(walk.total_steps(), Some(fx.steps.len()));
    let after = &fx.tensors[&format!("{run}.latent_after")];
    let cw = fx.chunk_width;
    let mut worst = 0f64;
    for (step, ((start, end), recs)) in fx.steps.iter().enumerate() {
        let s = walk.step().unwrap().expect("a step");
        assert_eq!(s.denoised, (*start, *end), "step {step}: window");
        let x = walk.latents().unwrap();
        for (j, &k) in recs.iter().enumerate() {
            let rec = &fx.records[k];
            if caching {
                assert_eq!(
                    plan_name(&s.plans[j]),
                    rec.decision,
                    "step {step}, chunk {}: {:?}",
                    rec.chunk,
                    s.plans[j]
                );
                if let Plan::Tokens(t) = &s.plans[j] {
                    assert_eq!(t, &rec.recomputed, "step {step}, chunk {}", rec.chunk);
                }
            } else {
                assert_eq!(s.plans[j], Plan::Full);
            }
            let c = rec.chunk - walk.first_held();
            let got = x.narrow(2, c * cw, cw).unwrap();
            let e = common::rel_l2(&got, &after.i(k).unwrap());
            worst = worst.max(e);
            assert!(
                e <= 1e-4,
                "run {run}, step {step}, chunk {}: latents rel L2 {e:.2e}",
                rec.chunk
            );
        }
    }
    assert!(walk.step().unwrap().is_none());
    let e = common::rel_l2(
        walk.latents().unwrap(),
        &fx.tensors[&format!("{run}.final")],
    );
    assert!(
        e <= 1e-4,
        "run {run}: final latents rel L2 {e:.2e} (worst step {worst:.2e})"
    );
}

/// Without reuse, the reference's walk differs from upstream's (no clean-chunk
/// re-forward, no nearly-clean mix): the setting reproduces it.
#[test]
fn magi_reference_walk_without_reuse_matches() {
    walk_matches("b", false);
}

/// With the reference's thresholds: identical decisions (whole-chunk reuse, token subsets,
/// the key-range bug on partial chunks that are not the oldest) and the same latents.
#[test]
fn magi_reference_walk_with_motioncache_matches() {
    walk_matches("a", true);
}
