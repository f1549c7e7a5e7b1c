// Products with few output columns (fewer than two thirds of a GEMM panel): the gradients of a
// layer with a narrow input, as an LSTM over 2 or 10 features has (dX [rows, C] = dG W_ih and
// dW_ih [4H, C] = dG^T X, with C small). The packed GEMM would compute whole 64-column panels to
// keep C of them, and MKL's generic kernel (what it runs on AMD CPUs) took a quarter of such a
// training step. Both are one pass over the large operand, dG, at memory speed.
//
// Sums run in a fixed order (over k within a fixed chunk, then over chunks in order), whatever the
// thread count, as in the packed GEMM. Included by fused_backend_impl.h, inside its instruction
// set's namespace.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "packed_gemm.h"

namespace lstm_ext::cpu {
inline namespace CPU_CAPABILITY {

// Sum of a vector's lanes, lane 0 first: a fixed order.
inline float lane_sum(const FloatVec& v) {
  float lanes[kVecWidth];
  v.store(lanes);
  float sum = 0.f;
  for (const float lane : lanes) sum += lane;
  return sum;
}

// out [M, N] (+)= A [M, K] B [K, N] with A row-major (element (m, k) at a[m * lda + k]) and N
// narrow: out[m][n] is the dot product of A's row m with B's column n, B^T copied contiguous.
inline void narrow_product(const float* a, int64_t lda, int64_t m_size, int64_t k_size,
                           const at::Tensor& b, float* out, int64_t ldo, bool accumulate) {
  const int64_t n_size = b.size(1);
  const at::Tensor b_t = b.t().contiguous();  // [N, K]
  const float* bt = b_t.const_data_ptr<float>();
  constexpr int64_t kMinRowsPerTask = 64;
  parallel_for_unless_busy(0, m_size, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = a + m * lda;
      for (int64_t n = 0; n < n_size; ++n) {
        const float* column = bt + n * k_size;
        FloatVec acc(0.f);
        for (int64_t k = 0; k < k_size; k += kVecWidth) {
          const int64_t count = std::min(kVecWidth, k_size - k);
          acc = at::vec::fmadd(load_units(row + k, count), load_units(column + k, count), acc);
        }
        const float dot = lane_sum(acc);
        out[m * ldo + n] = accumulate ? out[m * ldo + n] + dot : dot;
      }
    }
  });
}

// out [M, N] (+)= D^T B with D [K, M] row-major (element (k, m) at d[k * ldd + m]) and B [K, N]
// (element (k, n) at b[k * ldb + n]), N narrow: each chunk of k accumulates N rows of M partial
// sums (and, with column_sums, the sums of D's columns: the bias gradient) as axpys over D's rows,
// then the chunks are added in order. out is [M, N] with leading dimension ldo.
inline void narrow_transposed_product(const float* d, int64_t ldd, int64_t k_size, int64_t m_size,
                                      const float* b, int64_t ldb, int64_t n_size, float* out,
                                      int64_t ldo, bool accumulate, float* column_sums) {
  const int64_t rows_of_sums = n_size + (column_sums != nullptr ? 1 : 0);
  // Fixed by the sizes alone (not by the thread count), at most 64 chunks.
  const int64_t chunk = std::max<int64_t>(256, (k_size + 63) / 64);
  const int64_t chunks = (k_size + chunk - 1) / chunk;
  std::vector<float> partial(static_cast<size_t>(chunks * rows_of_sums * m_size), 0.f);
  parallel_for_unless_busy(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* sums = partial.data() + c * rows_of_sums * m_size;
      for (int64_t k = c * chunk; k < std::min(k_size, (c + 1) * chunk); ++k) {
        const float* d_row = d + k * ldd;
        for (int64_t m = 0; m < m_size; m += kVecWidth) {
          const int64_t count = std::min(kVecWidth, m_size - m);
          const FloatVec dv = load_units(d_row + m, count);
          for (int64_t n = 0; n < n_size; ++n) {
            float* s = sums + n * m_size + m;
            at::vec::fmadd(dv, FloatVec(b[k * ldb + n]), load_units(s, count)).store(s, count);
          }
          if (column_sums != nullptr) {
            float* s = sums + n_size * m_size + m;
            (load_units(s, count) + dv).store(s, count);
          }
        }
      }
    }
  });
  for (int64_t m = 0; m < m_size; ++m) {
    for (int64_t n = 0; n < rows_of_sums; ++n) {
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) total += partial[(c * rows_of_sums + n) * m_size + m];
      if (n == n_size) {
        column_sums[m] = total;
      } else {
        out[m * ldo + n] = accumulate ? out[m * ldo + n] + total : total;
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace lstm_ext::cpu
