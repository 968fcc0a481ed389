"""examples/mnist_deep_compression.py: Deep Compression's LeNet-300-100 on real MNIST."""
import json

import pytest

from test_examples import run_example


def run_mnist(tmp_path, *args):
    path = tmp_path / "mnist.json"
    out = run_example("mnist_deep_compression.py", "--json", str(path), *args)
    return out, json.loads(path.read_text())


def test_fast_mode_prunes_packs_and_reports(tmp_path):
    out, result = run_mnist(tmp_path, "--fast", "--threads", "1")
    assert "weights kept" in out and "packed bytes / fp32 bytes" in out
    # The schedule fixes how many weights survive, whatever the (tiny) training reached.
    assert result["kept"] <= 0.08
    assert result["packed_bytes"] <= result["fp32_bytes"] / 25
    assert all(layer["packed_as"] == "SparseInt8Linear" for layer in result["layers"])
    # A few thousand images and one epoch still learn the digits far beyond chance (90% error).
    assert result["dense_error"] < 20 and result["int8_error"] < 30
    assert result["timings"]["1"]["speedup"] > 0


@pytest.mark.slow
def test_full_mode_meets_the_deep_compression_figures(tmp_path):
    _, result = run_mnist(tmp_path)
    assert result["kept"] <= 0.08
    assert result["pruned_error"] <= 1.7 and result["int8_error"] <= 1.7
    assert result["packed_bytes"] <= result["fp32_bytes"] / 25
