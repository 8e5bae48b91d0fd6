// rht_cluster.cu's launch, for handlers in other sources that chain it after their own kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// y[rows, n] = s * (D x) * scale per row, D = F_A (x) H_{n / A} with F_A's sign bits [A, ceil(A / 32)]
// (rht_cluster.cu), x [parts, rows, n] summed as it loads; signs may be null. blocks, groups: 0 = auto.
// Launched programmatically dependent on the stream's previous kernel (pdl.h). cudaErrorInvalidValue
// where the shape is not one it takes (A > 256, n / A not a power of two in [32, 1024], ...).
// io (optional) changes what a row loads and what it stores:
// - swiglu: x is [rows, 2 n], a fused [gate, up] product (parts 1), and the row transformed is
//   silu(g * gate) * (u * up) * in_signs, with (g, u) = gate_up_scale[0 .. 1] (a forward transform's
//   signs applied on the way in): the input of an MLP's down projection;
// - out_scale multiplies the result: out_scale[0] for outputs below scale_split[0], out_scale[1] below
//   scale_split[1], then out_scale[2] (a fused linear's parts; the splits multiples of 4);
// - with resid, y = resid + result; y (and resid) float32, fp16 or bf16 by dtype (0, 1, 2).
struct RhtcIo {
  bool swiglu = false;
  const float* in_signs = nullptr;
  const float* gate_up_scale = nullptr;
  const float* out_scale = nullptr;
  int scale_split[2] = {1 << 30, 1 << 30};
  const void* resid = nullptr;
  int dtype = 0;
};
cudaError_t rht_cluster_run(cudaStream_t stream, const float* x, const uint32_t* bits, const float* signs, void* y,
                            int a_rows, int parts, int64_t rows, int64_t n, float scale, int blocks, int groups,
                            const RhtcIo* io = nullptr);
