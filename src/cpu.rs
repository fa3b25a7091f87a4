//! Thread settings for candle on the CPU.
//!
//! Two of candle's defaults cost a small-model forward dearly on a machine with few cores:
//! without `RAYON_NUM_THREADS`, every matrix multiply asks `num_cpus` for the physical core
//! count, which parses `/proc/cpuinfo` (5% of a 64x64 run here); and its pool for
//! element-wise ops (`CANDLE_NUM_THREADS` threads) spins a worker that competes with the
//! matrix-multiply threads (8-17% on two cores). Applications set
//! `RAYON_NUM_THREADS=<cores> CANDLE_NUM_THREADS=1` in their environment, or call
//! [`tune_threads`] first thing in `main`.

/// The environment [`tune_threads`] would add: `(name, value)` for each variable that is
/// not set already.
pub fn recommended_env() -> Vec<(&'static str, String)> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    [
        ("RAYON_NUM_THREADS", cores.to_string()),
        ("CANDLE_NUM_THREADS", "1".to_string()),
    ]
    .into_iter()
    .filter(|(k, _)| std::env::var_os(k).is_none())
    .collect()
}

/// Sets [`recommended_env`] in this process's environment.
///
/// # Safety
///
/// Changing the environment is only sound while no other thread may read it: call this at
/// the start of `main`, before any thread (GStreamer's included) is started.
pub unsafe fn tune_threads() {
    for (k, v) in recommended_env() {
        // SAFETY: the caller guarantees that no other thread is running.
        unsafe { std::env::set_var(k, v) };
    }
}
