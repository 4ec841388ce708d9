// Shared pieces of the flash-style attention kernels: launch parameters, tile geometry and the tile loader.
//
// Tensor layout and parameters: see attention_params.h.
//
// Work split (all kernels, 128 threads): a block owns kRows rows (queries, or keys in the dK/dV kernel) and
// each row is handled by kTpr = 4 adjacent lanes. For a tile of "column" rows (keys, or queries in the dK/dV
// kernel) lane `sub` computes the dot products of columns sub, sub + 4, sub + 8, ... and owns the output
// feature pairs (2 * (sub + 4 * i), +1). Values a lane needs from its 3 partners are exchanged with
// __shfl_sync, so the [rows x columns] score tile lives only in registers, never in global memory.
#pragma once

#include "../common/dsi_types.cuh"
#include "attention_params.h"

namespace dsi_attn {

constexpr int kThreads = 128;
constexpr int kTpr = 4;                          // lanes per owned row
constexpr int kRows = kThreads / kTpr;           // 32 owned rows per block
constexpr int kFwdCols = 64;                     // keys per tile in the forward kernel
constexpr int kBwdCols = 32;                     // column rows per tile in the backward kernels

// Shared-memory row pitch: +2 elements keeps rows 4-byte aligned for the paired loads and makes the pitch an
// odd number of 32-bit words (DPAD is a multiple of 4), so lanes reading the same feature of different rows hit
// different banks.
template <int DPAD> struct Pitch { static constexpr int value = DPAD + 2; };

__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ const char* at_bh(const void* base, const Strides3& s, int b, int h, int elem) {
    return static_cast<const char*>(base) + ((int64_t)b * s.b + (int64_t)h * s.h) * elem;
}

__device__ __forceinline__ char* at_bh(void* base, const Strides3& s, int b, int h, int elem) {
    return static_cast<char*>(base) + ((int64_t)b * s.b + (int64_t)h * s.h) * elem;
}

// Copies rows [row0, row0 + NROWS) x features [0, DPAD) of one (batch, head) into shared memory; rows >= N and
// features >= D become zero so every later read of the tile is defined.
template <typename T, int NROWS, int DPAD>
__device__ __forceinline__ void load_tile(T* sm, const T* g, int64_t row_stride, int row0, int N, int D) {
    constexpr int P = Pitch<DPAD>::value;
    const T zero = dsi_from_float<T>(0.f);
    for (int idx = threadIdx.x; idx < NROWS * DPAD; idx += kThreads) {
        const int r = idx / DPAD;
        const int c = idx % DPAD;
        const int gr = row0 + r;
        sm[r * P + c] = (gr < N && c < D) ? g[(int64_t)gr * row_stride + c] : zero;
    }
}

// Writes the owned output pairs of one row: out[d] = scale * acc[d] for d < D.
template <typename T, int NP>
__device__ __forceinline__ void store_row(T* g, const float (&acc)[2 * NP], float scale, int sub, int D) {
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int d = 2 * (sub + kTpr * i);
        if (d < D) g[d] = dsi_from_float<T>(acc[2 * i] * scale);
        if (d + 1 < D) g[d + 1] = dsi_from_float<T>(acc[2 * i + 1] * scale);
    }
}

}  // namespace dsi_attn
