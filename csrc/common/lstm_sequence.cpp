#include "lstm_sequence.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

namespace lstm_ext {

// ---------------------------------------------------------------------------------------------
// The default StepBackend: ATen GEMMs and the device's pointwise passes.

at::Tensor StepBackend::empty_buffer(at::IntArrayRef sizes,
                                     const at::TensorOptions& options) const {
  return allocate_buffer_ != nullptr ? allocate_buffer_(sizes, options) : at::empty(sizes, options);
}

void StepBackend::matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                         bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void StepBackend::weight_gradient(const at::Tensor& d_gates, const at::Tensor& x,
                                  at::Tensor& grad_w, at::Tensor* grad_bias) {
  matmul(d_gates.t(), x, grad_w, /*accumulate=*/false);
  if (grad_bias != nullptr) {
    *grad_bias = d_gates.sum(0);
  }
}

void StepBackend::project_input(const at::Tensor& x, const at::Tensor& w_ih,
                                const std::optional<at::Tensor>& bias, at::Tensor& out) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w_ih.t());
  } else {
    at::mm_out(out, x, w_ih.t());
  }
}

void StepBackend::forward_step(const at::Tensor& h_prev, at::Tensor& gates,
                               const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h,
                               bool training) {
  gates.addmm_(h_prev, w_hh_.t());
  if (gates.size(0) == 0) {
    return;
  }
  const ForwardStepArgs args{gates.data_ptr(),
                             c_prev.const_data_ptr(),
                             c.data_ptr(),
                             h.data_ptr(),
                             gates.size(0),
                             h.size(1),
                             training,
                             peephole_.defined() ? peephole_.const_data_ptr() : nullptr,
                             cell_ == Cell::kLstmCoupled};
  kernels_.forward_step(args, gates.scalar_type());
}

void StepBackend::zoneout_forward_step(const at::Tensor& h_prev, at::Tensor& gates,
                                       const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h,
                                       at::Tensor& c_new, const at::Tensor& keep_h,
                                       const at::Tensor& keep_c, double keep_p, bool training) {
  gates.addmm_(h_prev, w_hh_.t());
  if (gates.size(0) == 0) {
    return;
  }
  ForwardStepArgs args{gates.data_ptr(),
                       c_prev.const_data_ptr(),
                       c.data_ptr(),
                       h.data_ptr(),
                       gates.size(0),
                       h.size(1),
                       training,
                       peephole_.defined() ? peephole_.const_data_ptr() : nullptr,
                       cell_ == Cell::kLstmCoupled};
  args.zoneout = true;
  args.zoneout_h = keep_h.defined() ? keep_h.const_data_ptr() : nullptr;
  args.zoneout_c = keep_c.defined() ? keep_c.const_data_ptr() : nullptr;
  args.zoneout_p = keep_p;
  args.h_prev = h_prev.const_data_ptr();
  args.c_new = training ? c_new.data_ptr() : nullptr;
  kernels_.forward_step(args, gates.scalar_type());
}

void StepBackend::recurrent_product(const at::Tensor& h_prev, at::Tensor& out) {
  at::mm_out(out, h_prev, w_hh_.t());
}

void StepBackend::layer_norm_forward_step(const at::Tensor& h_prev, at::Tensor& recurrent,
                                          ForwardStepArgs& args) {
  recurrent_product(h_prev, recurrent);
  if (recurrent.size(0) == 0) {
    return;
  }
  args.ln.recurrent = recurrent.const_data_ptr();
  kernels_.forward_step(args, recurrent.scalar_type());
}

void StepBackend::gru_forward_step(const at::Tensor& h_prev, at::Tensor& gates,
                                   const at::Tensor& bias_hn, at::Tensor& hidden_n, at::Tensor& h,
                                   bool training) {
  if (gates.size(0) == 0) {
    return;
  }
  // The n rows of the recurrent product must stay apart from the input's until r multiplies
  // them, so the product goes to a buffer of its own rather than onto the gates.
  const at::Tensor recurrent = at::mm(h_prev, w_hh_.t());
  const GruForwardStepArgs args{gates.data_ptr(),
                                recurrent.const_data_ptr(),
                                bias_hn.defined() ? bias_hn.const_data_ptr() : nullptr,
                                h_prev.const_data_ptr(),
                                training ? hidden_n.data_ptr() : nullptr,
                                h.data_ptr(),
                                gates.size(0),
                                h.size(1),
                                training};
  kernels_.gru_forward_step(args, gates.scalar_type());
}

void StepBackend::recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h,
                                     bool accumulate) {
  if (accumulate) {
    d_h.addmm_(d_gates, w_hh_);
  } else {
    at::mm_out(d_h, d_gates, w_hh_);
  }
}

void StepBackend::project(const at::Tensor& hidden, at::Tensor& h) {
  at::mm_out(h, hidden, w_hr_.t());
}

void StepBackend::project_backward(const at::Tensor& d_h, at::Tensor& d_hidden) {
  at::mm_out(d_hidden, d_h, w_hr_);
}

namespace {

// ---------------------------------------------------------------------------------------------
// Input checks, once, at the op boundary. Messages name the tensor and the shapes involved.

void check_same_device_and_dtype(const char* op, const at::Tensor& reference, const char* ref_name,
                                 const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", reference.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", reference.scalar_type(),
              "; all tensors must have one dtype");
}

void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected,
                 const char* expected_text) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected_text, " = ",
              expected, ", got ", t.sizes());
}


// Sizes of one layer's weights: H hidden units, P = the width of h_t (H without projections).
struct LayerSizes {
  int64_t hidden;
  int64_t proj;
};

// Checks the weights and biases of a `cell` layer against input features C. The messages write
// the LSTM's shapes with 4H rows, the GRU's with 3H.
LayerSizes check_weights(Cell cell, const char* op, const at::Tensor& input,
                         int64_t input_features, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh,
                         const std::optional<at::Tensor>& w_hr) {
  const int64_t gates = gate_count(cell);
  const bool lstm = cell == Cell::kLstm;  // 4 gates: the messages' shapes
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected a floating-point input, got dtype ", input.scalar_type());
  LayerSizes sizes{};
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": expected w_hr of shape [P, H], got ", w_hr->sizes());
    sizes = {w_hr->size(1), w_hr->size(0)};
    check_shape(op, w_hh, "w_hh", {gates * sizes.hidden, sizes.proj}, lstm ? "[4H, P]" : "[3H, P]");
    check_same_device_and_dtype(op, input, "input", *w_hr, "w_hr");
  } else {
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op,
                ": expected w_hh of shape ", lstm ? "[4H, H]" : "[3H, H]", ", got ", w_hh.sizes());
    sizes = {w_hh.size(1), w_hh.size(1)};
  }
  const int64_t hidden = sizes.hidden;
  check_shape(op, w_ih, "w_ih", {gates * hidden, input_features}, lstm ? "[4H, C]" : "[3H, C]");
  check_same_device_and_dtype(op, input, "input", w_ih, "w_ih");
  check_same_device_and_dtype(op, input, "input", w_hh, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op,
              ": b_ih and b_hh must be given together or both omitted");
  if (b_ih.has_value()) {
    check_shape(op, *b_ih, "b_ih", {gates * hidden}, lstm ? "[4H]" : "[3H]");
    check_shape(op, *b_hh, "b_hh", {gates * hidden}, lstm ? "[4H]" : "[3H]");
    check_same_device_and_dtype(op, input, "input", *b_ih, "b_ih");
    check_same_device_and_dtype(op, input, "input", *b_hh, "b_hh");
  }
  return sizes;
}

void check_state(const char* op, const at::Tensor& input, const at::Tensor& state,
                 const char* name, int64_t batch, int64_t width, const char* expected_text) {
  check_shape(op, state, name, {batch, width}, expected_text);
  check_same_device_and_dtype(op, input, "input", state, name);
}

// ---------------------------------------------------------------------------------------------
// Where each step's rows lie. Every buffer of the loop is time-major and 2-D, [rows, width]: a
// padded batch has N rows at each step (rows = T * N, step t at t * N); a packed one has
// batch_sizes[t] rows at step t, the first batch_sizes[t] sequences of the batch.

struct StepLayout {
  int64_t steps = 0;
  int64_t batch = 0;  // N: the rows of the largest step, and of h0, c0, h_n, c_n
  int64_t rows = 0;
  std::vector<int64_t> sizes;    // packed only
  std::vector<int64_t> offsets;  // packed only

  bool packed() const { return !sizes.empty(); }
  int64_t size(int64_t t) const { return packed() ? sizes[t] : batch; }
  int64_t offset(int64_t t) const { return packed() ? offsets[t] : t * batch; }
};

StepLayout padded_layout(int64_t steps, int64_t batch) {
  StepLayout layout;
  layout.steps = steps;
  layout.batch = batch;
  layout.rows = steps * batch;
  return layout;
}

// A packed batch's layout, checked: batch_sizes must be what pack_padded_sequence produces.
StepLayout packed_layout(const char* op, const at::Tensor& input, const at::Tensor& batch_sizes) {
  TORCH_CHECK(input.dim() == 2, op,
              ": with batch_sizes, expected packed input of shape [rows, C], got ", input.sizes());
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.dim() == 1,
              op, ": expected batch_sizes to be a 1-D int64 tensor on the CPU (as in a "
              "PackedSequence), got ", batch_sizes.scalar_type(), " of shape ",
              batch_sizes.sizes(), " on ", batch_sizes.device());
  TORCH_CHECK(batch_sizes.numel() > 0, op, ": expected batch_sizes with at least one step");
  const at::Tensor sizes_c = batch_sizes.contiguous();
  const int64_t* sizes = sizes_c.const_data_ptr<int64_t>();
  StepLayout layout;
  layout.steps = batch_sizes.numel();
  layout.batch = sizes[0];
  layout.sizes.assign(sizes, sizes + layout.steps);
  layout.offsets.resize(layout.steps);
  for (const auto t : c10::irange(layout.steps)) {
    TORCH_CHECK(sizes[t] > 0 && (t == 0 || sizes[t] <= sizes[t - 1]), op,
                ": expected batch_sizes to be positive and non-increasing, got ", sizes[t],
                " at step ", t, t > 0 ? " after " : "", t > 0 ? std::to_string(sizes[t - 1]) : "");
    layout.offsets[t] = layout.rows;
    layout.rows += sizes[t];
  }
  TORCH_CHECK(layout.rows == input.size(0), op, ": batch_sizes sum to ", layout.rows,
              " rows but the packed input has ", input.size(0), " rows");
  return layout;
}

// The layout of an op call's input: packed when batch_sizes is given, else [T, N, C].
StepLayout input_layout(const char* op, const at::Tensor& input,
                        const std::optional<at::Tensor>& batch_sizes) {
  if (batch_sizes.has_value()) {
    return packed_layout(op, input, *batch_sizes);
  }
  TORCH_CHECK(input.dim() == 3, op, ": expected input of shape [T, N, C], got ", input.sizes());
  TORCH_CHECK(input.size(0) > 0, op, ": expected sequence length T > 0, got input of shape ",
              input.sizes());
  return padded_layout(input.size(0), input.size(1));
}

// A [rows, width] buffer as the op returns it: [T, N, width] for a padded batch.
at::Tensor unflatten(const at::Tensor& t, const StepLayout& layout) {
  if (layout.packed() || t.dim() != 2) {
    return t;
  }
  return t.view({layout.steps, layout.batch, t.size(1)});
}

// A [T, N, width] or [rows, width] tensor as the loop's contiguous [rows, width].
at::Tensor flatten(const at::Tensor& t, const StepLayout& layout, int64_t width) {
  return t.contiguous().view({layout.rows, width});
}

// ---------------------------------------------------------------------------------------------
// The time loop.


// Rows [first, first + count) of a contiguous [rows, width] buffer, sharing its storage; the
// buffer itself when that is all of it (every step of a padded batch). Built directly rather
// than with narrow(): the loops take several such views per step, and a dispatcher call per view
// costs more than a whole step at small sizes. Internal to the loop: no autograd, no view
// tracking needed.
at::Tensor row_block(const at::Tensor& buffer, int64_t first, int64_t count) {
  TORCH_INTERNAL_ASSERT(buffer.dim() == 2 && buffer.is_contiguous());
  if (first == 0 && count == buffer.size(0)) {
    return buffer;
  }
  const int64_t width = buffer.size(1);
  at::Tensor block = at::detail::make_tensor<c10::TensorImpl>(
      c10::TensorImpl::VIEW, c10::Storage(buffer.storage()), buffer.key_set(), buffer.dtype());
  const std::array<int64_t, 2> sizes{count, width}, strides{width, 1};
  block.unsafeGetTensorImpl()->set_sizes_and_strides(
      at::IntArrayRef(sizes), at::IntArrayRef(strides),
      std::make_optional(buffer.storage_offset() + first * width));
  return block;
}

// The state entering a step that has more rows than the step processed before it (the reverse
// direction of a packed batch, where shorter sequences join late): its first rows continue from
// the previous step, the others start from the initial state. Gathered into `buffer`.
at::Tensor joined_state(at::Tensor& buffer, const at::Tensor& continuing,
                        const at::Tensor& initial, int64_t rows) {
  if (!buffer.defined()) {
    buffer = at::empty_like(initial, at::MemoryFormat::Contiguous);
  }
  const int64_t kept = continuing.size(0);
  row_block(buffer, 0, kept).copy_(continuing);
  row_block(buffer, kept, rows - kept).copy_(row_block(initial, kept, rows - kept));
  return row_block(buffer, 0, rows);
}

// The state h_{t-1} or c_{t-1} entering the k-th processed step, from the [rows, width] buffer
// the previous step wrote (no copy, except where the batch grows).
at::Tensor previous_state(const at::Tensor& states, const at::Tensor& initial, at::Tensor& join,
                          const StepLayout& layout, int64_t k, bool reverse) {
  const int64_t rows = layout.size(step_time(k, layout.steps, reverse));
  if (k == 0) {
    return row_block(initial, 0, rows);
  }
  const int64_t prev_t = step_time(k - 1, layout.steps, reverse);
  const int64_t prev_rows = layout.size(prev_t);
  if (rows <= prev_rows) {
    return row_block(states, layout.offset(prev_t), rows);
  }
  return joined_state(join, row_block(states, layout.offset(prev_t), prev_rows), initial, rows);
}

// The LSTM variants' options as the loop takes them (all contiguous): peephole weights [3, H];
// zoneout's training masks [rows, H] in the loop's row order, or its eval keep probability.
struct LoopVariant {
  at::Tensor peephole;
  bool zoneout = false;
  at::Tensor keep_h, keep_c;
  double keep_p = 0;
  // Layer norm: the gains of the recurrent product's and of c_t's normalizations, and c_t's bias.
  // The loop's input x is then the input's share of the pre-activations [rows, G*H] (normalized,
  // gained, both biases added), so the loop runs no input projection, and backward returns that
  // share's gradient as grad_input.
  bool layer_norm = false;
  at::Tensor weight_hh, weight_c, bias_c;
};

// Zoneout's fields of one step's pointwise arguments (ForwardStepArgs or BackwardStepArgs): the
// step's rows of the training masks, or without masks eval's keep probability.
template <typename StepArgs>
void set_step_zoneout(StepArgs& args, const LoopVariant& variant, int64_t offset, int64_t n) {
  args.zoneout = true;
  args.zoneout_h =
      variant.keep_h.defined() ? row_block(variant.keep_h, offset, n).const_data_ptr() : nullptr;
  args.zoneout_c =
      variant.keep_c.defined() ? row_block(variant.keep_c, offset, n).const_data_ptr() : nullptr;
  args.zoneout_p = variant.keep_p;
}

// What a layer-norm forward saves besides the gates and cells: the normalized recurrent products
// [rows, G*H] and c_t [rows, H], and each row's two reciprocal standard deviations [rows, 2].
struct LayerNormSaved {
  at::Tensor norm_hh, norm_c, rstd;
};

// The loop itself, on 2-D buffers, for either cell: x [rows, C] contiguous; returns (output
// [rows, P], h_n [N, P], c_n [N, H], gates [rows, G*H], cells [rows, H], hidden [rows, H]), the
// last three as documented for lstm_forward. The GRU (c0 undefined, no projections) returns no c_n,
// and in `cells` its W_hn h_{t-1} + b_hn.
ForwardResult forward_unchecked(Cell cell, const at::Tensor& x, const StepLayout& layout,
                                const at::Tensor& h0, const at::Tensor& c0,
                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh,
                                const std::optional<at::Tensor>& w_hr, bool reverse,
                                bool training, StepBackend& backend,
                                const LoopVariant& variant = LoopVariant(),
                                LayerNormSaved* ln_saved = nullptr) {
  // The buffers and views below are internal: without this guard every view or in-place op on
  // them would also do autograd view bookkeeping (microseconds per step, felt at small sizes).
  at::AutoDispatchBelowADInplaceOrView no_view_tracking;
  const bool lstm = is_lstm(cell);
  const bool layer_norm = variant.layer_norm;
  const int64_t gates_per_unit = gate_count(cell);
  const int64_t steps = layout.steps, batch = layout.batch, rows = layout.rows;
  const int64_t hidden = w_hh.size(0) / gates_per_unit, proj = w_hh.size(1);
  const bool projected = w_hr.has_value();
  const auto options = x.options();

  // Both biases go into the input projection, except the GRU's b_hn, which r multiplies.
  std::optional<at::Tensor> bias;
  at::Tensor bias_hn;
  if (b_ih.has_value()) {
    if (lstm) {
      bias = *b_ih + *b_hh;
    } else {
      bias = b_ih->clone(at::MemoryFormat::Contiguous);
      bias->narrow(0, 0, 2 * hidden).add_(b_hh->narrow(0, 0, 2 * hidden));
      bias_hn = b_hh->narrow(0, 2 * hidden, hidden).contiguous();
    }
  }
  // A padded batch without projections may run its whole recurrence in one call to the backend,
  // which may also compute each step's input projection itself; the step loop further down is the
  // general case.
  // (Not with layer norm: its steps normalize whole rows, which no backend's recurrence does.)
  const bool whole_recurrence_possible = !projected && !layout.packed() && !layer_norm;
  const bool fused_input = whole_recurrence_possible &&
                           backend.fuses_input_projection(cell, batch, x.size(1), hidden);
  // Otherwise: the input projection of all timesteps in one GEMM, the biases folded in:
  // [rows, C] x [C, G*H]. Each LSTM step's recurrent GEMM then accumulates into this buffer in
  // place, and the pointwise pass overwrites it with the activated gates when training, so it
  // doubles as the saved gates.
  const int64_t gate_width = gates_per_unit * hidden;
  at::Tensor gates = training || !fused_input ? backend.empty_buffer({rows, gate_width}, options)
                                              : at::Tensor();
  if (layer_norm) {
    gates.copy_(x);  // the input's share, projected by the caller
  } else if (!fused_input) {
    // Named scopes show up in torch.profiler: where a step's time goes (benchmarks/README.md).
    RECORD_FUNCTION("lstm_ext::input_projection", std::vector<c10::IValue>());
    backend.project_input(x, w_ih, bias, gates);
  }
  // Layer norm: one step's recurrent product, and what training saves of the normalizations.
  at::Tensor recurrent;
  LayerNormSaved norms;
  if (layer_norm) {
    recurrent = at::empty({batch, gate_width}, options);
    if (training) {
      norms.norm_hh = backend.empty_buffer({rows, gate_width}, options);
      norms.norm_c = backend.empty_buffer({rows, hidden}, options);
      norms.rstd = at::empty({rows, 2}, options);
    }
  }

  at::Tensor output = at::empty({rows, proj}, options);
  // The LSTM's c_t, the GRU's W_hn h_{t-1} + b_hn: kept for every step when training.
  at::Tensor cells = training ? backend.empty_buffer({rows, hidden}, options) : at::Tensor();
  // With projections, o * tanh(c_t) before the projection: kept for every step when training
  // (backward needs it for grad_w_hr), else one step's scratch.
  at::Tensor unprojected =
      projected ? backend.empty_buffer({training ? rows : batch, hidden}, options) : at::Tensor();
  const at::Tensor h0_c = h0.contiguous();
  const at::Tensor c0_c = lstm ? c0.contiguous() : at::Tensor();
  at::Tensor h_n = at::empty({batch, proj}, options);
  // Inference keeps one running cell state, updated in place from c0: its rows of sequences that
  // have ended keep their final state, so it ends as c_n.
  at::Tensor c_n = lstm ? at::empty({batch, hidden}, options) : at::Tensor();
  if (lstm && !training) {
    c_n.copy_(c0_c);
  }
  at::Tensor h_join, c_join;

  RECORD_FUNCTION("lstm_ext::recurrence", std::vector<c10::IValue>());
  const at::Tensor& peephole_c = variant.peephole;
  backend.set_peephole(peephole_c);
  backend.begin_forward(w_hh.contiguous(), cell);
  // Zoneout, training: each step's c_t before zoneout, which backward needs besides the c_t kept.
  at::Tensor cells_new =
      variant.zoneout && training ? backend.empty_buffer({rows, hidden}, options) : at::Tensor();
  if (projected) {
    backend.begin_projection(w_hr->contiguous());
  }
  bool whole_recurrence = false;
  if (whole_recurrence_possible) {
    const at::Tensor w_ih_c = fused_input ? w_ih.contiguous() : at::Tensor();
    void* cells_ptr = training ? cells.data_ptr() : (lstm ? c_n.data_ptr() : nullptr);
    ForwardRecurrenceArgs args{cell,
                                     steps,
                                     batch,
                                     hidden,
                                     reverse,
                                     training,
                                     gates.defined() ? gates.data_ptr() : nullptr,
                                     fused_input ? x.const_data_ptr() : nullptr,
                                     fused_input ? w_ih_c.const_data_ptr() : nullptr,
                                     fused_input && bias ? bias->const_data_ptr() : nullptr,
                                     x.size(1),
                                     bias_hn.defined() ? bias_hn.const_data_ptr() : nullptr,
                                     h0_c.const_data_ptr(),
                                     lstm ? c0_c.const_data_ptr() : nullptr,
                                     output.data_ptr(),
                                     cells_ptr,
                                     peephole_c.defined() ? peephole_c.const_data_ptr() : nullptr};
    if (variant.zoneout) {
      args.zoneout = true;
      args.keep_h = variant.keep_h.defined() ? variant.keep_h.const_data_ptr() : nullptr;
      args.keep_c = variant.keep_c.defined() ? variant.keep_c.const_data_ptr() : nullptr;
      args.keep_p = variant.keep_p;
      args.c_new = training ? cells_new.data_ptr() : nullptr;
    }
    whole_recurrence = backend.forward_recurrence(args);
    TORCH_INTERNAL_ASSERT(whole_recurrence || !fused_input,
                          "a backend that fuses the input projection must run the recurrence");
  }
  if (whole_recurrence) {
    // Every sequence ends at the last step processed.
    const int64_t last_offset = step_time(steps - 1, steps, reverse) * batch;
    h_n.copy_(row_block(output, last_offset, batch));
    if (lstm && training) {
      c_n.copy_(row_block(cells, last_offset, batch));
    }
  }
  for (const auto k : c10::irange(whole_recurrence ? 0 : steps)) {
    const int64_t t = step_time(k, steps, reverse);
    const int64_t n = layout.size(t), offset = layout.offset(t);
    const at::Tensor h_prev = previous_state(output, h0_c, h_join, layout, k, reverse);
    at::Tensor gates_t = row_block(gates, offset, n);
    at::Tensor h_t = row_block(output, offset, n);
    at::Tensor c_t;
    if (!lstm) {
      at::Tensor hidden_n_t = training ? row_block(cells, offset, n) : at::Tensor();
      backend.gru_forward_step(h_prev, gates_t, bias_hn, hidden_n_t, h_t, training);
    } else {
      const at::Tensor c_prev = training ? previous_state(cells, c0_c, c_join, layout, k, reverse)
                                         : row_block(c_n, 0, n);
      c_t = training ? row_block(cells, offset, n) : row_block(c_n, 0, n);
      if (layer_norm) {
        ForwardStepArgs args{gates_t.data_ptr(),
                             c_prev.const_data_ptr(),
                             c_t.data_ptr(),
                             h_t.data_ptr(),
                             n,
                             hidden,
                             training,
                             peephole_c.defined() ? peephole_c.const_data_ptr() : nullptr,
                             cell == Cell::kLstmCoupled};
        if (variant.zoneout) {
          set_step_zoneout(args, variant, offset, n);
          args.h_prev = h_prev.const_data_ptr();
          args.c_new = training ? row_block(cells_new, offset, n).data_ptr() : nullptr;
        }
        args.layer_norm = true;
        args.ln.weight_hh = variant.weight_hh.const_data_ptr();
        args.ln.weight_c = variant.weight_c.const_data_ptr();
        args.ln.bias_c = variant.bias_c.const_data_ptr();
        if (training) {
          args.ln.norm_hh = row_block(norms.norm_hh, offset, n).data_ptr();
          args.ln.norm_c = row_block(norms.norm_c, offset, n).data_ptr();
          args.ln.rstd = row_block(norms.rstd, offset, n).data_ptr();
        }
        at::Tensor recurrent_t = row_block(recurrent, 0, n);
        backend.layer_norm_forward_step(h_prev, recurrent_t, args);
      } else if (projected) {
        at::Tensor u_t = row_block(unprojected, training ? offset : 0, n);
        backend.forward_step(h_prev, gates_t, c_prev, c_t, u_t, training);
        backend.project(u_t, h_t);
      } else if (variant.zoneout) {
        at::Tensor c_new_t = training ? row_block(cells_new, offset, n) : at::Tensor();
        const auto rows_of = [&](const at::Tensor& mask) {
          return mask.defined() ? row_block(mask, offset, n) : at::Tensor();
        };
        backend.zoneout_forward_step(h_prev, gates_t, c_prev, c_t, h_t, c_new_t,
                                     rows_of(variant.keep_h), rows_of(variant.keep_c),
                                     variant.keep_p, training);
      } else {
        backend.forward_step(h_prev, gates_t, c_prev, c_t, h_t, training);
      }
    }
    // The sequences whose last step this is (rows the next step no longer has): final states.
    const int64_t next_n = k + 1 < steps ? layout.size(step_time(k + 1, steps, reverse)) : 0;
    if (next_n < n) {
      row_block(h_n, next_n, n - next_n).copy_(row_block(h_t, next_n, n - next_n));
      if (lstm && training) {
        row_block(c_n, next_n, n - next_n).copy_(row_block(c_t, next_n, n - next_n));
      }
    }
  }
  // Distinct empty tensors: an op's outputs must not alias one another.
  const auto none = [&] { return at::empty({0}, options); };
  if (!lstm) {
    c_n = none();
  }
  if (!training) {
    return {output, h_n, c_n, none(), none(), none()};
  }
  if (ln_saved != nullptr) {
    *ln_saved = norms;
  }
  // The last slot: with projections the un-projected o * tanh(c_t); with zoneout (which excludes
  // projections) c_t before zoneout.
  return {output, h_n, c_n, gates, cells,
          projected ? unprojected : (variant.zoneout ? cells_new : none())};
}

// h_{t-1} of every step as one [rows, P] buffer, for grad_w_hh of a packed batch (whose steps'
// h_{t-1} are not one strided view of the output).
at::Tensor gather_previous_hidden(const at::Tensor& output, const at::Tensor& h0,
                                  const StepLayout& layout, bool reverse) {
  at::Tensor previous = at::empty_like(output, at::MemoryFormat::Contiguous);
  for (const auto k : c10::irange(layout.steps)) {
    const int64_t t = step_time(k, layout.steps, reverse);
    const int64_t n = layout.size(t);
    at::Tensor dst = row_block(previous, layout.offset(t), n);
    if (k == 0) {
      dst.copy_(row_block(h0, 0, n));
      continue;
    }
    const int64_t prev_t = step_time(k - 1, layout.steps, reverse);
    const int64_t kept = std::min(n, layout.size(prev_t));
    row_block(dst, 0, kept).copy_(row_block(output, layout.offset(prev_t), kept));
    if (kept < n) {
      row_block(dst, kept, n - kept).copy_(row_block(h0, kept, n - kept));
    }
  }
  return previous;
}

// What the backward loop returns, for either cell. The LSTM's two bias gradients are one
// (grad_b_ih = grad_b_hh); the GRU's differ in the n rows; grad_c0 and grad_w_hr are the LSTM's.
struct LayerGradients {
  at::Tensor grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
  at::Tensor grad_peephole;  // LSTM variants with peepholes only
  // Layer norm only: the gains' gradients and c_t's bias's (grad_input is then the input share's;
  // grad_w_ih and the bias gradients are undefined).
  at::Tensor grad_ln_weight_hh, grad_ln_weight_c, grad_ln_bias_c;
};

// The backward loop on 2-D buffers (see forward_unchecked). `output` [rows, P] may be undefined
// when T = 1 (it only supplies h_{t-1} for steps after the first). For the GRU, c0 is undefined
// and `cells` holds the saved W_hn h_{t-1} + b_hn.
LayerGradients backward_unchecked(Cell cell, const at::Tensor& d_out, const at::Tensor& grad_h_n,
                                  const at::Tensor& grad_c_n, const at::Tensor& x,
                                  const StepLayout& layout, const at::Tensor& h0,
                                  const at::Tensor& c0, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                  const at::Tensor& output, const at::Tensor& gates,
                                  const at::Tensor& cells, const at::Tensor& unprojected,
                                  bool reverse, StepBackend& backend,
                                  const LoopVariant& variant = LoopVariant(),
                                  const LayerNormSaved* ln_saved = nullptr) {
  // The buffers and views below are internal: without this guard every view or in-place op on
  // them would also do autograd view bookkeeping (microseconds per step, felt at small sizes).
  at::AutoDispatchBelowADInplaceOrView no_view_tracking;
  const bool lstm = is_lstm(cell);
  const bool layer_norm = variant.layer_norm;
  TORCH_INTERNAL_ASSERT(!layer_norm || ln_saved != nullptr);
  const int64_t gates_per_unit = gate_count(cell);
  const int64_t steps = layout.steps, batch = layout.batch, rows = layout.rows;
  const int64_t features = x.size(1);
  const int64_t hidden = w_hh.size(0) / gates_per_unit, proj = w_hh.size(1);
  const bool projected = w_hr.has_value();
  const auto options = x.options();

  // The gradients the W_hh GEMMs take (for the GRU, of W_hn h + b_hn in the n rows) and, for the
  // GRU, apart, those of W_in x + b_in, which W_ih's GEMMs take in the n rows.
  at::Tensor d_gates = backend.empty_buffer({rows, gates_per_unit * hidden}, options);
  at::Tensor d_input_n = lstm ? at::Tensor() : backend.empty_buffer({rows, hidden}, options);
  // Layer norm: d_gates is the gradient of the pre-activations (the input share's); the W_hh
  // GEMMs take that of the un-normalized recurrent product, and the gain and bias of c_t's
  // normalization that of its output.
  at::Tensor d_recurrent, d_c_out;
  if (layer_norm) {
    d_recurrent = backend.empty_buffer({rows, gates_per_unit * hidden}, options);
    d_c_out = backend.empty_buffer({rows, hidden}, options);
  }
  // d_h starts as grad_h_n and is then overwritten each step by d_gates[t] W_hh (the GRU adds the
  // direct part z * d_h_t); after the last step it is grad_h0. The LSTM's d_c is updated in place
  // by the pointwise pass and ends as grad_c0. A step touches only its own rows: in a packed batch
  // the rows of sequences that have not started (in backward order) still hold grad_h_n /
  // grad_c_n, and those of sequences that have ended hold their final grad_h0 / grad_c0.
  at::Tensor d_h = grad_h_n.contiguous().clone();
  at::Tensor d_c = lstm ? grad_c_n.contiguous().clone() : at::Tensor();
  // With projections: the total gradient reaching each step's projected h_t [rows, P] (kept for
  // grad_w_hr), its image through the projection [N, H], and zeros standing in for the recurrent
  // gradient, which the total already includes.
  at::Tensor d_h_total, d_unprojected, zeros;
  if (projected) {
    d_h_total = at::empty({rows, proj}, options);
    d_unprojected = at::empty({batch, hidden}, options);
    zeros = at::zeros({batch, hidden}, options);
  }
  const at::Tensor h0_c = h0.contiguous();
  const at::Tensor c0_c = lstm ? c0.contiguous() : at::Tensor();
  const at::Tensor& peephole_c = variant.peephole;
  // With zoneout, `unprojected` holds each step's c_t before zoneout (see forward_unchecked).
  const at::Tensor& cells_new = variant.zoneout ? unprojected : at::Tensor();
  at::Tensor c_join, h_join;

  {
    RECORD_FUNCTION("lstm_ext::recurrence_backward", std::vector<c10::IValue>());
    backend.set_peephole(peephole_c);
    backend.begin_backward(w_hh.contiguous(), cell);
    if (projected) {
      backend.begin_projection(w_hr->contiguous());
    }
    bool whole_recurrence = false;
    if (!projected && !layout.packed() && !layer_norm && (steps == 1 || output.defined())) {
      BackwardRecurrenceArgs args{cell,
                                        steps,
                                        batch,
                                        hidden,
                                        reverse,
                                        gates.const_data_ptr(),
                                        cells.const_data_ptr(),
                                        lstm ? c0_c.const_data_ptr() : nullptr,
                                        h0_c.const_data_ptr(),
                                        output.defined() ? output.const_data_ptr() : nullptr,
                                        d_out.const_data_ptr(),
                                        d_gates.data_ptr(),
                                        lstm ? nullptr : d_input_n.data_ptr(),
                                        d_h.data_ptr(),
                                        lstm ? d_c.data_ptr() : nullptr,
                                        peephole_c.defined() ? peephole_c.const_data_ptr()
                                                             : nullptr};
      if (variant.zoneout) {
        args.zoneout = true;
        args.keep_h = variant.keep_h.defined() ? variant.keep_h.const_data_ptr() : nullptr;
        args.keep_c = variant.keep_c.defined() ? variant.keep_c.const_data_ptr() : nullptr;
        args.keep_p = variant.keep_p;
        args.c_new = cells_new.const_data_ptr();
      }
      whole_recurrence = backend.backward_recurrence(args);
    }
    // Backward visits the steps in the opposite order of the forward recurrence.
    for (const auto k : c10::irange(whole_recurrence ? 0 : steps)) {
      const int64_t forward_k = steps - 1 - k;
      const int64_t t = step_time(forward_k, steps, reverse);
      const int64_t n = layout.size(t), offset = layout.offset(t);
      at::Tensor d_gates_t = row_block(d_gates, offset, n);
      at::Tensor d_h_t = row_block(d_h, 0, n);
      const at::Tensor d_out_t = row_block(d_out, offset, n);
      if (!lstm) {
        const at::Tensor h_prev = previous_state(output, h0_c, h_join, layout, forward_k, reverse);
        if (n > 0) {
          const GruBackwardStepArgs args{row_block(gates, offset, n).const_data_ptr(),
                                         row_block(cells, offset, n).const_data_ptr(),
                                         h_prev.const_data_ptr(),
                                         d_out_t.const_data_ptr(),
                                         d_h_t.data_ptr(),
                                         d_gates_t.data_ptr(),
                                         row_block(d_input_n, offset, n).data_ptr(),
                                         n,
                                         hidden};
          backend.gru_backward_pointwise(args, x.scalar_type());
        }
        backend.recurrent_gradient(d_gates_t, d_h_t, /*accumulate=*/true);
        continue;
      }
      const at::Tensor c_prev = previous_state(cells, c0_c, c_join, layout, forward_k, reverse);
      const void* d_h_output = d_out_t.const_data_ptr();
      const void* d_h_recurrent = d_h_t.const_data_ptr();
      if (projected) {
        at::Tensor total = row_block(d_h_total, offset, n);
        at::add_out(total, d_out_t, d_h_t);
        at::Tensor d_unprojected_t = row_block(d_unprojected, 0, n);
        backend.project_backward(total, d_unprojected_t);
        d_h_output = d_unprojected_t.const_data_ptr();
        d_h_recurrent = zeros.const_data_ptr();
      }
      if (n > 0) {
        BackwardStepArgs args{row_block(gates, offset, n).const_data_ptr(),
                                    row_block(variant.zoneout ? cells_new : cells, offset, n)
                                        .const_data_ptr(),
                                    c_prev.const_data_ptr(),
                                    d_h_output,
                                    d_h_recurrent,
                                    d_c.data_ptr(),
                                    d_gates_t.data_ptr(),
                                    n,
                                    hidden,
                                    peephole_c.defined() ? peephole_c.const_data_ptr() : nullptr,
                                    cell == Cell::kLstmCoupled};
        if (variant.zoneout) {
          set_step_zoneout(args, variant, offset, n);
          args.d_h_prev = d_h_t.data_ptr();  // the kept part; the GEMM below adds onto it
        }
        if (layer_norm) {
          args.layer_norm = true;
          args.ln.weight_hh = variant.weight_hh.const_data_ptr();
          args.ln.weight_c = variant.weight_c.const_data_ptr();
          args.ln.bias_c = variant.bias_c.const_data_ptr();
          args.ln.norm_hh = row_block(ln_saved->norm_hh, offset, n).const_data_ptr();
          args.ln.norm_c = row_block(ln_saved->norm_c, offset, n).const_data_ptr();
          args.ln.rstd = row_block(ln_saved->rstd, offset, n).const_data_ptr();
          args.ln.d_recurrent = row_block(d_recurrent, offset, n).data_ptr();
          args.ln.d_c_out = row_block(d_c_out, offset, n).data_ptr();
        }
        backend.backward_pointwise(args, x.scalar_type());
      }
      backend.recurrent_gradient(layer_norm ? row_block(d_recurrent, offset, n) : d_gates_t, d_h_t,
                                 /*accumulate=*/variant.zoneout);
    }
  }

  // Weight and input gradients as large GEMMs over all timesteps.
  RECORD_FUNCTION("lstm_ext::weight_gradients", std::vector<c10::IValue>());
  LayerGradients grads;
  if (layer_norm) {
    // The input's share of the pre-activations was the loop's input: its gradient is d_gates.
    grads.grad_input = d_gates;
  } else if (lstm) {
    grads.grad_input = at::empty({rows, features}, options);
    grads.grad_w_ih = at::empty({gates_per_unit * hidden, features}, options);
    backend.matmul(d_gates, w_ih, grads.grad_input, /*accumulate=*/false);
    backend.weight_gradient(d_gates, x, grads.grad_w_ih, &grads.grad_b_hh);
    grads.grad_b_ih = grads.grad_b_hh;
  } else {
    grads.grad_input = at::empty({rows, features}, options);
    grads.grad_w_ih = at::empty({gates_per_unit * hidden, features}, options);
    // W_ih's r and z rows take the gradients W_hh's do; its n rows those of W_in x + b_in.
    const at::Tensor d_rz = d_gates.narrow(1, 0, 2 * hidden);
    backend.matmul(d_rz, w_ih.narrow(0, 0, 2 * hidden), grads.grad_input, /*accumulate=*/false);
    backend.matmul(d_input_n, w_ih.narrow(0, 2 * hidden, hidden), grads.grad_input,
                   /*accumulate=*/true);
    at::Tensor grad_w_rz = grads.grad_w_ih.narrow(0, 0, 2 * hidden);
    at::Tensor grad_w_n = grads.grad_w_ih.narrow(0, 2 * hidden, hidden);
    at::Tensor grad_b_rz, grad_b_input_n;
    backend.weight_gradient(d_rz, x, grad_w_rz, &grad_b_rz);
    backend.weight_gradient(d_input_n, x, grad_w_n, &grad_b_input_n);
    grads.grad_b_ih = at::cat({grad_b_rz, grad_b_input_n});
    grads.grad_b_hh = at::cat({grad_b_rz, d_gates.narrow(1, 2 * hidden, hidden).sum(0)});
  }
  grads.grad_w_hh = at::empty({gates_per_unit * hidden, proj}, options);
  at::Tensor& grad_w_hh = grads.grad_w_hh;
  const at::Tensor& d_product = layer_norm ? d_recurrent : d_gates;  // of h_{t-1} W_hh^T
  if (layout.packed()) {
    backend.matmul(d_product.t(), gather_previous_hidden(output, h0_c, layout, reverse),
                   grad_w_hh, /*accumulate=*/false);
  } else {
    // h_{t-1} of the first forward step is h0; of every other step, the output of its
    // predecessor: the output shifted by one step, a strided view.
    const int64_t first_t = step_time(0, steps, reverse);
    backend.matmul(d_product.narrow(0, first_t * batch, batch).t(), h0_c, grad_w_hh,
                   /*accumulate=*/false);
    if (steps > 1) {
      const int64_t later = (steps - 1) * batch;
      const at::Tensor later_d_gates = d_product.narrow(0, reverse ? 0 : batch, later);
      const at::Tensor their_h_prev = output.narrow(0, reverse ? batch : 0, later);
      backend.matmul(later_d_gates.t(), their_h_prev, grad_w_hh, /*accumulate=*/true);
    }
  }
  grads.grad_w_hr = at::empty({0}, options);
  if (projected) {
    grads.grad_w_hr = at::empty({proj, hidden}, options);
    backend.matmul(d_h_total.t(), unprojected, grads.grad_w_hr, /*accumulate=*/false);
  }
  if (peephole_c.defined()) {
    // The peephole weights' gradients: sums over every row of d_i c_{t-1}, d_f c_{t-1} (none with
    // coupled gates) and d_o c_t, from the gate gradients and the saved cell states.
    const at::Tensor c_prev = gather_previous_hidden(cells, c0_c, layout, reverse);
    const bool coupled = cell == Cell::kLstmCoupled;
    const auto d_gate = [&](int64_t k) { return d_gates.narrow(1, k * hidden, hidden); };
    grads.grad_peephole = at::stack(
        {(d_gate(0) * c_prev).sum(0),
         coupled ? at::zeros({hidden}, options) : (d_gate(1) * c_prev).sum(0),
         (d_gate(coupled ? 2 : 3) * (variant.zoneout ? cells_new : cells)).sum(0)});
  }
  if (layer_norm) {
    grads.grad_ln_weight_hh = (d_gates * ln_saved->norm_hh).sum(0);
    grads.grad_ln_weight_c = (d_c_out * ln_saved->norm_c).sum(0);
    grads.grad_ln_bias_c = d_c_out.sum(0);
  }
  grads.grad_h0 = d_h;
  grads.grad_c0 = lstm ? d_c : at::empty({0}, options);
  return grads;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Op entry points: check, then run.

// The LSTM's layer ops, plain and variant, share these two: `op` names the operator in messages.
namespace {

Cell lstm_cell_of(bool coupled) { return coupled ? Cell::kLstmCoupled : Cell::kLstm; }

// The variant options of an op call, checked, as the loop takes them. Zoneout: training masks
// keep_h / keep_c, per-step like the input ([T, N, H], packed [rows, H]) and both or neither; or
// without masks the eval keep probability `zoneout` in [0, 1).
LoopVariant checked_variant(const char* op, const at::Tensor& input, const StepLayout& layout,
                            const std::optional<at::Tensor>& peephole, int64_t hidden,
                            bool projected, const std::optional<at::Tensor>& keep_h,
                            const std::optional<at::Tensor>& keep_c, double zoneout) {
  LoopVariant variant;
  if (peephole.has_value()) {
    check_shape(op, *peephole, "peephole", {3, hidden}, "[3, H]");
    check_same_device_and_dtype(op, input, "input", *peephole, "peephole");
    variant.peephole = peephole->contiguous();
  }
  TORCH_CHECK(keep_h.has_value() == keep_c.has_value(), op,
              ": zoneout_h and zoneout_c must be given together or both omitted");
  TORCH_CHECK(zoneout >= 0 && zoneout < 1, op, ": expected zoneout in [0, 1), got ", zoneout);
  variant.zoneout = keep_h.has_value() || zoneout > 0;
  TORCH_CHECK(!(variant.zoneout && projected), op,
              ": zoneout with projections (w_hr) is not supported");
  if (keep_h.has_value()) {
    const std::vector<int64_t> expected =
        layout.packed() ? std::vector<int64_t>{layout.rows, hidden}
                        : std::vector<int64_t>{layout.steps, layout.batch, hidden};
    const char* text = layout.packed() ? "[rows, H]" : "[T, N, H]";
    for (const auto& [mask, name] : {std::pair<const at::Tensor&, const char*>{*keep_h, "zoneout_h"},
                                     {*keep_c, "zoneout_c"}}) {
      check_shape(op, mask, name, expected, text);
      check_same_device_and_dtype(op, input, "input", mask, name);
    }
    variant.keep_h = flatten(*keep_h, layout, hidden);
    variant.keep_c = flatten(*keep_c, layout, hidden);
  }
  variant.keep_p = zoneout;
  return variant;
}

ForwardResult lstm_layer_forward(const char* op, const at::Tensor& input, const at::Tensor& h0,
                                 const at::Tensor& c0, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                 const std::optional<at::Tensor>& b_hh,
                                 const std::optional<at::Tensor>& peephole, bool coupled,
                                 bool reverse, bool training,
                                 const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes,
                                 StepBackend& backend,
                                 const std::optional<at::Tensor>& keep_h = std::nullopt,
                                 const std::optional<at::Tensor>& keep_c = std::nullopt,
                                 double zoneout = 0) {
  const Cell cell = lstm_cell_of(coupled);
  const StepLayout layout = input_layout(op, input, batch_sizes);
  const int64_t features = input.size(-1);
  const LayerSizes sizes = check_weights(cell, op, input, features, w_ih, w_hh, b_ih, b_hh, w_hr);
  const char* h_shape = w_hr.has_value() ? "[N, P]" : "[N, H]";
  check_state(op, input, h0, "h0", layout.batch, sizes.proj, h_shape);
  check_state(op, input, c0, "c0", layout.batch, sizes.hidden, "[N, H]");
  const LoopVariant variant = checked_variant(op, input, layout, peephole, sizes.hidden,
                                              w_hr.has_value(), keep_h, keep_c, zoneout);
  auto [output, h_n, c_n, gates, cells, hidden] =
      forward_unchecked(cell, flatten(input, layout, features), layout, h0, c0, w_ih, w_hh, b_ih,
                        b_hh, w_hr, reverse, training, backend, variant);
  return {unflatten(output, layout), h_n, c_n, unflatten(gates, layout), unflatten(cells, layout),
          unflatten(hidden, layout)};
}

LayerGradients lstm_layer_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& peephole, bool coupled, const at::Tensor& output,
    const at::Tensor& saved_gates, const at::Tensor& saved_cells, bool reverse,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& saved_hidden, StepBackend& backend,
    const std::optional<at::Tensor>& keep_h = std::nullopt,
    const std::optional<at::Tensor>& keep_c = std::nullopt, double zoneout = 0) {
  const Cell cell = lstm_cell_of(coupled);
  const int64_t gates_per_unit = gate_count(cell);
  const StepLayout layout = input_layout(op, input, batch_sizes);
  const int64_t features = input.size(-1), batch = layout.batch;
  const LayerSizes sizes =
      check_weights(cell, op, input, features, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const int64_t hidden = sizes.hidden, proj = sizes.proj;
  TORCH_CHECK(saved_gates.numel() > 0 || batch == 0, op,
              ": the forward pass was run with training=False, so nothing was saved for backward");
  const char* h_shape = w_hr.has_value() ? "[N, P]" : "[N, H]";
  check_state(op, input, h0, "h0", batch, proj, h_shape);
  check_state(op, input, c0, "c0", batch, hidden, "[N, H]");
  check_state(op, input, grad_h_n, "grad_h_n", batch, proj, h_shape);
  check_state(op, input, grad_c_n, "grad_c_n", batch, hidden, "[N, H]");
  const LoopVariant variant = checked_variant(op, input, layout, peephole, hidden,
                                              w_hr.has_value(), keep_h, keep_c, zoneout);
  // The per-step tensors: [T, N, width], or [rows, width] when packed.
  const auto per_step = [&](int64_t width) -> std::vector<int64_t> {
    if (layout.packed()) {
      return {layout.rows, width};
    }
    return {layout.steps, batch, width};
  };
  const char* rows_text = layout.packed() ? "[rows, " : "[T, N, ";
  const auto check_per_step = [&](const at::Tensor& t, const char* name, int64_t width,
                                  const char* width_text) {
    check_shape(op, t, name, per_step(width), (std::string(rows_text) + width_text).c_str());
    check_same_device_and_dtype(op, input, "input", t, name);
  };
  const char* p_text = w_hr.has_value() ? "P]" : "H]";
  check_per_step(grad_output, "grad_output", proj, p_text);
  check_per_step(output, "output", proj, p_text);
  check_per_step(saved_gates, "saved_gates", gates_per_unit * hidden, coupled ? "3H]" : "4H]");
  check_per_step(saved_cells, "saved_cells", hidden, "H]");
  at::Tensor unprojected;
  if (w_hr.has_value() || variant.zoneout) {
    TORCH_CHECK(saved_hidden.has_value(), op,
                ": with w_hr (projections) or zoneout, saved_hidden from the forward pass is "
                "required");
    check_per_step(*saved_hidden, "saved_hidden", hidden, "H]");
    unprojected = flatten(*saved_hidden, layout, hidden);
  }
  LayerGradients grads = backward_unchecked(
      cell, flatten(grad_output, layout, proj), grad_h_n, grad_c_n,
      flatten(input, layout, features), layout, h0, c0, w_ih, w_hh, w_hr,
      flatten(output, layout, proj), flatten(saved_gates, layout, gates_per_unit * hidden),
      flatten(saved_cells, layout, hidden), unprojected, reverse, backend, variant);
  grads.grad_input = unflatten(grads.grad_input, layout);
  return grads;
}

}  // namespace

ForwardResult lstm_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& batch_sizes, StepBackend& backend) {
  return lstm_layer_forward("lstm_ext::lstm_forward", input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                            std::nullopt, /*coupled=*/false, reverse, training, w_hr, batch_sizes,
                            backend);
}

BackwardResult lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                             const at::Tensor& grad_c_n, const at::Tensor& input,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const at::Tensor& output,
                             const at::Tensor& saved_gates, const at::Tensor& saved_cells,
                             bool reverse, const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes,
                             const std::optional<at::Tensor>& saved_hidden,
                             StepBackend& backend) {
  const LayerGradients grads = lstm_layer_backward(
      "lstm_ext::_lstm_backward", grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
      std::nullopt, /*coupled=*/false, output, saved_gates, saved_cells, reverse, w_hr,
      batch_sizes, saved_hidden, backend);
  return {grads.grad_input, grads.grad_h0, grads.grad_c0, grads.grad_w_ih,
          grads.grad_w_hh, grads.grad_b_hh, grads.grad_w_hr};
}

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
                                   StepBackend& backend) {
  return lstm_layer_forward("lstm_ext::lstm_variant_forward", input, h0, c0, w_ih, w_hh, b_ih,
                            b_hh, peephole, coupled_gates, reverse, training, w_hr, batch_sizes,
                            backend, zoneout_h, zoneout_c, zoneout);
}

VariantBackwardResult lstm_variant_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    const at::Tensor& output, const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    bool reverse, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& saved_hidden,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout, StepBackend& backend) {
  const LayerGradients grads = lstm_layer_backward(
      "lstm_ext::_lstm_variant_backward", grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih,
      w_hh, peephole, coupled_gates, output, saved_gates, saved_cells, reverse, w_hr, batch_sizes,
      saved_hidden, backend, zoneout_h, zoneout_c, zoneout);
  const at::Tensor grad_peephole =
      grads.grad_peephole.defined() ? grads.grad_peephole : at::empty({0}, input.options());
  return {grads.grad_input, grads.grad_h0,   grads.grad_c0,   grads.grad_w_ih,
          grads.grad_w_hh,  grads.grad_b_hh, grads.grad_w_hr, grad_peephole};
}

// The layer-norm LSTM's entry points: the same loop, its input the input's share of the
// pre-activations (see LoopVariant).
namespace {

// Checks the weights of a layer-norm layer against its input share; returns H.
int64_t check_layer_norm_weights(const char* op, Cell cell, const at::Tensor& reference,
                                 const char* reference_name, const at::Tensor& w_hh,
                                 const at::Tensor& weight_hh, const at::Tensor& weight_c,
                                 const at::Tensor& bias_c) {
  const int64_t gates = gate_count(cell);
  const bool coupled = cell == Cell::kLstmCoupled;
  TORCH_CHECK(at::isFloatingType(reference.scalar_type()), op, ": expected a floating-point ",
              reference_name, ", got dtype ", reference.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op,
              ": expected w_hh of shape ", coupled ? "[3H, H]" : "[4H, H]", ", got ",
              w_hh.sizes());
  const int64_t hidden = w_hh.size(1);
  check_same_device_and_dtype(op, reference, reference_name, w_hh, "w_hh");
  check_shape(op, weight_hh, "weight_hh", {gates * hidden}, coupled ? "[3H]" : "[4H]");
  check_shape(op, weight_c, "weight_c", {hidden}, "[H]");
  check_shape(op, bias_c, "bias_c", {hidden}, "[H]");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight_hh, "weight_hh"},
                                {weight_c, "weight_c"},
                                {bias_c, "bias_c"}}) {
    check_same_device_and_dtype(op, reference, reference_name, t, name);
  }
  return hidden;
}

LoopVariant layer_norm_variant(LoopVariant variant, const at::Tensor& weight_hh,
                               const at::Tensor& weight_c, const at::Tensor& bias_c) {
  variant.layer_norm = true;
  variant.weight_hh = weight_hh.contiguous();
  variant.weight_c = weight_c.contiguous();
  variant.bias_c = bias_c.contiguous();
  return variant;
}

}  // namespace

LayerNormForwardResult lstm_layernorm_forward(
    const at::Tensor& input_part, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const at::Tensor& weight_hh, const at::Tensor& weight_c,
    const at::Tensor& bias_c, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    bool reverse, bool training, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout, StepBackend& backend) {
  const char* op = "lstm_ext::lstm_layernorm_forward";
  const Cell cell = lstm_cell_of(coupled_gates);
  const StepLayout layout = input_layout(op, input_part, batch_sizes);
  const int64_t hidden = check_layer_norm_weights(op, cell, input_part, "input_part", w_hh,
                                                  weight_hh, weight_c, bias_c);
  const int64_t width = gate_count(cell) * hidden;
  TORCH_CHECK(input_part.size(-1) == width, op, ": expected input_part's last dimension to be ",
              coupled_gates ? "3H = " : "4H = ", width, " (the pre-activations' input share), got ",
              input_part.size(-1));
  check_state(op, input_part, h0, "h0", layout.batch, hidden, "[N, H]");
  check_state(op, input_part, c0, "c0", layout.batch, hidden, "[N, H]");
  const LoopVariant variant = layer_norm_variant(
      checked_variant(op, input_part, layout, peephole, hidden, /*projected=*/false, zoneout_h,
                      zoneout_c, zoneout),
      weight_hh, weight_c, bias_c);
  LayerNormSaved norms;
  auto [output, h_n, c_n, gates, cells, c_new] =
      forward_unchecked(cell, flatten(input_part, layout, width), layout, h0, c0,
                        /*w_ih=*/at::Tensor(), w_hh, std::nullopt, std::nullopt, std::nullopt,
                        reverse, training, backend, variant, &norms);
  if (!training) {
    const auto none = [&] { return at::empty({0}, input_part.options()); };
    return {unflatten(output, layout), h_n, c_n, gates, cells, c_new, none(), none(), none()};
  }
  return {unflatten(output, layout), h_n, c_n, unflatten(gates, layout), unflatten(cells, layout),
          c_new.numel() > 0 ? unflatten(c_new, layout) : c_new, unflatten(norms.norm_hh, layout),
          unflatten(norms.norm_c, layout), unflatten(norms.rstd, layout)};
}

LayerNormBackwardResult lstm_layernorm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& weight_hh, const at::Tensor& weight_c, const at::Tensor& bias_c,
    const std::optional<at::Tensor>& peephole, bool coupled_gates, const at::Tensor& output,
    const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    const std::optional<at::Tensor>& saved_hidden, const at::Tensor& saved_norm_hh,
    const at::Tensor& saved_norm_c, const at::Tensor& saved_rstd, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout, StepBackend& backend) {
  const char* op = "lstm_ext::_lstm_layernorm_backward";
  const Cell cell = lstm_cell_of(coupled_gates);
  // grad_output has the input's steps and rows: the layout comes from it.
  const StepLayout layout = input_layout(op, grad_output, batch_sizes);
  const int64_t hidden = check_layer_norm_weights(op, cell, grad_output, "grad_output", w_hh,
                                                  weight_hh, weight_c, bias_c);
  const int64_t width = gate_count(cell) * hidden, batch = layout.batch;
  TORCH_CHECK(saved_gates.numel() > 0 || batch == 0, op,
              ": the forward pass was run with training=False, so nothing was saved for backward");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{h0, "h0"},
                                {c0, "c0"},
                                {grad_h_n, "grad_h_n"},
                                {grad_c_n, "grad_c_n"}}) {
    check_state(op, grad_output, t, name, batch, hidden, "[N, H]");
  }
  const char* rows_text = layout.packed() ? "[rows, " : "[T, N, ";
  const auto check_per_step = [&](const at::Tensor& t, const char* name, int64_t columns,
                                  const char* columns_text) {
    const std::vector<int64_t> expected =
        layout.packed() ? std::vector<int64_t>{layout.rows, columns}
                        : std::vector<int64_t>{layout.steps, batch, columns};
    check_shape(op, t, name, expected, (std::string(rows_text) + columns_text).c_str());
    check_same_device_and_dtype(op, grad_output, "grad_output", t, name);
  };
  const char* gates_text = coupled_gates ? "3H]" : "4H]";
  check_per_step(grad_output, "grad_output", hidden, "H]");
  check_per_step(output, "output", hidden, "H]");
  check_per_step(saved_gates, "saved_gates", width, gates_text);
  check_per_step(saved_cells, "saved_cells", hidden, "H]");
  check_per_step(saved_norm_hh, "saved_norm_hh", width, gates_text);
  check_per_step(saved_norm_c, "saved_norm_c", hidden, "H]");
  check_per_step(saved_rstd, "saved_rstd", 2, "2]");
  const LoopVariant variant = layer_norm_variant(
      checked_variant(op, grad_output, layout, peephole, hidden, /*projected=*/false, zoneout_h,
                      zoneout_c, zoneout),
      weight_hh, weight_c, bias_c);
  at::Tensor cells_new;
  if (variant.zoneout) {
    TORCH_CHECK(saved_hidden.has_value(), op,
                ": with zoneout, saved_hidden from the forward pass is required");
    check_per_step(*saved_hidden, "saved_hidden", hidden, "H]");
    cells_new = flatten(*saved_hidden, layout, hidden);
  }
  const LayerNormSaved norms{flatten(saved_norm_hh, layout, width),
                             flatten(saved_norm_c, layout, hidden),
                             flatten(saved_rstd, layout, 2)};
  // The loop's `x` only lends its dtype and options here: the input share needs no GEMM.
  const at::Tensor gates_flat = flatten(saved_gates, layout, width);
  LayerGradients grads = backward_unchecked(
      cell, flatten(grad_output, layout, hidden), grad_h_n, grad_c_n, gates_flat, layout, h0, c0,
      /*w_ih=*/at::Tensor(), w_hh, std::nullopt, flatten(output, layout, hidden), gates_flat,
      flatten(saved_cells, layout, hidden), cells_new, reverse, backend, variant, &norms);
  const at::Tensor grad_peephole =
      grads.grad_peephole.defined() ? grads.grad_peephole : at::empty({0}, grad_output.options());
  return {unflatten(grads.grad_input, layout), grads.grad_h0,          grads.grad_c0,
          grads.grad_w_hh,                     grads.grad_ln_weight_hh, grads.grad_ln_weight_c,
          grads.grad_ln_bias_c,                grad_peephole};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, StepBackend& backend) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t hidden =
      check_weights(Cell::kLstm, op, input, input.size(1), w_ih, w_hh, b_ih, b_hh, std::nullopt)
          .hidden;
  check_state(op, input, hx, "hx", input.size(0), hidden, "[N, H]");
  check_state(op, input, cx, "cx", input.size(0), hidden, "[N, H]");
  // A single step is a sequence of length 1: the same GEMMs and the same pointwise pass.
  auto [output, h, c, saved_gates, saved_cells, saved_hidden] = forward_unchecked(
      Cell::kLstm, input.contiguous(), padded_layout(1, input.size(0)), hx, cx, w_ih, w_hh, b_ih,
      b_hh, std::nullopt, /*reverse=*/false, training, backend);
  return {h, c, saved_gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   StepBackend& backend) {
  constexpr const char* op = "lstm_ext::_lstm_cell_backward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t batch = input.size(0);
  const int64_t hidden =
      check_weights(Cell::kLstm, op, input, input.size(1), w_ih, w_hh, std::nullopt, std::nullopt,
                    std::nullopt)
          .hidden;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{hx, "hx"},
                                {cx, "cx"}, {grad_h, "grad_h"}, {grad_c, "grad_c"}, {c, "c"}}) {
    check_state(op, input, t, name, batch, hidden, "[N, H]");
  }
  check_shape(op, saved_gates, "saved_gates", {batch, 4 * hidden}, "[N, 4H]");
  check_same_device_and_dtype(op, input, "input", saved_gates, "saved_gates");
  // With T = 1 the incoming h gradient can enter as grad_h_n; output[0] gets a zero gradient, and
  // `output` is never read (it only supplies h_{t-1} for steps after the first).
  const at::Tensor zero_grad_output = at::zeros({batch, hidden}, input.options());
  const LayerGradients grads = backward_unchecked(
      Cell::kLstm, zero_grad_output, grad_h, grad_c, input.contiguous(), padded_layout(1, batch),
      hx, cx, w_ih, w_hh, std::nullopt, /*output=*/at::Tensor(), saved_gates.contiguous(),
      c.contiguous(), /*unprojected=*/at::Tensor(), /*reverse=*/false, backend);
  return {grads.grad_input, grads.grad_h0, grads.grad_c0, grads.grad_w_ih, grads.grad_w_hh,
          grads.grad_b_hh};
}

// The GRU's entry points: the same checks and loop, with the GRU's shapes.

GruLayerResult gru_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                           const std::optional<at::Tensor>& batch_sizes, StepBackend& backend) {
  constexpr const char* op = "lstm_ext::gru_forward";
  const StepLayout layout = input_layout(op, input, batch_sizes);
  const int64_t features = input.size(-1);
  const int64_t hidden =
      check_weights(Cell::kGru, op, input, features, w_ih, w_hh, b_ih, b_hh, std::nullopt).hidden;
  check_state(op, input, h0, "h0", layout.batch, hidden, "[N, H]");
  auto [output, h_n, c_n, gates, hidden_n, unprojected] =
      forward_unchecked(Cell::kGru, flatten(input, layout, features), layout, h0, at::Tensor(),
                        w_ih, w_hh, b_ih, b_hh, std::nullopt, reverse, training, backend);
  return {unflatten(output, layout), h_n, unflatten(gates, layout), unflatten(hidden_n, layout)};
}

GruGradients gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                          const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const at::Tensor& output,
                          const at::Tensor& saved_gates, const at::Tensor& saved_hidden_n,
                          bool reverse, const std::optional<at::Tensor>& batch_sizes,
                          StepBackend& backend) {
  constexpr const char* op = "lstm_ext::_gru_backward";
  const StepLayout layout = input_layout(op, input, batch_sizes);
  const int64_t features = input.size(-1), batch = layout.batch;
  const int64_t hidden = check_weights(Cell::kGru, op, input, features, w_ih, w_hh, std::nullopt,
                                       std::nullopt, std::nullopt)
                             .hidden;
  TORCH_CHECK(saved_gates.numel() > 0 || batch == 0, op,
              ": the forward pass was run with training=False, so nothing was saved for backward");
  check_state(op, input, h0, "h0", batch, hidden, "[N, H]");
  check_state(op, input, grad_h_n, "grad_h_n", batch, hidden, "[N, H]");
  const std::vector<int64_t> rows =
      layout.packed() ? std::vector<int64_t>{layout.rows} : std::vector<int64_t>{layout.steps, batch};
  const char* rows_text = layout.packed() ? "[rows, " : "[T, N, ";
  for (const auto& [t, name, width, width_text] :
       {std::tuple<const at::Tensor&, const char*, int64_t, const char*>{grad_output, "grad_output",
                                                                         hidden, "H]"},
        {output, "output", hidden, "H]"},
        {saved_gates, "saved_gates", 3 * hidden, "3H]"},
        {saved_hidden_n, "saved_hidden_n", hidden, "H]"}}) {
    std::vector<int64_t> expected = rows;
    expected.push_back(width);
    check_shape(op, t, name, expected, (std::string(rows_text) + width_text).c_str());
    check_same_device_and_dtype(op, input, "input", t, name);
  }
  const LayerGradients grads = backward_unchecked(
      Cell::kGru, flatten(grad_output, layout, hidden), grad_h_n, at::Tensor(),
      flatten(input, layout, features), layout, h0, at::Tensor(), w_ih, w_hh, std::nullopt,
      flatten(output, layout, hidden), flatten(saved_gates, layout, 3 * hidden),
      flatten(saved_hidden_n, layout, hidden), at::Tensor(), reverse, backend);
  return {unflatten(grads.grad_input, layout), grads.grad_h0, grads.grad_w_ih, grads.grad_w_hh,
          grads.grad_b_ih, grads.grad_b_hh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool training,
    StepBackend& backend) {
  constexpr const char* op = "lstm_ext::gru_cell_forward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t hidden =
      check_weights(Cell::kGru, op, input, input.size(1), w_ih, w_hh, b_ih, b_hh, std::nullopt)
          .hidden;
  check_state(op, input, hx, "hx", input.size(0), hidden, "[N, H]");
  auto [output, h, c, saved_gates, saved_hidden_n, unprojected] = forward_unchecked(
      Cell::kGru, input.contiguous(), padded_layout(1, input.size(0)), hx, at::Tensor(), w_ih,
      w_hh, b_ih, b_hh, std::nullopt, /*reverse=*/false, training, backend);
  // h is h_n, not output[0] (the same values), so that no output aliases another.
  return {h, saved_gates, saved_hidden_n};
}

GruGradients gru_cell_backward(const at::Tensor& grad_h, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const at::Tensor& saved_gates,
                               const at::Tensor& saved_hidden_n, StepBackend& backend) {
  constexpr const char* op = "lstm_ext::_gru_cell_backward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t batch = input.size(0);
  const int64_t hidden = check_weights(Cell::kGru, op, input, input.size(1), w_ih, w_hh,
                                       std::nullopt, std::nullopt, std::nullopt)
                             .hidden;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{hx, "hx"},
                                {grad_h, "grad_h"}, {saved_hidden_n, "saved_hidden_n"}}) {
    check_state(op, input, t, name, batch, hidden, "[N, H]");
  }
  check_shape(op, saved_gates, "saved_gates", {batch, 3 * hidden}, "[N, 3H]");
  check_same_device_and_dtype(op, input, "input", saved_gates, "saved_gates");
  // As lstm_cell_backward: the incoming gradient enters as grad_h_n of a one-step sequence.
  const at::Tensor zero_grad_output = at::zeros({batch, hidden}, input.options());
  const LayerGradients grads = backward_unchecked(
      Cell::kGru, zero_grad_output, grad_h, at::Tensor(), input.contiguous(),
      padded_layout(1, batch), hx, at::Tensor(), w_ih, w_hh, std::nullopt,
      /*output=*/at::Tensor(), saved_gates.contiguous(), saved_hidden_n.contiguous(),
      /*unprojected=*/at::Tensor(), /*reverse=*/false, backend);
  return {grads.grad_input, grads.grad_h0, grads.grad_w_ih, grads.grad_w_hh, grads.grad_b_ih,
          grads.grad_b_hh};
}

}  // namespace lstm_ext
