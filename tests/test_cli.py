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
                                  ["bench", "int8", "--help"], ["bench", "sparse", "--help"]])
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


# ---------------------------------------------------------------------------------------------
# sparseq bench sparse
# ---------------------------------------------------------------------------------------------

def test_bench_sparse_writes_table_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the PNG part; the rest is covered below without it
    path, png = tmp_path / "sparse.json", tmp_path / "sparse.png"
    argv = ["bench", "sparse", "--m", "1,3", "--kn", "64x48", "--sparsity", "0.5,0.9", "--repeats", "1",
            "--allow-reference", "--no-progress", "--json", str(path), "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sparse/fp32" in out and "sparse/t.csr" in out and "sp.int8/t.int8" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(path.read_text())
    assert result["settings"]["patterns"] == ["unstructured", "2:4", "block"]


def test_bench_sparse_rows_cover_the_grid(capsys):
    from sparseq import bench_sparse

    result = bench_sparse.bench_sparse(sparsities=(0.5, 0.9), m_values=(1, 5), kn_values=((64, 40),),
                                       repeats=1, warmup=0, allow_reference=True)
    rows = result["rows"]
    # 2:4 only at 50%: (unstructured, block) x 2 sparsities + 2:4, each for 2 M values
    assert len(rows) == (2 * 2 + 1) * 2
    for row in rows:
        assert {"fp32_ms", "torch_csr_ms", "sparse_ms", "sparse_int8_ms", "sparse_vs_fp32",
                "sparse_vs_torch_csr", "sparse_vs_sparseq_int8_dense"} <= set(row)
        assert row["sparse_vs_fp32"] == pytest.approx(row["fp32_ms"] / row["sparse_ms"])
    two_four = [row for row in rows if row["pattern"] == "2:4"]
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in two_four)
    blocks = [row for row in rows if row["pattern"] == "block" and row["sparsity"] > 0.7]
    assert blocks and all(0.75 <= row["sparsity"] <= 1.0 for row in blocks)
    assert "2:4 is timed at 50% sparsity only" in result["notes"]
    text = bench_sparse.format_table(rows)
    assert "block 4x4" in text and "unstructured" in text


def test_prune_to_patterns():
    from sparseq import bench_sparse
    from sparseq.formats import detect_pattern

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    assert detect_pattern(bench_sparse.prune_to(w, "2:4", 0.5, (4, 4), gen))["is_2_4"]
    blocky = bench_sparse.prune_to(w, "block", 0.8, (4, 4), gen)
    assert {c["block"]: c["fill"] for c in detect_pattern(blocky)["blocks"]}[(4, 4)] == 1.0
    assert abs(float((bench_sparse.prune_to(w, "unstructured", 0.9, (4, 4), gen) == 0).float().mean()) - 0.9) < 0.02
    with pytest.raises(ValueError, match="unknown pattern"):
        bench_sparse.prune_to(w, "random", 0.5, (4, 4), gen)


@pytest.mark.parametrize("argv", [["bench", "sparse", "--sparsity", "1.5"], ["bench", "sparse", "--block", "4by4"]])
def test_bench_sparse_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
