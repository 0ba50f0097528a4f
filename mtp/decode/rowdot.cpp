// Matrix products of a few rows against a big weight, for CPU decoding (mtp/decode/rowdot.py):
// the kernel, and the operator mtp::rowdot that calls it (loaded with torch.ops.load_library).
//
// y (M, N) = x (M, K) @ w (N, K)^T + b, float32, row-major and contiguous, M small (a decode
// step's 1-16 tokens). The weight streams from memory once per call whatever M is (up to 16 rows
// per pass), with a software prefetch two blocks ahead: a decode step is bound by reading the
// weights, and BLAS kernels on a few rows are not (on an Intel Xeon, MKL's product of 4 rows
// costs about 2x one row; this one about 1.05x).
//
// Every output is one dot product, summed in the same order whatever M, the block or the thread:
// the results for a row do not depend on the other rows (a speculative step's tokens then equal
// greedy decoding's to the bit).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cstring>
#include <torch/library.h>

#include "simd.h"

// the columns past the last full vector, added to s one by one with explicit fused multiply-adds (so
// that the plain and the packed kernels round them alike, whatever the compiler contracts)
static inline float tail_dot(float s, const float *x, const float *w, long n) {
    for (long k = 0; k < n; k++) s = __builtin_fmaf(x[k], w[k], s);
    return s;
}

// how far ahead the weight is prefetched, in blocks of R rows, and into which cache: L2 (hint T2), not L1
// (T0). On an AMD EPYC (Zen 4) with AVX-512, over SmolLM2's shapes (441 MB of layers and its unembedding,
// 1 and 2 threads), T0 made 4 rows cost 1.06-1.39x one row's pass, T2 0.95-1.06x, at the same or a better
// time for one row (4 rows: 16.4-24.7 ms against 22.8-37.7; benchmarks in docs/benchmarks.md)
static const long PREFETCH_BLOCKS = 2;

// outputs n .. n+R-1 of M rows: R weight rows at a time, M * R accumulators in registers. The
// weight as stored (PACKED false: row n+r at w + (n+r) * K) or in the packed layout below (true:
// the block's columns k .. k+VW-1 of row r at w + n * K + k * R + r * VW, its tail columns after).
template <int M, int R, bool PACKED>
static void dot_block(const float *x, const float *w, float *y, long K, long N, long n, bool prefetch) {
    V acc[M][R];
#pragma GCC unroll 16
    for (int m = 0; m < M; m++)
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) acc[m][r] = vzero();
    const long kv = K - K % VW;
    const float *base = w + n * K, *ahead = base + PREFETCH_BLOCKS * R * K;
    for (long k = 0; k < kv; k += VW) {
        V wv[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            const long at = PACKED ? k * R + r * VW : r * K + k;
            wv[r] = vload(base + at);
            if (prefetch) _mm_prefetch((const char *)(ahead + at), _MM_HINT_T2);  // never faults
        }
#pragma GCC unroll 16
        for (int m = 0; m < M; m++) {
            const V xv = vload(x + m * K + k);
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            const float *tail = PACKED ? base + kv * R + r * (K - kv) : base + r * K + kv;
            y[m * N + n + r] = tail_dot(vsum(acc[m][r]), x + m * K + kv, tail, K - kv);
        }
}

template <int M, int R>
static void block(const float *x, const float *w, float *y, long K, long N, long n) {
    dot_block<M, R, false>(x, w, y, K, N, n, true);
}

typedef void (*block_fn)(const float *, const float *, float *, long, long, long);
#define ROWS_MAX 16
// by M: the block of R weight rows (up to 24 accumulators; 1 row: 4 weight rows, faster than 8 in a
// pass over SmolLM2's weights on the Intel Xeon, 22.3 against 26.5 ms), and the one-row block for N's tail
static const block_fn WIDE[ROWS_MAX + 1] = {
    0, block<1, 4>, block<2, 6>, block<3, 4>, block<4, 4>, block<5, 3>, block<6, 3>, block<7, 2>, block<8, 2>,
    block<9, 2>, block<10, 2>, block<11, 1>, block<12, 1>, block<13, 1>, block<14, 1>, block<15, 1>, block<16, 1>};
static const int WIDTH[ROWS_MAX + 1] = {0, 4, 6, 4, 4, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1};
static const block_fn NARROW[ROWS_MAX + 1] = {
    0, block<1, 1>, block<2, 1>, block<3, 1>, block<4, 1>, block<5, 1>, block<6, 1>, block<7, 1>, block<8, 1>,
    block<9, 1>, block<10, 1>, block<11, 1>, block<12, 1>, block<13, 1>, block<14, 1>, block<15, 1>, block<16, 1>};

// y = x @ w^T (+ b): M rows in passes of up to ROWS_MAX, each pass split over `threads` threads
static void rowdot_kernel(const float *x, const float *w, const float *b, float *y, long M, long K, long N,
                          int threads) {
    for (long m0 = 0; m0 < M; m0 += ROWS_MAX) {
        const long mm = M - m0 < ROWS_MAX ? M - m0 : ROWS_MAX;
        const int R = WIDTH[mm];
        const long blocks = N / R;
        const float *xm = x + m0 * K;
        float *ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (long i = 0; i < blocks; i++) WIDE[mm](xm, w, ym, K, N, i * R);
        for (long n = blocks * R; n < N; n++) NARROW[mm](xm, w, ym, K, N, n);
        if (b)
            for (long m = 0; m < mm; m++)
                for (long n = 0; n < N; n++) ym[m * N + n] += b[n];
    }
}

// The packed layout (`mtp::rowdot_pack`): the weight's rows in blocks of PACK = 4, each block's
// columns interleaved by vector: for a block, its 4 rows' first VW columns, then their next VW, ...,
// then its 4 rows' columns past the last full vector (K % VW each); the rows past the last full
// block (N % 4) as they were. A block is then one stream read front to back, where the plain layout
// reads 4 rows side by side: on an AMD EPYC with AVX-512 a pass of 4 rows over the weights of
// SmolLM2 with 3 heads took 13.5-15.4 ms against 15.8-17.0 (docs/benchmarks.md). Rows of x are
// taken MC at a time against a block (the block, a few KB, stays in L1 for the next ones; at 8
// rows this lost to the plain layout, so decoding packs for 1-4 rows: rowdot.PACKED_ROWS); every
// output is summed in the same order as block() sums it, so the two products are equal to the bit.
#define PACK 4
#if defined(__AVX512F__)
#define MC 4  // rows of x per pass over a block: MC * PACK accumulators + PACK weight vectors in 32 registers
#else
#define MC 2  // 16 registers
#endif

template <int M>
static void pblock(const float *x, const float *wp, float *y, long K, long N, long n, bool prefetch) {
    dot_block<M, PACK, true>(x, wp, y, K, N, n, prefetch);
}

typedef void (*pblock_fn)(const float *, const float *, float *, long, long, long, bool);
static const pblock_fn PBLOCK[5] = {0, pblock<1>, pblock<2>, pblock<3>, pblock<4>};

// y = x @ wp^T (+ b), wp in the packed layout: each block of 4 weight rows once for all M rows
static void rowdot_packed_kernel(const float *x, const float *wp, const float *b, float *y, long M, long K,
                                 long N, int threads) {
    const long blocks = N / PACK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < blocks; i++)
        for (long m0 = 0; m0 < M; m0 += MC) {
            const long mm = M - m0 < MC ? M - m0 : MC;
            PBLOCK[mm](x + m0 * K, wp, y + m0 * N, K, N, i * PACK, m0 == 0);
        }
    for (long m0 = 0; m0 < M; m0 += ROWS_MAX) {  // the rows past the last block, as they are
        const long mm = M - m0 < ROWS_MAX ? M - m0 : ROWS_MAX;
        for (long n = blocks * PACK; n < N; n++) NARROW[mm](x + m0 * K, wp, y + m0 * N, K, N, n);
    }
    if (b)
        for (long m = 0; m < M; m++)
            for (long n = 0; n < N; n++) y[m * N + n] += b[n];
}

// w (N, K) -> the same numbers in the packed layout, shape (N, K)
static at::Tensor rowdot_pack_cpu(const at::Tensor &w) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2, "rowdot_pack takes a 2-D float32 weight");
    const at::Tensor wc = w.contiguous();
    const int64_t N = w.size(0), K = w.size(1), kv = K - K % VW, tail = K - kv;
    at::Tensor out = at::empty({N, K}, w.options());
    const float *s = wc.data_ptr<float>();
    float *d = out.data_ptr<float>();
    const int64_t blocks = N / PACK;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; blk++) {
            float *o = d + blk * PACK * K;
            const float *rows = s + blk * PACK * K;
            for (int64_t k = 0; k < kv; k += VW)
                for (int r = 0; r < PACK; r++, o += VW) std::memcpy(o, rows + r * K + k, VW * sizeof(float));
            for (int r = 0; r < PACK; r++, o += tail) std::memcpy(o, rows + r * K + kv, tail * sizeof(float));
        }
    });
    const int64_t done = blocks * PACK * K;  // the rows past the last block, as they are
    if (N > blocks * PACK) std::memcpy(d + done, s + done, (N * K - done) * sizeof(float));
    return out;
}

// shared by both operators: y's shape, x contiguous, the bias checked
static at::Tensor product(const at::Tensor &x, const at::Tensor &w, const std::optional<at::Tensor> &b,
                          bool packed) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rowdot takes float32");
    TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "rowdot: x and w do not fit");
    TORCH_CHECK(!packed || w.is_contiguous(), "rowdot_packed: the packed weight must be contiguous");
    const int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
    // no reshape, no copy, no view where the inputs are contiguous (a decode step's always are):
    // each costs a few microseconds, and a step makes some 200 of these calls
    const at::Tensor xc = x.is_contiguous() ? x : x.contiguous(), wc = w.is_contiguous() ? w : w.contiguous();
    at::Tensor bc;
    if (b.has_value() && b->defined()) {
        TORCH_CHECK(b->scalar_type() == at::kFloat && b->numel() == N, "rowdot: the bias does not fit");
        bc = b->is_contiguous() ? *b : b->contiguous();
    }
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = N;
    at::Tensor y = at::empty(sizes, x.options());
    if (M) (packed ? rowdot_packed_kernel : rowdot_kernel)(xc.data_ptr<float>(), wc.data_ptr<float>(),
                                                         bc.defined() ? bc.data_ptr<float>() : nullptr,
                                                         y.data_ptr<float>(), M, K, N, at::get_num_threads());
    return y;
}

// x (..., K) @ w (N, K)^T + b (N,) -> (..., N), float32 on the CPU; wp: w in the packed layout
static at::Tensor rowdot_cpu(const at::Tensor &x, const at::Tensor &w, const std::optional<at::Tensor> &b) {
    return product(x, w, b, false);
}
static at::Tensor rowdot_packed_cpu(const at::Tensor &x, const at::Tensor &wp, const std::optional<at::Tensor> &b) {
    return product(x, wp, b, true);
}

TORCH_LIBRARY(mtp, m) {
    m.def("rowdot(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
    m.def("rowdot_pack(Tensor w) -> Tensor");
    m.def("rowdot_packed(Tensor x, Tensor wp, Tensor? b=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(mtp, CPU, m) {
    m.impl("rowdot", &rowdot_cpu);
    m.impl("rowdot_pack", &rowdot_pack_cpu);
    m.impl("rowdot_packed", &rowdot_packed_cpu);
}
