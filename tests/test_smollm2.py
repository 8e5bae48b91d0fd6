"""SmolLM2-135M from its GGUF against transformers' own PyTorch forward of the same file."""
import numpy as np
import pytest

import jax.numpy as jnp

from jaxquant import data
from jaxquant.evaluate import perplexity
from jaxquant.methods.rtn import RTNConfig
from jaxquant.model.load import load_model, load_tokenizer
from jaxquant.pipeline import quantize_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CTX = 2048
WINDOWS = 2


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load_model(smollm2_gguf_path), load_tokenizer(smollm2_gguf_path)


@pytest.fixture(scope="module")
def torch_smollm2(smollm2_gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(smollm2, wikitext_dir):
    _, tokenizer = smollm2
    text = data.load_text(wikitext_dir / "wiki.test.raw")
    return data.eval_windows(data.tokenize(tokenizer, text), CTX, WINDOWS)


@pytest.fixture(scope="module")
def fp_result(smollm2, windows):
    return perplexity(smollm2[0], windows)


def test_logits_match_transformers(smollm2, torch_smollm2, windows):
    start = np.random.default_rng().integers(0, CTX - 512)
    tokens = windows[:1, start : start + 512]
    ours, _ = smollm2[0](jnp.asarray(tokens))
    with torch.no_grad():
        theirs = torch_smollm2(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    rel = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-3, rel


def test_perplexity_matches_transformers(torch_smollm2, windows, fp_result):
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            t = torch.tensor(w[None], dtype=torch.long)
            nll += float(torch_smollm2(t, labels=t).loss) * (CTX - 1)
    theirs = np.exp(nll / (len(windows) * (CTX - 1)))
    assert abs(fp_result["ppl"] / theirs - 1) < 1e-3, (fp_result["ppl"], theirs)
    assert fp_result["windows"] == WINDOWS and fp_result["tokens"] == WINDOWS * (CTX - 1)


def test_rtn_8bit_within_half_percent(smollm2, windows, fp_result):
    qmodel = quantize_model(smollm2[0], RTNConfig(bits=8, group_size=128))
    q = perplexity(qmodel, windows)
    assert abs(q["ppl"] / fp_result["ppl"] - 1) < 5e-3, (q["ppl"], fp_result["ppl"])
