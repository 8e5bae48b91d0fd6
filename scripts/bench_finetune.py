"""Fine-tuning benchmark: perplexity of 2-bit SmolLM2 before and after each fine-tuning stage.

Per method (QuIP#, QTIP, HQQ) and stage, the table gives Wiki2 perplexity, the stage's wall time and
peak memory (host RSS sampled during the stage; on a GPU also the device's peak bytes in use so far):

    quantized    no fine-tuning
    e2e          quantized, then end-to-end KL distillation (sign vectors, norms, untied lm_head)
    lora         HQQ+: rank-per-layer LoRA adapters on the quantized model, trained by distillation
    block        quantized with block fine-tuning after every linear group (QuIP# §5)
    block+e2e    both

Small CPU run (minutes for HQQ; QuIP# quantization takes ~10+ minutes there):
    python scripts/bench_finetune.py --methods hqq quip# --eval-windows 8 --devset 32 --ctx 512 \\
        --json results/finetune_smollm2_cpu.json
The devset (calibration windows for Hessians and fine-tuning) comes from --calib-file, evaluation
windows from --data-file or --tokens-file (``.npy`` int32). Results are written after every row and
finished rows are skipped on a rerun, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import threading
import time

import jax
import numpy as np

import jaxquant as jq
from jaxquant import data
from jaxquant.finetune import FinetuneConfig, add_lora, finetune_model, parse_lora_rules
from jaxquant.methods import config_to_dict, method_of
from jaxquant.model.load import load_model, load_tokenizer
from jaxquant.report import summarize

WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
STAGES = ("quantized", "e2e", "lora", "block", "block+e2e")


def method_config(method: str, args):
    if method == "quip#":
        return jq.QuIPSharpConfig(bits=2)
    if method == "qtip":
        return jq.QTIPConfig(bits=2, code="hyb")
    if method == "hqq":
        return jq.HQQConfig(bits=2, group_size=args.hqq_group_size)
    raise SystemExit(f"unknown method {method!r}")


class PeakMemory:
    """Peak host RSS while the block runs (sampled), and the device's peak bytes in use so far."""

    def __enter__(self):
        self.peak_rss, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_rss = max(self.peak_rss, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        stats = jax.devices()[0].memory_stats() or {}
        self.device_peak = stats.get("peak_bytes_in_use")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn):
    """(result, seconds, memory) of ``fn()`` (which returns host arrays or synchronizes itself)."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["quip#", "qtip", "hqq"], choices=["quip#", "qtip", "hqq"])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--data-file", default=str(WIKITEXT / "wiki.test.raw"), help="evaluation text")
    p.add_argument("--tokens-file", help="pre-tokenized evaluation text (.npy of int32), instead of --data-file")
    p.add_argument("--calib-file", default=str(WIKITEXT / "wiki.valid.tokens"), help="devset text")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window, evaluation and devset (default 2048)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate the first N windows (default all)")
    p.add_argument("--devset", type=int, default=256, help="devset windows, a random sample (default 256)")
    p.add_argument("--devset-ctx", type=int, default=None, help="tokens per devset window (default --ctx)")
    p.add_argument("--hqq-group-size", type=int, default=16, help="HQQ group size (default 16: 4 bits/weight with fp16 "
                                                                   "scale and zero, as HQQ+'s 2-bit runs)")
    p.add_argument("--lora-rules", default="self_attn=32,mlp=8", help="HQQ+ ranks (default HQQ+'s)")
    p.add_argument("--eval-batch", type=int, default=1)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name != "devset":
            p.add_argument(f"--ft-{f.name.replace('_', '-')}", dest=f"ft_{f.name}", default=f.default,
                           type=(lambda s: s.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default))
    p.add_argument("--json", required=True, help="results file (updated after each row)")
    args = p.parse_args(argv)

    ft = FinetuneConfig(devset=args.devset, **{f.name: getattr(args, f"ft_{f.name}")
                                               for f in dataclasses.fields(FinetuneConfig) if f.name != "devset"})
    out = pathlib.Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("meta", {}).update(
        model=args.model, ctx=args.ctx, eval_windows=args.eval_windows, devset=args.devset,
        devset_ctx=args.devset_ctx or args.ctx,
        data=args.tokens_file or args.data_file, calibration=args.calib_file, finetune=dataclasses.asdict(ft),
        lora_rules=args.lora_rules, hqq_group_size=args.hqq_group_size, device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(), platform=platform.platform(), python=platform.python_version(),
        jax=jax.__version__, command=" ".join(sys.argv),
        memory_note="peak_rss_gb: host RSS peak sampled during the stage; device_peak_gb: the device's peak so far")
    rows = results.setdefault("rows", {})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    tokens = np.load(args.tokens_file) if args.tokens_file else data.tokenize(tokenizer, data.load_text(args.data_file))
    windows = data.eval_windows(tokens, args.ctx, args.eval_windows)
    devset = data.calibration_windows(data.tokenize(tokenizer, data.load_text(args.calib_file)), args.devset,
                                      args.devset_ctx or args.ctx, seed=0)
    print(f"eval {windows.shape[0]} x {args.ctx} tokens; devset {devset.shape[0]} x {devset.shape[1]}", file=sys.stderr)

    def record(key, method, stage, qmodel, seconds, mem, history=None, config=None):
        res = jq.perplexity(qmodel, windows, batch_size=args.eval_batch)
        rows[key] = {**res, "method": method, "stage": stage, "config": config, "seconds": seconds,
                     "peak_rss_gb": mem.peak_rss / 2**30,
                     "device_peak_gb": None if mem.device_peak is None else mem.device_peak / 2**30,
                     "bits_per_weight": summarize(qmodel)["bits_per_weight"] if config else None,
                     "finetune": history and {k: history[k] for k in ("initial_valid", "best_valid", "steps", "epochs")}}
        save()
        print(f"{key:<22} ppl {res['ppl']:9.3f}  {seconds:8.1f} s", file=sys.stderr, flush=True)

    if "fp" not in rows:
        with PeakMemory() as mem:
            pass
        record("fp", "fp", "fp", model, 0.0, mem)
    for method in args.methods:
        cfg = method_config(method, args)
        calibration = devset if method_of(cfg).needs_hessian else None
        key = jax.random.key(0)
        config = config_to_dict(cfg)
        todo = [s for s in args.stages if f"{method} {s}" not in rows and (s != "lora" or method == "hqq")]
        if any(s in todo for s in ("quantized", "e2e", "lora")):
            qmodel, seconds, mem = timed(lambda: jq.quantize_model(model, cfg, calibration=calibration, key=key))
            if "quantized" in todo:
                record(f"{method} quantized", method, "quantized", qmodel, seconds, mem, config=config)
            if "e2e" in todo:
                (tuned, history), seconds, mem = timed(lambda: finetune_model(qmodel, model, devset, ft))
                record(f"{method} e2e", method, "e2e", tuned, seconds, mem, history, config)
            if "lora" in todo:
                lora_cfg = dataclasses.replace(ft, e2e_train="lora")
                adapted = add_lora(qmodel, 0, parse_lora_rules(args.lora_rules), key=key)
                (tuned, history), seconds, mem = timed(lambda: finetune_model(adapted, model, devset, lora_cfg))
                record(f"{method} lora", method, "lora", tuned, seconds, mem, history, config)
        if any(s in todo for s in ("block", "block+e2e")):
            qmodel, seconds, mem = timed(lambda: jq.quantize_model(model, cfg, calibration=devset, key=key, finetune=ft))
            if "block" in todo:
                record(f"{method} block", method, "block", qmodel, seconds, mem, config=config)
            if "block+e2e" in todo:
                (tuned, history), seconds, mem = timed(lambda: finetune_model(qmodel, model, devset, ft))
                record(f"{method} block+e2e", method, "block+e2e", tuned, seconds, mem, history, config)

    print(f"\n{'row':<22} {'bits/w':>7} {'ppl':>9} {'seconds':>9} {'peak RSS GB':>12}")
    for key, r in rows.items():
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-"
        print(f"{key:<22} {bits:>7} {r['ppl']:>9.3f} {r['seconds']:>9.1f} {r['peak_rss_gb']:>12.2f}")


if __name__ == "__main__":
    main()
