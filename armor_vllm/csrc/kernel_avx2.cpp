// AVX2 + FMA + F16C kernels: every x86-64 CPU of the last decade.
//
// Two decode kernels, each templated on the kept values' type (bf16, fp16, fp32, or int8 widened
// in registers with the row's scale applied once per output):
// - "gather", 1-2 tokens of bf16 activations (bf16 or int8 values): 16 columns (two bitmask bytes,
//   8 kept values) per step. The 8 kept values are widened to fp32 in one vector; one pshufb keyed
//   by the two bytes picks the 8 activations they meet out of the 16 bf16 ones, and an unpack with
//   zero widens those, so a single FMA per token multiplies kept values only.
// - "expand", everything else: 8 columns (one bitmask byte, 4 kept values) per step, the 4 values
//   widened to fp32 in lanes 0..3 of a ymm whose lanes 4..7 are zero, and one vpermps with a
//   256-entry table keyed by the bitmask byte moves each to its column (pruned columns read a zero
//   lane). One FMA per token against 8 fp32 activations follows.
// Decompression for prefill is one pshufb per 8 columns for 16-bit types; int8 values are widened,
// scaled and expanded like the expand kernel's, then rounded to the slab's dtype. The B_in / B_out
// blocks have a kernel of their own up to kBlockTokens tokens (further down).
#include <immintrin.h>

#include <array>
#include <type_traits>
#include <vector>

#include "sparse24.h"
#include "tiles.h"

namespace armor::ARMOR_NS {
namespace {

constexpr int kRows = 4, kTokens = 2;  // 8 accumulators + 4 rows + 1 activation of 16 ymm
constexpr int kGatherTokens = 2;       // up to this many tokens bf16 activations take the gather kernel

// For each bitmask byte: column j's source lane (its rank among the kept, or 4 = zero) as vpermps
// indices; as pshufb byte indices for 16-bit values (0x80 = zero byte); and the gather kernel's
// pshufb indices, the bf16 words of the byte's 4 kept columns in rank order (8 bytes).
struct Tables {
  alignas(32) std::array<std::array<int32_t, 8>, 256> lane{};
  alignas(16) std::array<std::array<uint8_t, 16>, 256> bytes{};
  alignas(64) std::array<int64_t, 256> gather{};
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      uint8_t words[8] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80};
      for (int j = 0; j < 8; ++j) {
        const bool kept = (b >> j) & 1;
        lane[b][j] = kept ? rank : 4;
        bytes[b][2 * j] = kept ? 2 * rank : 0x80;
        bytes[b][2 * j + 1] = kept ? 2 * rank + 1 : 0x80;
        if (kept && rank < 4) words[2 * rank] = 2 * j, words[2 * rank + 1] = 2 * j + 1;
        rank += kept;
      }
      std::memcpy(&gather[b], words, 8);
    }
  }
};
const Tables kTables;

// 4 kept values widened to fp32 in lanes 0..3, zeros in 4..7.
inline __m256 load4(const float* p) { return _mm256_zextps128_ps256(_mm_loadu_ps(p)); }
inline __m256 load4(const c10::Half* p) {
  return _mm256_zextps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load4(const c10::BFloat16* p) {
  const __m128i u = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_zextps128_ps256(_mm_castsi128_ps(_mm_slli_epi32(u, 16)));
}
inline __m256 load4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm256_zextps128_ps256(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(word))));
}

// 8 kept values widened to fp32.
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Output r's sums, scaled where the values are int8, in y's dtype.
template <int R, int TB, typename W, typename O>
ARMOR_INLINE void store(const __m256 (&acc)[R][TB], const float* scale, O* y, int64_t ldy) {
  ARMOR_UNROLL for (int r = 0; r < R; ++r) {
    float s = 1.f;
    if constexpr (std::is_same_v<W, int8_t>) s = scale[r];
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = O(s * hsum(acc[r][t]));
  }
}

template <int R, int TB, typename W, typename O>
void expand_block(const float* x, int64_t k, const W* vals, const uint8_t* mask, const float* scale, O* y,
                  int64_t ldy) {
  __m256 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 8) {
    __m256 w[R];
    ARMOR_UNROLL for (int r = 0; r < R; ++r) {
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.lane[mask[r * (k / 8) + c / 8]].data()));
      w[r] = _mm256_permutevar8x32_ps(load4(vals + r * (k / 2) + c / 2), idx);
    }
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * k + c);
      ARMOR_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  store<R, TB, W>(acc, scale, y, ldy);
}

// The gather step's pshufb control: byte b0's entry in lane 0, b1's in lane 1 (low 8 bytes each).
inline __m256i gather_control(uint8_t b0, uint8_t b1) {
  return _mm256_blend_epi32(_mm256_set1_epi64x(kTables.gather[b0]), _mm256_set1_epi64x(kTables.gather[b1]), 0xF0);
}

template <int R, int TB, typename W>
void gather_block(const c10::BFloat16* x, int64_t k, const W* vals, const uint8_t* mask, const float* scale,
                  c10::BFloat16* y, int64_t ldy) {
  __m256 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const int64_t full = k / 16 * 16;
  // kept activations of token t for control `ctl`: 8 bf16 picked, widened to fp32 (word << 16)
  const auto kept_x = [&](__m256i xv, __m256i ctl) {
    return _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, _mm256_shuffle_epi8(xv, ctl)));
  };
  for (int64_t c = 0; c < full; c += 16) {
    __m256i xv[TB];
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * k + c));
    ARMOR_UNROLL for (int r = 0; r < R; ++r) {
      const uint8_t* m = mask + r * (k / 8) + c / 8;
      const __m256i ctl = gather_control(m[0], m[1]);
      const __m256 w = load8(vals + r * (k / 2) + c / 2);
      ARMOR_UNROLL for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_fmadd_ps(w, kept_x(xv[t], ctl), acc[r][t]);
    }
  }
  if (full < k) {  // the last 8 columns: lane 0 only
    __m256i xv[TB];
    ARMOR_UNROLL for (int t = 0; t < TB; ++t)
      xv[t] = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + t * k + full)));
    ARMOR_UNROLL for (int r = 0; r < R; ++r) {
      const __m256i ctl = gather_control(mask[r * (k / 8) + full / 8], 0);
      const __m256 w = load4(vals + r * (k / 2) + full / 2);
      ARMOR_UNROLL for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_fmadd_ps(w, kept_x(xv[t], ctl), acc[r][t]);
    }
  }
  store<R, TB, W>(acc, scale, y, ldy);
}

template <typename X, typename W, typename O, typename Block>
void run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0,
         int64_t n1, at::Tensor& y, const Block& block) {
  const int64_t k = x.size(1), ldy = y.stride(0);
  const X* xp = x.data_ptr<X>();
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  O* yp = y.data_ptr<O>();
  for_blocks<kRows, kTokens>(x.size(0), n0, n1, [&](int64_t r, auto nr, int64_t t0, int tb) {
    with_tokens<kTokens>(tb, [&](auto tbc) {
      block(nr, tbc, xp + t0 * k, k, vp + r * (k / 2), mp + r * (k / 8), scale ? scale + r : nullptr,
            yp + t0 * ldy + r, ldy);
    });
  });
}

// The expand kernel for values W and outputs O (O = W unless W is int8).
template <typename W, typename O>
void run_expand(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale,
                int64_t n0, int64_t n1, at::Tensor& y) {
  run<float, W, O>(x, values, bitmask, scale, n0, n1, y, [](auto r, auto t, auto... a) {
    expand_block<decltype(r)::value, decltype(t)::value, W, O>(a...);
  });
}

template <typename W>
void run_gather(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale,
                int64_t n0, int64_t n1, at::Tensor& y) {
  run<c10::BFloat16, W, c10::BFloat16>(x, values, bitmask, scale, n0, n1, y, [](auto r, auto t, auto... a) {
    gather_block<decltype(r)::value, decltype(t)::value, W>(a...);
  });
}

// fp32 → bf16, round to nearest even (finite values), 8 at a time.
inline __m128i to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store8(float* d, __m256 v) { _mm256_storeu_ps(d, v); }
inline void store8(c10::Half* d, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(c10::BFloat16* d, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(d), to_bf16(v)); }

// fp32 and int8 values (the row's scale folded in) to a slab of O, 8 columns per vpermps.
template <typename W, typename O>
void decompress_wide(const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0, int64_t n1,
                     at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8;
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  O* dp = dense.data_ptr<O>();
  for_rows(n0, n1, [&](int64_t r) {
    const W* v = vp + r * (k / 2);
    const uint8_t* m = mp + r * (k / 8);
    O* d = dp + (r - n0) * k;
    const __m256 s = _mm256_set1_ps(scale ? scale[r] : 1.f);
    for (int64_t c = 0; c < k; c += 8) {
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.lane[m[c / 8]].data()));
      __m256 w = load4(v + c / 2);
      if constexpr (std::is_same_v<W, int8_t>) w = _mm256_mul_ps(w, s);
      store8(d + c, _mm256_permutevar8x32_ps(w, idx));
    }
  });
}

// B_in / B_out blocks, 1-kBlockTokens tokens: per block its activations widened to fp32 once, then
// dot products along the block's columns, kRows rows × 2 tokens of accumulators (the S kernels'
// register block), the block's rows re-read from L1/L2 per further 2 tokens. Against linear.cpp's
// scalar-per-row loop and at::bmm it reads B at about the S kernel's rate (1 token, one thread:
// 2 MB of B's at 4096×4096 b = 128 took ~1.4 ms in the loop).
constexpr int64_t kBlockTokens = 16;

template <int R, int TB, typename S>
void block_dots(const float* x, int64_t b, const S* w, S* y, int64_t ldy) {
  __m256 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t c = 0; c < b; c += 8) {
    __m256 wv[R];
    ARMOR_UNROLL for (int r = 0; r < R; ++r) wv[r] = load8(w + r * b + c);
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * b + c);
      ARMOR_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  ARMOR_UNROLL for (int r = 0; r < R; ++r)
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = S(hsum(acc[r][t]));
}

template <typename S>
void blocks(const S* x, const S* w, int64_t tokens, int64_t nb, int64_t b, S* y) {
  const int64_t k = nb * b;
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> xf(tokens * b);
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; c < b; ++c) xf[t * b + c] = static_cast<float>(x[t * k + j * b + c]);
      const S* wj = w + j * b * b;
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
        with_tokens<kTokens>(static_cast<int>(std::min<int64_t>(kTokens, tokens - t0)), [&](auto tbc) {
          constexpr int TB = decltype(tbc)::value;
          S* yj = y + t0 * k + j * b;
          int64_t o = 0;
          for (; o + kRows <= b; o += kRows) block_dots<kRows, TB>(xf.data() + t0 * b, b, wj + o * b, yj + o, k);
          for (; o < b; ++o) block_dots<1, TB>(xf.data() + t0 * b, b, wj + o * b, yj + o, k);
        });
      }
    }
  });
}

}  // namespace

at::ScalarType activation_dtype(at::ScalarType weight, at::ScalarType model, int64_t tokens) {
  const bool gather = model == at::kBFloat16 && (weight == at::kBFloat16 || weight == at::kChar);
  return gather && tokens <= kGatherTokens ? at::kBFloat16 : at::kFloat;
}

void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0,
          int64_t n1, at::Tensor& y) {
  const at::ScalarType w = values.scalar_type(), o = y.scalar_type();
  if (x.scalar_type() == at::kBFloat16) {  // activation_dtype chose the gather kernel
    if (w == at::kBFloat16) return run_gather<c10::BFloat16>(x, values, bitmask, scale, n0, n1, y);
    if (w == at::kChar) return run_gather<int8_t>(x, values, bitmask, scale, n0, n1, y);
  }
  switch (w) {
    case at::kBFloat16: return run_expand<c10::BFloat16, c10::BFloat16>(x, values, bitmask, scale, n0, n1, y);
    case at::kHalf: return run_expand<c10::Half, c10::Half>(x, values, bitmask, scale, n0, n1, y);
    case at::kFloat: return run_expand<float, float>(x, values, bitmask, scale, n0, n1, y);
    case at::kChar:
      if (o == at::kBFloat16) return run_expand<int8_t, c10::BFloat16>(x, values, bitmask, scale, n0, n1, y);
      if (o == at::kHalf) return run_expand<int8_t, c10::Half>(x, values, bitmask, scale, n0, n1, y);
      return run_expand<int8_t, float>(x, values, bitmask, scale, n0, n1, y);
    default: TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", w);
  }
}

bool block_diag(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t t = x.size(0), nb = w.size(0), b = w.size(1);
  if (t > kBlockTokens || b % 8) return false;
  switch (x.scalar_type()) {
    case at::kBFloat16:
      blocks(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), t, nb, b, y.data_ptr<c10::BFloat16>());
      return true;
    case at::kHalf: blocks(x.data_ptr<c10::Half>(), w.data_ptr<c10::Half>(), t, nb, b, y.data_ptr<c10::Half>()); return true;
    case at::kFloat: blocks(x.data_ptr<float>(), w.data_ptr<float>(), t, nb, b, y.data_ptr<float>()); return true;
    default: return false;
  }
}

void decompress(const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0, int64_t n1,
                at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8;
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  switch (values.scalar_type()) {
    case at::kBFloat16:
    case at::kHalf: {  // bf16 and fp16 alike: move 16-bit values with pshufb
      const uint16_t* vp = static_cast<const uint16_t*>(values.data_ptr());
      uint16_t* dp = static_cast<uint16_t*>(dense.data_ptr());
      return for_rows(n0, n1, [&](int64_t r) {
        const uint16_t* v = vp + r * (k / 2);
        const uint8_t* m = mp + r * (k / 8);
        uint16_t* d = dp + (r - n0) * k;
        for (int64_t c = 0; c < k; c += 8) {
          const __m128i shuf = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.bytes[m[c / 8]].data()));
          const __m128i kept = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + c / 2));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + c), _mm_shuffle_epi8(kept, shuf));
        }
      });
    }
    case at::kFloat: return decompress_wide<float, float>(values, bitmask, scale, n0, n1, dense);
    case at::kChar:
      switch (dense.scalar_type()) {
        case at::kBFloat16: return decompress_wide<int8_t, c10::BFloat16>(values, bitmask, scale, n0, n1, dense);
        case at::kHalf: return decompress_wide<int8_t, c10::Half>(values, bitmask, scale, n0, n1, dense);
        default: return decompress_wide<int8_t, float>(values, bitmask, scale, n0, n1, dense);
      }
    default: TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
  }
}

}  // namespace armor::ARMOR_NS
