// AVX-512 kernels (F/BW/VL/DQ + VBMI2 + BF16: Zen 4, Sapphire Rapids and later).
//
// Up to 7 tokens, K-vectorised straight from the checkpoint layout: a 32-bit slice of a row's
// bitmask is the expand mask that puts the chunk's 16 kept values at their 32 columns. bf16:
// vpexpandw, then one vdpbf16ps per token against 32 bf16 activations. fp16/fp32/int8: widen the
// 16 kept values to fp32, two vexpandps, two FMAs per token (int8 at every token count, its row's
// scale applied once per output). From 8 tokens bf16 turns the loop
// around (the "wide" kernel below): tokens along the lanes, kept values only. The B_in / B_out
// blocks (bf16) have kernels of their own further down.
#include <immintrin.h>

#include <array>
#include <cstring>
#include <type_traits>

#include "sparse24.h"
#include "tiles.h"

namespace armor::ARMOR_NS {
namespace {

constexpr int kRows = 4, kTokens = 4;  // 16 accumulators + 4 rows + 1 activation of 32 zmm
constexpr int kPrefetchBytes = 512;  // measured at 1 and 4 tokens: 256 ≈ 512, 1024 and 2048 slower
constexpr int kWideTokens = 8;  // from this many tokens bf16 takes the wide kernel

inline __m512 load_kept(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_kept(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load_kept(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

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

// Outputs in O (W's own type, or the model dtype for int8 values, scaled by their rows' `scale`).
template <int R, int TB, typename W, typename O>
void block_fp32(const float* x, int64_t k, const W* vals, const uint8_t* mask, const float* scale, O* y,
                int64_t ldy) {
  __m512 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm512_setzero_ps();
  const int64_t full = k / 32 * 32;
  for (int64_t c = 0; c < full; c += 32) chunk_fp32<R, TB>(acc, x, k, vals, mask, c, 32);
  if (full < k) chunk_fp32<R, TB>(acc, x, k, vals, mask, full, k - full);
  ARMOR_UNROLL for (int r = 0; r < R; ++r) {
    float s = 1.f;
    if constexpr (std::is_same_v<W, int8_t>) s = scale[r];
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = O(s * _mm512_reduce_add_ps(acc[r][t]));
  }
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

// bf16, T >= kWideTokens (batched decode): vectorised over tokens instead of over K, so that only
// kept weights are multiplied, half of dense's vdpbf16ps. A group of 4 columns keeps 2 values,
// one 32-bit word of `values`: broadcast (a row's next V words are one load of the vector's width,
// one permute each; the ymm path then needs no extract and does not spill), it
// meets a table entry holding, for V tokens, the activations of the group's two kept columns,
// interleaved. The table has an entry for each of the 6 positions a pair can take (K/4 · 6 · 4V
// bytes per V tokens); threads walk it in K slices that stay in L1, kChunkRows rows at a time
// (accumulated in an fp32 buffer). V = 16 tokens (zmm), or 8 (ymm) for a block of at most 8: the
// table loads, one per vdpbf16ps, are what the kernel waits on.
constexpr int kWideRows = 8;                 // 8 independent vdpbf16ps chains cover its latency
constexpr int64_t kSliceGroups = 64;         // 256 columns: 24 KB of table at V = 16
constexpr int64_t kChunkRows = 32;           // rows that walk the slices together (measured: 16, 32, 64)
constexpr int kPairs = 6;
// A group's two kept columns a < b as a nibble n = 2^a + 2^b is one of 3, 5, 6, 9, 10, 12: n >> 1 is
// 1..6, so its table entry is found with a shift and no lookup.
constexpr uint32_t kPairNibbles[kPairs] = {3, 5, 6, 9, 10, 12};

template <int V> struct Lanes;  // V fp32 accumulators: one token each
template <> struct Lanes<16> {
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_bf16(uint16_t* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }
  using I = __m512i;  // V kept words of a row
  static I words(const uint32_t* p, int count) {
    return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << count) - 1), p);
  }
  static F dp(F a, const uint32_t* pairs, uint32_t w) {
    return _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(pairs), (__m512bh)_mm512_set1_epi32(w));
  }
  // word j held in a register: a permute instead of a broadcast load per multiply
  static F dp(F a, const uint32_t* pairs, I words, int j) {
    const __m512i w = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), words);
    return _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(pairs), (__m512bh)w);
  }
};
template <> struct Lanes<8> {
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_bf16(uint16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)_mm256_cvtneps_pbh(v)); }
  static F dp(F a, const uint32_t* pairs, uint32_t w) {
    return _mm256_dpbf16_ps(a, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs)),
                            (__m256bh)_mm256_set1_epi32(w));
  }
  using I = __m256i;
  static I words(const uint32_t* p, int count) {
    return _mm256_maskz_loadu_epi32(static_cast<__mmask8>((1u << count) - 1), p);
  }
  static F dp(F a, const uint32_t* pairs, I words, int j) {
    const __m256i w = _mm256_permutexvar_epi32(_mm256_set1_epi32(j), words);
    return _mm256_dpbf16_ps(a, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs)), (__m256bh)w);
  }
};

// Rows × V bf16 results, a row's V tokens contiguous (converted a vector at a time, as the
// accumulators hold them), to y[t·ldy + r] for the first `tokens` tokens.
template <int V>
ARMOR_INLINE void store_tokens(const uint16_t* h, int64_t rows, int tokens, uint16_t* y, int64_t ldy) {
  for (int t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) y[t * ldy + r] = h[r * V + t];
}

// table[(g·6 + (n >> 1) - 1)·V + t] = (x[t, 4g + a], x[t, 4g + b]) for tokens t < tb, zero words after.
// A group's 4 columns of 8 tokens are one 8-qword gather; each entry is then one word permute of
// them (two-source for 16 tokens).
template <int V>
void pair_table(const uint16_t* x, int64_t k, int tb, uint32_t* table) {
  alignas(64) uint16_t idx[kPairs][32];
  for (int p = 0; p < kPairs; ++p) {
    const uint32_t n = kPairNibbles[p], lo = __builtin_ctz(n), hi = 31 - __builtin_clz(n);
    for (int t = 0; t < 16; ++t) idx[p][2 * t] = 4 * t + lo, idx[p][2 * t + 1] = 4 * t + hi;
  }
  const __m512i rows = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(2 * k));
  const __m512i rows8 = _mm512_add_epi64(rows, _mm512_set1_epi64(16 * k));
  const __mmask8 m0 = tb >= 8 ? 0xFF : (1u << tb) - 1, m1 = tb >= 16 ? 0xFF : tb > 8 ? (1u << (tb - 8)) - 1 : 0;
  at::parallel_for(0, k / 4, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const void* col = x + 4 * g;
      const __m512i lo = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), m0, rows, col, 1);
      const __m512i hi = V == 16 ? _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), m1, rows8, col, 1) : lo;
      uint32_t* e = table + g * kPairs * V;
      ARMOR_UNROLL for (int p = 0; p < kPairs; ++p) {
        const __m512i pairs = _mm512_permutex2var_epi16(lo, _mm512_load_si512(idx[p]), hi);
        if constexpr (V == 16) {
          _mm512_storeu_si512(e + V * p, pairs);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + V * p), _mm512_castsi512_si256(pairs));
        }
      }
    }
  });
}

// Where each group's pair sits in the table, for R rows' groups [g0, g0 + 2·nbytes), computed up
// front from 32 bitmask bytes a row: group g's entry is (n >> 1)·V words = (n & 14)·2V bytes past
// the group's table minus one entry. Out of the multiply loop (which shifted and masked each nibble
// next to its table load and vdpbf16ps) the core is 3-6% faster at 8-32 tokens (idle VM, A/B).
template <int V, int R>
ARMOR_INLINE void entry_offsets(const uint8_t* mask, int64_t row_bytes, int64_t nbytes,
                                uint16_t (&off)[R][kSliceGroups]) {
  const __mmask32 m = nbytes >= 32 ? 0xFFFFFFFFu : (1u << nbytes) - 1;
  const __m512i even = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);  // lo[i], hi[i] interleaved
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));
  const __m512i fourteen = _mm512_set1_epi16(14);
  constexpr int kShift = V == 16 ? 5 : 4;  // × 2V bytes
  ARMOR_UNROLL for (int i = 0; i < R; ++i) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, mask + i * row_bytes));
    const __m512i lo = _mm512_slli_epi16(_mm512_and_si512(b, fourteen), kShift);
    const __m512i hi = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(b, 4), fourteen), kShift);
    _mm512_store_si512(off[i], _mm512_permutex2var_epi16(lo, even, hi));
    _mm512_store_si512(off[i] + 32, _mm512_permutex2var_epi16(lo, odd, hi));
  }
}

// R rows' groups [g0, g1) (at most a slice). `ahead`: how far (in groups) their next slice is,
// prefetched into L2 meanwhile: the 2·kChunkRows strided streams of a chunk are too many for the
// hardware prefetcher.
template <int V, int R>
ARMOR_INLINE void wide_block(const uint32_t* table, int64_t k, const uint32_t* vals, const uint8_t* mask, int64_t g0,
                             int64_t g1, int64_t ahead, float* acc) {
  ARMOR_UNROLL for (int i = 0; i < R; ++i) {
    const char* v = reinterpret_cast<const char*>(vals + i * (k / 4) + g0 + ahead);
    for (int64_t b = 0; b < kSliceGroups * 4; b += 64) _mm_prefetch(v + b, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(mask + i * (k / 8) + (g0 + ahead) / 2), _MM_HINT_T1);
  }
  alignas(64) uint16_t off[R][kSliceGroups];
  entry_offsets<V, R>(mask + g0 / 2, k / 8, (g1 - g0) / 2, off);
  typename Lanes<V>::F a[R];
  ARMOR_UNROLL for (int i = 0; i < R; ++i) a[i] = Lanes<V>::load(acc + i * V);
  // V groups at a time: each row's V kept pairs are one load (masked in a slice's last step)
  const int64_t n = g1 - g0;
  for (int64_t g = 0; g < n; g += V) {
    const int count = static_cast<int>(std::min<int64_t>(V, n - g));
    typename Lanes<V>::I words[R];
    ARMOR_UNROLL for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(vals + i * (k / 4) + g0 + g + 16), _MM_HINT_T0);
      words[i] = Lanes<V>::words(vals + i * (k / 4) + g0 + g, count);
    }
    const char* e = reinterpret_cast<const char*>(table + ((g0 + g) * kPairs - 1) * V);
    auto steps = [&](auto full) {
      ARMOR_UNROLL for (int j = 0; j < V; ++j) {
        if (!decltype(full)::value && j == count) break;
        ARMOR_UNROLL for (int i = 0; i < R; ++i)
          a[i] = Lanes<V>::dp(a[i], reinterpret_cast<const uint32_t*>(e + j * kPairs * V * 4 + off[i][g + j]), words[i], j);
      }
    };
    if (count == V) steps(std::true_type{}); else steps(std::false_type{});
  }
  ARMOR_UNROLL for (int i = 0; i < R; ++i) Lanes<V>::store(acc + i * V, a[i]);
}

// y[t0 : t0 + tb, n0:n1] for tb <= V tokens from x's rows t0.. (xp points at row t0).
template <int V>
void wide_pass(const uint16_t* xp, int64_t k, int tb, const uint32_t* vp, const uint8_t* mp, int64_t n0, int64_t n1,
               uint16_t* yp, int64_t ldy, uint32_t* table) {
  const int64_t groups = k / 4;
  pair_table<V>(xp, k, tb, table);
  const int64_t tiles = (n1 - n0 + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kChunkRows * V];
    const int64_t last = std::min(n1, n0 + end * kTile);
    for (int64_t r0 = n0 + begin * kTile; r0 < last; r0 += kChunkRows) {
      const int64_t r1 = std::min(last, r0 + kChunkRows);
      std::fill(acc, acc + kChunkRows * V, 0.f);
      for (int64_t gs = 0; gs < groups; gs += kSliceGroups) {
        const int64_t ge = std::min(groups, gs + kSliceGroups);
        // next: this row's next slice, or after the last one the first slice of the next chunk's row
        const int64_t ahead = ge < groups ? kSliceGroups : kChunkRows * groups - gs;
        int64_t r = r0;
        for (; r + kWideRows <= r1; r += kWideRows)
          wide_block<V, kWideRows>(table, k, vp + r * (k / 4), mp + r * (k / 8), gs, ge, ahead, acc + (r - r0) * V);
        for (; r < r1; ++r)
          wide_block<V, 1>(table, k, vp + r * (k / 4), mp + r * (k / 8), gs, ge, ahead, acc + (r - r0) * V);
      }
      alignas(64) uint16_t h[kChunkRows * V];
      for (int64_t r = 0; r < r1 - r0; ++r) Lanes<V>::store_bf16(h + r * V, Lanes<V>::load(acc + r * V));
      store_tokens<V>(h, r1 - r0, tb, yp + r0, ldy);
    }
  });
}

void spmm_wide_bf16(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
                    at::Tensor& y) {
  const int64_t k = x.size(1), tokens = x.size(0), ldy = y.stride(0);
  const uint16_t* xp = static_cast<const uint16_t*>(x.data_ptr());
  const uint32_t* vp = static_cast<const uint32_t*>(values.data_ptr());  // one word per group: its 2 kept
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  uint16_t* yp = static_cast<uint16_t*>(y.data_ptr());
  // ATen's allocator aligns to 64 bytes: a table entry is then one cache line, not a split load
  at::Tensor table = at::empty({k / 4 * kPairs * 16}, at::kInt);
  uint32_t* tp = static_cast<uint32_t*>(table.data_ptr());
  for (int64_t t0 = 0; t0 < tokens; t0 += 16) {
    const int tb = static_cast<int>(std::min<int64_t>(16, tokens - t0));
    if (tb > 8) {
      wide_pass<16>(xp + t0 * k, k, tb, vp, mp, n0, n1, yp + t0 * ldy, ldy, tp);
    } else {
      wide_pass<8>(xp + t0 * k, k, tb, vp, mp, n0, n1, yp + t0 * ldy, ldy, tp);
    }
  }
}

// B_in / B_out blocks (bf16), the wide kernel's scheme on a dense b×b block: per block and V
// tokens a table of the block's activation pairs (word c of token t at c·V + t), against which
// each B row's pairs are broadcast, kBlockRows rows at a time. B is one contiguous stream, read
// once per call (every token block of a block while its rows are in L1) and prefetched two row
// groups ahead, a cache line per step of the multiply loop: a group's lines prefetched in one
// burst at its start left B streaming from DRAM at 4-5 GB/s (8-16 tokens, one thread; spread:
// 8-11 GB/s, the B's ~40% faster). The threads own whole blocks. Against at::bmm (~30 µs a
// call, and B read at about half the core kernel's bandwidth) the kernel at least halves the B
// blocks' share of a 7B-shape layer at 4-16 tokens.
constexpr int kBlockRows = 16;  // 16 accumulators + the table entry

template <int V, int R>
ARMOR_INLINE void block_rows(const uint32_t* tables, int64_t nt, int64_t half, const uint32_t* w, int tokens,
                             uint16_t* y, int64_t ldy) {
  for (int64_t tb = 0; tb < nt; ++tb) {
    const uint32_t* table = tables + tb * half * V;
    typename Lanes<V>::F a[R];
    ARMOR_UNROLL for (int i = 0; i < R; ++i) a[i] = Lanes<V>::zero();
    for (int64_t c = 0; c < half; ++c) {
      if (R > 1 && tb == 0) _mm_prefetch(reinterpret_cast<const char*>(w + 2 * R * half + R * c), _MM_HINT_T0);
      ARMOR_UNROLL for (int i = 0; i < R; ++i) a[i] = Lanes<V>::dp(a[i], table + c * V, w[i * half + c]);
    }
    alignas(64) uint16_t h[R * V];
    ARMOR_UNROLL for (int i = 0; i < R; ++i) Lanes<V>::store_bf16(h + i * V, a[i]);
    store_tokens<V>(h, R, std::min<int>(V, tokens - static_cast<int>(tb) * V), y + tb * V * ldy, ldy);
  }
}

// 5-8 tokens: a zmm holds two pairs c, c + 1 of 8 tokens (lane 2t + (c & 1) holds token t's pair
// c), so a B row's two words are one 64-bit broadcast and each vdpbf16ps does 8 tokens × 4 columns;
// lanes 2t and 2t + 1 are summed at the end. Against the ymm form (8 tokens × 2 columns) the B's
// take ~20% less with B in L2; from DRAM only with the prefetches into L2 (T1), ~20% less too.
template <int R>
ARMOR_INLINE void block_rows_pairs(const uint32_t* table, int64_t half, const uint32_t* w, int tokens, uint16_t* y,
                                   int64_t ldy) {
  __m512 a[R];
  ARMOR_UNROLL for (int i = 0; i < R; ++i) a[i] = _mm512_setzero_ps();
  auto step = [&](int64_t c, auto pair) {
    if (R > 1) {  // the row group after next, a cache line per 16 words
      _mm_prefetch(reinterpret_cast<const char*>(w + 2 * R * half + R * c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w + 2 * R * half + R * (c + 1)), _MM_HINT_T1);
    }
    const __m512bh t = (__m512bh)_mm512_load_si512(table + c * 8);
    ARMOR_UNROLL for (int i = 0; i < R; ++i) {
      uint64_t words = w[i * half + c];
      if constexpr (decltype(pair)::value) std::memcpy(&words, w + i * half + c, 8);
      a[i] = _mm512_dpbf16_ps(a[i], t, (__m512bh)_mm512_set1_epi64(static_cast<int64_t>(words)));
    }
  };
  int64_t c = 0;
  for (; c + 2 <= half; c += 2) step(c, std::true_type{});
  if (c < half) step(c, std::false_type{});  // odd half: the last pair alone
  alignas(64) uint16_t h[R * 8];
  ARMOR_UNROLL for (int i = 0; i < R; ++i) {
    const __m512 sums = _mm512_add_ps(a[i], _mm512_permute_ps(a[i], 0xB1));  // lane 2t: token t
    Lanes<8>::store_bf16(h + i * 8, _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x5555, sums)));
  }
  store_tokens<8>(h, R, tokens, y, ldy);
}

// Each thread builds a table per block of its own (64-byte aligned and zeroed: lanes past `tokens`
// contribute nothing), then runs its rows kBlockRows at a time: two pairs per zmm up to 8 tokens,
// else 16 tokens per zmm.
void blocks_bf16(const uint16_t* x, const uint16_t* blocks, int64_t tokens, int64_t nb, int64_t b, uint16_t* y) {
  const bool pairs = tokens <= 8;
  const int64_t half = b / 2, k = nb * b, nt = (tokens + 15) / 16;
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    at::Tensor buffer = at::zeros({pairs ? (half + 1) / 2 * 16 : nt * half * 16}, at::kInt);
    uint32_t* table = static_cast<uint32_t*>(buffer.data_ptr());
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t t = 0; t < tokens; ++t) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(x + t * k + j * b);
        for (int64_t c = 0; c < half; ++c)
          table[pairs ? c / 2 * 16 + 2 * t + (c & 1) : t / 16 * half * 16 + c * 16 + t % 16] = xw[c];
      }
      const uint32_t* w = reinterpret_cast<const uint32_t*>(blocks + j * b * b);
      auto rows = [&](auto r, int64_t o) {
        constexpr int R = decltype(r)::value;
        if (pairs) {
          block_rows_pairs<R>(table, half, w + o * half, static_cast<int>(tokens), y + j * b + o, k);
        } else {
          block_rows<16, R>(table, nt, half, w + o * half, static_cast<int>(tokens), y + j * b + o, k);
        }
      };
      int64_t o = 0;
      for (; o + kBlockRows <= b; o += kBlockRows) rows(std::integral_constant<int, kBlockRows>{}, o);
      for (; o < b; ++o) rows(std::integral_constant<int, 1>{}, o);
    }
  });
}

// 1-4 tokens: dot products along the block's columns instead (32 columns of a B row against 32
// activations per vdpbf16ps, the last chunk masked, so any b), R rows × TB tokens of accumulators
// reduced at the end: with tokens along the lanes most lanes would stay empty.
template <int R, int TB>
void block_dots(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t b, uint16_t* y, int64_t ldy) {
  __m512 acc[R][TB];
  ARMOR_UNROLL for (auto& row : acc) ARMOR_UNROLL for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < b; c += 32) {
    const __mmask32 m = b - c >= 32 ? 0xFFFFFFFFu : (1u << (b - c)) - 1;
    __m512i wv[R];
    ARMOR_UNROLL for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * b + c) + kPrefetchBytes, _MM_HINT_T0);
      wv[r] = _mm512_maskz_loadu_epi16(m, w + r * b + c);
    }
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi16(m, x + t * ldx + c);
      ARMOR_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  ARMOR_UNROLL for (int r = 0; r < R; ++r)
    ARMOR_UNROLL for (int t = 0; t < TB; ++t) y[t * ldy + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][t])).x;
}

void blocks_dots_bf16(const uint16_t* x, const uint16_t* blocks, int tokens, int64_t nb, int64_t b, uint16_t* y) {
  const int64_t k = nb * b;
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    with_tokens<kTokens>(tokens, [&](auto tbc) {
      constexpr int TB = decltype(tbc)::value;
      for (int64_t j = j0; j < j1; ++j) {
        const uint16_t* w = blocks + j * b * b;
        int64_t o = 0;
        for (; o + kRows <= b; o += kRows) block_dots<kRows, TB>(x + j * b, k, w + o * b, b, y + j * b + o, k);
        for (; o < b; ++o) block_dots<1, TB>(x + j * b, k, w + o * b, b, y + j * b + o, k);
      }
    });
  });
}

template <typename W, typename X, typename O, typename Block>
void run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
         at::Tensor& y, const Block& block) {
  const int64_t k = x.size(1), ldy = y.stride(0);
  const X* xp = x.data_ptr<X>();
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  O* yp = y.data_ptr<O>();
  for_blocks<kRows, kTokens>(x.size(0), n0, n1, [&](int64_t r, auto nr, int64_t t0, int tb) {
    with_tokens<kTokens>(tb, [&](auto tbc) {
      block(nr, tbc, xp + t0 * k, k, vp + r * (k / 2), mp + r * (k / 8), r, yp + t0 * ldy + r, ldy);
    });
  });
}

// The fp32 kernel for values W, outputs O and, for int8, the rows' scales.
template <typename W, typename O>
void run_fp32(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale,
              int64_t n0, int64_t n1, at::Tensor& y) {
  run<W, float, O>(x, values, bitmask, n0, n1, y, [scale](auto r, auto t, auto xp, int64_t k, auto vp, auto mp,
                                                          int64_t row, auto yp, int64_t ldy) {
    block_fp32<decltype(r)::value, decltype(t)::value, W, O>(xp, k, vp, mp, scale ? scale + row : nullptr, yp, ldy);
  });
}

// 16 fp32 columns to O, the first `width` of them.
inline void store16(float* d, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(d, m, v); }
inline void store16(c10::Half* d, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(d, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(c10::BFloat16* d, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(d, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// fp32 and int8 values (the row's scale folded in) to a slab of O, 16 columns (8 kept) per vexpandps.
template <typename W, typename O>
void decompress_fp32(const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0, int64_t n1,
                     at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8;
  const W* vp = values.data_ptr<W>();
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  O* dp = dense.data_ptr<O>();
  for_rows(n0, n1, [&](int64_t r) {
    const W* v = vp + r * (k / 2);
    const uint8_t* m = mp + r * (k / 8);
    O* d = dp + (r - n0) * k;
    const __m512 s = _mm512_set1_ps(scale ? scale[r] : 1.f);
    for (int64_t c = 0; c < k; c += 16) {  // 16 columns hold 8 kept values
      const int64_t width = std::min<int64_t>(16, k - c);
      const __mmask16 m16 = static_cast<__mmask16>(mask_bits(m + c / 8, width / 8));
      __m512 w = load_kept(v + c / 2, width == 16 ? 0xFF : 0x0F);
      if constexpr (std::is_same_v<W, int8_t>) w = _mm512_mul_ps(w, s);
      store16(d + c, _mm512_maskz_expand_ps(m16, w), width == 16 ? 0xFFFF : 0xFF);
    }
  });
}

}  // namespace

at::ScalarType activation_dtype(at::ScalarType weight, at::ScalarType, int64_t) {
  return weight == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0,
          int64_t n1, at::Tensor& y) {
  switch (values.scalar_type()) {
    case at::kBFloat16:
      if (x.size(0) >= kWideTokens) return spmm_wide_bf16(x, values, bitmask, n0, n1, y);
      return run<c10::BFloat16, c10::BFloat16, c10::BFloat16>(
          x, values, bitmask, n0, n1, y, [](auto r, auto t, auto xp, int64_t k, auto vp, auto mp, int64_t, auto... a) {
            block_bf16<decltype(r)::value, decltype(t)::value>(xp, k, vp, mp, a...);
          });
    case at::kHalf: return run_fp32<c10::Half, c10::Half>(x, values, bitmask, scale, n0, n1, y);
    case at::kFloat: return run_fp32<float, float>(x, values, bitmask, scale, n0, n1, y);
    case at::kChar:
      switch (y.scalar_type()) {
        case at::kBFloat16: return run_fp32<int8_t, c10::BFloat16>(x, values, bitmask, scale, n0, n1, y);
        case at::kHalf: return run_fp32<int8_t, c10::Half>(x, values, bitmask, scale, n0, n1, y);
        default: return run_fp32<int8_t, float>(x, values, bitmask, scale, n0, n1, y);
      }
    default:
      TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
  }
}

bool block_diag(const at::Tensor& x, const at::Tensor& blocks, at::Tensor& y) {
  const int64_t t = x.size(0), nb = blocks.size(0), b = blocks.size(1);
  if (x.scalar_type() != at::kBFloat16) return false;
  const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
  const auto* bp = static_cast<const uint16_t*>(blocks.data_ptr());
  auto* yp = static_cast<uint16_t*>(y.data_ptr());
  if (t <= kTokens) {  // measured 1.02-1.20× the tokens-along-lanes kernel's whole layer there
    blocks_dots_bf16(xp, bp, static_cast<int>(t), nb, b, yp);
  } else if (b % 2) {
    return false;
  } else {
    blocks_bf16(xp, bp, t, nb, b, yp);
  }
  return true;
}

void decompress(const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0, int64_t n1,
                at::Tensor& dense) {
  const int64_t k = bitmask.size(1) * 8, full = k / 32 * 32;
  const uint8_t* mp = bitmask.data_ptr<uint8_t>();
  switch (values.scalar_type()) {
    case at::kBFloat16:
    case at::kHalf: {  // bf16 and fp16 alike: 16-bit lanes
      const uint16_t* vp = static_cast<const uint16_t*>(values.data_ptr());
      uint16_t* dp = static_cast<uint16_t*>(dense.data_ptr());
      return for_rows(n0, n1, [&](int64_t r) {
        const uint16_t* v = vp + r * (k / 2);
        const uint8_t* m = mp + r * (k / 8);
        uint16_t* d = dp + (r - n0) * k;
        for (int64_t c = 0; c < full; c += 32)
          _mm512_storeu_si512(d + c, _mm512_maskz_expandloadu_epi16(mask_bits(m + c / 8, 4), v + c / 2));
        if (full < k)
          _mm512_mask_storeu_epi16(d + full, (1u << (k - full)) - 1,
                                   _mm512_maskz_expandloadu_epi16(mask_bits(m + full / 8, (k - full) / 8), v + full / 2));
      });
    }
    case at::kFloat: return decompress_fp32<float, float>(values, bitmask, scale, n0, n1, dense);
    case at::kChar:
      switch (dense.scalar_type()) {
        case at::kBFloat16: return decompress_fp32<int8_t, c10::BFloat16>(values, bitmask, scale, n0, n1, dense);
        case at::kHalf: return decompress_fp32<int8_t, c10::Half>(values, bitmask, scale, n0, n1, dense);
        default: return decompress_fp32<int8_t, float>(values, bitmask, scale, n0, n1, dense);
      }
    default: TORCH_CHECK(false, "armor linear: no 2:4 CPU kernel for ", values.scalar_type());
  }
}

}  // namespace armor::ARMOR_NS
