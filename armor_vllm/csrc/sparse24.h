// One ISA's 2:4 kernels, declared for the ISA-independent op in linear.cpp.
//
// S is held exactly as the checkpoint stores it: kept values [N, K/2] in the model dtype, or int8
// with a float32 scale per row (W8A16: dequantized in registers, the scale applied once per output),
// and the bitmask [N, K/8] (4 bits per group of 4, the same bytes as 2-bit positions). Every group keeps
// exactly 2, so the values of K columns [32c, 32c + 32) are values[16c, 16c + 16): no offsets,
// no popcounts. Each ISA is built into its own .so with its own -m flags and namespace
// (ARMOR_NS = armor_avx2 | armor_avx512); Python loads only those the CPU supports.
#pragma once

#include <ATen/ATen.h>

namespace armor::ARMOR_NS {

// The dtype the kernel wants `tokens` activations in, for kept values of dtype `weight` and a layer
// computing in `model` (the dtype of x and y; values' own dtype unless they are int8).
at::ScalarType activation_dtype(at::ScalarType weight, at::ScalarType model, int64_t tokens);

// y[:, n0:n1] = x · (diag(scale) · S[n0:n1])ᵀ, x [T, K] contiguous in activation_dtype, y [T, N]
// row-major in the model dtype. `scale` is float32 [N] for int8 values, nullptr for float values.
void spmm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0,
          int64_t n1, at::Tensor& y);

// y [T, nb·b] = x · blockdiag(blocks [nb, b, b])ᵀ, all contiguous, if this ISA has a kernel for
// the dtype and b; false (y untouched) otherwise.
bool block_diag(const at::Tensor& x, const at::Tensor& blocks, at::Tensor& y);

// dense [n1 - n0, K] = diag(scale) · S[n0:n1] in dense's dtype: values' own dtype for float values
// (scale nullptr), the model dtype for int8 values (the scale folded in).
void decompress(const at::Tensor& values, const at::Tensor& bitmask, const float* scale, int64_t n0, int64_t n1,
                at::Tensor& dense);

}  // namespace armor::ARMOR_NS
