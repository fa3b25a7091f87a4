//! `motioncache-bench run`: every mode on both schedules, same prompts and seeds.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use motioncache::cache::{
    CacheMode, CacheSettings, CacheVariant, DistanceMode, MotionSource, Reuse, WeightNorm,
};
use motioncache::generate::{GeneratorSettings, NoiseSource};
use motioncache::metrics::{Frames, motion_selectivity, psnr, ssim};
use motioncache::pipeline::{ModelFamily, Pipeline, to_rgb24_truncated};

use super::BoxResult;
use super::report::{self, Row};

pub const PROMPTS: [&str; 4] = [
    "a red circle moving right on a striped blue background",
    "a yellow square moving left on a checkered green background",
    "a white triangle moving up on a plain black background",
    "a static green circle on a striped red background",
];

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Model directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder for bench.json, bench.md, bench.png.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Two prompts instead of four.
    #[arg(long)]
    pub quick: bool,
    /// Schedules to run (paper, element-default; magi for a MAGI-1 model).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Modes to run (vanilla and none always run: they are the references). Names:
    /// vanilla, none, teacache-slow, teacache-fast, flowcache-slow, flowcache-fast,
    /// motioncache-slow, motioncache-fast, motioncache-reference.
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<String>>,
    /// Also run teacache, flowcache, motioncache and motioncache-reference at several
    /// thresholds each (the speed/quality frontiers).
    #[arg(long)]
    pub sweep: bool,
    /// Thresholds of the sweep, for every family (default 0.02,0.05,0.1,0.2,0.3,0.5, and
    /// for motioncache sixteen from 0.25x to 10x its default threshold of the schedule,
    /// 0.5 / steps; MAGI-1 0.002,0.004,0.0065,0.01,0.02,0.04).
    #[arg(long, value_delimiter = ',')]
    pub thresholds: Option<Vec<f64>>,
    /// Override a setting of the motioncache modes, KEY=VALUE (warmup, floor, refresh,
    /// uniform, min-ratio, vote, reuse=residual|forecast, source=output|latent,
    /// norm=above-mean|max-rescale|mean-clamp|mean|max, full-last=true|false, full-first=true|false, kv-refresh=true|false, kv-refresh-window=N); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Generate every video this many times, in rounds over all prompts and modes, and keep
    /// its fastest transformer and VAE times (the runs are deterministic: a repeat that
    /// gives other frames is reported).
    /// Default: 5 on the element's schedule, whose videos take a few tenths of a second
    /// and whose single timings move by tens of percent on a small VM; 2 on "paper", whose
    /// single timings of the same video moved by up to 5% within one run; 1 elsewhere.
    /// tools/bench_diffusers.py runs diffusers' videos as often.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Windows of the element's schedule, at least 1 (default 2): a longer stream, over
    /// which the first block's full computation is spread.
    #[arg(long, default_value_t = ELEMENT_WINDOWS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub windows: usize,
    /// diffusers' seconds per schedule (tools/bench_diffusers.py's JSON).
    #[arg(long)]
    pub diffusers: Option<PathBuf>,
    /// The reference implementation's results (tools/reference_motioncache.py's JSON).
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

/// One mode of a run: a label, the cache settings, the threshold swept (if any).
#[derive(Clone)]
pub struct ModeSpec {
    pub label: String,
    pub cache: CacheSettings,
    pub threshold: Option<f64>,
}

/// Windows of the element's schedule by default: the window slides once.
pub const ELEMENT_WINDOWS: usize = 2;

/// The paper's setting on the model: 50 steps, guidance 6, asynchronous ar_step 5, blocks
/// of 5 latent frames over a 25-frame window, 5 frames of overlap history with addnoise 20;
/// 35 latent frames so that the window slides once. And the model's own defaults over
/// `windows` windows (two by default: the window slides once).
///
/// A MAGI-1 model has one schedule, `magi`: the reference's 64 steps (window 4, its key
/// ranges), four chunks.
pub fn scenarios(p: &Pipeline, windows: usize) -> Vec<(&'static str, GeneratorSettings)> {
    let d = p.info().defaults.clone();
    if p.info().family == ModelFamily::Magi1 {
        let magi = GeneratorSettings {
            steps: MAGI_STEPS,
            total_frames: Some(4 * d.causal_block_size),
            cache: CacheSettings::for_magi(CacheMode::MotionCache, MAGI_STEPS),
            ..d
        };
        return vec![("magi", magi)];
    }
    let paper = GeneratorSettings {
        steps: 50,
        shift: 8.0,
        guidance_scale: 6.0,
        causal_block_size: 5,
        ar_step: 5,
        window: 25,
        overlap: 5,
        addnoise_condition: 20.0,
        fps_class: 1,
        total_frames: Some(35),
        cache: d.cache.clone(),
    };
    let element = GeneratorSettings {
        total_frames: Some((d.window - d.overlap) * windows + d.overlap),
        ..d
    };
    vec![("paper", paper), ("element-default", element)]
}

fn apply_overrides(c: &mut CacheSettings, set: &[String]) -> BoxResult<()> {
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        let num = || -> BoxResult<f64> {
            v.parse::<f64>()
                .map_err(|_| format!("--set {k}: {v:?} is not a number").into())
        };
        let flag = || -> BoxResult<bool> {
            v.parse::<bool>()
                .map_err(|_| format!("--set {k}: {v:?} is not true or false").into())
        };
        match k {
            "warmup" => c.warmup_steps = num()? as usize,
            "floor" => c.weight_floor = num()?,
            "refresh" => c.refresh_interval = num()? as usize,
            "uniform" => c.uniform_updates = num()? as usize,
            "min-ratio" => c.min_update_ratio = num()?,
            "max-ratio" => c.max_update_ratio = num()?,
            "vote" => c.temporal_consistency = num()?,
            "full-last" => c.full_last_step = flag()?,
            "full-first" => c.full_first_block = flag()?,
            "kv-refresh" => c.kv_refresh = flag()?,
            "kv-refresh-window" => c.kv_refresh_window = num()? as usize,
            "distance" => {
                c.distance_mode = match v {
                    "global" => DistanceMode::Global,
                    "token" => DistanceMode::Token,
                    "observed" => DistanceMode::Observed,
                    _ => {
                        return Err(format!("--set distance={v}: global, token or observed").into());
                    }
                }
            }
            "reuse" => {
                c.reuse = match v {
                    "residual" => Reuse::Residual,
                    "forecast" => Reuse::Forecast,
                    _ => return Err(format!("--set reuse={v}: residual or forecast").into()),
                }
            }
            "source" => {
                c.motion_source = match v {
                    "output" => MotionSource::Output,
                    "latent" => MotionSource::CleanLatent,
                    _ => return Err(format!("--set source={v}: output or latent").into()),
                }
            }
            "norm" => {
                c.weight_norm = match v {
                    "max-rescale" => WeightNorm::MaxRescale,
                    "mean-clamp" => WeightNorm::MeanClamp,
                    "above-mean" => WeightNorm::AboveMean,
                    "mean" => WeightNorm::Mean,
                    "max" => WeightNorm::Max,
                    _ => return Err(format!("--set norm={v}: unknown").into()),
                }
            }
            _ => return Err(format!("--set: unknown key {k:?}").into()),
        }
    }
    Ok(())
}

/// The named modes and, with `--sweep`, the threshold sweeps, for a schedule of `steps`.
fn modes(a: &Args, steps: usize, model: &CacheSettings) -> BoxResult<Vec<ModeSpec>> {
    let base = |mode: CacheMode| -> BoxResult<CacheSettings> {
        let mut c = model.defaults_for(mode, steps);
        if mode == CacheMode::MotionCache {
            apply_overrides(&mut c, &a.set)?;
        }
        Ok(c)
    };
    let at = |mode: CacheMode, label: &str, t: f64| -> BoxResult<ModeSpec> {
        let mut cache = base(mode)?;
        cache.set_threshold(t);
        Ok(ModeSpec {
            label: label.to_string(),
            cache,
            threshold: Some(t),
        })
    };
    let exact = |mode: CacheMode| -> BoxResult<ModeSpec> {
        Ok(ModeSpec {
            label: mode.name().to_string(),
            cache: base(mode)?,
            threshold: None,
        })
    };
    // MAGI-1's thresholds are those of the relative change of the patch-embedded input
    // (the reference's 0.0065), not of the rescaled modulation distance.
    let magi = model.variant == CacheVariant::Magi;
    // motioncache's threshold scales with the schedule (0.5 / steps): its named points
    // and its sweep are multiples of that default.
    let mc = CacheSettings::scaled_threshold(steps);
    let (slow, fast, reference, sweep, mc_sweep) = if magi {
        let sweep = vec![0.002, 0.004, 0.0065, 0.01, 0.02, 0.04];
        (
            [MAGI_SLOW; 3],
            [MAGI_FAST; 3],
            MAGI_SLOW,
            sweep.clone(),
            sweep,
        )
    } else {
        (
            [0.1, 0.1, mc * MOTIONCACHE_SLOW],
            [0.2, 0.15, mc * MOTIONCACHE_FAST],
            0.1,
            vec![0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
            // Rounded, so that 0.0375 is not printed as 0.037500000000000006.
            MOTIONCACHE_SWEEP
                .iter()
                .map(|m| (m * mc * 1e6).round() / 1e6)
                .collect(),
        )
    };
    let mut named = vec![
        exact(CacheMode::Vanilla)?,
        exact(CacheMode::None)?,
        at(CacheMode::TeaCache, "teacache-slow", slow[0])?,
        at(CacheMode::TeaCache, "teacache-fast", fast[0])?,
        at(CacheMode::FlowCache, "flowcache-slow", slow[1])?,
        at(CacheMode::FlowCache, "flowcache-fast", fast[1])?,
        at(CacheMode::MotionCache, "motioncache-slow", slow[2])?,
        at(CacheMode::MotionCache, "motioncache-fast", fast[2])?,
        at(
            CacheMode::MotionCacheReference,
            "motioncache-reference",
            reference,
        )?,
    ];
    if let Some(only) = &a.modes {
        for m in only {
            if !named.iter().any(|n| &n.label == m) {
                return Err(format!("--modes: unknown mode {m:?}").into());
            }
        }
        named.retain(|n| {
            n.label == "vanilla" || n.label == "none" || only.iter().any(|m| m == &n.label)
        });
    }
    if a.sweep {
        for mode in [
            CacheMode::TeaCache,
            CacheMode::FlowCache,
            CacheMode::MotionCache,
            CacheMode::MotionCacheReference,
        ] {
            if a.modes
                .as_ref()
                .is_some_and(|o| !o.iter().any(|m| m.starts_with(mode.name())))
            {
                continue;
            }
            let ts = match (&a.thresholds, mode) {
                (Some(ts), _) => ts,
                (None, CacheMode::MotionCache) => &mc_sweep,
                (None, _) => &sweep,
            };
            for &t in ts {
                named.push(at(mode, mode.name(), t)?);
            }
        }
    }
    Ok(named)
}

/// The named motioncache points ("slow" and "fast", as the paper names two thresholds of
/// one method) as multiples of its default threshold for the schedule (0.5 / steps):
/// the default itself and twice it.
pub const MOTIONCACHE_SLOW: f64 = 1.0;
pub const MOTIONCACHE_FAST: f64 = 2.0;
/// motioncache's sweep, multiples of its default threshold for the schedule (paper, 50
/// steps: 0.0025 to 0.1; element, 10 steps: 0.0125 to 0.5). Up to 10x since the first
/// block is computed in full (`full_first_block`), which keeps 23.5 dB at 5x on the paper
/// schedule: the frontier's low end (20 dB, the reference's PSNR + 1 dB) needs points
/// below it. Denser where its PSNR
/// falls fastest (from 38 to 29 dB between 1.5x and 2x on the paper schedule, from exact
/// to 25 dB between 0.25x and 0.5x at 10 steps), so that the frontier between two points
/// is not a straight line over a cliff), and on both sides of 2x.
pub const MOTIONCACHE_SWEEP: [f64; 16] = [
    0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 5.0, 6.25, 7.5, 10.0,
];
/// MAGI-1's: the reference's threshold and twice it.
pub const MAGI_SLOW: f64 = 0.0065;
pub const MAGI_FAST: f64 = 0.013;
/// MAGI-1's benchmark schedule: the reference's (and the paper's) 64 steps.
pub const MAGI_STEPS: usize = 64;

/// One video in one mode.
#[derive(Default)]
pub struct Outcome {
    pub transformer_seconds: f64,
    pub vae_seconds: f64,
    pub frames: Vec<Vec<u8>>,
    pub flops: f64,
    pub vanilla_flops: f64,
    pub recomputed: usize,
    pub total: usize,
    pub token_recomputes: Vec<(motioncache::generate::BlockStats, Vec<Vec<u8>>)>,
}

impl Outcome {
    /// Counts a finished block's statistics and frames (and keeps the statistics with
    /// the frames when `keep_stats`).
    fn add(
        &mut self,
        stats: &motioncache::generate::BlockStats,
        frames: Vec<Vec<u8>>,
        keep_stats: bool,
    ) {
        self.flops += stats.flops;
        self.vanilla_flops += stats.vanilla_flops;
        self.recomputed += stats.tokens_recomputed;
        self.total += stats.tokens_total;
        if keep_stats {
            self.token_recomputes.push((stats.clone(), frames.clone()));
        }
        self.frames.extend(frames);
    }
}

pub fn generate(
    p: &Arc<Pipeline>,
    prompt: &str,
    s: &GeneratorSettings,
    seed: u64,
    keep_stats: bool,
) -> motioncache::Result<Outcome> {
    if let Some(model) = p.magi() {
        return generate_magi(p, model, prompt, s, seed, keep_stats);
    }
    let size = (p.info().width, p.info().height);
    let cancel = AtomicBool::new(false);
    let cond = p.encode_prompt(prompt)?;
    let neg = p.encode_prompt("")?;
    let mut st = p.stream_with_contexts(&cond, &neg, s.clone(), NoiseSource::Seed(seed), size)?;
    let mut o = Outcome::default();
    loop {
        let t0 = Instant::now();
        let g = st.generator().ok_or_else(|| {
            motioncache::Error::setting("model", &p.info().name, "a SkyReels-V2 model")
        })?;
        let Some(b) = g.next_block(&cancel)? else {
            break;
        };
        o.transformer_seconds += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let d = st.decode(b)?;
        o.vae_seconds += t1.elapsed().as_secs_f64();
        o.add(&d.stats, d.frames, keep_stats);
    }
    Ok(o)
}

/// [`generate`] for MAGI-1: the walk (the transformer's time) and the VAE timed apart.
fn generate_magi(
    p: &Arc<Pipeline>,
    model: &Arc<motioncache::model::magi::stream::MagiModel>,
    prompt: &str,
    s: &GeneratorSettings,
    seed: u64,
    keep_stats: bool,
) -> motioncache::Result<Outcome> {
    use motioncache::model::magi::stream::{MagiStream, MagiStreamSettings};
    let cw = model.config().runtime_config.chunk_width;
    let size = (p.info().width, p.info().height);
    let settings = MagiStreamSettings::from_generator(s, cw, size);
    let cancel = AtomicBool::new(false);
    let mut st = MagiStream::new(model.clone(), prompt, &settings, seed)?;
    let mut o = Outcome::default();
    loop {
        let t0 = Instant::now();
        let Some(chunk) = st.next_chunk(&cancel)? else {
            break;
        };
        o.transformer_seconds += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let frames = to_rgb24_truncated(&model.decode(&chunk.latents)?)?;
        o.vae_seconds += t1.elapsed().as_secs_f64();
        o.add(&chunk.stats, frames, keep_stats);
    }
    Ok(o)
}

pub fn run(a: Args) -> BoxResult<()> {
    std::fs::create_dir_all(&a.out)?;
    let p = super::load_model(a.model.as_deref())?;
    let prompts: &[&str] = if a.quick { &PROMPTS[..2] } else { &PROMPTS };
    let scen: Vec<_> = scenarios(&p, a.windows)
        .into_iter()
        .filter(|(n, _)| {
            a.scenarios
                .as_ref()
                .is_none_or(|o| o.iter().any(|x| x == n))
        })
        .collect();
    if scen.is_empty() {
        return Err("--scenarios: none of paper, element-default (magi for MAGI-1)".into());
    }
    let diffusers = match &a.diffusers {
        Some(f) => Some(report::load_json("--diffusers", f)?),
        None => None,
    };
    // The pool the kernels and candle's matrix multiplies run on (`RAYON_NUM_THREADS`).
    let threads = rayon::current_num_threads();
    println!(
        "model: {} ({}x{} @ {} fps), {} prompts, {threads} threads",
        p.info().name,
        p.info().width,
        p.info().height,
        p.info().fps_num,
        prompts.len(),
    );
    let mut rows = Vec::new();
    for (sname, base) in &scen {
        let specs = modes(&a, base.steps, &base.cache)?;
        // Round by round, and in each round prompt by prompt with every mode in turn
        // (forwards for even prompts, backwards for odd ones), so that a machine whose
        // speed drifts during the run (a shared VM drifts by several percent within
        // minutes) slows every mode alike instead of the modes run last, and a video's
        // repeats (its fastest time is kept) fall at different times of the run instead of
        // one after another in one slow minute.
        let mut outs: Vec<Vec<Outcome>> = specs.iter().map(|_| Vec::new()).collect();
        let rounds = repeats(&a, sname);
        for round in 0..rounds {
            for (i, prompt) in prompts.iter().enumerate() {
                let seed = 1024 + i as u64;
                let order: Vec<usize> = if (i + round) % 2 == 0 {
                    (0..specs.len()).collect()
                } else {
                    (0..specs.len()).rev().collect()
                };
                for j in order {
                    let m = &specs[j];
                    let mut s = base.clone();
                    s.cache = m.cache.clone();
                    let o = generate(&p, prompt, &s, seed, round == 0)?;
                    let label = m.threshold.map(|t| format!("{t}")).unwrap_or_default();
                    eprintln!(
                        "{sname} {:<22} {label:>6} prompt {i} round {round}: transformer {:.3} s, vae {:.3} s",
                        m.label, o.transformer_seconds, o.vae_seconds
                    );
                    if round == 0 {
                        outs[j].push(o);
                        continue;
                    }
                    let first = &mut outs[j][i];
                    if o.frames != first.frames {
                        eprintln!(
                            "warning: {sname} {} prompt {i}: a repeat gave other frames (the first run's are kept)",
                            m.label
                        );
                    }
                    first.transformer_seconds =
                        first.transformer_seconds.min(o.transformer_seconds);
                    first.vae_seconds = first.vae_seconds.min(o.vae_seconds);
                }
            }
        }
        let results: Vec<(ModeSpec, Vec<Outcome>)> = specs.into_iter().zip(outs).collect();
        let diff_secs = diffusers
            .as_ref()
            .and_then(|v| v.get(*sname))
            .and_then(|s| s.as_f64());
        rows.extend(summarise(&p, sname, &results, diff_secs)?);
    }
    let reference = match &a.reference {
        Some(f) => Some(report::Reference::load(f)?),
        None => None,
    };
    report::write(&a.out, &rows, diffusers.as_ref(), reference.as_ref())?;
    super::plot::draw(&rows, &a.out.join("bench.png"))?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// How many times each video of `schedule` is generated (see [`Args::repeats`]).
fn repeats(a: &Args, schedule: &str) -> usize {
    a.repeats
        .unwrap_or(match schedule {
            "element-default" => 5,
            "paper" => 2,
            _ => 1,
        })
        .max(1)
}

/// Rows of one schedule: each mode against vanilla (index 0) and none (index 1).
fn summarise(
    p: &Pipeline,
    schedule: &str,
    results: &[(ModeSpec, Vec<Outcome>)],
    diffusers_seconds: Option<f64>,
) -> BoxResult<Vec<Row>> {
    let sum = |i: usize, f: &dyn Fn(&Outcome) -> f64| results[i].1.iter().map(f).sum::<f64>();
    let total = |o: &Outcome| o.transformer_seconds + o.vae_seconds;
    let (van, non) = (sum(0, &total), sum(1, &total));
    let van_tr = sum(0, &|o| o.transformer_seconds);
    let van_flops = sum(0, &|o| o.flops);
    let (w, h) = (p.info().width, p.info().height);
    let mut rows = Vec::new();
    for (i, (m, outs)) in results.iter().enumerate() {
        let (mut ps, mut ss, mut exact) = (0.0, 0.0, true);
        let mut per_prompt = Vec::new();
        for (o, v) in outs.iter().zip(&results[0].1) {
            let a = Frames {
                frames: &o.frames,
                width: w,
                height: h,
            };
            let b = Frames {
                frames: &v.frames,
                width: w,
                height: h,
            };
            let q = psnr(&a, &b)?;
            per_prompt.push(format!("{:.2}", q.min(99.0)));
            exact &= !q.is_finite() || q >= 99.0;
            ps += q.min(99.0);
            ss += ssim(&a, &b)?;
        }
        eprintln!(
            "{schedule} {:<22} {:>6} PSNR per prompt (dB): {}",
            m.label,
            m.threshold.map(|t| format!("{t}")).unwrap_or_default(),
            per_prompt.join(" ")
        );
        let n = outs.len() as f64;
        let secs = sum(i, &total);
        let tr = sum(i, &|o| o.transformer_seconds);
        let flops = sum(i, &|o| o.flops);
        let vflops = sum(i, &|o| o.vanilla_flops);
        let rec: usize = outs.iter().map(|o| o.recomputed).sum();
        // Recompute counts of moving against static tokens, over the moving prompts.
        let (mut mv, mut st, mut k) = (0.0, 0.0, 0);
        for o in outs {
            if let Some((a, b)) = motion_selectivity(&o.token_recomputes, w, h) {
                mv += a;
                st += b;
                k += 1;
            }
        }
        let tot: usize = outs.iter().map(|o| o.total).sum();
        rows.push(Row {
            mode: m.label.clone(),
            policy: m.cache.mode.name().to_string(),
            threshold: m.threshold,
            schedule: schedule.to_string(),
            seconds: secs,
            transformer_seconds: tr,
            vae_seconds: sum(i, &|o| o.vae_seconds),
            speedup_vs_vanilla: van / secs,
            speedup_vs_none: non / secs,
            speedup_vs_diffusers: diffusers_seconds.map(|d| d / secs),
            flops_ratio: flops / vflops,
            transformer_time_over_flops: (tr / van_tr) / (flops / van_flops),
            recomputed_fraction: rec as f64 / tot.max(1) as f64,
            psnr_db: ps / n,
            ssim: ss / n,
            exact,
            moving_over_static: (k > 0 && st > 0.0).then(|| mv / st),
        });
    }
    Ok(rows)
}
