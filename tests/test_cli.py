"""The jaxquant command end to end on a tiny random model."""
import json

import numpy as np
import pytest

from helpers import random_params, tiny_config, write_hf, write_tokenizer
from jaxquant import cli
from jaxquant.model.load import load_model
from jaxquant.model.params import named_params
from jaxquant.formats import QuantizedWeight


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    cfg = tiny_config()
    folder = write_hf(tmp_path_factory.mktemp("m") / "hf", cfg, random_params(cfg, seed=np.random.SeedSequence().entropy % 2**32))
    write_tokenizer(folder, cfg.vocab_size)
    return folder


def test_quantize_eval_generate(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    cli.main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--keep", r"layers\.0\.self_attn\.q_proj", "--out", str(out)])
    params = named_params(load_model(out))
    assert isinstance(params["layers.0.mlp.up_proj.weight"], QuantizedWeight)
    assert not isinstance(params["layers.0.self_attn.q_proj.weight"], QuantizedWeight)
    sidecar = json.loads((out / "jaxquant.json").read_text())
    assert sidecar["recipe"]["config"] == {"method": "rtn", "bits": 4, "group_size": 32, "round_zero": False}
    assert sidecar["recipe"]["bits_per_weight"] == 4 + 32 / 32
    capsys.readouterr()

    cli.main(["eval", "--model", str(out), "--data-file", "builtin", "--ctx", "32", "--max-windows", "3", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["ctx"] == 32 and result["tokens"] == 3 * 31
    assert 1 < result["ppl"] < 10 * 96  # a random model is no better than chance, finite

    cli.main(["generate", "--model", str(out), "--prompt", "The module", "--max-new-tokens", "5", "--no-dense"])
    quantized = capsys.readouterr()
    assert quantized.out.strip() and "tokens/s" in quantized.err and "decoding the weights" not in quantized.err
    cli.main(["generate", "--model", str(out), "--prompt", "The module", "--max-new-tokens", "5"])
    auto = capsys.readouterr()  # on the CPU, a small model: decoded once by default
    assert auto.out == quantized.out and "decoding the weights once" in auto.err  # greedy: nothing changes

    cli.main(["export", "--model", str(out), "--out", str(tmp_path / "st")])
    exported = named_params(load_model(tmp_path / "st"))
    np.testing.assert_array_equal(np.asarray(exported["layers.0.mlp.up_proj.weight"].codes),
                                  np.asarray(params["layers.0.mlp.up_proj.weight"].codes))


def test_errors_are_clear(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="1 to 8 bits"):
        cli.main(["quantize", "--model", str(tiny_model_dir), "--bits", "12", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["eval", "--model", str(tmp_path / "nope"), "--data-file", "builtin"])
    assert not (tmp_path / "x").exists()


def test_bench_codebook_json(capsys):
    cli.main(["bench", "codebook", "--codebook", "e8p", "--samples", "4096", "--seed", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["codebook"] == "e8p" and result["bits"] == 2
    assert 0.08 < result["mse"] < 0.1  # E8P12 ≈ 0.092, far below Lloyd-Max scalar 2-bit (0.118)


def test_bench_decode_json(tmp_path):
    out = tmp_path / "decode.json"
    cli.main(["bench", "decode", "--shape", "smollm2-135m", "--layers", "1", "--method", "rtn", "--bits", "4",
              "--batch", "1", "--steps", "2", "--windows", "3", "--copy-bytes", "10000000", "--json", str(out)])
    result = json.loads(out.read_text())
    dense, rtn = result["rows"]
    assert dense["model"] == "dense" and rtn["model"] == "rtn" and result["copy_bandwidth_GBps"] > 0
    assert rtn["bytes_per_token"] < dense["bytes_per_token"] and rtn["tokens_per_s"] > 0
    for row in (dense, rtn):  # the reported figure is the median window
        assert len(row["tokens_per_s_windows"]) == 3 and row["tokens_per_s"] == sorted(row["tokens_per_s_windows"])[1]


def test_demo_runs_end_to_end(tmp_path, tiny_model_dir, capsys):
    # the README's first command, on a tiny model and the offline corpus
    from jaxquant import cli

    cli.main(["demo", "--model", str(tiny_model_dir), "--data-file", "builtin", "--ctx", "32", "--max-windows", "2",
              "--out", str(tmp_path / "demo"), "--max-new-tokens", "4", "--prompt", "The module"])
    out = capsys.readouterr().out
    assert "perplexity" in out and "[5/5]" in out and (tmp_path / "demo" / "jaxquant.json").exists()
