// CPU emulation of the CUDA built-ins the csrc/ kernels use, so the host compiler can run the unchanged kernel
// bodies (test-only; never part of the package).
//
// Included by csrc/common/dsi_types.cuh when DSI_CPU_HARNESS is defined. Each CUDA thread of a block runs as its
// own fiber (own stack, own registers/locals); blocks run one after another. __syncthreads is a real block
// barrier and __shfl_sync / __shfl_xor_sync a real warp rendezvous over 32-lane warps, so a missing barrier, a
// wrong mask or lane, or a divergent barrier changes results or stops the run with a DSI_HARNESS_ERROR. Shared
// memory is one heap allocation per __shared__ array per block, filled with 0xFF bytes (NaN in fp32/fp16/bf16)
// before every block, so AddressSanitizer sees an out-of-range shared index and a read before the first write
// shows up as NaN. The bf16/fp16 types and conversions are CUDA's own headers (their host code paths).
//
// Runtime: runtime.cpp (fibers, scheduler, barriers, shuffles, launch checks). Driver: driver.cpp. Built and run
// by tests/ops/cpu_harness/harness.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// host_defines.h (via cuda_fp16.h) already maps __global__/__device__/__host__/__forceinline__/__align__ to
// host meanings. `__shared__` is deliberately left undefined: kernels must use the DSI_SHARED_* macros so the
// harness can give each block its own copy.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// Inline every helper into the kernel body (CUDA's out-of-line host conversions dominated the run time);
// DSI_HARNESS_NO_FLATTEN (quick -O0 builds of the mutated copies in the mutant tests) skips it.
#ifndef DSI_HARNESS_NO_FLATTEN
#undef __global__
#define __global__ __attribute__((flatten))
#endif

namespace dsi_cpu {

struct Fiber;  // one emulated CUDA thread (runtime.cpp)

extern Fiber* g_current;  // the fiber running now
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
const uint3& thread_idx();

enum ShflMode : int { kShflIdx = 0, kShflXor = 1 };

void syncthreads(const char* file, int line);
uint32_t shfl(unsigned mask, uint32_t bits, int arg, int width, ShflMode mode, const char* file, int line);
void* shared_array(const void* site, size_t bytes, const char* name);
void* dynamic_shared();
[[noreturn]] void fatal(const char* fmt, ...);

// One kernel launch: validates the configuration like the CUDA runtime (an invalid one runs nothing and is
// reported by cudaGetLastError), then runs `body` once per thread of every block.
void launch(const char* kernel, const char* param_types, dim3 grid, dim3 block, size_t shmem,
            const std::function<void()>& body);
cudaError_t get_last_error();
// Driver side: the schedule of the following launches ("lowest" | "highest" | "random") and, per kernel
// (stringified template-id | first parameter type), how many launches ran.
void set_schedule(const std::string& name, unsigned seed);
extern std::map<std::string, long> launch_counts;

template <typename... P>
struct Launch {
    const char* name;
    dim3 grid, block;
    size_t shmem;
    void (*kernel)(P...);

    template <typename... A>
    void operator()(A&&... args) const {
        // Arguments are converted to the parameter types once, like the launch's parameter buffer; every thread
        // gets its own by-value copy when the body calls the kernel.
        const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
        launch(name, __PRETTY_FUNCTION__, grid, block, shmem, [&]() { std::apply(kernel, params); });
    }
};

template <typename... P>
Launch<P...> make_launch(const char* name, dim3 grid, dim3 block, size_t shmem, cudaStream_t, void (*kernel)(P...)) {
    return Launch<P...>{name, grid, block, shmem, kernel};
}

template <typename T>
uint32_t to_bits(T v) {
    static_assert(sizeof(T) == 4, "the harness shuffles 32-bit values only");
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
}

template <typename T>
T from_bits(uint32_t b) {
    T v;
    memcpy(&v, &b, 4);
    return v;
}

}  // namespace dsi_cpu

#define threadIdx (::dsi_cpu::thread_idx())
#define blockIdx (static_cast<const uint3&>(::dsi_cpu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::dsi_cpu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::dsi_cpu::g_grid_dim))
static constexpr int warpSize = 32;

#define __syncthreads() ::dsi_cpu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) ::dsi_cpu::shfl_t(mask, v, lane, ::dsi_cpu::kShflIdx, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lm, ...) ::dsi_cpu::shfl_t(mask, v, lm, ::dsi_cpu::kShflXor, __FILE__, __LINE__, ##__VA_ARGS__)

namespace dsi_cpu {
template <typename T>
T shfl_t(unsigned mask, T v, int arg, ShflMode mode, const char* file, int line, int width = 32) {
    return from_bits<T>(shfl(mask, to_bits(v), arg, width, mode, file, line));
}
}  // namespace dsi_cpu

// The portability macros of csrc/common/dsi_types.cuh, harness side. A __shared__ array is keyed by its
// declaration site (a function-local static), like the one per-block allocation the GPU makes for it.
#define DSI_LAUNCH(grid, block, shmem, stream, ...) ::dsi_cpu::make_launch(#__VA_ARGS__, grid, block, shmem, stream, __VA_ARGS__)
#define DSI_SHARED_ARRAY(T, name, n)                                                                               \
    static const char dsi_site_##name = 0;                                                                         \
    T* const name = static_cast<T*>(::dsi_cpu::shared_array(&dsi_site_##name, sizeof(T) * (size_t)(n), #name))
#define DSI_SHARED_ARRAY2D(T, name, n0, n1)                                                                        \
    static const char dsi_site_##name = 0;                                                                         \
    T(*const name)[n1] =                                                                                           \
        static_cast<T(*)[n1]>(::dsi_cpu::shared_array(&dsi_site_##name, sizeof(T) * (size_t)(n0) * (n1), #name))
#define DSI_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::dsi_cpu::dynamic_shared())

inline cudaError_t cudaGetLastError() { return ::dsi_cpu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "harness launch error"; }

// Device math the host library lacks (rsqrtf is within 2 ulp on the GPU; 1/sqrt here is within 1).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
