// The CPU float32 StepBackend: the recurrent GEMM of each step fused with the step's pointwise
// pass, over W_hh packed once per call, and the large GEMMs on the same packed-B kernel.
//
// Included by the per-instruction-set files (lstm_kernels_avx2.cpp, lstm_kernels_avx512.cpp) after
// lstm_pointwise_impl.h, inside which the gate math's SIMD activations are defined.
#pragma once

#include <memory>

#include "../common/lstm_sequence.h"
#include "lstm_pointwise_impl.h"
#include "packed_gemm.h"

namespace lstm_ext::cpu {
inline namespace CPU_CAPABILITY {

// The epilogue of a forward step: the tile's accumulators are gate pre-activations of kVecWidth
// hidden units (B packed in gate order, so vector v of a tile is gate v); the last K block turns
// them into c_t and h_t in registers, and saves the activated gates when training.
struct LstmForwardOutput {
  float* gates;          // [N, 4H] pre-activations in (input projection and biases), out as above
  const float* c_prev;   // [N, H]
  float* c;              // [N, H]
  float* h;              // [N, H]
  int64_t hidden;
  bool training;

  float* gate_ptr(int64_t row, int64_t panel, int64_t vec) const {
    return gates + row * 4 * hidden + vec * hidden + panel * kVecWidth;
  }
  int64_t units(int64_t panel) const {
    return std::min<int64_t>(kVecWidth, hidden - panel * kVecWidth);
  }
  static FloatVec load_units(const float* p, int64_t count) {
    return count == kVecWidth ? FloatVec::loadu(p) : FloatVec::loadu(p, count);
  }
  static void store_units(float* p, const FloatVec& v, int64_t count) {
    if (count == kVecWidth) {
      v.store(p);
    } else {
      v.store(p, count);
    }
  }

  // A step always accumulates onto the input projection already in `gates`; init is never used.
  template <int64_t kRows>
  void init(int64_t, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (auto& row : acc) {
      for (auto& v : row) v = raw_broadcast(0.f);
    }
  }
  template <int64_t kRows>
  void load(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        acc[r][v] = load_units(gate_ptr(row0 + r, panel, v), count);
      }
    }
  }
  template <int64_t kRows>
  void store(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        store_units(gate_ptr(row0 + r, panel, v), FloatVec(acc[r][v]), count);
      }
    }
  }
  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    const int64_t j = panel * kVecWidth;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      const GatePreActivations<FloatVec> pre{FloatVec(acc[r][0]), FloatVec(acc[r][1]),
                                             FloatVec(acc[r][2]), FloatVec(acc[r][3])};
      const CellForwardResult<FloatVec> result =
          lstm_cell_forward_unit(pre, load_units(c_prev + row * hidden + j, count));
      store_units(c + row * hidden + j, result.c, count);
      store_units(h + row * hidden + j, result.h, count);
      if (training) {
        store_units(gate_ptr(row, panel, 0), result.gates.i, count);
        store_units(gate_ptr(row, panel, 1), result.gates.f, count);
        store_units(gate_ptr(row, panel, 2), result.gates.g, count);
        store_units(gate_ptr(row, panel, 3), result.gates.o, count);
      }
    }
  }
};

class FusedFloatBackend final : public StepBackend {
 public:
  explicit FusedFloatBackend(const PointwiseKernels& kernels) : StepBackend(kernels) {}

  void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) override {
    if (a.size(1) == 0 || !out.is_contiguous()) {
      StepBackend::matmul(a, b, out, accumulate);
      return;
    }
    const PackedB packed = pack_b(b.const_data_ptr<float>(), b.stride(0), b.stride(1), b.size(0),
                                  b.size(1), ColumnOrder::kPlain);
    const OperandA a_operand{a.const_data_ptr<float>(), a.stride(0), a.stride(1)};
    packed_gemm(a_operand, a.size(0), packed, PlainOutput{out.data_ptr<float>(), out.stride(0), &packed},
                accumulate);
  }

  // W_hh is [4H, K] with K the width of h_{t-1}: H, or the projection size once projections
  // exist. Both packings below keep the two apart.
  void project_input(const at::Tensor& x, const at::Tensor& w_ih,
                     const std::optional<at::Tensor>& bias, at::Tensor& out) override {
    if (x.size(1) == 0 || !out.is_contiguous()) {
      StepBackend::project_input(x, w_ih, bias, out);
      return;
    }
    // B = W_ih^T: element (k, col) = w_ih[col][k]. The bias seeds the accumulators, so the output
    // is written once rather than filled with the bias first.
    const PackedB packed = pack_b(w_ih.const_data_ptr<float>(), w_ih.stride(1), w_ih.stride(0),
                                  w_ih.size(1), w_ih.size(0), ColumnOrder::kPlain);
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const PlainOutput output{out.data_ptr<float>(), out.stride(0), &packed,
                             bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr};
    const OperandA a_operand{x.const_data_ptr<float>(), x.stride(0), x.stride(1)};
    packed_gemm(a_operand, x.size(0), packed, output, /*accumulate=*/false);
  }

  void begin_forward(const at::Tensor& w_hh) override {
    StepBackend::begin_forward(w_hh);
    hidden_ = w_hh.size(0) / 4;
    if (hidden_ > 0 && w_hh.size(1) > 0) {
      // B = W_hh^T: element (k, col) = w_hh[col][k]; gate order for the fused epilogue.
      packed_w_hh_ = pack_b(w_hh.const_data_ptr<float>(), /*k_stride=*/1,
                            /*col_stride=*/w_hh.stride(0), w_hh.size(1), w_hh.size(0),
                            ColumnOrder::kGates);
    }
  }

  void forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& c_prev,
                    at::Tensor& c, at::Tensor& h, bool training) override {
    if (packed_w_hh_.k == 0 || packed_w_hh_.panels == 0) {
      StepBackend::forward_step(h_prev, gates, c_prev, c, h, training);
      return;
    }
    if (gates.size(0) == 0) {
      return;
    }
    const LstmForwardOutput out{gates.data_ptr<float>(), c_prev.const_data_ptr<float>(),
                                c.data_ptr<float>(),     h.data_ptr<float>(),
                                hidden_,                 training};
    const OperandA a_operand{h_prev.const_data_ptr<float>(), h_prev.stride(0), h_prev.stride(1)};
    packed_gemm(a_operand, gates.size(0), packed_w_hh_, out, /*accumulate=*/true);
  }

  void begin_backward(const at::Tensor& w_hh) override {
    StepBackend::begin_backward(w_hh);
    if (w_hh.size(0) > 0 && w_hh.size(1) > 0) {
      // B = W_hh [4H, K] as it is stored.
      packed_w_hh_ = pack_b(w_hh.const_data_ptr<float>(), /*k_stride=*/w_hh.stride(0),
                            /*col_stride=*/1, w_hh.size(0), w_hh.size(1), ColumnOrder::kPlain);
    }
  }

  void recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h) override {
    if (packed_w_hh_.k == 0 || packed_w_hh_.panels == 0) {
      StepBackend::recurrent_gradient(d_gates, d_h);
      return;
    }
    const OperandA a_operand{d_gates.const_data_ptr<float>(), d_gates.stride(0), d_gates.stride(1)};
    packed_gemm(a_operand, d_gates.size(0), packed_w_hh_,
                PlainOutput{d_h.data_ptr<float>(), d_h.stride(0), &packed_w_hh_},
                /*accumulate=*/false);
  }

 private:
  int64_t hidden_ = 0;
  PackedB packed_w_hh_;
};

inline std::unique_ptr<StepBackend> make_fused_float_backend(const PointwiseKernels& kernels) {
  return std::make_unique<FusedFloatBackend>(kernels);
}

}  // namespace CPU_CAPABILITY
}  // namespace lstm_ext::cpu
