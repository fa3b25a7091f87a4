//! Parity of the Wan 2.1 VAE (`motioncache::model::vae`) with diffusers' AutoencoderKLWan,
//! on the random tiny fixtures written by `tools/fixtures/vae.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::vae::{WanVae, WanVaeConfig, original_vae_name};

use crate::common::{self, rel_l2};

fn case_dir(case: &str) -> PathBuf {
    common::repo().join("tests/fixtures/vae").join(case)
}

fn config(case: &str) -> WanVaeConfig {
    WanVaeConfig::from_json_file(&case_dir(case).join("config.json")).expect("config")
}

fn io(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join("io.safetensors"), &common::device())
        .expect("io.safetensors")
}

fn weights(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        case_dir(case).join("diffusion_pytorch_model.safetensors"),
        &common::device(),
    )
    .expect("weights")
}

fn load(case: &str, dtype: DType) -> WanVae {
    let vb = VarBuilder::from_tensors(weights(case), dtype, &common::device());
    WanVae::new(&config(case), vb).expect("WanVae::new")
}

const CASES: [&str; 2] = ["no_tdown", "tdown"];
const F32_TOL: f64 = 1e-4;

#[test]
fn encode_matches_diffusers() {
    for case in CASES {
        let vae = load(case, DType::F32);
        let io = io(case);
        let mode = vae.encode(&io["video"]).unwrap();
        let err = rel_l2(&mode, &io["latent_mode"]);
        eprintln!("{case}: encode rel L2 {err:.2e}");
        assert!(err <= F32_TOL, "{case}: encode rel L2 {err}");
    }
}

#[test]
fn decode_matches_diffusers() {
    for case in CASES {
        let vae = load(case, DType::F32);
        let io = io(case);
        let out = vae.decode(&io["z"]).unwrap();
        let err = rel_l2(&out, &io["decoded"]);
        eprintln!("{case}: decode rel L2 {err:.2e}");
        assert!(err <= F32_TOL, "{case}: decode rel L2 {err}");
    }
}

/// The code paths a GPU takes (tensor-op im2col in tiles of a bounded size, see
/// `kernels::force_device_paths`) run here on the CPU with tiles of 4,096 elements, so that
/// every convolution is cut into many tiles: encode and decode still match diffusers.
#[test]
fn device_paths_with_small_tiles_match_diffusers() {
    motioncache::model::kernels::force_device_paths(Some(4096));
    for case in CASES {
        let vae = load(case, DType::F32);
        let io = io(case);
        let out = vae.decode(&io["z"]).unwrap();
        let err = rel_l2(&out, &io["decoded"]);
        assert!(
            err <= F32_TOL,
            "{case}: tiled device-path decode rel L2 {err}"
        );
        let mode = vae.encode(&io["video"]).unwrap();
        let err = rel_l2(&mode, &io["latent_mode"]);
        assert!(
            err <= F32_TOL,
            "{case}: tiled device-path encode rel L2 {err}"
        );
    }
    motioncache::model::kernels::force_device_paths(None);
}

/// Every chunk against its frames of diffusers' whole decode, then again after `reset`.
#[test]
fn stream_decode_matches_whole_decode() {
    let chunkings: [(&str, &[&[usize]]); 2] = [
        ("no_tdown", &[&[3, 3, 3], &[1, 2, 3, 3], &[1; 9], &[9]]),
        ("tdown", &[&[1, 3], &[2, 2], &[1, 1, 1, 1], &[4]]),
    ];
    for (case, splits) in chunkings {
        let vae = load(case, DType::F32);
        let cfg = vae.config().clone();
        let io = io(case);
        let (z, reference) = (&io["z"], &io["decoded"]);
        let mut stream = vae.stream_decoder();
        for (pass, split) in splits.iter().enumerate() {
            if pass > 0 {
                stream.reset();
            }
            let (mut latent_start, mut pixel_start) = (0, 0);
            let mut chunks = Vec::new();
            for &n in split.iter() {
                let out = stream
                    .decode_next(&z.narrow(2, latent_start, n).unwrap())
                    .unwrap();
                let frames = cfg.pixel_frames(latent_start + n) - pixel_start;
                assert_eq!(
                    out.dim(2).unwrap(),
                    frames,
                    "{case} {split:?}: frames of a chunk"
                );
                let expected = reference.narrow(2, pixel_start, frames).unwrap();
                let err = rel_l2(&out, &expected);
                assert!(
                    err <= F32_TOL,
                    "{case} {split:?}: chunk at {latent_start}: {err}"
                );
                latent_start += n;
                pixel_start += frames;
                chunks.push(out);
            }
            assert_eq!(stream.latent_frames_decoded(), z.dim(2).unwrap());
            let all = Tensor::cat(&chunks, 2).unwrap();
            let err = rel_l2(&all, reference);
            eprintln!("{case} {split:?}: stream decode rel L2 {err:.2e}");
            assert!(err <= F32_TOL, "{case} {split:?}: {err}");
        }
    }
}

#[test]
fn original_pth_names_load() {
    let case = "tdown";
    let cfg = config(case);
    let vb = VarBuilder::from_pth(
        case_dir(case).join("original.pth"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("original.pth");
    let vae = WanVae::new_original(&cfg, vb).expect("new_original");
    let io = io(case);
    let err = rel_l2(&vae.decode(&io["z"]).unwrap(), &io["decoded"]);
    assert!(err <= F32_TOL, "original names decode: {err}");
    let err = rel_l2(&vae.encode(&io["video"]).unwrap(), &io["latent_mode"]);
    assert!(err <= F32_TOL, "original names encode: {err}");
}

/// Names as diffusers' own converter (`convert_wan_vae_to_diffusers`) maps them for the
/// real Wan 2.1 VAE.
#[test]
fn original_names_of_the_real_layout() {
    let cfg = WanVaeConfig::default();
    let pairs = [
        ("quant_conv.weight", "conv1.weight"),
        ("post_quant_conv.bias", "conv2.bias"),
        ("encoder.conv_in.weight", "encoder.conv1.weight"),
        (
            "encoder.down_blocks.2.resample.1.weight",
            "encoder.downsamples.2.resample.1.weight",
        ),
        (
            "encoder.down_blocks.3.conv_shortcut.bias",
            "encoder.downsamples.3.shortcut.bias",
        ),
        (
            "encoder.down_blocks.0.norm2.gamma",
            "encoder.downsamples.0.residual.3.gamma",
        ),
        (
            "encoder.mid_block.resnets.1.conv2.weight",
            "encoder.middle.2.residual.6.weight",
        ),
        (
            "encoder.mid_block.attentions.0.to_qkv.weight",
            "encoder.middle.1.to_qkv.weight",
        ),
        ("encoder.norm_out.gamma", "encoder.head.0.gamma"),
        ("decoder.conv_out.bias", "decoder.head.2.bias"),
        (
            "decoder.up_blocks.0.resnets.2.conv1.weight",
            "decoder.upsamples.2.residual.2.weight",
        ),
        (
            "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            "decoder.upsamples.4.shortcut.weight",
        ),
        (
            "decoder.up_blocks.1.upsamplers.0.time_conv.bias",
            "decoder.upsamples.7.time_conv.bias",
        ),
        (
            "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
            "decoder.upsamples.11.resample.1.weight",
        ),
        (
            "decoder.up_blocks.3.resnets.1.norm1.gamma",
            "decoder.upsamples.13.residual.0.gamma",
        ),
    ];
    for (diffusers, original) in pairs {
        assert_eq!(original_vae_name(&cfg, diffusers), original, "{diffusers}");
    }
}

#[test]
fn wrong_shaped_or_missing_weight_is_an_error() {
    let case = "no_tdown";
    let cfg = config(case);
    let name = "decoder.up_blocks.1.resnets.0.conv1.weight";
    let mut ws = weights(case);
    let bad = Tensor::zeros((3, 3, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    ws.insert(name.to_string(), bad);
    let err = WanVae::new(&cfg, VarBuilder::from_tensors(ws, DType::F32, &Device::Cpu))
        .expect_err("wrong shape must fail");
    assert!(err.to_string().contains("shape"), "{err}");

    let mut ws = weights(case);
    ws.remove(name);
    let err = WanVae::new(&cfg, VarBuilder::from_tensors(ws, DType::F32, &Device::Cpu))
        .expect_err("missing weight must fail");
    assert!(err.to_string().contains("conv1"), "{err}");

    // A config that does not match the weights: also an error, not a panic.
    let mut other = cfg.clone();
    other.base_dim = 16;
    assert!(
        WanVae::new(
            &other,
            VarBuilder::from_tensors(weights(case), DType::F32, &Device::Cpu)
        )
        .is_err()
    );
}

#[test]
fn bad_inputs_are_errors() {
    let vae = load("tdown", DType::F32);
    let dev = Device::Cpu;
    // spatial size not a multiple of 8
    let video = Tensor::zeros((1, 3, 5, 12, 16), DType::F32, &dev).unwrap();
    assert!(vae.encode(&video).is_err());
    let z = Tensor::zeros((1, 3, 2, 4, 4), DType::F32, &dev).unwrap();
    assert!(vae.decode(&z).is_err());
    let mut stream = vae.stream_decoder();
    assert!(stream.decode_next(&z).is_err());
}

#[test]
fn half_precision_decodes_close_to_f32() {
    for (dtype, tol) in [(DType::BF16, 4e-2), (DType::F16, 5e-3)] {
        for case in CASES {
            let vae = load(case, dtype);
            let io = io(case);
            let out = vae.decode(&io["z"]).unwrap();
            assert_eq!(out.dtype(), dtype);
            let err = rel_l2(&out, &io["decoded"]);
            let enc_err = rel_l2(&vae.encode(&io["video"]).unwrap(), &io["latent_mode"]);
            eprintln!("{case} {dtype:?}: decode rel L2 {err:.2e}, encode {enc_err:.2e}");
            assert!(
                err <= tol && enc_err <= tol,
                "{case} {dtype:?}: {err} {enc_err}"
            );
        }
    }
}

#[test]
fn config_parsing_and_rejections() {
    let cfg = config("tdown");
    assert_eq!(cfg.temporal_compression(), 4);
    assert_eq!(cfg.spatial_compression(), 8);
    assert_eq!(cfg.latent_frames(13), 4);
    assert_eq!(cfg.latent_frames(14), 4);
    assert_eq!(cfg.pixel_frames(4), 13);
    let flat = config("no_tdown");
    assert_eq!(
        (flat.temporal_compression(), flat.spatial_compression()),
        (1, 4)
    );
    assert_eq!((flat.latent_frames(9), flat.pixel_frames(9)), (9, 9));

    let default: WanVaeConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(default, WanVaeConfig::default());
    assert_eq!(default.latents_std.len(), 16);

    let wan22: WanVaeConfig = serde_json::from_str(r#"{"is_residual": true}"#).unwrap();
    assert!(
        wan22
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is_residual")
    );
    let patch: WanVaeConfig = serde_json::from_str(r#"{"patch_size": 2}"#).unwrap();
    assert!(
        patch
            .validate()
            .unwrap_err()
            .to_string()
            .contains("patch_size")
    );
    let short: WanVaeConfig =
        serde_json::from_str(r#"{"dim_mult": [1, 2, 4, 4], "temperal_downsample": [true]}"#)
            .unwrap();
    assert!(short.validate().is_err());
}

#[test]
fn latent_normalisation_is_the_pipelines() {
    let vae = load("tdown", DType::F32);
    let cfg = vae.config().clone();
    let z = io("tdown")["z"].clone();
    let norm = vae.normalize_latents(&z).unwrap();
    let back = vae.denormalize_latents(&norm).unwrap();
    assert!(rel_l2(&back, &z) < 1e-6);
    // channel 3: (z - mean) / std
    let zc = z.narrow(1, 3, 1).unwrap();
    let expected = ((zc - cfg.latents_mean[3]).unwrap() / cfg.latents_std[3]).unwrap();
    assert!(rel_l2(&norm.narrow(1, 3, 1).unwrap(), &expected) < 1e-6);
}

/// Decoding speed at 64x64 for a tiny-model-sized VAE (base_dim 16, z_dim 4, dim_mult
/// [1,2,2], no temporal compression). Run with
/// `cargo test --release --test parity -- --ignored --nocapture decode_speed`.
#[test]
#[ignore]
fn decode_speed() {
    let cfg: WanVaeConfig = serde_json::from_str(
        r#"{"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2, 2], "temperal_downsample": [false, false],
            "latents_mean": [0, 0, 0, 0], "latents_std": [1, 1, 1, 1]}"#,
    )
    .unwrap();
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vae0 = WanVae::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    drop(vae0);
    let mut ws = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = (Tensor::randn(0f32, 1.0, var.shape(), &dev).unwrap() * 0.05).unwrap();
        ws.insert(name.clone(), t);
    }
    // The machine's matmul rate at the same moment, to read the numbers against.
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &dev).unwrap();
    a.matmul(&a).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..5 {
        a.matmul(&a).unwrap();
    }
    let gflops = 5.0 * 2.0 * 1024f64.powi(3) / start.elapsed().as_secs_f64() / 1e9;
    eprintln!("f32 matmul 1024^3: {gflops:.0} GFLOP/s");
    for dtype in [DType::F32, DType::BF16] {
        let vae = WanVae::new(&cfg, VarBuilder::from_tensors(ws.clone(), dtype, &dev)).unwrap();
        for block in [3usize, 5] {
            let z = Tensor::randn(0f32, 1.0, (1, 4, block, 16, 16), &dev).unwrap();
            let mut stream = vae.stream_decoder();
            stream.decode_next(&z).unwrap();
            let reps = 5;
            let start = std::time::Instant::now();
            let mut frames = 0;
            for _ in 0..reps {
                frames += stream.decode_next(&z).unwrap().dim(2).unwrap();
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / frames as f64;
            eprintln!("{dtype:?}: blocks of {block} latent frames at 64x64: {ms:.2} ms per frame");
        }
        let video = Tensor::randn(0f32, 0.5, (1, 3, 9, 64, 64), &dev).unwrap();
        let start = std::time::Instant::now();
        vae.encode(&video).unwrap();
        let ms = start.elapsed().as_secs_f64() * 1e3 / 9.0;
        eprintln!("{dtype:?}: encode 9 frames at 64x64: {ms:.2} ms per frame");
    }
}
