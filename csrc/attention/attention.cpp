// PyTorch binding of the flash-style attention kernels (attention_fwd.cu, attention_bwd.cu).
//
// forward(q, k, v, scale) -> [o, lse]
//     q, k, v: [B, H, N, D] fp16/bf16, any strides with stride(-1) == 1 (e.g. views of a packed qkv tensor).
//     o: [B, H, N, D] view of a contiguous [B, N, H, D] buffer (what the output projection wants);
//     lse: [B, H, N] fp32 log2-domain logsumexp, only meaningful to backward.
// backward(dout, q, k, v, o, lse, dq, dk, dv, scale) -> None: writes every element of dq, dk, dv (preallocated
//     [B, H, N, D] with stride(-1) == 1, so they can be views into one packed dqkv buffer).
// Called from dsincubate/ops/flash_attention.py; built by dsincubate/ops/builder.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "../common/dsi_dtype.h"
#include "attention_params.h"

cudaError_t dsi_attn_fwd(int dtype, const dsi_attn::AttnFwdParams& p, cudaStream_t stream);
cudaError_t dsi_attn_bwd(int dtype, const dsi_attn::AttnBwdParams& p, cudaStream_t stream);

namespace {

constexpr double kLog2e = 1.4426950408889634;

int dtype_tag(const at::Tensor& t) {
    if (t.scalar_type() == at::kHalf) return DSI_FLOAT16;
    if (t.scalar_type() == at::kBFloat16) return DSI_BFLOAT16;
    TORCH_CHECK(false, "dsi attention: dtype must be float16 or bfloat16, got ", t.scalar_type());
}

void check_bhnd(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.dim() == 4, "dsi attention: ", name, " must be a 4-D CUDA tensor [B, H, N, D]");
    TORCH_CHECK(t.device() == like.device(), "dsi attention: ", name, " is on ", t.device());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dsi attention: ", name, " dtype ", t.scalar_type(), " != ",
                like.scalar_type());
    TORCH_CHECK(t.sizes() == like.sizes(), "dsi attention: ", name, " shape ", t.sizes(), " != ", like.sizes());
    TORCH_CHECK(t.stride(3) == 1, "dsi attention: ", name, " needs a contiguous last dimension");
}

dsi_attn::Strides3 strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_shape_limits(const at::Tensor& q) {
    TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128, "dsi attention: head dim must be in [1, 128], got ", q.size(3));
    TORCH_CHECK(q.size(0) * q.size(1) <= INT32_MAX && q.size(2) <= INT32_MAX, "dsi attention: shape too large");
}

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "dsi attention ", what, " kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
    check_bhnd(q, q, "q");
    check_bhnd(k, q, "k");
    check_bhnd(v, q, "v");
    check_shape_limits(q);
    const c10::cuda::OptionalCUDAGuard guard(q.device());
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
    at::Tensor o = at::empty({B, N, H, D}, q.options()).permute({0, 2, 1, 3});
    at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
    dsi_attn::AttnFwdParams p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.o = o.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.sq = strides(q);
    p.sk = strides(k);
    p.sv = strides(v);
    p.so = strides(o);
    p.B = (int)B;
    p.H = (int)H;
    p.N = (int)N;
    p.D = (int)D;
    p.scale_log2 = (float)(scale * kLog2e);
    check_cuda(dsi_attn_fwd(dtype_tag(q), p, c10::cuda::getCurrentCUDAStream()), "forward");
    return {o, lse};
}

void attn_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& lse, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                   double scale) {
    check_bhnd(q, q, "q");
    check_bhnd(k, q, "k");
    check_bhnd(v, q, "v");
    check_bhnd(o, q, "o");
    check_bhnd(dout, q, "dout");
    check_bhnd(dq, q, "dq");
    check_bhnd(dk, q, "dk");
    check_bhnd(dv, q, "dv");
    check_shape_limits(q);
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * H * N,
                "dsi attention: lse must be the contiguous fp32 [B, H, N] tensor from forward");
    const c10::cuda::OptionalCUDAGuard guard(q.device());
    at::Tensor delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));
    dsi_attn::AttnBwdParams p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.o = o.data_ptr();
    p.dout = dout.data_ptr();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.sq = strides(q);
    p.sk = strides(k);
    p.sv = strides(v);
    p.so = strides(o);
    p.sdo = strides(dout);
    p.sdq = strides(dq);
    p.sdk = strides(dk);
    p.sdv = strides(dv);
    p.B = (int)B;
    p.H = (int)H;
    p.N = (int)N;
    p.D = (int)D;
    p.scale = (float)scale;
    p.scale_log2 = (float)(scale * kLog2e);
    check_cuda(dsi_attn_bwd(dtype_tag(q), p, c10::cuda::getCurrentCUDAStream()), "backward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "dsincubate flash-style multi-head attention (CUDA)";
    m.def("forward", &attn_forward, "o, lse = forward(q, k, v, scale)");
    m.def("backward", &attn_backward, "backward(dout, q, k, v, o, lse, dq, dk, dv, scale)");
}
