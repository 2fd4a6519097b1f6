// Work split shared by the ISA kernels (compiled into each ISA's .so with that ISA's flags).
//
// Threads take 16-row tiles (at::parallel_for: ATen's OpenMP pool, the one vLLM binds). Inside a
// tile, a register block holds kRows rows × kTokens tokens of fp32 accumulators; more tokens are
// further passes over the same rows, whose ~1.1·K bytes each are then L1-resident.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Register blocks live in registers only if their loops are fully unrolled and inlined.
#define ARMOR_UNROLL _Pragma("GCC unroll 32")
#define ARMOR_INLINE inline __attribute__((always_inline))

namespace armor::ARMOR_NS {

constexpr int64_t kTile = 16;

// The bitmask bits of `bytes` consecutive bytes (little-endian: bit j ↔ column 8·byte + j).
inline uint32_t mask_bits(const uint8_t* p, int64_t bytes) {
  uint32_t m = 0;
  std::memcpy(&m, p, bytes);
  return m;
}

// block(row, nr, t0, tb) for rows [n0, n1) in register blocks of R rows (or single rows at a
// tile's end) and token blocks of at most TB, tiles spread over the intra-op threads.
template <int R, int TB, typename Block>
void for_blocks(int64_t tokens, int64_t n0, int64_t n1, const Block& block) {
  const int64_t tiles = (n1 - n0 + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t last = std::min(n1, n0 + end * kTile);
    for (int64_t r = n0 + begin * kTile; r < last; r += R) {
      const int64_t nr = std::min<int64_t>(R, last - r);
      for (int64_t t0 = 0; t0 < tokens; t0 += TB) {
        const int tb = static_cast<int>(std::min<int64_t>(TB, tokens - t0));
        if (nr == R) {
          block(r, std::integral_constant<int, R>{}, t0, tb);
        } else {
          for (int64_t i = 0; i < nr; ++i) block(r + i, std::integral_constant<int, 1>{}, t0, tb);
        }
      }
    }
  });
}

// f(std::integral_constant<int, tb>) for a run-time tb in 1..TB.
template <int TB, typename F>
inline void with_tokens(int tb, const F& f) {
  static_assert(TB >= 1 && TB <= 4);
  switch (tb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (TB >= 2) { f(std::integral_constant<int, 2>{}); } break;
    case 3: if constexpr (TB >= 3) { f(std::integral_constant<int, 3>{}); } break;
    case 4: if constexpr (TB >= 4) { f(std::integral_constant<int, 4>{}); } break;
  }
}

// Rows [n0, n1) of S spread over the threads, for decompression.
template <typename F>
void for_rows(int64_t n0, int64_t n1, const F& f) {
  at::parallel_for(n0, n1, kTile, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

}  // namespace armor::ARMOR_NS
