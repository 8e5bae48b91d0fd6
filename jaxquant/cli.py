"""The ``jaxquant`` command: a thin layer over the library, with progress bars.

Method options are generated from the config dataclasses of the registered methods, so a new
method brings its flags with it (``--bits``, ``--group-size``, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import typing

DEFAULT_MODEL = "smollm2-135m"


def _progress_bar(desc: str):
    from tqdm.auto import tqdm

    bars: dict = {}

    def update(*args):
        stage, done, total = args if len(args) == 3 else (desc, *args)
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


# --- method options from config dataclasses --------------------------------------------------

def _method_fields() -> dict[str, tuple[type, list[str]]]:
    """option -> (type, ["method (default): comment", ...]) over all registered configs."""
    from jaxquant.methods import METHODS

    fields: dict[str, tuple[type, list[str]]] = {}
    for name, method in METHODS.items():
        hints = typing.get_type_hints(method.config)
        docs = _field_comments(method.config)
        for f in dataclasses.fields(method.config):
            kind = _scalar_type(hints[f.name])
            note = f"{name} (default {f.default})" + (f": {docs[f.name]}" if f.name in docs else "")
            fields.setdefault(f.name, (kind, []))[1].append(note)
    return fields


def _field_comments(cls) -> dict[str, str]:
    """The ``# comment`` after each field of a config dataclass: its flag's documentation."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}


def _scalar_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for t in (bool, int, float, str):
        if t in args:
            return t
    return str


def _parse_value(kind: type, text: str):
    if text.lower() in ("none", "null"):
        return None
    if kind is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if kind in (int, float):  # one flag can be int for one method and float for another (--bits 1.58)
        try:
            return int(text)
        except ValueError:
            return float(text)
    return kind(text)


COMMAND_OPTIONS = {"seed"}  # config fields set by a flag every quantizing command already has


def add_method_args(p: argparse.ArgumentParser) -> None:
    from jaxquant.methods import METHODS

    p.add_argument("--method", default="rtn", choices=sorted(METHODS), help="quantization method (default rtn)")
    group = p.add_argument_group("method options (each applies to the methods named)")
    for name, (kind, methods) in sorted(_method_fields().items()):
        if name in COMMAND_OPTIONS:
            continue  # the command's own flag (e.g. --seed) feeds the method's field of that name
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", default=None, metavar=kind.__name__.upper(),
                           type=lambda s, k=kind: _parse_value(k, s), help="; ".join(methods))


def config_from_args(args) -> typing.Any:
    from jaxquant.methods import METHODS

    config_cls = METHODS[args.method].config
    names = {f.name for f in dataclasses.fields(config_cls)}
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    given.update({k: getattr(args, k) for k in COMMAND_OPTIONS & names if getattr(args, k, None) is not None})
    foreign = sorted(set(given) - names)
    if foreign:
        raise SystemExit(f"error: --{', --'.join(n.replace('_', '-') for n in foreign)} "
                         f"not an option of method {args.method}")
    try:
        return config_cls(**given)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def rules_from_args(args):
    from jaxquant.methods import config_from_dict
    from jaxquant.pipeline import Rule

    rules = [Rule(pattern, None) for pattern in (args.keep or [])]
    if args.rules:
        for entry in json.loads(open(args.rules).read()):
            cfg = entry.get("config")
            rules.append(Rule(entry["pattern"], None if cfg is None else config_from_dict(cfg)))
    return rules


# --- fine-tuning options (issue 9): --ft-* flags from FinetuneConfig's fields ---------------------

def _loss_bar():
    """Progress bars that also show what fine-tuning reports (a fourth argument: loss, held-out)."""
    from tqdm.auto import tqdm

    bars: dict = {}

    def update(stage, done, total, metrics=None):
        bar = bars.get(stage)
        if bar is None or done < bar.n:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=metrics is None)
        if metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if v is not None}, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def add_finetune_args(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    from jaxquant.finetune import FinetuneConfig

    group = p.add_argument_group("fine-tuning (QuIP#/QTIP block and end-to-end, HQQ+ adapters); codes never change")
    if stages:
        group.add_argument("--finetune-block", action="store_true",
                           help="after each linear group of a block is quantized, train the block's continuous parameters "
                                "(sign vectors, scales, zeros, tables, norms, linears not yet quantized) to reproduce the "
                                "original block on the calibration windows (QuIP#'s fine-tuning)")
        group.add_argument("--finetune-e2e", action="store_true",
                           help="after quantization, distill the whole model from the original one (KL to its soft targets "
                                "on the calibration windows); trains --ft-e2e-train")
    group.add_argument("--lora-rank", type=int, default=0,
                       help="HQQ+: a LoRA adapter of this rank on every quantized linear, trained by end-to-end "
                            "distillation (implies --finetune-e2e; default 0: none)")
    group.add_argument("--lora-rules", default="", metavar="REGEX=RANK,...",
                       help="per-layer adapter ranks overriding --lora-rank, first match wins, e.g. "
                            "'self_attn=32,mlp=8' (HQQ+'s); rank 0 = no adapter")
    group.add_argument("--merge-lora", action="store_true",
                       help="save adapted layers merged into dense full-precision weights instead of base + adapter")
    hints = typing.get_type_hints(FinetuneConfig)
    docs = _field_comments(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        kind = _scalar_type(hints[f.name])
        group.add_argument(f"--ft-{f.name.replace('_', '-')}", dest=f"ft_{f.name}", default=None,
                           metavar=kind.__name__.upper(), type=lambda s, k=kind: _parse_value(k, s),
                           help=f"{docs.get(f.name, '')} (default {f.default})")


def finetune_config_from_args(args):
    from jaxquant.finetune import FinetuneConfig

    given = {f.name: getattr(args, f"ft_{f.name}") for f in dataclasses.fields(FinetuneConfig)
             if getattr(args, f"ft_{f.name}", None) is not None}
    try:
        return FinetuneConfig(**given)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def _finetune_end_to_end(args, qmodel, model, windows, ft):
    """HQQ+ adapters (when asked) and end-to-end distillation; returns the model and the held-out KLs."""
    import jax

    from jaxquant.finetune import add_lora, finetune_model, merge_lora, parse_lora_rules

    if args.lora_rank or args.lora_rules:
        qmodel = add_lora(qmodel, args.lora_rank, parse_lora_rules(args.lora_rules), key=jax.random.key(args.seed))
    start = time.perf_counter()
    qmodel, history = finetune_model(qmodel, model, windows, ft, progress=_loss_bar())
    print(f"end-to-end fine-tuning: held-out KL {history['initial_valid']:.5f} -> {history['best_valid']:.5f} "
          f"nats/token in {history['steps']} steps, {time.perf_counter() - start:.1f} s")
    if args.merge_lora:
        qmodel = merge_lora(qmodel)
    return qmodel, {k: history[k] for k in ("initial_valid", "best_valid", "steps", "epochs")}


# --- commands ---------------------------------------------------------------------------------

def cmd_eval(args) -> dict:
    from jaxquant import data
    from jaxquant.evaluate import perplexity
    from jaxquant.model.load import load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    text, used = data.load_text_with_fallback(args.data_file)
    windows = data.eval_windows(data.tokenize(tokenizer, text), args.ctx, args.max_windows)
    start = time.perf_counter()
    result = perplexity(model, windows, batch_size=args.batch_size, progress=_progress_bar("eval"))
    seconds = time.perf_counter() - start
    result.update(model=str(args.model), data=used, seconds=seconds, tokens_per_s=windows.size / seconds)
    print(json.dumps(result) if args.json else
          f"perplexity {result['ppl']:.4f} on {used} ({result['windows']} windows x {args.ctx} tokens, "
          f"{result['tokens_per_s']:.0f} tokens/s)")
    return result


def _calibration(args, tokenizer):
    from jaxquant import data

    text, used = data.load_text_with_fallback(args.calib_file, default="wikitext2-valid")
    tokens = data.tokenize(tokenizer, text)
    return data.calibration_windows(tokens, args.calib_samples, args.calib_ctx, seed=args.seed), used


def cmd_quantize(args):
    import jax

    from jaxquant.checkpoint import save
    from jaxquant.hessian import stored_hessians
    from jaxquant.methods import config_to_dict, method_of
    from jaxquant.model.load import load_model, load_tokenizer
    from jaxquant.pipeline import quantize_model
    from jaxquant.report import summarize

    cfg = config_from_args(args)
    rules = rules_from_args(args)
    ft = finetune_config_from_args(args)
    e2e = args.finetune_e2e or args.lora_rank > 0 or bool(args.lora_rules)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    calibration = None
    hessians = stored_hessians(args.hessians) if args.hessians else None
    if (method_of(cfg).needs_hessian and hessians is None) or args.finetune_block or e2e:
        calibration, used = _calibration(args, tokenizer)
        print(f"calibration: {calibration.shape[0]} windows x {calibration.shape[1]} tokens from {used}")
    start = time.perf_counter()
    if args.fuse:
        from jaxquant.model.fuse import fuse_linears
        model = fuse_linears(model)
    qmodel = quantize_model(model, cfg, rules=rules, calibration=calibration, hessians=hessians,
                            key=jax.random.key(args.seed), finetune=ft if args.finetune_block else None,
                            progress=_loss_bar() if args.finetune_block else _progress_bar("quantize"))
    recipe = {"config": config_to_dict(cfg), "rules": [{"pattern": r.pattern, "config": r.config and config_to_dict(r.config)}
                                                       for r in rules], "source": str(args.model)}
    if args.finetune_block or e2e:
        recipe["finetune"] = {"config": dataclasses.asdict(ft), "block": args.finetune_block, "end_to_end": e2e,
                              "lora_rank": args.lora_rank, "lora_rules": args.lora_rules, "merged": args.merge_lora}
    if e2e:
        qmodel, recipe["finetune"]["end_to_end_kl"] = _finetune_end_to_end(args, qmodel, model, calibration, ft)
    summary = summarize(qmodel)
    print(f"quantized in {time.perf_counter() - start:.1f} s: {summary}")
    path = save(qmodel, args.out, tokenizer=tokenizer, recipe={**recipe, **summary})
    print(f"saved {path}")
    return qmodel, tokenizer


def cmd_finetune(args):
    from jaxquant.checkpoint import read_sidecar, save
    from jaxquant.model.load import load_model, load_tokenizer, resolve_source
    from jaxquant.report import summarize

    kind, path = resolve_source(args.model)
    if kind != "jaxquant":
        raise SystemExit(f"error: --model must be a jaxquant checkpoint, got {args.model}")
    qmodel, model, tokenizer = load_model(args.model), load_model(args.original), load_tokenizer(args.model)
    calibration, used = _calibration(args, tokenizer)
    print(f"devset: {calibration.shape[0]} windows x {calibration.shape[1]} tokens from {used}")
    ft = finetune_config_from_args(args)
    qmodel, kl = _finetune_end_to_end(args, qmodel, model, calibration, ft)
    recipe = read_sidecar(path).get("recipe", {})
    recipe["finetune_e2e"] = {"config": dataclasses.asdict(ft), "lora_rank": args.lora_rank, "lora_rules": args.lora_rules,
                              "merged": args.merge_lora, "original": str(args.original), "end_to_end_kl": kl}
    print(f"saved {save(qmodel, args.out, tokenizer=tokenizer, recipe={**recipe, **summarize(qmodel)})}")


def _available_memory() -> int:
    """Bytes of memory available now (Linux; 0 where unknown, which keeps weights packed)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def cmd_generate(args):
    import jax

    from jaxquant.formats.base import QuantizedWeight
    from jaxquant.generate import generate
    from jaxquant.model.load import load_model, load_tokenizer
    from jaxquant.model.params import model_from_params, named_params

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    params = named_params(model)
    dense = args.dense
    if dense is None:  # auto: decode once where no decode kernel runs and the float32 copy fits easily
        dense_bytes = sum(4 * math.prod(v.shape) for v in params.values() if isinstance(v, QuantizedWeight))
        dense = jax.default_backend() == "cpu" and 0 < dense_bytes <= _available_memory() // 2
        if dense:
            print(f"decoding the weights once into float32 ({dense_bytes / 2**20:.0f} MiB; no decode kernel on "
                  "the CPU; --no-dense keeps them packed)", file=sys.stderr)
    if dense:
        model = model_from_params(model.config, {n: v.dequantize() if isinstance(v, QuantizedWeight) else v
                                                 for n, v in params.items()})
    times = [time.perf_counter()]

    def stream(text):
        times.append(time.perf_counter())
        print(text, end="", flush=True)

    generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=stream)
    print()
    if len(times) > 2:  # the first token includes the prefill and both compilations
        rate = (len(times) - 2) / (times[-1] - times[1])
        print(f"{len(times) - 1} tokens; first after {times[1] - times[0]:.2f} s (prefill and compilation), "
              f"then {rate:.1f} tokens/s", file=sys.stderr)


def cmd_export(args):
    from jaxquant.checkpoint import read_sidecar
    from jaxquant.export import export_safetensors
    from jaxquant.model.load import load_model, load_tokenizer, resolve_source

    kind, path = resolve_source(args.model)
    recipe = read_sidecar(path).get("recipe") if kind == "jaxquant" else None
    out = export_safetensors(load_model(args.model), args.out, tokenizer=load_tokenizer(args.model), recipe=recipe)
    print(f"exported {out}")


def cmd_bench_codebook(args):
    """Gaussian MSE per weight of a codebook at its best scale (QuIP# / QTIP tables)."""
    if args.codebook.startswith("qtip-"):
        from jaxquant.codebooks.trellis_bench import gaussian_mse

        result = gaussian_mse(args.codebook, args.bits or 2, samples=args.samples, seed=args.seed)
    else:
        from jaxquant.codebooks.bench import gaussian_mse

        result = gaussian_mse(args.codebook, args.samples, args.seed)
    print(json.dumps(result) if args.json else
          f"{result['codebook']}: {result['bits']} bits, MSE {result['mse']:.5f} per weight "
          f"on {result['samples']} N(0,1) samples (seed {args.seed})")


def cmd_bench_tune(args):
    from jaxquant.formats import tuning

    runs = {}
    for source in args.source:
        try:
            runs[str(source)] = json.loads(pathlib.Path(source).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {source}: {e}")
    table = tuning.from_bench({"runs": runs})
    if not table["choices"]:
        raise SystemExit(f"error: {' '.join(args.source)}: no successful kernel rows to choose from")
    table["source"] = " + ".join(runs)
    path = tuning.write(table, args.out or tuning.TABLE)
    for key, backend in table["choices"].items():
        print(f"{key:<20} {backend}")
    print(f"wrote {path} ({table['device']})")


def cmd_bench_decode(args):
    """Decode tokens/s at each batch size, dense vs quantized, as a fraction of the bandwidth bound."""
    import platform
    import statistics

    import jax

    from jaxquant import decode_bench as db
    from jaxquant.model.load import load_model
    from jaxquant.model.params import model_from_params, named_params
    from jaxquant.model.shapes import random_model

    if args.model:
        dense, quantized = None, load_model(args.model)
    else:
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "float16")
        dense = random_model(args.shape, dtype=dtype, num_layers=args.layers)
        if args.fuse:
            from jaxquant.model.fuse import fuse_linears
            dense = fuse_linears(dense)
        quantized = db.quantize_shared(model_from_params(dense.config, named_params(dense)), config_from_args(args))
    bandwidth = db.copy_bandwidth(args.copy_bytes)
    rows = []
    for label, model in (("dense", dense), (args.method if not args.model else "checkpoint", quantized)):
        if model is None:
            continue
        nbytes = db.bytes_per_token(model)
        for batch in args.batch:
            windows = db.decode_speed(model, batch=batch, context=args.context, steps=args.steps,
                                      windows=args.windows)
            tps = statistics.median(windows)
            rows.append(dict(model=label, batch=batch, tokens_per_s=tps, tokens_per_s_windows=windows,
                             bytes_per_token=nbytes, bandwidth_fraction=tps / batch * nbytes / bandwidth))
            print(f"{label:<10} batch {batch:>3}: {tps:10.1f} tokens/s  {nbytes / 1e9:7.3f} GB/token  "
                  f"{100 * rows[-1]['bandwidth_fraction']:5.1f} % of the copy-bandwidth bound", flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
              "copy_bandwidth_GBps": bandwidth / 1e9, "shape": args.shape, "model": args.model, "fused": args.fuse,
              "command": " ".join(sys.argv), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def cmd_demo(args):
    """Fetch the default model, quantize it, compare perplexity, save, reload, generate."""
    import jax

    from jaxquant import data
    from jaxquant.checkpoint import load, save
    from jaxquant.evaluate import perplexity
    from jaxquant.generate import generate
    from jaxquant.methods import config_to_dict, method_of
    from jaxquant.model.load import load_model, load_tokenizer
    from jaxquant.pipeline import quantize_model
    from jaxquant.report import summarize

    print(f"[1/5] loading {args.model}")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    text, used = data.load_text_with_fallback(args.data_file)
    windows = data.eval_windows(data.tokenize(tokenizer, text), args.ctx, args.max_windows)
    print(f"[2/5] perplexity of the original model on {used} ({windows.shape[0]} windows x {args.ctx})")
    before = perplexity(model, windows, progress=_progress_bar("eval fp"))
    cfg = config_from_args(args)
    print(f"[3/5] quantizing with {config_to_dict(cfg)}")
    calibration = _calibration(args, tokenizer)[0] if method_of(cfg).needs_hessian else None
    qmodel = quantize_model(model, cfg, calibration=calibration, key=jax.random.key(args.seed),
                            progress=_progress_bar("quantize"))
    summary = summarize(qmodel)
    print(f"[4/5] saving to {args.out} and reloading")
    save(qmodel, args.out, tokenizer=tokenizer, recipe={"config": config_to_dict(cfg), **summary})
    qmodel = load(args.out)
    after = perplexity(qmodel, windows, progress=_progress_bar("eval quantized"))
    print(f"\nperplexity: original {before['ppl']:.3f} -> quantized {after['ppl']:.3f} "
          f"({summary['bits_per_weight']:.3f} bits per quantized weight, ctx {args.ctx}, {windows.shape[0]} windows)")
    print(f"[5/5] generating from the quantized model: {args.prompt!r}")
    generate(qmodel, tokenizer, args.prompt, args.max_new_tokens, chat=True,
             stream=lambda s: print(s, end="", flush=True))
    print()


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxquant", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(q, default=DEFAULT_MODEL):
        q.add_argument("--model", default=default, help=f"alias, GGUF file, HF/Flax folder or jaxquant checkpoint (default {default})")

    def calib_args(q):
        q.add_argument("--calib-file", help="calibration text (.txt/.jsonl/.parquet or wikitext2-valid/c4/builtin); "
                                           "default wikitext2-valid via datasets, else builtin")
        q.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
        q.add_argument("--calib-ctx", type=int, default=2048, help="tokens per calibration window (default 2048)")

    def eval_args(q, max_windows=None):
        q.add_argument("--data-file", help="evaluation text (.txt/.raw/.jsonl/.parquet, wikitext2, c4 or builtin); "
                                          "default wikitext2 via datasets, else builtin")
        q.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
        q.add_argument("--max-windows", type=int, default=max_windows, help=f"evaluate at most N windows (default {max_windows or 'all'})")

    q = sub.add_parser("eval", help="perplexity over non-overlapping windows")
    model_arg(q, None)
    eval_args(q)
    q.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    model_arg(q)
    q.add_argument("--out", required=True, help="output checkpoint folder (replaced atomically)")
    add_method_args(q)
    q.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up into one linear each before quantizing "
                   "(QuIP#: one RHT and scale per fused matrix, parts normalized apart; rules then name "
                   "self_attn.qkv_proj and mlp.gate_up_proj)")
    q.add_argument("--keep", action="append", metavar="REGEX", help="keep matching layers (e.g. 'mlp.down_proj') in full precision; repeatable")
    q.add_argument("--rules", metavar="JSON", help='per-layer rules file: [{"pattern": REGEX, "config": {"method": ..., ...} | null}, ...]')
    calib_args(q)
    q.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    add_finetune_args(q)
    q.set_defaults(fn=cmd_quantize)

    q = sub.add_parser("finetune", help="end-to-end fine-tuning (and HQQ+ adapters) of a quantized checkpoint "
                                        "against its original model")
    model_arg(q, None)
    q.add_argument("--original", required=True, help="the full-precision model the checkpoint was quantized from")
    q.add_argument("--out", required=True, help="output checkpoint folder (replaced atomically)")
    calib_args(q)
    q.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    add_finetune_args(q, stages=False)
    q.set_defaults(fn=cmd_finetune)

    q = sub.add_parser("generate", help="generate text with a KV cache")
    model_arg(q)
    q.add_argument("--prompt", required=True)
    q.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    q.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    q.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    q.add_argument("--dense", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the quantized weights once into float32 first: faster where no decode kernel runs, "
                        "at full-precision memory (default: on the CPU when that copy takes at most half the "
                        "available memory)")
    q.set_defaults(fn=cmd_generate)

    q = sub.add_parser("export", help="write a safetensors folder with an HF-style quantization_config")
    model_arg(q, None)
    q.add_argument("--out", required=True, help="output folder (replaced atomically)")
    q.set_defaults(fn=cmd_export)

    q = sub.add_parser("bench", help="benchmarks (see also scripts/)")
    bench = q.add_subparsers(dest="bench", required=True)
    q = bench.add_parser("codebook", help="MSE per weight of N(0,1) data at the best scale")
    q.add_argument("--codebook", required=True,
                   choices=["e8p", "e8p-rvq3", "e8p-rvq4", "qtip-1mad", "qtip-3inst", "qtip-hyb", "qtip-lut"])
    q.add_argument("--bits", type=int, default=None, help="bits per weight for qtip-* codes (default 2)")
    q.add_argument("--samples", type=int, default=1 << 16, help="number of Gaussian weights (default 65536)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(fn=cmd_bench_codebook)

    from jaxquant.model.shapes import PRESETS

    q = bench.add_parser("decode", help="decode tokens/s vs the memory-bandwidth bound (random weights of real shape)")
    q.add_argument("--model", help="a quantized checkpoint (default: a random model of --shape)")
    q.add_argument("--shape", default="llama2-7b", choices=sorted(PRESETS))
    q.add_argument("--layers", type=int, default=None, help="keep only N decoder blocks (quick checks)")
    q.add_argument("--dtype", default=None, help="dense weights and activations (default float16 on GPU, float32 on CPU)")
    q.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    q.add_argument("--context", type=int, default=128, help="tokens already in the KV cache (default 128)")
    q.add_argument("--steps", type=int, default=32, help="timed decode steps per window (default 32)")
    q.add_argument("--windows", type=int, default=3,
                   help="timed windows per model and batch; tokens/s is their median (default 3)")
    q.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up into one linear each (dense and "
                   "quantized alike): fewer, larger matvecs per block")
    q.add_argument("--copy-bytes", type=int, default=1 << 30, help="size of the bandwidth-probe copy (default 1 GiB)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", help="write the table here")
    add_method_args(q)
    q.set_defaults(fn=cmd_bench_decode)

    bench.add_parser("kernels", add_help=False,
                     help="decode-matvec and Hadamard kernels at Llama layer shapes against the fp16 matvec and a "
                          "device copy (jaxquant bench kernels --help: its options)")

    q = bench.add_parser("tune", help="refresh the kernel choice of backend='auto' from `jaxquant bench kernels` runs")
    q.add_argument("--from", dest="source", nargs="+", required=True,
                   help="results JSON files of `jaxquant bench kernels --json` (several: each backend's best time per "
                        "shape over all of them)")
    q.add_argument("--out", help="table to write (default: the one stored with the package)")
    q.set_defaults(fn=cmd_bench_tune)

    q = sub.add_parser("demo", help="fetch the default model, quantize, compare perplexity, save, generate")
    model_arg(q)
    eval_args(q, max_windows=4)
    add_method_args(q)
    calib_args(q)
    q.add_argument("--out", default="jaxquant-demo-checkpoint", help="checkpoint folder (default ./jaxquant-demo-checkpoint)")
    q.add_argument("--prompt", default="Name three uses of a paperclip.")
    q.add_argument("--max-new-tokens", type=int, default=40)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_demo)

    from jaxquant.hessian import add_cli as add_hessians_command

    add_hessians_command(sub)  # `jaxquant hessians`, and --hessians DIR on quantize
    return p


DEMO_DEFAULTS = {"bits": 4, "group_size": 64}  # applied where the chosen method has the option


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "kernels"]:  # its own parser (jaxquant/kernel_bench.py) takes the rest
        from jaxquant import kernel_bench

        return kernel_bench.main(argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from jaxquant.methods import METHODS

        fields = {f.name for f in dataclasses.fields(METHODS[args.method].config)}
        for name, value in DEMO_DEFAULTS.items():
            if name in fields and getattr(args, f"opt_{name}") is None:
                setattr(args, f"opt_{name}", value)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
