//! MAGI-1's prompt cleaning against upstream (tools/fixtures/magi_caption.py): DeepFloyd
//! IF's `clean_caption` as `T5Embedder` runs it, once and twice (`text_preprocessing`).

use motioncache::model::magi::caption::{clean_caption, text_preprocessing};
use serde_json::Value;

use crate::common;

#[test]
fn clean_caption_matches_upstream() {
    let path = common::repo().join("tests/fixtures/magi/captions.json");
    let text = std::fs::read_to_string(&path).expect("captions.json");
    let doc: Value = serde_json::from_str(&text).expect("captions.json is JSON");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "only {} cases", cases.len());

    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (i, case) in cases.iter().enumerate() {
        let input = case["input"].as_str().expect("input");
        if let Some(why) = case.get("known_divergence") {
            eprintln!("case {i} skipped ({why}): {input:?}");
            continue;
        }
        let once = case["clean_caption"].as_str().expect("clean_caption");
        let twice = case["text_preprocessing"]
            .as_str()
            .expect("text_preprocessing");
        let got_once = clean_caption(input);
        if got_once != once {
            mismatches.push(format!(
                "case {i} clean_caption({input:?})\n   got  {got_once:?}\n   want {once:?}"
            ));
        }
        let got_twice = text_preprocessing(input);
        if got_twice != twice {
            mismatches.push(format!(
                "case {i} text_preprocessing({input:?})\n   got  {got_twice:?}\n   want {twice:?}"
            ));
        }
        checked += 1;
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches over {checked} cases:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
