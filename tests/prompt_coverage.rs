//! What a model does not read of a prompt: the words its tokenizer's vocabulary lacks and
//! the text past its length, reported so that a user learns why the video ignores them.

use std::path::PathBuf;

use candle_core::{DType, Device};
use motioncache::model::magi::text::load_t5_tokenizer;
use motioncache::pipeline::Pipeline;

fn embedded() -> Pipeline {
    Pipeline::load_embedded(&Device::Cpu, DType::F32).expect("embedded model")
}

#[test]
fn a_training_caption_is_read_in_full() {
    let p = embedded();
    let c = p
        .prompt_coverage("a red circle moving right on a striped blue background")
        .unwrap();
    assert!(c.complete(), "{c:?}");
    assert_eq!(c.read, 10);
    let w = p
        .prompt_warning(
            "prompt",
            "A static  green square on a checkered gray background",
        )
        .unwrap();
    assert_eq!(w, None);
}

#[test]
fn unknown_words_are_named_once_in_prompt_order() {
    let p = embedded();
    let c = p
        .prompt_coverage("a cat running on the blue background, the cat!")
        .unwrap();
    assert_eq!(c.unknown, ["cat", "running", "the", ",", "!"]);
    assert_eq!(c.cut, None);
    let w = p
        .prompt_warning("negative-prompt", "naïve 日本語 circle")
        .unwrap()
        .expect("a warning");
    assert!(
        w.starts_with("property 'negative-prompt': \"naïve\", \"日本語\" are not in the vocabulary of model tiny (embedded)"),
        "{w}"
    );
}

#[test]
fn text_past_the_length_is_named_as_cut() {
    let p = embedded();
    // 40 words; the embedded model reads 32 tokens, the last of them the end token: three
    // captions and the "a" of the fourth.
    let prompt = "a red circle moving right on a striped blue background ".repeat(4);
    let c = p.prompt_coverage(&prompt).unwrap();
    assert!(c.unknown.is_empty(), "{c:?}");
    assert_eq!(c.read, 31);
    assert_eq!(
        c.cut.as_deref(),
        Some("red circle moving right on a striped blue background")
    );
    let w = p
        .prompt_warning("prompt", &prompt)
        .unwrap()
        .expect("a warning");
    assert!(
        w.contains("reads its first 31 tokens (text length 32), not \"red circle"),
        "{w}"
    );
}

#[test]
fn sentencepiece_unknown_pieces_name_their_words() {
    // The MAGI-1 fixture's 150-piece SentencePiece model: emoji and CJK are not in it.
    let spm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/magi/t5/spiece.model");
    let tok = load_t5_tokenizer(&spm).expect("tokenizer");
    let c = tok
        .coverage("emoji 🦊 and 日本語 text", 64)
        .expect("coverage");
    assert!(c.unknown.contains(&"🦊".to_string()), "{c:?}");
    assert!(c.unknown.contains(&"日本語".to_string()), "{c:?}");
    assert_eq!(c.cut, None);
    // Every text token counts towards the length: 8 of them leave the rest cut.
    let c = tok.coverage("emoji and text", 9).expect("coverage");
    assert_eq!(c.read, 8);
    assert!(c.cut.is_some(), "{c:?}");
}
