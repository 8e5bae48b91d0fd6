"""The kernels of one batch-1 quantized linear on the device, timed apart: a jax.profiler trace.

    python scripts/profile_linear.py --shape 8192x28672 --vq e8p [--calls 20] [--timeline 8]

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
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from profile_decode import busy_time, device_events  # noqa: E402

from jaxquant import kernel_bench as bk  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x28672", help="OUTxIN")
    p.add_argument("--vq", default="e8p", help="a codebook format of `bench kernels --vq` (e8p, rvq4, qtip-hyb-k2 ...)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--calls", type=int, default=20, help="linear calls traced (after two untimed ones)")
    p.add_argument("--timeline", type=int, default=8, metavar="N",
                   help="print the kernels of N calls in order: start, duration, and overlap with the one before")
    args = p.parse_args(argv)

    out, inp = (int(v) for v in args.shape.lower().split("x"))
    key = jax.random.key(0)
    qw = bk.vq_sets(args.vq, key, out, inp, 1)[0]
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, inp), jnp.float32).astype(args.dtype)
    fn = jax.jit(lambda x, qw: qw.matmul(x, backend=args.backend))
    for _ in range(2):  # compile, warm up
        fn(x, qw).block_until_ready()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            ys = [fn(x, qw) for _ in range(args.calls)]
            jax.block_until_ready(ys)
        events = sorted(device_events(tmp), key=lambda e: e["ts"])
    per_call = len(events) / args.calls
    print(f"{args.vq} {out}x{inp} batch 1 ({args.backend}): device busy {busy_time(events) / args.calls:.2f} us a call, "
          f"{per_call:.1f} kernels a call")
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
