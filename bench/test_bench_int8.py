"""pytest-benchmark view of the int8 kernels against torch's own paths.

Run: .venv/bin/python -m pytest bench/test_bench_int8.py --benchmark-group-by=param:m
(not part of `make test`: timings are never asserted). `sparseq bench int8` prints the same
comparison as a table of ratios.
"""
import warnings

import pytest
import torch

from sparseq import ops
from sparseq.formats import PackedInt8Weight

K = N = 4096
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    return lin, PackedInt8Weight.pack(lin.weight)


@pytest.mark.parametrize("m", [1, 16, 128])
def test_fp32_linear(benchmark, layer, m):
    lin, _ = layer
    x = torch.randn(m, K)
    with torch.no_grad():
        benchmark(lin, x)


@pytest.mark.parametrize("m", [1, 16, 128])
def test_torch_dynamic_int8(benchmark, layer, m):
    lin, _ = layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(m, K)
    with torch.no_grad():
        benchmark(q, x)


@pytest.mark.parametrize("act_qmax", [127, 63])
@pytest.mark.parametrize("m", [1, 16, 128])
def test_sparseq_int8_linear(benchmark, layer, m, act_qmax):
    lin, w = layer
    x = torch.randn(m, K)
    benchmark(ops.int8_linear, x, w.packed, w.scale, w.rowsum, lin.bias.detach(), act_qmax)


@pytest.mark.parametrize("m", [1, 16])
def test_sparseq_weight_only(benchmark, layer, m):
    lin, w = layer
    x = torch.randn(m, K)
    benchmark(ops.int8_weight_only_linear, x, w.packed, w.scale, lin.bias.detach())


def test_sparseq_int8_gemm_512(benchmark):
    a = torch.randint(-128, 128, (512, K), dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    benchmark(ops.int8_gemm, a, b)


def test_fp32_matmul_512(benchmark):
    a, b = torch.randn(512, K), torch.randn(N, K)
    benchmark(torch.matmul, a, b.T)
