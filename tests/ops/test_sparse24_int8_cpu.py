"""CPU sparse24_int8_linear (W8A8 on 2:4 int8 codes) against sparseq._ref: bit-exact outputs,
on both the AVX2 and the portable path."""
from __future__ import annotations

import pytest
import torch

import sparseq
from sparseq import _ref

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

from .test_int8_cpu import kernel_path  # noqa: E402,F401  (fixture: runs a test on each CPU path)

ops = torch.ops.sparseq
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1, 1, 1), (2, 3, 5), (7, 67, 17), (8, 255, 33), (17, 300, 5), (33, 64, 16), (5, 1031, 19)]  # (M, K, N)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight_2_4(n: int, k: int, gen: torch.Generator, codes: str = "random"):
    """Random 2:4 codes in [-127, 127] with every valid position pair (and zero codes), as
    values, meta and a per-row scale."""
    groups = -(-k // 4)
    if codes == "extremes":
        values = torch.where(torch.rand(n, 2 * groups, generator=gen) < 0.5, -127, 127).to(torch.int8)
    else:
        values = torch.randint(-127, 128, (n, 2 * groups), generator=gen, dtype=torch.int8)
    pairs = torch.tensor([(a, b) for a in range(4) for b in range(a + 1, 4)])
    chosen = pairs[torch.randint(0, len(pairs), (n, groups), generator=gen)]
    nibbles = chosen[..., 0] | chosen[..., 1] << 2
    if groups % 2:
        nibbles = torch.cat([nibbles, torch.zeros(n, 1, dtype=nibbles.dtype)], dim=1)
    meta = (nibbles[:, 0::2] | nibbles[:, 1::2] << 4).to(torch.uint8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return values, meta, scale


def _assert_bit_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("act_qmax", (63, 127))
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_sparse24_int8_matches_reference_exactly(kernel_path, m, k, n, x_dtype, act_qmax):
    gen = _gen(m * 7919 + k * 31 + n)
    values, meta, scale = _weight_2_4(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(x_dtype)
    for bias in (None, torch.randn(n, generator=gen).to(x_dtype)):
        out = ops.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax)
        _assert_bit_exact(out, _ref.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax))


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_sparse24_int8_extreme_codes_and_activations(kernel_path, act_qmax):
    gen = _gen(11)
    values, meta, scale = _weight_2_4(21, 131, gen, codes="extremes")
    # Rows that quantize to +-qmax everywhere, alternating signs, zeros, and a dense random row.
    x = torch.stack([torch.full((131,), 5.0), torch.full((131,), -5.0),
                     torch.where(torch.arange(131) % 2 == 0, 1.0, -1.0), torch.zeros(131),
                     torch.randn(131, generator=gen)])
    out = ops.sparse24_int8_linear(x, values, meta, scale, None, act_qmax)
    _assert_bit_exact(out, _ref.sparse24_int8_linear(x, values, meta, scale, None, act_qmax))


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_sparse24_int8_nonfinite_rows_give_nan(kernel_path, x_dtype):
    gen = _gen(12)
    values, meta, scale = _weight_2_4(18, 70, gen)
    x = torch.randn(6, 70, generator=gen)
    x[1, 3], x[3, 69], x[4, 0] = float("nan"), float("inf"), float("-inf")
    x = x.to(x_dtype)
    bias = torch.randn(18, generator=gen)
    for act_qmax in (63, 127):
        out = ops.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax)
        ref = _ref.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax)
        _assert_bit_exact(out, ref)
        assert out[[1, 3, 4]].isnan().all() and not out[[0, 2, 5]].isnan().any()


def test_sparse24_int8_many_rows(kernel_path):
    gen = _gen(13)
    values, meta, scale = _weight_2_4(17, 45, gen)
    x = torch.randn(4097, 45, generator=gen).to(torch.bfloat16)
    bias = torch.randn(17, generator=gen)
    for act_qmax in (63, 127):
        out = ops.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax)
        _assert_bit_exact(out, _ref.sparse24_int8_linear(x, values, meta, scale, bias, act_qmax))


def test_sparse24_int8_from_packed_weight(kernel_path):
    # The path a layer takes: a pruned dense weight packed by Sparse24Weight.pack(int8=True).
    gen = _gen(14)
    w = torch.randn(40, 96, generator=gen)
    groups = w.view(40, 24, 4)
    drop = groups.abs().argsort(dim=2)[..., :2]
    w = groups.scatter(2, drop, 0.0).view(40, 96)
    packed = sparseq.formats.Sparse24Weight.pack(w, int8=True)
    x = torch.randn(9, 96, generator=gen)
    out = sparseq.ops.sparse24_int8_linear(x, packed.values, packed.meta, packed.scale, None, 127, backend="cpu")
    _assert_bit_exact(out, _ref.sparse24_int8_linear(x, packed.values, packed.meta, packed.scale, None, 127))


def test_sparse24_int8_empty_inputs(kernel_path):
    values, meta, scale = _weight_2_4(5, 12, _gen(15))
    assert ops.sparse24_int8_linear(torch.randn(0, 12), values, meta, scale, None, 127).shape == (0, 5)
    values, meta, scale = _weight_2_4(0, 12, _gen(15))
    assert ops.sparse24_int8_linear(torch.randn(3, 12), values, meta, scale, None, 127).shape == (3, 0)


def test_sparse24_int8_bad_arguments():
    gen = _gen(16)
    values, meta, scale = _weight_2_4(8, 20, gen)
    x = torch.randn(3, 20, generator=gen)
    with pytest.raises(TypeError):
        sparseq.ops.sparse24_int8_linear(x, values.float(), meta, scale, backend="cpu")
    with pytest.raises(ValueError):
        sparseq.ops.sparse24_int8_linear(x, values, meta, scale, None, 100, backend="cpu")
    with pytest.raises(ValueError):
        sparseq.ops.sparse24_int8_linear(x[:, :16], values, meta, scale, backend="cpu")
    with pytest.raises((TypeError, ValueError)):
        sparseq.ops.sparse24_int8_linear(x, values, meta[:, :1], scale, backend="cpu")
    with pytest.raises(RuntimeError, match="int8 values"):
        ops.sparse24_int8_linear(x, values.float(), meta, scale, None, 127)
    with pytest.raises(RuntimeError, match="act_qmax"):
        ops.sparse24_int8_linear(x, values, meta, scale, None, 100)
    with pytest.raises(RuntimeError, match="w_scale"):
        ops.sparse24_int8_linear(x, values, meta, scale[:4], None, 127)


def test_opcheck():
    gen = _gen(17)
    values, meta, scale = _weight_2_4(20, 37, gen)
    x = torch.randn(5, 37, generator=gen)
    for act_qmax in (63, 127):
        for bias in (None, torch.randn(20, generator=gen)):
            torch.library.opcheck(ops.sparse24_int8_linear.default, (x, values, meta, scale, bias, act_qmax))


def test_compile_fullgraph():
    gen = _gen(18)
    values, meta, scale = _weight_2_4(24, 40, gen)
    x = torch.randn(6, 40, generator=gen)

    def f(x):
        return torch.relu(sparseq.ops.sparse24_int8_linear(x, values, meta, scale, None, 127))

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
