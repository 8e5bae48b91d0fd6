"""Hessian collection throughput on 1, 2, 4 ... local devices, against a bf16 matmul rate measured in the same run.

    python scripts/bench_hessian.py --shape llama2-7b --layers 4 --ctx 4096 --devices 1 2 4 \\
        --json results/hessian_bench_<device>.json
    python scripts/bench_hessian.py --cpu-devices 8 --shape smollm2-135m --layers 2 --ctx 128 --devices 1 2 8  # CPU check

Offline (QuIP#-style) collection of a random model of a preset's shape: per block, one forward pass of
all calibration windows gives the inputs of the four linear groups (qkv, o, up, down); their
Σ x xᵀ accumulate data-parallel over the devices (``jaxquant.hessian.collect_block``). Strong scaling:
the same ``--windows`` on every device count, so the n-device Hessians are compared with the
1-device ones (max |ΔH| / max |H| and the fraction of bit-identical entries).

FLOPs counted per token and block: the linear layers (2·in·out each), causal attention
(QKᵀ and PV over T/2 keys on average: 2·T·heads·head_dim) and the four x xᵀ (2·d² each, the full
square as computed). Timing covers the L blocks after a compile warm-up, Hessians left on the
devices (disk writes are not part of it); ``fwd tok/s`` times the same blocks without Hessians.
First, an accuracy probe: ``moments`` of 2^20 bf16 tokens with a large mean against fp64, for several
tokens-per-partial (the accumulation inside a partial is the device's matmul; across partials TwoSum).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time


def matmul_rate(n: int, dtype, repeats: int = 10) -> float:
    """FLOP/s of an n×n×n matmul on the default device (bf16 in, fp32 accumulation, bf16 out)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            c = f(a, b)
        c.block_until_ready()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def accuracy_probe(n: int, d: int = 256, chunks=(64, 256, 1024, 4096, 16384)) -> list[dict]:
    """Relative error against fp64 of ``moments`` on one device, for bf16 activations with a large mean:
    the products' accumulation inside each partial (tensor cores on a GPU) is what ``chunk_tokens`` bounds;
    ``chunk = n`` is one uncompensated matmul over all tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant import hessian as hz

    key = jax.random.key(7)
    mean = jax.random.uniform(jax.random.fold_in(key, 1), (d,), minval=50, maxval=200)
    scale = jax.random.uniform(jax.random.fold_in(key, 2), (d,), minval=0.5, maxval=20)
    x = (mean + scale * jax.random.normal(key, (n, d))).astype(jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref = x64.T @ x64 / n
    mesh = hz.make_mesh(jax.local_devices()[:1])
    out = []
    for chunk in (*chunks, n):
        h = np.asarray(hz.moments(x, mesh=mesh, chunk_tokens=chunk).matrix, np.float64)
        out.append({"chunk_tokens": chunk, "max_rel_err": float(np.abs(h - ref).max() / np.abs(ref).max()),
                    "diag_rel_err": float(np.abs(np.diagonal(h) / np.diagonal(ref) - 1).max())})
    return out


def flops_per_token(cfg, ctx: int) -> dict[str, float]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    linear = 2 * d * (q + 2 * kv) + 2 * q * d + 2 * 2 * d * f + 2 * f * d
    attention = 2 * ctx * q  # causal: QKᵀ and PV over (ctx + 1) / 2 keys on average
    hessian = 2 * (d * d + q * q + d * d + f * f)
    return {"linear": linear, "attention": attention, "hessian": hessian, "total": linear + attention + hessian}


def run(model, tokens, devices, *, batch_per_device: int, rows: int, attention: str, chunk_tokens: int,
        keep: bool):
    """(seconds, forward-only seconds, {(block, group): H on host} or None) for one device set."""
    import jax
    import jax.numpy as jnp

    from jaxquant import hessian as hz
    from jaxquant.model.llama import rope_frequencies

    cfg = model.config
    mesh = hz.make_mesh(devices, rows=rows)
    positions, inv_freq = jnp.arange(tokens.shape[1]), rope_frequencies(cfg)
    widths = hz.group_widths(cfg)
    fn = hz.block_inputs_fn(attention)

    def fresh():
        return hz.batches_from_tokens(model, tokens, mesh, batch_per_device * mesh.size)

    warm = fresh()  # compile: one step of each function on block 0
    warm.data, warm.masks = warm.data[:1], warm.masks[:1]
    warm.masks[0][:] = 1
    stats = hz.collect_block(model.layers[0], warm, positions, inv_freq, fn, widths, forward=True,
                             chunk_tokens=chunk_tokens, check=False)
    hz.forward_block(model.layers[0], warm, positions, inv_freq, fn)
    jax.block_until_ready((stats["down"].matrix, warm.data))
    del warm, stats

    batches = fresh()
    jax.block_until_ready(batches.data)
    start = time.perf_counter()
    results = []
    for layer in model.layers:
        results.append(hz.collect_block(layer, batches, positions, inv_freq, fn, widths, forward=True,
                                        chunk_tokens=chunk_tokens))
    jax.block_until_ready(([s.matrix for r in results for s in r.values()], batches.data))
    seconds = time.perf_counter() - start
    host = {(i, g): s.numpy()[0] for i, r in enumerate(results) for g, s in r.items()} if keep else None
    del results, batches

    batches = fresh()
    jax.block_until_ready(batches.data)
    start = time.perf_counter()
    for layer in model.layers:
        hz.forward_block(layer, batches, positions, inv_freq, fn)
    jax.block_until_ready(batches.data)
    forward = time.perf_counter() - start
    return seconds, forward, host


def compare(ref: dict, got: dict) -> dict:
    import numpy as np

    worst, same, total = 0.0, 0, 0
    for key, h in ref.items():
        g = got[key]
        worst = max(worst, float(np.abs(g - h).max() / np.abs(h).max()))
        same += int(np.count_nonzero(g == h))
        total += h.size
    return {"max_rel_diff": worst, "bit_identical_fraction": same / total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", help="preset of jaxquant.model.shapes (default llama2-7b)")
    p.add_argument("--layers", type=int, default=4, help="blocks to run (default 4; the preset's count for all)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 1, 2, 4 ... all)")
    p.add_argument("--windows", type=int, default=None, help="calibration windows, the same for every device count "
                                                             "(default 16 per device of the largest count)")
    p.add_argument("--batch-per-device", type=int, default=2, help="windows per device per step (default 2)")
    p.add_argument("--rows", type=int, default=1, help="split each Hessian's rows over groups of N devices")
    p.add_argument("--attention", default="auto", choices=["auto", "model", "cudnn", "xla"])
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per fp32 partial (default one step's)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the reference n×n×n matmul (default 8192, CPU 512)")
    p.add_argument("--probe-tokens", type=int, default=None, help="tokens of the accuracy probe (default 2^20, CPU 2^16)")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate N CPU devices (checks on a CPU machine)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np

    from jaxquant import hessian as hz
    from jaxquant.model.shapes import PRESETS, random_model

    local = jax.local_devices()
    platform_name = local[0].platform
    counts = args.devices or [n for n in (1, 2, 4, 8, 16) if n <= len(local)]
    counts = [n for n in counts if n <= len(local)]
    dtype = args.dtype or ("float32" if platform_name == "cpu" else "bfloat16")
    rate = matmul_rate(args.matmul_size or (512 if platform_name == "cpu" else 8192), jnp.bfloat16)
    cfg = PRESETS[args.shape]
    model = random_model(args.shape, dtype=dtype, num_layers=args.layers)
    windows = args.windows or 16 * max(counts)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (windows, args.ctx), dtype=np.int32)
    attention = hz.choose_attention(model.config, dtype, args.ctx, args.attention)
    chunk = args.chunk_tokens or args.batch_per_device * args.ctx
    flops = flops_per_token(model.config, args.ctx)
    layers, full = model.config.num_hidden_layers, cfg.num_hidden_layers
    probe = accuracy_probe(args.probe_tokens or (1 << 16 if platform_name == "cpu" else 1 << 20))
    print("accumulation error vs fp64 (bf16, large mean), by tokens per partial: " +
          ", ".join(f"{p['chunk_tokens']}: {p['max_rel_err']:.1e}" for p in probe), flush=True)
    print(f"{args.shape} x {layers} of {full} blocks, ctx {args.ctx}, {windows} windows, {dtype}, attention {attention}, "
          f"{jax.device_count()} devices ({local[0].device_kind}); bf16 matmul {rate / 1e12:.1f} TFLOP/s; "
          f"{flops['total'] / 1e9:.2f} GFLOP per token and block", flush=True)
    header = (f"{'devices':>7} {'tokens/s':>10} {f'{full}-block tok/s':>14} {'speedup':>7} {'TFLOP/s/dev':>11} "
              f"{'of matmul':>9} {'fwd tok/s':>9} {'max rel dH':>10} {'bit-equal':>9}")
    print(header)
    rows, ref = [], None
    for n in counts:
        seconds, forward, host = run(model, tokens, local[:n], batch_per_device=args.batch_per_device,
                                     rows=args.rows if n >= args.rows else 1, attention=attention,
                                     chunk_tokens=chunk, keep=True)
        tps = windows * args.ctx / seconds
        per_dev = flops["total"] * windows * args.ctx * layers / seconds / n
        row = dict(devices=n, seconds=seconds, tokens_per_s=tps, tokens_per_s_full_model=tps * layers / full,
                   forward_only_seconds=forward, tflops_per_device=per_dev / 1e12, fraction_of_matmul=per_dev / rate,
                   peak_bytes_device0=(local[0].memory_stats() or {}).get("peak_bytes_in_use"))
        if ref is None:
            ref, base = host, tps
            row.update(max_rel_diff=0.0, bit_identical_fraction=1.0)
        else:
            row.update(compare(ref, host))
        row["speedup"] = tps / base
        rows.append(row)
        del host
        print(f"{n:>7} {tps:>10.0f} {row['tokens_per_s_full_model']:>14.0f} {row['speedup']:>7.2f} "
              f"{row['tflops_per_device']:>11.1f} {row['fraction_of_matmul']:>9.1%} "
              f"{windows * args.ctx / forward:>9.0f} {row['max_rel_diff']:>10.1e} {row['bit_identical_fraction']:>9.1%}",
              flush=True)
    meta = dict(device=local[0].device_kind, platform=platform_name, devices_available=len(local), jax=jax.__version__,
                python=platform.python_version(), command=" ".join(sys.argv), shape=args.shape, layers=layers,
                ctx=args.ctx, windows=windows, batch_per_device=args.batch_per_device, rows=args.rows, dtype=dtype,
                attention=attention, chunk_tokens=chunk, matmul_flops_per_s=rate, flops_per_token_per_block=flops,
                accumulator=str(jnp.dtype(hz.accumulator_dtype())), accuracy_probe=probe)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
