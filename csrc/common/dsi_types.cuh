// Shared device helpers for the dsincubate CUDA ops: dtype tags, float conversions and warp reductions.
//
// The kernels in csrc/ are plain CUDA (no torch headers) so that nvcc compiles them quickly; the per-op .cpp
// binding files own all tensor checks and pass raw pointers, strides and a DsiDtype tag to the launchers.
//
// Portability layer: the kernel bodies use DSI_LAUNCH / DSI_SHARED_ARRAY / DSI_SHARED_ARRAY2D / DSI_DYNAMIC_SHARED
// instead of `<<<...>>>` and `__shared__` so that the very same source also compiles with the host compiler in
// the CPU execution harness (tests/ops/cpu_harness, built with -DDSI_CPU_HARNESS), which runs every CUDA thread
// as a fiber with real barrier and warp-shuffle semantics under AddressSanitizer. Under nvcc they are plain CUDA.
#pragma once

#if defined(DSI_CPU_HARNESS)
#include "dsi_cpu_cuda.h"  // test-only emulation of the CUDA built-ins; found on the harness's include path
#else
#include <cuda_runtime.h>
// DSI_LAUNCH(grid, block, shmem, stream, kernel<...>)(args...): the kernel comes last so its template
// arguments may contain commas.
#define DSI_LAUNCH(grid, block, shmem, stream, ...) __VA_ARGS__<<<grid, block, shmem, stream>>>
#define DSI_SHARED_ARRAY(T, name, n) __shared__ __align__(16) T name[n]
#define DSI_SHARED_ARRAY2D(T, name, n0, n1) __shared__ __align__(16) T name[n0][n1]
#define DSI_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dsi_dtype.h"

__device__ __forceinline__ float dsi_to_float(float v) { return v; }
__device__ __forceinline__ float dsi_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float dsi_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T dsi_from_float(float v);
template <> __device__ __forceinline__ float dsi_from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half dsi_from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 dsi_from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Two adjacent 16-bit elements as float2 (one 32-bit shared-memory load). The address must be 4-byte aligned.
__device__ __forceinline__ float2 dsi_load2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 dsi_load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

__device__ __forceinline__ float dsi_warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum / max over aligned groups of G lanes (G a power of two <= 32); every lane of the group gets the result.
template <int G> __device__ __forceinline__ float dsi_group_sum(float v) {
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
template <int G> __device__ __forceinline__ float dsi_group_max(float v) {
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
