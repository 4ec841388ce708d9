// PyTorch binding of the fused residual-add + LayerNorm CUDA kernels (layernorm_kernels.cu).
//
// forward(x, residual|None, weight, bias, eps) -> [y, s|None, mean, rstd]      (x, residual: [rows, cols])
// backward(dy, ds|None, s, weight, mean, rstd) -> [dx, dweight, dbias]
// s = x + residual (or x itself for a plain LayerNorm) is what the backward needs. Weight and bias may be fp32
// or the input dtype; the kernels always read fp32 copies (cols elements, negligible) and the gradients are
// returned in the weight's dtype. Called from dsincubate/ops/layernorm.py; built by dsincubate/ops/builder.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "../common/dsi_dtype.h"

cudaError_t dsi_ln_fwd(int dtype, const void* x, const void* r, void* y, void* s, const float* gamma,
                       const float* beta, float* mean, float* rstd, int64_t rows, int cols, float eps, bool aligned,
                       cudaStream_t stream);
cudaError_t dsi_ln_bwd(int dtype, const void* dy, const void* ds, const void* s, const float* gamma, const float* mean,
                       const float* rstd, void* dx, float* dgamma, float* dbeta, float* partial, int64_t rows, int cols,
                       bool aligned, cudaStream_t stream);
int64_t dsi_ln_bwd_partial_numel(int64_t rows, int cols);

namespace {

int dtype_tag(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return DSI_FLOAT32;
        case at::kHalf: return DSI_FLOAT16;
        case at::kBFloat16: return DSI_BFLOAT16;
        default: TORCH_CHECK(false, "dsi layernorm: unsupported dtype ", t.scalar_type());
    }
}

// 16-byte alignment of every row tensor enables the vectorized kernel (cols must also divide the vector).
bool aligned16(const at::Tensor& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.device() == like.device(), "dsi layernorm: ", name, " is on ", t.device(), ", expected ", like.device());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dsi layernorm: ", name, " dtype ", t.scalar_type(),
                " != ", like.scalar_type());
    TORCH_CHECK(t.sizes() == like.sizes(), "dsi layernorm: ", name, " shape ", t.sizes(), " != ", like.sizes());
    TORCH_CHECK(t.is_contiguous(), "dsi layernorm: ", name, " must be contiguous");
}

at::Tensor fp32_vector(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.device() == like.device(), "dsi layernorm: ", name, " is on ", t.device());
    TORCH_CHECK(t.numel() == like.size(1), "dsi layernorm: ", name, " has ", t.numel(), " elements, expected ",
                like.size(1));
    return t.to(at::kFloat).contiguous();
}

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "dsi layernorm ", what, " kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> ln_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                   const at::Tensor& weight, const at::Tensor& bias, double eps) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "dsi layernorm: x must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(x.size(1) <= INT32_MAX, "dsi layernorm: hidden size too large");
    const c10::cuda::OptionalCUDAGuard guard(x.device());
    const int tag = dtype_tag(x);
    at::Tensor r;
    if (residual.has_value() && residual->defined()) {
        r = *residual;
        check_rows(r, x, "residual");
    }
    const at::Tensor gamma = fp32_vector(weight, x, "weight");
    const at::Tensor beta = fp32_vector(bias, x, "bias");
    at::Tensor y = at::empty_like(x);
    at::Tensor s = r.defined() ? at::empty_like(x) : at::Tensor();
    at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
    at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
    const bool aligned = aligned16(x) && aligned16(r) && aligned16(y) && aligned16(s);
    check_cuda(dsi_ln_fwd(tag, x.data_ptr(), r.defined() ? r.data_ptr() : nullptr, y.data_ptr(),
                          s.defined() ? s.data_ptr() : nullptr, gamma.data_ptr<float>(), beta.data_ptr<float>(),
                          mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0), (int)x.size(1), (float)eps,
                          aligned, c10::cuda::getCurrentCUDAStream()),
               "forward");
    return {y, s, mean, rstd};
}

std::vector<at::Tensor> ln_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& ds_opt, const at::Tensor& s,
                                    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
    TORCH_CHECK(s.is_cuda() && s.dim() == 2 && s.is_contiguous(), "dsi layernorm: s must be a contiguous 2-D CUDA tensor");
    check_rows(dy, s, "dy");
    const c10::cuda::OptionalCUDAGuard guard(s.device());
    at::Tensor ds;
    if (ds_opt.has_value() && ds_opt->defined()) {
        ds = *ds_opt;
        check_rows(ds, s, "ds");
    }
    TORCH_CHECK(mean.numel() == s.size(0) && rstd.numel() == s.size(0), "dsi layernorm: bad mean/rstd");
    const at::Tensor gamma = fp32_vector(weight, s, "weight");
    const int64_t rows = s.size(0);
    const int cols = (int)s.size(1);
    at::Tensor dx = at::empty_like(s);
    at::Tensor dgamma = at::empty({cols}, s.options().dtype(at::kFloat));
    at::Tensor dbeta = at::empty({cols}, s.options().dtype(at::kFloat));
    at::Tensor partial = at::empty({std::max<int64_t>(1, dsi_ln_bwd_partial_numel(rows, cols))},
                                   s.options().dtype(at::kFloat));
    const bool aligned = aligned16(dy) && aligned16(ds) && aligned16(s) && aligned16(dx);
    check_cuda(dsi_ln_bwd(dtype_tag(s), dy.data_ptr(), ds.defined() ? ds.data_ptr() : nullptr, s.data_ptr(),
                          gamma.data_ptr<float>(), mean.contiguous().data_ptr<float>(),
                          rstd.contiguous().data_ptr<float>(), dx.data_ptr(), dgamma.data_ptr<float>(),
                          dbeta.data_ptr<float>(), partial.data_ptr<float>(), rows, cols, aligned,
                          c10::cuda::getCurrentCUDAStream()),
               "backward");
    return {dx, dgamma.to(weight.scalar_type()), dbeta.to(weight.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "dsincubate fused residual-add + LayerNorm (CUDA)";
    m.def("forward", &ln_forward, "y, s, mean, rstd = forward(x, residual, weight, bias, eps)");
    m.def("backward", &ln_backward, "dx, dweight, dbias = backward(dy, ds, s, weight, mean, rstd)");
}
