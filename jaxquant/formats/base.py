"""The one abstraction: a quantized weight is a frozen dataclass registered as a JAX pytree.

Array fields (codes, scales, tables, sign vectors) are leaves; fields declared with
``static()`` (bits, shape, group size, ...) are pytree metadata, so they are hashable, survive
``jit`` and go to the checkpoint's JSON sidecar. ``FORMATS`` maps a format name to its class so
that checkpoints and the CLI never branch on the method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

FORMATS: dict[str, type["QuantizedWeight"]] = {}


def static(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is pytree metadata rather than an array leaf."""
    return dataclasses.field(default=default, metadata={"static": True})


def quantized_format(name: str):
    """Class decorator: frozen dataclass + pytree registration + entry in ``FORMATS``."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = dataclasses.fields(cls)
        meta = [f.name for f in fields if f.metadata.get("static")]
        data = [f.name for f in fields if not f.metadata.get("static")]
        jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
        if name in FORMATS:
            raise ValueError(f"quantized format {name!r} registered twice")
        cls.format_name = name
        FORMATS[name] = cls
        return cls

    return wrap


class QuantizedWeight:
    """Base class of every format. ``shape`` is the dense ``[out, in]`` shape (HF orientation)."""

    format_name: ClassVar[str]
    shape: tuple[int, int]
    # Small float16 arrays the kernels take as float32: widened once for serving (``for_serving``)
    # rather than converted by one more kernel per linear and decode step.
    serving_float32: ClassVar[tuple[str, ...]] = ()

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The jnp reference: the dense ``[out, in]`` weight. Oracle for every kernel."""
        raise NotImplementedError

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        """``x @ W.T`` for ``x`` of shape ``[..., in]``. Formats with kernels override this."""
        if backend not in ("auto", "reference"):
            raise ValueError(f"{self.format_name}: backend {backend!r} not available")
        return x @ self.dequantize(x.dtype).T

    def normed_matmul(self, x: jax.Array, norm_weight: jax.Array, eps: float,
                      backend: str = "auto") -> jax.Array | None:
        """``rms_norm(x, norm_weight, eps) @ W.T`` where a kernel of the format makes the norm
        itself; None where none does (the caller norms, then ``matmul``s). Not differentiable."""
        return None

    def matmul_add(self, x: jax.Array, residual: jax.Array, backend: str = "auto") -> jax.Array | None:
        """``residual + x @ W.T`` in residual's dtype where a kernel of the format adds it as it
        stores; None where none does. Not differentiable."""
        return None

    def swiglu_block(self, down: "QuantizedWeight", x: jax.Array, norm_weight: jax.Array, eps: float,
                     backend: str = "auto") -> jax.Array | None:
        """A Llama MLP block with this weight as the fused ``[gate; up]`` projection:
        ``x + down(silu(gate) * up)`` of ``rms_norm(x, norm_weight, eps)``, where the format makes
        the whole block in one kernel call; None where it does not. Not differentiable."""
        return None

    def for_serving(self) -> "QuantizedWeight":
        """The same weight as a decode loop keeps it on the device: ``serving_float32`` arrays widened
        to float32 (same values; the stored form, and so checkpoints, keep float16)."""
        if not self.serving_float32:
            return self
        return dataclasses.replace(self, **{n: getattr(self, n).astype(jnp.float32) for n in self.serving_float32})

    @property
    def bits_per_weight(self) -> float:
        """Exact: every stored bit of every array leaf, divided by the number of weights."""
        bits = sum(np.dtype(leaf.dtype).itemsize * 8 * leaf.size for leaf in jax.tree.leaves(self))
        return bits / (self.shape[0] * self.shape[1])

    def arrays(self) -> dict[str, Any]:
        """The array fields by name (the pytree leaves)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("static")}

    def static_metadata(self) -> dict[str, Any]:
        """Static fields as JSON-able values (for checkpoint sidecars)."""
        out = {"format": self.format_name}
        for f in dataclasses.fields(self):
            if f.metadata.get("static"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_leaves(cls, metadata: dict[str, Any], leaves: dict[str, Any]) -> "QuantizedWeight":
        """Rebuild from a sidecar's metadata and the array leaves by field name."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("static"):
                value = metadata[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            else:
                kwargs[f.name] = leaves[f.name]
        return cls(**kwargs)


def is_quantized(w: Any) -> bool:
    return isinstance(w, QuantizedWeight)
