//! MAGI-1's text path against the fixtures of tools/fixtures/magi_t5.py: the T5 v1.1
//! encoder (transformers `T5EncoderModel`, layer 0's bias shared), the tokenizer built from
//! `spiece.model` (transformers `T5Tokenizer` / sentencepiece), and upstream's
//! `pad_special_token` (PAD_HQ, PAD_DURATION).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::magi::text::{
    SentencePieceModel, SpecialTokens, load_t5_tokenizer, pad_special_tokens, read_npz_array,
};
use motioncache::model::t5::{T5Config, T5Encoder};

use crate::common::{self, rel_l2};

fn dir() -> PathBuf {
    common::repo().join("tests/fixtures/magi")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &common::device()).expect(name)
}

#[test]
fn t5_v1_1_encoder_matches_transformers() {
    let cfg = T5Config::from_json_file(dir().join("t5/config.json")).expect("config");
    assert_eq!(cfg.shared_relative_bias(), Some(true));
    let file = dir().join("t5/model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &common::device()) }
        .expect("model.safetensors");
    let enc = T5Encoder::new(&cfg, vb.clone()).expect("T5Encoder::new");
    assert!(enc.shares_relative_bias());
    // Without model_type, the layout is read from the weights.
    let undecided = T5Config {
        model_type: None,
        ..cfg.clone()
    };
    let detected = T5Encoder::new(&undecided, vb).expect("T5Encoder::new without model_type");
    assert!(detected.shares_relative_bias());

    let io = load("t5_io.safetensors");
    for i in 0..3 {
        let ids = &io[&format!("ids_{i}")];
        let mask = &io[&format!("mask_{i}")];
        let want = &io[&format!("out_{i}")];
        for model in [&enc, &detected] {
            let got = model.forward(ids, mask).expect("forward");
            assert_eq!(got.dims(), want.dims());
            // Compare the real positions only would hide mask bugs: compare everything.
            let err = rel_l2(&got, want);
            assert!(err <= 1e-4, "batch {i}: rel L2 {err}");
        }
    }
}

#[test]
fn spiece_tokenizer_matches_transformers() {
    let text = std::fs::read_to_string(dir().join("t5_tokens.json")).expect("t5_tokens.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let spm_path = dir().join("t5/spiece.model");
    let spm = SentencePieceModel::from_file(&spm_path).expect("spiece.model");
    assert_eq!(spm.pieces.len() as u64, doc["vocab_size"].as_u64().unwrap());
    assert_eq!(spm.unk_id, 2);
    assert_eq!(spm.piece_to_id("</s>"), Some(1));
    let tok = load_t5_tokenizer(&spm_path).expect("tokenizer");
    assert_eq!(tok.pad_id(), 0);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok
            .inner()
            .encode(prompt, true)
            .expect("encode")
            .get_ids()
            .to_vec();
        if got != want {
            failures.push(format!("{prompt:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let padded = &doc["padded"];
    let prompts: Vec<&str> = padded["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let max_length = padded["max_length"].as_u64().unwrap() as usize;
    let got = tok.encode_cleaned(&prompts, max_length).expect("encode");
    for (b, row) in padded["input_ids"].as_array().unwrap().iter().enumerate() {
        assert_eq!(got.input_ids[b], ids(row), "padded ids of prompt {b}");
        assert_eq!(
            got.attention_mask[b],
            ids(&padded["attention_mask"][b]),
            "mask of prompt {b}"
        );
    }
}

#[test]
fn spiece_errors_name_the_file() {
    let bad = std::env::temp_dir().join("motioncache-magi-bad-spiece.model");
    std::fs::write(&bad, [0x0a, 0xff, 0xff]).unwrap();
    let err = load_t5_tokenizer(&bad).unwrap_err().to_string();
    assert!(err.contains("motioncache-magi-bad-spiece.model"), "{err}");
    let missing = dir().join("t5/no-such.model");
    let err = load_t5_tokenizer(&missing).unwrap_err().to_string();
    assert!(err.contains("no-such.model"), "{err}");
}

#[test]
fn special_tokens_match_upstream() {
    let io = load("special_io.safetensors");
    let npz = dir().join("special_tokens.npz");
    let other = read_npz_array(&npz, "other_tokens").expect("npz");
    let want_table = io["table_other"].to_device(&Device::Cpu).unwrap();
    assert_eq!(rel_l2(&other, &want_table), 0.0);
    let table = SpecialTokens::from_npz(&npz, &common::device()).expect("special tokens");
    let caption = &io["caption"];
    let mask = &io["mask"];
    for chunks in [3usize, 10] {
        let (embs, masks) = pad_special_tokens(caption, mask, &table, chunks).expect("pad");
        let want_e = &io[&format!("embs_{chunks}")];
        let want_m = &io[&format!("masks_{chunks}")];
        assert_eq!(embs.dims(), want_e.dims());
        assert_eq!(masks.dims(), want_m.dims());
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(diff(&embs, want_e), 0.0, "{chunks} chunks: embeddings");
        assert_eq!(diff(&masks, want_m), 0.0, "{chunks} chunks: masks");
    }
}

/// The same T5 saved as PyTorch pickle shards (`tools/fixtures/magi_t5_bin.py`, the layout
/// transformers wrote without safetensors) loads through `load_t5` and gives the same
/// outputs as the safetensors folder; a folder with neither is an error naming the files.
#[test]
fn t5_from_pytorch_shards_matches_safetensors() {
    use motioncache::model::magi::stream::load_t5;
    let dev = common::device();
    let (_, st) = load_t5(&dir().join("t5"), &dev).expect("safetensors folder");
    let (_, pt) = load_t5(&dir().join("t5-bin"), &dev).expect("pickle shards");
    let io = load("t5_io.safetensors");
    for i in 0..3 {
        let ids = &io[&format!("ids_{i}")];
        let mask = &io[&format!("mask_{i}")];
        let a = st.forward(ids, mask).unwrap();
        let b = pt.forward(ids, mask).unwrap();
        assert_eq!(rel_l2(&a, &b), 0.0, "batch {i}");
    }
    let empty = std::env::temp_dir().join(format!("mc-t5-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(dir().join("t5/config.json"), empty.join("config.json")).unwrap();
    let e = load_t5(&empty, &dev).err().unwrap().to_string();
    assert!(
        e.contains("pytorch_model.bin") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&empty).unwrap();
}
