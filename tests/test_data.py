"""Token windows and text sources."""
import json

import numpy as np
import pytest

from jaxquant import data


def test_eval_windows_are_non_overlapping_from_the_start():
    tokens = np.arange(1000, dtype=np.int32)
    w = data.eval_windows(tokens, 128)
    assert w.shape == (7, 128) and np.array_equal(w.ravel(), tokens[: 7 * 128])
    assert data.eval_windows(tokens, 128, max_windows=3).shape == (3, 128)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.eval_windows(tokens[:10], 128)


def test_calibration_windows_are_seeded_segments():
    tokens = np.arange(5000, dtype=np.int32)
    a = data.calibration_windows(tokens, 16, 64, seed=3)
    assert np.array_equal(a, data.calibration_windows(tokens, 16, 64, seed=3))
    assert not np.array_equal(a, data.calibration_windows(tokens, 16, 64, seed=4))
    assert np.all(np.diff(a, axis=1) == 1)  # contiguous segments of the text


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert data.load_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    assert data.load_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "c.parquet")
    assert data.load_text(tmp_path / "c.parquet") == "x\n\ny"
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "missing.txt")


def test_builtin_corpus_is_offline_prose():
    text = data.load_text("builtin")
    assert len(text) > 50_000 and text.count(" the ") > 500
