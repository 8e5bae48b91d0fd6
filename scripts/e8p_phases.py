"""Where the batch-1 E8P kernel's time goes, per block: phase stamps from a diagnostic build.

    python3 -c "from cuda_ffi import build; print(' '.join([build.nvcc_path(), *build.nvcc_flags(),
        '-DJAXQUANT_E8P_PHASES', *map(str, (build.SOURCE_DIR / s for s in build.SOURCES)), '-o', 'phases.so']))" | sh
    JAXQUANT_CUDA_LIBRARY=$PWD/phases.so python scripts/e8p_phases.py --shapes 4096x4096 28672x8192

The x-stationary kernel (`--vq-cases kernel` of `bench kernels`, weights rotating over 128 MB so
they come from DRAM) runs a few times; the last launch's stamps (%globaltimer, which ticked in
0.256 µs steps on an H100) give per block, from the earliest block's entry (µs): entry, table
filled, past pdl_wait, first chunk staged, first and last warp done, and the SM each block ran on.
The spread of the entries is the launch ramp, the spread of the last warps the tail; the SMs whose
blocks finish first and last say whether the tail follows the SM (`--save DIR` keeps the stamps).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cuda_ffi  # noqa: E402
from jaxquant import kernel_bench as bk  # noqa: E402

PHASES = ["entry", "table", "pdl_wait", "staged", "first warp done", "last warp done"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "28672x8192"], help="OUTxIN")
    p.add_argument("--vq", default="e8p", choices=["e8p", "rvq4"])
    p.add_argument("--calls", type=int, default=24, help="launches before the stamps are read")
    p.add_argument("--save", metavar="DIR", help="write each shape's stamps here as .npy [blocks, 7] (ns; SM id last)")
    args = p.parse_args(argv)
    lib = cuda_ffi.load()
    if not hasattr(lib, "jaxquant_e8p_phases"):
        sys.exit("this library was built without -DJAXQUANT_E8P_PHASES (see the docstring)")
    read = lib.jaxquant_e8p_phases
    read.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int]
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.lower().split("x"))
        bits = bk.QUIP_BITS[args.vq]
        sets = bk.vq_sets(args.vq, jax.random.key(out + inp), out, inp, bk._set_count(out * inp * bits // 8))
        x = jax.random.normal(jax.random.key(1), (1, inp), jnp.float32)
        fn = jax.jit(bk.vq_kernel_fn(args.vq, {}))
        for i in range(args.calls):
            y = fn(x, sets[i % len(sets)])
        jax.block_until_ready(y)
        stamps = np.zeros((1024, 7), np.uint64)
        n = read(stamps.ctypes.data_as(ctypes.POINTER(ctypes.c_ulonglong)), 1024)
        if n < 0:
            sys.exit("jaxquant_e8p_phases failed")
        s = stamps[:n]
        s = s[s[:, 0] + 10**6 >= s[:, 0].max()]  # the last launch's blocks (an earlier, larger grid's stay)
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            np.save(os.path.join(args.save, f"e8p_phases_{args.vq}_{shape}.npy"), s)
        sm = s[:, 6].astype(np.int64)
        rel = (s[:, :6].astype(np.float64) - float(s[:, 0].min())) / 1e3
        print(f"{args.vq} {shape}: {len(s)} blocks, kernel span {rel[:, 5].max():.2f} us (first entry to last warp)")
        for k, name in enumerate(PHASES):
            q = np.percentile(rel[:, k], [0, 50, 100])
            print(f"   {name:16s} min {q[0]:7.2f}  median {q[1]:7.2f}  max {q[2]:7.2f}")
        d = np.diff(rel[:, :4], axis=1)
        print("   per block (median us): fill {:.2f}, pdl_wait {:.2f}, stage {:.2f}, loop to last warp {:.2f}".format(
            *np.median(d, axis=0), np.median(rel[:, 5] - rel[:, 3])))
        sm_end = {int(i): rel[sm == i, 5].max() for i in np.unique(sm)}  # an SM is done when its last block is
        order = sorted(sm_end, key=sm_end.get)
        print("   SMs done first (sm: us):", ", ".join(f"{i}: {sm_end[i]:.1f}" for i in order[:10]))
        print("   SMs done last  (sm: us):", ", ".join(f"{i}: {sm_end[i]:.1f}" for i in order[-10:]))
        per_sm = np.bincount(np.bincount(sm)[np.unique(sm)]).tolist()
        print(f"   SMs holding 0, 1, 2 ... of these blocks: {per_sm}")


if __name__ == "__main__":
    main()
