"""The examples a user copies from still run (on small sizes) and say what they claim."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quantize_mlp():
    out = run_example("quantize_mlp.py", "--width", "64", "--hidden", "96", "--batch", "3")
    assert "Int8Linear" in out and "state_dict round trip: identical outputs" in out


@pytest.mark.parametrize("int8", [False, True])
def test_prune_and_sparsify(int8):
    out = run_example("prune_and_sparsify.py", "--width", "64", "--hidden", "256", "--batch", "3",
                      *(["--int8"] if int8 else []))
    assert ("SparseInt8Linear" if int8 else "SparseLinear") in out
    difference = float(out.split("max abs difference to the torch-pruned model: ")[1].split()[0])
    assert difference < (0.05 if int8 else 1e-4)
    assert "speedup" in out
