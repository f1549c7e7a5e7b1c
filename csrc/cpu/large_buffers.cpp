#include "large_buffers.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace lstm_ext::cpu {
namespace {

constexpr size_t kAlignment = size_t{2} << 20;  // one transparent huge page

size_t idle_limit_bytes() {
  static const size_t limit = [] {
    const char* text = std::getenv("LSTM_EXT_CPU_CACHE_MB");
    const long megabytes = text != nullptr ? std::strtol(text, nullptr, 10) : 1024;
    return megabytes > 0 ? static_cast<size_t>(megabytes) << 20 : size_t{0};
  }();
  return limit;
}

struct Block {
  void* ptr;
  size_t bytes;  // the block's size, a multiple of kAlignment
};

class LargeBufferAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    Block block = take_idle(n);
    if (block.ptr == nullptr) {
      block.bytes = (n + kAlignment - 1) / kAlignment * kAlignment;
      block.ptr = std::aligned_alloc(kAlignment, block.bytes);
      TORCH_CHECK(block.ptr != nullptr, "lstm_ext: out of memory allocating ", n, " bytes");
      // Advice only: without transparent huge pages it fails and nothing changes.
      madvise(block.ptr, block.bytes, MADV_HUGEPAGE);
    }
    report(block.ptr, static_cast<int64_t>(block.bytes));
    auto* context = new Block(block);
    return {block.ptr, context, &LargeBufferAllocator::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t free_idle() {
    std::lock_guard<std::mutex> guard(mutex_);
    int64_t released = 0;
    for (const auto& [bytes, ptr] : idle_) {
      std::free(ptr);
      released += static_cast<int64_t>(bytes);
    }
    idle_.clear();
    idle_bytes_ = 0;
    return released;
  }

 private:
  // An idle block of at least n bytes and at most a quarter more, or none.
  Block take_idle(size_t n) {
    std::lock_guard<std::mutex> guard(mutex_);
    const auto it = idle_.lower_bound(n);
    if (it == idle_.end() || it->first > n + n / 4) {
      return {nullptr, 0};
    }
    const Block block{it->second, it->first};
    idle_.erase(it);
    idle_bytes_ -= block.bytes;
    return block;
  }

  // The deleter of every block's DataPtr; may run on any thread (autograd frees saved tensors on
  // its own threads).
  static void release(void* context) {
    const Block block = *static_cast<Block*>(context);
    delete static_cast<Block*>(context);
    LargeBufferAllocator& self = instance();
    self.report(block.ptr, -static_cast<int64_t>(block.bytes));
    {
      std::lock_guard<std::mutex> guard(self.mutex_);
      if (self.idle_bytes_ + block.bytes <= idle_limit_bytes()) {
        self.idle_.emplace(block.bytes, block.ptr);
        self.idle_bytes_ += block.bytes;
        return;
      }
    }
    std::free(block.ptr);
  }

  void report(void* ptr, int64_t delta) {
    const int64_t in_use = in_use_bytes_ += delta;
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use),
                                       static_cast<size_t>(in_use), c10::Device(c10::kCPU));
    }
  }

 public:
  // Never destroyed: tensors may be freed during static destruction at exit.
  static LargeBufferAllocator& instance() {
    static auto* allocator = new LargeBufferAllocator();
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // bytes -> block
  size_t idle_bytes_ = 0;
  std::atomic<int64_t> in_use_bytes_{0};
};

}  // namespace

at::Tensor empty_large_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kMinCachedBytes || options.device().type() != c10::kCPU ||
      idle_limit_bytes() == 0) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &LargeBufferAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

int64_t empty_large_buffer_cache() { return LargeBufferAllocator::instance().free_idle(); }

}  // namespace lstm_ext::cpu
