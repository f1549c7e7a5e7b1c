// The contract between the device-agnostic time loop (lstm_sequence.cpp) and a device's fused
// pointwise passes: raw pointers and sizes, no tensors. It lives apart from lstm_sequence.h, which
// pulls in ATen's Tensor, so that device kernel files can include it and stay cheap to compile
// (a .cu file's compile time is dominated by the torch headers it includes).
//
// Shapes: N batch, H hidden size.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lstm_ext {

// The cells the time loop runs. All keep h_t; the LSTMs also a cell state c_t. kLstmCoupled is the
// LSTM with coupled input and forget gates (f = 1 - i), whose weights have no forget rows. (The
// LSTM's peephole option changes no shape: it travels as the peephole weights beside the cell.)
enum class Cell { kLstm, kLstmCoupled, kGru };

inline constexpr bool is_lstm(Cell cell) { return cell != Cell::kGru; }

// Rows of w_ih and w_hh per hidden unit: the LSTM's i, f, g, o (coupled: i, g, o); the GRU's
// r, z, n.
inline constexpr int64_t gate_count(Cell cell) { return cell == Cell::kLstm ? 4 : 3; }
// The LSTM's, with or without coupled gates.
inline constexpr int64_t gate_count_of(bool coupled) { return coupled ? 3 : 4; }

// One step of the LSTM's forward pointwise pass, over N x H units. Raw pointers keep the device kernel
// files free of heavy headers; every buffer is contiguous, rows of length 4H (gates) or H.
struct ForwardStepArgs {
  void* gates;         // [N, 4H] in: pre-activations (biases included); out, when training: activations
  const void* c_prev;  // [N, H]  c_{t-1}
  void* c;             // [N, H]  out: c_t (may alias c_prev)
  void* h;             // [N, H]  out: h_t
  int64_t batch;       // N
  int64_t hidden;      // H
  bool training;       // save the activated gates in place of the pre-activations
  // The variants: peephole weights [3, H] (w_ci, w_cf, w_co) or null; coupled gates, with gates
  // rows [N, 3H] of i, g, o (f = 1 - i). A coupled step saves i, g, o.
  const void* peephole = nullptr;
  bool coupled = false;
  // Zoneout (Krueger et al. 2016): each unit of c_t and h_t keeps its previous value with weight
  // m, c_t = c_new + m_c (c_{t-1} - c_new) and likewise h_t. In training m is a 0/1 mask [N, H]
  // (zoneout_c, zoneout_h); in eval the constant zoneout_p (masks null).
  bool zoneout = false;
  const void* zoneout_h = nullptr;
  const void* zoneout_c = nullptr;
  double zoneout_p = 0;
  const void* h_prev = nullptr;  // [N, H] h_{t-1}, read with zoneout
  void* c_new = nullptr;         // [N, H] out with zoneout when training: c_t before zoneout
  // Layer norm (Ba et al. 2016, haste's LayerNormLSTM; see LayerNormStep). `gates` then holds
  // only the input's share of the pre-activations (normalized, gained, biased), the recurrent
  // product arrives apart in layer_norm.recurrent, and the pass always leaves the activated gates
  // in `gates` (inference included: it reads o back after normalizing c_t). A layer-norm step
  // needs whole rows (its normalizations reduce over them), so a device runs a row in one go.
  bool layer_norm = false;
  struct LayerNormStep {
    const void* recurrent = nullptr;  // [N, G*H] h_{t-1} W_hh^T, not normalized
    const void* weight_hh = nullptr;  // [G*H] gain of the recurrent product's normalization
    const void* weight_c = nullptr;   // [H] gain of c_t's normalization
    const void* bias_c = nullptr;     // [H] its bias
    // Out when training: the normalized recurrent product [N, G*H] and normalized c_t [N, H]
    // (before gains and bias), and the rows' reciprocal standard deviations [N, 2]
    // (recurrent's, c_t's).
    void* norm_hh = nullptr;
    void* norm_c = nullptr;
    void* rstd = nullptr;
  } ln;
};

// One step of the LSTM's backward pointwise pass.
struct BackwardStepArgs {
  const void* gates;        // [N, 4H] saved activations of step t
  const void* c;            // [N, H]  saved c_t
  const void* c_prev;       // [N, H]  c_{t-1}
  const void* d_h_output;   // [N, H]  gradient of output[t]
  const void* d_h_recurrent;  // [N, H] gradient reaching h_t through step t+1 (or from h_n)
  void* d_c;                // [N, H]  in: gradient reaching c_t; out: gradient of c_{t-1} (in place)
  void* d_gates;            // [N, 4H] out: gradient of the gate pre-activations
  int64_t batch;
  int64_t hidden;
  const void* peephole = nullptr;  // as ForwardStepArgs (coupled: gates and d_gates [N, 3H])
  bool coupled = false;
  // Zoneout, as ForwardStepArgs. `c` is then c_t before zoneout, and d_h_prev [N, H] receives the
  // direct part m_h * d_h_t of h_{t-1}'s gradient (it may alias d_h_recurrent); the recurrent
  // GEMM then accumulates onto it.
  bool zoneout = false;
  const void* zoneout_h = nullptr;
  const void* zoneout_c = nullptr;
  double zoneout_p = 0;
  void* d_h_prev = nullptr;
  // Layer norm, the mirror of ForwardStepArgs::ln: norm_hh, norm_c and rstd are the saved
  // normalizations of step t (in); d_gates receives the gradient of the pre-activations, which is
  // the input share's; d_recurrent [N, G*H] that of the un-normalized recurrent product (the
  // gradient W_hh's GEMMs take); d_c_out [N, H] that of LN(c_t)'s output (gain and bias applied),
  // from which the time loop sums the gain's and bias's gradients.
  bool layer_norm = false;
  struct LayerNormStep {
    const void* weight_hh = nullptr;
    const void* weight_c = nullptr;
    const void* bias_c = nullptr;
    const void* norm_hh = nullptr;
    const void* norm_c = nullptr;
    const void* rstd = nullptr;
    void* d_recurrent = nullptr;
    void* d_c_out = nullptr;
  } ln;
};

// One step of the GRU's forward pointwise pass (see cell_math.h for the math).
struct GruForwardStepArgs {
  void* gates;             // [N, 3H] in: W_i x + b_i, with b_hr, b_hz folded in; out, when
                           // training: the activated r, z, n
  const void* recurrent;   // [N, 3H] h_{t-1} W_hh^T (no bias)
  const void* bias_hn;     // [H] b_hn, or null without biases
  const void* h_prev;      // [N, H] h_{t-1}
  void* hidden_n;          // [N, H] out: W_hn h_{t-1} + b_hn, what backward needs beside the gates
  void* h;                 // [N, H] out: h_t
  int64_t batch;
  int64_t hidden;
  bool training;
};

// One step of the GRU's backward pointwise pass.
struct GruBackwardStepArgs {
  const void* gates;          // [N, 3H] saved r, z, n of step t
  const void* hidden_n;       // [N, H]  saved W_hn h_{t-1} + b_hn
  const void* h_prev;         // [N, H]  h_{t-1}
  const void* d_h_output;     // [N, H]  gradient of output[t]
  void* d_h;                  // [N, H]  in: gradient reaching h_t through step t+1; out: the
                              //         direct part z * d_h_t of the gradient of h_{t-1}
  void* d_gates;              // [N, 3H] out: d r, d z pre-activations and d hidden_n (the
                              //         gradient W_hh's GEMMs take)
  void* d_input_n;            // [N, H]  out: gradient of W_in x + b_in
  int64_t batch;
  int64_t hidden;
};

// A device's pointwise passes, per cell. `dtype` is the tensors' scalar type; the kernels
// dispatch on it.
struct PointwiseKernels {
  void (*forward_step)(const ForwardStepArgs& args, c10::ScalarType dtype);
  void (*backward_step)(const BackwardStepArgs& args, c10::ScalarType dtype);
  void (*gru_forward_step)(const GruForwardStepArgs& args, c10::ScalarType dtype);
  void (*gru_backward_step)(const GruBackwardStepArgs& args, c10::ScalarType dtype);
};

}  // namespace lstm_ext
