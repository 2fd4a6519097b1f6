// AVX-512 kernels (F/BW/VL/DQ + VBMI2 + BF16: Zen 4, Sapphire Rapids and later).
//
// K-vectorised straight from the checkpoint layout: a 32-bit slice of a row's bitmask is the
// expand mask that puts the chunk's 16 kept values at their 32 columns. bf16: vpexpandw, then
// one vdpbf16ps per token against 32 bf16 activations. fp16/fp32: widen the 16 kept values to
// fp32, two vexpandps, two FMAs per token.
#include <immintrin.h>

#include "sparse24.h"
#include "tiles.h"

namespace armor::ARMOR_NS {
namespace {

constexpr int kRows = 4, kTokens = 4;  // 16 accumulators + 4 rows + 1 activation of 32 zmm
constexpr int kPrefetchBytes = 1024;

inline __m512 load_kept(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_kept(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// One 32-column chunk (`width` = 8..32 columns; a partial chunk only at a row's end).
template <int R, int TB, typename W>
ARMOR_INLINE void chunk_fp32(__m512 (&acc)[R][TB], const float* x, int64_t k, const W* vals, const uint8_t* mask,
                       int64_t c, int64_t width) {
  const bool full = width == 32;
  const __mmask16 vm = full ? 0xFFFF : (1u << (width / 2)) - 1;
  const __mmask16 x0m = width >= 16 ? 0xFFFF : (1u << width) - 1;
  const __mmask16 x1m = full ? 0xFFFF : width > 16 ? (1u << (width - 16)) - 1 : 0;
  __m512 lo[R], hi[R];
  ARMOR_UNROLL for (int r = 0; r < R; ++r) {
    const uint32_t m = mask_bits(mask + r * (k / 8) + c / 8, full ? 4 : width / 8);
    const __m512 v = load_kept(vals + r * (k / 2) + c / 2, vm);
    lo[r] = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), v);
    hi[r] = _mm512_maskz_expand_ps(static_cast<__mmask16>(m >> 16), _mm512_shuffle_f32x4(v, v, 0xEE));
  }
  ARMOR_UNROLL for (int t = 0; t < TB; ++t) {
    const __m512 x0 = _mm512_maskz_loadu_ps(x0m, x + t * k + c), x1 = _mm512_maskz_loadu_ps(x1m, x + t * k + c + 16);
    ARMOR_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(hi[r], x1, _mm512_fmadd_ps(lo[r], x0, acc[r][t]));
  }
}

template <int R, int TB, typename W>
void block_fp32(const float* x, int64_t k, const W* vals, const uint8_t* mask, W* y, int64_t ldy) {
  __m512 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm512_setzero_ps();
  const int64_t full = k / 32 * 32;
  for (int64_t c = 0; c < full; c += 32) chunk_fp32<R, TB>(acc, x, k, vals, mask, c, 32);
  if (full < k) chunk_fp32<R, TB>(acc, x, k, vals, mask, full, k - full);
  ARMOR_UNROLL for (int r = 0; r < R; ++r)
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = W(_mm512_reduce_add_ps(acc[r][t]));
}

template <int R, int TB>
ARMOR_INLINE void chunk_bf16(__m512 (&acc)[R][TB], const c10::BFloat16* x, int64_t k, const c10::BFloat16* vals,
                       const uint8_t* mask, int64_t c, int64_t width) {
  const bool full = width == 32;
  const __mmask32 xm = full ? 0xFFFFFFFFu : (1u << width) - 1;
  __m512i w[R];
  ARMOR_UNROLL for (int r = 0; r < R; ++r) {
    // R rows are 2R streams; help the hardware prefetcher (a prefetch past the row's end is harmless)
    _mm_prefetch(reinterpret_cast<const char*>(vals + r * (k / 2) + c / 2) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mask + r * (k / 8) + c / 8) + kPrefetchBytes / 4, _MM_HINT_T0);
    const __m256i v = _mm256_maskz_loadu_epi16(full ? 0xFFFF : (1u << (width / 2)) - 1, vals + r * (k / 2) + c / 2);
    w[r] = _mm512_maskz_expand_epi16(mask_bits(mask + r * (k / 8) + c / 8, full ? 4 : width / 8),
                                     _mm512_castsi256_si512(v));
  }
  ARMOR_UNROLL for (int t = 0; t < TB; ++t) {
    const __m512i xv = _mm512_maskz_loadu_epi16(xm, x + t * k + c);
    ARMOR_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w[r], (__m512bh)xv);
  }
}

template <int R, int TB>
void block_bf16(const c10::BFloat16* x, int64_t k, const c10::BFloat16* vals, const uint8_t* mask,
                c10::BFloat16* y, int64_t ldy) {
  __m512 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm512_setzero_ps();
  const int64_t full = k / 32 * 32;
  for (int64_t c = 0; c < full; c += 32) chunk_bf16<R, TB>(acc, x, k, vals, mask, c, 32);
  if (full < k) chunk_bf16<R, TB>(acc, x, k, vals, mask, full, k - full);
  ARMOR_UNROLL for (int r = 0; r < R; ++r)
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][t]));
}

template <typename W, typename X, typename Block>
void run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
         at::Tensor& y, const Block& block) {
  const int64_t k = x.size(1), ldy = y.stride(0);
  const X* xp = x.data_ptr<X>();
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  W* yp = y.data_ptr<W>();
  for_blocks<kRows, kTokens>(x.size(0), n0, n1, [&](int64_t r, auto nr, int64_t t0, int tb) {
    with_tokens<kTokens>(tb, [&](auto tbc) {
      block(nr, tbc, xp + t0 * k, k, vp + r * (k / 2), mp + r * (k / 8), yp + t0 * ldy + r, ldy);
    });
  });
}

}  // namespace

at::ScalarType activation_dtype(at::ScalarType weight) {
  return weight == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
          at::Tensor& y) {
  switch (values.scalar_type()) {
    case at::kBFloat16:
      return run<c10::BFloat16, c10::BFloat16>(x, values, bitmask, n0, n1, y, [](auto r, auto t, auto... a) {
        block_bf16<decltype(r)::value, decltype(t)::value>(a...);
      });
    case at::kHalf:
      return run<c10::Half, float>(x, values, bitmask, n0, n1, y, [](auto r, auto t, auto... a) {
        block_fp32<decltype(r)::value, decltype(t)::value>(a...);
      });
    case at::kFloat:
      return run<float, float>(x, values, bitmask, n0, n1, y, [](auto r, auto t, auto... a) {
        block_fp32<decltype(r)::value, decltype(t)::value>(a...);
      });
    default:
      TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
  }
}

void decompress(const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1, at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8, full = k / 32 * 32;
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  if (values.element_size() == 2) {  // bf16 and fp16 alike: 16-bit lanes
    const uint16_t* vp = static_cast<const uint16_t*>(values.data_ptr());
    uint16_t* dp = static_cast<uint16_t*>(dense.data_ptr());
    for_rows(n0, n1, [&](int64_t r) {
      const uint16_t* v = vp + r * (k / 2);
      const uint8_t* m = mp + r * (k / 8);
      uint16_t* d = dp + (r - n0) * k;
      for (int64_t c = 0; c < full; c += 32)
        _mm512_storeu_si512(d + c, _mm512_maskz_expandloadu_epi16(mask_bits(m + c / 8, 4), v + c / 2));
      if (full < k)
        _mm512_mask_storeu_epi16(d + full, (1u << (k - full)) - 1,
                                 _mm512_maskz_expandloadu_epi16(mask_bits(m + full / 8, (k - full) / 8), v + full / 2));
    });
  } else {
    TORCH_CHECK(values.scalar_type() == at::kFloat, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
    const float* vp = values.data_ptr<float>();
    float* dp = dense.data_ptr<float>();
    for_rows(n0, n1, [&](int64_t r) {
      const float* v = vp + r * (k / 2);
      const uint8_t* m = mp + r * (k / 8);
      float* d = dp + (r - n0) * k;
      for (int64_t c = 0; c < k; c += 16) {  // 16 columns hold 8 kept values
        const int64_t width = std::min<int64_t>(16, k - c);
        const __mmask16 m16 = static_cast<__mmask16>(mask_bits(m + c / 8, width / 8));
        _mm512_mask_storeu_ps(d + c, width == 16 ? 0xFFFF : 0xFF, _mm512_maskz_expandloadu_ps(m16, v + c / 2));
      }
    });
  }
}

}  // namespace armor::ARMOR_NS
