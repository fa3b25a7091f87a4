//! Parity of the MAGI-1 DiT with the upstream code (SandAI-org/MAGI-1 run on the CPU;
//! fixtures: tools/fixtures/magi_dit.py): every forward of a recorded distill walk (the
//! KV cache, the clean-chunk re-forward, the nearly-clean copy) and base-model forwards,
//! replayed in order on a tiny random model saved under the upstream names.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use motioncache::model::magi::{CacheUse, MagiDit, MagiInput, MagiKvCache, load_dit};

use crate::common::{self, rel_l2};

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/magi")
}

fn as_usize(v: &serde_json::Value) -> usize {
    v.as_u64().expect("integer") as usize
}

/// The fixture's weights as the base model's DiT (no step-size embedding).
fn base_dit(cfg: &motioncache::model::magi::MagiModelConfig) -> MagiDit {
    let files = [dir().join("dit/inference_weight.distill/model.safetensors")];
    // SAFETY: the fixture is only read.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &common::device())
    }
    .unwrap();
    MagiDit::new(cfg, false, vb).unwrap()
}

#[test]
fn magi_dit_matches_upstream_forwards() {
    let dev = common::device();
    let (cfg, distill) = load_dit(&dir().join("dit"), DType::F32, &dev).unwrap();
    assert!(cfg.engine_config.distill);
    let base = base_dit(&cfg.model_config);
    let fx = candle_core::safetensors::load(dir().join("dit_forwards.safetensors"), &dev).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("dit_forwards.json")).unwrap())
            .unwrap();
    let mut caches: HashMap<u64, MagiKvCache> = HashMap::new();
    let calls = meta["calls"].as_array().unwrap();
    assert!(calls.len() >= 10, "{} calls", calls.len());
    let (mut slice_seen, mut clean_seen, mut near_seen) = (false, false, false);
    for call in calls {
        let i = as_usize(&call["index"]);
        let get = |n: &str| fx[&format!("call{i}.{n}")].clone();
        let eff = &call["effective"];
        let kw = &call["kwargs"];
        let slice_point = as_usize(&eff["slice_point"]);
        let fwd_extra = eff["fwd_extra_1st_chunk"].as_bool().unwrap();
        let near = eff["distill_nearly_clean_chunk"].as_bool().unwrap();
        let extract = eff["extract_prefix_video_feature"]
            .as_bool()
            .unwrap_or(false);
        slice_seen |= slice_point > 0;
        clean_seen |= fwd_extra;
        near_seen |= near;
        let dit = if call["distill"].as_bool().unwrap() {
            &distill
        } else {
            &base
        };
        let x = get("x");
        let t_all: Vec<Vec<f64>> = get("t").to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        let y = get("y").squeeze(1).unwrap();
        let mask = get("xattn_mask").squeeze(1).unwrap();
        let kv: Vec<Vec<i64>> = get("kv_range")
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap();
        let kv_range: Vec<(usize, usize)> =
            kv.iter().map(|r| (r[0] as usize, r[1] as usize)).collect();
        let null_condition = fx
            .get(&format!("call{i}.caption_dropout_mask"))
            .map(|m| m.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0] != 0.0)
            .unwrap_or(false);
        let num_steps = as_usize(&kw["num_steps"]);
        let distill_interval = kw["distill_interval"].as_f64();
        let out = if x.dim(0).unwrap() > 1 {
            // The base model's third guidance pass: each chunk alone as a batch element,
            // every element with the first key range of its own keys (no cache).
            assert!(call["inference_params_is_none"].as_bool().unwrap());
            let outs: Vec<Tensor> = (0..x.dim(0).unwrap())
                .map(|b| {
                    let inp = MagiInput {
                        x: &x.narrow(0, b, 1).unwrap(),
                        t: &t_all[b],
                        captions: &y.narrow(0, b, 1).unwrap(),
                        caption_mask: &mask.narrow(0, b, 1).unwrap(),
                        null_condition,
                        kv_range: &kv_range[..1],
                        slice_point,
                        chunk_offset: 0,
                        num_steps,
                        distill_interval,
                        cancel: None,
                        tokens: None,
                    };
                    dit.forward(&inp, None).unwrap()
                })
                .collect();
            Tensor::cat(&outs, 0).unwrap()
        } else {
            let inp = MagiInput {
                x: &x,
                t: &t_all[0],
                captions: &y,
                caption_mask: &mask,
                null_condition,
                kv_range: &kv_range,
                slice_point,
                chunk_offset: 0,
                num_steps,
                distill_interval,
                cancel: None,
                tokens: None,
            };
            let cache = if call["inference_params_is_none"].as_bool().unwrap() {
                None
            } else {
                let ip = &call["inference_params"];
                assert_eq!(as_usize(&ip["max_batch_size"]), 1);
                let id = ip["cache_id"].as_u64().unwrap();
                let cap = as_usize(&ip["max_sequence_length"]);
                let c = caches
                    .entry(id)
                    .or_insert_with(|| MagiKvCache::new(dit, cap).unwrap());
                Some(CacheUse {
                    cache: c,
                    active: extract || fwd_extra || slice_point > 0,
                    update: call["update_kv_cache"].as_bool().unwrap(),
                    skip_last_chunks: usize::from(near),
                })
            };
            dit.forward(&inp, cache).unwrap()
        };
        let want = get("out");
        let e = rel_l2(&out, &want);
        assert!(
            e <= 1e-4,
            "call {i} ({}): rel L2 {e:.2e}, slice_point {slice_point}, clean re-forward \
             {fwd_extra}, nearly clean {near}",
            call["group"]
        );
    }
    assert!(
        slice_seen && clean_seen && near_seen,
        "the walk must hit every cache path"
    );
}

/// Runs the upstream-recorded walk of `group` ("distill": one pass with the nearly-clean
/// copy; "base": three-pass guidance) from its recorded noise; checks the recorded steps'
/// guided velocities and the final latents.
fn walk_matches(group: &str, idle_cache: bool) {
    use motioncache::model::magi::walk::{MagiCaptions, MagiWalk};
    let dev = common::device();
    let (mut cfg, dit) = load_dit(&dir().join("dit"), DType::F32, &dev).unwrap();
    let fx = candle_core::safetensors::load(dir().join("dit_forwards.safetensors"), &dev).unwrap();
    let base = group == "base";
    let dit = if base {
        // The same weights as the base model: no step-size embedding, three passes.
        cfg.runtime_config.cfg_number = 3;
        cfg.engine_config.distill = false;
        base_dit(&cfg.model_config)
    } else {
        dit
    };
    let ts: Vec<f32> = fx["distill.ts"].to_vec1().unwrap();
    assert_eq!(
        motioncache::schedule::magi::timesteps(8, &cfg.engine_config.shortcut_mode, 3.0),
        ts,
        "the schedule, bit for bit"
    );
    // Captions as the walk saw them: the three chunks' text (call 4 holds all three) and
    // the null caption (the clean chunk's at call 8).
    let text = fx["call4.y"].squeeze(1).unwrap();
    let text_mask = fx["call4.xattn_mask"].squeeze(1).unwrap();
    let null = fx["call8.y"].narrow(0, 0, 1).unwrap().squeeze(1).unwrap();
    let null_mask = fx["call8.xattn_mask"]
        .narrow(0, 0, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let rep = |t: &Tensor| Tensor::cat(&[t, t, t], 0).unwrap();
    let caps = MagiCaptions {
        text,
        text_mask,
        null: rep(&null),
        null_mask: rep(&null_mask),
    };
    let noise = fx["distill.noise"].narrow(0, 0, 1).unwrap();
    let mut walk = MagiWalk::new(std::sync::Arc::new(dit), &cfg, noise, caps).unwrap();
    if idle_cache {
        // MotionCache that never reuses: the bookkeeping (keys/values written by every
        // forward, per-chunk plans) must not change upstream's result
        use motioncache::cache::magi::MagiCacheParams;
        use motioncache::model::magi::walk::WalkCacheSettings;
        walk.set_cache(Some(WalkCacheSettings {
            params: MagiCacheParams {
                chunk_threshold: 0.0,
                token_threshold: 0.0,
                ..Default::default()
            },
            reference: false,
        }))
        .unwrap();
    }
    assert_eq!(walk.total_steps(), Some(12));
    let (mut finished, mut checked) = (Vec::new(), 0);
    let mut k = 0;
    while let Some(step) = walk.step().unwrap() {
        if let Some(want) = fx.get(&format!("{group}.step{k}.velocity")) {
            let f = step.velocity.dim(2).unwrap();
            let want = want.narrow(2, want.dim(2).unwrap() - f, f).unwrap();
            let e = rel_l2(&step.velocity, &want);
            assert!(e <= 1e-4, "{group} step {k}: velocity rel L2 {e:.2e}");
            checked += 1;
        }
        if let Some((c, _)) = step.finished {
            finished.push(c);
        }
        k += 1;
    }
    assert!(checked >= 2, "{group}: {checked} velocities checked");
    assert_eq!(finished, [0, 1, 2]);
    let e = rel_l2(walk.latents().unwrap(), &fx[&format!("{group}.final")]);
    assert!(e <= 1e-4, "{group}: final latents rel L2 {e:.2e}");
}

/// The whole distill walk (3 chunks, 8 steps, window 4, KV ranges [5, 4, 3, 2]): the
/// clean-chunk re-forwards and the nearly-clean mix.
#[test]
fn magi_distill_walk_matches_upstream() {
    walk_matches("distill", false);
}

/// The same walk with MotionCache on but never reusing (thresholds 0, upstream's
/// semantics: the default, not the reference's).
#[test]
fn magi_distill_walk_with_idle_motioncache_matches_upstream() {
    walk_matches("distill", true);
}

/// The base model's walk with three-pass guidance and its per-t scales.
#[test]
fn magi_base_walk_matches_upstream() {
    walk_matches("base", false);
}

/// A MAGI-1 directory's files are located from its config; each missing or unsupported
/// piece is an error that names the file or setting; the pipeline recognises the layout.
#[test]
fn magi_directory_layout_and_errors() {
    use motioncache::model::magi::{MagiFiles, is_magi_dir};
    let root = std::env::temp_dir().join(format!("mc-magi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("dit/config.json")).unwrap())
            .unwrap();
    let write = |cfg: &serde_json::Value| {
        std::fs::write(root.join("config.json"), cfg.to_string()).unwrap();
    };
    cfg["runtime_config"]["load"] = dir().join("dit").display().to_string().into();
    write(&cfg);
    assert!(is_magi_dir(&root));
    assert!(!is_magi_dir(
        &common::repo().join("tests/fixtures/core/dit_a")
    ));
    let e = MagiFiles::locate(&root).unwrap_err().to_string();
    assert!(e.contains("vae") && e.contains("vae_pretrained"), "{e}");
    cfg["runtime_config"]["vae_pretrained"] = dir().join("vae").display().to_string().into();
    write(&cfg);
    let e = MagiFiles::locate(&root).unwrap_err().to_string();
    assert!(e.contains("t5") && e.contains("t5_pretrained"), "{e}");
    // Upstream's T5Embedder layout: `t5_pretrained/t5-v1_1-xxl/`.
    std::fs::create_dir_all(root.join("t5/t5-v1_1-xxl")).unwrap();
    std::fs::write(root.join("t5/t5-v1_1-xxl/config.json"), "{}").unwrap();
    let e = MagiFiles::locate(&root).unwrap_err().to_string();
    assert!(e.contains("special_tokens.npz"), "{e}");
    std::fs::copy(
        dir().join("special_tokens.npz"),
        root.join("special_tokens.npz"),
    )
    .unwrap();
    let m = MagiFiles::locate(&root).unwrap();
    assert_eq!(m.dit_weights.len(), 1);
    assert!(m.vae_dir.ends_with("vae") && m.t5_dir.ends_with("t5/t5-v1_1-xxl"));
    // The pipeline loads it as MAGI-1: here the T5 folder has no tokenizer, named.
    let e = motioncache::pipeline::Pipeline::load(&root, &common::device(), DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("spiece.model") && e.contains("t5-v1_1-xxl"),
        "{e}"
    );
    // Weights that are not there, fp8 checkpoints and SkyReels configs are refused by name.
    cfg["runtime_config"]["load"] = root.join("nowhere").display().to_string().into();
    write(&cfg);
    let e = load_dit(&root, DType::F32, &common::device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("nowhere") && e.contains("inference_weight"),
        "{e}"
    );
    cfg["engine_config"]["fp8_quant"] = true.into();
    write(&cfg);
    let e = MagiFiles::locate(&root).unwrap_err().to_string();
    assert!(e.contains("fp8") && e.contains("config.json"), "{e}");
    let sky = common::repo().join("tests/fixtures/core/dit_a");
    let e = load_dit(&sky, DType::F32, &common::device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("not a MAGI-1 config") && e.contains("dit_a"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// The DiT in bf16 (upstream's inference dtype; norms, embedders and the output
/// projection stay f32): the first recorded forwards within bf16 rounding of upstream's f32.
#[test]
fn magi_dit_runs_in_bf16() {
    let dev = common::device();
    let (_, dit) = load_dit(&dir().join("dit"), DType::BF16, &dev).unwrap();
    let fx = candle_core::safetensors::load(dir().join("dit_forwards.safetensors"), &dev).unwrap();
    for i in [0, 4] {
        let get = |n: &str| fx[&format!("call{i}.{n}")].clone();
        let t: Vec<f64> = get("t").to_dtype(DType::F64).unwrap().to_vec2().unwrap()[0].clone();
        let kv: Vec<Vec<i64>> = get("kv_range").to_vec2().unwrap();
        let kv: Vec<(usize, usize)> = kv.iter().map(|r| (r[0] as usize, r[1] as usize)).collect();
        let inp = MagiInput {
            x: &get("x"),
            t: &t,
            captions: &get("y").squeeze(1).unwrap(),
            caption_mask: &get("xattn_mask").squeeze(1).unwrap(),
            null_condition: false,
            kv_range: &kv,
            slice_point: 0,
            chunk_offset: 0,
            num_steps: 8,
            distill_interval: Some(1.0),
            cancel: None,
            tokens: None,
        };
        let out = dit.forward(&inp, None).unwrap();
        let e = rel_l2(&out, &get("out"));
        assert!(e <= 3e-2, "call {i} in bf16: rel L2 {e:.2e}");
    }
}
