//! MAGI-1 from prompt to pixels against upstream's text-to-video pipeline run on the CPU
//! (`tools/fixtures/magi_pipeline.py`): the tiny directories `tests/fixtures/magi/tiny`
//! (distill, one pass) and `tiny-base` (three passes) loaded through `Pipeline::load`, the
//! T5 caption, the walk of 8 chunks from the recorded noise (its key ranges let the walk
//! drop the oldest chunks: the result must not change), every chunk's latents as they
//! finish and its decoded frames, as floats and as upstream's uint8.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, IndexOp, Tensor};
use motioncache::model::magi::stream::{MagiStream, MagiStreamSettings};
use motioncache::model::magi::walk::WalkNoise;
use motioncache::pipeline::{ModelFamily, Pipeline, to_rgb24_truncated};

use crate::common::{self, rel_l2};

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/magi")
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("pipeline_io.safetensors"), &common::device())
        .expect("pipeline_io.safetensors")
}

fn run(group: &str, folder: &str) {
    let dev = common::device();
    let fx = fixtures();
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("pipeline_io.json")).expect("pipeline_io.json"),
    )
    .unwrap();
    let prompt = doc["prompt"].as_str().unwrap();
    let p = Pipeline::load(&dir().join(folder), &dev, DType::F32).expect("load");
    let info = p.info();
    assert_eq!(info.family, ModelFamily::Magi1);
    assert_eq!((info.width, info.height, info.fps_num), (64, 64, 24));
    assert_eq!(info.defaults.steps, 8);
    let model = p.magi().expect("a MAGI-1 pipeline").clone();

    // The T5 caption: the real tokens' rows (upstream's padded rows are masked out).
    let (text, mask) = model.encode_prompt(prompt).unwrap();
    let want_mask = fx[&format!("{group}.prompt_mask")]
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        mask.to_vec1::<f32>().unwrap(),
        want_mask.to_vec1::<f32>().unwrap()
    );
    let n = want_mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize;
    let want = fx[&format!("{group}.prompt_embs")].i((0, ..n)).unwrap();
    let e = rel_l2(&text.narrow(0, 0, n).unwrap(), &want);
    assert!(e <= 1e-4, "{group}: T5 caption rel L2 {e:.2e}");

    let noise = fx[&format!("{group}.noise")].clone();
    let chunks = noise.dim(2).unwrap() / model.config().runtime_config.chunk_width;
    let settings = MagiStreamSettings {
        steps: 8,
        chunks: Some(chunks),
        size: (64, 64),
        cache: motioncache::cache::CacheSettings::for_magi(motioncache::cache::CacheMode::None, 8),
    };
    let mut stream = MagiStream::with_noise(
        Arc::clone(&model),
        prompt,
        &settings,
        WalkNoise::Explicit(noise),
    )
    .unwrap();
    let cancel = AtomicBool::new(false);
    let mut index = 0;
    while let Some(chunk) = stream.next_chunk(&cancel).unwrap() {
        assert_eq!(chunk.index, index);
        let want = &fx[&format!("{group}.chunk{index}.latent")];
        let e = rel_l2(&chunk.latents, want);
        assert!(e <= 1e-4, "{group} chunk {index}: latents rel L2 {e:.2e}");
        eprintln!("{group} chunk {index}: latents rel L2 {e:.2e}");

        let video = model.decode(&chunk.latents).unwrap(); // [3, T, H, W]
        if let Some(want) = fx.get(&format!("{group}.chunk{index}.video_float")) {
            let want = want.permute((1, 0, 2, 3)).unwrap();
            let e = rel_l2(&video, &want);
            assert!(e <= 1e-3, "{group} chunk {index}: pixels rel L2 {e:.2e}");
            eprintln!("{group} chunk {index}: pixels rel L2 {e:.2e}");
        }
        // uint8 as upstream converts it: the float differences may flip a value at an
        // integer boundary, nothing more.
        let got = to_rgb24_truncated(&video).unwrap();
        let want = fx[&format!("{group}.chunk{index}.video")]
            .permute((0, 2, 3, 1))
            .unwrap();
        let (mut differ, mut total) = (0usize, 0usize);
        for (t, frame) in got.iter().enumerate() {
            let w = want.get(t).unwrap().flatten_all().unwrap();
            for (a, b) in frame.iter().zip(w.to_vec1::<u8>().unwrap()) {
                assert!(a.abs_diff(b) <= 1, "{group} chunk {index}: {a} vs {b}");
                differ += usize::from(*a != b);
                total += 1;
            }
        }
        eprintln!("{group} chunk {index}: {differ} of {total} uint8 values differ by 1");
        assert!(
            differ * 1000 <= total,
            "{group} chunk {index}: {differ} of {total} bytes differ"
        );
        index += 1;
    }
    assert_eq!(index, chunks, "{group}: every chunk finished");
}

/// The distill model (one pass, the nearly-clean copy), prompt to pixels.
#[test]
fn magi_distill_pipeline_matches_upstream() {
    run("distill", "tiny");
}

/// The base model (three passes with per-t guidance), prompt to pixels; its directory
/// points at the distill one's weights, VAE and T5.
#[test]
fn magi_base_pipeline_matches_upstream() {
    run("base", "tiny-base");
}

/// A stop request ends a stream within one DiT layer: the walk's step fails with the
/// cancellation (checked before every layer), the stream reports `Cancelled` and is then
/// unusable, as SkyReels-V2's generator.
#[test]
fn magi_stream_stops_within_a_forward() {
    use motioncache::model::magi::dit::CANCELLED;
    use motioncache::model::magi::walk::{MagiWalk, PromptCaption};
    let dev = common::device();
    let p = Pipeline::load(&dir().join("tiny"), &dev, DType::F32).expect("load");
    let model = p.magi().unwrap().clone();
    let set = AtomicBool::new(true);
    // The walk: the flag is seen at the first layer of the first forward.
    let (text, mask) = model.encode_prompt("a red fox").unwrap();
    let (null, null_mask) = PromptCaption::null_of(model.dit()).unwrap();
    let specials = motioncache::model::magi::text::SpecialTokens::from_npz(
        dir().join("tiny/special_tokens.npz"),
        &dev,
    )
    .unwrap();
    let caption = PromptCaption {
        text,
        mask,
        specials,
        null,
        null_mask,
    };
    let mut walk = MagiWalk::streaming(
        model.dit().clone(),
        model.config(),
        (4, 8, 8),
        None,
        WalkNoise::Seeded(motioncache::generate::NoiseRng::new(1)),
        caption,
    )
    .unwrap();
    let e = walk.step_cancellable(Some(&set)).err().unwrap().to_string();
    assert!(e.contains(CANCELLED), "{e}");
    // The stream.
    let settings = MagiStreamSettings {
        steps: 8,
        chunks: None,
        size: (64, 64),
        cache: motioncache::cache::CacheSettings::for_magi(motioncache::cache::CacheMode::None, 8),
    };
    let mut stream = MagiStream::new(model, "a red fox", &settings, 1).unwrap();
    assert!(matches!(
        stream.next_chunk(&set),
        Err(motioncache::Error::Cancelled)
    ));
    let e = stream
        .next_chunk(&AtomicBool::new(false))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("create a new one"), "{e}");
}
