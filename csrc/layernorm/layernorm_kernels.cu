// Fused residual-add + LayerNorm kernels (forward and backward) for fp32 / fp16 / bf16 rows.
//
// Forward, one warp per row:   s = x + r (rounded to the input dtype, exactly like torch's `x + r`),
//                              y = (s - mean) * rstd * gamma + beta, with mean/var/rstd in fp32.
// Backward:                    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds,  g = dy * gamma,
//                              dgamma = sum_rows dy * xhat, dbeta = sum_rows dy.
// dgamma/dbeta use a two-stage reduction (per row-chunk partial sums, then a column reduction kernel) so
// there are no atomics and the result is deterministic at any row count.
//
// Built by dsincubate/ops/builder.py (LayerNormBuilder); bound to Python in layernorm.cpp.
#include "../common/dsi_types.cuh"

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;            // rows per block in the per-row kernels
constexpr int kCacheBytes = 48 * 1024;       // default dynamic shared memory limit, no opt-in needed
constexpr int kPartialRowsY = 8;             // blockDim.y of the dgamma partial kernel
constexpr int kMinRowsPerChunk = 128;
constexpr int kMaxChunks = 1024;

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) VecT { T v[VEC]; };

// VEC == 1 is the generic path for any hidden size; larger VEC is a single 16-byte access.
template <typename T, int VEC> __device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
    const VecT<T, VEC> a = *reinterpret_cast<const VecT<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = dsi_to_float(a.v[k]);
}

template <typename T, int VEC> __device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
    VecT<T, VEC> a;
#pragma unroll
    for (int k = 0; k < VEC; ++k) a.v[k] = dsi_from_float<T>(in[k]);
    *reinterpret_cast<VecT<T, VEC>*>(p) = a;
}

// CACHE keeps the fp32 row in shared memory so passes 2 and 3 do not re-read global memory. Without it
// (very wide rows) the row is re-read from s_out (residual case: this lane's own earlier writes) or x.
template <typename T, int VEC, bool CACHE>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, T* s_out,
                              const float* __restrict__ gamma, const float* __restrict__ beta,
                              float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows, int cols,
                              float eps) {
    DSI_DYNAMIC_SHARED(float, cache_all);
    const int lane = threadIdx.x;
    const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // whole warp leaves together; the kernel has no block-level barrier
    float* cache = cache_all + (size_t)threadIdx.y * cols;
    const bool has_res = r != nullptr;
    const T* xr = x + row * cols;
    const T* rr = has_res ? r + row * cols : nullptr;
    T* sr = has_res ? s_out + row * cols : nullptr;
    const T* src = has_res ? sr : xr;

    float sum = 0.f;
    for (int c = lane * VEC; c < cols; c += kWarp * VEC) {
        float v[VEC];
        load_vec<T, VEC>(xr + c, v);
        if (has_res) {
            float rv[VEC];
            load_vec<T, VEC>(rr + c, rv);
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = dsi_to_float(dsi_from_float<T>(v[k] + rv[k]));
            store_vec<T, VEC>(sr + c, v);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (CACHE) cache[c + k] = v[k];
            sum += v[k];
        }
    }
    const float mean = dsi_warp_sum(sum) / cols;

    // Two-pass variance (sum of squared deviations) instead of E[x^2]-E[x]^2: no cancellation.
    float sq = 0.f;
    for (int c = lane * VEC; c < cols; c += kWarp * VEC) {
        float v[VEC];
        if (CACHE) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = cache[c + k];
        } else {
            load_vec<T, VEC>(src + c, v);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) sq += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(dsi_warp_sum(sq) / cols + eps);

    T* yr = y + row * cols;
    for (int c = lane * VEC; c < cols; c += kWarp * VEC) {
        float v[VEC];
        if (CACHE) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = cache[c + k];
        } else {
            load_vec<T, VEC>(src + c, v);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * gamma[c + k] + beta[c + k];
        store_vec<T, VEC>(yr + c, v);
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// dx (= ds_total, the gradient of the sum s = x + r) for one row per warp.
template <typename T, int VEC>
__global__ void ln_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ s,
                                 const float* __restrict__ gamma, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int cols) {
    const int lane = threadIdx.x;
    const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const float mu = mean[row], rs = rstd[row];
    const T* dyr = dy + row * cols;
    const T* sr = s + row * cols;

    float sum_g = 0.f, sum_gx = 0.f;
    for (int c = lane * VEC; c < cols; c += kWarp * VEC) {
        float gv[VEC], sv[VEC];
        load_vec<T, VEC>(dyr + c, gv);
        load_vec<T, VEC>(sr + c, sv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float g = gv[k] * gamma[c + k];
            sum_g += g;
            sum_gx += g * (sv[k] - mu) * rs;
        }
    }
    const float a = dsi_warp_sum(sum_g) / cols;
    const float b = dsi_warp_sum(sum_gx) / cols;

    T* dxr = dx + row * cols;
    const T* dsr = ds != nullptr ? ds + row * cols : nullptr;
    for (int c = lane * VEC; c < cols; c += kWarp * VEC) {
        float gv[VEC], sv[VEC], out[VEC];
        load_vec<T, VEC>(dyr + c, gv);
        load_vec<T, VEC>(sr + c, sv);
        float extra[VEC];
        if (dsr != nullptr) {
            load_vec<T, VEC>(dsr + c, extra);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) extra[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float xhat = (sv[k] - mu) * rs;
            out[k] = rs * (gv[k] * gamma[c + k] - a - xhat * b) + extra[k];
        }
        store_vec<T, VEC>(dxr + c, out);
    }
}

// Stage 1 of dgamma/dbeta: block (32 columns x kPartialRowsY rows) sums its row chunk into part[chunk, col].
template <typename T>
__global__ void ln_bwd_partial_kernel(const T* __restrict__ dy, const T* __restrict__ s,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      float* __restrict__ part_g, float* __restrict__ part_b, int64_t rows,
                                      int cols, int64_t rows_per_chunk) {
    DSI_SHARED_ARRAY2D(float, red_g, kPartialRowsY, kWarp + 1);
    DSI_SHARED_ARRAY2D(float, red_b, kPartialRowsY, kWarp + 1);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * kWarp + tx;
    const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
    const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float g = 0.f, b = 0.f;
    if (col < cols) {
        for (int64_t r = r0 + ty; r < r1; r += kPartialRowsY) {
            const float d = dsi_to_float(dy[r * cols + col]);
            const float xhat = (dsi_to_float(s[r * cols + col]) - mean[r]) * rstd[r];
            g += d * xhat;
            b += d;
        }
    }
    red_g[ty][tx] = g;
    red_b[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && col < cols) {
#pragma unroll
        for (int k = 1; k < kPartialRowsY; ++k) {
            g += red_g[k][tx];
            b += red_b[k][tx];
        }
        part_g[(int64_t)blockIdx.y * cols + col] = g;
        part_b[(int64_t)blockIdx.y * cols + col] = b;
    }
}

// Stage 2: one thread per column sums the chunk partials (coalesced across threads).
__global__ void ln_bwd_final_kernel(const float* __restrict__ part_g, const float* __restrict__ part_b,
                                    float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t chunks,
                                    int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float g = 0.f, b = 0.f;
    for (int64_t k = 0; k < chunks; ++k) {
        g += part_g[k * cols + col];
        b += part_b[k * cols + col];
    }
    dgamma[col] = g;
    dbeta[col] = b;
}

int64_t rows_per_chunk_for(int64_t rows) {
    const int64_t per = (rows + kMaxChunks - 1) / kMaxChunks;
    return per > kMinRowsPerChunk ? per : kMinRowsPerChunk;
}

template <typename T>
cudaError_t ln_fwd_launch(const void* x, const void* r, void* y, void* s, const float* gamma, const float* beta,
                          float* mean, float* rstd, int64_t rows, int cols, float eps, bool aligned,
                          cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    const dim3 block(kWarp, kWarpsPerBlock);
    const dim3 grid((unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
    const size_t cache = (size_t)kWarpsPerBlock * cols * sizeof(float);
    const bool use_cache = cache <= (size_t)kCacheBytes;
    const T* xp = static_cast<const T*>(x);
    const T* rp = static_cast<const T*>(r);
    T* yp = static_cast<T*>(y);
    T* sp = static_cast<T*>(s);
    const bool vec = aligned && cols % kVec == 0;
    if (vec && use_cache)
        DSI_LAUNCH(grid, block, cache, stream, ln_fwd_kernel<T, kVec, true>)(xp, rp, yp, sp, gamma, beta, mean, rstd, rows, cols, eps);
    else if (vec)
        DSI_LAUNCH(grid, block, 0, stream, ln_fwd_kernel<T, kVec, false>)(xp, rp, yp, sp, gamma, beta, mean, rstd, rows, cols, eps);
    else if (use_cache)
        DSI_LAUNCH(grid, block, cache, stream, ln_fwd_kernel<T, 1, true>)(xp, rp, yp, sp, gamma, beta, mean, rstd, rows, cols, eps);
    else
        DSI_LAUNCH(grid, block, 0, stream, ln_fwd_kernel<T, 1, false>)(xp, rp, yp, sp, gamma, beta, mean, rstd, rows, cols, eps);
    return cudaGetLastError();
}

template <typename T>
cudaError_t ln_bwd_launch(const void* dy, const void* ds, const void* s, const float* gamma, const float* mean,
                          const float* rstd, void* dx, float* dgamma, float* dbeta, float* partial, int64_t rows,
                          int cols, bool aligned, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    const T* dyp = static_cast<const T*>(dy);
    const T* dsp = static_cast<const T*>(ds);
    const T* sp = static_cast<const T*>(s);
    T* dxp = static_cast<T*>(dx);
    const int64_t per = rows_per_chunk_for(rows);
    const int64_t chunks = (rows + per - 1) / per;
    float* part_g = partial;
    float* part_b = partial + chunks * cols;
    if (rows > 0) {  // zero rows: skip the row kernels (a 0-block launch is an error); dgamma/dbeta become 0
        const dim3 block(kWarp, kWarpsPerBlock);
        const dim3 grid((unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
        if (aligned && cols % kVec == 0)
            DSI_LAUNCH(grid, block, 0, stream, ln_bwd_dx_kernel<T, kVec>)(dyp, dsp, sp, gamma, mean, rstd, dxp, rows, cols);
        else
            DSI_LAUNCH(grid, block, 0, stream, ln_bwd_dx_kernel<T, 1>)(dyp, dsp, sp, gamma, mean, rstd, dxp, rows, cols);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        const dim3 pgrid((unsigned)((cols + kWarp - 1) / kWarp), (unsigned)chunks);
        DSI_LAUNCH(pgrid, dim3(kWarp, kPartialRowsY), 0, stream, ln_bwd_partial_kernel<T>)(dyp, sp, mean, rstd, part_g,
                                                                                    part_b, rows, cols, per);
        err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    DSI_LAUNCH((cols + 255) / 256, 256, 0, stream, ln_bwd_final_kernel)(part_g, part_b, dgamma, dbeta, chunks, cols);
    return cudaGetLastError();
}

}  // namespace

// Number of floats the caller must allocate for `partial` in dsi_ln_bwd (2 * chunks * cols).
int64_t dsi_ln_bwd_partial_numel(int64_t rows, int cols) {
    const int64_t per = rows_per_chunk_for(rows);
    return 2 * ((rows + per - 1) / per) * (int64_t)cols;
}

cudaError_t dsi_ln_fwd(int dtype, const void* x, const void* r, void* y, void* s, const float* gamma,
                       const float* beta, float* mean, float* rstd, int64_t rows, int cols, float eps, bool aligned,
                       cudaStream_t stream) {
    if (rows == 0 || cols == 0) return cudaSuccess;
    switch (dtype) {
        case DSI_FLOAT32: return ln_fwd_launch<float>(x, r, y, s, gamma, beta, mean, rstd, rows, cols, eps, aligned, stream);
        case DSI_FLOAT16: return ln_fwd_launch<__half>(x, r, y, s, gamma, beta, mean, rstd, rows, cols, eps, aligned, stream);
        case DSI_BFLOAT16: return ln_fwd_launch<__nv_bfloat16>(x, r, y, s, gamma, beta, mean, rstd, rows, cols, eps, aligned, stream);
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t dsi_ln_bwd(int dtype, const void* dy, const void* ds, const void* s, const float* gamma, const float* mean,
                       const float* rstd, void* dx, float* dgamma, float* dbeta, float* partial, int64_t rows, int cols,
                       bool aligned, cudaStream_t stream) {
    if (cols == 0) return cudaSuccess;
    switch (dtype) {
        case DSI_FLOAT32: return ln_bwd_launch<float>(dy, ds, s, gamma, mean, rstd, dx, dgamma, dbeta, partial, rows, cols, aligned, stream);
        case DSI_FLOAT16: return ln_bwd_launch<__half>(dy, ds, s, gamma, mean, rstd, dx, dgamma, dbeta, partial, rows, cols, aligned, stream);
        case DSI_BFLOAT16: return ln_bwd_launch<__nv_bfloat16>(dy, ds, s, gamma, mean, rstd, dx, dgamma, dbeta, partial, rows, cols, aligned, stream);
        default: return cudaErrorInvalidValue;
    }
}
