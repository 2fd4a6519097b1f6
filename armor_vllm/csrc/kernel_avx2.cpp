// AVX2 + FMA + F16C kernels: every x86-64 CPU of the last decade.
//
// K-vectorised from the checkpoint layout, 8 columns (one bitmask byte, 4 kept values) per step:
// the 4 values are widened to fp32 in lanes 0..3 of a ymm whose lanes 4..7 are zero, and one
// vpermps with a 256-entry table keyed by the bitmask byte moves each to its column (pruned
// columns read a zero lane). One FMA per token against 8 fp32 activations follows. Decompression
// for prefill is one pshufb per 8 columns for 16-bit types.
#include <immintrin.h>

#include <array>

#include "sparse24.h"
#include "tiles.h"

namespace armor::ARMOR_NS {
namespace {

constexpr int kRows = 4, kTokens = 2;  // 8 accumulators + 4 rows + 1 activation of 16 ymm

// For each bitmask byte: column j's source lane (its rank among the kept, or 4 = zero) as vpermps
// indices, and as pshufb byte indices for 16-bit values (0x80 = zero byte).
struct Tables {
  alignas(32) std::array<std::array<int32_t, 8>, 256> lane{};
  alignas(16) std::array<std::array<uint8_t, 16>, 256> bytes{};
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool kept = (b >> j) & 1;
        lane[b][j] = kept ? rank : 4;
        bytes[b][2 * j] = kept ? 2 * rank : 0x80;
        bytes[b][2 * j + 1] = kept ? 2 * rank + 1 : 0x80;
        rank += kept;
      }
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int R, int TB, typename W>
void block(const float* x, int64_t k, const W* vals, const uint8_t* mask, W* y, int64_t ldy) {
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
  ARMOR_UNROLL for (int r = 0; r < R; ++r)
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = W(hsum(acc[r][t]));
}

template <typename W>
void run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
         at::Tensor& y) {
  const int64_t k = x.size(1), ldy = y.stride(0);
  const float* xp = x.data_ptr<float>();
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  W* yp = y.data_ptr<W>();
  for_blocks<kRows, kTokens>(x.size(0), n0, n1, [&](int64_t r, auto nr, int64_t t0, int tb) {
    with_tokens<kTokens>(tb, [&](auto tbc) {
      block<decltype(nr)::value, decltype(tbc)::value>(xp + t0 * k, k, vp + r * (k / 2), mp + r * (k / 8),
                                                       yp + t0 * ldy + r, ldy);
    });
  });
}

}  // namespace

at::ScalarType activation_dtype(at::ScalarType) { return at::kFloat; }

void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
          at::Tensor& y) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return run<c10::BFloat16>(x, values, bitmask, n0, n1, y);
    case at::kHalf: return run<c10::Half>(x, values, bitmask, n0, n1, y);
    case at::kFloat: return run<float>(x, values, bitmask, n0, n1, y);
    default: TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
  }
}

bool block_diag(const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }

void decompress(const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1, at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8;
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  if (values.element_size() == 2) {  // bf16 and fp16 alike: move 16-bit values with pshufb
    const uint16_t* vp = static_cast<const uint16_t*>(values.data_ptr());
    uint16_t* dp = static_cast<uint16_t*>(dense.data_ptr());
    for_rows(n0, n1, [&](int64_t r) {
      const uint16_t* v = vp + r * (k / 2);
      const uint8_t* m = mp + r * (k / 8);
      uint16_t* d = dp + (r - n0) * k;
      for (int64_t c = 0; c < k; c += 8) {
        const __m128i shuf = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.bytes[m[c / 8]].data()));
        const __m128i kept = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + c / 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + c), _mm_shuffle_epi8(kept, shuf));
      }
    });
  } else {
    TORCH_CHECK(values.scalar_type() == at::kFloat, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
    const float* vp = values.data_ptr<float>();
    float* dp = dense.data_ptr<float>();
    for_rows(n0, n1, [&](int64_t r) {
      const float* v = vp + r * (k / 2);
      const uint8_t* m = mp + r * (k / 8);
      float* d = dp + (r - n0) * k;
      for (int64_t c = 0; c < k; c += 8) {
        const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.lane[m[c / 8]].data()));
        _mm256_storeu_ps(d + c, _mm256_permutevar8x32_ps(load4(v + c / 2), idx));
      }
    });
  }
}

}  // namespace armor::ARMOR_NS
