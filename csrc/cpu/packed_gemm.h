// A register-blocked single-precision GEMM over a B operand packed once per op call, with an
// optional fused epilogue: the LSTM step applies its gate math to each output tile while the tile is
// still in registers.
//
// Why our own GEMM: an ATen GEMM cannot take the LSTM's gate math as an epilogue, re-packs W_hh on
// every one of the T steps, and (MKL on the AMD machines this project runs on) reached 75-95
// GFLOP/s per core on the LSTM's shapes, where this kernel reaches 100-115 (FMA peak: 116).
//
// Compiled for AVX2 and for AVX-512 (see lstm_kernels_avx2.cpp / _avx512.cpp): FloatVec is
// at::vec::Vectorized<float> of that set, VL its width (8 for AVX2, 16 for AVX-512).
//
// Layout of a packed B [K, Ncols]: panels of NR = 4 * VL columns; panel p holds, for every k, NR
// consecutive values. Two column orders:
//   plain:   panel p, vector v -> columns p*NR + v*VL + [0, VL)
//   gates:   panel p, vector v -> columns g(v)*H + p*VL + [0, VL), with H = Ncols / G for a cell of
//            G gates, and g(v) the gate vector v holds (GateLayout; none: zeros)
// The gate order puts the pre-activations of all gates of VL hidden units into one register tile,
// so a cell's epilogue has every gate of each unit at hand: the LSTM's i, f, g, o fill the four
// vectors; the GRU's r, z, n leave one free, which its fused input projection uses for the n gate's
// input half (kept apart from the recurrent half, which r multiplies). Columns past the edge are
// zero.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

namespace lstm_ext::cpu {
inline namespace CPU_CAPABILITY {

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kVecWidth = FloatVec::size();

// The inner loop works on raw intrinsic types: GCC keeps arrays of those in registers, but not
// arrays of at::vec::Vectorized (it spilled every AVX-512 accumulator on every iteration).
#if defined(CPU_CAPABILITY_AVX512)
using RawVec = __m512;
inline RawVec raw_load(const float* p) { return _mm512_loadu_ps(p); }
inline RawVec raw_broadcast(float x) { return _mm512_set1_ps(x); }
inline RawVec raw_fmadd(RawVec a, RawVec b, RawVec c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(CPU_CAPABILITY_AVX2)
using RawVec = __m256;
inline RawVec raw_load(const float* p) { return _mm256_loadu_ps(p); }
inline RawVec raw_broadcast(float x) { return _mm256_set1_ps(x); }
inline RawVec raw_fmadd(RawVec a, RawVec b, RawVec c) { return _mm256_fmadd_ps(a, b, c); }
#else
#error "packed_gemm.h is compiled for AVX2 or AVX-512 only (the DEFAULT kernel set uses ATen GEMMs)"
#endif
constexpr int64_t kPanelVecs = 4;  // one vector per gate
constexpr int64_t kPanelWidth = kPanelVecs * kVecWidth;
// Rows per register tile. AVX-512 (32 registers): 6 rows x 4 vectors of accumulators, the 4 B
// vectors and a broadcast. AVX2 (16 registers): 3 rows x 4 accumulators leave no room for B, which
// the FMAs then read from L1 (measured on Zen 4: ~100 GFLOP/s per core, against ~75 for 2 rows with
// B in registers and 50-60 for 4 rows).
constexpr int64_t kTileRows = kVecWidth == 16 ? 6 : 3;
// K per block, and rows per block of rows: the A block (rows x kBlockK) and one panel's B block
// (kBlockK x kPanelWidth) stay in L1/L2 while the row tiles of the block pass over every panel.
// Tuned on an AMD Zen 4 core (32 KB L1d, 1 MB L2): in whole op calls (T=100, N=32-64,
// C=H=256-512, 2 threads) K blocks of 1024 ran the weight gradients 3-4% and the backward
// recurrence 1-2% faster than 512, which the kernel alone did not tell apart. The macros let a
// benchmark try others.
#ifndef LSTM_GEMM_BLOCK_K
#define LSTM_GEMM_BLOCK_K 1024
#endif
#ifndef LSTM_GEMM_BLOCK_ROWS
#define LSTM_GEMM_BLOCK_ROWS 48
#endif
constexpr int64_t kBlockK = LSTM_GEMM_BLOCK_K;
constexpr int64_t kBlockTiles = (LSTM_GEMM_BLOCK_ROWS + kTileRows - 1) / kTileRows;

// The first `count` (1..kVecWidth) floats at p as one vector, the rest zero; and the store of
// that many: the edge of a row that is not a whole number of vectors.
inline FloatVec load_units(const float* p, int64_t count) {
  return count == kVecWidth ? FloatVec::loadu(p) : FloatVec::loadu(p, count);
}
inline void store_units(float* p, const FloatVec& v, int64_t count) {
  if (count == kVecWidth) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// When a recurrence last handed its steps to one thread because a thread of its team was
// descheduled (StepSync, fused_backend_impl.h), in steady-clock nanoseconds; and whether that was
// recent enough that the cores are likely still busy. For kBusyMemoryNs after it, barrier-bound
// recurrences start on one thread and the kernels' parallel loops run on the calling thread
// (parallel_for_unless_busy) rather than wait for a descheduled thread again; then they try
// their threads again. Results do not depend on the thread count, so this changes only speed.
inline std::atomic<int64_t>& last_stall_ns() {
  static std::atomic<int64_t> when{std::numeric_limits<int64_t>::min() / 2};
  return when;
}
inline int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
constexpr int64_t kBusyMemoryNs = 100'000'000;  // 100 ms
inline bool cores_recently_busy() {
  return steady_now_ns() - last_stall_ns().load(std::memory_order_relaxed) < kBusyMemoryNs;
}

// at::parallel_for, or the whole range on the calling thread while the cores are busy: a parallel
// region ends when its slowest thread does, and a descheduled one holds it for a time slice.
template <typename Body>
void parallel_for_unless_busy(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  if (cores_recently_busy()) {
    if (begin < end) {
      body(begin, end);
    }
    return;
  }
  at::parallel_for(begin, end, grain, body);
}

enum class ColumnOrder { kPlain, kGates };

// Which gate of a cell's `gates` gates each vector of a gate-ordered panel holds; -1: none (the
// vector is zero).
struct GateLayout {
  int64_t gates = 4;
  int64_t gate_of_vec[kPanelVecs] = {0, 1, 2, 3};
};
// The LSTM's i, f, g, o.
inline constexpr GateLayout kLstmGates{};
// The GRU's W_hh^T and W_ih^T: r, z, n, in panels of three vectors (PackedB::vecs), so that no
// FMA is spent on an empty vector; see tile_multiply3.
inline constexpr GateLayout kGruGates{3, {0, 1, 2, -1}};

// B as the kernels below read it: panel p's row k (its vecs * kVecWidth values for that k) starts
// at base + p * panel_stride + k * k_stride. A packed copy (`data`, [panels, K, vecs * kVecWidth])
// has k_stride = vecs * kVecWidth and panel_stride = K * k_stride.
struct PackedB {
  at::Tensor data;  // the packed copy
  const float* base = nullptr;
  int64_t k_stride = kPanelWidth;
  int64_t panel_stride = 0;
  int64_t k = 0;
  int64_t cols = 0;
  int64_t panels = 0;
  ColumnOrder order = ColumnOrder::kPlain;
  GateLayout layout;  // kGates only
  // Vectors per panel: kPanelVecs, or 3 for the GRU's gate-ordered packings (read only by
  // tile_multiply3; every other kernel takes four-vector panels).
  int64_t vecs = kPanelVecs;

  const float* panel(int64_t p) const { return base + p * panel_stride; }
};

// First column of (panel, vector) in B, and how many of its VL columns exist (0 for a vector that
// holds no gate).
inline int64_t panel_column(const PackedB& b, int64_t panel, int64_t vec) {
  if (b.order == ColumnOrder::kPlain) {
    return panel * kPanelWidth + vec * kVecWidth;
  }
  const int64_t gate = std::max<int64_t>(b.layout.gate_of_vec[vec], 0);
  return gate * (b.cols / b.layout.gates) + panel * kVecWidth;
}
inline int64_t panel_column_count(const PackedB& b, int64_t panel, int64_t vec) {
  if (b.order == ColumnOrder::kGates && b.layout.gate_of_vec[vec] < 0) {
    return 0;
  }
  const int64_t gate = b.layout.gate_of_vec[vec];
  const int64_t limit =
      b.order == ColumnOrder::kPlain ? b.cols : (gate + 1) * (b.cols / b.layout.gates);
  return std::clamp<int64_t>(limit - panel_column(b, panel, vec), 0, kVecWidth);
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for a kVecWidth x kVecWidth block.
inline void transpose_vector_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  // In registers, fixed size (at::vec's transpose_mxn takes run-time sizes and went through memory
  // at about one cycle per float; this is about three times faster, which matters because every
  // op call packs its weights this way). Rows i, 128-bit lanes l (columns 4l..4l+3):
  __m512 rows[16], pairs[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_ps(src + i * ld_src);
  // pairs[2a] lane l = (r2a[4l], r2a+1[4l], r2a[4l+1], r2a+1[4l+1]); pairs[2a+1]: columns 4l+2, 4l+3.
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // quads[c][b] lane l = column 4l + c of rows 4b..4b+3.
  __m512 quads[4][4];
  for (int b = 0; b < 4; ++b) {
    const __m512d lo0 = _mm512_castps_pd(pairs[4 * b]), lo1 = _mm512_castps_pd(pairs[4 * b + 2]);
    const __m512d hi0 = _mm512_castps_pd(pairs[4 * b + 1]),
                  hi1 = _mm512_castps_pd(pairs[4 * b + 3]);
    quads[0][b] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    quads[1][b] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    quads[2][b] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    quads[3][b] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  // Output row 4l + c = lane l of quads[c][0..3]: a 4 x 4 transpose of 128-bit lanes.
  for (int c = 0; c < 4; ++c) {
    const __m512 s0 = _mm512_shuffle_f32x4(quads[c][0], quads[c][1], 0x44);
    const __m512 s1 = _mm512_shuffle_f32x4(quads[c][0], quads[c][1], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(quads[c][2], quads[c][3], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(quads[c][2], quads[c][3], 0xEE);
    _mm512_storeu_ps(dst + (0 + c) * ld_dst, _mm512_shuffle_f32x4(s0, s2, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * ld_dst, _mm512_shuffle_f32x4(s0, s2, 0xDD));
    _mm512_storeu_ps(dst + (8 + c) * ld_dst, _mm512_shuffle_f32x4(s1, s3, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * ld_dst, _mm512_shuffle_f32x4(s1, s3, 0xDD));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  at::vec::transpose_mxn<float, 8, 8>(src, ld_src, dst, ld_dst);
#else
  for (int64_t i = 0; i < kVecWidth; ++i) {
    for (int64_t j = 0; j < kVecWidth; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
#endif
}

// Packs B given by element (k, col) = src[k * k_stride + col * col_stride]; `layout` says where
// each gate goes in the gate order.
inline PackedB pack_b(const float* src, int64_t k_stride, int64_t col_stride, int64_t k,
                      int64_t cols, ColumnOrder order, const GateLayout& layout = kLstmGates,
                      int64_t vecs = kPanelVecs) {
  PackedB b;
  b.k = k;
  b.cols = cols;
  b.order = order;
  b.layout = layout;
  b.vecs = vecs;
  const int64_t width = order == ColumnOrder::kPlain ? cols : cols / layout.gates;
  const int64_t per_panel = order == ColumnOrder::kPlain ? kPanelWidth : kVecWidth;
  const int64_t panel_width = vecs * kVecWidth;  // floats per k in a panel
  b.panels = (width + per_panel - 1) / per_panel;
  b.data = at::empty({b.panels, k, panel_width}, at::TensorOptions().dtype(at::kFloat));
  float* dst = b.data.data_ptr<float>();
  b.base = dst;
  b.k_stride = panel_width;
  b.panel_stride = k * panel_width;
  // B = W^T of a row-major W (the forward weights): each vector's columns are rows of W,
  // contiguous in k, so blocks of them are transposed with SIMD shuffles.
  const bool transposed = k_stride == 1 && col_stride != 1;
  constexpr int64_t kMinElementsPerTask = 1 << 16;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, k * panel_width));
  parallel_for_unless_busy(0, b.panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t v = 0; v < vecs; ++v) {
        const int64_t col0 = panel_column(b, p, v);
        const int64_t count = panel_column_count(b, p, v);
        float* panel = dst + p * k * panel_width + v * kVecWidth;
        int64_t kk = 0;
        if (transposed && count == kVecWidth) {
          for (; kk + kVecWidth <= k; kk += kVecWidth) {
            transpose_vector_block(src + col0 * col_stride + kk, col_stride,
                                   panel + kk * panel_width, panel_width);
          }
        }
        for (; kk < k; ++kk) {
          float* out = panel + kk * panel_width;
          const float* in = src + kk * k_stride + col0 * col_stride;
          int64_t l = 0;
          for (; l < count; ++l) out[l] = in[l * col_stride];
          for (; l < kVecWidth; ++l) out[l] = 0.f;
        }
      }
    }
  });
  return b;
}

// B in plain column order, element (k, col) = src[k * k_stride + col * col_stride], packed: the
// activations and weights that weight and input gradients multiply by. Always a packed copy: a
// row-major B whose columns fill whole panels could be read in place (panel p's row k at
// src + k * k_stride + p * kPanelWidth), which ran as fast on AMD Zen 4 but 2.1-2.5x slower on an
// Intel Xeon (family 6, model 207; T=100 N=64 C=H=512: dX 131 -> 52 ms, dW_ih 128 -> 62 ms,
// dW_hh 131 -> 59 ms with the copy), whose prefetchers do not follow a panel's 256-byte rows
// k_stride floats apart. The copy costs O(K * Ncols), against the GEMM's O(M * K * Ncols).
inline PackedB plain_b(const float* src, int64_t k_stride, int64_t col_stride, int64_t k,
                       int64_t cols) {
  return pack_b(src, k_stride, col_stride, k, cols, ColumnOrder::kPlain);
}

// A operand: element (m, k) = ptr[m * row_stride + k * k_stride]. Row-major A has k_stride 1;
// a transposed one (A = X^T for weight gradients) has row_stride 1.
struct OperandA {
  const float* ptr;
  int64_t row_stride;
  int64_t k_stride;
};

// acc[r][v] += sum over k in [0, kc) of A(r, k) * B(k, panel columns of v): `a` starts at the
// tile's first row and K block, `b_block` at the K block of one panel, whose rows are b_k_stride
// floats apart.
template <int64_t kRows>
inline void tile_multiply(const OperandA& a, int64_t kc, const float* b_block, int64_t b_k_stride,
                          RawVec (&acc)[kRows][kPanelVecs]) {
  // Work on a local copy of raw vectors: vector types may alias float, so stores to the caller's
  // array could not stay in registers across the loads of A and B below.
  RawVec sum[kRows][kPanelVecs];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r) {
    sum[r][0] = acc[r][0];
    sum[r][1] = acc[r][1];
    sum[r][2] = acc[r][2];
    sum[r][3] = acc[r][3];
  }
  const float* a_rows = a.ptr;
  const int64_t row_stride = a.row_stride;
  const int64_t k_stride = a.k_stride;
  for (int64_t k = 0; k < kc; ++k) {
    const float* b_k = b_block + k * b_k_stride;
    const RawVec b0 = raw_load(b_k);
    const RawVec b1 = raw_load(b_k + kVecWidth);
    const RawVec b2 = raw_load(b_k + 2 * kVecWidth);
    const RawVec b3 = raw_load(b_k + 3 * kVecWidth);
    const float* a_k = a_rows + k * k_stride;
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) {
      const RawVec a_rk = raw_broadcast(a_k[r * row_stride]);
      sum[r][0] = raw_fmadd(a_rk, b0, sum[r][0]);
      sum[r][1] = raw_fmadd(a_rk, b1, sum[r][1]);
      sum[r][2] = raw_fmadd(a_rk, b2, sum[r][2]);
      sum[r][3] = raw_fmadd(a_rk, b3, sum[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r) {
    acc[r][0] = sum[r][0];
    acc[r][1] = sum[r][1];
    acc[r][2] = sum[r][2];
    acc[r][3] = sum[r][3];
  }
}

// tile_multiply for three-vector panels (PackedB::vecs = 3), accumulating B's vector v into the
// tile's vector kTarget[v]: the GRU's r, z, n products, whose n halves (input and recurrent) go to
// different accumulators.
template <int64_t kRows, int kT0, int kT1, int kT2>
inline void tile_multiply3(const OperandA& a, int64_t kc, const float* b_block, int64_t b_k_stride,
                           RawVec (&acc)[kRows][kPanelVecs]) {
  RawVec sum[kRows][3];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r) {
    sum[r][0] = acc[r][kT0];
    sum[r][1] = acc[r][kT1];
    sum[r][2] = acc[r][kT2];
  }
  const float* a_rows = a.ptr;
  const int64_t row_stride = a.row_stride;
  const int64_t k_stride = a.k_stride;
  for (int64_t k = 0; k < kc; ++k) {
    const float* b_k = b_block + k * b_k_stride;
    const RawVec b0 = raw_load(b_k);
    const RawVec b1 = raw_load(b_k + kVecWidth);
    const RawVec b2 = raw_load(b_k + 2 * kVecWidth);
    const float* a_k = a_rows + k * k_stride;
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) {
      const RawVec a_rk = raw_broadcast(a_k[r * row_stride]);
      sum[r][0] = raw_fmadd(a_rk, b0, sum[r][0]);
      sum[r][1] = raw_fmadd(a_rk, b1, sum[r][1]);
      sum[r][2] = raw_fmadd(a_rk, b2, sum[r][2]);
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < kRows; ++r) {
    acc[r][kT0] = sum[r][0];
    acc[r][kT1] = sum[r][1];
    acc[r][kT2] = sum[r][2];
  }
}

// B given by its layout only (no packed copy: `data` and `base` unset): the column order,
// gate layout, K and size of a gate-ordered B [K, Ncols] = W^T whose W [Ncols, K] the kernel
// below reads as stored.
inline PackedB unpacked_gate_layout(int64_t k, int64_t cols, const GateLayout& layout) {
  PackedB b;
  b.k = k;
  b.cols = cols;
  b.order = ColumnOrder::kGates;
  b.layout = layout;
  b.panels = (cols / layout.gates + kVecWidth - 1) / kVecWidth;
  return b;
}

// acc[r][v] += sum over k of A(r, k) * W(col, k) for the columns of (panel, vector v) of
// `layout`'s gate order, W row-major [Ncols, K] as stored (row col at w + col * ld_w) and A
// row-major (k_stride 1). For one step of a few rows: each weight is read once, contiguously, and
// no packed copy is made (which would read W once and write it once before the GEMM read it
// again). The dot products run in vectors along k, two columns at a time so that each vector of
// A serves two FMAs (one load per FMA would bound the loop by the loads); the kVecWidth x
// kVecWidth block of a panel vector's partial sums is then transposed, so that adding its rows
// gives the vector of columns.
template <int64_t kRows>
inline void tile_multiply_rows(const OperandA& a, const float* w, int64_t ld_w,
                               const PackedB& layout, int64_t panel,
                               RawVec (&acc)[kRows][kPanelVecs]) {
  // Independent chains of FMAs per row and column, as many as the registers hold (24
  // accumulators of 32 on AVX-512, 12 of 16 on AVX2, leaving room for the loads): few rows
  // would leave too few chains to cover the FMA latency.
  constexpr int64_t kMaxAccumulators = kVecWidth == 16 ? 24 : 12;
  constexpr int64_t kChains = std::clamp<int64_t>(kMaxAccumulators / (2 * kRows), 1, 4);
  constexpr int64_t kStep = kChains * kVecWidth;
  const int64_t k = layout.k;
  const int64_t k_whole = k - k % kStep;
  alignas(64) float partial[kRows][kVecWidth * kVecWidth];
  alignas(64) float columns[kVecWidth * kVecWidth];
  for (int64_t v = 0; v < kPanelVecs; ++v) {
    const int64_t count = panel_column_count(layout, panel, v);
    if (count == 0) {
      continue;
    }
    const int64_t col0 = panel_column(layout, panel, v);
    for (int64_t l = 0; l < count; l += 2) {
      // A lone last column runs as a pair with itself; its twin's sums are dropped.
      const float* w0 = w + (col0 + l) * ld_w;
      const float* w1 = l + 1 < count ? w0 + ld_w : w0;
      // The next pair's rows, requested while these stream: each row is a short stream (K
      // floats) that the hardware prefetchers would only pick up part way.
      const float* next = l + 2 < count ? w0 + 2 * ld_w : nullptr;
      RawVec sum[kRows][2][kChains];
      for (int64_t r = 0; r < kRows; ++r) {
        for (int64_t c = 0; c < kChains; ++c) {
          sum[r][0][c] = raw_broadcast(0.f);
          sum[r][1][c] = raw_broadcast(0.f);
        }
      }
      int64_t kk = 0;
      for (; kk < k_whole; kk += kStep) {
        if (next != nullptr) {
          for (int64_t line = 0; line < kStep; line += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(next + kk + line), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(next + ld_w + kk + line), _MM_HINT_T0);
          }
        }
#pragma GCC unroll 4
        for (int64_t c = 0; c < kChains; ++c) {
          const RawVec w0_vec = raw_load(w0 + kk + c * kVecWidth);
          const RawVec w1_vec = raw_load(w1 + kk + c * kVecWidth);
#pragma GCC unroll 8
          for (int64_t r = 0; r < kRows; ++r) {
            const RawVec a_vec = raw_load(a.ptr + r * a.row_stride + kk + c * kVecWidth);
            sum[r][0][c] = raw_fmadd(w0_vec, a_vec, sum[r][0][c]);
            sum[r][1][c] = raw_fmadd(w1_vec, a_vec, sum[r][1][c]);
          }
        }
      }
      for (; kk < k; kk += kVecWidth) {
        const int64_t n = std::min<int64_t>(kVecWidth, k - kk);
        const RawVec w0_vec = load_units(w0 + kk, n);
        const RawVec w1_vec = load_units(w1 + kk, n);
        for (int64_t r = 0; r < kRows; ++r) {
          const RawVec a_vec = load_units(a.ptr + r * a.row_stride + kk, n);
          sum[r][0][0] = raw_fmadd(w0_vec, a_vec, sum[r][0][0]);
          sum[r][1][0] = raw_fmadd(w1_vec, a_vec, sum[r][1][0]);
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        for (int64_t col = 0; col < 2; ++col) {
          FloatVec total(sum[r][col][0]);
          for (int64_t c = 1; c < kChains; ++c) total = total + FloatVec(sum[r][col][c]);
          total.store(partial[r] + (l + col) * kVecWidth);
        }
      }
    }
    // Columns past the edge of the gate: zero (their pair's twin may have written one of them).
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t l = count; l < kVecWidth; ++l) {
        FloatVec(0.f).store(partial[r] + l * kVecWidth);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      transpose_vector_block(partial[r], kVecWidth, columns, kVecWidth);
      FloatVec total(acc[r][v]);
      for (int64_t lane = 0; lane < kVecWidth; ++lane) {
        total = total + FloatVec::loadu(columns + lane * kVecWidth);
      }
      acc[r][v] = total;
    }
  }
}

// The plain output: C rows are row-major with leading dimension ldc, columns as B's. With a bias
// ([Ncols]), a GEMM that does not accumulate starts from it instead of from zero.
struct PlainOutput {
  float* c;
  int64_t ldc;
  const PackedB* b;
  const float* bias = nullptr;

  template <int64_t kRows>
  void init(int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (int64_t v = 0; v < kPanelVecs; ++v) {
      RawVec start = raw_broadcast(0.f);
      if (bias != nullptr) {
        const int64_t count = panel_column_count(*b, panel, v);
        const float* src = bias + panel_column(*b, panel, v);
        start = count > 0 ? load_units(src, count) : FloatVec(0.f);
      }
      for (int64_t r = 0; r < kRows; ++r) acc[r][v] = start;
    }
  }

  template <int64_t kRows>
  void load(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        const int64_t count = panel_column_count(*b, panel, v);
        const float* src = c + (row0 + r) * ldc + panel_column(*b, panel, v);
        // Vectorized converts to RawVec.
        acc[r][v] = count > 0 ? load_units(src, count) : FloatVec(0.f);
      }
    }
  }
  template <int64_t kRows>
  void store(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        const int64_t count = panel_column_count(*b, panel, v);
        float* dst = c + (row0 + r) * ldc + panel_column(*b, panel, v);
        if (count > 0) {
          store_units(dst, FloatVec(acc[r][v]), count);
        }
      }
    }
  }
  // The output tiles are written, not read: nothing to fetch ahead.
  void prefetch(int64_t /*tile*/, int64_t /*panel*/, bool /*last*/) const {}

  // Nothing fused: the last K block stores like the others.
  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    store<kRows>(row0, panel, acc);
  }
};

// Runs one row tile of `rows` (<= kTileRows) rows over one K block, with the row count as a
// compile-time constant so the accumulators live in registers. The tile's A rows start at `a`
// itself (the caller offsets it); its output rows at row0.
template <typename Output, int64_t kRows = kTileRows>
inline void run_tile(const OperandA& a, const PackedB& b, const Output& out, int64_t row0,
                     int64_t rows, int64_t panel, int64_t k0, int64_t kc, bool load_c, bool last) {
  if constexpr (kRows > 1) {
    if (rows < kRows) {
      run_tile<Output, kRows - 1>(a, b, out, row0, rows, panel, k0, kc, load_c, last);
      return;
    }
  }
  RawVec acc[kRows][kPanelVecs];
  if (load_c) {
    out.template load<kRows>(row0, panel, acc);
  } else {
    out.template init<kRows>(panel, acc);
  }
  tile_multiply<kRows>(a, kc, b.panel(panel) + k0 * b.k_stride, b.k_stride, acc);
  if (last) {
    out.template finish<kRows>(row0, panel, acc);
  } else {
    out.template store<kRows>(row0, panel, acc);
  }
}

// Rows of A per block of rows (the L2-resident slice of A, see kBlockK).
constexpr int64_t kBlockRows = kBlockTiles * kTileRows;

// A transposed A (row_stride 1: weight gradients, A = dG^T with dG [rows, 4H]) reads one cache
// line, on a new page, per k and per tile. Such a block is copied first into `buffer` as
// [kc, kBlockRows] (each k's rows contiguous, a plain copy of kBlockRows floats per k), so the
// tiles then read it sequentially from L1/L2.
inline bool copies_a_blocks(const OperandA& a) { return a.row_stride == 1 && a.k_stride > kBlockRows; }

// With `row_sums` (only when copying), also adds each row's sum over the block's k to
// row_sums[row0 + r]: the bias gradient, the row sums of dG^T, in the same pass over dG.
inline OperandA a_block(const OperandA& a, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
                        float* buffer, float* row_sums) {
  const float* src = a.ptr + row0 * a.row_stride + k0 * a.k_stride;
  if (buffer == nullptr) {
    return OperandA{src, a.row_stride, a.k_stride};
  }
  for (int64_t k = 0; k < kc; ++k) {
    std::copy_n(src + k * a.k_stride, rows, buffer + k * kBlockRows);
  }
  if (row_sums != nullptr) {
    float* sums = row_sums + row0;
    for (int64_t k = 0; k < kc; ++k) {
      const float* copied = buffer + k * kBlockRows;
      for (int64_t r = 0; r < rows; ++r) sums[r] += copied[r];
    }
  }
  return OperandA{buffer, 1, kBlockRows};
}

// out (+)= A[rows, K] * B over panels [panel_begin, panel_end) of B and row tiles
// [tile_begin, tile_end), on the calling thread. `accumulate` adds to what `out` holds; otherwise
// it is overwritten. K must be positive.
// K blocks outermost, then blocks of rows whose slice of A (kBlockRows x kBlockK) stays in L2
// while every panel of the range passes over it.
template <typename Output>
void packed_gemm_panels(const OperandA& a, int64_t rows, const PackedB& b, const Output& out,
                        bool accumulate, int64_t panel_begin, int64_t panel_end,
                        int64_t tile_begin = 0, int64_t tile_end = -1,
                        float* a_row_sums = nullptr) {
  if (tile_end < 0) {
    tile_end = (rows + kTileRows - 1) / kTileRows;
  }
  std::vector<float> buffer(copies_a_blocks(a) ? kBlockRows * std::min(kBlockK, b.k) : 0);
  for (int64_t k0 = 0; k0 < b.k; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, b.k - k0);
    const bool last = k0 + kBlockK >= b.k;
    for (int64_t t0 = tile_begin; t0 < tile_end; t0 += kBlockTiles) {
      const int64_t t1 = std::min(tile_end, t0 + kBlockTiles);
      const int64_t block_row0 = t0 * kTileRows;
      const int64_t block_rows = std::min(t1 * kTileRows, rows) - block_row0;
      const OperandA block = a_block(a, block_row0, block_rows, k0, kc,
                                     buffer.empty() ? nullptr : buffer.data(), a_row_sums);
      for (int64_t p = panel_begin; p < panel_end; ++p) {
        for (int64_t t = t0; t < t1; ++t) {
          // What the next tile's epilogue reads besides A and B, requested now so that it
          // arrives while this tile multiplies.
          if (t + 1 < t1) {
            out.prefetch(t + 1, p, last);
          } else if (p + 1 < panel_end) {
            out.prefetch(t0, p + 1, last);
          }
          const int64_t row0 = t * kTileRows;
          const OperandA tile{block.ptr + (row0 - block_row0) * block.row_stride,
                              block.row_stride, block.k_stride};
          run_tile(tile, b, out, row0, std::min(kTileRows, rows - row0), p, k0, kc,
                   accumulate || k0 > 0, last);
        }
      }
    }
  }
}

// out (+)= A[rows, K] * B, on ATen's threads. K must be positive (callers route K = 0 elsewhere).
// A copied A (see copies_a_blocks) is split over blocks of rows, so that each block is copied
// once; then `a_row_sums` (zeroed, [rows]) may collect the row sums of A. Otherwise the split is
// over panels when there are enough of them (each thread keeps its panels of B in its own cache),
// else over row ranges.
template <typename Output>
void packed_gemm(const OperandA& a, int64_t rows, const PackedB& b, const Output& out,
                 bool accumulate, float* a_row_sums = nullptr) {
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  if (rows == 0 || b.panels == 0) {
    return;
  }
  TORCH_INTERNAL_ASSERT(a_row_sums == nullptr || copies_a_blocks(a));
  // Threads only where each task gets enough work to pay for the hand-off (a step of a small
  // model is a few microseconds of work in all).
  constexpr int64_t kMinFlopsPerTask = 1 << 20;
  const int64_t flops_per_tile = 2 * kTileRows * b.k * kPanelWidth;
  const int64_t threads = at::get_num_threads();
  if (copies_a_blocks(a)) {
    const int64_t row_blocks = (row_tiles + kBlockTiles - 1) / kBlockTiles;
    const int64_t grain =
        std::max<int64_t>(1, kMinFlopsPerTask / (flops_per_tile * kBlockTiles * b.panels));
    parallel_for_unless_busy(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
      packed_gemm_panels(a, rows, b, out, accumulate, 0, b.panels, begin * kBlockTiles,
                         std::min(row_tiles, end * kBlockTiles), a_row_sums);
    });
  } else if (b.panels >= 2 * threads || row_tiles < 2 * threads) {
    const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / (flops_per_tile * row_tiles));
    parallel_for_unless_busy(0, b.panels, grain, [&](int64_t begin, int64_t end) {
      packed_gemm_panels(a, rows, b, out, accumulate, begin, end);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / (flops_per_tile * b.panels));
    parallel_for_unless_busy(0, row_tiles, grain, [&](int64_t begin, int64_t end) {
      packed_gemm_panels(a, rows, b, out, accumulate, 0, b.panels, begin, end);
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace lstm_ext::cpu
