"""Evaluation (perplexity forward) throughput in tokens/s for random models of real shapes.

    python scripts/bench_eval_throughput.py --shape llama2-7b --ctx 2048 --json results/eval_throughput_gpu.json

Times the jitted forward + NLL over ``--windows`` windows (after one warm-up window) in full
precision and with RTN-quantized linears (reference dequantize path), and prints a table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxquant.evaluate import window_nll
from jaxquant.methods.rtn import RTNConfig
from jaxquant.model.shapes import PRESETS, random_model
from jaxquant.pipeline import quantize_model


def time_eval(model, windows: np.ndarray, batch: int) -> float:
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)
    step = jax.jit(lambda s, t: window_nll(nnx.merge(graphdef, s), t))
    step(state, windows[:batch]).block_until_ready()  # compile
    start = time.perf_counter()
    for i in range(0, len(windows), batch):
        step(state, windows[i : i + batch]).block_until_ready()
    return windows.size / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=["llama2-7b"], choices=sorted(PRESETS))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--layers", type=int, default=None, help="truncate to N layers (quick checks)")
    p.add_argument("--rtn-bits", type=int, nargs="*", default=[4])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    rows = []
    for shape in args.shape:
        model = random_model(shape, dtype=dtype, num_layers=args.layers)
        windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.windows, args.ctx), dtype=np.int32)
        variants = [("dense", model)] + [(f"rtn{b}g128", quantize_model(model, RTNConfig(bits=b, group_size=128)))
                                         for b in args.rtn_bits]
        for name, m in variants:
            tps = time_eval(m, windows, args.batch)
            rows.append(dict(shape=shape, variant=name, dtype=dtype, ctx=args.ctx, batch=args.batch,
                             layers=m.config.num_hidden_layers, tokens_per_s=tps))
            print(f"{shape:<14} {name:<10} {dtype:<9} ctx {args.ctx} batch {args.batch}: {tps:10.0f} tokens/s", flush=True)
        del model, variants
    meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                python=platform.python_version(), command=" ".join(sys.argv))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
