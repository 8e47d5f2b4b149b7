// Segmented LoRA kernels of chunkwise: one launch applies every adapter at every rank.
//
// What they compute. A batch of N planned tokens is cut into S kernel segments (the
// scheduler's plan: seg_offsets int32 [S+1], seg_rank int32 [S], seg_scale float32 [S],
// seg_adapter int32 [S]). Token t of segment s, with adapter a = seg_adapter[s], rank
// r = min(seg_rank[s], R_a) and scale c = seg_scale[s], gets
//
//     y[row(t), :] += c · B'_a[:, :r] · (g_t ⊙ (A'_a[:r, :] · x[row(t), :]))
//     g_t[j] = gate_lo[t] if j < token_lo[t] else gate_hi[t]                (j < r)
//
// A'_a [R_a, in] and B'_a [out, R_a] are one adapter's stored max-rank factors (row-major,
// contiguous); only their rank prefix is read: no padding to a maximal rank, no launch per rank.
// row(t) = rows[t] when a row map is given (plan tokens inside a padded forward), else t.
// Segments with r == 0, with an adapter id outside [0, n_adapters) or an adapter that does not
// adapt this layer (R_a == 0) leave y untouched and cost no block beyond an early exit.
//
// Three launches, all on one stream, with no host synchronisation and grid sizes that depend
// only on N, S, in and out (so a decode step can be captured in a CUDA graph and replayed with
// new metadata written into the same buffers):
//
//   lora_tile_map  <<<1, 1024>>>                 tile_start[S+1] = exclusive prefix sum over
//                                                segments of ceil(len_s / TILE_M) (0 for rank 0)
//   lora_shrink_*  <<<(N/TILE_M + S, ksplit), 128>>>   h[t, j] (+)= c·g_t[j]·(A'_a[j] · x[row(t)])
//   lora_expand_*  <<<(N/TILE_M + S, ceil(out/64)), 128>>>   y[row(t), o] += Σ_j h[t, j]·B'_a[o, j]
//
// A block of the last two owns TILE_M consecutive tokens of ONE segment (tile i of the grid is
// found by binary search in tile_start; blocks past the last tile exit at once), so it reads one
// adapter's rank prefix and every y element is written by exactly one block (no atomics on y).
//
// Dtypes: x, y, A', B' share T = float (suffix f32), __half (f16) or __nv_bfloat16 (bf16).
// Products accumulate in float32; h is float32 [N, ldh] (ldh >= max R_a); y is read, added to in
// float32 and rounded to T once. The f16/bf16 kernels use the tensor cores (mma.sync m16n8k16,
// sm_80+) when built with USE_MMA ("_mma" suffix) and CUDA-core FMAs otherwise ("_simt"); on an
// architecture below sm_80 the "_mma" kernels compile to the CUDA-core path. In the "_mma" expand
// h is rounded to T before the tensor-core product (as a torch bf16/fp16 LoRA does).
//
// Shrink split over the input dimension (ksplit > 1, gridDim.y): each split adds its partial
// product into h with atomicAdd, so h must be zeroed first; with ksplit == 1 the kernel stores,
// and every h[t, j] with j < r of a token in a positive-rank segment is written.
//
// Vectorised loads (vec != 0): x, A' as 16-byte vectors; the host sets vec only when in, the
// row stride of x and every pointer are multiples of 16 bytes.

// The launch geometry the host also computes grids from: chunkwise.kernels.KERNEL_CONSTANTS is
// its one source and passes each as -DLORA_<NAME> (compile_options / kernel_defines).
#if !defined(LORA_TILE_M) || !defined(LORA_THREADS) || !defined(LORA_SHRINK_KC) || \
    !defined(LORA_EXPAND_TN) || !defined(LORA_MAP_THREADS)
#error "compile with chunkwise.kernels.compile_options(): it defines LORA_TILE_M, LORA_THREADS, ..."
#endif

#if defined(LORA_EMULATE)
// CPU emulation (tests/oracles/kernel_emu): the harness defines the CUDA built-ins and types used here
// and lora_emu_mma, a warp-collective m16n8k16 that follows the PTX ISA fragment layout.
#define LORA_HAS_MMA 1
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LORA_HAS_MMA 1
#else
#define LORA_HAS_MMA 0
#endif
#endif

namespace lora {

constexpr int TILE_M = LORA_TILE_M;            // tokens per block (rows of one tile)
constexpr int THREADS = LORA_THREADS;          // threads per block of shrink and expand
constexpr int WARPS = THREADS / 32;
constexpr int SHRINK_KC = LORA_SHRINK_KC;      // input features per shared-memory chunk
constexpr int SHRINK_RN = 64;                  // rank directions per pass (more: another pass over x)
constexpr int EXPAND_TN = LORA_EXPAND_TN;      // output features per block
constexpr int EXPAND_KR = 32;                  // rank directions per shared-memory chunk
constexpr int MAP_THREADS = LORA_MAP_THREADS;  // threads of lora_tile_map

static_assert(TILE_M == 16 || TILE_M == 32 || TILE_M == 64, "LORA_TILE_M must be 16, 32 or 64");
static_assert(THREADS == 128, "the tile shapes below assume 128 threads per block");
static_assert(SHRINK_KC % 16 == 0 && EXPAND_TN % 16 == 0, "chunks of whole 16-byte vectors");
static_assert(MAP_THREADS >= 32 && MAP_THREADS <= 1024, "lora_tile_map runs one block");

// ---- element types -----------------------------------------------------------------------

template <typename T>
struct Num;

template <>
struct Num<float> {
    static __device__ __forceinline__ float to_f(float v) { return v; }
    static __device__ __forceinline__ float from_f(float v) { return v; }
};

template <>
struct Num<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Shared-memory type of h in the expand: T for the tensor cores, float on CUDA cores.
template <typename T, bool USE_MMA>
struct HStore {
    typedef float type;
};
template <typename T>
struct HStore<T, true> {
    typedef T type;
};

// ---- tensor-core step: D[16x8] += A[16x16] · B[16x8], fp32 accumulators -----------------

// One m16n8k16 step for element type PTX ("f16" / "bf16"): the PTX instruction, the CPU
// emulator's warp-collective version of it, or nothing where tensor cores are missing.
#if defined(LORA_EMULATE)
#define LORA_MMA_STEP(PTX, BF16) lora_emu_mma(c, a, b, BF16);
#elif LORA_HAS_MMA
#define LORA_MMA_STEP(PTX, BF16)                                                               \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 "                  \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                     \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
#define LORA_MMA_STEP(PTX, BF16)
#endif

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        LORA_MMA_STEP("f16", false)
    }
};

template <>
struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        LORA_MMA_STEP("bf16", true)
    }
};

template <typename T>
__device__ __forceinline__ unsigned ld_pair(const T* p) {
    return *reinterpret_cast<const unsigned*>(p);  // two consecutive 16-bit elements
}

// ---- one block's product over a K chunk in shared memory ---------------------------------
//
// C[TILE_M][N] += L[TILE_M][kc] · R[N][kc]ᵀ, with L (ld ldl) and R (ld ldr) in shared memory,
// kc a multiple of 16 (the caller zero-fills the chunk up to its width). Only rows < m and
// columns < n are meaningful; store() writes at least those into C (ld ldc, shared memory).

template <typename SL, typename SR, int N, bool USE_MMA>
struct TileGemm;

// CUDA cores: thread (ty = tid / 16, tx = tid % 16) owns rows ty*RPT + i and columns tx + 16*j.
template <typename SL, typename SR, int N>
struct TileGemm<SL, SR, N, false> {
    static constexpr int RPT = TILE_M / 8;
    static constexpr int CPT = N / 16;
    static_assert(THREADS == 128 && N % 16 == 0, "CUDA-core tile shape");
    float acc[RPT * CPT];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < RPT * CPT; ++i) acc[i] = 0.f;
    }

    __device__ __forceinline__ void run(const SL* L, int ldl, const SR* R, int ldr, int kc, int m, int n) {
        const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
        if (ty * RPT >= m || tx >= n) return;
        for (int k = 0; k < kc; ++k) {
            float lv[RPT], rv[CPT];
#pragma unroll
            for (int i = 0; i < RPT; ++i) lv[i] = Num<SL>::to_f(L[(ty * RPT + i) * ldl + k]);
#pragma unroll
            for (int j = 0; j < CPT; ++j) rv[j] = Num<SR>::to_f(R[(tx + 16 * j) * ldr + k]);
#pragma unroll
            for (int i = 0; i < RPT; ++i)
#pragma unroll
                for (int j = 0; j < CPT; ++j) acc[i * CPT + j] = fmaf(lv[i], rv[j], acc[i * CPT + j]);
        }
    }

    __device__ __forceinline__ void store(float* C, int ldc, int m, int n) const {
        const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
        if (ty * RPT >= m || tx >= n) return;
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
            for (int j = 0; j < CPT; ++j) C[(ty * RPT + i) * ldc + tx + 16 * j] = acc[i * CPT + j];
    }
};

// Tensor cores (mma.sync m16n8k16, row.col): warp w owns the 16-row tile w % MT and the NPW
// 8-column tiles starting at (w / MT) * NPW. Fragment layout (PTX ISA, m16n8k16 .f16/.bf16):
// g = lane / 4, q = lane % 4; A regs {A[g][2q..], A[g+8][2q..], A[g][2q+8..], A[g+8][2q+8..]},
// B regs {B[2q..][g], B[2q+8..][g]} (B[k][n] = R[n][k], so pairs are contiguous in R),
// C {C[g][2q], C[g][2q+1], C[g+8][2q], C[g+8][2q+1]}.
template <typename S, int N>
struct TileGemm<S, S, N, true> {
    static constexpr int MT = TILE_M / 16;
    static constexpr int WPM = WARPS / MT;  // warps per 16-row tile
    static constexpr int NT = N / 8;
    static constexpr int NPW = NT / WPM;    // 8-column tiles per warp
    static_assert(WARPS % MT == 0 && NT % WPM == 0 && NPW >= 1, "tensor-core tile shape");
    float acc[NPW][4];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int j = 0; j < NPW; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    }

    __device__ __forceinline__ void run(const S* L, int ldl, const S* R, int ldr, int kc, int m, int n) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int mt = warp % MT, nt0 = (warp / MT) * NPW;
        if (mt * 16 >= m || nt0 * 8 >= n) return;  // uniform across the warp
        const int g = lane >> 2, q = lane & 3;
        const S* l0 = L + (mt * 16 + g) * ldl + 2 * q;
        const S* l1 = l0 + 8 * ldl;
        for (int k = 0; k < kc; k += 16) {
            unsigned a[4];
            a[0] = ld_pair(l0 + k);
            a[1] = ld_pair(l1 + k);
            a[2] = ld_pair(l0 + k + 8);
            a[3] = ld_pair(l1 + k + 8);
#pragma unroll
            for (int j = 0; j < NPW; ++j) {
                const int n0 = (nt0 + j) * 8;
                if (n0 < n) {  // uniform across the warp
                    const S* r = R + (n0 + g) * ldr + k + 2 * q;
                    unsigned b[2];
                    b[0] = ld_pair(r);
                    b[1] = ld_pair(r + 8);
                    Mma<S>::run(acc[j], a, b);
                }
            }
        }
    }

    __device__ __forceinline__ void store(float* C, int ldc, int m, int n) const {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int mt = warp % MT, nt0 = (warp / MT) * NPW;
        if (mt * 16 >= m || nt0 * 8 >= n) return;
        const int g = lane >> 2, q = lane & 3;
        const int r0 = mt * 16 + g;
#pragma unroll
        for (int j = 0; j < NPW; ++j) {
            const int c0 = (nt0 + j) * 8 + 2 * q;
            C[r0 * ldc + c0] = acc[j][0];
            C[r0 * ldc + c0 + 1] = acc[j][1];
            C[(r0 + 8) * ldc + c0] = acc[j][2];
            C[(r0 + 8) * ldc + c0 + 1] = acc[j][3];
        }
    }
};

// ---- shared-memory loads -------------------------------------------------------------------

// dst[i][c] = src[row_offset(i) + c] for i < ROWS, c < WIDTH, zero where row_offset(i) < 0 or
// c >= kc. With vec, 16-byte vectors (kc, the offsets and src must then be multiples of 16 bytes).
template <typename T, int ROWS, int WIDTH, typename RowOffset>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, RowOffset row_offset, int kc, int vec) {
    constexpr int V = 16 / sizeof(T);
    if (vec) {
        constexpr int VPR = WIDTH / V;
        for (int idx = threadIdx.x; idx < ROWS * VPR; idx += THREADS) {
            const int i = idx / VPR, c = (idx % VPR) * V;
            const long long off = row_offset(i);
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (off >= 0 && c < kc) v = *reinterpret_cast<const uint4*>(src + off + c);
            *reinterpret_cast<uint4*>(dst + i * ld + c) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * WIDTH; idx += THREADS) {
            const int i = idx / WIDTH, c = idx % WIDTH;
            const long long off = row_offset(i);
            dst[i * ld + c] = (off >= 0 && c < kc) ? src[off + c] : Num<T>::from_f(0.f);
        }
    }
}

// ---- which tokens a block owns -------------------------------------------------------------

struct Tile {
    int seg;      // segment index
    int t0;       // first token (plan order)
    int m;        // tokens in this tile (1..TILE_M)
    int adapter;  // adapter id, in [0, n_adapters)
    int rank;     // min(seg_rank, R_adapter) > 0
};

// Tile `tile` of the map; false when it is past the last tile or has nothing to do.
__device__ __forceinline__ bool find_tile(int tile, const int* __restrict__ tile_start, int n_seg,
                                          const int* __restrict__ seg_offsets, const int* __restrict__ seg_rank,
                                          const int* __restrict__ seg_adapter, const int* __restrict__ adapter_rank,
                                          int n_adapters, int n_tokens, Tile& out) {
    if (n_seg <= 0 || tile >= tile_start[n_seg]) return false;
    // the largest s with tile_start[s] <= tile: that segment has tiles, and `tile` is one of them
    int lo = 0, hi = n_seg - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    const int s = lo;
    const int begin = seg_offsets[s];
    const int end = min(seg_offsets[s + 1], n_tokens);
    const int t0 = begin + (tile - tile_start[s]) * TILE_M;
    if (begin < 0 || t0 >= end) return false;
    const int a = seg_adapter[s];
    if (a < 0 || a >= n_adapters) return false;
    const int r = min(seg_rank[s], adapter_rank[a]);
    if (r <= 0) return false;
    out.seg = s;
    out.t0 = t0;
    out.m = min(TILE_M, end - t0);
    out.adapter = a;
    out.rank = r;
    return true;
}

// ---- shrink --------------------------------------------------------------------------------

template <typename T, bool USE_MMA>
__device__ __forceinline__ void shrink_body(
    const T* __restrict__ x, long long ldx, const int* __restrict__ rows, int n_tokens, int in_features,
    const unsigned long long* __restrict__ a_ptrs, const int* __restrict__ adapter_rank, int n_adapters,
    const int* __restrict__ seg_offsets, const int* __restrict__ seg_rank, const float* __restrict__ seg_scale,
    const int* __restrict__ seg_adapter, int n_seg, const int* __restrict__ tile_start,
    const int* __restrict__ token_lo, const float* __restrict__ gate_lo, const float* __restrict__ gate_hi,
    float* __restrict__ h, int ldh, int k_split, int accumulate, int vec) {
    typedef TileGemm<T, T, SHRINK_RN, USE_MMA> Gemm;
    constexpr int LDS = SHRINK_KC + 16 / sizeof(T);  // one 16-byte pad per row: no bank conflicts
    constexpr int LDC = SHRINK_RN + 4;
    __shared__ __align__(16) T xs[TILE_M * LDS];
    __shared__ __align__(16) T as[SHRINK_RN * LDS];
    __shared__ __align__(16) float cs[TILE_M * LDC];
    __shared__ long long xoff[TILE_M];

    Tile tl;
    if (!find_tile(blockIdx.x, tile_start, n_seg, seg_offsets, seg_rank, seg_adapter, adapter_rank, n_adapters,
                   n_tokens, tl))
        return;
    const int k_begin = blockIdx.y * k_split;
    const int k_end = min(in_features, k_begin + k_split);
    if (k_begin >= k_end) return;
    const T* A = reinterpret_cast<const T*>(a_ptrs[tl.adapter]);
    if (threadIdx.x < TILE_M) {
        const int i = threadIdx.x;
        xoff[i] = i < tl.m ? (long long)(rows ? rows[tl.t0 + i] : tl.t0 + i) * ldx : -1LL;
    }
    __syncthreads();
    const float scale = seg_scale[tl.seg];

    for (int r0 = 0; r0 < tl.rank; r0 += SHRINK_RN) {
        const int rn = min(SHRINK_RN, tl.rank - r0);
        Gemm gemm;
        gemm.zero();
        for (int k0 = k_begin; k0 < k_end; k0 += SHRINK_KC) {
            const int kc = min(SHRINK_KC, k_end - k0);
            load_tile<T, TILE_M, SHRINK_KC>(xs, LDS, x + k0, [&](int i) { return xoff[i]; }, kc, vec);
            load_tile<T, SHRINK_RN, SHRINK_KC>(
                as, LDS, A + k0, [&](int j) { return j < rn ? (long long)(r0 + j) * in_features : -1LL; }, kc,
                vec);
            __syncthreads();
            gemm.run(xs, LDS, as, LDS, (kc + 15) & ~15, tl.m, rn);
            __syncthreads();
        }
        gemm.store(cs, LDC, tl.m, rn);
        __syncthreads();
        for (int idx = threadIdx.x; idx < TILE_M * SHRINK_RN; idx += THREADS) {
            const int i = idx / SHRINK_RN, j = idx % SHRINK_RN;
            if (i < tl.m && j < rn) {
                const int t = tl.t0 + i, jj = r0 + j;
                const float g = jj < token_lo[t] ? gate_lo[t] : gate_hi[t];
                const float v = scale * g * cs[i * LDC + j];
                float* dst = h + (long long)t * ldh + jj;
                if (accumulate) atomicAdd(dst, v); else *dst = v;
            }
        }
        __syncthreads();
    }
}

// ---- expand --------------------------------------------------------------------------------

template <typename T, bool USE_MMA>
__device__ __forceinline__ void expand_body(
    T* __restrict__ y, long long ldy, const int* __restrict__ rows, int n_tokens, int out_features,
    const unsigned long long* __restrict__ b_ptrs, const int* __restrict__ adapter_rank, int n_adapters,
    const int* __restrict__ seg_offsets, const int* __restrict__ seg_rank, const int* __restrict__ seg_adapter,
    int n_seg, const int* __restrict__ tile_start, const float* __restrict__ h, int ldh) {
    typedef typename HStore<T, USE_MMA>::type HS;
    typedef TileGemm<HS, T, EXPAND_TN, USE_MMA> Gemm;
    constexpr int LDH = EXPAND_KR + 16 / sizeof(HS);
    constexpr int LDB = EXPAND_KR + 16 / sizeof(T);
    constexpr int LDC = EXPAND_TN + 4;
    __shared__ __align__(16) HS hs[TILE_M * LDH];
    __shared__ __align__(16) T bs[EXPAND_TN * LDB];
    __shared__ __align__(16) float cs[TILE_M * LDC];
    __shared__ long long yoff[TILE_M];

    Tile tl;
    if (!find_tile(blockIdx.x, tile_start, n_seg, seg_offsets, seg_rank, seg_adapter, adapter_rank, n_adapters,
                   n_tokens, tl))
        return;
    const int o0 = blockIdx.y * EXPAND_TN;
    if (o0 >= out_features) return;
    const int n_valid = min(EXPAND_TN, out_features - o0);
    const int ldb = adapter_rank[tl.adapter];  // B'_a is [out, R_a]
    const T* B = reinterpret_cast<const T*>(b_ptrs[tl.adapter]);
    if (threadIdx.x < TILE_M) {
        const int i = threadIdx.x;
        yoff[i] = i < tl.m ? (long long)(rows ? rows[tl.t0 + i] : tl.t0 + i) * ldy : -1LL;
    }

    Gemm gemm;
    gemm.zero();
    for (int k0 = 0; k0 < tl.rank; k0 += EXPAND_KR) {
        const int kr = min(EXPAND_KR, tl.rank - k0);
        for (int idx = threadIdx.x; idx < TILE_M * EXPAND_KR; idx += THREADS) {
            const int i = idx / EXPAND_KR, j = idx % EXPAND_KR;
            const float v = (i < tl.m && j < kr) ? h[(long long)(tl.t0 + i) * ldh + k0 + j] : 0.f;
            hs[i * LDH + j] = Num<HS>::from_f(v);
        }
        for (int idx = threadIdx.x; idx < EXPAND_TN * EXPAND_KR; idx += THREADS) {
            const int n = idx / EXPAND_KR, j = idx % EXPAND_KR;
            bs[n * LDB + j] = (n < n_valid && j < kr) ? B[(long long)(o0 + n) * ldb + k0 + j] : Num<T>::from_f(0.f);
        }
        __syncthreads();
        gemm.run(hs, LDH, bs, LDB, (kr + 15) & ~15, tl.m, n_valid);
        __syncthreads();
    }
    gemm.store(cs, LDC, tl.m, n_valid);
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE_M * EXPAND_TN; idx += THREADS) {
        const int i = idx / EXPAND_TN, n = idx % EXPAND_TN;
        if (i < tl.m && n < n_valid) {
            T* p = y + yoff[i] + o0 + n;
            *p = Num<T>::from_f(Num<T>::to_f(*p) + cs[i * LDC + n]);
        }
    }
}

}  // namespace lora

// ---- entry points --------------------------------------------------------------------------

// tile_start[s] (s <= S): tiles of the segments before s, a segment having ceil(len / TILE_M)
// tiles when seg_rank > 0 and len > 0, else none. One block of MAP_THREADS threads.
extern "C" __global__ void __launch_bounds__(lora::MAP_THREADS)
    lora_tile_map(const int* __restrict__ seg_offsets, const int* __restrict__ seg_rank, int n_seg,
                  int* __restrict__ tile_start) {
    __shared__ int warp_sums[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;
    int carry = 0;
    for (int base = 0; base < n_seg; base += blockDim.x) {
        const int s = base + tid;
        int v = 0;
        if (s < n_seg) {
            const int len = seg_offsets[s + 1] - seg_offsets[s];
            if (seg_rank[s] > 0 && len > 0) v = (len + lora::TILE_M - 1) / lora::TILE_M;
        }
        int incl = v;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int o = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d) incl += o;
        }
        if (lane == 31) warp_sums[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int w = lane < n_warps ? warp_sums[lane] : 0;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int o = __shfl_up_sync(0xffffffffu, w, d);
                if (lane >= d) w += o;
            }
            if (lane < n_warps) warp_sums[lane] = w;  // inclusive sums of the warps
        }
        __syncthreads();
        const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - v;
        if (s < n_seg) tile_start[s] = carry + before;
        carry += warp_sums[n_warps - 1];
        __syncthreads();  // warp_sums is rewritten by the next round
    }
    if (tid == 0) tile_start[n_seg] = carry;
}

#define LORA_SHRINK_PARAMS(T)                                                                               \
    const T *x, long long ldx, const int *rows, int n_tokens, int in_features, const unsigned long long *a_ptrs, \
        const int *adapter_rank, int n_adapters, const int *seg_offsets, const int *seg_rank,                  \
        const float *seg_scale, const int *seg_adapter, int n_seg, const int *tile_start, const int *token_lo,  \
        const float *gate_lo, const float *gate_hi, float *h, int ldh, int k_split, int accumulate, int vec

#define LORA_SHRINK_ARGS                                                                                      \
    x, ldx, rows, n_tokens, in_features, a_ptrs, adapter_rank, n_adapters, seg_offsets, seg_rank, seg_scale, \
        seg_adapter, n_seg, tile_start, token_lo, gate_lo, gate_hi, h, ldh, k_split, accumulate, vec

#define LORA_EXPAND_PARAMS(T)                                                                                \
    T *y, long long ldy, const int *rows, int n_tokens, int out_features, const unsigned long long *b_ptrs,   \
        const int *adapter_rank, int n_adapters, const int *seg_offsets, const int *seg_rank,                  \
        const int *seg_adapter, int n_seg, const int *tile_start, const float *h, int ldh

#define LORA_EXPAND_ARGS                                                                                      \
    y, ldy, rows, n_tokens, out_features, b_ptrs, adapter_rank, n_adapters, seg_offsets, seg_rank, seg_adapter, \
        n_seg, tile_start, h, ldh

#define LORA_KERNELS(SUFFIX, T, MMA)                                                                          \
    extern "C" __global__ void __launch_bounds__(lora::THREADS) lora_shrink_##SUFFIX(LORA_SHRINK_PARAMS(T)) {  \
        lora::shrink_body<T, (MMA) && LORA_HAS_MMA>(LORA_SHRINK_ARGS);                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(lora::THREADS) lora_expand_##SUFFIX(LORA_EXPAND_PARAMS(T)) {  \
        lora::expand_body<T, (MMA) && LORA_HAS_MMA>(LORA_EXPAND_ARGS);                                         \
    }

// x, y, A', B' in float32 / float16 / bfloat16; h, gates and scales always float32.
LORA_KERNELS(f32_simt, float, false)
LORA_KERNELS(f16_simt, __half, false)
LORA_KERNELS(f16_mma, __half, true)
LORA_KERNELS(bf16_simt, __nv_bfloat16, false)
LORA_KERNELS(bf16_mma, __nv_bfloat16, true)
