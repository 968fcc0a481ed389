"""The layers' forward fast path (a 2-D contiguous input goes to the op as is; the op skips the
Python checks of the buffers, validated when built or loaded): the same outputs as the fully
checked reference path for every input layout, and a buffer broken after building still raises."""
import pytest
import torch
import torch.nn as nn

import sparseq
from sparseq.nn import (BlockSparseLinear, Int8Linear, Int8WeightOnlyLinear, Sparse24Linear, SparseInt8Linear,
                        SparseLinear)

K, N = 37, 24


def _linear(pattern):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(K, N)
    w = torch.randn(N, K, generator=gen)
    if pattern == "2:4":
        g = torch.nn.functional.pad(w, (0, 3)).view(N, -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
        w = (g * keep).view(N, -1)[:, :K]
    else:
        w = w * (torch.rand(N, K, generator=gen) > 0.7)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


LAYERS = {
    "csr": ("unstructured", lambda lin, **kw: SparseLinear.from_dense(lin, format="csr", **kw)),
    "int8-csr": ("unstructured", lambda lin, **kw: SparseInt8Linear.from_dense(lin, format="csr", **kw)),
    "2:4": ("2:4", lambda lin, **kw: Sparse24Linear.from_dense(lin, **kw)),
    "int8-2:4-w8a8": ("2:4", lambda lin, **kw: SparseInt8Linear.from_dense(lin, act_bits=8, **kw)),
    "bsr": ("unstructured", lambda lin, **kw: BlockSparseLinear.from_dense(lin, block=(4, 4), **kw)),
    "dense": ("unstructured", lambda lin, **kw: SparseLinear.from_dense(lin, format="dense", **kw)),
    "w8a8": ("unstructured", lambda lin, **kw: Int8Linear.from_dense(lin, **kw)),
    "w8-weight-only": ("unstructured", lambda lin, **kw: Int8WeightOnlyLinear.from_dense(lin, **kw)),
}


def _pair(name):
    pattern, make = LAYERS[name]
    linear = _linear(pattern)
    return make(linear), make(linear, backend="reference")


INPUTS = {
    "2-D contiguous": lambda: torch.randn(5, K),
    "2-D transposed": lambda: torch.randn(K, 5).t(),
    "2-D row slice": lambda: torch.randn(5, 2 * K)[:, ::2],
    "3-D": lambda: torch.randn(2, 3, K),
    "1-D": lambda: torch.randn(K),
}


@pytest.mark.parametrize("layout", INPUTS)
@pytest.mark.parametrize("name", LAYERS)
def test_every_input_layout_matches_the_checked_reference_path(name, layout):
    layer, reference = _pair(name)
    x = INPUTS[layout]()
    with torch.no_grad():
        out = layer(x)
        expected = reference(x)
    assert out.shape == x.shape[:-1] + (N,)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if layout == "2-D contiguous":  # the flat path hands back the op's own output
        assert out.is_contiguous()


@pytest.mark.parametrize("name,buffer", [("csr", "values"), ("int8-csr", "w_scale"), ("2:4", "meta"),
                                         ("bsr", "block_col_idx"), ("w8a8", "w_scale"),
                                         ("w8-weight-only", "w_packed"), ("int8-2:4-w8a8", "values")])
def test_a_buffer_broken_after_building_raises(name, buffer):
    layer, _ = _pair(name)
    setattr(layer, buffer, getattr(layer, buffer)[:-1].clone())
    # The kernel's C++ checks, else (reference path) the door's Python ones.
    expected, message = (RuntimeError, "^sparseq: ") if sparseq.HAS_EXT else (ValueError, "must be|need")
    with torch.no_grad(), pytest.raises(expected, match=message):
        layer(torch.randn(2, K))


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "dense"])
def test_buffers_on_another_device_than_x_raise(name):
    layer, _ = _pair(name)
    layer.to("meta")
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="device|is on meta"):
        layer(torch.randn(2, K))
