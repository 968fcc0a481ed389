"""weight_checked=True on the ops doors (the layers' fast path): the Python checks of the weight
tensors are skipped only when the compiled kernel runs, whose C++ checks refuse a bad tensor
anyway. So a corrupted weight either gives exactly the default path's answer or raises, never a
silent wrong result; on the reference path (and without the extension) nothing changes at all.
"""
import pytest
import torch

import sparseq
from sparseq import ops
from sparseq.formats import BlockSparseWeight, PackedInt8Weight, SlicedEllInt8Weight, Sparse24Weight, SparseCSRWeight

K, N, M = 37, 40, 3  # K not a multiple of 4 / of a segment: the padded paths run


def _weight(pattern="unstructured"):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen)
    if pattern == "2:4":
        g = torch.nn.functional.pad(w, (0, 3)).view(N, -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
        return (g * keep).view(N, -1)[:, :K]
    return w * (torch.rand(N, K, generator=gen) > 0.6)


def _bias():
    return torch.randn(N, generator=torch.Generator().manual_seed(2))


def _case(name):
    """(door, positional weight arguments after x, keyword arguments) for one door."""
    if name in ("int8_linear", "int8_linear_static", "int8_weight_only_linear"):
        p = PackedInt8Weight.pack(_weight())
        if name == "int8_linear":
            return ops.int8_linear, [p.packed, p.scale, p.rowsum, _bias()], {"act_qmax": 63}
        if name == "int8_linear_static":
            return (ops.int8_linear_static, [torch.tensor([0.02]), p.packed, p.scale, p.rowsum, _bias()],
                    {"act_qmax": 127})
        return ops.int8_weight_only_linear, [p.packed, p.scale, _bias()], {}
    if name.startswith("csr"):
        p = SparseCSRWeight.pack(_weight(), int8=name == "csr_int8")
        return ops.sparse_csr_linear, [p.seg_ptr, p.col_offsets, p.values, p.scale, _bias()], {}
    if name.startswith("sparse24"):
        p = Sparse24Weight.pack(_weight("2:4"), int8=True)
        if name == "sparse24_int8_linear":
            return ops.sparse24_int8_linear, [p.values, p.meta, p.scale, _bias()], {"act_qmax": 127}
        return ops.sparse24_linear, [p.values, p.meta, p.scale, _bias()], {}
    if name == "sell_int8_linear":
        p = SlicedEllInt8Weight.pack(_weight())
        return (ops.sparse_sell_int8_linear,
                [p.block_step_ptr, p.step_masks, p.slice_ptr, p.col_offsets, p.values, p.scale, _bias()],
                {"act_qmax": 127})
    p = BlockSparseWeight.pack(_weight(), (4, 4))
    return (ops.bsr_linear, [p.block_row_ptr, p.block_col_idx, p.values, p.scale, _bias()],
            {"out_features": N, "indices_validated": True})


CASES = ["int8_linear", "int8_linear_static", "int8_weight_only_linear", "csr", "csr_int8", "sparse24_linear",
         "sparse24_int8_linear", "sell_int8_linear", "bsr"]


def _outcome(door, x, weights, kwargs):
    """("ok", output) or (exception type, message)."""
    try:
        return "ok", door(x, *weights, in_features=K, **kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        return type(exc), str(exc)


def _strided(t):
    """Same values and shape, not contiguous (every other element of a doubled tensor)."""
    return t.repeat_interleave(2, dim=0)[::2]


CORRUPTIONS = {
    "float64": lambda t: t.to(torch.float64),
    "one short": lambda t: t[:-1].contiguous(),
    "int16": lambda t: t.to(torch.int16),
    "strided": _strided,
    "on meta": lambda t: t.to("meta"),
}


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", CASES)
def test_good_weights_give_the_default_paths_output_exactly(name, backend):
    door, weights, kwargs = _case(name)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    expected = door(x, *weights, in_features=K, backend=backend, **kwargs)
    assert torch.equal(door(x, *weights, in_features=K, backend=backend, weight_checked=True, **kwargs), expected)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("name", CASES)
def test_a_corrupted_weight_raises_or_changes_nothing(name, corruption):
    door, weights, kwargs = _case(name)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    for i, tensor in enumerate(weights):
        if tensor is None or tensor.shape[0] < 2:
            continue
        bad = list(weights)
        bad[i] = CORRUPTIONS[corruption](tensor)
        default = _outcome(door, x, bad, kwargs)
        reference = _outcome(door, x, bad, dict(kwargs, backend="reference"))
        checked_reference = _outcome(door, x, bad, dict(kwargs, backend="reference", weight_checked=True))
        checked = _outcome(door, x, bad, dict(kwargs, weight_checked=True))
        where = f"{name}: argument {i + 1} {corruption}"
        # The reference path keeps every Python check: the same answer or the same error.
        assert _same(checked_reference, reference), where
        if not sparseq.HAS_EXT:
            assert _same(checked, default), where
        elif default[0] != "ok":
            assert checked[0] != "ok", f"{where}: the default path refused it ({default[1]}) but weight_checked ran"
        else:
            # The default path copes (e.g. it makes a strided weight contiguous); the kernel's
            # C++ checks may refuse such a tensor instead, with a clear error, or compute the same.
            assert checked[0] in ("ok", RuntimeError), where
            assert checked[0] != "ok" or torch.equal(checked[1], default[1]), where
            if checked[0] == RuntimeError:
                assert checked[1].startswith("sparseq"), checked[1]


def _same(a, b):
    if a[0] == "ok" and b[0] == "ok":
        return torch.equal(a[1], b[1])
    return a == b


@pytest.mark.parametrize("name", ["int8_linear", "int8_linear_static", "sparse24_int8_linear", "sell_int8_linear"])
def test_bad_act_qmax_keeps_its_python_error(name):
    door, weights, kwargs = _case(name)
    x = torch.randn(M, K)
    with pytest.raises(ValueError, match="act_qmax must be 127"):
        door(x, *weights, in_features=K, weight_checked=True, **dict(kwargs, act_qmax=100))


@pytest.mark.parametrize("name", CASES)
def test_activation_is_still_checked_in_python(name):
    door, weights, kwargs = _case(name)
    with pytest.raises(ValueError, match="x has K=36 features but the weight expects in_features=37"):
        door(torch.randn(M, K - 1), *weights, in_features=K, weight_checked=True, **kwargs)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        door(torch.randn(M, K).double(), *weights, in_features=K, weight_checked=True, **kwargs)
    with pytest.raises(ValueError, match="unknown backend"):
        door(torch.randn(M, K), *weights, in_features=K, weight_checked=True, backend="gpu", **kwargs)


@pytest.mark.skipif(not sparseq.HAS_EXT, reason="the raw ops exist only with the compiled extension")
def test_raw_op_refuses_a_meta_weight_beside_a_real_x():
    # The fake kernels double as Meta kernels: without their device check a meta weight made the
    # raw op return an uninitialized real tensor.
    _, (packed, scale, rowsum, bias), _ = _case("int8_linear")
    with pytest.raises(RuntimeError, match="every tensor must be on x's device"):
        torch.ops.sparseq.int8_linear.default(torch.randn(M, K), packed.to("meta"), scale, rowsum, bias, 63)
