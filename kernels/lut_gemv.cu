// LUT-GEMV for SqueezeLLM's packed layout: y = x · W_hat^T + S x + bias, for 1..8 tokens.
//
// W_hat[o, i] = lut[o, idx[o, i]]; qweight is (ceil(K/32)·WBITS, N), column o holding output
// channel o, each group of 32 inputs packed as WBITS little-endian int32 words.
//
// Mapping. A block owns BN adjacent output columns (threadIdx.x; adjacent threads read
// adjacent int32 words of a qweight row, so every load is coalesced) and one slice of the
// input groups (blockIdx.y; splitting K this way fills all SMs even when N is 4096). Inside
// the block KY rows of threads (threadIdx.y < KY) share the slice's groups round-robin;
// an optional extra row (threadIdx.y == KY) walks the block's share of the CSR sparse part
// meanwhile, so its dependent loads hide behind the dense stream. Each thread issues the
// loads of its first groups before the staging below, so they are in flight during it.
//
// Staging. Each column's centroids go to shared memory as a table indexed by TUPLE
// consecutive indices at once (16-bit activations: the 64 pairs of 3-bit or the 256 pairs
// of 4-bit indices, so one shared load yields two weights; fp32 activations: the 2^WBITS
// centroids as fp32), laid out
// [entry][column] so a warp's lookups never conflict. Every centroid is staged as W_hat
// holds it in x's dtype (through the sparse values' dtype, as the dequantization and the
// CPU reference round it), so decoding, prefill and the CPU agree on the weights.
//
// Arithmetic. With fp16 activations and pairs (HALF2), x's slice is staged as fp16 and a
// pair of weights costs one lookup and one HFMA2 per token; each group's 32 products are
// summed in fp16 (16 per lane) and added to the fp32 sum once per group. Otherwise x's
// slice is staged as fp32 and every weight (of a pair, with bf16) is one fp32 FMA. The
// 4-bit pair table is 1 KB per column, so 4-bit blocks take 32 columns (BN = 32: 32 KB).
// On an H100 one shared load per weight, not the bytes, bounded the 4-bit kernel; pairs
// halve the loads (benchmarks/results/README.md).
//
// Combining. Partial sums are fp32: the block sums its thread rows in shared memory; with
// several K slices each block writes its partial, and the last block of a column range to
// finish (a self-resetting acquire-release counter) adds them in slice order, adds the bias
// and writes y once. One launch, no zero-fill, deterministic results.
//
// Also here, sharing the decoding: the dequantization to a dense W_hat for long prompts.
//
// Compile-time constants: WBITS (3 or 4), kinds of x/y, LUT, sparse values and bias
// (see numeric.cuh), BN, KY, TUPLE, DEPTH. sqlab/kernels.py passes them with -D.
#include "numeric.cuh"

#ifndef WBITS
#define WBITS 3
#endif
#ifndef X_KIND  // activations in and y out
#define X_KIND 1
#endif
#ifndef LUT_KIND
#define LUT_KIND 1
#endif
#ifndef VAL_KIND
#define VAL_KIND 1
#endif
#ifndef BIAS_KIND
#define BIAS_KIND 1
#endif
#ifndef KY  // thread rows per block sharing the dense work
#define KY 4
#endif
#ifndef TUPLE  // indices resolved by one table lookup: pairs of 16-bit values
#define TUPLE (X_KIND != 0 ? 2 : 1)
#endif
#ifndef BN  // output columns per block (a power of two, at least 32): a 4-bit pair table is 1 KB per column
#define BN (WBITS == 4 && TUPLE == 2 ? 32 : 64)
#endif
#ifndef DEPTH  // groups per thread whose words are loaded ahead of their decoding
#define DEPTH 2
#endif

#if WBITS != 3 && WBITS != 4
#error "WBITS must be 3 or 4"
#endif
#if TUPLE != 1 && TUPLE != 2
#error "TUPLE must be 1 or 2"
#endif
#if TUPLE == 2 && X_KIND == 0
#error "pairs (TUPLE 2) hold two 16-bit values: they need fp16 or bf16 activations"
#endif
#if BN % 32 != 0 || (BN & (BN - 1)) != 0
#error "BN must be a power of two, at least 32"
#endif

#define GROUP 32
#define NCENT (1 << WBITS)
#define FIELD_BITS (WBITS * TUPLE)
#define ENTRIES (1 << FIELD_BITS)
#define HALF2 (TUPLE == 2 && X_KIND == 1)

typedef Num<X_KIND> XNum;
typedef Num<LUT_KIND> LNum;
typedef Num<VAL_KIND> VNum;
typedef Num<BIAS_KIND> BNum;
typedef XNum::T x_t;
typedef LNum::T lut_t;
typedef VNum::T val_t;
typedef BNum::T bias_t;

// A centroid as W_hat holds it in x's dtype: through the sparse values' dtype first (as
// sqlab.packing.reconstruct computes), then rounded to x's.
__device__ __forceinline__ x_t weight_value(lut_t v) { return XNum::store(VNum::load(VNum::store(LNum::load(v)))); }

// A table entry, one 32-bit shared word: the weights of TUPLE consecutive indices, a pair
// of x-dtype values (low half first) or one fp32 value.
#if TUPLE == 2
typedef x_t stage_t;
__device__ __forceinline__ stage_t stage(lut_t v) { return weight_value(v); }
__device__ __forceinline__ float unstage(stage_t v) { return XNum::load(v); }
#else
typedef float stage_t;
__device__ __forceinline__ stage_t stage(lut_t v) { return XNum::load(weight_value(v)); }
__device__ __forceinline__ float unstage(stage_t v) { return v; }
#endif

struct alignas(4) Entry {
  stage_t v[TUPLE];
};
static_assert(sizeof(Entry) == 4, "a table entry is one shared word");

// x's slice in shared memory: fp16 as given for HALF2 (read as pairs), else fp32
#if HALF2
typedef unsigned short xs_t;
__device__ __forceinline__ xs_t stage_x(x_t v) { return v; }
#else
typedef float xs_t;
__device__ __forceinline__ xs_t stage_x(x_t v) { return XNum::load(v); }
#endif

// (__host__ __device__: NVRTC rejects a function without an execution space, nvcc does not)
__host__ __device__ constexpr int log2i(int v) { return v <= 1 ? 0 : 1 + log2i(v / 2); }
// byte offset of entry e of column c in the [entry][column] table is e << ROW_SHIFT | c << 2
constexpr int ROW_SHIFT = log2i(BN * 4);

// Field p of FB bits from a group's bit stream q[0..WBITS), shifted left by SH (a table
// row's size, so it is a byte offset already). p is a constant once the caller's loop is
// unrolled, so the word choice and shifts fold away; a field that straddles two words is
// one funnel shift.
template <int FB, int SH>
__device__ __forceinline__ unsigned field(const unsigned (&q)[WBITS], int p) {
  const int bit = p * FB, w = bit >> 5, s = bit & 31;
  const unsigned mask = ((1u << FB) - 1u) << SH;
  if (s + FB > 32) return __funnelshift_r(q[w], q[w + 1], s - SH) & mask;
  return (s >= SH ? q[w] >> (s - SH) : q[w] << (SH - s)) & mask;
}

__device__ __forceinline__ unsigned lane_word(const UInt4& v, int u) {
  return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

// Decode one group of 32 inputs for B tokens and add its products to acc. xg points at
// the group's x values of token 0 in shared memory; tokens are L apart. The lookup address
// is (field << ROW_SHIFT | column << 2) from the table's fixed base: one shift, one and-or,
// one shared load per TUPLE weights.
#if HALF2
template <int B>
__device__ __forceinline__ void decode_group(const unsigned (&q)[WBITS], const char* table, unsigned tx4,
                                             const xs_t* xg, int L, float (&acc)[B]) {
  unsigned sum[B];  // two fp16 lanes per token: the even and the odd inputs of the group
#pragma unroll
  for (int b = 0; b < B; ++b) sum[b] = 0u;
#pragma unroll
  for (int c = 0; c < GROUP / 8; ++c) {
    UInt4 xv[B];  // 8 inputs = 4 pairs per token
#pragma unroll
    for (int b = 0; b < B; ++b) xv[b] = *reinterpret_cast<const UInt4*>(xg + b * L + 8 * c);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const unsigned off = field<FIELD_BITS, ROW_SHIFT>(q, c * 4 + u) | tx4;
      const unsigned w2 = *reinterpret_cast<const unsigned*>(table + off);
#pragma unroll
      for (int b = 0; b < B; ++b) sum[b] = hfma2(w2, lane_word(xv[b], u), sum[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] += f16x2_sum(sum[b]);
}
#else
template <int B>
__device__ __forceinline__ void decode_group(const unsigned (&q)[WBITS], const char* table, unsigned tx4,
                                             const xs_t* xg, int L, float (&acc)[B]) {
#pragma unroll
  for (int c = 0; c < GROUP / 4; ++c) {
    float xv[B][4];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const Float4 v = *reinterpret_cast<const Float4*>(xg + b * L + 4 * c);
      xv[b][0] = v.x, xv[b][1] = v.y, xv[b][2] = v.z, xv[b][3] = v.w;
    }
#pragma unroll
    for (int u = 0; u < 4 / TUPLE; ++u) {
      const unsigned off = field<FIELD_BITS, ROW_SHIFT>(q, c * (4 / TUPLE) + u) | tx4;
      const Entry e = *reinterpret_cast<const Entry*>(table + off);
#pragma unroll
      for (int v = 0; v < TUPLE; ++v) {
        const float w = unstage(e.v[v]);
#pragma unroll
        for (int b = 0; b < B; ++b) acc[b] = fmaf(w, xv[b][u * TUPLE + v], acc[b]);
      }
    }
  }
}
#endif

// The words of up to DEPTH groups g, g + KY, ... (those below g1) of one column.
__device__ __forceinline__ void load_groups(unsigned (&q)[DEPTH][WBITS], const unsigned* __restrict__ qcol, int g,
                                            int g1, int N) {
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    const int gd = g + d * KY;
    if (gd < g1) {
#pragma unroll
      for (int w = 0; w < WBITS; ++w) q[d][w] = qcol[(size_t)(gd * WBITS + w) * N];
    }
  }
}

// Shared memory: the table [ENTRIES][BN] (static, so its base is a constant in every
// lookup); dynamic: x's slice [B][L] (xs_t), then the per-thread-row sums [blockDim.y][B][BN]
// as fp32.
template <int B>
__device__ __forceinline__ void lut_gemv_tokens(const unsigned* __restrict__ qweight, const lut_t* __restrict__ lut,
                                                const x_t* __restrict__ x, const int* __restrict__ rows,
                                                const int* __restrict__ cols, const val_t* __restrict__ vals,
                                                const bias_t* __restrict__ bias, float* __restrict__ partial,
                                                unsigned* __restrict__ counters, x_t* __restrict__ y, int K, int N,
                                                int gpb) {
  __shared__ Entry table[ENTRIES * BN];
  __shared__ bool last;
  DYNAMIC_SHARED(Float4, smem);
  xs_t* xs = reinterpret_cast<xs_t*>(smem);

  const int L = gpb * GROUP;
  float* red = reinterpret_cast<float*>(xs + B * L);  // B·L·sizeof(xs_t) is a multiple of 64 bytes
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * BN + tx, nthreads = BN * blockDim.y;
  const int col0 = blockIdx.x * BN, col = col0 + tx;
  const int groups = (K + GROUP - 1) / GROUP;
  const int g0 = blockIdx.y * gpb, g1 = min(groups, g0 + gpb);

  // the dense rows' first words: loaded now, used after the staging barrier
  // (columns past N compute on column N-1 and are never written)
  const unsigned* qcol = qweight + min(col, N - 1);
  unsigned cur[DEPTH][WBITS], nxt[DEPTH][WBITS];
  if (ty < KY) load_groups(cur, qcol, g0 + ty, g1, N);

  {
    // every thread fills entries of its own column: first indices a shared out over the
    // thread rows, all second indices b unrolled (their weights held in registers)
    constexpr int NB = TUPLE == 2 ? NCENT : 1;
    const lut_t* centroids = lut + (size_t)min(col, N - 1) * NCENT;
    stage_t second[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) second[b] = stage(centroids[b]);
    for (int a = ty; a < NCENT; a += blockDim.y) {
      Entry e;
      e.v[0] = stage(centroids[a]);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
#pragma unroll
        for (int v = 1; v < TUPLE; ++v) e.v[v] = second[b];
        table[(a + (b << WBITS)) * BN + tx] = e;
      }
    }
  }
  for (int i = tid; i < B * L; i += nthreads) {
    const int b = i / L, k = g0 * GROUP + (i - b * L);
    xs[i] = k < K ? stage_x(x[(size_t)b * K + k]) : xs_t(0);  // padding inputs count as x = 0
  }
  __syncthreads();

  float acc[B];
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] = 0.f;

  if (ty < KY) {
    const char* tbase = reinterpret_cast<const char*>(table);
    for (int g = g0 + ty; g < g1; g += DEPTH * KY) {
      load_groups(nxt, qcol, g + DEPTH * KY, g1, N);  // in flight while this step decodes
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const int gd = g + d * KY;
        if (gd < g1) decode_group<B>(cur[d], tbase, tx << 2, xs + (gd - g0) * GROUP, L, acc);
      }
#pragma unroll
      for (int d = 0; d < DEPTH; ++d)
#pragma unroll
        for (int w = 0; w < WBITS; ++w) cur[d][w] = nxt[d][w];
    }
  } else if (rows != nullptr && col < N) {
    // the sparse row: this block takes the blockIdx.y-th of gridDim.y equal shares of its
    // stored values (repeated positions simply add)
    const int r0 = rows[col], len = rows[col + 1] - r0;
    const int p1 = r0 + (int)((long long)len * (blockIdx.y + 1) / gridDim.y);
    for (int p = r0 + (int)((long long)len * blockIdx.y / gridDim.y); p < p1; ++p) {
      const int c = cols[p];
      const float v = VNum::load(vals[p]);
#pragma unroll
      for (int b = 0; b < B; ++b) acc[b] = fmaf(v, XNum::load(x[(size_t)b * K + c]), acc[b]);
    }
  }

#pragma unroll
  for (int b = 0; b < B; ++b) red[(ty * B + b) * BN + tx] = acc[b];
  __syncthreads();

  const bool split = gridDim.y > 1;
  for (int i = tid; i < B * BN; i += nthreads) {
    const int b = i / BN, c = col0 + i % BN;
    float s = 0.f;
    for (int t = 0; t < (int)blockDim.y; ++t) s += red[t * B * BN + i];
    if (c >= N) continue;
    if (split) {
      partial[((size_t)blockIdx.y * B + b) * N + c] = s;
    } else {
      if (bias != nullptr) s += BNum::load(bias[c]);
      y[(size_t)b * N + c] = XNum::store(s);
    }
  }
  if (!split) return;

  // count this block's partial in (releasing the block's writes, which the barrier
  // ordered before thread 0's increment); the counter wraps back to 0 on the last block,
  // whose acquire makes every partial visible to it
  __syncthreads();
  if (tid == 0) last = atomic_inc_acq_rel(counters + blockIdx.x, gridDim.y - 1) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  const volatile float* parts = partial;  // written by other blocks: read past this SM's L1
  for (int i = tid; i < B * BN; i += nthreads) {
    const int b = i / BN, c = col0 + i % BN;
    if (c >= N) continue;
    float s = 0.f;
    for (int t = 0; t < (int)gridDim.y; ++t) s += parts[((size_t)t * B + b) * N + c];
    if (bias != nullptr) s += BNum::load(bias[c]);
    y[(size_t)b * N + c] = XNum::store(s);
  }
}

// One entry point per token count, so the token loops unroll and the sums stay in registers.
// Launch: grid (ceil(N / BN), slices), block (BN, KY + 1 with a sparse part else KY),
// dynamic shared memory as described above; partial is (slices, B, N) fp32, counters
// ceil(N / BN) zeros (left at zero after every complete launch).
#define LUT_GEMV(B)                                                                                             \
  extern "C" __global__ void __launch_bounds__(BN*(KY + 1))                                                   \
      lut_gemv_##B(const unsigned* __restrict__ qweight, const lut_t* __restrict__ lut, const x_t* __restrict__ x, \
                   const int* __restrict__ rows, const int* __restrict__ cols, const val_t* __restrict__ vals,   \
                   const bias_t* __restrict__ bias, float* __restrict__ partial, unsigned* __restrict__ counters, \
                   x_t* __restrict__ y, int K, int N, int gpb) {                                                 \
    lut_gemv_tokens<B>(qweight, lut, x, rows, cols, vals, bias, partial, counters, y, K, N, gpb);              \
  }

LUT_GEMV(1)
LUT_GEMV(2)
LUT_GEMV(3)
LUT_GEMV(4)
LUT_GEMV(5)
LUT_GEMV(6)
LUT_GEMV(7)
LUT_GEMV(8)

// The dense part of W_hat as an (N, K) matrix in x's dtype, for long prompts (cuBLAS then
// does the matmul). A block decodes a tile of DQ_ROWS rows x DQ_GROUPS groups: thread
// (row, group) reads its column's words (coalesced across the warp) and writes its 32
// values into the tile in shared memory; then each warp stores whole row segments, lanes
// on consecutive inputs, so every store is contiguous. Rows of the tile are padded by one
// 32-bit word so the first phase's writes hit 32 different banks.
// Launch: grid (ceil(N / DQ_ROWS), ceil(groups / DQ_GROUPS)), block DQ_ROWS * DQ_GROUPS.
#define DQ_ROWS 32
#define DQ_GROUPS 8
extern "C" __global__ void __launch_bounds__(DQ_ROWS* DQ_GROUPS)
    dequantize_dense(const unsigned* __restrict__ qweight, const lut_t* __restrict__ lut, x_t* __restrict__ w, int K,
                     int N) {
  constexpr int WIDTH = DQ_GROUPS * GROUP, PAD = 4 / sizeof(x_t);
  __shared__ x_t tile[DQ_ROWS][WIDTH + PAD];
  const int r = threadIdx.x % DQ_ROWS, gq = threadIdx.x / DQ_ROWS;
  const int row = blockIdx.x * DQ_ROWS + r, g = blockIdx.y * DQ_GROUPS + gq;
  if (row < N && g * GROUP < K) {
    unsigned q[WBITS];
#pragma unroll
    for (int i = 0; i < WBITS; ++i) q[i] = qweight[(size_t)(g * WBITS + i) * N + row];
    const lut_t* centroids = lut + (size_t)row * NCENT;
#pragma unroll
    for (int j = 0; j < GROUP; ++j) tile[r][gq * GROUP + j] = weight_value(centroids[field<WBITS, 0>(q, j)]);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, k0 = blockIdx.y * WIDTH;
  for (int t = threadIdx.x / 32; t < DQ_ROWS; t += blockDim.x / 32) {
    const int out = blockIdx.x * DQ_ROWS + t;
    if (out >= N) break;
    for (int k = lane; k < WIDTH && k0 + k < K; k += 32) w[(size_t)out * K + k0 + k] = tile[t][k];
  }
}

// Positions of the sparse part: W_hat[r, c] = lut value + the stored values at (r, c),
// one thread per row, overwriting what dequantize_dense wrote there. As in
// sqlab.packing.reconstruct, the sum is taken in the sparse values' precision (each
// step rounded to it) and rounded once more to w's dtype, so both give the same matrix.
extern "C" __global__ void __launch_bounds__(256)
    dequantize_sparse(const unsigned* __restrict__ qweight, const lut_t* __restrict__ lut,
                      const int* __restrict__ rows, const int* __restrict__ cols, const val_t* __restrict__ vals,
                      x_t* __restrict__ w, int K, int N) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= N) return;
  const lut_t* centroids = lut + (size_t)r * NCENT;
  const int p1 = rows[r + 1];
  for (int p = rows[r]; p < p1;) {
    const int c = cols[p], g = c / GROUP;
    unsigned q[WBITS];
#pragma unroll
    for (int i = 0; i < WBITS; ++i) q[i] = qweight[(size_t)(g * WBITS + i) * N + r];
    float v = VNum::load(VNum::store(LNum::load(centroids[field<WBITS, 0>(q, c % GROUP)])));
    do {  // entries repeating a position are adjacent: add them in stored order
      v = VNum::load(VNum::store(v + VNum::load(vals[p])));
    } while (++p < p1 && cols[p] == c);
    w[(size_t)r * K + c] = XNum::store(v);
  }
}
