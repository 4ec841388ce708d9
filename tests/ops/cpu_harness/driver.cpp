// Driver of the CPU execution harness: runs the csrc/ kernels' host entry points (dsi_ln_fwd, dsi_ln_bwd,
// dsi_attn_fwd, dsi_attn_bwd, compiled from the unchanged .cu files) on cases written by harness.py.
//
//     driver <case dir>        reads <dir>/cases.txt, one case per line:
//       <id> <schedules> ln   dtype rows cols residual misalign eps
//       <id> <schedules> attn dtype B H N D packed scale
//     inputs  <dir>/<id>.<name>.in   raw little-endian arrays (16-bit types as their bits)
//     outputs <dir>/<id>.<name>.out
//
// It allocates every buffer exactly as the PyTorch bindings (csrc/*/*.cpp) would, each as its own heap block so
// AddressSanitizer flags any access outside it, and fills outputs with 0xFF bytes (NaN) so an element a kernel
// never writes is caught. Each case runs under each of its schedules (comma-separated: lowest, highest,
// random; see runtime.cpp); outputs that differ between schedules mean a race (a missing barrier) and are reported
// as "RACE". Prints one "OK <id>" / "RACE <id> <output>" / "ERR <id> <message>" line per case, then one
// "LAUNCHED <kernel> | <type> <count>" line per kernel variant that ran and "CPU_SECONDS <s>".
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../../../csrc/attention/attention_params.h"
#include "../../../csrc/common/dsi_dtype.h"
#include "dsi_cpu_cuda.h"

cudaError_t dsi_ln_fwd(int dtype, const void* x, const void* r, void* y, void* s, const float* gamma,
                       const float* beta, float* mean, float* rstd, int64_t rows, int cols, float eps, bool aligned,
                       cudaStream_t stream);
cudaError_t dsi_ln_bwd(int dtype, const void* dy, const void* ds, const void* s, const float* gamma, const float* mean,
                       const float* rstd, void* dx, float* dgamma, float* dbeta, float* partial, int64_t rows, int cols,
                       bool aligned, cudaStream_t stream);
int64_t dsi_ln_bwd_partial_numel(int64_t rows, int cols);
cudaError_t dsi_attn_fwd(int dtype, const dsi_attn::AttnFwdParams& p, cudaStream_t stream);
cudaError_t dsi_attn_bwd(int dtype, const dsi_attn::AttnBwdParams& p, cudaStream_t stream);

namespace {

std::string dir;

// A buffer of exactly `bytes` (plus `lead` unused leading bytes for the misaligned-row cases).
struct Buf {
    void* base = nullptr;
    char* p = nullptr;
    size_t bytes = 0;
    Buf() = default;
    Buf(size_t n, size_t lead = 0) : bytes(n) {
        if (posix_memalign(&base, 64, n + lead == 0 ? 1 : n + lead) != 0) abort();
        p = static_cast<char*>(base) + lead;
        memset(p, 0xFF, n);
    }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    Buf(Buf&& o) noexcept : base(o.base), p(o.p), bytes(o.bytes) { o.base = nullptr; }
    Buf& operator=(Buf&& o) noexcept {
        std::swap(base, o.base);
        p = o.p;
        bytes = o.bytes;
        return *this;
    }
    ~Buf() { free(base); }
    template <typename T> T* as() const { return reinterpret_cast<T*>(p); }
};

Buf load(const std::string& id, const std::string& name, size_t bytes, size_t lead = 0) {
    Buf b(bytes, lead);
    std::ifstream in(dir + "/" + id + "." + name + ".in", std::ios::binary);
    in.read(b.p, bytes);
    if (!in || in.gcount() != static_cast<std::streamsize>(bytes)) {
        fprintf(stderr, "driver: cannot read %zu bytes of %s.%s\n", bytes, id.c_str(), name.c_str());
        exit(2);
    }
    return b;
}

void save(const std::string& id, const std::string& name, const Buf& b) {
    std::ofstream out(dir + "/" + id + "." + name + ".out", std::ios::binary);
    out.write(b.p, b.bytes);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }
size_t elem_size(int dtype) { return dtype == DSI_FLOAT32 ? 4 : 2; }

struct Outputs {
    std::vector<std::pair<std::string, Buf>> bufs;
    std::string error;
};

// Residual-add + LayerNorm forward then backward, as layernorm.cpp / layernorm.py call them.
Outputs run_ln(const std::string& id, std::istringstream& args) {
    int dtype, residual, misalign;
    long long rows;
    int cols;
    float eps;
    args >> dtype >> rows >> cols >> residual >> misalign >> eps;
    const size_t n = static_cast<size_t>(rows) * cols, bytes = n * elem_size(dtype), vb = cols * sizeof(float);
    Outputs out;
    Buf x = load(id, "x", bytes, misalign ? elem_size(dtype) : 0);
    Buf r = residual ? load(id, "r", bytes) : Buf();
    Buf gamma = load(id, "gamma", vb), beta = load(id, "beta", vb), dy = load(id, "dy", bytes);
    Buf ds = residual ? load(id, "ds", bytes) : Buf();
    Buf y(bytes), s = residual ? Buf(bytes) : Buf(), mean(rows * 4), rstd(rows * 4);
    bool aligned = aligned16(x.p) && aligned16(r.p) && aligned16(y.p) && aligned16(s.p);
    cudaError_t err = dsi_ln_fwd(dtype, x.p, r.p, y.p, s.p, gamma.as<float>(), beta.as<float>(), mean.as<float>(),
                                 rstd.as<float>(), rows, cols, eps, aligned, nullptr);
    if (err != cudaSuccess) out.error = "dsi_ln_fwd returned " + std::to_string(err);
    const Buf& sb = residual ? s : x;
    Buf dx(bytes), dgamma(vb), dbeta(vb);
    const int64_t part = dsi_ln_bwd_partial_numel(rows, cols);
    Buf partial((part > 1 ? part : 1) * sizeof(float));
    aligned = aligned16(dy.p) && aligned16(ds.p) && aligned16(sb.p) && aligned16(dx.p);
    err = dsi_ln_bwd(dtype, dy.p, ds.p, sb.p, gamma.as<float>(), mean.as<float>(), rstd.as<float>(), dx.p,
                     dgamma.as<float>(), dbeta.as<float>(), partial.as<float>(), rows, cols, aligned, nullptr);
    if (err != cudaSuccess && out.error.empty()) out.error = "dsi_ln_bwd returned " + std::to_string(err);
    out.bufs.emplace_back("y", std::move(y));
    if (residual) out.bufs.emplace_back("s", std::move(s));
    out.bufs.emplace_back("mean", std::move(mean));
    out.bufs.emplace_back("rstd", std::move(rstd));
    out.bufs.emplace_back("dx", std::move(dx));
    out.bufs.emplace_back("dgamma", std::move(dgamma));
    out.bufs.emplace_back("dbeta", std::move(dbeta));
    return out;
}

// Attention forward then backward, as attention.cpp / flash_attention.py call them. packed: q, k, v and
// dq, dk, dv are strided views of [B, N, 3, H, D] buffers (timm's qkv layout); else separate [B, H, N, D]
// buffers. o is always a [B, N, H, D] buffer, dout a contiguous [B, H, N, D] one.
Outputs run_attn(const std::string& id, std::istringstream& args) {
    int dtype, B, H, N, D, packed;
    float scale;
    args >> dtype >> B >> H >> N >> D >> packed >> scale;
    const size_t e = elem_size(dtype), one = static_cast<size_t>(B) * H * N * D;
    const float kLog2e = 1.4426950408889634f;
    Outputs out;
    Buf qkv, q, k, v, dqkv, dq, dk, dv;
    const void *qp, *kp, *vp;
    void *dqp, *dkp, *dvp;
    dsi_attn::Strides3 sin, sgrad;
    const dsi_attn::Strides3 bhnd{(int64_t)H * N * D, (int64_t)N * D, D};
    if (packed) {
        qkv = load(id, "qkv", 3 * one * e);
        dqkv = Buf(3 * one * e);
        sin = sgrad = {(int64_t)N * 3 * H * D, D, (int64_t)3 * H * D};
        qp = qkv.p, kp = qkv.p + (size_t)H * D * e, vp = qkv.p + (size_t)2 * H * D * e;
        dqp = dqkv.p, dkp = dqkv.p + (size_t)H * D * e, dvp = dqkv.p + (size_t)2 * H * D * e;
    } else {
        q = load(id, "q", one * e), k = load(id, "k", one * e), v = load(id, "v", one * e);
        dq = Buf(one * e), dk = Buf(one * e), dv = Buf(one * e);
        sin = sgrad = bhnd;
        qp = q.p, kp = k.p, vp = v.p, dqp = dq.p, dkp = dk.p, dvp = dv.p;
    }
    Buf o(one * e), lse((size_t)B * H * N * 4), dout = load(id, "dout", one * e), delta((size_t)B * H * N * 4);
    dsi_attn::AttnFwdParams f{};
    f.q = qp, f.k = kp, f.v = vp, f.o = o.p, f.lse = lse.as<float>();
    f.sq = f.sk = f.sv = sin;
    f.so = {(int64_t)N * H * D, D, (int64_t)H * D};
    f.B = B, f.H = H, f.N = N, f.D = D;
    f.scale_log2 = scale * kLog2e;
    cudaError_t err = dsi_attn_fwd(dtype, f, nullptr);
    if (err != cudaSuccess) out.error = "dsi_attn_fwd returned " + std::to_string(err);
    dsi_attn::AttnBwdParams b{};
    b.q = qp, b.k = kp, b.v = vp, b.o = o.p, b.dout = dout.p, b.dq = dqp, b.dk = dkp, b.dv = dvp;
    b.lse = lse.as<float>(), b.delta = delta.as<float>();
    b.sq = b.sk = b.sv = sin;
    b.so = f.so;
    b.sdo = bhnd;
    b.sdq = b.sdk = b.sdv = sgrad;
    b.B = B, b.H = H, b.N = N, b.D = D;
    b.scale = scale, b.scale_log2 = scale * kLog2e;
    err = dsi_attn_bwd(dtype, b, nullptr);
    if (err != cudaSuccess && out.error.empty()) out.error = "dsi_attn_bwd returned " + std::to_string(err);
    out.bufs.emplace_back("o", std::move(o));
    out.bufs.emplace_back("lse", std::move(lse));
    if (packed) {
        out.bufs.emplace_back("dqkv", std::move(dqkv));
    } else {
        out.bufs.emplace_back("dq", std::move(dq));
        out.bufs.emplace_back("dk", std::move(dk));
        out.bufs.emplace_back("dv", std::move(dv));
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <case dir>\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    std::ifstream cases(dir + "/cases.txt");
    for (std::string line; std::getline(cases, line);) {
        if (line.empty()) continue;
        std::istringstream head(line);
        std::string id, sched, op;
        head >> id >> sched >> op;
        std::vector<std::string> schedules;
        std::stringstream ss(sched);
        for (std::string s; std::getline(ss, s, ',');)
            if (!s.empty()) schedules.push_back(s);
        const std::string rest = line.substr(static_cast<size_t>(head.tellg()));
        Outputs first;
        std::string verdict = "OK " + id;
        for (size_t i = 0; i < schedules.size(); ++i) {
            dsi_cpu::set_schedule(schedules[i], 1000u + static_cast<unsigned>(i));
            std::istringstream args(rest);
            Outputs got = op == "ln" ? run_ln(id, args) : run_attn(id, args);
            if (!got.error.empty()) {
                verdict = "ERR " + id + " " + got.error;
                first = std::move(got);
                break;
            }
            if (i == 0) {
                first = std::move(got);
                continue;
            }
            for (size_t j = 0; j < got.bufs.size(); ++j)
                if (memcmp(got.bufs[j].second.p, first.bufs[j].second.p, got.bufs[j].second.bytes) != 0 &&
                    verdict.rfind("OK", 0) == 0)
                    verdict = "RACE " + id + " " + got.bufs[j].first + " differs between schedules " + schedules[0] +
                              " and " + schedules[i];
        }
        for (const auto& nb : first.bufs) save(id, nb.first, nb.second);
        printf("%s\n", verdict.c_str());
        fflush(stdout);
    }
    for (const auto& kv : dsi_cpu::launch_counts) printf("LAUNCHED %s %ld\n", kv.first.c_str(), kv.second);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    printf("CPU_SECONDS %.3f\n", ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec));
    return 0;
}
