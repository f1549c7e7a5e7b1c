// The CPU kernels for any CPU: at::vec's portable vectors, which the compiler vectorizes for the
// baseline instruction set. The fallback when the AVX2 / AVX-512 files cannot run.
#define CPU_CAPABILITY DEFAULT

#include "kernel_sets.h"
#include "lstm_pointwise_impl.h"

namespace lstm_ext::cpu {

CpuKernelSet default_kernel_set() {
  CpuKernelSet set;
  set.name = "DEFAULT";
  set.pointwise = {&DEFAULT::forward_step, &DEFAULT::backward_step, &DEFAULT::gru_forward_step,
                   &DEFAULT::gru_backward_step};
  return set;
}

}  // namespace lstm_ext::cpu
