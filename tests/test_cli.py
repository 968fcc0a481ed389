import contextlib
import importlib.util
import io
import json
import math
import shutil

import pytest
import torch

import sparseq
from sparseq import bench, models
from sparseq.calib import main_output
from sparseq.cli import main

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("sparseq:", "torch:", "extension:", "CPU features:", "CUDA archs compiled:",
                "CUDA available:", "Triton:"):
        assert key in out, (key, out)
    assert torch.__version__ in out
    sell = "fast kernel on this CPU" if sparseq.ops.cpu_has_sell_kernel() else "AVX2 kernel, or a portable loop"
    assert "SparseInt8 W8A8:" in out and sell in out


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["bench", "--help"],
                                  ["bench", "int8", "--help"], ["bench", "sparse", "--help"],
                                  ["bench", "model", "--help"], ["compress", "--help"], ["inspect", "--help"]])
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
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: 64 * 48 * 8)
    path = tmp_path / "cold.json"
    assert main(["bench", "int8", "--quick", "--cold", "--allow-reference", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["weights"] == "cold"
    # Each column cycles through twice the "cache" in its own bytes: 12.5 KB of fp32 -> 4 copies.
    copies = {row["impl"]: row["weight_copies"] for row in result["rows"]}
    assert copies[bench.FP32] == 4
    assert all(count > 4 for impl, count in copies.items() if "int8" in impl.lower()), copies


def test_cold_copies_count_each_modules_own_bytes(monkeypatch):
    from sparseq import bench_sparse

    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: 1 << 20)
    cpu = torch.device("cpu")
    linear = torch.nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(128, 256) > 0.9)
    nnz = int((linear.weight != 0).sum())
    assert bench.held_bytes(linear) == (256 * 128 + 128) * 4
    # torch's CSR weight is a plain attribute, not state: its three arrays still count.
    assert bench.held_bytes(bench_sparse.TorchCSRLinear(linear)) == 129 * 8 + nnz * (8 + 4) + 128 * 4
    torch_int8, why_not = bench._torch_dynamic_int8(linear)
    if torch_int8 is not None:  # torch's packed int8 weight is counted through its state
        assert 256 * 128 <= bench.held_bytes(torch_int8) < 256 * 128 * 2
    assert bench.cold_copies(linear, cpu) == math.ceil(2 * (1 << 20) / ((256 * 128 + 128) * 4))
    assert bench.cold_copies(torch.nn.Linear(2048, 2048), cpu) == 2  # never fewer than two
    assert bench.cold_copies(torch.nn.Linear(2, 2), cpu) == bench.MAX_COLD_COPIES


def test_cold_refuses_what_memory_cannot_hold(monkeypatch, capsys):
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: 1 << 30)
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: 4 << 30)
    with pytest.raises(MemoryError, match=r"--cold needs about 14.0 GiB on cpu \(7 timed columns"):
        bench.check_cold_fits(7, torch.device("cpu"))
    bench.check_cold_fits(1, torch.device("cpu"))
    argv = ["bench", "sparse", "--m", "1", "--kn", "64x48", "--sparsity", "0.9", "--pattern", "unstructured",
            "--repeats", "1", "--allow-reference", "--no-progress", "--cold"]
    assert main(argv) == 2
    assert "sparseq bench sparse: error: --cold needs about" in capsys.readouterr().err


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
    assert "sparse/fp32" in out and "sparse/t.csr" in out and "sp.int8/t.int8" in out and "sp.w8a8/t.int8" in out
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
        assert {"fp32_ms", "torch_csr_ms", "sparse_ms", "sparse_int8_ms", "sparse_w8a8_ms", "sparse_vs_fp32",
                "sparse_vs_torch_csr", "sparse_vs_sparseq_int8_dense", "sparse_w8a8_vs_sparseq_int8_dense"} <= set(row)
        assert row["sparse_vs_fp32"] == pytest.approx(row["fp32_ms"] / row["sparse_ms"])
        assert row["sparse_w8a8_format"] in ("sell", "2:4")
    two_four = [row for row in rows if row["pattern"] == "2:4"]
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in two_four)
    blocks = [row for row in rows if row["pattern"] == "block" and row["sparsity"] > 0.7]
    assert blocks and all(0.75 <= row["sparsity"] <= 1.0 for row in blocks)
    assert "2:4 is timed at 50% sparsity only" in result["notes"]
    text = bench_sparse.format_table(rows)
    assert "block 4x4" in text and "unstructured" in text


def test_bench_sparse_cold_cycles_through_weight_copies(monkeypatch, tmp_path):
    from sparseq import bench_sparse

    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: 64 * 48 * 8)
    path = tmp_path / "cold.json"
    argv = ["bench", "sparse", "--m", "1", "--kn", "64x48", "--sparsity", "0.9", "--pattern", "unstructured",
            "--repeats", "1", "--allow-reference", "--no-progress", "--cold", "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["weights"].startswith("cold")
    [copies] = [row["weight_copies"] for row in result["rows"]]
    timed = {name[:-len("_ms")] for name in result["rows"][0] if name.endswith("_ms")}
    assert set(copies) == timed
    # 12.5 KB of fp32 against a 24 KB "cache": 4 copies; the 90%-sparse layers need more.
    assert copies[bench_sparse.FP32] == 4 and copies[bench_sparse.SPARSE] > 4
    # Each copy is its own module with its own weight, computing the same thing (torch's CSR
    # tensors included, which copy.deepcopy cannot copy by itself).
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(48, 64) > 0.9)
    for module in (bench_sparse.TorchCSRLinear(linear), linear):
        turn = bench.weight_rotation(module, 3)
        copies = [next(turn) for _ in range(4)]
        assert copies[3] is copies[0] and len({id(c) for c in copies[:3]}) == 3
        weights = [c.weight.values() if c.weight.layout == torch.sparse_csr else c.weight for c in copies[:3]]
        assert len({w.data_ptr() for w in weights}) == 3
        x = torch.randn(2, 64)
        for c in copies[1:3]:
            torch.testing.assert_close(c(x), copies[0](x), rtol=0, atol=0)


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


def test_bench_int8_writes_png(tiny_quick_bench, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "int8.png"
    assert main(["bench", "int8", "--quick", "--allow-reference", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# sparseq compress / inspect / bench model
# ---------------------------------------------------------------------------------------------

# Small enough for a unit test: 2 inputs per batch, 16 tokens, one timed run.
TINY = ["--batch-size", "2", "--seq-len", "16", "--runs", "1", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `sparseq argv`."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_input_error(argv, capsys, *fragments):
    """The command ends with exit code 2 and a one-line message holding every fragment."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def outputs(model, batches):
    with torch.no_grad():
        return [main_output(model(**b) if isinstance(b, dict) else model(b)) for b in batches]


@pytest.fixture(scope="module")
def demo_compressed(tmp_path_factory):
    """`sparseq compress demo --recipe 2:4+w8a8` run once: (file, json path, stdout)."""
    folder = tmp_path_factory.mktemp("demo")
    out, report = folder / "demo.safetensors", folder / "demo.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["compress", "demo", "--recipe", "2:4+w8a8", "--out", str(out), "--json", str(report)] + TINY)
    assert code == 0
    return out, report, stdout.getvalue()


def test_compress_demo_prints_before_after_and_writes_file_and_json(demo_compressed):
    out, report, stdout = demo_compressed
    for row in ("parameters", "nonzero parameters", "bytes (fp32 tensors / saved file)", "latency (ms, median)",
                "mean cosine to dense", "SQNR to dense (dB)", "SparseInt8Linear[2:4] x12"):
        assert row in stdout, (row, stdout)
    result = json.loads(report.read_text())
    dense, compressed = result["dense"], result["compressed"]
    assert compressed["bytes"] == out.stat().st_size
    assert dense["bytes"] == 4 * sum(p.numel() for p in models.demo_model().parameters())
    assert compressed["size_ratio"] == pytest.approx(compressed["bytes"] / dense["bytes"])
    assert compressed["size_ratio"] < 0.5  # int8 2:4 weights, fp32 embeddings
    assert dense["parameters"] == compressed["parameters"]
    # 2:4 zeroes half of every Linear weight (the embeddings and LayerNorms stay dense).
    assert compressed["nonzero_parameters"] < 0.7 * dense["nonzero_parameters"]
    assert compressed["speedup"] == pytest.approx(dense["latency_ms"] / compressed["latency_ms"])
    assert 0.9 < compressed["mean_cosine"] <= 1.0 and compressed["sqnr_db"] > 10
    assert [next(iter(step)) for step in result["steps"]] == ["prune", "quantize"]


def test_compressed_demo_loads_back_with_the_same_outputs(demo_compressed):
    out, _, _ = demo_compressed
    loaded = sparseq.load(out)
    assert type(loaded).__name__ == "BertModel"
    assert [next(iter(step)) for step in loaded.sparseq_recipe] == ["prune", "quantize"]
    dense = models.demo_model()
    batches = models.demo_batches(dense, batch_size=2, seq_len=16)
    expected = sparseq.compress(models.demo_model(), "2:4+w8a8", calib_data=batches, progress=False)
    for got, want, reference in zip(outputs(loaded.eval(), batches), outputs(expected.eval(), batches),
                                    outputs(dense, batches)):
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, reference)


def test_inspect_prints_verifies_and_writes_json(demo_compressed, capsys):
    out, _, _ = demo_compressed
    code, text, _ = run_cli(["inspect", out], capsys)
    assert code == 0
    assert "transformers BertModel" in text and "SparseInt8Linear" in text and "2:4" in text
    assert "checksums verified" not in text
    code, text, _ = run_cli(["inspect", out, "--verify"], capsys)
    assert code == 0 and "checksums verified" in text
    code, text, _ = run_cli(["inspect", out, "--json"], capsys)
    info = json.loads(text)
    assert code == 0 and info["file_bytes"] == out.stat().st_size and len(info["layers"]) == 12
    code, text, _ = run_cli(["inspect", out, "--verify", "--json"], capsys)
    assert code == 0 and json.loads(text)["verified"] is True


def test_inspect_rejects_bad_files(demo_compressed, tmp_path, capsys):
    out, report, _ = demo_compressed
    data = bytearray(out.read_bytes())
    corrupted = tmp_path / "corrupted.safetensors"
    data[-100] ^= 0xFF  # a byte of the last tensor: only the checksums can tell
    corrupted.write_bytes(bytes(data))
    assert run_cli(["inspect", corrupted], capsys)[0] == 0
    assert_input_error(["inspect", corrupted, "--verify"], capsys, "does not match its checksum")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    assert_input_error(["inspect", truncated], capsys, "truncated or corrupted")
    assert_input_error(["inspect", report], capsys, "not a readable safetensors file")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"inputs": torch.zeros(2)}, str(plain))
    assert_input_error(["inspect", plain], capsys, "no sparseq metadata")
    assert_input_error(["inspect", tmp_path / "missing.safetensors"], capsys, "no such file")


def test_compress_demo_with_a_yaml_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- prune: {method: magnitude, sparsity: 0.9, scope: layer}\n"
                      "- quantize: {scheme: w8a16}\n")
    out = tmp_path / "sub" / "model.safetensors"
    with_progress = [arg for arg in TINY if arg != "--no-progress"]
    code, text, err = run_cli(["compress", "demo", "--recipe", recipe, "--out", out] + with_progress, capsys)
    assert code == 0, err
    assert "compress: 100%" in err  # the progress bar over the steps
    assert "recipe: recipe.yaml" in text and "SparseInt8Linear[csr] x12" in text
    info = sparseq.inspect_file(out)
    assert {layer["class"] for layer in info["layers"]} == {"SparseInt8Linear"}
    assert info["recipe"][0]["prune"]["sparsity"] == 0.9
    loaded = sparseq.load(out)
    batch = models.demo_batches(loaded, 2, 16, count=1)
    assert outputs(loaded, batch)[0].shape == (2, 16, models.DEMO_BERT["hidden_size"])


def test_demo_without_transformers_is_an_mlp(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "_transformers_or_none", lambda: None)
    mlp = models.demo_model()
    assert isinstance(mlp, torch.nn.Sequential) and not mlp.training
    torch.testing.assert_close(mlp[0].weight, models.demo_model()[0].weight, rtol=0, atol=0)
    batches = models.demo_batches(mlp, 3, 16)
    assert batches[0].shape == (3, models.DEMO_MLP_FEATURES[0])
    out = tmp_path / "mlp.safetensors"
    code, text, _ = run_cli(["compress", "demo", "--recipe", "w8a8", "--out", out] + TINY, capsys)
    assert code == 0 and "Int8Linear x3" in text
    assert isinstance(sparseq.load(out), torch.nn.Sequential)


# -- a model saved whole with torch.save, calibration tensors in files ---------------------------

@pytest.fixture
def mlp_files(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    model_path, calib_path, safetensors_path = tmp_path / "mlp.pt", tmp_path / "calib.pt", tmp_path / "calib.safetensors"
    torch.save(mlp, model_path)
    inputs = torch.randn(12, 32)
    torch.save(inputs, calib_path)
    from safetensors.torch import save_file

    save_file({"inputs": inputs}, str(safetensors_path))
    return mlp, inputs, model_path, calib_path, safetensors_path


@pytest.mark.parametrize("calib_kind", ["torch", "safetensors"])
def test_compress_a_torch_saved_mlp_with_tensor_calibration(mlp_files, calib_kind, tmp_path, capsys):
    mlp, inputs, model_path, calib_path, safetensors_path = mlp_files
    calib = calib_path if calib_kind == "torch" else safetensors_path
    out, report = tmp_path / "mlp.safetensors", tmp_path / "mlp.json"
    code, text, err = run_cli(["compress", model_path, "--recipe", "2:4+w8a8", "--calib", calib, "--out", out,
                               "--json", report, "--batch-size", "5", "--runs", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert "SparseInt8Linear[2:4] x2" in text
    result = json.loads(report.read_text())
    assert result["settings"]["calib_batches"] == 3  # 12 inputs in batches of 5
    assert result["compressed"]["mean_cosine"] > 0.9
    loaded = sparseq.load(out)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(loaded(inputs), mlp(inputs), dim=-1).mean()
    assert cosine == pytest.approx(result["compressed"]["mean_cosine"], abs=1e-4)


def test_compress_trains_on_train_data(mlp_files, tmp_path, capsys):
    _, inputs, model_path, calib_path, _ = mlp_files
    train = tmp_path / "train.pt"
    torch.save(torch.randn(6, 32), train)
    out = tmp_path / "mlp.safetensors"
    code, text, err = run_cli(["compress", model_path, "--recipe", "sparse90", "--calib", calib_path,
                               "--train", train, "--out", out, "--batch-size", "3", "--runs", "1",
                               "--no-progress"], capsys)
    assert code == 0, err
    assert "2 steps on train_data" in text  # 6 training inputs in batches of 3, one epoch


def test_compress_without_calibration_data_skips_latency_and_quality(mlp_files, tmp_path, capsys):
    _, _, model_path, _, _ = mlp_files
    out = tmp_path / "mlp.safetensors"
    code, text, _ = run_cli(["compress", model_path, "--recipe", "w8a16", "--out", out, "--no-progress"], capsys)
    assert code == 0 and out.exists()
    assert "latency and quality were not measured" in text and "mean cosine" not in text


def test_compress_rejects_bad_input(mlp_files, demo_compressed, tmp_path, capsys):
    _, _, model_path, calib_path, _ = mlp_files
    out = tmp_path / "out.safetensors"
    compress = ["compress", model_path, "--out", out, "--no-progress", "--recipe"]
    assert_input_error(compress + ["w4a4"], capsys, "unknown recipe 'w4a4'")
    assert_input_error(compress + [tmp_path / "missing.yaml"], capsys, "missing.yaml")
    assert_input_error(["compress", tmp_path / "nope.pt", "--recipe", "w8a8", "--out", out], capsys,
                       "no such model file or folder")
    assert_input_error(["compress", demo_compressed[0], "--recipe", "w8a8", "--out", out], capsys,
                       "safetensors file", "sparseq inspect")
    state_dict = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(4, 4).state_dict(), state_dict)
    assert_input_error(["compress", state_dict, "--recipe", "w8a8", "--out", out], capsys,
                       "holds a OrderedDict", "state_dict")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    assert_input_error(["compress", garbage, "--recipe", "w8a8", "--out", out], capsys, "cannot read")
    assert_input_error(compress + ["2:4", "--calib", tmp_path / "missing.pt"], capsys, "--calib: no such file")
    wrong_width = tmp_path / "wrong.pt"
    torch.save(torch.randn(4, 10), wrong_width)  # the MLP takes 32 features
    assert_input_error(compress + ["2:4", "--calib", wrong_width], capsys,
                       "--calib data does not fit the model", "batch 0")
    assert_input_error(compress + ["2:4"], capsys, "needs calib_data")
    not_a_tensor = tmp_path / "list.pt"
    torch.save([torch.randn(2, 32)], not_a_tensor)
    assert_input_error(compress + ["2:4", "--calib", not_a_tensor], capsys, "holds a list")
    assert_input_error(["compress", model_path, "--recipe", "w8a8", "--out", tmp_path], capsys, "is a folder")
    assert not out.exists()
    before = model_path.read_bytes()
    assert_input_error(["compress", model_path, "--recipe", "w8a8", "--out", model_path], capsys,
                       "is the MODEL file")
    assert_input_error(compress + ["2:4", "--calib", calib_path, "--out", calib_path], capsys, "is the --calib file")
    assert model_path.read_bytes() == before


# -- a transformers model folder ------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "model", "is", "small", "fast", "sparse",
         "int8", "kernel", "runs", "on", "cpu", "and", "gpu", "."]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BertModel saved with save_pretrained, beside a BertTokenizer over VOCAB, and a text file."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(folder))
    texts = folder.parent / "texts.txt"
    texts.write_text("the model is small .\n\na sparse int8 kernel runs on the cpu .\nthe gpu is fast\n"
                     "int8 and sparse\nthe kernel runs fast on a gpu and a cpu .\n")
    return folder, texts


def test_compress_a_transformers_folder_with_text_calibration(bert_folder, tmp_path, capsys):
    folder, texts = bert_folder
    out, report = tmp_path / "bert.safetensors", tmp_path / "bert.json"
    code, text, err = run_cli(["compress", folder, "--recipe", "2:4+w8a8", "--calib", texts, "--out", out,
                               "--json", report, "--batch-size", "2", "--seq-len", "8", "--runs", "1",
                               "--no-progress"], capsys)
    assert code == 0, err
    assert "transformers model folder: BertModel" in text and "SparseInt8Linear[2:4]" in text
    result = json.loads(report.read_text())
    assert result["settings"]["calib_batches"] == 3  # 5 non-empty lines in batches of 2
    assert result["compressed"]["mean_cosine"] > 0.9
    loaded = sparseq.load(out)
    tokenizer = models.load_tokenizer(models.load_model(str(folder)))
    batch = dict(tokenizer(["a small model ."], return_tensors="pt"))
    dense = models.load_model(str(folder)).model
    with torch.no_grad():
        got, want = loaded.eval()(**batch).last_hidden_state, dense(**batch).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).mean() > 0.9


def test_transformers_folder_bad_input(bert_folder, tmp_path, capsys):
    folder, texts = bert_folder
    out = tmp_path / "bert.safetensors"
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*", "special_tokens*"))
    compress = ["compress", "--out", out, "--no-progress"]
    # Without tokenizer files transformers would build an empty vocabulary: every word [UNK].
    assert_input_error(compress + [bare, "--recipe", "2:4", "--calib", texts], capsys, "cannot load a tokenizer")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error(compress + [empty, "--recipe", "w8a8"], capsys, "without config.json")
    too_many_tokens = tmp_path / "ids.pt"
    torch.save(torch.full((2, 100), 5), too_many_tokens)  # longer than the 64 positions
    assert_input_error(compress + [folder, "--recipe", "w8a8", "--calib", too_many_tokens], capsys,
                       "does not fit the model")
    assert not out.exists()


# -- sparseq bench model ------------------------------------------------------------------------------

def test_bench_model_demo_default_recipes(tmp_path, capsys):
    path, png = tmp_path / "model.json", tmp_path / "model.png"
    argv = ["bench", "model", "demo", "--json", path] + TINY + (["--png", png] if HAS_MATPLOTLIB else [])
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads(path.read_text())
    rows = {row["recipe"]: row for row in result["rows"]}
    # The presets without a distill step; the demo brings its calibration data.
    assert set(rows) == {None, "w8a8", "w8a16", "2:4", "2:4+w8a8"}
    assert rows[None]["speedup"] == 1.0 and rows[None]["mean_cosine"] == 1.0
    for name, row in rows.items():
        assert row["ms"] > 0 and row["speedup"] == pytest.approx(rows[None]["ms"] / row["ms"])
        if name:
            assert 0.9 < row["mean_cosine"] <= 1.0 and row["bytes"] < rows[None]["bytes"]
    assert result["settings"]["latency_batch"] == "input_ids 2x16, attention_mask 2x16"
    assert "w8a16" in text and "speedup" in text
    assert not HAS_MATPLOTLIB or png.read_bytes()[:8] == PNG_MAGIC


def test_bench_model_mlp_with_recipes_and_notes(mlp_files, tmp_path, capsys):
    _, _, model_path, calib_path, _ = mlp_files
    recipe = tmp_path / "half.yaml"
    recipe.write_text("- prune: {method: magnitude, sparsity: 0.5}\n")
    path = tmp_path / "bench.json"
    code, text, err = run_cli(["bench", "model", model_path, "--calib", calib_path, "--recipe", "w8a16",
                               "--recipe", recipe, "--json", path] + TINY, capsys)
    assert code == 0, err
    assert [row["recipe"] for row in json.loads(path.read_text())["rows"]] == [None, "w8a16", "half.yaml"]
    # A recipe that cannot run on this model is noted and left out (2:4 needs in_features % 4 == 0).
    odd = tmp_path / "odd.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(6, 8)), odd)
    inputs = tmp_path / "odd_inputs.pt"
    torch.save(torch.randn(4, 6), inputs)
    code, text, err = run_cli(["bench", "model", odd, "--calib", inputs, "--recipe", "w8a8", "--recipe", "2:4"]
                              + TINY, capsys)
    assert code == 0, err
    assert "note: 2:4: not run" in text


def test_bench_model_rejects_bad_input(mlp_files, tmp_path, capsys):
    _, _, model_path, calib_path, _ = mlp_files
    assert_input_error(["bench", "model", model_path], capsys, "give --calib DATA")
    assert_input_error(["bench", "model", "demo", "--recipe", "nonsense"] + TINY, capsys, "unknown recipe")
    assert_input_error(["bench", "model", "demo", "--seq-len", "4096", "--no-progress"], capsys,
                       "longer than the demo model's")
