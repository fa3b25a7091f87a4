//! `motioncache-bench make-model`: a diffusers pipeline directory with random weights at a
//! model configuration's real sizes, for timing whole runs through the element where the
//! checkpoint is not at hand (tools/gpu-validate.sh streams the 1.3B configuration at 540P
//! with it). Tokenizer, scheduler and the remaining settings are the embedded model's.
//!
//!     motioncache-bench make-model [--config 1.3b|tiny] --out DIR
//!
//! `1.3b`: SkyReels-V2-DF-1.3B's transformer and the Wan 2.1 VAE at full size, a one-layer
//! text encoder of umT5-XXL's width (4,096: the prompt is encoded once per prompt, so its
//! depth does not change the frame rate), 544 x 960 at 24 fps, 30 steps, blocks of 5 latent
//! frames in a window of 25 with 5 of overlap (SkyReels-V2's 540P settings: 97 frames, 17
//! of history), synchronous (ar_step 0). `tiny`: the embedded model's configuration. Weights are N(0, 0.02) with
//! normalisation weights 1, stored in bf16; the directory is loaded once to check it.
//!
//! `magi-small`: a MAGI-1 directory (the benchmark's `magi` scenario) whose DiT is larger
//! than the parity fixture's (6 layers, 256 wide, 8 query / 2 key-value heads, 96 x 96
//! frames: 72 tokens per chunk) so that its time follows its FLOPs; the VAE, the T5
//! encoder and the special tokens are those of `--base` (the fixture
//! `tests/fixtures/magi/tiny` by default), referenced by absolute path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::config::TransformerConfig;
use motioncache::model::t5::{UMT5Config, UMT5Encoder};
use motioncache::model::transformer::Transformer;
use motioncache::model::vae::{WanVae, WanVaeConfig};
use motioncache::pipeline::Pipeline;

use super::BoxResult;
use super::forward::{Recorded, diffusers_json};

/// The embedded model's configuration files, the starting point of every directory.
const TINY: &[(&str, &str)] = &[
    (
        "model_index.json",
        include_str!("../../../models/tiny/model_index.json"),
    ),
    (
        "motioncache.json",
        include_str!("../../../models/tiny/motioncache.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_str!("../../../models/tiny/scheduler/scheduler_config.json"),
    ),
    (
        "text_encoder/config.json",
        include_str!("../../../models/tiny/text_encoder/config.json"),
    ),
    (
        "tokenizer/tokenizer.json",
        include_str!("../../../models/tiny/tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_str!("../../../models/tiny/tokenizer/tokenizer_config.json"),
    ),
    (
        "transformer/config.json",
        include_str!("../../../models/tiny/transformer/config.json"),
    ),
    (
        "vae/config.json",
        include_str!("../../../models/tiny/vae/config.json"),
    ),
];

#[derive(clap::Args)]
pub struct Args {
    /// 1.3b (SkyReels-V2-DF-1.3B at 540P), tiny (the embedded model's sizes) or
    /// magi-small (a MAGI-1 directory for the benchmark).
    #[arg(long, default_value = "1.3b")]
    config: String,
    /// The directory to write (created; existing files are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// `magi-small`: the MAGI-1 directory whose VAE, T5 and special tokens it uses.
    #[arg(long, default_value = "tests/fixtures/magi/tiny")]
    base: PathBuf,
}

/// The configuration files of `config`.
fn configs(config: &str) -> BoxResult<BTreeMap<&'static str, String>> {
    let mut files: BTreeMap<&str, String> =
        TINY.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
    match config {
        "tiny" => {}
        "1.3b" => {
            let t = TransformerConfig::skyreels_v2_df_1_3b();
            let json = |v: &serde_json::Value| serde_json::to_string_pretty(v);
            files.insert("transformer/config.json", json(&diffusers_json(&t))?);
            // diffusers' defaults are the Wan 2.1 VAE.
            files.insert(
                "vae/config.json",
                json(&serde_json::json!({"_class_name": "AutoencoderKLWan"}))?,
            );
            let mut te: serde_json::Value =
                serde_json::from_str(&files["text_encoder/config.json"])?;
            te["d_model"] = t.text_dim.into();
            te["num_layers"] = 1.into();
            files.insert("text_encoder/config.json", json(&te)?);
            let mut mc: serde_json::Value = serde_json::from_str(&files["motioncache.json"])?;
            for (k, v) in [
                ("height", 544),
                ("width", 960),
                ("fps", 24),
                ("causal_block_size", 5),
                ("window", 25),
                ("overlap", 5),
                ("steps", 30),
                ("ar_step", 0),
                ("text_len", 512),
            ] {
                mc[k] = v.into();
            }
            mc["guidance_scale"] = 6.0.into();
            mc["shift"] = 8.0.into();
            // The embedded model's fitted polynomial is not this model's.
            if let Some(m) = mc.as_object_mut() {
                m.remove("cache_rescale");
            }
            files.insert("motioncache.json", json(&mc)?);
        }
        other => {
            return Err(format!("unknown --config {other:?} (1.3b, tiny or magi-small)").into());
        }
    }
    Ok(files)
}

/// Builds a component on recorded random weights and saves them, in bf16, to `path`.
fn save(
    path: &Path,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> BoxResult<usize> {
    let rec = Recorded::default();
    // Built in f32, the recorded dtype (no conversion); saved in bf16.
    build(VarBuilder::from_backend(
        Box::new(rec.clone()),
        DType::F32,
        Device::Cpu,
    ))?;
    let recorded = std::mem::take(&mut *rec.0.lock().expect("weights lock"));
    let mut params = 0;
    let map = recorded
        .into_iter()
        .map(|(name, t)| {
            params += t.elem_count();
            Ok((name, t.to_dtype(DType::BF16)?))
        })
        .collect::<candle_core::Result<std::collections::HashMap<String, Tensor>>>()?;
    candle_core::safetensors::save(&map, path)?;
    Ok(params)
}

/// `make-model --config magi-small`.
fn make_magi(a: &Args) -> BoxResult<()> {
    use motioncache::model::magi::{MagiConfig, MagiDit};
    let base_cfg = a.base.join("config.json");
    let text = std::fs::read_to_string(&base_cfg)
        .map_err(|e| format!("--base: {}: {e}", base_cfg.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    let base = std::fs::canonicalize(&a.base)?;
    let rc0 = MagiConfig::from_file(&base_cfg)?.runtime_config;
    let abs = |p: &Option<String>, what: &str| -> BoxResult<String> {
        let p = p.as_deref().ok_or_else(|| {
            format!(
                "--base: {} has no runtime_config.{what}",
                base_cfg.display()
            )
        })?;
        Ok(base.join(p).display().to_string())
    };
    let mc = &mut cfg["model_config"];
    mc["num_layers"] = 6.into();
    mc["hidden_size"] = 256.into();
    mc["ffn_hidden_size"] = 768.into();
    mc["num_attention_heads"] = 8.into();
    mc["num_query_groups"] = 2.into();
    mc["kv_channels"] = 32.into();
    let rc = &mut cfg["runtime_config"];
    rc["video_size_h"] = 96.into();
    rc["video_size_w"] = 96.into();
    rc["num_steps"] = 64.into();
    rc["load"] = ".".into();
    rc["vae_pretrained"] = abs(&rc0.vae_pretrained, "vae_pretrained")?.into();
    rc["t5_pretrained"] = abs(&rc0.t5_pretrained, "t5_pretrained")?.into();
    std::fs::create_dir_all(a.out.join("inference_weight.distill"))?;
    std::fs::write(
        a.out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    std::fs::copy(
        base.join("special_tokens.npz"),
        a.out.join("special_tokens.npz"),
    )?;
    let parsed = MagiConfig::from_file(&a.out.join("config.json"))?;
    let n = save(
        &a.out.join("inference_weight.distill/model.safetensors"),
        |vb| MagiDit::new(&parsed.model_config, true, vb).map(drop),
    )?;
    let p = Pipeline::load(&a.out, &Device::Cpu, DType::F32)?;
    let info = p.info();
    println!(
        "make-model: {} (magi-small): DiT {:.1}M parameters, {}x{} at {} fps, VAE and T5 of {}",
        a.out.display(),
        n as f64 / 1e6,
        info.width,
        info.height,
        info.fps_num,
        base.display()
    );
    Ok(())
}

pub fn run(a: Args) -> BoxResult<()> {
    if a.config == "magi-small" {
        return make_magi(&a);
    }
    let files = configs(&a.config)?;
    for (rel, text) in &files {
        let p = a.out.join(rel);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&p, text)?;
    }
    let tcfg = TransformerConfig::from_json(&files["transformer/config.json"])?;
    let vcfg: WanVaeConfig = serde_json::from_str(&files["vae/config.json"])?;
    let ucfg: UMT5Config = serde_json::from_str(&files["text_encoder/config.json"])?;
    let weights = "diffusion_pytorch_model.safetensors";
    let t = save(&a.out.join("transformer").join(weights), |vb| {
        Transformer::new(&tcfg, vb).map(drop)
    })?;
    let v = save(&a.out.join("vae").join(weights), |vb| {
        WanVae::new(&vcfg, vb).map(drop)
    })?;
    let e = save(&a.out.join("text_encoder/model.safetensors"), |vb| {
        UMT5Encoder::new(&ucfg, vb).map(drop)
    })?;
    let p = Pipeline::load(&a.out, &Device::Cpu, DType::BF16)?;
    let info = p.info();
    println!(
        "make-model: {} ({} config): transformer {:.2}B, VAE {:.0}M, text encoder {:.0}M parameters; {}x{} at {}/{} fps",
        a.out.display(),
        a.config,
        t as f64 / 1e9,
        v as f64 / 1e6,
        e as f64 / 1e6,
        info.width,
        info.height,
        info.fps_num,
        info.fps_den
    );
    Ok(())
}
