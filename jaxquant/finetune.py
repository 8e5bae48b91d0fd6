"""Fine-tuning of quantized models with optax: only continuous parameters train, codes stay fixed.

- ``finetune_block``: after a linear group of a block is quantized, the block's remaining float
  parameters (real-valued sign vectors, scales, zeros, tables, norms, linears not yet quantized)
  are trained to reproduce the original block's output on the original inputs (QuIP# §5, MSE).
  ``quantize_model(..., finetune=FinetuneConfig())`` calls it after every group.
- ``finetune_model``: end to end, the quantized model's next-token distribution is pulled toward
  the original model's soft targets (KL); by default sign vectors, norms, an untied lm_head and
  LoRA adapters train. Blocks are recomputed in the backward pass (``remat``) and activations can
  be bf16, so a 7B model fits one H100.
- ``add_lora`` / ``merge_lora``: HQQ+ adapters (``formats.lora``) on frozen quantized linears,
  trained by ``finetune_model``'s distillation.

Every run holds out part of the devset, evaluates it before training and after each epoch, stops
early when it stops improving, and returns the best state seen (possibly the untouched start).
Parameters are trained as fp32 master copies; the model sees them cast to their stored dtype
(float16 sign vectors, scales and tables), so what is trained is what is saved.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxquant.formats import lora
from jaxquant.formats.base import QuantizedWeight
from jaxquant.model.llama import Llama, rope_frequencies
from jaxquant.model.params import get_param, model_from_params, named_params, set_param

SIGN_FIELDS = ("SU", "SV", "su", "sv")  # QuIP# and QTIP RHT sign vectors
LORA_FIELDS = ("A", "B")
PARAM_GROUPS = ("signs", "scales", "norms", "linears", "lm_head", "embed", "lora")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 5e-5  # Adam learning rate of norms, scales, zeros, tables, fp linears and lm_head
    sign_lr: float = 5e-4  # Adam learning rate of the RHT sign vectors SU/SV (trained as real values)
    lora_lr: float = 1e-5  # Adam learning rate of LoRA adapters (HQQ+)
    epochs: int = 5  # passes over the training windows
    devset: int = 256  # calibration windows used for fine-tuning (the first N)
    valid_fraction: float = 0.125  # share of the devset held out for early stopping (at least one window)
    batch_size: int = 4  # windows per optimizer step
    early_stop: int = 3  # stop after N epochs without held-out improvement (0: run every epoch)
    e2e_train: str = "signs,norms,lm_head,lora"  # end-to-end trainables among signs,scales,norms,lm_head,embed,lora
    dtype: str = "float32"  # end-to-end activations and teacher weights: bfloat16 halves memory
    remat: bool = True  # end-to-end: recompute each block in the backward pass (gradient checkpointing)
    seed: int = 0  # order of the training windows

    def __post_init__(self):
        unknown = set(self.groups()) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"e2e_train: unknown groups {sorted(unknown)}; choose among {PARAM_GROUPS}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def groups(self) -> tuple[str, ...]:
        return tuple(g.strip() for g in self.e2e_train.split(",") if g.strip())


# Progress: progress(stage, done, total) or, when it takes a fourth argument, also a dict of
# metrics ({"loss": ..., "valid": ...}) for progress bars that show the loss.
Progress = Callable[..., None]


# --- which leaves train ---------------------------------------------------------------------

def trainable_mask(qw: QuantizedWeight) -> Any:
    """The weight's pytree with ``True`` at continuous (float) leaves and ``False`` at integer
    codes and integer codebooks, which are never trained."""
    return jax.tree.map(lambda a: bool(jnp.issubdtype(a.dtype, jnp.floating)), qw)


def leaf_group(name: str, field: str | None, value: Any) -> str | None:
    """The parameter group of one leaf (``field`` is None for a dense parameter), or None when
    the leaf is not continuous and so can never train."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return None
    if field is not None:
        last = field.rsplit(".", 1)[-1]  # adapters store their base's fields as base.<field>
        if last in SIGN_FIELDS:
            return "signs"
        return "lora" if last in LORA_FIELDS else "scales"
    if "norm" in name:
        return "norms"
    if name.startswith("lm_head"):
        return "lm_head"
    return "embed" if name.startswith("embed_tokens") else "linears"


def split_trainable(params: dict[str, Any], groups: Sequence[str]) -> tuple[dict[str, jax.Array], dict[str, str]]:
    """fp32 master copies of the leaves in ``groups``, keyed ``name`` (dense) or ``name/field``,
    and each key's group (its optimizer label)."""
    trainable, labels = {}, {}
    for name, value in params.items():
        leaves = value.arrays().items() if isinstance(value, QuantizedWeight) else [(None, value)]
        for field, leaf in leaves:
            group = leaf_group(name, field, leaf)
            if group in groups:
                key = name if field is None else f"{name}/{field}"
                trainable[key] = jnp.asarray(leaf, jnp.float32)
                labels[key] = group
    return trainable, labels


def _replace_field(qw: QuantizedWeight, field: str, value: jax.Array) -> QuantizedWeight:
    if field.startswith(lora.BASE_PREFIX):
        return dataclasses.replace(qw, base=_replace_field(qw.base, field[len(lora.BASE_PREFIX):], value))
    return dataclasses.replace(qw, **{field: value.astype(getattr(qw, field).dtype)})


def write_trainable(module: nnx.Module, trainable: dict[str, jax.Array]) -> None:
    """Put the trained values into ``module``, each cast to the dtype its parameter is stored in."""
    for key, value in trainable.items():
        name, _, field = key.partition("/")
        current = get_param(module, name)
        set_param(module, name, _replace_field(current, field, value) if field else value.astype(current.dtype))


# --- the training loop ----------------------------------------------------------------------

def _optimizer(cfg: FinetuneConfig, labels: dict[str, str]) -> optax.GradientTransformation:
    """Adam per group: sign vectors and adapters have their own learning rates. Only the leaves in
    ``labels`` exist in the trained pytree, so integer codes cannot receive an update."""
    rates = {group: cfg.lr for group in PARAM_GROUPS}
    rates.update(signs=cfg.sign_lr, lora=cfg.lora_lr)
    return optax.multi_transform({g: optax.adam(rates[g]) for g in set(labels.values())}, labels)


@functools.cache
def _trainer(loss: Callable, graphdef: Any, cfg: FinetuneConfig, labels: tuple[tuple[str, str], ...]):
    """Jitted (step, evaluate) for one loss, module structure and optimizer; cached so blocks of
    the same structure share one compilation."""
    optimizer = _optimizer(cfg, dict(labels))

    @jax.jit
    def step(trainable, opt_state, frozen, *batch):
        value, grads = jax.value_and_grad(loss, argnums=2)(cfg, graphdef, trainable, frozen, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    evaluate = jax.jit(functools.partial(loss, cfg, graphdef))
    return optimizer, step, evaluate


def _reporter(progress: Progress | None) -> Callable[[str, int, int, dict], None]:
    if progress is None:
        return lambda *args: None
    try:
        inspect.signature(progress).bind("stage", 0, 1, {})
        return progress
    except (TypeError, ValueError):  # takes three arguments (or has no signature): no metrics
        return lambda stage, done, total, metrics: progress(stage, done, total)


def _train(loss: Callable, module: nnx.Module, groups: Sequence[str], train: tuple, valid: tuple,
           cfg: FinetuneConfig, *, stage: str, progress: Progress | None, batch_data: Callable) -> dict:
    """Adam on ``module``'s leaves in ``groups``; writes the best held-out state back into ``module``.

    ``train`` / ``valid`` are tuples of arrays with windows on axis 0; ``batch_data(*arrays)``
    turns a slice of them into the loss's batch arguments (e.g. adds teacher targets)."""
    report = _reporter(progress)
    trainable, labels = split_trainable(named_params(module), groups)
    if not trainable:
        return {"steps": 0, "initial_valid": None, "best_valid": None, "epochs": 0}
    graphdef, frozen = nnx.split(module)
    frozen = jax.device_put(frozen)  # host arrays would otherwise be copied on every step
    optimizer, step, evaluate = _trainer(loss, graphdef, cfg, tuple(sorted(labels.items())))
    opt_state = optimizer.init(trainable)

    def held_out(params):
        n = valid[0].shape[0]
        total = sum(float(evaluate(params, frozen, *batch_data(*(a[s : s + cfg.batch_size] for a in valid))))
                    * min(cfg.batch_size, n - s) for s in range(0, n, cfg.batch_size))
        return total / n

    n = train[0].shape[0]
    batch = min(cfg.batch_size, n)
    per_epoch = n // batch  # whole batches only (one compiled shape); reshuffling covers the rest
    best_valid = initial = held_out(trainable)
    best, stale, done, epochs, losses = trainable, 0, 0, 0, []
    order = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.epochs):
        perm = order.permutation(n)
        for s in range(0, per_epoch * batch, batch):
            idx = np.sort(perm[s : s + batch])
            trainable, opt_state, value = step(trainable, opt_state, frozen, *batch_data(*(a[idx] for a in train)))
            done += 1
            losses.append(float(value))
            report(stage, done, cfg.epochs * per_epoch, {"loss": losses[-1], "valid": best_valid})
        epochs += 1
        current = held_out(trainable)
        if current < best_valid:
            best_valid, best, stale = current, trainable, 0
        else:
            stale += 1
            if cfg.early_stop and stale >= cfg.early_stop:
                break
    report(stage, cfg.epochs * per_epoch, cfg.epochs * per_epoch, {"loss": losses[-1] if losses else None,
                                                                  "valid": best_valid})
    write_trainable(module, best)
    return {"steps": done, "epochs": epochs, "initial_valid": initial, "best_valid": best_valid,
            "train_loss": losses}


def _split(n: int, cfg: FinetuneConfig) -> tuple[slice, slice]:
    """Training and held-out windows of the first ``cfg.devset``: the held-out ones are the last."""
    n = min(n, cfg.devset)
    held = max(1, round(n * cfg.valid_fraction)) if n > 1 else 0
    if n - held < 1:
        raise ValueError(f"fine-tuning needs at least 2 devset windows, got {n}")
    return slice(0, n - held), slice(n - held, n)


# --- block fine-tuning ----------------------------------------------------------------------

def _block_loss(cfg, graphdef, trainable, frozen, x, target, positions, inv_freq):
    """Mean squared error of the block's output against the original block's."""
    block = nnx.merge(graphdef, frozen, copy=True)  # fresh Variables: they are written below
    write_trainable(block, trainable)
    out = block(x, positions, inv_freq)[0]
    return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))


BLOCK_GROUPS = ("signs", "scales", "norms", "linears", "lora")


def finetune_block(block: nnx.Module, inputs: jax.Array, targets: jax.Array, cfg: FinetuneConfig, *,
                   positions: jax.Array, inv_freq: jax.Array, stage: str = "finetune block",
                   progress: Progress | None = None) -> dict:
    """Train ``block``'s continuous parameters (in place) so ``block(inputs)`` matches ``targets``
    (the original block's outputs on the same inputs). Returns the losses (``initial_valid`` and
    ``best_valid`` are held-out MSEs)."""
    train, valid = _split(inputs.shape[0], cfg)
    return _train(_block_loss, block, BLOCK_GROUPS, (inputs[train], targets[train]),
                  (inputs[valid], targets[valid]), cfg, stage=stage, progress=progress,
                  batch_data=lambda x, y: (x, y, positions, inv_freq))


# --- end-to-end fine-tuning -----------------------------------------------------------------

def model_logits(model: Llama, tokens: jax.Array, dtype=jnp.float32, remat: bool = False) -> jax.Array:
    """``model(tokens)`` logits (fp32) with activations in ``dtype``; ``remat`` recomputes each
    block in the backward pass instead of storing its intermediates."""
    positions = jnp.arange(tokens.shape[1])
    inv_freq = rope_frequencies(model.config)
    h = model.embed(tokens).astype(dtype)

    def run(state, h, positions, inv_freq, graphdef):
        return nnx.merge(graphdef, state, copy=True)(h, positions, inv_freq)[0]

    for layer in model.layers:
        graphdef, state = nnx.split(layer)
        block = functools.partial(run, graphdef=graphdef)
        h = (jax.checkpoint(block) if remat else block)(state, h, positions, inv_freq)
    return model.logits(h)


def kl_divergence(teacher_logp: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean over tokens of KL(teacher || student), teacher given as log-probabilities."""
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1))


def _e2e_loss(cfg, graphdef, trainable, frozen, tokens, teacher_logp):
    model = nnx.merge(graphdef, frozen, copy=True)  # fresh Variables: they are written below
    write_trainable(model, trainable)
    return kl_divergence(teacher_logp, model_logits(model, tokens, jnp.dtype(cfg.dtype), cfg.remat))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _teacher_logp(graphdef, state, tokens, dtype):
    logits = model_logits(nnx.merge(graphdef, state), tokens, jnp.dtype(dtype))
    return jax.nn.log_softmax(logits, axis=-1)


def _cast_dense(model: Llama, dtype: str) -> Llama:
    """The model with its dense float parameters in ``dtype`` (quantized weights untouched)."""
    if dtype == "float32":
        return model
    params = {n: v if isinstance(v, QuantizedWeight) or not jnp.issubdtype(v.dtype, jnp.floating)
              else jnp.asarray(v, dtype) for n, v in named_params(model).items()}
    return model_from_params(model.config, params)


def finetune_model(qmodel: Llama, fp_model: Llama, tokens: np.ndarray, cfg: FinetuneConfig, *,
                   progress: Progress | None = None) -> tuple[Llama, dict]:
    """End-to-end distillation: a new model whose ``cfg.e2e_train`` groups are trained so its
    next-token distributions match ``fp_model``'s on ``tokens [n, ctx]`` (the first
    ``cfg.devset`` windows, the last ``valid_fraction`` of them held out). ``qmodel`` itself is
    left unchanged. Returns the model and the losses (held-out KL in nats per token)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    model = model_from_params(qmodel.config, named_params(qmodel))
    teacher_graphdef, teacher_state = nnx.split(_cast_dense(fp_model, cfg.dtype))
    teacher_state = jax.device_put(teacher_state)

    def with_targets(t):
        return t, _teacher_logp(teacher_graphdef, teacher_state, t, cfg.dtype)

    train, valid = _split(tokens.shape[0], cfg)
    history = _train(_e2e_loss, model, cfg.groups(), (tokens[train],), (tokens[valid],), cfg,
                     stage="finetune end-to-end", progress=progress, batch_data=with_targets)
    return model, history


# --- HQQ+ adapters --------------------------------------------------------------------------

def lora_rank(name: str, default: int, rules: Sequence[tuple[str, int]] = ()) -> int:
    """The adapter rank of the layer ``name``: the first rule whose pattern ``re.search``-matches
    it, else ``default`` (0 = no adapter)."""
    for pattern, rank in rules:
        if re.search(pattern, name):
            return rank
    return default


def parse_lora_rules(text: str) -> list[tuple[str, int]]:
    """``"self_attn=32,mlp=8"`` -> ``[("self_attn", 32), ("mlp", 8)]`` (HQQ+'s ranks)."""
    rules = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        pattern, sep, rank = item.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"LoRA rule {item!r} is not REGEX=RANK")
        rules.append((pattern, int(rank)))
    return rules


def add_lora(model: Llama, rank: int = 0, rules: Sequence[tuple[str, int]] = (), *,
             key: jax.Array | None = None, scale: float = 1.0) -> Llama:
    """A new model with a fresh adapter (``B = 0``: outputs unchanged) on every quantized linear
    whose rank (``lora_rank``) is positive; dense layers get none."""
    key = jax.random.key(0) if key is None else key
    params = named_params(model)
    for i, (name, value) in enumerate(sorted(params.items())):
        r = lora_rank(name.removesuffix(".weight"), rank, rules)
        if r > 0 and isinstance(value, QuantizedWeight) and not isinstance(value, lora.LoRAWeight):
            params[name] = lora.attach(value, r, jax.random.fold_in(key, i), scale=scale)
    return model_from_params(model.config, params)


def merge_lora(model: Llama, dtype=jnp.float32) -> Llama:
    """A new model where every adapted linear becomes its dense merged weight (dequantized base
    plus adapter): exact, but full precision in size."""
    params = {n: v.dequantize(dtype) if isinstance(v, lora.LoRAWeight) else v
              for n, v in named_params(model).items()}
    return model_from_params(model.config, params)
