//! umT5 encoder and prompt tokenizer against transformers / diffusers fixtures written by
//! tools/fixtures/t5.py (random tiny UMT5EncoderModel, WordLevel tokenizer.json).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::t5::{
    UMT5Config, UMT5Encoder, encode_prompts, hf_to_original_name, relative_position_bucket,
    zero_after_lengths,
};
use motioncache::model::tokenizer::{PromptTokenizer, html_unescape, prompt_clean};

use crate::common::{self, rel_l2};

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/t5")
}

fn outputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("t5_outputs.safetensors"), &common::device())
        .expect("t5_outputs.safetensors")
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("t5_cases.json")).expect("t5_cases.json");
    serde_json::from_str(&text).expect("t5_cases.json is JSON")
}

fn config() -> UMT5Config {
    UMT5Config::from_json_file(fixtures().join("text_encoder/config.json")).expect("config")
}

fn hf_encoder(dtype: DType) -> UMT5Encoder {
    let file = fixtures().join("text_encoder/model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, &common::device()) }
        .expect("model.safetensors");
    UMT5Encoder::new(&config(), vb).expect("UMT5Encoder::new")
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_file(fixtures().join("tokenizer/tokenizer.json")).expect("tokenizer")
}

#[test]
fn config_reads_transformers_fields() {
    let cfg = config();
    assert_eq!(cfg.d_model, 64);
    assert_eq!(cfg.d_kv, 12);
    assert_eq!(cfg.inner_dim(), 48);
    assert_eq!(cfg.num_layers, 2);
    assert_eq!(cfg.relative_attention_num_buckets, 32);
    assert_eq!(cfg.feed_forward_proj, "gated-gelu");
    let bad = std::env::temp_dir().join("motioncache-t5-bad-config.json");
    std::fs::write(&bad, "{\"d_model\": \"wide\"}").unwrap();
    let err = UMT5Config::from_json_file(&bad).unwrap_err().to_string();
    assert!(err.contains("motioncache-t5-bad-config.json"), "{err}");
}

#[test]
fn buckets_match_transformers() {
    // Same 32 buckets / max distance 128 as umt5-xxl, relative positions -600..=600.
    let expected: Vec<i64> = outputs()["buckets"].to_vec1().unwrap();
    for (i, &want) in expected.iter().enumerate() {
        let rel = i as i64 - 600;
        assert_eq!(
            relative_position_bucket(rel, 32, 128) as i64,
            want,
            "bucket of relative position {rel}"
        );
    }
}

#[test]
fn prompt_clean_matches_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("clean_cases.json")).unwrap();
    let clean_cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut failures = Vec::new();
    for case in &clean_cases {
        let input = case["input"].as_str().unwrap();
        let want = case["output"].as_str().unwrap();
        let got = prompt_clean(input);
        if got != want {
            failures.push(format!("{input:?}: got {got:?}, want {want:?}"));
        }
    }
    let c = cases();
    for (p, want) in c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["cleaned"].as_array().unwrap())
    {
        let got = prompt_clean(p.as_str().unwrap());
        if got != want.as_str().unwrap() {
            failures.push(format!("{p:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "prompt_clean differs:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        html_unescape("&amp;lt; &#x26; &ampx &#128;"),
        "&lt; & &x \u{20ac}"
    );
}

#[test]
fn token_ids_match_transformers() {
    let c = cases();
    let max_len = c["max_length"].as_u64().unwrap() as usize;
    let prompts: Vec<&str> = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let tok = tokenizer();
    assert_eq!(tok.pad_id(), 0);
    let got = tok.encode(&prompts, max_len).unwrap();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(c["input_ids"].clone()).unwrap();
    let want_mask: Vec<Vec<u32>> = serde_json::from_value(c["attention_mask"].clone()).unwrap();
    assert_eq!(got.input_ids, want_ids);
    assert_eq!(got.attention_mask, want_mask);
    // Empty prompt: EOS only. Long prompt: truncated to max_len with EOS last.
    assert_eq!(got.seq_lens()[2], 1);
    assert_eq!(got.input_ids[2][0], 1);
    assert_eq!(got.seq_lens()[3], max_len);
    assert_eq!(got.input_ids[3][max_len - 1], 1);
}

#[test]
fn tokenizer_errors_name_the_file() {
    let missing = fixtures().join("no-such-dir/tokenizer.json");
    let err = PromptTokenizer::from_file(&missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-dir/tokenizer.json") && err.contains("not found"),
        "{err}"
    );

    let bad = std::env::temp_dir().join("motioncache-bad-tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let err = PromptTokenizer::from_file(&bad).unwrap_err().to_string();
    assert!(
        err.contains("motioncache-bad-tokenizer.json") && err.contains("valid"),
        "{err}"
    );

    let err = tokenizer().encode(&["a"], 1).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("max_length"),
        "{err}"
    );
}

#[test]
fn encoder_matches_transformers_f32() {
    let out = outputs();
    let enc = hf_encoder(DType::F32);
    let raw = enc
        .forward(&out["input_ids"], &out["attention_mask"])
        .unwrap();
    let err = rel_l2(&raw, &out["raw"]);
    assert!(err <= 1e-4, "raw encoder output rel L2 {err}");

    // Longer than max_distance (clamped log buckets), second row half padding.
    let long = enc
        .forward(&out["long_input_ids"], &out["long_attention_mask"])
        .unwrap();
    let err = rel_l2(&long, &out["long_raw"]);
    assert!(err <= 1e-4, "long sequence rel L2 {err}");
}

#[test]
fn encode_prompts_matches_pipeline_context() {
    let out = outputs();
    let c = cases();
    let max_len = c["max_length"].as_u64().unwrap() as usize;
    let prompts: Vec<&str> = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let enc = hf_encoder(DType::F32);
    let ctx = encode_prompts(&enc, &tokenizer(), &prompts, max_len).unwrap();
    assert_eq!(ctx.dims(), &[prompts.len(), max_len, 64]);
    let err = rel_l2(&ctx, &out["context"]);
    assert!(err <= 1e-4, "pipeline context rel L2 {err}");
    // Zero after the real tokens: the empty prompt keeps only its EOS row.
    let tail = ctx
        .i((2, 1.., ..))
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(tail.to_scalar::<f32>().unwrap(), 0.0);
    // Pad to a longer context than the encoded length.
    let wide = zero_after_lengths(&ctx, &[3, 0, 1, 32, 5], 40).unwrap();
    assert_eq!(wide.dims(), &[5, 40, 64]);
    let row0_tail = wide
        .i((0, 3.., ..))
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(row0_tail.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn original_pth_names_give_the_same_output() {
    let out = outputs();
    let pth = fixtures().join("models_t5_umt5-xxl-enc-bf16.pth");
    let vb = VarBuilder::from_pth(&pth, DType::F32, &Device::Cpu).expect("pth");
    assert!(vb.contains_tensor("blocks.1.pos_embedding.embedding.weight"));
    let enc = UMT5Encoder::new_original(&config(), vb).expect("new_original");
    let got = enc
        .forward(&out["input_ids"], &out["attention_mask"])
        .unwrap();
    let err = rel_l2(&got, &out["raw"]);
    assert!(err <= 1e-4, "pth path rel L2 {err}");
    assert_eq!(
        hf_to_original_name("shared.weight"),
        "token_embedding.weight"
    );
    assert_eq!(
        hf_to_original_name("encoder.block.23.layer.1.DenseReluDense.wi_0.weight"),
        "blocks.23.ffn.gate.0.weight"
    );
}

#[test]
fn half_precision_runs_close_to_f32() {
    let out = outputs();
    for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
        let enc = hf_encoder(dtype);
        let got = enc
            .forward(&out["input_ids"], &out["attention_mask"])
            .unwrap();
        assert_eq!(got.dtype(), dtype);
        let err = rel_l2(&got, &out["raw"]);
        assert!(err <= tol, "{dtype:?} rel L2 {err}");
    }
}

#[test]
fn shape_errors_are_reported() {
    let enc = hf_encoder(DType::F32);
    let ids = Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((2, 4), DType::U32, &Device::Cpu).unwrap();
    let err = enc.forward(&ids, &mask).unwrap_err().to_string();
    assert!(err.contains("attention_mask"), "{err}");
}
