// The sparse part S of a SqueezeLLM layer in CSR (rows: N + 1 pointers, cols, vals), on
// its own: S·x for any number of tokens. (lut_gemv.cu fuses it into the GEMV and
// into the dequantization.)
//
// CSR positions may repeat (an exact correction stored in two terms, adjacent); every
// kernel here adds both. Sums are fp32; out is an fp32 (B, N) accumulator that the
// kernels add into, so the dense part can be computed before or after.
//
// Compile-time constants: X_KIND (x) and VAL_KIND (vals), see
// numeric.cuh. sqlab/kernels.py passes them with -D.
#include "numeric.cuh"

#ifndef X_KIND
#define X_KIND 1
#endif
#ifndef VAL_KIND
#define VAL_KIND 1
#endif

typedef Num<X_KIND> XNum;
typedef Num<VAL_KIND> VNum;
typedef XNum::T x_t;
typedef VNum::T val_t;

// Row-parallel: thread r computes row r for every token. out[b, r] += S[r, :] · x[b, :].
extern "C" __global__ void spmv_rows(const int* __restrict__ rows, const int* __restrict__ cols,
                                     const val_t* __restrict__ vals, const x_t* __restrict__ x,
                                     float* __restrict__ out, int N, int K, int B) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= N) return;
  const int p0 = rows[r], p1 = rows[r + 1];
  for (int b = 0; b < B; ++b) {
    const x_t* xb = x + (size_t)b * K;
    float acc = 0.f;
    for (int p = p0; p < p1; ++p) acc = fmaf(VNum::load(vals[p]), XNum::load(xb[cols[p]]), acc);
    out[(size_t)b * N + r] += acc;
  }
}

// Balanced: thread t takes stored values [t·per_thread, (t+1)·per_thread) whatever rows
// they fall in, starting from row startrows[t] (sqlab.packing.balanced_startrows), so a
// few rows holding most outliers do not serialise the launch. A row shared by several
// threads is combined with fp32 atomics.
extern "C" __global__ void spmv_balanced(const int* __restrict__ rows, const int* __restrict__ cols,
                                         const val_t* __restrict__ vals, const x_t* __restrict__ x,
                                         float* __restrict__ out, const int* __restrict__ startrows, int nnz,
                                         int per_thread, int threads, int N, int K, int B) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const int p0 = t * per_thread, p1 = min(nnz, p0 + per_thread);
  for (int b = 0; b < B; ++b) {
    const x_t* xb = x + (size_t)b * K;
    float* ob = out + (size_t)b * N;
    int r = startrows[t], end = rows[r + 1];
    float acc = 0.f;
    bool touched = false;
    for (int p = p0; p < p1; ++p) {
      while (p >= end) {  // past this row (skipping empty ones): hand its sum over
        if (touched) atomicAdd(ob + r, acc);
        acc = 0.f, touched = false;
        end = rows[++r + 1];
      }
      acc = fmaf(VNum::load(vals[p]), XNum::load(xb[cols[p]]), acc);
      touched = true;
    }
    if (touched) atomicAdd(ob + r, acc);
  }
}
