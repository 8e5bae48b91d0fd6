"""Hessian collection on one device: accuracy, block forward, diagnostics, offline store and resume, CLI."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params, tiny_config, write_hf, write_tokenizer
from jaxquant import hessian as hz
from jaxquant import pipeline
from jaxquant.model.llama import rope_frequencies
from jaxquant.model.params import model_from_params, named_params


def _seed():
    return int(np.random.SeedSequence().entropy % 2**32)


def _rel(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_hidden_layers=3)
    seed = _seed()
    model = model_from_params(cfg, random_params(cfg, seed=seed))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (5, 24)).astype(np.int32)
    return model, tokens


def _reference(model, tokens):
    """fp64 numpy Hessians of every block and group, the block inputs computed by the model itself."""
    cfg = model.config
    x = model.embed(jnp.asarray(tokens))
    positions, inv_freq = jnp.arange(tokens.shape[1]), rope_frequencies(cfg)
    out = {}
    for i, layer in enumerate(model.layers):
        for g in hz.GROUP_NAMES:
            a = np.asarray(pipeline._group_input(layer, g, x, positions, inv_freq), np.float64)
            a = a.reshape(-1, a.shape[-1])
            out[i, g] = (a.T @ a / a.shape[0], a.mean(0))
        x, _ = layer(x, positions, inv_freq)
    return out


def _check_large_mean_accuracy(dtype, chunk_tokens=hz.DEFAULT_CHUNK_TOKENS, bound=1e-6, partial_bound=1e-7):
    rng = np.random.default_rng(_seed())
    n, d = 1 << 20, 16
    x = rng.uniform(50, 200, d) + rng.standard_normal((n, d)) * rng.uniform(0.5, 20, d)
    x = jnp.asarray(x, jnp.float32).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref = x64.T @ x64
    # short partials make many additions: the plain fp32 running sum (the high part alone) drifts
    m = jax.jit(lambda m, x: m.add_products(x, x, chunk_tokens=64).add_sum(x, 64))(hz.Moments.zeros(d, d), x)
    plain = np.asarray(m.xtx, np.float64)
    compensated = plain + np.asarray(m.xtx_err, np.float64)
    assert _rel(plain, ref) > 1e-6
    assert _rel(compensated, ref) < partial_bound
    assert _rel(np.asarray(m.xsum, np.float64) + np.asarray(m.xsum_err), x64.sum(0)) < partial_bound
    # the public entry point, fp32 result
    stats = hz.moments(x, chunk_tokens=chunk_tokens)
    assert stats.count == n
    assert _rel(stats.matrix, ref / n) < bound
    assert _rel(stats.mean, x64.mean(0)) < bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compensated_sum_of_1m_tokens_with_large_mean_matches_fp64(dtype):
    # bf16: each 4096-token partial is an fp32 sum of exact 16-bit products, 4.6e-7 to 6.6e-7 over 8
    # seeds on the CPU and 1.2e-6 in one CI run; fp32 inputs 3e-8 to 5e-8. Across partials the
    # compensated sum adds nothing (partial_bound, with 64-token partials).
    _check_large_mean_accuracy(dtype, bound=1e-6 if dtype == jnp.float32 else 2e-6)


@pytest.mark.gpu
def test_gpu_accumulation_fused_attention_and_all_gpus_agree():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    # TwoSum survives XLA:GPU's fusions. Inside each partial the tensor cores accumulate (not IEEE
    # round-to-nearest on every generation: truncation can bias long same-sign sums), hence looser
    # bounds here; scripts/bench_hessian.py reports the error for each partial length.
    _check_large_mean_accuracy(jnp.bfloat16, chunk_tokens=1024, bound=1e-5, partial_bound=1e-6)
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, num_hidden_layers=1)
    model = model_from_params(cfg, {k: jnp.asarray(v, jnp.bfloat16) for k, v in random_params(cfg, _seed()).items()})
    t = 256
    tokens = np.random.default_rng(_seed()).integers(0, cfg.vocab_size, (8, t)).astype(np.int32)
    positions, inv_freq = jnp.arange(t), rope_frequencies(cfg)
    x = model.embed(jnp.asarray(tokens))
    ref, y = hz.block_inputs(model.layers[0], x, positions, inv_freq)
    if hz.fused_attention_available("bfloat16", t, 4, 2, 64):
        fused, y_fused = hz.block_inputs(model.layers[0], x, positions, inv_freq, attention="cudnn")
        for g in hz.GROUP_NAMES:
            assert _rel(fused[g].astype(jnp.float32), np.asarray(ref[g], np.float64)) < 3e-2, g
    results = {}
    for n in sorted({1, len(jax.local_devices())}):
        mesh = hz.make_mesh(jax.local_devices()[:n])
        batches = hz.batches_from_tokens(model, tokens, mesh, n)  # one window per device and step
        stats = hz.collect_block(model.layers[0], batches, positions, inv_freq, hz.block_inputs,
                                 hz.group_widths(cfg))
        results[n] = {g: s.numpy()[0] for g, s in stats.items()}
    for g, h in results[1].items():
        a = np.asarray(ref[g], np.float64).reshape(-1, ref[g].shape[-1])
        assert _rel(h, a.T @ a / a.shape[0]) < 2e-2, g  # eager vs fused bf16 roundings of the inputs
        for n, r in results.items():
            assert _rel(r[g], np.asarray(h, np.float64)) < 1e-6, (n, g)


def test_block_inputs_are_the_pipelines_group_inputs_and_the_block_output(tiny):
    model, tokens = tiny
    assert set(hz.GROUP_NAMES) == set(pipeline.GROUPS)
    x = model.embed(jnp.asarray(tokens))
    positions, inv_freq = jnp.arange(tokens.shape[1]), rope_frequencies(model.config)
    layer = model.layers[0]
    inputs, y = hz.block_inputs(layer, x, positions, inv_freq)
    np.testing.assert_allclose(y, layer(x, positions, inv_freq)[0], rtol=1e-5, atol=1e-6)
    fused, y_fused = hz.block_inputs(layer, x, positions, inv_freq, attention="xla")  # cuDNN's stand-in on CPU
    np.testing.assert_allclose(y_fused, y, rtol=1e-5, atol=1e-6)
    for g in hz.GROUP_NAMES:
        np.testing.assert_allclose(inputs[g], pipeline._group_input(layer, g, x, positions, inv_freq),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fused[g], inputs[g], rtol=1e-5, atol=1e-6)
        assert inputs[g].shape[-1] == hz.group_widths(model.config)[g]


def test_collect_block_matches_fp64_reference_with_a_padded_batch(tiny):
    model, tokens = tiny  # 5 windows in batches of 2: the last batch is padded and masked
    ref = _reference(model, tokens)
    mesh = hz.make_mesh(jax.local_devices()[:1])
    batches = hz.batches_from_tokens(model, tokens, mesh, batch_size=2)
    positions, inv_freq = jnp.arange(tokens.shape[1]), rope_frequencies(model.config)
    for i, layer in enumerate(model.layers):
        stats = hz.collect_block(layer, batches, positions, inv_freq, hz.block_inputs,
                                 hz.group_widths(model.config), forward=True)
        for g, s in stats.items():
            h, mean = s.numpy()
            assert s.count == tokens.size
            assert _rel(h, ref[i, g][0]) < 1e-5
            assert _rel(mean, ref[i, g][1]) < 1e-5
            np.testing.assert_array_equal(h, h.T)


def test_online_pipeline_hessian_is_the_offline_one_for_an_unquantized_block(tiny, tmp_path):
    model, tokens = tiny
    hz.collect_offline(model, tokens, tmp_path / "h", cond=False)
    stored = hz.stored_hessians(tmp_path / "h")
    x = model.embed(jnp.asarray(tokens))
    positions, inv_freq = jnp.arange(tokens.shape[1]), rope_frequencies(model.config)
    for g in ("o", "down"):  # after attention; after the MLP's gate/up
        online = pipeline._group_hessian(model.layers[0], g, x, positions, inv_freq, 3)
        np.testing.assert_allclose(online, stored(0, g), rtol=1e-5, atol=1e-7)


def test_diagnostics_report_dead_inputs_nonfinite_and_condition_number():
    rng = np.random.default_rng(_seed())
    a = rng.standard_normal((500, 12))
    a[:, [3, 7]] = 0  # two dead inputs
    h = a.T @ a / 500
    r = hz.diagnose(h, 500)
    assert r["dead_inputs"] == 2 and r["dead_first"] == [3, 7] and r["nonfinite"] == 0
    live = np.delete(np.delete(h, [3, 7], 0), [3, 7], 1)
    assert r["cond"] == pytest.approx(np.linalg.cond(live), rel=0.1)  # an iterative estimate
    assert not r["singular"]
    h[0, 1] = np.nan
    assert hz.diagnose(h, 500)["nonfinite"] == 1
    low_rank = a[:5].T @ a[:5]
    assert "rank deficient" in hz.diagnose(low_rank, 5)["warning"]
    assert hz.diagnose(low_rank, 5)["singular"]


def test_too_little_calibration_is_a_clear_error(tiny, tmp_path):
    model, tokens = tiny
    few = tokens[:1, :8]  # 8 tokens < the widest Hessian (96 inputs of down_proj)
    with pytest.raises(ValueError, match=r"calibration data too small: 8 tokens.*'down'.*96"):
        hz.collect_offline(model, few, tmp_path / "h")
    x = model.embed(jnp.asarray(few))
    with pytest.raises(ValueError, match="calibration data too small"):
        pipeline._group_hessian(model.layers[0], "qkv", x, jnp.arange(8), rope_frequencies(model.config), 1)


def _load_all(path, layers):
    stored = hz.stored_hessians(path)
    return {(i, g): stored(i, g) for i in range(layers) for g in hz.GROUP_NAMES}


def test_interrupted_offline_run_resumes_without_recomputing_finished_blocks(tiny, tmp_path, monkeypatch):
    model, tokens = tiny
    layers = model.config.num_hidden_layers
    full = _load_all(hz.collect_offline(model, tokens, tmp_path / "full", batch_size=2, cond=False), layers)

    calls = []
    collect = hz.collect_block
    monkeypatch.setattr(hz.offline, "collect_block", lambda layer, *a, **k: calls.append(layer) or collect(layer, *a, **k))
    blocks = lambda: [[id(b) for b in model.layers].index(id(layer)) for layer in calls]  # noqa: E731
    out = tmp_path / "run"
    # the run is killed while block 1 is being written (after its Hessians were computed)
    saves, real_save = [], np.save

    def dying_save(f, *a, **k):
        saves.append(f)
        if len(saves) == 8 + 3:  # block 0 writes 8 files; die on the 3rd of block 1
            raise KeyboardInterrupt
        return real_save(f, *a, **k)

    monkeypatch.setattr(hz.offline.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        hz.collect_offline(model, tokens, out, batch_size=2, cond=False, save_activations=True)
    monkeypatch.setattr(hz.offline.np, "save", real_save)
    assert hz.finished_blocks(out) == [0]
    assert not (out / "block_0001").exists() and not list(out.glob(".block_*"))
    with pytest.raises(ValueError, match="no Hessians for block 1"):
        hz.stored_hessians(out)(1, "qkv")

    calls.clear()  # resume from the stored inputs of block 1, then stop again
    hz.collect_offline(model, tokens, out, batch_size=2, cond=False, save_activations=True, stop_after=1)
    assert blocks() == [1] and hz.finished_blocks(out) == [0, 1]
    calls.clear()  # resume with the stored activations lost: replay blocks 0-1 (forward only)
    for f in (out / "activations").iterdir():
        f.unlink()
    hz.collect_offline(model, tokens, out, batch_size=2, cond=False)
    assert blocks() == list(range(2, layers))
    resumed = _load_all(out, layers)
    for key, h in full.items():  # same device, same batches: bit-identical to the uninterrupted run
        np.testing.assert_array_equal(resumed[key], h, err_msg=str(key))
    assert not (out / "activations").exists()
    report = json.loads((out / "block_0002" / "block.json").read_text())
    assert report["count"]["down"] == tokens.size

    calls.clear()
    hz.collect_offline(model, tokens, out, batch_size=2, cond=False)  # complete: nothing to do
    assert calls == []
    with pytest.raises(ValueError, match="another run"):
        hz.collect_offline(model, tokens[:4], out, batch_size=2)


def test_stored_hessians_feed_quantize_model(tiny, tmp_path):
    import jaxquant as jq

    model, tokens = tiny
    stored = hz.stored_hessians(hz.collect_offline(model, tokens, tmp_path / "h", cond=False))
    names = {"layers.0.self_attn.q_proj": (0, "qkv"), "layers.1.mlp.down_proj": (1, "down")}
    rules = [pipeline.Rule("|".join(n.replace(".", r"\.") for n in names), jq.GPTQConfig(bits=3, group_size=32)),
             pipeline.Rule(".", None)]
    gptq = named_params(pipeline.quantize_model(model, None, rules=rules, hessians=stored))
    rtn = named_params(pipeline.quantize_model(model, jq.RTNConfig(bits=3, group_size=32)))
    dense = named_params(model)
    for name, (block, group) in names.items():
        w, h = np.asarray(dense[name + ".weight"], np.float64), stored(block, group).astype(np.float64)
        proxy = {k: np.trace((w - np.asarray(jq.dequantize(p[name + ".weight"]))) @ h
                             @ (w - np.asarray(jq.dequantize(p[name + ".weight"]))).T) for k, p in
                 [("gptq", gptq), ("rtn", rtn)]}
        assert proxy["gptq"] < proxy["rtn"], name


def test_cli_hessians_command(tmp_path, capsys):
    cfg = tiny_config()
    folder = write_hf(tmp_path / "hf", cfg, random_params(cfg, seed=_seed()))
    write_tokenizer(folder, cfg.vocab_size)
    calib = tmp_path / "calib.txt"
    from jaxquant.data import builtin_corpus

    calib.write_text(builtin_corpus()[:20000])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    quant = sub.add_parser("quantize")
    hz.add_cli(sub)
    assert "--hessians" in quant.format_help()
    out = tmp_path / "h"
    args = parser.parse_args(["hessians", "--model", str(folder), "--calib-file", str(calib), "--samples", "4",
                              "--ctx", "32", "--out", str(out), "--batch-size", "2"])
    args.fn(args)
    text = capsys.readouterr().out
    assert "block 2/2" in text and "cond" in text
    stored = hz.stored_hessians(out)
    assert stored(1, "down").shape == (cfg.intermediate_size, cfg.intermediate_size)
    assert stored.manifest["windows"] == 4 and stored.manifest["ctx"] == 32
