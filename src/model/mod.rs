//! Models: the SkyReels-V2 / Wan 2.1 diffusion-forcing DiT, the Wan 2.1 VAE, the umT5
//! text encoder and its tokenizer, and the loader of model directories.

pub mod config;
pub mod kernels;
pub mod loader;
pub mod magi;
pub mod t5;
pub mod tokenizer;
pub mod transformer;
pub mod vae;
pub mod weights;

pub use config::TransformerConfig;
pub use transformer::Transformer;
