// The one registration site of the lstm_ext operator schemas (LSTM and GRU). Kernels are registered per device at
// the end of cpu/lstm_ops.cpp and cuda/lstm_ops.cpp; fake (meta) kernels and autograd formulas in
// lstm_ext/ops.py.
//
// Shapes: T time, N batch, C input size, H hidden size, P projection size (P = H without
// projections). Forward ops take the weights as torch.nn.LSTM stores them: w_ih [4H, C],
// w_hh [4H, P], b_ih/b_hh [4H], w_hr [P, H] (proj_size > 0 only).
#include <torch/library.h>

TORCH_LIBRARY(lstm_ext, m) {
  // One layer, one direction, the whole sequence: input [T, N, C], h0 [N, P], c0 [N, H] ->
  // output [T, N, P], h_n [N, P], c_n [N, H], and what backward needs when training (activated
  // gates [T, N, 4H], cell states [T, N, H], with w_hr the un-projected o * tanh(c) [T, N, H];
  // empty otherwise). With w_hr [P, H] each step's h_t is projected (LSTM with projections).
  // With batch_sizes (a PackedSequence's, int64 on the CPU, [T]) the input is packed, [rows, C],
  // and so are output and the saved tensors; h_n/c_n are each sequence's state after its own last
  // step.
  m.def(
      "lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool reverse, bool training, Tensor? w_hr=None, Tensor? batch_sizes=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor saved_gates, Tensor saved_cells, "
      "Tensor saved_hidden)");
  // Gradients of lstm_forward; grad_bias [4H] is the gradient of b_ih and of b_hh; grad_w_hr is
  // empty without w_hr.
  m.def(
      "_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor saved_gates, "
      "Tensor saved_cells, bool reverse, Tensor? w_hr=None, Tensor? batch_sizes=None, "
      "Tensor? saved_hidden=None) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  // One step, as torch.nn.LSTMCell: input [N, C], hx/cx [N, H] -> h [N, H], c [N, H], and the
  // activated gates [N, 4H] when training (empty otherwise).
  m.def(
      "lstm_cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool training) -> (Tensor h, Tensor c, Tensor saved_gates)");
  m.def(
      "_lstm_cell_backward(Tensor grad_h, Tensor grad_c, Tensor input, Tensor hx, Tensor cx, "
      "Tensor w_ih, Tensor w_hh, Tensor c, Tensor saved_gates) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");

  // The LSTM variants: lstm_forward with peephole weights [3, H] (rows w_ci, w_cf, w_co: i and f
  // read c_{t-1}, o reads c_t) and/or coupled input and forget gates (f = 1 - i; w_ih [3H, C],
  // w_hh [3H, P], biases [3H] in gate order i, g, o; saved_gates [T, N, 3H]), and/or zoneout
  // (Krueger et al.: each unit of h_t and c_t keeps its previous value; training: 0/1 keep masks
  // zoneout_h, zoneout_c [T, N, H] (packed [rows, H]); eval: keep probability `zoneout`). With
  // zoneout saved_hidden holds c_t before zoneout.
  m.def(
      "lstm_variant_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? peephole, bool coupled_gates, bool reverse, "
      "bool training, Tensor? w_hr=None, Tensor? batch_sizes=None, Tensor? zoneout_h=None, "
      "Tensor? zoneout_c=None, float zoneout=0.0) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor saved_gates, Tensor saved_cells, Tensor saved_hidden)");
  // Its gradients: _lstm_backward's, then grad_peephole [3, H] (empty without peepholes).
  m.def(
      "_lstm_variant_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? peephole, "
      "bool coupled_gates, Tensor output, Tensor saved_gates, Tensor saved_cells, bool reverse, "
      "Tensor? w_hr=None, Tensor? batch_sizes=None, Tensor? saved_hidden=None, "
      "Tensor? zoneout_h=None, Tensor? zoneout_c=None, float zoneout=0.0) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr, Tensor grad_peephole)");

  // The layer-norm LSTM (Ba et al. 2016, haste's LayerNormLSTM), with the options of
  // lstm_variant_forward but projections. Its input is the input's share of the pre-activations,
  // input_part [T, N, G*H] (packed [rows, G*H]; G = 4, or 3 with coupled gates) =
  // LN(x W_ih^T) gain_ih + b_ih + b_hh, computed by the caller for all steps at once. Each step
  // adds LN(h_{t-1} W_hh^T) weight_hh [G*H], and h_t = o * tanh(LN(c_t) weight_c + bias_c)
  // (both [H]); LN has eps 1e-5 and no bias of its own on the recurrent product. The outputs
  // are lstm_variant_forward's, then when training the normalized recurrent products
  // [T, N, G*H], the normalized c_t [T, N, H] and each row's reciprocal standard deviations of
  // the two [T, N, 2] (empty otherwise).
  m.def(
      "lstm_layernorm_forward(Tensor input_part, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor weight_hh, Tensor weight_c, Tensor bias_c, Tensor? peephole, bool coupled_gates, "
      "bool reverse, bool training, Tensor? batch_sizes=None, Tensor? zoneout_h=None, "
      "Tensor? zoneout_c=None, float zoneout=0.0) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor saved_gates, Tensor saved_cells, Tensor saved_hidden, Tensor saved_norm_hh, "
      "Tensor saved_norm_c, Tensor saved_rstd)");
  // Its gradients; grad_input_part is that of the input's share (which autograd takes on through
  // the caller's layer_norm and GEMM); grad_peephole is empty without peepholes.
  m.def(
      "_lstm_layernorm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor h0, "
      "Tensor c0, Tensor w_hh, Tensor weight_hh, Tensor weight_c, Tensor bias_c, "
      "Tensor? peephole, bool coupled_gates, Tensor output, Tensor saved_gates, "
      "Tensor saved_cells, Tensor? saved_hidden, Tensor saved_norm_hh, Tensor saved_norm_c, "
      "Tensor saved_rstd, bool reverse, Tensor? batch_sizes=None, Tensor? zoneout_h=None, "
      "Tensor? zoneout_c=None, float zoneout=0.0) -> (Tensor grad_input_part, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_hh, Tensor grad_weight_hh, Tensor grad_weight_c, "
      "Tensor grad_bias_c, Tensor grad_peephole)");

  // The GRU, as torch.nn.GRU stores it: w_ih [3H, C], w_hh [3H, H], b_ih/b_hh [3H], gate order
  // r, z, n. One layer, one direction: input [T, N, C] (or packed, as lstm_forward), h0 [N, H] ->
  // output [T, N, H], h_n [N, H], and when training the activated gates [T, N, 3H] and
  // saved_hidden_n [T, N, H] (W_hn h_{t-1} + b_hn, which r multiplies); empty otherwise.
  m.def(
      "gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reverse, bool training, Tensor? batch_sizes=None) -> (Tensor output, Tensor h_n, "
      "Tensor saved_gates, Tensor saved_hidden_n)");
  // Gradients of gru_forward; the bias gradients differ in their n rows.
  m.def(
      "_gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, "
      "Tensor w_hh, Tensor output, Tensor saved_gates, Tensor saved_hidden_n, bool reverse, "
      "Tensor? batch_sizes=None) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  // One step, as torch.nn.GRUCell: input [N, C], hx [N, H] -> h [N, H], and when training the
  // activated gates [N, 3H] and saved_hidden_n [N, H] (empty otherwise).
  m.def(
      "gru_cell_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool training) -> (Tensor h, Tensor saved_gates, Tensor saved_hidden_n)");
  m.def(
      "_gru_cell_backward(Tensor grad_h, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, "
      "Tensor saved_gates, Tensor saved_hidden_n) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
}
