// Storage types of the tensors the kernels read and write, chosen at compile time by a
// "kind" number: 0 = fp32, 1 = fp16, 2 = bf16, and the few PTX instructions the kernels
// use. The sources include no CUDA header, so the same text compiles under NVRTC (CuPy)
// and nvcc, and, through tests/cuda_on_cpu, with g++ on a machine without a GPU: that
// harness defines SQLAB_CUDA_ON_CPU and gives host versions of everything in the
// "device primitives" section below.
#ifndef SQLAB_NUMERIC_CUH
#define SQLAB_NUMERIC_CUH

// --- device primitives ---------------------------------------------------------------------
#ifndef SQLAB_CUDA_ON_CPU
__device__ __forceinline__ float f16_to_f32(unsigned short v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
  unsigned short v;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
  return v;
}

// a * b + c on the two fp16 lanes of 32-bit words (HFMA2), each lane rounded once
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// old = *p; *p = old >= limit ? 0 : old + 1, at GPU scope. Release: the writes this block
// made before a __syncthreads() are visible to whoever acquires the counter after it;
// acquire: the writes released by earlier increments are visible here (and, after a
// __syncthreads(), to the whole block). No sequentially consistent fence is needed.
__device__ __forceinline__ unsigned atomic_inc_acq_rel(unsigned* p, unsigned limit) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.inc.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(limit) : "memory");
  return old;
}

// The launch's dynamic shared memory as an array of T.
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif  // SQLAB_CUDA_ON_CPU

// the fp16 lanes of a 32-bit word, summed in fp32
__device__ __forceinline__ float f16x2_sum(unsigned v) {
  return f16_to_f32((unsigned short)(v & 0xffffu)) + f16_to_f32((unsigned short)(v >> 16));
}

// --- storage kinds ---------------------------------------------------------------------------
template <int KIND>
struct Num;

template <>
struct Num<0> {
  typedef float T;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float f) { return f; }
};

template <>
struct Num<1> {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T v) { return f16_to_f32(v); }
  static __device__ __forceinline__ T store(float f) { return f32_to_f16(f); }
};

template <>
struct Num<2> {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(T v) { return __uint_as_float((unsigned)v << 16); }
  static __device__ __forceinline__ T store(float f) {
    // round to nearest even by integer ops (no sm_80-only cvt needed); keep NaN a NaN
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)0x7fc0;
    return (T)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

// Vector types of our own (the built-in float2/float4 come from a CUDA header).
struct alignas(8) Float2 {
  float x, y;
};
struct alignas(16) Float4 {
  float x, y, z, w;
};
struct alignas(16) UInt4 {
  unsigned x, y, z, w;
};

#endif  // SQLAB_NUMERIC_CUH
