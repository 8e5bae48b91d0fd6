"""Trellis codes: bit-exact with the integer definitions (REFERENCE §6), code statistics, tables."""
import numpy as np
import pytest

from jaxquant.codebooks import trellis
from jaxquant.codebooks.trellis import TrellisCode

M32 = (1 << 32) - 1


def ref_1mad(s: int) -> np.float32:
    x = (34038481 * s + 76625530) & M32
    y = sum((x >> (8 * i)) & 255 for i in range(4)) - 510
    return np.float32(y) * np.float32(1 / 147.800537109375)  # fp32 multiply by the reciprocal


def ref_3inst(s: int) -> np.float32:
    x = (89226354 * s + 64248484) & M32
    r = (x & 0x8FFF8FFF) ^ 0x3B603B60
    hi = np.array([r >> 16], np.uint16).view(np.float16)[0]
    lo = np.array([r & 0xFFFF], np.uint16).view(np.float16)[0]
    return np.float32(hi + lo)  # fp16 + fp16 rounds to fp16, as a half2 add


def ref_hyb(s: int, table: np.ndarray, L: int, Q: int) -> np.ndarray:
    h = (s * (s + 1)) % (1 << L)
    v = table[(h >> (L - Q - 1)) & ((1 << Q) - 1)].astype(np.float32)
    if (h >> (L - 1)) & 1:
        v = np.array([-v[0], v[1]], np.float32)
    return v


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.mark.parametrize("L", [8, 12, 16, 20])
def test_compute_codes_bit_exact(rng, L):
    states = rng.integers(0, 1 << L, size=400)
    for name, ref in (("1mad", ref_1mad), ("3inst", ref_3inst)):
        got = np.asarray(TrellisCode(name, L=L).decode(states.astype(np.uint32)))[:, 0]
        want = np.array([ref(int(s)) for s in states], np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    # 1MAD's reciprocal multiply stays within ~1 ulp of the exact quotient y / 147.800537109375
    y = np.array([sum(((34038481 * int(s) + 76625530) & M32) >> (8 * i) & 255 for i in range(4))
                  for s in states]) - 510
    got = np.asarray(TrellisCode("1mad", L=L).decode(states.astype(np.uint32)))[:, 0]
    exact = y / 147.800537109375
    assert np.all(np.abs(got - exact) <= 1.5 * np.spacing(np.abs(exact).astype(np.float32)))


@pytest.mark.parametrize("L,Q", [(16, 9), (12, 6), (10, 9)])
def test_hyb_bit_exact_with_any_table(rng, L, Q):
    table = rng.standard_normal((1 << Q, 2)).astype(np.float16)
    states = rng.integers(0, 1 << L, size=400)
    got = np.asarray(TrellisCode("hyb", L=L, Q=Q).decode(states.astype(np.uint32), table))
    want = np.stack([ref_hyb(int(s), table, L, Q) for s in states])
    np.testing.assert_array_equal(got, want)


def test_lut_is_a_table_lookup(rng):
    code = TrellisCode("lut", L=10, V=2, seed=int(rng.integers(1 << 30)))
    table = code.default_table()
    assert table.shape == (1 << 10, 2) and table.dtype == np.float16
    states = rng.integers(0, 1 << 10, size=100)
    np.testing.assert_array_equal(np.asarray(code.decode(states, table)), table[states].astype(np.float32))


def test_code_statistics():
    # 1MAD: a sum of 4 bytes is ~ uniform-sum with std sqrt(4·(256²-1)/12) = 147.80 -> unit rms.
    v = np.asarray(TrellisCode("1mad").values())[:, 0]
    assert abs(v.mean()) < 0.01 and abs(TrellisCode("1mad").rms() - 1) < 0.01
    # 3INST: rms ≈ 1.2437 (REFERENCE §6); symmetric about 0 (sign bits of both halves are kept).
    assert TrellisCode("3inst").rms() == pytest.approx(1.2437, abs=5e-4)
    v3 = np.asarray(TrellisCode("3inst").values())[:, 0]
    assert abs(v3.mean()) < 0.01 and np.all(np.abs(v3) <= 4)


def test_hyb_table_properties():
    table = trellis.hyb_table()
    assert table.shape == (512, 2) and table.dtype == np.float16
    assert table.astype(np.float64).std() == pytest.approx(np.sqrt(15 / 16), rel=1e-3)
    code = TrellisCode("hyb")
    vals = np.asarray(code.values())
    # every state decodes to a (possibly first-coordinate-negated) table row
    rows = {tuple(r) for r in table.astype(np.float32)}
    assert all((abs(a), b) in {(abs(x), y) for x, y in rows} for a, b in vals[::97])
    assert code.rms() == pytest.approx(np.sqrt(15 / 16), rel=0.05)


def test_kmeans_table_is_reproducible_and_seeded():
    a = trellis.kmeans_table(4, 7, 4096)
    b = trellis.kmeans_table(4, 7, 4096)
    c = trellis.kmeans_table(4, 8, 4096)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.astype(np.float64).std() == pytest.approx(np.sqrt(15 / 16), rel=1e-3)


def test_kmeans_improves_on_its_start(rng):
    data = rng.standard_normal((4096, 2))
    init = rng.standard_normal((16, 2))
    c = trellis.kmeans(data, init)
    dist = lambda cb: np.min(((data[:, None, :] - cb[None]) ** 2).sum(-1), 1).mean()  # noqa: E731
    assert dist(c) < 0.8 * dist(init)
    # a fixed point: each centroid is the mean of its cell
    assign = np.argmin(((data[:, None, :] - c[None]) ** 2).sum(-1), 1)
    for j in np.unique(assign)[:5]:
        np.testing.assert_allclose(c[j], data[assign == j].mean(0), atol=0.05)


def test_hyb_table_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(trellis, "HYB_KMEANS_SAMPLES", 2048)
    first = trellis.hyb_table.__wrapped__(3, 11)
    assert trellis.hyb_table_path(3, 11).exists()
    again = trellis.hyb_table.__wrapped__(3, 11)  # read back from the file
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, trellis.kmeans_table(3, 11, 2048))


def test_rejects_bad_codes():
    with pytest.raises(ValueError):
        TrellisCode("e8p")
    with pytest.raises(ValueError):
        TrellisCode("hyb", V=1)
    with pytest.raises(ValueError):
        TrellisCode("hyb", L=8, Q=9)
