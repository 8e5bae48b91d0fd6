"""Perplexity of a model in full precision and under quantization recipes; prints a table, writes JSON.

Example (the issue-2 benchmark: SmolLM2, full wiki.test.raw, ctx 2048):
    python scripts/bench_perplexity.py --data-file ../shared/data/wikitext-2/wiki.test.raw \
        --recipes fp rtn:8:128 rtn:4:128 rtn:3:128 rtn:2:128 --json results/ppl_smollm2_rtn.json

A recipe is ``fp``, ``METHOD:BITS:GROUP`` (group ``none`` = per channel) or ``METHOD:key=value,...``
(e.g. ``gptvq:bits=2,vq_dim=2,tile_size=2048``). Hessian methods calibrate on ``--calib-tokens-file``
or ``--calib-file`` (``--calib-samples`` windows of ``--calib-ctx``). Results are written after every
recipe, so an interrupted run keeps what it finished; rerunning skips finished recipes.
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

from jaxquant import data
from jaxquant.evaluate import perplexity
from jaxquant.methods import METHODS, config_to_dict
from jaxquant.model.load import load_model, load_tokenizer
from jaxquant.pipeline import quantize_model
from jaxquant.report import summarize


def parse_recipe(text: str):
    if text == "fp":
        return None
    method, _, rest = text.partition(":")
    if "=" not in rest:
        bits, group = rest.split(":")
        return METHODS[method].config(bits=int(bits), group_size=None if group == "none" else int(group))
    options = {}
    for item in rest.split(","):
        key, value = item.split("=")
        options[key] = None if value == "none" else json.loads(value.lower()) if value.lower() in ("true", "false") \
            else (float(value) if "." in value else int(value)) if value.lstrip("-").replace(".", "").isdigit() else value
    return METHODS[method].config(**options)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-file", help="evaluation text (tokenized with the model's tokenizer)")
    p.add_argument("--tokens-file", help="pre-tokenized text (.npy of int32), instead of --data-file")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--recipes", nargs="+", default=["fp", "rtn:4:128", "rtn:3:128", "rtn:2:128"])
    p.add_argument("--calib-file", help="calibration text for Hessian methods")
    p.add_argument("--calib-tokens-file", help="pre-tokenized calibration text (.npy)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-ctx", type=int, default=2048)
    p.add_argument("--json", required=True, help="results file (updated after each recipe)")
    args = p.parse_args(argv)

    out = pathlib.Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("meta", {}).update(calibration=args.calib_tokens_file or args.calib_file,
                                          calib_samples=args.calib_samples, calib_ctx=args.calib_ctx,
        model=args.model, data=args.data_file or args.tokens_file, ctx=args.ctx, device=str(jax.devices()[0].device_kind),
        platform=platform.platform(), python=platform.python_version(), jax=jax.__version__,
        command=" ".join(sys.argv))
    rows = results.setdefault("rows", {})
    model = load_model(args.model)
    if args.tokens_file:
        tokens = np.load(args.tokens_file)
    else:
        tokens = data.tokenize(load_tokenizer(args.model), data.load_text(args.data_file))
    windows = data.eval_windows(tokens, args.ctx, args.max_windows)
    calibration = None
    if args.calib_tokens_file or args.calib_file:
        calib_tokens = np.load(args.calib_tokens_file) if args.calib_tokens_file else \
            data.tokenize(load_tokenizer(args.model), data.load_text(args.calib_file))
        calibration = data.calibration_windows(calib_tokens, args.calib_samples, args.calib_ctx, seed=0)
    for recipe in args.recipes:
        if recipe in rows:
            continue
        cfg = parse_recipe(recipe)
        start = time.perf_counter()
        m = model if cfg is None else quantize_model(model, cfg, calibration=calibration)
        quant_s = time.perf_counter() - start
        res = perplexity(m, windows, progress=lambda d, n: print(f"\r{recipe}: {d}/{n}", end="", file=sys.stderr))
        print(file=sys.stderr)
        res.update(recipe=recipe, config=None if cfg is None else config_to_dict(cfg), quantize_s=quant_s,
                   bits_per_weight=summarize(m)["bits_per_weight"] if cfg else 32.0,  # fp: float32 weights (decoded from the GGUF)
                   eval_tokens_per_s=windows.size / (time.perf_counter() - start - quant_s))
        rows[recipe] = res
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(f"{'recipe':<12} {'bits/w':>7} {'ppl':>9} {'windows':>8}")
    for r in rows.values():
        print(f"{r['recipe']:<12} {r['bits_per_weight']:>7.3f} {r['ppl']:>9.4f} {r['windows']:>8}")


if __name__ == "__main__":
    main()
