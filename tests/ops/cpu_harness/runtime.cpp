// Runtime of the CPU execution harness (see dsi_cpu_cuda.h): fibers, block scheduler, __syncthreads,
// warp shuffles, shared memory and launch-configuration checks. Single OS thread; x86-64 only.
//
// Every CUDA thread of the running block is a fiber with its own mmap'd stack (guard page below). The scheduler
// (in the launching thread) resumes one READY fiber at a time; a fiber runs until it waits at a barrier or a
// shuffle, or returns. Which READY fiber runs next is the schedule (DSI_HARNESS_SCHEDULE or set_schedule):
//   lowest   always the lowest-numbered ready thread: warp 0 runs ahead of the others as far as it can
//   highest  the highest-numbered one: the last warp runs ahead (blocks also run in reverse order)
//   random   a seeded random ready thread at every step (blocks in random order)
// A race-free kernel gives bit-identical results under all three; driver.cpp compares them.
// Fibers hand over to each other directly. Context switches are a small hand-written routine (not swapcontext, whose ASan interceptor wipes the shadow
// of suspended stacks), annotated for AddressSanitizer with __sanitizer_{start,finish}_switch_fiber.
#include "dsi_cpu_cuda.h"

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define DSI_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DSI_ASAN 1
#endif
#endif
#ifdef DSI_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" void dsi_ctx_switch(void** save_sp, void* new_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save_sp, then restores the same from new_sp and returns into that context.
asm(R"(
    .text
    .globl dsi_ctx_switch
    .type dsi_ctx_switch, @function
dsi_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw 12(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw 12(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size dsi_ctx_switch, .-dsi_ctx_switch
)");

namespace dsi_cpu {

enum State { kReady, kBarrier, kShuffle, kDone };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // usable stack (above the guard page)
    uint3 tid{};
    int linear = 0, warp = 0, lane = 0;
    State state = kReady;
    uint32_t shfl_bits = 0, shfl_result = 0;
    int shfl_arg = 0, shfl_width = 32;
    ShflMode shfl_mode = kShflIdx;
    void* fake_stack = nullptr;
};

struct Warp {
    unsigned mask = 0, pending = 0;  // mask of the rendezvous in progress, lanes arrived so far
    int size = 32;                   // lanes that exist (the last warp of a block may be partial)
};

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kSharedLimit = 48 * 1024;  // per block without the opt-in attribute

std::vector<Fiber> fibers;  // grows to the largest block seen; stacks are reused
int nthreads = 0;           // threads of the running block
std::vector<Warp> warps;
void* main_sp = nullptr;
const void* main_bottom = nullptr;
size_t main_size = 0;
const std::function<void()>* body = nullptr;
cudaError_t last_error = cudaSuccess;
const char* kernel_name = "";
std::string schedule = "lowest";
std::mt19937 rng(12345);

// Per block state.
int live = 0, arrived = 0, exited = 0;
const char* bar_file = nullptr;
int bar_line = 0;
std::map<const void*, std::pair<void*, size_t>> shared_arrays;
void* dyn_shared = nullptr;
size_t dyn_bytes = 0, static_bytes = 0;

// Ready set: one bit per thread of the block, so picking the next thread is a few word scans.
uint64_t ready_bits[1024 / 64];

void set_state(Fiber& f, State st) {
    f.state = st;
    if (st == kReady)
        ready_bits[f.linear >> 6] |= 1ull << (f.linear & 63);
    else
        ready_bits[f.linear >> 6] &= ~(1ull << (f.linear & 63));
}

int pick_ready() {
    const int words = (nthreads + 63) / 64;
    if (schedule == "highest") {
        for (int w = words - 1; w >= 0; --w)
            if (ready_bits[w]) return w * 64 + 63 - __builtin_clzll(ready_bits[w]);
        return -1;
    }
    if (schedule == "random") {
        int total = 0;
        for (int w = 0; w < words; ++w) total += __builtin_popcountll(ready_bits[w]);
        if (total == 0) return -1;
        int k = std::uniform_int_distribution<int>(0, total - 1)(rng);
        for (int w = 0; w < words; ++w) {
            const int c = __builtin_popcountll(ready_bits[w]);
            if (k >= c) {
                k -= c;
                continue;
            }
            uint64_t b = ready_bits[w];
            for (; k > 0; --k) b &= b - 1;  // drop the k lowest set bits
            return w * 64 + __builtin_ctzll(b);
        }
        return -1;
    }
    for (int w = 0; w < words; ++w)
        if (ready_bits[w]) return w * 64 + __builtin_ctzll(ready_bits[w]);
    return -1;
}

// Leaves fiber `f` (blocked or finished) for the next ready fiber, or for the scheduler when none is ready
// (block finished, or deadlock). Fibers switch to each other directly: one context switch per hand-over.
void switch_from(Fiber* f) {
    const int next = pick_ready();
    Fiber* to = next < 0 ? nullptr : &fibers[next];
    void** save = f->state == kDone ? nullptr : &f->fake_stack;  // a finished fiber's fake stack is released
#ifdef DSI_ASAN
    if (to != nullptr)
        __sanitizer_start_switch_fiber(save, to->stack, kStackBytes);
    else
        __sanitizer_start_switch_fiber(save, main_bottom, main_size);
#else
    (void)save;
#endif
    g_current = to;
    dsi_ctx_switch(&f->sp, to != nullptr ? to->sp : main_sp);
    // Resumed (never reached by a finished fiber).
#ifdef DSI_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

void fiber_entry() {
    Fiber* f = g_current;
#ifdef DSI_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    (*body)();
    set_state(*f, kDone);
    --live;
    ++exited;
    if (arrived > 0) fatal("thread returned while %d threads wait at __syncthreads (%s:%d)", arrived, bar_file, bar_line);
    Warp& w = warps[f->warp];
    if (w.pending && (w.mask >> f->lane & 1u))
        fatal("lane %d returned while lanes 0x%08x wait for it in a shuffle with mask 0x%08x", f->lane, w.pending, w.mask);
    switch_from(f);
    fatal("a finished fiber was resumed");
}

void resume(Fiber* f) {  // scheduler -> fiber; returns when no fiber is ready any more
    g_current = f;
#ifdef DSI_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
    dsi_ctx_switch(&main_sp, f->sp);
#ifdef DSI_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    g_current = nullptr;
}

void wait_until_ready(Fiber* f) {
    while (f->state != kReady) switch_from(f);
}

void prepare_stack(Fiber& f) {
    if (f.stack == nullptr) {
        void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) fatal("mmap of a fiber stack failed");
        mprotect(mem, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
        f.stack = static_cast<char*>(mem) + kGuardBytes;
    }
#ifdef DSI_ASAN
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // frames of the previous block's fiber are gone
#endif
    // Initial frame for dsi_ctx_switch: [mxcsr/fpucw][r15 r14 r13 r12 rbx rbp][ret -> fiber_entry][pad].
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                           // fake return address slot: entry sees rsp % 16 == 8
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int i = 0; i < 6; ++i) *--sp = 0;               // rbp rbx r12 r13 r14 r15
    sp -= 2;
    const uint32_t mxcsr = 0x1F80;                       // round to nearest, no flush-to-zero (nvcc's default)
    const uint16_t fpucw = 0x037F;
    memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
    memcpy(reinterpret_cast<char*>(sp) + 12, &fpucw, 2);
    f.sp = sp;
}

void reset_shared() {
    for (auto& kv : shared_arrays) free(kv.second.first);
    shared_arrays.clear();
    free(dyn_shared);
    dyn_shared = nullptr;
    static_bytes = 0;
}

void run_block(const dim3& block) {
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (fibers.size() < static_cast<size_t>(n)) fibers.resize(n);
    nthreads = n;
    warps.assign((n + 31) / 32, Warp{});
    for (size_t w = 0; w < warps.size(); ++w) warps[w].size = std::min(32, n - static_cast<int>(w) * 32);
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
        set_state(f, kReady);
        f.fake_stack = nullptr;
        prepare_stack(f);
    }
    live = n;
    arrived = exited = 0;
    reset_shared();
    dyn_shared = malloc(dyn_bytes);  // exact size: ASan flags any access past the dynamic allocation
    if (dyn_shared == nullptr) dyn_shared = malloc(1);
    memset(dyn_shared, 0xFF, dyn_bytes);
    memset(ready_bits, 0, sizeof ready_bits);
    for (int i = 0; i < n; ++i) set_state(fibers[i], kReady);
    while (live > 0) {
        const int i = pick_ready();
        if (i < 0) {
            std::string states;
            for (int k = 0; k < nthreads; ++k)
                if (const Fiber& f = fibers[k]; f.state == kBarrier || f.state == kShuffle)
                    states += " t" + std::to_string(f.linear) + (f.state == kBarrier ? ":barrier" : ":shuffle");
            fatal("deadlock: no thread can proceed (%d live):%s", live, states.substr(0, 400).c_str());
        }
        resume(&fibers[i]);
    }
}

bool valid_config(const dim3& grid, const dim3& block, size_t shmem) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0) return false;
    if (threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) return false;
    return shmem <= kSharedLimit;
}

}  // namespace

Fiber* g_current = nullptr;
uint3 g_block_idx{};
dim3 g_block_dim;
dim3 g_grid_dim;

const uint3& thread_idx() {
    if (g_current == nullptr) fatal("threadIdx used outside a kernel");
    return g_current->tid;
}

void fatal(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (g_current != nullptr)
        fprintf(stderr, "DSI_HARNESS_ERROR: %s [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]\n", msg, kernel_name,
                g_block_idx.x, g_block_idx.y, g_block_idx.z, g_current->tid.x, g_current->tid.y, g_current->tid.z);
    else
        fprintf(stderr, "DSI_HARNESS_ERROR: %s [kernel %s]\n", msg, kernel_name);
    fflush(stderr);
    abort();
}

void syncthreads(const char* file, int line) {
    Fiber* f = g_current;
    if (exited > 0) fatal("__syncthreads at %s:%d after %d threads of the block returned", file, line, exited);
    if (arrived == 0) {
        bar_file = file;
        bar_line = line;
    } else if (bar_line != line || strcmp(bar_file, file) != 0) {
        fatal("threads wait at different __syncthreads: %s:%d and %s:%d", bar_file, bar_line, file, line);
    }
    set_state(*f, kBarrier);
    if (++arrived == live) {
        for (int k = 0; k < nthreads; ++k)
            if (fibers[k].state == kBarrier) set_state(fibers[k], kReady);
        arrived = 0;
    }
    wait_until_ready(f);
}

uint32_t shfl(unsigned mask, uint32_t bits, int arg, int width, ShflMode mode, const char* file, int line) {
    Fiber* f = g_current;
    Warp& w = warps[f->warp];
    const char* what = mode == kShflXor ? "__shfl_xor_sync" : "__shfl_sync";
    if (!(mask >> f->lane & 1u)) fatal("%s at %s:%d: lane %d is not in its mask 0x%08x", what, file, line, f->lane, mask);
    if (w.size < 32 && (mask >> w.size) != 0)
        fatal("%s at %s:%d: mask 0x%08x names lanes >= %d that do not exist", what, file, line, mask, w.size);
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) fatal("%s at %s:%d: bad width %d", what, file, line, width);
    if (w.pending == 0) {
        w.mask = mask;
    } else if (w.mask != mask) {
        fatal("%s at %s:%d: lane %d uses mask 0x%08x, others 0x%08x", what, file, line, f->lane, mask, w.mask);
    }
    for (int l = 0; l < w.size; ++l)
        if ((mask >> l & 1u) && fibers[f->warp * 32 + l].state == kDone)
            fatal("%s at %s:%d: lane %d in mask 0x%08x has returned", what, file, line, l, mask);
    f->shfl_bits = bits;
    f->shfl_arg = arg;
    f->shfl_width = width;
    f->shfl_mode = mode;
    set_state(*f, kShuffle);
    w.pending |= 1u << f->lane;
    if (w.pending == mask) {  // every lane of the mask has arrived: exchange, then release them
        for (int l = 0; l < w.size; ++l) {
            if (!(mask >> l & 1u)) continue;
            Fiber& dst = fibers[f->warp * 32 + l];
            const int seg = l & ~(dst.shfl_width - 1);
            int src = dst.shfl_mode == kShflXor ? (l ^ dst.shfl_arg) : seg + (dst.shfl_arg & (dst.shfl_width - 1));
            if (dst.shfl_mode == kShflXor && src >= seg + dst.shfl_width) src = l;  // later group: own value
            if (src < 0 || src >= 32 || !(mask >> src & 1u))
                fatal("%s at %s:%d: lane %d reads lane %d outside the mask 0x%08x (undefined value)", what, file,
                      line, l, src, mask);
            dst.shfl_result = fibers[f->warp * 32 + src].shfl_bits;
        }
        for (int l = 0; l < w.size; ++l)
            if (mask >> l & 1u) set_state(fibers[f->warp * 32 + l], kReady);
        w.pending = 0;
    }
    wait_until_ready(f);
    return f->shfl_result;
}

void* shared_array(const void* site, size_t bytes, const char* name) {
    auto it = shared_arrays.find(site);
    if (it != shared_arrays.end()) {
        if (it->second.second != bytes) fatal("__shared__ %s declared with different sizes", name);
        return it->second.first;
    }
    static_bytes += bytes;
    if (static_bytes + dyn_bytes > kSharedLimit)
        fatal("block uses %zu bytes of shared memory (> %zu) at __shared__ %s", static_bytes + dyn_bytes,
              kSharedLimit, name);
    void* p = nullptr;
    if (posix_memalign(&p, 16, bytes == 0 ? 1 : bytes) != 0) fatal("out of memory");
    memset(p, 0xFF, bytes);  // NaN in every float type: reading before writing shows up
    shared_arrays[site] = {p, bytes};
    return p;
}

void* dynamic_shared() { return dyn_shared; }

void set_schedule(const std::string& name, unsigned seed) {
    if (name != "lowest" && name != "highest" && name != "random") fatal("unknown schedule %s", name.c_str());
    schedule = name;
    rng.seed(seed);
}

std::map<std::string, long> launch_counts;

void launch(const char* kernel, const char* param_types, dim3 grid, dim3 block, size_t shmem,
            const std::function<void()>& fn) {
    kernel_name = kernel;
    if (main_size == 0) {  // the launching thread's stack, for the sanitizer's fiber annotations
        pthread_attr_t attr;
        void* addr = nullptr;
        pthread_getattr_np(pthread_self(), &attr);
        pthread_attr_getstack(&attr, &addr, &main_size);
        pthread_attr_destroy(&attr);
        main_bottom = addr;
    }
    if (!valid_config(grid, block, shmem)) {
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    // The kernel's element type: the first parameter type in "[with P = {...}]".
    std::string types(param_types), first;
    const size_t at = types.find("P = {");
    if (at != std::string::npos) first = types.substr(at + 5, types.find_first_of(",}", at + 5) - at - 5);
    ++launch_counts[std::string(kernel) + " | " + first];
    body = &fn;
    g_grid_dim = grid;
    g_block_dim = block;
    dyn_bytes = shmem;
    std::vector<uint3> order;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
    if (schedule == "highest") std::reverse(order.begin(), order.end());
    if (schedule == "random") std::shuffle(order.begin(), order.end(), rng);
    for (const uint3& b : order) {
        g_block_idx = b;
        run_block(block);
    }
    reset_shared();
    body = nullptr;
}

cudaError_t get_last_error() {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

}  // namespace dsi_cpu
