//! `motioncache-bench ops`: the two largest operations of a SkyReels-V2 540P run on a
//! device, with random weights: block-causal attention of one block against its window
//! (10,200 queries x 51,000 keys, 12 heads of 128) and the VAE decode of one block (5 latent
//! frames of 68 x 120 -> 17 frames of 544 x 960). Each must be finite and match a CPU
//! reference on a slice (attention: 16 query rows of the first head; VAE: the first latent
//! frame, which the causal decoder decodes alone). A smaller block-causal attention with
//! four groups (three blocks over a prefix, a second branch's cache) is compared whole.
//! bf16 on CUDA, where attention is the fused kernel (src/model/cuda/attention.cu), and
//! the TFLOP/s of the large attention say how fast it is. Prints one JSON object.
//!
//!     motioncache-bench ops [--device cuda] [--size 540p|tiny]
//!
//! `--size tiny` runs the same code at shapes a CPU takes in seconds (CI runs it through
//! tools/gpu-validate.sh --device cpu, so the script cannot rot).

use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use motioncache::model::kernels::{Group, sdpa_grouped};
use motioncache::model::vae::{WanVae, WanVaeConfig};

use super::BoxResult;
use super::forward::Recorded;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// cpu, cuda or cuda:N (a `cuda` build).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// 540p: the real sizes; tiny: the same operations at small sizes.
    #[arg(long, default_value = "540p", value_parser = ["540p", "tiny"])]
    size: String,
}

struct Sizes {
    heads: usize,
    head_dim: usize,
    queries: usize,
    keys: usize,
    latent: (usize, usize, usize),
}

fn sizes(name: &str) -> Sizes {
    match name {
        "540p" => Sizes {
            heads: 12,
            head_dim: 128,
            queries: 10_200,
            keys: 51_000,
            latent: (5, 68, 120),
        },
        _ => Sizes {
            heads: 2,
            head_dim: 32,
            queries: 96,
            keys: 480,
            latent: (2, 8, 12),
        },
    }
}

fn finite(t: &Tensor) -> candle_core::Result<bool> {
    let s = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// max |a - b| / max |b|, on the CPU in f32.
fn rel_max(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (a, b) = (f(a)?, f(b)?);
    let d = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok((d / m.max(f32::MIN_POSITIVE)) as f64)
}

fn attention(dev: &Device, dtype: DType, s: &Sizes) -> BoxResult<serde_json::Value> {
    let cpu = Device::Cpu;
    let (h, d, n, l) = (s.heads, s.head_dim, s.queries, s.keys);
    let q = Tensor::randn(0f32, 1.0, (1, h, n, d), dev)?.to_dtype(dtype)?;
    let k = Tensor::randn(0f32, 1.0, (1, h, l, d), dev)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (1, h, l, d), dev)?.to_dtype(dtype)?;
    // The last block of a window: its queries see every key.
    let group = [Group {
        q_start: 0,
        q_len: n,
        k_start: 0,
        keys: l,
    }];
    sdpa_grouped(&q, &k, &v, &group)?;
    dev.synchronize()?;
    let t = Instant::now();
    let out = sdpa_grouped(&q, &k, &v, &group)?;
    dev.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let rows = 16.min(n);
    let slice = |x: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        x.i((.., 0..1, 0..len, ..))?
            .to_device(&cpu)?
            .to_dtype(DType::F32)
    };
    let reference = sdpa_grouped(
        &slice(&q, rows)?,
        &slice(&k, l)?,
        &slice(&v, l)?,
        &[Group {
            q_start: 0,
            q_len: rows,
            k_start: 0,
            keys: l,
        }],
    )?;
    let err = rel_max(&out.i((.., 0..1, 0..rows, ..))?, &reference)?;
    let flops = 4.0 * (h * n * l * d) as f64;
    Ok(serde_json::json!({
        "queries": n, "keys": l, "heads": h, "head_dim": d,
        "finite": finite(&out)?, "seconds": secs, "tflops": flops / secs / 1e12,
        "slice_rel_max_error": err,
    }))
}

/// Block-causal attention as the forward calls it (a prefix, three blocks, a second
/// guidance branch's cache, one launch per group on CUDA), on the device against the CPU
/// kernel over the whole output.
fn attention_groups(dev: &Device, dtype: DType, s: &Sizes) -> BoxResult<serde_json::Value> {
    let (h, d) = (s.heads, s.head_dim);
    let (prefix, block, branch) = (500, 300, 200);
    let n = 3 * block + branch;
    let l = prefix + 3 * block + prefix + branch;
    let mut groups: Vec<Group> = (0..3)
        .map(|b| Group {
            q_start: b * block,
            q_len: block,
            k_start: 0,
            keys: prefix + (b + 1) * block,
        })
        .collect();
    groups.push(Group {
        q_start: 3 * block,
        q_len: branch,
        k_start: prefix + 3 * block,
        keys: prefix + branch,
    });
    let r = |len: usize| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, (1, h, len, d), dev)?.to_dtype(dtype)
    };
    let (q, k, v) = (r(n)?, r(l)?, r(l)?);
    let out = sdpa_grouped(&q, &k, &v, &groups)?;
    let f = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let reference = sdpa_grouped(&f(&q)?, &f(&k)?, &f(&v)?, &groups)?;
    Ok(serde_json::json!({
        "groups": groups.len(), "queries": n, "keys": l, "heads": h, "head_dim": d,
        "finite": finite(&out)?, "rel_max_error": rel_max(&out, &reference)?,
    }))
}

fn vae(dev: &Device, dtype: DType, s: &Sizes) -> BoxResult<serde_json::Value> {
    let cfg = WanVaeConfig::default();
    let weights = Recorded::default();
    let cpu_vae = WanVae::new(
        &cfg,
        VarBuilder::from_backend(Box::new(weights.clone()), DType::F32, Device::Cpu),
    )?;
    let map = weights.0.lock().expect("weights lock").clone();
    let vae = WanVae::new(&cfg, VarBuilder::from_tensors(map, dtype, dev))?;

    let (t, h, w) = s.latent;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.z_dim, t, h, w), &Device::Cpu)?;
    let first = z.narrow(2, 0, 1)?;
    // Warm-up (kernel loading), then one block timed.
    let got_first = vae.decode(&first.to_device(dev)?)?;
    dev.synchronize()?;
    let start = Instant::now();
    let video = vae.decode(&z.to_device(dev)?)?;
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let reference = cpu_vae.decode(&first)?;
    Ok(serde_json::json!({
        "latent": [t, h, w], "frames": video.dim(2)?, "height": video.dim(3)?,
        "width": video.dim(4)?, "elements": video.elem_count(),
        "finite": finite(&video)?, "seconds": secs,
        "first_frame_rel_max_error": rel_max(&got_first, &reference)?,
    }))
}

pub fn run(a: Args) -> BoxResult<()> {
    let dev = motioncache::pipeline::parse_device(&a.device)?;
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let s = sizes(&a.size);
    let report = serde_json::json!({
        "device": a.device,
        "size": a.size,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "attention": attention(&dev, dtype, &s)?,
        "attention_groups": attention_groups(&dev, dtype, &s)?,
        "vae_decode": vae(&dev, dtype, &s)?,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
