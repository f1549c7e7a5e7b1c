// The CPU pointwise passes for any CPU: at::vec's portable vectors, which the compiler vectorizes
// for the baseline instruction set. The fallback when lstm_pointwise_avx2.cpp cannot run.
#define CPU_CAPABILITY DEFAULT

#include "lstm_pointwise_impl.h"

namespace lstm_ext::cpu {

PointwiseKernels default_pointwise_kernels() {
  return {&DEFAULT::forward_step, &DEFAULT::backward_step};
}

}  // namespace lstm_ext::cpu
