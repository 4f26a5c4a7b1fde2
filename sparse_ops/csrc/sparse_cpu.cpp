// CPU kernels for y = x @ W^T with W in CSR or 2:4, called from sparse_ops/kernels/cpp.py via ctypes.
//
// Shapes (row-major, fp32 unless noted):
//   W       (out, in): CSR rowptr (out+1,) int32, col (nnz,) int16|int32, val (nnz,) fp32|bf16 (uint16 bits)
//                      2:4 val (out, in/2) fp32|bf16, meta (out, ceil(in/8)) uint8 (nibble p0 | p1 << 2)
//   x       (n, in)    the input; the kernels pack it into xt (in, ld), x transposed: column j holds token j,
//                      zero in columns n .. width - 1, width = token_width(n), ld >= width the row stride
//                      (n == 1: xt is x, the gemv)
//   bias    (out,) or NULL;  y (n, out)
//
// PRECONDITIONS (the caller checks them; nothing here re-checks): W passed its format's validate()
// (rowptr non-decreasing from 0 to nnz, 0 <= col < in, 2:4 codes p0 < p1) and every pointer holds the sizes
// above.
//
// Plan: rows are split into blocks handed out to threads one at a time by work_pool.h (a thread that starts
// late finds its share taken, not waiting for it; the caller's thread count is never exceeded). A row's
// products over a tile of tokens live in registers (acc[S][NV] vectors of W floats); S > 1 splits a row's
// nonzeros over independent accumulators so short tiles are not bound by the FMA latency. The weight is read
// once per tile of tokens.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>
#include "work_pool.h"
#if defined(__AVX__)
#include <immintrin.h>  // AVX: the 8x8 transposes; AVX-512: the gemv and 2:4 paths
#endif

namespace {

typedef uint16_t bf16;

inline float load_value(const float* v, int64_t k) { return v[k]; }
inline float load_value(const int8_t* v, int64_t k) { return static_cast<float>(v[k]); }  // int8: the row's scale apart
inline float load_value(const bf16* v, int64_t k) {
  uint32_t u = static_cast<uint32_t>(v[k]) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The target's vector width in floats: the token tiles are NV vectors of VW floats held in registers, so
// the register blocking follows the ISA (a 16-float GCC vector on AVX2 is lowered through the stack: the
// panelled kernel ran at 0.2-0.6x of dense, avx2 build on an AMD EPYC Zen 4). 128-bit targets (SSE2, NEON) use 4.
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
// At most 8 accumulator vectors per row (AVX2 has 16 registers): the widest token tile a kernel holds.
constexpr int64_t MAX_TILE = 8 * VW;

// Independent accumulator sets for a row of NV vectors: enough chains to hide the FMA latency.
constexpr int chains(int nv) { return nv == 1 ? 4 : nv <= 3 ? 2 : 1; }

template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * 4)));
};

template <int W>
inline typename Vec<W>::type load_vec(const float* p) {  // unaligned load of W floats
  typename Vec<W>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Row blocks write their sums here first, (rows, TILE_STRIDE) row-major, then flush_rows writes them to y in
// runs of consecutive rows: storing a row's tile straight into y (stride out floats) hits one or two L1 sets
// when out * 4 is a multiple of 4 KiB and thrashes.
constexpr int64_t TILE_STRIDE = 128;  // the widest tile
constexpr int64_t MAX_ROWS = 64;      // rows per block; the buffer is MAX_ROWS * TILE_STRIDE floats (32 KiB)
// Cache sizes (bytes) of the machine the library is built on: cpp.py passes them (-DSPARSE_L2_BYTES=...)
#ifndef SPARSE_L1D_BYTES
#define SPARSE_L1D_BYTES (32 << 10)
#endif
#ifndef SPARSE_L2_BYTES
#define SPARSE_L2_BYTES (1 << 20)
#endif
#ifndef SPARSE_L3_BYTES
#define SPARSE_L3_BYTES (32 << 20)
#endif
constexpr int64_t GEMV_CACHED_BYTES = SPARSE_L3_BYTES / 2;  // a CSR weight this small stays in L3 between calls

// One token reads each weight once, front to back, from DRAM when the model is larger than the L3. The hardware
// prefetcher stops at every 4 KiB page and starts over on the next, so the one-row loops of the one-token kernels
// also ask for the lines PREFETCH_BYTES ahead of the BYTES they read (rows of a few hundred bytes gained most: a
// small model's layers, int8; 1 KiB ahead gained less). The four-row loops do not: four streams of prefetches
// ran slower than the hardware's alone.
constexpr int64_t PREFETCH_BYTES = 2048;
template <int64_t BYTES = 64, typename T>
inline void prefetch_ahead(const T* p) {
  for (int64_t o = 0; o < BYTES; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES + o);
}

template <int W, int NV>
inline void store_row(const typename Vec<W>::type* acc, int64_t i, float* buf) {
  std::memcpy(buf + i * TILE_STRIDE, acc, NV * W * sizeof(float));
}

#if defined(__AVX__)
// dst[q * ld + r] = src rows r[q] for an 8x8 block: rows[r] points at 8 floats (or nullptr: zeros).
inline void transpose8(const float* const* rows, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = rows[i] ? _mm256_loadu_ps(rows[i]) : _mm256_setzero_ps();
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {  // h = 0: rows 0-3, h = 4: rows 4-7
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(dst + q * ld, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
    _mm256_storeu_ps(dst + (q + 4) * ld, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
  }
}
#endif

// ---- epilogue: y = act(sums + bias) ---------------------------------------------------------------------
// Activations fused into the kernels' output writes (codes: sparse_ops/activations.py), written as plain
// float code that `#pragma omp simd` vectorises (no libm calls): e^x by range reduction to |r| <= ln2 / 2 and a
// degree-7 Taylor polynomial (relative error < 1e-7 before rounding); erf by a rational fit of our own
// (csrc/fit_erf.py; 13 multiply-adds and one divide, no exp: the Abramowitz & Stegun 7.1.26 form with an exp
// made the fused GELU cost 27-36% of a 1536x384 layer's call). NaN inputs stay NaN (results are multiples of x).
enum Act { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_SILU = 4 };

inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504f + 0.5f);  // x = k ln2 + r
  const float r = (x - k * 0.693145751953125f) - k * 1.42860677e-6f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6;
  p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <int ACT>
inline float activation(float v) {
  if (ACT == ACT_RELU) return std::max(v, 0.0f);  // max(NaN, 0) is NaN, as torch's relu
  if (ACT == ACT_GELU) {  // 0.5 v (1 + erf(a)), a = v / sqrt 2 clamped to [-4, 4], erf(a) = a P(a^2) / Q(a^2)
    const float a = std::min(std::max(v * 0.70710678f, -4.0f), 4.0f), u = a * a;
    float p = 1.9216658e-08f;  // csrc/fit_erf.py: |erf error| < 5e-7 in fp32, no exp
    p = p * u - 1.9903346e-06f; p = p * u + 1.5554519e-04f; p = p * u + 4.2934320e-03f;
    p = p * u + 5.2434690e-02f; p = p * u + 2.1395364e-01f; p = p * u + 1.1283786f;
    float q = 1.0981273e-03f;
    q = q * u + 1.5551873e-02f; q = q * u + 1.2080334e-01f; q = q * u + 5.2293915e-01f; q = q * u + 1.0f;
    const float h = 0.5f * v, g = h + h * (a * p / q);
    return a >= 3.9f ? v : a <= -3.9f ? 0.0f : g;  // erf(3.9) rounds to 1: exact there, not 1 - 1 ulp
  }
  if (ACT == ACT_GELU_TANH) {  // 0.5 v (1 + tanh u), u = sqrt(2/pi) (v + 0.044715 v^3), tanh u = 1 - 2/(e^2u + 1)
    const float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (2.0f - 2.0f / (exp_fast(2.0f * u) + 1.0f));
  }
  if (ACT == ACT_SILU) return v / (1.0f + exp_fast(-v));
  return v;
}

// rows[i, j] = act(rows[i, j] + bias[i]) for i < nrows, j < m (rows with stride ld; bias may be null).
template <int ACT>
void epilogue_rows(float* rows, int64_t ld, int64_t nrows, int64_t m, const float* bias) {
  for (int64_t i = 0; i < nrows; ++i) {
    float* v = rows + i * ld;
    const float b = bias ? bias[i] : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) v[j] = activation<ACT>(v[j] + b);
  }
}

inline void epilogue(float* rows, int64_t ld, int64_t nrows, int64_t m, const float* bias, int act) {
  switch (act) {
    case ACT_RELU: epilogue_rows<ACT_RELU>(rows, ld, nrows, m, bias); break;
    case ACT_GELU: epilogue_rows<ACT_GELU>(rows, ld, nrows, m, bias); break;
    case ACT_GELU_TANH: epilogue_rows<ACT_GELU_TANH>(rows, ld, nrows, m, bias); break;
    case ACT_SILU: epilogue_rows<ACT_SILU>(rows, ld, nrows, m, bias); break;
    default: if (bias) epilogue_rows<ACT_NONE>(rows, ld, nrows, m, bias); break;
  }
}

// y[t0 + j, r0 + i] = act(buf[i, j] + bias[r0 + i]) for tokens j < nvalid and the block's rows i: the epilogue
// runs along buf's rows, then 8x8 blocks are transposed in registers (a scalar loop reading buf down its
// columns cost about a third of the kernel's time at 384 outputs).
inline void flush_rows(float* buf, int64_t T, int64_t r0, int64_t nrows, int64_t t0, int64_t nvalid,
                       const float* bias, int act, float* y, int64_t out) {
  epilogue(buf, T, nrows, nvalid, bias ? bias + r0 : nullptr, act);
  int64_t i0 = 0;
#if defined(__AVX__)
  for (; i0 + 8 <= nrows; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= nvalid; j0 += 8) {
      const float* rows[8];
      for (int r = 0; r < 8; ++r) rows[r] = buf + (i0 + r) * T + j0;
      transpose8(rows, y + (t0 + j0) * out + r0 + i0, out);
    }
    for (; j0 < nvalid; ++j0)
      for (int64_t i = i0; i < i0 + 8; ++i) y[(t0 + j0) * out + r0 + i] = buf[i * T + j0];
  }
#endif
  for (int64_t j = 0; j < nvalid; ++j)
    for (int64_t i = i0; i < nrows; ++i) y[(t0 + j) * out + r0 + i] = buf[i * T + j];
}

// ---- post-op: y = LayerNorm(y + residual), a post-LN transformer sublayer's output ------------------------
// Applied to whole token rows of y (all `out` features), once every row block of those tokens is written: in
// the by-tile schedules by the thread that computed the tile, while its rows are in cache; elsewhere in one more
// pass once y is complete. kind: POST_NONE, POST_ADD (y += residual) or POST_ADD_NORM (then the
// LayerNorm over the row: (v - mean) / sqrt(var + eps) * gamma + beta, gamma and beta null for none).
enum PostKind { POST_NONE = 0, POST_ADD = 1, POST_ADD_NORM = 2 };

struct Post {
  int kind; const float* residual; const float* gamma; const float* beta; float eps;
};

// Not inlined: inlined into run_ffn's second phase it ran 3x slower (the post-op cost 13% of a 128-token FFN
// call instead of 4%, paired runs), a worse clone of the same loops.
__attribute__((noinline)) void post_rows(const Post& p, float* y, int64_t out, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float* v = y + j * out;
    if (p.residual) {
      const float* r = p.residual + j * out;
#pragma omp simd
      for (int64_t c = 0; c < out; ++c) v[c] += r[c];
    }
    if (p.kind != POST_ADD_NORM) continue;
    float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < out; ++c) sum += v[c];
    const float mean = sum / static_cast<float>(out);
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < out; ++c) sq += (v[c] - mean) * (v[c] - mean);  // two passes, as torch's
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(out) + p.eps);
    const float *g = p.gamma, *b = p.beta;
#pragma omp simd
    for (int64_t c = 0; c < out; ++c)
      v[c] = (v[c] - mean) * inv * (g ? g[c] : 1.0f) + (b ? b[c] : 0.0f);
  }
}

using work_pool::parallel_for;

// The post-op over all n token rows, once y is complete.
inline void post_all(const Post& p, float* y, int64_t out, int64_t n, int nthreads) {
  if (p.kind == POST_NONE) return;
  parallel_for(n, nthreads, [&](int64_t j, int) { post_rows(p, y, out, j, j + 1); });
}

// ---- CSR ----------------------------------------------------------------------------------------------

// sum of val[k] * x[col[k]] over [k, e) in four chains (one chain would be bound by the FMA latency)
template <typename V, typename I>
inline float sparse_dot(const I* col, const V* val, int64_t k, int64_t e, const float* x) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (; k + 4 <= e; k += 4) {
    s0 += load_value(val, k) * x[col[k]];
    s1 += load_value(val, k + 1) * x[col[k + 1]];
    s2 += load_value(val, k + 2) * x[col[k + 2]];
    s3 += load_value(val, k + 3) * x[col[k + 3]];
  }
  for (; k < e; ++k) s0 += load_value(val, k) * x[col[k]];
  return (s0 + s1) + (s2 + s3);
}

template <typename V, typename I, int W, int NV, int S>
void csr_rows_tile(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1, const float* xt,
                   int64_t ld, int64_t t0, float* buf) {
  typedef typename Vec<W>::type vec;
  const float* xb = xt + t0;
  for (int64_t r = r0; r < r1; ++r) {
    vec acc[S][NV];
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[s][j] = vec{};
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; k + S <= e; k += S) {
      for (int s = 0; s < S; ++s) {
        const float v = load_value(val, k + s);
        const float* xp = xb + static_cast<int64_t>(col[k + s]) * ld;
        for (int j = 0; j < NV; ++j) acc[s][j] += v * load_vec<W>(xp + j * W);
      }
    }
    for (; k < e; ++k) {
      const float v = load_value(val, k);
      const float* xp = xb + static_cast<int64_t>(col[k]) * ld;
      for (int j = 0; j < NV; ++j) acc[0][j] += v * load_vec<W>(xp + j * W);
    }
    for (int s = 1; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[0][j] += acc[s][j];
    store_row<W, NV>(acc[0], r - r0, buf);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 stored values starting at v[k] as fp32 lanes; lanes >= m (m < 16) are zero and not read.
inline __m512 load_vals16(const float* v, int64_t k, __mmask16 m) { return _mm512_maskz_loadu_ps(m, v + k); }
inline __m512 load_vals16(const bf16* v, int64_t k, __mmask16 m) {  // bf16: widen, shift into the top half
  __m256i h = _mm256_maskz_loadu_epi16(m, v + k);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512i load_cols16(const int16_t* c, int64_t k, __mmask16 m) {
  return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, c + k));
}
inline __m512i load_cols16(const int32_t* c, int64_t k, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, c + k); }

// One token, x (`in` floats) in L1. Two ways to fetch the x values of 16 nonzeros:
//  - 16 scalar loads assembled into one vector (csr_gemv_rows_scalar): 19-25% faster than vgatherdps on the
//    2-core EPYC when the weight stays in cache (4096x4096 at 90-99%, BERT-size layers), paired A/B runs;
//  - vgatherdps, two accumulators (csr_gemv_rows): 18-25% faster when the weight streams from DRAM (4096x4096
//    at 70%, 30 MB): its fewer instructions leave the core more loads in flight.
// CsrBody picks by the weight's bytes (GEMV_CACHED_BYTES, half the 32 MiB L3).
template <typename V, typename I>
void csr_gemv_rows_scalar(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1,
                          const float* x, const float* bias, float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; k + 16 <= e; k += 16) {
      const I* c = col + k;
      const __m512 xs = _mm512_set_ps(x[c[15]], x[c[14]], x[c[13]], x[c[12]], x[c[11]], x[c[10]], x[c[9]], x[c[8]],
                                      x[c[7]], x[c[6]], x[c[5]], x[c[4]], x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
      acc = _mm512_fmadd_ps(load_vals16(val, k, 0xFFFF), xs, acc);
    }
    y[r] = _mm512_reduce_add_ps(acc) + sparse_dot(col, val, k, e, x) + (bias ? bias[r] : 0.0f);  // + last 0-15
  }
}

template <typename V, typename I>
void csr_gemv_rows(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1, const float* x,
                   const float* bias, float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; k + 32 <= e; k += 32) {
      a0 = _mm512_fmadd_ps(load_vals16(val, k, 0xFFFF), _mm512_i32gather_ps(load_cols16(col, k, 0xFFFF), x, 4), a0);
      a1 = _mm512_fmadd_ps(load_vals16(val, k + 16, 0xFFFF),
                           _mm512_i32gather_ps(load_cols16(col, k + 16, 0xFFFF), x, 4), a1);
    }
    for (; k < e; k += 16) {  // masked tail: lanes past e are neither loaded nor gathered
      const __mmask16 m = e - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (e - k)) - 1);
      const __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_cols16(col, k, m), x, 4);
      a0 = _mm512_fmadd_ps(load_vals16(val, k, m), xs, a0);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.0f);
  }
}
#else
template <typename V, typename I>
void csr_gemv_rows(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1, const float* x,
                   const float* bias, float* y) {
  for (int64_t r = r0; r < r1; ++r)
    y[r] = sparse_dot(col, val, rowptr[r], rowptr[r + 1], x) + (bias ? bias[r] : 0.0f);
}
template <typename V, typename I>
void csr_gemv_rows_scalar(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1,
                          const float* x, const float* bias, float* y) {
  csr_gemv_rows<V, I>(rowptr, col, val, r0, r1, x, bias, y);
}
#endif

// ---- 2:4 ----------------------------------------------------------------------------------------------

// Add the products of row r's groups [g0, g1) (g0 even) to acc over one token tile.
template <typename V, int W, int NV, int S>
void two_four_rows_tile(const V* val, const uint8_t* meta, int64_t in, int64_t r0, int64_t r1, const float* xt,
                        int64_t ld, int64_t t0, float* buf) {
  typedef typename Vec<W>::type vec;
  const int64_t groups = in / 4, mbytes = (groups + 1) / 2;
  const float* xb = xt + t0;
  for (int64_t r = r0; r < r1; ++r) {
    const V* vr = val + r * (in / 2);
    const uint8_t* mr = meta + r * mbytes;
    vec acc[S][NV];
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[s][j] = vec{};
    for (int64_t g = 0; g < groups; g += 2) {  // one metadata byte: groups g and g + 1
      const unsigned m = mr[g / 2];
      const int nvals = g + 1 < groups ? 4 : 2;
      for (int q = 0; q < nvals; ++q) {
        const int64_t c = 4 * (g + q / 2) + ((m >> (2 * q)) & 3);  // column of the q-th stored value
        const float v = load_value(vr, 2 * g + q);
        const float* xp = xb + c * ld;
        for (int j = 0; j < NV; ++j) acc[q % S][j] += v * load_vec<W>(xp + j * W);
      }
    }
    for (int s = 1; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[0][j] += acc[s][j];
    store_row<W, NV>(acc[0], r - r0, buf);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // 8 bf16 -> fp32
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {  // 8 int8 -> fp32 (an int8 weight's values, its row scale apart)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // 16 bf16 -> fp32: widen to 32 bits, shift into the top half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {  // 16 int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// One token: 8 groups (32 inputs, 16 values, one 32-bit metadata word) per step. Lane l of the word's
// codes is (word >> 2l) & 3 within group l / 2, so one variable shift decodes all 16 columns.
template <typename V>
void two_four_gemv_rows(const V* val, const uint8_t* meta, int64_t in, int64_t r0, int64_t r1, const float* x,
                        const float* bias, float* y) {
  const int64_t groups = in / 4, mbytes = (groups + 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const V* vr = val + r * (in / 2);
    const uint8_t* mr = meta + r * mbytes;
    float sum = 0;
    int64_t g = 0;
#if defined(__AVX512F__)
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512i three = _mm512_set1_epi32(3);
    __m512 acc = _mm512_setzero_ps();
    for (; g + 8 <= groups; g += 8) {
      uint32_t word;
      std::memcpy(&word, mr + g / 2, 4);
      __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three),
                                     base);  // (16,) columns within x[4g : 4g + 32]
      __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(x + 4 * g), idx, _mm512_loadu_ps(x + 4 * g + 16));
      acc = _mm512_fmadd_ps(load16(vr + 2 * g), xs, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    // AVX2: 4 groups (16 inputs, 8 values, 16 bits of codes) per step. Lanes 0-3 take their x from the first 8
    // inputs, lanes 4-7 from the next 8, so two in-lane permutes and one fixed blend gather them (the scalar
    // loop ran at 1.0-1.3x of dense at 1 token on an AMD EPYC Zen 4; results/matmul-avx2).
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);  // group offsets within each 8 inputs
    const __m256i three = _mm256_set1_epi32(3);
    __m256 acc = _mm256_setzero_ps();
    for (; g + 4 <= groups; g += 4) {
      uint16_t half;
      std::memcpy(&half, mr + g / 2, 2);
      const __m256i idx = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(half), shifts), three), base);
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 4 * g), idx);
      const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 4 * g + 8), idx);
      acc = _mm256_fmadd_ps(load8(vr + 2 * g), _mm256_blend_ps(lo, hi, 0xF0), acc);
    }
    sum = hsum8(acc);
#endif
    for (; g < groups; ++g) {
      const unsigned nib = (mr[g / 2] >> (4 * (g & 1))) & 0xF;
      sum += load_value(vr, 2 * g) * x[4 * g + (nib & 3)] + load_value(vr, 2 * g + 1) * x[4 * g + (nib >> 2)];
    }
    y[r] = sum + (bias ? bias[r] : 0.0f);
  }
}

// ---- tiling over tokens and threads -------------------------------------------------------------------

// Tokens computed: 1 (gemv), 8 (one 8-wide vector) or n rounded up to 16 (16-wide vectors).
inline int64_t token_width(int64_t n) { return n == 1 ? 1 : n <= 8 ? 8 : (n + 15) / 16 * 16; }

// Computes one token tile [t0, t0 + tile) of rows [r0, r1) with body.template run<W, NV, S>, then flushes buf.
// The tile's m tokens (8, or a multiple of 16 up to MAX_TILE) are m / VW target vectors (AVX-512 at width 8:
// one 8-float vector).
template <int NV, typename Body>
inline void run_nv(const Body& body, int64_t r0, int64_t r1, int64_t t0, float* buf) {
  body.template run<VW, NV, chains(NV)>(r0, r1, t0, buf);
}

// The sums alone, into buf (rows, TILE_STRIDE), for n >= 2 tokens packed token_width(n) wide.
template <typename Body>
void dispatch_tile(const Body& body, int64_t r0, int64_t r1, int64_t n, int64_t t0, int64_t tile, float* buf) {
  const int64_t width = token_width(n), m = width == 8 ? 8 : std::min(tile, width - t0);
  switch (m < VW ? 0 : m / VW) {
    case 0:  // m == 8 < VW: one 8-float vector
      if constexpr (VW > 8) body.template run<8, 1, 4>(r0, r1, t0, buf);
      break;
    case 1: run_nv<1>(body, r0, r1, t0, buf); break;
    case 2: run_nv<2>(body, r0, r1, t0, buf); break;
    case 3: run_nv<3>(body, r0, r1, t0, buf); break;
    case 4: run_nv<4>(body, r0, r1, t0, buf); break;
    case 5: run_nv<5>(body, r0, r1, t0, buf); break;
    case 6: run_nv<6>(body, r0, r1, t0, buf); break;
    case 7: run_nv<7>(body, r0, r1, t0, buf); break;
    default: run_nv<8>(body, r0, r1, t0, buf); break;
  }
}

template <typename Body>
void one_tile(const Body& body, int64_t r0, int64_t r1, int64_t n, int64_t t0, int64_t tile, float* buf) {
  dispatch_tile(body, r0, r1, n, t0, tile, buf);
  flush_rows(buf, TILE_STRIDE, r0, r1 - r0, t0, std::min(tile, n - t0), body.bias, body.act, body.y, body.out);
}

template <typename V, typename I>
struct CsrBody {
  const int32_t* rowptr; const I* col; const V* val; const float* bias; float* y; int64_t out; int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    csr_rows_tile<V, I, W, NV, S>(rowptr, col, val, r0, r1, xt, ld, t0, buf);
  }
  void gemv(int64_t r0, int64_t r1) const {
    if (rowptr[out] * static_cast<int64_t>(sizeof(V) + sizeof(I)) <= GEMV_CACHED_BYTES)
      csr_gemv_rows_scalar<V, I>(rowptr, col, val, r0, r1, xt, bias, y);
    else
      csr_gemv_rows<V, I>(rowptr, col, val, r0, r1, xt, bias, y);
  }
};

template <typename V>
struct TwoFourBody {
  const V* val; const uint8_t* meta; int64_t in; const float* bias; float* y; int64_t out; int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    two_four_rows_tile<V, W, NV, S>(val, meta, in, r0, r1, xt, ld, t0, buf);
  }
  void gemv(int64_t r0, int64_t r1) const { two_four_gemv_rows<V>(val, meta, in, r0, r1, xt, bias, y); }
};

// ---- panelled CSR: batches of PANEL_MIN tokens and more ---------------------------------------------
//
// Weight (ours_cpu.panel_parts): rows in blocks of R, columns in panels of P (<= 256), R * T <= MAX_ROWS * 64.
//   seg  (nblocks * npanels * R + 1,) int32: row r0 + i's nonzeros in panel p are [seg[q], seg[q + 1]),
//        q = (b * npanels + p) * R + i for the block b holding rows r0 .. r0 + R - 1
//   lcol (nnz,) uint8: column - p * P (1 byte per nonzero);  val (nnz,) fp32 | bf16
// x packed by pack_all: xt (ntiles, in, T) fp32, token t * T + j of column c at xt[(t * in + c) * T + j],
// zero past n. One panel of one tile, (P, T) floats (64 KiB at P = 256, T = 64: it lives in L2), is
// contiguous; the R rows of the block use it in turn (each line about R * density times). The block's sums
// live in buf (R, T), stored once per (row, panel) and loaded again from the second panel on (the first starts
// from the row's bias: no memset of buf, no bias pass); the block's weights stay in L2 across tiles.
// Why not simpler: with x read from L2 per nonzero (no column panels) the kernel ran at 2-3 cycles per 16-wide
// FMA. What keeps it below MKL's dense FMA rate (ablations in paired runs, BERT shapes at 1024 tokens): packing
// x costs 3-18% of a call, writing y 6-23%, a fused GELU 15-18%; the inner loop itself runs at about 1.4 cycles
// per 16-wide FMA (x always in L1 would gain only 6-12%; a second accumulator set, 4 column offsets per load,
// wider panels with 16-bit offsets or 128-token tiles gained nothing or lost).

template <int NV, int S, typename V>
__attribute__((always_inline)) inline void panel_row(const uint8_t* lcol, const V* val, int64_t k, int64_t e,
                                                     const float* xp, float* acc_mem, bool fresh, float start) {
  typedef Vec<VW>::type vec;
  constexpr int64_t T = VW * NV;
  vec acc[S][NV];
  for (int j = 0; j < NV; ++j) acc[0][j] = fresh ? vec{} + start : load_vec<VW>(acc_mem + VW * j);
  for (int s = 1; s < S; ++s)
    for (int j = 0; j < NV; ++j) acc[s][j] = vec{};
  for (; k + S <= e; k += S)
    for (int s = 0; s < S; ++s) {
      const float v = load_value(val, k + s);
      const float* xr = xp + static_cast<int64_t>(lcol[k + s]) * T;
      for (int j = 0; j < NV; ++j) acc[s][j] += v * load_vec<VW>(xr + VW * j);
    }
  for (; k < e; ++k) {
    const float v = load_value(val, k);
    const float* xr = xp + static_cast<int64_t>(lcol[k]) * T;
    for (int j = 0; j < NV; ++j) acc[0][j] += v * load_vec<VW>(xr + VW * j);
  }
  for (int s = 1; s < S; ++s)
    for (int j = 0; j < NV; ++j) acc[0][j] += acc[s][j];
  for (int j = 0; j < NV; ++j) std::memcpy(acc_mem + VW * j, &acc[0][j], sizeof(vec));
}

// Sums of rows [r0, r0 + nrows) (block b) over one token tile into buf (nrows, T), all panels in turn, each
// starting from its bias (bias points at row r0's, or is null).
template <int NV, int S, typename V>
void panel_block(const int32_t* seg, const uint8_t* lcol, const V* val, int64_t in, int64_t npanels, int64_t R,
                 int64_t P, int64_t b, int64_t nrows, const float* xtile, const float* bias, float* buf) {
  constexpr int64_t T = VW * NV;
  // No software prefetch: prefetching each next panel (into L1, or into L2 only) was 3-12% slower than none in
  // paired runs on BERT shapes and 4096x4096 at 70-90% (64-1024 tokens).
  for (int64_t p = 0; p < npanels; ++p) {
    const float* xp = xtile + p * P * T;  // (min(P, in - p * P), T)
    const int32_t* s = seg + (b * npanels + p) * R;
    for (int64_t i = 0; i < nrows; ++i) {
      const float start = bias ? bias[i] : 0.0f;
      if (s[i] != s[i + 1]) panel_row<NV, S>(lcol, val, s[i], s[i + 1], xp, buf + i * T, p == 0, start);
      else if (p == 0) std::fill(buf + i * T, buf + (i + 1) * T, start);
    }
  }
}


// Columns [c0, c1) of tile t: xt[t, c, j] = x[t * T + j, c], zero for tokens >= n.
inline void pack_block(const float* x, int64_t n, int64_t in, int64_t T, int64_t t, int64_t c0, int64_t c1,
                       float* xt) {
  float* dst = xt + t * in * T;
  int64_t c = c0;
#if defined(__AVX__)
  for (; c + 8 <= c1; c += 8)  // 8 columns x 8 tokens at a time; c1 - c0 <= 16: each x line read once
    for (int64_t j0 = 0; j0 < T; j0 += 8) {
      const float* rows[8];
      for (int r = 0; r < 8; ++r) rows[r] = t * T + j0 + r < n ? x + (t * T + j0 + r) * in + c : nullptr;
      transpose8(rows, dst + c * T + j0, T);
    }
#endif
  for (; c < c1; ++c)
    for (int64_t j = 0; j < T; ++j) dst[c * T + j] = t * T + j < n ? x[(t * T + j) * in + c] : 0.0f;
}

// x (n, in) fp32 row-major -> xt (ntiles, in, T), T a multiple of 8 (see the panelled CSR note above; ntiles
// == 1 and T == ld gives the plain kernels' (in, ld) panel). Blocks of 16 columns (one 64-byte line of each x
// row) by the tile's T tokens, 8x8 transposes in registers, shared by the threads; xt is complete on return.
inline void pack_all(const float* x, int64_t n, int64_t in, int64_t T, float* xt, int nthreads) {
  const int64_t ntiles = (n + T - 1) / T, cblocks = (in + 15) / 16;
  parallel_for(ntiles * cblocks, nthreads, [&](int64_t item, int) {
    const int64_t t = item / cblocks, c0 = item % cblocks * 16;
    pack_block(x, n, in, T, t, c0, std::min(in, c0 + 16), xt);
  });
}

// Token tile t of x packed alone into dst (in, T): one thread's tile in the by-tile schedules.
inline void pack_tile(const float* x, int64_t n, int64_t in, int64_t T, int64_t t, float* dst) {
  for (int64_t c0 = 0; c0 < in; c0 += 16)  // the tile's rows, packed as tile 0 of those rows
    pack_block(x + t * T * in, std::min(T, n - t * T), in, T, 0, c0, std::min(in, c0 + 16), dst);
}

// The packed x lives in a scratch buffer of the calling thread, kept between calls and grown to the largest
// seen: a fresh multi-MiB buffer each call would cost ~0.5 ms per MiB in page faults. It is 64-byte aligned:
// every 16-float load of x then stays within one cache line (malloc's 16-byte alignment made the kernels
// 20-30% slower or faster from run to run, by where the buffer happened to land).
inline float* scratch(size_t floats, int slot = 0) {  // slot 1: the int8 copy of x (quantize_x)
  struct Buffer {
    float* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  static thread_local Buffer bufs[2];
  Buffer& buf = bufs[slot];
  if (buf.size < floats) {
    std::free(buf.data);
    buf.data = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
    buf.size = buf.data ? floats : 0;
  }
  return buf.data;  // null when out of memory: the entry point returns ENTRY_OUT_OF_MEMORY
}

constexpr int ENTRY_OK = 0, ENTRY_OUT_OF_MEMORY = 1, ENTRY_BAD_ARGUMENT = 2;  // what the entry points return

// A panelled CSR weight (out, in): the parts above, rows in blocks of R, columns in panels of P.
template <typename V>
struct Panels {
  const int32_t* seg; const uint8_t* lcol; const V* val; int64_t out, in, R, P;
  const float* scales = nullptr;  // int8 values: (out,) per-row scales, applied to each row's sum before its bias
  int64_t nblocks() const { return (out + R - 1) / R; }
  int64_t npanels() const { return (in + P - 1) / P; }
  int64_t bytes() const { return seg[nblocks() * npanels() * R] * static_cast<int64_t>(sizeof(V) + 1); }
};

// Block b's sums over one token tile of T tokens (bias included) into dst (nrows, T); returns nrows.
template <typename V>
int64_t panel_sums(const Panels<V>& w, int64_t T, int64_t b, const float* xtile, const float* bias, float* dst) {
  const int64_t r0 = b * w.R, nrows = std::min(w.R, w.out - r0), np = w.npanels();
  const float* rbias = bias && !w.scales ? bias + r0 : nullptr;  // scaled sums take their bias after
  constexpr int N16 = 16 / VW, N32 = 32 / VW, N64 = 64 / VW;  // T tokens are T / VW target vectors
  switch (T) {
    case 16: panel_block<N16, chains(N16)>(w.seg, w.lcol, w.val, w.in, np, w.R, w.P, b, nrows, xtile, rbias, dst);
      break;
    case 32: panel_block<N32, chains(N32)>(w.seg, w.lcol, w.val, w.in, np, w.R, w.P, b, nrows, xtile, rbias, dst);
      break;
    default: panel_block<N64, chains(N64)>(w.seg, w.lcol, w.val, w.in, np, w.R, w.P, b, nrows, xtile, rbias, dst);
      break;
  }
  if (w.scales)
    for (int64_t i = 0; i < nrows; ++i) {
      const float s = w.scales[r0 + i], c = bias ? bias[r0 + i] : 0.0f;
      float* v = dst + i * T;
#pragma omp simd
      for (int64_t j = 0; j < T; ++j) v[j] = v[j] * s + c;
    }
  return nrows;
}

// Block b's rows over tile t, written to y (n, w.out).
template <typename V>
void panel_item(const Panels<V>& w, int64_t T, int64_t n, int64_t b, int64_t t, const float* xtile,
                const float* bias, int act, float* y, float* buf) {
  const int64_t nrows = panel_sums(w, T, b, xtile, bias, buf);
  flush_rows(buf, T, b * w.R, nrows, t * T, std::min(T, n - t * T), nullptr, act, y, w.out);  // bias already in
}

// Two schedules. By tile: each thread takes whole tiles, packs a tile (in * T floats) into its own slot of the
// scratch and runs every row block over it, so the packed tile stays in its L2 and the weight is read once per
// tile. By row block: x is packed by all threads first, then items (row block, run of consecutive tiles), at
// least 4 per thread where the shape allows, tiles inner so a block's weights stay in L2 across its tiles, but
// the packed x is read once per row block. Paired A/B runs on the 2-core EPYC (90%, 2 threads): by tile is
// 20-50% faster where in >= out (384x1536, 384x384, 768x3072 at 256-1024 tokens; 4096x4096 at 1024), and
// where out > in once there are MANY_TILES tiles (+3-8% on 1536x384 and 3072x768 at 1024 tokens, +16% on
// 4096x1024 at 2048, +69% on 11008x4096 at 1024); it is 1-9% slower where out > in with fewer tiles
// (1536x384 at 128-512) or where a weight too big for L2 is re-read for each of few tiles (4096x4096 at 256).
constexpr int64_t TILES_PER_THREAD = 2;     // by tile needs this many tiles per thread
constexpr int64_t L2_WEIGHT_BYTES = SPARSE_L2_BYTES / 2;  // ... and in >= out with a weight this small, or MANY_TILES
constexpr int64_t MANY_TILES = 16;

template <typename V>
int run_panels(const Panels<V>& w, const float* x, int64_t T, int64_t n, const float* bias, float* y,
               int nthreads, int act, const Post& post) {
  const int64_t in = w.in, nblocks = w.nblocks(), weight_bytes = w.bytes();
  const auto tile_wise = [&](int64_t tile) {
    const int64_t tiles = (n + tile - 1) / tile;
    return tiles >= TILES_PER_THREAD * nthreads &&
           (tiles >= MANY_TILES || (in >= w.out && weight_bytes <= L2_WEIGHT_BYTES));
  };
  // 32-token tiles where that makes enough tiles for the by-tile schedule and 64 do not (128 tokens on 2
  // threads: +49-55% on 384x384 and 384x1536 in paired runs).
  if (T == 64 && !tile_wise(64) && tile_wise(32)) T = 32;
  const int64_t ntiles = (n + T - 1) / T;
  const bool by_tile = tile_wise(T);
  float* xt = scratch(static_cast<size_t>((by_tile ? nthreads : ntiles) * in * T));
  if (!xt) return ENTRY_OUT_OF_MEMORY;
  if (by_tile) {
    parallel_for(ntiles, nthreads, [&](int64_t t, int slot) {
      alignas(64) float buf[MAX_ROWS * 64];  // (R, T) sums, T <= 64
      float* mine = xt + slot * in * T;      // this thread's packed tile, laid out as tile 0
      pack_tile(x, n, in, T, t, mine);
      for (int64_t b = 0; b < nblocks; ++b) panel_item(w, T, n, b, t, mine, bias, act, y, buf);
      if (post.kind) post_rows(post, y, w.out, t * T, std::min(n, t * T + T));  // the tile's rows, in cache
    });
    return ENTRY_OK;
  }
  const int64_t nruns = std::min(ntiles, std::max<int64_t>(1, (4 * nthreads + nblocks - 1) / nblocks));
  const int64_t run = (ntiles + nruns - 1) / nruns;
  pack_all(x, n, in, T, xt, nthreads);
  parallel_for(nblocks * nruns, nthreads, [&](int64_t item, int) {
    alignas(64) float buf[MAX_ROWS * 64];  // (R, T) sums, T <= 64
    const int64_t b = item / nruns, t1 = std::min(ntiles, (item % nruns + 1) * run);
    for (int64_t t = item % nruns * run; t < t1; ++t) panel_item(w, T, n, b, t, xt + t * in * T, bias, act, y, buf);
  });
  post_all(post, y, w.out, n, nthreads);
  return ENTRY_OK;
}

// Fused feed-forward block, y = act(x U^T + bu) D^T + bd, U (hidden, in) and D (out, hidden) panelled with the
// same R and P. Per token tile, U's row blocks write act(sums) straight into a (hidden, T) buffer, which is the
// packed tile of D's input: the hidden activations are never transposed into a (n, hidden) tensor, written
// to memory and packed again (on BERT's 1536x384 and 384x1536 at 1024 tokens those two steps were about 23%
// and 18% of the two calls). Schedules: by tile when every thread gets TILES_PER_THREAD tiles (a thread packs
// its tile, runs all of U's blocks, then all of D's, its hidden tile staying in its L2); else in two phases,
// all threads sharing U's (block, tile) items, then D's, with one barrier between.
// Gated (gate non-null, G (hidden, in) panelled like U; LLaMA's MLP): the hidden tile is act(x G^T + bg) times
// (x U^T + bu), elementwise, and the activation applies to G's sums only.
template <typename V>
int run_ffn(const Panels<V>* gate, const Panels<V>& up, const Panels<V>& down, const float* x, int64_t T,
            int64_t n, const float* bg, const float* bu, const float* bd, float* y, int nthreads, int act,
            const Post& post) {
  const int64_t in = up.in, hidden = up.out, R = up.R;
  // No switch to 32-token tiles as run_panels makes: with 128 tokens on 2 threads, 4 tiles by tile read both
  // weights twice per thread, and were 0-15% slower than 2 tiles in two phases (768 -> 3072 -> 768 at 90%).
  const int64_t ntiles = (n + T - 1) / T, slot = (in + hidden) * T;
  const bool by_tile = ntiles >= TILES_PER_THREAD * nthreads;
  float* s = scratch(static_cast<size_t>((by_tile ? nthreads : ntiles) * slot));
  if (!s) return ENTRY_OUT_OF_MEMORY;
  // Block b of the hidden tile into htile; tmp: (R, T) floats of the thread's, free in this phase.
  const auto hidden_block = [&](int64_t b, const float* xtile, float* htile, float* tmp) {
    float* dst = htile + b * R * T;
    if (!gate) {
      epilogue(dst, T, panel_sums(up, T, b, xtile, bu, dst), T, nullptr, act);
      return;
    }
    const int64_t m = panel_sums(*gate, T, b, xtile, bg, dst) * T;  // the block's rows are contiguous
    epilogue(dst, T, m / T, T, nullptr, act);
    panel_sums(up, T, b, xtile, bu, tmp);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) dst[i] *= tmp[i];
  };
  if (by_tile) {
    parallel_for(ntiles, nthreads, [&](int64_t t, int thread) {
      alignas(64) float buf[MAX_ROWS * 64];
      float* xs = s + thread * slot;  // this thread's packed x tile, then its hidden tile
      float* hs = xs + in * T;
      pack_tile(x, n, in, T, t, xs);
      for (int64_t b = 0; b < up.nblocks(); ++b) hidden_block(b, xs, hs, buf);
      for (int64_t b = 0; b < down.nblocks(); ++b) panel_item(down, T, n, b, t, hs, bd, ACT_NONE, y, buf);
      if (post.kind) post_rows(post, y, down.out, t * T, std::min(n, t * T + T));
    });
    return ENTRY_OK;
  }
  float* xt = s;                      // (ntiles, in, T)
  float* ht = s + ntiles * in * T;  // (ntiles, hidden, T)
  pack_all(x, n, in, T, xt, nthreads);
  parallel_for(up.nblocks() * ntiles, nthreads, [&](int64_t item, int) {
    alignas(64) float buf[MAX_ROWS * 64];
    const int64_t b = item / ntiles, t = item % ntiles;
    hidden_block(b, xt + t * in * T, ht + t * hidden * T, buf);
  });  // every hidden tile is complete
  parallel_for(down.nblocks() * ntiles, nthreads, [&](int64_t item, int) {
    alignas(64) float buf[MAX_ROWS * 64];
    const int64_t b = item / ntiles, t = item % ntiles;
    panel_item(down, T, n, b, t, ht + t * hidden * T, bd, ACT_NONE, y, buf);
  });
  post_all(post, y, down.out, n, nthreads);
  return ENTRY_OK;
}

// The plain CSR and 2:4 kernels. x is packed into one (in, ld) panel (n == 1: x itself is read); ld is the token
// width, plus 16 floats when that is an even number of 64-byte lines: rows of the panel then spread over all
// L1 sets instead of a few (a 1 KiB or 4 KiB stride thrashes them). Work items (row block of ROWS_PER_BLOCK,
// token tile) are handed out dynamically, each block running all its tiles in turn so its weights stay in
// cache; a tile of x, (in, tile) floats, is kept to about L2_PANEL_BYTES.
constexpr int64_t ROWS_PER_BLOCK = 32;  // enough work per hand-out, balanced over 2-64 threads
constexpr int64_t L2_PANEL_BYTES = SPARSE_L2_BYTES / 2;
constexpr int64_t SMALL_PACK_BYTES = 2 * SPARSE_L1D_BYTES;

// The one-token dense kernels read rows of this many bytes or more four at a time on AVX2 (four weight streams in
// flight, each x vector loaded once for the four), shorter rows one after the other: four short streams within a
// page defeat the hardware prefetcher (on an AMD EPYC Zen 3 with the weights in DRAM, rows of a few hundred bytes
// read four at a time ran at about half the speed of one at a time; rows of several KB ran faster four at a time).
constexpr int64_t FOUR_ROWS_MIN_BYTES = 2048;

// One token (run_blocks, run_gemvs): a thread claims runs of consecutive row blocks, about 1 / (STREAM_CLAIMS *
// threads) of the work each, so that its reads stay one long stream. Claims of one block interleave the threads'
// streams block by block, and the prefetcher starts over at every block (a small model's int8 layers, which are
// a few KB per block, decoded slowest that way).
constexpr int64_t STREAM_CLAIMS = 2;
inline int64_t stream_chunk(int64_t items, int nthreads) {
  return std::max<int64_t>(1, items / (STREAM_CLAIMS * std::max(nthreads, 1)));
}

// ---- int8 inputs: x quantized per block of 32 columns, as the weights' int8 kernels can take it ----------
// Flag LINEAR_INT8_INPUT of an int8 weight's entry: each row of x is replaced by its int8 copy before the product,
// block b of XBLOCK columns (the last one shorter) by s_b q with s_b = max|x_b| / 127 and q = round(x / s_b)
// (to nearest even; 0 where s_b is: a zero block). sparse_ops.quantized.quantize_input computes the same in torch,
// bit for bit. At one token the dense and bitmap kernels multiply int8 by int8 (sums exact in int32, scaled per
// block); every other kernel takes the dequantized copy s_b q, the same numbers to fp32 rounding.
constexpr int LINEAR_BITMAP_EXPAND = 1, LINEAR_INT8_INPUT = 2;  // LinearRef::extra of the int8 layouts
constexpr int64_t XBLOCK = 32;

struct QuantX {  // one token's int8 copy: codes (in rounded up to XBLOCK, zero after in), block scales, s_b q
  const int8_t* q; const float* s; const float* deq;
};

// Block [0, len) of x (len <= XBLOCK): its codes, scale and dequantized values.
inline void quantize_block(const float* x, int64_t len, int8_t* q, float* s, float* deq) {
  float amax = 0.0f;
  for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.0f;  // 0 for a zero block (or one so small that its scale underflows)
  *s = scale;
  int64_t i = 0;
#if defined(__AVX2__)
  if (len == XBLOCK && scale > 0.0f) {
    const __m256 sv = _mm256_set1_ps(scale), lim = _mm256_set1_ps(127.0f);
    __m256i c[4];
    for (int j = 0; j < 4; ++j) {
      __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8 * j), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_max_ps(_mm256_min_ps(r, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
      _mm256_storeu_ps(deq + 8 * j, _mm256_mul_ps(r, sv));
      c[j] = _mm256_cvtps_epi32(r);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return;
  }
#endif
  for (; i < len; ++i) {
    const float r = scale > 0.0f ? std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / scale))) : 0.0f;
    q[i] = static_cast<int8_t>(r);
    deq[i] = r * scale;
  }
  for (; i < XBLOCK; ++i) q[i] = 0;
}

// The int8 copies of the n rows of x (n, in): deq (n, in), and the codes and scales of the last row in buffer
// (quant_floats(in) floats: the scales, then the codes), which are the token's at n == 1.
inline int64_t quant_floats(int64_t in) { return (in + XBLOCK - 1) / XBLOCK + 2 + (in + XBLOCK) / 4; }
inline QuantX quantize_x(const float* x, int64_t n, int64_t in, float* deq, float* buffer) {
  const int64_t blocks = (in + XBLOCK - 1) / XBLOCK;
  float* s = buffer;
  int8_t* q = reinterpret_cast<int8_t*>(buffer + blocks + 1);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * XBLOCK;
      quantize_block(x + t * in + c0, std::min(XBLOCK, in - c0), q + c0, s + b, deq + t * in + c0);
    }
  return QuantX{q, s, deq};  // codes and scales: the last row's (used at n == 1)
}

#if defined(__AVX2__) && defined(__FMA__)
// The 8 int32 sums of 4 products each of w and x (32 int8 each, w and x in [-127, 127]): maddubs takes
// unsigned times signed bytes, so |w| times x with w's sign (pairs of products reach 2 * 127^2 < 2^15).
inline __m256i dot32(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
inline __m256i load32i(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
#endif

// sum_b s_b (w[b] . q[b]) over the blocks of [k0, in) of a row w of int8 values (k0 a multiple of XBLOCK)
inline float int8_dot(const int8_t* w, int64_t k0, int64_t in, const QuantX& x) {
  float sum = 0.0f;
  for (int64_t k = k0; k < in; k += XBLOCK) {
    int32_t d = 0;
    for (int64_t j = k; j < std::min(in, k + XBLOCK); ++j) d += static_cast<int32_t>(w[j]) * x.q[j];
    sum += x.s[k / XBLOCK] * static_cast<float>(d);
  }
  return sum;
}

// One token of a dense int8 weight on int8 inputs: y[r] = scale[r] sum_b s_b (q_r[b] . x[b]) + bias[r]; on AVX2
// four rows at a time, a block's 32 products per row in one maddubs.
inline void dense8q_gemv_rows(const int8_t* w, const float* scales, int64_t in, int64_t r0, int64_t r1,
                              const QuantX& x, const float* bias, float* y) {
  const int64_t full = in / XBLOCK * XBLOCK;
  auto finish = [&](int64_t row, float sum) { y[row] = sum * scales[row] + (bias ? bias[row] : 0.0f); };
  int64_t r = r0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; r + 4 <= r1 && in >= FOUR_ROWS_MIN_BYTES; r += 4) {
    const int8_t* wr = w + r * in;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < full; k += XBLOCK) {
      const __m256i xv = load32i(x.q + k);
      const __m256 s = _mm256_set1_ps(x.s[k / XBLOCK]);
      for (int i = 0; i < 4; ++i)
        a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(load32i(wr + i * in + k), xv)), s, a[i]);
    }
    for (int i = 0; i < 4; ++i) finish(r + i, hsum8(a[i]) + int8_dot(wr + i * in, full, in, x));
  }
  for (; r < r1; ++r) {
    const int8_t* wr = w + r * in;
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += XBLOCK) {
      if (k % 64 == 0) prefetch_ahead(wr + k);
      a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(load32i(wr + k), load32i(x.q + k))), _mm256_set1_ps(x.s[k / XBLOCK]), a);
    }
    finish(r, hsum8(a) + int8_dot(wr, full, in, x));
  }
#endif
  for (; r < r1; ++r) finish(r, int8_dot(w + r * in, 0, in, x));
}

template <typename B, typename = void>
struct takes_int8_input : std::false_type {};  // whether a body's gemv multiplies int8 by int8 (its qx)
template <typename B>
struct takes_int8_input<B, std::void_t<decltype(std::declval<B&>().qx)>> : std::true_type {};

// int8_input: x replaced by its int8 copy first (LINEAR_INT8_INPUT; int8 weights' bodies).
template <typename Body>
int run_blocks(Body body, int64_t out, int64_t in, const float* x, int64_t n, int nthreads, const Post& post,
               bool int8_input = false) {
  QuantX quant{};
  if (int8_input) {
    float* deq = scratch(static_cast<size_t>(n * in + quant_floats(in)), 1);
    if (!deq) return ENTRY_OUT_OF_MEMORY;
    quant = quantize_x(x, n, in, deq, deq + n * in);
    x = deq;
    if constexpr (takes_int8_input<Body>::value)
      if (n == 1) body.qx = &quant;
  }
  const int64_t width = token_width(n);
  body.ld = width >= 32 && (width / 16) % 2 == 0 ? width + 16 : width;
  int64_t tile = 16;
  while (tile < MAX_TILE && in * (2 * tile) * 4 <= L2_PANEL_BYTES) tile *= 2;
  if (width == 8) tile = 8;
  float* xt = width == 1 ? nullptr : scratch(static_cast<size_t>(in * body.ld));
  if (width > 1 && !xt) return ENTRY_OUT_OF_MEMORY;
  body.xt = width == 1 ? x : xt;
  const int64_t nblocks = (out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  const int64_t ntiles = width == 1 ? 1 : (width + tile - 1) / tile;
  // A small x is packed by the caller alone: handing it out cost more than the packing.
  const bool pack_first = width > 1 && in * body.ld * 4 <= SMALL_PACK_BYTES;
  if (pack_first)
    for (int64_t c0 = 0; c0 < in; c0 += 16) pack_block(x, n, in, body.ld, 0, c0, std::min(in, c0 + 16), xt);
  if (width > 1 && !pack_first) pack_all(x, n, in, body.ld, xt, nthreads);
  parallel_for(nblocks * ntiles, nthreads, [&](int64_t item, int) {
    const int64_t r0 = item / ntiles * ROWS_PER_BLOCK, r1 = std::min(out, r0 + ROWS_PER_BLOCK);
    if (width == 1) {
      body.gemv(r0, r1);  // bias added
      if (body.act) epilogue(body.y + r0, 0, 1, r1 - r0, nullptr, body.act);
      return;
    }
    alignas(64) float buf[MAX_ROWS * TILE_STRIDE];  // the block's sums
    one_tile(body, r0, r1, n, item % ntiles * tile, tile, buf);
  }, width == 1 ? stream_chunk(nblocks, nthreads) : 1);
  post_all(post, body.y, out, n, nthreads);
  return ENTRY_OK;
}

// ---- Mixture-of-Experts: every expert's FFN over its sorted tokens in one call -----------------------------
//
// Weights batched as the MoE layer stores them: w_in, w_gate (E, H, D), w_out (E, D, H) row-major, biases
// (E, H) / (E, D) or null. xs (A, D): the kept (token, expert) assignments sorted by expert, expert e's at rows
// [off[e], off[e + 1]). ys (A, D) = expert e's FFN of each row: act(x W_in^T + b_in) W_out^T + b_out, or gated
// (act(x W_gate^T + b_gate) * (x W_in^T + b_in)) W_out^T + b_out. Made for small batches (a few tokens per
// expert, where the layer is bound by reading the experts' weights): each expert's tokens are packed once into
// (D, ld) and its weight rows read once per token tile, by the same register-blocked loops as the CSR kernels
// with every column present. Three phases over all experts at once (pack, hidden, output), each complete
// before the next.

// Sums of dense rows [r0, r1) of w (rows, in) over one token tile into buf (rows - r0, T) (see csr_rows_tile).
template <typename V, int W, int NV, int S>
void dense_rows_tile(const V* w, int64_t in, int64_t r0, int64_t r1, const float* xt, int64_t ld,
                     int64_t t0, float* buf) {
  typedef typename Vec<W>::type vec;
  const float* xb = xt + t0;
  for (int64_t r = r0; r < r1; ++r) {
    const V* wr = w + r * in;
    vec acc[S][NV];
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[s][j] = vec{};
    int64_t k = 0;
    for (; k + S <= in; k += S)
      for (int s = 0; s < S; ++s) {
        const float v = load_value(wr, k + s);
        const float* xp = xb + (k + s) * ld;
        for (int j = 0; j < NV; ++j) acc[s][j] += v * load_vec<W>(xp + j * W);
      }
    for (; k < in; ++k)
      for (int j = 0; j < NV; ++j) acc[0][j] += load_value(wr, k) * load_vec<W>(xb + k * ld + j * W);
    for (int s = 1; s < S; ++s)
      for (int j = 0; j < NV; ++j) acc[0][j] += acc[s][j];
    store_row<W, NV>(acc[0], r - r0, buf);
  }
}

// One token of a dense weight: y[r] = w[r] . x * scale[r] + bias[r] (scales: int8 weights' rows, else NULL),
// four chains of vectors; on AVX2 rows of FOUR_ROWS_MIN_BYTES or more four at a time.
template <typename V>
void dense_gemv_rows(const V* w, int64_t in, int64_t r0, int64_t r1, const float* x, const float* bias, float* y,
                     const float* scales = nullptr) {
  int64_t r = r0;
  auto finish = [&](int64_t row, float sum) { y[row] = sum * (scales ? scales[row] : 1.0f) + (bias ? bias[row] : 0.0f); };
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  for (; r + 4 <= r1 && in % 8 == 0 && in * static_cast<int64_t>(sizeof(V)) >= FOUR_ROWS_MIN_BYTES; r += 4) {
    const V* wr = w + r * in;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < in; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(load8(wr + i * in + k), xv, a[i]);
    }
    for (int i = 0; i < 4; ++i) finish(r + i, hsum8(a[i]));
  }
#endif
  for (; r < r1; ++r) {
    const V* wr = w + r * in;
    int64_t k = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 64 <= in; k += 64) {
      prefetch_ahead<64 * sizeof(V)>(wr + k);
      for (int c = 0; c < 4; ++c) a[c] = _mm512_fmadd_ps(load16(wr + k + 16 * c), _mm512_loadu_ps(x + k + 16 * c), a[c]);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 32 <= in; k += 32) {
      prefetch_ahead<32 * sizeof(V)>(wr + k);
      for (int c = 0; c < 4; ++c) a[c] = _mm256_fmadd_ps(load8(wr + k + 8 * c), _mm256_loadu_ps(x + k + 8 * c), a[c]);
    }
    sum = hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
#endif
    for (; k < in; ++k) sum += load_value(wr, k) * x[k];
    finish(r, sum);
  }
}

// A dense weight (rows, in) of fp32 or bf16: the MoE experts' loops, and run_blocks' body for dense layers.
template <typename V>
struct DenseBody {  // y / out / bias / act: where flush_rows writes
  const V* w; int64_t in; const float* bias; float* y; int64_t out; int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    dense_rows_tile<V, W, NV, S>(w, in, r0, r1, xt, ld, t0, buf);
  }
  void gemv(int64_t r0, int64_t r1) const { dense_gemv_rows<V>(w, in, r0, r1, xt, bias, y); }
};

// ---- CSR with a column mask: one token without gathers ------------------------------------------------------
// The CSR's row pointers and values (row-major, columns ascending) with, in place of the column indices, a bit per
// column: mask (out, ceil(in / 8)) uint8, bit b of byte j of row r set where (r, 8 j + b) is stored. At one token
// each byte of a row places its popcount values in 8 lanes with one permute and one blend (place8: PERMUTE_LUT's
// index vector for the byte) and multiplies them with x[8 j : 8 j + 8] in one FMA: a row reads its values and in / 8 mask bytes, with
// no gather (CSR's one-token kernel is bound by its gathers). Built from a CSR weight where the plan's one-token
// variant "mask" chose it (ours_cpu.masked); more tokens walk the bits (what a prompt runs in the decoder step).
#if defined(__AVX2__) && defined(__FMA__)
struct PermuteLut {  // per byte m: the lane of each set bit's value among the packed ones; -1 (sign set) at clear bits
  alignas(32) int32_t idx[256][8];
  constexpr PermuteLut() : idx() {
    for (int m = 0; m < 256; ++m)
      for (int b = 0, k = 0; b < 8; ++b) idx[m][b] = (m >> b) & 1 ? k++ : -1;
  }
};

constexpr PermuteLut PERMUTE_LUT{};

// The 8 columns of mask byte m from the packed values v: the permute places them, the index's sign zeroes the rest.
inline __m256 place8(__m256 v, unsigned m) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(PERMUTE_LUT.idx[m]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(v, idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

// 8 values from p as fp32, none read at or past end (the last row's last values)
template <typename V>
inline __m256 load8_before(const V* p, const V* end) {
  if (end - p >= 8) return load8(p);
  V tail[8] = {};
  std::memcpy(tail, p, static_cast<size_t>(end - p) * sizeof(V));
  return load8(tail);
}
#endif

template <typename V>
struct CsrMaskBody {
  const int32_t* rowptr; const uint8_t* mask; const V* val; int64_t in; const float* bias; float* y; int64_t out;
  int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks

  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    typedef typename Vec<W>::type vec;
    const int64_t bytes = (in + 7) / 8;
    for (int64_t r = r0; r < r1; ++r) {
      vec acc[NV];
      for (int j = 0; j < NV; ++j) acc[j] = vec{};
      const V* p = val + rowptr[r];
      const uint8_t* m = mask + r * bytes;
      for (int64_t j = 0; j < bytes; ++j)
        for (unsigned bits = m[j]; bits; bits &= bits - 1) {
          const float v = load_value(p++, 0);
          const float* xp = xt + t0 + (8 * j + __builtin_ctz(bits)) * ld;
          for (int q = 0; q < NV; ++q) acc[q] += v * load_vec<W>(xp + q * W);
        }
      store_row<W, NV>(acc, r - r0, buf);
    }
  }

  void gemv(int64_t r0, int64_t r1) const {
    const int64_t bytes = (in + 7) / 8, full = in / 8;
    const float* x = xt;
    for (int64_t r = r0; r < r1; ++r) {
      const V* p = val + rowptr[r];
      const uint8_t* m = mask + r * bytes;
      float sum = 0.0f;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const V* end = val + rowptr[out];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      const auto pair = [&](auto load) {  // two mask bytes: 16 columns
        const unsigned m0 = m[j], m1 = m[j + 1];
        const __m256 v0 = place8(load(p), m0);
        p += __builtin_popcount(m0);
        const __m256 v1 = place8(load(p), m1);
        p += __builtin_popcount(m1);
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + 8 * j), a0);
        a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + 8 * j + 8), a1);
      };
      if (end - (val + rowptr[r + 1]) >= 8) {  // every 8-value load of the row stays before end: no checks
        for (; j + 2 <= full; j += 2) pair([](const V* q) { return load8(q); });
      } else {
        for (; j + 2 <= full; j += 2) pair([end](const V* q) { return load8_before(q, end); });
      }
      sum = hsum8(_mm256_add_ps(a0, a1));
#endif
      for (; j < bytes; ++j)
        for (unsigned bits = m[j]; bits; bits &= bits - 1) sum += load_value(p++, 0) * x[8 * j + __builtin_ctz(bits)];
      y[r] = sum + (bias ? bias[r] : 0.0f);
    }
  }
};

// ---- int8 weights: symmetric int8 values, one fp32 scale per output row -----------------------------------
// Weight-only: the values are widened to fp32 in registers and multiplied with the fp32 x; a row's scale is
// applied once to its sum (sum_k (s q_k) x_k = s sum_k q_k x_k). Layouts (sparse_ops/quantized.py):
//   csr     rowptr (out+1,) int32, col (nnz,) int16|int32, val (nnz,) int8   (the CSR above, int8 values)
//   bitmap  32 x 64 tiles, the GPU's tiled bitmap (sparse_ops/bitmap.py): tile_ptr (ceil(out/32)+1,) int32,
//           tile_cols (T,) int32, offsets (T+1,) int32, bitmaps (T, 32, 2) uint32 (bit b of word (i, j): entry
//           (i, 32 j + b) of the tile), val (nnz,) int8 row-major within each tile
//   dense   val (out, in) int8
//   scales  (out,) fp32

// buf[i, :m] *= scale[i] for the block's rows i < nrows (the tile kernels' sums before flush_rows).
inline void scale_rows(float* buf, const float* scale, int64_t nrows, int64_t m) {
  for (int64_t i = 0; i < nrows; ++i) {
    float* v = buf + i * TILE_STRIDE;
    const float s = scale[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) v[j] *= s;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256i cols8(const int16_t* c) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
inline __m256i cols8(const int32_t* c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)); }
#endif

// One token of an int8 CSR weight: y[r] = scale[r] * sum_k q_k x[col_k] + bias[r].
template <typename I>
void csr8_gemv_rows(const int32_t* rowptr, const I* col, const int8_t* val, const float* scales, int64_t r0,
                    int64_t r1, const float* x, const float* bias, float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= e; k += 16) {
      a0 = _mm256_fmadd_ps(load8(val + k), _mm256_i32gather_ps(x, cols8(col + k), 4), a0);
      a1 = _mm256_fmadd_ps(load8(val + k + 8), _mm256_i32gather_ps(x, cols8(col + k + 8), 4), a1);
    }
    sum = hsum8(_mm256_add_ps(a0, a1));
#endif
    y[r] = (sum + sparse_dot(col, val, k, e, x)) * scales[r] + (bias ? bias[r] : 0.0f);
  }
}

template <typename I>
struct Csr8Body {
  const int32_t* rowptr; const I* col; const int8_t* val; const float* scales; const float* bias; float* y;
  int64_t out; int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    csr_rows_tile<int8_t, I, W, NV, S>(rowptr, col, val, r0, r1, xt, ld, t0, buf);
    scale_rows(buf, scales + r0, r1 - r0, W * NV);
  }
  void gemv(int64_t r0, int64_t r1) const { csr8_gemv_rows<I>(rowptr, col, val, scales, r0, r1, xt, bias, y); }
};

struct Dense8Body {
  const int8_t* w; const float* scales; int64_t in; const float* bias; float* y; int64_t out; int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  const QuantX* qx = nullptr;  // one token's int8 copy (LINEAR_INT8_INPUT), set by run_blocks
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    dense_rows_tile<int8_t, W, NV, S>(w, in, r0, r1, xt, ld, t0, buf);
    scale_rows(buf, scales + r0, r1 - r0, W * NV);
  }
  void gemv(int64_t r0, int64_t r1) const {
    if (qx) dense8q_gemv_rows(w, scales, in, r0, r1, *qx, bias, y);
    else dense_gemv_rows<int8_t>(w, in, r0, r1, xt, bias, y, scales);
  }
};

// Bitmap tiles: run_blocks hands out blocks of ROWS_PER_BLOCK rows, which are the tile rows.
constexpr int64_t BITMAP_TILE_OUT = 32, BITMAP_TILE_K = 64;
static_assert(ROWS_PER_BLOCK == BITMAP_TILE_OUT, "a row block of run_blocks must be one tile row");

// sum over the set bits b of m of q * x[b], q the next values at p (advanced past them)
inline float bits_dot(uint32_t m, const int8_t*& p, const float* x) {
  float s = 0.0f;
  for (; m; m &= m - 1) s += static_cast<float>(*p++) * x[__builtin_ctz(m)];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
struct ByteLanes {  // v[m]: 0xFF in byte b of the word where bit b of m is set
  uint64_t v[256];
  constexpr ByteLanes() : v() {
    for (int m = 0; m < 256; ++m)
      for (int b = 0; b < 8; ++b)
        if ((m >> b) & 1) v[m] |= 0xFFull << (8 * b);
  }
};
constexpr ByteLanes BYTE_LANES{};

// The 8 columns of one byte mb of a bitmap word as 8 int8 lanes (zeros where a bit is clear): the values of 8
// columns are contiguous, so one pdep places them. Advances p past them; reads up to 7 bytes past them but never
// past `end` (the last value of the weight).
inline uint64_t expand_byte(unsigned mb, const int8_t*& p, const int8_t* end) {
  uint64_t raw = 0;
  if (end - p >= 8) std::memcpy(&raw, p, 8);  // a constant size: one load (a variable one calls memcpy)
  else std::memcpy(&raw, p, end - p);
  p += __builtin_popcount(mb);
  return _pdep_u64(raw, BYTE_LANES.v[mb]);
}

// acc += the 32 columns of one bitmap word expanded to dense fp32 times x[0:32] (a dense FMA per byte).
inline __m256 expand_dot(uint32_t m, const int8_t*& p, const int8_t* end, const float* x, __m256 acc) {
  for (int b = 0; b < 4; ++b, m >>= 8) {
    const uint64_t q = expand_byte(m & 0xFF, p, end);
    const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(q))));
    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * b), acc);
  }
  return acc;
}

// The 32 columns of one bitmap word as 32 int8 lanes (the int8 inputs' path: dot32 against a block of codes).
inline __m256i expand_word(uint32_t m, const int8_t*& p, const int8_t* end) {
  const uint64_t q0 = expand_byte(m & 0xFF, p, end), q1 = expand_byte((m >> 8) & 0xFF, p, end);
  const uint64_t q2 = expand_byte((m >> 16) & 0xFF, p, end), q3 = expand_byte(m >> 24, p, end);
  return _mm256_set_epi64x(static_cast<int64_t>(q3), static_cast<int64_t>(q2), static_cast<int64_t>(q1),
                           static_cast<int64_t>(q0));
}
#endif

struct Bitmap8Body {
  const int32_t* tile_ptr; const int32_t* tile_cols; const int32_t* offsets; const uint32_t* bitmaps;
  const int8_t* val; const float* scales; int64_t in; bool expand; const float* bias; float* y; int64_t out;
  int act;
  const float* xt = nullptr; int64_t ld = 0;  // set by run_blocks
  const QuantX* qx = nullptr;  // one token's int8 copy (LINEAR_INT8_INPUT), set by run_blocks

  // Rows [r0, r1) of tile row r0 / 32 over one token tile: each stored value q at column c adds q * xt[c, t0:]
  // to its row's sums in buf (the CSR tile kernel's loop, columns from the set bits).
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    typedef typename Vec<W>::type vec;
    const int64_t tr = r0 / BITMAP_TILE_OUT, nrows = r1 - r0;
    for (int64_t i = 0; i < nrows; ++i) std::fill(buf + i * TILE_STRIDE, buf + i * TILE_STRIDE + W * NV, 0.0f);
    for (int64_t t = tile_ptr[tr]; t < tile_ptr[tr + 1]; ++t) {
      const float* xc = xt + t0 + tile_cols[t] * BITMAP_TILE_K * ld;
      const int8_t* p = val + offsets[t];
      const uint32_t* bm = bitmaps + t * BITMAP_TILE_OUT * 2;
      for (int64_t i = 0; i < nrows; ++i) {
        if (!(bm[2 * i] | bm[2 * i + 1])) continue;
        vec acc[NV];
        for (int j = 0; j < NV; ++j) acc[j] = load_vec<W>(buf + i * TILE_STRIDE + j * W);
        for (int h = 0; h < 2; ++h)
          for (uint32_t m = bm[2 * i + h]; m; m &= m - 1) {
            const float v = static_cast<float>(*p++);
            const float* xp = xc + (32 * h + __builtin_ctz(m)) * ld;
            for (int j = 0; j < NV; ++j) acc[j] += v * load_vec<W>(xp + j * W);
          }
        std::memcpy(buf + i * TILE_STRIDE, acc, sizeof(acc));
      }
    }
    scale_rows(buf, scales + r0, nrows, W * NV);
  }

  // One token: per (tile, row) the row's two words, expanded (dense enough weights, x86 with BMI2) or walked
  // bit by bit; a tile reaching past `in` is always walked (an expanded word reads x[0:32] whole). With int8
  // inputs an expanded word is one block of codes (a tile's 64 columns are two blocks); walked bits read the
  // dequantized copy (xt).
  void gemv(int64_t r0, int64_t r1) const {
    const int64_t tr = r0 / BITMAP_TILE_OUT, nrows = r1 - r0;
    const float* x = xt;
    float sums[BITMAP_TILE_OUT] = {};
#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
    __m256 acc[BITMAP_TILE_OUT];
    for (int64_t i = 0; i < nrows; ++i) acc[i] = _mm256_setzero_ps();
    const int8_t* end = val + offsets[tile_ptr[out / BITMAP_TILE_OUT + (out % BITMAP_TILE_OUT != 0)]];
#endif
    for (int64_t t = tile_ptr[tr]; t < tile_ptr[tr + 1]; ++t) {
      const int64_t c0 = tile_cols[t] * BITMAP_TILE_K;
      const float* xc = x + c0;
      const int8_t* p = val + offsets[t];
      const uint32_t* bm = bitmaps + t * BITMAP_TILE_OUT * 2;
#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
      if (expand && c0 + BITMAP_TILE_K <= in && qx) {
        const __m256i x0 = load32i(qx->q + c0), x1 = load32i(qx->q + c0 + XBLOCK);
        const __m256 s0 = _mm256_set1_ps(qx->s[c0 / XBLOCK]), s1 = _mm256_set1_ps(qx->s[c0 / XBLOCK + 1]);
        for (int64_t i = 0; i < nrows; ++i) {
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(expand_word(bm[2 * i], p, end), x0)), s0, acc[i]);
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(expand_word(bm[2 * i + 1], p, end), x1)), s1, acc[i]);
        }
        continue;
      }
      if (expand && c0 + BITMAP_TILE_K <= in) {
        for (int64_t i = 0; i < nrows; ++i)
          acc[i] = expand_dot(bm[2 * i + 1], p, end, xc + 32, expand_dot(bm[2 * i], p, end, xc, acc[i]));
        continue;
      }
#endif
      for (int64_t i = 0; i < nrows; ++i) {
        sums[i] += bits_dot(bm[2 * i], p, xc);
        sums[i] += bits_dot(bm[2 * i + 1], p, xc + 32);
      }
    }
    for (int64_t i = 0; i < nrows; ++i) {
      float s = sums[i];
#if defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
      s += hsum8(acc[i]);
#endif
      y[r0 + i] = s * scales[r0 + i] + (bias ? bias[r0 + i] : 0.0f);
    }
  }
};

struct ExpertSlot {  // expert e's tokens: rows [start, start + m) of xs, packed x at xt (D, ld), hidden at ht
  int64_t e, start, m, ld, tile; float* xt; float* ht;
};

// An expert with at most DOT_TOKENS tokens runs as dot products of weight rows with token rows instead (x not
// packed, hidden (m, H) row-major): with tokens in vector lanes one token used 1 lane of 8 and the loop was
// bound by one broadcast load per weight (a 768 -> 1536 -> 768 expert at 1 token: 0.66x of the dense FFN
// with the same weight bytes; avx512 build, AMD EPYC Zen 4).
constexpr int64_t DOT_TOKENS = 4;

// out[t * ostride] = w_row . x[t * xstride : + in] for t < M.
template <int M>
inline void dense_dots(const float* wr, const float* x, int64_t xstride, int64_t in, float* out, int64_t ostride) {
  typedef Vec<VW>::type vec;
  vec acc[M][2];
  for (int t = 0; t < M; ++t) acc[t][0] = acc[t][1] = vec{};
  int64_t k = 0;
  for (; k + 2 * VW <= in; k += 2 * VW) {
    const vec w0 = load_vec<VW>(wr + k), w1 = load_vec<VW>(wr + k + VW);
    for (int t = 0; t < M; ++t) {
      acc[t][0] += w0 * load_vec<VW>(x + t * xstride + k);
      acc[t][1] += w1 * load_vec<VW>(x + t * xstride + k + VW);
    }
  }
  for (int t = 0; t < M; ++t) {
    const vec a = acc[t][0] + acc[t][1];
    float sum = 0.0f;
    for (int l = 0; l < VW; ++l) sum += a[l];
    for (int64_t kk = k; kk < in; ++kk) sum += wr[kk] * x[t * xstride + kk];
    out[t * ostride] = sum;
  }
}

// buf[(r - r0) * TILE_STRIDE + t] = w[r] . x[t] for rows [r0, r1) and the m <= DOT_TOKENS tokens of x (m, in).
inline void dense_dot_rows(const float* w, int64_t in, int64_t r0, int64_t r1, const float* x, int64_t m,
                           float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    float* o = buf + (r - r0) * TILE_STRIDE;
    switch (m) {
      case 1: dense_dots<1>(w + r * in, x, in, in, o, 1); break;
      case 2: dense_dots<2>(w + r * in, x, in, in, o, 1); break;
      case 3: dense_dots<3>(w + r * in, x, in, in, o, 1); break;
      default: dense_dots<4>(w + r * in, x, in, in, o, 1); break;
    }
  }
}

int run_experts(const float* w_in, const float* b_in, const float* w_gate, const float* b_gate, const float* w_out,
                const float* b_out, int64_t E, int64_t D, int64_t H, const int64_t* off, const float* xs, float* ys,
                int nthreads, int act) {
  std::vector<ExpertSlot> slots;
  size_t floats = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = off[e + 1] - off[e];
    if (m <= 0) continue;
    // dot experts need only ld >= m (their hidden rows); the others are packed token_width(m) wide
    const int64_t width = token_width(m), tile = m <= DOT_TOKENS ? m : std::min<int64_t>(width, MAX_TILE);
    slots.push_back({e, off[e], m, width, tile, nullptr, nullptr});
    floats += static_cast<size_t>((D + H) * width);
  }
  if (slots.empty()) return ENTRY_OK;
  float* s = scratch(floats);
  if (!s) return ENTRY_OUT_OF_MEMORY;
  for (auto& slot : slots) {
    slot.xt = s;
    slot.ht = s + D * slot.ld;
    s += (D + H) * slot.ld;
  }
  // work items: (slot, row block, token tile) of the hidden phase (H rows) and of the output phase (D rows)
  const auto items = [&](int64_t rows) {
    std::vector<int64_t> begin{0};  // slot i's items are [begin[i], begin[i + 1])
    for (const auto& slot : slots)
      begin.push_back(begin.back() + (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK * ((slot.m + slot.tile - 1) / slot.tile));
    return begin;
  };
  const std::vector<int64_t> hid = items(H), outs = items(D);
  const auto locate = [&](const std::vector<int64_t>& begin, int64_t item, int64_t& i, int64_t& rblock, int64_t& t) {
    i = std::upper_bound(begin.begin(), begin.end(), item) - begin.begin() - 1;
    const int64_t local = item - begin[i], ntiles = (slots[i].m + slots[i].tile - 1) / slots[i].tile;
    rblock = local / ntiles;
    t = local % ntiles;
  };
  const int64_t nslots = static_cast<int64_t>(slots.size()), cblocks = (D + 15) / 16;
  parallel_for(nslots * cblocks, nthreads, [&](int64_t item, int) {  // pack each expert's tokens into (D, ld)
    const ExpertSlot& slot = slots[item / cblocks];
    const int64_t c0 = item % cblocks * 16;
    if (slot.m > DOT_TOKENS) pack_block(xs + slot.start * D, slot.m, D, slot.ld, 0, c0, std::min(D, c0 + 16), slot.xt);
  });
  parallel_for(hid.back(), nthreads, [&](int64_t item, int) {  // hidden: ht[r, j] = act(...) for the tile's tokens
    alignas(64) float buf[MAX_ROWS * TILE_STRIDE];
    alignas(64) float gbuf[MAX_ROWS * TILE_STRIDE];
    int64_t i, rb, t;
    locate(hid, item, i, rb, t);
    const ExpertSlot& slot = slots[i];
    const int64_t r0 = rb * ROWS_PER_BLOCK, r1 = std::min(H, r0 + ROWS_PER_BLOCK), t0 = t * slot.tile;
    const int64_t n = slot.m, tw = std::min(slot.tile, slot.ld - t0);
    const float* bi = b_in ? b_in + slot.e * H : nullptr;
    const bool dot = n <= DOT_TOKENS;
    const float* xrows = xs + slot.start * D;
    const auto sums = [&](const float* w, float* dst) {  // (r1 - r0, tw) sums of the expert's rows of w
      if (dot) dense_dot_rows(w + slot.e * H * D, D, r0, r1, xrows, n, dst);
      else dispatch_tile(DenseBody<float>{w + slot.e * H * D, D, nullptr, nullptr, 0, 0, slot.xt, slot.ld}, r0, r1, n,
                         t0, slot.tile, dst);
    };
    sums(w_in, buf);
    epilogue(buf, TILE_STRIDE, r1 - r0, tw, bi ? bi + r0 : nullptr, w_gate ? ACT_NONE : act);
    if (w_gate) {
      const float* bg = b_gate ? b_gate + slot.e * H : nullptr;
      sums(w_gate, gbuf);
      epilogue(gbuf, TILE_STRIDE, r1 - r0, tw, bg ? bg + r0 : nullptr, act);
      for (int64_t r = 0; r < r1 - r0; ++r)
#pragma omp simd
        for (int64_t j = 0; j < tw; ++j) buf[r * TILE_STRIDE + j] *= gbuf[r * TILE_STRIDE + j];
    }
    if (dot) {  // hidden (m, H) row-major, the output phase's dot products read its rows
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < n; ++j) slot.ht[j * H + r] = buf[(r - r0) * TILE_STRIDE + j];
    } else {
      for (int64_t r = r0; r < r1; ++r)  // padding tokens hold act(bias): the output phase never reads past m
        std::memcpy(slot.ht + r * slot.ld + t0, buf + (r - r0) * TILE_STRIDE, tw * sizeof(float));
    }
  });  // every hidden tile is complete
  parallel_for(outs.back(), nthreads, [&](int64_t item, int) {  // output: ys rows of the expert's tokens
    alignas(64) float buf[MAX_ROWS * TILE_STRIDE];
    int64_t i, rb, t;
    locate(outs, item, i, rb, t);
    const ExpertSlot& slot = slots[i];
    const int64_t r0 = rb * ROWS_PER_BLOCK, r1 = std::min(D, r0 + ROWS_PER_BLOCK), t0 = t * slot.tile;
    const DenseBody<float> down{w_out + slot.e * D * H, H, b_out ? b_out + slot.e * D : nullptr, ys + slot.start * D, D,
                         ACT_NONE, slot.ht, slot.ld};
    if (slot.m <= DOT_TOKENS) dense_dot_rows(down.w, H, r0, r1, slot.ht, slot.m, buf);
    else dispatch_tile(down, r0, r1, slot.m, t0, slot.tile, buf);
    flush_rows(buf, TILE_STRIDE, r0, r1 - r0, t0, std::min(slot.tile, slot.m - t0), down.bias, ACT_NONE, down.y,
               down.out);
  });
  return ENTRY_OK;
}

// The whole layer after the router's matmul. logits (T, E) -> per token the top K experts of the softmax (ties:
// the lower index), weights renormalised over them (Mixtral); assignments counting-sorted by expert, token order
// kept within an expert, at most `capacity` per expert (< 0: all; later tokens dropped); x rows gathered, the
// experts run (run_experts), y (T, D) = sum over a token's kept assignments of weight * expert output.
// routed (E,) int64: assignments sent to each expert before capacity. Scratch: the caller's work buffer
// (xs and ys, A * D floats each) is allocated here, the packed tiles in the thread's scratch.
int run_moe(const float* logits, const float* x, int64_t T, int64_t K, int64_t capacity, const float* w_in,
            const float* b_in, const float* w_gate, const float* b_gate, const float* w_out, const float* b_out,
            int64_t E, int64_t D, int64_t H, float* y, int64_t* routed, int nthreads, int act) {
  std::vector<int64_t> expert(T * K), kept(E + 1, 0), slot_of(T * K, -1);
  std::vector<float> weight(T * K);
  std::vector<float> p(E);
  std::vector<int64_t> order(E);
  std::fill(routed, routed + E, 0);
  for (int64_t t = 0; t < T; ++t) {  // softmax, top K, renormalise
    const float* l = logits + t * E;
    const float mx = *std::max_element(l, l + E);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float top = 0.0f;
    for (int64_t k = 0; k < K; ++k) top += p[order[k]] / sum;
    for (int64_t k = 0; k < K; ++k) {
      expert[t * K + k] = order[k];
      weight[t * K + k] = p[order[k]] / sum / top;
      ++routed[order[k]];
    }
  }
  for (int64_t e = 0; e < E; ++e) kept[e + 1] = kept[e] + (capacity < 0 ? routed[e] : std::min(routed[e], capacity));
  std::vector<int64_t> fill(kept.begin(), kept.end() - 1), token(kept[E]);
  for (int64_t a = 0; a < T * K; ++a) {  // token-major order: within an expert, tokens stay in order
    const int64_t e = expert[a];
    if (fill[e] < kept[e + 1]) {
      slot_of[a] = fill[e];
      token[fill[e]++] = a / K;
    }
  }
  const int64_t A = kept[E];
  std::vector<float> xs(A * D), ys(A * D);
  for (int64_t i = 0; i < A; ++i) std::memcpy(&xs[i * D], x + token[i] * D, D * sizeof(float));
  const int status = run_experts(w_in, b_in, w_gate, b_gate, w_out, b_out, E, D, H, kept.data(), xs.data(),
                                 ys.data(), nthreads, act);
  if (status != ENTRY_OK) return status;
  for (int64_t t = 0; t < T; ++t) {  // combine: in the order of the token's choices
    float* yt = y + t * D;
    std::fill(yt, yt + D, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = slot_of[t * K + k];
      if (i < 0) continue;  // dropped for capacity
      const float w = weight[t * K + k];
      const float* src = &ys[i * D];
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) yt[c] += w * src[c];
    }
  }
  return ENTRY_OK;
}

// ---- attention: out = softmax(q k^T * scale + mask) v, every (batch, head) in one call --------------------
//
// For the short sequences of encoders and prefill (L up to a few thousand): a query block's scores are
// materialised (QB x L floats), not streamed as in flash attention. q (B, H, S, D), k and v (B, Hk, L, D) with
// any strides but a contiguous last dimension (the head split of a linear's output is a view); query head h
// reads key / value head h / (H / Hk) (grouped-query attention). mask: NULL, additive fp32 or keep-bytes (1:
// attend) with element strides (0 along a broadcast dimension), last dimension contiguous. causal: query i
// sees keys j <= i + L - S. out (B, S, H, D) contiguous: the layout the output projection reads. A row that
// sees no key (masked entirely) is zero.
// Items (b, h, block of QB queries), each thread a run of them: the key head transposed into kt (D, Lp) when
// it changes (Lp = L rounded up to VW, zero columns), the block's queries into (D, QB); scores by
// broadcast-FMA over d (RB rows x 2 vectors of keys in registers, 1 at the end), scaled and masked; the row softmax
// (exp_fast); P v with the rows' outputs in registers, scaled by 1 / sum.
struct AttnArgs {
  const float *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];  // strides of dims 0-2 (batch, head, position)
  const void* mask;
  int mask_kind;  // MaskKind
  int64_t ms[3];  // mask strides of (batch, head, query)
  int64_t B, H, Hk, S, L, D;
  float scale;
  int causal;
  float* out;
};
enum MaskKind { MASK_NONE = 0, MASK_ADDITIVE = 1, MASK_KEEP = 2 };  // fp32 added to the scores; bytes, 1: attend
constexpr int ATTN_QB = 32;  // query rows per item
// Accumulator vectors a register block may hold: 16 registers on AVX2 and NEON's 32 of 4 floats, 32 on AVX-512.
constexpr int ATTN_ACC = VW == 16 ? 24 : 12;
constexpr int ATTN_RB = ATTN_ACC / 2 >= 8 ? 8 : 4;  // query rows per register block of the scores

// s[r * ld + j .. + NK VW) = scale * sum_d qt[d * QB + r] kt[d * ld + j ..] for RB rows: one strip of NK vectors
// of keys; qt: the item's queries transposed, so that the RB broadcasts per d read one line.
template <int RB, int NK>
inline void attn_scores(const float* qt, const float* kt, int64_t ld, int64_t D, float scale, int64_t j, float* s) {
  typedef Vec<VW>::type V;
  V acc[RB][NK];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NK; ++c) acc[r][c] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V kv[NK];
    for (int c = 0; c < NK; ++c) kv[c] = load_vec<VW>(kt + d * ld + j + c * VW);
    const float* qd = qt + d * ATTN_QB;
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < NK; ++c) acc[r][c] += qd[r] * kv[c];
  }
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < NK; ++c) acc[r][c] *= scale;
    std::memcpy(s + r * ld + j, acc[r], NK * VW * sizeof(float));
  }
}

// The scores of rows 0 .. nr for the strip at j (NK vectors): register blocks of ATTN_RB, then single rows.
template <int NK>
inline void attn_score_rows(const float* qt, const float* kt, int64_t ld, int64_t D, float scale, int64_t j,
                            int64_t nr, float* s) {
  int64_t r = 0;
  for (; r + ATTN_RB <= nr; r += ATTN_RB) attn_scores<ATTN_RB, NK>(qt + r, kt, ld, D, scale, j, s + r * ld);
  for (; r < nr; ++r) attn_scores<1, NK>(qt + r, kt, ld, D, scale, j, s + r * ld);
}

// o_r[0 .. CV VW) (+)= sum_{j0 <= j < j1} p[r * ld + j] v[j * D ..] for RB rows at o[r * ostride]: `first`
// stores, later key chunks add.
template <int RB, int CV>
inline void attn_pv(const float* p, int64_t ld, const float* v, int64_t D, int64_t j0, int64_t j1, bool first,
                    float* o, int64_t ostride) {
  typedef Vec<VW>::type V;
  V acc[RB][CV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = first ? V{} : load_vec<VW>(o + r * ostride + c * VW);
  for (int64_t j = j0; j < j1; ++j) {
    V vr[CV];
    for (int c = 0; c < CV; ++c) vr[c] = load_vec<VW>(v + j * D + c * VW);
    for (int r = 0; r < RB; ++r) {
      const float w = p[r * ld + j];
      for (int c = 0; c < CV; ++c) acc[r][c] += w * vr[c];
    }
  }
  for (int r = 0; r < RB; ++r) std::memcpy(o + r * ostride, acc[r], CV * VW * sizeof(float));
}

// max(row[0 .. n)), -inf for n == 0 (vectors of VW: `#pragma omp simd reduction(max)` stays scalar in GCC).
inline float row_max(const float* row, int64_t n) {
  typedef Vec<VW>::type V;
  V m = V{} - INFINITY;
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    const V x = load_vec<VW>(row + j);
    m = x > m ? x : m;
  }
  float mx = -INFINITY;
  for (int c = 0; c < VW; ++c) mx = std::max(mx, m[c]);
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// Any D: one row at a time, keys j0 .. j1.
inline void attn_pv_any(const float* p, const float* v, int64_t D, int64_t j0, int64_t j1, bool first, float* o) {
  if (first) std::fill(o, o + D, 0.0f);
  for (int64_t j = j0; j < j1; ++j) {
    const float w = p[j];
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) o[c] += w * v[j * D + c];
  }
}

constexpr int floor_pow2(int x) { return x < 2 ? 1 : 2 * floor_pow2(x / 2); }

// attn_pv over rows 0 .. nr in register blocks of RB, the rest in blocks of RB / 2, RB / 4, ... 1.
template <int RB, int CV>
inline void attn_pv_blocks(const float* p, int64_t ld, const float* v, int64_t D, int64_t j0, int64_t j1,
                           int64_t nr, float* o, int64_t ostride) {
  int64_t r = 0;
  for (; r + RB <= nr; r += RB) attn_pv<RB, CV>(p + r * ld, ld, v, D, j0, j1, j0 == 0, o + r * ostride, ostride);
  if constexpr (RB > 1)
    if (r < nr) attn_pv_blocks<RB / 2, CV>(p + r * ld, ld, v, D, j0, j1, nr - r, o + r * ostride, ostride);
}

// Rows 0 .. nr (nr <= QB) of P v for one item, v (L, D) packed, D = DV * VW (DV 0: any D): keys in chunks of
// about 16 KiB of v, which every row block rereads from L1; within a chunk, output columns in runs of at most 4
// vectors and as many rows per register block as the accumulators allow. Then each row scaled by inv.
template <int DV>
inline void attn_pv_rows(const float* p, int64_t ld, const float* v, int64_t L, int64_t D, const float* inv,
                         int64_t nr, float* o, int64_t ostride) {
  constexpr int CV = DV < 4 ? DV : 4;
  constexpr int RB = floor_pow2(ATTN_ACC / (DV == 0 ? 1 : CV));
  const int64_t chunk = std::max<int64_t>(16, 4096 / D);
  if (L == 0)  // no key seen by any row (causal, more queries than keys): zeros
    for (int64_t r = 0; r < nr; ++r) std::fill(o + r * ostride, o + r * ostride + D, 0.0f);
  for (int64_t j0 = 0; j0 < L; j0 += chunk) {
    const int64_t j1 = std::min(L, j0 + chunk);
    if constexpr (DV == 0) {
      for (int64_t r = 0; r < nr; ++r) attn_pv_any(p + r * ld, v, D, j0, j1, j0 == 0, o + r * ostride);
    } else {
      for (int c0 = 0; c0 < DV; c0 += CV)
        attn_pv_blocks<RB, CV>(p, ld, v + c0 * VW, D, j0, j1, nr, o + c0 * VW, ostride);
    }
  }
  for (int64_t r = 0; r < nr; ++r)
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) o[r * ostride + c] *= inv[r];
}

// dst[c * ld + r] = src[r * sstride + c] for r < nrows, c < ncols; zero for nrows <= r < rows_pad (8x8 AVX
// transposes where the ISA has them).
inline void transpose_rows(const float* src, int64_t sstride, int64_t nrows, int64_t rows_pad, int64_t ncols,
                           float* dst, int64_t ld) {
  int64_t c0 = 0;
#if defined(__AVX__)
  for (; c0 + 8 <= ncols; c0 += 8)
    for (int64_t r0 = 0; r0 + 8 <= rows_pad; r0 += 8) {
      const float* rows[8];
      for (int64_t r = 0; r < 8; ++r) rows[r] = r0 + r < nrows ? src + (r0 + r) * sstride + c0 : nullptr;
      transpose8(rows, dst + c0 * ld + r0, ld);
    }
#endif
  for (int64_t c = c0; c < ncols; ++c) {
    for (int64_t r = 0; r < nrows; ++r) dst[c * ld + r] = src[r * sstride + c];
    std::fill(dst + c * ld + nrows, dst + c * ld + rows_pad, 0.0f);
  }
}

int run_attention(const AttnArgs& a, int nthreads) {
  // Rows of kt and s are ld = Lp + 16 floats apart: at 4 KiB multiples every row of a column strip fell in one
  // L1 set (the avx2 build at 0.6x of SDPA at 1024 keys, AMD EPYC Zen 4).
  const int64_t Lp = (a.L + VW - 1) / VW * VW, ld = Lp + 16, D = a.D;
  const int64_t qblocks = (a.S + ATTN_QB - 1) / ATTN_QB, per_thread = (D + ATTN_QB) * ld + D * ATTN_QB + Lp * D;
  float* work = scratch(static_cast<size_t>(nthreads * per_thread));
  if (!work) return ENTRY_OUT_OF_MEMORY;
  const int64_t dv = D % VW == 0 ? D / VW : 0;  // vectors per output row; 0 (or > 16): the any-D loop
  const int64_t group = a.H / a.Hk;
  // Runs of consecutive items (the query blocks of a few heads), two per thread: a thread transposes each key
  // head of its run once, in its own cache (one item at a time, or one shared transpose phase, had every head
  // read across cores: 1.1-1.3x from the second thread instead of 1.8x, AMD EPYC Zen 4), and a thread that
  // starts late finds its runs taken by the others.
  const int64_t items = a.B * a.H * qblocks;
  std::vector<int64_t> loaded(nthreads, -1);  // which (batch, key head) each thread's ktb holds
  parallel_for(items, nthreads, [&](int64_t item, int thread) {
    float* ktb = work + thread * per_thread;  // (D, ld): the current key head transposed
    float* s = ktb + D * ld;                  // (QB, ld): the item's scores, then weights
    float* qt = s + ATTN_QB * ld;             // (D, QB): the item's queries transposed
    float* vp = qt + D * ATTN_QB;             // (L, D): the current value head, packed
    const int64_t b = item / (a.H * qblocks), h = item / qblocks % a.H, i0 = item % qblocks * ATTN_QB;
    const int64_t nq = std::min<int64_t>(ATTN_QB, a.S - i0), hk = h / group;
    if (loaded[thread] != b * a.Hk + hk) {
      transpose_rows(a.k + b * a.ks[0] + hk * a.ks[1], a.ks[2], a.L, Lp, D, ktb, ld);
      const float* v = a.v + b * a.vs[0] + hk * a.vs[1];
      for (int64_t j = 0; j < a.L; ++j) std::memcpy(vp + j * D, v + j * a.vs[2], D * sizeof(float));
      loaded[thread] = b * a.Hk + hk;
    }
    const float* qb = a.q + b * a.qs[0] + h * a.qs[1];
    transpose_rows(qb + i0 * a.qs[2], a.qs[2], nq, ATTN_QB, D, qt, ATTN_QB);
    // causal: the block's last query sees keys < kv_end; the strips beyond are never computed
    const int64_t kv_end = a.causal ? std::min(a.L, std::max<int64_t>(0, i0 + nq + a.L - a.S)) : a.L;
    const int64_t strips_end = (kv_end + VW - 1) / VW * VW;
    int64_t j = 0;
    for (; j + 2 * VW <= strips_end; j += 2 * VW)  // a strip of keys stays in L1 for every row block
      attn_score_rows<2>(qt, ktb, ld, D, a.scale, j, nq, s);
    if (j < strips_end) attn_score_rows<1>(qt, ktb, ld, D, a.scale, j, nq, s);
    float inv[ATTN_QB];
    for (int64_t r = 0; r < nq; ++r) {  // scale, mask, softmax
      float* row = s + r * ld;
      const int64_t i = i0 + r;
      const int64_t seen = a.causal ? std::min(a.L, std::max<int64_t>(0, i + a.L - a.S + 1)) : a.L;
      const int64_t mo = b * a.ms[0] + h * a.ms[1] + i * a.ms[2];
      if (a.mask_kind == MASK_ADDITIVE) {
        const float* m = static_cast<const float*>(a.mask) + mo;
#pragma omp simd
        for (int64_t j = 0; j < seen; ++j) row[j] += m[j];
      } else if (a.mask_kind == MASK_KEEP) {
        const uint8_t* m = static_cast<const uint8_t*>(a.mask) + mo;
#pragma omp simd
        for (int64_t j = 0; j < seen; ++j) row[j] = m[j] ? row[j] : -INFINITY;
      }
      const float mx = row_max(row, seen);
      float sum = 0.0f;
      if (mx == -INFINITY) {  // nothing to attend to
        std::fill(row, row + kv_end, 0.0f);
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < seen; ++j) {
          const float e = exp_fast(row[j] - mx);
          row[j] = e;
          sum += e;
        }
        std::fill(row + seen, row + kv_end, 0.0f);
      }
      inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    float* ob = a.out + (b * a.S + i0) * a.H * D + h * D;
    const int64_t ostride = a.H * D;
    switch (dv) {
      case 1: attn_pv_rows<1>(s, ld, vp, kv_end, D, inv, nq, ob, ostride); break;
      case 2: attn_pv_rows<2>(s, ld, vp, kv_end, D, inv, nq, ob, ostride); break;
      case 4: attn_pv_rows<4>(s, ld, vp, kv_end, D, inv, nq, ob, ostride); break;
      case 8: attn_pv_rows<8>(s, ld, vp, kv_end, D, inv, nq, ob, ostride); break;
      case 16: attn_pv_rows<16>(s, ld, vp, kv_end, D, inv, nq, ob, ostride); break;
      default: attn_pv_rows<0>(s, ld, vp, kv_end, D, inv, nq, ob, ostride);
    }
  }, (items + 2 * nthreads - 1) / (2 * nthreads));
  return ENTRY_OK;
}

// ---- one linear layer of any layout: what every linear entry point and the decoder step run -------------
// A layout's arrays in its entry point's order (p), its sizes, extra (the int8 layouts' flags: LINEAR_INT8_INPUT,
// and for the bitmap LINEAR_BITMAP_EXPAND: expand words at one token),
// nnz (stored values: the work that decides the thread count) and bias. LINEAR_NAMES are the entry points'
// names, which Python passes to name a layout (decoder_linear).
enum LinearKind {
  L_DENSE_F32, L_DENSE_BF16, L_CSR_F32_I16, L_CSR_F32_I32, L_CSR_BF16_I16, L_CSR_BF16_I32, L_TWO_FOUR_F32,
  L_TWO_FOUR_BF16, L_CSR_I8_I16, L_CSR_I8_I32, L_BITMAP_I8, L_DENSE_I8, L_CSR_MASK_F32, L_CSR_MASK_BF16, L_KINDS
};
constexpr const char* LINEAR_NAMES[L_KINDS] = {
    "dense_f32", "dense_bf16", "csr_f32_i16", "csr_f32_i32", "csr_bf16_i16", "csr_bf16_i32", "two_four_f32",
    "two_four_bf16", "csr_i8_i16", "csr_i8_i32", "bitmap_i8", "dense_i8", "csr_mask_f32", "csr_mask_bf16"};

struct LinearRef {
  int kind = -1;
  const void* p[6] = {};
  int64_t out = 0, in = 0, extra = 0, nnz = 0;
  const float* bias = nullptr;
};

int linear_kind(const char* name) {
  for (int k = 0; k < L_KINDS; ++k)
    if (std::strcmp(name, LINEAR_NAMES[k]) == 0) return k;
  return -1;
}

// f(body) with the body of w's layout writing y with activation act (the one switch over the layouts).
template <typename F>
int with_body(const LinearRef& w, float* y, int act, F&& f) {
  const auto* const* p = w.p;
  const int64_t out = w.out, in = w.in;
  const float* b = w.bias;
#define ARR(i, T) static_cast<const T*>(p[i])
  switch (w.kind) {
    case L_DENSE_F32: return f(DenseBody<float>{ARR(0, float), in, b, y, out, act});
    case L_DENSE_BF16: return f(DenseBody<bf16>{ARR(0, bf16), in, b, y, out, act});
    case L_CSR_F32_I16: return f(CsrBody<float, int16_t>{ARR(0, int32_t), ARR(1, int16_t), ARR(2, float), b, y, out, act});
    case L_CSR_F32_I32: return f(CsrBody<float, int32_t>{ARR(0, int32_t), ARR(1, int32_t), ARR(2, float), b, y, out, act});
    case L_CSR_BF16_I16: return f(CsrBody<bf16, int16_t>{ARR(0, int32_t), ARR(1, int16_t), ARR(2, bf16), b, y, out, act});
    case L_CSR_BF16_I32: return f(CsrBody<bf16, int32_t>{ARR(0, int32_t), ARR(1, int32_t), ARR(2, bf16), b, y, out, act});
    case L_TWO_FOUR_F32: return f(TwoFourBody<float>{ARR(0, float), ARR(1, uint8_t), in, b, y, out, act});
    case L_TWO_FOUR_BF16: return f(TwoFourBody<bf16>{ARR(0, bf16), ARR(1, uint8_t), in, b, y, out, act});
    case L_CSR_I8_I16:
      return f(Csr8Body<int16_t>{ARR(0, int32_t), ARR(1, int16_t), ARR(2, int8_t), ARR(3, float), b, y, out, act});
    case L_CSR_I8_I32:
      return f(Csr8Body<int32_t>{ARR(0, int32_t), ARR(1, int32_t), ARR(2, int8_t), ARR(3, float), b, y, out, act});
    case L_BITMAP_I8:
      return f(Bitmap8Body{ARR(0, int32_t), ARR(1, int32_t), ARR(2, int32_t), ARR(3, uint32_t), ARR(4, int8_t),
                           ARR(5, float), in, (w.extra & LINEAR_BITMAP_EXPAND) != 0, b, y, out, act});
    case L_DENSE_I8: return f(Dense8Body{ARR(0, int8_t), ARR(1, float), in, b, y, out, act});
    case L_CSR_MASK_F32: return f(CsrMaskBody<float>{ARR(0, int32_t), ARR(1, uint8_t), ARR(2, float), in, b, y, out, act});
    case L_CSR_MASK_BF16: return f(CsrMaskBody<bf16>{ARR(0, int32_t), ARR(1, uint8_t), ARR(2, bf16), in, b, y, out, act});
    default: return ENTRY_BAD_ARGUMENT;
  }
#undef ARR
}

inline bool int8_input(const LinearRef& w) { return (w.extra & LINEAR_INT8_INPUT) != 0; }  // int8 layouts' flag

// y (n, out) = post(act(x W^T + bias)) for x (n, in).
int run_linear(const LinearRef& w, const float* x, int64_t n, float* y, int nthreads, int act, const Post& post) {
  return with_body(w, y, act, [&](auto body) {
    return run_blocks(body, w.out, w.in, x, n, nthreads, post, int8_input(w));
  });
}

// One token through count linear layers sharing their input x (in,) (the decoder step's q, k, v and its gate, up):
// their row blocks handed out together in one parallel_for (the threads woken once, not once per layer), x
// quantized once for those that take int8 inputs. ys[i] (ws[i]->out,) = act_i(x W_i^T + bias_i).
int run_gemvs(const LinearRef* const* ws, int count, const float* x, float* const* ys, const int* acts,
              int nthreads) {
  constexpr int MAX_GROUP = 4;
  if (count < 1 || count > MAX_GROUP) return ENTRY_BAD_ARGUMENT;
  const int64_t in = ws[0]->in;
  int64_t first[MAX_GROUP + 1] = {0};  // the row blocks of layer i: [first[i], first[i + 1])
  bool quantize = false;
  for (int i = 0; i < count; ++i) {
    if (ws[i]->in != in) return ENTRY_BAD_ARGUMENT;
    first[i + 1] = first[i] + (ws[i]->out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    quantize = quantize || int8_input(*ws[i]);
  }
  QuantX quant{};
  const float* deq = x;
  if (quantize) {
    float* buf = scratch(static_cast<size_t>(in + quant_floats(in)), 1);
    if (!buf) return ENTRY_OUT_OF_MEMORY;
    quant = quantize_x(x, 1, in, buf, buf + in);
    deq = buf;
  }
  parallel_for(first[count], nthreads, [&](int64_t item, int) {
    int i = 0;
    while (item >= first[i + 1]) ++i;
    const LinearRef& w = *ws[i];
    const int64_t r0 = (item - first[i]) * ROWS_PER_BLOCK, r1 = std::min(w.out, r0 + ROWS_PER_BLOCK);
    with_body(w, ys[i], acts[i], [&](auto body) {
      const bool q8 = int8_input(w);
      body.xt = q8 ? deq : x;
      if constexpr (takes_int8_input<decltype(body)>::value)
        if (q8) body.qx = &quant;
      body.gemv(r0, r1);  // bias added
      if (body.act) epilogue(body.y + r0, 0, 1, r1 - r0, nullptr, body.act);
      return ENTRY_OK;
    });
  }, stream_chunk(first[count], nthreads));
  return ENTRY_OK;
}

#include "decode_step.h"

}  // namespace

// ---- C entry points: <format>_<values>[_<indices>] ------------------------------------------------------
// x (n, in) fp32 row-major, bias (out,) or NULL, y (n, out) = act(x W^T + bias) for an Act code act.
// Panels: T in {16, 32, 64}, R * T <= MAX_ROWS * 64, P <= 256 (the caller checks); csr_ffn_*: y = act(x U^T + bu)
// D^T + bd, or with a gate G (gseg non-null) y = (act(x G^T + bg) * (x U^T + bu)) D^T + bd, all weights panelled
// with the same R and P. Each returns ENTRY_OK, or ENTRY_OUT_OF_MEMORY when the
// scratch buffer for the packed x could not be allocated (nothing was computed).

// Every entry ends with the post-op's arguments: kind (PostKind), residual (n, out) or NULL, gamma, beta (out,)
// or NULL, eps.
#define POST_ARGS int post_kind, const float *residual, const float *gamma, const float *beta, float eps
#define POST Post{post_kind, residual, gamma, beta, eps}

#define SPARSE_PANEL_ENTRY(NAME, FFN, V)                                                                    \
  extern "C" int NAME(const int32_t* seg, const uint8_t* lcol, const V* val, int64_t out, int64_t in,     \
                       int64_t R, int64_t P, const float* x, int64_t T, int64_t n, const float* bias,       \
                       float* y, int nthreads, int act, POST_ARGS) {                                        \
    return run_panels<V>(Panels<V>{seg, lcol, val, out, in, R, P}, x, T, n, bias, y, nthreads, act, POST);    \
  }                                                                                                         \
  extern "C" int FFN(const int32_t* gseg, const uint8_t* glcol, const V* gval, const int32_t* useg,        \
                      const uint8_t* ulcol, const V* uval, const int32_t* dseg, const uint8_t* dlcol,      \
                      const V* dval, int64_t in, int64_t hidden, int64_t out, int64_t R, int64_t P,        \
                      const float* x, int64_t T, int64_t n, const float* gbias, const float* ubias,        \
                      const float* dbias, float* y, int nthreads, int act, POST_ARGS) {                     \
    const Panels<V> gate{gseg, glcol, gval, hidden, in, R, P};                                              \
    return run_ffn<V>(gseg ? &gate : nullptr, Panels<V>{useg, ulcol, uval, hidden, in, R, P},               \
                      Panels<V>{dseg, dlcol, dval, out, hidden, R, P}, x, T, n, gbias, ubias, dbias, y,     \
                      nthreads, act, POST);                                                                 \
  }
SPARSE_PANEL_ENTRY(csr_panels_f32, csr_ffn_f32, float)
SPARSE_PANEL_ENTRY(csr_panels_bf16, csr_ffn_bf16, bf16)

// int8 values: each weight's per-row scales follow its values.
extern "C" int csr_panels_i8(const int32_t* seg, const uint8_t* lcol, const int8_t* val, const float* scales,
                             int64_t out, int64_t in, int64_t R, int64_t P, const float* x, int64_t T, int64_t n,
                             const float* bias, float* y, int nthreads, int act, POST_ARGS) {
  return run_panels<int8_t>(Panels<int8_t>{seg, lcol, val, out, in, R, P, scales}, x, T, n, bias, y, nthreads, act,
                            POST);
}
extern "C" int csr_ffn_i8(const int32_t* gseg, const uint8_t* glcol, const int8_t* gval, const float* gscales,
                          const int32_t* useg, const uint8_t* ulcol, const int8_t* uval, const float* uscales,
                          const int32_t* dseg, const uint8_t* dlcol, const int8_t* dval, const float* dscales,
                          int64_t in, int64_t hidden, int64_t out, int64_t R, int64_t P, const float* x, int64_t T,
                          int64_t n, const float* gbias, const float* ubias, const float* dbias, float* y,
                          int nthreads, int act, POST_ARGS) {
  const Panels<int8_t> gate{gseg, glcol, gval, hidden, in, R, P, gscales};
  return run_ffn<int8_t>(gseg ? &gate : nullptr, Panels<int8_t>{useg, ulcol, uval, hidden, in, R, P, uscales},
                         Panels<int8_t>{dseg, dlcol, dval, out, hidden, R, P, dscales}, x, T, n, gbias, ubias, dbias,
                         y, nthreads, act, POST);
}

// The linear layers: each entry point runs run_linear on its layout (named as in LINEAR_NAMES).
#define LINEAR_TAIL const float *x, int64_t n, const float *bias, float *y, int nthreads, int act, POST_ARGS
inline int linear_entry(int kind, std::initializer_list<const void*> parts, int64_t out, int64_t in, int64_t extra,
                        const float* x, int64_t n, const float* bias, float* y, int nthreads, int act,
                        const Post& post) {
  LinearRef w;
  w.kind = kind;
  std::copy(parts.begin(), parts.end(), w.p);
  w.out = out, w.in = in, w.extra = extra, w.bias = bias;
  return run_linear(w, x, n, y, nthreads, act, post);
}
#define LINEAR_CALL(KIND, EXTRA, ...) linear_entry(KIND, {__VA_ARGS__}, out, in, EXTRA, x, n, bias, y, nthreads, act, POST)

#define SPARSE_CSR_ENTRY(NAME, KIND, V, I)                                                                  \
  extern "C" int NAME(const int32_t* rowptr, const I* col, const V* val, int64_t out, int64_t in, LINEAR_TAIL) { \
    return LINEAR_CALL(KIND, 0, rowptr, col, val);                                                          \
  }
SPARSE_CSR_ENTRY(csr_f32_i16, L_CSR_F32_I16, float, int16_t)
SPARSE_CSR_ENTRY(csr_f32_i32, L_CSR_F32_I32, float, int32_t)
SPARSE_CSR_ENTRY(csr_bf16_i16, L_CSR_BF16_I16, bf16, int16_t)
SPARSE_CSR_ENTRY(csr_bf16_i32, L_CSR_BF16_I32, bf16, int32_t)

#define SPARSE_24_ENTRY(NAME, KIND, V)                                                                      \
  extern "C" int NAME(const V* val, const uint8_t* meta, int64_t out, int64_t in, LINEAR_TAIL) {           \
    return LINEAR_CALL(KIND, 0, val, meta);                                                                 \
  }
SPARSE_24_ENTRY(two_four_f32, L_TWO_FOUR_F32, float)
SPARSE_24_ENTRY(two_four_bf16, L_TWO_FOUR_BF16, bf16)

// CSR with a column mask (see "CSR with a column mask"): rowptr (out+1,) int32, mask (out, ceil(in/8)) uint8, val.
extern "C" int csr_mask_f32(const int32_t* rowptr, const uint8_t* mask, const float* val, int64_t out, int64_t in,
                            LINEAR_TAIL) {
  return LINEAR_CALL(L_CSR_MASK_F32, 0, rowptr, mask, val);
}
extern "C" int csr_mask_bf16(const int32_t* rowptr, const uint8_t* mask, const bf16* val, int64_t out, int64_t in,
                             LINEAR_TAIL) {
  return LINEAR_CALL(L_CSR_MASK_BF16, 0, rowptr, mask, val);
}

// Dense fp32 / bf16 weights (out, in): the decoder step's dense layers (and their tests).
extern "C" int dense_f32(const float* val, int64_t out, int64_t in, LINEAR_TAIL) {
  return LINEAR_CALL(L_DENSE_F32, 0, val);
}
extern "C" int dense_bf16(const bf16* val, int64_t out, int64_t in, LINEAR_TAIL) {
  return LINEAR_CALL(L_DENSE_BF16, 0, val);
}

// int8 weights (see "int8 weights" above): scales (out,) fp32 after the values, flags (LINEAR_INT8_INPUT, and
// for the bitmap LINEAR_BITMAP_EXPAND) after the sizes; otherwise as the entries above.
#define SPARSE_CSR8_ENTRY(NAME, KIND, I)                                                                    \
  extern "C" int NAME(const int32_t* rowptr, const I* col, const int8_t* val, const float* scales,         \
                      int64_t out, int64_t in, int flags, LINEAR_TAIL) {                                    \
    return LINEAR_CALL(KIND, flags, rowptr, col, val, scales);                                              \
  }
SPARSE_CSR8_ENTRY(csr_i8_i16, L_CSR_I8_I16, int16_t)
SPARSE_CSR8_ENTRY(csr_i8_i32, L_CSR_I8_I32, int32_t)

// LINEAR_BITMAP_EXPAND: expand each bitmap word to dense lanes at one token (dense enough weights), else walk
// its bits.
extern "C" int bitmap_i8(const int32_t* tile_ptr, const int32_t* tile_cols, const int32_t* offsets,
                         const uint32_t* bitmaps, const int8_t* val, const float* scales, int64_t out, int64_t in,
                         int flags, LINEAR_TAIL) {
  return LINEAR_CALL(L_BITMAP_I8, flags, tile_ptr, tile_cols, offsets, bitmaps, val, scales);
}

extern "C" int dense_i8(const int8_t* val, const float* scales, int64_t out, int64_t in, int flags, LINEAR_TAIL) {
  return LINEAR_CALL(L_DENSE_I8, flags, val, scales);
}

// moe_forward_f32: see run_moe. logits (T, E) fp32, x (T, D), y (T, D), routed (E,) int64.
extern "C" int moe_forward_f32(const float* logits, const float* x, int64_t T, int64_t K, int64_t capacity,
                               const float* w_in, const float* b_in, const float* w_gate, const float* b_gate,
                               const float* w_out, const float* b_out, int64_t E, int64_t D, int64_t H, float* y,
                               int64_t* routed, int nthreads, int act) {
  return run_moe(logits, x, T, K, capacity, w_in, b_in, w_gate, b_gate, w_out, b_out, E, D, H, y, routed,
                 nthreads, act);
}

// attention_f32: see run_attention. Strides in elements: q/k/v (batch, head, position), mask (batch, head, query).
extern "C" int attention_f32(const float* q, const float* k, const float* v, const int64_t* strides,
                             const void* mask, int mask_kind, int64_t B, int64_t H, int64_t Hk, int64_t S,
                             int64_t L, int64_t D, float scale, int causal, float* out, int nthreads) {
  const AttnArgs a{q, k, v, {strides[0], strides[1], strides[2]}, {strides[3], strides[4], strides[5]},
                   {strides[6], strides[7], strides[8]}, mask, mask_kind, {strides[9], strides[10], strides[11]},
                   B, H, Hk, S, L, D, scale, causal, out};
  return run_attention(a, nthreads);
}

// The decoder step (decode_step.h). dims: layers, hidden E, heads H, key heads Hk, head dim D, intermediate I,
// vocab, max_len, window (0: none), batch (sequences); single: the single-thread work thresholds (gemv, batch,
// attention); cos, sin (max_len, D); embed (vocab, E); final_norm (E,); kcache, vcache (batch, layers, Hk,
// max_len, D). Returns a handle (NULL for impossible sizes); every pointer must stay valid until decoder_free.
extern "C" void* decoder_new(const int64_t* dims, float eps, float scale, int act, const int64_t* single,
                             const float* cos, const float* sin, const float* embed, const float* final_norm,
                             float* kcache, float* vcache) {
  for (int i = 0; i < 10; ++i)
    if (dims[i] <= 0 && i != 8) return nullptr;
  if (dims[2] % dims[3] != 0 || dims[4] % 2 != 0 || dims[8] < 0) return nullptr;
  auto* d = new Decoder{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9],
                        eps, scale, act, cos, sin, embed, final_norm, kcache, vcache, single[0], single[1],
                        single[2]};
  d->blocks.resize(static_cast<size_t>(dims[0]));
  return d;
}
// One linear: layer (-1: the LM head), slot (DecoderSlot: q k v o gate up down), layout (a linear entry
// point's name), its arrays in that entry's order (6, unused NULL), sizes, extra, nnz, bias or NULL.
extern "C" int decoder_linear(void* handle, int64_t layer, int64_t slot, const char* layout, const void* const* parts,
                              int64_t out, int64_t in, int64_t extra, int64_t nnz, const float* bias) {
  auto* d = static_cast<Decoder*>(handle);
  const int kind = linear_kind(layout);
  if (kind < 0 || layer < -1 || layer >= d->layers || (layer >= 0 && (slot < 0 || slot >= D_SLOTS)))
    return ENTRY_BAD_ARGUMENT;
  LinearRef& w = layer < 0 ? d->head : d->blocks[layer].lin[slot];
  w.kind = kind;
  std::copy(parts, parts + 6, w.p);
  w.out = out, w.in = in, w.extra = extra, w.nnz = nnz, w.bias = bias;
  return ENTRY_OK;
}
extern "C" int decoder_norms(void* handle, int64_t layer, const float* attn_norm, const float* mlp_norm) {
  auto* d = static_cast<Decoder*>(handle);
  if (layer < 0 || layer >= d->layers) return ENTRY_BAD_ARGUMENT;
  d->blocks[layer].attn_norm = attn_norm;
  d->blocks[layer].mlp_norm = mlp_norm;
  return ENTRY_OK;
}
// n rows: token tokens[i] of sequence seq[i] at position pos[i] (the cache holds that sequence's positions
// before it): logits (1 or n, vocab) of the last row, or of every row when all_logits. ENTRY_BAD_ARGUMENT: a token
// outside the vocabulary, a sequence or position out of range, or a decoder not completely set (a layer missing
// or of the wrong shape).
extern "C" int decoder_step(void* handle, const int64_t* tokens, int64_t n, const int64_t* seq, const int64_t* pos,
                            float* logits, int all_logits, int nthreads) {
  auto* d = static_cast<Decoder*>(handle);
  if (!d->complete()) return ENTRY_BAD_ARGUMENT;
  return d->step(tokens, n, seq, pos, logits, all_logits != 0, nthreads);
}
extern "C" void decoder_free(void* handle) { delete static_cast<Decoder*>(handle); }
// times[3]: nanoseconds in the linear layers (LM head included) and in whole steps, and the steps, since the
// decoder was made (what a step spends outside the linear layers: norms, rotary, attention, the cache).
extern "C" void decoder_time(void* handle, int64_t* times) {
  const auto* d = static_cast<const Decoder*>(handle);
  times[0] = d->linear_ns, times[1] = d->step_ns, times[2] = d->steps;
}

// Threading (work_pool.h): backend 0 auto, 1 OpenMP, 2 the work pool, 3 solo (tests and benchmarks pin one;
// the previous setting is returned).
extern "C" int sparse_cpu_set_backend(int backend) {
  return work_pool::Mode::get().forced.exchange(backend);
}
// stats: jobs on OpenMP, the pool and solo; slow waits on OpenMP and on the pool; the backend auto picks now.
extern "C" void sparse_cpu_threading(int64_t* stats) {
  work_pool::Mode& m = work_pool::Mode::get();
  for (int b = 0; b < 3; ++b) stats[b] = m.jobs[work_pool::OPENMP + b].load();
  stats[3] = m.slow[work_pool::OPENMP].load();
  stats[4] = m.slow[work_pool::POOL].load();
  const int forced = m.forced.exchange(work_pool::AUTO);
  stats[5] = m.backend();
  m.forced.store(forced);
}
// Records a job on `backend` (1 OpenMP, 2 the pool) whose caller worked busy_ns and waited wait_ns for the other
// threads (the rule, for tests): 1 if the following jobs go a level up.
extern "C" int sparse_cpu_waited(int backend, int64_t wait_ns, int64_t busy_ns) {
  return work_pool::Mode::get().waited(backend, wait_ns, busy_ns);
}

extern "C" int sparse_cpu_abi_version() { return 17; }

// The codes Python passes and reads, from the enums themselves: cpp.py compares them with its own tables at
// load and refuses a library that disagrees (one source of truth per side, checked against the other).
extern "C" const char* sparse_cpu_constants() {
  static char text[320];
  std::snprintf(text, sizeof(text),
                "act.none=%d act.relu=%d act.gelu=%d act.gelu_tanh=%d act.silu=%d post.none=%d post.add=%d "
                "post.add_norm=%d linear.bitmap_expand=%d linear.int8_input=%d status.ok=%d status.out_of_memory=%d status.bad_argument=%d mask.none=%d mask.additive=%d mask.keep=%d",
                ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, POST_NONE, POST_ADD, POST_ADD_NORM,
                LINEAR_BITMAP_EXPAND, LINEAR_INT8_INPUT, ENTRY_OK,
                ENTRY_OUT_OF_MEMORY, ENTRY_BAD_ARGUMENT, MASK_NONE, MASK_ADDITIVE, MASK_KEEP);
  return text;
}
