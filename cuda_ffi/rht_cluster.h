// rht_cluster.cu's launch, for handlers in other sources that chain it after their own kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// y[rows, n] = s * (D x) * scale per row, D = F_A (x) H_{n / A} with F_A's sign bits [A, ceil(A / 32)]
// (rht_cluster.cu), x [parts, rows, n] summed as it loads; signs may be null. blocks, groups: 0 = auto.
// Launched programmatically dependent on the stream's previous kernel (pdl.h). cudaErrorInvalidValue
// where the shape is not one it takes (A > 256, n / A not a power of two in [32, 1024], ...).
cudaError_t rht_cluster_run(cudaStream_t stream, const float* x, const uint32_t* bits, const float* signs, float* y,
                            int a_rows, int parts, int64_t rows, int64_t n, float scale, int blocks, int groups);
