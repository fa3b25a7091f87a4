//! `motioncache-bench forward --config magi-4.5b`: one forward of the MAGI-1 DiT with random
//! weights, in candle and in PyTorch (upstream's `VideoDiTModel` imported from a checkout,
//! through tools/bench_magi_forward.py) in the same run.
//!
//! The forward is one step of the walk without its KV cache: `--chunks` chunks of
//! `--chunk-frames` latent frames of `--height x --width` latents, each at its own
//! timestep, each attending to itself and the chunks before it in this forward, each with
//! `--caption-len` valid caption rows of 800; the distill model's step-size embedding for
//! 64 steps. `--layers` runs the first N of the 34 layers (the 4.5B model is 18 GB in f32:
//! more than this machine holds twice); the layers are identical in work, so the table's
//! per-layer time scales to the whole model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::magi::{MagiDit, MagiInput, MagiModelConfig};

use super::BoxResult;
use super::forward::{Args, RandomWeights, dtype_name, matmul_peak, median};

/// `model_config` of upstream's `example/4.5B/4.5B_distill_config.json`.
const MAGI_4_5B: &str = r#"{
    "num_layers": 34, "hidden_size": 3072, "ffn_hidden_size": 12288,
    "num_attention_heads": 24, "num_query_groups": 8, "kv_channels": 128,
    "layernorm_epsilon": 1e-06, "apply_layernorm_1p": true, "x_rescale_factor": 1,
    "half_channel_vae": false, "params_dtype": "torch.bfloat16", "patch_size": 2,
    "t_patch_size": 1, "in_channels": 16, "out_channels": 16, "cond_hidden_ratio": 0.25,
    "caption_channels": 4096, "caption_max_length": 800, "xattn_cond_hidden_ratio": 1.0,
    "cond_gating_ratio": 1.0, "gated_linear_unit": false
}"#;

/// The upstream MagiConfig JSON the PyTorch side reads (model_config as benchmarked).
fn upstream_json(mc: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "model_config": mc,
        "runtime_config": { "cfg_number": 1, "num_steps": 64, "window_size": 4,
            "chunk_width": 6, "noise2clean_kvrange": [5, 4, 3, 2], "clean_chunk_kvrange": 1,
            "clean_t": 0.9999, "fps": 24 },
        "engine_config": { "distill": true, "fp8_quant": false, "shortcut_mode": "8,16,16",
            "distill_nearly_clean_chunk_threshold": 0.3, "distributed_backend": "gloo",
            "cp_size": 1, "pp_size": 1, "kv_offload": false }
    })
}

/// FLOPs of one forward: every layer's projections and MLP over the tokens, their
/// self-attention over the causal key ranges and cross-attention over the caption rows,
/// and the caption projection (once per forward, so `--layers` scales all but it).
fn flops(c: &MagiModelConfig, chunk_tokens: usize, chunks: usize, caption: usize) -> f64 {
    let tokens = (chunk_tokens * chunks) as f64;
    let d = c.hidden_size as f64;
    let q = (c.num_attention_heads * c.kv_channels) as f64;
    let kv = (c.num_query_groups * c.kv_channels) as f64;
    let ffn = c.ffn_hidden_size as f64;
    let mlp = d * ffn * if c.gated_linear_unit { 2.0 } else { 1.0 } + ffn * d;
    // q, k, v, cross q, the output projection over [self | cross], the MLP.
    let linear = 2.0 * tokens * (d * (q + 2.0 * kv) + d * q + 2.0 * q * d + mlp);
    // Chunk i's queries against (i + 1) chunks of keys; QK^T and AV.
    let keys: f64 = (0..chunks)
        .map(|i| (chunk_tokens * chunk_tokens * (i + 1)) as f64)
        .sum();
    let attention = 4.0 * q * (keys + tokens * caption as f64);
    let caption_kv = 2.0 * (chunks * caption) as f64 * d * 2.0 * kv;
    // Once per forward: every caption row (all 800, as upstream) projected for the
    // cross-attention.
    let caption_proj =
        2.0 * (chunks * c.caption_max_length * c.caption_channels * c.xattn_dim()) as f64;
    c.num_layers as f64 * (linear + attention + caption_kv) + caption_proj
}

fn candle_forward(
    c: &MagiModelConfig,
    dtype: DType,
    o: &Args,
    chunk_frames: usize,
) -> BoxResult<Vec<f64>> {
    let dev = motioncache::pipeline::parse_device(&o.device)?;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone());
    let dit = MagiDit::new(c, true, vb)?;
    let chunks = o.chunks;
    let frames = chunks * chunk_frames;
    let x = Tensor::randn(
        0f32,
        1.0,
        (1, c.in_channels, frames, o.height, o.width),
        &dev,
    )?;
    let p = c.patch_size;
    let ct = chunk_frames * (o.height / p) * (o.width / p);
    let t: Vec<f64> = (0..chunks)
        .map(|i| 0.2 + 0.6 * i as f64 / (chunks.max(2) - 1) as f64)
        .collect();
    let l = c.caption_max_length;
    let captions = Tensor::randn(0f32, 1.0, (chunks, l, c.caption_channels), &dev)?;
    let valid = o.caption_len.min(l);
    let mut m = vec![0f32; chunks * l];
    for i in 0..chunks {
        m[i * l..i * l + valid].fill(1.0);
    }
    let mask = Tensor::from_vec(m, (chunks, l), &dev)?;
    let kv_range: Vec<(usize, usize)> = (0..chunks).map(|i| (0, (i + 1) * ct)).collect();
    let inp = MagiInput {
        x: &x,
        t: &t,
        captions: &captions,
        caption_mask: &mask,
        null_condition: false,
        kv_range: &kv_range,
        slice_point: 0,
        chunk_offset: 0,
        num_steps: 64,
        distill_interval: Some(1.0),
        cancel: None,
        tokens: None,
    };
    let once = || -> candle_core::Result<Tensor> { dit.forward(&inp, None) };
    once()?;
    let mut secs = Vec::new();
    for _ in 0..o.reps {
        let started = Instant::now();
        let y = once()?;
        let s = y.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !s.is_finite() {
            return Err(format!(
                "candle MAGI-1 forward ({}) is not finite",
                dtype_name(dtype)
            )
            .into());
        }
        secs.push(started.elapsed().as_secs_f64());
    }
    Ok(secs)
}

fn torch_forward(
    python: &str,
    magi: &Path,
    cfg_path: &Path,
    dtype: DType,
    o: &Args,
    (layers, chunk_frames, threads): (usize, usize, usize),
) -> Option<Vec<f64>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_magi_forward.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--magi", &magi.display().to_string()])
        .args(["--config", &cfg_path.display().to_string()])
        .args(["--layers", &layers.to_string()])
        .args(["--chunks", &o.chunks.to_string()])
        .args(["--chunk-frames", &chunk_frames.to_string()])
        .args(["--height", &o.height.to_string()])
        .args(["--width", &o.width.to_string()])
        .args(["--caption-len", &o.caption_len.to_string()])
        .args(["--dtype", dtype_name(dtype)])
        .args(["--reps", &o.reps.to_string()])
        .args(["--threads", &threads.to_string()])
        .output();
    match out {
        Ok(out) if out.status.success() => serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v.get("seconds")?
                    .as_array()?
                    .iter()
                    .map(|s| s.as_f64())
                    .collect::<Option<Vec<f64>>>()
            })
            .or_else(|| {
                eprintln!(
                    "forward: the PyTorch side printed no {{\"seconds\": [...]}}: {:?}",
                    String::from_utf8_lossy(&out.stdout)
                );
                None
            }),
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

/// The MAGI-1 forward benchmark of `o` (`o.config` is `magi-4.5b` or an upstream
/// MagiConfig JSON).
pub fn run(o: Args) -> BoxResult<()> {
    let mut mc_json: serde_json::Value = if o.config == "magi-4.5b" {
        serde_json::from_str(MAGI_4_5B)?
    } else {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&o.config)?)?;
        v.get("model_config")
            .cloned()
            .ok_or_else(|| format!("{}: no model_config (not a MagiConfig JSON)", o.config))?
    };
    let full: MagiModelConfig = serde_json::from_value(mc_json.clone())?;
    let layers = o
        .layers
        .unwrap_or(full.num_layers)
        .clamp(1, full.num_layers);
    mc_json["num_layers"] = layers.into();
    let mc: MagiModelConfig = serde_json::from_value(mc_json.clone())?;
    let chunk_frames = o.chunk_frames;
    std::fs::create_dir_all(&o.out)?;
    let cfg_path = o.out.join("forward-magi-config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&upstream_json(&mc_json))?,
    )?;
    // The pool the kernels and candle's matrix multiplies run on (`RAYON_NUM_THREADS`).
    let threads = rayon::current_num_threads();
    let p = mc.patch_size;
    let ct = chunk_frames * (o.height / p) * (o.width / p);
    let fl = flops(&mc, ct, o.chunks, o.caption_len.min(mc.caption_max_length));
    println!(
        "MAGI-1 forward microbenchmark on {}: config {} ({} of {} layers, hidden {}), {} chunks \
         of {chunk_frames}x{}x{} latents ({} tokens), {} caption rows, {threads} threads",
        o.device,
        o.config,
        layers,
        full.num_layers,
        mc.hidden_size,
        o.chunks,
        o.height,
        o.width,
        ct * o.chunks,
        o.caption_len
    );
    let magi: Option<PathBuf> = o
        .magi
        .clone()
        .or_else(|| std::env::var_os("MAGI_ROOT").map(PathBuf::from));
    if magi.is_none() {
        eprintln!("forward: no --magi checkout (or MAGI_ROOT): the PyTorch side is skipped");
    }
    let mut rows = Vec::new();
    let mut md = String::from(
        "| dtype | layers | tokens | GFLOP | candle s | PyTorch s | candle faster by | candle s/layer | candle GFLOP/s | matmul peak GFLOP/s | of peak |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &dtype in &o.dtypes {
        let dev = motioncache::pipeline::parse_device(&o.device)?;
        let peak = matmul_peak(&dev, dtype, 2048, 3)?;
        let secs = candle_forward(&mc, dtype, &o, chunk_frames)?;
        let c = median(&secs);
        let t = match (o.python(), &magi) {
            (Some(py), Some(m)) => torch_forward(
                &py,
                m,
                &cfg_path,
                dtype,
                &o,
                (layers, chunk_frames, threads),
            ),
            _ => None,
        };
        let tm = t.as_deref().map(median);
        let rate = fl / c / 1e9;
        md.push_str(&format!(
            "| {} | {layers} | {} | {:.1} | {c:.3} | {} | {} | {:.3} | {rate:.1} | {peak:.1} | {:.0}% |\n",
            dtype_name(dtype),
            ct * o.chunks,
            fl / 1e9,
            tm.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
            tm.map(|v| format!("{:.2}x", v / c))
                .unwrap_or_else(|| "-".into()),
            c / layers as f64,
            100.0 * rate / peak
        ));
        rows.push(serde_json::json!({
            "config": o.config, "dtype": dtype_name(dtype), "layers": layers,
            "of_layers": full.num_layers, "tokens": ct * o.chunks, "chunks": o.chunks,
            "caption_rows": o.caption_len, "flops": fl, "candle_seconds": secs,
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
    super::forward::write_report(&o.out, "forward-magi", &rows, &md)
}
