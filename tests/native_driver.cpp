// Runs the kernels of sparse_ops/csrc/sparse_cpu.cpp on cases written by tests/test_cross_builds.py and
// compares each output with the expected one (kernels/reference.py's, computed in Python): the test of a build
// for a CPU this machine is not (aarch64, run under qemu-aarch64).
//
// Case file: a sequence of cases, each
//   u32 name length, name ("csr_f32_i16", "csr_panels_bf16", "two_four_f32", "csr_ffn_f32", ...)
//   u32 count, i64 scalars[count]          (per name, below)
//   u32 count, arrays[count]: u64 bytes, then the bytes (an empty array is a NULL pointer)
// The last array of every case is the expected y (float32) and the last scalar its tolerance in units of
// 1e-6 (abs and rel). Prints one line per case; exits 1 if any case is off, 2 on a malformed file.
#include "../sparse_ops/csrc/sparse_cpu.cpp"

#include <cstdio>
#include <string>

namespace {

struct Reader {
  FILE* f;
  bool ok = true;
  template <typename T> T get() {
    T v{};
    ok = ok && std::fread(&v, sizeof(T), 1, f) == 1;
    return v;
  }
  std::vector<char> bytes() {
    const uint64_t n = get<uint64_t>();
    std::vector<char> b(ok ? n : 0);
    ok = ok && (n == 0 || std::fread(b.data(), 1, n, f) == n);
    return b;
  }
};

const void* ptr(const std::vector<char>& b) { return b.empty() ? nullptr : b.data(); }
const float* fp(const std::vector<char>& b) { return static_cast<const float*>(ptr(b)); }

// Calls the entry point `name` with scalars s and arrays a (a.back() is the expected y); y is written.
bool run(const std::string& name, const std::vector<int64_t>& s, const std::vector<std::vector<char>>& a,
         float* y) {
  const auto P = [&](size_t i) { return ptr(a[i]); };
  // (kind, residual, gamma, beta, eps): no post-op (it is ISA-neutral C++, tested on the x86 builds)
#define NOPOST 0, nullptr, nullptr, nullptr, 0.0f
#define CSR_CASE(N, V, I)                                                                                   \
  if (name == #N) /* rowptr col val x bias | out in n threads act */                                    \
    return N(static_cast<const int32_t*>(P(0)), static_cast<const I*>(P(1)), static_cast<const V*>(P(2)),  \
             s[0], s[1], fp(a[3]), s[2], fp(a[4]), y, int(s[3]), int(s[4]), NOPOST) == 0;
  CSR_CASE(csr_f32_i16, float, int16_t)
  CSR_CASE(csr_f32_i32, float, int32_t)
  CSR_CASE(csr_bf16_i16, bf16, int16_t)
  CSR_CASE(csr_bf16_i32, bf16, int32_t)
#define CSR8_CASE(N, I)                                                                                     \
  if (name == #N) /* rowptr col val scales x bias | out in flags n threads act */                       \
    return N(static_cast<const int32_t*>(P(0)), static_cast<const I*>(P(1)),                                \
             static_cast<const int8_t*>(P(2)), fp(a[3]), s[0], s[1], int(s[2]), fp(a[4]), s[3], fp(a[5]), y,  \
             int(s[4]), int(s[5]), NOPOST) == 0;
  CSR8_CASE(csr_i8_i16, int16_t)
  CSR8_CASE(csr_i8_i32, int32_t)
  if (name == "bitmap_i8")  // tile_ptr tile_cols offsets bitmaps val scales x bias | out in flags n threads act
    return bitmap_i8(static_cast<const int32_t*>(P(0)), static_cast<const int32_t*>(P(1)),
                     static_cast<const int32_t*>(P(2)), static_cast<const uint32_t*>(P(3)),
                     static_cast<const int8_t*>(P(4)), fp(a[5]), s[0], s[1], int(s[2]), fp(a[6]), s[3], fp(a[7]), y,
                     int(s[4]), int(s[5]), NOPOST) == 0;
  if (name == "csr_panels_i8")  // seg lcol val scales x bias | out in R P T n threads act
    return csr_panels_i8(static_cast<const int32_t*>(P(0)), static_cast<const uint8_t*>(P(1)),
                         static_cast<const int8_t*>(P(2)), fp(a[3]), s[0], s[1], s[2], s[3], fp(a[4]), s[4], s[5],
                         fp(a[5]), y, int(s[6]), int(s[7]), NOPOST) == 0;
  if (name == "dense_i8")  // val scales x bias | out in flags n threads act
    return dense_i8(static_cast<const int8_t*>(P(0)), fp(a[1]), s[0], s[1], int(s[2]), fp(a[2]), s[3], fp(a[3]), y,
                    int(s[4]), int(s[5]), NOPOST) == 0;
#define PANEL_CASE(N, V)                                                                                    \
  if (name == #N) /* seg lcol val x bias | out in R P T n threads act */                                \
    return N(static_cast<const int32_t*>(P(0)), static_cast<const uint8_t*>(P(1)),                          \
             static_cast<const V*>(P(2)), s[0], s[1], s[2], s[3], fp(a[3]), s[4], s[5], fp(a[4]), y,         \
             int(s[6]), int(s[7]), NOPOST) == 0;
  PANEL_CASE(csr_panels_f32, float)
  PANEL_CASE(csr_panels_bf16, bf16)
#define TWO_FOUR_CASE(N, V)                                                                                 \
  if (name == #N) /* val meta x bias | out in n threads act */                                          \
    return N(static_cast<const V*>(P(0)), static_cast<const uint8_t*>(P(1)), s[0], s[1], fp(a[2]), s[2],   \
             fp(a[3]), y, int(s[3]), int(s[4]), NOPOST) == 0;
  TWO_FOUR_CASE(two_four_f32, float)
  TWO_FOUR_CASE(two_four_bf16, bf16)
#define FFN_CASE(N, V)                                                                                      \
  if (name == #N) /* gate seg lcol val, up ..., down ..., x, gate/up/down bias | in hidden out R P T n   \
                     threads act */                                                                         \
    return N(static_cast<const int32_t*>(P(0)), static_cast<const uint8_t*>(P(1)),                          \
             static_cast<const V*>(P(2)), static_cast<const int32_t*>(P(3)),                                \
             static_cast<const uint8_t*>(P(4)), static_cast<const V*>(P(5)),                                \
             static_cast<const int32_t*>(P(6)), static_cast<const uint8_t*>(P(7)),                          \
             static_cast<const V*>(P(8)), s[0], s[1], s[2], s[3], s[4], fp(a[9]), s[5], s[6], fp(a[10]),     \
             fp(a[11]), fp(a[12]), y, int(s[7]), int(s[8]), NOPOST) == 0;
  FFN_CASE(csr_ffn_f32, float)
  FFN_CASE(csr_ffn_bf16, bf16)
  if (name == "moe_forward_f32") {  // logits x w_in b_in w_gate b_gate w_out b_out | T K capacity E D H threads act
    std::vector<int64_t> routed(s[3]);
    return moe_forward_f32(fp(a[0]), fp(a[1]), s[0], s[1], s[2], fp(a[2]), fp(a[3]), fp(a[4]), fp(a[5]), fp(a[6]),
                           fp(a[7]), s[3], s[4], s[5], y, routed.data(), int(s[6]), int(s[7])) == 0;
  }
  if (name == "attention_f32") {  // q k v mask (float, or empty) | B H Hk S L D scale_e6 causal threads
    const int64_t B = s[0], H = s[1], Hk = s[2], S = s[3], L = s[4], D = s[5];  // q, k, v contiguous
    const int64_t strides[12] = {H * S * D, S * D, D, Hk * L * D, L * D, D, Hk * L * D, L * D, D,
                                 H * S * L, S * L, L};
    const int kind = a[3].empty() ? MASK_NONE : MASK_ADDITIVE;
    return attention_f32(fp(a[0]), fp(a[1]), fp(a[2]), strides, P(3), kind, B, H, Hk, S, L, D, s[6] * 1e-6f,
                         int(s[7]), y, int(s[8])) == 0;
  }
  std::fprintf(stderr, "unknown entry %s\n", name.c_str());
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  Reader r{std::fopen(argv[1], "rb")};
  if (!r.f) return 2;
  int bad = 0, cases = 0;
  for (;;) {
    const uint32_t len = r.get<uint32_t>();
    if (!r.ok) break;  // end of file
    std::string name(len, '\0');
    r.ok = std::fread(&name[0], 1, len, r.f) == len;
    std::vector<int64_t> s(r.get<uint32_t>());
    for (auto& v : s) v = r.get<int64_t>();
    std::vector<std::vector<char>> a(r.get<uint32_t>());
    for (auto& b : a) b = r.bytes();
    if (!r.ok || s.empty() || a.empty()) return 2;
    const std::vector<char>& want = a.back();
    const size_t m = want.size() / 4;
    std::vector<float> y(m, std::nanf(""));
    const bool called = run(name, s, a, y.data());
    const double tol = s.back() * 1e-6;
    double worst = 0;
    bool off = !called;
    for (size_t i = 0; i < m; ++i) {
      float w;
      std::memcpy(&w, want.data() + 4 * i, 4);
      const double err = std::fabs(double(y[i]) - w);
      worst = std::max(worst, err);
      off = off || !(err <= tol * (1 + std::fabs(w)));  // NaN is off
    }
    std::printf("%s case %d: %s, max abs error %.3g over %zu outputs\n", name.c_str(), cases, off ? "OFF" : "ok",
                worst, m);
    bad += off;
    ++cases;
  }
  std::printf("%d of %d cases off\n", bad, cases);
  return bad ? 1 : 0;
}
