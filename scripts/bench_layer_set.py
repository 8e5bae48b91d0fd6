"""Time the Hessian-aware methods on one Llama-2-7B-shaped decoder block (random weights, Hessians).

Layers: q, k, v, o (4096×4096), gate, up (11008×4096), down (4096×11008); q/k/v share one
Hessian, gate/up another, o and down have their own (REFERENCE §1). Each method quantizes the
whole layer set twice: the first pass includes compilation ("cold"), the second is "warm".
Prints a table and, with ``--json PATH``, writes the numbers. ``--shape tiny`` is a CPU check.

    python scripts/bench_layer_set.py --methods quip#-2 qtip-hyb-2 --json OUT.json   # GPU
    JAX_PLATFORMS=cpu python scripts/bench_layer_set.py --shape tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxquant.methods import gptq, gptvq, ldlq, qtip, quip_sharp  # noqa: E402
from jaxquant.quant import quantize_weight  # noqa: E402

SHAPES = {  # (hidden, intermediate)
    "7b": (4096, 11008),
    "tiny": (256, 512),
}


def methods(tiny: bool):
    iters = 10 if tiny else 100
    return {
        "gptq-4b-g128": gptq.GPTQConfig(bits=4, group_size=128),
        "gptq-2b-g128": gptq.GPTQConfig(bits=2, group_size=128),
        "gptvq-2d-2.125": gptvq.GPTVQConfig(bits=2, vq_dim=2, group_size=256, tile_size=2048,
                                            kmeans_iters=iters),
        **{f"quip#-{b}": quip_sharp.QuIPSharpConfig(bits=b) for b in (2, 3, 4)},
        **{f"qtip-{c}-{b}": qtip.QTIPConfig(bits=b, code=c) for c in ("hyb", "1mad") for b in (2, 3, 4)},
    }


def random_hessian(key, n):
    """``XᵀX / m`` with correlated, unevenly scaled inputs, like an activation second moment."""
    k1, k2, k3 = jax.random.split(key, 3)
    m = 2 * n
    mix = jnp.eye(n) + 2.0 * jax.random.normal(k2, (n, n)) / jnp.sqrt(n)
    X = jax.random.normal(k1, (m, n)) @ mix * jnp.exp(0.5 * jax.random.normal(k3, (n,)))
    return jnp.matmul(X.T, X, precision=jax.lax.Precision.HIGHEST) / m


def layer_set(key, hidden, inter):
    keys = jax.random.split(key, 11)
    H = {"qkv": random_hessian(keys[0], hidden), "o": random_hessian(keys[1], hidden),
         "up": random_hessian(keys[2], hidden), "down": random_hessian(keys[3], inter)}
    shapes = {"q": ((hidden, hidden), "qkv"), "k": ((hidden, hidden), "qkv"),
              "v": ((hidden, hidden), "qkv"), "o": ((hidden, hidden), "o"),
              "gate": ((inter, hidden), "up"), "up": ((inter, hidden), "up"),
              "down": ((hidden, inter), "down")}
    layers = {}
    for i, (name, (shape, h)) in enumerate(shapes.items()):
        layers[name] = (0.02 * jax.random.normal(keys[4 + i], shape), H[h])
    return jax.block_until_ready(layers)


def run(cfg, layers, key):
    times, losses, bpw = {}, {}, {}
    for name, (W, H) in layers.items():
        t = time.perf_counter()
        qw = quantize_weight(W, cfg, hessian=H, key=key, name=name)
        jax.block_until_ready(qw)
        times[name] = time.perf_counter() - t
        W_hat = qw.dequantize()
        losses[name] = ldlq.proxy_loss(W, W_hat, H) / ldlq.proxy_loss(W, jnp.zeros_like(W), H)
        bpw[name] = qw.bits_per_weight
    return times, losses, bpw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--methods", nargs="*", help="subset of: " + ", ".join(methods(False)))
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    hidden, inter = SHAPES[args.shape]
    all_methods = methods(args.shape == "tiny")
    chosen = args.methods or list(all_methods)
    key = jax.random.key(0)
    layers = layer_set(key, hidden, inter)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"shape {args.shape}: hidden {hidden}, intermediate {inter}")
    results = []
    header = f"{'method':<16} {'bpw':>7} {'cold s':>8} {'warm s':>8} " + " ".join(
        f"{n:>7}" for n in layers) + "  rel. proxy loss (mean)"
    print(header)
    for name in chosen:
        cfg = all_methods[name]
        cold, _, _ = run(cfg, layers, key)
        warm, losses, bpw = run(cfg, layers, key)
        total_w = sum(W.size for W, _ in layers.values())
        mean_bpw = sum(bpw[n] * layers[n][0].size for n in layers) / total_w
        mean_loss = sum(losses.values()) / len(losses)
        print(f"{name:<16} {mean_bpw:>7.4f} {sum(cold.values()):>8.2f} {sum(warm.values()):>8.2f} "
              + " ".join(f"{warm[n]:>7.2f}" for n in layers) + f"  {mean_loss:.4g}")
        results.append({"method": name, "config": dataclasses.asdict(cfg),
                        "bits_per_weight": mean_bpw, "cold_s": sum(cold.values()),
                        "warm_s": sum(warm.values()), "cold_per_layer_s": cold,
                        "warm_per_layer_s": warm, "relative_proxy_loss": losses})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "host": platform.node(), "shape": args.shape, "hidden": hidden, "intermediate": inter,
            "results": results}, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
