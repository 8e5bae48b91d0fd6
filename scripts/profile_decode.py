"""Where a decode step's time goes on the device: a jax.profiler trace, summarized per kernel.

    python scripts/profile_decode.py --shape llama2-7b --layers 4 --method quip# --bits 2 [--fuse]

Prints the wall time per step, the device-busy time per step (union of kernel intervals) and the
kernels ranked by total time, so host dispatch, launch gaps and slow kernels can be told apart.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxquant import decode_bench as db  # noqa: E402
from jaxquant.cli import build_parser, config_from_args  # noqa: E402
from jaxquant.device_trace import busy_time, traced_events  # noqa: E402
from jaxquant.model.params import model_from_params, named_params  # noqa: E402
from jaxquant.model.shapes import random_model  # noqa: E402


def print_timeline(events: list[dict], steps: int, count: int) -> None:
    """The first ``count`` kernels of the middle step, in device order: start, duration, idle gap."""
    ordered = sorted(events, key=lambda e: e["ts"])
    per_step = len(ordered) // steps
    step = ordered[(steps // 2) * per_step:(steps // 2 + 1) * per_step]
    t0, end = step[0]["ts"], step[0]["ts"]
    print(f"timeline of one step ({per_step} kernels; start, duration, gap before it, in us):")
    for e in step[:count]:
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.2f} {max(0.0, e['ts'] - end):6.2f}  {e['name'][:90]}")
        end = max(end, e["ts"] + e["dur"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="quip#")
    p.add_argument("--bits", default="2")
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--dense", action="store_true", help="profile the fp16 model instead")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--group-size", type=int, default=None, help="the method's group size (default: its own)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--timeline", type=int, default=0, metavar="N",
                   help="also print the first N kernels of one step in order, with the idle gap before each")
    args = p.parse_args(argv)

    dense = random_model(args.shape, dtype="float16", num_layers=args.layers)
    if args.fuse:
        from jaxquant.model.fuse import fuse_linears
        dense = fuse_linears(dense)
    model = dense
    if not args.dense:
        extra = ["--group-size", str(args.group_size)] if args.group_size else []
        qargs = build_parser().parse_args(["bench", "decode", "--method", args.method, "--bits", args.bits, *extra])
        model = db.quantize_shared(model_from_params(dense.config, named_params(dense)), config_from_args(qargs))
    step, state, cache = db.greedy_step(model, batch=args.batch, cache_len=256)

    token = jnp.zeros((args.batch, 1), jnp.int32)
    for i in range(3):  # compile, warm up
        token, cache = step(state, token, cache, jnp.int32(100 + i))
    token.block_until_ready()
    wall = 0.0

    def run_steps():
        nonlocal token, cache, wall
        start = time.perf_counter()
        for i in range(args.steps):
            token, cache = step(state, token, cache, jnp.int32(110 + i))
        token.block_until_ready()
        wall = (time.perf_counter() - start) / args.steps * 1e6

    events = traced_events(run_steps)
    by_name = collections.defaultdict(list)
    for e in events:
        by_name[e["name"]].append(e["dur"])
    print(f"{args.shape} {args.layers} layers, batch {args.batch}, "
          f"{'fp16' if args.dense else args.method + ' ' + args.bits + '-bit'}"
          f"{' fused' if args.fuse else ''}: wall {wall:.0f} us/step (profiled), device busy "
          f"{busy_time(events) / args.steps:.0f} us/step, kernel sum {sum(e['dur'] for e in events) / args.steps:.0f}"
          f" us/step, {len(events) / args.steps:.0f} device events/step")
    if args.timeline:
        print_timeline(events, args.steps, args.timeline)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in ranked[:args.top]:
        print(f"  {sum(durs) / args.steps:8.1f} us/step  {len(durs) / args.steps:5.1f}x  mean {sum(durs) / len(durs):7.2f} us"
              f"  {name[:110]}")


if __name__ == "__main__":
    main()
