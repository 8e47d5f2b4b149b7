// CPU emulator of segmented_lora.cu, for the tests (no GPU needed).
//
// The kernel source itself is compiled with the host compiler (-DLORA_EMULATE). Blocks run one
// after another; the threads of a block run as fibers (ucontext) on one OS thread, switching
// only at barriers: __syncthreads() waits for every thread of the block, the warp collectives
// (__shfl_up_sync and the m16n8k16 matrix step) for the 32 lanes of the warp. A barrier that
// cannot complete (divergent __syncthreads, a warp collective with lanes elsewhere or exited)
// is reported as an error instead of hanging. The matrix step rebuilds A (16x16) and B (16x8)
// from the 32 lanes' registers with the PTX ISA fragment layout of mma.m16n8k16 (.f16/.bf16),
// so the kernel's own fragment loads are checked against that layout.
//
// __shared__ variables become function-local statics: one instance per kernel, reused by the
// blocks in turn, as shared memory is. Each entry point is exported as a function pointer
// (emu_entry) taking (grid_x, grid_y, block_x, kernel arguments...) and returning 0, or 1 after
// an emulation error (emu_error has the message).

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

// ---- CUDA built-ins used by the source -------------------------------------------------------

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3_emu {
    unsigned x = 0, y = 0, z = 0;
};
static dim3_emu threadIdx, blockIdx, blockDim;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

using std::max;
using std::min;

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

static inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

static inline float __bfloat162float(__nv_bfloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = float_to_bits(f);
    if (std::isnan(f)) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest, ties to even
    return __nv_bfloat16{uint16_t(u >> 16)};
}

static inline float __half2float(__half v) {
    const uint32_t s = (v.bits >> 15) & 1, e = (v.bits >> 10) & 0x1f, m = v.bits & 0x3ff;
    float mag;
    if (e == 0) mag = std::ldexp(float(m), -24);
    else if (e == 31) mag = m ? NAN : INFINITY;
    else mag = std::ldexp(float(m | 0x400), int(e) - 25);
    return s ? -mag : mag;
}
static inline __half __float2half_rn(float f) {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    float a = std::fabs(f);
    if (std::isnan(f)) return __half{uint16_t(sign | 0x7e00)};
    if (a >= 65520.f) return __half{uint16_t(sign | 0x7c00)};  // rounds to infinity
    if (a < std::ldexp(1.f, -14)) {                              // subnormal: multiples of 2^-24
        const float q = std::nearbyint(std::ldexp(a, 24));       // ties to even (default mode)
        return __half{uint16_t(sign | uint16_t(q))};
    }
    int e;
    std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
    const float q = std::nearbyint(std::ldexp(a, 11 - e));  // 11 significant bits
    uint32_t mant = uint32_t(q);
    int exp = e - 1;
    if (mant == 2048) {
        mant = 1024;
        ++exp;
    }
    if (exp > 15) return __half{uint16_t(sign | 0x7c00)};
    return __half{uint16_t(sign | uint16_t((exp + 15) << 10) | uint16_t(mant & 0x3ff))};
}

static inline float atomicAdd(float* p, float v) {  // fibers switch only at barriers
    const float old = *p;
    *p = old + v;
    return old;
}

namespace emu {

enum State { READY, WAIT_BLOCK, WAIT_WARP, DONE };
constexpr size_t STACK = 64 * 1024;

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;  // not zero-filled: pages are touched only as used
    State st = DONE;
};

static std::vector<Fiber> fibers;
static ucontext_t sched_ctx;
static int current = 0;
static std::function<void()> body;
static std::string error;
static unsigned exch[1024][6];
static int exch_i[1024];

static void wait(State s) {
    fibers[current].st = s;
    swapcontext(&fibers[current].ctx, &sched_ctx);
}

static void trampoline() {
    body();
    fibers[current].st = DONE;
}

// Runs one block of n threads; false (and `error`) when a barrier cannot complete.
static bool run_block(int n) {
    if ((int)fibers.size() < n) fibers.resize(n);
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        if (!f.stack) f.stack.reset(new char[STACK]);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &sched_ctx;
        makecontext(&f.ctx, trampoline, 0);
        f.st = READY;
    }
    for (;;) {
        for (int i = 0; i < n; ++i) {
            if (fibers[i].st != READY) continue;
            current = i;
            threadIdx.x = unsigned(i);
            swapcontext(&sched_ctx, &fibers[i].ctx);
        }
        int live = 0, at_block = 0, done = 0;
        for (int i = 0; i < n; ++i) {
            live += fibers[i].st != DONE;
            at_block += fibers[i].st == WAIT_BLOCK;
            done += fibers[i].st == DONE;
        }
        if (live == 0) return true;
        bool released = false;
        for (int w = 0; w * 32 < n; ++w) {
            int waiting = 0, lanes = std::min(32, n - w * 32);
            for (int l = 0; l < lanes; ++l) waiting += fibers[w * 32 + l].st == WAIT_WARP;
            if (waiting == 0) continue;
            if (waiting != 32) {
                error = "warp collective in block (" + std::to_string(blockIdx.x) + "," +
                        std::to_string(blockIdx.y) + ") warp " + std::to_string(w) + ": " +
                        std::to_string(waiting) + " of 32 lanes arrived";
                continue;
            }
            for (int l = 0; l < 32; ++l) fibers[w * 32 + l].st = READY;
            released = true;
        }
        if (released) {
            error.clear();
            continue;
        }
        if (at_block == live && done == 0) {
            for (int i = 0; i < n; ++i) fibers[i].st = READY;
            continue;
        }
        if (error.empty())
            error = "__syncthreads in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                    "): " + std::to_string(at_block) + " waiting, " + std::to_string(done) + " exited, " +
                    std::to_string(live - at_block) + " elsewhere";
        return false;
    }
}

static void warp_sync() { wait(WAIT_WARP); }

}  // namespace emu

static void __syncthreads() { emu::wait(emu::WAIT_BLOCK); }

static int __shfl_up_sync(unsigned, int v, int d) {
    const int t = int(threadIdx.x), lane = t & 31, base = t - lane;
    emu::exch_i[t] = v;
    emu::warp_sync();
    const int r = lane >= d ? emu::exch_i[base + lane - d] : v;
    emu::warp_sync();
    return r;
}

static float unpack(unsigned reg, int hi, bool bf16) {
    const uint16_t bits = uint16_t(hi ? reg >> 16 : reg & 0xffff);  // element 0 in the low half
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// D = A·B + C for the warp, A 16x16 (row), B 16x8 (col), fp32 accumulators, PTX layout:
// g = lane/4, q = lane%4; a_i: row g (i in 0,1,4,5) or g+8, col 2q+(i&1) (+8 for i >= 4);
// b_i: row 2q+(i&1) (+8 for i >= 2), col g; c_i: row g (i < 2) or g+8, col 2q+(i&1).
static void lora_emu_mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool bf16) {
    const int t = int(threadIdx.x), lane = t & 31, base = t - lane;
    for (int k = 0; k < 4; ++k) emu::exch[t][k] = a[k];
    emu::exch[t][4] = b[0];
    emu::exch[t][5] = b[1];
    emu::warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, q = l & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const int col = 2 * q + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = unpack(emu::exch[base + l][i / 2], i & 1, bf16);
        }
        for (int i = 0; i < 4; ++i) {
            const int row = 2 * q + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][g] = unpack(emu::exch[base + l][4 + i / 2], i & 1, bf16);
        }
    }
    emu::warp_sync();
    const int g = lane >> 2, q = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = e < 2 ? g : g + 8, col = 2 * q + (e & 1);
        float s = 0.f;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[e] += s;
    }
}

#include "segmented_lora.cu"

// ---- exports ----------------------------------------------------------------------------------

template <typename F>
struct Export;

template <typename... Args>
struct Export<void(Args...)> {
    template <void (*K)(Args...)>
    static int run(int gx, int gy, int bx, Args... args) {
        blockDim.x = unsigned(bx);
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                blockIdx.x = unsigned(x);
                blockIdx.y = unsigned(y);
                emu::body = [&] { K(args...); };
                if (!emu::run_block(bx)) return 1;
            }
        return 0;
    }
};

#define EMU_ENTRY(NAME) \
    if (name == #NAME) return reinterpret_cast<void*>(&Export<decltype(NAME)>::run<&NAME>);

extern "C" void* emu_entry(const char* cname) {
    const std::string name(cname);
    EMU_ENTRY(lora_tile_map)
    EMU_ENTRY(lora_shrink_f32_simt)
    EMU_ENTRY(lora_expand_f32_simt)
    EMU_ENTRY(lora_shrink_f16_simt)
    EMU_ENTRY(lora_expand_f16_simt)
    EMU_ENTRY(lora_shrink_f16_mma)
    EMU_ENTRY(lora_expand_f16_mma)
    EMU_ENTRY(lora_shrink_bf16_simt)
    EMU_ENTRY(lora_expand_bf16_simt)
    EMU_ENTRY(lora_shrink_bf16_mma)
    EMU_ENTRY(lora_expand_bf16_mma)
    return nullptr;
}

extern "C" const char* emu_error() { return emu::error.c_str(); }

// out[i] = float(T(in[i])) with T = __half (kind 0) or __nv_bfloat16 (kind 1): checks the
// emulator's own conversions against torch's.
extern "C" void emu_round(const float* in, float* out, int n, int kind) {
    for (int i = 0; i < n; ++i)
        out[i] = kind ? __bfloat162float(__float2bfloat16_rn(in[i])) : __half2float(__float2half_rn(in[i]));
}
