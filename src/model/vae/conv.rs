//! Convolution over channels-last frames `[B, T, H, W, C]` as im2col + one matrix multiply.
//!
//! candle has no Conv3d, and its CPU conv2d gathers the im2col matrix one scalar at a time
//! from NCHW, which made the VAE about 20x slower than its FLOP count. With channels last,
//! every tap of a pixel is a run of C contiguous values, the (dt, dy, dx) taps of a 3D kernel
//! become one row of the im2col matrix, and the output `[rows, C_out]` of the multiply is
//! already channels-last for the next layer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// im2col matrices are built and multiplied in tiles of at most this many elements, so that
/// a large frame (540P with hundreds of channels) does not need gigabytes at once.
const MAX_TILE_ELEMS: usize = 1 << 20;

/// Kernel, stride and spatial zero padding of a convolution. Time is never padded here: the
/// caller puts the causal history (cached frames or zeros) in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub kt: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride_t: usize,
    pub stride_hw: usize,
    /// Zero rows/columns before (top, left) and after (bottom, right) the frame.
    pub pad_before: usize,
    pub pad_after: usize,
}

impl Geometry {
    pub(crate) const POINT: Geometry = Geometry {
        kt: 1,
        kh: 1,
        kw: 1,
        stride_t: 1,
        stride_hw: 1,
        pad_before: 0,
        pad_after: 0,
    };

    fn out_dims(&self, t: usize, h: usize, w: usize) -> Result<(usize, usize, usize)> {
        let hp = h + self.pad_before + self.pad_after;
        let wp = w + self.pad_before + self.pad_after;
        if t < self.kt || hp < self.kh || wp < self.kw {
            candle_core::bail!(
                "conv: input of {t}x{h}x{w} (THW) too small for kernel {}x{}x{}",
                self.kt,
                self.kh,
                self.kw
            )
        }
        Ok((
            (t - self.kt) / self.stride_t + 1,
            (hp - self.kh) / self.stride_hw + 1,
            (wp - self.kw) / self.stride_hw + 1,
        ))
    }
}

/// The im2col gather on the CPU: rows `row_start..row_start + rows` of the matrix
/// `[B*To*Ho*Wo, kt*kh*kw*C (+ 1)]` (taps ordered dt, dy, dx, then channel). With
/// `ones_column` every row ends with a 1 that multiplies the bias row of the kernel matrix,
/// which saves a separate pass over the output to add the bias.
struct Im2Col {
    g: Geometry,
    row_start: usize,
    rows: usize,
    ones_column: bool,
}

impl Im2Col {
    fn gather<T: WithDType>(&self, src: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (b, t, h, w, c) = (dims[0], dims[1], dims[2], dims[3], dims[4]);
        let g = self.g;
        let (to, ho, wo) = g.out_dims(t, h, w)?;
        if self.row_start + self.rows > b * to * ho * wo {
            candle_core::bail!("im2col: rows out of range")
        }
        let k = g.kt * g.kh * g.kw * c + usize::from(self.ones_column);
        let n = self.rows * k;
        // Every element is written below, the padding taps with zeros, so the matrix is
        // not zeroed first (that memset took more time than the gather itself).
        let mut out: Vec<T> = Vec::with_capacity(n);
        let (zero, one) = (T::zero(), T::from_f64(1.0));
        let fill = |first_row: usize, dst: &mut [MaybeUninit<T>]| {
            for (i, row) in dst.chunks_exact_mut(k).enumerate() {
                if self.ones_column {
                    row[k - 1].write(one);
                }
                let r = first_row + i;
                let x0 = r % wo;
                let y0 = (r / wo) % ho;
                let t0 = (r / (wo * ho)) % to;
                let b0 = r / (wo * ho * to);
                let mut off = 0;
                for dt in 0..g.kt {
                    let ti = t0 * g.stride_t + dt;
                    let frame = (b0 * t + ti) * h;
                    for dy in 0..g.kh {
                        let yi = (y0 * g.stride_hw + dy) as isize - g.pad_before as isize;
                        if yi < 0 || yi >= h as isize {
                            row[off..off + g.kw * c].fill(MaybeUninit::new(zero));
                            off += g.kw * c;
                            continue;
                        }
                        let line = (frame + yi as usize) * w;
                        for dx in 0..g.kw {
                            let xi = (x0 * g.stride_hw + dx) as isize - g.pad_before as isize;
                            let tap = &mut row[off..off + c];
                            if xi >= 0 && xi < w as isize {
                                let s = (line + xi as usize) * c;
                                for (d, v) in tap.iter_mut().zip(&src[s..s + c]) {
                                    d.write(*v);
                                }
                            } else {
                                tap.fill(MaybeUninit::new(zero));
                            }
                            off += c;
                        }
                    }
                }
            }
        };
        let dst = &mut out.spare_capacity_mut()[..n];
        // On the pool (whose size the thread settings give), a few bands per thread.
        let threads = rayon::current_num_threads();
        if threads > 1 && n >= 1 << 16 {
            let rows_per = self.rows.div_ceil(threads * 2).max(1);
            dst.par_chunks_mut(rows_per * k)
                .enumerate()
                .for_each(|(j, part)| fill(self.row_start + j * rows_per, part));
        } else {
            fill(self.row_start, dst);
        }
        // SAFETY: `fill` wrote every element of the first `n`: each of the `rows` rows of
        // `k` gets its ones column and, per tap (dt, dy, dx), `c` values, copied or zero.
        unsafe { out.set_len(n) };
        Ok(out)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "wan-vae-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col: input must be contiguous")
        };
        let dims = layout.dims();
        if dims.len() != 5 {
            candle_core::bail!("im2col: expected [B, T, H, W, C], got {dims:?}")
        }
        let k = self.g.kt * self.g.kh * self.g.kw * dims[4] + usize::from(self.ones_column);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.gather(&v[o1..o2], dims)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.gather(&v[o1..o2], dims)?),
            CpuStorage::F16(v) => CpuStorage::F16(self.gather(&v[o1..o2], dims)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.gather(&v[o1..o2], dims)?),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((self.rows, k))))
    }
}

/// The same matrix with tensor ops, for devices without the CPU gather (and as its test).
fn im2col_tensor_ops(x: &Tensor, g: Geometry) -> Result<Tensor> {
    let (b, t, h, w, c) = x.dims5()?;
    let (to, ho, wo) = g.out_dims(t, h, w)?;
    let xp = x
        .pad_with_zeros(2, g.pad_before, g.pad_after)?
        .pad_with_zeros(3, g.pad_before, g.pad_after)?;
    let pick = |x: &Tensor, dim: usize, start: usize, n: usize, stride: usize| -> Result<Tensor> {
        if stride == 1 {
            x.narrow(dim, start, n)
        } else {
            // index_select takes contiguous tensors: the span the picks cover, copied.
            let span = x.narrow(dim, start, (n - 1) * stride + 1)?.contiguous()?;
            let ids: Vec<u32> = (0..n).map(|i| (i * stride) as u32).collect();
            span.index_select(&Tensor::new(ids.as_slice(), x.device())?, dim)
        }
    };
    let mut taps = Vec::with_capacity(g.kt * g.kh * g.kw);
    for dt in 0..g.kt {
        let xt = pick(&xp, 1, dt, to, g.stride_t)?;
        for dy in 0..g.kh {
            let xy = pick(&xt, 2, dy, ho, g.stride_hw)?;
            for dx in 0..g.kw {
                taps.push(pick(&xy, 3, dx, wo, g.stride_hw)?.contiguous()?);
            }
        }
    }
    Tensor::cat(&taps, 4)?.reshape((b * to * ho * wo, taps.len() * c))
}

/// A convolution (2D or 3D) over channels-last frames, with the kernel stored as the
/// `[kt*kh*kw*C_in, C_out]` matrix of the im2col product.
///
/// candle's CPU matmul has no bf16 kernel (it widens both operands on every call): with
/// bf16 weights on the CPU the kernel is kept in f32 and the input widened once.
#[derive(Debug, Clone)]
pub(crate) struct ConvLayer {
    /// `[K, C_out]`
    weight: Tensor,
    /// `[K + 1, C_out]`: the kernel with the bias as last row, for the CPU gather.
    weight_with_bias: Tensor,
    /// `[C_out]`
    bias: Tensor,
    geometry: Geometry,
    c_in: usize,
    c_out: usize,
}

impl ConvLayer {
    /// `weight`: `[C_out, C_in, kt, kh, kw]` (PyTorch Conv3d) or `[C_out, C_in, kh, kw]`
    /// (Conv2d, kt = 1).
    pub(crate) fn from_weight(weight: Tensor, bias: Tensor, geometry: Geometry) -> Result<Self> {
        let weight = if weight.rank() == 4 {
            weight.unsqueeze(2)?
        } else {
            weight
        };
        let (c_out, c_in, _, _, _) = weight.dims5()?;
        let weight = weight
            .permute((2, 3, 4, 1, 0))?
            .reshape(((), c_out))?
            .contiguous()?;
        let compute = if weight.dtype() == DType::BF16 && weight.device().is_cpu() {
            DType::F32
        } else {
            weight.dtype()
        };
        let weight = weight.to_dtype(compute)?;
        let bias = bias.to_dtype(compute)?;
        let weight_with_bias = Tensor::cat(&[&weight, &bias.unsqueeze(0)?], 0)?;
        Ok(Self {
            weight,
            weight_with_bias,
            bias,
            geometry,
            c_in,
            c_out,
        })
    }

    /// A PyTorch Conv3d of kernel `(kt, k, k)` (causal: no temporal padding here).
    pub(crate) fn conv3d(
        c_in: usize,
        c_out: usize,
        (kt, k): (usize, usize),
        stride_t: usize,
        pad_hw: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kt, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let geometry = Geometry {
            kt,
            kh: k,
            kw: k,
            stride_t,
            stride_hw: 1,
            pad_before: pad_hw,
            pad_after: pad_hw,
        };
        Self::from_weight(weight, bias, geometry)
    }

    /// A PyTorch Conv2d of kernel `k`, applied to every frame.
    pub(crate) fn conv2d(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        (pad_before, pad_after): (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let geometry = Geometry {
            kt: 1,
            kh: k,
            kw: k,
            stride_t: 1,
            stride_hw: stride,
            pad_before,
            pad_after,
        };
        Self::from_weight(weight, bias, geometry)
    }

    /// `x`: `[B, T, H, W, C_in]` (temporal history included) -> `[B, To, Ho, Wo, C_out]`
    /// in `x`'s dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h, w, c) = x.dims5()?;
        if c != self.c_in {
            candle_core::bail!(
                "conv: expected {} input channels, got {:?}",
                self.c_in,
                x.dims()
            )
        }
        let g = self.geometry;
        let (to, ho, wo) = g.out_dims(t, h, w)?;
        let dtype = x.dtype();
        let xc = x.to_dtype(self.weight.dtype())?.contiguous()?;
        let rows = b * to * ho * wo;
        let k = self.weight.dim(0)?;
        let pointwise = g.kt == 1 && g.kh == 1 && g.kw == 1 && g.stride_t == 1 && g.stride_hw == 1;
        let y = if pointwise {
            xc.reshape((rows, c))?
                .matmul(&self.weight)?
                .broadcast_add(&self.bias)?
        } else if crate::model::kernels::cpu_kernels(xc.device()) {
            let tile = (MAX_TILE_ELEMS / (k + 1)).max(1);
            let mut outs = Vec::with_capacity(rows.div_ceil(tile));
            let mut start = 0;
            while start < rows {
                let n = tile.min(rows - start);
                let op = Im2Col {
                    g,
                    row_start: start,
                    rows: n,
                    ones_column: true,
                };
                outs.push(xc.apply_op1_no_bwd(&op)?.matmul(&self.weight_with_bias)?);
                start += n;
            }
            Tensor::cat(&outs, 0)?
        } else {
            self.forward_tiled(&xc, crate::model::kernels::device_tile_elems())?
        };
        y.to_dtype(dtype)?.reshape((b, to, ho, wo, self.c_out))
    }

    /// The device path: the im2col product with tensor ops, one output frame and one band
    /// of output rows at a time, each im2col tile at most `tile` elements (one output row
    /// at least). Returns `[B*To*Ho*Wo, C_out]`.
    fn forward_tiled(&self, x: &Tensor, tile: usize) -> Result<Tensor> {
        let g = self.geometry;
        let (b, t, h, w, _) = x.dims5()?;
        let (to, ho, wo) = g.out_dims(t, h, w)?;
        let k = self.weight.dim(0)?;
        let band = device_band_rows(ho, wo, k, tile);
        let xp = x
            .pad_with_zeros(2, g.pad_before, g.pad_after)?
            .pad_with_zeros(3, g.pad_before, g.pad_after)?;
        // Each tile: exactly the input of its outputs, unpadded, one output frame.
        let unpadded = Geometry {
            pad_before: 0,
            pad_after: 0,
            ..g
        };
        let mut outs = Vec::with_capacity(b * to * ho.div_ceil(band));
        for bi in 0..b {
            for ti in 0..to {
                let frame = xp.narrow(0, bi, 1)?.narrow(1, ti * g.stride_t, g.kt)?;
                let mut y0 = 0;
                while y0 < ho {
                    let n = band.min(ho - y0);
                    let rows_in = (n - 1) * g.stride_hw + g.kh;
                    let xs = frame.narrow(2, y0 * g.stride_hw, rows_in)?;
                    outs.push(
                        im2col_tensor_ops(&xs, unpadded)?
                            .matmul(&self.weight)?
                            .broadcast_add(&self.bias)?,
                    );
                    y0 += n;
                }
            }
        }
        Tensor::cat(&outs, 0)
    }
}

/// Output rows per tile of the device path: as many as keep the im2col tile
/// (`rows x wo x k`) within `tile` elements, at least one.
pub(crate) fn device_band_rows(ho: usize, wo: usize, k: usize, tile: usize) -> usize {
    (tile / (wo * k).max(1)).clamp(1, ho.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The device path (tiled tensor ops) gives the CPU kernel's result, with tiles small
    /// enough that every geometry is cut into several bands and frames.
    #[test]
    fn device_tiles_equal_the_cpu_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 9, 7, 4), &dev)?;
        for (kt, k, stride_t, stride_hw, pad_before, pad_after) in [
            (3, 3, 1, 1, 1, 1),
            (3, 1, 2, 1, 0, 0),
            (1, 3, 1, 2, 0, 1),
            (2, 3, 1, 1, 1, 1),
        ] {
            let g = Geometry {
                kt,
                kh: k,
                kw: k,
                stride_t,
                stride_hw,
                pad_before,
                pad_after,
            };
            let weight = Tensor::randn(0f32, 0.3, (6, 4, kt, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, 6, &dev)?;
            let conv = ConvLayer::from_weight(weight, bias, g)?;
            let want = conv.forward(&x)?;
            for tile in [1, 200, 1 << 20] {
                crate::model::kernels::force_device_paths(Some(tile));
                let got = conv.forward(&x);
                crate::model::kernels::force_device_paths(None);
                let d = (got? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "{g:?} tile {tile}: max diff {d}");
            }
        }
        Ok(())
    }

    /// At 540P the Wan VAE decoder's convolutions need im2col matrices of billions of
    /// elements whole; the device path's tiles stay within the tile size, far below 2^31.
    #[test]
    fn device_tiles_stay_below_2_pow_31_at_540p() {
        // (channels, output height, output width) of the decoder's 3x3x3 convolutions at
        // each resolution, 4 frames per chunk at the last levels.
        for (c, ho, wo) in [
            (384, 68, 120),
            (384, 136, 240),
            (192, 272, 480),
            (96, 544, 960),
        ] {
            let k = 27 * c;
            let whole = 4 * ho * wo * k;
            let band = device_band_rows(ho, wo, k, crate::model::kernels::DEVICE_TILE_ELEMS);
            let tile = band * wo * k;
            assert!(
                tile <= crate::model::kernels::DEVICE_TILE_ELEMS,
                "{c} {ho}x{wo}"
            );
            assert!(tile < 1 << 31);
            if c == 96 {
                assert!(
                    whole > 1 << 32,
                    "the last level is what needs tiling: {whole}"
                );
            }
        }
    }

    /// The gather against tensor ops, on a small input (one band) and on one large enough
    /// to be gathered in bands on the pool.
    #[test]
    fn cpu_gather_equals_tensor_ops() -> Result<()> {
        for dims in [(2, 5, 6, 7, 3), (1, 4, 24, 20, 16)] {
            gather_equals_tensor_ops(&Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)?;
        }
        Ok(())
    }

    fn gather_equals_tensor_ops(x: &Tensor) -> Result<()> {
        let geometries = [
            (3, 3, 1, 1, 1, 1),
            (3, 1, 2, 1, 0, 0),
            (1, 3, 1, 2, 0, 1),
            (1, 3, 1, 1, 1, 1),
        ];
        for (kt, k, stride_t, stride_hw, pad_before, pad_after) in geometries {
            let g = Geometry {
                kt,
                kh: k,
                kw: k,
                stride_t,
                stride_hw,
                pad_before,
                pad_after,
            };
            let reference = im2col_tensor_ops(x, g)?;
            let rows = reference.dim(0)?;
            let split = rows / 3;
            let a = x.apply_op1_no_bwd(&Im2Col {
                g,
                row_start: 0,
                rows: split,
                ones_column: false,
            })?;
            let b = x.apply_op1_no_bwd(&Im2Col {
                g,
                row_start: split,
                rows: rows - split,
                ones_column: false,
            })?;
            let got = Tensor::cat(&[a, b], 0)?;
            let diff = (got - &reference)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{g:?}");
            // With the ones column: the same matrix and a last column of ones.
            let with_ones = x.apply_op1_no_bwd(&Im2Col {
                g,
                row_start: 0,
                rows,
                ones_column: true,
            })?;
            let k = reference.dim(1)?;
            let diff = (with_ones.narrow(1, 0, k)? - &reference)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{g:?} with the ones column");
            let ones = with_ones.narrow(1, k, 1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                ones.iter().all(|&v| v == 1.0),
                "{g:?}: ones column {ones:?}"
            );
        }
        Ok(())
    }
}
