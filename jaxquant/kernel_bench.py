"""Benchmark the decode-matvec and Hadamard kernels at Llama layer shapes; print a table, write JSON.

For each weight shape [out, in], bit width and batch: the time per call of every backend
(``reference`` = dequantize + XLA matmul, ``pallas`` and ``cuda`` in a few launch configurations)
and of the fp16 matvec through XLA, the bytes each must move (codes + scales + zeros + x + y, or
the fp16 weight + x + y) over that time, and that bandwidth as a fraction of a device-to-device
copy measured in the same run. Every backend is first checked against the float32 reference.

Timing: one jitted function makes 8 calls on 8 weight sets; it is dispatched over and over,
rotating among enough sets to exceed the L2 cache, without waiting in between. ``--clock device``
(the default on a GPU): the time the GPU was busy (union of kernel intervals, from a jax.profiler
trace of those dispatches) per call. ``--clock wall`` (the default elsewhere): the slope between R
and 2R rounds (dispatch is shared by 8 calls, the final wait cancels), medians of 3 trials; where
the host dispatches slower than the device works (kernels of ~10 µs: Llama-7B shapes) it measures
the host (on an H100, E8P at 4096 x 4096: 17.5 µs a call by the wall clock, 6.8 µs of GPU time).
Rows are written to the JSON file as they come.

    jaxquant bench kernels --json results/bench_kernels_h100.json   (or python scripts/bench_kernels.py ...)
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "llama3-8b": [(14336, 4096)],
}
QUIP_BITS = {"e8p": 2, "rvq3": 3, "rvq4": 4}  # QuIP# formats of --vq
CUDA_CONFIGS = [dict(), dict(rows_per_warp=1), dict(rows_per_warp=2), dict(rows_per_warp=4),
                dict(rows_per_warp=1, ksplit=2), dict(rows_per_warp=2, ksplit=2), dict(rows_per_warp=1, ksplit=4),
                dict(variant=1), dict(variant=1, rows_per_warp=2), dict(variant=1, rows_per_warp=4),
                dict(variant=1, rows_per_warp=1, ksplit=2), dict(variant=1, rows_per_warp=2, ksplit=2),
                dict(variant=1, rows_per_warp=4, warps=16)]
PALLAS_CONFIGS = [dict(block_rows=16, block_words=32, num_warps=4, num_stages=3),
                  dict(block_rows=32, block_words=32, num_warps=4, num_stages=3),
                  dict(block_rows=64, block_words=32, num_warps=8, num_stages=4)]
PALLAS_TC_CONFIGS = [dict(tc=True, block_rows=r, block_words=w, num_warps=nw, num_stages=st)
                     for r, w, nw, st in ((64, 16, 4, 3), (128, 16, 4, 3), (128, 16, 8, 4), (64, 32, 4, 4),
                                          (32, 16, 4, 4), (128, 32, 8, 3))]
ROTATE_BYTES = 128 << 20  # weight sets per timing pass: at least this many bytes in all (L2 is 50 MB)
MAX_SETS = 32
UNROLL = 8  # calls per executable


def _block(tree):
    jax.block_until_ready(tree)


def per_call_seconds(fn, x, sets, *, unroll: int = 8, target_s: float = 0.05, trials: int = 3,
                     clock: str = "wall") -> float:
    """Median time of one ``fn(x, set)`` on the device.

    One executable makes ``unroll`` calls on as many weight sets (so the dispatch cost is shared);
    it is dispatched over and over, rotating among groups of sets, without waiting in between.
    ``clock="wall"``: the time per call is the slope between R and 2R rounds, which cancels the final
    wait; where the host's dispatch is slower than the device's work the slope measures the host.
    ``clock="device"``: the device-busy time of such rounds (a profiler trace) per call.
    """
    u = max(1, min(unroll, len(sets)))
    # Groups travel as flat lists of arrays: flattening the weight dataclasses on every dispatch cost
    # more host time than a small kernel takes on an H100 (session 4's profile), setting the pace.
    groups, treedef = [], None
    for i in range(0, len(sets) - u + 1, u):
        leaves, treedef = jax.tree.flatten(sets[i:i + u])
        groups.append(leaves)
    f = jax.jit(lambda x, leaves: [fn(x, s) for s in jax.tree.unflatten(treedef, leaves)])
    for g in groups:  # compile + warm up
        _block(f(x, g))

    def run(rounds):
        t0 = time.perf_counter()
        last = None
        for _ in range(rounds):
            for g in groups:
                last = f(x, g)  # one stream: waiting for the last waits for all
        _block(last)
        return time.perf_counter() - t0

    if clock == "device":
        from jaxquant.device_trace import busy_time, traced_events

        rounds = max(2, 256 // (u * len(groups)))  # ~256 calls: a trace of a few hundred kernels
        return busy_time(traced_events(lambda: run(rounds))) * 1e-6 / (rounds * len(groups) * u)
    one = run(1)
    rounds = max(1, min(1000, int(target_s / max(one, 1e-6))))
    slopes = []
    for _ in range(trials):
        t1, t2 = run(rounds), run(2 * rounds)
        slopes.append((t2 - t1) / (rounds * len(groups) * u))
    t = statistics.median(slopes)
    return t if t > 0 else run(rounds) / (rounds * len(groups) * u)


def _set_count(nbytes: int) -> int:
    """Weight sets to rotate among: a multiple of UNROLL holding at least ROTATE_BYTES."""
    return min(MAX_SETS, max(UNROLL, -(-ROTATE_BYTES // nbytes // UNROLL) * UNROLL))


def random_sets(key, out, inp, bits, group, count):
    from jaxquant.formats.scalar import ScalarQuantized

    words = inp // 32 * bits
    groups = out * inp // group
    sets = []
    for i in range(count):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        codes = jax.random.randint(k1, (out, words), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max, jnp.int32)
        scale = (jax.random.uniform(k2, (groups, 1), jnp.float32, 0.5, 1.5) / 2**bits).astype(jnp.float16)
        zero = jax.random.uniform(k3, (groups, 1), jnp.float32, 0, 2**bits - 1).astype(jnp.float16)
        sets.append(ScalarQuantized(codes, scale, zero, (out, inp), bits, group))
    _block(sets)
    return sets


def quantized_bytes(qw, batch, dtype) -> int:
    out, inp = qw.shape
    item = jnp.dtype(dtype).itemsize
    return qw.codes.nbytes + qw.scale.nbytes + qw.zero.nbytes + batch * (inp + out) * item


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    if not np.all(np.isfinite(y)):
        return float("nan")
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def backends(args):
    out = [("reference", {}, lambda x, qw: qw.matmul(x, backend="reference"))]
    if "cuda" in args.backends:
        configs = args.scalar_configs or (CUDA_CONFIGS if args.sweep else [CUDA_CONFIGS[0], dict(variant=1)])
        for cfg in configs:
            out.append(("cuda", cfg, functools.partial(_cuda_scalar, cfg)))
    if "pallas" in args.backends:
        # {}: what backend="pallas" runs (the tensor-core kernel for 2-16 rows of 16-bit x)
        configs = args.pallas_configs or ([{}, *PALLAS_CONFIGS, *PALLAS_TC_CONFIGS] if args.sweep else [{}])
        for cfg in configs:
            out.append(("pallas", cfg, functools.partial(_pallas_scalar, cfg)))
    return out


def _cuda_scalar(cfg, x, qw):
    """The CUDA backend as dispatch calls it (``cfg`` empty), the CUDA-core kernel at launch
    configuration ``cfg`` or, with ``cfg["mma"]``, the 2- or 4-bit tensor-core one (``cuda_ffi.scalar_mma``)
    at the rest of ``cfg``."""
    import cuda_ffi

    if not cfg:
        return qw.matmul(x, backend="cuda")
    cfg = dict(cfg)
    if cfg.pop("mma", False):
        return cuda_ffi.scalar_mma(x, qw.codes, qw.scale, qw.zero, group_size=qw.group_size, bits=qw.bits, **cfg)
    return cuda_ffi.scalar_matvec(x, qw.codes, qw.scale, qw.zero, bits=qw.bits, group_size=qw.group_size, **cfg)


def _pallas_scalar(cfg, x, qw):
    """The Pallas backend as dispatch calls it (``cfg`` empty), the decode-matvec at launch
    configuration ``cfg`` or, with ``cfg["tc"]``, the tensor-core kernel at the rest of ``cfg``."""
    import pallas_kernels

    if not cfg:
        return qw.matmul(x, backend="pallas")
    cfg = dict(cfg)
    kernel = pallas_kernels.scalar_matmul if cfg.pop("tc", False) else pallas_kernels.scalar_matvec
    return kernel(x, qw.codes, qw.scale, qw.zero, bits=qw.bits, group_size=qw.group_size, **cfg)


def layer_shapes(args):
    """(model, out, in) of every weight shape to run: the models' (``--models`` subset) or ``--shapes``."""
    table = SHAPES
    if args.shapes:
        table = {"custom": [tuple(int(d) for d in s.split("x")) for s in args.shapes]}
    for model, shapes in table.items():
        if not args.models or model in args.models:
            for out, inp in shapes:
                yield model, out, inp


def fp16_sets(key, out, inp):
    """Enough random fp16 weights of one shape for the baseline matvec to stream from memory."""
    return [jax.random.normal(jax.random.fold_in(key, 99 + i), (out, inp), jnp.float16)
            for i in range(_set_count(out * inp * 2))]


def bench_matvec(args, copy_bw, rows):
    import pallas_kernels

    dtype = jnp.dtype(args.dtype)
    key = jax.random.key(args.seed)
    for model, out, inp in layer_shapes(args):
        fp16_bytes = out * inp * 2
        w16 = fp16_sets(key, out, inp)
        for batch in args.batch:
            x = jax.random.normal(jax.random.fold_in(key, batch), (batch, inp), jnp.float32).astype(dtype)
            t16 = per_call_seconds(lambda x, w: x.astype(jnp.float16) @ w.T, x, w16, clock=args.clock)
            bytes16 = fp16_bytes + batch * (inp + out) * 2
            record(args, rows, dict(kind="matvec", model=model, out=out, inp=inp, bits=16, batch=batch,
                                    backend="fp16-xla", config={}, us=t16 * 1e6, bytes=bytes16,
                                    GBps=bytes16 / t16 / 1e9, copy_frac=bytes16 / t16 / copy_bw,
                                    speedup_vs_fp16=1.0, rel_err=0.0))
            for bits in args.bits:
                qbytes = out * inp * bits // 8
                nsets = _set_count(qbytes)
                sets = random_sets(jax.random.fold_in(key, 1000 * bits + out + inp), out, inp, bits,
                                   args.group_size, nsets)
                ref = np.asarray(jnp.matmul(x.astype(jnp.float32), sets[0].dequantize(jnp.float32).T,
                                            precision=jax.lax.Precision.HIGHEST), np.float64)
                nbytes = quantized_bytes(sets[0], batch, dtype)
                for name, cfg, fn in backends(args):
                    if name == "pallas" and bits not in pallas_kernels.SUPPORTED_BITS:
                        continue
                    if cfg.get("variant") and (bits not in (2, 4) or batch != 1):  # the half2 decode's only cases
                        continue
                    if (cfg.get("tc") or cfg.get("mma")) and dtype == jnp.float32:  # the dots take 16-bit x
                        continue
                    if cfg.get("mma") and (bits not in (2, 4) or args.group_size % 128):
                        continue
                    row = dict(kind="matvec", model=model, out=out, inp=inp, bits=bits, batch=batch,
                               backend=name, config=cfg, group_size=args.group_size, bytes=nbytes)
                    record(args, rows, measure(args, row, fn, x, sets, ref, copy_bw, t16))
                del sets
        del w16


def vq_sets(fmt, key, out, inp, count):
    """Random weights of a codebook format: ``e8p``/``rvq3``/``rvq4`` (QuIP#), ``qtip-<code>-k<k>`` or
    ``gptvq-d<D>-k<bits per weight>`` (GPTVQ's default tiles: 8 rows x 256 columns per codebook)."""
    from jaxquant.codebooks import e8p as jq_e8p
    from jaxquant.codebooks import trellis
    from jaxquant.formats import packing
    from jaxquant.formats.qtip import QTIPQuantized
    from jaxquant.formats.quip_sharp import QuIPSharpQuantized
    from jaxquant.formats.vq import VQQuantized

    sets = []
    for i in range(count):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        if fmt.startswith("gptvq"):
            d, k = int(fmt.split("-d")[1].split("-")[0]), int(fmt.split("-k")[1])
            words = packing.packed_words(inp // d, k * d)
            codes = jax.random.randint(k1, (out, words), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max, jnp.int32)
            codebook = jax.random.randint(k2, (out // 8, inp // 256, 2 ** (k * d), d), -127, 128, jnp.int32)
            sets.append(VQQuantized(codes, codebook.astype(jnp.int8), jnp.full((out // 8, inp // 256, 1, 1), 0.01,
                                    jnp.float16), (out, inp), d, k * d, 8, 256))
            continue
        su = jnp.where(jax.random.bernoulli(k2, 0.5, (inp,)), 1.0, -1.0).astype(jnp.float16)
        sv = jnp.where(jax.random.bernoulli(k3, 0.5, (out,)), 1.0, -1.0).astype(jnp.float16)
        if fmt in QUIP_BITS:
            bits = QUIP_BITS[fmt]
            codes = jax.random.randint(k1, (out, inp // 8, bits), 0, 256, jnp.int32).astype(jnp.uint8)
            sets.append(QuIPSharpQuantized(codes, su, sv, jnp.array([0.03], jnp.float32), (out, inp), bits,
                                           jq_e8p.CODEBOOK_FOR_BITS[bits]))
        else:
            _, code, kk = fmt.split("-")
            k = int(kk[1:])
            tc = trellis.TrellisCode(code)
            codes = jax.random.randint(k1, (out // 16, inp // 16, 8 * k), jnp.iinfo(jnp.int32).min,
                                       jnp.iinfo(jnp.int32).max, jnp.int32)
            table = jnp.asarray(tc.default_table() if code == "hyb" else np.zeros((1, 1), np.float16))
            sets.append(QTIPQuantized(codes, jnp.array([0.05], jnp.float32), su, sv, table, (out, inp), k, code,
                                      16, tc.V, 9))
    _block(sets)
    return sets


def vq_kernel_fn(fmt, cfg, rows: int = 1):
    """The rotated-domain product alone (the kernel), as the format calls it for ``rows`` rows
    of x (one: E8P / RVQ4's x-stationary kernel unless cfg names a variant)."""
    import cuda_ffi
    from jaxquant.codebooks import e8p as jq_e8p

    if fmt.startswith("gptvq"):  # no transform around it: the kernel is the whole product
        return lambda x, qw: qw.matmul(x, backend="pallas")
    if fmt in ("e8p", "rvq4"):  # cfg["mma"]: the tensor-core kernel (cuda_ffi.e8p_mma) at the rest of cfg
        table = cuda_ffi.e8p_abs_table(jq_e8p.e8p_source_set())
        cfg = dict(cfg)
        kernel = cuda_ffi.e8p_mma if cfg.pop("mma", False) else cuda_ffi.e8p_matvec
        if kernel is cuda_ffi.e8p_matvec and rows == 1:
            cfg.setdefault("variant", 1)  # the x-stationary kernel: what a batch-1 linear runs
        return lambda x, qw: kernel(x, qw.codes, table, bits=qw.bits,
                                    resid_scale=jq_e8p.get_codebook(qw.bits).resid_scale or 1.0, **cfg)
    return lambda x, qw: cuda_ffi.qtip_matvec(x, qw.codes, qw.table if qw.code == "hyb" else None, code=qw.code,
                                              k=qw.bits, **cfg)


def _pallas_e8p(x, qw):
    """The Pallas E8P / RVQ4 decode as the Pallas linear calls it (tensor cores for 2-16 rows)."""
    import pallas_kernels
    from jaxquant.codebooks import e8p as jq_e8p

    table = pallas_kernels.e8p_table(jq_e8p.e8p_source_set())
    return pallas_kernels.e8p_product(x, qw.codes, table, bits=qw.bits,
                                      resid_scale=jq_e8p.get_codebook(qw.bits).resid_scale or 1.0)


def bench_vq(args, copy_bw, rows):
    """E8P / RVQ4 / QTIP: the decode-matvec kernel alone (x already rotated), and the full linear
    (RHT of x, kernel, inverse RHT of y) through ``matmul(backend=...)``; bytes are the codes plus
    x and y in the activation dtype (the sign vectors and tables are noise)."""
    dtype = jnp.dtype(args.dtype)
    key = jax.random.key(args.seed + 7)
    for model, out, inp in layer_shapes(args):
        w16 = fp16_sets(key, out, inp)
        for batch in args.batch:
            x = jax.random.normal(jax.random.fold_in(key, batch), (batch, inp), jnp.float32).astype(dtype)
            t16 = per_call_seconds(lambda x, w: x.astype(jnp.float16) @ w.T, x, w16, clock=args.clock)
            for fmt in args.vq:
                bits = QUIP_BITS.get(fmt) or int(fmt.split("-k")[1])
                sets = vq_sets(fmt, jax.random.fold_in(key, out + inp), out, inp, _set_count(out * inp * bits // 8))
                nbytes = sets[0].codes.nbytes + batch * (inp + out) * dtype.itemsize
                xf = x.astype(jnp.float32)
                q = sets[0].dequantize() if fmt.startswith("gptvq") else sets[0].rotated()
                if fmt.startswith("qtip"):  # the kernel returns code values; the format scales after
                    q = q / sets[0].scale[0]
                ref_kernel = np.asarray(jnp.matmul(xf, q.T, precision=jax.lax.Precision.HIGHEST))
                configs = (args.vq_configs if fmt in ("e8p", "rvq4") else args.qtip_configs if fmt.startswith("qtip")
                           else [{}])
                cases = [("kernel", vq_kernel_fn(fmt, cfg, batch), ref_kernel, cfg)
                         for cfg in configs] if fmt != "rvq3" else []  # 3-bit QuIP#: the Pallas linear only
                if fmt in ("e8p", "rvq4"):
                    cases.append(("kernel-pallas", _pallas_e8p, ref_kernel, {}))
                cases += [("linear-cuda", lambda x, qw: qw.matmul(x, backend="cuda"),
                          np.asarray(sets[0].matmul(xf, backend="reference"), np.float64), {})]
                ref_linear = cases[-1][2]
                cases.append(("linear-pallas", lambda x, qw: qw.matmul(x, backend="pallas"), ref_linear, {}))
                if args.reference:
                    cases.append(("linear-reference", lambda x, qw: qw.matmul(x, backend="reference"), ref_linear, {}))
                del q
                for name, fn, ref, cfg in cases:
                    if name not in args.vq_cases and name != "linear-reference":
                        continue
                    row = dict(kind="vq", model=model, out=out, inp=inp, bits=bits, batch=batch, format=fmt,
                               backend=name, config=cfg, bytes=nbytes)
                    xin = xf if name == "kernel" else x
                    record(args, rows, measure(args, row, fn, xin, sets, ref, copy_bw, t16))
                del sets
        del w16


def bench_hadamard(args, copy_bw, rows):
    """Hadamard transform of bf16 (--dtype) rows: 64 MB per call (bandwidth, share of the copy
    bandwidth), then ``--hadamard-rows`` rows per call (latency at decode batch sizes, where few
    blocks run), printed after all the bandwidth rows. A width that is not a power of two (e.g.
    28672 = 28 * 1024) goes through the kernel on the 2^p factor plus the K x K einsum (float32 in
    between; "cuda+einsum") and, for K = 12, 20, 28, the fused kernel ``cuda_ffi.hadamard_k``
    ("cuda-k", what ``rht_fast`` uses from ``HADAMARD_K_MIN_ROWS`` rows); decode rows also through
    ``cuda_ffi.rht_cluster`` ("cuda-cluster", what ``rht_fast`` uses up to ``RHT_CLUSTER_MAX_ROWS`` rows)."""
    import cuda_ffi
    from jaxquant import hadamard as jq_hadamard
    from jaxquant.formats import dispatch

    dtype = jnp.dtype(args.dtype)
    latency_rows = []
    cases = [("bandwidth", None)] if "bandwidth" in args.hadamard_cases else []
    cases += [("latency", r) for r in args.hadamard_rows] if "latency" in args.hadamard_cases else []
    for case, few_rows in cases:
        for n in args.hadamard_n:
            pow2 = n & (n - 1) == 0
            nrows = few_rows or max(1, (64 << 20) // (n * dtype.itemsize))
            key = jax.random.key(n)
            count = 2 if case == "bandwidth" else 8
            xs = [jax.random.normal(jax.random.fold_in(key, i), (nrows, n), jnp.float32).astype(dtype)
                  for i in range(count)]
            signs = jq_hadamard.random_signs(key, n)
            ref = np.asarray(jq_hadamard.rht(xs[0].astype(jnp.float32), signs), np.float64)
            nbytes = 2 * nrows * n * dtype.itemsize
            cuda_fns = {"reference": lambda s, x: jq_hadamard.rht(x, s)}
            if pow2:
                cuda_fns["cuda"] = lambda s, x: cuda_ffi.hadamard(x, s)
            else:
                cuda_fns["cuda+einsum"] = lambda s, x: _rht_einsum(x.astype(jnp.float32), s).astype(x.dtype)
                if cuda_ffi.hadamard_k_factor(n):
                    cuda_fns["cuda-k"] = lambda s, x: cuda_ffi.hadamard_k(x, s, unit_signs=True)
            factor = dispatch.cluster_factor(n)
            if case == "latency" and nrows <= dispatch.RHT_CLUSTER_MAX_ROWS and factor is not None:
                cuda_fns["cuda-cluster"] = lambda s, x, d=factor: cuda_ffi.rht_cluster(
                    x.astype(jnp.float32), d, s).astype(x.dtype)  # what rht_fast takes for decode rows
            for name, fn in cuda_fns.items():
                row = dict(kind="hadamard", case=case, n=n, rows=nrows, backend=name, bytes=nbytes)
                row = measure(args, row, fn, signs, xs, ref, copy_bw)  # fn(signs, x): x rotates
                if case == "bandwidth":
                    record(args, rows, row)
                else:
                    latency_rows.append(row)
    print("hadamard latency (few rows per call, back to back):", flush=True)
    for row in latency_rows:
        record(args, rows, row)


def _rht_einsum(x, signs):
    """``rht`` as two steps: the CUDA 2^p-point kernel, then the K x K factor as an XLA einsum."""
    import cuda_ffi
    from jaxquant import hadamard as jq_hadamard

    n = x.shape[-1]
    k, p = jq_hadamard.hadamard_factors(n)
    y = cuda_ffi.hadamard((x * signs.astype(x.dtype)).reshape(*x.shape[:-1], k, 2**p))
    hk = jnp.asarray(jq_hadamard.hadamard_factor(k) / np.sqrt(k), x.dtype)
    return jnp.einsum("...ij,ik->...kj", y, hk, precision=jax.lax.Precision.HIGHEST).reshape(x.shape)


def measure(args, row, fn, x, sets, ref, copy_bw, t16=None):
    """``row`` with ``fn(x, set)``'s error against ``ref``, time per call and bandwidth (bytes per
    call in ``row``), and speed-up over the fp16 time ``t16``; or the error a failing backend raised."""
    try:
        row["rel_err"] = rel_err(jax.jit(fn)(x, sets[0]), ref)
        t = per_call_seconds(fn, x, sets, clock=args.clock)
        row.update(us=t * 1e6, GBps=row["bytes"] / t / 1e9, copy_frac=row["bytes"] / t / copy_bw)
        if t16 is not None:
            row["speedup_vs_fp16"] = t16 / t
    except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if args.verbose:
            traceback.print_exc()
    return row


def record(args, rows, row):
    """Keep, print, and (with --json) save every row as it comes, so a cut-off run keeps its results."""
    rows.append(row)
    _print_row(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=args.meta, results=rows), f, indent=1)


def _fmt_cfg(cfg) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "auto"


def _print_row(r):
    if r["kind"] == "hadamard":
        head = f"hadamard n={r['n']:<6} rows={r['rows']:<6} {r['backend']:<10}"
    elif r["kind"] == "vq":
        head = (f"{r['model']:<11} {r['out']:>5}x{r['inp']:<5} {r['format']:<14} n={r['batch']:<2} "
                f"{r['backend']:<38}")
    else:
        head = (f"{r['model']:<11} {r['out']:>5}x{r['inp']:<5} b={r['bits']:<2} n={r['batch']:<2} "
                f"{r['backend']:<9} {_fmt_cfg(r.get('config', {})):<42}")
    if "error" in r:
        print(f"{head} ERROR {r['error']}", flush=True)
        return
    extra = f" x{r['speedup_vs_fp16']:5.2f} vs fp16" if "speedup_vs_fp16" in r else ""
    print(f"{head} {r['us']:9.2f} us {r['GBps']:8.1f} GB/s {100 * r['copy_frac']:5.1f}% copy"
          f"{extra} err={r['rel_err']:.1e}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="jaxquant bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write all results here")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    p.add_argument("--shapes", nargs="*", default=None, help="OUTxIN weight shapes instead of the models'")
    p.add_argument("--backends", nargs="+", default=["cuda", "pallas"])
    p.add_argument("--sweep", action="store_true", help="several launch configurations per kernel")
    p.add_argument("--hadamard-n", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--hadamard-rows", type=int, nargs="*", default=[1],
                   help="row counts of the Hadamard latency rows (decode batch sizes)")
    p.add_argument("--hadamard-cases", nargs="+", default=["bandwidth", "latency"], choices=["bandwidth", "latency"],
                   help="the Hadamard rows to time: 64 MB per call (bandwidth) and/or --hadamard-rows rows (latency)")
    p.add_argument("--no-matvec", action="store_true", help="skip the scalar-format rows")
    p.add_argument("--vq", nargs="*", default=[],
                   help="codebook formats: e8p rvq3 rvq4 qtip-hyb-k2 qtip-1mad-k2 gptvq-d2-k2 ... (rvq3: Pallas only)")
    p.add_argument("--reference", action="store_true", help="also time the codebook formats' jnp reference")
    p.add_argument("--vq-cases", nargs="+", default=["kernel", "linear-cuda"],
                   help="any of kernel (CUDA, x already rotated), kernel-pallas (E8P/RVQ4), linear-cuda, linear-pallas "
                        "(full linear, RHT included)")
    p.add_argument("--scalar-configs", type=json.loads, default=None,
                   help='scalar CUDA launch configurations as a JSON list instead of the default two (or --sweep\'s), '
                        'e.g. \'[{"variant": 1}, {"variant": 1, "rows_per_warp": 2, "ksplit": 2}]\'; "mma": true takes '
                        'the 4- or 2-bit tensor-core kernel (cuda_ffi.scalar_mma; "splits" its option)')
    p.add_argument("--pallas-configs", type=json.loads, default=None,
                   help='scalar Pallas configurations as a JSON list instead of the default (what backend="pallas" '
                        'runs) or --sweep\'s; "tc": true takes the tensor-core kernel, e.g. '
                        '\'[{}, {"tc": true, "block_rows": 128, "splits": 2}]\'')
    p.add_argument("--vq-configs", type=json.loads, default=[{}],
                   help='E8P/RVQ4 kernel launch configurations as a JSON list, e.g. '
                        '\'[{}, {"rows_per_warp": 4, "units_per_step": 1}]\' ({}: the default, at batch 1 the '
                        'x-stationary kernel, "variant": 1, as the linear runs it; "variant": 2 its tensor-core form; '
                        '"tensor_cores": false keeps 2-16 rows on the CUDA-core kernel; "mma": true takes '
                        'cuda_ffi.e8p_mma with its "tiles" and "splits")')
    p.add_argument("--qtip-configs", type=json.loads, default=[{}],
                   help='QTIP kernel launch configurations as a JSON list, e.g. \'[{}, {"ksplit": 8}]\' ({}: the '
                        'default; "ksplit": K-slices per tile row, "warps": warps per block)')
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "device"],
                   help="device: the GPU's busy time per call from a profiler trace (the kernels' own speed); "
                        "wall: time per call from the host (includes dispatch where it is slower than the GPU); "
                        "auto: device on a GPU, else wall")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that sets the bandwidth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    if args.clock == "auto":
        args.clock = "device" if dev.platform == "gpu" else "wall"
    if args.clock == "device" and dev.platform != "gpu":
        p.error(f"--clock device reads GPU kernel intervals from a profiler trace; this device is {dev.platform}")
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    from jaxquant.decode_bench import copy_bandwidth  # the probe `bench decode` uses too

    copy_bw = copy_bandwidth(args.copy_mib << 20)
    print(f"device-to-device copy: {copy_bw / 1e9:.1f} GB/s (read + write); times per call: {args.clock} clock",
          flush=True)
    args.meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                     python=platform.python_version(), copy_GBps=copy_bw / 1e9, dtype=args.dtype,
                     group_size=args.group_size, clock=args.clock, argv=sys.argv[1:])
    rows: list[dict] = []
    if not args.no_matvec:
        bench_matvec(args, copy_bw, rows)
    if args.vq:
        bench_vq(args, copy_bw, rows)
    if args.hadamard_n and "cuda" in args.backends:
        bench_hadamard(args, copy_bw, rows)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
