"""A target for Nsight Compute: each decode-matvec and Hadamard kernel, a few calls each.

    ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        -k regex:"e8p|qtip|scalar|hadamard" python3 scripts/ncu_kernels.py --shape 4096x4096

The timing benches say how fast; this says why (latency, occupancy, memory or issue bound). One
shape per run keeps the report short; every kernel runs three times (read the last
report of each: the first carries cold caches).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cuda_ffi  # noqa: E402
from jaxquant import kernel_bench as bk  # noqa: E402
from jaxquant import hadamard as jq_hadamard  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x4096", help="OUTxIN of the matvecs; IN is the Hadamard width")
    p.add_argument("--vq", nargs="*", default=["e8p", "rvq4", "qtip-hyb-k2", "qtip-1mad-k2"])
    p.add_argument("--vq-config", type=json.loads, default={},
                   help='launch configuration of the E8P / RVQ4 kernels (JSON), e.g. \'{"variant": 1}\' for the '
                        "x-stationary E8P kernel")
    p.add_argument("--scalar-bits", type=int, nargs="*", default=[2, 4])
    p.add_argument("--batch", type=int, default=1, help="rows of x (2-16: the tensor-core kernels)")
    p.add_argument("--no-hadamard", action="store_true", help="leave the Hadamard kernel out")
    args = p.parse_args(argv)
    out, inp = (int(v) for v in args.shape.split("x"))
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, inp), jnp.float32).astype(jnp.bfloat16)
    calls = []
    for fmt in args.vq:
        qw = bk.vq_sets(fmt, key, out, inp, 1)[0]
        calls.append((fmt, jax.jit(bk.vq_kernel_fn(fmt, args.vq_config if fmt in ("e8p", "rvq4") else {})), qw))
    for bits in args.scalar_bits:
        qw = bk.random_sets(key, out, inp, bits, 128, 1)[0]
        calls.append((f"scalar {bits}-bit", jax.jit(lambda x, qw: qw.matmul(x, backend="cuda")), qw))
    signs = jq_hadamard.random_signs(key, inp)
    if inp & (inp - 1) == 0 and not args.no_hadamard:
        calls.append((f"hadamard n={inp}", jax.jit(lambda x, s: cuda_ffi.hadamard(x, s)), signs))
    elif cuda_ffi.hadamard_k_factor(inp) and not args.no_hadamard:
        calls.append((f"hadamard_k n={inp}", jax.jit(lambda x, s: cuda_ffi.hadamard_k(x, s, unit_signs=True)), signs))
    for name, fn, arg in calls:
        for _ in range(3):
            jax.block_until_ready(fn(x, arg))
        print(f"ran {name} at {args.shape}", flush=True)


if __name__ == "__main__":
    main()
