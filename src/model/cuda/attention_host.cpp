// The CPU build of attention.cu (see emulate.h): one entry point that runs one launch of
// the kernel as the CUDA path does, for the tests.
#include "emulate.h"

#include "attention.cu"

// dtype: 0 bf16, 1 f16. Returns 0, or -1 for a head dimension or dtype without a kernel.
extern "C" int motioncache_attention_emulated(int dtype, int head_dim, const void *q,
                                              const void *k, const void *v, void *out, int heads,
                                              int n, int l, int q_start, int q_len, int k_start,
                                              int keys, float scale) {
    const unsigned grid_x = unsigned((q_len + mc_attention::BR - 1) / mc_attention::BR);
#define MC_RUN(KERNEL, T)                                                                      \
    mc_emu::launch(grid_x, unsigned(heads), mc_attention::THREADS, [&] {                       \
        KERNEL(static_cast<const T *>(q), static_cast<const T *>(k), static_cast<const T *>(v), \
               static_cast<T *>(out), n, l, q_start, q_len, k_start, keys, scale);             \
    });                                                                                        \
    return 0
    switch (dtype * 1000 + head_dim) {
    case 32: MC_RUN(mc_attention_bf16_d32, mc_bf16);
    case 64: MC_RUN(mc_attention_bf16_d64, mc_bf16);
    case 128: MC_RUN(mc_attention_bf16_d128, mc_bf16);
    case 1032: MC_RUN(mc_attention_f16_d32, mc_f16);
    case 1064: MC_RUN(mc_attention_f16_d64, mc_f16);
    case 1128: MC_RUN(mc_attention_f16_d128, mc_f16);
    default: return -1;
    }
#undef MC_RUN
}
