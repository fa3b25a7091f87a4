// Fused block-causal attention for CUDA (issue 14, item 2): softmax(q k^T * scale) v for
// one group of query rows against one contiguous range of keys, with an online softmax
// (FlashAttention-2's recurrence), so that no more than one 16 x 32 tile of scores per warp
// ever exists. Products run on the tensor cores through WMMA (bf16 / f16 inputs, f32
// accumulation); the softmax and the running output stay in f32.
//
// Layout: q and out are [heads, n, D], k and v [heads, l, D], contiguous. One launch
// serves one group (see `Group` in kernels.rs): query rows q_start .. q_start + q_len of
// every head see keys k_start .. k_start + keys. Grid: (ceil(q_len / 32), heads); block:
// 64 threads (two warps of 16 query rows each).
//
// The same source compiles for the CPU (emulate.h supplies the CUDA built-ins and a
// reference WMMA), so the test suite runs this very kernel without a GPU.

#ifndef MC_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

__device__ __forceinline__ float mc_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float mc_to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T mc_from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 mc_from_float(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half mc_from_float(float x) { return __float2half(x); }
typedef __nv_bfloat16 mc_bf16;
typedef __half mc_f16;
#define MC_NEG_INF (-__int_as_float(0x7f800000))
#endif

namespace mc_attention {

using namespace nvcuda;

constexpr int WARPS = 2;
constexpr int BR = 16 * WARPS; // query rows per block
constexpr int BC = 32;         // keys per tile
constexpr int THREADS = 32 * WARPS;
constexpr unsigned FULL = 0xffffffffu;

template <typename T, int D>
__device__ void attend(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                       T *__restrict__ out, int n, int l, int q_start, int q_len, int k_start,
                       int keys, float scale) {
    static_assert(D % 16 == 0 && D <= 128, "head dimension: a multiple of 16, at most 128");
    __shared__ __align__(32) T qs[BR][D];
    __shared__ __align__(32) T ks[BC][D];
    __shared__ __align__(32) T vs[BC][D];
    __shared__ __align__(32) float ss[WARPS][16][BC];
    __shared__ __align__(32) T ps[WARPS][16][BC];
    __shared__ __align__(32) float os[WARPS][16][D];
    __shared__ float row_max[WARPS][16];
    __shared__ float row_sum[WARPS][16];
    __shared__ float row_scale[WARPS][16];

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const long long head = blockIdx.y;
    const int q0 = blockIdx.x * BR; // first row of this block within the group
    const T *qh = q + (head * n + q_start) * D;
    const T *kh = k + (head * l + k_start) * D;
    const T *vh = v + (head * l + k_start) * D;
    T *oh = out + (head * n + q_start) * D;

    for (int i = tid; i < BR * D; i += THREADS) {
        const int r = i / D, c = i % D;
        qs[r][c] = q0 + r < q_len ? qh[(long long)(q0 + r) * D + c] : mc_from_float<T>(0.0f);
    }
    for (int i = lane; i < 16 * D; i += 32) {
        os[warp][i / D][i % D] = 0.0f;
    }
    if (lane < 16) {
        row_max[warp][lane] = MC_NEG_INF;
        row_sum[warp][lane] = 0.0f;
    }
    __syncthreads();

    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[D / 16];
    for (int d = 0; d < D / 16; d++) {
        wmma::load_matrix_sync(qf[d], &qs[warp * 16][d * 16], D);
    }

    // Two lanes per query row for the softmax: lane / 2 is the row, lane % 2 the half of
    // the tile's columns.
    const int srow = lane / 2;
    const int scol = (lane % 2) * (BC / 2);

    for (int k0 = 0; k0 < keys; k0 += BC) {
        __syncthreads(); // every warp is done with the previous tile
        for (int i = tid; i < BC * D; i += THREADS) {
            const int r = i / D, c = i % D;
            const bool in = k0 + r < keys;
            const long long at = (long long)(k0 + r) * D + c;
            ks[r][c] = in ? kh[at] : mc_from_float<T>(0.0f);
            vs[r][c] = in ? vh[at] : mc_from_float<T>(0.0f);
        }
        __syncthreads();

        // Scores of this warp's 16 rows against the tile's keys.
        for (int j = 0; j < BC / 16; j++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
            wmma::fill_fragment(sf, 0.0f);
            for (int d = 0; d < D / 16; d++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, &ks[j * 16][d * 16], D);
                wmma::mma_sync(sf, qf[d], kf, sf);
            }
            wmma::store_matrix_sync(&ss[warp][0][j * 16], sf, BC, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax: new running maximum, probabilities of this tile, the factor that
        // rescales what was accumulated so far.
        const int valid = keys - k0 < BC ? keys - k0 : BC;
        float m = MC_NEG_INF;
        for (int c = scol; c < scol + BC / 2; c++) {
            if (c < valid) {
                m = fmaxf(m, ss[warp][srow][c] * scale);
            }
        }
        m = fmaxf(m, __shfl_xor_sync(FULL, m, 1));
        const float m_old = row_max[warp][srow];
        const float m_new = fmaxf(m_old, m);
        float sum = 0.0f;
        for (int c = scol; c < scol + BC / 2; c++) {
            const float p = c < valid ? __expf(ss[warp][srow][c] * scale - m_new) : 0.0f;
            ps[warp][srow][c] = mc_from_float<T>(p);
            sum += p;
        }
        sum += __shfl_xor_sync(FULL, sum, 1);
        const float alpha = __expf(m_old - m_new); // 0 on the first tile
        __syncwarp();                               // both lanes of a row have read row_max
        if (lane % 2 == 0) {
            row_max[warp][srow] = m_new;
            row_sum[warp][srow] = row_sum[warp][srow] * alpha + sum;
            row_scale[warp][srow] = alpha;
        }
        const bool rescale = __any_sync(FULL, alpha != 1.0f);
        __syncwarp();
        if (rescale) {
            for (int i = lane; i < 16 * D; i += 32) {
                os[warp][i / D][i % D] *= row_scale[warp][i / D];
            }
            __syncwarp();
        }

        // Accumulate p v into the running output.
        for (int c = 0; c < D / 16; c++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
            wmma::load_matrix_sync(of, &os[warp][0][c * 16], D, wmma::mem_row_major);
            for (int j = 0; j < BC / 16; j++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, &ps[warp][0][j * 16], BC);
                wmma::load_matrix_sync(vf, &vs[j * 16][c * 16], D);
                wmma::mma_sync(of, pf, vf, of);
            }
            wmma::store_matrix_sync(&os[warp][0][c * 16], of, D, wmma::mem_row_major);
        }
        __syncwarp();
    }

    for (int i = lane; i < 16 * D; i += 32) {
        const int r = i / D, c = i % D;
        const int row = q0 + warp * 16 + r;
        if (row < q_len) {
            oh[(long long)row * D + c] = mc_from_float<T>(os[warp][r][c] / row_sum[warp][r]);
        }
    }
}

} // namespace mc_attention

#define MC_ATTENTION_KERNEL(NAME, T, D)                                                       \
    extern "C" __global__ void NAME(const T *q, const T *k, const T *v, T *out, int n, int l, \
                                    int q_start, int q_len, int k_start, int keys,            \
                                    float scale) {                                            \
        mc_attention::attend<T, D>(q, k, v, out, n, l, q_start, q_len, k_start, keys, scale); \
    }

MC_ATTENTION_KERNEL(mc_attention_bf16_d32, mc_bf16, 32)
MC_ATTENTION_KERNEL(mc_attention_bf16_d64, mc_bf16, 64)
MC_ATTENTION_KERNEL(mc_attention_bf16_d128, mc_bf16, 128)
MC_ATTENTION_KERNEL(mc_attention_f16_d32, mc_f16, 32)
MC_ATTENTION_KERNEL(mc_attention_f16_d64, mc_f16, 64)
MC_ATTENTION_KERNEL(mc_attention_f16_d128, mc_f16, 128)
