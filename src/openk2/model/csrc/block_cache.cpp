// A caching allocator for large CPU blocks, active only on a thread inside an openk2 training step
// (`openk2.model.block_cache`, which says why and when).
//
// Installed in front of torch's CPU allocator (whatever `c10::GetCPUAllocator()` returned), it hands every
// allocation straight to that allocator unless the calling thread is inside a training forward or backward and the
// block is at least `kMinBytes`. Such a block is rounded up to a size class (4 per power of two), taken from the
// blocks of that class freed earlier if there is one, and returns to them when freed, from whatever thread: a
// training step's activations and gradients then reuse the previous step's memory instead of pages the C library
// gave back to the kernel and must fault in (and zero) again.
//
// Freed blocks stay cached while a step reuses them: a block not taken again in the step after the one it was freed
// in is released when the next step begins, so a change of shapes (another batch size, a longer sequence) leaves at
// most two steps' worth behind; the cached bytes never exceed the limit (oldest released first), and `release`
// frees them all.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>
#include <deque>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

// Smaller blocks come from the C library's free lists without page faults; not worth a lock.
constexpr size_t kMinBytes = size_t(64) << 10;

// Per thread: the training forwards it is inside (nested calls count), and whether it runs a training backward.
thread_local int64_t tl_forward_depth = 0;
thread_local bool tl_backward = false;

size_t size_class(size_t nbytes) {
  const int top_bit = 63 - __builtin_clzll(nbytes);
  const size_t step = size_t(1) << (top_bit - 2);
  return (nbytes + step - 1) & ~(step - 1);
}

struct FreeBlock {
  void* ptr;
  size_t size;
  int64_t step;  // the step it was freed in
};

class BlockCache final : public at::Allocator {
 public:
  // Puts the cache in front of torch's current CPU allocator (once); whether it is in front now.
  bool install() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (base_ == nullptr) {
      base_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, /*priority=*/0);
    }
    return c10::GetCPUAllocator() == this;
  }

  at::DataPtr allocate(size_t nbytes) override {
    if ((tl_forward_depth == 0 && !tl_backward) || nbytes < kMinBytes) return base_->allocate(nbytes);
    const size_t size = size_class(nbytes);
    void* ptr = take(size);
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> guard(mutex_);
      live_[ptr] = size;
    }
    c10::profiledCPUMemoryReporter().New(ptr, nbytes);  // as torch's allocator does: profile_memory sees it
    return {ptr, ptr, &free_block, at::Device(at::DeviceType::CPU)};
  }

  at::DeleterFnPtr raw_deleter() const override { return &raw_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void give_back(void* ptr) {
    c10::profiledCPUMemoryReporter().Delete(ptr);
    std::vector<void*> released;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto found = live_.find(ptr);
      const size_t size = found->second;
      live_.erase(found);
      free_.push_back({ptr, size, step_});
      free_by_size_[size].push_back(std::prev(free_.end()));
      cached_bytes_ += size;
      while (cached_bytes_ > max_cached_bytes_) released.push_back(pop_oldest());
    }
    for (void* p : released) c10::free_cpu(p);
  }

  // Blocks freed before the previous step began and not taken since go back to the C library.
  void begin_step() {
    std::vector<void*> released;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      ++step_;
      while (!free_.empty() && free_.front().step < step_ - 1) released.push_back(pop_oldest());
    }
    for (void* p : released) c10::free_cpu(p);
  }

  void release(int64_t max_cached_bytes) {
    std::vector<void*> released;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (max_cached_bytes >= 0) max_cached_bytes_ = static_cast<size_t>(max_cached_bytes);
      while (cached_bytes_ > max_cached_bytes_ || (max_cached_bytes < 0 && !free_.empty())) {
        released.push_back(pop_oldest());
      }
    }
    for (void* p : released) c10::free_cpu(p);
  }

  bool owns(void* ptr) {
    std::lock_guard<std::mutex> guard(mutex_);
    return live_.count(ptr) > 0;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {hits_, misses_, static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(live_.size()),
            static_cast<int64_t>(max_cached_bytes_)};
  }

  at::Allocator* base() const { return base_; }

 private:
  static void free_block(void* ptr);
  static void raw_delete(void* ptr);

  // A freed block of `size` (the most recently freed: likeliest still in cache) marked live, or nullptr.
  void* take(size_t size) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto found = free_by_size_.find(size);
    if (found == free_by_size_.end() || found->second.empty()) {
      ++misses_;
      return nullptr;
    }
    auto block = found->second.back();
    found->second.pop_back();
    void* ptr = block->ptr;
    free_.erase(block);
    cached_bytes_ -= size;
    live_[ptr] = size;
    ++hits_;
    return ptr;
  }

  // Caller holds the mutex. The oldest free block overall is the oldest of its size class: the front of both.
  void* pop_oldest() {
    FreeBlock block = free_.front();
    free_by_size_[block.size].pop_front();
    free_.pop_front();
    cached_bytes_ -= block.size;
    return block.ptr;
  }

  std::mutex mutex_;
  at::Allocator* base_ = nullptr;
  std::list<FreeBlock> free_;  // in the order they were freed
  std::unordered_map<size_t, std::deque<std::list<FreeBlock>::iterator>> free_by_size_;
  std::unordered_map<void*, size_t> live_;  // handed out: pointer -> size class
  size_t cached_bytes_ = 0;
  size_t max_cached_bytes_ = size_t(4) << 30;
  int64_t step_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void BlockCache::free_block(void* ptr) { cache().give_back(ptr); }

// `raw_allocate`'s blocks (oneDNN's scratch memory, among others) come back here, ours or the base allocator's.
void BlockCache::raw_delete(void* ptr) {
  if (cache().owns(ptr)) {
    cache().give_back(ptr);
  } else {
    cache().base()->raw_deleter()(ptr);
  }
}

bool block_cache_install(int64_t max_cached_bytes) {
  const bool installed = cache().install();
  cache().release(max_cached_bytes);
  return installed;
}

void block_cache_enter_forward(bool in_backward) {
  if (tl_forward_depth == 0 && !in_backward) {
    tl_backward = false;  // a backward that never reached the embeddings (a partial `autograd.grad`) is over
    cache().begin_step();
  }
  ++tl_forward_depth;
}

void block_cache_exit_forward() {
  if (tl_forward_depth > 0) --tl_forward_depth;
}

void block_cache_backward(bool inside) { tl_backward = inside; }

void block_cache_release() { cache().release(-1); }

std::vector<int64_t> block_cache_stats() { return cache().stats(); }

bool block_cache_active() { return tl_forward_depth > 0 || tl_backward; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("block_cache_install(int max_cached_bytes) -> bool", block_cache_install);
  m.def("block_cache_enter_forward(bool in_backward) -> ()", block_cache_enter_forward);
  m.def("block_cache_exit_forward() -> ()", block_cache_exit_forward);
  m.def("block_cache_backward(bool inside) -> ()", block_cache_backward);
  m.def("block_cache_release() -> ()", block_cache_release);
  m.def("block_cache_stats() -> int[]", block_cache_stats);
  m.def("block_cache_active() -> bool", block_cache_active);
}
