"""Low-rank adapter on a frozen quantized weight (HQQ+): ``W = base + scale · B A``.

``A [r, in]`` and ``B [out, r]`` are float32 (HQQ+ keeps adapters in fp32); ``B`` starts at zero so
a fresh adapter leaves the model unchanged. The forward keeps the base's own (kernel) matmul and
adds the adapter as two thin products, so the quantized weight is never expanded. For checkpoints
the base's arrays are stored beside ``A`` and ``B`` under ``base.<field>`` and its static metadata
under ``base``, so ``checkpoint.save``/``load`` round-trip it without knowing about adapters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.formats.base import FORMATS, QuantizedWeight, quantized_format, static

BASE_PREFIX = "base."


@quantized_format("lora")
class LoRAWeight(QuantizedWeight):
    base: QuantizedWeight  # the frozen quantized weight
    A: jax.Array  # float32 [rank, in]
    B: jax.Array  # float32 [out, rank]
    shape: tuple[int, int] = static()
    scale: float = static(1.0)  # multiplier of the adapter's output (alpha / rank in LoRA's terms)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> jax.Array:
        """The adapter's dense ``[out, in]`` contribution, float32."""
        return self.scale * (self.B.astype(jnp.float32) @ self.A.astype(jnp.float32))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Base plus adapter: what merging the adapter gives (a dense fp weight)."""
        return (self.base.dequantize(jnp.float32) + self.delta()).astype(dtype)

    def matmul(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        low = (x.astype(self.A.dtype) @ self.A.T) @ self.B.T
        return self.base.matmul(x, backend=backend) + (self.scale * low).astype(x.dtype)

    def arrays(self) -> dict[str, Any]:
        return {**{BASE_PREFIX + k: v for k, v in self.base.arrays().items()}, "A": self.A, "B": self.B}

    def static_metadata(self) -> dict[str, Any]:
        return {"format": self.format_name, "shape": list(self.shape), "scale": self.scale,
                "base": self.base.static_metadata()}

    @classmethod
    def from_leaves(cls, metadata: dict[str, Any], leaves: dict[str, Any]) -> "LoRAWeight":
        base_meta = metadata["base"]
        base_leaves = {k[len(BASE_PREFIX):]: v for k, v in leaves.items() if k.startswith(BASE_PREFIX)}
        base = FORMATS[base_meta["format"]].from_leaves(base_meta, base_leaves)
        return cls(base, leaves["A"], leaves["B"], tuple(metadata["shape"]), metadata["scale"])


def attach(base: QuantizedWeight, rank: int, key: jax.Array, *, scale: float = 1.0) -> LoRAWeight:
    """A fresh adapter of ``rank`` on ``base``: ``A`` random with rows of norm ≈ 1, ``B = 0``."""
    out, n = base.shape
    a = jax.random.normal(key, (rank, n), jnp.float32) / jnp.sqrt(n)
    return LoRAWeight(base, a, jnp.zeros((out, rank), jnp.float32), tuple(base.shape), float(scale))
