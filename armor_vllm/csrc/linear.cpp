// The op armor_<isa>::linear: y = B_out · S · B_in[shard] · x (+ bias), S 2:4-compressed.
//
// B_in / B_out are block-diagonal b×b blocks (about 10% of the bytes at 7B shapes, b = 128): the
// ISA's block kernel where it has one (avx512: bf16 up to 64 tokens; avx2: every dtype up to 16),
// else a loop here for 1-2 tokens and one at::bmm each from there on. Fused layers whose shards learned different B_in run the core once
// per shard on rows of that shard. Below `prefill_min_tokens` tokens the ISA kernel multiplies
// straight from the compressed S (decode); from there on S is decompressed slab by slab, each
// L2-sized, for at::mm (prefill), each thread on its own slabs. The weights stay compressed in memory either way.
//
// Kept values in int8 (W8A16) carry a float32 scale per row: the decode kernels widen them to fp32
// in registers and apply the scale once per output; the prefill path dequantizes each slab, the
// scale folded in, into x's dtype.
//
// Every operand is checked (shape, dtype, device, layout) before a pointer is formed from it, on each
// call: a dozen comparisons. That the bitmask keeps exactly 2 of every 4 is O(N·K/8), so the op
// armor_<isa>::check verifies it once, where the layer is prepared (sparse_cpu.prepare_compressed);
// linear trusts it (the AVX-512 kernels index by popcount and by nibble, so another count reads out of bounds).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "sparse24.h"

namespace armor::ARMOR_NS {
namespace {

// The layer's own tensors, as the kernels read them: values [N, K/2] and uint8 bitmask [N, K/8]
// contiguous rows, b_in [slots, K/b, b, b] (one slot, or one per shard), b_out [N/b, b, b], all on
// the CPU; shard widths positive and summing to N. Float values set the layer's dtype, which the
// B's share; int8 values (W8A16) come with scale, float32 [N], and take the dtype of the B's (the
// activations', checked per call; none without B's).
std::optional<at::ScalarType> check_layer(const at::Tensor& values, const at::Tensor& bitmask,
                                          const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                          at::IntArrayRef shard_sizes, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kByte && bitmask.size(0) > 0 && bitmask.size(1) > 0,
              "armor sparse_cpu: bitmask is ", bitmask.scalar_type(), " ", bitmask.sizes(),
              ", expected uint8 [N, K/8] with N, K > 0");
  const int64_t n = bitmask.size(0), k = bitmask.size(1) * 8;
  TORCH_CHECK(values.dim() == 2 && values.size(0) == n && values.size(1) * 2 == k,
              "armor sparse_cpu: values has shape ", values.sizes(), ", expected [", n, ", ", k / 2,
              "] (N, K/2 for the bitmask's ", bitmask.sizes(), ")");
  const at::ScalarType dtype = values.scalar_type();
  const bool int8 = dtype == at::kChar;
  TORCH_CHECK(int8 || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, "armor sparse_cpu: values is ",
              dtype, ", expected BFloat16, Half, Float, or Char (int8, with a scale)");
  TORCH_CHECK(values.device().is_cpu() && bitmask.device().is_cpu(), "armor sparse_cpu: values (", values.device(),
              ") and bitmask (", bitmask.device(), ") must be on the CPU");
  TORCH_CHECK(values.is_contiguous(), "armor sparse_cpu: values must be contiguous (rows of K/2), got strides ",
              values.strides());
  TORCH_CHECK(bitmask.is_contiguous(), "armor sparse_cpu: bitmask must be contiguous (rows of K/8), got strides ",
              bitmask.strides());
  if (int8) {
    TORCH_CHECK(scale.has_value(), "armor sparse_cpu: scale is missing: int8 values need a float32 scale [", n,
                "] (one per output row)");
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->size(0) == n,
                "armor sparse_cpu: scale is ", scale->scalar_type(), " ", scale->sizes(), ", expected Float [", n,
                "] (one per output row of the int8 values)");
    TORCH_CHECK(scale->device().is_cpu() && scale->is_contiguous(), "armor sparse_cpu: scale must be contiguous on the ",
                "CPU, got ", scale->device(), " with strides ", scale->strides());
  } else {
    TORCH_CHECK(!scale.has_value(), "armor sparse_cpu: scale is given for ", dtype,
                " values, expected none (a scale goes with int8 values only)");
  }
  int64_t total = 0;
  for (const int64_t width : shard_sizes) {
    TORCH_CHECK(width > 0, "armor sparse_cpu: shard_sizes ", shard_sizes, " holds a width <= 0");
    total += width;
  }
  TORCH_CHECK(shard_sizes.empty() || total == n, "armor sparse_cpu: shard_sizes ", shard_sizes, " sum to ", total,
              ", expected N = ", n, " (the rows of values)");
  std::optional<at::ScalarType> model;
  if (!int8) model = dtype;
  const auto same_kind = [&](const char* name, const at::Tensor& t) {
    if (!model) {
      TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf || t.scalar_type() == at::kFloat,
                  "armor sparse_cpu: ", name, " is ", t.scalar_type(), ", expected BFloat16, Half or Float");
      model = t.scalar_type();
    }
    TORCH_CHECK(t.scalar_type() == *model, "armor sparse_cpu: ", name, " is ", t.scalar_type(), ", expected ", *model,
                int8 ? " (the dtype of the other B blocks)" : " (the dtype of values)");
    TORCH_CHECK(t.device().is_cpu(), "armor sparse_cpu: ", name, " is on ", t.device(), ", expected the CPU");
  };
  if (b_in) {
    const int64_t slots = b_in->dim() == 4 ? b_in->size(0) : 0, b = b_in->dim() == 4 ? b_in->size(2) : 0;
    TORCH_CHECK(b > 0 && b_in->size(3) == b && b_in->size(1) * b == k, "armor sparse_cpu: b_in has shape ",
                b_in->sizes(), ", expected [slots, K/b, b, b] for x of width K = ", k);
    const bool per_shard = slots > 1 && slots == static_cast<int64_t>(shard_sizes.size());
    TORCH_CHECK(slots == 1 || per_shard, "armor sparse_cpu: b_in has ", slots,
                " slots, expected 1 (shared) or one per shard (shard_sizes ", shard_sizes, ")");
    same_kind("b_in", *b_in);
  }
  if (b_out) {
    const int64_t b = b_out->dim() == 3 ? b_out->size(1) : 0;
    TORCH_CHECK(b > 0 && b_out->size(2) == b && b_out->size(0) * b == n, "armor sparse_cpu: b_out has shape ",
                b_out->sizes(), ", expected [N/b, b, b] for N = ", n, " outputs");
    same_kind("b_out", *b_out);
  }
  return model;
}

// Each group of 4 columns (a nibble) keeps exactly 2, 8 bytes at a time: per-nibble popcounts by
// SWAR must all be 2.
bool two_of_four(uint64_t bytes) {
  const uint64_t pairs = bytes - ((bytes >> 1) & 0x5555555555555555ull);
  return (pairs & 0x3333333333333333ull) + ((pairs >> 2) & 0x3333333333333333ull) == 0x2222222222222222ull;
}

void check_two_of_four(const at::Tensor& bitmask) {
  const uint8_t* p = bitmask.data_ptr<uint8_t>();
  const int64_t size = bitmask.numel();
  const auto bad = [](uint8_t byte) { return !two_of_four(0x3333333333333300ull | byte); };  // other nibbles: 2 of 4
  const int64_t first = at::parallel_reduce(
      0, size, 1 << 16, size,
      [&](int64_t i0, int64_t i1, int64_t found) {
        int64_t i = i0;
        for (uint64_t word; i + 8 <= i1; i += 8) {
          std::memcpy(&word, p + i, 8);
          if (!two_of_four(word)) break;
        }
        for (; i < i1; ++i)
          if (bad(p[i])) return std::min(found, i);
        return found;
      },
      [](int64_t a, int64_t b) { return std::min(a, b); });
  if (first == size) return;
  const int64_t row_bytes = bitmask.size(1), lo = __builtin_popcount(p[first] & 15);
  const int64_t column = first % row_bytes * 8 + (lo == 2 ? 4 : 0);
  TORCH_CHECK(false, "armor sparse_cpu: bitmask row ", first / row_bytes, ", columns ", column, "..", column + 3,
              " keep ", lo == 2 ? __builtin_popcount(p[first] >> 4) : lo, " of 4, expected exactly 2 (2:4)");
}

// At load: everything linear checks per call, and the bitmask's content.
void check(const at::Tensor& values, const at::Tensor& bitmask, const std::optional<at::Tensor>& b_in,
           const std::optional<at::Tensor>& b_out, at::IntArrayRef shard_sizes, const std::optional<at::Tensor>& scale) {
  check_layer(values, bitmask, b_in, b_out, shard_sizes, scale);
  check_two_of_four(bitmask);
}

constexpr int64_t kSlabBytesPerThread = 1 << 20;

// Up to this many tokens the ISA's block kernel applies the B blocks where it has one (bf16 at the
// avx512 level; measured against at::bmm: 1.0-3× faster from 1 to 64 tokens, 0.93-0.99× at 256).
constexpr int64_t kKernelBlockTokens = 64;

// Without it, up to this many tokens the B blocks are applied by the loop below: at::bmm costs
// ~30 µs a call on CPU, more than the whole multiply of a small model's blocks (576 × 64 × 64 MACs
// per token); the loop's per-output reductions make it slower than bmm from a few tokens on
// (measured at 16: 0.25 ms against 0.085 ms for a 576-wide layer's two B's).
constexpr int64_t kLoopBlockTokens = 2;

// y = x · blockdiag(blocks)ᵀ for few tokens: fp32 dot products, each block's activations and one
// block row at a time converted to fp32 (L1-resident), blocks spread over the threads.
template <typename S>
void block_loop(const S* x, const S* blocks, int64_t t, int64_t nb, int64_t b, S* y) {
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> xf(t * b), wf(b);
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t i = 0; i < t; ++i)
        for (int64_t c = 0; c < b; ++c) xf[i * b + c] = static_cast<float>(x[i * nb * b + j * b + c]);
      for (int64_t o = 0; o < b; ++o) {
        const S* w = blocks + (j * b + o) * b;
        for (int64_t c = 0; c < b; ++c) wf[c] = static_cast<float>(w[c]);
        for (int64_t i = 0; i < t; ++i) {
          const float* xi = xf.data() + i * b;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < b; ++c) acc += wf[c] * xi[c];
          y[i * nb * b + j * b + o] = static_cast<S>(acc);
        }
      }
    }
  });
}

// x [T, nb·b] · blockdiag(blocks [nb, b, b])ᵀ
at::Tensor block_apply(const at::Tensor& x, const at::Tensor& blocks) {
  static_assert(kKernelBlockTokens >= kLoopBlockTokens);
  const int64_t t = x.size(0), nb = blocks.size(0), b = blocks.size(1);
  if (t <= kKernelBlockTokens) {
    const at::Tensor xc = x.contiguous(), bc = blocks.contiguous();
    at::Tensor y = at::empty({t, nb * b}, x.options());
    if (block_diag(xc, bc, y)) return y;
    if (t <= kLoopBlockTokens) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "armor_block_apply", [&] {
        block_loop<scalar_t>(xc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), t, nb, b, y.data_ptr<scalar_t>());
      });
      return y;
    }
  }
  return at::bmm(x.view({t, nb, b}).transpose(0, 1), blocks.transpose(1, 2)).transpose(0, 1).reshape({t, nb * b});
}

// Prefill: S decompressed slab by slab, each slab L2-sized and one at::mm (oneDNN). Each thread
// owns its slabs and multiplies them single-threaded (ATen and oneDNN run serially inside a
// parallel region): shared slabs made every thread wait at each one, and oneDNN split a narrow
// slab's GEMM badly (2 threads, K = 11008: 0.58× dense). The slab is in x's dtype: int8 values are
// dequantized into it, the scale folded in.
void slab_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale,
               int64_t n0, int64_t n1, at::Tensor& y) {
  const int64_t k = x.size(1), threads = at::get_num_threads();
  const int64_t fit = std::max<int64_t>(16, kSlabBytesPerThread / (k * x.element_size()) / 16 * 16);
  const int64_t rows = std::min(fit, ((n1 - n0 + threads - 1) / threads + 15) / 16 * 16);  // ≥ a slab a thread
  const at::ThreadLocalState caller;  // inference mode (vLLM's) is thread-local: ATen ops need it on every thread
  at::parallel_for(0, (n1 - n0 + rows - 1) / rows, 1, [&](int64_t s0, int64_t s1) {
    const at::ThreadLocalStateGuard same_mode(caller);
    at::Tensor slab = at::empty({rows, k}, x.options());
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r = n0 + s * rows, e = std::min(n1, r + rows);
      at::Tensor dense = slab.narrow(0, 0, e - r);
      decompress(values, bitmask, scale, r, e, dense);
      at::Tensor out = y.narrow(1, r, e - r);
      at::mm_out(out, x, dense.t());
    }
  });
}

void core(const at::Tensor& u, const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0,
          int64_t n1, at::Tensor& y, int64_t prefill_min_tokens) {
  if (u.size(0) < prefill_min_tokens) {
    const at::Tensor xa = u.to(activation_dtype(values.scalar_type(), u.scalar_type(), u.size(0))).contiguous();
    spmm(xa, values, bitmask, scale, n0, n1, y);
  } else {
    slab_gemm(u, values, bitmask, scale, n0, n1, y);
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef shard_sizes, int64_t prefill_min_tokens,
                  const std::optional<at::Tensor>& scale) {
  const std::optional<at::ScalarType> model = check_layer(values, bitmask, b_in, b_out, shard_sizes, scale);
  const int64_t n = values.size(0), k = bitmask.size(1) * 8;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "armor sparse_cpu: x has shape ", x.sizes(), ", expected [..., ", k,
              "] (K = 8 × the bitmask's ", bitmask.sizes(), ")");
  if (model) {
    TORCH_CHECK(x.scalar_type() == *model && x.device().is_cpu(), "armor sparse_cpu: x is ", x.scalar_type(), " on ",
                x.device(), ", expected ", *model, scale ? " (the B blocks' dtype)" : " (values' dtype)", " on the CPU");
  } else {
    const at::ScalarType t = x.scalar_type();
    TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf || t == at::kFloat) && x.device().is_cpu(),
                "armor sparse_cpu: x is ", t, " on ", x.device(), ", expected BFloat16, Half or Float on the CPU");
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "armor sparse_cpu: bias has shape ", bias->sizes(),
                ", expected [", n, "]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(), "armor sparse_cpu: bias is ",
                bias->scalar_type(), " on ", bias->device(), ", expected ", x.scalar_type(), " on the CPU");
  }
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  at::Tensor y = at::empty({x2.size(0), n}, x.options());
  const int64_t slots = b_in ? b_in->size(0) : 0;
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  if (slots <= 1) {
    core(slots ? block_apply(x2, (*b_in)[0]) : x2, values, bitmask, sp, 0, n, y, prefill_min_tokens);
  } else {
    int64_t offset = 0;
    for (int64_t i = 0; i < slots; ++i) {
      core(block_apply(x2, (*b_in)[i]), values, bitmask, sp, offset, offset + shard_sizes[i], y, prefill_min_tokens);
      offset += shard_sizes[i];
    }
  }
  if (b_out) y = block_apply(y, *b_out);
  if (bias) y.add_(*bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  return y.view(sizes);
}

}  // namespace

}  // namespace armor::ARMOR_NS

// One level of indirection so that ARMOR_NS expands before TORCH_LIBRARY pastes it.
#define ARMOR_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
ARMOR_LIBRARY(ARMOR_NS, m) {
  m.def("linear(Tensor x, Tensor values, Tensor bitmask, Tensor? b_in, Tensor? b_out, Tensor? bias, "
        "int[] shard_sizes, int prefill_min_tokens, Tensor? scale=None) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, &armor::ARMOR_NS::linear);
  m.def("check(Tensor values, Tensor bitmask, Tensor? b_in, Tensor? b_out, int[] shard_sizes, Tensor? scale=None) -> ()");
  m.impl("check", c10::DispatchKey::CPU, &armor::ARMOR_NS::check);
}
