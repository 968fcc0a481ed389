import json

import pytest
import torch

from sparseq import bench
from sparseq.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("sparseq:", "torch:", "extension:", "CPU features:", "CUDA archs compiled:",
                "CUDA available:", "Triton:"):
        assert key in out, (key, out)
    assert torch.__version__ in out


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["bench", "--help"],
                                  ["bench", "int8", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: sparseq" in capsys.readouterr().out


@pytest.fixture
def tiny_quick_bench(monkeypatch):
    """--quick on shapes small enough for a unit test."""
    monkeypatch.setattr(bench, "QUICK_M", (1, 3))
    monkeypatch.setattr(bench, "QUICK_KN", ((64, 48),))
    monkeypatch.setattr(bench, "QUICK_REPEATS", 2)
    monkeypatch.setattr(bench, "QUICK_WARMUP", 1)


def test_bench_int8_quick_writes_table_and_json(tiny_quick_bench, tmp_path, capsys):
    threads_before = torch.get_num_threads()
    path = tmp_path / "results" / "int8.json"
    argv = ["bench", "int8", "--quick", "--threads", "1", "--allow-reference", "--json", str(path)]
    assert main(argv) == 0
    assert torch.get_num_threads() == threads_before

    out = capsys.readouterr().out
    assert "x fp32" in out and "sparseq Int8Linear (a7)" in out

    result = json.loads(path.read_text())
    assert set(result) == {"machine", "settings", "rows", "notes"}
    for key in ("cpu_model", "threads", "torch", "date", "extension_built", "cpu_features"):
        assert key in result["machine"]
    assert result["machine"]["threads"] == 1
    assert result["settings"]["M"] == [1, 3] and result["settings"]["KN"] == [[64, 48]]

    rows = result["rows"]
    impls = {row["impl"] for row in rows}
    assert {"fp32 nn.Linear", "sparseq Int8Linear (a8)", "sparseq Int8Linear (a7)",
            "sparseq Int8WeightOnlyLinear"} <= impls
    assert {(row["M"], row["K"], row["N"]) for row in rows} == {(1, 64, 48), (3, 64, 48)}
    has_torch_int8 = "torch dynamic int8" in impls
    for row in rows:
        assert row["ms"] > 0
        assert {"M", "K", "N", "impl", "backend", "dtype", "speedup_vs_fp32"} <= set(row)
        assert ("speedup_vs_torch_int8" in row) == has_torch_int8
    # Without a quantized engine the bench must say why the column is missing.
    assert has_torch_int8 or any("torch dynamic int8" in note for note in result["notes"])


def test_bench_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "int8", "--kn", "64by48"])
    assert exit_info.value.code == 2
    assert "KxN" in capsys.readouterr().err


def test_bench_without_kernels_leaves_sparseq_rows_out_unless_asked(tiny_quick_bench, monkeypatch):
    monkeypatch.setattr(bench.ops, "ext_supports", lambda device: False)
    result = bench.bench_int8(bench.QUICK_M, bench.QUICK_KN, repeats=1, warmup=0)
    assert {row["backend"] for row in result["rows"]} == {"torch"}
    assert any("sparseq rows skipped" in note for note in result["notes"])
    result = bench.bench_int8(bench.QUICK_M, bench.QUICK_KN, repeats=1, warmup=0, allow_reference=True)
    assert "reference" in {row["backend"] for row in result["rows"]}


def test_bench_cold_cycles_through_weight_copies(tiny_quick_bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: 64 * 48 * 2)  # -> 4 copies
    path = tmp_path / "cold.json"
    assert main(["bench", "int8", "--quick", "--cold", "--allow-reference", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["weights"] == "cold"
    assert {row["weight_copies"] for row in result["rows"]} == {4}
