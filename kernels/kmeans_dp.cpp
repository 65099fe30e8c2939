// Exact sensitivity-weighted 1-D k-means, one row at a time: the k centroids minimising
// sum_j F_j (w_j - c(w_j))^2, by dynamic programming over the sorted row.
//
// In one dimension an optimal clustering splits the sorted points into k contiguous
// intervals, each with its weighted mean as centroid. With prefix sums of F, F·w and F·w²
// the cost of an interval is O(1), and
//     D[c][j] = min over i < j of D[c-1][i] + cost(i, j)
// (the best c intervals of the first j points) gives the optimum D[k][m]. The best split i
// never moves left as j grows (the cost is a Monge array), so each layer is solved by
// divide and conquer: the middle j's best i bounds the halves' searches, O(m log m) costs
// per layer instead of O(m²); a run of j's whose bounds leave one split is filled in one loop
// without recursing. The scan over candidate splits i evaluates 8 of them per AVX-512 step
// where the CPU has it (ties go to the smallest i, as in the scalar loop).
//
// Before the program: points of equal value merge (their weights add), points of weight
// zero leave (they change no cost; they are assigned to their nearest centroid afterwards),
// and values are centred on the weighted mean so the prefix sums lose little to
// cancellation. A row whose weights are all zero uses weight 1 everywhere. Rows are
// independent and shared out over OpenMP threads (torch's pool, as for lut_gemv_cpu.cpp), as
// many as the caller asks for.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace {

struct Sums {
  std::vector<double> s0, s1, s2;  // prefix sums of F, F·x, F·x² over the sorted distinct points

  double cost(int i, int j) const {  // weighted SSE of points [i, j) around their weighted mean
    const double w = s0[j] - s0[i], m = s1[j] - s1[i];
    const double c = (s2[j] - s2[i]) - m * m / w;
    return c > 0.0 ? c : 0.0;
  }
  double mean(int i, int j) const { return (s1[j] - s1[i]) / (s0[j] - s0[i]); }
};

struct Layer {
  const Sums& sums;
  const std::vector<double>& prev;  // D[c-1][.]
  std::vector<double>& cur;          // D[c][.]
  int* opt;                          // argmin i of D[c][j]
  const int* below;                  // argmin of D[c-1][j] (null for c = 2): D[c][j]'s is no smaller
  int below_hi;                      // the last j that argmin was computed for

  // min over i in [lo, hi] of prev[i] + cost(i, j): the value and the smallest i reaching it
  std::pair<double, int> best_split(int j, int lo, int hi) const {
    double best = std::numeric_limits<double>::infinity();
    int arg = lo, i = lo;
#if defined(__AVX512F__)
    // every candidate in vectors of 8 (the last one masked), then the smallest i among the
    // lanes holding the minimum; a short search is cheaper one candidate at a time
    if (hi - lo >= 24) {
    const double* s0 = sums.s0.data();
    const double* s1 = sums.s1.data();
    const double* s2 = sums.s2.data();
    const __m512d inf = _mm512_set1_pd(std::numeric_limits<double>::infinity());
    const __m512d w0 = _mm512_set1_pd(s0[j]), m0 = _mm512_set1_pd(s1[j]), q0 = _mm512_set1_pd(s2[j]);
    const __m512i step = _mm512_set1_epi64(8);
    __m512d vbest = inf;
    __m512i vi = _mm512_add_epi64(_mm512_set1_epi64(lo), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    __m512i varg = vi;
    for (; i <= hi; i += 8, vi = _mm512_add_epi64(vi, step)) {
      const __mmask8 live = hi - i >= 7 ? (__mmask8)0xff : (__mmask8)((1u << (hi - i + 1)) - 1u);
      const __m512d w = _mm512_sub_pd(w0, _mm512_maskz_loadu_pd(live, s0 + i));
      const __m512d m = _mm512_sub_pd(m0, _mm512_maskz_loadu_pd(live, s1 + i));
      const __m512d q = _mm512_sub_pd(q0, _mm512_maskz_loadu_pd(live, s2 + i));
      const __m512d cost = _mm512_max_pd(_mm512_sub_pd(q, _mm512_div_pd(_mm512_mul_pd(m, m), w)),
                                         _mm512_setzero_pd());
      const __m512d v = _mm512_mask_add_pd(inf, live, _mm512_maskz_loadu_pd(live, prev.data() + i), cost);
      const __mmask8 better = _mm512_cmp_pd_mask(v, vbest, _CMP_LT_OQ);
      vbest = _mm512_mask_blend_pd(better, vbest, v);
      varg = _mm512_mask_blend_epi64(better, varg, vi);
    }
    best = _mm512_reduce_min_pd(vbest);
    if (best < std::numeric_limits<double>::infinity())
      arg = (int)_mm512_mask_reduce_min_epi64(_mm512_cmp_pd_mask(vbest, _mm512_set1_pd(best), _CMP_EQ_OQ), varg);
    }
#endif
    for (; i <= hi; ++i) {
      const double v = prev[i] + sums.cost(i, j);
      if (v < best) best = v, arg = i;
    }
    return {best, arg};
  }

  // D[c][j] for j in [jlo, jhi] when the bounds leave one split, i: no search, no recursion.
  // False, with nothing written, where the layer below puts a lower bound past i; the search
  // then proceeds as usual. The same values as the search.
  bool fill(int jlo, int jhi, int i) {
    if (below != nullptr)
      for (int j = jlo; j <= std::min(jhi, below_hi); ++j)
        if (below[j] > i) return false;
    // sums.cost(i, j) spelt out on plain pointers, so the compiler sees no aliasing and vectorises
    const double *s0 = sums.s0.data(), *s1 = sums.s1.data(), *s2 = sums.s2.data();
    const double base = prev[i], w0 = s0[i], m0 = s1[i], q0 = s2[i];
    double* out = cur.data();
    for (int j = jlo; j <= jhi; ++j) {
      const double w = s0[j] - w0, m = s1[j] - m0;
      const double c = (s2[j] - q0) - m * m / w;
      out[j] = base + (c > 0.0 ? c : 0.0);
      opt[j] = i;
    }
    return true;
  }

  // D[c][j] for j in [jlo, jhi], knowing the best i lies in [ilo, ihi]
  void solve(int jlo, int jhi, int ilo, int ihi) {
    while (jlo <= jhi) {
      if (ilo == ihi && fill(jlo, jhi, ilo)) return;
      const int j = (jlo + jhi) / 2;
      // with one cluster more the last one starts no earlier: a second lower bound
      const int from = below != nullptr && j <= below_hi ? std::max(ilo, below[j]) : ilo;
      const auto [best, arg] = best_split(j, from, std::max(from, std::min(ihi, j - 1)));
      cur[j] = best;
      opt[j] = arg;
      // the left half recursively, the right half by looping (keeps the stack shallow)
      if (jlo <= j - 1) solve(jlo, j - 1, ilo, arg);
      jlo = j + 1;
      ilo = arg;
    }
  }
};

struct Buffers {
  std::vector<uint64_t> items, spare;
  std::vector<double> xs, prev, cur;
  Sums sums;
  std::vector<int> opt;
};

// A float's bits as an unsigned key in the same order: negatives count down from 2^31 by
// their magnitude, so a value's zero low bits (a bfloat16 or float16 weight widened) stay
// zero and their sorting passes are skipped. -0 and +0 share the key 2^31.
inline uint32_t sortable(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x80000000u ? 0x80000000u - (u & 0x7fffffffu) : u | 0x80000000u;
}

inline float unsortable(uint32_t key) {
  const uint32_t u = key & 0x80000000u ? key & 0x7fffffffu : (0x80000000u - key) | 0x80000000u;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Sort the items (a value's key in the high 32 bits, its weight's bits in the low 32, which
// follow it) by key, least significant digit first. Short rows take four passes of 8 bits
// (small counting tables), long ones three of 11; one read counts the digits of every pass,
// and a pass whose digit is the same for every item is skipped.
void sort_items(std::vector<uint64_t>& items, std::vector<uint64_t>& spare) {
  const int n = (int)items.size(), bits = n < 4096 ? 8 : 11, buckets = 1 << bits;
  const int passes = (32 + bits - 1) / bits;
  spare.resize(n);
  uint32_t count[4][2049] = {};
  for (int j = 0; j < n; ++j)
    for (int p = 0; p < passes; ++p) ++count[p][((items[j] >> (32 + p * bits)) & (buckets - 1)) + 1];
  for (int p = 0; p < passes; ++p) {
    const int shift = 32 + p * bits;
    uint32_t* at = count[p];
    if (at[((items[0] >> shift) & (buckets - 1)) + 1] == (uint32_t)n) continue;  // one digit: no move
    for (int d = 0; d < buckets; ++d) at[d + 1] += at[d];
    for (int j = 0; j < n; ++j) spare[at[(items[j] >> shift) & (buckets - 1)]++] = items[j];
    items.swap(spare);
  }
}

// One row: n values x with weights f -> k ascending centroids, and the optimal weighted SSE
// (NaN where a value or weight is not finite).
double solve_row(const float* x, const float* f, int n, int k, float* centroids) {
  // per-thread buffers, reached once through references: in a shared library every
  // direct use of a thread_local is a call to find it
  thread_local Buffers tls;
  Buffers& buf = tls;
  std::vector<uint64_t>&items = buf.items, &spare = buf.spare;
  // the weighted mean, to centre on; a row without weight: every point counts once
  bool finite = true;
  double total = 0.0, first = 0.0;
  if (f != nullptr)
    for (int j = 0; j < n; ++j) {
      finite &= std::isfinite(x[j]) & std::isfinite(f[j]);
      const double w = std::max(0.f, f[j]);
      total += w, first += w * x[j];
    }
  const bool uniform = f == nullptr || total <= 0.0;
  if (uniform) {
    total = n, first = 0.0;
    for (int j = 0; j < n; ++j) finite &= std::isfinite(x[j]), first += x[j];
  }
  if (!finite) return std::numeric_limits<double>::quiet_NaN();
  const double centre = n > 0 ? first / total : 0.0;
  items.resize(n);
  for (int j = 0; j < n; ++j) {
    const float w = uniform ? 1.f : std::max(0.f, f[j]);
    uint32_t wbits;
    std::memcpy(&wbits, &w, 4);
    items[j] = (uint64_t)sortable(x[j]) << 32 | wbits;
  }
  sort_items(items, spare);
  // prefix sums of F, F·x, F·x² (x centred) at the end of every run of equal values: the
  // distinct points. A run of zero weight joins the next one (it changes no cost); a last
  // run of zero weight is left out. Branch-free: every item writes the open slot.
  Sums& sums = buf.sums;
  std::vector<double>& xs = buf.xs;  // the distinct values of positive weight
  sums.s0.resize(n + 1), sums.s1.resize(n + 1), sums.s2.resize(n + 1), xs.resize(n + 1);
  sums.s0[0] = sums.s1[0] = sums.s2[0] = 0.0;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, closed = 0.0;  // closed: s0 at the last distinct point
  int m = 0;
  for (int t = 0; t < n; ++t) {
    const uint32_t key = (uint32_t)(items[t] >> 32);
    float w;
    const uint32_t wbits = (uint32_t)items[t];
    std::memcpy(&w, &wbits, 4);
    const float value = unsortable(key);
    const double v = (double)value - centre;
    s0 += w, s1 += w * v, s2 += w * v * v;
    sums.s0[m + 1] = s0, sums.s1[m + 1] = s1, sums.s2[m + 1] = s2, xs[m] = value;
    const bool last = t + 1 == n || (uint32_t)(items[t + 1] >> 32) != key;
    const bool close = last & (s0 > closed);
    closed = close ? s0 : closed;
    m += close;
  }
  if (m == 0) {  // no points at all (n == 0)
    for (int c = 0; c < k; ++c) centroids[c] = 0.f;
    return 0.0;
  }
  if (m <= k) {  // every distinct value is its own centroid; the rest repeat the largest
    for (int c = 0; c < k; ++c) centroids[c] = (float)xs[std::min(c, m - 1)];
    return 0.0;
  }
  std::vector<double>&prev = buf.prev, &cur = buf.cur;
  std::vector<int>& opt = buf.opt;
  prev.resize(m + 1), cur.resize(m + 1), opt.resize((size_t)(k + 1) * (m + 1));
  for (int j = 1; j <= m; ++j) prev[j] = sums.cost(0, j);
  for (int c = 2; c <= k; ++c) {
    // D[c][j] needs j >= c points; only j <= m - (k - c) can lead to the answer D[k][m]
    // (the last layer is needed at j = m alone)
    const int jlo = c < k ? c : m, jhi = m - (k - c);
    const int* below = c > 2 ? opt.data() + (size_t)(c - 1) * (m + 1) : nullptr;
    Layer{sums, prev, cur, opt.data() + (size_t)c * (m + 1), below, jhi - 1}.solve(jlo, jhi, c - 1, jhi - 1);
    std::swap(prev, cur);
  }
  const double sse = prev[m];
  std::vector<int> edges(k + 1);
  edges[k] = m;
  for (int c = k; c >= 2; --c) edges[c - 1] = opt[(size_t)c * (m + 1) + edges[c]];
  edges[0] = 0;
  for (int c = 0; c < k; ++c) centroids[c] = (float)(sums.mean(edges[c], edges[c + 1]) + centre);
  return sse;
}

// Every entry's nearest of k ascending centroids (ties to the lower): the number of midpoints
// between neighbouring centroids below it. Inlined where k is a constant (8, 16), the compiler
// unrolls the midpoints and vectorises over the entries.
inline void assign_row(const float* x, const float* centroids, int n, int k, uint8_t* labels) {
  float mid[255];
  for (int b = 0; b < k - 1; ++b) mid[b] = (centroids[b + 1] + centroids[b]) / 2.f;
  for (int j = 0; j < n; ++j) {
    uint8_t label = 0;
    for (int b = 0; b < k - 1; ++b) label += x[j] > mid[b];
    labels[j] = label;
  }
}

}  // namespace

extern "C" {

// x: (rows, n) row-major; centroids: (rows, k) ascending per row; labels: (rows, n), k <= 256.
int sq_assign(const float* x, const float* centroids, int rows, int n, int k, uint8_t* labels,
              int threads) {
  if (k < 1 || k > 256 || n < 0 || rows < 0 || threads < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * n;
    const float* cr = centroids + (size_t)r * k;
    uint8_t* lr = labels + (size_t)r * n;
    if (k == 8)
      assign_row(xr, cr, n, 8, lr);
    else if (k == 16)
      assign_row(xr, cr, n, 16, lr);
    else
      assign_row(xr, cr, n, k, lr);
  }
  return 0;
}

// x, f: (rows, n) row-major (f may be null: every weight 1); centroids: (rows, k); sse: (rows,);
// threads: OpenMP threads (the caller's torch count, which a worker thread cannot read).
int sq_kmeans_dp(const float* x, const float* f, int rows, int n, int k, float* centroids, double* sse,
                 int threads) {
  if (k < 1 || n < 0 || rows < 0 || threads < 1) return -1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int r = 0; r < rows; ++r)
    sse[r] = solve_row(x + (size_t)r * n, f == nullptr ? nullptr : f + (size_t)r * n, n, k,
                       centroids + (size_t)r * k);
  return 0;
}

}  // extern "C"
