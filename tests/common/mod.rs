//! Helpers shared by the integration tests (`mod common;` in each test crate).

use candle_core::{DType, Tensor};

/// Relative L2 error `|a - b| / |b|`, computed in f64 whatever the tensors' dtype.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let sq = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .and_then(|t| t.sqr()?.sum_all()?.to_scalar::<f64>())
            .expect("sum of squares")
    };
    let a = a.to_dtype(DType::F64).expect("f64");
    let b = b.to_dtype(DType::F64).expect("f64");
    let d = (&a - &b).expect("difference");
    (sq(&d) / sq(&b).max(f64::MIN_POSITIVE)).sqrt()
}
