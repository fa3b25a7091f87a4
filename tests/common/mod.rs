//! Helpers shared by the integration tests (`mod common;` in each test crate).

use candle_core::{DType, Device, Tensor};

/// The repository root the fixtures are read from: `MOTIONCACHE_REPO` (test binaries
/// carried to another machine, see tools/gpu-pack.sh), else where they were built.
#[allow(dead_code)]
pub fn repo() -> std::path::PathBuf {
    std::env::var_os("MOTIONCACHE_REPO")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

/// The device the parity tests run on: `MOTIONCACHE_TEST_DEVICE` (cpu, cuda, cuda:N; a
/// `cuda` build), the CPU when unset. tools/gpu-validate.sh runs them on a GPU this way.
#[allow(dead_code)]
pub fn device() -> Device {
    match std::env::var("MOTIONCACHE_TEST_DEVICE") {
        Ok(d) => motioncache::pipeline::parse_device(&d).expect("MOTIONCACHE_TEST_DEVICE"),
        Err(_) => Device::Cpu,
    }
}

/// Relative L2 error `|a - b| / |b|`, computed in f64 whatever the tensors' dtype.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let sq = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f64>())
            .expect("sum of squares")
    };
    // Compared on the CPU, whichever device computed them.
    let a = a
        .to_device(&Device::Cpu)
        .and_then(|a| a.to_dtype(DType::F64))
        .expect("f64");
    let b = b
        .to_device(&Device::Cpu)
        .and_then(|b| b.to_dtype(DType::F64))
        .expect("f64");
    let d = (&a - &b).expect("difference");
    (sq(&d) / sq(&b).max(f64::MIN_POSITIVE)).sqrt()
}
