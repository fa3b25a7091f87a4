//! CPU kernels for the places where candle's generic ops cost the forward most:
//! attention, the tanh-GELU of the feed-forward, the linear layers (bias fused, weights
//! read in place), and a block's modulated norms and gated residuals (one pass per frame
//! table instead of three broadcast ops). Other devices (and dtypes the kernels do not
//! take) use candle ops.
//!
//! Attention: on the CPU the scores are never materialised as a whole: each task takes a chunk of
//! queries of one head, computes its rows of scores into a small cache-resident buffer
//! (one `gemm` call), applies the softmax in place (a vectorised `exp`), multiplies by the
//! values (a second `gemm`) and writes its rows of the output. Tasks run on the rayon pool.
//! The task's buffers are column-major (query rows contiguous, a multiple of 16 of them):
//! `gemm`'s microkernels then vectorise both products over the queries, read the keys and
//! values in place, and run full 64-row tiles; with a head dimension of 32, the row-major
//! layout packed the keys in every task and ran the value product on half-width tiles.
//! Compared with the same computation as candle tensor ops (scores matmul, scale, softmax,
//! matmul, each writing a fresh `heads x n x keys` tensor), this is 5-10x faster for
//! windows of a few thousand tokens, where attention is most of a forward's FLOPs.
//!
//! On CUDA, bf16 and f16 attention runs a fused kernel of our own (`src/model/cuda/attention.cu`:
//! tensor-core tiles, online softmax, one launch per group of query rows, never more than a
//! 16 x 32 tile of scores per warp); its CPU build runs in the tests. Other devices and
//! dtypes use candle ops, with queries chunked so that the score matrix stays small.
//!
//! GELU: candle computes `tanh` with libm one element at a time; here the same tanh
//! approximation is `x * sigmoid(2u)` with the vectorised `exp` below, on the rayon pool,
//! and in the feed-forward each task of the first linear layer applies it to its own rows.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// im2col tiles of the device (non-CPU) convolution path, in elements: every tensor of
/// that path stays far below the 2^31 elements past which candle's CUDA kernels, which
/// index with 32-bit integers, are unsafe (a 540P VAE layer's whole im2col has 5.4e9).
pub const DEVICE_TILE_ELEMS: usize = 1 << 27;

thread_local! {
    /// Non-zero: this thread runs the device code paths on the CPU, with tiles of this
    /// many elements (see [`force_device_paths`]).
    static FORCED_DEVICE_TILE: Cell<usize> = const { Cell::new(0) };
}

/// Runs the code paths of non-CPU devices (generic candle ops, tiled) on the CPU, on the
/// calling thread, with im2col tiles of at most `tile` elements; `None` restores the CPU
/// kernels. For tests: what a GPU would run can be checked here, against the CPU kernels
/// and the fixtures, with tiles small enough that the tiling is exercised.
pub fn force_device_paths(tile: Option<usize>) {
    FORCED_DEVICE_TILE.with(|f| f.set(tile.unwrap_or(0).max(usize::from(tile.is_some()))));
}

/// Whether a tensor on `device` takes the CPU kernels (not forced off on this thread).
pub(crate) fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && FORCED_DEVICE_TILE.with(Cell::get) == 0
}

/// The im2col tile size of the device path on this thread.
pub(crate) fn device_tile_elems() -> usize {
    match FORCED_DEVICE_TILE.with(Cell::get) {
        0 => DEVICE_TILE_ELEMS,
        n => n,
    }
}

/// Runs `f` on a thread of the pool that runs the CPU kernels when `device` takes them
/// (else, or when called on the pool, on this thread). A forward's parallel loops then
/// start on the pool itself; called from another thread, each of them handed its work to
/// the pool and put the caller to sleep until it was done, and waking it again (a quarter
/// of a small forward's time went to the scheduler).
///
/// While `f` runs on the pool's first thread, the other threads wait for its tasks
/// spinning: each of them looks for a task, runs it if there is one, and looks again until
/// `f` returns. A small model's forward is thousands of parallel loops of tens of
/// microseconds each between short serial stretches; a thread that went to sleep in such a
/// stretch took about as long to wake up for the next loop as the loop itself. After a
/// short spin the waiting threads yield their core between checks, so that other
/// processes (or another generator) on a busy machine still get it, and after
/// [`MAX_SPIN_IDLE`] without a task they stop waiting (see the loop for why).
pub(crate) fn on_pool<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    // Device code paths forced on the CPU stay on the calling thread, whose flag forces them.
    if !cpu_kernels(device) || rayon::current_thread_index().is_some() {
        return f();
    }
    let job = Mutex::new(Some(f));
    let out = Mutex::new(None);
    let done = AtomicBool::new(false);
    rayon::broadcast(|ctx| {
        if ctx.index() == 0 {
            // Releases the other threads however `f` ends (a panic included).
            let _release = SetOnDrop(&done);
            let f = job.lock().ok().and_then(|mut j| j.take());
            if let Some(f) = f {
                let y = f();
                if let Ok(mut o) = out.lock() {
                    *o = Some(y);
                }
            }
        } else {
            // Idle checks in a row; past a short spin, each one offers the core to the
            // system's other runnable threads first (returns at once when there are none).
            let mut idle = 0u32;
            let mut idle_since = None;
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle = 0;
                    idle_since = None;
                    continue;
                }
                // This thread may have picked up this wait while itself waiting inside a
                // task of `f` (several callers share the pool): then `f` waits for that
                // task, which cannot go on until the wait here returns. Idle for long
                // means nothing is coming: hand the thread back to the pool.
                if idle_since.get_or_insert_with(Instant::now).elapsed() > MAX_SPIN_IDLE {
                    break;
                }
                if idle < SPIN_CHECKS {
                    idle += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    });
    match out.into_inner() {
        Ok(Some(y)) => y,
        // `f` panicked on the pool (the broadcast re-raised it), or never ran.
        _ => unreachable!("the pool's first thread runs the job once"),
    }
}

/// Idle checks for a task that a waiting pool thread makes before it yields its core to
/// other threads between checks (see [`on_pool`]).
const SPIN_CHECKS: u32 = 64;

/// How long a waiting pool thread stays idle before it stops waiting for `on_pool`'s job
/// and goes back to the pool's own idling (a row's serial stretches take a few
/// milliseconds at most; see [`on_pool`]).
const MAX_SPIN_IDLE: Duration = Duration::from_millis(5);

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// `softmax(q k^T / sqrt(d)) v` for `q` `[1, heads, n, d]`, `k` and `v` `[1, heads, l, d]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (n, l) = (q.dim(2)?, k.dim(2)?);
    sdpa_grouped(
        q,
        k,
        v,
        &[Group {
            q_start: 0,
            q_len: n,
            k_start: 0,
            keys: l,
        }],
    )
}

/// A run of query rows that attends to the `keys` keys starting at key row `k_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub keys: usize,
}

/// Attention where each group of query rows sees its own range of the keys: block-causal
/// attention over several blocks at once (block `b`'s queries see the keys up to the end of
/// block `b`), or several guidance branches whose key caches sit one after the other in
/// `k` / `v`, without a mask and without computing the hidden scores. The groups must
/// cover the query rows in order.
pub fn sdpa_grouped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[Group],
) -> candle_core::Result<Tensor> {
    check_grouped(q, k, v, groups)?;
    if cpu_kernels(q.device()) {
        let dt = q.dtype();
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let op = CpuAttention {
            groups: groups.to_vec(),
            tokens: None,
        };
        let out = f(q)?.apply_op3_no_bwd(&f(k)?, &f(v)?, &op)?;
        return out.to_dtype(dt);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && fused_kernel(q.dtype(), q.dim(3)?) {
        let dt = q.dtype();
        let op = cuda::FusedAttention {
            groups: groups.to_vec(),
        };
        let f = |t: &Tensor| t.to_dtype(dt)?.contiguous();
        return f(q)?.apply_op3_no_bwd(&f(k)?, &f(v)?, &op);
    }
    let mut outs = Vec::with_capacity(groups.len());
    for g in groups.iter().filter(|g| g.q_len > 0) {
        outs.push(generic(
            &q.narrow(2, g.q_start, g.q_len)?,
            &k.narrow(2, g.k_start, g.keys)?,
            &v.narrow(2, g.k_start, g.keys)?,
        )?);
    }
    match outs.len() {
        0 => q.zeros_like(),
        1 => Ok(outs.remove(0)),
        _ => Tensor::cat(&outs, 2),
    }
}

/// [`sdpa_grouped`] with token-major queries and output, `[n, heads * head_dim]` (as the
/// projections produce and take them), the queries rotated first by `rope` (`[n,
/// head_dim]`: the `head_dim / 2` cosines, then the sines; interleaved pairs as
/// `candle_nn::rotary_emb::rope_i`) when given. On the CPU one kernel reads the queries and
/// writes the output in place of the head split, the rotation and the head merge (three
/// copies of the queries or the output); elsewhere those candle ops around
/// [`sdpa_grouped`].
pub fn sdpa_tokens(
    q: &Tensor,
    rope: Option<&Tensor>,
    k: &Tensor,
    v: &Tensor,
    groups: &[Group],
) -> candle_core::Result<Tensor> {
    let (n, d) = q.dims2()?;
    let (_, heads, _, hd) = k.dims4()?;
    if d != heads * hd || rope.is_some_and(|r| r.dims() != [n, hd]) || hd % 2 != 0 {
        candle_core::bail!(
            "token-major attention of queries {:?} (rope {:?}) on keys {:?}",
            q.shape(),
            rope.map(|r| r.shape().clone()),
            k.shape()
        );
    }
    if cpu_kernels(q.device()) {
        // The head-major shape checks the groups, keys and values.
        check_grouped(
            &q.reshape((1, n, heads, hd))?.transpose(1, 2)?,
            k,
            v,
            groups,
        )?;
        let dt = q.dtype();
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let op = CpuAttention {
            groups: groups.to_vec(),
            tokens: Some(TokenMajor {
                rope: rope.map(f).transpose()?,
            }),
        };
        let out = f(q)?.apply_op3_no_bwd(&f(k)?, &f(v)?, &op)?;
        return out.to_dtype(dt);
    }
    let qh = q
        .reshape((1, n, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let qh = match rope {
        Some(r) => {
            let (cos, sin) = (r.narrow(1, 0, hd / 2)?, r.narrow(1, hd / 2, hd / 2)?);
            let (cos, sin) = (cos.to_dtype(q.dtype())?, sin.to_dtype(q.dtype())?);
            candle_nn::rotary_emb::rope_i(&qh, &cos.contiguous()?, &sin.contiguous()?)?
        }
        None => qh,
    };
    let a = sdpa_grouped(&qh, k, v, groups)?;
    a.transpose(1, 2)?.reshape((n, d))
}

/// Checks the shapes of a grouped attention; returns the head dimension.
fn check_grouped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[Group],
) -> candle_core::Result<usize> {
    let (b, heads, n, hd) = q.dims4()?;
    let (kb, kh, l, khd) = k.dims4()?;
    if b != 1 || kb != 1 || kh != heads || khd != hd || v.dims4()? != (1, heads, l, hd) {
        candle_core::bail!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let mut next = 0;
    for g in groups {
        if g.q_start != next || g.keys == 0 || g.k_start + g.keys > l {
            candle_core::bail!("attention groups {groups:?} do not fit {n} queries and {l} keys");
        }
        next += g.q_len;
    }
    if next != n {
        candle_core::bail!("attention groups {groups:?} do not cover {n} queries");
    }
    if [heads, n, l, hd].iter().any(|&x| i32::try_from(x).is_err()) {
        candle_core::bail!("attention of {heads} heads, {n} queries, {l} keys is too large");
    }
    Ok(hd)
}

/// Whether the fused kernel (`src/model/cuda/attention.cu`) serves this dtype and head
/// dimension: bf16 or f16 (tensor-core inputs), head dimension 32, 64 or 128 (the tiny
/// model's and Wan's). f32 on CUDA (the parity tests' dtype) takes the generic path.
pub fn fused_kernel(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 32 | 64 | 128)
}

unsafe extern "C" {
    /// One launch of the fused kernel, run on the CPU (src/model/cuda/attention_host.cpp).
    fn motioncache_attention_emulated(
        dtype: i32,
        head_dim: i32,
        q: *const std::ffi::c_void,
        k: *const std::ffi::c_void,
        v: *const std::ffi::c_void,
        out: *mut std::ffi::c_void,
        heads: i32,
        n: i32,
        l: i32,
        q_start: i32,
        q_len: i32,
        k_start: i32,
        keys: i32,
        scale: f32,
    ) -> i32;
}

/// The CUDA attention kernel, compiled for the CPU with an emulation of the CUDA built-ins
/// (each GPU thread a host thread, WMMA computed exactly in f32): the same launches, tiles,
/// masking and online softmax as [`sdpa_grouped`] on a CUDA device with bf16 / f16 inputs,
/// checked by the tests without a GPU. Slow; not a CPU path.
pub fn emulated_cuda_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[Group],
) -> candle_core::Result<Tensor> {
    let hd = check_grouped(q, k, v, groups)?;
    let dt = q.dtype();
    if !fused_kernel(dt, hd) {
        candle_core::bail!("no fused attention kernel for {dt:?} with head dimension {hd}");
    }
    let (_, heads, n, _) = q.dims4()?;
    let l = k.dim(2)?;
    fn host<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(T::DTYPE)?
            .flatten_all()?
            .to_vec1::<T>()
    }
    fn run<T: candle_core::WithDType>(
        code: i32,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        groups: &[Group],
        (heads, n, l, hd): (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = (host::<T>(q)?, host::<T>(k)?, host::<T>(v)?);
        let mut out = vec![T::zero(); heads * n * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        for g in groups.iter().filter(|g| g.q_len > 0) {
            // SAFETY: the buffers hold [heads, n | l, hd] values of the kernel's type (checked
            // by check_grouped and fused_kernel), every group lies within them, and the
            // kernel only writes rows of its group.
            let rc = unsafe {
                motioncache_attention_emulated(
                    code,
                    hd as i32,
                    q.as_ptr().cast(),
                    k.as_ptr().cast(),
                    v.as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    heads as i32,
                    n as i32,
                    l as i32,
                    g.q_start as i32,
                    g.q_len as i32,
                    g.k_start as i32,
                    g.keys as i32,
                    scale,
                )
            };
            if rc != 0 {
                candle_core::bail!("the emulated attention kernel refused head dimension {hd}");
            }
        }
        Tensor::from_vec(out, (1, heads, n, hd), &Device::Cpu)
    }
    let dims = (heads, n, l, hd);
    match dt {
        DType::BF16 => run::<half::bf16>(0, q, k, v, groups, dims),
        _ => run::<half::f16>(1, q, k, v, groups, dims),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The fused attention kernel on a CUDA device.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, Layout, Shape};

    use super::Group;

    /// attention.cu compiled by nvcc (build.rs).
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    /// Query rows per block of the kernel (`BR` in attention.cu) and threads per block.
    const FUSED_ROWS: usize = 32;
    const FUSED_THREADS: u32 = 64;

    pub(super) struct FusedAttention {
        pub(super) groups: Vec<Group>,
    }

    fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.slice(a..b)),
            None => candle_core::bail!("the fused attention takes contiguous inputs"),
        }
    }

    fn launch<T: DeviceRepr + ValidAsZeroBits>(
        kind: &str,
        dev: &CudaDevice,
        groups: &[Group],
        (q, lq): (&CudaSlice<T>, &Layout),
        (k, lk): (&CudaSlice<T>, &Layout),
        (v, lv): (&CudaSlice<T>, &Layout),
    ) -> candle_core::Result<CudaSlice<T>> {
        let (q, k, v) = (view(q, lq)?, view(k, lk)?, view(v, lv)?);
        let (_, heads, n, hd) = lq.shape().dims4()?;
        let l = lk.shape().dims4()?.2;
        let func = dev.get_or_load_custom_func(
            &format!("mc_attention_{kind}_d{hd}"),
            "motioncache_attention",
            PTX,
        )?;
        let mut out = dev.alloc_zeros::<T>(heads * n * hd)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (n, l) = (n as i32, l as i32);
        for g in groups.iter().filter(|g| g.q_len > 0) {
            let cfg = LaunchConfig {
                grid_dim: (g.q_len.div_ceil(FUSED_ROWS) as u32, heads as u32, 1),
                block_dim: (FUSED_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (q_start, q_len) = (g.q_start as i32, g.q_len as i32);
            let (k_start, keys) = (g.k_start as i32, g.keys as i32);
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&mut out);
            b.arg(&n);
            b.arg(&l);
            b.arg(&q_start);
            b.arg(&q_len);
            b.arg(&k_start);
            b.arg(&keys);
            b.arg(&scale);
            // SAFETY: shapes checked by check_grouped; the kernel reads within q, k and v
            // and writes only the rows of its group in out.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(out)
    }

    impl CustomOp3 for FusedAttention {
        fn name(&self) -> &'static str {
            "motioncache-fused-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the fused attention kernel runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s1.device();
            let g = &self.groups;
            let slice = match (&s1.slice, &s2.slice, &s3.slice) {
                (
                    CudaStorageSlice::BF16(q),
                    CudaStorageSlice::BF16(k),
                    CudaStorageSlice::BF16(v),
                ) => CudaStorageSlice::BF16(launch("bf16", dev, g, (q, l1), (k, l2), (v, l3))?),
                (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                    CudaStorageSlice::F16(launch("f16", dev, g, (q, l1), (k, l2), (v, l3))?)
                }
                _ => candle_core::bail!(
                    "the fused attention takes bf16 or f16, got {:?}",
                    s1.dtype()
                ),
            };
            let out = CudaStorage {
                slice,
                device: dev.clone(),
            };
            Ok((out, l1.shape().clone()))
        }
    }
}

/// The same computation as candle ops (any device).
fn generic(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (_, heads, n, hd) = q.dims4()?;
    let l = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let kt = k.transpose(2, 3)?;
    let budget = 64 * 1024 * 1024 / 4; // f32 scores per chunk
    let chunk = (budget / (heads * l).max(1)).clamp(1, n.max(1));
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let qc = q.narrow(2, start, len)?;
        let s = (qc.matmul(&kt)? * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        outs.push(p.matmul(v)?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

struct CpuAttention {
    groups: Vec<Group>,
    /// `None`: queries and output `[1, heads, n, head_dim]`. `Some`: both token-major,
    /// `[n, heads * head_dim]` (straight from the query projection, straight into the
    /// output projection), the queries rotated by the `[n, head_dim]` table (cosines, then
    /// sines; `rope_i`'s interleaved pairs) when one is given.
    tokens: Option<TokenMajor>,
}

struct TokenMajor {
    rope: Option<Tensor>,
}

/// Score floats per task buffer (512 KB): a task's scores stay in L2.
const TASK_SCORES: usize = 128 * 1024;

/// Query rows of one task: as many as keep its scores within [`TASK_SCORES`], rounded
/// down to whole microkernel tiles of `gemm` (64 rows where there is room, else 16), so
/// that both products run on full vectors.
fn task_rows(keys: usize) -> usize {
    let rows = TASK_SCORES / keys.max(1);
    if rows >= 64 {
        rows / 64 * 64
    } else {
        (rows / LANES * LANES).max(LANES)
    }
}

/// A task's buffers, column-major with `rows` (a multiple of [`LANES`]) rows each: its
/// queries transposed (`hd x rows`), its scores (`keys x rows`), its output transposed
/// (`hd x rows`) and the rows' softmax sums.
#[derive(Default)]
struct TaskBuffers {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    sums: Vec<f32>,
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "motioncache-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1)?;
        let k = contiguous_f32(s2, l2)?;
        let v = contiguous_f32(s3, l3)?;
        let (_, heads, l, hd) = l2.shape().dims4()?;
        let n = match &self.tokens {
            None => l1.shape().dims4()?.2,
            Some(_) => l1.shape().dims2()?.0,
        };
        let rope = match self.tokens.as_ref().and_then(|t| t.rope.as_ref()) {
            Some(r) => Some(r.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; heads * n * hd];
        if n == 0 || hd == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let simd = Simd::detect();
        // Tasks: (head, first query row, rows, first key, keys seen): chunks of query rows
        // inside one group.
        let mut tasks: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
        for h in 0..heads {
            for g in &self.groups {
                let mut q0 = g.q_start;
                while q0 < g.q_start + g.q_len {
                    let rows = task_rows(g.keys).min(g.q_start + g.q_len - q0);
                    tasks.push((h, q0, rows, g.k_start, g.keys));
                    q0 += rows;
                }
            }
        }
        // Where query row `i` of head `h` is read and its output written: head-major
        // (`[heads, n, hd]`) or token-major (`[n, heads * hd]`).
        let at = |h: usize, i: usize| match &self.tokens {
            None => (h * n + i) * hd,
            Some(_) => i * heads * hd + h * hd,
        };
        // Each (head, query row) pair belongs to exactly one task.
        let dst = Tile(out.as_mut_ptr());
        // Every product runs with its output column-major (query rows contiguous), the
        // layout `gemm`'s microkernels compute in: the query rows are the vectorised
        // dimension of both, the keys and values are read in place (neither is packed),
        // and the scores are already laid out as the second product's left operand.
        tasks
            .into_par_iter()
            .for_each_init(TaskBuffers::default, |b, (h, q0, rows, k0, keys)| {
                let rp = rows.next_multiple_of(LANES);
                let kh = &k[(h * l + k0) * hd..(h * l + k0 + keys) * hd];
                let vh = &v[(h * l + k0) * hd..(h * l + k0 + keys) * hd];
                // The buffers only grow (whatever they hold is overwritten below, but
                // for the padding rows of the queries, zeroed).
                for (buf, len) in [
                    (&mut b.q, hd * rp),
                    (&mut b.s, keys * rp),
                    (&mut b.o, hd * rp),
                    (&mut b.sums, rp),
                ] {
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                }
                match &rope {
                    None => {
                        for (c, col) in b.q.chunks_exact_mut(rp).take(hd).enumerate() {
                            for (i, x) in col[..rows].iter_mut().enumerate() {
                                *x = q[at(h, q0 + i) + c];
                            }
                            col[rows..].fill(0.0);
                        }
                    }
                    Some(r) => {
                        let half = hd / 2;
                        for i in 0..rows {
                            let s = &q[at(h, q0 + i)..at(h, q0 + i) + hd];
                            let (cos, sin) = r[(q0 + i) * hd..(q0 + i + 1) * hd].split_at(half);
                            for j in 0..half {
                                let (x, y) = (s[2 * j], s[2 * j + 1]);
                                b.q[2 * j * rp + i] = x * cos[j] - y * sin[j];
                                b.q[(2 * j + 1) * rp + i] = x * sin[j] + y * cos[j];
                            }
                        }
                        for col in b.q.chunks_exact_mut(rp).take(hd) {
                            col[rows..].fill(0.0);
                        }
                    }
                }
                // SAFETY: every pointer/stride pair below describes a buffer of exactly
                // the stated rows x columns: b.q is rp x hd (column-major), kh and vh
                // are keys x hd (row-major), b.s is rp x keys and b.o rp x hd (both
                // column-major).
                unsafe {
                    // s = scale * q kh^T
                    gemm::gemm(
                        rp,
                        keys,
                        hd,
                        b.s.as_mut_ptr(),
                        rp as isize,
                        1,
                        false,
                        b.q.as_ptr(),
                        rp as isize,
                        1,
                        kh.as_ptr(),
                        hd as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                softmax_columns(simd, &mut b.s[..keys * rp], rp, &mut b.sums[..rp]);
                unsafe {
                    // o = s vh
                    gemm::gemm(
                        rp,
                        hd,
                        keys,
                        b.o.as_mut_ptr(),
                        rp as isize,
                        1,
                        false,
                        b.s.as_ptr(),
                        rp as isize,
                        1,
                        vh.as_ptr(),
                        1,
                        hd as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for i in 0..rows {
                    let inv = 1.0 / b.sums[i];
                    // SAFETY: the `hd` values of (head h, query row q0 + i) lie inside
                    // `out` (`heads * n * hd` values) and belong to this task alone.
                    let orow = unsafe { std::slice::from_raw_parts_mut(dst.at(at(h, q0 + i)), hd) };
                    for (c, x) in orow.iter_mut().enumerate() {
                        *x = b.o[c * rp + i] * inv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `l.forward(x)` for a matrix `x` `[n, in]` (candle's `Linear`: `x w^T + b`). On the CPU,
/// for f32, one pass: each task takes a band of rows, writes the bias into its rows of the
/// output and lets `gemm` accumulate the product onto it, instead of candle's multiply on
/// its thread pool followed by a broadcast add into a second fresh tensor. At this
/// project's sizes (a few hundred tokens of width 128-512) that add and the pool's
/// synchronisation cost about as much as the multiply. Other devices, dtypes and ranks run
/// candle's `Linear`.
pub fn linear(l: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    linear_then(l, x, Epilogue::None)
}

/// `gelu(linear(l, x))` (the feed-forward's first half): on the CPU, for f32, each task of
/// [`linear`] applies the GELU to its band of rows right after its product, while the band
/// is in cache, instead of a second pass over a copy of the whole output.
pub fn linear_gelu(l: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    linear_then(l, x, Epilogue::Gelu)
}

/// `rms_norm(linear(l, x), w, eps)` (the attention's query and key projections with
/// their norm across heads): on the CPU, for f32, each task of [`linear`] that holds whole
/// rows normalises them right after its product, while they are in cache; a pass of a few
/// rows split by columns normalises after the product. Elsewhere candle's ops.
pub fn linear_rms(
    l: &candle_nn::Linear,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let o = l.weight().dim(0)?;
    if w.dims() != [o] {
        candle_core::bail!("rms norm weight {:?} after a linear map to {o}", w.shape());
    }
    let weight = w.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    linear_then(l, x, Epilogue::Rms { weight, eps, w })
}

/// `residual + linear(l, x)` (a residual connection after a projection): on the CPU, for
/// f32, each task of [`linear`] writes the residual plus the bias into its rows of the
/// output and lets `gemm` accumulate the product onto them, instead of a second pass that
/// adds two whole tensors into a third. Elsewhere candle's ops.
pub fn linear_add(
    l: &candle_nn::Linear,
    x: &Tensor,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    // The input and the weight are checked by `linear_then`, which runs candle's ops where
    // they do not fit; here the residual.
    let fits = x.rank() == 2
        && residual.dims() == [x.dim(0)?, l.weight().dim(0)?]
        && f32_kernels(&[residual]);
    if !fits {
        return residual + linear(l, x)?;
    }
    let residual = residual.contiguous()?;
    linear_then(l, x, Epilogue::Add(&residual))
}

/// What [`CpuLinear`] applies to its output rows.
enum Epilogue<'a> {
    None,
    /// A residual (`[n, out]`, contiguous f32 on the CPU) added to the product: written
    /// into the output with the bias, before it.
    Add(&'a Tensor),
    Gelu,
    /// RMS norm of each row with this weight (`w`, also as values on the host).
    Rms {
        weight: Vec<f32>,
        eps: f32,
        w: &'a Tensor,
    },
}

fn linear_then(l: &candle_nn::Linear, x: &Tensor, then: Epilogue) -> candle_core::Result<Tensor> {
    use candle_core::Module;
    let w = l.weight();
    let f32_cpu = |t: &Tensor| cpu_kernels(t.device()) && t.dtype() == DType::F32;
    let fits = x.rank() == 2
        && w.rank() == 2
        && x.dim(1)? == w.dim(1)?
        && l.bias().is_none_or(|b| b.dims() == [w.dim(0).unwrap_or(0)]);
    if !(fits && f32_cpu(x) && f32_cpu(w) && l.bias().is_none_or(f32_cpu)) {
        let y = l.forward(x)?;
        return match then {
            Epilogue::None => Ok(y),
            Epilogue::Add(r) => r + y,
            Epilogue::Gelu => self::gelu(&y),
            Epilogue::Rms { w, eps, .. } => {
                candle_nn::ops::rms_norm(&y, &w.to_dtype(y.dtype())?, eps)
            }
        };
    }
    let zeros;
    let b = match l.bias() {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(w.dim(0)?, DType::F32, x.device())?;
            &zeros
        }
    };
    // Either layout of the weight is read in place (see `kernel_layout`); any other is
    // copied to candle's.
    let w = if w.is_contiguous() || w.t()?.is_contiguous() {
        w.clone()
    } else {
        w.contiguous()?
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w, &b.contiguous()?, &CpuLinear(then))
}

/// `l` with its weight stored transposed (`[in, out]` in memory, the same `[out, in]`
/// tensor) when [`linear`] will run it on the CPU: `gemm` then reads the weight as it
/// multiplies instead of repacking it in every call (15% of a small forward). Other
/// devices and dtypes keep candle's layout.
pub fn kernel_layout(l: candle_nn::Linear) -> candle_core::Result<candle_nn::Linear> {
    let w = l.weight();
    if !(cpu_kernels(w.device()) && w.dtype() == DType::F32 && w.rank() == 2) {
        return Ok(l);
    }
    let wt = w.t()?.contiguous()?.t()?;
    Ok(candle_nn::Linear::new(wt, l.bias().cloned()))
}

/// The linear map and what it applies to its output rows.
struct CpuLinear<'a>(Epilogue<'a>);

/// `1 / sqrt(mean(x^2) + eps)`: the factor of an RMS norm.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = lane_sum(x, |v| v * v) / x.len().max(1) as f32;
    1.0 / (ms + eps).sqrt()
}

/// `row <- row * w / sqrt(mean(row^2) + eps)`, in place.
fn rms_row(row: &mut [f32], w: &[f32], eps: f32) {
    let inv = inv_rms(row, eps);
    for (v, &w) in row.iter_mut().zip(w) {
        *v = *v * inv * w;
    }
}

/// Rows of the output per task, at least (smaller bands cost more in `gemm`'s packing than
/// they gain in parallelism).
const LINEAR_MIN_ROWS: usize = 32;

impl CustomOp3 for CpuLinear<'_> {
    fn name(&self) -> &'static str {
        "motioncache-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let b = contiguous_f32(s3, l3)?;
        let (n, i) = l1.shape().dims2()?;
        let o = l2.shape().dims()[0];
        // The weight as the right-hand side `w^T` (`i x o`): its column and row strides.
        let (w, w_cs, w_rs) = match l2.contiguous_offsets() {
            Some((a, z)) => (&f32_data(s2)?[a..z], i, 1),
            None => {
                let t = l2.transpose(0, 1)?;
                let Some((a, z)) = t.contiguous_offsets() else {
                    candle_core::bail!(
                        "linear kernel: weight is neither [out, in] nor [in, out] in memory"
                    );
                };
                (&f32_data(s2)?[a..z], 1, o)
            }
        };
        if n == 0 || o == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((n, o))));
        }
        let simd = Simd::detect();
        let threads = rayon::current_num_threads().max(1);
        // Tiles of the output (rows r0..r1, columns c0..c1), one task each: bands of rows,
        // or, where there are too few rows for every thread to get LINEAR_MIN_ROWS, bands
        // of columns (a partial pass of a few dozen tokens).
        let row_bands = n >= threads * LINEAR_MIN_ROWS || o < threads * LANES;
        let tiles: Vec<(usize, usize, usize, usize)> = if row_bands {
            let rows = n.div_ceil(threads).max(LINEAR_MIN_ROWS);
            (0..n)
                .step_by(rows)
                .map(|r0| (r0, (r0 + rows).min(n), 0, o))
                .collect()
        } else {
            let cols = o.div_ceil(threads).next_multiple_of(LANES);
            (0..o)
                .step_by(cols)
                .map(|c0| (0, n, c0, (c0 + cols).min(o)))
                .collect()
        };
        // The residual of `Epilogue::Add`, read in place.
        let guard = match &self.0 {
            Epilogue::Add(t) => Some(t.storage_and_layout()),
            _ => None,
        };
        let residual = match guard.as_ref().map(|(s, l)| (&**s, *l)) {
            Some((candle_core::Storage::Cpu(s), layout)) if layout.dims() == [n, o] => {
                Some(contiguous_f32(s, layout)?)
            }
            Some((_, layout)) => candle_core::bail!(
                "linear kernel: residual {:?} is not an [{n}, {o}] CPU tensor",
                layout.shape()
            ),
            None => None,
        };
        let mut out = Vec::<f32>::with_capacity(n * o);
        let dst = Tile(out.as_mut_ptr());
        tiles.into_par_iter().for_each(|(r0, r1, c0, c1)| {
            let c = c1 - c0;
            // SAFETY: the tiles are disjoint and inside the `n x o` allocation of `out`:
            // each task writes the bias (plus the residual) into every element of its own
            // tile (the product is then accumulated onto it in cache), and only then reads
            // them. x is n x i (row-major) and w holds o x i values, read as the i x o
            // matrix w^T with the strides above, from its column c0.
            unsafe {
                for r in r0..r1 {
                    let row = dst.at(r * o + c0);
                    match residual {
                        None => std::ptr::copy_nonoverlapping(b[c0..c1].as_ptr(), row, c),
                        Some(res) => {
                            let row = std::slice::from_raw_parts_mut(row, c);
                            let res = &res[r * o + c0..r * o + c1];
                            for ((y, &a), &b) in row.iter_mut().zip(res).zip(&b[c0..c1]) {
                                *y = a + b;
                            }
                        }
                    }
                }
                if i > 0 {
                    gemm::gemm(
                        r1 - r0,
                        c,
                        i,
                        dst.at(r0 * o + c0),
                        1,
                        o as isize,
                        true,
                        x[r0 * i..].as_ptr(),
                        1,
                        i as isize,
                        w[c0 * w_cs..].as_ptr(),
                        w_cs as isize,
                        w_rs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                match &self.0 {
                    Epilogue::None | Epilogue::Add(_) => {}
                    Epilogue::Gelu => {
                        for r in r0..r1 {
                            let row = std::slice::from_raw_parts_mut(dst.at(r * o + c0), c);
                            gelu_inplace(simd, row);
                        }
                    }
                    // Whole rows: normalised here, while in cache.
                    Epilogue::Rms { weight, eps, .. } if c == o => {
                        for r in r0..r1 {
                            let row = std::slice::from_raw_parts_mut(dst.at(r * o), o);
                            rms_row(row, weight, *eps);
                        }
                    }
                    Epilogue::Rms { .. } => {}
                }
            }
        });
        // SAFETY: the tiles cover all `n * o` elements, each written above.
        unsafe { out.set_len(n * o) };
        // Tiles of part of the columns: the rows are normalised once all are written.
        if let Epilogue::Rms { weight, eps, .. } = &self.0
            && !row_bands
        {
            out.par_chunks_mut(o).for_each(|r| rms_row(r, weight, *eps));
        }
        Ok((CpuStorage::F32(out), Shape::from((n, o))))
    }
}

/// The output of [`CpuLinear`] or [`CpuAttention`], shared by its tasks, each of which
/// writes its own elements.
struct Tile(*mut f32);

// SAFETY: the tasks write disjoint elements (see `CpuLinear::cpu_fwd` and
// `CpuAttention::cpu_fwd`).
unsafe impl Sync for Tile {}

impl Tile {
    /// Element `k` of the output.
    fn at(&self, k: usize) -> *mut f32 {
        self.0.wrapping_add(k)
    }
}

/// Whether every tensor is f32 on the CPU with the CPU kernels on: the condition of the
/// fused per-frame kernels below.
pub(crate) fn f32_kernels(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| cpu_kernels(t.device()) && t.dtype() == DType::F32)
}

/// `f` on the values of `t`, borrowed from its storage when it is a contiguous f32 tensor on
/// the CPU, else copied to the host first.
pub(crate) fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?))
}

/// Writes `x - x0` (both `[n, d]`) into the columns `col * d..(col + 1) * d` of `dst`, `n`
/// rows of `width` values: a forward's hidden state at one layer minus its input, recorded
/// straight into one buffer for all layers. Any device and dtype (read as f32).
pub(crate) fn write_difference(
    dst: &mut [f32],
    width: usize,
    col: usize,
    x: &Tensor,
    x0: &Tensor,
) -> candle_core::Result<()> {
    let (n, d) = x.dims2()?;
    if x0.dims() != [n, d] || dst.len() != n * width || (col + 1) * d > width {
        candle_core::bail!(
            "difference of {:?} and {:?} into column {col} of {} rows of {width}",
            x.shape(),
            x0.shape(),
            dst.len() / width.max(1)
        );
    }
    with_host_f32(x, |x| {
        with_host_f32(x0, |x0| {
            dst.par_chunks_mut(width)
                .with_min_len(64)
                .zip(x.par_chunks(d).zip(x0.par_chunks(d)))
                .for_each(|(o, (a, b))| {
                    for ((o, &a), &b) in o[col * d..(col + 1) * d].iter_mut().zip(a).zip(b) {
                        *o = a - b;
                    }
                });
        })
    })?
}

/// A DiT block's modulated norm in one pass: `layer_norm(x) * (1 + m[f, scale]) +
/// m[f, shift]` for the tokens of frame `f` (`x` `[n, dim]` sorted by frame, `counts` the
/// tokens of each frame, `m` `[frames, rows, dim]` with rows `shift` and `scale` among
/// them; the norm without affine, in f32). CPU, f32 only (see [`f32_kernels`]).
pub(crate) fn norm_modulate(
    x: &Tensor,
    m: &Tensor,
    counts: &[usize],
    shift: usize,
    scale: usize,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let op = FrameOp::norm(counts, shift, scale, eps, None);
    x.contiguous()?.apply_op2_no_bwd(&m.contiguous()?, &op)
}

/// [`norm_modulate`] of a batch's tokens `x` `[n, dim]` followed by the estimated hidden
/// states of a key/value refresh at layer `layer`: for token `i` of `est`
/// (`[k, w * dim]`, `w` >= 1), `est[i, ..dim]` plus, after the first layer,
/// `est[i, layer * dim..(layer + 1) * dim]`. One pass over both instead of the sum, the
/// concatenation and the norm. `counts` covers the `n + k` rows. CPU, f32 only.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_modulate_joined(
    x: &Tensor,
    est: &Tensor,
    layer: usize,
    m: &Tensor,
    counts: &[usize],
    shift: usize,
    scale: usize,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let op = FrameOp::norm(counts, shift, scale, eps, Some(layer));
    x.contiguous()?
        .apply_op3_no_bwd(&est.contiguous()?, &m.contiguous()?, &op)
}

/// A DiT block's gated residual in one pass: `x + y * m[f, gate]` for the tokens of frame
/// `f` (shapes as in [`norm_modulate`]). CPU, f32 only.
pub(crate) fn gated_add(
    x: &Tensor,
    y: &Tensor,
    m: &Tensor,
    counts: &[usize],
    gate: usize,
) -> candle_core::Result<Tensor> {
    let op = FrameOp {
        counts: counts.to_vec(),
        kind: FrameKind::GatedAdd { gate },
    };
    x.contiguous()?
        .apply_op3_no_bwd(&y.contiguous()?, &m.contiguous()?, &op)
}

struct FrameOp {
    counts: Vec<usize>,
    kind: FrameKind,
}

enum FrameKind {
    NormModulate {
        shift: usize,
        scale: usize,
        eps: f32,
        /// The layer of the refresh estimates that follow the rows of `x` (see
        /// [`norm_modulate_joined`]).
        joined: Option<usize>,
    },
    GatedAdd {
        gate: usize,
    },
}

/// Rows per task of the per-frame kernels: a few tasks per thread, at least 16 rows each.
fn frame_rows(n: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    n.div_ceil(tasks).max(16)
}

/// Lanes of the partial sums in [`lane_sum`].
const SUM_LANES: usize = 16;

/// `sum(f(v))` over `x` in `SUM_LANES` independent partial sums, which the compiler
/// vectorises (one running sum is a chain of dependent scalar adds).
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; SUM_LANES];
    let chunks = x.chunks_exact(SUM_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// A layer norm's statistics of one row: its mean and `1 / sqrt(variance + eps)`, in two
/// passes (mean, then variance).
fn mean_inv_std(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl FrameOp {
    fn norm(counts: &[usize], shift: usize, scale: usize, eps: f32, joined: Option<usize>) -> Self {
        Self {
            counts: counts.to_vec(),
            kind: FrameKind::NormModulate {
                shift,
                scale,
                eps,
                joined,
            },
        }
    }

    /// `out[r] = f(row r, its frame's rows of m)` over the rows in order, in parallel. `y`
    /// `[rows, y_width]`: the gated add's second input, or the estimates after `x`'s rows
    /// of a joined norm.
    fn run(
        &self,
        x: &[f32],
        y: Option<(&[f32], &Shape)>,
        m: &[f32],
        shape: &Shape,
        m_shape: &Shape,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (nx, d) = shape.dims2()?;
        let (frames, six, md) = m_shape.dims3()?;
        let joined = match self.kind {
            FrameKind::NormModulate {
                joined: Some(l), ..
            } => Some(l),
            _ => None,
        };
        // Rows of the output, and the width of `y`'s rows.
        let (n, yw) = match (&self.kind, y, joined) {
            (FrameKind::GatedAdd { .. }, Some((_, ys)), _) if ys == shape => (nx, d),
            (FrameKind::NormModulate { .. }, None, None) => (nx, 0),
            (FrameKind::NormModulate { .. }, Some((_, ys)), Some(l)) => {
                let (k, w) = ys.dims2()?;
                if w < d || w % d.max(1) != 0 || (l > 0 && (l + 1) * d > w) {
                    candle_core::bail!(
                        "refresh estimates {:?} for layer {l} of tokens of {d}",
                        ys.dims()
                    );
                }
                (nx + k, w)
            }
            _ => candle_core::bail!(
                "per-frame op on {:?} with a second input {:?}",
                shape.dims(),
                y.map(|(_, s)| s.dims())
            ),
        };
        let needed = match self.kind {
            FrameKind::NormModulate { shift, scale, .. } => shift.max(scale) + 1,
            FrameKind::GatedAdd { gate } => gate + 1,
        };
        if md != d
            || six < needed
            || frames != self.counts.len()
            || self.counts.iter().sum::<usize>() != n
        {
            candle_core::bail!(
                "per-frame op: {n} tokens of {d} in frames {:?} against a table {:?}",
                self.counts,
                m_shape.dims()
            );
        }
        let y = y.map(|(y, _)| y).unwrap_or_default();
        // The frame of every row.
        let frame: Vec<usize> = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(f, &c)| std::iter::repeat_n(f, c))
            .collect();
        let row = |f: usize, k: usize| &m[(f * six + k) * d..(f * six + k + 1) * d];
        let mut out = vec![0f32; n * d];
        let rows = frame_rows(n);
        out.par_chunks_mut(rows * d.max(1))
            .enumerate()
            .for_each(|(c, dst)| {
                // A refreshed token's estimate, summed here.
                let mut est = vec![0f32; if joined.is_some() { d } else { 0 }];
                for (j, o) in dst.chunks_mut(d).enumerate() {
                    let r = c * rows + j;
                    let f = frame[r];
                    let xr = match joined {
                        Some(l) if r >= nx => {
                            let e = &y[(r - nx) * yw..(r - nx + 1) * yw];
                            est.copy_from_slice(&e[..d]);
                            if l > 0 {
                                for (a, &b) in est.iter_mut().zip(&e[l * d..(l + 1) * d]) {
                                    *a += b;
                                }
                            }
                            &est[..]
                        }
                        _ => &x[r * d..(r + 1) * d],
                    };
                    match self.kind {
                        FrameKind::NormModulate {
                            shift, scale, eps, ..
                        } => {
                            let (mean, inv) = mean_inv_std(xr, eps);
                            for (((o, &v), &sc), &sh) in
                                o.iter_mut().zip(xr).zip(row(f, scale)).zip(row(f, shift))
                            {
                                *o = (v - mean) * inv * (1.0 + sc) + sh;
                            }
                        }
                        FrameKind::GatedAdd { gate } => {
                            let yr = &y[r * d..(r + 1) * d];
                            for (((o, &a), &b), &g) in
                                o.iter_mut().zip(xr).zip(yr).zip(row(f, gate))
                            {
                                *o = a + b * g;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }
}

impl candle_core::CustomOp2 for FrameOp {
    fn name(&self) -> &'static str {
        "motioncache-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let m = contiguous_f32(s2, l2)?;
        self.run(x, None, m, l1.shape(), l2.shape())
    }
}

impl CustomOp3 for FrameOp {
    fn name(&self) -> &'static str {
        match self.kind {
            FrameKind::GatedAdd { .. } => "motioncache-gated-add",
            FrameKind::NormModulate { .. } => "motioncache-norm-modulate-joined",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let y = contiguous_f32(s2, l2)?;
        let m = contiguous_f32(s3, l3)?;
        self.run(x, Some((y, l2.shape())), m, l1.shape(), l3.shape())
    }
}

/// Root-mean-square norm of every row of `x` (`[.., dim]`) times `w` (`[dim]`), as
/// `candle_nn::ops::rms_norm`, whose CPU code sums each row in one scalar chain. CPU, f32
/// only (see [`f32_kernels`]).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let op = RowNorm { eps, silu: false };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// `silu(rms_norm(x, w))` in one pass over each row (the VAE's `norm` then `silu`), with
/// a vectorised `exp` where candle's `silu` calls the scalar one per element. CPU, f32
/// only.
pub(crate) fn rms_norm_silu(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let op = RowNorm { eps, silu: true };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// Layer norm of every row of `x` (`[.., dim]`) with weight `w` and bias `b` (`[dim]`), as
/// `candle_nn::ops::layer_norm`, in two passes over each row (mean, then variance). CPU,
/// f32 only.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let op = RowNorm { eps, silu: false };
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)
}

/// [`rms_norm`], or with a bias [`layer_norm`].
struct RowNorm {
    eps: f32,
    /// Whether each normalised row goes through SiLU (`x * sigmoid(x)`).
    silu: bool,
}

impl RowNorm {
    fn run(
        &self,
        x: &[f32],
        shape: &Shape,
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = shape.dims().last().copied().unwrap_or(0);
        if d == 0 || w.len() != d || b.is_some_and(|b| b.len() != d) {
            candle_core::bail!(
                "row norm of {:?} with a weight of {} and a bias of {:?}",
                shape.dims(),
                w.len(),
                b.map(<[f32]>::len)
            );
        }
        let n = x.len() / d;
        let mut out = vec![0f32; x.len()];
        let rows = frame_rows(n);
        let eps = self.eps;
        let simd = Simd::detect();
        out.par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d))
            .for_each(|(dst, src)| {
                for (o, xr) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    match b {
                        Some(b) => {
                            let (mean, inv) = mean_inv_std(xr, eps);
                            for (((o, &v), &w), &b) in o.iter_mut().zip(xr).zip(w).zip(b) {
                                *o = (v - mean) * inv * w + b;
                            }
                        }
                        None => {
                            let inv = inv_rms(xr, eps);
                            for ((o, &v), &w) in o.iter_mut().zip(xr).zip(w) {
                                *o = v * inv * w;
                            }
                        }
                    }
                }
                if self.silu {
                    silu_inplace(simd, dst);
                }
            });
        Ok((CpuStorage::F32(out), shape.clone()))
    }
}

impl candle_core::CustomOp2 for RowNorm {
    fn name(&self) -> &'static str {
        "motioncache-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        self.run(x, l1.shape(), w, None)
    }
}

impl CustomOp3 for RowNorm {
    fn name(&self) -> &'static str {
        "motioncache-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let w = contiguous_f32(s2, l2)?;
        let b = contiguous_f32(s3, l3)?;
        self.run(x, l1.shape(), w, Some(b))
    }
}

/// Whether [`cache_store`] can write tokens of `dtype` into `cache` (CPU, f32, contiguous).
pub(crate) fn cache_store_fits(cache: &Tensor, dtype: DType) -> bool {
    cpu_kernels(cache.device())
        && cache.dtype() == DType::F32
        && dtype == DType::F32
        && cache.is_contiguous()
}

/// Writes tokens' keys or values into a layer's cache in place: row `i` of `x`
/// (`[n, heads * head_dim]`, straight from the projection) goes, head by head, to
/// `cache[0, h, slots[i]]` (`cache` `[1, heads, rows, head_dim]`), rotated by row `i` of
/// `rope` (`[n, head_dim]`: the `head_dim / 2` cosines, then the sines; interleaved pairs
/// as `candle_nn::rotary_emb::rope_i`) when given. One pass instead of the head split,
/// the rotation and a scatter that computes an index per element. Only where
/// [`cache_store_fits`].
pub(crate) fn cache_store(
    cache: &Tensor,
    x: &Tensor,
    slots: &[u32],
    rope: Option<&Tensor>,
) -> candle_core::Result<()> {
    if !cache_store_fits(cache, x.dtype()) || rope.is_some_and(|r| r.dtype() != DType::F32) {
        candle_core::bail!(
            "the one-pass cache store takes contiguous f32 CPU tensors, not {:?} {:?} into {:?} {:?}",
            x.dtype(),
            x.device().location(),
            cache.dtype(),
            cache.device().location()
        );
    }
    let (one, heads, rows, hd) = cache.dims4()?;
    let (n, d) = x.dims2()?;
    if one != 1 || d != heads * hd || slots.len() != n || hd % 2 != 0 {
        candle_core::bail!(
            "storing {:?} at {} slots into a cache of {:?}",
            x.shape(),
            slots.len(),
            cache.shape()
        );
    }
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= rows) {
        candle_core::bail!("cache slot {s} outside the {rows} rows of the cache");
    }
    let op = CacheStore {
        slots: slots.to_vec(),
        heads,
        head_dim: hd,
    };
    let x = x.contiguous()?;
    match rope {
        Some(r) => {
            if r.dims() != [n, hd] {
                candle_core::bail!("rope table {:?} for {n} rows of {hd}", r.shape());
            }
            cache.inplace_op3(&x, &r.contiguous()?, &op)
        }
        None => cache.inplace_op2(&x, &op),
    }
}

struct CacheStore {
    slots: Vec<u32>,
    heads: usize,
    head_dim: usize,
}

impl CacheStore {
    /// Head by head in parallel: each task writes its head's region of the cache alone.
    fn run(&self, cache: &mut [f32], x: &[f32], rope: Option<&[f32]>) {
        let (heads, hd) = (self.heads, self.head_dim);
        let rows = cache.len() / (heads * hd);
        let half = hd / 2;
        let region = (rows * hd).max(1);
        cache
            .par_chunks_mut(region)
            .enumerate()
            .for_each(|(h, head)| {
                for (i, &slot) in self.slots.iter().enumerate() {
                    let at = slot as usize * hd;
                    let dst = &mut head[at..at + hd];
                    let s = &x[(i * heads + h) * hd..(i * heads + h + 1) * hd];
                    match rope {
                        None => dst.copy_from_slice(s),
                        Some(r) => {
                            let (cos, sin) = r[i * hd..(i + 1) * hd].split_at(half);
                            for j in 0..half {
                                let (a, b) = (s[2 * j], s[2 * j + 1]);
                                dst[2 * j] = a * cos[j] - b * sin[j];
                                dst[2 * j + 1] = a * sin[j] + b * cos[j];
                            }
                        }
                    }
                }
            });
    }
}

fn f32_data_mut(s: &mut CpuStorage) -> candle_core::Result<&mut [f32]> {
    match s {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("CPU kernel expects f32 data"),
    }
}

fn cache_slice<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut f32_data_mut(s)?[a..b]),
        None => candle_core::bail!("the key/value cache must be contiguous"),
    }
}

impl candle_core::InplaceOp2 for CacheStore {
    fn name(&self) -> &'static str {
        "motioncache-cache-store"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let x = contiguous_f32(s2, l2)?;
        self.run(cache_slice(s1, l1)?, x, None);
        Ok(())
    }
}

impl candle_core::InplaceOp3 for CacheStore {
    fn name(&self) -> &'static str {
        "motioncache-cache-store-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let x = contiguous_f32(s2, l2)?;
        let r = contiguous_f32(s3, l3)?;
        self.run(cache_slice(s1, l1)?, x, Some(r));
        Ok(())
    }
}

/// The tanh approximation of GELU (diffusers' `GELU(approximate="tanh")`, candle's
/// `gelu`).
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernels(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&CpuGelu);
    }
    x.gelu()
}

struct CpuGelu;

impl candle_core::CustomOp1 for CpuGelu {
    fn name(&self) -> &'static str {
        "motioncache-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = contiguous_f32(s, l)?.to_vec();
        let simd = Simd::detect();
        out.par_chunks_mut(16 * 1024)
            .for_each(|c| gelu_inplace(simd, c));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

#[inline(always)]
fn gelu_slice(x: &mut [f32]) {
    // 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
    for v in x {
        let a = *v;
        let u2 = 2.0 * GELU_K * (a + GELU_C * a * a * a);
        *v = a / (1.0 + exp(-u2));
    }
}

#[inline(always)]
fn silu_slice(x: &mut [f32]) {
    for v in x {
        *v /= 1.0 + exp(-*v);
    }
}

/// The f32 data of a storage.
fn f32_data(s: &CpuStorage) -> candle_core::Result<&[f32]> {
    match s {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("CPU kernel expects f32 data"),
    }
}

/// The f32 data of a contiguous tensor.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&f32_data(s)?[a..b]),
        None => candle_core::bail!("CPU kernel expects contiguous inputs"),
    }
}

/// Which vector instructions the kernels may use (detected at run time).
#[derive(Clone, Copy)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                return Simd::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Plain
    }
}

/// `fn $name(Simd, &mut [f32]) -> $ret`: the hand-written AVX-512 `$avx512` or AVX2 + FMA
/// `$avx2`, or the portable `$body`.
macro_rules! dispatch {
    ($name:ident, $body:ident, $avx512:path, $avx2:path, $ret:ty) => {
        fn $name(simd: Simd, x: &mut [f32]) -> $ret {
            match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: only chosen when the CPU has AVX-512F.
                Simd::Avx512 => unsafe { $avx512(x) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: only chosen when the CPU has AVX2 and FMA.
                Simd::Avx2 => unsafe { $avx2(x) },
                Simd::Plain => $body(x),
            }
        }
    };
}

dispatch!(gelu_inplace, gelu_slice, avx512::gelu, avx2::gelu, ());
dispatch!(silu_inplace, silu_slice, avx512::silu, avx2::silu, ());

const LANES: usize = 16;

/// Replaces every row of the column-major block `s` (`rows x s.len() / rows`, element
/// `(i, j)` at `s[j * rows + i]`, `rows` a multiple of [`LANES`]) by
/// `exp(row - max(row))` and writes the row sums to `sums`: the softmax of attention
/// scores laid out as `gemm` computes them, before the division.
fn softmax_columns(simd: Simd, s: &mut [f32], rows: usize, sums: &mut [f32]) {
    assert!(rows.is_multiple_of(LANES) && s.len().is_multiple_of(rows) && sums.len() == rows);
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only chosen when the CPU has AVX-512F.
        Simd::Avx512 => unsafe { avx512::softmax_columns(s, rows, sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only chosen when the CPU has AVX2 and FMA.
        Simd::Avx2 => unsafe { avx2::softmax_columns(s, rows, sums) },
        Simd::Plain => softmax_strips(s, rows, sums),
    }
}

/// Columns summed apart before their sum joins a row's total: a row of thousands of keys
/// summed one after the other would lose several bits.
const SUM_BLOCK: usize = 64;

/// [`softmax_columns`], portable: a strip of [`LANES`] rows at a time, one pass over its
/// columns for the maxima and one for the exponentials and sums.
#[inline(always)]
fn softmax_strips(s: &mut [f32], rows: usize, sums: &mut [f32]) {
    for (strip, sum) in sums.chunks_exact_mut(LANES).enumerate() {
        let at = strip * LANES;
        let mut m = [f32::NEG_INFINITY; LANES];
        for col in s.chunks_exact(rows) {
            let c: &[f32; LANES] = col[at..at + LANES].try_into().expect("a whole strip");
            for i in 0..LANES {
                m[i] = if c[i] > m[i] { c[i] } else { m[i] };
            }
        }
        let mut acc = [0f32; LANES];
        for cols in s.chunks_mut(rows * SUM_BLOCK) {
            let mut part = [0f32; LANES];
            for col in cols.chunks_exact_mut(rows) {
                let c: &mut [f32; LANES] = (&mut col[at..at + LANES])
                    .try_into()
                    .expect("a whole strip");
                for i in 0..LANES {
                    c[i] = exp(c[i] - m[i]);
                    part[i] += c[i];
                }
            }
            for i in 0..LANES {
                acc[i] += part[i];
            }
        }
        sum.copy_from_slice(&acc);
    }
}

/// ln 2 split in two for an exact reduction `x - n ln 2`, and Cephes' expf polynomial
/// (highest degree first) for `e^r` on the remainder.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` (saturating outside [-87, 88]), Cephes' expf polynomial after reduction by ln 2:
/// relative error about 1e-7, and written so that the compiler vectorises it (no calls,
/// no branches).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by the 1.5 * 2^23 trick (no SSE4.1 `round` needed).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    // `t`'s low mantissa bits hold `n` (|n| <= 127, far inside the 2^22 the trick allows):
    // `2^n` from integer arithmetic on the bits alone, which vectorises, where `n as i32`
    // (saturating, NaN to 0) made the compiler convert one lane at a time.
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let pow2 = f32::from_bits(n_bits.wrapping_add(127) << 23);
    y * pow2
}

/// The AVX2 + FMA versions, written with intrinsics: the portable loops compiled for AVX2
/// keep a multiply and an add where one FMA does (Rust does not contract them), spill the
/// polynomial's constants, and build `2^n` in more steps.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_POLY, GELU_C, GELU_K, LANES, LN2_HI, LN2_LO, SUM_BLOCK};

    /// 8 lanes.
    const W: usize = 8;

    /// [`super::exp`] on 8 lanes: the same reduction and polynomial, `2^n` from the bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        // The bound first: `max`/`min` return their second operand when either is NaN, so
        // a NaN stays NaN (as `f32::clamp` keeps it in the portable `exp`).
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.0),
            _mm256_max_ps(_mm256_set1_ps(-87.0), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        // |n| <= 127 after the clamp: 2^n is the exponent field n + 127.
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(y, pow2)
    }

    /// See `super::softmax_columns`: a strip of 16 rows (two vectors) per pass.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_columns(s: &mut [f32], rows: usize, sums: &mut [f32]) {
        assert!(rows.is_multiple_of(LANES) && s.len().is_multiple_of(rows) && sums.len() == rows);
        let cols = s.len() / rows;
        let p = s.as_mut_ptr();
        for at in (0..rows).step_by(LANES) {
            // SAFETY: `at + 16 <= rows` and `j < cols`, so every vector below lies inside
            // `s` (`cols * rows` floats) and `sums` (`rows` floats).
            unsafe {
                let mut m0 = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut m1 = m0;
                for j in 0..cols {
                    let x = p.add(j * rows + at);
                    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x));
                    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x.add(W)));
                }
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for j0 in (0..cols).step_by(SUM_BLOCK) {
                    let (mut q0, mut q1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for j in j0..(j0 + SUM_BLOCK).min(cols) {
                        let x = p.add(j * rows + at);
                        let e0 = exp(_mm256_sub_ps(_mm256_loadu_ps(x), m0));
                        let e1 = exp(_mm256_sub_ps(_mm256_loadu_ps(x.add(W)), m1));
                        _mm256_storeu_ps(x, e0);
                        _mm256_storeu_ps(x.add(W), e1);
                        q0 = _mm256_add_ps(q0, e0);
                        q1 = _mm256_add_ps(q1, e1);
                    }
                    s0 = _mm256_add_ps(s0, q0);
                    s1 = _mm256_add_ps(s1, q1);
                }
                _mm256_storeu_ps(sums.as_mut_ptr().add(at), s0);
                _mm256_storeu_ps(sums.as_mut_ptr().add(at + W), s1);
            }
        }
    }

    /// See `super::gelu_slice`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(x: &mut [f32]) {
        map(x, super::gelu_slice, |a| {
            let k = _mm256_set1_ps(2.0 * GELU_K);
            let a3 = _mm256_mul_ps(_mm256_mul_ps(a, a), a);
            let u2 = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_set1_ps(GELU_C), a3, a));
            let d = _mm256_add_ps(
                _mm256_set1_ps(1.0),
                exp(_mm256_sub_ps(_mm256_setzero_ps(), u2)),
            );
            _mm256_div_ps(a, d)
        })
    }

    /// See `super::silu_slice`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu(x: &mut [f32]) {
        map(x, super::silu_slice, |a| {
            let d = _mm256_add_ps(
                _mm256_set1_ps(1.0),
                exp(_mm256_sub_ps(_mm256_setzero_ps(), a)),
            );
            _mm256_div_ps(a, d)
        })
    }

    /// Replaces every element of `x` by `f` of it, 8 lanes at a time, and the last
    /// `len % 8` by the portable `tail`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn map(x: &mut [f32], tail: fn(&mut [f32]), f: impl Fn(__m256) -> __m256) {
        let (body, rest) = x.split_at_mut(x.len() / W * W);
        let p = body.as_mut_ptr();
        // SAFETY: `i + 8 <= body.len()` for every vector loaded and stored.
        unsafe {
            for i in (0..body.len()).step_by(W) {
                _mm256_storeu_ps(p.add(i), f(_mm256_loadu_ps(p.add(i))));
            }
        }
        tail(rest);
    }
}

/// The AVX-512 versions, written with intrinsics: the compiler keeps the portable loops at
/// 8 lanes even where 16 are available, and `vscalefps` makes `2^n` one instruction.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_POLY, GELU_C, GELU_K, LANES, LN2_HI, LN2_LO, SUM_BLOCK};

    /// [`super::exp`] on 16 lanes: the same reduction and polynomial.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        // The bound first: `max`/`min` return their second operand when either is NaN, so
        // a NaN stays NaN (as `f32::clamp` keeps it in the portable `exp`).
        let x = _mm512_min_ps(
            _mm512_set1_ps(88.0),
            _mm512_max_ps(_mm512_set1_ps(-87.0), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(y, n)
    }

    /// Lanes `0..len % 16` of the last, partial vector.
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << (len % LANES)) - 1) as __mmask16
    }

    /// See `super::softmax_columns`: a strip of 16 rows per pass, in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_columns(s: &mut [f32], rows: usize, sums: &mut [f32]) {
        assert!(rows.is_multiple_of(LANES) && s.len().is_multiple_of(rows) && sums.len() == rows);
        let cols = s.len() / rows;
        let p = s.as_mut_ptr();
        for at in (0..rows).step_by(LANES) {
            // SAFETY: `at + 16 <= rows` and `j < cols`, so every vector below lies inside
            // `s` (`cols * rows` floats) and `sums` (`rows` floats).
            unsafe {
                let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
                for j in 0..cols {
                    vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(j * rows + at)));
                }
                let mut sum = _mm512_setzero_ps();
                for j0 in (0..cols).step_by(SUM_BLOCK) {
                    let mut part = _mm512_setzero_ps();
                    for j in j0..(j0 + SUM_BLOCK).min(cols) {
                        let x = p.add(j * rows + at);
                        let e = exp(_mm512_sub_ps(_mm512_loadu_ps(x), vmax));
                        _mm512_storeu_ps(x, e);
                        part = _mm512_add_ps(part, e);
                    }
                    sum = _mm512_add_ps(sum, part);
                }
                _mm512_storeu_ps(sums.as_mut_ptr().add(at), sum);
            }
        }
    }

    /// See `super::gelu_slice`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gelu(x: &mut [f32]) {
        map(x, |a| {
            let k = _mm512_set1_ps(2.0 * GELU_K);
            let a3 = _mm512_mul_ps(_mm512_mul_ps(a, a), a);
            let u2 = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_set1_ps(GELU_C), a3, a));
            let d = _mm512_add_ps(
                _mm512_set1_ps(1.0),
                exp(_mm512_sub_ps(_mm512_setzero_ps(), u2)),
            );
            _mm512_div_ps(a, d)
        })
    }

    /// See `super::silu_slice`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn silu(x: &mut [f32]) {
        map(x, |a| {
            let d = _mm512_add_ps(
                _mm512_set1_ps(1.0),
                exp(_mm512_sub_ps(_mm512_setzero_ps(), a)),
            );
            _mm512_div_ps(a, d)
        })
    }

    /// Replaces every element of `x` by `f` of it, 16 lanes at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn map(x: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let (body, tail) = x.split_at_mut(x.len() / LANES * LANES);
        let m = tail_mask(tail.len());
        let p = body.as_mut_ptr();
        // SAFETY: as in `softmax_row`.
        unsafe {
            for i in (0..body.len()).step_by(LANES) {
                _mm512_storeu_ps(p.add(i), f(_mm512_loadu_ps(p.add(i))));
            }
            let t = tail.as_mut_ptr();
            _mm512_mask_storeu_ps(t, m, f(_mm512_maskz_loadu_ps(m, t)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::transformer::split_heads;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The one-pass cache store writes what head split, `rope_i` and a scatter write, at
    /// arbitrary rows, and leaves the other rows alone; bad slots are refused by name.
    #[test]
    fn cache_store_matches_rope_and_scatter() {
        let dev = Device::Cpu;
        let (heads, hd, rows, n) = (3, 8, 11, 4);
        let x = Tensor::randn(0f32, 1., (n, heads * hd), &dev).unwrap();
        let cos = Tensor::rand(-1f32, 1., (n, hd / 2), &dev).unwrap();
        let sin = Tensor::rand(-1f32, 1., (n, hd / 2), &dev).unwrap();
        let slots = [7u32, 0, 10, 3];
        let base = Tensor::randn(0f32, 1., (1, heads, rows, hd), &dev).unwrap();
        let split = split_heads(&x, heads).unwrap();
        let ix = Tensor::new(&slots, &dev)
            .unwrap()
            .reshape((1, 1, n, 1))
            .unwrap()
            .broadcast_as((1, heads, n, hd))
            .unwrap()
            .contiguous()
            .unwrap();
        for rotate in [false, true] {
            let want = base.copy().unwrap();
            let src = if rotate {
                candle_nn::rotary_emb::rope_i(&split, &cos, &sin).unwrap()
            } else {
                split.clone()
            };
            want.scatter_set(&ix, &src, 2).unwrap();
            let got = base.copy().unwrap();
            let rope = Tensor::cat(&[&cos, &sin], 1).unwrap();
            cache_store(&got, &x, &slots, rotate.then_some(&rope)).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-6, "rotate {rotate}");
        }
        let got = base.copy().unwrap();
        let err = cache_store(&got, &x, &[0, 1, 2, 11], None).unwrap_err();
        assert!(err.to_string().contains("slot 11"), "{err}");
    }

    /// The fused linear gives candle's `Linear` (multiply, then broadcast add) for row
    /// counts below, at and across the band size, with and without a bias, on a
    /// non-contiguous input, with its GELU, RMS norm and residual epilogues, and falls
    /// back to candle for other ranks.
    #[test]
    fn linear_matches_candle() {
        use candle_core::Module;
        let dev = Device::Cpu;
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + seed) * 7919) % 1013) as f32 / 500.0 - 1.0)
                .collect()
        };
        // 72 outputs: bands of columns (the last one partial) for fewer rows than the
        // threads' minimum.
        for (i, o, bias) in [(40, 24, true), (40, 24, false), (40, 72, true)] {
            let w = Tensor::from_vec(fill(o * i, 1), (o, i), &dev).unwrap();
            let bias = bias.then(|| Tensor::from_vec(fill(o, 2), o, &dev).unwrap());
            let l = candle_nn::Linear::new(w.clone(), bias);
            // The weight in candle's layout and transposed in memory (`kernel_layout`).
            let lt = kernel_layout(l.clone()).unwrap();
            assert!(!lt.weight().is_contiguous());
            for n in [1usize, 5, 31, 32, 33, 70, 257] {
                let x = Tensor::from_vec(fill(n * i, n), (n, i), &dev).unwrap();
                let want = l.forward(&x).unwrap();
                for l in [&l, &lt] {
                    let got = linear(l, &x).unwrap();
                    assert_eq!(got.dims(), [n, o]);
                    let d = max_abs_diff(&got, &want);
                    assert!(d < 1e-5, "{o} outputs, n {n}: {d}");
                    let d = max_abs_diff(&linear_gelu(l, &x).unwrap(), &want.gelu().unwrap());
                    assert!(d < 1e-5, "{o} outputs, n {n}, with the GELU: {d}");
                    // The RMS norm epilogue, in row bands and after column bands.
                    let nw = Tensor::from_vec(fill(o, 5), o, &dev).unwrap();
                    let want_rms = candle_nn::ops::rms_norm(&want, &nw, 1e-6).unwrap();
                    let d = max_abs_diff(&linear_rms(l, &x, &nw, 1e-6).unwrap(), &want_rms);
                    assert!(d < 1e-4, "{o} outputs, n {n}, with the RMS norm: {d}");
                    // The residual, written with the bias: contiguous and a transposed
                    // view (copied first).
                    let r = Tensor::from_vec(fill(n * o, 6), (n, o), &dev).unwrap();
                    let rt = Tensor::from_vec(fill(n * o, 7), (o, n), &dev)
                        .unwrap()
                        .t()
                        .unwrap();
                    for r in [&r, &rt] {
                        let d = max_abs_diff(&linear_add(l, &x, r).unwrap(), &(r + &want).unwrap());
                        assert!(d < 1e-5, "{o} outputs, n {n}, with a residual: {d}");
                    }
                }
            }
            let xt = Tensor::from_vec(fill(i * 9, 3), (i, 9), &dev)
                .unwrap()
                .t()
                .unwrap();
            let d = max_abs_diff(&linear(&l, &xt).unwrap(), &l.forward(&xt).unwrap());
            assert!(d < 1e-5, "transposed input: {d}");
            let x3 = Tensor::from_vec(fill(2 * 3 * i, 4), (2, 3, i), &dev).unwrap();
            let d = max_abs_diff(&linear(&l, &x3).unwrap(), &l.forward(&x3).unwrap());
            assert_eq!(d, 0.0, "rank 3 runs candle's Linear");
        }
        let l = candle_nn::Linear::new(Tensor::ones((8, 4), DType::F32, &dev).unwrap(), None);
        let x = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let bad = Tensor::ones(7, DType::F32, &dev).unwrap();
        assert!(linear_rms(&l, &x, &bad, 1e-6).is_err());
        // A residual of another shape is candle's broadcast error, not a wrong read.
        let bad = Tensor::ones((3, 7), DType::F32, &dev).unwrap();
        assert!(linear_add(&l, &x, &bad).is_err());
    }

    /// The fused norm-modulate and gated add give the same values as candle's layer norm
    /// and per-frame broadcasts, for frames of unequal token counts (a partial pass).
    #[test]
    fn per_frame_kernels_match_candle_ops() {
        use candle_core::IndexOp;
        let dev = Device::Cpu;
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + seed) * 7919) % 1013) as f32 / 300.0 - 1.5)
                .collect()
        };
        let (d, counts) = (24usize, [3usize, 0, 140, 7]);
        let n: usize = counts.iter().sum();
        let f = counts.len();
        let x = Tensor::from_vec(fill(n * d, 1), (n, d), &dev).unwrap();
        let y = Tensor::from_vec(fill(n * d, 2), (n, d), &dev).unwrap();
        let m = Tensor::from_vec(fill(f * 6 * d, 3), (f, 6, d), &dev).unwrap();
        // The table's row `k` per token.
        let idx: Vec<u32> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n(i as u32, c))
            .collect();
        let idx = Tensor::new(idx.as_slice(), &dev).unwrap();
        let per_token = |k: usize| {
            m.i((.., k))
                .unwrap()
                .contiguous()
                .unwrap()
                .index_select(&idx, 0)
                .unwrap()
        };
        let ones = Tensor::ones(d, DType::F32, &dev).unwrap();
        let zeros = Tensor::zeros(d, DType::F32, &dev).unwrap();
        let ln = candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6).unwrap();
        let want = ((ln * (per_token(4) + 1.0).unwrap()).unwrap() + per_token(3)).unwrap();
        let got = norm_modulate(&x, &m, &counts, 3, 4, 1e-6).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let want = (&x + (&y * per_token(5)).unwrap()).unwrap();
        let got = gated_add(&x, &y, &m, &counts, 5).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        assert!(norm_modulate(&x, &m, &[n - 1], 3, 4, 1e-6).is_err());

        // Joined: the first 100 rows from x, the other 50 from estimates of 3 column
        // blocks (the first plus the layer's).
        let (nx, k) = (100usize, 50usize);
        let est = Tensor::from_vec(fill(k * 3 * d, 4), (k, 3 * d), &dev).unwrap();
        for layer in [0usize, 2] {
            let mut e = est.narrow(1, 0, d).unwrap();
            if layer > 0 {
                e = (e + est.narrow(1, layer * d, d).unwrap()).unwrap();
            }
            let joined = Tensor::cat(&[&x.narrow(0, 0, nx).unwrap(), &e], 0).unwrap();
            let want = norm_modulate(&joined, &m, &counts, 3, 4, 1e-6).unwrap();
            let xs = x.narrow(0, 0, nx).unwrap();
            let got = norm_modulate_joined(&xs, &est, layer, &m, &counts, 3, 4, 1e-6).unwrap();
            assert_eq!(got.dims(), [nx + k, d]);
            assert!(max_abs_diff(&got, &want) < 1e-6, "layer {layer}");
        }
        // A layer past the estimates' columns, or rows that do not add up, are errors.
        let xs = x.narrow(0, 0, nx).unwrap();
        assert!(norm_modulate_joined(&xs, &est, 3, &m, &counts, 3, 4, 1e-6).is_err());
        let short = est.narrow(0, 0, k - 1).unwrap();
        assert!(norm_modulate_joined(&xs, &short, 1, &m, &counts, 3, 4, 1e-6).is_err());
        assert!(gated_add(&x, &xs, &m, &counts, 5).is_err());
    }

    #[test]
    fn on_pool_runs_the_job_once_and_releases_the_pool() {
        let dev = Device::Cpu;
        let sum = |n: usize| (0..n).into_par_iter().sum::<usize>();
        assert_eq!(on_pool(&dev, || sum(1000)), 499_500);
        // A panic in the job reaches the caller; the waiting threads are released.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            on_pool(&dev, || -> usize { panic!("job") })
        }));
        assert!(r.is_err());
        assert_eq!(on_pool(&dev, || sum(100)), 4950);
        // Nested calls run in place.
        assert_eq!(on_pool(&dev, || on_pool(&dev, || sum(10))), 45);
        // Several callers at once, each with nested parallel loops between serial
        // stretches: a waiting thread can pick up another call's wait inside a task of a
        // job, which must not leave that job waiting for ever.
        let (tx, rx) = std::sync::mpsc::channel();
        let callers = 4usize;
        for t in 0..callers {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let dev = Device::Cpu;
                let work = |i: usize| {
                    (0..64usize)
                        .into_par_iter()
                        .map(|a| {
                            (0..256usize)
                                .into_par_iter()
                                .map(|v| (v * a + i + t) % 7)
                                .sum::<usize>()
                        })
                        .sum::<usize>()
                };
                let mut total = 0;
                for i in 0..60 {
                    // Odd callers also use the pool outside `on_pool`, as a decoder would.
                    if t % 2 == 1 {
                        total += work(i);
                    }
                    total += on_pool(&dev, || {
                        (0..3)
                            .map(|_| {
                                std::thread::sleep(std::time::Duration::from_micros(30));
                                work(i)
                            })
                            .sum::<usize>()
                    });
                }
                let _ = tx.send(total);
            });
        }
        drop(tx);
        for _ in 0..callers {
            let got = rx.recv_timeout(std::time::Duration::from_secs(120));
            assert!(got.is_ok(), "concurrent on_pool calls did not finish");
        }
        // Forced device paths stay on the calling thread, whose flag forces them.
        force_device_paths(Some(64));
        let here = std::thread::current().id();
        let there = on_pool(&dev, || std::thread::current().id());
        force_device_paths(None);
        assert_eq!(there, here);
    }

    #[test]
    fn row_norms_match_candle() {
        let dev = Device::Cpu;
        // 70 rows of 40 (a tail after two 16-lane chunks), several tasks.
        let x = (Tensor::randn(0f32, 1., (2, 35, 40), &dev).unwrap() * 3.0).unwrap();
        let w = Tensor::randn(0f32, 1., 40, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 40, &dev).unwrap();
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        let got = rms_norm(&x, &w, 1e-6).unwrap();
        assert_eq!(got.dims(), [2, 35, 40]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let want_silu = want.silu().unwrap();
        let got = rms_norm_silu(&x, &w, 1e-6).unwrap();
        assert!(max_abs_diff(&got, &want_silu) < 1e-5);
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
        let got = layer_norm(&x, &w, &b, 1e-6).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let short = w.narrow(0, 0, 39).unwrap();
        assert!(rms_norm(&x, &short, 1e-6).is_err());
        assert!(layer_norm(&x, &w, &short, 1e-6).is_err());
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Every instruction set the machine has gives the portable results, for lengths with
    /// and without a partial last vector.
    #[test]
    fn simd_variants_agree() {
        let mut simds = vec![Simd::Plain];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                simds.push(Simd::Avx2);
            }
            if has!("avx512f") {
                simds.push(Simd::Avx512);
            }
        }
        for len in [1usize, 7, 15, 16, 17, 33, 100, 1600] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 / 60.0 - 8.0)
                .collect();
            type Portable = fn(&mut [f32]);
            type Kernel = fn(Simd, &mut [f32]);
            let kernels: [(&str, Portable, Kernel); 2] = [
                ("gelu", gelu_slice, gelu_inplace),
                ("silu", silu_slice, silu_inplace),
            ];
            for (name, portable, kernel) in kernels {
                let mut want = x.clone();
                portable(&mut want);
                for &simd in &simds {
                    let mut g = x.clone();
                    kernel(simd, &mut g);
                    for (a, b) in g.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-6 * b.abs() + 1e-9,
                            "len {len}: {name} {a} vs {b}"
                        );
                    }
                }
            }
        }
        // The column softmax against f64 arithmetic, row by row.
        for (rows, cols) in [(16usize, 1usize), (16, 7), (48, 33), (64, 1600)] {
            let s: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 60.0 - 8.0)
                .collect();
            for &simd in &simds {
                let mut got = s.clone();
                let mut sums = vec![0f32; rows];
                softmax_columns(simd, &mut got, rows, &mut sums);
                for i in 0..rows {
                    let row: Vec<f64> = (0..cols).map(|j| s[j * rows + i] as f64).collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
                    let want_sum: f64 = want.iter().sum();
                    assert!(
                        (sums[i] as f64 - want_sum).abs() <= 1e-5 * want_sum,
                        "{rows}x{cols} row {i}: sum {} vs {want_sum}",
                        sums[i]
                    );
                    // f32 `x - max` rounds by up to 1e-6 for scores of this range.
                    for (j, w) in want.iter().enumerate() {
                        let a = got[j * rows + i] as f64;
                        assert!(
                            (a - w).abs() <= 2e-6 * w.max(1e-30),
                            "{rows}x{cols} ({i}, {j}): {a} vs {w}"
                        );
                    }
                }
            }
        }
        // A NaN stays NaN in every variant (a vector lane and the scalar tail), as in the
        // portable code, instead of being clamped to a finite value.
        for &simd in &simds {
            let mut x = vec![0.5f32; 19];
            x[3] = f32::NAN;
            x[18] = f32::NAN;
            for kernel in [gelu_inplace as fn(Simd, &mut [f32]), silu_inplace] {
                let mut g = x.clone();
                kernel(simd, &mut g);
                assert!(g[3].is_nan() && g[18].is_nan() && g[0].is_finite());
            }
            let (rows, cols) = (32usize, 5usize);
            let mut sc = vec![0.25f32; rows * cols];
            sc[2 * rows + 17] = f32::NAN;
            let mut sums = vec![0f32; rows];
            softmax_columns(simd, &mut sc, rows, &mut sums);
            assert!(sums[17].is_nan() && sc[2 * rows + 17].is_nan());
            assert!(sums[16].is_finite() && sums[18].is_finite());
        }
    }

    #[test]
    fn gelu_matches_candle() {
        let x = (Tensor::randn(0f32, 4.0, (3, 50_000), &Device::Cpu).unwrap() * 1.0).unwrap();
        let x = Tensor::cat(
            &[
                &x,
                &Tensor::new(&[[-200f32; 50_000]], &Device::Cpu).unwrap(),
            ],
            0,
        )
        .unwrap();
        let want = x.gelu().unwrap();
        let got = gelu(&x).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 2e-6, "max error {err}");
    }

    #[test]
    fn kernel_matches_candle_ops() {
        let dev = Device::Cpu;
        for (heads, n, l, hd) in [
            (2, 5, 7, 4),
            (3, 70, 1200, 32),
            (1, 1, 1, 8),
            (4, 300, 64, 12),
            // Several tasks per head, the last one partial.
            (2, 70, 3000, 32),
        ] {
            let q = Tensor::randn(0f32, 2.0, (1, heads, n, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (1, heads, l, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, heads, l, hd), &dev).unwrap();
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let exact = generic(&f64s(&q), &f64s(&k), &f64s(&v)).unwrap();
            let exact = exact.to_dtype(DType::F32).unwrap();
            let candle = max_abs_diff(&generic(&q, &k, &v).unwrap(), &exact);
            let err = max_abs_diff(&sdpa(&q, &k, &v).unwrap(), &exact);
            // Against f64 arithmetic, as close as candle's f32 ops (outputs of order 1).
            assert!(
                err < 1e-5_f32.max(1.5 * candle),
                "{heads}x{n}x{l}x{hd}: max error {err} (candle's f32 ops: {candle})"
            );
        }
    }

    #[test]
    fn grouped_is_block_causal() {
        let dev = Device::Cpu;
        let (heads, hd) = (3, 16);
        // A prefix of 40 keys, then three blocks of 50 queries (the last one chunked), then
        // a second branch's cache (keys from 190 on) with a block of 20 queries.
        let q = Tensor::randn(0f32, 1.0, (1, heads, 170, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, heads, 260, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, heads, 260, hd), &dev).unwrap();
        let mut groups: Vec<Group> = (0..3)
            .map(|b| Group {
                q_start: 50 * b,
                q_len: 50,
                k_start: 0,
                keys: 40 + 50 * (b + 1),
            })
            .collect();
        groups.push(Group {
            q_start: 150,
            q_len: 20,
            k_start: 190,
            keys: 70,
        });
        let got = sdpa_grouped(&q, &k, &v, &groups).unwrap();
        for g in &groups {
            let want = generic(
                &q.narrow(2, g.q_start, g.q_len).unwrap(),
                &k.narrow(2, g.k_start, g.keys).unwrap(),
                &v.narrow(2, g.k_start, g.keys).unwrap(),
            )
            .unwrap();
            let err = max_abs_diff(&got.narrow(2, g.q_start, g.q_len).unwrap(), &want);
            assert!(err < 1e-5, "{g:?}: {err}");
        }
        let bad = [Group {
            q_start: 0,
            q_len: 170,
            k_start: 200,
            keys: 61,
        }];
        assert!(sdpa_grouped(&q, &k, &v, &bad).is_err());
        let gap = [Group {
            q_start: 0,
            q_len: 100,
            k_start: 0,
            keys: 10,
        }];
        assert!(sdpa_grouped(&q, &k, &v, &gap).is_err());
    }

    /// Token-major queries and output with the rotation applied on the way in: what the
    /// head split, `rope_i`, the head-major kernel and the head merge give, over
    /// block-causal groups with a chunked block and a second branch's cache; bad shapes
    /// are refused.
    #[test]
    fn token_major_attention_matches_split_rope_merge() {
        let dev = Device::Cpu;
        let (heads, hd, n) = (3, 16, 170);
        let q = Tensor::randn(0f32, 1.0, (n, heads * hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, heads, 260, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, heads, 260, hd), &dev).unwrap();
        let cos = Tensor::rand(-1f32, 1., (n, hd / 2), &dev).unwrap();
        let sin = Tensor::rand(-1f32, 1., (n, hd / 2), &dev).unwrap();
        let rope = Tensor::cat(&[&cos, &sin], 1).unwrap();
        let groups = [
            Group {
                q_start: 0,
                q_len: 100,
                k_start: 0,
                keys: 140,
            },
            Group {
                q_start: 100,
                q_len: 50,
                k_start: 0,
                keys: 190,
            },
            Group {
                q_start: 150,
                q_len: 20,
                k_start: 190,
                keys: 70,
            },
        ];
        let split = split_heads(&q, heads).unwrap();
        for rotate in [false, true] {
            let qh = if rotate {
                candle_nn::rotary_emb::rope_i(&split, &cos, &sin).unwrap()
            } else {
                split.clone()
            };
            let want = sdpa_grouped(&qh, &k, &v, &groups)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((n, heads * hd))
                .unwrap();
            let got = sdpa_tokens(&q, rotate.then_some(&rope), &k, &v, &groups).unwrap();
            assert_eq!(got.dims(), [n, heads * hd]);
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-5, "rotate {rotate}: {err}");
            // The other devices' path (candle ops around the head-major attention).
            force_device_paths(Some(1 << 20));
            let other = sdpa_tokens(&q, rotate.then_some(&rope), &k, &v, &groups);
            force_device_paths(None);
            let err = max_abs_diff(&other.unwrap(), &want);
            assert!(err < 1e-5, "device path, rotate {rotate}: {err}");
        }
        let short = rope.narrow(0, 0, n - 1).unwrap();
        assert!(sdpa_tokens(&q, Some(&short), &k, &v, &groups).is_err());
        let wide = Tensor::zeros((n, heads * hd + 1), DType::F32, &dev).unwrap();
        assert!(sdpa_tokens(&wide, None, &k, &v, &groups).is_err());
    }

    /// The CUDA kernel's own source, run on the CPU (emulate.h), against the CPU kernel on
    /// the same rounded inputs: block-causal groups over a prefix and a second branch's
    /// cache, partial query and key tiles, an empty group, every head dimension it serves.
    #[test]
    fn fused_cuda_kernel_matches_on_the_cpu() {
        let dev = Device::Cpu;
        let groups = [
            Group {
                q_start: 0,
                q_len: 45,
                k_start: 0,
                keys: 30 + 45,
            },
            Group {
                q_start: 45,
                q_len: 0,
                k_start: 0,
                keys: 1,
            },
            Group {
                q_start: 45,
                q_len: 40,
                k_start: 0,
                keys: 30 + 85,
            },
            Group {
                q_start: 85,
                q_len: 17,
                k_start: 120,
                keys: 33,
            },
        ];
        for (dt, tol) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            for hd in [32, 64, 128] {
                // Queries scaled so that the softmax is peaked and the running maximum moves
                // between key tiles (the rescaling path).
                let r = |n: usize, s: f64| {
                    (Tensor::randn(0f32, 1.0, (1, 2, n, hd), &dev).unwrap() * s)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap()
                };
                let (q, k, v) = (r(102, 3.0), r(153, 1.0), r(153, 1.0));
                let got = emulated_cuda_attention(&q, &k, &v, &groups).unwrap();
                assert_eq!(got.dtype(), dt);
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = sdpa_grouped(&f(&q), &f(&k), &f(&v), &groups).unwrap();
                let err = max_abs_diff(&f(&got), &want);
                assert!(err < tol, "{dt:?} head dim {hd}: max abs diff {err}");
            }
        }
        let q = Tensor::zeros((1, 2, 8, 48), DType::BF16, &dev).unwrap();
        let one = [Group {
            q_start: 0,
            q_len: 8,
            k_start: 0,
            keys: 8,
        }];
        let err = emulated_cuda_attention(&q, &q, &q, &one).unwrap_err();
        assert!(err.to_string().contains("head dimension 48"), "{err}");
        assert!(!fused_kernel(DType::F32, 128) && fused_kernel(DType::BF16, 128));
    }

    #[test]
    fn non_contiguous_and_half_inputs() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 5, 3, 8), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 3, 9, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 3, 9, 8), &dev).unwrap();
        let want = generic(&q, &k, &v).unwrap();
        let got = sdpa(&q, &k, &v).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-5, "{err}");
        let h = sdpa(
            &q.to_dtype(DType::BF16).unwrap(),
            &k.to_dtype(DType::BF16).unwrap(),
            &v.to_dtype(DType::BF16).unwrap(),
        )
        .unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        assert!(sdpa(&q, &k.narrow(2, 0, 4).unwrap(), &v).is_err());
    }
}
