// The CUDA built-ins that attention.cu uses, for the CPU: each GPU thread of a block is a
// host thread, `__syncthreads` / `__syncwarp` are barriers, shuffles and votes go through
// per-block scratch memory, `__shared__` variables are statics (blocks run one after
// another), and WMMA fragments hold their whole 16 x 16 tile in every lane (loads convert
// to f32 exactly, `mma_sync` sums in f32, only lane 0 stores). This runs the kernel's own
// indexing, tiling, masking and online softmax on the CPU, so tests can check it against
// the CPU attention without a GPU; it is not meant to be fast.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define MC_HOST_EMULATION 1

struct mc_dim3 {
    unsigned x = 0, y = 0, z = 0;
};

namespace mc_emu {

class Barrier {
  public:
    explicit Barrier(unsigned parties) : parties_(parties) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned generation = generation_;
        if (++arrived_ == parties_) {
            arrived_ = 0;
            generation_++;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return generation_ != generation; });
        }
    }

  private:
    std::mutex mutex_;
    std::condition_variable cv_;
    unsigned parties_;
    unsigned arrived_ = 0;
    unsigned generation_ = 0;
};

struct Block {
    explicit Block(unsigned threads) : all(threads), scratch(threads) {
        for (unsigned w = 0; w < threads / 32; w++) {
            warps.push_back(std::make_unique<Barrier>(32));
        }
    }
    Barrier all;
    std::vector<std::unique_ptr<Barrier>> warps;
    std::vector<float> scratch;
};

inline thread_local mc_dim3 thread_idx;
inline thread_local mc_dim3 block_idx;
inline thread_local Block *block;

// Runs `kernel` over a grid of (grid_x, grid_y) blocks of `threads` threads (a multiple of
// 32), one block after another.
template <typename F> void launch(unsigned grid_x, unsigned grid_y, unsigned threads, F kernel) {
    for (unsigned by = 0; by < grid_y; by++) {
        for (unsigned bx = 0; bx < grid_x; bx++) {
            Block shared_state(threads);
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; t++) {
                pool.emplace_back([&, t] {
                    thread_idx = {t, 0, 0};
                    block_idx = {bx, by, 0};
                    block = &shared_state;
                    kernel();
                });
            }
            for (auto &th : pool) {
                th.join();
            }
        }
    }
}

inline unsigned lane() { return thread_idx.x % 32; }

} // namespace mc_emu

#define threadIdx (mc_emu::thread_idx)
#define blockIdx (mc_emu::block_idx)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define MC_NEG_INF (-INFINITY)

inline void __syncthreads() { mc_emu::block->all.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    mc_emu::block->warps[mc_emu::thread_idx.x / 32]->wait();
}
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned t = mc_emu::thread_idx.x;
    mc_emu::block->scratch[t] = value;
    __syncwarp();
    const float other = mc_emu::block->scratch[(t & ~31u) | ((t & 31u) ^ unsigned(lane_mask))];
    __syncwarp();
    return other;
}
inline bool __any_sync(unsigned, bool predicate) {
    const unsigned t = mc_emu::thread_idx.x;
    mc_emu::block->scratch[t] = predicate ? 1.0f : 0.0f;
    __syncwarp();
    bool any = false;
    for (unsigned i = t & ~31u; i < (t & ~31u) + 32; i++) {
        any = any || mc_emu::block->scratch[i] != 0.0f;
    }
    __syncwarp();
    return any;
}
inline float __expf(float x) { return std::exp(x); }

// bf16 and f16 as bit patterns, converted with round-to-nearest-even (as __float2bfloat16
// and __float2half do).
struct mc_bf16 {
    uint16_t bits;
};
struct mc_f16 {
    _Float16 value;
};
inline float mc_to_float(mc_bf16 x) {
    const uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float mc_to_float(mc_f16 x) { return float(x.value); }
inline float mc_to_float(float x) { return x; }
template <typename T> T mc_from_float(float x);
template <> inline mc_bf16 mc_from_float(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (std::isnan(x)) {
        return {uint16_t((u >> 16) | 0x40)};
    }
    u += 0x7fff + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}
template <> inline mc_f16 mc_from_float(float x) { return {_Float16(x)}; }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
    static constexpr int num_elements = 256;
    float x[256];
};

template <typename F> void fill_fragment(F &f, float value) {
    for (float &e : f.x) {
        e = value;
    }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm) {
    constexpr bool row = std::is_same<Layout, row_major>::value;
    for (int r = 0; r < 16; r++) {
        for (int c = 0; c < 16; c++) {
            f.x[r * 16 + c] = mc_to_float(row ? p[r * ldm + c] : p[c * ldm + r]);
        }
    }
    __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p,
                             unsigned ldm, layout_t layout) {
    for (int r = 0; r < 16; r++) {
        for (int c = 0; c < 16; c++) {
            f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
        }
    }
    __syncwarp();
}

template <typename A, typename B>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const A &a, const B &b,
              const fragment<accumulator, 16, 16, 16, float> &c) {
    float result[256];
    for (int r = 0; r < 16; r++) {
        for (int col = 0; col < 16; col++) {
            float acc = c.x[r * 16 + col];
            for (int i = 0; i < 16; i++) {
                acc += a.x[r * 16 + i] * b.x[i * 16 + col];
            }
            result[r * 16 + col] = acc;
        }
    }
    std::memcpy(d.x, result, sizeof result);
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t layout) {
    // Every lane has read what it needed from p before any lane writes it.
    __syncwarp();
    if (mc_emu::lane() == 0) {
        for (int r = 0; r < 16; r++) {
            for (int c = 0; c < 16; c++) {
                (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
            }
        }
    }
}

} // namespace wmma
} // namespace nvcuda
