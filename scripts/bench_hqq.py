"""Wall time of HQQ on every linear layer of a Llama-2-7B-shaped random model.

Per layer q, k, v, o 4096x4096, gate and up 11008x4096, down 4096x11008; 32 layers (6.48 B
weights). The weights are generated on the device first (fp16, std 0.02), then matrices of
equal shape are quantized together (``hqq.quantize_stacked``) in chunks of about
``--chunk-weights`` weights. Times are taken after a warm-up that compiles every chunk shape.
Errors are over all weights, next to the min-max round-to-nearest start on the same grid (HQQ
with 0 iterations). Issue 3: the reference library needs 4.3 s (4-bit g64 axis 1) and 2.5 s
(2-bit g16 axis 0) on an H100; ``--reference`` times it here instead (torch + hqq on CUDA; run
it as its own invocation so the two frameworks do not compete for GPU memory).

    python scripts/bench_hqq.py --json hqq.json                   # Llama-2-7B shapes, on the GPU
    python scripts/bench_hqq.py --reference --json hqq_ref.json   # the hqq package, same shapes
    JAX_PLATFORMS=cpu python scripts/bench_hqq.py --shape tiny    # a quick check on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SHAPES = {"llama2-7b": (4096, 11008, 32), "tiny": (256, 512, 2)}  # hidden, intermediate, layers
SETTINGS = {"4b-g64-axis1": dict(bits=4, group_size=64, axis=1),
            "2b-g16-axis0": dict(bits=2, group_size=16, axis=0)}
VARIANTS = {"hqq": {}, "hqq-zero-only": dict(refine_scale=False), "rtn-minmax": dict(iters=0)}


def layer_shapes(hidden: int, inter: int, layers: int) -> dict[tuple[int, int], int]:
    """``[out, in]`` shape -> number of matrices of that shape in the model."""
    return {(hidden, hidden): 4 * layers, (inter, hidden): 2 * layers, (hidden, inter): layers}


def chunk_count(n: int, size: int, chunk_weights: int) -> int:
    """The largest divisor of ``n`` whose chunk holds at most ``chunk_weights`` (at least 1)."""
    return max(k for k in range(1, n + 1) if n % k == 0 and (k == 1 or k * size <= chunk_weights))


def memory(device) -> dict[str, float]:
    stats = device.memory_stats() or {}
    return {k: stats[k] / 2**30 for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def run_jaxquant(args, shapes) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxquant.methods.hqq as hqq

    device = jax.devices()[0]
    dtype = jnp.dtype(args.dtype)

    @jax.jit
    def error_sums(ws, qs):  # sum |W - W_hat| and sum (W - W_hat)^2 over a chunk
        d = ws.astype(jnp.float32) - jax.vmap(lambda q: q.dequantize())(qs)
        return jnp.sum(jnp.abs(d)), jnp.sum(d * d)

    gen = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape)).astype(dtype), static_argnums=1)
    key, chunks = jax.random.key(args.seed), []  # [(stacked weights [k, out, in])]
    for shape, n in shapes.items():
        k = chunk_count(n, shape[0] * shape[1], args.chunk_weights)
        for _ in range(n // k):
            key, sub = jax.random.split(key)
            chunks.append(gen(sub, (k, *shape)))
    jax.block_until_ready(chunks)
    n_weights = sum(c.size for c in chunks)
    out = {"device": str(device), "jax": jax.__version__, "dtype": args.dtype, "weights": n_weights,
           "chunks": [list(c.shape) for c in chunks], "memory_after_weights_gib": memory(device),
           "results": []}
    print(f"{n_weights / 1e9:.3f} B weights in {len(chunks)} chunks on {device}; "
          f"memory {memory(device)}", flush=True)

    for setting in args.settings:
        for variant in args.variants:
            cfg = hqq.HQQConfig(**SETTINGS[setting], **VARIANTS[variant])
            seen = set()
            for c in chunks:  # warm-up: compile every chunk shape once
                if c.shape not in seen:
                    seen.add(c.shape)
                    jax.block_until_ready(hqq.quantize_stacked(c, cfg))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                qs = [hqq.quantize_stacked(c, cfg) for c in chunks]
                jax.block_until_ready(qs)
                times.append(time.perf_counter() - start)
            sums = np.zeros(2)
            for c, q in zip(chunks, qs):
                sums += np.asarray(error_sums(c, q), np.float64)
            bpw = hqq.unstack(qs[0])[0].bits_per_weight
            del qs
            row = {"setting": setting, "variant": variant, "config": repr(cfg), "seconds": min(times),
                   "all_seconds": times, "mae": sums[0] / n_weights, "mse": sums[1] / n_weights,
                   "bits_per_weight": bpw, "memory_gib": memory(device)}
            out["results"].append(row)
            print(f"  {setting} {variant}: {row['seconds']:.3f} s  mse {row['mse']:.4g}", flush=True)
    for row in out["results"]:
        base = next(r for r in out["results"] if r["setting"] == row["setting"] and r["variant"] == "rtn-minmax") \
            if "rtn-minmax" in args.variants else None
        row["mse_vs_rtn"] = row["mse"] / base["mse"] if base else None
        row["mae_vs_rtn"] = row["mae"] / base["mae"] if base else None
    return out


def run_reference(args, shapes) -> dict:
    """The hqq package on CUDA torch, fp16 weights already on the GPU, one matrix at a time."""
    import torch
    from hqq.core.quantize import Quantizer

    if not torch.cuda.is_available() and not args.reference_cpu:
        raise SystemExit("--reference needs CUDA torch (or --reference-cpu for a tiny check)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    weights = {shape: [(0.02 * torch.randn(shape, device=dev)).to(dtype) for _ in range(n)]
               for shape, n in shapes.items()}
    n_weights = sum(w.numel() for ws in weights.values() for w in ws)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": args.dtype, "weights": n_weights, "results": []}
    for setting in args.settings:
        s = SETTINGS[setting]
        kw = dict(nbits=s["bits"], channel_wise=True, group_size=s["group_size"], optimize=True,
                  round_zero=s["bits"] == 4, axis=s["axis"], compute_dtype=dtype, device=dev)
        for ws in weights.values():  # warm-up
            Quantizer.quantize(ws[0], bitpack=True, **kw)
        sync()
        start = time.perf_counter()
        for ws in weights.values():
            for w in ws:
                Quantizer.quantize(w, bitpack=True, **kw)
        sync()
        seconds = time.perf_counter() - start
        abs_sum = sq_sum = count = 0.0  # errors on the first matrix of each shape
        for ws in weights.values():
            w_q, meta = Quantizer.quantize(ws[0], bitpack=False, **kw)
            w_hat = ((w_q.float() - meta["zero"].to(dtype).float()) * meta["scale"].to(dtype).float())
            d = ws[0].float() - w_hat.reshape(ws[0].shape)
            abs_sum += float(d.abs().sum()); sq_sum += float((d * d).sum()); count += d.numel()
        row = {"setting": setting, "variant": "hqq-package", "seconds": seconds,
               "mae_sample": abs_sum / count, "mse_sample": sq_sum / count,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
        out["results"].append(row)
        print(f"  {setting} hqq package: {seconds:.3f} s", flush=True)
    return out


def print_table(out: dict) -> None:
    print(f"\n{out['weights'] / 1e9:.3f} B weights, {out['dtype']}, {out['device']}")
    print(f"{'setting':14s} {'variant':14s} {'seconds':>8s} {'Gw/s':>7s} {'bpw':>6s} {'mae':>10s} "
          f"{'mse':>10s} {'mse/rtn':>8s} {'peak GiB':>9s}")
    for r in out["results"]:
        mae, mse = r.get("mae", r.get("mae_sample")), r.get("mse", r.get("mse_sample"))
        peak = r.get("memory_gib", {}).get("peak_bytes_in_use", r.get("peak_memory_gib"))
        ratio = r.get("mse_vs_rtn")
        print(f"{r['setting']:14s} {r['variant']:14s} {r['seconds']:8.3f} "
              f"{out['weights'] / r['seconds'] / 1e9:7.2f} {r.get('bits_per_weight', float('nan')):6.3f} "
              f"{mae:10.4g} {mse:10.4g} {ratio if ratio is not None else float('nan'):8.4f} "
              f"{peak if peak is not None else float('nan'):9.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--chunk-weights", type=int, default=1 << 28, help="weights per stacked call")
    p.add_argument("--repeats", type=int, default=2, help="timed passes (the best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true", help="time the hqq package instead")
    p.add_argument("--reference-cpu", action="store_true", help="allow --reference on CPU torch")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    shapes = layer_shapes(*SHAPES[args.shape])
    if args.reference:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # leave the GPU to torch
        out = run_reference(args, shapes)
    else:
        out = run_jaxquant(args, shapes)
    out.update(shape=args.shape, argv=sys.argv[1:])
    print_table(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
