// Flash-style multi-head self-attention forward (no mask, no dropout), fp16 / bf16 in, fp32 accumulation.
//
// Per (batch, head) and block of 32 queries: Q tile in shared memory; loop over 64-key tiles of K and V
// (shared memory), scores in registers, online softmax (running max m and sum l, rescaling the output
// accumulator when the max grows), O = acc / l at the end. Also stores the row logsumexp (log2 domain) for
// the backward kernels. The N x N score matrix never exists in global memory.
//
// Built by dsincubate/ops/builder.py (AttentionBuilder); bound to Python in attention.cpp.
#include "attention_common.cuh"

namespace dsi_attn {
namespace {

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnFwdParams p) {
    constexpr int P = Pitch<DPAD>::value;
    constexpr int NJ = kFwdCols / kTpr;       // keys per lane per tile
    constexpr int NP = DPAD / (2 * kTpr);     // owned output feature pairs per lane
    DSI_SHARED_ARRAY(T, Qs, kRows * P);
    DSI_SHARED_ARRAY(T, Ks, kFwdCols * P);
    DSI_SHARED_ARRAY(T, Vs, kFwdCols * P);

    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int q0 = blockIdx.y * kRows;
    const int tid = threadIdx.x, row = tid / kTpr, sub = tid % kTpr, lane = tid % 32;
    const int N = p.N, D = p.D;
    const int Dr = (D + 1) & ~1;  // features are consumed in pairs; feature D (if D is odd) is a zero pad

    const T* qg = reinterpret_cast<const T*>(at_bh(p.q, p.sq, b, h, sizeof(T)));
    const T* kg = reinterpret_cast<const T*>(at_bh(p.k, p.sk, b, h, sizeof(T)));
    const T* vg = reinterpret_cast<const T*>(at_bh(p.v, p.sv, b, h, sizeof(T)));
    load_tile<T, kRows, DPAD>(Qs, qg, p.sq.n, q0, N, D);

    float m = -inf_f(), l = 0.f;
    float acc[2 * NP];
#pragma unroll
    for (int i = 0; i < 2 * NP; ++i) acc[i] = 0.f;
    const T* qrow = Qs + row * P;

    for (int kb = 0; kb < N; kb += kFwdCols) {
        __syncthreads();  // all lanes are done with the previous K/V tile
        load_tile<T, kFwdCols, DPAD>(Ks, kg, p.sk.n, kb, N, D);
        load_tile<T, kFwdCols, DPAD>(Vs, vg, p.sv.n, kb, N, D);
        __syncthreads();

        float s[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) s[j] = 0.f;
        for (int d = 0; d < Dr; d += 2) {
            const float2 qv = dsi_load2(qrow + d);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float2 kv = dsi_load2(Ks + (sub + kTpr * j) * P + d);
                s[j] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, s[j]));
            }
        }

        // Keys past N are zero rows in Ks; mask them so they get zero probability.
        float mx = -inf_f();
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            s[j] = (kb + sub + kTpr * j < N) ? s[j] * p.scale_log2 : -inf_f();
            mx = fmaxf(mx, s[j]);
        }
        // Key kb < N is always in this tile, so the group max (and m_new) is finite.
        const float m_new = fmaxf(m, dsi_group_max<kTpr>(mx));
        const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
        float ls = 0.f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            s[j] = exp2f(s[j] - m_new);
            ls += s[j];
        }
        l = l * alpha + dsi_group_sum<kTpr>(ls);
        m = m_new;
#pragma unroll
        for (int i = 0; i < 2 * NP; ++i) acc[i] *= alpha;

        // acc += P_row . V_tile. Key (t + 4 j) of this row's probabilities lives in partner lane t, slot j.
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int t = 0; t < kTpr; ++t) {
                const float pj = __shfl_sync(0xffffffffu, s[j], (lane & ~(kTpr - 1)) | t);
                const T* vrow = Vs + (t + kTpr * j) * P;
#pragma unroll
                for (int i = 0; i < NP; ++i) {
                    const float2 vv = dsi_load2(vrow + 2 * (sub + kTpr * i));
                    acc[2 * i] = fmaf(pj, vv.x, acc[2 * i]);
                    acc[2 * i + 1] = fmaf(pj, vv.y, acc[2 * i + 1]);
                }
            }
        }
    }

    const int qi = q0 + row;
    if (qi < N) {
        T* og = reinterpret_cast<T*>(at_bh(p.o, p.so, b, h, sizeof(T))) + (int64_t)qi * p.so.n;
        store_row<T, NP>(og, acc, 1.f / l, sub, D);
        if (sub == 0) p.lse[((int64_t)b * p.H + h) * N + qi] = m + log2f(l);
    }
}

template <typename T>
cudaError_t fwd_launch(const AttnFwdParams& p, cudaStream_t stream) {
    const dim3 grid((unsigned)(p.B * p.H), (unsigned)((p.N + kRows - 1) / kRows));
    if (p.D <= 64)
        DSI_LAUNCH(grid, kThreads, 0, stream, attn_fwd_kernel<T, 64>)(p);
    else
        DSI_LAUNCH(grid, kThreads, 0, stream, attn_fwd_kernel<T, 128>)(p);
    return cudaGetLastError();
}

}  // namespace
}  // namespace dsi_attn

cudaError_t dsi_attn_fwd(int dtype, const dsi_attn::AttnFwdParams& p, cudaStream_t stream) {
    if (p.B * p.H == 0 || p.N == 0) return cudaSuccess;
    if (p.D < 1 || p.D > 128) return cudaErrorInvalidValue;
    switch (dtype) {
        case DSI_FLOAT16: return dsi_attn::fwd_launch<__half>(p, stream);
        case DSI_BFLOAT16: return dsi_attn::fwd_launch<__nv_bfloat16>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}
