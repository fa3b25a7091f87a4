//! Parity of the core generator with diffusers (fixtures: tools/fixtures/core.py).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp, Tensor};
use motioncache::cache::{CacheMode, CacheSettings};
use motioncache::generate::{Generator, GeneratorSettings, NoiseSource};
use motioncache::model::loader::load_transformer;
use motioncache::model::{Transformer, TransformerConfig};
use motioncache::schedule::{FlowSchedule, SchedulerConfig, StepMatrix, UniPcState};

use crate::common::{self, rel_l2};

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/core")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &common::device()).expect("fixture")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn model(name: &str) -> Arc<Transformer> {
    Arc::new(load_transformer(&dir().join(name), DType::F32, &common::device()).unwrap())
}

/// Runs a window through the per-block path: causal blocks of `bs` frames attend to the
/// blocks before them through the K/V cache; `bs == frames` is one bidirectional group.
fn blockwise_forward(
    m: &Transformer,
    x: &Tensor,
    t: &[f64],
    ctx: &Tensor,
    bs: usize,
    fps: u32,
) -> Tensor {
    let (_, f, h, w) = x.dims4().unwrap();
    let (gf, gh, gw) = m.grid(bs, h, w).unwrap();
    let c = m.context(ctx).unwrap();
    let mut kvs = Vec::new();
    let mut outs = Vec::new();
    for b in 0..f / bs {
        let xb = x.narrow(1, b * bs, bs).unwrap();
        let tok = m.patchify(&xb).unwrap();
        let md = m.modulation(&t[b * bs..(b + 1) * bs], fps).unwrap();
        let toks = m.all_tokens(b * gf, gf, gh, gw).unwrap();
        let refs: Vec<_> = kvs.iter().collect();
        let prefix = motioncache::model::transformer::BlockKv::concat(&refs).unwrap();
        let mut kv = None;
        let y = m
            .forward_layers(&tok, &md, &toks, &mut kv, prefix.as_ref(), &c)
            .unwrap();
        outs.push(m.head(&y, &md.temb, (gf, gh, gw)).unwrap());
        kvs.push(kv.unwrap());
    }
    Tensor::cat(&outs, 1).unwrap()
}

#[test]
fn configs_of_both_layouts_agree() {
    let b = TransformerConfig::from_file(&dir().join("dit_b/config.json")).unwrap();
    let o = TransformerConfig::from_file(&dir().join("dit_b_original/config.json")).unwrap();
    assert_eq!(b, o);
    assert!(b.inject_sample_info);
}

/// Runs the forward fixture `forward_{name}` through `dir`'s transformer as diffusers did;
/// returns the output and diffusers'.
fn fixture_forward(name: &str, dir: &str) -> (Tensor, Tensor) {
    let fx = load(&format!("forward_{name}.safetensors"));
    let meta = json(&format!("forward_{name}.json"));
    let bs = meta["causal_block_size"].as_u64().unwrap() as usize;
    let fps = meta["fps_class"].as_u64().unwrap() as u32;
    let x = fx["hidden_states"].i(0).unwrap();
    let t: Vec<f64> = fx["timestep"]
        .i(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    // diffusers applies the block-causal mask only for blocks larger than one frame.
    let group = if bs > 1 { bs } else { x.dim(1).unwrap() };
    let y = blockwise_forward(&model(dir), &x, &t, &fx["context"], group, fps);
    (y, fx["output"].i(0).unwrap())
}

#[test]
fn forward_matches_diffusers() {
    for (name, dirs) in [("a", vec!["dit_a"]), ("b", vec!["dit_b", "dit_b_original"])] {
        for d in dirs {
            let (y, expected) = fixture_forward(name, d);
            let e = rel_l2(&y, &expected);
            assert!(e <= 1e-4, "{d}: forward relative error {e}");
        }
    }
}

/// The transformer on the code paths a GPU takes (generic attention in query chunks, candle's
/// GELU), forced on the CPU: the same diffusers forward.
#[test]
fn device_paths_forward_matches_diffusers() {
    motioncache::model::kernels::force_device_paths(Some(4096));
    let (y, expected) = fixture_forward("b", "dit_b");
    motioncache::model::kernels::force_device_paths(None);
    let e = rel_l2(&y, &expected);
    assert!(e <= 1e-4, "device-path forward relative error {e}");
}

#[test]
fn unipc_matches_diffusers() {
    let fx = load("scheduler.safetensors");
    for case in json("scheduler.json").as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let shift = case["shift"].as_f64().unwrap();
        let s = FlowSchedule::new(&SchedulerConfig::default(), steps, shift).unwrap();
        let ts: Vec<f32> = fx[&format!("{key}_timesteps")].to_vec1().unwrap();
        assert_eq!(
            s.timesteps,
            ts.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            "{key} timesteps"
        );
        let sig: Vec<f32> = fx[&format!("{key}_sigmas")].to_vec1().unwrap();
        for (a, b) in s.sigmas.iter().zip(&sig) {
            assert!((a - b).abs() <= 1e-6, "{key} sigmas {a} vs {b}");
        }
        let mut x = fx[&format!("{key}_x0")].clone();
        let mut st = UniPcState::new();
        for i in 0..steps {
            let v = fx[&format!("{key}_model_outputs")].i(i).unwrap();
            x = st.step(&s, &v, s.timesteps[i], &x).unwrap();
            let want = fx[&format!("{key}_samples")].i(i).unwrap();
            let e = rel_l2(&x, &want);
            assert!(e <= 1e-4, "{key} step {i}: relative error {e}");
        }
    }
}

#[test]
fn step_matrix_matches_diffusers() {
    for case in json("step_matrix.json").as_array().unwrap() {
        let g = |k: &str| case[k].as_u64().unwrap() as usize;
        let bs = g("causal_block_size");
        let ts: Vec<i64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let m = StepMatrix::new(
            g("num_latent_frames") / bs,
            g("steps"),
            g("base") / bs,
            g("ar_step"),
            g("pre_ready") / bs,
        )
        .unwrap();
        let want_t = case["step_matrix"].as_array().unwrap();
        let want_u = case["update_mask"].as_array().unwrap();
        let want_v = case["valid_interval"].as_array().unwrap();
        assert_eq!(m.iterations(), want_t.len(), "{case}");
        for it in 0..m.iterations() {
            let (t, u) = m.frame_rows(it, bs, &ts);
            let wt: Vec<i64> = want_t[it]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let wu: Vec<bool> = want_u[it]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() != 0)
                .collect();
            assert_eq!(t, wt, "timesteps row {it}");
            assert_eq!(u, wu, "update row {it}");
            let (a, b) = m.valid[it];
            let wv = want_v[it].as_array().unwrap();
            assert_eq!((a * bs) as u64, wv[0].as_u64().unwrap());
            assert_eq!(
                (b * bs) as u64,
                wv[1].as_u64().unwrap().min(g("num_latent_frames") as u64)
            );
        }
    }
}

fn run(name: &str, mode: CacheMode) -> (Tensor, Tensor) {
    let runs = json("runs.json");
    let r = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap();
    let fx = load("runs.safetensors");
    let g = |k: &str| r[k].as_u64().unwrap() as usize;
    let m = model(&format!("dit_{}", r["model"].as_str().unwrap()));
    let expected = fx[&format!("{name}_latents")].clone();
    let (c, _, h, w) = expected.dims4().unwrap();
    let segments: VecDeque<Tensor> = (0..g("segments"))
        .map(|i| fx[&format!("{name}_noise{i}")].clone())
        .collect();
    let settings = GeneratorSettings {
        steps: g("steps"),
        shift: 8.0,
        guidance_scale: r["guidance"].as_f64().unwrap(),
        causal_block_size: g("block"),
        ar_step: g("ar_step"),
        window: g("base"),
        overlap: g("overlap"),
        addnoise_condition: 0.0,
        fps_class: if g("fps") == 16 { 0 } else { 1 },
        total_frames: Some(g("frames")),
        cache: CacheSettings::with_mode(mode),
    };
    let mut generator = Generator::new(
        m,
        SchedulerConfig::default(),
        settings,
        &fx[&format!("{name}_context")],
        Some(&fx[&format!("{name}_negative")]),
        (c, h, w),
        NoiseSource::Explicit { segments, seed: 0 },
    )
    .unwrap();
    let cancel = AtomicBool::new(false);
    let mut blocks = Vec::new();
    while let Some(b) = generator.next_block(&cancel).unwrap() {
        assert_eq!(b.stats.index, blocks.len(), "blocks come in order");
        blocks.push(b.latents);
    }
    (Tensor::cat(&blocks, 1).unwrap(), expected)
}

#[test]
fn df_runs_match_diffusers_exact_and_vanilla() {
    for name in ["sync", "async", "long", "noncausal"] {
        for mode in [CacheMode::None, CacheMode::Vanilla] {
            let (got, want) = run(name, mode);
            let e = rel_l2(&got, &want);
            assert!(e <= 1e-4, "{name} {mode:?}: relative error {e}");
        }
    }
}

/// Sharded weights (an index json listing several safetensors files) load to the same
/// model; bf16 and f16 run close to f32.
#[test]
fn sharded_weights_and_half_precision() {
    let tmp = std::env::temp_dir().join(format!("mc-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir().join("dit_b/config.json"), tmp.join("config.json")).unwrap();
    let all = candle_core::safetensors::load(
        dir().join("dit_b/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let tensors: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, tmp.join(&file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        tmp.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let fx = load("forward_b.safetensors");
    let x = fx["hidden_states"].i(0).unwrap();
    let t: Vec<f64> = fx["timestep"]
        .i(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let want = fx["output"].i(0).unwrap();
    let sharded = load_transformer(&tmp, DType::F32, &Device::Cpu).unwrap();
    let y = blockwise_forward(&sharded, &x, &t, &fx["context"], 3, 0);
    assert!(rel_l2(&y, &want) <= 1e-4, "sharded: {}", rel_l2(&y, &want));
    for (dt, tol) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let m = load_transformer(&dir().join("dit_b"), dt, &Device::Cpu).unwrap();
        let y = blockwise_forward(&m, &x, &t, &fx["context"], 3, 0);
        let e = rel_l2(&y, &want);
        assert!(e <= tol, "{dt:?}: relative error {e}");
    }
    // A shard listed in the index but missing is an error naming it.
    std::fs::remove_file(tmp.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let e = load_transformer(&tmp, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("00002-of-00002") && e.contains("missing"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}
