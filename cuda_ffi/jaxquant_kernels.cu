// jaxquant CUDA kernels, registered with XLA through the FFI (jax.ffi).
//
//   jaxquant_hadamard        y = FWHT(x * signs) / sqrt(n) along the last axis (n = 2^p), or with
//                            the signs applied after the transform (the inverse of the former).
//   jaxquant_scalar_matvec   y = x @ W.T for the packed scalar format (jaxquant/formats/scalar.py:
//                            b-bit codes packed 32 at a time into b int32 words, per-group fp16
//                            scale and zero along the input axis, w = (q - zero) * scale), for
//                            b in {2, 3, 4, 8}, 1 to 16 rows of x, fp32 accumulation.
//
// Both handlers only enqueue kernels on the stream XLA gives them (no host synchronisation, no
// allocation), so they are declared compatible with command buffers (CUDA graphs).
//
// Decode without conversions. A code q at bit position P < 23 of a word whose exponent bits are
// set to 0x3F8 reads as the float f = 1 + q * 2^(P-23): one 3-input logic op (LOP3) makes it from
// the shifted word. One shift serves every code of an 8-bit window (4 two-bit, 2 three-bit or 2
// four-bit codes), placed at P in [15, 23) where f keeps at least 15 bits of q * x. To fold the
// per-position powers of two away, x is pre-scaled once per block in shared memory:
// x'' = x * 2^(23 - P) so that x'' * f = x'' + x * q, and per 32-code chunk
//     sum_k x_k q_k = sum_k x''_k f_k - C,   C = sum_k x''_k   (C precomputed with x).
// With X = sum_k x_k over the chunk, the chunk contributes scale * (sum x q - zero * X).
// Per weight: about 1.25-1.5 integer ops (2 at 8 bits) and one FFMA.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

// A compile-time index usable as an int in device code (std::integral_constant's conversion is
// host-only without --expt-relaxed-constexpr).
template <int I>
struct Idx {
  __host__ __device__ constexpr operator int() const { return I; }
};

template <class F, int... Is>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, Is...>) {
  (f(Idx<Is>{}), ...);
}

// Calls f(Idx<i>{}) for i = 0 .. N-1: indices are compile-time constants, so register arrays
// indexed by them stay in registers.
template <int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float load_elem(const void* p, int64_t i, int dt) {
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_elem(void* p, int64_t i, int dt, float v) {
  if (dt == kF16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else if (dt == kBF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

bool dtype_code(ffi::DataType t, int* code) {
  switch (t) {
    case ffi::DataType::F32: *code = kF32; return true;
    case ffi::DataType::F16: *code = kF16; return true;
    case ffi::DataType::BF16: *code = kBF16; return true;
    default: return false;
  }
}

int multiprocessors() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return sms > 0 ? sms : 132;
}

ffi::Error launch_error(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

// Opt a kernel into more than 48 KB of dynamic shared memory (a host-side attribute, no stream
// operation, so it is legal while XLA captures a graph).
template <class K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ------------------------------------------------------------------------------------------
// Scalar decode-matvec
// ------------------------------------------------------------------------------------------

template <int B>
struct Code {
  static constexpr int M = 8 / B;              // codes per 8-bit window
  static constexpr int P0 = 23 - M * B;        // bit position of a window's first code
  static constexpr uint32_t MASK = (1u << B) - 1u;
  // x'' = x * 2^(23 - P) for the code at position j of a chunk (j % M within its window).
  __host__ __device__ static constexpr float factor(int j) { return static_cast<float>(1u << (B * (M - j % M))); }
};

// The 32-bit word whose bits [P0, P0 + M*B) hold window W (codes W*M .. W*M+M-1) of a chunk.
template <int B, int W>
__device__ __forceinline__ uint32_t window_bits(const uint32_t (&w)[B]) {
  constexpr int M = Code<B>::M, P0 = Code<B>::P0;
  constexpr int S = W * M * B, I = S / 32, O = S % 32;
  if constexpr (O >= P0) {
    if constexpr (O + M * B <= 32) {
      return w[I] >> (O - P0);
    } else {
      return __funnelshift_r(w[I], w[I + 1], O - P0);
    }
  } else {
    return w[I] << (P0 - O);
  }
}

template <int B>
__device__ __forceinline__ void load_chunk(const uint32_t* __restrict__ p, uint32_t (&w)[B]) {
  if constexpr (B == 2) {
    uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else if constexpr (B == 4) {
    uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (B == 8) {
    uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    uint4 u = __ldcs(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    w[4] = u.x; w[5] = u.y; w[6] = u.z; w[7] = u.w;
  } else {
    static_for<B>([&](auto i) { w[i] = __ldcs(p + i); });
  }
}

__device__ __forceinline__ float float4_at(const float4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

struct MatvecArgs {
  const void* x;        // [n, k_in], dtype x_dt
  const uint32_t* codes;  // [out, nchunks * B]
  const __half* scale;  // [out, groups]
  const __half* zero;   // [out, groups]
  void* y;              // [n, out], dtype x_dt
  int x_dt, n, k_in, out, nchunks, groups, cpg, cpg_shift, tkc;
};

// Grid: one block per nwarps * R rows. Each warp owns R rows; its lanes take the 32-code chunks
// of those rows in turn, so a warp reads R runs of 32 * B * 4 contiguous bytes per step. The
// block stages x (pre-scaled, with per-chunk C and X) for tkc chunks at a time in shared memory.
// Shared layout: chunk c's 32 values as 8 float4, float4 q at slot (q + c) % 8, so that the 8
// lanes of one 128-bit shared-memory phase read 8 different bank groups.
template <int B, int NB, int R>
__global__ void __launch_bounds__(256) scalar_matvec_kernel(MatvecArgs a) {
  using C = Code<B>;
  extern __shared__ float4 smem4[];
  float4* xs4 = smem4;                                          // [NB][tkc][8]
  float2* cx = reinterpret_cast<float2*>(smem4 + NB * a.tkc * 8);  // [NB][tkc] (C, X)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int row0 = (blockIdx.x * nwarps + warp) * R;
  const int wd = a.nchunks * B;
  const int tkc = a.tkc;

  const uint32_t* rowp[R];
  const __half* sp[R];
  const __half* zp[R];
  static_for<R>([&](auto r) {
    const int row = min(row0 + static_cast<int>(r), a.out - 1);
    rowp[r] = a.codes + static_cast<size_t>(row) * wd;
    sp[r] = a.scale + static_cast<size_t>(row) * a.groups;
    zp[r] = a.zero + static_cast<size_t>(row) * a.groups;
  });

  float acc[NB][R];
  static_for<NB>([&](auto b) { static_for<R>([&](auto r) { acc[b][r] = 0.f; }); });

  for (int c0 = 0; c0 < a.nchunks; c0 += tkc) {
    __syncthreads();  // the previous tile is consumed
    const int nq = NB * tkc * 8;  // float4 groups to stage; a multiple of 32
    for (int g = threadIdx.x; g < nq; g += blockDim.x) {
      const int b = g / (tkc * 8), rem = g - b * tkc * 8, cl = rem >> 3, q = rem & 7;
      const int64_t k0 = static_cast<int64_t>(c0 + cl) * 32 + q * 4;
      float v[4];
      float xsum = 0.f, csum = 0.f;
      static_for<4>([&](auto e) {
        const int64_t k = k0 + e;
        const float xv = (b < a.n && k < a.k_in) ? load_elem(a.x, static_cast<int64_t>(b) * a.k_in + k, a.x_dt) : 0.f;
        v[e] = xv * C::factor(e);  // 4 % M == 0, so the position in the window is e % M
        xsum += xv;
        csum += v[e];
      });
      xs4[(b * tkc + cl) * 8 + ((q + cl) & 7)] = make_float4(v[0], v[1], v[2], v[3]);
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) {  // the 8 float4 of a chunk sit on 8 consecutive lanes
        xsum += __shfl_xor_sync(0xffffffffu, xsum, o);
        csum += __shfl_xor_sync(0xffffffffu, csum, o);
      }
      if (q == 0) cx[b * tkc + cl] = make_float2(csum, xsum);
    }
    __syncthreads();

    const int cend = min(tkc, a.nchunks - c0);
    for (int cl = lane; cl < cend; cl += 32) {
      const int c = c0 + cl;
      const int gi = a.cpg_shift >= 0 ? (c >> a.cpg_shift) : (c / a.cpg);
      uint32_t w[R][B];
      float s[R], z[R];
      static_for<R>([&](auto r) {
        load_chunk<B>(rowp[r] + static_cast<size_t>(c) * B, w[r]);
        s[r] = __half2float(sp[r][gi]);
        z[r] = __half2float(zp[r][gi]);
      });
      float A[NB][R];
      static_for<NB>([&](auto b) { static_for<R>([&](auto r) { A[b][r] = 0.f; }); });
      static_for<8>([&](auto q) {
        float4 xv[NB];
        static_for<NB>([&](auto b) { xv[b] = xs4[(b * tkc + cl) * 8 + ((q + cl) & 7)]; });
        static_for<4>([&](auto e) {
          constexpr int j = int(decltype(q){}) * 4 + int(decltype(e){});
          constexpr int P = C::P0 + (j % C::M) * B;
          static_for<R>([&](auto r) {
            const uint32_t t = window_bits<B, j / C::M>(w[r]);
            const float f = __uint_as_float((t & (C::MASK << P)) | 0x3F800000u);
            static_for<NB>([&](auto b) { A[b][r] = fmaf(float4_at(xv[b], e), f, A[b][r]); });
          });
        });
      });
      static_for<NB>([&](auto b) {
        const float2 cxv = cx[b * tkc + cl];
        static_for<R>([&](auto r) { acc[b][r] = fmaf(s[r], (A[b][r] - cxv.x) - z[r] * cxv.y, acc[b][r]); });
      });
    }
  }

  static_for<NB>([&](auto b) {
    static_for<R>([&](auto r) {
      float v = acc[b][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      const int row = row0 + r;
      if (lane == 0 && row < a.out && b < a.n) store_elem(a.y, static_cast<int64_t>(b) * a.out + row, a.x_dt, v);
    });
  });
}

template <int B, int NB, int R>
cudaError_t launch_matvec(cudaStream_t stream, MatvecArgs a, int nwarps) {
  // Shared memory: NB * tkc * (32 floats + C, X); tkc a multiple of 32 chunks.
  constexpr int kBytesPerChunk = 32 * 4 + 8;
  int tkc = (48 * 1024 / (NB * kBytesPerChunk)) / 32 * 32;
  if (tkc < 32) tkc = 32;
  const int need = (a.nchunks + 31) / 32 * 32;
  if (tkc > need) tkc = need;
  a.tkc = tkc;
  const size_t smem = static_cast<size_t>(NB) * tkc * kBytesPerChunk;
  auto kernel = scalar_matvec_kernel<B, NB, R>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int rows_per_block = nwarps * R;
  const int blocks = (a.out + rows_per_block - 1) / rows_per_block;
  kernel<<<blocks, nwarps * 32, smem, stream>>>(a);
  return cudaSuccess;
}

// Rows per warp when the caller does not choose: as many as still leave two blocks per SM.
int auto_rows(int out, int nwarps) {
  const int sms = multiprocessors();
  for (int r : {4, 2}) {
    if ((out + nwarps * r - 1) / (nwarps * r) >= 2 * sms) return r;
  }
  return 1;
}

template <int B>
cudaError_t dispatch_batch(cudaStream_t stream, const MatvecArgs& a, int nwarps, int rows) {
  if (a.n <= 1) {
    if (rows <= 0) rows = auto_rows(a.out, nwarps);
    if (rows >= 4) return launch_matvec<B, 1, 4>(stream, a, nwarps);
    if (rows == 2) return launch_matvec<B, 1, 2>(stream, a, nwarps);
    return launch_matvec<B, 1, 1>(stream, a, nwarps);
  }
  if (a.n <= 2) return launch_matvec<B, 2, 2>(stream, a, nwarps);
  if (a.n <= 4) return launch_matvec<B, 4, 2>(stream, a, nwarps);
  if (a.n <= 8) return launch_matvec<B, 8, 1>(stream, a, nwarps);
  return launch_matvec<B, 16, 1>(stream, a, nwarps);
}

ffi::Error ScalarMatvecImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> codes,
                            ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> zero,
                            ffi::Result<ffi::AnyBuffer> y, int64_t bits, int64_t group_size,
                            int64_t rows_per_warp, int64_t warps) {
  MatvecArgs a{};
  if (!dtype_code(x.element_type(), &a.x_dt) || y->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("scalar_matvec: x and y must share one of float32, float16, bfloat16");
  }
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("scalar_matvec: x [n, in], codes [out, words], y [n, out]");
  }
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("scalar_matvec: bits must be 2, 3, 4 or 8");
  }
  if (group_size <= 0 || group_size % 32) {
    return ffi::Error::InvalidArgument("scalar_matvec: group_size must be a positive multiple of 32");
  }
  a.n = static_cast<int>(xd[0]);
  a.k_in = static_cast<int>(xd[1]);
  a.out = static_cast<int>(cd[0]);
  if (cd[1] % bits) return ffi::Error::InvalidArgument("scalar_matvec: codes width is not a multiple of bits");
  a.nchunks = static_cast<int>(cd[1] / bits);
  if (a.out <= 0 || a.n <= 0 || a.n > 16 || yd[0] != xd[0] || yd[1] != cd[0]) {
    return ffi::Error::InvalidArgument("scalar_matvec: shapes disagree (or n is not in 1..16)");
  }
  if (static_cast<int64_t>(a.nchunks) * 32 < a.k_in) {
    return ffi::Error::InvalidArgument("scalar_matvec: codes hold fewer inputs than x has");
  }
  a.cpg = static_cast<int>(group_size / 32);
  a.groups = static_cast<int>(scale.element_count() / a.out);
  if (static_cast<int64_t>(a.groups) * a.out != static_cast<int64_t>(scale.element_count()) ||
      zero.element_count() != scale.element_count() ||
      static_cast<int64_t>(a.groups) * a.cpg < a.nchunks) {
    return ffi::Error::InvalidArgument("scalar_matvec: scale/zero must hold out * ceil(in / group_size) values");
  }
  a.cpg_shift = -1;
  if ((a.cpg & (a.cpg - 1)) == 0) {
    a.cpg_shift = 0;
    while ((1 << a.cpg_shift) < a.cpg) ++a.cpg_shift;
  }
  a.x = x.untyped_data();
  a.codes = reinterpret_cast<const uint32_t*>(codes.typed_data());
  a.scale = reinterpret_cast<const __half*>(scale.typed_data());
  a.zero = reinterpret_cast<const __half*>(zero.typed_data());
  a.y = y->untyped_data();
  const int nwarps = (warps >= 1 && warps <= 8) ? static_cast<int>(warps) : 8;
  const int rows = static_cast<int>(rows_per_warp);
  cudaError_t err;
  switch (bits) {
    case 2: err = dispatch_batch<2>(stream, a, nwarps, rows); break;
    case 3: err = dispatch_batch<3>(stream, a, nwarps, rows); break;
    case 4: err = dispatch_batch<4>(stream, a, nwarps, rows); break;
    default: err = dispatch_batch<8>(stream, a, nwarps, rows); break;
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("scalar_matvec: ") + cudaGetErrorString(err));
  return launch_error("scalar_matvec launch");
}

// ------------------------------------------------------------------------------------------
// Walsh-Hadamard transform
// ------------------------------------------------------------------------------------------
// A block transforms `rb` consecutive rows (rb * n elements) in passes of up to 5 index bits:
// each thread gathers 2^bits elements that differ only in those bits into registers, applies the
// butterflies, and writes them back. The first pass reads global memory (contiguous, vectorized),
// the last writes it; the ones between use shared memory, padded by one float per 32 so that the
// strided accesses of the first pass and the lane-contiguous ones of the later passes are free
// of bank conflicts.

__host__ __device__ __forceinline__ int pad32(int i) { return i + (i >> 5); }

template <int NBITS>
__device__ __forceinline__ void butterflies(float (&v)[1 << NBITS]) {
  static_for<NBITS>([&](auto s) {
    constexpr int h = 1 << s;
#pragma unroll
    for (int i = 0; i < (1 << NBITS); ++i) {
      if (!(i & h)) {
        const float p = v[i], q = v[i + h];
        v[i] = p + q;
        v[i + h] = p - q;
      }
    }
  });
}

template <class T>
struct HadamardArgs {
  const T* x;
  const float* signs;  // [n] or nullptr
  T* y;
  int64_t rows;
  int logn, rb, signs_after;
  float scale;
};

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <class T, int NBITS>
__device__ __forceinline__ void hadamard_pass(const HadamardArgs<T>& a, float* buf, const T* xb, T* yb,
                                              int total, int lo, bool first, bool last) {
  constexpr int E = 1 << NBITS;
  const int n = 1 << a.logn;
  const int groups = total >> NBITS;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const int low = g & ((1 << lo) - 1);
    const int base = ((g >> lo) << (lo + NBITS)) | low;
    float v[E];
    if (first) {  // lo == 0: E contiguous elements
      constexpr int kVec = 16 / sizeof(T);
      if constexpr (E % kVec == 0) {
        const uint4* src = reinterpret_cast<const uint4*>(xb + base);
#pragma unroll
        for (int i = 0; i < E / kVec; ++i) {
          uint4 u = src[i];
          const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
          for (int k = 0; k < kVec; ++k) v[i * kVec + k] = to_float(t[k]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < E; ++i) v[i] = to_float(xb[base + i]);
      }
      if (a.signs && !a.signs_after) {
        const int sb = base & (n - 1);
#pragma unroll
        for (int i = 0; i < E; ++i) v[i] *= __ldg(a.signs + sb + i);
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] = buf[pad32(base + (i << lo))];
    }
    butterflies<NBITS>(v);
    if (last) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int idx = base + (i << lo);
        float o = v[i] * a.scale;
        if (a.signs && a.signs_after) o *= __ldg(a.signs + (idx & (n - 1)));
        yb[idx] = from_float<T>(o);
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) buf[pad32(base + (i << lo))] = v[i];
    }
  }
}

template <class T>
__global__ void __launch_bounds__(256) hadamard_kernel(HadamardArgs<T> a) {
  extern __shared__ float hbuf[];
  const int n = 1 << a.logn;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * a.rb;
  const int rows_here = static_cast<int>(min(static_cast<int64_t>(a.rb), a.rows - row0));
  const int total = rows_here * n;  // rb is a power of two, so is total for full blocks
  const T* xb = a.x + row0 * n;
  T* yb = a.y + row0 * n;
  int lo = 0;
  while (lo < a.logn) {
    const int nbits = min(5, a.logn - lo);
    const bool first = lo == 0, last = lo + nbits == a.logn;
    if (!first) __syncthreads();
    switch (nbits) {
      case 5: hadamard_pass<T, 5>(a, hbuf, xb, yb, total, lo, first, last); break;
      case 4: hadamard_pass<T, 4>(a, hbuf, xb, yb, total, lo, first, last); break;
      case 3: hadamard_pass<T, 3>(a, hbuf, xb, yb, total, lo, first, last); break;
      case 2: hadamard_pass<T, 2>(a, hbuf, xb, yb, total, lo, first, last); break;
      default: hadamard_pass<T, 1>(a, hbuf, xb, yb, total, lo, first, last); break;
    }
    lo += nbits;
  }
}

template <class T>
cudaError_t launch_hadamard(cudaStream_t stream, HadamardArgs<T> a) {
  const int n = 1 << a.logn;
  a.rb = n >= 2048 ? 1 : 2048 / n;  // at least 2048 elements per block
  const int64_t blocks = (a.rows + a.rb - 1) / a.rb;
  const int elems = a.rb * n;
  int threads = elems / 32;
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
  const size_t smem = a.logn > 5 ? static_cast<size_t>(pad32(elems)) * sizeof(float) : 0;
  auto kernel = hadamard_kernel<T>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  if (blocks > 0) kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  return cudaSuccess;
}

ffi::Error HadamardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> signs,
                        ffi::Result<ffi::AnyBuffer> y, int64_t has_signs, int64_t signs_after,
                        int64_t normalize) {
  auto xd = x.dimensions();
  if (xd.size() < 1 || y->element_type() != x.element_type() || y->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("hadamard: y must match x");
  }
  const int64_t n = xd[xd.size() - 1];
  if (n < 2 || (n & (n - 1)) || n > 32768) {
    return ffi::Error::InvalidArgument("hadamard: the last axis must be a power of two in [2, 32768]");
  }
  if (has_signs && signs.element_count() != static_cast<size_t>(n)) {
    return ffi::Error::InvalidArgument("hadamard: signs must have n elements");
  }
  int logn = 0;
  while ((int64_t{1} << logn) < n) ++logn;
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float scale = normalize ? 1.0f / std::sqrt(static_cast<float>(n)) : 1.0f;
  const float* sg = has_signs ? signs.typed_data() : nullptr;
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::F32: {
      HadamardArgs<float> a{static_cast<const float*>(x.untyped_data()), sg, static_cast<float*>(y->untyped_data()),
                            rows, logn, 1, static_cast<int>(signs_after), scale};
      err = launch_hadamard(stream, a);
      break;
    }
    case ffi::DataType::F16: {
      HadamardArgs<__half> a{static_cast<const __half*>(x.untyped_data()), sg, static_cast<__half*>(y->untyped_data()),
                             rows, logn, 1, static_cast<int>(signs_after), scale};
      err = launch_hadamard(stream, a);
      break;
    }
    case ffi::DataType::BF16: {
      HadamardArgs<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(x.untyped_data()), sg,
                                    static_cast<__nv_bfloat16*>(y->untyped_data()), rows, logn, 1,
                                    static_cast<int>(signs_after), scale};
      err = launch_hadamard(stream, a);
      break;
    }
    default:
      return ffi::Error::InvalidArgument("hadamard: x must be float32, float16 or bfloat16");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hadamard: ") + cudaGetErrorString(err));
  return launch_error("hadamard launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantScalarMatvec, ScalarMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("rows_per_warp")
                                  .Attr<int64_t>("warps"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantHadamard, HadamardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("has_signs")
                                  .Attr<int64_t>("signs_after")
                                  .Attr<int64_t>("normalize"),
                              {ffi::Traits::kCmdBufferCompatible});
