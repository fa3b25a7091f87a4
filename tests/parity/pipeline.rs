//! A whole tiny random pipeline directory (diffusers `save_pretrained`) loaded by the Rust
//! pipeline reproduces diffusers' RGB frames (fixtures: tools/fixtures/pipeline.py).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use motioncache::cache::{CacheMode, CacheSettings};
use motioncache::generate::{GeneratorSettings, NoiseSource};
use motioncache::pipeline::Pipeline;

use crate::common::{self, rel_l2};

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/pipeline")
}

#[test]
fn rgb_frames_match_diffusers() {
    let p = Pipeline::load(&dir().join("tiny_random"), &common::device(), DType::F32).unwrap();
    check_against_diffusers(p, &dir(), &[CacheMode::None, CacheMode::Vanilla]);
}

/// The same pipeline in the original SkyReels-V2 layout (config.json + model.safetensors,
/// Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/tokenizer.json, written
/// by tools/fixtures/original_layout.py) gives diffusers' frames too.
#[test]
fn original_layout_matches_diffusers() {
    let d = dir().join("tiny_original");
    assert!(!d.join("model_index.json").exists() && d.join("Wan2.1_VAE.pth").is_file());
    let p = Pipeline::load(&d, &Device::Cpu, DType::F32).unwrap();
    check_against_diffusers(p, &dir(), &[CacheMode::None]);
}

/// The embedded default model (models/tiny) gives diffusers' frames (fixtures:
/// tools/fixtures/tiny_model.py, to be re-run after every export of the model).
#[test]
fn embedded_model_matches_diffusers() {
    let fx = common::repo().join("tests/fixtures/tiny_model");
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("runs.json")).unwrap()).unwrap();
    let weights = std::fs::read(
        common::repo().join("models/tiny/transformer/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        runs["transformer_fnv1a64"].as_str().unwrap(),
        format!("{:016x}", fnv1a64(&weights)),
        "tests/fixtures/tiny_model was made for another export of models/tiny: \
         run tools/fixtures/tiny_model.py"
    );
    let p = Pipeline::load_embedded(&common::device(), DType::F32).unwrap();
    check_against_diffusers(p, &fx, &[CacheMode::None, CacheMode::Vanilla]);
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs every run of `fixtures/runs.json` from its recorded initial noise and compares the
/// RGB frames with diffusers' (`fixtures/outputs.safetensors`).
fn check_against_diffusers(p: Pipeline, fixtures: &Path, modes: &[CacheMode]) {
    let p = Arc::new(p);
    let size = (p.info().width, p.info().height);
    let fx =
        candle_core::safetensors::load(fixtures.join("outputs.safetensors"), p.device()).unwrap();
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("runs.json")).unwrap())
            .unwrap();
    let runs = runs.get("runs").unwrap_or(&runs);
    let model = &p.info().name;
    for r in runs.as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let g = |k: &str| r[k].as_u64().unwrap() as usize;
        for &mode in modes {
            let settings = GeneratorSettings {
                steps: g("steps"),
                // diffusers sampled with the directory's scheduler, whose flow_shift the
                // loader reads (motioncache.json must agree with it).
                shift: p.info().defaults.shift,
                guidance_scale: r["guidance"].as_f64().unwrap(),
                causal_block_size: g("block"),
                ar_step: g("ar_step"),
                window: g("frames"),
                overlap: 0,
                addnoise_condition: 0.0,
                fps_class: 1,
                total_frames: Some(g("frames")),
                cache: CacheSettings::with_mode(mode),
            };
            let cond = p.encode_prompt(r["prompt"].as_str().unwrap()).unwrap();
            let neg = p.encode_prompt(r["negative"].as_str().unwrap()).unwrap();
            let noise = NoiseSource::Explicit {
                segments: VecDeque::from([fx[&format!("{name}_noise")].clone()]),
                seed: 0,
            };
            let mut s = p
                .stream_with_contexts(&cond, &neg, settings, noise, size)
                .unwrap();
            let cancel = AtomicBool::new(false);
            let mut parts = Vec::new();
            let mut rgb = 0;
            while let Some(b) = s.next_block(&cancel).unwrap() {
                assert_eq!(b.frames.len(), b.video.dim(1).unwrap());
                assert_eq!(b.frames[0].len(), b.width * b.height * 3);
                rgb += b.frames.len();
                parts.push(b.video);
            }
            // [3, T, H, W] in [-1, 1] -> [T, H, W, 3] in [0, 1], as diffusers' "np" output.
            let got = ((Tensor::cat(&parts, 1).unwrap() + 1.0).unwrap() / 2.0)
                .unwrap()
                .permute((1, 2, 3, 0))
                .unwrap();
            let want = &fx[&format!("{name}_frames")];
            assert_eq!(rgb, want.dim(0).unwrap());
            let e = rel_l2(&got, want);
            assert!(
                e <= 1e-3,
                "{model} {name} {mode:?}: pixel relative error {e}"
            );
        }
    }
}

#[test]
fn broken_model_directories_name_the_file() {
    let tmp = std::env::temp_dir().join(format!("mc-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&dir().join("tiny_random"), &tmp);
    let load = || {
        Pipeline::load(&tmp, &Device::Cpu, DType::F32)
            .err()
            .map(|e| e.to_string())
    };
    // Missing component config.
    std::fs::remove_file(tmp.join("vae/config.json")).unwrap();
    let e = load().unwrap();
    assert!(e.contains("vae/config.json"), "{e}");
    copy_dir(&dir().join("tiny_random"), &tmp);
    // Truncated weights.
    let w = tmp.join("transformer/diffusion_pytorch_model.safetensors");
    let data = std::fs::read(&w).unwrap();
    std::fs::write(&w, &data[..data.len() / 2]).unwrap();
    let e = load().unwrap();
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    copy_dir(&dir().join("tiny_random"), &tmp);
    // Weights that do not match the config.
    let c = tmp.join("transformer/config.json");
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("\"ffn_dim\": 48", "\"ffn_dim\": 50");
    std::fs::write(&c, text).unwrap();
    let e = load().unwrap();
    assert!(
        e.contains("transformer") && e.contains("config.json"),
        "{e}"
    );
    copy_dir(&dir().join("tiny_random"), &tmp);
    // Malformed JSON.
    std::fs::write(tmp.join("model_index.json"), "{ not json").unwrap();
    let e = load().unwrap();
    assert!(e.contains("model_index.json"), "{e}");
    // Not a model directory at all.
    let e = Pipeline::load(&tmp.join("nope"), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);

    // The original layout: a missing encoder, a VAE that does not match its configuration.
    let orig = std::env::temp_dir().join(format!("mc-broken-orig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&orig);
    copy_dir(&dir().join("tiny_original"), &orig);
    let load = || {
        Pipeline::load(&orig, &Device::Cpu, DType::F32)
            .err()
            .map(|e| e.to_string())
    };
    std::fs::remove_file(orig.join("models_t5_umt5-xxl-enc-bf16.pth")).unwrap();
    let e = load().unwrap();
    assert!(
        e.contains("models_t5_umt5-xxl-enc-bf16.pth") && e.contains("missing"),
        "{e}"
    );
    copy_dir(&dir().join("tiny_original"), &orig);
    // Without vae_config.json the loader expects the real Wan 2.1 VAE (z_dim 16).
    std::fs::remove_file(orig.join("vae_config.json")).unwrap();
    let e = load().unwrap();
    assert!(e.contains("Wan2.1_VAE.pth"), "{e}");
    let _ = std::fs::remove_dir_all(&orig);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

/// The embedded default model loads and generates frames of its size.
#[test]
fn embedded_model_generates() {
    let p = Arc::new(Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap());
    let info = p.info().clone();
    assert_eq!((info.width, info.height), (64, 64));
    let mut s = info.defaults.clone();
    s.total_frames = Some(2 * s.causal_block_size);
    let mut st = p
        .stream(
            "a red circle moving right on a striped blue background",
            "",
            s,
            1,
        )
        .unwrap();
    let cancel = AtomicBool::new(false);
    let mut n = 0;
    while let Some(b) = st.next_block(&cancel).unwrap() {
        assert_eq!(b.frames[0].len(), 64 * 64 * 3);
        n += b.frames.len();
    }
    assert!(n >= 6, "{n} frames");
}

/// A valid directory without a motioncache.json whose transformer makes causal blocks of 2
/// latent frames gets defaults consistent with it (the window in whole blocks, the overlap
/// whole blocks below it) and streams with them.
#[test]
fn a_directory_without_motioncache_json_gets_consistent_defaults() {
    let tmp = std::env::temp_dir().join(format!("mc-nojson-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&dir().join("tiny_random"), &tmp);
    std::fs::remove_file(tmp.join("motioncache.json")).unwrap();
    let cfg = tmp.join("transformer/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["num_frame_per_block"] = serde_json::json!(2);
    std::fs::write(&cfg, v.to_string()).unwrap();

    let p = Arc::new(Pipeline::load(&tmp, &Device::Cpu, DType::F32).unwrap());
    let d = p.info().defaults.clone();
    assert_eq!(d.causal_block_size, 2, "{d:?}");
    assert_eq!(d.window % 2, 0, "{d:?}");
    assert!(d.overlap < d.window && d.overlap.is_multiple_of(2), "{d:?}");
    // Two blocks of the default schedule at a small size, to keep the test short.
    let mut s = d.clone();
    s.total_frames = Some(2 * d.causal_block_size);
    let cond = p.encode_prompt("a red circle").unwrap();
    let neg = p.encode_prompt("").unwrap();
    let mut st = p
        .stream_with_contexts(&cond, &neg, s, NoiseSource::Seed(1), (32, 32))
        .unwrap();
    let cancel = AtomicBool::new(false);
    let mut blocks = 0;
    while st.next_block(&cancel).unwrap().is_some() {
        blocks += 1;
    }
    assert_eq!(blocks, 2);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Every value read from a model file that decides an allocation is range checked at load:
/// an out-of-range value is an error that names the file and the key, never an
/// out-of-memory abort or a panic (issue 17, item 3).
#[test]
fn out_of_range_values_in_model_files_name_the_file_and_key() {
    let base = std::env::temp_dir().join(format!("mc-ranges-{}", std::process::id()));
    let cases: &[(&str, &str, serde_json::Value)] = &[
        ("motioncache.json", "width", serde_json::json!(1_000_000)),
        ("motioncache.json", "window", serde_json::json!(100_000)),
        (
            "motioncache.json",
            "text_len",
            serde_json::json!(1u64 << 40),
        ),
        (
            "transformer/config.json",
            "rope_max_seq_len",
            serde_json::json!(1u64 << 40),
        ),
        (
            "transformer/config.json",
            "num_frame_per_block",
            serde_json::json!(0),
        ),
        ("vae/config.json", "base_dim", serde_json::json!(1u64 << 30)),
        ("vae/config.json", "latents_mean", serde_json::json!([0.0])),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            serde_json::json!(1u64 << 40),
        ),
    ];
    for (i, (file, key, value)) in cases.iter().enumerate() {
        let tmp = base.join(i.to_string());
        copy_dir(&dir().join("tiny_random"), &tmp);
        let path = tmp.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v[*key] = value.clone();
        std::fs::write(&path, v.to_string()).unwrap();
        let err = match Pipeline::load(&tmp, &Device::Cpu, DType::F32) {
            Ok(_) => panic!("{file}: {key} = {value} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(file) && err.contains(key),
            "{file}: {key} = {value}: the error does not name both: {err}"
        );
    }

    // A safetensors header whose offsets would overflow the size arithmetic.
    let tmp = base.join("offsets");
    copy_dir(&dir().join("tiny_random"), &tmp);
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[1],"data_offsets":[0,{}]}}}}"#,
        u64::MAX
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let weights = tmp.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::write(&weights, bytes).unwrap();
    let err = match Pipeline::load(&tmp, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("an overflowing safetensors header was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&base);
}
