// The CPU kernels compiled once per instruction set, and how lstm_ops.cpp reaches them.
#pragma once

#include <memory>

#include "../common/lstm_sequence.h"

namespace lstm_ext::cpu {

struct CpuKernelSet {
  const char* name = "DEFAULT";  // the instruction set, as lstm_ext.build_info() reports it
  PointwiseKernels pointwise{};
  // The fused float32 StepBackend, or null where this instruction set has none.
  std::unique_ptr<StepBackend> (*make_float_backend)(const PointwiseKernels&) = nullptr;
  // The float32 StepBackend for a single step (T = 1), or null.
  std::unique_ptr<StepBackend> (*make_single_step_float_backend)(const PointwiseKernels&) = nullptr;
};

// Each returns false when its file was compiled without that instruction set (another compiler or
// architecture); none checks the running CPU, which lstm_ops.cpp does.
CpuKernelSet default_kernel_set();
bool avx2_kernel_set(CpuKernelSet* set);
bool avx512_kernel_set(CpuKernelSet* set);

}  // namespace lstm_ext::cpu
