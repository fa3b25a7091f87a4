//! What a reused token's output is: its transformer input plus a residual `out - in` from
//! its last computation (the default), or that residual extrapolated to the current noise
//! level from the token's last two computations (first order in sigma, TaylorSeer-style,
//! `Reuse::Forecast`: three element-wise ops per block-step). `motioncache` forecasts
//! from 20 steps on: on the embedded model's 10 steps the forecast lost prompt adherence
//! (colour right in 4 of 12 streams against 10 with the last residual), on the paper's 50
//! it gains 1 to 2 dB at the same work and time.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::cache::Reuse;
use crate::model::kernels::with_host_f32;

/// Extrapolation is clamped to at most this many times the last computed interval.
const MAX_FORECAST: f32 = 1.0;

/// Residuals of every token of one attention block in one guidance branch.
pub(crate) struct ResidualStore {
    data: Data,
    sigma_last: Vec<f32>,
    sigma_prev: Vec<f32>,
}

/// Each token's residual at its last computation and at the one before (`prev`, where
/// `sigma_prev` is finite), `[tokens, dim]`.
enum Data {
    /// On the CPU in f32, plain rows: a partial update copies the computed rows in place
    /// and a prediction is written in one pass, where tensor ops would copy every row of
    /// both residuals several times per block-step.
    Host {
        last: Vec<f32>,
        prev: Option<Vec<f32>>,
        dim: usize,
        device: Device,
    },
    /// Elsewhere, tensors on the device.
    Device { last: Tensor, prev: Option<Tensor> },
}

impl ResidualStore {
    pub fn new(residual: Tensor, sigma: f64) -> candle_core::Result<Self> {
        let (n, dim) = residual.dims2()?;
        let data = if is_host(&residual) {
            Data::Host {
                last: residual.flatten_all()?.to_vec1::<f32>()?,
                prev: None,
                dim,
                device: residual.device().clone(),
            }
        } else {
            Data::Device {
                last: residual,
                prev: None,
            }
        };
        Ok(Self {
            data,
            sigma_last: vec![sigma as f32; n],
            sigma_prev: vec![f32::NAN; n],
        })
    }

    /// Per token, how far ahead of its last computation `sigma` lies, in units of its last
    /// computed interval (0: reuse the last residual); `None` when no token extrapolates.
    fn ratios(&self, sigma: f64, reuse: Reuse) -> Option<Vec<f32>> {
        let has_prev = match &self.data {
            Data::Host { prev, .. } => prev.is_some(),
            Data::Device { prev, .. } => prev.is_some(),
        };
        if reuse != Reuse::Forecast || !has_prev {
            return None;
        }
        let ratio: Vec<f32> = self
            .sigma_last
            .iter()
            .zip(&self.sigma_prev)
            .map(|(&l, &p)| {
                let span = l - p;
                if p.is_finite() && span.abs() > 1e-9 {
                    ((sigma as f32 - l) / span).clamp(0.0, MAX_FORECAST)
                } else {
                    0.0
                }
            })
            .collect();
        ratio.iter().any(|&r| r != 0.0).then_some(ratio)
    }

    /// The residual every token would reuse at `sigma`.
    pub fn predict(&self, sigma: f64, reuse: Reuse) -> candle_core::Result<Tensor> {
        self.predict_with(sigma, reuse, None)
    }

    /// The residual every token would reuse at `sigma`, with the rows `idx` (sorted,
    /// distinct; as a `[m]` u32 tensor and its values) replaced by `fresh` `[m, dim]`.
    pub fn predict_replacing(
        &self,
        sigma: f64,
        reuse: Reuse,
        idx: &Tensor,
        idx_vec: &[u32],
        fresh: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.predict_with(sigma, reuse, Some((idx, idx_vec, fresh)))
    }

    fn predict_with(
        &self,
        sigma: f64,
        reuse: Reuse,
        fresh: Option<(&Tensor, &[u32], &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let ratio = self.ratios(sigma, reuse);
        let n = self.sigma_last.len();
        match &self.data {
            Data::Host {
                last,
                prev,
                dim,
                device,
            } => {
                let d = *dim;
                let mut out = vec![0f32; n * d];
                let mut done = vec![false; n];
                if let Some((_, idx, rows)) = fresh {
                    check_rows(n, d, idx, rows)?;
                    with_host_f32(rows, |r| {
                        for (k, &i) in idx.iter().enumerate() {
                            let i = i as usize;
                            out[i * d..(i + 1) * d].copy_from_slice(&r[k * d..(k + 1) * d]);
                            done[i] = true;
                        }
                    })?;
                }
                let rows = HostRows::new(last, prev, &ratio, d);
                out.par_chunks_mut(d)
                    .with_min_len(ROWS_PER_TASK)
                    .enumerate()
                    .filter(|(i, _)| !done[*i])
                    .for_each(|(i, dst)| rows.write(i, dst));
                Tensor::from_vec(out, (n, d), device)
            }
            Data::Device { last, prev } => {
                let pred = match (ratio, prev) {
                    (Some(ratio), Some(prev)) => {
                        let r = Tensor::from_vec(ratio, (n, 1), last.device())?
                            .to_dtype(last.dtype())?;
                        (last + (last - prev)?.broadcast_mul(&r)?)?
                    }
                    _ => last.clone(),
                };
                match fresh {
                    Some((idx, idx_vec, rows)) => replace_rows(&pred, idx, idx_vec, rows),
                    None => Ok(pred),
                }
            }
        }
    }

    /// A block's output after a forward of its tokens `idx` (sorted, distinct; as a `[m]`
    /// u32 tensor and its values), `[tokens, dim]`: the forward's rows `y` (`[m, dim]`) at
    /// those tokens, elsewhere the input `x_in` (`[tokens, dim]`) plus the residual the
    /// token reuses at `sigma`; the store then takes the computed tokens' residuals
    /// `y - x_in` at `sigma`. The same as [`Self::predict_replacing`] and
    /// [`Self::update_tokens`] with those residuals, on the host in one pass over the
    /// block and no intermediate tensors.
    pub fn apply_tokens(
        &mut self,
        x_in: &Tensor,
        y: &Tensor,
        idx: &Tensor,
        idx_vec: &[u32],
        sigma: f64,
        reuse: Reuse,
    ) -> candle_core::Result<Tensor> {
        let n = self.sigma_last.len();
        let host = is_host(x_in) && is_host(y) && matches!(self.data, Data::Host { .. });
        if !host {
            let fresh = (y - x_in.index_select(idx, 0)?)?;
            let used = self.predict_replacing(sigma, reuse, idx, idx_vec, &fresh)?;
            self.update_tokens(idx, idx_vec, &fresh, sigma)?;
            return x_in + used;
        }
        let ratio = self.ratios(sigma, reuse);
        let Data::Host {
            last,
            prev,
            dim,
            device,
        } = &mut self.data
        else {
            unreachable!("checked above");
        };
        let d = *dim;
        check_rows(n, d, idx_vec, y)?;
        if x_in.dims() != [n, d] {
            candle_core::bail!("input {:?} of a block of {n} tokens of {d}", x_in.shape());
        }
        // Each token's row of `y`, if computed.
        let mut slot = vec![usize::MAX; n];
        for (k, &i) in idx_vec.iter().enumerate() {
            slot[i as usize] = k;
        }
        let mut out = vec![0f32; n * d];
        with_host_f32(x_in, |x| {
            with_host_f32(y, |y| {
                let rows = HostRows::new(last, prev, &ratio, d);
                out.par_chunks_mut(d)
                    .with_min_len(ROWS_PER_TASK)
                    .enumerate()
                    .for_each(|(i, o)| match slot[i] {
                        usize::MAX => {
                            rows.write(i, o);
                            for (o, &x) in o.iter_mut().zip(&x[i * d..(i + 1) * d]) {
                                *o += x;
                            }
                        }
                        k => o.copy_from_slice(&y[k * d..(k + 1) * d]),
                    });
                push_rows(last, prev, d, idx_vec, |k, i, l| {
                    for ((l, &a), &b) in l.iter_mut().zip(&y[k * d..(k + 1) * d]).zip(&x[i * d..]) {
                        *l = a - b;
                    }
                });
            })
        })??;
        let out = Tensor::from_vec(out, (n, d), &*device)?;
        self.stamp(idx_vec, sigma);
        Ok(out)
    }

    /// The residuals the tokens `idx` (as a `[m]` u32 tensor and its values) would reuse at
    /// `sigma`, `[m, dim]`; with `prefix` (`[tokens, p]`), each after the token's row of
    /// it, `[m, p + dim]` (on the host in one pass).
    pub fn predict_rows(
        &self,
        sigma: f64,
        reuse: Reuse,
        idx: &Tensor,
        idx_vec: &[u32],
        prefix: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let ratio = self.ratios(sigma, reuse);
        let n = self.sigma_last.len();
        if let Some(p) = prefix
            && p.dim(0)? != n
        {
            candle_core::bail!("a prefix of {:?} for {n} tokens", p.shape());
        }
        match &self.data {
            Data::Host {
                last,
                prev,
                dim,
                device,
            } if prefix.is_none_or(is_host) => {
                let rows = HostRows::new(last, prev, &ratio, *dim);
                match prefix {
                    None => rows.gather(idx_vec, n, None, device),
                    Some(p) => {
                        let w = p.dim(1)?;
                        with_host_f32(p, |p| rows.gather(idx_vec, n, Some((p, w)), device))?
                    }
                }
            }
            _ => {
                let rows = self.predict(sigma, reuse)?.index_select(idx, 0)?;
                match prefix {
                    None => Ok(rows),
                    Some(p) => {
                        let p = p
                            .contiguous()?
                            .index_select(idx, 0)?
                            .to_dtype(rows.dtype())?;
                        Tensor::cat(&[&p, &rows], 1)
                    }
                }
            }
        }
    }

    /// The last computed residuals of the tokens `idx` (or all), `[m, dim]`.
    fn last_rows(&self, idx: Option<(&Tensor, &[u32])>) -> candle_core::Result<Tensor> {
        match (&self.data, idx) {
            (Data::Device { last, .. }, Some((t, _))) => last.index_select(t, 0),
            (Data::Device { last, .. }, None) => Ok(last.clone()),
            (
                Data::Host {
                    last, dim, device, ..
                },
                idx,
            ) => {
                let rows = HostRows {
                    last,
                    prev: None,
                    ratio: None,
                    dim: *dim,
                };
                match idx {
                    None => Tensor::from_slice(last, (self.sigma_last.len(), *dim), device),
                    Some((_, v)) => rows.gather(v, self.sigma_last.len(), None, device),
                }
            }
        }
    }

    /// How fast the freshly computed tokens' residuals changed since their previous
    /// computation: `mean|fresh - last| / mean|last|` per unit of sigma, one value per row
    /// of `fresh` (the tokens `idx`, or all). Tokens whose sigma did not change get 0.
    pub fn rates(
        &self,
        idx: Option<(&Tensor, &[u32])>,
        fresh: &Tensor,
        sigma: f64,
    ) -> candle_core::Result<Vec<f32>> {
        let old = self.last_rows(idx)?;
        let ids: Vec<usize> = match idx {
            Some((_, v)) => v.iter().map(|&i| i as usize).collect(),
            None => (0..self.sigma_last.len()).collect(),
        };
        let num = (fresh - &old)?
            .abs()?
            .mean(1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let den = old
            .abs()?
            .mean(1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(ids
            .iter()
            .zip(num.iter().zip(&den))
            .map(|(&i, (n, d))| {
                let span = self.sigma_last[i] - sigma as f32;
                if span.abs() > 1e-9 {
                    n / (d + 1e-6) / span.abs()
                } else {
                    0.0
                }
            })
            .collect())
    }

    /// Every token was computed at `sigma`.
    pub fn update_all(&mut self, residual: Tensor, sigma: f64) -> candle_core::Result<()> {
        match &mut self.data {
            Data::Host { last, prev, .. } => {
                if residual.elem_count() != last.len() || residual.dtype() != DType::F32 {
                    candle_core::bail!(
                        "residual {:?} {:?} for a store of {} values",
                        residual.shape(),
                        residual.dtype(),
                        last.len()
                    );
                }
                // The old `last` becomes `prev`; the old `prev` buffer takes the new rows.
                let mut new = prev.take().unwrap_or_default();
                with_host_f32(&residual, |r| {
                    new.clear();
                    new.extend_from_slice(r);
                })?;
                *prev = Some(std::mem::replace(last, new));
            }
            Data::Device { last, prev } => {
                *prev = Some(std::mem::replace(last, residual));
            }
        }
        self.sigma_prev = std::mem::take(&mut self.sigma_last);
        self.sigma_last = vec![sigma as f32; self.sigma_prev.len()];
        Ok(())
    }

    /// The tokens `idx` (`[m]` u32 tensor and its values) were computed at `sigma`, with
    /// residuals `fresh` `[m, dim]`.
    pub fn update_tokens(
        &mut self,
        idx: &Tensor,
        idx_vec: &[u32],
        fresh: &Tensor,
        sigma: f64,
    ) -> candle_core::Result<()> {
        let n = self.sigma_last.len();
        match &mut self.data {
            Data::Host {
                last, prev, dim, ..
            } => {
                let d = *dim;
                check_rows(n, d, idx_vec, fresh)?;
                with_host_f32(fresh, |r| {
                    push_rows(last, prev, d, idx_vec, |k, _, l| {
                        l.copy_from_slice(&r[k * d..(k + 1) * d])
                    })
                })?;
            }
            Data::Device { last, prev } => {
                let old = last.index_select(idx, 0)?;
                let p = match prev {
                    Some(p) => replace_rows(p, idx, idx_vec, &old)?,
                    None => last.clone(),
                };
                *last = replace_rows(last, idx, idx_vec, fresh)?;
                *prev = Some(p);
            }
        }
        self.stamp(idx_vec, sigma);
        Ok(())
    }

    /// The tokens of `idx` last computed at a noise level of at most `sigma` (at or after
    /// the step of `sigma`).
    pub fn computed_since(&self, idx: Vec<u32>, sigma: f64) -> Vec<u32> {
        let bound = sigma as f32 * (1.0 + 1e-5);
        idx.into_iter()
            .filter(|&i| self.sigma_last.get(i as usize).is_some_and(|&l| l <= bound))
            .collect()
    }

    /// The tokens `idx` were computed at `sigma`: their last computation becomes the one
    /// before.
    fn stamp(&mut self, idx: &[u32], sigma: f64) {
        for &i in idx {
            let i = i as usize;
            self.sigma_prev[i] = self.sigma_last[i];
            self.sigma_last[i] = sigma as f32;
        }
    }

    pub fn device(&self) -> &Device {
        match &self.data {
            Data::Host { device, .. } => device,
            Data::Device { last, .. } => last.device(),
        }
    }
}

/// Host rows of the tokens `idx` (rows of `d`): each one's last row becomes its previous
/// one, and `fill(k, i, row)` writes the new last row of `idx[k] = i`.
fn push_rows(
    last: &mut [f32],
    prev: &mut Option<Vec<f32>>,
    d: usize,
    idx: &[u32],
    fill: impl Fn(usize, usize, &mut [f32]),
) {
    let prev = prev.get_or_insert_with(|| last.to_vec());
    for (k, &i) in idx.iter().enumerate() {
        let i = i as usize;
        let row = i * d..(i + 1) * d;
        prev[row.clone()].copy_from_slice(&last[row.clone()]);
        fill(k, i, &mut last[row]);
    }
}

/// The rows of a host store's residuals at a forecast.
struct HostRows<'a> {
    last: &'a [f32],
    prev: Option<&'a [f32]>,
    /// Per token, see [`ResidualStore::ratios`]; `None`: the last residuals.
    ratio: Option<&'a [f32]>,
    dim: usize,
}

/// Rows of a forecast per task on the rayon pool (a few KB each: fewer would cost more
/// in scheduling than the copy).
const ROWS_PER_TASK: usize = 64;

impl<'a> HostRows<'a> {
    fn new(
        last: &'a [f32],
        prev: &'a Option<Vec<f32>>,
        ratio: &'a Option<Vec<f32>>,
        dim: usize,
    ) -> Self {
        Self {
            last,
            prev: prev.as_deref(),
            ratio: ratio.as_deref(),
            dim,
        }
    }

    /// Token `i`'s row into `dst`: `last + (last - prev) * ratio`, or `last` where the
    /// token does not extrapolate.
    fn write(&self, i: usize, dst: &mut [f32]) {
        let d = self.dim;
        let l = &self.last[i * d..(i + 1) * d];
        match (self.ratio, self.prev) {
            (Some(ratio), Some(p)) if ratio[i] != 0.0 => {
                let r = ratio[i];
                let p = &p[i * d..(i + 1) * d];
                for ((o, &l), &p) in dst.iter_mut().zip(l).zip(p) {
                    *o = l + (l - p) * r;
                }
            }
            _ => dst.copy_from_slice(l),
        }
    }

    /// The rows of the tokens `idx` (of `n`), `[m, dim]`; with `prefix` (`n` rows of `p`
    /// values), each after the token's row of it, `[m, p + dim]`.
    fn gather(
        &self,
        idx: &[u32],
        n: usize,
        prefix: Option<(&[f32], usize)>,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let d = self.dim;
        if let Some(i) = idx.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("token {i} of a residual store of {n}");
        }
        let p = prefix.map_or(0, |(_, w)| w);
        if let Some((v, w)) = prefix
            && v.len() != n * w
        {
            candle_core::bail!("a prefix of {} values for {n} rows of {w}", v.len());
        }
        let mut out = vec![0f32; idx.len() * (p + d)];
        out.par_chunks_mut(p + d)
            .with_min_len(ROWS_PER_TASK)
            .zip(idx)
            .for_each(|(dst, &i)| {
                let i = i as usize;
                if let Some((v, w)) = prefix {
                    dst[..w].copy_from_slice(&v[i * w..(i + 1) * w]);
                }
                self.write(i, &mut dst[p..]);
            });
        Tensor::from_vec(out, (idx.len(), p + d), device)
    }
}

/// Whether a residual is kept on the host (see [`Data::Host`]): a store keeps its own
/// copy of such rows, never the tensor it was given.
pub(crate) fn is_host(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `rows` is `[m, d]` for `m` distinct sorted token indices below `n`.
fn check_rows(n: usize, d: usize, idx: &[u32], rows: &Tensor) -> candle_core::Result<()> {
    if rows.dims() != [idx.len(), d]
        || idx.iter().any(|&i| i as usize >= n)
        || idx.windows(2).any(|w| w[0] >= w[1])
        || rows.dtype() != candle_core::DType::F32
    {
        candle_core::bail!(
            "replacing rows {idx:?} of a [{n}, {d}] residual with {:?} {:?}",
            rows.shape(),
            rows.dtype()
        );
    }
    Ok(())
}

/// `base` (`[n, d]`) with its rows `idx` (sorted, distinct; as a `[m]` u32 tensor and its
/// values) replaced by `rows` (`[m, d]`), by a scatter: the tensor path of
/// [`Data::Device`] (CPU f32 residuals are host rows, replaced in place).
fn replace_rows(
    base: &Tensor,
    idx: &Tensor,
    idx_vec: &[u32],
    rows: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, d) = base.dims2()?;
    let m = idx_vec.len();
    if rows.dims() != [m, d] || idx_vec.iter().any(|&i| i as usize >= n) {
        candle_core::bail!(
            "replacing rows {idx_vec:?} of {:?} with {:?}",
            base.shape(),
            rows.shape()
        );
    }
    let ix = idx.reshape((m, 1))?.broadcast_as((m, d))?.contiguous()?;
    base.scatter(&ix, rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[n, d]` values `f(i)` of the element index, rounded to a few bits.
    fn values(n: usize, d: usize, f: impl Fn(f32) -> f32) -> Tensor {
        let v: Vec<f32> = (0..n * d).map(|i| f(i as f32)).collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    fn f64t(t: &Tensor) -> Tensor {
        t.to_dtype(candle_core::DType::F64).unwrap()
    }

    /// Both tensors agree to 1e-5 (either dtype).
    fn same(a: &Tensor, b: &Tensor) {
        let diff = (f64t(a) - f64t(b))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-5);
    }

    /// `computed_since` keeps the tokens last computed at or below a noise level.
    #[test]
    fn computed_since_keeps_recent_tokens() {
        let mut s = ResidualStore::new(values(5, 2, |i| i), 0.9).unwrap();
        s.stamp(&[1, 3], 0.7);
        s.stamp(&[3], 0.5);
        let all = vec![0, 1, 2, 3, 4];
        assert_eq!(s.computed_since(all.clone(), 0.7), vec![1, 3]);
        assert_eq!(s.computed_since(all.clone(), 0.5), vec![3]);
        assert_eq!(s.computed_since(all.clone(), 0.9), all);
        assert!(s.computed_since(all, 0.4).is_empty());
        // Out-of-range rows are dropped, not a panic.
        assert_eq!(s.computed_since(vec![3, 9], 0.9), vec![3]);
    }

    #[test]
    fn replace_rows_replaces_the_named_rows() {
        let dev = Device::Cpu;
        let base = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((6, 4))
            .unwrap();
        let idx_vec = [1u32, 4];
        let idx = Tensor::new(&idx_vec, &dev).unwrap();
        let rows = Tensor::new(&[[-1f32, -2., -3., -4.], [-5., -6., -7., -8.]], &dev).unwrap();
        let got = replace_rows(&base, &idx, &idx_vec, &rows).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            vec![
                vec![0., 1., 2., 3.],
                vec![-1., -2., -3., -4.],
                vec![8., 9., 10., 11.],
                vec![12., 13., 14., 15.],
                vec![-5., -6., -7., -8.],
                vec![20., 21., 22., 23.],
            ]
        );
        assert!(replace_rows(&base, &idx, &[1, 9], &rows).is_err());
    }

    /// The host rows (CPU f32) and the tensor path (here CPU f64) give the same
    /// predictions through full and partial updates.
    #[test]
    fn host_rows_match_the_tensor_path() {
        let dev = Device::Cpu;
        let (n, d) = (7, 5);
        let res = |k: f32| values(n, d, |i| ((i * 0.37 + k).sin() * 3.0).round() / 4.0);
        let mut host = ResidualStore::new(res(0.0), 0.9).unwrap();
        let mut device = ResidualStore::new(f64t(&res(0.0)), 0.9).unwrap();
        assert!(matches!(host.data, Data::Host { .. }));
        assert!(matches!(device.data, Data::Device { .. }));
        let same = |a: Tensor, b: Tensor| same(&a, &b);
        let idx_vec = [1u32, 4, 6];
        let idx = Tensor::new(&idx_vec, &dev).unwrap();
        let fresh = res(1.0).index_select(&idx, 0).unwrap();
        host.update_tokens(&idx, &idx_vec, &fresh, 0.8).unwrap();
        device
            .update_tokens(&idx, &idx_vec, &f64t(&fresh), 0.8)
            .unwrap();
        host.update_all(res(2.0), 0.7).unwrap();
        device.update_all(f64t(&res(2.0)), 0.7).unwrap();
        let idx2_vec = [0u32, 4];
        let idx2 = Tensor::new(&idx2_vec, &dev).unwrap();
        let fresh2 = res(3.0).index_select(&idx2, 0).unwrap();
        host.update_tokens(&idx2, &idx2_vec, &fresh2, 0.6).unwrap();
        device
            .update_tokens(&idx2, &idx2_vec, &f64t(&fresh2), 0.6)
            .unwrap();
        for reuse in [Reuse::Residual, Reuse::Forecast] {
            same(
                host.predict(0.55, reuse).unwrap(),
                device.predict(0.55, reuse).unwrap(),
            );
            same(
                host.predict_rows(0.55, reuse, &idx, &idx_vec, None)
                    .unwrap(),
                device
                    .predict_rows(0.55, reuse, &idx, &idx_vec, None)
                    .unwrap(),
            );
            // After a prefix: its rows of the tokens first, then the same predictions.
            let prefix = res(5.0).narrow(1, 0, 3).unwrap().contiguous().unwrap();
            let after = host
                .predict_rows(0.55, reuse, &idx, &idx_vec, Some(&prefix))
                .unwrap();
            assert_eq!(after.dims(), [3, 3 + d]);
            same(
                after.clone(),
                device
                    .predict_rows(0.55, reuse, &idx, &idx_vec, Some(&f64t(&prefix)))
                    .unwrap(),
            );
            same(
                after.narrow(1, 0, 3).unwrap(),
                f64t(&prefix.index_select(&idx, 0).unwrap()),
            );
            same(
                after.narrow(1, 3, d).unwrap(),
                device
                    .predict_rows(0.55, reuse, &idx, &idx_vec, None)
                    .unwrap(),
            );
            let rows = res(4.0).index_select(&idx, 0).unwrap();
            same(
                host.predict_replacing(0.55, reuse, &idx, &idx_vec, &rows)
                    .unwrap(),
                device
                    .predict_replacing(0.55, reuse, &idx, &idx_vec, &f64t(&rows))
                    .unwrap(),
            );
        }
        same(
            Tensor::new(
                host.rates(Some((&idx, &idx_vec)), &fresh, 0.5).unwrap(),
                &dev,
            )
            .unwrap(),
            Tensor::new(
                device
                    .rates(Some((&idx, &idx_vec)), &f64t(&fresh), 0.5)
                    .unwrap(),
                &dev,
            )
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap(),
        );
        // Bad rows are an error, not a panic.
        assert!(host.update_tokens(&idx, &[1, 9, 2], &fresh, 0.5).is_err());
        assert!(
            host.update_all(res(0.0).narrow(0, 0, 2).unwrap(), 0.5)
                .is_err()
        );
    }

    /// `apply_tokens` is `x_in + predict_replacing(y - x_in)` followed by `update_tokens`,
    /// on the host rows and on the tensor path alike.
    #[test]
    fn apply_tokens_is_predict_then_update() {
        let dev = Device::Cpu;
        let (n, d) = (9, 6);
        let t = |k: f32| values(n, d, |i| ((i * 0.53 + k).cos() * 2.0).round() / 8.0);
        let idx_vec = [0u32, 3, 4, 8];
        let idx = Tensor::new(&idx_vec, &dev).unwrap();
        let start = |f: &dyn Fn(&Tensor) -> Tensor| {
            let mut s = ResidualStore::new(f(&t(0.0)), 0.9).unwrap();
            s.update_all(f(&t(1.0)), 0.8).unwrap();
            s
        };
        let x_in = t(2.0);
        let y = t(3.0).index_select(&idx, 0).unwrap();
        for reuse in [Reuse::Residual, Reuse::Forecast] {
            let mut fused = start(&|r: &Tensor| r.clone());
            let mut device = start(&|r: &Tensor| f64t(r));
            let mut parts = start(&|r: &Tensor| r.clone());
            assert!(matches!(device.data, Data::Device { .. }));
            let got = fused
                .apply_tokens(&x_in, &y, &idx, &idx_vec, 0.7, reuse)
                .unwrap();
            let on_device = device
                .apply_tokens(&f64t(&x_in), &f64t(&y), &idx, &idx_vec, 0.7, reuse)
                .unwrap();
            let fresh = (&y - x_in.index_select(&idx, 0).unwrap()).unwrap();
            let used = parts
                .predict_replacing(0.7, reuse, &idx, &idx_vec, &fresh)
                .unwrap();
            parts.update_tokens(&idx, &idx_vec, &fresh, 0.7).unwrap();
            let want = (&x_in + used).unwrap();
            same(&got, &want);
            same(&on_device, &want);
            // The computed tokens are the forward's rows exactly.
            assert_eq!(
                got.index_select(&idx, 0).unwrap().to_vec2::<f32>().unwrap(),
                y.to_vec2::<f32>().unwrap()
            );
            // The stores agree afterwards.
            same(
                &fused.predict(0.6, Reuse::Forecast).unwrap(),
                &parts.predict(0.6, Reuse::Forecast).unwrap(),
            );
            same(
                &device.predict(0.6, Reuse::Forecast).unwrap(),
                &parts.predict(0.6, Reuse::Forecast).unwrap(),
            );
        }
        // Rows that do not fit are errors.
        let mut s = start(&|r: &Tensor| r.clone());
        assert!(
            s.apply_tokens(&x_in, &y, &idx, &[0, 3, 4, 9], 0.7, Reuse::Residual)
                .is_err()
        );
        let short = x_in.narrow(0, 0, n - 1).unwrap();
        assert!(
            s.apply_tokens(&short, &y, &idx, &idx_vec, 0.7, Reuse::Residual)
                .is_err()
        );
    }

    #[test]
    fn forecast_extrapolates_linearly_and_residual_reuse_does_not() {
        let dev = Device::Cpu;
        let r0 = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let mut s = ResidualStore::new(r0, 0.9).unwrap();
        // Before a second computation both reuse modes give the stored residual.
        let p = s.predict(0.8, Reuse::Forecast).unwrap();
        assert_eq!(
            p.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        // Token 0 computed again at 0.8 with residual (2, 4): slope -(1, 2) per 0.1.
        let idx = Tensor::new(&[0u32], &dev).unwrap();
        let fresh = Tensor::new(&[[2f32, 4.]], &dev).unwrap();
        s.update_tokens(&idx, &[0], &fresh, 0.8).unwrap();
        let p = s
            .predict(0.7, Reuse::Forecast)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (p[0][0] - 3.0).abs() < 1e-5 && (p[0][1] - 6.0).abs() < 1e-5,
            "{p:?}"
        );
        // Token 1 has only one computation: no slope.
        assert_eq!(p[1], vec![3., 4.]);
        // Clamped to one interval ahead.
        let p = s
            .predict(0.2, Reuse::Forecast)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((p[0][0] - 3.0).abs() < 1e-5, "{p:?}");
        let p = s
            .predict(0.7, Reuse::Residual)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p, vec![vec![2., 4.], vec![3., 4.]]);
        s.update_all(Tensor::new(&[[0f32, 0.], [0., 0.]], &dev).unwrap(), 0.7)
            .unwrap();
        let p = s
            .predict(0.6, Reuse::Forecast)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // token 1: last computed at 0.9 and now at 0.7: half an interval ahead.
        assert!(
            (p[0][0] + 2.0).abs() < 1e-5 && (p[1][0] + 1.5).abs() < 1e-5,
            "{p:?}"
        );
    }
}
