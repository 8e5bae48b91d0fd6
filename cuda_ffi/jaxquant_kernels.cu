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
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

#include "pdl.h"
#include "rht_cluster.h"

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

__device__ __forceinline__ __half2 u2h2(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, sizeof(h));
  return h;
}

__device__ __forceinline__ uint32_t h22u(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// Table lookups without the table's address in a register: on sm_90 a shared-memory address holds
// the CTA's rank in its cluster in the top byte, and dynamic shared memory starts 1 KB into the
// window. A table at that start is read at [offset with the rank byte + 0x400], the constant as the
// load's immediate; through a pointer ptxas adds the table's address to every offset instead.
constexpr uint32_t kDynSmemStart = 0x400;

// `offset` (below 2^24) with the CTA's rank byte of `table`'s shared address, for smem_lookup; the
// table must start dynamic shared memory.
__device__ __forceinline__ uint32_t smem_rank_offset(const void* table, uint32_t offset) {
#if defined(__CUDA_ARCH__)
  const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  if ((at & 0x00FFFFFFu) != kDynSmemStart) __trap();  // the lookups' immediate offset would be wrong
  return (at & 0xFF000000u) | offset;
#else
  return offset;
#endif
}

// The T (4 or 8 bytes) at byte OFF + off of the table starting dynamic shared memory; off's bytes 0-2
// are the offset, byte 3 the rank byte (smem_rank_offset). tab: the table (read on the host only).
template <class T, uint32_t OFF>
__device__ __forceinline__ T smem_lookup(const char* tab, uint32_t off) {
  T v;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8) {
    uint2 u;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2+%3];" : "=r"(u.x), "=r"(u.y) : "r"(off), "n"(kDynSmemStart + OFF));
    memcpy(&v, &u, sizeof(v));
  } else {
    uint32_t u;
    asm volatile("ld.shared.u32 %0, [%1+%2];" : "=r"(u) : "r"(off), "n"(kDynSmemStart + OFF));
    memcpy(&v, &u, sizeof(v));
  }
#else
  memcpy(&v, tab + (off & 0x00FFFFFFu) + OFF, sizeof(v));
#endif
  return v;
}

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

int current_device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess ? dev : 0;
}

// Host-side launch facts, cached per device and kernel: the driver queries cost several
// microseconds each, as much as a whole small matvec, and the handler runs on every call.
struct LaunchCache {
  std::mutex mu;
  std::map<int, int> sms;
  std::map<std::pair<int, const void*>, size_t> smem;
  std::map<std::tuple<int, const void*, int, size_t>, int> occupancy;
};

LaunchCache& launch_cache() {
  static LaunchCache cache;
  return cache;
}

int multiprocessors() {
  const int dev = current_device();
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.sms.find(dev);
  if (it != c.sms.end()) return it->second;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 132;
  c.sms[dev] = sms;
  return sms;
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
  const auto key = std::make_pair(current_device(), reinterpret_cast<const void*>(kernel));
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.smem.find(key);
  if (it != c.smem.end() && it->second >= bytes) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) c.smem[key] = bytes;
  return err;
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
  int x_dt, n, k_in, out, nchunks, groups, cpg, cpg_shift, tkc, ksplit;
};

// Codes, scales and zeros of the R rows from row0; rows past the end repeat the last one (their
// results are never stored), so loads need no bounds checks.
template <int R>
__device__ __forceinline__ void row_pointers(const MatvecArgs& a, int row0, int words_per_row,
                                             const uint32_t* (&rowp)[R], const __half* (&sp)[R],
                                             const __half* (&zp)[R]) {
  static_for<R>([&](auto r) {
    const int row = min(row0 + static_cast<int>(r), a.out - 1);
    rowp[r] = a.codes + static_cast<size_t>(row) * words_per_row;
    sp[r] = a.scale + static_cast<size_t>(row) * a.groups;
    zp[r] = a.zero + static_cast<size_t>(row) * a.groups;
  });
}

// The words, scale and zero of U chunks (cl0, cl0 + 32, ... below hi) of R rows: every load is
// issued before any decode, so a warp keeps U * R loads in flight.
template <int B, int R, int U>
__device__ __forceinline__ void load_units(const MatvecArgs& a, const uint32_t* const (&rowp)[R],
                                           const __half* const (&sp)[R], const __half* const (&zp)[R],
                                           int c0, int cl0, int hi, uint32_t (&w)[U][R][B], float (&s)[U][R],
                                           float (&z)[U][R]) {
  static_for<U>([&](auto u) {
    const int cl = cl0 + 32 * static_cast<int>(u);
    if (cl < hi) {
      const int c = c0 + cl;
      const int gi = a.cpg_shift >= 0 ? (c >> a.cpg_shift) : (c / a.cpg);
      static_for<R>([&](auto r) {
        load_chunk<B>(rowp[r] + static_cast<size_t>(c) * B, w[u][r]);
        s[u][r] = __half2float(sp[r][gi]);
        z[u][r] = __half2float(zp[r][gi]);
      });
    }
  });
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// i padded by one per 32: strided shared-memory accesses then spread over the banks.
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


// Four consecutive x values of batch row b from input k0 (zeros past k_in or past the batch).
__device__ __forceinline__ void load_x4(const MatvecArgs& a, int b, int64_t k0, float (&v)[4]) {
  if (b >= a.n) {
    v[0] = v[1] = v[2] = v[3] = 0.f;
    return;
  }
  const int64_t i = static_cast<int64_t>(b) * a.k_in + k0;
  if ((a.k_in & 3) == 0 && k0 + 4 <= a.k_in) {  // aligned: one 8- or 16-byte load
    if (a.x_dt == kF32) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(a.x) + i));
      v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    } else {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(a.x) + i));
      const uint32_t h[4] = {u.x & 0xFFFFu, u.x >> 16, u.y & 0xFFFFu, u.y >> 16};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        v[e] = a.x_dt == kF16 ? __half2float(__ushort_as_half(static_cast<unsigned short>(h[e])))
                              : __uint_as_float(h[e] << 16);
      }
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = (k0 + e < a.k_in) ? load_elem(a.x, i + e, a.x_dt) : 0.f;
}

// Stage x for chunks [c0, c0 + tkc) of every batch row: pre-scaled values and per-chunk (C, X).
// Each thread issues the loads of UN float4 groups before using any, so the pass costs about one
// round trip to L2 instead of one per group.
template <int B, int NB>
__device__ __forceinline__ void stage_x(const MatvecArgs& a, float4* xs4, float2* cx, int c0, int tkc) {
  using C = Code<B>;
  constexpr int UN = 4;
  const int nq = NB * tkc * 8;  // float4 groups; a multiple of 256, so each warp is all in or all out
  for (int g0 = threadIdx.x; g0 < nq; g0 += UN * blockDim.x) {
    float v[UN][4];
    static_for<UN>([&](auto u) {
      const int g = g0 + static_cast<int>(u) * blockDim.x;
      if (g < nq) {
        const int b = g / (tkc * 8), rem = g - b * tkc * 8, cl = rem >> 3, q = rem & 7;
        load_x4(a, b, static_cast<int64_t>(c0 + cl) * 32 + q * 4, v[u]);
      }
    });
    static_for<UN>([&](auto u) {
      const int g = g0 + static_cast<int>(u) * blockDim.x;
      if (g < nq) {
        const int b = g / (tkc * 8), rem = g - b * tkc * 8, cl = rem >> 3, q = rem & 7;
        float s[4];
        float xsum = 0.f, csum = 0.f;
        static_for<4>([&](auto e) {
          s[e] = v[u][e] * C::factor(e);  // 4 % M == 0, so the position in the window is e % M
          xsum += v[u][e];
          csum += s[e];
        });
        xs4[(b * tkc + cl) * 8 + ((q + cl) & 7)] = make_float4(s[0], s[1], s[2], s[3]);
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) {  // the 8 float4 of a chunk sit on 8 consecutive lanes
          xsum += __shfl_xor_sync(0xffffffffu, xsum, o);
          csum += __shfl_xor_sync(0xffffffffu, csum, o);
        }
        if (q == 0) cx[b * tkc + cl] = make_float2(csum, xsum);
      }
    });
  }
}

// A block has nwarps warps = (nwarps / S) row sets x S K-slices (S = ksplit). A row set is R
// consecutive rows; the S warps of a row set split the chunks, and reduce through shared memory.
// Lanes take the chunks of their slice in turn, U chunks per lane per step with every load of
// the step (codes, scales, zeros) issued before any decode: U * R loads in flight per lane.
// When x fits in shared memory for the whole K (tkc >= nchunks) a block stages it once and then
// walks row groups g = blockIdx.x, + gridDim.x, ... (a persistent grid); otherwise each row group
// stages x in tiles of tkc chunks.
// Shared layout: chunk c's 32 values as 8 float4, float4 q at slot (q + c) % 8, so that the 8
// lanes of one 128-bit shared-memory phase read 8 different bank groups; then (C, X) per chunk,
// then the split-K partial sums.
template <int NB>
constexpr int matvec_max_threads() { return NB >= 8 ? 256 : 512; }  // large batches need the registers

template <int B, int NB, int R, int U>
__global__ void __launch_bounds__(matvec_max_threads<NB>()) scalar_matvec_kernel(MatvecArgs a) {
  using C = Code<B>;
  extern __shared__ float4 smem4[];
  const int tkc = a.tkc;
  float4* xs4 = smem4;                                          // [NB][tkc][8]
  float2* cx = reinterpret_cast<float2*>(smem4 + NB * tkc * 8);  // [NB][tkc] (C, X)
  float* red = reinterpret_cast<float*>(cx + NB * tkc);          // [nwarps][NB][R]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int S = a.ksplit, slice = warp % S, rset = warp / S;
  const int rows_per_group = (nwarps / S) * R;
  const int ngroups = (a.out + rows_per_group - 1) / rows_per_group;
  const int wd = a.nchunks * B;
  const bool whole = tkc >= a.nchunks;

  if (whole) {
    stage_x<B, NB>(a, xs4, cx, 0, tkc);
    __syncthreads();
  }

  for (int grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int row0 = grp * rows_per_group + rset * R;
    const uint32_t* rowp[R];
    const __half* sp[R];
    const __half* zp[R];
    row_pointers<R>(a, row0, wd, rowp, sp, zp);

    float acc[NB][R];
    static_for<NB>([&](auto b) { static_for<R>([&](auto r) { acc[b][r] = 0.f; }); });

    for (int c0 = 0; c0 < a.nchunks; c0 += tkc) {
      if (!whole) {
        __syncthreads();  // the previous tile is consumed
        stage_x<B, NB>(a, xs4, cx, c0, tkc);
        __syncthreads();
      }
      const int cend = min(tkc, a.nchunks - c0);
      const int per = ((cend + S - 1) / S + 31) / 32 * 32;
      const int lo = slice * per, hi = min(cend, lo + per);
      for (int cl0 = lo + lane; cl0 < hi; cl0 += 32 * U) {
        uint32_t w[U][R][B];
        float s[U][R], z[U][R];
        load_units<B, R, U>(a, rowp, sp, zp, c0, cl0, hi, w, s, z);
        static_for<U>([&](auto u) {
          const int cl = cl0 + 32 * static_cast<int>(u);
          if (cl < hi) {
            float A[NB][R];
            static_for<NB>([&](auto b) { static_for<R>([&](auto r) { A[b][r] = 0.f; }); });
            static_for<8>([&](auto q) {
              float4 xv[NB];
              static_for<NB>([&](auto b) { xv[b] = xs4[(b * tkc + cl) * 8 + ((q + cl) & 7)]; });
              static_for<4>([&](auto e) {
                constexpr int j = int(decltype(q){}) * 4 + int(decltype(e){});
                constexpr int P = C::P0 + (j % C::M) * B;
                static_for<R>([&](auto r) {
                  const uint32_t t = window_bits<B, j / C::M>(w[u][r]);
                  const float f = __uint_as_float((t & (C::MASK << P)) | 0x3F800000u);
                  static_for<NB>([&](auto b) { A[b][r] = fmaf(float4_at(xv[b], e), f, A[b][r]); });
                });
              });
            });
            static_for<NB>([&](auto b) {
              const float2 cxv = cx[b * tkc + cl];
              static_for<R>([&](auto r) {
                acc[b][r] = fmaf(s[u][r], (A[b][r] - cxv.x) - z[u][r] * cxv.y, acc[b][r]);
              });
            });
          }
        });
      }
    }

    static_for<NB>([&](auto b) { static_for<R>([&](auto r) { acc[b][r] = warp_sum(acc[b][r]); }); });
    if (S == 1) {
      static_for<NB>([&](auto b) {
        static_for<R>([&](auto r) {
          const int row = row0 + r;
          if (lane == 0 && row < a.out && b < a.n) {
            store_elem(a.y, static_cast<int64_t>(b) * a.out + row, a.x_dt, acc[b][r]);
          }
        });
      });
    } else {
      if (lane == 0) {
        static_for<NB>([&](auto b) { static_for<R>([&](auto r) { red[(warp * NB + b) * R + r] = acc[b][r]; }); });
      }
      __syncthreads();
      for (int i = threadIdx.x; i < rows_per_group * NB; i += blockDim.x) {
        const int rs = i / (NB * R), rem = i - rs * NB * R, b = rem / R, r = rem - b * R;
        float v = 0.f;
        for (int sl = 0; sl < S; ++sl) v += red[((rs * S + sl) * NB + b) * R + r];
        const int row = grp * rows_per_group + rs * R + r;
        if (row < a.out && b < a.n) store_elem(a.y, static_cast<int64_t>(b) * a.out + row, a.x_dt, v);
      }
      __syncthreads();  // red is rewritten by the next group
    }
  }
}

constexpr size_t kMatvecBytesPerChunk = 32 * 4 + 8;
constexpr size_t kWholeSmemLimit = 200 * 1024;  // stage all of x when it fits in this much

template <class K>
int blocks_per_sm(K kernel, int threads, size_t smem) {
  const auto key = std::make_tuple(current_device(), reinterpret_cast<const void*>(kernel), threads, smem);
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.occupancy.find(key);
  if (it != c.occupancy.end()) return it->second;
  int nb = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, smem) != cudaSuccess || nb < 1) nb = 1;
  c.occupancy[key] = nb;
  return nb;
}

template <int B, int NB, int R, int U>
cudaError_t launch_matvec(cudaStream_t stream, MatvecArgs a, int nwarps, int ksplit) {
  const int sms = multiprocessors();
  const int need = (a.nchunks + 31) / 32 * 32;
  const bool whole = static_cast<size_t>(NB) * need * kMatvecBytesPerChunk + 16 * NB * R * 4 <= kWholeSmemLimit;
  int tkc = need;
  if (!whole) {
    tkc = static_cast<int>((48 * 1024 / (NB * kMatvecBytesPerChunk)) / 32 * 32);
    if (tkc < 32) tkc = 32;
  }
  a.tkc = tkc;
  if (nwarps <= 0) nwarps = (whole && static_cast<size_t>(NB) * tkc * kMatvecBytesPerChunk > 100 * 1024) ? 16 : 8;
  if (nwarps > matvec_max_threads<NB>() / 32) nwarps = matvec_max_threads<NB>() / 32;
  if (ksplit <= 0) {  // split K while there are few row tasks and each slice keeps U chunks per lane
    ksplit = 1;
    const int tasks = (a.out + R - 1) / R;
    while (ksplit * 2 <= nwarps && tasks * ksplit < 16 * sms && a.nchunks >= 2 * ksplit * 32 * U) ksplit *= 2;
  }
  if (ksplit > nwarps) ksplit = nwarps;
  while (nwarps % ksplit) --ksplit;
  a.ksplit = ksplit;
  const size_t smem = static_cast<size_t>(NB) * tkc * kMatvecBytesPerChunk + static_cast<size_t>(nwarps) * NB * R * 4;
  auto kernel = scalar_matvec_kernel<B, NB, R, U>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int rows_per_group = (nwarps / ksplit) * R;
  const int groups = (a.out + rows_per_group - 1) / rows_per_group;
  int blocks = groups;
  if (whole) blocks = min(groups, sms * blocks_per_sm(kernel, nwarps * 32, smem));
  kernel<<<blocks, nwarps * 32, smem, stream>>>(a);
  return cudaSuccess;
}

// Rows per warp at batch 1 when the caller does not choose (H100 sweep, results/
// bench_kernels_h100_issue10_run1.json: at 8192x28672, 2 bits 59 us with 4 rows against 66 with 2;
// 4 bits 71 us with 2 against 73 with 4 and 89 with 1; the old kernel's 4 rows won at 28672x8192).
int auto_rows(int out, int bits) {
  if (out >= 16384 || (bits == 2 && out >= 8192)) return 4;
  if (out >= 4096) return 2;
  return 1;
}

// Chunks in flight per lane: about 32 bytes of codes per row.
template <int B>
constexpr int unroll_for() { return B == 2 ? 4 : (B == 8 ? 1 : 2); }

template <int B>
cudaError_t dispatch_batch(cudaStream_t stream, const MatvecArgs& a, int nwarps, int rows, int ksplit) {
  constexpr int U = unroll_for<B>();
  if (a.n <= 1) {
    if (rows <= 0) rows = auto_rows(a.out, B);
    if (rows >= 4) return launch_matvec<B, 1, 4, (U > 1 ? U / 2 : 1)>(stream, a, nwarps, ksplit);
    if (rows == 2) return launch_matvec<B, 1, 2, U>(stream, a, nwarps, ksplit);
    return launch_matvec<B, 1, 1, U>(stream, a, nwarps, ksplit);
  }
  constexpr int U2 = U > 2 ? 2 : U;
  if (a.n <= 2) return launch_matvec<B, 2, 2, U2>(stream, a, nwarps, ksplit);
  if (a.n <= 4) return launch_matvec<B, 4, 2, U2>(stream, a, nwarps, ksplit);
  if (a.n <= 8) return launch_matvec<B, 8, 1, U2>(stream, a, nwarps, ksplit);
  return launch_matvec<B, 16, 1, 1>(stream, a, nwarps, ksplit);
}

// ------------------------------------------------------------------------------------------
// 2- and 4-bit, batch 1, 16-bit x: half2 decode (opt-in, variant = 1)
// ------------------------------------------------------------------------------------------
// A word holds 32 / B codes; pair i of a word is codes i and i + 16 / B (bits B i and 16 + B i),
// so one shift puts both at the same mantissa bits of the two halves and one LOP3 with 0x3C00
// makes the half2 (1 + c / 2^(10 - pos)). 2 bits: pos 8 (i even) or 6 (i odd); 4 bits: pos 6.
// With x'' = x, or 4x for pos 6 at 2 bits, staged in fp16, sum x'' h = C + sum x c / kHalfScale,
// C = sum x'' over the chunk. Per 16 weights at 2 bits: 4 shifts, 8 LOP3, 8 HFMA2 (1.25 ops per
// weight against ~2.3 for the fp32 decode); at 4 bits 1.5 against ~2.5. Products are summed in
// half2 over 16 terms per half, then in fp32. Staged per chunk: 16 half2 as 4 uint4, slot q at
// (q + c) % 4, then (C, X) as for the fp32 path.

template <int B>
struct HalfCode {
  static constexpr int kPerWord = 32 / B;                 // codes per word
  static constexpr int kPairs = kPerWord / 2;             // pair i = codes i and i + kPairs
  static constexpr int kSlotsPerWord = kPairs / 4;        // uint4 slots (4 pairs) per word
  static constexpr float kHalfScale = B == 2 ? 4.f : 16.f;  // c = kHalfScale * (h - 1) * (x'' / x)
  __host__ __device__ static constexpr int pos(int i) { return B == 4 || i % 2 == 0 ? 10 - B : 6; }
  __host__ __device__ static constexpr float factor(int i) { return B == 2 && i % 2 ? 4.f : 1.f; }
};

template <int B, int I>
__device__ __forceinline__ uint32_t half2_codes(uint32_t w) {
  constexpr int pos = HalfCode<B>::pos(I);
  constexpr int sh = pos - B * I;  // > 0: left
  constexpr uint32_t mask = ((1u << B) - 1u) << pos;
  const uint32_t t = sh > 0 ? (w << (sh > 0 ? sh : 0)) : (w >> (sh < 0 ? -sh : 0));
  return (t & (mask | mask << 16)) | 0x3C003C00u;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

template <int B>
__device__ __forceinline__ void stage_x_half2(const MatvecArgs& a, uint4* xs, float2* cx, int c0, int tkc) {
  using H = HalfCode<B>;
  const int nq = tkc * 4;  // uint4 slots; a multiple of 128
  for (int g = threadIdx.x; g < nq; g += blockDim.x) {
    const int cl = g >> 2, q = g & 3, w = q / H::kSlotsPerWord, i0 = 4 * (q % H::kSlotsPerWord);
    const int64_t k0 = static_cast<int64_t>(c0 + cl) * 32 + H::kPerWord * w + i0;
    float lo[4], hi[4];
    load_x4(a, 0, k0, lo);
    load_x4(a, 0, k0 + H::kPairs, hi);
    uint32_t p[4];
    float xsum = 0.f, csum = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float f = H::factor(e);  // i0 is even, so pair i0 + e has the parity of e
      p[e] = pack_half2(lo[e] * f, hi[e] * f);
      const float2 r = __half22float2(u2h2(p[e]));  // C from the rounded values the products use
      csum += r.x + r.y;
      xsum += lo[e] + hi[e];
    }
    xs[cl * 4 + ((q + cl) & 3)] = make_uint4(p[0], p[1], p[2], p[3]);
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {  // the 4 slots of a chunk sit on 4 consecutive lanes
      xsum += __shfl_xor_sync(0xffffffffu, xsum, o);
      csum += __shfl_xor_sync(0xffffffffu, csum, o);
    }
    if (q == 0) cx[cl] = make_float2(csum, xsum);
  }
}

template <int B, int R, int U>
__global__ void __launch_bounds__(512) scalar_matvec_half_kernel(MatvecArgs a) {
  using H = HalfCode<B>;
  extern __shared__ uint4 hsm[];
  const int tkc = a.tkc;
  uint4* xs = hsm;                                       // [tkc][4]
  float2* cx = reinterpret_cast<float2*>(hsm + tkc * 4);  // [tkc]
  float* red = reinterpret_cast<float*>(cx + tkc);         // [nwarps][R]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int S = a.ksplit, slice = warp % S, rset = warp / S;
  const int rows_per_group = (nwarps / S) * R;
  const int ngroups = (a.out + rows_per_group - 1) / rows_per_group;
  const int wd = a.nchunks * B;
  const bool whole = tkc >= a.nchunks;
  if (whole) {
    stage_x_half2<B>(a, xs, cx, 0, tkc);
    __syncthreads();
  }
  for (int grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int row0 = grp * rows_per_group + rset * R;
    const uint32_t* rowp[R];
    const __half* sp[R];
    const __half* zp[R];
    row_pointers<R>(a, row0, wd, rowp, sp, zp);
    float acc[R];
    static_for<R>([&](auto r) { acc[r] = 0.f; });
    for (int c0 = 0; c0 < a.nchunks; c0 += tkc) {
      if (!whole) {
        __syncthreads();
        stage_x_half2<B>(a, xs, cx, c0, tkc);
        __syncthreads();
      }
      const int cend = min(tkc, a.nchunks - c0);
      const int per = ((cend + S - 1) / S + 31) / 32 * 32;
      const int lo = slice * per, hi = min(cend, lo + per);
      for (int cl0 = lo + lane; cl0 < hi; cl0 += 32 * U) {
        uint32_t w[U][R][B];
        float s[U][R], z[U][R];
        load_units<B, R, U>(a, rowp, sp, zp, c0, cl0, hi, w, s, z);
        static_for<U>([&](auto u) {
          const int cl = cl0 + 32 * static_cast<int>(u);
          if (cl < hi) {
            __half2 h[R];
            static_for<R>([&](auto r) { h[r] = __float2half2_rn(0.f); });
            static_for<4>([&](auto q) {
              const uint4 xv = xs[cl * 4 + ((q + cl) & 3)];
              constexpr int wi = int(decltype(q){}) / H::kSlotsPerWord;
              constexpr int i0 = 4 * (int(decltype(q){}) % H::kSlotsPerWord);
              static_for<R>([&](auto r) {
                const uint32_t word = w[u][r][wi];
                h[r] = __hfma2(u2h2(xv.x), u2h2(half2_codes<B, i0 + 0>(word)), h[r]);
                h[r] = __hfma2(u2h2(xv.y), u2h2(half2_codes<B, i0 + 1>(word)), h[r]);
                h[r] = __hfma2(u2h2(xv.z), u2h2(half2_codes<B, i0 + 2>(word)), h[r]);
                h[r] = __hfma2(u2h2(xv.w), u2h2(half2_codes<B, i0 + 3>(word)), h[r]);
              });
            });
            const float2 cxv = cx[cl];
            static_for<R>([&](auto r) {
              const float2 f = __half22float2(h[r]);
              acc[r] = fmaf(s[u][r], H::kHalfScale * ((f.x + f.y) - cxv.x) - z[u][r] * cxv.y, acc[r]);
            });
          }
        });
      }
    }
    static_for<R>([&](auto r) { acc[r] = warp_sum(acc[r]); });
    if (S == 1) {
      static_for<R>([&](auto r) {
        const int row = row0 + r;
        if (lane == 0 && row < a.out) store_elem(a.y, row, a.x_dt, acc[r]);
      });
    } else {
      if (lane == 0) static_for<R>([&](auto r) { red[warp * R + r] = acc[r]; });
      __syncthreads();
      for (int i = threadIdx.x; i < rows_per_group; i += blockDim.x) {
        const int rs = i / R, r = i - rs * R;
        float v = 0.f;
        for (int sl = 0; sl < S; ++sl) v += red[(rs * S + sl) * R + r];
        const int row = grp * rows_per_group + rs * R + r;
        if (row < a.out) store_elem(a.y, row, a.x_dt, v);
      }
      __syncthreads();
    }
  }
}

template <int B, int R>
cudaError_t launch_matvec_half(cudaStream_t stream, MatvecArgs a, int nwarps, int ksplit) {
  constexpr int U = unroll_for<B>();
  constexpr size_t kBytesPerChunk = 64 + 8;
  const int sms = multiprocessors();
  const int need = (a.nchunks + 31) / 32 * 32;
  const bool whole = static_cast<size_t>(need) * kBytesPerChunk + 16 * R * 4 <= kWholeSmemLimit;
  const int tkc = whole ? need : 512;
  a.tkc = tkc;
  // 16 warps where x is large (staged once per block) or, at 4 bits, wider than the output: fewer
  // blocks stage it (8192x28672: 82% of copy against 75% with 8 warps and 4 rows, 4096x11008: 60
  // against 55, two runs each, results/bench_scalar4_warps_run*_h100_session9.json)
  if (nwarps <= 0) {
    nwarps = (whole && static_cast<size_t>(tkc) * kBytesPerChunk > 100 * 1024) || (B == 4 && a.k_in > a.out) ? 16 : 8;
  }
  if (ksplit <= 0) {
    ksplit = 1;
    const int tasks = (a.out + R - 1) / R;
    while (ksplit * 2 <= nwarps && tasks * ksplit < 16 * sms && a.nchunks >= 2 * ksplit * 32 * U) ksplit *= 2;
  }
  if (ksplit > nwarps) ksplit = nwarps;
  while (nwarps % ksplit) --ksplit;
  a.ksplit = ksplit;
  const size_t smem = static_cast<size_t>(tkc) * kBytesPerChunk + static_cast<size_t>(nwarps) * R * 4;
  auto kernel = scalar_matvec_half_kernel<B, R, U>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int rows_per_group = (nwarps / ksplit) * R;
  const int groups = (a.out + rows_per_group - 1) / rows_per_group;
  int blocks = groups;
  if (whole) blocks = min(groups, sms * blocks_per_sm(kernel, nwarps * 32, smem));
  kernel<<<blocks, nwarps * 32, smem, stream>>>(a);
  return cudaSuccess;
}

// Rows per warp of the half2 kernel. 4 bits: 2 (H100 sweeps, sessions 8 and 9: at 28672x8192 80-85%
// of copy against 73-77 with 4; at 8192x28672, with 16 warps, 82% against 75% for 4 rows and 8
// warps); 2 bits as the fp32 kernel.
int auto_rows_half(int out, int bits) {
  if (bits == 4) return 2;
  return auto_rows(out, bits);
}

template <int B>
cudaError_t dispatch_matvec_half(cudaStream_t stream, const MatvecArgs& a, int nwarps, int rows, int ksplit) {
  if (rows <= 0) rows = auto_rows_half(a.out, B);
  if (rows >= 4) return launch_matvec_half<B, 4>(stream, a, nwarps, ksplit);
  if (rows == 2) return launch_matvec_half<B, 2>(stream, a, nwarps, ksplit);
  return launch_matvec_half<B, 1>(stream, a, nwarps, ksplit);
}

ffi::Error ScalarMatvecImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> codes,
                            ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> zero,
                            ffi::Result<ffi::AnyBuffer> y, int64_t bits, int64_t group_size,
                            int64_t rows_per_warp, int64_t warps, int64_t ksplit, int64_t variant) {
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
  const int nwarps = (warps >= 1 && warps <= 16) ? static_cast<int>(warps) : 0;  // 0: auto
  const int ks = (ksplit >= 1 && ksplit <= 16) ? static_cast<int>(ksplit) : 0;
  const int rows = static_cast<int>(rows_per_warp);
  cudaError_t err;
  if (variant == 1 && (bits == 2 || bits == 4) && a.n == 1 && a.x_dt != kF32) {
    err = bits == 2 ? dispatch_matvec_half<2>(stream, a, nwarps, rows, ks)
                    : dispatch_matvec_half<4>(stream, a, nwarps, rows, ks);
    if (err != cudaSuccess) return ffi::Error::Internal(std::string("scalar_matvec: ") + cudaGetErrorString(err));
    return launch_error("scalar_matvec launch");
  }
  switch (bits) {
    case 2: err = dispatch_batch<2>(stream, a, nwarps, rows, ks); break;
    case 3: err = dispatch_batch<3>(stream, a, nwarps, rows, ks); break;
    case 4: err = dispatch_batch<4>(stream, a, nwarps, rows, ks); break;
    default: err = dispatch_batch<8>(stream, a, nwarps, rows, ks); break;
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("scalar_matvec: ") + cudaGetErrorString(err));
  return launch_error("scalar_matvec launch");
}

// ------------------------------------------------------------------------------------------
// Scalar 4- and 2-bit decode-matmul on tensor cores (2-16 rows of 16-bit x; 2-bit not yet run on a GPU)
// ------------------------------------------------------------------------------------------
// mma.m16n8k16: A = 16 weight rows x 16 inputs, B = 16 inputs x 8 rows of x (two n-tiles for 9-16),
// fp32 accumulators. The input axis is permuted the same way in A and B so that every code word is
// read by one lane only: per step of 128 inputs (16 words of a row), lane (g = lane / 4, q = lane % 4)
// loads words 4q .. 4q + 3 of rows g and g + 8 as one 16-byte load each. Word j's nibbles t = 0..7
// (inputs 32q + 8j + t of the step) fill two k-tiles: (t0, t4) and (t1, t5) the slots {2q, 2q + 1}
// and {2q + 8, 2q + 9} of the first, (t2, t6) and (t3, t7) those of the second; one shift and one
// LOP3 make each pair, as the fp16 (bf16) bits of OFFSET + q with OFFSET = 1024 (128). B takes x's
// same 8 inputs of row g (one 16-byte load, regrouped by byte permutes). Per group (128 inputs or a
// multiple) the products start from zero and fold into the output as s * (d - (z + OFFSET) * sum x).
// Output: fp32 partial sums [splits, 8 * NT, out] over contiguous whole groups; the caller adds them.

constexpr int kMmaWarps = 4;   // warps per block

struct MmaArgs {
  const uint4* x;          // [8 * NT, kpad] 16-bit x (zero-padded rows and inputs), as uint4
  const float* xsum;       // [8 * NT, groups]: x summed over each group
  const uint32_t* codes;   // [out, words], words = kpad / 8
  const __half* scale;     // [out, groups]
  const __half* zero;      // [out, groups]
  float* parts;            // [splits, 8 * NT, out]
  int out, words, groups, steps, steps_per_group, steps_per_split;
};

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t uint4_at(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
__device__ __forceinline__ uint32_t word_at(const uint4& v, int j) { return uint4_at(v, j); }
__device__ __forceinline__ uint32_t word_at(const uint2& v, int j) { return j == 0 ? v.x : v.y; }

// TILES: 16-row tiles per warp (2 or 4). PF: the next step's code words and x load while this step's
// decode and mma run (double-buffered registers), so a warp always has loads in flight.
// BITS = 2 (built and emulated on the CPU, not yet run on a GPU): a lane reads 2 words (32 inputs) of a
// row per step; word j's codes t = 0..15 (inputs 32q + 16j + t) pair as (t_i, t_i+8) from one shift and
// LOP3 each; pairs 2m and 2m + 1 fill k-tile 4j + m, and B pairs x's inputs the same way (two 16-byte x
// loads per word, one byte permute per register).
template <class T, int NT, int TILES, bool PF, int BITS>
__global__ void __launch_bounds__(32 * kMmaWarps) scalar_mma_kernel(MmaArgs a) {
  static_assert(BITS == 2 || BITS == 4, "4- or 2-bit codes");
  using W = std::conditional_t<BITS == 4, uint4, uint2>;  // a lane's code words of a row per step
  constexpr int kMmaTiles = TILES;
  constexpr uint32_t kOffsetBits = std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
  constexpr uint32_t kMask = BITS == 4 ? 0x000F000Fu : 0x00030003u;
  constexpr float kOffset = std::is_same_v<T, __half> ? 1024.f : 128.f;
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int row0 = (blockIdx.x * kMmaWarps + (threadIdx.x >> 5)) * 16 * kMmaTiles;
  if (row0 >= a.out) return;  // no barriers below: idle warps may leave
  const int s0 = blockIdx.y * a.steps_per_split, s1 = min(a.steps, s0 + a.steps_per_split);
  const int kpad_u4 = a.words * (4 / BITS);  // a row of x: kpad = 32 words / BITS 16-bit values, as uint4
  const W* rowp[kMmaTiles][2];
  int rows[kMmaTiles][2];
  static_for<kMmaTiles>([&](auto t) {
    static_for<2>([&](auto h) {
      rows[t][h] = row0 + 16 * t + g + 8 * h;
      const int row = min(rows[t][h], a.out - 1);  // past the end: the last row, never stored
      rowp[t][h] = reinterpret_cast<const W*>(a.codes + static_cast<size_t>(row) * a.words) + q;
    });
  });
  float acc[kMmaTiles][NT][4] = {};
  float d[kMmaTiles][NT][4] = {};
  auto load_w = [&](W (&w)[kMmaTiles][2], int s) {
    static_for<kMmaTiles>([&](auto t) {
      static_for<2>([&](auto h) { w[t][h] = __ldcs(rowp[t][h] + 4 * static_cast<size_t>(s)); });
    });
  };
  auto load_x = [&](uint4 (&xv)[NT][4], int s) {  // inputs 32q .. 32q + 31 of the step, row g (+ 8)
    static_for<NT>([&](auto nt) {
      const uint4* xp = a.x + static_cast<size_t>(g + 8 * nt) * kpad_u4 + 16 * static_cast<size_t>(s) + 4 * q;
      static_for<4>([&](auto j) { xv[nt][j] = xp[j]; });
    });
  };
  W wn[kMmaTiles][2];
  uint4 xn[NT][4];
  if constexpr (PF) {
    if (s0 < s1) { load_w(wn, s0); load_x(xn, s0); }
  }
#pragma unroll 2
  for (int s = s0; s < s1; ++s) {
    W w[kMmaTiles][2];
    uint4 xv[NT][4];
    if constexpr (PF) {
      static_for<kMmaTiles>([&](auto t) { w[t][0] = wn[t][0]; w[t][1] = wn[t][1]; });
      static_for<NT>([&](auto nt) { static_for<4>([&](auto j) { xv[nt][j] = xn[nt][j]; }); });
      if (s + 1 < s1) { load_w(wn, s + 1); load_x(xn, s + 1); }
    } else {
      load_w(w, s);
      load_x(xv, s);
    }
    uint32_t b[NT][8][2];  // B of the step's 8 k-tiles
    static_for<NT>([&](auto nt) {
      static_for<4>([&](auto j) {
        if constexpr (BITS == 4) {  // word j: inputs 8j + t pair as (t, t + 4)
          const uint4 v = xv[nt][j];
          b[nt][2 * j][0] = __byte_perm(v.x, v.z, 0x5410);
          b[nt][2 * j][1] = __byte_perm(v.x, v.z, 0x7632);
          b[nt][2 * j + 1][0] = __byte_perm(v.y, v.w, 0x5410);
          b[nt][2 * j + 1][1] = __byte_perm(v.y, v.w, 0x7632);
        } else {  // word j / 2, pairs m = 2 (j % 2), + 1: inputs 16 (j / 2) + t pair as (t, t + 8)
          constexpr int jj = int(decltype(j){}), wd = jj / 2;
          static_for<2>([&](auto h) {
            constexpr int m = 2 * (jj % 2) + int(decltype(h){});
            const uint32_t lo = uint4_at(xv[nt][2 * wd], m), hi = uint4_at(xv[nt][2 * wd + 1], m);
            b[nt][4 * wd + m][0] = __byte_perm(lo, hi, 0x5410);
            b[nt][4 * wd + m][1] = __byte_perm(lo, hi, 0x7632);
          });
        }
      });
    });
    static_for<kMmaTiles>([&](auto t) {
      static_for<4>([&](auto j) {  // 4-bit: word j, k-tiles 2j, 2j + 1; 2-bit: word j / 2, k-tiles 2j, 2j + 1
        constexpr int jj = int(decltype(j){}), word = BITS == 4 ? jj : jj / 2;
        constexpr int sh = BITS == 4 ? 0 : 8 * (jj % 2);  // k-tile 2j's slots 2q, 2q + 1 (2q + 8: + BITS)
        constexpr int step = BITS == 4 ? 8 : 4;           // k-tile 2j + 1: further along the word
        const uint32_t lo = word_at(w[t][0], word), hi = word_at(w[t][1], word);  // rows g, g + 8
        const uint32_t a0[4] = {((lo >> sh) & kMask) | kOffsetBits, ((hi >> sh) & kMask) | kOffsetBits,
                                ((lo >> (sh + BITS)) & kMask) | kOffsetBits, ((hi >> (sh + BITS)) & kMask) | kOffsetBits};
        const uint32_t a1[4] = {((lo >> (sh + step)) & kMask) | kOffsetBits, ((hi >> (sh + step)) & kMask) | kOffsetBits,
                                ((lo >> (sh + step + BITS)) & kMask) | kOffsetBits,
                                ((hi >> (sh + step + BITS)) & kMask) | kOffsetBits};
        static_for<NT>([&](auto nt) {
          mma_16816<T>(d[t][nt], a0, b[nt][2 * jj][0], b[nt][2 * jj][1]);
          mma_16816<T>(d[t][nt], a1, b[nt][2 * jj + 1][0], b[nt][2 * jj + 1][1]);
        });
      });
    });
    if ((s + 1) % a.steps_per_group == 0 || s + 1 == s1) {  // the group ends: fold and restart
      const int grp = s / a.steps_per_group;
      static_for<kMmaTiles>([&](auto t) {
        float sc[2], zo[2];
        static_for<2>([&](auto h) {
          const size_t i = static_cast<size_t>(min(rows[t][h], a.out - 1)) * a.groups + grp;
          sc[h] = __half2float(a.scale[i]);
          zo[h] = __half2float(a.zero[i]) + kOffset;
        });
        static_for<NT>([&](auto nt) {
          const float xs0 = a.xsum[static_cast<size_t>(8 * nt + 2 * q) * a.groups + grp];
          const float xs1 = a.xsum[static_cast<size_t>(8 * nt + 2 * q + 1) * a.groups + grp];
          acc[t][nt][0] += sc[0] * (d[t][nt][0] - zo[0] * xs0);
          acc[t][nt][1] += sc[0] * (d[t][nt][1] - zo[0] * xs1);
          acc[t][nt][2] += sc[1] * (d[t][nt][2] - zo[1] * xs0);
          acc[t][nt][3] += sc[1] * (d[t][nt][3] - zo[1] * xs1);
          static_for<4>([&](auto e) { d[t][nt][e] = 0.f; });
        });
      });
    }
  }
  float* out = a.parts + static_cast<size_t>(blockIdx.y) * 8 * NT * a.out;
  static_for<kMmaTiles>([&](auto t) {
    static_for<NT>([&](auto nt) {
      static_for<4>([&](auto e) {
        const int row = rows[t][e / 2], xrow = 8 * nt + 2 * q + (e & 1);
        if (row < a.out) out[static_cast<size_t>(xrow) * a.out + row] = acc[t][nt][e];
      });
    });
  });
}

ffi::Error ScalarMmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> xsum,
                         ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> zero,
                         ffi::Result<ffi::Buffer<ffi::F32>> parts, int64_t group_size, int64_t tiles,
                         int64_t prefetch, int64_t bits) {
  int dt = 0;
  if (!dtype_code(x.element_type(), &dt) || dt == kF32) {
    return ffi::Error::InvalidArgument("scalar_mma: x must be float16 or bfloat16");
  }
  if (tiles != 2 && tiles != 4) {
    return ffi::Error::InvalidArgument("scalar_mma: tiles must be 2 or 4");
  }
  if (bits != 2 && bits != 4) {
    return ffi::Error::InvalidArgument("scalar_mma: bits must be 2 or 4");
  }
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  auto pd = parts->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || pd.size() != 3 || xsum.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("scalar_mma: x [8 NT, kpad], xsum [8 NT, groups], codes [out, words], "
                                       "parts [splits, 8 NT, out]");
  }
  MmaArgs a{};
  a.out = static_cast<int>(cd[0]);
  a.words = static_cast<int>(cd[1]);
  const int nrows = static_cast<int>(xd[0]), splits = static_cast<int>(pd[0]);
  if ((nrows != 8 && nrows != 16) || xd[1] != static_cast<int64_t>(a.words) * 32 / bits || a.words % (4 * bits) ||
      group_size % 128 || pd[1] != nrows || pd[2] != cd[0] || splits < 1) {
    return ffi::Error::InvalidArgument("scalar_mma: 8 or 16 rows of x, 32 / bits inputs per code word, inputs "
                                       "a multiple of 128, groups a multiple of 128, parts [splits, rows, out]");
  }
  a.groups = static_cast<int>(scale.element_count() / a.out);
  a.steps = a.words / (4 * static_cast<int>(bits));  // 128 inputs per step
  a.steps_per_group = static_cast<int>(group_size / 128);
  if (static_cast<int64_t>(a.groups) * a.out != static_cast<int64_t>(scale.element_count()) ||
      zero.element_count() != scale.element_count() || a.groups * a.steps_per_group < a.steps ||
      xsum.dimensions()[0] != nrows || xsum.dimensions()[1] != a.groups) {
    return ffi::Error::InvalidArgument("scalar_mma: scale/zero [out, groups] and xsum [rows, groups] disagree");
  }
  const int ngroups = (a.steps + a.steps_per_group - 1) / a.steps_per_group;
  a.steps_per_split = ((ngroups + splits - 1) / splits) * a.steps_per_group;  // whole groups per split
  a.x = reinterpret_cast<const uint4*>(x.untyped_data());
  a.xsum = xsum.typed_data();
  a.codes = reinterpret_cast<const uint32_t*>(codes.typed_data());
  a.scale = reinterpret_cast<const __half*>(scale.typed_data());
  a.zero = reinterpret_cast<const __half*>(zero.typed_data());
  a.parts = parts->typed_data();  // every element is written: splits left without steps write zeros
  const int rows_per_block = 16 * static_cast<int>(tiles) * kMmaWarps;
  const dim3 grid((a.out + rows_per_block - 1) / rows_per_block, splits);
  const bool f16 = dt == kF16, two = nrows == 16, four = tiles == 4, pf = prefetch != 0 || bits == 2;
  auto launch = [&](auto t_tag, auto nt, auto tl, auto p) {
    constexpr int NT = decltype(nt)::value, TL = decltype(tl)::value;
    constexpr bool P = decltype(p)::value;
    if (bits == 4) scalar_mma_kernel<decltype(t_tag), NT, TL, P, 4><<<grid, 32 * kMmaWarps, 0, stream>>>(a);
    else if constexpr (P) scalar_mma_kernel<decltype(t_tag), NT, TL, true, 2><<<grid, 32 * kMmaWarps, 0, stream>>>(a);
  };
  auto by_rows = [&](auto t_tag, auto tl, auto p) {
    if (two) launch(t_tag, std::integral_constant<int, 2>{}, tl, p);
    else launch(t_tag, std::integral_constant<int, 1>{}, tl, p);
  };
  auto by_tiles = [&](auto t_tag, auto p) {
    if (four) by_rows(t_tag, std::integral_constant<int, 4>{}, p);
    else by_rows(t_tag, std::integral_constant<int, 2>{}, p);
  };
  auto by_prefetch = [&](auto t_tag) {  // 2-bit codes: always prefetched
    if (pf) by_tiles(t_tag, std::integral_constant<bool, true>{});
    else by_tiles(t_tag, std::integral_constant<bool, false>{});
  };
  if (f16) by_prefetch(__half{});
  else by_prefetch(__nv_bfloat16{});
  return launch_error("scalar_mma launch");
}

// ------------------------------------------------------------------------------------------
// E8P (QuIP#) decode-matvec: y_r = Q @ xr in the rotated domain (the RHT stays outside)
// ------------------------------------------------------------------------------------------
// Codes (jaxquant/formats/quip_sharp.py): per 8 weights `bits` bytes; the E8P12 16-bit code is
// bits 0-7 source index, 8-14 signs of coordinates 0-6, 15 shift (1: +1/4, 0: -1/4); for RVQ4 the
// next 2 bytes are the residual's E8P12 code (scaled by 1 / resid_scale).
// Decode in fp16 bit patterns: every source value (1/2, 3/2, 5/2) is an fp16 whose low byte is
// zero, so a source vector is 8 high bytes (`abs`, 8 bytes; byte 7's sign pre-flipped when the
// vector's parity forces a negative 8th coordinate). A second table maps the 7 sign bits to 0x80
// byte masks (byte 7: the parity of the 7 bits). XOR of the two, then one byte permute per pair
// gives the half2 (w_2i, w_2i+1) for an HFMA2 with x in fp16. The shift adds +-1/4 * sum(x) over
// the 8 inputs; the caller passes xq = -1/4 * sum per 8, and the shift bit flips its sign.
// Both tables are replicated 16 times, copy = lane % 16, so the 16 lanes of a 64-bit shared
// load phase hit 16 different bank pairs (no conflicts whatever the codes). They interleave in
// 256-byte entries: entry e holds the 16 copies of source vector e, then those of sign index
// e & 127 (bit 7 of a code's sign byte is its shift bit). A lane's byte offset for a code byte is
// then one byte permute, [lane copy offset, code byte, 0, 0], not a shift, mask and multiply-add.

constexpr int kE8Rep = 16;
constexpr size_t kE8SmemBytes = 256 * 2 * kE8Rep * sizeof(uint2);  // 64 KB

struct E8pArgs {
  const uint4* x;      // [n, G, units] 16-byte groups of 8 fp16 inputs: group g of unit u at [g][u]
  const float* xf;     // x-stationary kernel: float32 [in] in natural order (x and xq unused)
  const float* xq;     // [n, G, units]: -1/4 * sum of each 8 inputs, same order
  const uint4* codes;  // [out, k / 8 * bytes] as 16-byte units
  const uint2* abs;    // [256] fp16 high bytes of the source vectors
  float* y;            // [n, out]
  int n, k, out, units;
  float resid;         // 1 / resid_scale (RVQ4's second stage)
  const float* su;     // x-stationary kernel: signs [in] of x's RHT, done in the kernel (nullptr: x is rotated)
  float rht_scale;     // 1 / sqrt(in) with su
  const void* x_rht;   // with su: x [in] in x_dtype (0 float32, 1 fp16, 2 bf16), read by the RHT
  int x_dtype;
  const void* norm_w;  // with su: x is first RMS-normalized with this weight [in] in w_dtype (nullptr: it is
  int w_dtype;         // not); not rounded to x's dtype after, as the model's RMSNorm is
  float norm_eps;
};


__device__ __forceinline__ uint2 e8_sign_masks(uint32_t s) {
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) lo |= ((s >> i) & 1u) << (8 * i + 7);
#pragma unroll
  for (int i = 0; i < 3; ++i) hi |= ((s >> (4 + i)) & 1u) << (8 * i + 7);
  hi |= (static_cast<uint32_t>(__popc(s)) & 1u) << 31;
  return make_uint2(lo, hi);
}

// An E8P lookup's address is one byte permute of the code word with `copy`: the rank byte (kept
// from `copy`), the entry (the code byte) and the lane's copy offset; two of a code's ~18
// instructions fewer than adding the table's address (session 18). `copy` for the lookups of lane `lane`:
__device__ __forceinline__ uint32_t e8_lane_copy(const void* table, int lane) {
  return smem_rank_offset(table, (lane & 15) * sizeof(uint2));
}

// The signed source vector of the 16-bit code in bits 16 HI .. 16 HI + 15 of word w, as 4 half2 (no
// shift); tab is the block's table (on the GPU its address is implied: e8_lane_copy).
template <int HI>
__device__ __forceinline__ void e8_signed(uint32_t w, const char* tab, uint32_t copy, uint32_t (&h)[4]) {
  constexpr uint32_t source_byte = 0x7604u | (2 * HI) << 4, sign_byte = 0x7604u | (2 * HI + 1) << 4;
  const uint2 av = smem_lookup<uint2, 0>(tab, __byte_perm(w, copy, source_byte));
  const uint2 sv = smem_lookup<uint2, kE8Rep * sizeof(uint2)>(tab, __byte_perm(w, copy, sign_byte));
  const uint32_t lo = av.x ^ sv.x, hi = av.y ^ sv.y;
  h[0] = __byte_perm(lo, 0u, 0x1404);
  h[1] = __byte_perm(lo, 0u, 0x3424);
  h[2] = __byte_perm(hi, 0u, 0x1404);
  h[3] = __byte_perm(hi, 0u, 0x3424);
}

// h += x . (signed source vector of the code HI of word w).
template <int HI>
__device__ __forceinline__ __half2 e8_dot(uint32_t w, const char* tab, uint32_t copy, const uint4& xv, __half2 h) {
  uint32_t v[4];
  e8_signed<HI>(w, tab, copy, v);
  h = __hfma2(u2h2(xv.x), u2h2(v[0]), h);
  h = __hfma2(u2h2(xv.y), u2h2(v[1]), h);
  h = __hfma2(u2h2(xv.z), u2h2(v[2]), h);
  h = __hfma2(u2h2(xv.w), u2h2(v[3]), h);
  return h;
}

// Word wi (two 16-bit codes) of a 16-byte code unit c4. ST = 1: the codes of groups 2 wi and
// 2 wi + 1 (8 weights each) against their fp16 inputs xa, xb, into h[0] and h[1] (two chains: each
// fp16 sum over at most 16 products, a third less error than one chain, same speed). ST = 2: group wi's two
// stages against xa (xb unused), into h[0] and the residual h[1]. hq: the codes' shift terms, the
// half2 (xq of the low code, xq of the high one); its sign bits sit where the codes' shift bits do
// (15, 31), so one XOR applies both shifts and one add keeps them in t.
template <int ST, int wi>
__device__ __forceinline__ void e8_word(const uint4& c4, const uint4& xa, const uint4& xb, uint32_t hq,
                                        const char* tab, uint32_t copy, __half2 (&h)[2], __half2& t) {
  const uint32_t word = wi == 0 ? c4.x : wi == 1 ? c4.y : wi == 2 ? c4.z : c4.w;
  h[0] = e8_dot<0>(word, tab, copy, xa, h[0]);
  h[1] = e8_dot<1>(word, tab, copy, ST == 1 ? xb : xa, h[1]);
  t = __hadd2(t, u2h2(hq ^ (word & 0x80008000u)));
}

// The half2 of two groups' shift terms xq = -1/4 * sum of their 8 inputs, as e8_word takes it.
__device__ __forceinline__ uint32_t e8_shift_pair(float lo, float hi) { return h22u(__floats2half2_rn(lo, hi)); }

// A unit's value in fp32: the half2 sums plus the shift terms, the residual stage scaled.
template <int ST>
__device__ __forceinline__ float e8_unit_total(const __half2 (&h)[2], __half2 t, float resid) {
  const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]), ft = __half22float2(t);
  if constexpr (ST == 1) return ((f0.x + f0.y) + (f1.x + f1.y)) + (ft.x + ft.y);
  return fmaf(resid, (f1.x + f1.y) + ft.y, (f0.x + f0.y) + ft.x);
}

// The block's shared-memory table (above): 512 half entries, source vector i / 2 or sign masks of
// (i / 2) & 127. One thread per half entry: one load or mask, then its 16 copies (128 B) as 8
// 16-byte stores, rotated by i so that the 8 lanes of a store phase hit different banks (at small
// shapes this fill is a large share of a block's work).
__device__ __forceinline__ void e8_fill_tables(uint2* tab, const uint2* abs) {
  static_assert(kE8Rep == 16, "the fill writes 16 copies as 8 pairs");
  for (int i = threadIdx.x; i < 512; i += blockDim.x) {
    const uint2 v = i & 1 ? e8_sign_masks(static_cast<uint32_t>(i >> 1) & 127u) : __ldg(abs + (i >> 1));
    uint4* dst = reinterpret_cast<uint4*>(tab + static_cast<size_t>(i) * kE8Rep);
#pragma unroll
    for (int j = 0; j < kE8Rep / 2; ++j) dst[(j + i) & (kE8Rep / 2 - 1)] = make_uint4(v.x, v.y, v.x, v.y);
  }
  __syncthreads();
}

// Warps own R consecutive rows (grid-strided, persistent); lanes take 16-byte code units in turn
// (8 codes = 64 weights at 2 bits, 4 two-stage codes = 32 weights at 4 bits), U units per lane
// per step with all code loads issued first. x comes through L1 (every warp of an SM reads the
// same x). Products accumulate in half2 per unit (at most 32 per half), then in fp32.
template <int NB, int R, int ST, int U>
__global__ void __launch_bounds__(256) e8p_matvec_kernel(E8pArgs a) {
  extern __shared__ uint2 e8tab[];
  e8_fill_tables(e8tab, a.abs);
  const char* tab = reinterpret_cast<const char*>(e8tab);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const uint32_t copy = e8_lane_copy(e8tab, lane);
  const int kg = a.k / 8;  // groups per row

  for (int row0 = (blockIdx.x * nwarps + warp) * R; row0 < a.out; row0 += gridDim.x * nwarps * R) {
    const uint4* rp[R];
    static_for<R>([&](auto r) { rp[r] = a.codes + static_cast<size_t>(min(row0 + static_cast<int>(r), a.out - 1)) * a.units; });
    float acc[NB][R];
    static_for<NB>([&](auto b) { static_for<R>([&](auto r) { acc[b][r] = 0.f; }); });

    for (int u0 = lane; u0 < a.units; u0 += 32 * U) {
      uint4 cw[U][R];
      static_for<U>([&](auto u) {
        const int uu = u0 + 32 * static_cast<int>(u);
        if (uu < a.units) static_for<R>([&](auto r) { cw[u][r] = __ldcs(rp[r] + uu); });
      });
      static_for<U>([&](auto u) {
        const int uu = u0 + 32 * static_cast<int>(u);
        if (uu < a.units) {
          static_for<NB>([&](auto b) {
            if (b < a.n) {
              // Lane-contiguous: consecutive lanes read consecutive 16-byte groups (the caller
              // transposed x to [G][units]; read in unit order, each lane would touch its own line).
              const uint4* xp = a.x + (static_cast<size_t>(b) * kg + uu);
              const float* qp = a.xq + (static_cast<size_t>(b) * kg + uu);
              __half2 h[R][2], t[R];
              static_for<R>([&](auto r) { t[r] = h[r][0] = h[r][1] = __float2half2_rn(0.f); });
              static_for<4>([&](auto wi) {
                constexpr int ga = ST == 1 ? 2 * wi : wi, gb = ST == 1 ? ga + 1 : ga;  // the word's groups
                const uint4 xa = __ldg(xp + static_cast<size_t>(ga) * a.units);
                const uint4 xb = ST == 1 ? __ldg(xp + static_cast<size_t>(gb) * a.units) : xa;
                const uint32_t hq = e8_shift_pair(__ldg(qp + static_cast<size_t>(ga) * a.units),
                                                  __ldg(qp + static_cast<size_t>(gb) * a.units));
                static_for<R>([&](auto r) {
                  e8_word<ST, int(decltype(wi){})>(cw[u][r], xa, xb, hq, tab, copy, h[r], t[r]);
                });
              });
              static_for<R>([&](auto r) { acc[b][r] += e8_unit_total<ST>(h[r], t[r], a.resid); });
            }
          });
        }
      });
    }

    static_for<NB>([&](auto b) {
      static_for<R>([&](auto r) {
        const float v = warp_sum(acc[b][r]);
        const int row = row0 + r;
        if (lane == 0 && row < a.out && b < a.n) a.y[static_cast<size_t>(b) * a.out + row] = v;
      });
    });
  }
}

// Batch 1, x-stationary: the blocks are dealt to the K-chunks in turn (chunk = block % chunks; a
// chunk is 32 code units: 2048 inputs at 2 bits, 1024 at 4). A block stages its chunk's x once in
// shared memory (fp16, with the shift terms), each warp keeps it in registers (one code unit per
// lane) and walks every (the chunk's warps)-th group of R rows. Staging per block rather than per
// warp: at 7B shapes the per-warp copies of x (8 KB each, 16 warps per SM) were more L2 traffic
// than the codes. The first row groups' codes are requested before the table fill and the staging,
// so their DRAM latency overlaps both. With `su`, x comes unrotated and each block makes its
// chunk of x's RHT itself (e8_xs_rht_chunk): one kernel, where the Hadamard kernel before it ran
// on one SM for ~3.5 us at batch 1. Each row's partial over the chunk goes to part[chunk][row];
// the caller sums the chunks (deterministic, no atomics). With fewer blocks than chunks a block
// takes chunks in turn.
// Registers (sm_90, two accumulators a row): E8P 96 at R = 2 (80 in the 768-thread build), 128 at R = 4
// (capped: MINB), RVQ4 80 (78), 124; no spills; 2 blocks of 256 per SM.
// D: row groups whose codes are in flight while one decodes (1, or 2 to cover more of the DRAM
// latency per warp: +4 R registers).
constexpr int kE8XsStageBytes = 8 * 32 * sizeof(uint4) + 4 * 32 * sizeof(uint32_t);  // x (fp16), shift pairs
constexpr size_t kE8XsSmemBytes = kE8SmemBytes + kE8XsStageBytes;
constexpr int kE8XsRhtMaxIn = 8192;  // widest x whose RHT the kernel makes (every block reads all of x)
constexpr size_t kE8XsRhtSmemBytes = (2048 + 2048 / 32 + 32) * sizeof(float);  // a chunk of x in fp32 (pad32), 32 sums

// One pass of butterflies over index bits lo .. lo + NBITS - 1 of `total` floats in shared memory
// (pad32 layout), each thread taking 2^NBITS elements that differ in those bits.
template <int NBITS>
__device__ __forceinline__ void smem_butterfly_pass(float* buf, int total, int lo) {
  for (int g = threadIdx.x; g < (total >> NBITS); g += blockDim.x) {
    const int base = ((g >> lo) << (lo + NBITS)) | (g & ((1 << lo) - 1));
    float v[1 << NBITS];
#pragma unroll
    for (int i = 0; i < (1 << NBITS); ++i) v[i] = buf[pad32(base + (i << lo))];
    butterflies<NBITS>(v);
#pragma unroll
    for (int i = 0; i < (1 << NBITS); ++i) buf[pad32(base + (i << lo))] = v[i];
  }
}

// Elements i .. i + 7 (i a multiple of 8) of a float32 (dtype 0), fp16 (1) or bf16 (2) vector.
__device__ __forceinline__ void e8_load8(const void* p, int dtype, int i, float (&v)[8]) {
  if (dtype == 0) {
    const float4* q = reinterpret_cast<const float4*>(p) + i / 4;
    const float4 lo = __ldg(q), hi = __ldg(q + 1);
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w; v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    return;
  }
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i / 8);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (dtype == 1) {
      const float2 f = __half22float2(u2h2(w[k]));
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    } else {
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
    }
  }
}

// Chunk `chunk` (CK = 2^LOGCK inputs) of FWHT_n(su * x), n = parts * CK, unscaled, into buf (pad32;
// then 32 floats of scratch). In Sylvester order index = (c, j), so (H_n v)[chunk, j] = (H_CK z)[j]
// with z = sum over c of (-1)^popc(chunk & c) v[c, :]: z on the way in, then the CK-point transform.
// x is a.x_rht (a.x_dtype). With a.norm_w the chunk is of w * x and the return value 1 / rms(x) (the
// model's RMSNorm, eps a.norm_eps), for the caller to scale by: x's squares are summed on the same
// pass, and the block's sum is read after the transform's barriers (1 without a norm).
template <int LOGCK>
__device__ __forceinline__ float e8_xs_rht_chunk(const E8pArgs& a, int parts, int chunk, float* buf) {
  constexpr int CK = 1 << LOGCK, TASKS = CK / 8;  // a task: 8 consecutive outputs
  const float* __restrict__ su = a.su;
  // ps adjacent threads share a task, each summing every ps-th part, when the block has threads to
  // spare (small chunks: their parts are many); a power of two, so whole warps take part in the sums.
  int ps = 1;
  while (ps < 8 && 2 * ps * TASKS <= static_cast<int>(blockDim.x)) ps *= 2;
  float ss = 0.f;
  for (int t = threadIdx.x; t < TASKS * ps; t += blockDim.x) {
    const int g = t / ps;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int c = t % ps; c < parts; c += ps) {
      const float4* sp = reinterpret_cast<const float4*>(su + c * CK) + 2 * g;
      const float4 s0 = __ldg(sp), s1 = __ldg(sp + 1);
      const float m = __popc(chunk & c) & 1 ? -1.f : 1.f;
      float xv[8];
      e8_load8(a.x_rht, a.x_dtype, c * CK + 8 * g, xv);
      if (a.norm_w) {
        float wv[8];
        e8_load8(a.norm_w, a.w_dtype, c * CK + 8 * g, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          ss = fmaf(xv[e], xv[e], ss);
          xv[e] *= wv[e];
        }
      }
      const float xs[8] = {xv[0] * s0.x, xv[1] * s0.y, xv[2] * s0.z, xv[3] * s0.w,
                           xv[4] * s1.x, xv[5] * s1.y, xv[6] * s1.z, xv[7] * s1.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = fmaf(m, xs[e], v[e]);
    }
    for (int o = 1; o < ps; o *= 2) {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += __shfl_xor_sync(0xffffffffu, v[e], o);
    }
    if (t % ps == 0) {
      butterflies<3>(v);
#pragma unroll
      for (int e = 0; e < 8; ++e) buf[pad32(8 * g + e)] = v[e];
    }
  }
  float* sums = buf + CK + CK / 32;  // past the pad32 layout
  if (a.norm_w) {
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) sums[threadIdx.x >> 5] = ss;
  }
  static_for<(LOGCK - 3 + 3) / 4>([&](auto pp) {
    constexpr int lo = 3 + 4 * int(decltype(pp){}), nb = LOGCK - lo < 4 ? LOGCK - lo : 4;
    __syncthreads();
    smem_butterfly_pass<nb>(buf, CK, lo);
  });
  __syncthreads();
  if (!a.norm_w) return 1.f;
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += sums[w];
  return rsqrtf(total / static_cast<float>(parts * CK) + a.norm_eps);
}

// This thread's share of the 128-byte lines of [p, p + bytes) asked into L2: between a layer's uses
// the weights stream through L2 and evict small vectors that every block then reads.
__device__ __forceinline__ void e8_prefetch_l2_share(const void* p, int bytes) {
#if defined(__CUDA_ARCH__)
  const int stride = static_cast<int>(gridDim.x * blockDim.x) * 128;
  for (int off = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) * 128; off < bytes; off += stride) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + off));
  }
#endif
}

// With su every block reads all of su (and the norm's weight): asked into L2 by the grid's threads.
__device__ __forceinline__ void e8_prefetch_l2_inputs(const E8pArgs& a) {
  if (!a.su) return;
  e8_prefetch_l2_share(a.su, a.k * 4);
  if (a.norm_w) e8_prefetch_l2_share(a.norm_w, a.k * (a.w_dtype ? 2 : 4));
}

// How the batch-1 kernels deal blocks to chunks: chunk = block % chunks while there are at least as
// many blocks as chunks (uneven shares allowed), else a block takes chunks in turn (chunk += step).
// A warp walks every per_chunk-th row group of its chunk from first_grp.
struct E8ChunkDeal {
  int chunk, step, per_chunk, first_grp;
  __device__ __forceinline__ E8ChunkDeal(int chunks, int nwarps, int warp) {
    const int nblocks = gridDim.x, block = blockIdx.x;
    const bool shared_chunks = nblocks >= chunks;
    const int chunk_blocks = shared_chunks ? (nblocks - block % chunks + chunks - 1) / chunks : 1;  // on my chunk
    chunk = shared_chunks ? block % chunks : block;
    step = min(nblocks, chunks);
    per_chunk = nwarps * chunk_blocks;
    first_grp = (shared_chunks ? block / chunks : 0) * nwarps + warp;
  }
};

// Stages chunk `chunk` (CU code units) of x for the batch-1 kernels, then a barrier: fp16 x, group g of
// unit l at stage_x[g * CU + l], and the shift-term pairs of unit l's code word wi at stage_hq[wi * CU +
// l] (e8_word's hq). With su the chunk of x's RHT is made first (e8_xs_rht_chunk, into xrot).
template <int ST, int CU>
__device__ __forceinline__ void e8_xs_stage(const E8pArgs& a, int chunk, uint4* stage_x, uint32_t* stage_hq,
                                            float* xrot) {
  constexpr int G = 8 / ST, CK = CU * 8 * G, LOGCK = ST == 1 ? (CU == 32 ? 11 : 9) : (CU == 32 ? 10 : 8);
  static_assert(CK == 1 << LOGCK && (G * CU) % 32 == 0, "chunks of 8 or 32 code units");
  const float x_scale = a.su ? e8_xs_rht_chunk<LOGCK>(a, a.k / CK, chunk, xrot) * a.rht_scale : 1.f;
  // Task t: group t % G of unit t / G, its inputs 8 t .. 8 t + 7 of the chunk; a word's two groups
  // (2-bit) are adjacent lanes. Every warp has 32 tasks or none (tasks: a multiple of 32).
  for (int t = threadIdx.x; t < G * CU; t += blockDim.x) {
    const int l = t / G, g = t % G;
    float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // zeros past the end
    if (a.su) {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = xrot[pad32(8 * t) + e] * x_scale;  // no pad inside 8 aligned
    } else if (chunk * CU + l < a.units) {
      const float4* p = reinterpret_cast<const float4*>(a.xf + static_cast<size_t>(chunk) * CK + 8 * t);
      const float4 lo = __ldg(p), hi = __ldg(p + 1);
      f[0] = lo.x; f[1] = lo.y; f[2] = lo.z; f[3] = lo.w; f[4] = hi.x; f[5] = hi.y; f[6] = hi.z; f[7] = hi.w;
    }
    const float q = -0.25f * (((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7])));
    stage_x[g * CU + l] = make_uint4(h22u(__floats2half2_rn(f[0], f[1])), h22u(__floats2half2_rn(f[2], f[3])),
                                     h22u(__floats2half2_rn(f[4], f[5])), h22u(__floats2half2_rn(f[6], f[7])));
    if constexpr (ST == 1) {
      const float qn = __shfl_xor_sync(0xffffffffu, q, 1);  // the word's other group
      if (!(g & 1)) stage_hq[g / 2 * CU + l] = e8_shift_pair(q, qn);
    } else {
      stage_hq[g * CU + l] = e8_shift_pair(q, q);  // a word is one group's two stages
    }
  }
  __syncthreads();
}

// Diagnostics: built with -DJAXQUANT_E8P_PHASES, the x-stationary kernel stamps each block's phases
// (%globaltimer, ns) into e8_phase[block]: entry, table filled, after pdl_wait, first chunk staged,
// first and last warp done, then the SM it ran on; `jaxquant_e8p_phases` copies them out
// (scripts/e8p_phases.py).
#ifdef JAXQUANT_E8P_PHASES
constexpr int kE8PhaseBlocks = 1024;
constexpr int kE8PhaseFields = 7;
__device__ unsigned long long e8_phase[kE8PhaseBlocks][kE8PhaseFields];
__device__ __forceinline__ unsigned long long e8_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned int e8_smid() {
  unsigned int id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#define E8_PHASE(i) \
  if (threadIdx.x == 0 && blockIdx.x < kE8PhaseBlocks) e8_phase[blockIdx.x][i] = e8_now()
#define E8_WARP_DONE()                                                            \
  if ((threadIdx.x & 31) == 0 && blockIdx.x < kE8PhaseBlocks) {                  \
    const unsigned long long t = e8_now();                                        \
    atomicMin(&e8_phase[blockIdx.x][4], t);                                       \
    atomicMax(&e8_phase[blockIdx.x][5], t);                                       \
  }
#else
#define E8_PHASE(i)
#define E8_WARP_DONE()
#endif

#ifdef JAXQUANT_E8P_POOL
// Experiment (session 22; build with -DJAXQUANT_E8P_POOL=N): the last N sixteenths of each chunk's row
// groups form a pool that warps claim one group at a time once their static share is done, so that warps
// on fast SMs take over from slow ones (session 21: blocks with equal work finished 20-29 us into a 30 us
// kernel). A claim is an atomicAdd on the chunk's counter, issued two groups ahead of its load (session
// 21's claims one group ahead exposed their latency: 31 -> 50 us). Each warp stops at its first empty
// claim with exactly one more in flight, so a launch makes pool + 2 * (warps on the chunk) claims; the
// warp that gets the last one zeroes the counter for the next launch (which claims only after pdl_wait).
constexpr int kE8PoolChunks = 1024;
__device__ int e8_pool_next[kE8PoolChunks];

template <class Load0, class Load1, class Decode>
__device__ __forceinline__ void e8_pool_groups(int chunk, int groups, int first_grp, int per_chunk, int lane,
                                               Load0 load_first, Load1 load_next, Decode decode_group) {
  const int pool = groups * JAXQUANT_E8P_POOL / 16, fixed = groups - pool;
  const int total = pool + 2 * per_chunk;
  int* next = e8_pool_next + chunk;
  const int n_static = first_grp < fixed ? (fixed - 1 - first_grp) / per_chunk + 1 : 0;
  int ca = 0, cb = 0, np = 0, empty = -1;  // lane 0: the np pending claims' results, oldest first
  auto claim = [&] {
    const int c = lane == 0 ? atomicAdd(next, 1) : 0;
    if (np == 0) ca = c; else cb = c;
    ++np;
  };
  auto claimed_group = [&] {  // the oldest pending claim's group (groups: the pool is empty)
    const int c = __shfl_sync(0xffffffffu, ca, 0);
    ca = cb;
    --np;
    if (c < pool) return fixed + c;
    empty = c;
    return groups;
  };
  int grp = first_grp;
  if (n_static == 0) {  // no static group: the first claim's latency is exposed
    claim();
    claim();
    grp = claimed_group();
    if (grp < groups) {
      load_first(grp);
      claim();
    }
  } else if (n_static <= 2) {
    claim();
    if (n_static == 1) claim();
  }
  for (int i = 0; grp < groups; ++i) {  // group i of this warp; its claim was issued at group i - 2
    const int nxt = i + 1 < n_static ? grp + per_chunk : claimed_group();
    if (nxt < groups && i + 3 >= n_static) claim();
    if (nxt < groups) load_next(nxt);
    decode_group(grp);
    grp = nxt;
  }
  if (lane == 0 && (empty == total - 1 || (np > 0 && ca == total - 1))) *next = 0;
}
#endif

// MAXT: the largest block it is built for (768: one block of 24 warps sharing one table per SM); MINB:
// the blocks per SM its registers must allow.
template <int R, int ST, int D = 1, int MAXT = 256, int MINB = 1>
__global__ void __launch_bounds__(MAXT, MINB) e8p_matvec_xs_kernel(E8pArgs a, int chunks, float* part) {
  extern __shared__ uint2 e8tab[];
  constexpr int G = 8 / ST;  // 8-input groups per code unit
  uint4* stage_x = reinterpret_cast<uint4*>(e8tab + 2 * 256 * kE8Rep);  // [G][32]: group g of unit l at g * 32 + l
  uint32_t* stage_hq = reinterpret_cast<uint32_t*>(stage_x + G * 32);
  float* xrot = reinterpret_cast<float*>(reinterpret_cast<char*>(e8tab) + kE8XsSmemBytes);  // with su: the chunk's RHT
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const char* tab = reinterpret_cast<const char*>(e8tab);
  const uint32_t copy = e8_lane_copy(e8tab, lane);
  const E8ChunkDeal deal(chunks, nwarps, warp);
  const int per_chunk = deal.per_chunk, first_grp = deal.first_grp;
  const int groups = (a.out + R - 1) / R;
  int chunk = deal.chunk;
  int uu = chunk * 32 + lane;
  bool live = uu < a.units;
  auto load = [&](int grp, uint4 (&cw)[R]) {
    static_for<R>([&](auto r) {
      const int row = min(grp * R + static_cast<int>(r), a.out - 1);
      cw[r] = live ? __ldcs(a.codes + static_cast<size_t>(row) * a.units + uu) : make_uint4(0u, 0u, 0u, 0u);
    });
  };
  uint4 q[D + 1][R];  // q[0]: the group decoding now; q[1 .. D]: the next ones, loading
  auto prefetch = [&] {
    static_for<D>([&](auto d) {
      if (first_grp + d * per_chunk < groups) load(first_grp + d * per_chunk, q[d]);
    });
  };
  E8_PHASE(0);
#ifdef JAXQUANT_E8P_PHASES
  if (threadIdx.x == 0 && blockIdx.x < kE8PhaseBlocks) {
    e8_phase[blockIdx.x][4] = ~0ull;
    e8_phase[blockIdx.x][5] = 0;
    e8_phase[blockIdx.x][6] = e8_smid();
  }
#endif
  if (chunk < chunks) prefetch();
  e8_prefetch_l2_inputs(a);
  e8_fill_tables(e8tab, a.abs);
  E8_PHASE(1);
  pdl_wait();  // the codes' loads, the prefetches and the table fill above may overlap the kernel that makes x
  E8_PHASE(2);
  for (bool first = true; chunk < chunks; chunk += deal.step, first = false) {
    uu = chunk * 32 + lane;
    live = uu < a.units;
    if (!first) {
      prefetch();
      __syncthreads();  // the previous chunk's x is read
    }
    e8_xs_stage<ST, 32>(a, chunk, stage_x, stage_hq, xrot);
    if (first) {
      E8_PHASE(3);
      pdl_launch_dependents();  // the next kernel (the inverse transform) may start its prologue
    }
    uint4 xv[G];
    uint32_t hq[4];  // shift-term pairs of the 4 code words (e8_word)
    static_for<G>([&](auto g) { xv[g] = stage_x[g * 32 + lane]; });
    static_for<4>([&](auto wi) { hq[wi] = stage_hq[wi * 32 + lane]; });
    auto decode_group = [&](int grp) {  // q[0]'s rows into part, then the groups in flight move up
      uint4 (&cur)[R] = q[0];
      float v[R];
      static_for<R>([&](auto r) {
        __half2 t = __float2half2_rn(0.f), h[2] = {t, t};
        static_for<4>([&](auto wi) {
          constexpr int ga = ST == 1 ? 2 * wi : wi;
          e8_word<ST, int(decltype(wi){})>(cur[r], xv[ga], xv[ST == 1 ? ga + 1 : ga], hq[wi], tab, copy, h, t);
        });
        v[r] = warp_sum(e8_unit_total<ST>(h, t, a.resid));  // its shuffles overlap the next row's decode
      });
      static_for<R>([&](auto r) {
        const int row = grp * R + static_cast<int>(r);
        if (lane == 0 && row < a.out) part[static_cast<size_t>(chunk) * a.out + row] = v[r];
        static_for<D>([&](auto d) { q[d][r] = q[d + 1][r]; });
      });
    };
#ifdef JAXQUANT_E8P_POOL
    if constexpr (D == 1) {
      if (chunks <= kE8PoolChunks) {
        e8_pool_groups(chunk, groups, first_grp, per_chunk, lane, [&](int g) { load(g, q[0]); },
                       [&](int g) { load(g, q[1]); }, decode_group);
        continue;
      }
    }
#endif
    for (int grp = first_grp; grp < groups; grp += per_chunk) {
      if (grp + D * per_chunk < groups) load(grp + D * per_chunk, q[D]);
      decode_group(grp);
    }
  }
  E8_WARP_DONE();
}

// Batch 1 on tensor cores: e8p_mma's fragment mapping, lane (g, q) holding rows g and g + 8 of a 16-row
// tile and code unit 4 s + q of step s, with x as B (the same x in every column, so D's columns agree),
// over chunks of kE8TcUnits code units (512 inputs at 2 bits) staged per block as in the x-stationary
// kernel. A lane keeps its two units of x in registers (64 at 2 bits: x read from shared memory per
// code made the loop's shared-memory traffic 1.6 times the lookups'); a warp takes R tiles (16 R rows)
// of its chunk at a time, the next step's codes loading while one decodes. One HMMA takes the place of
// four HFMA2s, the sums are fp32, and no warp sum per row is left (the shift terms, summed per lane,
// need two shuffles). Smaller chunks than the x-stationary kernel's keep every warp busy at 16 rows a
// tile; their partials go to part[chunk][row] the same way.
constexpr int kE8TcUnits = 8;

template <int R, int ST>
__global__ void __launch_bounds__(256, 2) e8p_matvec_tc_kernel(E8pArgs a, int chunks, float* part) {
  extern __shared__ uint2 e8tab[];
  constexpr int CU = kE8TcUnits, G = 8 / ST, STEPS = CU / 4;
  uint4* stage_x = reinterpret_cast<uint4*>(e8tab + 2 * 256 * kE8Rep);
  uint32_t* stage_hq = reinterpret_cast<uint32_t*>(stage_x + G * CU);
  float* xrot = reinterpret_cast<float*>(reinterpret_cast<char*>(e8tab) + kE8XsSmemBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, g = lane >> 2, q = lane & 3;
  const char* tab = reinterpret_cast<const char*>(e8tab);
  const uint32_t copy = e8_lane_copy(e8tab, lane);
  const E8ChunkDeal deal(chunks, nwarps, warp);
  const int per_chunk = deal.per_chunk, first_grp = deal.first_grp;
  const int groups = (a.out + 16 * R - 1) / (16 * R);
  int chunk = deal.chunk;
  // Step s of row group grp: unit 4 s + q of the chunk, rows g and g + 8 of each tile
  auto load = [&](int grp, int s, uint4 (&cw)[R][2]) {
    const int uu = chunk * CU + 4 * s + q;
    static_for<R>([&](auto t) {
      static_for<2>([&](auto h) {
        const int row = min(grp * 16 * R + 16 * static_cast<int>(t) + g + 8 * static_cast<int>(h), a.out - 1);
        cw[t][h] = uu < a.units ? __ldcs(a.codes + static_cast<size_t>(row) * a.units + uu) : make_uint4(0u, 0u, 0u, 0u);
      });
    });
  };
  uint4 cur[R][2], nxt[R][2];
  if (chunk < chunks && first_grp < groups) load(first_grp, 0, cur);
  e8_prefetch_l2_inputs(a);
  e8_fill_tables(e8tab, a.abs);
  pdl_wait();
  for (bool first = true; chunk < chunks; chunk += deal.step, first = false) {
    if (!first) {
      if (first_grp < groups) load(first_grp, 0, cur);
      __syncthreads();  // the previous chunk's x is read
    }
    e8_xs_stage<ST, CU>(a, chunk, stage_x, stage_hq, xrot);
    if (first) pdl_launch_dependents();
    uint4 xv[STEPS][G];  // the lane's units 4 s + q of x, kept for all its row groups of the chunk
    uint32_t hqv[STEPS][4];
    static_for<STEPS>([&](auto s) {
      static_for<G>([&](auto j) { xv[s][j] = stage_x[j * CU + 4 * s + q]; });
      static_for<4>([&](auto wi) { hqv[s][wi] = stage_hq[wi * CU + 4 * s + q]; });
    });
    for (int grp = first_grp; grp < groups; grp += per_chunk) {
      float d[R][ST][4];
      __half2 ts[R][2];  // shift terms of rows g, g + 8 (per stage in the halves at 4 bits)
      static_for<R>([&](auto t) {
        static_for<ST>([&](auto st) { static_for<4>([&](auto e) { d[t][st][e] = 0.f; }); });
        ts[t][0] = ts[t][1] = __float2half2_rn(0.f);
      });
      static_for<STEPS>([&](auto sc) {
        constexpr int s = int(decltype(sc){});
        if constexpr (s + 1 < STEPS) load(grp, s + 1, nxt);
        else if (grp + per_chunk < groups) load(grp + per_chunk, 0, nxt);
        static_for<4>([&](auto wi) {
          static_for<2>([&](auto hi) {  // the word's low and high code
            constexpr int j = ST == 1 ? 2 * wi + hi : wi, st = ST == 1 ? 0 : int(decltype(hi){});
            const uint4& x8 = xv[s][j];
            static_for<R>([&](auto t) {
              uint32_t r0[4], r1[4];  // rows g, g + 8
              e8_signed<hi>(uint4_at(cur[t][0], wi), tab, copy, r0);
              e8_signed<hi>(uint4_at(cur[t][1], wi), tab, copy, r1);
              const uint32_t ka[4] = {r0[0], r1[0], r0[1], r1[1]}, kb[4] = {r0[2], r1[2], r0[3], r1[3]};
              mma_16816<__half>(d[t][st], ka, x8.x, x8.y);
              mma_16816<__half>(d[t][st], kb, x8.z, x8.w);
            });
          });
          static_for<R>([&](auto t) {
            static_for<2>([&](auto h) {
              ts[t][h] = __hadd2(ts[t][h], u2h2(hqv[s][wi] ^ (uint4_at(cur[t][h], wi) & 0x80008000u)));
            });
          });
        });
        static_for<R>([&](auto t) { cur[t][0] = nxt[t][0]; cur[t][1] = nxt[t][1]; });  // the last: next group's
      });
      static_for<R>([&](auto t) {
        static_for<2>([&](auto h) {
          const float2 f = __half22float2(ts[t][h]);
          float s0 = ST == 1 ? f.x + f.y : f.x, s1 = f.y;  // the lane's unit's shift terms; then the 4 units'
          s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
          s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
          if constexpr (ST == 2) {
            s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
            s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
          }
          const float v = ST == 1 ? d[t][0][2 * h] + s0 : fmaf(a.resid, d[t][ST - 1][2 * h] + s1, d[t][0][2 * h] + s0);
          const int row = grp * 16 * R + 16 * static_cast<int>(t) + g + 8 * static_cast<int>(h);
          if (q == 0 && row < a.out) part[static_cast<size_t>(chunk) * a.out + row] = v;
        });
      });
    }
  }
}

// A batch-1 kernel (x-stationary or tensor-core) as one persistent wave, at least one block per chunk.
template <class K>
cudaError_t launch_e8p_batch1(K kernel, cudaStream_t stream, const E8pArgs& a, int nwarps, int chunks, float* part) {
  const size_t smem = kE8XsSmemBytes + (a.su ? kE8XsRhtSmemBytes : 0);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int blocks = max(multiprocessors() * blocks_per_sm(kernel, nwarps * 32, smem), chunks);
  return launch_dependent(kernel, dim3(blocks), dim3(nwarps * 32), smem, stream, a, chunks, part);
}

template <int R, int ST, int D>
cudaError_t launch_e8p_xs(cudaStream_t stream, const E8pArgs& a, int nwarps, int chunks, float* part) {
  if constexpr (R == 2 && D == 1) {  // more than 8 warps: one block per SM (80 registers a thread)
    if (nwarps > 8) return launch_e8p_batch1(e8p_matvec_xs_kernel<R, ST, D, 768>, stream, a, nwarps, chunks, part);
  }
  if constexpr (R == 4 && D == 1) {  // 16 warps of 4 rows: one block (one table) per SM, 128 registers (e8p_xs_run)
    if (nwarps == 16) return launch_e8p_batch1(e8p_matvec_xs_kernel<R, ST, D, 512, 1>, stream, a, nwarps, chunks, part);
  }
  // 4 rows, one group in flight: uncapped, ptxas takes 146 registers (one block per SM; session 19: the
  // cap at 128 for two blocks is 3-5% faster at 70B shapes and 20% at 8192 x 8192, no spills)
  constexpr int MINB = R == 4 && D == 1 ? 2 : 1;
  return launch_e8p_batch1(e8p_matvec_xs_kernel<R, ST, D, 256, MINB>, stream, a, nwarps, chunks, part);
}

template <int NB, int R, int ST, int U = 2>
cudaError_t launch_e8p(cudaStream_t stream, const E8pArgs& a, int nwarps) {
  auto kernel = e8p_matvec_kernel<NB, R, ST, U>;
  cudaError_t err = allow_smem(kernel, kE8SmemBytes);
  if (err != cudaSuccess) return err;
  const int tasks = (a.out + nwarps * R - 1) / (nwarps * R);
  const int blocks = min(tasks, multiprocessors() * blocks_per_sm(kernel, nwarps * 32, kE8SmemBytes));
  kernel<<<blocks, nwarps * 32, kE8SmemBytes, stream>>>(a);
  return cudaSuccess;
}

// Batch 1: R rows per warp (1, 2, 4) and U code units per lane per step (1, 2); 0 picks the
// measured default (R = 2 from 8192 rows, else 1; U = 2).
template <int ST>
cudaError_t dispatch_e8p(cudaStream_t stream, const E8pArgs& a, int nwarps, int rows, int units) {
  if (a.n <= 1) {
    if (rows <= 0) rows = a.out >= 8192 ? 2 : 1;
    if (units <= 0) units = 2;
    if (rows >= 4) return units == 1 ? launch_e8p<1, 4, ST, 1>(stream, a, nwarps) : launch_e8p<1, 4, ST, 2>(stream, a, nwarps);
    if (rows >= 2) return units == 1 ? launch_e8p<1, 2, ST, 1>(stream, a, nwarps) : launch_e8p<1, 2, ST, 2>(stream, a, nwarps);
    return units == 1 ? launch_e8p<1, 1, ST, 1>(stream, a, nwarps) : launch_e8p<1, 1, ST, 2>(stream, a, nwarps);
  }
  if (a.n <= 2) return launch_e8p<2, 1, ST>(stream, a, nwarps);
  if (a.n <= 4) return launch_e8p<4, 1, ST>(stream, a, nwarps);
  return launch_e8p<8, 1, ST>(stream, a, nwarps);
}

ffi::Error E8pMatvecImpl(cudaStream_t stream, ffi::Buffer<ffi::F16> x, ffi::Buffer<ffi::F32> xq,
                         ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::U32> abs, ffi::Result<ffi::Buffer<ffi::F32>> y,
                         int64_t bits, double resid_scale, int64_t rows_per_warp, int64_t warps,
                         int64_t units_per_step) {
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("e8p_matvec: x [n, in], codes [out, in/8, bytes], y [n, out]");
  }
  if (bits != 2 && bits != 4) return ffi::Error::InvalidArgument("e8p_matvec: bits must be 2 (E8P) or 4 (RVQ4)");
  E8pArgs a{};
  a.n = static_cast<int>(xd[0]);
  a.k = static_cast<int>(xd[1]);
  a.out = static_cast<int>(cd[0]);
  const int st = static_cast<int>(bits / 2);
  if (cd[2] != bits || cd[1] * 8 != xd[1] || yd[0] != xd[0] || yd[1] != cd[0] || a.n < 1 || a.n > 8) {
    return ffi::Error::InvalidArgument("e8p_matvec: shapes disagree (or n is not in 1..8)");
  }
  if (a.k % (64 / st)) return ffi::Error::InvalidArgument("e8p_matvec: in must be a multiple of 64 (2-bit) or 32 (4-bit)");
  if (xq.element_count() != static_cast<size_t>(a.n) * (a.k / 8) || abs.element_count() != 512) {
    return ffi::Error::InvalidArgument("e8p_matvec: xq must be [n, in/8] and abs [256, 2] words");
  }
  a.units = a.k * st / 64;
  a.x = reinterpret_cast<const uint4*>(x.typed_data());
  a.xq = xq.typed_data();
  a.codes = reinterpret_cast<const uint4*>(codes.typed_data());
  a.abs = reinterpret_cast<const uint2*>(abs.typed_data());
  a.y = y->typed_data();
  a.resid = static_cast<float>(1.0 / resid_scale);
  const int nwarps = (warps >= 1 && warps <= 8) ? static_cast<int>(warps) : 8;
  const int rows = static_cast<int>(rows_per_warp), units = static_cast<int>(units_per_step);
  cudaError_t err = st == 1 ? dispatch_e8p<1>(stream, a, nwarps, rows, units)
                            : dispatch_e8p<2>(stream, a, nwarps, rows, units);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("e8p_matvec: ") + cudaGetErrorString(err));
  return launch_error("e8p_matvec launch");
}

// The x-stationary kernel's arguments: x float32 [k] in natural order (unrotated with su: the kernel
// makes its RHT), partials part [chunks, out].
E8pArgs e8p_xs_args(const float* x, int64_t k, int64_t out, const uint8_t* codes, const uint32_t* abs,
                    const float* su, float* part, int64_t bits, double resid_scale) {
  E8pArgs a{};
  a.n = 1;
  a.k = static_cast<int>(k);
  if (su) {
    a.su = su;
    a.rht_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  }
  a.out = static_cast<int>(out);
  a.units = static_cast<int>(k * (bits / 2) / 64);
  a.xf = x;
  a.x_rht = x;
  a.codes = reinterpret_cast<const uint4*>(codes);
  a.abs = reinterpret_cast<const uint2*>(abs);
  a.y = part;
  a.resid = static_cast<float>(1.0 / resid_scale);
  return a;
}

// The batch-1 kernels' chunks (their partials' leading axis): code units per row, 32 per chunk for the
// x-stationary kernel, kE8TcUnits for the tensor-core one.
int e8p_xs_chunks(int64_t units, bool tc) {
  const int64_t per = tc ? kE8TcUnits : 32;
  return static_cast<int>((units + per - 1) / per);
}

// Launch knobs as e8p_matvec's (0: the measured defaults); tc: the tensor-core kernel, rows_per_warp
// then its 16-row tiles per warp (1 or 2). The x-stationary kernel takes up to 24 warps per block.
cudaError_t e8p_xs_run(cudaStream_t stream, const E8pArgs& a, int64_t bits, int64_t rows_per_warp, int64_t warps,
                       int64_t prefetch, bool tc) {
  // Default: 4 rows per warp from 2^27 weights (70B shapes on an H100, session 7: E8P 58.0 vs
  // 56.9%, RVQ4 66.8 vs 63.3% of copy); below, 2 rows per warp and 16 warps in one block per SM (the
  // Llama-2-7B decode step, session 18: the E8P kernels' mean 12.3 -> 11.8 us against 2 blocks of 8).
  // From 2^26 weights with at most 8192 inputs: 16 warps of 4 rows, one block and one table per SM (session
  // 21, device clock: E8P 28672x8192 -2.5%, 8192^2 -1.7%, 16384x8192 -2%, 28672x4096 -3.5%, 22016x4096 +3%;
  // RVQ4 1.5-6% faster at all of them; at 8192x28672 2.6% / 7% slower, so not there).
  const bool big = int64_t{a.out} * a.k >= (int64_t{1} << 27);
  const bool one_table = !tc && rows_per_warp == 0 && warps == 0 && prefetch <= 1 && a.k <= 8192 &&
                         int64_t{a.out} * a.k >= (int64_t{1} << 26);
  if (one_table) rows_per_warp = 4;
  const int max_warps = tc ? 8 : 24;  // beyond 8: the x-stationary kernel at 2 rows per warp, one block per SM
  const int st = static_cast<int>(bits / 2);
  const int nwarps = (warps >= 1 && warps <= max_warps) ? static_cast<int>(warps)
                     : one_table || (warps == 0 && !tc && !big && rows_per_warp <= 2 && prefetch <= 1) ? 16 : 8;
  const int chunks = e8p_xs_chunks(a.units, tc);
  if (nwarps > 8) {
    if (nwarps != 16 || rows_per_warp != 4) rows_per_warp = 2;
    prefetch = 1;
  }
  if (tc) {
    const bool two = rows_per_warp >= 2 || (rows_per_warp == 0 && big);
    if (two) return st == 1 ? launch_e8p_batch1(e8p_matvec_tc_kernel<2, 1>, stream, a, nwarps, chunks, a.y) : launch_e8p_batch1(e8p_matvec_tc_kernel<2, 2>, stream, a, nwarps, chunks, a.y);
    return st == 1 ? launch_e8p_batch1(e8p_matvec_tc_kernel<1, 1>, stream, a, nwarps, chunks, a.y) : launch_e8p_batch1(e8p_matvec_tc_kernel<1, 2>, stream, a, nwarps, chunks, a.y);
  }
  auto launch = [&](auto r, auto d) {
    constexpr int R = decltype(r)::value, D = decltype(d)::value;
    return st == 1 ? launch_e8p_xs<R, 1, D>(stream, a, nwarps, chunks, a.y)
                   : launch_e8p_xs<R, 2, D>(stream, a, nwarps, chunks, a.y);
  };
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  const bool four = rows_per_warp >= 4 || (rows_per_warp == 0 && big);
  if (four) return prefetch >= 2 ? launch(std::integral_constant<int, 4>{}, Two{}) : launch(std::integral_constant<int, 4>{}, One{});
  return prefetch >= 2 ? launch(Two{}, Two{}) : launch(Two{}, One{});
}

// Shapes the batch-1 kernels take: codes [out, in / 8, bits] (bits 2 or 4), abs [256, 2] words, x [in]
// (in a multiple of 64 / (bits / 2)), partials [e8p_xs_chunks, out]; with the RHT (rht) in a power of
// two from one chunk to kE8XsRhtMaxIn and su [in]. An error message or nullptr.
const char* e8p_xs_shape_error(ffi::Span<const int64_t> cd, int64_t k, int64_t chunks_out, int64_t out_rows,
                               int64_t abs_count, int64_t bits, bool rht, int64_t su_count, bool tc) {
  if (cd.size() != 3 || (bits != 2 && bits != 4) || cd[2] != bits || abs_count != 512) {
    return "codes [out, in/8, bits] with bits 2 or 4, abs [256, 2] words";
  }
  const int64_t st = bits / 2, chunk_in = (tc ? kE8TcUnits : 32) * 64 / st;
  if (cd[1] * 8 != k || k % (64 / st) || chunks_out != e8p_xs_chunks(k * st / 64, tc) || out_rows != cd[0]) {
    return "x [in] (in a multiple of 64 / (bits / 2)), partials [chunks, out] (32 code units a chunk, 8 on "
           "tensor cores)";
  }
  if (rht && (k & (k - 1) || k < chunk_in || k > kE8XsRhtMaxIn || su_count != k)) {
    return "the in-kernel RHT needs in a power of two from one chunk (2048 inputs at 2 bits, 1024 at 4; a quarter "
           "on tensor cores) to 8192, and su [in]";
  }
  return nullptr;
}

// The x-stationary kernel (batch 1): y [chunks, out] partials of x [in] (see e8p_xs_args).
ffi::Error E8pMatvecXsImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::U32> abs, ffi::Buffer<ffi::F32> su, ffi::Result<ffi::Buffer<ffi::F32>> y,
                           int64_t bits, double resid_scale, int64_t rows_per_warp, int64_t warps, int64_t prefetch,
                           int64_t rht, int64_t tensor_cores) {
  auto cd = codes.dimensions();
  auto yd = y->dimensions();
  const int64_t k = static_cast<int64_t>(x.element_count());
  const char* bad = yd.size() != 2 ? "y [chunks, out]"
                                   : e8p_xs_shape_error(cd, k, yd[0], yd[1], abs.element_count(), bits, rht != 0,
                                                        su.element_count(), tensor_cores != 0);
  if (bad) return ffi::Error::InvalidArgument(std::string("e8p_matvec_xs: ") + bad);
  const E8pArgs a = e8p_xs_args(x.typed_data(), k, cd[0], codes.typed_data(), abs.typed_data(),
                                rht ? su.typed_data() : nullptr, y->typed_data(), bits, resid_scale);
  const cudaError_t err = e8p_xs_run(stream, a, bits, rows_per_warp, warps, prefetch, tensor_cores != 0);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("e8p_matvec_xs: ") + cudaGetErrorString(err));
  return launch_error("e8p_matvec_xs launch");
}

// The QuIP# linear of one row in one FFI call, so that XLA records its kernels as one graph node and
// each starts programmatically dependent on the one before (pdl.h): x's RHT (in the E8P kernel for a
// power-of-two width; else on a cluster, in_cluster = 1, into the scratch xr, x's signs already
// applied), the x-stationary E8P kernel into the scratch partials, and the partials' sum inverse-
// transformed with the output signs sv on a cluster into y. in_bits / out_bits: the cluster factors'
// sign bits (rht_cluster.cu); unused inputs are any one-element arrays. The E8P launch knobs are
// e8p_matvec_xs's. x: float32, or fp16 / bf16 when the E8P kernel rotates it (read as it comes: no
// convert kernel before). norm = 1: x is the model's residual stream, RMS-normalized with norm_w
// (float32, fp16 or bf16) and norm_eps in the E8P kernel, in float32 (the model rounds the normalized
// x to its dtype; reading x once, the kernel applies 1 / rms after the transform instead).
// The e8_load8 code of a float32, fp16 or bf16 buffer; -1 for any other dtype.
int e8_dtype_code(ffi::DataType t) {
  return t == ffi::DataType::F32 ? 0 : t == ffi::DataType::F16 ? 1 : t == ffi::DataType::BF16 ? 2 : -1;
}

// One batch-1 QuIP# linear's launches: x's RHT on a cluster where in_bits (x_cluster -> xr, in_io), the
// E8P kernel (e8, which reads xr then) into its partials, their sum's inverse RHT into y (out_io).
struct E8pLinearPlan {
  E8pArgs e8;
  int64_t bits, rows_per_warp, warps, prefetch;
  bool tc;  // the tensor-core kernel
  const float* x_cluster = nullptr;
  const uint32_t* in_bits = nullptr;
  int in_a = 0;
  float* xr = nullptr;
  RhtcIo in_io;
  const uint32_t* out_bits = nullptr;
  int out_a = 0;
  const float* sv = nullptr;
  void* y = nullptr;
  RhtcIo out_io;
};

cudaError_t e8p_linear_launch(cudaStream_t stream, E8pLinearPlan p) {
  const auto scale = [](int64_t n) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(n))); };
  cudaError_t err = cudaSuccess;
  if (p.in_bits) {
    err = rht_cluster_run(stream, p.x_cluster, p.in_bits, nullptr, p.xr, p.in_a, 1, 1, p.e8.k, scale(p.e8.k), 0, 0,
                          &p.in_io);
    p.e8.xf = p.xr;
    p.e8.x_rht = p.xr;
  }
  if (err == cudaSuccess) err = e8p_xs_run(stream, p.e8, p.bits, p.rows_per_warp, p.warps, p.prefetch, p.tc);
  if (err == cudaSuccess) {
    err = rht_cluster_run(stream, p.e8.y, p.out_bits, p.sv, p.y, p.out_a, e8p_xs_chunks(p.e8.units, p.tc), 1, p.e8.out,
                          scale(p.e8.out), 0, 0, &p.out_io);
  }
  return err;
}

ffi::Error E8pLinearImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> codes,
                         ffi::Buffer<ffi::U32> abs, ffi::Buffer<ffi::F32> su, ffi::Buffer<ffi::U32> in_bits,
                         ffi::Buffer<ffi::U32> out_bits, ffi::Buffer<ffi::F32> sv, ffi::AnyBuffer norm_w,
                         ffi::AnyBuffer resid, ffi::Buffer<ffi::F32> out_scale, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::Buffer<ffi::F32>> part, ffi::Result<ffi::Buffer<ffi::F32>> xr, int64_t bits,
                         double resid_scale, int64_t in_cluster, int64_t rows_per_warp, int64_t warps,
                         int64_t prefetch, int64_t norm, double norm_eps, int64_t add_resid, int64_t split0,
                         int64_t split1, int64_t tensor_cores) {
  const int x_dtype = e8_dtype_code(x.element_type()), w_dtype = e8_dtype_code(norm_w.element_type());
  auto cd = codes.dimensions(), pd = part->dimensions(), ib = in_bits.dimensions(), ob = out_bits.dimensions();
  const int64_t k = static_cast<int64_t>(x.element_count()), out = static_cast<int64_t>(y->element_count());
  const char* bad = pd.size() != 2 ? "partials [chunks, out]"
                                   : e8p_xs_shape_error(cd, k, pd[0], pd[1], abs.element_count(), bits, !in_cluster,
                                                        su.element_count(), tensor_cores != 0);
  if (!bad && (ob.size() != 2 || ob[1] != (ob[0] + 31) / 32 || out != cd[0] ||
               static_cast<int64_t>(sv.element_count()) != out)) {
    bad = "out_bits [A, ceil(A / 32)], y [out] and sv [out]";
  }
  if (!bad && in_cluster && (ib.size() != 2 || ib[1] != (ib[0] + 31) / 32 ||
                             static_cast<int64_t>(xr->element_count()) != k)) {
    bad = "in_bits [A, ceil(A / 32)] and xr [in] for the input transform on a cluster";
  }
  if (!bad && (x_dtype < 0 || (in_cluster && x_dtype != 0))) {
    bad = "x float32, or fp16 / bf16 with x's RHT in the E8P kernel";
  }
  if (!bad && norm && (in_cluster || w_dtype < 0 || static_cast<int64_t>(norm_w.element_count()) != k)) {
    bad = "the RMSNorm needs x's RHT in the E8P kernel and norm_w [in] (float32, fp16 or bf16)";
  }
  const int64_t scales = 1 + (split0 > 0 && split0 < out) + (split1 > 0 && split1 < out);
  if (!bad && (e8_dtype_code(y->element_type()) < 0 ||
               (add_resid && (static_cast<int64_t>(resid.element_count()) != out ||
                              y->element_type() != resid.element_type())) ||
               static_cast<int64_t>(out_scale.element_count()) != scales || split0 % 4 || split1 % 4 ||
               split0 < 0 || (split1 && split1 < split0))) {
    bad = "y float32, fp16 or bf16 (resid [out] in its dtype), out_scale [1 + parts' splits], splits multiples of 4";
  }
  if (bad) return ffi::Error::InvalidArgument(std::string("e8p_linear: ") + bad);
  const float* xin = static_cast<const float*>(x.untyped_data());  // float32 unless x_rht says otherwise
  E8pLinearPlan p{e8p_xs_args(xin, k, out, codes.typed_data(), abs.typed_data(), in_cluster ? nullptr : su.typed_data(),
                              part->typed_data(), bits, resid_scale),
                  bits, rows_per_warp, warps, prefetch, tensor_cores != 0};
  if (in_cluster) {
    p.x_cluster = xin;
    p.in_bits = in_bits.typed_data();
    p.in_a = static_cast<int>(ib[0]);
    p.xr = xr->typed_data();
  } else {
    p.e8.x_dtype = x_dtype;  // the RHT reads x as it comes
  }
  if (norm) {
    p.e8.norm_w = norm_w.untyped_data();
    p.e8.w_dtype = w_dtype;
    p.e8.norm_eps = static_cast<float>(norm_eps);
  }
  p.out_bits = out_bits.typed_data();
  p.out_a = static_cast<int>(ob[0]);
  p.sv = sv.typed_data();
  p.y = y->untyped_data();
  p.out_io.dtype = e8_dtype_code(y->element_type());
  p.out_io.out_scale = out_scale.typed_data();
  if (split0 > 0 && split0 < out) p.out_io.scale_split[0] = static_cast<int>(split0);
  if (split1 > 0 && split1 < out) p.out_io.scale_split[1] = static_cast<int>(split1);
  if (add_resid) p.out_io.resid = resid.untyped_data();
  const cudaError_t err = e8p_linear_launch(stream, p);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("e8p_linear: ") + cudaGetErrorString(err));
  return launch_error("e8p_linear launch");
}

// A Llama MLP block of one row in one FFI call: y = x + down(silu(g gate) * (u up)) with [gate; up] =
// gate_up(rms_norm(x)), both QuIP# linears of `bits` (e8p_linear's kernels, five in a chain): the
// norm and x's RHT in the gate/up E8P kernel (d a power of two it rotates), the gate/up partials'
// inverse RHT, the down input's RHT on a cluster reading gate and up (swiglu), the down E8P kernel,
// its partials' inverse RHT adding x. gu_scale [2] and dn_scale [1]: the two linears' row scales (the
// format's own arrays: no kernel to gather them). y in x's dtype.
ffi::Error E8pMlpImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer norm_w, ffi::Buffer<ffi::U32> abs,
                      ffi::Buffer<ffi::U8> gu_codes, ffi::Buffer<ffi::F32> gu_su, ffi::Buffer<ffi::F32> gu_sv,
                      ffi::Buffer<ffi::U32> gu_out_bits, ffi::Buffer<ffi::F32> gu_scale, ffi::Buffer<ffi::U8> dn_codes,
                      ffi::Buffer<ffi::F32> dn_su, ffi::Buffer<ffi::F32> dn_sv, ffi::Buffer<ffi::U32> dn_in_bits,
                      ffi::Buffer<ffi::U32> dn_out_bits, ffi::Buffer<ffi::F32> dn_scale, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::Buffer<ffi::F32>> gu_part, ffi::Result<ffi::Buffer<ffi::F32>> gu_y,
                      ffi::Result<ffi::Buffer<ffi::F32>> dn_x, ffi::Result<ffi::Buffer<ffi::F32>> dn_part, int64_t bits,
                      double resid_scale, double norm_eps, int64_t rows_per_warp, int64_t warps, int64_t prefetch,
                      int64_t tensor_cores) {
  const int x_dtype = e8_dtype_code(x.element_type()), w_dtype = e8_dtype_code(norm_w.element_type());
  auto gc = gu_codes.dimensions(), dc = dn_codes.dimensions(), gp = gu_part->dimensions(), dp = dn_part->dimensions();
  auto go = gu_out_bits.dimensions(), di = dn_in_bits.dimensions(), dout = dn_out_bits.dimensions();
  const int64_t d = static_cast<int64_t>(x.element_count()), f2 = gc.size() == 3 ? gc[0] : 0, f = f2 / 2;
  auto bits_ok = [](ffi::Span<const int64_t> b) { return b.size() == 2 && b[1] == (b[0] + 31) / 32; };
  const char* bad = gp.size() != 2 || dp.size() != 2 ? "partials [chunks, out]"
                    : e8p_xs_shape_error(gc, d, gp[0], gp[1], abs.element_count(), bits, true, gu_su.element_count(),
                                         tensor_cores != 0);
  if (!bad) bad = e8p_xs_shape_error(dc, f, dp[0], dp[1], abs.element_count(), bits, false, 0, tensor_cores != 0);
  if (!bad && (f2 % 2 || dc[0] != d || gu_sv.element_count() != static_cast<size_t>(f2) ||
               gu_y->element_count() != static_cast<size_t>(f2) || dn_su.element_count() != static_cast<size_t>(f) ||
               dn_x->element_count() != static_cast<size_t>(f) || dn_sv.element_count() != static_cast<size_t>(d) ||
               y->element_count() != static_cast<size_t>(d))) {
    bad = "gate_up [2 f, d], down [d, f]: su, sv, the scratch and y of those widths";
  }
  if (!bad && (!bits_ok(go) || !bits_ok(di) || !bits_ok(dout) || gu_scale.element_count() != 2 ||
               dn_scale.element_count() != 1)) {
    bad = "factor bits [A, ceil(A / 32)], gate_up_scale [2], down_scale [1]";
  }
  if (!bad && (x_dtype < 0 || w_dtype < 0 || norm_w.element_count() != static_cast<size_t>(d) ||
               y->element_type() != x.element_type())) {
    bad = "x and y [d] in one dtype, norm_w [d] (float32, fp16 or bf16)";
  }
  if (bad) return ffi::Error::InvalidArgument(std::string("e8p_mlp: ") + bad);
  E8pLinearPlan up{e8p_xs_args(static_cast<const float*>(x.untyped_data()), d, f2, gu_codes.typed_data(),
                               abs.typed_data(), gu_su.typed_data(), gu_part->typed_data(), bits, resid_scale),
                   bits, rows_per_warp, warps, prefetch, tensor_cores != 0};
  up.e8.x_dtype = x_dtype;
  up.e8.norm_w = norm_w.untyped_data();
  up.e8.w_dtype = w_dtype;
  up.e8.norm_eps = static_cast<float>(norm_eps);
  up.out_bits = gu_out_bits.typed_data();
  up.out_a = static_cast<int>(go[0]);
  up.sv = gu_sv.typed_data();
  up.y = gu_y->typed_data();
  E8pLinearPlan down{e8p_xs_args(nullptr, f, d, dn_codes.typed_data(), abs.typed_data(), nullptr,
                                 dn_part->typed_data(), bits, resid_scale),
                     bits, rows_per_warp, warps, prefetch, tensor_cores != 0};
  down.x_cluster = gu_y->typed_data();
  down.in_bits = dn_in_bits.typed_data();
  down.in_a = static_cast<int>(di[0]);
  down.xr = dn_x->typed_data();
  down.in_io.swiglu = true;
  down.in_io.in_signs = dn_su.typed_data();
  down.in_io.gate_up_scale = gu_scale.typed_data();
  down.out_bits = dn_out_bits.typed_data();
  down.out_a = static_cast<int>(dout[0]);
  down.sv = dn_sv.typed_data();
  down.y = y->untyped_data();
  down.out_io.resid = x.untyped_data();
  down.out_io.dtype = x_dtype;
  down.out_io.out_scale = dn_scale.typed_data();
  cudaError_t err = e8p_linear_launch(stream, up);
  if (err == cudaSuccess) err = e8p_linear_launch(stream, down);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("e8p_mlp: ") + cudaGetErrorString(err));
  return launch_error("e8p_mlp launch");
}

// ------------------------------------------------------------------------------------------
// E8P / RVQ4 decode-matmul on tensor cores, 2-16 rows of x (mma.sync.m16n8k16, fp16, fp32 sums)
// ------------------------------------------------------------------------------------------
// The fragment mapping of scalar_mma_kernel with the E8P decode: lane (g = lane / 4, q = lane % 4)
// reads, per step, one 16-byte code unit of rows g and g + 8 of each 16-row tile (unit 4 s + q).
// Code j of a unit (8 inputs, `base` = its first) fills two k-tiles: its half2 pairs (w0, w1),
// (w2, w3) the slots {2q, 2q + 1}, {2q + 8, 2q + 9} of the first, (w4, w5), (w6, w7) those of the
// second; B is then x's inputs base .. base + 7 of row g, one 16-byte load, as they are. The shift
// (+-1/4 on all 8 coordinates) is added to the decoded weights (exact in fp16). RVQ4's second stage
// sums into its own accumulators, scaled by 1 / resid_scale at the end.
// Output: fp32 partial sums [splits, 8 * NT, out], splits along the input axis; the caller adds
// them (or the inverse Hadamard does, sum_parts).

struct E8pMmaArgs {
  const uint4* x;      // [8 * NT, k] fp16, zero-padded rows
  const uint4* codes;  // [out, units] 16-byte code units, units = k * bits / 128
  const uint2* abs;    // [256] fp16 high bytes of the source vectors
  float* parts;        // [splits, 8 * NT, out]
  int out, units, steps, steps_per_split;
  float resid;
};

// The signed, shifted source vector of the 16-bit code in bits 16 HI .. 16 HI + 15 of w, as 4 half2.
template <int HI>
__device__ __forceinline__ void e8_decode(uint32_t w, const char* tab, uint32_t copy, uint32_t (&h)[4]) {
  e8_signed<HI>(w, tab, copy, h);
  // -1/4 in both halves (0xB400), the sign cleared when the shift bit (15 + 16 HI) is set
  const __half2 sh = u2h2(0xB400B400u ^ (((w >> (15 + 16 * HI)) & 1u) * 0x80008000u));
  static_for<4>([&](auto i) { h[i] = h22u(__hadd2(u2h2(h[i]), sh)); });
}

constexpr int kE8MmaWarps = 8;

// ST = 1: E8P (8 codes of 2 bytes per unit, 64 inputs); ST = 2: RVQ4 (4 two-stage codes, 32 inputs).
// Warps walk 16 TILES-row chunks grid-strided (the table fill is paid once per block).
template <int ST, int NT, int TILES>
__global__ void __launch_bounds__(32 * kE8MmaWarps) e8p_mma_kernel(E8pMmaArgs a) {
  extern __shared__ uint2 e8tab[];
  e8_fill_tables(e8tab, a.abs);
  constexpr int kCodes = 8 / ST;         // codes per unit
  constexpr int kStepInputs = 256 / ST;  // inputs per step: 4 units of a row
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const char* tab = reinterpret_cast<const char*>(e8tab);
  const uint32_t copy = e8_lane_copy(e8tab, lane);
  const int s0 = blockIdx.y * a.steps_per_split, s1 = min(a.steps, s0 + a.steps_per_split);
  const int kx = a.units * 8 / ST;  // a row of x in uint4 (8 fp16): k / 8
  for (int row0 = (blockIdx.x * kE8MmaWarps + (threadIdx.x >> 5)) * 16 * TILES; row0 < a.out;
       row0 += gridDim.x * kE8MmaWarps * 16 * TILES) {
    const uint4* rowp[TILES][2];
    int rows[TILES][2];
    static_for<TILES>([&](auto t) {
      static_for<2>([&](auto h) {
        rows[t][h] = row0 + 16 * t + g + 8 * h;
        const int row = min(rows[t][h], a.out - 1);  // past the end: the last row, never stored
        rowp[t][h] = a.codes + static_cast<size_t>(row) * a.units + q;
      });
    });
    auto load_w = [&](uint4 (&w)[TILES][2], int s) {
      static_for<TILES>([&](auto t) {
        static_for<2>([&](auto h) { w[t][h] = __ldcs(rowp[t][h] + 4 * static_cast<size_t>(s)); });
      });
    };
    float d[TILES][NT][ST][4] = {};
    uint4 wn[TILES][2];
    if (s0 < s1) load_w(wn, s0);
    for (int s = s0; s < s1; ++s) {
      uint4 w[TILES][2];
      static_for<TILES>([&](auto t) { w[t][0] = wn[t][0]; w[t][1] = wn[t][1]; });
      if (s + 1 < s1) load_w(wn, s + 1);
      // x of code j + 1 loads while code j decodes (an L1 hit, but its latency is on the chain)
      auto load_x = [&](uint4 (&xv)[NT], int j) {
        static_for<NT>([&](auto nt) {
          xv[nt] = a.x[static_cast<size_t>(g + 8 * nt) * kx + (static_cast<size_t>(s) * kStepInputs + 64 / ST * q) / 8 + j];
        });
      };
      uint4 xn[NT];
      load_x(xn, 0);
      static_for<kCodes>([&](auto j) {  // code j of the unit: inputs s * kStepInputs + 64 q / ST + 8 j
        uint4 xv[NT];
        static_for<NT>([&](auto nt) { xv[nt] = xn[nt]; });
        if constexpr (int(decltype(j){}) + 1 < kCodes) load_x(xn, int(decltype(j){}) + 1);
        static_for<TILES>([&](auto t) {
          static_for<ST>([&](auto st) {
            constexpr int jj = int(decltype(j){}), sti = int(decltype(st){});
            constexpr int wi = ST == 1 ? jj / 2 : jj, hi = ST == 1 ? jj % 2 : sti;
            uint32_t r0[4], r1[4];  // rows g, g + 8
            e8_decode<hi>(uint4_at(w[t][0], wi), tab, copy, r0);
            e8_decode<hi>(uint4_at(w[t][1], wi), tab, copy, r1);
            const uint32_t ka[4] = {r0[0], r1[0], r0[1], r1[1]}, kb[4] = {r0[2], r1[2], r0[3], r1[3]};
            static_for<NT>([&](auto nt) {
              mma_16816<__half>(d[t][nt][st], ka, xv[nt].x, xv[nt].y);
              mma_16816<__half>(d[t][nt][st], kb, xv[nt].z, xv[nt].w);
            });
          });
        });
      });
    }
    float* out = a.parts + static_cast<size_t>(blockIdx.y) * 8 * NT * a.out;
    static_for<TILES>([&](auto t) {
      static_for<NT>([&](auto nt) {
        static_for<4>([&](auto e) {
          const int row = rows[t][e / 2], xrow = 8 * nt + 2 * q + (e & 1);
          const float v = ST == 1 ? d[t][nt][0][e] : fmaf(a.resid, d[t][nt][ST - 1][e], d[t][nt][0][e]);
          if (row < a.out) out[static_cast<size_t>(xrow) * a.out + row] = v;
        });
      });
    });
  }
}

// x fp16 [8 NT, in]; codes uint8 [out, in / 8, bits]; parts [splits, 8 NT, out].
ffi::Error E8pMmaImpl(cudaStream_t stream, ffi::Buffer<ffi::F16> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::U32> abs, ffi::Result<ffi::Buffer<ffi::F32>> parts, int64_t bits,
                      double resid_scale, int64_t tiles) {
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  auto pd = parts->dimensions();
  if (xd.size() != 2 || cd.size() != 3 || pd.size() != 3 || (bits != 2 && bits != 4) || cd[2] != bits ||
      abs.element_count() != 512 || (tiles != 1 && tiles != 2 && tiles != 4)) {
    return ffi::Error::InvalidArgument("e8p_mma: x [8 NT, in], codes [out, in/8, bits] with bits 2 or 4, "
                                       "abs [256, 2] words, tiles 1, 2 or 4");
  }
  const int st = static_cast<int>(bits / 2), nrows = static_cast<int>(xd[0]);
  const int64_t k = xd[1];
  if ((nrows != 8 && nrows != 16) || cd[1] * 8 != k || k % (256 / st) || pd[1] != nrows || pd[2] != cd[0] ||
      pd[0] < 1) {
    return ffi::Error::InvalidArgument("e8p_mma: 8 or 16 rows of x, in a multiple of 256 (2-bit) or 128 "
                                       "(4-bit), parts [splits, rows, out]");
  }
  E8pMmaArgs a{};
  a.out = static_cast<int>(cd[0]);
  a.units = static_cast<int>(k * bits / 128);
  a.steps = a.units / 4;
  const int splits = static_cast<int>(pd[0]);
  a.steps_per_split = (a.steps + splits - 1) / splits;
  a.x = reinterpret_cast<const uint4*>(x.typed_data());
  a.codes = reinterpret_cast<const uint4*>(codes.typed_data());
  a.abs = reinterpret_cast<const uint2*>(abs.typed_data());
  a.parts = parts->typed_data();  // every element is written: splits left without steps write zeros
  a.resid = static_cast<float>(1.0 / resid_scale);
  auto launch = [&](auto stc, auto ntc, auto tc) -> cudaError_t {
    constexpr int ST = decltype(stc)::value, NT = decltype(ntc)::value, TILES = decltype(tc)::value;
    auto kernel = e8p_mma_kernel<ST, NT, TILES>;
    cudaError_t e = allow_smem(kernel, kE8SmemBytes);
    if (e != cudaSuccess) return e;
    const int rows_per_block = 16 * TILES * kE8MmaWarps;
    const int wanted = (a.out + rows_per_block - 1) / rows_per_block;
    const int cap = max(1, multiprocessors() * blocks_per_sm(kernel, 32 * kE8MmaWarps, kE8SmemBytes) / splits);
    kernel<<<dim3(min(wanted, cap), splits), 32 * kE8MmaWarps, kE8SmemBytes, stream>>>(a);
    return cudaSuccess;
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  auto by_tiles = [&](auto stc, auto ntc) {
    return tiles == 4 ? launch(stc, ntc, I4{}) : tiles == 2 ? launch(stc, ntc, I2{}) : launch(stc, ntc, I1{});
  };
  auto by_rows = [&](auto stc) { return nrows == 16 ? by_tiles(stc, I2{}) : by_tiles(stc, I1{}); };
  const cudaError_t err = st == 1 ? by_rows(I1{}) : by_rows(I2{});
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("e8p_mma: ") + cudaGetErrorString(err));
  return launch_error("e8p_mma launch");
}

// ------------------------------------------------------------------------------------------
// GPTVQ 2-D decode-matvec, batch 1 (jaxquant/formats/vq.py, D = 2): y = x @ W.T
// ------------------------------------------------------------------------------------------
// Codes: per row, runs of 32 vector indices of B bits, each run B little-endian words (index t at
// stream bits t·B .. +B; widths that do not divide 32 straddle two words). Each group_rows ×
// group_cols tile has its own codebook of K = 2^B fp16 pairs (the caller rounds the float
// codebooks to half2). x-stationary, like the E8P kernel above: warp w of a block owns chunk
// (set · warps + w) of 32 runs (one run per lane: 64 inputs, 32 half2 registers made once from
// float32 x) and the block walks row groups; per group each warp copies its chunk's codebooks
// (at most tiles_per_warp tiles) into its own shared-memory slice (a __syncwarp, no block barrier),
// then decodes the group's rows, the next row's code words loading while the current decodes.
// Products in half2 over a run's 32 vectors, then fp32; part[chunk][row], summed by the caller.

constexpr int kVqRun = 32;  // indices per packed run

struct VqArgs {
  const float* x;          // [in] float32
  const uint32_t* codes;   // [out, words]
  const uint32_t* cb;      // [tr, tc, K] half2 codebook entries
  float* part;             // [chunks, out]
  int in, out, words, runs, tc, group_rows, group_cols, chunks, sets, tiles_per_warp;
};

template <int B>
__global__ void __launch_bounds__(256) vq2_matvec_kernel(VqArgs a) {
  constexpr int K = 1 << B;
  extern __shared__ uint32_t vqcb[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int chunk = (blockIdx.x % a.sets) * nwarps + warp;
  if (chunk >= a.chunks) return;  // whole warps; no block barrier below
  uint32_t* cbw = vqcb + static_cast<size_t>(warp) * a.tiles_per_warp * K;
  const int run = chunk * kVqRun + lane;
  const bool live = run < a.runs;
  const int t0 = chunk * kVqRun * 64 / a.group_cols;  // the warp's first tile column
  const int t1 = min(a.tc - 1, (chunk * kVqRun * 64 + kVqRun * 64 - 1) / a.group_cols);
  const int my_tile = live ? run * 64 / a.group_cols - t0 : 0;
  uint32_t xh[kVqRun];  // the run's 32 input pairs as half2; zeros past the row's end
#pragma unroll
  for (int t = 0; t < kVqRun; ++t) {
    const int v = run * kVqRun + t;
    float2 p = make_float2(0.f, 0.f);
    if (live && 2 * v + 1 < a.in) p = __ldg(reinterpret_cast<const float2*>(a.x) + v);
    xh[t] = h22u(__floats2half2_rn(p.x, p.y));
  }
  auto load = [&](int row, uint32_t (&w)[B]) {
    const uint32_t* src = a.codes + static_cast<size_t>(row) * a.words + static_cast<size_t>(run) * B;
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = live ? __ldcs(src + i) : 0u;
  };
  const int groups = (a.out + a.group_rows - 1) / a.group_rows;
  const int per_set = gridDim.x / a.sets;
  for (int g = blockIdx.x / a.sets; g < groups; g += per_set) {
    const int r0 = g * a.group_rows, r1 = min(a.out, r0 + a.group_rows);
    uint32_t cur[B], nxt[B];
    load(r0, cur);
    __syncwarp();
    const uint32_t* src = a.cb + (static_cast<size_t>(g) * a.tc + t0) * K;
    for (int i = lane; i < (t1 - t0 + 1) * K; i += 32) cbw[i] = __ldg(src + i);
    __syncwarp();
    const uint32_t* mycb = cbw + my_tile * K;
    for (int row = r0; row < r1; ++row) {
      if (row + 1 < r1) load(row + 1, nxt);
      __half2 h = __float2half2_rn(0.f);
#pragma unroll
      for (int t = 0; t < kVqRun; ++t) {
        constexpr int kMask = K - 1;
        const int bit = t * B, wi = bit / 32, sh = bit % 32;
        uint32_t idx;
        if (sh + B <= 32) {
          idx = (cur[wi] >> sh) & kMask;
        } else {
          idx = __funnelshift_r(cur[wi], cur[wi + 1 < B ? wi + 1 : wi], sh) & kMask;
        }
        h = __hfma2(u2h2(xh[t]), u2h2(mycb[idx]), h);
      }
      const float2 f = __half22float2(h);
      const float v = warp_sum(f.x + f.y);
      if (lane == 0) a.part[static_cast<size_t>(chunk) * a.out + row] = v;
#pragma unroll
      for (int i = 0; i < B; ++i) cur[i] = nxt[i];
    }
  }
}

template <int B>
cudaError_t launch_vq2(cudaStream_t stream, const VqArgs& a, int nwarps) {
  auto kernel = vq2_matvec_kernel<B>;
  const size_t smem = static_cast<size_t>(nwarps) * a.tiles_per_warp * (1 << B) * sizeof(uint32_t);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int groups = (a.out + a.group_rows - 1) / a.group_rows;
  const int resident = multiprocessors() * max(1, blocks_per_sm(kernel, nwarps * 32, smem));
  const int per_set = max(1, min(groups, resident / a.sets));  // blocks per chunk set
  kernel<<<per_set * a.sets, nwarps * 32, smem, stream>>>(a);
  return cudaSuccess;
}

// x float32 [in]; codes int32 [out, words]; cb uint32 [tr, tc, K] half2; part f32 [chunks, out],
// chunks = ceil(in / 2048).
ffi::Error Vq2MatvecImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> codes,
                         ffi::Buffer<ffi::U32> cb, ffi::Result<ffi::Buffer<ffi::F32>> part, int64_t index_bits,
                         int64_t group_rows, int64_t group_cols, int64_t warps) {
  auto cd = codes.dimensions();
  auto bd = cb.dimensions();
  auto pd = part->dimensions();
  const int B = static_cast<int>(index_bits);
  if (B != 4 && B != 6 && B != 8) return ffi::Error::InvalidArgument("vq2_matvec: index_bits must be 4, 6 or 8");
  if (cd.size() != 2 || bd.size() != 3 || pd.size() != 2 || bd[2] != (int64_t{1} << B)) {
    return ffi::Error::InvalidArgument("vq2_matvec: codes [out, words], cb [tr, tc, 2^bits], part [chunks, out]");
  }
  const int64_t in = static_cast<int64_t>(x.element_count()), out = cd[0];
  const int64_t runs = (in / 2 + kVqRun - 1) / kVqRun, chunks = (runs + kVqRun - 1) / kVqRun;
  if (in % 2 || group_cols <= 0 || group_cols % 64 || group_rows <= 0 || cd[1] != runs * B ||
      bd[0] != (out + group_rows - 1) / group_rows || bd[1] != (in + group_cols - 1) / group_cols ||
      pd[0] != chunks || pd[1] != out) {
    return ffi::Error::InvalidArgument("vq2_matvec: shapes disagree (in even, group_cols a multiple of 64)");
  }
  VqArgs a{};
  a.x = x.typed_data();
  a.codes = reinterpret_cast<const uint32_t*>(codes.typed_data());
  a.cb = cb.typed_data();
  a.part = part->typed_data();
  a.in = static_cast<int>(in);
  a.out = static_cast<int>(out);
  a.words = static_cast<int>(cd[1]);
  a.runs = static_cast<int>(runs);
  a.tc = static_cast<int>(bd[1]);
  a.group_rows = static_cast<int>(group_rows);
  a.group_cols = static_cast<int>(group_cols);
  a.chunks = static_cast<int>(chunks);
  a.tiles_per_warp = static_cast<int>((kVqRun * 64 + group_cols - 1) / group_cols + 1);
  const int nwarps = (warps >= 1 && warps <= 8) ? static_cast<int>(warps) : 8;
  a.sets = (a.chunks + nwarps - 1) / nwarps;
  cudaError_t err = B == 4 ? launch_vq2<4>(stream, a, nwarps) : B == 6 ? launch_vq2<6>(stream, a, nwarps)
                                                                 : launch_vq2<8>(stream, a, nwarps);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("vq2_matvec: ") + cudaGetErrorString(err));
  return launch_error("vq2_matvec launch");
}

// ------------------------------------------------------------------------------------------
// QTIP decode-matvec: y_r = (code values) @ xr, tile by tile (jaxquant/formats/qtip.py)
// ------------------------------------------------------------------------------------------
// A tile is 16x16 weights, one tail-biting stream of 256k bits in 8k words (MSB-first). Tile row
// r (16 weights) is the 16/V states starting at stream bits 16k*r + i*kV; its window needs
// 16k + L - kV bits from there: words (k*r)/2 .. +2 (circular in the tile), one funnel shift
// realigning odd rows at k = 3. Lane l of a warp decodes tile row l % 16 of tile column
// 2*step + l / 16 of its slice, so the 16 lanes of a half-warp read one tile (8k words, 16k*2
// bytes contiguous) and one 16-value x segment (a broadcast). A lane's output row never changes:
// it accumulates across tiles in a register; the two halves and the S K-slices (the warps of a
// block) are summed at the end. The next U tiles' words load while the current ones decode, and S
// is chosen so that the persistent grid's rounds leave the fewest blocks idle.
//   HYB (L=16, Q=9, V=2): h = s(s+1); the fp16 pair table[(h >> 6) & 511] with the sign of its
//     first coordinate flipped by bit 15 of h; HFMA2 with the x pair. Shared memory holds both signs
//     of every entry (1024 entries: entry (h >> 6) & 1023), 16 copies each, so a state costs one
//     shift (bits of s above 15 may hold garbage: they do not reach bits 0-15 of h), one IMAD, one
//     LOP3 for the byte address, the lookup and the HFMA2.
//   3INST (V=1): r = ((a s + b) & mask) ^ xor holds two fp16 whose sum is the value; HFMA2 with
//     x duplicated in both halves (the caller passes x repeated twice), both halves summed.
//   1MAD (V=1): y = sum of the bytes of a s + b (one dp4a); f = 1 + y/1024 as float bits, FFMA
//     with x in fp32. The caller maps sum x f to the values: MAD1_SCALE (1024 sum x f - 1534 sum x).

enum QtipCode : int { kHyb = 0, kMad1 = 1, kInst3 = 2 };
constexpr int kHybRep = 16;  // lanes l and l+16 share a copy (at most 2-way conflicts), L1 keeps room for x
constexpr int kHybEntries = 512;  // the format's table; shared memory holds it twice (both first-coordinate signs)
constexpr int kHybSmemWords = 2 * kHybEntries * kHybRep;  // 64 KB

struct QtipArgs {
  const void* x;         // hyb: fp16 [n, k]; 3inst: fp16 [n, 2k]; 1mad: fp32 [n, k]
  const uint32_t* codes;  // [tr, tc, 8 * kbits]
  const uint32_t* table;  // hyb: [512] fp16 pairs
  float* y;               // [n, 16 * tr]
  int n, k, tr, tc, ksplit, L;
};

template <int CODE, int K, int NB, int U>
__global__ void __launch_bounds__(256) qtip_matvec_kernel(QtipArgs a) {
  constexpr int V = CODE == kHyb ? 2 : 1;
  constexpr int KV = K * V;
  constexpr int NS = 16 / V;  // states per tile row
  constexpr int W = 8 * K;    // words per tile
  constexpr int NW = K == 2 ? 2 : 3;
  extern __shared__ uint32_t qsm[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t* tab = qsm;
  float* red = reinterpret_cast<float*>(qsm + (CODE == kHyb ? kHybSmemWords : 0));  // [nwarps][NB][16]
  if constexpr (CODE == kHyb) {
    // Entry i (of 1024): table[i % 512] with its first coordinate's sign flipped when i >= 512; its
    // 16 copies (64 B) as 4 16-byte stores rotated against bank conflicts.
    static_assert(kHybRep == 16, "the fill writes 16 copies as 4 quads");
    for (int i = threadIdx.x; i < 2 * kHybEntries; i += blockDim.x) {
      const uint32_t v = __ldg(a.table + (i & (kHybEntries - 1))) ^ (static_cast<uint32_t>(i >= kHybEntries) << 15);
      uint4* dst = reinterpret_cast<uint4*>(tab + i * kHybRep);
#pragma unroll
      for (int j = 0; j < kHybRep / 4; ++j) dst[(j + i) & (kHybRep / 4 - 1)] = make_uint4(v, v, v, v);
    }
    __syncthreads();
  }
  const int S = a.ksplit, slice = warp % S, tset = warp / S, tsets = nwarps / S;
  const int half = lane >> 4, r = lane & 15;
  const int per = ((a.tc + S - 1) / S + 1) / 2 * 2;  // tile columns per slice, even
  const int jlo = slice * per, jhi = min(a.tc, jlo + per);
  const int wbase = (K * r) >> 1;            // first word of this lane's tile row
  const int sub = (16 * K * r) & 31;          // its bit offset in that word (16 for odd rows at k = 3)
  // hyb: byte offset of this lane's table copy, with the rank byte (smem_lookup)
  const uint32_t copy4 = CODE == kHyb ? smem_rank_offset(tab, static_cast<uint32_t>(lane & 15) << 2) : 0u;
  const int ngroups = (a.tr + tsets - 1) / tsets;

  for (int grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int ti = grp * tsets + tset;
    const bool valid = ti < a.tr;
    float acc[NB];
    static_for<NB>([&](auto b) { acc[b] = 0.f; });
    if (valid) {
      const uint32_t* trow = a.codes + static_cast<size_t>(ti) * a.tc * W;
      // The next U tiles' words load while these decode (a warp's only loads in flight otherwise).
      uint32_t wn[U][NW];
      auto load_words = [&](int j0n) {
        static_for<U>([&](auto u) {
          const int j = j0n + 2 * static_cast<int>(u);
          if (j < jhi) {
            const uint32_t* tp = trow + static_cast<size_t>(j) * W;
            static_for<NW>([&](auto m) { wn[u][m] = __ldcs(tp + (wbase + static_cast<int>(m)) % W); });
          }
        });
      };
      if (jlo + half < jhi) load_words(jlo + half);
      for (int j0 = jlo + half; j0 < jhi; j0 += 2 * U) {
        uint32_t w[U][NW];
        static_for<U>([&](auto u) { static_for<NW>([&](auto m) { w[u][m] = wn[u][m]; }); });
        if (j0 + 2 * U < jhi) load_words(j0 + 2 * U);
        constexpr bool kPrefetchX = CODE == kHyb && NB == 1;  // these tiles' x first: 8 registers per tile
        uint4 xpre[U][2];
        static_for<U>([&](auto u) {
          const int j = j0 + 2 * static_cast<int>(u);
          if (j < jhi) {
            if constexpr (kPrefetchX) {
              const uint4* xp = static_cast<const uint4*>(a.x) + static_cast<size_t>(2) * j;
              xpre[u][0] = __ldg(xp);
              xpre[u][1] = __ldg(xp + 1);
            }
          }
        });
        static_for<U>([&](auto u) {
          const int j = j0 + 2 * static_cast<int>(u);
          if (j < jhi) {
            uint32_t aw[NW];
            if constexpr (K == 3) {
              aw[0] = __funnelshift_l(w[u][1], w[u][0], sub);
              aw[1] = __funnelshift_l(w[u][2], w[u][1], sub);
              aw[2] = w[u][2] << sub;
            } else {
              static_for<NW>([&](auto m) { aw[m] = w[u][m]; });
            }
            uint32_t dec[NS];  // hyb / 3inst: half2 bit patterns; 1mad: float bits of 1 + y/1024
            static_for<NS>([&](auto i) {
              constexpr int o = int(decltype(i){}) * KV;
              if constexpr (CODE == kHyb) {
                // stream bits [o, o + 16) at the bottom of s, earlier bits above (L = 16)
                constexpr int w0 = o / 32, b0 = o % 32;
                uint32_t s;
                if constexpr (b0 <= 16) s = aw[w0] >> (16 - b0);
                else s = __funnelshift_r(aw[w0 + 1 < NW ? w0 + 1 : NW - 1], aw[w0], 48 - b0);
                const uint32_t h = s * s + s;  // bits 0-15 depend on bits 0-15 of s only
                dec[i] = smem_lookup<uint32_t, 0>(reinterpret_cast<const char*>(tab), (h & 0xFFC0u) | copy4);
              } else {  // the exact L-bit state: its upper bits reach the value
                const uint32_t s = __funnelshift_l(aw[o / 32 + 1 < NW ? o / 32 + 1 : NW - 1], aw[o / 32], o % 32) >> (32 - a.L);
                if constexpr (CODE == kInst3) {
                  dec[i] = ((s * 89226354u + 64248484u) & 0x8FFF8FFFu) ^ 0x3B603B60u;
                } else {
                  const uint32_t y = __dp4a(s * 34038481u + 76625530u, 0x01010101u, 0u);
                  dec[i] = y * 8192u + 0x3F800000u;
                }
              }
            });
            static_for<NB>([&](auto b) {
              if (b < a.n) {
                if constexpr (CODE == kMad1) {
                  const float4* xp = static_cast<const float4*>(a.x) + (static_cast<size_t>(b) * a.k + 16 * j) / 4;
                  float s = 0.f;
                  static_for<4>([&](auto q) {
                    const float4 xv = __ldg(xp + q);
                    s = fmaf(xv.x, __uint_as_float(dec[4 * q + 0]), s);
                    s = fmaf(xv.y, __uint_as_float(dec[4 * q + 1]), s);
                    s = fmaf(xv.z, __uint_as_float(dec[4 * q + 2]), s);
                    s = fmaf(xv.w, __uint_as_float(dec[4 * q + 3]), s);
                  });
                  acc[b] += s;
                } else {
                  constexpr int XW = CODE == kHyb ? 2 : 4;  // 16-byte x loads per tile row
                  const uint4* xp = static_cast<const uint4*>(a.x) + (static_cast<size_t>(b) * a.k * (CODE == kHyb ? 1 : 2) + 16 * (CODE == kHyb ? 1 : 2) * j) / 8;
                  __half2 h = __float2half2_rn(0.f);
                  static_for<XW>([&](auto q) {
                    uint4 xv;
                    if constexpr (kPrefetchX) {
                      xv = xpre[u][int(decltype(q){}) & 1];
                    } else {
                      xv = __ldg(xp + q);
                    }
                    h = __hfma2(u2h2(xv.x), u2h2(dec[4 * q + 0]), h);
                    h = __hfma2(u2h2(xv.y), u2h2(dec[4 * q + 1]), h);
                    h = __hfma2(u2h2(xv.z), u2h2(dec[4 * q + 2]), h);
                    h = __hfma2(u2h2(xv.w), u2h2(dec[4 * q + 3]), h);
                  });
                  const float2 f = __half22float2(h);
                  acc[b] += f.x + f.y;
                }
              }
            });
          }
        });
      }
    }
    static_for<NB>([&](auto b) { acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], 16); });
    if (S == 1) {
      if (valid && lane < 16) {
        static_for<NB>([&](auto b) {
          if (b < a.n) a.y[static_cast<size_t>(b) * a.tr * 16 + ti * 16 + r] = acc[b];
        });
      }
    } else {
      if (lane < 16) static_for<NB>([&](auto b) { red[(warp * NB + b) * 16 + r] = acc[b]; });
      __syncthreads();
      for (int i = threadIdx.x; i < tsets * NB * 16; i += blockDim.x) {
        const int ts = i / (NB * 16), rem = i - ts * NB * 16, b = rem / 16, rr = rem & 15;
        const int t2 = grp * tsets + ts;
        float v = 0.f;
        for (int sl = 0; sl < S; ++sl) v += red[((ts * S + sl) * NB + b) * 16 + rr];
        if (t2 < a.tr && b < a.n) a.y[static_cast<size_t>(b) * a.tr * 16 + t2 * 16 + rr] = v;
      }
      __syncthreads();
    }
  }
}

template <int CODE, int K, int NB>
cudaError_t launch_qtip(cudaStream_t stream, QtipArgs a, int nwarps, int ksplit) {
  constexpr int U = 4;
  const size_t smem = (CODE == kHyb ? kHybSmemWords * 4 : 0) + static_cast<size_t>(nwarps) * NB * 16 * 4;
  auto kernel = qtip_matvec_kernel<CODE, K, NB, U>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int resident = multiprocessors() * blocks_per_sm(kernel, nwarps * 32, smem);
  if (ksplit <= 0) {
    // K-slices per tile row: the fewest that minimize the slowest block's work, rounds of the
    // persistent grid times tile columns per slice (28672 x 8192 at k = 2 on an H100: 2 slices leave
    // 448 row groups for 396 resident blocks, two rounds where 8 slices take 5 rounds of a quarter)
    long best = -1;
    for (int s = 1; s <= nwarps; s *= 2) {
      if (nwarps % s || (s > 1 && a.tc < 2 * s * 2 * U)) continue;
      const long groups = (a.tr + nwarps / s - 1) / (nwarps / s);
      const long cost = (groups + resident - 1) / resident * ((a.tc + s - 1) / s);
      if (best < 0 || cost < best) {
        best = cost;
        ksplit = s;
      }
    }
  }
  if (ksplit > nwarps) ksplit = nwarps;
  while (nwarps % ksplit) --ksplit;
  a.ksplit = ksplit;
  const int tsets = nwarps / ksplit;
  const int groups = (a.tr + tsets - 1) / tsets;
  const int blocks = min(groups, resident);
  kernel<<<blocks, nwarps * 32, smem, stream>>>(a);
  return cudaSuccess;
}

template <int CODE, int K>
cudaError_t dispatch_qtip_batch(cudaStream_t stream, const QtipArgs& a, int nwarps, int ksplit) {
  if (a.n <= 1) return launch_qtip<CODE, K, 1>(stream, a, nwarps, ksplit);
  if (a.n <= 4) return launch_qtip<CODE, K, 4>(stream, a, nwarps, ksplit);
  return launch_qtip<CODE, K, 8>(stream, a, nwarps, ksplit);
}

template <int CODE>
cudaError_t dispatch_qtip_k(cudaStream_t stream, const QtipArgs& a, int k, int nwarps, int ksplit) {
  if (k == 2) return dispatch_qtip_batch<CODE, 2>(stream, a, nwarps, ksplit);
  if (k == 3) return dispatch_qtip_batch<CODE, 3>(stream, a, nwarps, ksplit);
  return dispatch_qtip_batch<CODE, 4>(stream, a, nwarps, ksplit);
}

ffi::Error QtipMatvecImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> codes,
                          ffi::Buffer<ffi::U32> table, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t code,
                          int64_t kbits, int64_t L, int64_t ksplit, int64_t warps) {
  auto xd = x.dimensions();
  auto cd = codes.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("qtip_matvec: x [n, in], codes [out/16, in/16, 8k], y [n, out]");
  }
  if (code < 0 || code > 2 || kbits < 2 || kbits > 4 || L < 8 || L > 24 || (code == kHyb && L != 16)) {
    return ffi::Error::InvalidArgument("qtip_matvec: code must be hyb (L=16), 1mad or 3inst, k in 2..4, L in 8..24");
  }
  QtipArgs a{};
  a.n = static_cast<int>(xd[0]);
  a.tr = static_cast<int>(cd[0]);
  a.tc = static_cast<int>(cd[1]);
  a.k = a.tc * 16;
  a.L = static_cast<int>(L);
  const int64_t xw = code == kInst3 ? 2 * a.k : a.k;
  const ffi::DataType want = code == kMad1 ? ffi::DataType::F32 : ffi::DataType::F16;
  if (x.element_type() != want || xd[1] != xw || cd[2] != 8 * kbits || yd[0] != xd[0] || yd[1] != 16 * cd[0] ||
      a.n < 1 || a.n > 8) {
    return ffi::Error::InvalidArgument("qtip_matvec: shapes or dtypes disagree (or n is not in 1..8)");
  }
  if (code == kHyb && table.element_count() != kHybEntries) {
    return ffi::Error::InvalidArgument("qtip_matvec: hyb needs the 512-entry (Q = 9) table");
  }
  a.x = x.untyped_data();
  a.codes = reinterpret_cast<const uint32_t*>(codes.typed_data());
  a.table = table.typed_data();
  a.y = y->typed_data();
  const int nwarps = (warps >= 1 && warps <= 8) ? static_cast<int>(warps) : 8;
  const int ks = (ksplit >= 1 && ksplit <= 8) ? static_cast<int>(ksplit) : 0;
  const int k = static_cast<int>(kbits);
  cudaError_t err;
  switch (code) {
    case kHyb: err = dispatch_qtip_k<kHyb>(stream, a, k, nwarps, ks); break;
    case kMad1: err = dispatch_qtip_k<kMad1>(stream, a, k, nwarps, ks); break;
    default: err = dispatch_qtip_k<kInst3>(stream, a, k, nwarps, ks); break;
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("qtip_matvec: ") + cudaGetErrorString(err));
  return launch_error("qtip_matvec launch");
}

// ------------------------------------------------------------------------------------------
// Walsh-Hadamard transform
// ------------------------------------------------------------------------------------------
// Two kernels. `hadamard_kernel` (the default, described below after the first one) keeps every
// global access coalesced and vectorized; `hadamard_kernel_v1`, the first version, is kept as a
// fallback selected with JAXQUANT_HADAMARD_KERNEL=v1 (read once per process).
//
// v1: a block transforms `rb` consecutive rows (rb * n elements) in passes of up to 5 index bits:
// each thread gathers 2^bits elements that differ only in those bits into registers, applies the
// butterflies, and writes them back. The first pass reads global memory (contiguous, vectorized),
// the last writes it; the ones between use shared memory, padded by one float per 32 so that the
// strided accesses of the first pass and the lane-contiguous ones of the later passes are free
// of bank conflicts.

template <class T>
struct HadamardArgs {
  const T* x;
  const float* signs;  // [n] or nullptr
  T* y;
  int64_t rows;
  int logn, rb, signs_after;
  float scale;
  int parts = 1;  // x holds `parts` arrays of rows * n elements, transformed as their sum (v2, K * 2^p)
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
__global__ void __launch_bounds__(256) hadamard_kernel_v1(HadamardArgs<T> a) {
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
cudaError_t launch_hadamard_v1(cudaStream_t stream, HadamardArgs<T> a) {
  const int n = 1 << a.logn;
  a.rb = n >= 2048 ? 1 : 2048 / n;  // at least 2048 elements per block
  const int64_t blocks = (a.rows + a.rb - 1) / a.rb;
  const int elems = a.rb * n;
  int threads = elems / 32;
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
  const size_t smem = a.logn > 5 ? static_cast<size_t>(pad32(elems)) * sizeof(float) : 0;
  auto kernel = hadamard_kernel_v1<T>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  if (blocks > 0) kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  return cudaSuccess;
}

// v2 (default): a thread holds E = 2^5 values (fewer when n < 32) whose indices differ in the
// thread's "local" index bits; it applies the butterflies of the local bits that are still due
// (its "active" bits) in registers. Between stages the values go through shared memory (fp32,
// padded by one float per 32) to the next layout, whose local bits are the next ones to process.
// Thread bits are the other index bits, lowest first (lanes = the 5 lowest), rows above.
//
//   stage 0   local = bits 0-2 (8 contiguous elements: one 16-byte vector at 16 bits, two at
//             fp32) and the 2 highest bits of the row; lanes sit on bits 3-7, so a warp's load
//             instruction covers 32 consecutive runs. Signs (x * s) are applied here.
//   stage k   local = active = the next 5 bits from bit 3 upwards; the last butterfly stage
//             takes the remaining ones and fills its registers with processed bits (bits 0-2
//             first, then the highest), so its lanes again cover consecutive runs; it scales,
//             applies signs_after and stores (n = 2048: 16-byte vectors; 8192: 8 bytes at 16
//             bits; 32768: 2 bytes per lane, still 64 consecutive bytes per warp).
//   n <= 1024 has no room for fillers: a store-only stage goes back to the stage-0 layout.
//
// n = 2^p, p <= 5: one stage, one row per thread, no shared memory. p = 7: 2 stages; every other
// p in 6..15: 3 stages, i.e. 2 shared-memory round trips per element (4 scalar LDS/STS). Every
// shared-memory word is read and written by one thread within a stage, so one __syncthreads per
// stage boundary suffices. Threads per block: max(256, n / 32), rows per block 8192 / n for
// n <= 8192; smem = pad32(32 * threads) floats: 33 KB up to n = 8192, 66 KB at 16384, 132 KB at
// 32768. The plan (local and active masks per stage) depends on p alone and is exported to the
// host as JaxquantHadamardPlan, so that tests/test_kernels.py runs the exact index mapping of
// every stage in NumPy (test_hadamard_plan_emulated: equal to the transform for p = 1 .. 15,
// coalescing and bank conflicts checked); test_hadamard_kernel_source_on_cpu compiles this section
// for the host (it cuts it out by the first lines of Idx, pad32, HadamardArgs, kHadLocalBits and
// launch_hadamard_v2: keep those) and runs it with one std::thread per CUDA thread.

constexpr int kHadLocalBits = 5;   // log2 of the values per thread
constexpr int kHadMinThreadBits = 8;  // at least 256 threads per block

__host__ __device__ constexpr int had_popc(uint32_t m) {
  int c = 0;
  for (; m; m &= m - 1) ++c;
  return c;
}

constexpr int kHadVecBits = 3;  // stage 0 holds 8 contiguous elements (16 bytes at 16 bits)

__host__ __device__ constexpr int had_base_stages(int logn) {
  return logn <= kHadLocalBits ? 1 : 1 + (logn - kHadLocalBits + kHadLocalBits - 1) / kHadLocalBits;
}

// Rows per block = 2^had_row_bits.
__host__ __device__ constexpr int had_row_bits(int logn) {
  if (logn <= kHadLocalBits) return kHadMinThreadBits;
  const int r = kHadMinThreadBits - (logn - kHadLocalBits);
  return r > 0 ? r : 0;
}

__host__ __device__ constexpr uint32_t had_stage0(int logn) {
  const int top = kHadLocalBits - kHadVecBits;
  return ((1u << kHadVecBits) - 1) | (((1u << top) - 1) << (logn - top));
}

// Index bits whose butterflies stage s applies (none in the store-only stage).
__host__ __device__ constexpr uint32_t had_active(int logn, int s) {
  if (logn <= kHadLocalBits) return (1u << logn) - 1;
  if (s == 0) return had_stage0(logn);
  if (s >= had_base_stages(logn)) return 0;
  const int lo = kHadVecBits + (s - 1) * kHadLocalBits, hi = logn - (kHadLocalBits - kHadVecBits);
  const int a = hi - lo < kHadLocalBits ? hi - lo : kHadLocalBits;
  return ((1u << a) - 1) << lo;
}

// Index bits a thread holds in registers in stage s: the active ones; in the last butterfly
// stage also already-processed ones, the lowest (up to kHadVecBits) and then the highest, so
// that lanes sit on consecutive vectors; the store-only stage uses the stage-0 layout.
__host__ __device__ constexpr uint32_t had_local(int logn, int s) {
  if (logn <= kHadLocalBits) return (1u << logn) - 1;
  if (s == 0 || s >= had_base_stages(logn)) return had_stage0(logn);
  uint32_t m = had_active(logn, s);
  if (s < had_base_stages(logn) - 1) return m;
  for (int k = 0; k < kHadVecBits && had_popc(m) < kHadLocalBits; ++k) m |= 1u << k;
  for (int k = logn - 1; had_popc(m) < kHadLocalBits; --k) m |= 1u << k;
  return m;
}

// Whether a warp's lanes (the 5 lowest thread bits) address 32 consecutive vectors.
__host__ __device__ constexpr bool had_lanes_contiguous(uint32_t local) {
  int r = 0;
  while ((local >> r) & 1u) ++r;
  return ((local >> r) & 31u) == 0;
}

// A store-only stage (one more shared-memory round trip, back to the stage-0 layout) when the
// last butterfly stage's layout would store scattered runs: n = 64 .. 1024.
__host__ __device__ constexpr int had_stages(int logn) {
  return had_base_stages(logn) +
         (logn > kHadLocalBits && !had_lanes_contiguous(had_local(logn, had_base_stages(logn) - 1)) ? 1 : 0);
}

// Scatter the low bits of t to the set bits of mask, lowest first (PDEP).
__host__ __device__ constexpr int had_deposit(int t, uint32_t mask) {
  int out = 0, k = 0;
  for (int p = 0; p < 32; ++p) {
    if ((mask >> p) & 1u) {
      out |= ((t >> k) & 1) << p;
      ++k;
    }
  }
  return out;
}

// Position of the k-th set bit of mask.
__host__ __device__ constexpr int had_nth_bit(uint32_t mask, int k) {
  for (int p = 0; p < 32; ++p) {
    if ((mask >> p) & 1u) {
      if (k == 0) return p;
      --k;
    }
  }
  return -1;
}

// Number of consecutive set bits of mask from bit 0.
__host__ __device__ constexpr int had_low_run(uint32_t mask) {
  int r = 0;
  while ((mask >> r) & 1u) ++r;
  return r;
}

template <class T, int W>
struct alignas(sizeof(T) * W) HadVec {
  T v[W];
};

template <class T, int LOGN>
struct HadCfg {
  static constexpr int kLogn = LOGN;
  static constexpr int kN = 1 << LOGN;
  static constexpr int kEB = static_cast<int>(sizeof(T));
  static constexpr int kStages = had_stages(LOGN);
  static constexpr int kLocal = LOGN < kHadLocalBits ? LOGN : kHadLocalBits;
  static constexpr int kE = 1 << kLocal;
  static constexpr int kRowBits = had_row_bits(LOGN);
  static constexpr int kBlockBits = LOGN + kRowBits;
  static constexpr int kThreads = 1 << (kBlockBits - kLocal);
  static constexpr int kMinBlocks = kThreads >= 1024 ? 1 : 1024 / kThreads;  // <= 64 registers
  static constexpr int kSmemFloats = kStages > 1 ? (1 << kBlockBits) + (1 << kBlockBits) / 32 : 0;  // pad32
};

// Widest vector (elements) for a run of 2^run contiguous elements of B bytes each, <= 16 bytes.
__host__ __device__ constexpr int had_vec(int run, int bytes) {
  int w = 1 << run;
  while (w * bytes > 16) w >>= 1;
  return w;
}

template <class C, int S>
__device__ __forceinline__ void had_butterflies(float (&v)[C::kE]) {
  constexpr uint32_t L = had_local(C::kLogn, S), A = had_active(C::kLogn, S);
  static_for<C::kLocal>([&](auto kk) {
    constexpr int k = decltype(kk){};
    if constexpr ((A >> had_nth_bit(L, k)) & 1u) {
      constexpr int h = 1 << k;
#pragma unroll
      for (int i = 0; i < C::kE; ++i) {
        if (!(i & h)) {
          const float p = v[i], q = v[i + h];
          v[i] = p + q;
          v[i + h] = p - q;
        }
      }
    }
  });
}

// v[j] *= signs[i0 + position of j], read in float vectors along the contiguous local run.
template <class C, int S>
__device__ __forceinline__ void had_apply_signs(float (&v)[C::kE], const float* __restrict__ signs, int i0) {
  constexpr uint32_t L = had_local(C::kLogn, S);
  constexpr int W = had_vec(had_low_run(L), 4);
  static_for<C::kE / W>([&](auto cc) {
    constexpr int c = decltype(cc){};
    constexpr int off = had_deposit(c * W, L);
    const HadVec<float, W> s = *reinterpret_cast<const HadVec<float, W>*>(signs + i0 + off);
#pragma unroll
    for (int e = 0; e < W; ++e) v[c * W + e] *= s.v[e];
  });
}

// L2 prefetch of the signs that the last stage applies: an inverse transform multiplies them after
// its loads and butterflies, so their DRAM round trip otherwise adds to a decode row's latency.
template <class C>
__device__ __forceinline__ void had_prefetch_last_signs(const float* __restrict__ signs) {
#if defined(__CUDA_ARCH__)
  constexpr uint32_t L = had_local(C::kLogn, C::kStages - 1);
  constexpr uint32_t TM = ~L & ((1u << C::kBlockBits) - 1);
  constexpr int W = had_vec(had_low_run(L), 4);
  const int i0 = had_deposit(static_cast<int>(threadIdx.x), TM) & (C::kN - 1);
  static_for<C::kE / W>([&](auto cc) {
    constexpr int off = had_deposit(decltype(cc){} * W, L);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(signs + i0 + off));
  });
#endif
}

template <class T, int LOGN>
__global__ void __launch_bounds__(HadCfg<T, LOGN>::kThreads, HadCfg<T, LOGN>::kMinBlocks)
    hadamard_kernel(HadamardArgs<T> a) {
  using C = HadCfg<T, LOGN>;
  extern __shared__ float hbuf[];
  if (a.signs && a.signs_after) had_prefetch_last_signs<C>(a.signs);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) << C::kRowBits;
  const T* __restrict__ xb = a.x + (row0 << LOGN);
  T* __restrict__ yb = a.y + (row0 << LOGN);
  float v[C::kE];
  static_for<C::kStages>([&](auto ss) {
    constexpr int S = decltype(ss){};
    constexpr bool kLast = S == C::kStages - 1;
    constexpr uint32_t L = had_local(LOGN, S);
    constexpr uint32_t TM = ~L & ((1u << C::kBlockBits) - 1);  // thread bits
    const int tb = had_deposit(static_cast<int>(threadIdx.x), TM);  // block-space index of v[0]
    const bool valid = row0 + (tb >> LOGN) < a.rows;
    const int i0 = tb & (C::kN - 1);  // index within the row
    // pad32(tb + off) = pad32(tb) + pad32(off): tb and off have no bit in common, so the low 5
    // bits never carry; the per-register part is an immediate offset.
    float* sb = hbuf + pad32(tb);
    if constexpr (S == 0) {
      constexpr int W = had_vec(had_low_run(L), C::kEB);
      if (valid) {
        static_for<C::kE / W>([&](auto cc) {
          constexpr int c = decltype(cc){};
          constexpr int off = had_deposit(c * W, L);
          const HadVec<T, W> u = *reinterpret_cast<const HadVec<T, W>*>(xb + tb + off);
#pragma unroll
          for (int e = 0; e < W; ++e) v[c * W + e] = to_float(u.v[e]);
#pragma unroll 4
          for (int q = 1; q < a.parts; ++q) {  // partial sums of a matvec, added in order (loads in flight together)
            const HadVec<T, W> w = *reinterpret_cast<const HadVec<T, W>*>(xb + q * (a.rows << LOGN) + tb + off);
#pragma unroll
            for (int e = 0; e < W; ++e) v[c * W + e] += to_float(w.v[e]);
          }
        });
        if (a.signs && !a.signs_after) had_apply_signs<C, S>(v, a.signs, i0);
      } else {
#pragma unroll
        for (int j = 0; j < C::kE; ++j) v[j] = 0.0f;
      }
    } else {
      __syncthreads();  // the previous stage's stores are visible
      static_for<C::kE>([&](auto jj) {
        constexpr int off = had_deposit(decltype(jj){}, L);
        v[decltype(jj){}] = sb[off + (off >> 5)];
      });
    }
    had_butterflies<C, S>(v);
    if constexpr (!kLast) {
      static_for<C::kE>([&](auto jj) {
        constexpr int off = had_deposit(decltype(jj){}, L);
        sb[off + (off >> 5)] = v[decltype(jj){}];
      });
    } else if (valid) {
#pragma unroll
      for (int j = 0; j < C::kE; ++j) v[j] *= a.scale;
      if (a.signs && a.signs_after) had_apply_signs<C, S>(v, a.signs, i0);
      constexpr int W = had_vec(had_low_run(L), C::kEB);
      static_for<C::kE / W>([&](auto cc) {
        constexpr int c = decltype(cc){};
        constexpr int off = had_deposit(c * W, L);
        HadVec<T, W> u;
#pragma unroll
        for (int e = 0; e < W; ++e) u.v[e] = from_float<T>(v[c * W + e]);
        *reinterpret_cast<HadVec<T, W>*>(yb + tb + off) = u;
      });
    }
  });
}

template <class T, int LOGN>
cudaError_t launch_hadamard_v2(cudaStream_t stream, const HadamardArgs<T>& a) {
  using C = HadCfg<T, LOGN>;
  const int64_t blocks = (a.rows + (int64_t{1} << C::kRowBits) - 1) >> C::kRowBits;
  const size_t smem = static_cast<size_t>(C::kSmemFloats) * sizeof(float);
  auto kernel = hadamard_kernel<T, LOGN>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  if (blocks > 0) kernel<<<static_cast<unsigned>(blocks), C::kThreads, smem, stream>>>(a);
  return cudaSuccess;
}

template <class T, int... Ls>
cudaError_t dispatch_hadamard_v2(cudaStream_t stream, const HadamardArgs<T>& a, std::integer_sequence<int, Ls...>) {
  cudaError_t err = cudaErrorInvalidValue;
  ((a.logn == Ls + 1 ? (err = launch_hadamard_v2<T, Ls + 1>(stream, a), 0) : 0), ...);
  return err;
}

bool hadamard_use_v1() {
  static const bool v1 = [] {
    const char* e = std::getenv("JAXQUANT_HADAMARD_KERNEL");
    return e != nullptr && std::string(e) == "v1";
  }();
  return v1;
}

template <class T>
cudaError_t launch_hadamard(cudaStream_t stream, HadamardArgs<T> a) {
  if (hadamard_use_v1() && a.parts == 1) return launch_hadamard_v1(stream, a);
  return dispatch_hadamard_v2(stream, a, std::make_integer_sequence<int, 15>{});
}

// Hadamard of n = K * 2^p in one kernel (K = 12, 20, 28; 2^6 <= 2^p <= 2^10): what the power-of-two
// kernel plus an XLA einsum for the K-point factor did in four passes over memory (9.3% of copy
// at n = 28672 on an H100; this kernel 52.6%). A persistent grid of one block per SM walks the
// rows; element i = a * M + j (M = 2^p). Per row:
//   phase 1  thread column j reads the K elements a * M + j, applies the signs (forward) and the
//            K-point factor: the 8 sign combinations of each group of 4 inputs (12 additions),
//            then K/4 - 1 additions per output, 9 per element at K = 28 instead of 27;
//   phase 2  bits [5, p) of every row in registers (stride 32);
//   phase 3  bits [0, 5) (32 contiguous), scale, signs (inverse), 16-byte stores.
// Rows in 16-bit types are staged in shared memory by cp.async, the next row's copy overlapping
// phases 2 and 3 of the current one. The work row is fp32 with one pad word per 32
// (f -> f + f / 32), so every pass's 32 lanes hit 32 banks at immediate offsets; the signs are
// kept as bits (forward: bit a of word j is the sign of a * M + j; inverse: bit e of word w is the
// sign of 32 * w + e).
// Forward: y = (H_K ⊗ H_M)(x * s) / sqrt(n) (jaxquant.hadamard.rht); inverse: the transpose, signs
// after. HadK<K>::neg[r] has bit c set where H_K[r][c] = -1, H_K = jaxquant.hadamard.hadamard_factor(K)
// (test_hadamard_k_signs_match_python keeps them equal).
template <int K>
struct HadK;
template <>
struct HadK<12> {
  static constexpr uint32_t neg[12] = {0x0000000, 0x0000475, 0x00008e9, 0x00001d3, 0x00003a5, 0x0000749,
                                       0x0000e91, 0x0000d23, 0x0000a47, 0x000048f, 0x000091d, 0x000023b};
};
template <>
struct HadK<20> {
  static constexpr uint32_t neg[20] = {0x0000000, 0x00615e5, 0x00c2bc9, 0x0085793, 0x000af27, 0x0015e4d, 0x002bc99,
                                       0x0057931, 0x00af261, 0x005e4c3, 0x00bc985, 0x007930b, 0x00f2615, 0x00e4c2b,
                                       0x00c9857, 0x00930af, 0x002615f, 0x004c2bd, 0x0098579, 0x0030af3};
};
template <>
struct HadK<28> {
  static constexpr uint32_t neg[28] = {0x0000000, 0x237c5a5, 0x42fab49, 0x81f7293, 0x18e3d27, 0x1555e4d, 0x0e39c9b,
                                       0xc41f935, 0xa82f669, 0x704ecd3, 0xf8b488d, 0xf56910b, 0xee52607, 0xc7a4c63,
                                       0xabc9855, 0x7393439, 0x3f26b11, 0x5ecd2a1, 0x9d9a5c1, 0x6911be3, 0xd2217d5,
                                       0xa4c0fb9, 0x498c71f, 0x930aaaf, 0x26871cf, 0x4d620fd, 0x9a5417b, 0x34b8277};
};

constexpr int kHadKMinLogm = 6, kHadKMaxLogm = 10;

__host__ __device__ __forceinline__ uint32_t sign_bit(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u >> 31;
}

__host__ __device__ __forceinline__ float flip_sign(float x, uint32_t bit) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  u ^= bit << 31;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// 16-byte global -> shared copies that do not hold registers (sm_80+); plain copies on the host.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#ifdef __CUDA_ARCH__
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  memcpy(smem, gmem, 16);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

__device__ __forceinline__ void copy_async_wait_all() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The bits of one float, or of two 16-bit values (lo in the low half).
template <class T>
__device__ __forceinline__ uint32_t store_word(const float* v) {
  uint32_t w;
  if constexpr (sizeof(T) == 4) {
    memcpy(&w, v, 4);
  } else {
    const T p[2] = {from_float<T>(v[0]), from_float<T>(v[1])};
    memcpy(&w, p, 4);
  }
  return w;
}

// 32 floats to 32 consecutive elements of T, in 16-byte stores.
template <class T>
__device__ __forceinline__ void store32(T* __restrict__ dst, const float (&v)[32]) {
  constexpr int W = 16 / sizeof(T), S = 4 / sizeof(T);  // elements per store, per word
  static_for<32 / W>([&](auto qq) {
    constexpr int q = decltype(qq){};
    const uint4 u = make_uint4(store_word<T>(v + q * W), store_word<T>(v + q * W + S), store_word<T>(v + q * W + 2 * S),
                               store_word<T>(v + q * W + 3 * S));
#ifdef __CUDA_ARCH__
    __stcs(reinterpret_cast<uint4*>(dst + q * W), u);  // one 16-byte store (a plain uint4 copy was split in four)
#else
    memcpy(dst + q * W, &u, 16);
#endif
  });
}

template <class T, int K, int LOGM>
struct HadKCfg {
  static constexpr int kM = 1 << LOGM;
  static constexpr int kN = K * kM;
  static constexpr int kHi = LOGM - 5;  // bits of the strided pass
  // 1024 threads with pair combinations (64 registers) were 2-3% slower at n = 28672 (session 8)
  static constexpr int kThreads = kM >= 512 ? 512 : (kM >= 256 ? 256 : 128);
  static constexpr int kRowStride = kM + kM / 32;  // padded floats per K-row of the work row
  static constexpr int kWorkFloats = K * kRowStride;
  static constexpr int kSignWords = kM > kN / 32 ? kM : kN / 32;
  static constexpr bool kStage = sizeof(T) == 2;  // fp32 rows would not fit next to the work row
  static constexpr size_t kSmemBytes = sizeof(float) * kWorkFloats + sizeof(uint32_t) * kSignWords +
                                       (kStage ? sizeof(T) * kN : 0);
};

// Sign of H_K in output k, input a: forward y[k] = sum_a H[a][k] z[a]; inverse sum_a H[k][a] z[a].
template <int K, bool INV>
__host__ __device__ constexpr uint32_t hadk_neg(int k, int a) {
  return INV ? (HadK<K>::neg[k] >> a) & 1u : (HadK<K>::neg[a] >> k) & 1u;
}

// out[k * STRIDE] = the K-point factor's output k for inputs z.
template <int K, bool INV, int STRIDE>
__device__ __forceinline__ void hadk_factor(const float (&z)[K], float* out) {
  static_assert(K % 4 == 0, "K-point factors come in groups of 4 inputs");
  float c[K / 4][8];  // c[g][4 r1 + 2 r2 + r3] = z0 + (-1)^r1 z1 + (-1)^r2 z2 + (-1)^r3 z3 of group g
  static_for<K / 4>([&](auto gg) {
    constexpr int g = decltype(gg){};
    const float s1 = z[4 * g] + z[4 * g + 1], d1 = z[4 * g] - z[4 * g + 1];
    const float s2 = z[4 * g + 2] + z[4 * g + 3], d2 = z[4 * g + 2] - z[4 * g + 3];
    c[g][0] = s1 + s2, c[g][1] = s1 + d2, c[g][2] = s1 - d2, c[g][3] = s1 - s2;
    c[g][4] = d1 + s2, c[g][5] = d1 + d2, c[g][6] = d1 - d2, c[g][7] = d1 - s2;
  });
  static_for<K>([&](auto kk) {
    constexpr int k = decltype(kk){};
    float acc = 0.0f;
    static_for<K / 4>([&](auto gg) {
      constexpr int g = decltype(gg){};
      constexpr uint32_t n0 = hadk_neg<K, INV>(k, 4 * g);
      constexpr int r = 4 * (n0 ^ hadk_neg<K, INV>(k, 4 * g + 1)) + 2 * (n0 ^ hadk_neg<K, INV>(k, 4 * g + 2)) +
                        (n0 ^ hadk_neg<K, INV>(k, 4 * g + 3));
      if constexpr (g == 0) acc = n0 ? -c[g][r] : c[g][r];
      else if constexpr (n0) acc -= c[g][r];
      else acc += c[g][r];
    });
    out[k * STRIDE] = acc;
  });
}

template <class T, int K, int LOGM, bool INV>
__global__ void __launch_bounds__(HadKCfg<T, K, LOGM>::kThreads, 1) hadamard_k_kernel(HadamardArgs<T> a) {
  using C = HadKCfg<T, K, LOGM>;
  extern __shared__ __align__(16) float hkbuf[];
  float* work = hkbuf;
  uint32_t* sbits = reinterpret_cast<uint32_t*>(hkbuf + C::kWorkFloats);
  T* stage = reinterpret_cast<T*>(sbits + C::kSignWords);
  if constexpr (INV) {
    for (int w = threadIdx.x; w < C::kN / 32; w += C::kThreads) {
      uint32_t m = 0;
      if (a.signs) {
        static_for<8>([&](auto q) {
          const float4 sg = *reinterpret_cast<const float4*>(a.signs + 32 * w + 4 * decltype(q){});
          m |= (sign_bit(sg.x) | sign_bit(sg.y) << 1 | sign_bit(sg.z) << 2 | sign_bit(sg.w) << 3) << (4 * q);
        });
      }
      sbits[w] = m;
    }
  } else {
    for (int j = threadIdx.x; j < C::kM; j += C::kThreads) {
      uint32_t m = 0;
      if (a.signs) static_for<K>([&](auto aa) { m |= sign_bit(a.signs[decltype(aa){} * C::kM + j]) << decltype(aa){}; });
      sbits[j] = m;
    }
  }
  const auto prefetch = [&](int64_t row) {
    if constexpr (C::kStage) {
      const char* src = reinterpret_cast<const char*>(a.x + row * C::kN);
      char* dst = reinterpret_cast<char*>(stage);
      for (int c = threadIdx.x; c < C::kN * static_cast<int>(sizeof(T)) / 16; c += C::kThreads)
        copy16_async(dst + 16 * c, src + 16 * c);
      copy_async_commit();
    }
  };
  if (blockIdx.x < a.rows) prefetch(blockIdx.x);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    copy_async_wait_all();
    __syncthreads();  // the staged row, the sign bits and the previous row's last reads of work
    const T* __restrict__ xr = a.x + row * C::kN;
    for (int j = threadIdx.x; j < C::kM; j += C::kThreads) {
      const uint32_t neg = INV ? 0u : sbits[j];
      float z[K];
      static_for<K>([&](auto aa) {
        constexpr int ai = decltype(aa){};
        if constexpr (C::kStage) z[ai] = to_float(stage[ai * C::kM + j]);
        else z[ai] = to_float(xr[ai * C::kM + j]);
      });
#pragma unroll 1
      for (int q = 1; q < a.parts; ++q) {  // partial sums of a matvec, added in order (kept rolled: code size)
        static_for<K>([&](auto aa) { z[decltype(aa){}] += to_float(xr[q * a.rows * C::kN + decltype(aa){} * C::kM + j]); });
      }
      if constexpr (!INV) static_for<K>([&](auto aa) { z[decltype(aa){}] = flip_sign(z[decltype(aa){}], (neg >> decltype(aa){}) & 1u); });
      hadk_factor<K, INV, C::kRowStride>(z, work + j + (j >> 5));
    }
    __syncthreads();  // work holds the factor's output; the stage is free
    if (row + gridDim.x < a.rows) prefetch(row + gridDim.x);
    for (int u = threadIdx.x; u < K * 32; u += C::kThreads) {  // bits [5, p): lane on bits 0-4
      float* base = work + (u >> 5) * C::kRowStride + (u & 31);
      float v[1 << C::kHi];
      static_for<(1 << C::kHi)>([&](auto e) { v[decltype(e){}] = base[33 * decltype(e){}]; });
      butterflies<C::kHi>(v);
      static_for<(1 << C::kHi)>([&](auto e) { base[33 * decltype(e){}] = v[decltype(e){}]; });
    }
    __syncthreads();
    T* __restrict__ yr = a.y + row * C::kN;
    for (int u = threadIdx.x; u < C::kN / 32; u += C::kThreads) {  // bits [0, 5): 32 contiguous
      float v[32];
      static_for<32>([&](auto e) { v[decltype(e){}] = work[33 * u + decltype(e){}]; });
      const uint32_t neg = INV ? sbits[u] : 0u;
      butterflies<5>(v);
#pragma unroll
      for (int e = 0; e < 32; ++e) v[e] = flip_sign(v[e] * a.scale, (neg >> e) & 1u);
      store32(yr + 32 * u, v);
    }
  }
}

template <class T, int K, int LOGM>
cudaError_t launch_hadamard_k(cudaStream_t stream, const HadamardArgs<T>& a) {
  using C = HadKCfg<T, K, LOGM>;
  auto kernel = a.signs_after ? hadamard_k_kernel<T, K, LOGM, true> : hadamard_k_kernel<T, K, LOGM, false>;
  cudaError_t err = allow_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t resident = int64_t{multiprocessors()} * blocks_per_sm(kernel, C::kThreads, C::kSmemBytes);
  const int64_t blocks = a.rows < resident ? a.rows : resident;
  if (blocks > 0) kernel<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(a);
  return cudaSuccess;
}

template <class T, int K, int... Ls>
cudaError_t dispatch_hadamard_k_logm(cudaStream_t stream, const HadamardArgs<T>& a, std::integer_sequence<int, Ls...>) {
  cudaError_t err = cudaErrorInvalidValue;
  ((a.logn == Ls + kHadKMinLogm ? (err = launch_hadamard_k<T, K, Ls + kHadKMinLogm>(stream, a), 0) : 0), ...);
  return err;
}

template <class T>
cudaError_t dispatch_hadamard_k(cudaStream_t stream, const HadamardArgs<T>& a, int k) {
  using Logms = std::make_integer_sequence<int, kHadKMaxLogm - kHadKMinLogm + 1>;
  if (k == 12) return dispatch_hadamard_k_logm<T, 12>(stream, a, Logms{});
  if (k == 20) return dispatch_hadamard_k_logm<T, 20>(stream, a, Logms{});
  if (k == 28) return dispatch_hadamard_k_logm<T, 28>(stream, a, Logms{});
  return cudaErrorInvalidValue;
}

ffi::Error HadamardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> signs,
                        ffi::Result<ffi::AnyBuffer> y, int64_t has_signs, int64_t signs_after,
                        int64_t normalize, int64_t parts) {
  auto xd = x.dimensions();
  if (xd.size() < 1 || parts < 1 || y->element_type() != x.element_type() ||
      y->element_count() * parts != x.element_count()) {
    return ffi::Error::InvalidArgument("hadamard: y must match x (x holds `parts` arrays of y's size)");
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
  const int64_t rows = static_cast<int64_t>(y->element_count()) / n;
  const float scale = normalize ? 1.0f / std::sqrt(static_cast<float>(n)) : 1.0f;
  const float* sg = has_signs ? signs.typed_data() : nullptr;
  const int np = static_cast<int>(parts);
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::F32: {
      HadamardArgs<float> a{static_cast<const float*>(x.untyped_data()), sg, static_cast<float*>(y->untyped_data()),
                            rows, logn, 1, static_cast<int>(signs_after), scale, np};
      err = launch_hadamard(stream, a);
      break;
    }
    case ffi::DataType::F16: {
      HadamardArgs<__half> a{static_cast<const __half*>(x.untyped_data()), sg, static_cast<__half*>(y->untyped_data()),
                             rows, logn, 1, static_cast<int>(signs_after), scale, np};
      err = launch_hadamard(stream, a);
      break;
    }
    case ffi::DataType::BF16: {
      HadamardArgs<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(x.untyped_data()), sg,
                                    static_cast<__nv_bfloat16*>(y->untyped_data()), rows, logn, 1,
                                    static_cast<int>(signs_after), scale, np};
      err = launch_hadamard(stream, a);
      break;
    }
    default:
      return ffi::Error::InvalidArgument("hadamard: x must be float32, float16 or bfloat16");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hadamard: ") + cudaGetErrorString(err));
  return launch_error("hadamard launch");
}

// n = K * 2^p (K = 12, 20, 28; p = 6 .. 10), normalized: rht (signs before) or its inverse.
ffi::Error HadamardKImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> signs,
                         ffi::Result<ffi::AnyBuffer> y, int64_t k, int64_t has_signs, int64_t inverse,
                         int64_t parts) {
  auto xd = x.dimensions();
  if (xd.size() < 1 || parts < 1 || y->element_type() != x.element_type() ||
      y->element_count() * parts != x.element_count()) {
    return ffi::Error::InvalidArgument("hadamard_k: y must match x (x holds `parts` arrays of y's size)");
  }
  const int64_t n = xd[xd.size() - 1], m = (k == 12 || k == 20 || k == 28) && n % k == 0 ? n / k : 0;
  if (m < (1 << kHadKMinLogm) || m > (1 << kHadKMaxLogm) || (m & (m - 1))) {
    return ffi::Error::InvalidArgument("hadamard_k: the last axis must be K * 2^p with K in {12, 20, 28}, p in [6, 10]");
  }
  if (has_signs && signs.element_count() != static_cast<size_t>(n)) {
    return ffi::Error::InvalidArgument("hadamard_k: signs must have n elements");
  }
  int logm = 0;
  while ((int64_t{1} << logm) < m) ++logm;
  const int64_t rows = static_cast<int64_t>(y->element_count()) / n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  const float* sg = has_signs ? signs.typed_data() : nullptr;
  const int kk = static_cast<int>(k), inv = inverse ? 1 : 0, np = static_cast<int>(parts);
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      err = dispatch_hadamard_k(stream, HadamardArgs<float>{static_cast<const float*>(x.untyped_data()), sg,
                                static_cast<float*>(y->untyped_data()), rows, logm, 1, inv, scale, np}, kk);
      break;
    case ffi::DataType::F16:
      err = dispatch_hadamard_k(stream, HadamardArgs<__half>{static_cast<const __half*>(x.untyped_data()), sg,
                                static_cast<__half*>(y->untyped_data()), rows, logm, 1, inv, scale, np}, kk);
      break;
    case ffi::DataType::BF16:
      err = dispatch_hadamard_k(stream, HadamardArgs<__nv_bfloat16>{
                                static_cast<const __nv_bfloat16*>(x.untyped_data()), sg,
                                static_cast<__nv_bfloat16*>(y->untyped_data()), rows, logm, 1, inv, scale, np}, kk);
      break;
    default:
      return ffi::Error::InvalidArgument("hadamard_k: x must be float32, float16 or bfloat16");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("hadamard_k: ") + cudaGetErrorString(err));
  return launch_error("hadamard_k launch");
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
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("ksplit")
                                  .Attr<int64_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantScalarMma, ScalarMmaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("tiles")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<int64_t>("bits"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantHadamard, HadamardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("has_signs")
                                  .Attr<int64_t>("signs_after")
                                  .Attr<int64_t>("normalize")
                                  .Attr<int64_t>("parts"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantHadamardK, HadamardKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("has_signs")
                                  .Attr<int64_t>("inverse")
                                  .Attr<int64_t>("parts"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantE8pMatvec, E8pMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<double>("resid_scale")
                                  .Attr<int64_t>("rows_per_warp")
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("units_per_step"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantE8pMatvecXs, E8pMatvecXsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<double>("resid_scale")
                                  .Attr<int64_t>("rows_per_warp")
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<int64_t>("rht")
                                  .Attr<int64_t>("tensor_cores"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantE8pLinear, E8pLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<double>("resid_scale")
                                  .Attr<int64_t>("in_cluster")
                                  .Attr<int64_t>("rows_per_warp")
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<int64_t>("norm")
                                  .Attr<double>("norm_eps")
                                  .Attr<int64_t>("add_resid")
                                  .Attr<int64_t>("split0")
                                  .Attr<int64_t>("split1")
                                  .Attr<int64_t>("tensor_cores"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantE8pMlp, E8pMlpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<double>("resid_scale")
                                  .Attr<double>("norm_eps")
                                  .Attr<int64_t>("rows_per_warp")
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<int64_t>("tensor_cores"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantE8pMma, E8pMmaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<double>("resid_scale")
                                  .Attr<int64_t>("tiles"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantVq2Matvec, Vq2MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("index_bits")
                                  .Attr<int64_t>("group_rows")
                                  .Attr<int64_t>("group_cols")
                                  .Attr<int64_t>("warps"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantQtipMatvec, QtipMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("code")
                                  .Attr<int64_t>("kbits")
                                  .Attr<int64_t>("L")
                                  .Attr<int64_t>("ksplit")
                                  .Attr<int64_t>("warps"),
                              {ffi::Traits::kCmdBufferCompatible});

// The Hadamard kernel's plan, for the NumPy emulation in tests/test_kernels.py: returns the number
// of stages (0 for an unsupported logn) and writes out[0] = rows per block (log2), out[1] = threads
// per block, then (local mask, active mask) per stage; cap = the length of out. Host code only.
extern "C" int JaxquantHadamardPlan(int logn, int64_t* out, int cap) {
  if (logn < 1 || logn > 15 || cap < 2 + 2 * had_stages(logn)) return 0;
  const int local = logn < kHadLocalBits ? logn : kHadLocalBits;
  out[0] = had_row_bits(logn);
  out[1] = int64_t{1} << (logn + had_row_bits(logn) - local);
  for (int s = 0; s < had_stages(logn); ++s) {
    out[2 + 2 * s] = had_local(logn, s);
    out[3 + 2 * s] = had_active(logn, s);
  }
  return had_stages(logn);
}

#ifdef JAXQUANT_E8P_PHASES
// The phase stamps of the last x-stationary E8P launch: [blocks][7] (see e8_phase); the number copied.
extern "C" int jaxquant_e8p_phases(unsigned long long* out, int blocks) {
  const int n = blocks < kE8PhaseBlocks ? blocks : kE8PhaseBlocks;
  if (cudaDeviceSynchronize() != cudaSuccess) return -1;
  if (cudaMemcpyFromSymbol(out, e8_phase, sizeof(unsigned long long) * kE8PhaseFields * n) != cudaSuccess) return -1;
  return n;
}
#endif
