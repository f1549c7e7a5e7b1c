// The CPU pointwise passes, compiled once per instruction set.
//
// Included by lstm_kernels_{default,avx2,avx512}.cpp. Each includer defines CPU_CAPABILITY (and
// CPU_CAPABILITY_AVX2 / _AVX512) before including this file, so at::vec::Vectorized picks the
// matching implementation, and the functions below land in the namespace
// lstm_ext::cpu::<CPU_CAPABILITY>; lstm_ops.cpp picks one at run time.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../common/cell_math.h"
#include "../common/lstm_sequence.h"

namespace lstm_ext {
namespace {  // the namespace of cell_math.h's Activations

// SIMD versions of the activations: Sleef's vectorized exp/tanh (1-ulp accuracy) via at::vec.
template <typename T>
struct Activations<at::vec::Vectorized<T>> {
  using Vec = at::vec::Vectorized<T>;
  static inline Vec sigmoid(Vec x) { return Vec(T(1)) / (Vec(T(1)) + x.neg().exp()); }
  static inline Vec tanh(Vec x) { return x.tanh(); }
};

// float: Sleef's tanhf costs about 90 cycles per AVX-512 vector, as much as the other four
// activations of a unit together, and a step computes two per unit. This one costs about 37 and
// stays within 1.4 ulp of the true tanh (checked over every float in [-12, 12] against float64
// tanh; tests/test_cpu_paths.py checks 2 ulp through the kernels):
//   |x| < 0.625:  x + x^3 P(x^2), P of degree 4, a relative-error least-squares fit to tanh on
//                 [0, 0.625] (0.81 ulp with float32 Horner);
//   otherwise:    sign(x) (1 - 2 / (exp(2|x|) + 1)), where the subtraction cancels nothing
//                 (1.7 ulp bound in float32); exp overflowing to inf gives exactly +-1.
// NaN propagates through both branches; +-inf gives +-1; -0 gives -0.
template <>
struct Activations<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  static inline Vec sigmoid(Vec x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }
  static inline Vec tanh(Vec x) {
    const Vec abs_x = x.abs();
    const Vec z = x * x;
    Vec p = Vec(-0.005943785887211561f);
    p = at::vec::fmadd(p, z, Vec(0.02085685543715954f));
    p = at::vec::fmadd(p, z, Vec(-0.05380787327885628f));
    p = at::vec::fmadd(p, z, Vec(0.1333227902650833f));
    p = at::vec::fmadd(p, z, Vec(-0.3333331346511841f));
    const Vec small = at::vec::fmadd(x * z, p, x);
    const Vec large_abs = Vec(1.f) - Vec(2.f) / ((abs_x + abs_x).exp() + Vec(1.f));
    // Both branches take x's sign bit: large_abs is positive, and small has x's sign already
    // except for x = -0, where small comes out +0.
    const Vec sign = x & Vec(-0.f);
    return Vec::blendv(small, large_abs, abs_x >= Vec(0.625f)) | sign;
  }
};

}  // namespace

namespace cpu {
inline namespace CPU_CAPABILITY {

// Rows per parallel task: enough units (one unit = one (n, j) pair, a few transcendentals) that a
// task outweighs the cost of handing it to a thread, so small batches stay on one thread.
inline int64_t rows_per_task(int64_t hidden) {
  constexpr int64_t kUnitsPerTask = 8192;
  return std::max<int64_t>(1, kUnitsPerTask / std::max<int64_t>(hidden, 1));
}

// How a pass reads and writes values of type scalar_t: SIMD vectors of the compute type for the
// body of a row, one value at a time for its tail. float and double compute in their own type;
// bfloat16 and half compute in float (at::opmath_type), the convention for reduced precision: the
// gate math and the c update would lose most of their accuracy in an 8- or 11-bit mantissa.
template <typename scalar_t>
struct PointwiseIO {
  using compute_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<compute_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr bool kConverts = !std::is_same_v<scalar_t, compute_t>;

  static Vec load_vec(const scalar_t* p) {
    if constexpr (kConverts) {
      compute_t converted[kWidth];
      for (int64_t i = 0; i < kWidth; ++i) converted[i] = static_cast<compute_t>(p[i]);
      return Vec::loadu(converted);
    } else {
      return Vec::loadu(p);
    }
  }
  static void store_vec(scalar_t* p, const Vec& v) {
    if constexpr (kConverts) {
      compute_t converted[kWidth];
      v.store(converted);
      for (int64_t i = 0; i < kWidth; ++i) p[i] = static_cast<scalar_t>(converted[i]);
    } else {
      v.store(p);
    }
  }
  static compute_t load(const scalar_t* p) { return static_cast<compute_t>(*p); }
  static void store(scalar_t* p, compute_t v) { *p = static_cast<scalar_t>(v); }
};

// Loads, computes and stores one run of units of one row: `V` is a SIMD vector for the body of the
// row and the scalar type for its tail, so both go through the same lstm_cell_forward_unit.
template <typename scalar_t, bool kTraining, typename V, typename Load, typename Store>
inline void forward_units(scalar_t* gates, const scalar_t* c_prev, scalar_t* c, scalar_t* h,
                          int64_t hidden, int64_t j, Load load, Store store) {
  const GatePreActivations<V> pre{load(gates + j), load(gates + hidden + j),
                                  load(gates + 2 * hidden + j), load(gates + 3 * hidden + j)};
  const CellForwardResult<V> r = lstm_cell_forward_unit(pre, load(c_prev + j));
  store(c + j, r.c);
  store(h + j, r.h);
  if constexpr (kTraining) {
    store(gates + j, r.gates.i);
    store(gates + hidden + j, r.gates.f);
    store(gates + 2 * hidden + j, r.gates.g);
    store(gates + 3 * hidden + j, r.gates.o);
  }
}

template <typename scalar_t, bool kTraining>
void forward_step_typed(const ForwardStepArgs& a) {
  using IO = PointwiseIO<scalar_t>;
  using Vec = typename IO::Vec;
  using compute_t = typename IO::compute_t;
  constexpr int64_t kWidth = IO::kWidth;
  const int64_t hidden = a.hidden;
  auto* gates_base = static_cast<scalar_t*>(a.gates);
  const auto* c_prev_base = static_cast<const scalar_t*>(a.c_prev);
  auto* c_base = static_cast<scalar_t*>(a.c);
  auto* h_base = static_cast<scalar_t*>(a.h);
  const auto vec_load = [](const scalar_t* p) { return IO::load_vec(p); };
  const auto vec_store = [](scalar_t* p, Vec v) { IO::store_vec(p, v); };
  const auto scalar_load = [](const scalar_t* p) { return IO::load(p); };
  const auto scalar_store = [](scalar_t* p, compute_t v) { IO::store(p, v); };
  at::parallel_for(0, a.batch, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* gates = gates_base + n * 4 * hidden;
      const scalar_t* c_prev = c_prev_base + n * hidden;
      scalar_t* c = c_base + n * hidden;
      scalar_t* h = h_base + n * hidden;
      int64_t j = 0;
      for (; j + kWidth <= hidden; j += kWidth) {
        forward_units<scalar_t, kTraining, Vec>(gates, c_prev, c, h, hidden, j, vec_load, vec_store);
      }
      for (; j < hidden; ++j) {
        forward_units<scalar_t, kTraining, compute_t>(gates, c_prev, c, h, hidden, j, scalar_load,
                                                      scalar_store);
      }
    }
  });
}

template <typename scalar_t, typename V, typename Load, typename Store>
inline void backward_units(const BackwardStepArgs& a, int64_t n, int64_t j, Load load, Store store) {
  const int64_t hidden = a.hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates) + n * 4 * hidden;
  const int64_t row = n * hidden + j;
  const GateActivations<V> act{load(gates + j), load(gates + hidden + j),
                               load(gates + 2 * hidden + j), load(gates + 3 * hidden + j)};
  const V d_h = load(static_cast<const scalar_t*>(a.d_h_output) + row) +
                load(static_cast<const scalar_t*>(a.d_h_recurrent) + row);
  auto* d_c = static_cast<scalar_t*>(a.d_c) + row;
  const CellBackwardResult<V> r =
      lstm_cell_backward_unit(act, load(static_cast<const scalar_t*>(a.c) + row),
                              load(static_cast<const scalar_t*>(a.c_prev) + row), d_h, load(d_c));
  auto* d_gates = static_cast<scalar_t*>(a.d_gates) + n * 4 * hidden;
  store(d_gates + j, r.d_i);
  store(d_gates + hidden + j, r.d_f);
  store(d_gates + 2 * hidden + j, r.d_g);
  store(d_gates + 3 * hidden + j, r.d_o);
  store(d_c, r.d_c_prev);
}

template <typename scalar_t>
void backward_step_typed(const BackwardStepArgs& a) {
  using IO = PointwiseIO<scalar_t>;
  using Vec = typename IO::Vec;
  using compute_t = typename IO::compute_t;
  constexpr int64_t kWidth = IO::kWidth;
  const int64_t hidden = a.hidden;
  const auto vec_load = [](const scalar_t* p) { return IO::load_vec(p); };
  const auto vec_store = [](scalar_t* p, Vec v) { IO::store_vec(p, v); };
  const auto scalar_load = [](const scalar_t* p) { return IO::load(p); };
  const auto scalar_store = [](scalar_t* p, compute_t v) { IO::store(p, v); };
  at::parallel_for(0, a.batch, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t j = 0;
      for (; j + kWidth <= hidden; j += kWidth) {
        backward_units<scalar_t, Vec>(a, n, j, vec_load, vec_store);
      }
      for (; j < hidden; ++j) {
        backward_units<scalar_t, compute_t>(a, n, j, scalar_load, scalar_store);
      }
    }
  });
}

// The GRU's passes, laid out as the LSTM's above: SIMD body and scalar tail of each row through
// the same cell_math.h functions.
template <typename scalar_t, bool kTraining, typename V, typename Load, typename Store>
inline void gru_forward_units(const GruForwardStepArgs& a, int64_t n, int64_t j, Load load,
                              Store store) {
  const int64_t hidden = a.hidden;
  auto* gates = static_cast<scalar_t*>(a.gates) + n * 3 * hidden + j;
  const auto* recurrent = static_cast<const scalar_t*>(a.recurrent) + n * 3 * hidden + j;
  const int64_t unit = n * hidden + j;
  V hidden_n = load(recurrent + 2 * hidden);
  if (a.bias_hn != nullptr) {
    hidden_n = hidden_n + load(static_cast<const scalar_t*>(a.bias_hn) + j);
  }
  const GruPreActivations<V> pre{load(gates) + load(recurrent),
                                 load(gates + hidden) + load(recurrent + hidden),
                                 load(gates + 2 * hidden), hidden_n};
  const GruForwardResult<V> r =
      gru_cell_forward_unit(pre, load(static_cast<const scalar_t*>(a.h_prev) + unit));
  store(static_cast<scalar_t*>(a.h) + unit, r.h);
  if constexpr (kTraining) {
    store(gates, r.gates.r);
    store(gates + hidden, r.gates.z);
    store(gates + 2 * hidden, r.gates.n);
    store(static_cast<scalar_t*>(a.hidden_n) + unit, hidden_n);
  }
}

template <typename scalar_t, typename V, typename Load, typename Store>
inline void gru_backward_units(const GruBackwardStepArgs& a, int64_t n, int64_t j, Load load,
                               Store store) {
  const int64_t hidden = a.hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates) + n * 3 * hidden + j;
  const int64_t unit = n * hidden + j;
  auto* d_h = static_cast<scalar_t*>(a.d_h) + unit;
  const V d_h_total = load(static_cast<const scalar_t*>(a.d_h_output) + unit) + load(d_h);
  const GruActivations<V> act{load(gates), load(gates + hidden), load(gates + 2 * hidden)};
  const GruBackwardResult<V> r = gru_cell_backward_unit(
      act, load(static_cast<const scalar_t*>(a.hidden_n) + unit),
      load(static_cast<const scalar_t*>(a.h_prev) + unit), d_h_total);
  auto* d_gates = static_cast<scalar_t*>(a.d_gates) + n * 3 * hidden + j;
  store(d_gates, r.d_r);
  store(d_gates + hidden, r.d_z);
  store(d_gates + 2 * hidden, r.d_hidden_n);
  store(static_cast<scalar_t*>(a.d_input_n) + unit, r.d_input_n);
  store(d_h, r.d_h_prev);
}

// Runs units(n, j, load, store) over every unit of an N x H step: SIMD vectors over the body of
// each row, one value at a time over its tail.
template <typename scalar_t, typename Units>
void for_each_unit(int64_t batch, int64_t hidden, const Units& units) {
  using IO = PointwiseIO<scalar_t>;
  using Vec = typename IO::Vec;
  using compute_t = typename IO::compute_t;
  constexpr int64_t kWidth = IO::kWidth;
  const auto vec_load = [](const scalar_t* p) { return IO::load_vec(p); };
  const auto vec_store = [](scalar_t* p, Vec v) { IO::store_vec(p, v); };
  const auto scalar_load = [](const scalar_t* p) { return IO::load(p); };
  const auto scalar_store = [](scalar_t* p, compute_t v) { IO::store(p, v); };
  at::parallel_for(0, batch, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t j = 0;
      for (; j + kWidth <= hidden; j += kWidth) {
        units.template operator()<Vec>(n, j, vec_load, vec_store);
      }
      for (; j < hidden; ++j) {
        units.template operator()<compute_t>(n, j, scalar_load, scalar_store);
      }
    }
  });
}

// The LSTM variants' passes (peepholes, coupled gates); the plain LSTM keeps the passes above.

// The options of unit j: its peephole weights (rows w_ci, w_cf, w_co of peephole [3, H]).
template <typename V, typename scalar_t, typename Load>
inline LstmVariantUnit<V> variant_unit(const void* peephole, bool coupled, int64_t hidden,
                                       int64_t j, Load load) {
  if (peephole == nullptr) {
    return {false, coupled, V(0), V(0), V(0)};
  }
  const auto* p = static_cast<const scalar_t*>(peephole) + j;
  return {true, coupled, load(p), load(p + hidden), load(p + 2 * hidden)};
}

// Where gate k of a unit sits in a gates row: i, f, g, o, or with coupled gates i, g, o (no f).
struct GateOffsets {
  int64_t i, f, g, o;
  GateOffsets(bool coupled, int64_t hidden)
      : i(0), f(coupled ? -1 : hidden), g((coupled ? 1 : 2) * hidden),
        o((coupled ? 2 : 3) * hidden) {}
};

template <typename scalar_t, bool kTraining, typename V, typename Load, typename Store>
inline void variant_forward_units(const ForwardStepArgs& a, int64_t n, int64_t j, Load load,
                                  Store store) {
  const int64_t hidden = a.hidden;
  const GateOffsets at(a.coupled, hidden);
  auto* gates = static_cast<scalar_t*>(a.gates) + n * gate_count_of(a.coupled) * hidden + j;
  const int64_t unit = n * hidden + j;
  const V pre_i = load(gates + at.i);
  const GatePreActivations<V> pre{pre_i, a.coupled ? pre_i : load(gates + at.f),
                                  load(gates + at.g), load(gates + at.o)};
  const V c_prev = load(static_cast<const scalar_t*>(a.c_prev) + unit);
  const CellForwardResult<V> r = lstm_variant_forward_unit(
      pre, c_prev, variant_unit<V, scalar_t>(a.peephole, a.coupled, hidden, j, load));
  V c = r.c, h = r.h;
  if (a.zoneout) {
    const V keep_c = a.zoneout_c ? load(static_cast<const scalar_t*>(a.zoneout_c) + unit)
                                 : V(a.zoneout_p);
    const V keep_h = a.zoneout_h ? load(static_cast<const scalar_t*>(a.zoneout_h) + unit)
                                 : V(a.zoneout_p);
    c = r.c + keep_c * (c_prev - r.c);
    h = r.h + keep_h * (load(static_cast<const scalar_t*>(a.h_prev) + unit) - r.h);
    if constexpr (kTraining) {
      store(static_cast<scalar_t*>(a.c_new) + unit, r.c);
    }
  }
  store(static_cast<scalar_t*>(a.c) + unit, c);
  store(static_cast<scalar_t*>(a.h) + unit, h);
  if constexpr (kTraining) {
    store(gates + at.i, r.gates.i);
    if (!a.coupled) {
      store(gates + at.f, r.gates.f);
    }
    store(gates + at.g, r.gates.g);
    store(gates + at.o, r.gates.o);
  }
}

template <typename scalar_t, typename V, typename Load, typename Store>
inline void variant_backward_units(const BackwardStepArgs& a, int64_t n, int64_t j, Load load,
                                   Store store) {
  const int64_t hidden = a.hidden;
  const GateOffsets at(a.coupled, hidden);
  const int64_t row_width = gate_count_of(a.coupled) * hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates) + n * row_width + j;
  const int64_t unit = n * hidden + j;
  const V i = load(gates + at.i);
  const GateActivations<V> act{i, a.coupled ? V(1) - i : load(gates + at.f), load(gates + at.g),
                               load(gates + at.o)};
  V d_h = load(static_cast<const scalar_t*>(a.d_h_output) + unit) +
          load(static_cast<const scalar_t*>(a.d_h_recurrent) + unit);
  auto* d_c = static_cast<scalar_t*>(a.d_c) + unit;
  V d_c_t = load(d_c);
  // Zoneout: the kept share of each gradient goes straight to the previous state.
  V d_c_kept(0);
  if (a.zoneout) {
    const V keep_c = a.zoneout_c ? load(static_cast<const scalar_t*>(a.zoneout_c) + unit)
                                 : V(a.zoneout_p);
    const V keep_h = a.zoneout_h ? load(static_cast<const scalar_t*>(a.zoneout_h) + unit)
                                 : V(a.zoneout_p);
    store(static_cast<scalar_t*>(a.d_h_prev) + unit, keep_h * d_h);
    d_h = d_h - keep_h * d_h;
    d_c_kept = keep_c * d_c_t;
    d_c_t = d_c_t - d_c_kept;
  }
  CellBackwardResult<V> r = lstm_variant_backward_unit(
      act, load(static_cast<const scalar_t*>(a.c) + unit),
      load(static_cast<const scalar_t*>(a.c_prev) + unit), d_h, d_c_t,
      variant_unit<V, scalar_t>(a.peephole, a.coupled, hidden, j, load));
  r.d_c_prev = r.d_c_prev + d_c_kept;
  auto* d_gates = static_cast<scalar_t*>(a.d_gates) + n * row_width + j;
  store(d_gates + at.i, r.d_i);
  if (!a.coupled) {
    store(d_gates + at.f, r.d_f);
  }
  store(d_gates + at.g, r.d_g);
  store(d_gates + at.o, r.d_o);
  store(d_c, r.d_c_prev);
}

template <typename scalar_t, bool kTraining>
struct VariantForwardUnits {
  const ForwardStepArgs& args;
  template <typename V, typename Load, typename Store>
  void operator()(int64_t n, int64_t j, Load load, Store store) const {
    variant_forward_units<scalar_t, kTraining, V>(args, n, j, load, store);
  }
};

template <typename scalar_t>
struct VariantBackwardUnits {
  const BackwardStepArgs& args;
  template <typename V, typename Load, typename Store>
  void operator()(int64_t n, int64_t j, Load load, Store store) const {
    variant_backward_units<scalar_t, V>(args, n, j, load, store);
  }
};

// for_each_unit's callables for the GRU passes.
template <typename scalar_t, bool kTraining>
struct GruForwardUnits {
  const GruForwardStepArgs& args;
  template <typename V, typename Load, typename Store>
  void operator()(int64_t n, int64_t j, Load load, Store store) const {
    gru_forward_units<scalar_t, kTraining, V>(args, n, j, load, store);
  }
};

template <typename scalar_t>
struct GruBackwardUnits {
  const GruBackwardStepArgs& args;
  template <typename V, typename Load, typename Store>
  void operator()(int64_t n, int64_t j, Load load, Store store) const {
    gru_backward_units<scalar_t, V>(args, n, j, load, store);
  }
};

// The layer-norm LSTM's passes (cell_math.h): one row of the batch at a time, by one thread, in
// three passes over the row (reduce, unit math, reduce, finish), so a row's results do not depend
// on the thread count.

// A tag naming the value type a row callback runs with: SIMD vectors for the body of a row, the
// compute scalar for its tail.
template <typename V>
struct ValueType {
  using type = V;
};

template <typename scalar_t, typename V>
inline V load_as(const scalar_t* p) {
  using IO = PointwiseIO<scalar_t>;
  if constexpr (std::is_same_v<V, typename IO::Vec>) {
    return IO::load_vec(p);
  } else {
    return IO::load(p);
  }
}

template <typename scalar_t, typename V>
inline void store_as(scalar_t* p, V v) {
  using IO = PointwiseIO<scalar_t>;
  if constexpr (std::is_same_v<V, typename IO::Vec>) {
    IO::store_vec(p, v);
  } else {
    IO::store(p, v);
  }
}

// Calls f(ValueType<V>{}, j) over j in [0, width): vectors over the body, scalars over the tail.
template <typename scalar_t, typename F>
inline void for_each_in_row(int64_t width, const F& f) {
  using IO = PointwiseIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kWidth <= width; j += IO::kWidth) {
    f(ValueType<typename IO::Vec>{}, j);
  }
  for (; j < width; ++j) {
    f(ValueType<typename IO::compute_t>{}, j);
  }
}

// A sum over a row in a fixed order: one SIMD accumulator for the body, one scalar for the tail.
template <typename scalar_t>
struct RowSum {
  using IO = PointwiseIO<scalar_t>;
  typename IO::Vec body = typename IO::Vec(0);
  typename IO::compute_t tail = 0;
  void add(typename IO::Vec v) { body = body + v; }
  void add(typename IO::compute_t v) { tail += v; }
  typename IO::compute_t total() const {
    typename IO::compute_t lanes[IO::kWidth];
    body.store(lanes);
    typename IO::compute_t sum = 0;
    for (int64_t i = 0; i < IO::kWidth; ++i) sum += lanes[i];
    return sum + tail;
  }
};

// Mean and reciprocal standard deviation of a row (two passes: the variance of deviations from
// the mean, which cancels nothing).
template <typename scalar_t>
inline std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> row_moments(
    const scalar_t* x, int64_t width) {
  using compute_t = at::opmath_type<scalar_t>;
  RowSum<scalar_t> sum;
  for_each_in_row<scalar_t>(width, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    sum.add(load_as<scalar_t, V>(x + j));
  });
  const compute_t mean = sum.total() / static_cast<compute_t>(width);
  RowSum<scalar_t> squares;
  for_each_in_row<scalar_t>(width, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const V deviation = load_as<scalar_t, V>(x + j) - V(mean);
    squares.add(deviation * deviation);
  });
  const compute_t variance = squares.total() / static_cast<compute_t>(width);
  return {mean, compute_t(1) / std::sqrt(variance + static_cast<compute_t>(kLayerNormEps))};
}

template <typename scalar_t, bool kTraining>
void layer_norm_forward_row(const ForwardStepArgs& a, int64_t n) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t hidden = a.hidden, width = gate_count_of(a.coupled) * hidden;
  const GateOffsets at(a.coupled, hidden);
  const auto& ln = a.ln;
  const auto* recurrent = static_cast<const scalar_t*>(ln.recurrent) + n * width;
  auto* gates = static_cast<scalar_t*>(a.gates) + n * width;
  const auto* weight_hh = static_cast<const scalar_t*>(ln.weight_hh);
  const auto* c_prev = static_cast<const scalar_t*>(a.c_prev) + n * hidden;
  // h_t's row holds c_t (before zoneout) between the passes: `c` may alias c_prev, which zoneout
  // reads in the last pass.
  auto* h = static_cast<scalar_t*>(a.h) + n * hidden;
  auto* norm_hh = kTraining ? static_cast<scalar_t*>(ln.norm_hh) + n * width : nullptr;

  const auto moments_hh = row_moments(recurrent, width);
  const compute_t mean_hh = moments_hh.first, rstd_hh = moments_hh.second;
  for_each_in_row<scalar_t>(hidden, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    // The pre-activation of the gate at `offset`: input share + γ_hh LN(recurrent).
    const auto pre = [&](int64_t offset) {
      const V normalized = (load(recurrent + offset + j) - V(mean_hh)) * V(rstd_hh);
      if constexpr (kTraining) {
        store_as<scalar_t, V>(norm_hh + offset + j, normalized);
      }
      return load(gates + offset + j) + load(weight_hh + offset + j) * normalized;
    };
    const V pre_i = pre(at.i);
    const GatePreActivations<V> pre_all{pre_i, a.coupled ? pre_i : pre(at.f), pre(at.g),
                                        pre(at.o)};
    const CellForwardResult<V> r = lstm_variant_state_unit(
        pre_all, load(c_prev + j), variant_unit<V, scalar_t>(a.peephole, a.coupled, hidden, j, load));
    store_as<scalar_t, V>(gates + at.i + j, r.gates.i);
    if (!a.coupled) {
      store_as<scalar_t, V>(gates + at.f + j, r.gates.f);
    }
    store_as<scalar_t, V>(gates + at.g + j, r.gates.g);
    store_as<scalar_t, V>(gates + at.o + j, r.gates.o);
    store_as<scalar_t, V>(h + j, r.c);
  });

  const auto moments_c = row_moments(static_cast<const scalar_t*>(h), hidden);
  const compute_t mean_c = moments_c.first, rstd_c = moments_c.second;
  const auto* weight_c = static_cast<const scalar_t*>(ln.weight_c);
  const auto* bias_c = static_cast<const scalar_t*>(ln.bias_c);
  const int64_t row = n * hidden;
  for_each_in_row<scalar_t>(hidden, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    const V c_new = load(h + j);
    const V normalized = (c_new - V(mean_c)) * V(rstd_c);
    const V c_out = load(weight_c + j) * normalized + load(bias_c + j);
    V h_new = load(gates + at.o + j) * Activations<V>::tanh(c_out);
    V c = c_new;
    if (a.zoneout) {
      const V keep_c = a.zoneout_c ? load(static_cast<const scalar_t*>(a.zoneout_c) + row + j)
                                   : V(static_cast<compute_t>(a.zoneout_p));
      const V keep_h = a.zoneout_h ? load(static_cast<const scalar_t*>(a.zoneout_h) + row + j)
                                   : V(static_cast<compute_t>(a.zoneout_p));
      c = c_new + keep_c * (load(c_prev + j) - c_new);
      h_new = h_new + keep_h * (load(static_cast<const scalar_t*>(a.h_prev) + row + j) - h_new);
      if constexpr (kTraining) {
        store_as<scalar_t, V>(static_cast<scalar_t*>(a.c_new) + row + j, c_new);
      }
    }
    if constexpr (kTraining) {
      store_as<scalar_t, V>(static_cast<scalar_t*>(ln.norm_c) + row + j, normalized);
    }
    store_as<scalar_t, V>(static_cast<scalar_t*>(a.c) + row + j, c);
    store_as<scalar_t, V>(h + j, h_new);
  });
  if constexpr (kTraining) {
    auto* rstd = static_cast<scalar_t*>(ln.rstd) + 2 * n;
    rstd[0] = static_cast<scalar_t>(rstd_hh);
    rstd[1] = static_cast<scalar_t>(rstd_c);
  }
}

template <typename scalar_t>
void layer_norm_backward_row(const BackwardStepArgs& a, int64_t n) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t hidden = a.hidden, width = gate_count_of(a.coupled) * hidden;
  const GateOffsets at(a.coupled, hidden);
  const auto& ln = a.ln;
  const int64_t row = n * hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates) + n * width;
  const auto* norm_hh = static_cast<const scalar_t*>(ln.norm_hh) + n * width;
  const auto* norm_c = static_cast<const scalar_t*>(ln.norm_c) + row;
  const auto* weight_hh = static_cast<const scalar_t*>(ln.weight_hh);
  const auto* weight_c = static_cast<const scalar_t*>(ln.weight_c);
  const auto* bias_c = static_cast<const scalar_t*>(ln.bias_c);
  const auto* d_h_output = static_cast<const scalar_t*>(a.d_h_output) + row;
  const auto* d_h_recurrent = static_cast<const scalar_t*>(a.d_h_recurrent) + row;
  auto* d_c_out = static_cast<scalar_t*>(ln.d_c_out) + row;
  auto* d_gates = static_cast<scalar_t*>(a.d_gates) + n * width;
  const compute_t rstd_hh = static_cast<compute_t>(static_cast<const scalar_t*>(ln.rstd)[2 * n]);
  const compute_t rstd_c =
      static_cast<compute_t>(static_cast<const scalar_t*>(ln.rstd)[2 * n + 1]);

  // d_h_t, the share not kept by zoneout, and the keep weight of h.
  const auto new_share_of_d_h = [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const V d_h = load_as<scalar_t, V>(d_h_output + j) + load_as<scalar_t, V>(d_h_recurrent + j);
    if (!a.zoneout) {
      return std::pair<V, V>{d_h, V(0)};
    }
    const V keep_h = a.zoneout_h ? load_as<scalar_t, V>(static_cast<const scalar_t*>(a.zoneout_h) + row + j)
                                 : V(static_cast<compute_t>(a.zoneout_p));
    return std::pair<V, V>{d_h - keep_h * d_h, keep_h * d_h};
  };
  // tanh(LN(c_t) γ_c + β_c), recomputed from the saved normalization.
  const auto tanh_c_out = [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    return Activations<V>::tanh(load(weight_c + j) * load(norm_c + j) + load(bias_c + j));
  };

  // Pass 1: the gradient of c_t's normalized output, and its row means.
  RowSum<scalar_t> sum_d, sum_d_normalized;
  for_each_in_row<scalar_t>(hidden, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    const V d_h = new_share_of_d_h(type, j).first;
    const V t = tanh_c_out(type, j);
    const V d_out = d_h * load(gates + at.o + j) * (V(1) - t * t);
    store_as<scalar_t, V>(d_c_out + j, d_out);
    const V d_normalized = d_out * load(weight_c + j);
    sum_d.add(d_normalized);
    sum_d_normalized.add(d_normalized * load(norm_c + j));
  });
  const compute_t mean_d_c = sum_d.total() / static_cast<compute_t>(hidden);
  const compute_t mean_dn_c = sum_d_normalized.total() / static_cast<compute_t>(hidden);

  // Pass 2: the gates' gradients, d c_{t-1}, and the row means for the recurrent normalization.
  RowSum<scalar_t> sum_d_hh, sum_dn_hh;
  auto* d_c = static_cast<scalar_t*>(a.d_c) + row;
  for_each_in_row<scalar_t>(hidden, [&](auto type, int64_t j) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    const auto [d_h, d_h_kept] = new_share_of_d_h(type, j);
    const V i = load(gates + at.i + j), o = load(gates + at.o + j);
    const GateActivations<V> act{i, a.coupled ? V(1) - i : load(gates + at.f + j),
                                 load(gates + at.g + j), o};
    const V t = tanh_c_out(type, j);
    const V d_o = d_h * t * o * (V(1) - o);
    const V d_c_ln = layer_norm_input_gradient(load(d_c_out + j) * load(weight_c + j),
                                               load(norm_c + j), V(rstd_c), V(mean_d_c),
                                               V(mean_dn_c));
    V d_c_t = load(d_c + j);
    V d_c_kept(0);
    if (a.zoneout) {
      const V keep_c = a.zoneout_c ? load(static_cast<const scalar_t*>(a.zoneout_c) + row + j)
                                   : V(static_cast<compute_t>(a.zoneout_p));
      d_c_kept = keep_c * d_c_t;
      d_c_t = d_c_t - d_c_kept;
      // After the last read of d_h_recurrent[j], which d_h_prev may alias.
      store_as<scalar_t, V>(static_cast<scalar_t*>(a.d_h_prev) + row + j, d_h_kept);
    }
    const CellBackwardResult<V> r = lstm_variant_gate_gradients(
        act, load(static_cast<const scalar_t*>(a.c_prev) + row + j), d_o, d_c_t + d_c_ln,
        variant_unit<V, scalar_t>(a.peephole, a.coupled, hidden, j, load));
    store_as<scalar_t, V>(d_c + j, r.d_c_prev + d_c_kept);
    const auto gate = [&](int64_t offset, V d_pre) {
      store_as<scalar_t, V>(d_gates + offset + j, d_pre);
      const V d_normalized = d_pre * load(weight_hh + offset + j);
      sum_d_hh.add(d_normalized);
      sum_dn_hh.add(d_normalized * load(norm_hh + offset + j));
    };
    gate(at.i, r.d_i);
    if (!a.coupled) {
      gate(at.f, r.d_f);
    }
    gate(at.g, r.d_g);
    gate(at.o, r.d_o);
  });
  const compute_t mean_d_hh = sum_d_hh.total() / static_cast<compute_t>(width);
  const compute_t mean_dn_hh = sum_dn_hh.total() / static_cast<compute_t>(width);

  // Pass 3: the gradient of the un-normalized recurrent product.
  auto* d_recurrent = static_cast<scalar_t*>(ln.d_recurrent) + n * width;
  for_each_in_row<scalar_t>(width, [&](auto type, int64_t e) {
    using V = typename decltype(type)::type;
    const auto load = [](const scalar_t* p) { return load_as<scalar_t, V>(p); };
    store_as<scalar_t, V>(
        d_recurrent + e,
        layer_norm_input_gradient(load(d_gates + e) * load(weight_hh + e), load(norm_hh + e),
                                  V(rstd_hh), V(mean_d_hh), V(mean_dn_hh)));
  });
}

template <typename scalar_t>
void layer_norm_forward_step(const ForwardStepArgs& args) {
  const int64_t width = gate_count_of(args.coupled) * args.hidden;
  at::parallel_for(0, args.batch, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (args.training) {
        layer_norm_forward_row<scalar_t, true>(args, n);
      } else {
        layer_norm_forward_row<scalar_t, false>(args, n);
      }
    }
  });
}

template <typename scalar_t>
void layer_norm_backward_step(const BackwardStepArgs& args) {
  const int64_t width = gate_count_of(args.coupled) * args.hidden;
  at::parallel_for(0, args.batch, rows_per_task(width), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      layer_norm_backward_row<scalar_t>(args, n);
    }
  });
}

inline void gru_forward_step(const GruForwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dtype, "lstm_ext_cpu_gru_forward_step", [&] {
        if (args.training) {
          for_each_unit<scalar_t>(args.batch, args.hidden, GruForwardUnits<scalar_t, true>{args});
        } else {
          for_each_unit<scalar_t>(args.batch, args.hidden, GruForwardUnits<scalar_t, false>{args});
        }
      });
}

inline void gru_backward_step(const GruBackwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dtype, "lstm_ext_cpu_gru_backward_step", [&] {
        for_each_unit<scalar_t>(args.batch, args.hidden, GruBackwardUnits<scalar_t>{args});
      });
}

inline void forward_step(const ForwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lstm_ext_cpu_forward_step", [&] {
    if (args.layer_norm) {
      layer_norm_forward_step<scalar_t>(args);
    } else if (args.peephole != nullptr || args.coupled || args.zoneout) {
      if (args.training) {
        for_each_unit<scalar_t>(args.batch, args.hidden, VariantForwardUnits<scalar_t, true>{args});
      } else {
        for_each_unit<scalar_t>(args.batch, args.hidden, VariantForwardUnits<scalar_t, false>{args});
      }
    } else if (args.training) {
      forward_step_typed<scalar_t, true>(args);
    } else {
      forward_step_typed<scalar_t, false>(args);
    }
  });
}

inline void backward_step(const BackwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lstm_ext_cpu_backward_step",
                                  [&] {
    if (args.layer_norm) {
      layer_norm_backward_step<scalar_t>(args);
    } else if (args.peephole != nullptr || args.coupled || args.zoneout) {
      for_each_unit<scalar_t>(args.batch, args.hidden, VariantBackwardUnits<scalar_t>{args});
    } else {
      backward_step_typed<scalar_t>(args);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_ext
