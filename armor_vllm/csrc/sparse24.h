// One ISA's 2:4 kernels, declared for the ISA-independent op in linear.cpp.
//
// S is held exactly as the checkpoint stores it: kept values [N, K/2] in the model dtype and the
// bitmask [N, K/8] (4 bits per group of 4, the same bytes as 2-bit positions). Every group keeps
// exactly 2, so the values of K columns [32c, 32c + 32) are values[16c, 16c + 16): no offsets,
// no popcounts. Each ISA is built into its own .so with its own -m flags and namespace
// (ARMOR_NS = armor_avx2 | armor_avx512); Python loads only those the CPU supports.
#pragma once

#include <ATen/ATen.h>

namespace armor::ARMOR_NS {

// The dtype the kernel wants activations in: bf16 for vdpbf16ps, else fp32.
at::ScalarType activation_dtype(at::ScalarType weight);

// y[:, n0:n1] = x · S[n0:n1]ᵀ, x [T, K] contiguous in activation_dtype, y [T, N] row-major.
void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1,
          at::Tensor& y);

// y [T, nb·b] = x · blockdiag(blocks [nb, b, b])ᵀ, all contiguous, if this ISA has a kernel for
// the dtype and b; false (y untouched) otherwise.
bool block_diag(const at::Tensor& x, const at::Tensor& blocks, at::Tensor& y);

// dense [n1 - n0, K] = S[n0:n1] in the weight dtype.
void decompress(const at::Tensor& values, const at::Tensor& bitmask, int64_t n0, int64_t n1, at::Tensor& dense);

}  // namespace armor::ARMOR_NS
