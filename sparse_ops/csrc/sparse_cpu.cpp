// CPU kernels for y = x @ W^T with W in CSR or 2:4, called from sparse_ops/kernels/native.py via ctypes.
//
// Shapes (row-major, fp32 unless noted):
//   W       (out, in): CSR rowptr (out+1,) int32, col (nnz,) int16|int32, val (nnz,) fp32|bf16 (uint16 bits)
//                      2:4 val (out, in/2) fp32|bf16, meta (out, ceil(in/8)) uint8 (nibble p0 | p1 << 2)
//   xt      (in, ld)   x transposed: column n holds token n; n == 1: xt is x (gemv). Columns n .. width - 1 are
//                      zero, width = token_width(n); ld >= width is the row stride (the caller pads it so that
//                      rows do not all fall into the same few L1 sets).
//   bias    (out,) or NULL;  y (n, out)
//
// PRECONDITIONS (the caller checks them; nothing here re-checks): W passed its format's validate()
// (rowptr non-decreasing from 0 to nnz, 0 <= col < in, 2:4 codes p0 < p1), every pointer holds the sizes
// above, and ld >= token_width(n).
//
// Plan: rows are split into blocks shared out to OpenMP threads (the same libgomp pool torch uses, so the
// caller's thread count is never exceeded). A row's products over a tile of tokens live in registers
// (acc[S][NV] vectors of W floats); S > 1 splits a row's nonzeros over independent accumulators so short
// tiles are not bound by the FMA latency. The weight is read once per tile of tokens.
#include <cstdint>
#include <cstring>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef uint16_t bf16;

inline float load_value(const float* v, int64_t k) { return v[k]; }
inline float load_value(const bf16* v, int64_t k) {
  uint32_t u = static_cast<uint32_t>(v[k]) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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

// Row blocks write their sums here first, (rows, TILE_STRIDE) row-major, then flush_block writes them to y in
// runs of consecutive rows: storing a row's tile straight into y (stride out floats) hits one or two L1 sets
// when out * 4 is a multiple of 4 KiB and thrashes.
constexpr int64_t TILE_STRIDE = 128;  // the widest tile
constexpr int64_t MAX_ROWS = 64;      // rows per block; the buffer is MAX_ROWS * TILE_STRIDE floats (32 KiB)

template <int W, int NV>
inline void store_row(const typename Vec<W>::type* acc, int64_t i, float* buf) {
  std::memcpy(buf + i * TILE_STRIDE, acc, NV * W * sizeof(float));
}

// y[t0 + n, r0 + i] = buf[i, n] + bias[r0 + i] for the valid tokens n of the tile and the block's rows i.
inline void flush_block(const float* buf, int64_t r0, int64_t r1, int64_t t0, int64_t nvalid, const float* bias,
                        float* y, int64_t out) {
  for (int64_t n = 0; n < nvalid; ++n) {
    float* yr = y + (t0 + n) * out + r0;
    for (int64_t i = 0; i < r1 - r0; ++i) yr[i] = buf[i * TILE_STRIDE + n] + (bias ? bias[r0 + i] : 0.0f);
  }
}

// ---- CSR ----------------------------------------------------------------------------------------------

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

template <typename V, typename I>
void csr_gemv_rows(const int32_t* rowptr, const I* col, const V* val, int64_t r0, int64_t r1, const float* x,
                   const float* bias, float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // four chains: the FMA latency is not the limit
    int64_t k = rowptr[r];
    const int64_t e = rowptr[r + 1];
    for (; k + 4 <= e; k += 4) {
      s0 += load_value(val, k) * x[col[k]];
      s1 += load_value(val, k + 1) * x[col[k + 1]];
      s2 += load_value(val, k + 2) * x[col[k + 2]];
      s3 += load_value(val, k + 3) * x[col[k + 3]];
    }
    for (; k < e; ++k) s0 += load_value(val, k) * x[col[k]];
    y[r] = (s0 + s1) + (s2 + s3) + (bias ? bias[r] : 0.0f);
  }
}

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

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // 16 bf16 -> fp32: widen to 32 bits, shift into the top half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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
// width == 8: one 8-wide vector; else up to `tile` tokens (16, 32, 64 or 128) in 16-wide vectors.
template <typename Body>
void one_tile(const Body& body, int64_t r0, int64_t r1, int64_t ld, int64_t n, int64_t t0, int64_t tile,
              float* buf) {
  const int64_t width = token_width(n), nv = std::min(tile, width - t0) / 16;
  switch (width == 8 ? 0 : nv) {
    case 0: body.template run<8, 1, 4>(r0, r1, t0, buf); break;
    case 1: body.template run<16, 1, 4>(r0, r1, t0, buf); break;
    case 2: body.template run<16, 2, 2>(r0, r1, t0, buf); break;
    case 3: body.template run<16, 3, 2>(r0, r1, t0, buf); break;
    case 4: body.template run<16, 4, 1>(r0, r1, t0, buf); break;
    case 5: body.template run<16, 5, 1>(r0, r1, t0, buf); break;
    case 6: body.template run<16, 6, 1>(r0, r1, t0, buf); break;
    case 7: body.template run<16, 7, 1>(r0, r1, t0, buf); break;
    default: body.template run<16, 8, 1>(r0, r1, t0, buf); break;
  }
  flush_block(buf, r0, r1, t0, std::min(tile, n - t0), body.bias, body.y, body.out);
}

template <typename V, typename I>
struct CsrBody {
  const int32_t* rowptr; const I* col; const V* val; const float* xt; int64_t ld; const float* bias; float* y;
  int64_t out;
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    csr_rows_tile<V, I, W, NV, S>(rowptr, col, val, r0, r1, xt, ld, t0, buf);
  }
  void gemv(int64_t r0, int64_t r1) const { csr_gemv_rows<V, I>(rowptr, col, val, r0, r1, xt, bias, y); }
};

template <typename V>
struct TwoFourBody {
  const V* val; const uint8_t* meta; int64_t in; const float* xt; int64_t ld; const float* bias; float* y;
  int64_t out;
  template <int W, int NV, int S>
  void run(int64_t r0, int64_t r1, int64_t t0, float* buf) const {
    two_four_rows_tile<V, W, NV, S>(val, meta, in, r0, r1, xt, ld, t0, buf);
  }
  void gemv(int64_t r0, int64_t r1) const { two_four_gemv_rows<V>(val, meta, in, r0, r1, xt, bias, y); }
};

// Work items (row block, token tile) handed out dynamically. tile_outer: all row blocks of tile 0, then of
// tile 1, ...: the tile's panel of x stays in cache while the weights stream past (small in: the panel fits
// L1/L2). Otherwise each row block runs all its tiles in turn: its weights stay in cache (large weights).
template <typename Body>
void run_blocks(const Body& body, int64_t out, int64_t ld, int64_t n, int64_t tile, int64_t rows, int tile_outer,
                int nthreads) {
  rows = std::max<int64_t>(1, std::min(rows, MAX_ROWS));
  const int64_t width = token_width(n);
  tile = width == 8 ? 8 : std::max<int64_t>(16, std::min(tile, TILE_STRIDE));
  const int64_t nblocks = (out + rows - 1) / rows, ntiles = width == 1 ? 1 : (width + tile - 1) / tile;
#pragma omp parallel num_threads(nthreads)
  {
    alignas(64) float buf[MAX_ROWS * TILE_STRIDE];  // this thread's block of sums
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < nblocks * ntiles; ++item) {
      const int64_t b = tile_outer ? item % nblocks : item / ntiles, t = tile_outer ? item / nblocks : item % ntiles;
      const int64_t r0 = b * rows, r1 = std::min(out, r0 + rows);
      if (width == 1) body.gemv(r0, r1);
      else one_tile(body, r0, r1, ld, n, t * tile, tile, buf);
    }
  }
}

}  // namespace

// ---- C entry points: <format>_<values>_<indices> ------------------------------------------------------

#define SPARSE_CSR_ENTRY(NAME, V, I)                                                                        \
  extern "C" void NAME(const int32_t* rowptr, const I* col, const V* val, int64_t out, const float* xt,    \
                       int64_t ld, int64_t n, const float* bias, float* y, int64_t tile, int64_t rows,      \
                       int tile_outer, int nthreads) {                                                      \
    run_blocks(CsrBody<V, I>{rowptr, col, val, xt, ld, bias, y, out}, out, ld, n, tile, rows, tile_outer,  \
               nthreads);                                                                                   \
  }
SPARSE_CSR_ENTRY(csr_f32_i16, float, int16_t)
SPARSE_CSR_ENTRY(csr_f32_i32, float, int32_t)
SPARSE_CSR_ENTRY(csr_bf16_i16, bf16, int16_t)
SPARSE_CSR_ENTRY(csr_bf16_i32, bf16, int32_t)

#define SPARSE_24_ENTRY(NAME, V)                                                                            \
  extern "C" void NAME(const V* val, const uint8_t* meta, int64_t out, int64_t in, const float* xt,         \
                       int64_t ld, int64_t n, const float* bias, float* y, int64_t tile, int64_t rows,      \
                       int tile_outer, int nthreads) {                                                      \
    run_blocks(TwoFourBody<V>{val, meta, in, xt, ld, bias, y, out}, out, ld, n, tile, rows, tile_outer,    \
               nthreads);                                                                                   \
  }
SPARSE_24_ENTRY(two_four_f32, float)
SPARSE_24_ENTRY(two_four_bf16, bf16)

extern "C" int sparse_cpu_abi_version() { return 3; }
