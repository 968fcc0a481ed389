"""Sparse layers: same answers as their to_dense() weight, state_dict round trips, format choice,
bad input; sparsify_ on plain and torch-pruned models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import sparseq
from sparseq.nn import (BlockSparseLinear, Int8Linear, Int8WeightOnlyLinear, Sparse24Linear, SparseInt8Linear,
                        SparseLinear, choose_format)


def pruned_linear(k, n, sparsity, pattern="unstructured", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    w = torch.randn(n, k, generator=gen) / k**0.5
    if pattern == "2:4":
        groups = -(-k // 4)
        g = torch.nn.functional.pad(w, (0, groups * 4 - k)).view(n, groups, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
        w = (g * keep).view(n, groups * 4)[:, :k]
    elif isinstance(pattern, tuple):
        bh, bw = pattern
        blocks = torch.rand(-(-n // bh), -(-k // bw), generator=gen) >= sparsity
        w = w * blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    else:
        w = w * (torch.rand(n, k, generator=gen) >= sparsity)
    with torch.no_grad():
        linear.weight.copy_(w)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return linear


def gaussian(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# name -> (pattern of the pruned weight, factory)
LAYERS = {
    "csr": ("unstructured", lambda lin: SparseLinear.from_dense(lin, format="csr")),
    "auto-csr": ("unstructured", lambda lin: SparseLinear.from_dense(lin)),
    "2:4": ("2:4", lambda lin: Sparse24Linear.from_dense(lin)),
    "bsr-4x4": ((4, 4), lambda lin: BlockSparseLinear.from_dense(lin, block=(4, 4))),
    "bsr-1x8": ((1, 8), lambda lin: SparseLinear.from_dense(lin, format="bsr", block=(1, 8))),
    "bsr-auto-block": ((16, 16), lambda lin: BlockSparseLinear.from_dense(lin)),
    "dense": ("unstructured", lambda lin: SparseLinear.from_dense(lin, format="dense")),
    "int8-csr": ("unstructured", lambda lin: SparseInt8Linear.from_dense(lin)),
    "int8-2:4": ("2:4", lambda lin: SparseInt8Linear.from_dense(lin)),
    "int8-bsr": ((4, 4), lambda lin: SparseInt8Linear.from_dense(lin, format="bsr", block=(4, 4))),
    "int8-2:4-w8a8": ("2:4", lambda lin: SparseInt8Linear.from_dense(lin, format="2:4", act_bits=8)),
    "int8-auto-w8a8": ("2:4", lambda lin: SparseInt8Linear.from_dense(lin, act_bits=8)),
    "int8-sell-w8a8": ("unstructured", lambda lin: SparseInt8Linear.from_dense(lin, act_bits=8)),
    "int8-sell-act7-w8a8": ("unstructured", lambda lin: SparseInt8Linear.from_dense(lin, format="sell", act_bits=7)),
}


def build(name, k=67, n=40, sparsity=0.8, bias=True):
    pattern, make = LAYERS[name]
    linear = pruned_linear(k, n, 0.0 if pattern == "2:4" else sparsity, pattern, bias=bias)
    return linear, make(linear)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_output_matches_its_dense_weight(name, bias):
    linear, layer = build(name, bias=bias)
    dense = layer.to_dense()
    x = gaussian(2, 3, 67)
    out = layer(x)
    assert out.shape == (2, 3, 40) and out.dtype == torch.float32
    tol = 0.05 if name.endswith("w8a8") else 1e-5  # W8A8 also rounds the activations
    torch.testing.assert_close(out, dense(x), rtol=tol, atol=tol)
    if not name.startswith("int8"):
        # float formats store the pruned weight exactly
        assert torch.equal(dense.weight, linear.weight)


@pytest.mark.parametrize("name", ["csr", "2:4", "bsr-4x4", "dense", "int8-csr"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_and_model(name, dtype):
    _, layer = build(name)
    x = gaussian(17, 67)
    expected = layer.to_dense()(x)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    layer.to(dtype)  # values follow the model's dtype, scales and bias stay fp32
    assert layer.bias.dtype == torch.float32
    if layer.w_scale is not None:
        assert layer.w_scale.dtype == torch.float32
    torch.testing.assert_close(layer(x.to(dtype)).float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trip_into_a_fresh_skeleton(name):
    _, layer = build(name)
    skeleton = SparseInt8Linear(67, 40) if name.startswith("int8") else SparseLinear(67, 40)
    skeleton.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert (skeleton.format, skeleton.block, skeleton.int8) == (layer.format, layer.block, layer.int8)
    x = gaussian(5, 67)
    assert torch.equal(skeleton(x), layer(x))


def test_corrupt_state_dict_is_refused():
    _, layer = build("csr")
    state = layer.state_dict()
    bad = dict(state, seg_ptr=state["seg_ptr"].flip(0))
    with pytest.raises(RuntimeError, match="inconsistent"):
        SparseLinear(67, 40).load_state_dict(bad)
    bad = dict(state, _extra_state={"format": "zigzag"})
    with pytest.raises(RuntimeError, match="does not describe a sparse format"):
        SparseLinear(67, 40).load_state_dict(bad)
    missing = {key: value for key, value in state.items() if key != "col_offsets"}
    with pytest.raises(RuntimeError, match="col_offsets"):
        SparseLinear(67, 40).load_state_dict(missing)


def test_packed_bytes_and_repr():
    linear = pruned_linear(4096, 64, 0.9)
    layer = SparseLinear.from_dense(linear)
    assert layer.nbytes <= 0.15 * 4096 * 64 * 4
    assert SparseInt8Linear.from_dense(linear).nbytes <= 0.08 * 4096 * 64 * 4
    text = repr(layer)
    assert "format=csr (unstructured, 90% zeros)" in text and "of dense fp32" in text
    assert abs(layer.sparsity - 0.9) < 0.01


def test_choose_format():
    assert choose_format(pruned_linear(256, 64, 0.9).weight).format == "csr"
    assert choose_format(pruned_linear(256, 64, 0.2).weight).format == "dense"
    assert choose_format(pruned_linear(256, 64, 0.2).weight, int8=True).format == "csr"
    assert choose_format(pruned_linear(256, 64, 0.0, "2:4").weight).format == "2:4"
    blocky = choose_format(pruned_linear(256, 64, 0.8, (8, 8)).weight)
    assert blocky.format == "bsr" and blocky.block == (8, 8)
    # every block holds a nonzero: blocks would skip nothing
    assert choose_format(pruned_linear(256, 64, 0.2, "unstructured").weight).format != "bsr"
    layer = SparseLinear.from_dense(pruned_linear(256, 64, 0.2))
    assert layer.format == "dense" and "sparse kernels would be slower" in repr(layer)


def test_input_gradient_goes_through_the_sparse_weight():
    linear, layer = build("csr")
    x = gaussian(4, 67).requires_grad_()
    layer(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    linear(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(build("csr")[1], nn.GELU(), SparseLinear.from_dense(pruned_linear(40, 64, 0.0, "2:4")),
                          nn.ReLU(), BlockSparseLinear.from_dense(pruned_linear(64, 24, 0.7, (4, 4)), block=(4, 4)),
                          SparseInt8Linear.from_dense(pruned_linear(24, 8, 0.0, "2:4"), act_bits=8),
                          SparseInt8Linear.from_dense(pruned_linear(8, 8, 0.0, "2:4"), format="2:4", act_bits=8))
    x = gaussian(3, 5, 67)
    expected = model(x)
    out = torch.compile(model, fullgraph=True)(x)
    assert out.shape == expected.shape == (3, 5, 8)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class TestBadInput:
    def test_sparse24_names_the_first_offending_group(self):
        linear = pruned_linear(16, 3, 0.0)
        with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, columns 0\.\.3 hold 4 nonzeros"):
            Sparse24Linear.from_dense(linear)

    def test_from_dense_needs_a_linear(self):
        with pytest.raises(TypeError, match="expects an nn.Linear"):
            SparseLinear.from_dense(nn.Conv1d(3, 3, 1))

    def test_unknown_format_and_options(self):
        linear = pruned_linear(16, 8, 0.5)
        with pytest.raises(ValueError, match="unknown sparse format"):
            SparseLinear.from_dense(linear, format="coo")
        with pytest.raises(ValueError, match="needs block"):
            SparseLinear.from_dense(linear, format="bsr")
        with pytest.raises(ValueError, match="only applies to format='bsr'"):
            SparseLinear.from_dense(linear, format="csr", block=(4, 4))
        with pytest.raises(ValueError, match="needs the 2:4 or sell format"):
            SparseInt8Linear.from_dense(linear, format="csr", act_bits=8)
        with pytest.raises(ValueError, match="for int8 activations: pass act_bits"):
            SparseInt8Linear.from_dense(linear, format="sell")
        with pytest.raises(ValueError, match="holds int8 codes for the W8A8 kernel"):
            SparseLinear.from_dense(linear, format="sell")
        with pytest.raises(ValueError, match="unknown backend"):
            SparseLinear(16, 8, backend="gpu")

    def test_wrong_input(self):
        _, layer = build("csr")
        with pytest.raises(ValueError, match="in_features=67"):
            layer(torch.randn(3, 66))
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            layer(torch.randn(3, 67, dtype=torch.float64))
        with pytest.raises(TypeError, match="expects a torch.Tensor"):
            layer([1.0] * 67)

    def test_non_finite_weight_refused_for_int8(self):
        linear = pruned_linear(16, 8, 0.5)
        with torch.no_grad():
            linear.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            SparseInt8Linear.from_dense(linear)


# ---------------------------------------------------------------------------------------------
# sparsify_
# ---------------------------------------------------------------------------------------------

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


def test_sparsify_folds_torch_pruning_and_keeps_outputs():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    prune.l1_unstructured(model[2], "weight", amount=0.6)
    x = gaussian(7, 96)
    expected = model(x)
    assert sparseq.sparsify_(model) is model
    assert isinstance(model[0], SparseLinear) and model[0].format == "csr"
    assert isinstance(model[2], SparseLinear)
    assert type(model[4]) is nn.Linear  # no zeros: untouched
    assert not hasattr(model[0], "weight_orig")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_does_not_modify_the_pruned_originals():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    original = model[0]
    sparseq.sparsify_(model)
    assert hasattr(original, "weight_orig") and hasattr(original, "weight_mask")


def test_sparsify_low_sparsity_stays_dense_but_folds_the_mask():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.1)
    x = gaussian(3, 96)
    expected = model(x)
    sparseq.sparsify_(model)
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "weight_orig")
    torch.testing.assert_close(model(x), expected)


def test_sparsify_int8_filter_and_skip():
    model = mlp()
    for i in (0, 2):
        prune.l1_unstructured(model[i], "weight", amount=0.9)
    prune.l1_unstructured(model[4], "weight", amount=0.1)
    sparseq.sparsify_(model, int8=True, filter_fn=lambda module, name: name != "2")
    assert isinstance(model[0], SparseInt8Linear)
    assert type(model[2]) is nn.Linear  # filtered out (still pruned, hooks kept)
    assert isinstance(model[4], Int8WeightOnlyLinear)  # too dense for sparsity to pay
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    sparseq.sparsify_(model, skip=["0"])
    assert not isinstance(model[0], SparseLinear)


def test_sparsify_int8_activations():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.9)
    prune.l1_unstructured(model[4], "weight", amount=0.1)
    x = gaussian(5, 96)
    expected = model(x)
    sparseq.sparsify_(model, int8=True, act_bits=8)
    assert isinstance(model[0], SparseInt8Linear) and model[0].act_bits == 8 and model[0].format == "sell"
    assert type(model[2]) is nn.Linear  # no zeros: untouched
    assert isinstance(model[4], Int8Linear) and model[4].act_bits == 8  # too dense for sparsity to pay
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="goes with int8=True"):
        sparseq.sparsify_(mlp(), act_bits=8)
    with pytest.raises(ValueError, match="act_bits must be"):
        sparseq.sparsify_(mlp(), int8=True, act_bits=4)


def test_sparsify_leaves_attention_out_proj_alone():
    attention = nn.MultiheadAttention(32, 4)
    with torch.no_grad():
        attention.out_proj.weight.mul_(torch.rand(32, 32) > 0.9)
    holder = nn.Sequential(attention)
    sparseq.sparsify_(holder)
    assert type(holder[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_sparsify_rejects_non_modules():
    with pytest.raises(TypeError):
        sparseq.sparsify_("model")
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        sparseq.sparsify_(nn.Linear(4, 4))


def test_sell_layers_warn_once_where_the_cpu_lacks_their_kernel(monkeypatch, caplog):
    import sparseq.nn.sparse_linear as module

    linear = pruned_linear(64, 32, 0.9)
    monkeypatch.setattr(module, "_warned_slow_sell", False)
    monkeypatch.setattr(sparseq.ops, "cpu_has_sell_kernel", lambda: False)
    with caplog.at_level("WARNING", logger="sparseq"):
        SparseInt8Linear.from_dense(linear, act_bits=8)
        SparseInt8Linear.from_dense(linear, act_bits=8)
        SparseInt8Linear.from_dense(linear)  # float activations: CSR, nothing to say
    assert [r.getMessage().count("act_bits=None (float activations) is faster") for r in caplog.records] == [1]
    monkeypatch.setattr(module, "_warned_slow_sell", False)
    monkeypatch.setattr(sparseq.ops, "cpu_has_sell_kernel", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparseq"):
        SparseInt8Linear.from_dense(linear, act_bits=8)
    assert not caplog.records


@pytest.mark.parametrize("has_sell_kernel", [True, False])
def test_auto_w8a8_format(monkeypatch, has_sell_kernel):
    # Sliced ELL for every pattern where its CPU kernel runs; elsewhere 2:4 keeps the 2:4 kernel.
    monkeypatch.setattr(sparseq.ops, "cpu_has_sell_kernel", lambda: has_sell_kernel)
    two_four = SparseInt8Linear.from_dense(pruned_linear(64, 32, 0.0, "2:4"), act_bits=8)
    assert two_four.format == ("sell" if has_sell_kernel else "2:4")
    for linear in (pruned_linear(64, 32, 0.9), pruned_linear(64, 32, 0.75, (4, 4))):
        layer = SparseInt8Linear.from_dense(linear, act_bits=7)
        assert layer.format == "sell" and "int8 activations: sliced ELL" in layer.format_reason
        assert layer.act_bits == 7
