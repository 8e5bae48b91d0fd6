"""Offline (QuIP#-style) collection: per-block Hessians stored atomically, resumable; ``jaxquant hessians``."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxquant.atomic import atomic_folder
from jaxquant.hessian.accumulate import (DEFAULT_CHUNK_TOKENS, FORMAT_VERSION, GROUP_LAYERS, HessianStats,
                                         check_enough_tokens, diagnose, make_mesh)
from jaxquant.hessian.collect import (batches_from_tokens, block_inputs_fn, choose_attention, collect_block,
                                      forward_block, group_widths)


# --- offline: stored per block, resumable ------------------------------------------------------

def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _block_dir(out: pathlib.Path, i: int) -> pathlib.Path:
    return out / f"block_{i:04d}"


def finished_blocks(out: str | os.PathLike) -> list[int]:
    """Indices of the blocks whose Hessians are completely stored in ``out``."""
    out = pathlib.Path(out)
    return sorted(int(p.name[6:]) for p in out.glob("block_[0-9][0-9][0-9][0-9]") if (p / "block.json").exists())


def _write_manifest(out: pathlib.Path, manifest: dict) -> None:
    path = out / "hessians.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if k != "created" and old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(f"{out} holds Hessians of another run (differs in {diff}); use a new --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".hessians.json.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def _write_block(out: pathlib.Path, i: int, stats: dict[str, tuple[np.ndarray, np.ndarray, int]], report: dict) -> None:
    """block_i/{group}.npy (H), {group}.mean.npy and block.json, assembled beside it and renamed into place."""
    with atomic_folder(_block_dir(out, i)) as tmp:
        for g, (h, mean, _) in stats.items():
            np.save(tmp / f"{g}.npy", h.astype(np.float32))
            np.save(tmp / f"{g}.mean.npy", mean.astype(np.float32))
        (tmp / "block.json").write_text(json.dumps({"block": i, "count": {g: s[2] for g, s in stats.items()},
                                                    "diagnostics": report}, indent=1))


def _act_path(out: pathlib.Path, block: int) -> pathlib.Path:
    return out / "activations" / f"input_{block:04d}.process{jax.process_index()}.npz"


def _save_activations(out: pathlib.Path, block: int, arrays: list[np.ndarray]) -> None:
    path = _act_path(out, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        np.savez(f, *arrays)
    os.replace(tmp, path)


def _drop_activations(out: pathlib.Path, keep: int) -> None:
    for p in (out / "activations").glob(f"input_*.process{jax.process_index()}.npz"):
        if int(p.name[6:10]) != keep:
            p.unlink(missing_ok=True)


def _all_processes(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([flag]))))


def _same_on_all(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int32)))


def collect_offline(model, tokens: np.ndarray, out: str | os.PathLike, *, mesh: Mesh | None = None,
                    batch_size: int = 1, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, attention: str = "auto",
                    offload: bool = False, save_activations: bool = False, cond: bool = True,
                    meta: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
                    stop_after: int | None = None) -> pathlib.Path:
    """QuIP#-style offline Hessians of every block of the (full-precision) ``model`` into ``out``.

    One forward per block gives all four groups. Resumable: blocks already stored are not collected
    again; the input of the first missing block is read back if it was stored (``save_activations``:
    each block's output is written, one window set per block) or else replayed through the finished
    blocks, forward only (no Hessians: about half a block's cost each). Files are written by a
    background thread while the next block computes. ``tokens [N, T]`` must be the same on every
    process; process 0 writes the Hessians, each process its own activations. ``stop_after`` ends
    after that many new blocks.
    """
    out = pathlib.Path(out).expanduser().resolve()
    mesh = make_mesh() if mesh is None else mesh
    cfg = model.config
    layers = cfg.num_hidden_layers
    widths = group_widths(cfg)
    tokens = np.asarray(tokens, np.int32)
    check_enough_tokens(tokens.size, widths)
    manifest = {"format": "jaxquant-hessians", "version": FORMAT_VERSION, "config": cfg.to_hf(),
                "windows": int(tokens.shape[0]), "ctx": int(tokens.shape[1]), "tokens_sha256": _digest(tokens),
                "groups": {g: {"width": d, "layers": GROUP_LAYERS[g]} for g, d in widths.items()},
                "hessian": "E[x x^T] float32 [d, d]; mean E[x] float32 [d]", **(meta or {})}
    if jax.process_index() == 0:
        _write_manifest(out, manifest)
        for stale in out.glob(".block_*.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    _barrier("manifest")
    done = set(finished_blocks(out)) if jax.process_index() == 0 else set()
    start = _same_on_all(min(set(range(layers)) - done, default=layers))
    if start == layers:
        return out
    positions, inv_freq = jnp.arange(tokens.shape[1]), _rope(cfg)
    batches = batches_from_tokens(model, tokens, mesh, batch_size, offload=offload)
    inputs_fn = block_inputs_fn(choose_attention(cfg, batches.dtype, tokens.shape[1], attention))
    if start > 0:
        path = _act_path(out, start)
        if _all_processes(path.exists()):
            with np.load(path) as f:
                batches.load_local_arrays([f[f"arr_{i}"] for i in range(len(f.files))])
        else:
            for i in range(start):
                forward_block(model.layers[i], batches, positions, inv_freq, inputs_fn)
                if progress:
                    progress("replay", i + 1, start)
    writer = _Writer()
    try:
        new = 0
        for i in range(start, layers):
            if _same_on_all(int(_block_dir(out, i).joinpath("block.json").exists())):
                forward_block(model.layers[i], batches, positions, inv_freq, inputs_fn)
                continue
            stats = collect_block(model.layers[i], batches, positions, inv_freq, inputs_fn, widths,
                                  forward=i + 1 < layers, chunk_tokens=chunk_tokens)
            if jax.process_count() > 1:  # collectives stay on the main thread, in the same order everywhere
                stats = {g: HessianStats(*s.numpy(), s.count) for g, s in stats.items()}
            acts = batches.local_arrays() if save_activations and i + 1 < layers else None
            writer.submit(_finish_block, out, i, stats, acts, cond, progress, layers)
            new += 1
            if stop_after is not None and new >= stop_after:
                break
        writer.wait()
    finally:
        writer.close()
    _barrier("done")
    if finished_blocks(out) == list(range(layers)) and jax.process_index() == 0:
        shutil.rmtree(out / "activations", ignore_errors=True)
    return out


def _finish_block(out, i, stats, acts, cond, progress, layers):
    """Writer-thread work for block i: the next block's inputs, the Hessians, then older inputs dropped."""
    if acts is not None:
        _save_activations(out, i + 1, acts)
    if jax.process_index() == 0:
        host = {g: (np.asarray(s.matrix), np.asarray(s.mean), s.count) for g, s in stats.items()}
        report = {g: diagnose(h, c, cond=cond) for g, (h, _, c) in host.items()}
        _write_block(out, i, host, report)
    if (out / "activations").exists():
        _drop_activations(out, keep=i + 1)
    if progress:
        progress("hessians", i + 1, layers)


class _Writer:
    """One background thread for block files, at most one block pending (bounded host memory)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="jaxquant-hessians"), None

    def submit(self, fn, *args):
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # re-raises the thread's error (or interruption) here

    def close(self):
        self.pool.shutdown(wait=True)


def _rope(cfg):
    from jaxquant.model.llama import rope_frequencies

    return rope_frequencies(cfg)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxquant-hessians-{name}")


def stored_hessians(path: str | os.PathLike) -> Callable[[int, str], np.ndarray]:
    """``hessians(block, group) -> H [d, d]`` (float32) read from a ``jaxquant hessians`` folder."""
    path = pathlib.Path(path).expanduser()
    marker = path / "hessians.json"
    if not marker.exists():
        raise FileNotFoundError(f"{path}: not a Hessians folder (no hessians.json; run `jaxquant hessians`)")
    manifest = json.loads(marker.read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: Hessians format version {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    layers = manifest["config"].get("num_hidden_layers")

    def hessians(block: int, group: str) -> np.ndarray:
        if group not in manifest["groups"]:
            raise ValueError(f"{path}: no group {group!r} (groups: {sorted(manifest['groups'])})")
        f = _block_dir(path, block) / f"{group}.npy"
        if not (_block_dir(path, block) / "block.json").exists() or not f.exists():
            done = finished_blocks(path)
            raise ValueError(f"{path}: no Hessians for block {block} ({len(done)} of {layers} blocks stored; "
                             f"rerun `jaxquant hessians` with the same arguments to finish)")
        return np.load(f)

    hessians.manifest = manifest
    return hessians


# --- command line -----------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    """Register ``jaxquant hessians``; also adds ``--hessians DIR`` to ``quantize`` if registered."""
    q = subparsers.add_parser("hessians", help="collect per-block Hessians of the full-precision model (resumable)")
    q.add_argument("--model", required=True, help="alias, GGUF file, HF/Flax folder or jaxquant checkpoint")
    q.add_argument("--calib-file", help="calibration text (.txt/.jsonl/.parquet or wikitext2-valid/c4/builtin); "
                                       "default wikitext2-valid via datasets, else builtin")
    q.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--ctx", type=int, default=2048, help="tokens per window (default 2048)")
    q.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    q.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it")
    q.add_argument("--batch-size", type=int, default=None, help="windows per step over all devices (default 1 per device)")
    q.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    q.add_argument("--rows", type=int, default=1, help="split each Hessian's rows over groups of N devices (default 1)")
    q.add_argument("--offload", action="store_true", help="keep activations in host memory between steps")
    q.add_argument("--save-activations", action="store_true",
                   help="store each block's output so a resume reads it back (default: a resume replays the "
                        "forward of the finished blocks, which is cheaper than writing N x ctx x d per block)")
    q.add_argument("--attention", default="auto", choices=["auto", "model", "cudnn", "xla"],
                   help="attention of the forward: auto = cuDNN fused attention on NVIDIA GPUs when it works, "
                        "else the model's own (default auto)")
    q.add_argument("--no-cond", action="store_true", help="skip the condition-number diagnostic (an eigendecomposition per group)")
    q.add_argument("--coordinator", help="HOST:PORT of process 0 for a multi-process run (jax.distributed; on CPUs "
                                          "also set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)")
    q.add_argument("--num-processes", type=int, default=None)
    q.add_argument("--process-id", type=int, default=None)
    q.set_defaults(fn=cmd_hessians)
    quant = subparsers.choices.get("quantize")
    if quant is not None and not any("--hessians" in a.option_strings for a in quant._actions):
        quant.add_argument("--hessians", metavar="DIR", help="use Hessians stored by `jaxquant hessians` instead of "
                                                             "collecting them online")


def cmd_hessians(args) -> pathlib.Path:
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    from jaxquant import data
    from jaxquant.model.load import load_model, load_tokenizer

    devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()[: args.devices]
    mesh = make_mesh(devices, rows=args.rows)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    text, used = data.load_text_with_fallback(args.calib_file, default="wikitext2-valid")
    windows = data.calibration_windows(data.tokenize(tokenizer, text), args.samples, args.ctx, seed=args.seed)
    batch = args.batch_size or mesh.size
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"hessians: {windows.shape[0]} windows x {windows.shape[1]} tokens from {used}, {mesh.size} devices "
        f"({jax.process_count()} processes), batch {batch}")
    done = finished_blocks(args.out) if pathlib.Path(args.out).exists() else []
    if done:
        say(f"resuming: {len(done)} blocks already stored in {args.out}")
    start = time.perf_counter()

    def progress(stage, i, n):
        if stage == "hessians" and jax.process_index() == 0:
            report = json.loads((_block_dir(pathlib.Path(args.out), i - 1) / "block.json").read_text())
            notes = "; ".join(f"{g}: cond {d.get('cond', float('nan')):.2e}, dead {d['dead_inputs']}, "
                              f"nonfinite {d['nonfinite']}" for g, d in report["diagnostics"].items())
            say(f"block {i}/{n} ({time.perf_counter() - start:.1f} s): {notes}", flush=True)
        elif stage != "hessians":
            say(f"{stage} {i}/{n}", flush=True)

    path = collect_offline(model, windows, args.out, mesh=mesh, batch_size=batch, offload=args.offload,
                           save_activations=args.save_activations, cond=not args.no_cond, attention=args.attention,
                           meta={"model": str(args.model), "calibration": used, "seed": args.seed},
                           progress=progress)
    say(f"saved {path} in {time.perf_counter() - start:.1f} s")
    return path
