"""Bit packing of b-bit codes (1 <= b <= 16) into int32 words, exactly b bits per code.

Codes are taken 32 at a time along the last axis; each run of 32 codes is one little-endian
bitstream of 32·b bits stored in b int32 words. Widths that divide 32 never straddle a word,
so kernels decode them with one shift and mask; the others cost one extra word read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 32


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits (padded to 32 codes)."""
    return -(-n // CHUNK) * bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """``[..., n]`` unsigned codes < 2**bits -> ``[..., ceil(n/32)*bits]`` int32 words."""
    _check_bits(bits)
    *lead, n = codes.shape
    pad = -n % CHUNK
    codes = jnp.pad(codes.astype(jnp.uint32), [(0, 0)] * len(lead) + [(0, pad)])
    codes = codes.reshape(*lead, -1, CHUNK)
    bit_index = jnp.arange(bits, dtype=jnp.uint32)
    stream = ((codes[..., None] >> bit_index) & 1).astype(jnp.uint32)  # [..., c, 32, b]
    stream = stream.reshape(*lead, -1, bits, CHUNK)  # 32·b bits regrouped into b words
    words = jnp.sum(stream << jnp.arange(CHUNK, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words.reshape(*lead, -1), jnp.int32)


def unpack(words: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of ``pack``: ``[..., ceil(n/32)*bits]`` int32 -> ``[..., n]`` uint32 codes."""
    _check_bits(bits)
    *lead, w = words.shape
    if w != packed_words(n, bits):
        raise ValueError(f"{w} packed words cannot hold {n} codes of {bits} bits")
    words = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(*lead, -1, bits)
    stream = (words[..., None] >> jnp.arange(CHUNK, dtype=jnp.uint32)) & 1  # [..., c, b, 32]
    stream = stream.reshape(*lead, -1, CHUNK, bits)
    codes = jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return codes.reshape(*lead, -1)[..., :n]


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"packing supports 1 to 16 bits per code, got {bits!r}")
