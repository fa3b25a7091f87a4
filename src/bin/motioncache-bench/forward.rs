//! `motioncache-bench forward`: one transformer forward of a model configuration with
//! random weights, in candle and in PyTorch (diffusers' `SkyReelsV2Transformer3DModel`,
//! through tools/bench_forward.py) in the same run, plus this machine's measured
//! matrix-multiply rate, so the report can say how close to the peak the forward runs.
//!
//!     motioncache-bench forward [--config 1.3b|tiny|PATH] [--frames F] [--height H]
//!         [--width W] [--prefix-frames P] [--text-len L] [--dtypes f32,bf16] [--reps N]
//!         [--python EXE|none] [--out DIR]
//!     motioncache-bench forward --config magi-4.5b [--layers N] [--chunks C]
//!         [--chunk-frames F] [--caption-len L] [--magi CHECKOUT] ...   (forward_magi.rs)
//!
//! The forward is what the pipeline calls once per block and step: text projection and
//! cross-attention keys/values, timestep modulation, patch embedding, every layer over all
//! tokens of the latent (bidirectional attention over them), head. Latent sizes are in
//! latent pixels (before patching); the default is a reduced 3 x 16 x 32 latent (384
//! tokens), which keeps one 1.3B forward at a few seconds on two cores. `--prefix-frames`
//! adds keys/values of that many earlier latent frames (random, as a window's cache holds
//! them) that the block's tokens attend to as well: one 540P block at the end of a
//! 25-frame window is `--frames 5 --height 68 --width 120 --prefix-frames 20` (10,200
//! tokens against 51,000 keys). The PyTorch side prepends random keys/values of the same
//! length in every self-attention of diffusers' transformer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use motioncache::model::config::TransformerConfig;
use motioncache::model::transformer::{BlockKv, Transformer};

use super::BoxResult;

/// Random weights for any tensor the model asks for: normalisation weights 1, everything
/// else N(0, 0.02) (the values do not change the work; they keep activations finite);
/// large CPU tensors repeat a period of 2^20 values.
pub(crate) struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        const PERIOD: usize = 1 << 20;
        let n = s.elem_count();
        let t = if name.contains("norm") && name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else if dev.is_cpu() && n > PERIOD {
            // Drawing a 1.3B model's values one by one on the CPU takes minutes; the values
            // only need to be plausible, so large tensors repeat one random period.
            Tensor::randn(0f32, 0.02, PERIOD, dev)?
                .repeat(n.div_ceil(PERIOD))?
                .narrow(0, 0, n)?
                .reshape(s)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Random weights that remember what they handed out (in a map its clones share), so that
/// the same weights can be loaded on another device.
#[derive(Clone, Default)]
pub(crate) struct Recorded(pub(crate) Arc<Mutex<HashMap<String, Tensor>>>);

impl SimpleBackend for Recorded {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = RandomWeights.get(s, name, h, DType::F32, &Device::Cpu)?;
        self.0
            .lock()
            .expect("weights lock")
            .insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[derive(clap::Args, Clone)]
pub struct Args {
    /// 1.3b, tiny (the embedded model), a transformer config.json, magi-4.5b or a MAGI-1
    /// MagiConfig JSON (see forward_magi.rs).
    #[arg(long, default_value = "1.3b")]
    pub(crate) config: String,
    /// Latent frames, height and width (before patching).
    #[arg(long, default_value_t = 3)]
    pub(crate) frames: usize,
    #[arg(long, default_value_t = 16)]
    pub(crate) height: usize,
    #[arg(long, default_value_t = 32)]
    pub(crate) width: usize,
    /// Latent frames of cached keys/values before the block, attended to by its tokens.
    #[arg(long, default_value_t = 0)]
    pub(crate) prefix_frames: usize,
    /// Text positions (default: 512, the embedded model's own for tiny).
    #[arg(long)]
    pub(crate) text_len: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16", value_parser = parse_dtype)]
    pub(crate) dtypes: Vec<DType>,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) reps: u64,
    /// Python with torch and diffusers for the PyTorch side, or `none`
    /// (default: $MOTIONCACHE_PYTHON, else python3).
    #[arg(long)]
    pub(crate) python: Option<String>,
    #[arg(long, default_value = "bench-out")]
    pub(crate) out: PathBuf,
    /// MAGI-1: the first N of the model's layers (default: all).
    #[arg(long)]
    pub(crate) layers: Option<usize>,
    /// MAGI-1: chunks in the forward.
    #[arg(long, default_value_t = 2)]
    pub(crate) chunks: usize,
    /// MAGI-1: latent frames per chunk.
    #[arg(long, default_value_t = 6)]
    pub(crate) chunk_frames: usize,
    /// MAGI-1: valid caption rows per chunk (of 800).
    #[arg(long, default_value_t = 64)]
    pub(crate) caption_len: usize,
    /// MAGI-1: the SandAI-org/MAGI-1 checkout the PyTorch side imports (default:
    /// $MAGI_ROOT; without one, only candle runs).
    #[arg(long)]
    pub(crate) magi: Option<PathBuf>,
    /// cpu, cuda or cuda:N (a `cuda` build), for both sides.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

fn parse_dtype(d: &str) -> Result<DType, String> {
    match d {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("unknown dtype {other:?} (f32, bf16, f16)")),
    }
}

impl Args {
    pub(crate) fn python(&self) -> Option<String> {
        let p = self
            .python
            .clone()
            .or_else(|| std::env::var("MOTIONCACHE_PYTHON").ok())
            .unwrap_or_else(|| "python3".into());
        (p != "none").then_some(p)
    }
}

fn config(name: &str) -> BoxResult<(TransformerConfig, usize)> {
    match name {
        // umT5-XXL contexts are 512 positions.
        "1.3b" => Ok((TransformerConfig::skyreels_v2_df_1_3b(), 512)),
        "tiny" => {
            let p = motioncache::pipeline::Pipeline::load_embedded(&Device::Cpu, DType::F32)?;
            let t = p
                .transformer()
                .ok_or("the embedded model is a SkyReels-V2 model")?;
            Ok((t.config().clone(), p.info().text_len))
        }
        path => Ok((TransformerConfig::from_file(Path::new(path))?, 512)),
    }
}

/// Whether `path` is an upstream MagiConfig JSON (it has a `model_config`).
fn is_magi_config(path: &str) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("model_config").is_some())
}

/// The configuration in diffusers' `transformer/config.json` form, for the PyTorch side.
pub(crate) fn diffusers_json(c: &TransformerConfig) -> serde_json::Value {
    serde_json::json!({
        "patch_size": c.patch_size,
        "num_attention_heads": c.num_attention_heads,
        "attention_head_dim": c.attention_head_dim,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "text_dim": c.text_dim,
        "freq_dim": c.freq_dim,
        "ffn_dim": c.ffn_dim,
        "num_layers": c.num_layers,
        "cross_attn_norm": c.cross_attn_norm,
        "qk_norm": if c.qk_norm { serde_json::json!("rms_norm_across_heads") } else { serde_json::Value::Null },
        "eps": c.eps,
        "rope_max_seq_len": c.rope_max_seq_len,
        "inject_sample_info": c.inject_sample_info,
        // One attention group over every token (no block mask), as the candle side.
        "num_frame_per_block": 1,
    })
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Best-of-`reps` GFLOP/s of a square matrix multiply (after one warm-up).
pub(crate) fn matmul_peak(dev: &Device, dtype: DType, n: usize, reps: usize) -> BoxResult<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        a.matmul(&b)?;
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// FLOPs of one whole forward: layers plus text projection, cross-attention keys/values,
/// patch embedding and head.
fn forward_flops(m: &Transformer, tokens: usize, keys: usize, text_len: usize) -> f64 {
    let c = m.config();
    let d = c.dim() as f64;
    let [pt, ph, pw] = c.patch_size;
    let patch = (c.in_channels * pt * ph * pw) as f64;
    let head = (c.out_channels * pt * ph * pw) as f64;
    let t = text_len as f64;
    m.layer_flops(tokens, keys, text_len)
        + 2.0 * t * (c.text_dim as f64 * d + d * d)
        + 2.0 * t * d * d * 2.0 * c.num_layers as f64
        + 2.0 * tokens as f64 * d * (patch + head)
}

/// Times candle forwards; returns the seconds of each repetition (after one warm-up).
fn candle_forward(
    cfg: &TransformerConfig,
    dtype: DType,
    o: &Args,
    text_len: usize,
) -> BoxResult<(Vec<f64>, f64)> {
    let dev = motioncache::pipeline::parse_device(&o.device)?;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone());
    let model = Transformer::new(cfg, vb)?;
    let latents = Tensor::randn(
        0f32,
        1.0,
        (cfg.in_channels, o.frames, o.height, o.width),
        &dev,
    )?;
    let text = Tensor::randn(0f32, 1.0, (text_len, cfg.text_dim), &dev)?;
    let (gf, gh, gw) = model.grid(o.frames, o.height, o.width)?;
    let pf = o.prefix_frames / cfg.patch_size[0];
    let (heads, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let prefix = (pf > 0)
        .then(|| -> candle_core::Result<BlockKv> {
            let r =
                || Tensor::randn(0f32, 1.0, (1, heads, pf * gh * gw, hd), &dev)?.to_dtype(dtype);
            let layers = (0..cfg.num_layers)
                .map(|_| Ok((r()?, r()?)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(BlockKv { layers })
        })
        .transpose()?;
    let timesteps: Vec<f64> = (0..gf).map(|i| 999.0 - 37.0 * i as f64).collect();
    let once = || -> candle_core::Result<Tensor> {
        let ctx = model.context(&text)?;
        let m = model.modulation(&timesteps, 1)?;
        let toks = model.all_tokens(pf, gf, gh, gw)?;
        let x = model.patchify(&latents)?;
        let mut kv = None;
        let y = model.forward_layers(&x, &m, &toks, &mut kv, prefix.as_ref(), &ctx)?;
        model.head(&y, &m.temb, (gf, gh, gw))
    };
    once()?;
    let mut secs = Vec::new();
    for _ in 0..o.reps {
        let t = Instant::now();
        let y = once()?;
        // Make sure the result is really computed and finite.
        let s = y
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !s.is_finite() {
            return Err(format!(
                "candle forward ({}) produced non-finite values",
                dtype_name(dtype)
            )
            .into());
        }
        secs.push(t.elapsed().as_secs_f64());
    }
    let tokens = gf * gh * gw;
    Ok((
        secs,
        forward_flops(&model, tokens, tokens + pf * gh * gw, text_len),
    ))
}

/// Runs tools/bench_forward.py; `None` (with a message) if PyTorch is not available.
fn torch_forward(
    python: &str,
    cfg_path: &Path,
    dtype: DType,
    o: &Args,
    (text_len, prefix): (usize, usize),
    threads: usize,
) -> Option<Vec<f64>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_forward.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--config", &cfg_path.display().to_string()])
        .args(["--frames", &o.frames.to_string()])
        .args(["--height", &o.height.to_string()])
        .args(["--width", &o.width.to_string()])
        .args(["--prefix-tokens", &prefix.to_string()])
        .args(["--text-len", &text_len.to_string()])
        .args(["--dtype", dtype_name(dtype)])
        .args(["--reps", &o.reps.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", &o.device])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let secs = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    v.get("seconds")?
                        .as_array()?
                        .iter()
                        .map(|s| s.as_f64())
                        .collect::<Option<Vec<f64>>>()
                });
            if secs.is_none() {
                eprintln!(
                    "forward: the PyTorch side printed no {{\"seconds\": [...]}}: {:?}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            secs
        }
        Ok(out) => {
            eprintln!(
                "forward: PyTorch side failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            None
        }
        Err(e) => {
            eprintln!("forward: cannot run {python}: {e} (pass --python EXE, or --python none)");
            None
        }
    }
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn run(o: Args) -> BoxResult<()> {
    if o.config.starts_with("magi") || is_magi_config(&o.config) {
        return super::forward_magi::run(o);
    }
    let (cfg, default_text) = config(&o.config)?;
    let text_len = o.text_len.unwrap_or(default_text);
    std::fs::create_dir_all(&o.out)?;
    let cfg_path = o.out.join("forward-config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&diffusers_json(&cfg))?,
    )?;
    // The pool the kernels and candle's matrix multiplies run on (`RAYON_NUM_THREADS`).
    let threads = rayon::current_num_threads();
    println!(
        "forward microbenchmark on {}: config {} (dim {}, {} layers), latent {}x{}x{}, text {text_len}, {threads} threads",
        o.device,
        o.config,
        cfg.dim(),
        cfg.num_layers,
        o.frames,
        o.height,
        o.width
    );
    let mut rows = Vec::new();
    let mut md = String::from(
        "| dtype | tokens | keys | GFLOP | candle s | PyTorch s | candle faster by | candle GFLOP/s | matmul peak GFLOP/s | of peak |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &dtype in &o.dtypes {
        let peak = matmul_peak(
            &motioncache::pipeline::parse_device(&o.device)?,
            dtype,
            2048,
            3,
        )?;
        let (secs, flops) = candle_forward(&cfg, dtype, &o, text_len)?;
        let c = median(&secs);
        let [pt, ph, pw] = cfg.patch_size;
        let tokens = (o.frames / pt) * (o.height / ph) * (o.width / pw);
        let prefix = (o.prefix_frames / pt) * (o.height / ph) * (o.width / pw);
        let t = o
            .python()
            .and_then(|py| torch_forward(&py, &cfg_path, dtype, &o, (text_len, prefix), threads));
        let tm = t.as_deref().map(median);
        let rate = flops / c / 1e9;
        let keys = tokens + prefix;
        md.push_str(&format!(
            "| {} | {tokens} | {keys} | {:.1} | {c:.3} | {} | {} | {rate:.1} | {peak:.1} | {:.0}% |\n",
            dtype_name(dtype),
            flops / 1e9,
            tm.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
            tm.map(|v| format!("{:.2}x", v / c))
                .unwrap_or_else(|| "-".into()),
            100.0 * rate / peak
        ));
        rows.push(serde_json::json!({
            "config": o.config, "dtype": dtype_name(dtype), "tokens": tokens, "keys": keys,
            "text_len": text_len, "flops": flops, "candle_seconds": secs,
            "torch_seconds": t, "candle_gflops": rate, "matmul_peak_gflops": peak,
            "threads": threads,
        }));
        eprintln!(
            "forward {}: candle {c:.3} s, PyTorch {}",
            dtype_name(dtype),
            tm.map(|v| format!("{v:.3} s"))
                .unwrap_or_else(|| "-".into())
        );
    }
    write_report(&o.out, "forward", &rows, &md)
}

/// Writes `DIR/STEM.json` (the rows) and `DIR/STEM.md` (the table) and prints the table.
pub(crate) fn write_report(
    dir: &std::path::Path,
    stem: &str,
    rows: &[serde_json::Value],
    md: &str,
) -> BoxResult<()> {
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(rows)?,
    )?;
    std::fs::write(dir.join(format!("{stem}.md")), md)?;
    print!("{md}");
    Ok(())
}
