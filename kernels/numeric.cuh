// Storage types of the tensors the kernels read and write, chosen at compile time by a
// "kind" number: 0 = fp32, 1 = fp16, 2 = bf16. Arithmetic is always fp32; these only
// convert on load and store. The conversions are written in PTX or integer ops so the
// sources need no CUDA header and compile the same under NVRTC (CuPy) and nvcc.
#ifndef SQLAB_NUMERIC_CUH
#define SQLAB_NUMERIC_CUH

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
  static __device__ __forceinline__ float load(T v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ T store(float f) {
    T v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
  }
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

#endif  // SQLAB_NUMERIC_CUH
