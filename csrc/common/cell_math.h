// The cells' unit math (LSTM, GRU), written once for host and device.
//
// Every function here is a template over the value type `V`: the CUDA kernels instantiate it with a
// scalar (float, or double for float64; half types compute in float), the CPU pass with a SIMD vector
// (at::vec::Vectorized<T>) and with the plain scalar for the tail of each row. So the CPU tests run
// the exact arithmetic the GPU runs. This header includes no torch headers on purpose: kernel files
// that include it stay cheap to compile.
//
// Gate order is i, f, g, o, exactly as torch.nn.LSTM. One "unit" is one (n, j) pair, n < N, j < H.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_HOST_DEVICE __host__ __device__
#else
#define LSTM_HOST_DEVICE
#endif

namespace lstm_ext {
// Internal linkage on purpose: the CPU pass compiles these templates once per instruction set (see
// cpu/lstm_pointwise_impl.h). With external linkage the linker would keep one copy of, say, the
// scalar instantiation, possibly the AVX2-compiled one, and run it on a CPU without AVX2.
namespace {

// The transcendental functions for a value type. The primary template serves scalars; the CPU pass
// specializes it for SIMD vectors. A traits struct (rather than free overloads) lets the
// specialization live in the CPU file, after this header, and still be found by the templates below.
template <typename V>
struct Activations {
  static LSTM_HOST_DEVICE inline V sigmoid(V x) {
    // std:: overloads keep float64 in double precision (no float-only intrinsics such as expf).
    return V(1) / (V(1) + std::exp(-x));
  }
  static LSTM_HOST_DEVICE inline V tanh(V x) { return std::tanh(x); }
};

// Pre-activations of one unit's four gates, as produced by the GEMMs (biases already added).
template <typename V>
struct GatePreActivations {
  V i, f, g, o;
};

// Activated gates of one unit: what training saves for backward.
template <typename V>
struct GateActivations {
  V i, f, g, o;
};

template <typename V>
struct CellForwardResult {
  GateActivations<V> gates;
  V c;  // c_t
  V h;  // h_t
};

// c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t).
template <typename V>
LSTM_HOST_DEVICE inline CellForwardResult<V> lstm_cell_forward_unit(const GatePreActivations<V>& pre,
                                                                    V c_prev) {
  using Act = Activations<V>;
  CellForwardResult<V> r;
  r.gates.i = Act::sigmoid(pre.i);
  r.gates.f = Act::sigmoid(pre.f);
  r.gates.g = Act::tanh(pre.g);
  r.gates.o = Act::sigmoid(pre.o);
  r.c = r.gates.f * c_prev + r.gates.i * r.gates.g;
  r.h = r.gates.o * Act::tanh(r.c);
  return r;
}

// Gradients of the gate pre-activations of one unit, and of c_{t-1}.
template <typename V>
struct CellBackwardResult {
  V d_i, d_f, d_g, d_o;  // d loss / d pre-activation
  V d_c_prev;
};

// The mirror of lstm_cell_forward_unit. Derivatives come from the saved outputs
// (σ' = y(1 − y), tanh' = 1 − y²), so nothing but tanh(c_t) is recomputed.
//   d_h: total gradient reaching h_t (from the output and from step t+1's recurrent GEMM)
//   d_c: gradient reaching c_t from step t+1
template <typename V>
LSTM_HOST_DEVICE inline CellBackwardResult<V> lstm_cell_backward_unit(const GateActivations<V>& a,
                                                                      V c, V c_prev, V d_h, V d_c) {
  using Act = Activations<V>;
  const V one(1);
  const V tanh_c = Act::tanh(c);
  const V d_c_total = d_c + d_h * a.o * (one - tanh_c * tanh_c);
  CellBackwardResult<V> r;
  r.d_o = d_h * tanh_c * a.o * (one - a.o);
  r.d_i = d_c_total * a.g * a.i * (one - a.i);
  r.d_g = d_c_total * a.i * (one - a.g * a.g);
  r.d_f = d_c_total * c_prev * a.f * (one - a.f);
  r.d_c_prev = d_c_total * a.f;
  return r;
}

// ---------------------------------------------------------------------------------------------
// LSTM variants: peephole connections (Gers & Schmidhuber 2000; ONNX's P input) and coupled input
// and forget gates (CIFG, f = 1 − i; Greff et al. 2015), alone or together. The plain LSTM keeps
// the functions above, so its kernels do not pay for the options.
//   i = σ(pre_i + w_ci c_{t−1}),  f = σ(pre_f + w_cf c_{t−1}) or 1 − i,  g = tanh(pre_g),
//   c_t = f c_{t−1} + i g,  o = σ(pre_o + w_co c_t),  h_t = o tanh(c_t).

// One unit's options: the peephole weights of its hidden unit (when `peephole`), and CIFG.
template <typename V>
struct LstmVariantUnit {
  bool peephole;
  bool coupled;
  V w_ci, w_cf, w_co;
};

// The gates and c_t of one unit (r.h not set): what every variant computes before h_t. With
// coupled gates `pre.f` is not read; the result's gates.f is 1 − i all the same.
template <typename V>
LSTM_HOST_DEVICE inline CellForwardResult<V> lstm_variant_state_unit(
    const GatePreActivations<V>& pre, V c_prev, const LstmVariantUnit<V>& variant) {
  using Act = Activations<V>;
  const V one(1);
  CellForwardResult<V> r;
  r.gates.i = Act::sigmoid(variant.peephole ? pre.i + variant.w_ci * c_prev : pre.i);
  r.gates.f = variant.coupled ? one - r.gates.i
                              : Act::sigmoid(variant.peephole ? pre.f + variant.w_cf * c_prev
                                                              : pre.f);
  r.gates.g = Act::tanh(pre.g);
  r.c = r.gates.f * c_prev + r.gates.i * r.gates.g;
  r.gates.o = Act::sigmoid(variant.peephole ? pre.o + variant.w_co * r.c : pre.o);
  return r;
}

template <typename V>
LSTM_HOST_DEVICE inline CellForwardResult<V> lstm_variant_forward_unit(
    const GatePreActivations<V>& pre, V c_prev, const LstmVariantUnit<V>& variant) {
  CellForwardResult<V> r = lstm_variant_state_unit(pre, c_prev, variant);
  r.h = r.gates.o * Activations<V>::tanh(r.c);
  return r;
}

// The mirror of lstm_variant_forward_unit (a.f = 1 − a.i with coupled gates; d_f is then 0). The
// peephole weights' own gradients are sums over the batch and time of d_i c_{t−1}, d_f c_{t−1} and
// d_o c_t, which the time loop forms after the recurrence.
//
// lstm_variant_gate_gradients is its second half, from the gradient of the output gate's
// pre-activation d_o and d_c_total, everything that reaches c_t except through o's peephole (the
// layer-norm step computes both its own way).
template <typename V>
LSTM_HOST_DEVICE inline CellBackwardResult<V> lstm_variant_gate_gradients(
    const GateActivations<V>& a, V c_prev, V d_o, V d_c_total, const LstmVariantUnit<V>& variant) {
  const V one(1);
  CellBackwardResult<V> r;
  r.d_o = d_o;
  if (variant.peephole) {
    d_c_total = d_c_total + r.d_o * variant.w_co;  // o reads c_t
  }
  r.d_g = d_c_total * a.i * (one - a.g * a.g);
  if (variant.coupled) {
    // c_t = (1 − i) c_{t−1} + i g: i's gradient has both terms.
    r.d_i = d_c_total * (a.g - c_prev) * a.i * (one - a.i);
    r.d_f = V(0);
  } else {
    r.d_i = d_c_total * a.g * a.i * (one - a.i);
    r.d_f = d_c_total * c_prev * a.f * (one - a.f);
  }
  r.d_c_prev = d_c_total * a.f;
  if (variant.peephole) {
    r.d_c_prev = r.d_c_prev + r.d_i * variant.w_ci;
    if (!variant.coupled) {
      r.d_c_prev = r.d_c_prev + r.d_f * variant.w_cf;
    }
  }
  return r;
}

template <typename V>
LSTM_HOST_DEVICE inline CellBackwardResult<V> lstm_variant_backward_unit(
    const GateActivations<V>& a, V c, V c_prev, V d_h, V d_c, const LstmVariantUnit<V>& variant) {
  const V one(1);
  const V tanh_c = Activations<V>::tanh(c);
  return lstm_variant_gate_gradients(a, c_prev, d_h * tanh_c * a.o * (one - a.o),
                                     d_c + d_h * a.o * (one - tanh_c * tanh_c), variant);
}

// ---------------------------------------------------------------------------------------------
// The layer-norm LSTM (Ba et al. 2016; haste's LayerNormLSTM), with any of the options above:
//   pre = LN(x W_ih^T) γ_ih + b_ih + b_hh + LN(h_{t−1} W_hh^T) γ_hh   (each LN over the row's G*H)
//   gates and c_t as lstm_variant_state_unit,  h_t = o tanh(LN(c_t) γ_c + β_c)   (LN over H)
// LN(x) = (x − mean) rstd with rstd = 1 / sqrt(var + eps), var the biased variance of the row.
// The input's share is a plain layer_norm over all steps at once (the caller's); the recurrent
// one and c_t's are per step, and each needs its whole row's mean and variance before any unit
// can go on, so a step is three passes over a row: reduce, unit math, reduce, finish. These are
// the per-unit parts, between the reductions.

// torch.nn.functional.layer_norm's default.
constexpr double kLayerNormEps = 1e-5;

// Backward of y = LN(x) γ for one row, given d_ŷ = d_y γ per element and the row's means of d_ŷ
// and d_ŷ x̂: d_x = rstd (d_ŷ − mean(d_ŷ) − x̂ mean(d_ŷ x̂)).
template <typename V>
LSTM_HOST_DEVICE inline V layer_norm_input_gradient(V d_normalized, V normalized, V rstd,
                                                    V mean_d, V mean_d_normalized) {
  return rstd * (d_normalized - mean_d - normalized * mean_d_normalized);
}

// ---------------------------------------------------------------------------------------------
// GRU, torch.nn.GRU's form. Gate order r, z, n. The recurrent product of the n gate, W_hn h + b_hn,
// stays apart from the input's until r multiplies it:
//   r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz),
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 − z) n + z h = n + z (h − n).

// What the GEMMs give one unit: the full pre-activations of r and z, and the two halves of n's.
template <typename V>
struct GruPreActivations {
  V r, z;      // both products and both biases
  V input_n;   // W_in x + b_in
  V hidden_n;  // W_hn h + b_hn
};

// What training saves for backward: the activated r, z, n (hidden_n is saved beside them).
template <typename V>
struct GruActivations {
  V r, z, n;
};

template <typename V>
struct GruForwardResult {
  GruActivations<V> gates;
  V h;  // h_t
};

template <typename V>
LSTM_HOST_DEVICE inline GruForwardResult<V> gru_cell_forward_unit(const GruPreActivations<V>& pre,
                                                                  V h_prev) {
  using Act = Activations<V>;
  GruForwardResult<V> result;
  result.gates.r = Act::sigmoid(pre.r);
  result.gates.z = Act::sigmoid(pre.z);
  result.gates.n = Act::tanh(pre.input_n + result.gates.r * pre.hidden_n);
  // ATen's fused GRU cell computes n + z (h − n), one multiply fewer than (1 − z) n + z h.
  result.h = result.gates.n + result.gates.z * (h_prev - result.gates.n);
  return result;
}

template <typename V>
struct GruBackwardResult {
  V d_r, d_z;     // d loss / d pre-activation of r and z (both GEMMs alike)
  V d_input_n;    // d loss / d (W_in x + b_in)
  V d_hidden_n;   // d loss / d (W_hn h + b_hn) = d_input_n * r
  V d_h_prev;     // the direct part of d loss / d h_{t-1} (z d_h); W_hh's product adds the rest
};

// The mirror of gru_cell_forward_unit, from the saved activations and hidden_n.
//   d_h: total gradient reaching h_t (from the output, from step t+1's GEMM and its direct path)
template <typename V>
LSTM_HOST_DEVICE inline GruBackwardResult<V> gru_cell_backward_unit(const GruActivations<V>& a,
                                                                    V hidden_n, V h_prev, V d_h) {
  const V one(1);
  GruBackwardResult<V> result;
  const V d_n = d_h * (one - a.z);
  result.d_z = d_h * (h_prev - a.n) * a.z * (one - a.z);
  result.d_input_n = d_n * (one - a.n * a.n);
  result.d_hidden_n = result.d_input_n * a.r;
  result.d_r = result.d_input_n * hidden_n * a.r * (one - a.r);
  result.d_h_prev = d_h * a.z;
  return result;
}

}  // namespace
}  // namespace lstm_ext
