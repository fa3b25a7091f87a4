//! Parity with the independent references (diffusers / transformers fixtures written by
//! the scripts in tools/fixtures/): the transformer forward and whole DF runs, the Wan VAE,
//! umT5 and the tokenizer, whole pipelines from prompt to pixels. One test binary, so that
//! a build carried to a GPU machine (tools/gpu-pack.sh) holds one copy of candle's CUDA
//! kernels, not four. Every test reads `MOTIONCACHE_TEST_DEVICE` (tests/common).

#[path = "../common/mod.rs"]
mod common;

mod magi;
mod magi_caption;
mod magi_motioncache;
mod magi_pipeline;
mod magi_t5;
mod magi_vae;
mod pipeline;
mod t5;
mod transformer;
mod vae;
