//! bench.json and bench.md: the rows, the speed/quality frontiers, and the targets.

use std::path::{Path, PathBuf};

use super::BoxResult;

/// A JSON file given to option `flag`; errors name the option and the file.
pub fn load_json(flag: &str, path: &Path) -> BoxResult<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{flag} {}: {e}", path.display()))?)
}

#[derive(Clone, Debug)]
pub struct Row {
    /// The run's label (`motioncache-slow`, or the policy's name in a sweep).
    pub mode: String,
    /// The cache mode (`motioncache`, `teacache`, ...).
    pub policy: String,
    pub threshold: Option<f64>,
    pub schedule: String,
    /// Transformer (generator) plus VAE decode seconds over the prompts.
    pub seconds: f64,
    pub transformer_seconds: f64,
    pub vae_seconds: f64,
    pub speedup_vs_vanilla: f64,
    pub speedup_vs_none: f64,
    pub speedup_vs_diffusers: Option<f64>,
    /// Transformer FLOPs against diffusers' vanilla (whole window, dense attention).
    pub flops_ratio: f64,
    /// (transformer seconds / vanilla's) / (FLOPs / vanilla's): 1 = time follows FLOPs.
    pub transformer_time_over_flops: f64,
    pub recomputed_fraction: f64,
    /// Mean PSNR against vanilla's frames (99 for identical frames, see `exact`).
    pub psnr_db: f64,
    pub ssim: f64,
    /// Identical to vanilla's frames for every prompt.
    pub exact: bool,
    /// Mean recompute count of tokens in moving regions over that of static tokens
    /// (`motioncache::metrics::motion_selectivity`).
    pub moving_over_static: Option<f64>,
}

/// The reference implementation's results on the same model and schedule.
pub struct Reference {
    pub v: serde_json::Value,
}

impl Reference {
    pub fn load(path: &Path) -> BoxResult<Self> {
        Ok(Self {
            v: load_json("--reference", path)?,
        })
    }

    fn get(&self, key: &str) -> Option<f64> {
        self.v.get(key).and_then(|x| x.as_f64())
    }
}

/// A family's frontier: speedup (over vanilla) reachable at PSNR >= p, linear between its
/// Pareto points, with `none` (exact, every family's threshold 0) as the point at infinity.
/// A row that reproduces `none` (exact frames, or `none`'s own PSNR to 1e-6 dB: the same
/// frames, only timed again) is `none`, not a point of the family: otherwise timing noise
/// alone would decide whether a family draws a line from its highest lossy point to 55 dB.
pub fn frontier_at(rows: &[&Row], none: &Row, p: f64) -> f64 {
    let none_speedup = none.speedup_vs_vanilla;
    let is_none = |r: &Row| r.exact || (!none.exact && (r.psnr_db - none.psnr_db).abs() < 1e-6);
    let mut pts: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| !is_none(r))
        .map(|r| (r.psnr_db, r.speedup_vs_vanilla))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Pareto: keep points no higher-PSNR point beats in speed.
    let mut pareto: Vec<(f64, f64)> = Vec::new();
    for &(q, s) in pts.iter().rev() {
        let best = pareto.last().map_or(none_speedup, |l| l.1);
        if s > best {
            pareto.push((q, s));
        }
    }
    pareto.reverse(); // ascending PSNR, descending speed
    if pareto.is_empty() || p > pareto[pareto.len() - 1].0 {
        return none_speedup;
    }
    if p <= pareto[0].0 {
        return pareto[0].1;
    }
    for w in pareto.windows(2) {
        let ((q0, s0), (q1, s1)) = (w[0], w[1]);
        if p >= q0 && p <= q1 {
            let f = (p - q0) / (q1 - q0).max(1e-12);
            return s0 + f * (s1 - s0);
        }
    }
    none_speedup
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// `motioncache-bench report`: the report of an earlier run again, from its bench.json,
/// with new diffusers or reference timings (measured separately, e.g. when the first ones
/// were disturbed), without generating anything.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Folder with the run's bench.json; bench.md and bench.png are rewritten there.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// diffusers' seconds per schedule (tools/bench_diffusers.py's JSON).
    #[arg(long)]
    pub diffusers: Option<PathBuf>,
    /// The reference implementation's results (tools/reference_motioncache.py's JSON).
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

impl Row {
    /// The row as bench.json holds it.
    fn to_json(&self) -> serde_json::Value {
        let r = self;
        serde_json::json!({
            "mode": r.mode, "policy": r.policy, "threshold": r.threshold,
            "schedule": r.schedule, "seconds": r.seconds,
            "transformer_seconds": r.transformer_seconds, "vae_seconds": r.vae_seconds,
            "speedup_vs_vanilla": r.speedup_vs_vanilla, "speedup_vs_none": r.speedup_vs_none,
            "speedup_vs_diffusers": r.speedup_vs_diffusers,
            "flops_ratio": r.flops_ratio,
            "transformer_time_over_flops": r.transformer_time_over_flops,
            "recomputed_fraction": r.recomputed_fraction,
            "psnr_db": r.psnr_db, "ssim": r.ssim, "exact": r.exact,
            "moving_over_static": r.moving_over_static,
        })
    }

    /// A row of bench.json as `write` wrote it.
    fn from_json(v: &serde_json::Value) -> BoxResult<Self> {
        let f = |k: &str| -> BoxResult<f64> {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| format!("bench.json: row without a number {k:?}: {v}").into())
        };
        let s = |k: &str| -> BoxResult<String> {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("bench.json: row without a string {k:?}: {v}").into())
        };
        let opt = |k: &str| v.get(k).and_then(|x| x.as_f64());
        Ok(Self {
            mode: s("mode")?,
            policy: s("policy")?,
            threshold: opt("threshold"),
            schedule: s("schedule")?,
            seconds: f("seconds")?,
            transformer_seconds: f("transformer_seconds")?,
            vae_seconds: f("vae_seconds")?,
            speedup_vs_vanilla: f("speedup_vs_vanilla")?,
            speedup_vs_none: f("speedup_vs_none")?,
            speedup_vs_diffusers: opt("speedup_vs_diffusers"),
            flops_ratio: f("flops_ratio")?,
            transformer_time_over_flops: f("transformer_time_over_flops")?,
            recomputed_fraction: f("recomputed_fraction")?,
            psnr_db: f("psnr_db")?,
            ssim: f("ssim")?,
            exact: v.get("exact").and_then(|x| x.as_bool()).unwrap_or(false),
            moving_over_static: opt("moving_over_static"),
        })
    }
}

pub fn run(a: Args) -> BoxResult<()> {
    let path = a.out.join("bench.json");
    let v = load_json("--out", &path)?;
    let mut rows = v
        .as_array()
        .ok_or_else(|| format!("{}: not a list of rows", path.display()))?
        .iter()
        .map(Row::from_json)
        .collect::<BoxResult<Vec<_>>>()?;
    let diffusers = match &a.diffusers {
        Some(f) => Some(load_json("--diffusers", f)?),
        None => None,
    };
    if let Some(d) = &diffusers {
        for r in &mut rows {
            r.speedup_vs_diffusers = d
                .get(&r.schedule)
                .and_then(|x| x.as_f64())
                .map(|d| d / r.seconds);
        }
    }
    let reference = match &a.reference {
        Some(f) => Some(Reference::load(f)?),
        None => None,
    };
    write(&a.out, &rows, diffusers.as_ref(), reference.as_ref())?;
    super::plot::draw(&rows, &a.out.join("bench.png"))?;
    println!("wrote {}", a.out.display());
    Ok(())
}

pub fn write(
    out: &Path,
    rows: &[Row],
    diffusers: Option<&serde_json::Value>,
    reference: Option<&Reference>,
) -> BoxResult<()> {
    let json: Vec<serde_json::Value> = rows.iter().map(Row::to_json).collect();
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&json)?)?;

    let mut md = String::from(
        "| schedule | mode | threshold | seconds | transformer s | VAE s | vs vanilla | vs none | vs diffusers | FLOPs / vanilla | time/FLOPs | recomputed | moving/static | PSNR (dB) | SSIM |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x | {} | {:.3} | {:.2} | {:.3} | {} | {} | {:.4} |\n",
            r.schedule,
            r.mode,
            fmt_opt(r.threshold, |t| format!("{t}")),
            r.seconds,
            r.transformer_seconds,
            r.vae_seconds,
            r.speedup_vs_vanilla,
            r.speedup_vs_none,
            fmt_opt(r.speedup_vs_diffusers, |s| format!("{s:.2}x")),
            r.flops_ratio,
            r.transformer_time_over_flops,
            r.recomputed_fraction,
            fmt_opt(r.moving_over_static, |m| format!("{m:.2}")),
            if r.exact { "exact".into() } else { format!("{:.2}", r.psnr_db) },
            r.ssim
        ));
    }
    let schedules: Vec<&str> = {
        let mut v: Vec<&str> = rows.iter().map(|r| r.schedule.as_str()).collect();
        v.dedup();
        v
    };
    let families = [
        "teacache",
        "flowcache",
        "motioncache",
        "motioncache-reference",
    ];
    let grid = [20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0];
    let mut targets = String::new();
    md.push_str("\nFrontiers: speedup over our vanilla reachable at PSNR >= p (linear between each family's Pareto points; `none`, exact, beyond its highest PSNR; a threshold that reproduces none's frames counts as none).\n\n| schedule | family |");
    for p in grid {
        md.push_str(&format!(" {p} dB |"));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(grid.len()));
    md.push('\n');
    for s in &schedules {
        let of = |name: &str| -> Option<&Row> {
            rows.iter().find(|r| r.schedule == *s && r.mode == name)
        };
        let Some(none) = of("none") else { continue };
        let fam = |f: &str| -> Vec<&Row> {
            rows.iter()
                .filter(|r| r.schedule == *s && r.policy == f)
                .collect()
        };
        for f in families {
            let rs = fam(f);
            if rs.is_empty() {
                continue;
            }
            md.push_str(&format!("| {s} | {f} |"));
            for p in grid {
                md.push_str(&format!(" {:.2}x |", frontier_at(&rs, none, p)));
            }
            md.push('\n');
        }
        // Targets of issue 13, met or not.
        let mc = fam("motioncache");
        if !mc.is_empty() {
            let mut above = true;
            let mut worst = f64::INFINITY;
            for other in ["teacache", "flowcache"] {
                let o = fam(other);
                if o.is_empty() {
                    continue;
                }
                let mut p = 20.0;
                while p <= 35.0 + 1e-9 {
                    let a = frontier_at(&mc, none, p);
                    let b = frontier_at(&o, none, p);
                    worst = worst.min(a / b);
                    above &= a >= b - 1e-9;
                    p += 0.5;
                }
            }
            targets.push_str(&format!(
                "| {s}: motioncache's frontier at or above teacache's and flowcache's from 20 to 35 dB | worst ratio {worst:.2} | {} |\n",
                yes(above)
            ));
            let at30 = frontier_at(&mc, none, 30.0);
            if *s == "paper" {
                if let (Some(d), Some(v)) = (
                    diffusers
                        .and_then(|d| d.get("paper"))
                        .and_then(|x| x.as_f64()),
                    of("vanilla"),
                ) {
                    let vs_diff = at30 * d / v.seconds;
                    targets.push_str(&format!(
                        "| paper: motioncache >= 5x over diffusers' vanilla at PSNR >= 30 dB | {vs_diff:.2}x | {} |\n",
                        yes(vs_diff >= 5.0)
                    ));
                }
            } else {
                let vs_none = at30 / none.speedup_vs_vanilla;
                targets.push_str(&format!(
                    "| {s}: motioncache >= 1.8x over none at PSNR >= 30 dB | {vs_none:.2}x | {} |\n",
                    yes(vs_none >= 1.8)
                ));
            }
        }
        let worst_ratio = rows
            .iter()
            .filter(|r| r.schedule == *s && !r.exact && r.policy != "vanilla" && r.policy != "none")
            .map(|r| r.transformer_time_over_flops)
            .fold(0.0f64, f64::max);
        if worst_ratio > 0.0 {
            targets.push_str(&format!(
                "| {s}: every cached mode's transformer time ratio <= 1.25x its FLOP ratio | worst {worst_ratio:.2} | {} |\n",
                yes(worst_ratio <= 1.25)
            ));
        }
        if let (Some(v), Some(n)) = (of("vanilla"), of("none"))
            && *s == "element-default"
        {
            let r = v.transformer_seconds / n.transformer_seconds;
            targets.push_str(&format!(
                "| {s}: none at least as fast as vanilla (transformer) | {r:.2}x | {} |\n",
                yes(r >= 1.0)
            ));
        }
    }
    if let Some(d) = diffusers {
        md.push_str("\n| schedule | diffusers vanilla seconds | our vanilla seconds | ours faster by |\n|---|---|---|---|\n");
        for r in rows.iter().filter(|r| r.mode == "vanilla") {
            if let Some(s) = d.get(&r.schedule).and_then(|s| s.as_f64()) {
                md.push_str(&format!(
                    "| {} | {s:.2} | {:.2} | {:.2}x |\n",
                    r.schedule,
                    r.seconds,
                    s / r.seconds
                ));
                if r.schedule == "paper" {
                    targets.push_str(&format!(
                        "| paper: our vanilla >= 1.5x faster than diffusers' | {:.2}x | {} |\n",
                        s / r.seconds,
                        yes(s / r.seconds >= 1.5)
                    ));
                }
            }
        }
    }
    if let Some(re) = reference {
        reference_section(&mut md, &mut targets, rows, re);
    }
    if !targets.is_empty() {
        md.push_str("\n| target | measured | met? |\n|---|---|---|\n");
        md.push_str(&targets);
    }
    for s in &schedules {
        if let Some((spread, groups)) = timing_spread(rows, s) {
            md.push_str(&format!(
                "\nTiming noise on {s}: rows that give the same frames for the same work ({groups} group{}, e.g. `none` and the thresholds that reproduce it) took up to {:.0}% more transformer time than each other.\n",
                if groups == 1 { "" } else { "s" },
                (spread - 1.0) * 100.0
            ));
        }
    }
    std::fs::write(out.join("bench.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// The largest ratio of transformer seconds between two rows of `schedule` that did the
/// same work and gave the same frames (equal FLOPs, token work and PSNR: the same
/// computation timed twice), and how many such groups there are; `None` without any. It
/// says how far apart two timings of one computation fell in this run, which bounds what a
/// time ratio of the run can tell.
pub fn timing_spread(rows: &[Row], schedule: &str) -> Option<(f64, usize)> {
    let rs: Vec<&Row> = rows.iter().filter(|r| r.schedule == schedule).collect();
    let same = |a: &Row, b: &Row| {
        a.flops_ratio == b.flops_ratio
            && a.recomputed_fraction == b.recomputed_fraction
            && (a.exact == b.exact)
            && (a.exact || a.psnr_db == b.psnr_db)
    };
    let mut seen = vec![false; rs.len()];
    let (mut worst, mut groups) = (1.0f64, 0);
    for i in 0..rs.len() {
        if seen[i] {
            continue;
        }
        let group: Vec<usize> = (i..rs.len()).filter(|&j| same(rs[i], rs[j])).collect();
        if group.len() < 2 {
            continue;
        }
        groups += 1;
        let t = |j: &usize| rs[*j].transformer_seconds;
        let hi = group.iter().map(t).fold(0.0, f64::max);
        let lo = group.iter().map(t).fold(f64::INFINITY, f64::min);
        worst = worst.max(hi / lo);
        for j in group {
            seen[j] = true;
        }
    }
    (groups > 0).then_some((worst, groups))
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Our `motioncache-reference` against the reference code on the paper schedule, and our
/// default against the reference.
fn reference_section(md: &mut String, targets: &mut String, rows: &[Row], re: &Reference) {
    let (Some(rw), Some(rp)) = (re.get("work_ratio"), re.get("psnr_db")) else {
        md.push_str("\n(the reference file has no work_ratio / psnr_db)\n");
        return;
    };
    let schedule =
        re.v.get("schedule")
            .and_then(|s| s.as_str())
            .unwrap_or("paper");
    let ours = rows
        .iter()
        .find(|r| r.schedule == schedule && r.mode == "motioncache-reference");
    md.push_str(&format!(
        "\nReference implementation (ywlq/MotionCache, tools/reference_motioncache.py) on the same model, {schedule} schedule: token work {rw:.3} of its vanilla, PSNR {rp:.2} dB against its own vanilla{}.\n",
        re.get("speedup_vs_own_vanilla")
            .map(|s| format!(", {s:.2}x faster than its own vanilla"))
            .unwrap_or_default()
    ));
    if let Some(o) = ours {
        let work = o.recomputed_fraction;
        let close = (work - rw).abs() <= 0.1 * rw && (o.psnr_db - rp).abs() <= 1.0;
        targets.push_str(&format!(
            "| {schedule}: motioncache-reference matches the reference code (work within 10%, PSNR within 1 dB) | work {work:.3} vs {rw:.3}, PSNR {:.2} vs {rp:.2} dB | {} |\n",
            o.psnr_db,
            yes(close)
        ));
        // Our default at least as fast at >= 1 dB more: the frontier at the reference's
        // PSNR + 1 against our reference-mode row's speed.
        let none = rows
            .iter()
            .find(|r| r.schedule == schedule && r.mode == "none");
        let mc: Vec<&Row> = rows
            .iter()
            .filter(|r| r.schedule == schedule && r.policy == "motioncache")
            .collect();
        if let (false, Some(none)) = (mc.is_empty(), none) {
            let s = frontier_at(&mc, none, o.psnr_db.max(rp) + 1.0);
            targets.push_str(&format!(
                "| {schedule}: motioncache at PSNR >= reference + 1 dB at least as fast as motioncache-reference | {s:.2}x vs {:.2}x | {} |\n",
                o.speedup_vs_vanilla,
                yes(s >= o.speedup_vs_vanilla)
            ));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A row of schedule "s" with this PSNR and speedup over vanilla (the plot's tests
    /// use it too).
    pub(crate) fn row(psnr: f64, speed: f64) -> Row {
        Row {
            mode: "m".into(),
            policy: "m".into(),
            threshold: Some(0.1),
            schedule: "s".into(),
            seconds: 1.0,
            transformer_seconds: 1.0,
            vae_seconds: 0.0,
            speedup_vs_vanilla: speed,
            speedup_vs_none: 1.0,
            speedup_vs_diffusers: None,
            flops_ratio: 1.0,
            transformer_time_over_flops: 1.0,
            recomputed_fraction: 1.0,
            psnr_db: psnr,
            ssim: 1.0,
            exact: false,
            moving_over_static: None,
        }
    }

    #[test]
    fn frontier_interpolates_pareto_points() {
        let none = row(55.0, 1.2);
        // A threshold that reproduces none's frames (none's PSNR), timed a little faster.
        let rows = [
            row(20.0, 3.0),
            row(30.0, 2.0),
            row(25.0, 1.5),
            row(55.0, 1.3),
        ];
        let r: Vec<&Row> = rows.iter().collect();
        assert_eq!(frontier_at(&r, &none, 20.0), 3.0);
        assert!((frontier_at(&r, &none, 25.0) - 2.5).abs() < 1e-9);
        assert_eq!(frontier_at(&r, &none, 30.0), 2.0);
        assert_eq!(frontier_at(&r, &none, 31.0), 1.2);
        assert_eq!(frontier_at(&r, &none, 10.0), 3.0);
        // A lossy point slower than none is not on the frontier either.
        let rows = [row(40.0, 1.1)];
        let r: Vec<&Row> = rows.iter().collect();
        assert_eq!(frontier_at(&r, &none, 35.0), 1.2);
    }

    #[test]
    fn timing_spread_compares_only_the_same_computation() {
        let timed = |flops: f64, psnr: f64, secs: f64| Row {
            flops_ratio: flops,
            transformer_seconds: secs,
            ..row(psnr, 1.0)
        };
        // Two groups of the same work and frames (1.2x and 1.5x apart); the other rows
        // differ in work or in frames and are not compared.
        let rows = [
            timed(0.6, 30.0, 2.0),
            timed(0.6, 30.0, 2.4),
            timed(0.5, 25.0, 1.0),
            timed(0.5, 25.0, 1.5),
            timed(0.5, 26.0, 3.0),
            timed(0.4, 30.0, 9.0),
        ];
        let (spread, groups) = timing_spread(&rows, "s").unwrap();
        assert_eq!(groups, 2);
        assert!((spread - 1.5).abs() < 1e-12, "{spread}");
        assert!(timing_spread(&rows[4..], "s").is_none());
        assert!(timing_spread(&rows, "other").is_none());
    }

    #[test]
    fn rows_read_back_from_bench_json() {
        let mut r = row(27.5, 2.5);
        r.moving_over_static = Some(2.1);
        r.exact = true;
        let back = Row::from_json(&r.to_json()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{r:?}"));
        let mut v = r.to_json();
        v.as_object_mut().unwrap().remove("seconds");
        let e = Row::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("\"seconds\""), "{e}");
    }
}
