// Flash-style attention backward (no mask, no dropout), fp16 / bf16 in, fp32 accumulation.
//
// Three kernels, no atomics (deterministic):
//   1. delta[i] = rowsum(dO_i * O_i)
//   2. dQ kernel, per 32-query block: for every 32-key tile recompute P = exp2(S * scale log2e - lse) from the
//      saved logsumexp, dP = dO V^T, dS = P * (dP - delta), and accumulate dQ += dS K.
//   3. dK/dV kernel, per 32-key block: for every 32-query tile recompute P and dS (transposed roles) and
//      accumulate dV += P^T dO, dK += dS^T Q.
// S and dP are recomputed in both 2 and 3 (more FLOPs than a single atomic-dQ pass, but simpler and exact).
// With s = q.k the raw dot product, dL/ds = scale * dS, hence the final `* scale` on dQ and dK.
//
// Built by dsincubate/ops/builder.py (AttentionBuilder); bound to Python in attention.cpp.
#include "attention_common.cuh"

namespace dsi_attn {
namespace {

template <typename T>
__global__ void attn_bwd_delta_kernel(const AttnBwdParams p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t idx = (int64_t)blockIdx.x * (kThreads / 32) + warp;  // (b * H + h) * N + n
    if (idx >= (int64_t)p.B * p.H * p.N) return;
    const int n = (int)(idx % p.N);
    const int bh = (int)(idx / p.N);
    const int b = bh / p.H, h = bh % p.H;
    const T* o = reinterpret_cast<const T*>(at_bh(p.o, p.so, b, h, sizeof(T))) + (int64_t)n * p.so.n;
    const T* g = reinterpret_cast<const T*>(at_bh(p.dout, p.sdo, b, h, sizeof(T))) + (int64_t)n * p.sdo.n;
    float acc = 0.f;
    for (int d = lane; d < p.D; d += 32) acc += dsi_to_float(o[d]) * dsi_to_float(g[d]);
    acc = dsi_warp_sum(acc);
    if (lane == 0) p.delta[idx] = acc;
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const AttnBwdParams p) {
    constexpr int P = Pitch<DPAD>::value;
    constexpr int NJ = kBwdCols / kTpr;
    constexpr int NP = DPAD / (2 * kTpr);
    DSI_SHARED_ARRAY(T, Qs, kRows * P);
    DSI_SHARED_ARRAY(T, Gs, kRows * P);  // dO
    DSI_SHARED_ARRAY(T, Ks, kBwdCols * P);
    DSI_SHARED_ARRAY(T, Vs, kBwdCols * P);

    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int q0 = blockIdx.y * kRows;
    const int tid = threadIdx.x, row = tid / kTpr, sub = tid % kTpr, lane = tid % 32;
    const int N = p.N, D = p.D;
    const int Dr = (D + 1) & ~1;
    const int qi = q0 + row;
    const int64_t stat = ((int64_t)b * p.H + h) * N + qi;
    // Rows past N have zero Q and dO, so any finite statistics keep their (unused) results finite.
    const float lse = qi < N ? p.lse[stat] : 0.f;
    const float delta = qi < N ? p.delta[stat] : 0.f;

    load_tile<T, kRows, DPAD>(Qs, reinterpret_cast<const T*>(at_bh(p.q, p.sq, b, h, sizeof(T))), p.sq.n, q0, N, D);
    load_tile<T, kRows, DPAD>(Gs, reinterpret_cast<const T*>(at_bh(p.dout, p.sdo, b, h, sizeof(T))), p.sdo.n, q0, N, D);
    const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.sk, b, h, sizeof(T)));
    const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.sv, b, h, sizeof(T)));

    float acc[2 * NP];
#pragma unroll
    for (int i = 0; i < 2 * NP; ++i) acc[i] = 0.f;
    const T* qrow = Qs + row * P;
    const T* grow = Gs + row * P;

    for (int kb = 0; kb < N; kb += kBwdCols) {
        __syncthreads();
        load_tile<T, kBwdCols, DPAD>(Ks, kg, p.sk.n, kb, N, D);
        load_tile<T, kBwdCols, DPAD>(Vs, vg, p.sv.n, kb, N, D);
        __syncthreads();

        float s[NJ], dp[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) s[j] = dp[j] = 0.f;
        for (int d = 0; d < Dr; d += 2) {
            const float2 qv = dsi_load2(qrow + d);
            const float2 gv = dsi_load2(grow + d);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float2 kv = dsi_load2(Ks + (sub + kTpr * j) * P + d);
                const float2 vv = dsi_load2(Vs + (sub + kTpr * j) * P + d);
                s[j] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, s[j]));
                dp[j] = fmaf(gv.x, vv.x, fmaf(gv.y, vv.y, dp[j]));
            }
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const float pr = (kb + sub + kTpr * j < N) ? exp2f(s[j] * p.scale_log2 - lse) : 0.f;
            s[j] = pr * (dp[j] - delta);  // dS
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int t = 0; t < kTpr; ++t) {
                const float dsj = __shfl_sync(0xffffffffu, s[j], (lane & ~(kTpr - 1)) | t);
                const T* krow = Ks + (t + kTpr * j) * P;
#pragma unroll
                for (int i = 0; i < NP; ++i) {
                    const float2 kv = dsi_load2(krow + 2 * (sub + kTpr * i));
                    acc[2 * i] = fmaf(dsj, kv.x, acc[2 * i]);
                    acc[2 * i + 1] = fmaf(dsj, kv.y, acc[2 * i + 1]);
                }
            }
        }
    }
    if (qi < N) store_row<T, NP>(reinterpret_cast<T*>(at_bh(p.dq, p.sdq, b, h, sizeof(T))) + (int64_t)qi * p.sdq.n, acc, p.scale, sub, D);
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const AttnBwdParams p) {
    constexpr int P = Pitch<DPAD>::value;
    constexpr int NJ = kBwdCols / kTpr;
    constexpr int NP = DPAD / (2 * kTpr);
    DSI_SHARED_ARRAY(T, Ks, kRows * P);
    DSI_SHARED_ARRAY(T, Vs, kRows * P);
    DSI_SHARED_ARRAY(T, Qs, kBwdCols * P);
    DSI_SHARED_ARRAY(T, Gs, kBwdCols * P);  // dO
    DSI_SHARED_ARRAY(float, lse_s, kBwdCols);
    DSI_SHARED_ARRAY(float, delta_s, kBwdCols);

    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int k0 = blockIdx.y * kRows;
    const int tid = threadIdx.x, row = tid / kTpr, sub = tid % kTpr, lane = tid % 32;
    const int N = p.N, D = p.D;
    const int Dr = (D + 1) & ~1;
    const int64_t stat0 = ((int64_t)b * p.H + h) * N;

    load_tile<T, kRows, DPAD>(Ks, reinterpret_cast<const T*>(at_bh(p.k, p.sk, b, h, sizeof(T))), p.sk.n, k0, N, D);
    load_tile<T, kRows, DPAD>(Vs, reinterpret_cast<const T*>(at_bh(p.v, p.sv, b, h, sizeof(T))), p.sv.n, k0, N, D);
    const T* qg = reinterpret_cast<const T*>(at_bh(p.q, p.sq, b, h, sizeof(T)));
    const T* gg = reinterpret_cast<const T*>(at_bh(p.dout, p.sdo, b, h, sizeof(T)));

    float acc_k[2 * NP], acc_v[2 * NP];
#pragma unroll
    for (int i = 0; i < 2 * NP; ++i) acc_k[i] = acc_v[i] = 0.f;
    const T* krow = Ks + row * P;
    const T* vrow = Vs + row * P;

    for (int qb = 0; qb < N; qb += kBwdCols) {
        __syncthreads();
        load_tile<T, kBwdCols, DPAD>(Qs, qg, p.sq.n, qb, N, D);
        load_tile<T, kBwdCols, DPAD>(Gs, gg, p.sdo.n, qb, N, D);
        if (tid < kBwdCols) {
            // Queries past N get lse = +inf, i.e. probability exactly 0 for every key.
            const bool ok = qb + tid < N;
            lse_s[tid] = ok ? p.lse[stat0 + qb + tid] : inf_f();
            delta_s[tid] = ok ? p.delta[stat0 + qb + tid] : 0.f;
        }
        __syncthreads();

        float s[NJ], dp[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) s[j] = dp[j] = 0.f;
        for (int d = 0; d < Dr; d += 2) {
            const float2 kv = dsi_load2(krow + d);
            const float2 vv = dsi_load2(vrow + d);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float2 qv = dsi_load2(Qs + (sub + kTpr * j) * P + d);
                const float2 gv = dsi_load2(Gs + (sub + kTpr * j) * P + d);
                s[j] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, s[j]));
                dp[j] = fmaf(gv.x, vv.x, fmaf(gv.y, vv.y, dp[j]));
            }
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int c = sub + kTpr * j;
            const float pr = exp2f(s[j] * p.scale_log2 - lse_s[c]);
            s[j] = pr;                          // P[query c, this key]
            dp[j] = pr * (dp[j] - delta_s[c]);  // dS[query c, this key]
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int t = 0; t < kTpr; ++t) {
                const int src = (lane & ~(kTpr - 1)) | t;
                const float pj = __shfl_sync(0xffffffffu, s[j], src);
                const float dsj = __shfl_sync(0xffffffffu, dp[j], src);
                const T* qrow = Qs + (t + kTpr * j) * P;
                const T* grow = Gs + (t + kTpr * j) * P;
#pragma unroll
                for (int i = 0; i < NP; ++i) {
                    const int d = 2 * (sub + kTpr * i);
                    const float2 gv = dsi_load2(grow + d);
                    const float2 qv = dsi_load2(qrow + d);
                    acc_v[2 * i] = fmaf(pj, gv.x, acc_v[2 * i]);
                    acc_v[2 * i + 1] = fmaf(pj, gv.y, acc_v[2 * i + 1]);
                    acc_k[2 * i] = fmaf(dsj, qv.x, acc_k[2 * i]);
                    acc_k[2 * i + 1] = fmaf(dsj, qv.y, acc_k[2 * i + 1]);
                }
            }
        }
    }
    const int ki = k0 + row;
    if (ki < N) {
        store_row<T, NP>(reinterpret_cast<T*>(at_bh(p.dk, p.sdk, b, h, sizeof(T))) + (int64_t)ki * p.sdk.n, acc_k, p.scale, sub, D);
        store_row<T, NP>(reinterpret_cast<T*>(at_bh(p.dv, p.sdv, b, h, sizeof(T))) + (int64_t)ki * p.sdv.n, acc_v, 1.f, sub, D);
    }
}

template <typename T, int DPAD>
cudaError_t bwd_launch_d(const AttnBwdParams& p, cudaStream_t stream) {
    const dim3 grid((unsigned)(p.B * p.H), (unsigned)((p.N + kRows - 1) / kRows));
    DSI_LAUNCH(grid, kThreads, 0, stream, attn_bwd_dq_kernel<T, DPAD>)(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    DSI_LAUNCH(grid, kThreads, 0, stream, attn_bwd_dkdv_kernel<T, DPAD>)(p);
    return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_launch(const AttnBwdParams& p, cudaStream_t stream) {
    const int64_t rows = (int64_t)p.B * p.H * p.N;
    const int warps = kThreads / 32;
    DSI_LAUNCH((unsigned)((rows + warps - 1) / warps), kThreads, 0, stream, attn_bwd_delta_kernel<T>)(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return p.D <= 64 ? bwd_launch_d<T, 64>(p, stream) : bwd_launch_d<T, 128>(p, stream);
}

}  // namespace
}  // namespace dsi_attn

cudaError_t dsi_attn_bwd(int dtype, const dsi_attn::AttnBwdParams& p, cudaStream_t stream) {
    if (p.B * p.H == 0 || p.N == 0) return cudaSuccess;
    if (p.D < 1 || p.D > 128) return cudaErrorInvalidValue;
    switch (dtype) {
        case DSI_FLOAT16: return dsi_attn::bwd_launch<__half>(p, stream);
        case DSI_BFLOAT16: return dsi_attn::bwd_launch<__nv_bfloat16>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}
