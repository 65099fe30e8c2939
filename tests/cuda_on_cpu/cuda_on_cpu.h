// CUDA on the CPU: the compatibility layer that lets the unchanged kernels/*.cu compile
// with g++ and run on host threads, so the test suite executes every kernel without a GPU.
//
// The thread model: a launch runs its blocks one after another; each block is blockDim
// host threads (std::thread), and __syncthreads() is a barrier among them. Threads that
// return leave the block's barrier (as exited CUDA threads stop counting). Two schedules:
//   - concurrent: all threads of a block run at once, __syncthreads() is a std::barrier;
//   - ordered (forward or reverse): one thread runs at a time, in thread order (or its
//     reverse), each until its next __syncthreads() or its return; a deterministic
//     interleaving that exposes a missing barrier on every run.
// Shared memory: __shared__ variables are static (one copy, as blocks run one at a time)
// in their own section, and the launch's dynamic shared memory is one buffer; both are
// filled with 0xFF bytes (NaN for fp16/fp32) before every block, so a thread reading what
// no thread of its block wrote sees garbage instead of the previous block's values.
//
// The built-ins: threadIdx/blockIdx/blockDim/gridDim (thread-local), atomicInc with CUDA's
// wrap-around, atomicAdd on floats, __funnelshift_r, __float_as_uint/__uint_as_float,
// min/max, and numeric.cuh's device primitives (fp16 through _Float16, HFMA2 rounded once
// per lane, the acquire-release counter).
#ifndef SQLAB_CUDA_ON_CPU_H
#define SQLAB_CUDA_ON_CPU_H
#define SQLAB_CUDA_ON_CPU 1

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef CUDA_ON_CPU_FIND_KERNELS  // (a preprocessor pass lists the kernels by this mark)
#define __global__ __cuda_on_cpu_kernel__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))
#define __syncthreads() ::cuda_on_cpu::sync_threads()
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuda_on_cpu::dynamic_shared)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};

namespace cuda_on_cpu {
inline thread_local uint3 thread_idx, block_idx;
inline thread_local dim3 block_dim, grid_dim;
inline unsigned char* dynamic_shared = nullptr;
void sync_threads();
}  // namespace cuda_on_cpu

#define threadIdx (::cuda_on_cpu::thread_idx)
#define blockIdx (::cuda_on_cpu::block_idx)
#define blockDim (::cuda_on_cpu::block_dim)
#define gridDim (::cuda_on_cpu::grid_dim)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// the low 32 bits of (hi:lo) >> (shift & 31), as CUDA defines it
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return (unsigned)((((uint64_t)hi << 32) | lo) >> (shift & 31));
}
// old = *p; *p = old >= limit ? 0 : old + 1
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load();
  while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u)) {
  }
  return old;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// numeric.cuh's device primitives
inline float f16_to_f32(unsigned short v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return (float)h;
}
inline unsigned short f32_to_f16(float f) {
  const _Float16 h = (_Float16)f;  // round to nearest even, as cvt.rn.f16.f32
  unsigned short v;
  std::memcpy(&v, &h, 2);
  return v;
}
inline unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d = 0;
  for (int lane = 0; lane < 2; ++lane) {
    const int s = 16 * lane;
    // the exact product of two fp16 values fits a double, and so does the sum's rounding to
    // double before the one rounding to fp16 that matters: one rounding, as fma.rn.f16x2
    const double r = std::fma((double)f16_to_f32((unsigned short)(a >> s)),
                              (double)f16_to_f32((unsigned short)(b >> s)),
                              (double)f16_to_f32((unsigned short)(c >> s)));
    const _Float16 h = (_Float16)r;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    d |= (unsigned)bits << s;
  }
  return d;
}
inline unsigned atomic_inc_acq_rel(unsigned* p, unsigned limit) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u, std::memory_order_acq_rel,
                                  std::memory_order_relaxed)) {
  }
  return old;
}


// --- the runtime: launching a kernel on host threads -----------------------------------------
#include <functional>
#include <utility>

extern "C" char __start_cuda_on_cpu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_on_cpu_shared[] __attribute__((weak));

namespace cuda_on_cpu {

enum Order { CONCURRENT = 0, FORWARD = 1, REVERSE = 2 };

class Launch;
inline thread_local Launch* current = nullptr;
inline thread_local int me = 0;  // this thread's place in its block (threadIdx linearised)

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared, int order, void (*body)(void**), void** params)
      : grid_(grid), block_(block), order_(order), body_(body), params_(params),
        n_((int)(block.x * block.y * block.z)), blocks_((size_t)grid.x * grid.y * grid.z),
        dynamic_(shared + 64), alive_(n_, 1) {
    for (int t = 0; t < n_; ++t) {
      sequence_.push_back(order == REVERSE ? n_ - 1 - t : t);
      turn_.emplace_back(std::make_unique<std::binary_semaphore>(0));
    }
  }

  void run() {
    if (!n_ || !blocks_) return;
    dynamic_shared = dynamic_.data() + (64 - (uintptr_t)dynamic_.data() % 64) % 64;
    poison();
    sync_ = std::make_unique<std::barrier<>>(n_);
    end_ = std::make_unique<std::barrier<std::function<void()>>>(n_, [this]() noexcept { next_block(); });
    std::vector<std::thread> threads;
    for (int t = 0; t < n_; ++t) threads.emplace_back([this, t] { thread_main(t); });
    if (order_ != CONCURRENT) turn_[sequence_[0]]->release();
    for (auto& thread : threads) thread.join();
  }

  void sync() {
    if (order_ == CONCURRENT) {
      sync_->arrive_and_wait();
    } else {
      hand_over();
      turn_[me]->acquire();
    }
  }

 private:
  dim3 grid_, block_;
  int order_;
  void (*body_)(void**);
  void** params_;
  int n_;
  size_t blocks_;
  std::vector<unsigned char> dynamic_;
  std::vector<char> alive_;
  std::vector<int> sequence_;
  std::vector<std::unique_ptr<std::binary_semaphore>> turn_;
  int pos_ = 0;  // index in sequence_ of the thread that runs (ordered schedules)
  size_t done_ = 0;  // blocks finished (ordered schedules)
  std::unique_ptr<std::barrier<>> sync_;
  std::unique_ptr<std::barrier<std::function<void()>>> end_;

  void poison() {
    if (__start_cuda_on_cpu_shared != nullptr)
      std::memset(__start_cuda_on_cpu_shared, 0xff, __stop_cuda_on_cpu_shared - __start_cuda_on_cpu_shared);
    std::fill(dynamic_.begin(), dynamic_.end(), 0xff);
  }

  uint3 block_index(size_t b) const {
    if (order_ == REVERSE) b = blocks_ - 1 - b;
    return uint3{(unsigned)(b % grid_.x), (unsigned)(b / grid_.x % grid_.y), (unsigned)(b / grid_.x / grid_.y)};
  }

  void thread_main(int t) {
    current = this;
    me = t;
    thread_idx = uint3{(unsigned)t % block_.x, (unsigned)t / block_.x % block_.y, (unsigned)t / block_.x / block_.y};
    block_dim = block_;
    grid_dim = grid_;
    for (size_t b = 0; b < blocks_; ++b) {
      if (order_ != CONCURRENT) turn_[t]->acquire();
      block_idx = block_index(b);
      body_(params_);
      if (order_ == CONCURRENT) {
        sync_->arrive_and_drop();  // a returned thread no longer holds up the block's barrier
        end_->arrive_and_wait();
      } else {
        alive_[t] = 0;
        hand_over();
      }
    }
  }

  // concurrent: every thread of the block has returned
  void next_block() {
    poison();
    sync_ = std::make_unique<std::barrier<>>(n_);
  }

  // ordered: the running thread stops (at a barrier, or for good); the next live thread in
  // the sequence runs; when none is left the block is over and the next one starts
  void hand_over() {
    for (int k = 1; k <= n_; ++k) {
      const int p = (pos_ + k) % n_;
      if (alive_[sequence_[p]]) {
        pos_ = p;
        turn_[sequence_[p]]->release();
        return;
      }
    }
    if (++done_ < blocks_) {
      poison();
      std::fill(alive_.begin(), alive_.end(), 1);
      pos_ = 0;
      turn_[sequence_[0]]->release();
    }
  }
};

inline void sync_threads() { current->sync(); }

// A kernel called with cuLaunchKernel-style parameters: params[i] points at argument i.
template <typename F>
struct Invoker;
template <typename... A>
struct Invoker<void (*)(A...)> {
  template <void (*K)(A...)>
  static void call(void** params) {
    call<K>(params, std::index_sequence_for<A...>{});
  }
  template <void (*K)(A...), size_t... I>
  static void call(void** params, std::index_sequence<I...>) {
    K(*static_cast<std::remove_cv_t<A>*>(params[I])...);
  }
};

struct Kernel {
  const char* name;
  void (*call)(void**);
};

}  // namespace cuda_on_cpu

#define CUDA_ON_CPU_KERNEL(name) \
  ::cuda_on_cpu::Kernel { #name, &::cuda_on_cpu::Invoker<decltype(&name)>::call<&name> }

// cuda_on_cpu_launch(name, grid, block, dynamic shared bytes, params, order): 0 when launched
// and finished, -1 for an unknown kernel name.
#define CUDA_ON_CPU_EXPORT(table)                                                                    \
  extern "C" __attribute__((visibility("default"))) int cuda_on_cpu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, \
                                    unsigned by, unsigned bz, unsigned long shared, void** params,      \
                                    int order) {                                                         \
    for (const auto& kernel : table) {                                                                   \
      if (std::strcmp(kernel.name, name) == 0) {                                                         \
        ::cuda_on_cpu::Launch(dim3{gx, gy, gz}, dim3{bx, by, bz}, shared, order, kernel.call, params).run(); \
        return 0;                                                                                         \
      }                                                                                                  \
    }                                                                                                    \
    return -1;                                                                                           \
  }

#endif  // SQLAB_CUDA_ON_CPU_H
