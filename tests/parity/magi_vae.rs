//! Parity of the MAGI-1 ViT VAE with the upstream code (SandAI-org/MAGI-1 run on the CPU;
//! fixtures: tools/fixtures/magi_vae.py): whole decodes, decodes through the upstream
//! tiling (`VaeHelper.decode` -> `TileProcessor.tiled_decode`), whole and tiled encodes,
//! on a tiny random model saved under the upstream names in the published layout.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use motioncache::model::magi::vae::{MagiVae, MagiVaeTiling};

use crate::common::{self, rel_l2};

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/magi")
}

struct Fx {
    vae: MagiVae,
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn fixtures() -> Fx {
    let dev = common::device();
    let vae = MagiVae::load(&dir().join("vae"), DType::F32, &dev).unwrap();
    let tensors = candle_core::safetensors::load(dir().join("vae_io.safetensors"), &dev).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir().join("vae_io.json")).unwrap()).unwrap();
    Fx { vae, tensors, meta }
}

impl Fx {
    fn io(&self, case: &str) -> (Tensor, Tensor) {
        (
            self.tensors[&format!("{case}.input")].clone(),
            self.tensors[&format!("{case}.output")].clone(),
        )
    }

    fn tiling(&self, case: &str) -> MagiVaeTiling {
        let kw = &self.meta["cases"][case]["kwargs"];
        let u = |k: &str| kw[k].as_u64().unwrap() as usize;
        let f = |k: &str| kw[k].as_f64().unwrap();
        assert!(kw["allow_spatial_tiling"].as_bool().unwrap());
        MagiVaeTiling {
            tile_sample_min_height: u("tile_sample_min_height"),
            tile_sample_min_width: u("tile_sample_min_width"),
            tile_sample_min_length: u("tile_sample_min_length"),
            spatial_tile_overlap_factor: f("spatial_tile_overlap_factor"),
            temporal_tile_overlap_factor: f("temporal_tile_overlap_factor"),
        }
    }
}

fn check(case: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{case}: shape");
    let e = rel_l2(got, want);
    eprintln!("{case}: rel L2 {e:.3e}");
    assert!(e <= TOL, "{case}: rel L2 {e:.3e} > {TOL:e}");
}

#[test]
fn magi_vae_decode_matches_upstream() {
    let fx = fixtures();
    for case in ["decode_whole", "decode_image"] {
        let (z, want) = fx.io(case);
        check(case, &fx.vae.decode(&z).unwrap(), &want);
    }
}

#[test]
fn magi_vae_tiled_decode_matches_upstream() {
    let fx = fixtures();
    for case in ["decode_tiled", "decode_tiled_t"] {
        let (z, want) = fx.io(case);
        let tiling = fx.tiling(case);
        let got = fx.vae.decode_tiled(&z, &tiling).unwrap();
        check(case, &got, &want);
        // the tiling matters: a whole decode is far from the reference
        let whole = fx.vae.decode(&z).unwrap();
        let n = 16;
        let e = rel_l2(
            &whole.narrow(2, 0, n).unwrap(),
            &want.narrow(2, 0, n).unwrap(),
        );
        assert!(
            e > 0.05,
            "{case}: whole decode too close to tiled ({e:.3e})"
        );
    }
}

#[test]
fn magi_vae_encode_matches_upstream() {
    let fx = fixtures();
    for case in ["encode_whole", "encode_image"] {
        let (x, want) = fx.io(case);
        check(case, &fx.vae.encode(&x).unwrap(), &want);
    }
    let (x, want) = fx.io("encode_tiled");
    let tiling = fx.tiling("encode_tiled");
    check(
        "encode_tiled",
        &fx.vae.encode_tiled(&x, &tiling).unwrap(),
        &want,
    );
}

#[test]
fn magi_vae_pipeline_tiling_and_load_errors() {
    let t = MagiVaeTiling::pipeline(24);
    assert_eq!(
        (t.tile_sample_min_height, t.tile_sample_min_length),
        (256, 12)
    );
    let err = MagiVae::load(&dir(), DType::F32, &candle_core::Device::Cpu)
        .err()
        .expect("a folder without config.json must fail");
    assert!(err.to_string().contains("config.json"), "{err}");
}
