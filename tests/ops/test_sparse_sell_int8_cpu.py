"""CPU sparse_sell_int8_linear (W8A8 on a sliced-ELL int8 weight) against sparseq._ref: bit-exact
outputs on every CPU path (the AVX-512 VBMI2 kernel where the CPU has it, the AVX2 kernel, the
portable loop), and a clear error for every kind of inconsistent weight."""
from __future__ import annotations

import pytest
import torch

import sparseq
from sparseq import _ref
from sparseq.formats import SlicedEllInt8Weight

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

from .test_int8_cpu import kernel_path  # noqa: E402,F401  (fixture: runs a test on each CPU path)

ops = torch.ops.sparseq
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (M, K, N): K below, at and past one 64-column block and not a multiple of it; N around a slice.
SHAPES = [(1, 1, 1), (2, 3, 5), (1, 64, 16), (7, 65, 17), (17, 130, 33), (16, 300, 15), (33, 1031, 19),
          (4097, 67, 3)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pruned(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Random weight with that share of zeros, plus one all-zero row and one full row."""
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0.0
    if n >= 3:
        w[1] = 0.0
        w[2] = torch.randn(k, generator=gen)
    return w


def _packed(n, k, sparsity, seed):
    return SlicedEllInt8Weight.pack(_pruned(n, k, sparsity, _gen(seed)))


def _args(p: SlicedEllInt8Weight):
    return [p.block_step_ptr, p.step_masks, p.slice_ptr, p.col_offsets, p.values, p.scale]


def _assert_bit_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("act_qmax", (63, 127))
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", (0.0, 0.7, 0.95))
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_sell_int8_matches_reference_exactly(kernel_path, m, k, n, sparsity, x_dtype, act_qmax):
    gen = _gen(m * 7919 + k * 31 + n)
    p = _packed(n, k, sparsity, m + k + n)
    x = (torch.randn(m, k, generator=gen) * 3).to(x_dtype)
    bias = torch.randn(n, generator=gen) if k % 2 else None
    out = ops.sparse_sell_int8_linear(x, *_args(p), bias, act_qmax)
    _assert_bit_exact(out, _ref.sparse_sell_int8_linear(x, *_args(p), bias, act_qmax))


def test_sell_int8_extreme_codes_and_activations(kernel_path):
    # Codes of +-127 everywhere and activations at +-qmax: the largest products and sums.
    gen = _gen(3)
    w = torch.where(torch.rand(40, 200, generator=gen) < 0.5, -1.0, 1.0)
    w[torch.rand(40, 200, generator=gen) < 0.5] = 0.0
    p = SlicedEllInt8Weight.pack(w)
    assert set(p.values.abs().unique().tolist()) == {127}
    x = torch.where(torch.rand(20, 200, generator=gen) < 0.5, -5.0, 5.0)
    for act_qmax in (63, 127):
        out = ops.sparse_sell_int8_linear(x, *_args(p), None, act_qmax)
        _assert_bit_exact(out, _ref.sparse_sell_int8_linear(x, *_args(p), None, act_qmax))


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
def test_sell_int8_nonfinite_rows_give_nan(kernel_path, x_dtype):
    p = _packed(20, 70, 0.5, 4)
    x = torch.randn(5, 70, generator=_gen(5)).to(x_dtype)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    out = ops.sparse_sell_int8_linear(x, *_args(p), None, 127)
    _assert_bit_exact(out, _ref.sparse_sell_int8_linear(x, *_args(p), None, 127))
    assert out[1].isnan().all() and out[3].isnan().all() and not out[0].isnan().any()


def test_sell_int8_empty_inputs(kernel_path):
    p = _packed(5, 12, 0.5, 6)
    assert ops.sparse_sell_int8_linear(torch.randn(0, 12), *_args(p), None, 127).shape == (0, 5)
    p = _packed(0, 12, 0.5, 6)
    assert ops.sparse_sell_int8_linear(torch.randn(3, 12), *_args(p), None, 127).shape == (3, 0)
    p = SlicedEllInt8Weight.pack(torch.zeros(9, 12))  # no entries at all: bias only
    assert p.nnz == 0 and p.step_masks.numel() == 0
    bias = torch.randn(9)
    out = ops.sparse_sell_int8_linear(torch.randn(3, 12), *_args(p), bias, 127)
    _assert_bit_exact(out, bias.expand(3, 9))


# Hand-made corruptions of a valid weight (tensors in _args order), each of which the kernels
# must refuse rather than read out of bounds or answer differently from the reference.
def _corrupt(p: SlicedEllInt8Weight, what: str):
    args = [t.clone() for t in _args(p)]
    ptr, masks, slice_ptr, offsets = args[0], args[1], args[2], args[3]
    if what == "step pointer decreases":
        ptr[1], ptr[2] = ptr[2].item(), ptr[1].item()
    elif what == "step pointer past the steps":
        ptr[1:-1] = ptr[-1] + 3
    elif what == "mask marks an extra entry":
        t = int(torch.nonzero(masks[:-1] != -1)[0])  # a step of a full slice with a free lane
        masks[t] |= masks[t] + 1  # sets its lowest clear bit
    elif what == "mask drops an entry":
        masks[0] &= masks[0] - 1
    elif what == "lane of a row past N":
        masks[-1] |= 1 << 63
    elif what == "offset past the block":
        offsets[0] = 64
    elif what == "offset past K":
        offsets[-1] = 63
    elif what == "slice pointer shifted":
        slice_ptr[1] += 1
    elif what == "pointer ends":
        ptr[0] = 1
    return args


CORRUPTIONS = ["step pointer decreases", "step pointer past the steps", "mask marks an extra entry",
               "mask drops an entry", "lane of a row past N", "offset past the block", "offset past K",
               "slice pointer shifted", "pointer ends"]


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_inconsistent_weights_are_refused(kernel_path, what):
    # N = 37 leaves lanes of rows past N in the last slice; K = 100 a part-filled last block.
    p = SlicedEllInt8Weight.pack(_pruned(37, 100, 0.3, _gen(8)))
    assert int(p.col_offsets[-1]) < 36, "the last entry must sit in the short last block"
    args = _corrupt(p, what)
    x = torch.randn(4, 100, generator=_gen(9))
    with pytest.raises(RuntimeError, match="sliced-ELL"):
        ops.sparse_sell_int8_linear(x, *args, None, 127)
    with pytest.raises(RuntimeError, match="sliced-ELL"):
        sparseq.ops.sparse_sell_int8_linear(x, *args, backend="cpu")
    with pytest.raises(ValueError, match="sliced-ELL"):
        sparseq.ops.sparse_sell_int8_linear(x, *args, backend="reference")


def test_bad_arguments():
    p = _packed(8, 20, 0.5, 10)
    x = torch.randn(3, 20, generator=_gen(11))
    args = _args(p)
    with pytest.raises(ValueError, match="act_qmax"):
        sparseq.ops.sparse_sell_int8_linear(x, *args, None, 100, backend="cpu")
    with pytest.raises(ValueError, match="in_features"):
        sparseq.ops.sparse_sell_int8_linear(x[:, :16], *args, in_features=20, backend="cpu")
    with pytest.raises(ValueError, match="pointers for N=8, K=80"):
        sparseq.ops.sparse_sell_int8_linear(x[:, :16].repeat(1, 5), *args, backend="cpu")
    with pytest.raises(TypeError, match="w_scale"):
        sparseq.ops.sparse_sell_int8_linear(x, *args[:-1], args[-1].double(), backend="cpu")
    with pytest.raises(TypeError, match="needs int8 values"):
        sparseq.ops.sparse_sell_int8_linear(x, *args[:4], args[4].float(), args[5], backend="cpu")
    with pytest.raises(RuntimeError, match="act_qmax"):
        ops.sparse_sell_int8_linear(x, *args, None, 100)
    with pytest.raises(RuntimeError, match="values must be a contiguous 1-D Char"):
        ops.sparse_sell_int8_linear(x, *args[:4], args[4].float(), args[5], None, 127)
    with pytest.raises(RuntimeError, match="block_step_ptr and"):  # N=20: two slices, not one
        ops.sparse_sell_int8_linear(x, *args[:-1], torch.ones(20), None, 127)
    with pytest.raises(RuntimeError, match="sliced-ELL weight is inconsistent"):  # N=4: rows 4..7 are past N
        ops.sparse_sell_int8_linear(x, *args[:-1], args[-1][:4].contiguous(), None, 127)
    with pytest.raises(RuntimeError, match="bias"):
        ops.sparse_sell_int8_linear(x, *args, torch.randn(5), 127)


def test_opcheck():
    p = _packed(20, 137, 0.8, 12)
    x = torch.randn(5, 137, generator=_gen(13))
    for act_qmax in (63, 127):
        for bias in (None, torch.randn(20, generator=_gen(14))):
            torch.library.opcheck(ops.sparse_sell_int8_linear.default, (x, *_args(p), bias, act_qmax))


def test_compile_fullgraph():
    p = _packed(24, 40, 0.6, 15)
    x = torch.randn(6, 40, generator=_gen(16))

    def f(x):
        return torch.relu(sparseq.ops.sparse_sell_int8_linear(x, *_args(p), None, 127))

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
