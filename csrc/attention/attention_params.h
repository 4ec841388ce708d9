// Launch parameters of the attention kernels, shared by attention.cpp (g++) and the .cu files (nvcc), so it
// only uses plain C++ types.
//
// Tensors are [B, H, N, D] given by (batch, head, seq) strides in elements with a contiguous last dim, so
// q/k/v can be strided views into a packed qkv [B, N, 3, H, D] tensor and o/dq/dk/dv can be written straight
// into the [B, N, H, D] layout the output projection consumes (no permute copies on either side).
#pragma once

#include <stdint.h>

namespace dsi_attn {

struct Strides3 {
    int64_t b, h, n;
};

struct AttnFwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* lse;  // [B, H, N] contiguous, log2 domain: log2(sum_j exp2(s_ij * scale * log2 e))
    Strides3 sq, sk, sv, so;
    int B, H, N, D;
    float scale_log2;  // softmax scale * log2(e)
};

struct AttnBwdParams {
    const void* q;
    const void* k;
    const void* v;
    const void* o;
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    const float* lse;  // from the forward
    float* delta;      // [B, H, N] fp32 workspace: rowsum(dO * O)
    Strides3 sq, sk, sv, so, sdo, sdq, sdk, sdv;
    int B, H, N, D;
    float scale;
    float scale_log2;
};

}  // namespace dsi_attn
