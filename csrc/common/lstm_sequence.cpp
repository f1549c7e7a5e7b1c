#include "lstm_sequence.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/irange.h>

#include <vector>

namespace lstm_ext {

// ---------------------------------------------------------------------------------------------
// The default StepBackend: ATen GEMMs and the device's pointwise passes.

void StepBackend::matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                         bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void StepBackend::forward_step(const at::Tensor& h_prev, at::Tensor& gates,
                               const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h,
                               bool training) {
  gates.addmm_(h_prev, w_hh_.t());
  if (gates.size(0) == 0) {
    return;
  }
  const ForwardStepArgs args{gates.data_ptr(), c_prev.const_data_ptr(), c.data_ptr(),
                             h.data_ptr(),     gates.size(0),          h.size(1),
                             training};
  kernels_.forward_step(args, gates.scalar_type());
}

void StepBackend::recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h) {
  at::mm_out(d_h, d_gates, w_hh_);
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

// Checks the weights and biases against input features C; returns H.
int64_t check_weights(const char* op, const at::Tensor& input, int64_t input_features,
                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected a floating-point input, got dtype ", input.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1), op,
              ": expected w_hh of shape [4H, H], got ", w_hh.sizes());
  const int64_t hidden = w_hh.size(1);
  check_shape(op, w_ih, "w_ih", {4 * hidden, input_features}, "[4H, C]");
  check_same_device_and_dtype(op, input, "input", w_ih, "w_ih");
  check_same_device_and_dtype(op, input, "input", w_hh, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op,
              ": b_ih and b_hh must be given together or both omitted");
  if (b_ih.has_value()) {
    check_shape(op, *b_ih, "b_ih", {4 * hidden}, "[4H]");
    check_shape(op, *b_hh, "b_hh", {4 * hidden}, "[4H]");
    check_same_device_and_dtype(op, input, "input", *b_ih, "b_ih");
    check_same_device_and_dtype(op, input, "input", *b_hh, "b_hh");
  }
  return hidden;
}

void check_state(const char* op, const at::Tensor& input, const at::Tensor& state,
                 const char* name, int64_t batch, int64_t hidden) {
  check_shape(op, state, name, {batch, hidden}, "[N, H]");
  check_same_device_and_dtype(op, input, "input", state, name);
}

// ---------------------------------------------------------------------------------------------
// The time loop.

// Index of the k-th processed step: the recurrence runs forward in time, or backward for `reverse`.
int64_t step_time(int64_t k, int64_t steps, bool reverse) { return reverse ? steps - 1 - k : k; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_unchecked(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training, StepBackend& backend) {
  const int64_t steps = input.size(0), batch = input.size(1), features = input.size(2);
  const int64_t hidden = w_hh.size(1);
  const at::Tensor x = input.contiguous();

  // Input projection of all timesteps in one GEMM, both biases folded in: [T*N, C] x [C, 4H].
  // Each step's recurrent GEMM then accumulates into this buffer in place, and the pointwise pass
  // overwrites it with the activated gates when training, so it doubles as the saved gates.
  at::Tensor gates = at::empty({steps, batch, 4 * hidden}, x.options());
  at::Tensor gates_2d = gates.view({steps * batch, 4 * hidden});
  const at::Tensor x_2d = x.view({steps * batch, features});
  {
    // Named scopes show up in torch.profiler: where a step's time goes (benchmarks/README.md).
    RECORD_FUNCTION("lstm_ext::input_projection", std::vector<c10::IValue>());
    if (b_ih.has_value()) {
      gates_2d.copy_((*b_ih + *b_hh).expand({steps * batch, 4 * hidden}));
    }
    backend.matmul(x_2d, w_ih.t(), gates_2d, /*accumulate=*/b_ih.has_value());
  }

  at::Tensor output = at::empty({steps, batch, hidden}, x.options());
  at::Tensor cells = training ? at::empty({steps, batch, hidden}, x.options()) : at::empty({0}, x.options());
  // Inference keeps only the running cell state, updated in place.
  at::Tensor c_n = at::empty({batch, hidden}, x.options());

  std::vector<at::Tensor> gates_t = gates.unbind(0);
  std::vector<at::Tensor> output_t = output.unbind(0);
  at::Tensor h_prev = h0.contiguous();
  at::Tensor c_prev = c0.contiguous();
  RECORD_FUNCTION("lstm_ext::recurrence", std::vector<c10::IValue>());
  backend.begin_forward(w_hh.contiguous());
  for (const auto k : c10::irange(steps)) {
    const int64_t t = step_time(k, steps, reverse);
    at::Tensor c_t = training ? cells[t] : c_n;
    backend.forward_step(h_prev, gates_t[t], c_prev, c_t, output_t[t], training);
    h_prev = output_t[t];
    c_prev = c_t;
  }
  at::Tensor h_n = h_prev.clone();
  if (training) {
    c_n.copy_(c_prev);
    return {output, h_n, c_n, gates, cells};
  }
  return {output, h_n, c_n, at::empty({0}, x.options()), cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_unchecked(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const at::Tensor& output, const at::Tensor& saved_gates,
                        const at::Tensor& saved_cells, bool reverse, StepBackend& backend) {
  const int64_t steps = input.size(0), batch = input.size(1), features = input.size(2);
  const int64_t hidden = w_hh.size(1);
  const at::Tensor x = input.contiguous();
  const at::Tensor d_out = grad_output.contiguous();
  const at::Tensor gates = saved_gates.contiguous();
  const at::Tensor cells = saved_cells.contiguous();

  at::Tensor d_gates = at::empty({steps, batch, 4 * hidden}, x.options());
  // d_h_recurrent starts as grad_h_n and is then overwritten each step by d_gates[t] W_hh; after the
  // last step it is grad_h0. d_c is updated in place by the pointwise pass and ends as grad_c0.
  at::Tensor d_h_recurrent = grad_h_n.contiguous().clone();
  at::Tensor d_c = grad_c_n.contiguous().clone();

  const at::Tensor c0_c = c0.contiguous();
  {
    RECORD_FUNCTION("lstm_ext::recurrence_backward", std::vector<c10::IValue>());
    backend.begin_backward(w_hh.contiguous());
    // Backward visits the steps in the opposite order of the forward recurrence.
    for (const auto k : c10::irange(steps)) {
      const int64_t t = step_time(steps - 1 - k, steps, reverse);
      const bool first_forward_step = t == step_time(0, steps, reverse);
      const at::Tensor c_prev = first_forward_step ? c0_c : cells[reverse ? t + 1 : t - 1];
      at::Tensor d_gates_t = d_gates[t];
      if (batch > 0) {
        BackwardStepArgs args{gates[t].const_data_ptr(),     cells[t].const_data_ptr(),
                              c_prev.const_data_ptr(),       d_out[t].const_data_ptr(),
                              d_h_recurrent.const_data_ptr(), d_c.data_ptr(),
                              d_gates_t.data_ptr(),          batch,
                              hidden};
        backend.backward_pointwise(args, x.scalar_type());
      }
      backend.recurrent_gradient(d_gates_t, d_h_recurrent);
    }
  }

  // Weight and input gradients as large GEMMs over all timesteps.
  RECORD_FUNCTION("lstm_ext::weight_gradients", std::vector<c10::IValue>());
  const at::Tensor d_gates_2d = d_gates.view({steps * batch, 4 * hidden});
  at::Tensor grad_input = at::empty({steps, batch, features}, x.options());
  at::Tensor grad_input_2d = grad_input.view({steps * batch, features});
  backend.matmul(d_gates_2d, w_ih, grad_input_2d, /*accumulate=*/false);
  at::Tensor grad_w_ih = at::empty({4 * hidden, features}, x.options());
  backend.matmul(d_gates_2d.t(), x.view({steps * batch, features}), grad_w_ih, /*accumulate=*/false);
  // h_{t-1} of the first forward step is h0; of every other step, the output of its predecessor.
  const int64_t first_t = step_time(0, steps, reverse);
  at::Tensor grad_w_hh = at::empty({4 * hidden, hidden}, x.options());
  backend.matmul(d_gates[first_t].t(), h0, grad_w_hh, /*accumulate=*/false);
  if (steps > 1) {
    const at::Tensor out = output.contiguous();
    const at::Tensor later_d_gates = reverse ? d_gates.narrow(0, 0, steps - 1) : d_gates.narrow(0, 1, steps - 1);
    const at::Tensor their_h_prev = reverse ? out.narrow(0, 1, steps - 1) : out.narrow(0, 0, steps - 1);
    backend.matmul(later_d_gates.view({(steps - 1) * batch, 4 * hidden}).t(),
                   their_h_prev.view({(steps - 1) * batch, hidden}), grad_w_hh,
                   /*accumulate=*/true);
  }
  at::Tensor grad_bias = d_gates_2d.sum(0);
  return {grad_input, d_h_recurrent, d_c, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Op entry points: check, then run.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
    StepBackend& backend) {
  constexpr const char* op = "lstm_ext::lstm_forward";
  TORCH_CHECK(input.dim() == 3, op, ": expected input of shape [T, N, C], got ", input.sizes());
  TORCH_CHECK(input.size(0) > 0, op, ": expected sequence length T > 0, got input of shape ",
              input.sizes());
  const int64_t hidden = check_weights(op, input, input.size(2), w_ih, w_hh, b_ih, b_hh);
  check_state(op, input, h0, "h0", input.size(1), hidden);
  check_state(op, input, c0, "c0", input.size(1), hidden);
  return lstm_forward_unchecked(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse, StepBackend& backend) {
  constexpr const char* op = "lstm_ext::_lstm_backward";
  TORCH_CHECK(input.dim() == 3 && input.size(0) > 0, op,
              ": expected input of shape [T, N, C] with T > 0, got ", input.sizes());
  const int64_t steps = input.size(0), batch = input.size(1);
  const int64_t hidden = check_weights(op, input, input.size(2), w_ih, w_hh, std::nullopt, std::nullopt);
  TORCH_CHECK(saved_gates.numel() > 0 || batch == 0, op,
              ": the forward pass was run with training=False, so nothing was saved for backward");
  check_state(op, input, h0, "h0", batch, hidden);
  check_state(op, input, c0, "c0", batch, hidden);
  check_state(op, input, grad_h_n, "grad_h_n", batch, hidden);
  check_state(op, input, grad_c_n, "grad_c_n", batch, hidden);
  check_shape(op, grad_output, "grad_output", {steps, batch, hidden}, "[T, N, H]");
  check_shape(op, output, "output", {steps, batch, hidden}, "[T, N, H]");
  check_shape(op, saved_gates, "saved_gates", {steps, batch, 4 * hidden}, "[T, N, 4H]");
  check_shape(op, saved_cells, "saved_cells", {steps, batch, hidden}, "[T, N, H]");
  check_same_device_and_dtype(op, input, "input", grad_output, "grad_output");
  check_same_device_and_dtype(op, input, "input", output, "output");
  check_same_device_and_dtype(op, input, "input", saved_gates, "saved_gates");
  check_same_device_and_dtype(op, input, "input", saved_cells, "saved_cells");
  return lstm_backward_unchecked(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output,
                                 saved_gates, saved_cells, reverse, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, StepBackend& backend) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t hidden = check_weights(op, input, input.size(1), w_ih, w_hh, b_ih, b_hh);
  check_state(op, input, hx, "hx", input.size(0), hidden);
  check_state(op, input, cx, "cx", input.size(0), hidden);
  // A single step is a sequence of length 1: the same GEMMs and the same pointwise pass.
  auto [output, h, c, saved_gates, saved_cells] = lstm_forward_unchecked(
      input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, /*reverse=*/false, training, backend);
  return {h, c, training ? saved_gates.squeeze(0) : saved_gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   StepBackend& backend) {
  constexpr const char* op = "lstm_ext::_lstm_cell_backward";
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape [N, C], got ", input.sizes());
  const int64_t batch = input.size(0);
  const int64_t hidden = check_weights(op, input, input.size(1), w_ih, w_hh, std::nullopt, std::nullopt);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{hx, "hx"},
                                {cx, "cx"}, {grad_h, "grad_h"}, {grad_c, "grad_c"}, {c, "c"}}) {
    check_state(op, input, t, name, batch, hidden);
  }
  check_shape(op, saved_gates, "saved_gates", {batch, 4 * hidden}, "[N, 4H]");
  check_same_device_and_dtype(op, input, "input", saved_gates, "saved_gates");
  // With T = 1 the incoming h gradient can enter as grad_h_n; output[0] gets a zero gradient, and
  // `output` is never read (it only supplies h_{t-1} for steps after the first).
  const at::Tensor zero_grad_output = at::zeros({1, batch, hidden}, input.options());
  auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias] = lstm_backward_unchecked(
      zero_grad_output, grad_h, grad_c, input.unsqueeze(0), hx, cx, w_ih, w_hh,
      /*output=*/at::Tensor(), saved_gates.unsqueeze(0), c.unsqueeze(0), /*reverse=*/false, backend);
  return {grad_input.squeeze(0), grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

// The same entry points with the default backend: ATen GEMMs and the given pointwise passes.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
    const PointwiseKernels& kernels) {
  StepBackend backend(kernels);
  return lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse, const PointwiseKernels& kernels) {
  StepBackend backend(kernels);
  return lstm_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output,
                       saved_gates, saved_cells, reverse, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, const PointwiseKernels& kernels) {
  StepBackend backend(kernels);
  return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   const PointwiseKernels& kernels) {
  StepBackend backend(kernels);
  return lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates, backend);
}

}  // namespace lstm_ext
