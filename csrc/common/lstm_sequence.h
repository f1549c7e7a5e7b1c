// The device-agnostic half of every lstm_ext operator: input checks, the time loop and its GEMMs.
//
// The time loop is written once, for every cell (common/pointwise_step.h's Cell: the LSTM and the
// GRU); what differs per cell is the width of the gates (4H or 3H), which state it carries besides
// h_t, and its pointwise passes. How it multiplies is a StepBackend: the default one issues ATen
// GEMMs (MKL on CPU, cuBLAS on the current stream on CUDA) and calls the device's fused pointwise
// passes, which a device supplies as a PointwiseKernels table. A device may subclass StepBackend
// to do better (the CPU float32 path fuses each step's GEMM with its pointwise pass over weights
// packed once per call).
//
// The loop runs a padded batch (input [T, N, C], every step N rows) or a packed one (a
// PackedSequence's data [rows, C] with batch_sizes [T]: step t has batch_sizes[t] rows, the first
// rows of the batch, since the sequences are sorted by decreasing length). An LSTM with projections
// (proj_size P > 0) multiplies each step's o * tanh(c_t) by w_hr^T inside the loop, so the
// recurrent GEMM of the next step reads the projected h_t.
//
// Shapes: T time, N batch, C input size, H hidden size, P projection size (P = H without
// projections).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pointwise_step.h"

namespace lstm_ext {

// Time index of the k-th processed step: the recurrence runs forward in time, or backward for
// `reverse`.
inline int64_t step_time(int64_t k, int64_t steps, bool reverse) {
  return reverse ? steps - 1 - k : k;
}

// A whole recurrence of a padded batch without projections, for a backend that runs it in one
// call (StepBackend::forward_recurrence / backward_recurrence). Contiguous buffers, raw pointers;
// rows of step t start at row t * N. Shapes as for lstm_forward, with P = H.
struct ForwardRecurrenceArgs {
  Cell cell;
  int64_t steps;     // T
  int64_t batch;     // N
  int64_t hidden;    // H
  bool reverse;      // run t = T-1 down to 0
  bool training;     // save the activated gates in place of the pre-activations
  // [T*N, G*H] (G = gate_count(cell)) in: input projection and biases (unless the backend fuses
  // it, see below; the GRU's b_hn is apart, in bias_hn); out when training: activations. Null when
  // the projection is fused and not training.
  void* gates;
  // Set only when the backend said it fuses the input projection (fuses_input_projection): each
  // step then computes x_t W_ih^T + bias + h_{t-1} W_hh^T itself.
  const void* input;  // [T*N, C]
  const void* w_ih;   // [4H, C], contiguous
  const void* bias;   // [G*H] (LSTM: b_ih + b_hh; GRU: b_ih + b_hh but b_hn), or null
  int64_t features;   // C
  const void* bias_hn;  // GRU: [H] b_hn, or null without biases
  const void* h0;    // [N, H]
  const void* c0;    // LSTM: [N, H]
  void* output;      // [T*N, H] out: h_t
  // LSTM: training: [T*N, H] out: c_t; inference: [N, H], c0 in, c_n out (in place).
  // GRU: training: [T*N, H] out: W_hn h_{t-1} + b_hn; inference: null.
  void* cells;
  const void* peephole;  // LSTM variants: [3, H] (w_ci, w_cf, w_co), or null
  // Zoneout (LSTM variants): training keep masks [T*N, H] or null with the eval keep probability
  // keep_p; with training, c_new [T*N, H] receives c_t before zoneout.
  bool zoneout = false;
  const void* keep_h = nullptr;
  const void* keep_c = nullptr;
  double keep_p = 0;
  void* c_new = nullptr;
};

struct BackwardRecurrenceArgs {
  Cell cell;
  int64_t steps;
  int64_t batch;
  int64_t hidden;
  bool reverse;
  const void* gates;     // [T*N, G*H] saved activations
  const void* cells;     // [T*N, H]  saved c_t (LSTM) or W_hn h_{t-1} + b_hn (GRU)
  const void* c0;        // LSTM: [N, H]
  const void* h0;        // GRU: [N, H]
  const void* output;    // GRU: [T*N, H] the forward output (h_{t-1} of the steps after the first)
  const void* d_output;  // [T*N, H]  gradient of the output
  void* d_gates;         // [T*N, G*H] out: gradient of the gate pre-activations (GRU: d r, d z
                         // and d (W_hn h_{t-1} + b_hn), the gradient the W_hh GEMMs take)
  void* d_input_n;       // GRU: [T*N, H] out: gradient of W_in x_t + b_in
  void* d_h;             // [N, H]    in: grad_h_n; out: grad_h0
  void* d_c;             // LSTM: [N, H] in: grad_c_n; out: grad_c0
  const void* peephole;  // LSTM variants: [3, H], or null
  // Zoneout, as ForwardRecurrenceArgs; c_new [T*N, H] is then the saved c_t before zoneout.
  bool zoneout = false;
  const void* keep_h = nullptr;
  const void* keep_c = nullptr;
  double keep_p = 0;
  const void* c_new = nullptr;
};

// Allocates one of the loop's large buffers (saved gates and cell states, gradients of the gates).
using BufferAllocator = at::Tensor (*)(at::IntArrayRef sizes, const at::TensorOptions& options);

class StepBackend {
 public:
  explicit StepBackend(const PointwiseKernels& kernels) : kernels_(kernels) {}
  virtual ~StepBackend() = default;

  // at::empty unless the device set its own allocator (the CPU caches large blocks, see
  // cpu/large_buffers.h).
  at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) const;

  // The LSTM variants' peephole weights [3, H] (contiguous) for the next time loop, or an undefined
  // tensor; set before begin_forward / begin_backward.
  void set_peephole(const at::Tensor& peephole) { peephole_ = peephole; }
  void set_buffer_allocator(BufferAllocator allocate) { allocate_buffer_ = allocate; }

  // out = a b, or out += a b when `accumulate`. a [M, K] and b [K, Ncols] may be strided views
  // (e.g. transposes); out is contiguous [M, Ncols].
  virtual void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

  // grad_w [4H, C] = d_gates^T x, d_gates [rows, 4H] and x [rows, C] contiguous; with grad_bias,
  // also *grad_bias = the column sums of d_gates [4H] (the gradient of either bias).
  virtual void weight_gradient(const at::Tensor& d_gates, const at::Tensor& x, at::Tensor& grad_w,
                               at::Tensor* grad_bias);

  // The input projection of all timesteps: out [rows, 4H] = x [rows, C] W_ih^T (+ bias [4H]).
  virtual void project_input(const at::Tensor& x, const at::Tensor& w_ih,
                             const std::optional<at::Tensor>& bias, at::Tensor& out);

  // Called once before a forward time loop with that loop's w_hh [G*H, P] and cell.
  virtual void begin_forward(const at::Tensor& w_hh, Cell cell) {
    w_hh_ = w_hh;
    cell_ = cell;
  }
  // One forward step: gates [N, 4H] += h_prev [N, P] W_hh^T, then the fused pointwise pass
  // (c [N, H] and h [N, H] = o * tanh(c) out; activated gates in place of `gates` when training).
  // With projections `h` is the un-projected o * tanh(c), which project() then maps to h_t.
  virtual void forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& c_prev,
                            at::Tensor& c, at::Tensor& h, bool training);
  // An LSTM step with zoneout (not virtual: no backend fuses it yet): the GEMM as forward_step,
  // then the device's pointwise pass with zoneout's keep weights, the masks keep_h / keep_c
  // [N, H] (training) or the constant keep_p (undefined masks). With training, c_new [N, H]
  // receives c_t before zoneout.
  void zoneout_forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& c_prev,
                            at::Tensor& c, at::Tensor& h, at::Tensor& c_new,
                            const at::Tensor& keep_h, const at::Tensor& keep_c, double keep_p,
                            bool training);
  // The GRU's forward step: gates [N, 3H] (input projection, b_hr and b_hz folded in) and
  // h_prev [N, H] W_hh^T with bias_hn [H] (undefined without biases) give h [N, H]; when training
  // the activated r, z, n replace `gates` and hidden_n [N, H] receives W_hn h_prev + b_hn.
  virtual void gru_forward_step(const at::Tensor& h_prev, at::Tensor& gates,
                                const at::Tensor& bias_hn, at::Tensor& hidden_n, at::Tensor& h,
                                bool training);

  // out [N, G*H] = h_prev [N, P] W_hh^T, the recurrent product on its own (the layer-norm step
  // normalizes it before adding the input's share).
  virtual void recurrent_product(const at::Tensor& h_prev, at::Tensor& out);
  // A layer-norm LSTM step: recurrent = h_prev W_hh^T, then the device's pointwise pass with
  // `args` (everything set but args.ln.recurrent, which this sets).
  void layer_norm_forward_step(const at::Tensor& h_prev, at::Tensor& recurrent,
                               ForwardStepArgs& args);

  // The whole forward recurrence in one call, after begin_forward. A backend that can do better
  // than T calls of forward_step (the CPU one keeps its threads, and each thread its slice of
  // W_hh, across steps) runs it and returns true; the default returns false and the loop runs
  // step by step.
  virtual bool forward_recurrence(const ForwardRecurrenceArgs& /*args*/) { return false; }
  // Whether forward_recurrence computes each step's input projection itself rather than reading
  // it from one GEMM over all steps done before. A yes binds forward_recurrence to run (and
  // return true) for a padded batch without projections of these sizes.
  virtual bool fuses_input_projection(Cell /*cell*/, int64_t /*batch*/, int64_t /*features*/,
                                      int64_t /*hidden*/) const {
    return false;
  }

  // Called once before a backward time loop with that loop's w_hh [G*H, P] and cell.
  virtual void begin_backward(const at::Tensor& w_hh, Cell cell) {
    w_hh_ = w_hh;
    cell_ = cell;
  }
  // The backward pointwise pass of one step.
  void backward_pointwise(const BackwardStepArgs& args, c10::ScalarType dtype) const {
    kernels_.backward_step(args, dtype);
  }
  void gru_backward_pointwise(const GruBackwardStepArgs& args, c10::ScalarType dtype) const {
    kernels_.gru_backward_step(args, dtype);
  }
  // d_h [N, P] (+)= d_gates [N, G*H] W_hh: the gradient that reaches h_{t-1} through step t's
  // GEMM; the GRU accumulates it onto the direct part its pointwise pass left in d_h.
  virtual void recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h, bool accumulate);

  // The whole backward recurrence in one call, after begin_backward; as forward_recurrence.
  virtual bool backward_recurrence(const BackwardRecurrenceArgs& /*args*/) { return false; }

  // LSTM with projections only. Called once before a time loop (forward or backward) with its
  // w_hr [P, H].
  virtual void begin_projection(const at::Tensor& w_hr) { w_hr_ = w_hr; }
  // h [N, P] = hidden [N, H] W_hr^T: one step's projection of o * tanh(c_t).
  virtual void project(const at::Tensor& hidden, at::Tensor& h);
  // d_hidden [N, H] = d_h [N, P] W_hr: the gradient through one step's projection.
  virtual void project_backward(const at::Tensor& d_h, at::Tensor& d_hidden);

 protected:
  PointwiseKernels kernels_;
  BufferAllocator allocate_buffer_ = nullptr;
  Cell cell_ = Cell::kLstm;
  at::Tensor peephole_;
  at::Tensor w_hh_;
  at::Tensor w_hr_;
};

// Whole-sequence forward of one layer in one direction. `reverse` runs the recurrence from t = T-1
// down to 0 (the backward direction of a bidirectional layer) without flipping any tensor.
//   input [T, N, C], or packed [rows, C] with batch_sizes (int64 on the CPU, [T], non-increasing);
//   h0 [N, P], c0 [N, H]; w_ih [4H, C], w_hh [4H, P], b_ih/b_hh [4H] or none; w_hr [P, H] or none.
// Returns (output, h_n [N, P], c_n [N, H], saved_gates, saved_cells, saved_hidden): output is
// [T, N, P] (packed: [rows, P]); h_n/c_n hold each sequence's state after its own last step. When
// training the saved tensors are what backward needs: the activated gates [T, N, 4H], the cell
// states [T, N, H] and, with projections, the un-projected o * tanh(c_t) [T, N, H] (packed: [rows,
// ...]); tensors not needed are empty.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ForwardResult lstm_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& batch_sizes, StepBackend& backend);

// Gradients of lstm_forward: (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias,
// grad_w_hr). grad_bias [4H] is the gradient of b_ih and of b_hh alike (they enter the sum
// identically); grad_w_hr [P, H] is empty without projections.
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
BackwardResult lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                             const at::Tensor& grad_c_n, const at::Tensor& input,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const at::Tensor& output,
                             const at::Tensor& saved_gates, const at::Tensor& saved_cells,
                             bool reverse, const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes,
                             const std::optional<at::Tensor>& saved_hidden, StepBackend& backend);

// The LSTM variants' layer: lstm_forward with peephole weights [3, H] (rows w_ci, w_cf, w_co) or
// none, coupled input and forget gates (w_ih [3H, C], w_hh [3H, P], biases [3H] in gate order
// i, g, o; saved_gates [T, N, 3H]), and zoneout: training masks zoneout_h / zoneout_c of 0/1 keep
// weights (per-step, [T, N, H] or packed [rows, H]), or without them the eval keep probability
// `zoneout` (0: off). With zoneout, saved_hidden is each step's c_t before zoneout.
ForwardResult lstm_variant_forward(const at::Tensor& input, const at::Tensor& h0,
                                   const at::Tensor& c0, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& peephole, bool coupled_gates,
                                   bool reverse, bool training,
                                   const std::optional<at::Tensor>& w_hr,
                                   const std::optional<at::Tensor>& batch_sizes,
                                   const std::optional<at::Tensor>& zoneout_h,
                                   const std::optional<at::Tensor>& zoneout_c, double zoneout,
                                   StepBackend& backend);

// Its gradients: lstm_backward's, then grad_peephole [3, H] (empty without peepholes; its w_cf row
// zero with coupled gates).
using VariantBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
VariantBackwardResult lstm_variant_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    const at::Tensor& output, const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    bool reverse, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& saved_hidden,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout, StepBackend& backend);

// The layer-norm LSTM's layer (Ba et al. 2016, haste's LayerNormLSTM), with peepholes, coupled
// gates and zoneout as lstm_variant_forward, without projections. Its input is the input's share
// of the pre-activations, input_part [T, N, G*H] (packed [rows, G*H]) = LN(x W_ih^T) weight_ih +
// b_ih + b_hh, which the caller computes for all steps at once (one GEMM and one layer_norm, both
// differentiated by autograd). Each step then adds LN(h_{t-1} W_hh^T) weight_hh, and
// h_t = o tanh(LN(c_t) weight_c + bias_c). Returns lstm_variant_forward's six tensors (no
// projection, so saved_hidden is c_t before zoneout, or empty) and, when training, the
// normalized recurrent products [T, N, G*H], normalized c_t [T, N, H] and the rows' reciprocal
// standard deviations [T, N, 2] (packed: [rows, ...]).
using LayerNormForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor>;
LayerNormForwardResult lstm_layernorm_forward(
    const at::Tensor& input_part, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const at::Tensor& weight_hh, const at::Tensor& weight_c,
    const at::Tensor& bias_c, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    bool reverse, bool training, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout, StepBackend& backend);

// Its gradients: (grad_input_part, grad_h0, grad_c0, grad_w_hh, grad_weight_hh, grad_weight_c,
// grad_bias_c, grad_peephole (empty without peepholes)).
using LayerNormBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor>;
LayerNormBackwardResult lstm_layernorm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& weight_hh, const at::Tensor& weight_c, const at::Tensor& bias_c,
    const std::optional<at::Tensor>& peephole, bool coupled_gates, const at::Tensor& output,
    const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    const std::optional<at::Tensor>& saved_hidden, const at::Tensor& saved_norm_hh,
    const at::Tensor& saved_norm_c, const at::Tensor& saved_rstd, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout, StepBackend& backend);

// One step, as torch.nn.LSTMCell: input [N, C], hx/cx [N, H].
// Returns (h [N, H], c [N, H], saved_gates [N, 4H], or empty when not training).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, StepBackend& backend);

// Gradients of lstm_cell_forward: (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   StepBackend& backend);

// The GRU layer, as lstm_forward without projections: input [T, N, C] (or packed), h0 [N, H],
// w_ih [3H, C], w_hh [3H, H], b_ih/b_hh [3H] or none. Returns (output [T, N, H], h_n [N, H],
// saved_gates [T, N, 3H] (activated r, z, n), saved_hidden_n [T, N, H] (W_hn h_{t-1} + b_hn)), the
// saved tensors empty unless training.
using GruLayerResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
GruLayerResult gru_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                           const std::optional<at::Tensor>& batch_sizes, StepBackend& backend);

// Gradients of gru_forward: (grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh).
// The two bias gradients differ in their n rows (b_hn sits inside r's product).
using GruGradients =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
GruGradients gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const at::Tensor& output,
                          const at::Tensor& saved_gates, const at::Tensor& saved_hidden_n,
                          bool reverse, const std::optional<at::Tensor>& batch_sizes,
                          StepBackend& backend);

// One step, as torch.nn.GRUCell: input [N, C], hx [N, H] -> (h [N, H], saved_gates [N, 3H],
// saved_hidden_n [N, H]; both empty unless training).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool training,
    StepBackend& backend);

GruGradients gru_cell_backward(const at::Tensor& grad_h, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const at::Tensor& saved_gates,
                               const at::Tensor& saved_hidden_n, StepBackend& backend);

}  // namespace lstm_ext
