// LUT-GEMV on the CPU: y = x · W_hat^T + S x + bias for 1..8 tokens, straight from SqueezeLLM's
// packed layout, and the dequantization of a block of rows for long prompts.
//
// W_hat[o, i] = table[o, idx[o, i]]; qweight is (groups·WBITS, N) int32, column o holding output
// channel o, each group of 32 inputs packed as WBITS little-endian words (the GPU layout). The
// table is each row's centroids as W_hat holds them, in fp32, 16 entries a row (3-bit rows hold
// their 8 centroids twice, see below); sqlab/cpu_kernels.py prepares it once per layer.
//
// Mapping. Threads (OpenMP, sharing torch's own pool) take blocks of 16 adjacent output rows,
// whose words of one qweight row fill one 64-byte cache line. A block walks the groups once:
// per group it loads x's 32 inputs (shared by the 16 rows), and per row its WBITS words
// (from the lines just fetched, so every line is read from memory once), decodes the 32
// indices into two vectors of 16, turns each into 16 weights by one permute from the row's
// table, and adds one FMA per vector and token into the row's accumulator (registers).
// Walking one row down all groups instead would revisit each line 16 times, and for N a
// power of two those lines share a handful of cache sets and miss every time. Lines a few
// groups ahead are prefetched (their stride, WBITS·N·4 bytes, defeats the hardware's
// prefetchers). Sums are fp32.
//
// Decoding the indices (AVX-512 VBMI): vpmultishiftqb picks 8 bit-fields per 64-bit lane at
// any offsets, so four 64-bit windows of a group's bit stream give its 32 indices as bytes
// (4-bit: offsets 0, 4, ..., 28 within two windows per 64 bits; 3-bit: 0, 3, ..., 21 within
// windows 24 bits apart, which also covers the indices that straddle two words). A byte
// keeps garbage above the index; vpermps reads only an index's low 4 bits, so 4-bit needs
// no mask and 3-bit tables hold their 8 centroids twice (bit 3 then selects the same value).
// Without AVX-512 VBMI a portable loop does the same work one weight at a time.
//
// x is (tokens, x_stride) fp32 with zeros past K up to a multiple of 32 (the caller pads),
// so every group is whole. Compile-time constants: none; both bit widths are instantiated.
#include <cstddef>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512VBMI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SQ_AVX512 1
#else
#define SQ_AVX512 0
#endif

extern "C" {
// The argument block; sqlab/cpu_kernels.py mirrors it with ctypes.
struct SqGemv {
  const uint32_t* qweight;  // (groups * wbits, N)
  const float* table;       // (N, 16)
  const int32_t* rows;      // CSR of the sparse part, or null
  const int32_t* cols;
  const float* vals;
  const float* bias;  // (N,) or null
  const float* x;     // (tokens, x_stride)
  float* y;           // (tokens, N)
  int32_t K, N, wbits, tokens, x_stride;
};
}

namespace {

constexpr int GROUP = 32;
constexpr int BLOCK = 16;  // rows whose words share one cache line of a qweight row
// Below this many multiply-adds a call stays on one thread: waking a second one costs more
// than it saves, and on a busy machine it may wait a whole scheduler tick for a core.
constexpr long long PARALLEL_WORK = 1 << 18;

// Row o of the sparse part against x: S[o, :] · x.
inline float sparse_dot(const SqGemv& p, int o, const float* x) {
  int k = p.rows[o];
  const int end = p.rows[o + 1];
  float s = 0.f;
#if SQ_AVX512
  // 16 stored values at a time: their columns gather x
  __m512 acc = _mm512_setzero_ps();
  for (; k + 16 <= end; k += 16) {
    const __m512i cols = _mm512_loadu_si512(p.cols + k);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(p.vals + k), _mm512_i32gather_ps(cols, x, 4), acc);
  }
  if (k < end) {
    const __mmask16 rest = (__mmask16)((1u << (end - k)) - 1u);
    const __m512i cols = _mm512_maskz_loadu_epi32(rest, p.cols + k);
    const __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rest, cols, x, 4);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, p.vals + k), xs, acc);
  }
  s = _mm512_reduce_add_ps(acc);
#else
  for (; k < end; ++k) s += p.vals[k] * x[p.cols[k]];
#endif
  return s;
}

#if SQ_AVX512
// The 32 indices of one group of row o (words q[0], q[N], ...) as two vectors of 16 lanes.
template <int WBITS>
inline void decode(const uint32_t* q, size_t N, __m512i& i0, __m512i& i1) {
  __m256i fields;
  if constexpr (WBITS == 4) {
    const uint64_t lo = q[0] | (uint64_t)q[N] << 32, hi = q[2 * N] | (uint64_t)q[3 * N] << 32;
    const __m256i words = _mm256_set_epi64x((int64_t)hi, (int64_t)hi, (int64_t)lo, (int64_t)lo);
    const __m256i shifts = _mm256_set_epi64x(0x3C3834302C282420, 0x1C1814100C080400, 0x3C3834302C282420,
                                             0x1C1814100C080400);
    fields = _mm256_multishift_epi64_epi8(shifts, words);
  } else {
    const uint64_t q0 = q[0], q1 = q[N], q2 = q[2 * N];
    const uint64_t w0 = q0 | q1 << 32;  // bits 0..63 of the group's stream, then windows from 24, 48, 72
    const __m256i words = _mm256_set_epi64x((int64_t)(q2 >> 8), (int64_t)(q1 >> 16 | q2 << 16),
                                            (int64_t)(w0 >> 24 | q2 << 40), (int64_t)w0);
    fields = _mm256_multishift_epi64_epi8(_mm256_set1_epi64x(0x15120F0C09060300), words);
  }
  i0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(fields));
  i1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(fields, 1));
}

constexpr int AHEAD = 4;  // groups prefetched ahead

// The 16 rows o0 .. o0 + 15, all groups.
template <int WBITS, int B>
void gemv_block(const SqGemv& p, int o0) {
  const size_t N = p.N, step = (size_t)WBITS * N;
  const int groups = (p.K + GROUP - 1) / GROUP;
  __m512 acc[BLOCK][B];
  for (int t = 0; t < BLOCK; ++t)
    for (int b = 0; b < B; ++b) acc[t][b] = _mm512_setzero_ps();
  const float* table = p.table + (size_t)o0 * 16;
  const uint32_t* q = p.qweight + o0;
  for (int g = 0; g < groups; ++g, q += step) {
    if (g + AHEAD < groups)
      for (int w = 0; w < WBITS; ++w) _mm_prefetch((const char*)(q + AHEAD * step + w * N), _MM_HINT_T0);
    __m512 x0[B], x1[B];
    for (int b = 0; b < B; ++b) {
      const float* xg = p.x + (size_t)b * p.x_stride + (size_t)g * GROUP;
      x0[b] = _mm512_loadu_ps(xg);
      x1[b] = _mm512_loadu_ps(xg + 16);
    }
#pragma GCC unroll 16
    for (int t = 0; t < BLOCK; ++t) {
      __m512i i0, i1;
      decode<WBITS>(q + t, N, i0, i1);
      const __m512 row = _mm512_loadu_ps(table + t * 16);
      const __m512 w0 = _mm512_permutexvar_ps(i0, row), w1 = _mm512_permutexvar_ps(i1, row);
      for (int b = 0; b < B; ++b) acc[t][b] = _mm512_fmadd_ps(w1, x1[b], _mm512_fmadd_ps(w0, x0[b], acc[t][b]));
    }
  }
  for (int t = 0; t < BLOCK; ++t)
    for (int b = 0; b < B; ++b) {
      const float* x = p.x + (size_t)b * p.x_stride;
      float s = _mm512_reduce_add_ps(acc[t][b]);
      if (p.rows != nullptr) s += sparse_dot(p, o0 + t, x);
      if (p.bias != nullptr) s += p.bias[o0 + t];
      p.y[(size_t)b * N + o0 + t] = s;
    }
}
#endif

// Index j of a group's stream, portable.
inline unsigned index_at(const uint32_t* q, size_t N, int wbits, int j) {  // q: the row's first word
  const int bit = wbits * j, w = bit >> 5, s = bit & 31;
  uint64_t pair = q[(size_t)w * N];
  if (s + wbits > 32) pair |= (uint64_t)q[(size_t)(w + 1) * N] << 32;
  return (unsigned)(pair >> s) & ((1u << wbits) - 1u);
}

template <int WBITS, int B>
void gemv_rows_portable(const SqGemv& p, int o0, int o1) {
  const size_t N = p.N, step = (size_t)WBITS * N;
  const int groups = (p.K + GROUP - 1) / GROUP;
  for (int o = o0; o < o1; ++o) {
    const float* table = p.table + (size_t)o * 16;
    float acc[B] = {};
    const uint32_t* q = p.qweight + o;
    for (int g = 0; g < groups; ++g, q += step) {
      float w[GROUP];
      for (int j = 0; j < GROUP; ++j) w[j] = table[index_at(q, N, WBITS, j)];
      for (int b = 0; b < B; ++b) {
        const float* xg = p.x + (size_t)b * p.x_stride + (size_t)g * GROUP;
        float s = 0.f;
        for (int j = 0; j < GROUP; ++j) s += w[j] * xg[j];
        acc[b] += s;
      }
    }
    for (int b = 0; b < B; ++b) {
      float s = acc[b];
      if (p.rows != nullptr) s += sparse_dot(p, o, p.x + (size_t)b * p.x_stride);
      if (p.bias != nullptr) s += p.bias[o];
      p.y[(size_t)b * N + o] = s;
    }
  }
}

template <int WBITS, int B>
void gemv(const SqGemv& p) {
  const int blocks = (p.N + BLOCK - 1) / BLOCK;
  const long long work = (long long)p.N * p.K * B;
#pragma omp parallel for schedule(static) if (work > PARALLEL_WORK)
  for (int blk = 0; blk < blocks; ++blk) {
    const int o0 = blk * BLOCK, o1 = o0 + BLOCK < p.N ? o0 + BLOCK : p.N;
#if SQ_AVX512
    if (o1 - o0 == BLOCK) {
      gemv_block<WBITS, B>(p, o0);
      continue;
    }
#endif
    gemv_rows_portable<WBITS, B>(p, o0, o1);  // the last rows when N is not a multiple of 16
  }
}

template <int WBITS>
void gemv_tokens(const SqGemv& p) {
  switch (p.tokens) {
    case 1: gemv<WBITS, 1>(p); break;
    case 2: gemv<WBITS, 2>(p); break;
    case 3: gemv<WBITS, 3>(p); break;
    case 4: gemv<WBITS, 4>(p); break;
    case 5: gemv<WBITS, 5>(p); break;
    case 6: gemv<WBITS, 6>(p); break;
    case 7: gemv<WBITS, 7>(p); break;
    case 8: gemv<WBITS, 8>(p); break;
  }
}

}  // namespace

extern "C" {

// 1 when the AVX-512 VBMI path was compiled, 0 for the portable one.
int sq_vectorized() { return SQ_AVX512; }

// y = x · W_hat^T + S x + bias; tokens 1..8. Returns 0, or -1 for arguments it cannot take.
int sq_gemv(const SqGemv* p) {
  if (p->tokens < 1 || p->tokens > 8 || (p->wbits != 3 && p->wbits != 4)) return -1;
  if (p->wbits == 3) gemv_tokens<3>(*p);
  else gemv_tokens<4>(*p);
  return 0;
}

// Rows [row0, row1) of W_hat into out ((row1 - row0) x K, fp32): the table's weights, then the
// sparse part added in stored order (a repeated position's terms one after the other).
int sq_dequantize(const SqGemv* p, int32_t row0, int32_t row1, float* out) {
  if (p->wbits != 3 && p->wbits != 4) return -1;
  const size_t N = p->N, K = p->K, step = (size_t)p->wbits * N;
#pragma omp parallel for schedule(static) if ((long long)(row1 - row0) * p->K > PARALLEL_WORK)
  for (int o = row0; o < row1; ++o) {
    const float* table = p->table + (size_t)o * 16;
    float* w = out + (size_t)(o - row0) * K;
    const uint32_t* q = p->qweight + o;
    for (size_t g = 0; g * GROUP < K; ++g, q += step)
      for (int j = 0; j < GROUP && g * GROUP + j < K; ++j) w[g * GROUP + j] = table[index_at(q, N, p->wbits, j)];
    if (p->rows != nullptr)
      for (int k = p->rows[o]; k < p->rows[o + 1]; ++k) w[p->cols[k]] += p->vals[k];
  }
  return 0;
}

}  // extern "C"
