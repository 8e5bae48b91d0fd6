"""The kernels of one batch-1 quantized linear on the device, timed apart: a jax.profiler trace.

    python scripts/profile_linear.py --shape 8192x28672 --vq e8p [--calls 20] [--timeline 8] [--sets 16]
        [--case linear|kernel]

`bench kernels` times a linear as a whole; this says how its time splits between the kernels
of the call (x's transform, the decode-matvec, the inverse transform of its partial sums) and
how much of each runs overlapped with the one before (programmatic dependent launch), so a
change can be aimed at the kernel that sets the time.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxquant import kernel_bench as bk  # noqa: E402
from jaxquant.device_trace import busy_time, traced_events  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x28672", help="OUTxIN")
    p.add_argument("--vq", default="e8p", help="a codebook format of `bench kernels --vq` (e8p, rvq4, qtip-hyb-k2 ...)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--calls", type=int, default=20, help="linear calls traced (after two untimed ones)")
    p.add_argument("--timeline", type=int, default=8, metavar="N",
                   help="print the kernels of N calls in order: start, duration, and overlap with the one before")
    p.add_argument("--sets", type=int, default=1,
                   help="weight sets the calls rotate among (1: the weights stay in L2 when they fit; "
                        "`bench kernels` rotates over at least 128 MB)")
    p.add_argument("--case", default="linear", choices=["linear", "kernel"],
                   help="kernel: the rotated-domain product alone, as `bench kernels --vq-cases kernel` times it")
    args = p.parse_args(argv)

    out, inp = (int(v) for v in args.shape.lower().split("x"))
    key = jax.random.key(0)
    sets = bk.vq_sets(args.vq, key, out, inp, max(1, args.sets))
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, inp), jnp.float32).astype(args.dtype)
    if args.case == "kernel":
        fn = jax.jit(bk.vq_kernel_fn(args.vq, {}))
        x = x.astype(jnp.float32)
    else:
        fn = jax.jit(lambda x, qw: qw.matmul(x, backend=args.backend))
    for qw in sets[:2]:  # compile, warm up
        fn(x, qw).block_until_ready()
    events = traced_events(lambda: jax.block_until_ready([fn(x, sets[i % len(sets)]) for i in range(args.calls)]))
    per_call = len(events) / args.calls
    print(f"{args.vq} {out}x{inp} batch 1 ({args.backend}, {args.case}, {len(sets)} weight sets): "
          f"device busy {busy_time(events) / args.calls:.2f} us a call, {per_call:.1f} kernels a call")
    by_name = collections.defaultdict(list)
    for e in events:
        by_name[e["name"]].append(e["dur"])
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        durs = sorted(durs)
        print(f"  {len(durs) / args.calls:4.1f}x  median {durs[len(durs) // 2]:7.2f} us  min {durs[0]:7.2f}  {name[:100]}")
    if args.timeline:
        print("in order (start from the call's first kernel, duration, overlap with the kernel before; us):")
        k = round(per_call) or 1
        for c in range(min(args.timeline, len(events) // k)):
            call = events[c * k:(c + 1) * k]
            t0, end = call[0]["ts"], None
            for e in call:
                overlap = 0.0 if end is None else max(0.0, end - e["ts"])
                print(f"  {e['ts'] - t0:8.2f} {e['dur']:7.2f} {overlap:6.2f}  {e['name'][:80]}")
                end = e["ts"] + e["dur"]
            print()


if __name__ == "__main__":
    main()
