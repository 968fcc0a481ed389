"""Int8Linear / Int8StaticLinear with a fused GELU, and quant.fuse_gelu_ folding GELU modules
into the int8 layer before them (nn.Sequential and transformers' BERT blocks), through
gradients, torch.compile and sparseq.save / load."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseq
from sparseq.nn import FusedActivation, Int8Linear, Int8StaticLinear, SparseInt8Linear
from sparseq.quant import fuse_gelu_, quantize_


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 16), nn.GELU(approximate="tanh"),
                         nn.Linear(16, 8))


def test_layer_with_fused_gelu_equals_gelu_of_the_plain_layer():
    linear = mlp()[0]
    fused = Int8Linear.from_dense(linear, act_bits=8, activation="gelu")
    plain = Int8Linear.from_dense(linear, act_bits=8)
    x = torch.randn(7, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.gelu(plain(x)), rtol=1e-5, atol=1e-6)
    assert "activation=gelu" in repr(fused) and "activation" not in repr(plain)
    static = Int8StaticLinear.from_dense(linear, x_scale=0.03, activation="gelu")
    with torch.no_grad():
        torch.testing.assert_close(static(x), F.gelu(Int8StaticLinear.from_dense(linear, x_scale=0.03)(x)),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation must be"):
        Int8Linear.from_dense(linear, activation="relu")


def test_gradients_flow_through_the_gelu_and_straight_through_the_weight():
    layer = Int8Linear.from_dense(mlp()[0], act_bits=8, activation="gelu")
    plain = Int8Linear.from_dense(mlp()[0], act_bits=8)
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.gelu(plain(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_fuse_gelu_folds_exact_gelus_only():
    model = mlp()
    quantize_(model, "w8a8")
    x = torch.randn(9, 24)
    with torch.no_grad():
        before = model(x)
    assert fuse_gelu_(model) == ["0"]
    assert model[0].activation == "gelu" and isinstance(model[1], FusedActivation)
    assert isinstance(model[3], nn.GELU)  # tanh-approximated: a different function, left alone
    assert model[2].activation == "none"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert fuse_gelu_(model) == []  # idempotent


def test_fuse_gelu_leaves_shared_and_non_w8a8_layers_alone():
    shared = Int8Linear.from_dense(nn.Linear(8, 8))
    model = nn.Sequential(shared, nn.GELU(), shared)  # the same layer at two places
    assert fuse_gelu_(model) == [] and isinstance(model[1], nn.GELU)
    pruned = nn.Linear(8, 8)
    with torch.no_grad():
        pruned.weight[:, ::2] = 0
    model = nn.Sequential(SparseInt8Linear.from_dense(pruned), nn.GELU(), nn.Linear(8, 8), nn.GELU())
    assert fuse_gelu_(model) == []


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_bert_blocks_fuse_compile_and_round_trip(tmp_path):
    base = tiny_bert()
    model = quantize_(copy.deepcopy(base), "w8a8")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        assert fuse_gelu_(model) == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
        after = model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(input_ids=ids).last_hidden_state, after)
    path = tmp_path / "bert.safetensors"
    sparseq.save(model, path)
    for loaded in (sparseq.load(path), sparseq.load(path, copy.deepcopy(base))):
        assert isinstance(loaded.encoder.layer[1].intermediate.intermediate_act_fn, FusedActivation)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).last_hidden_state, after)
    wrong = copy.deepcopy(base)
    wrong.encoder.layer[0].intermediate.intermediate_act_fn = nn.ReLU()
    with pytest.raises(sparseq.serialization.SparseqFileError, match="applies GELU in its kernel.*ReLU"):
        sparseq.load(path, wrong)
    assert isinstance(wrong.encoder.layer[0].intermediate.dense, nn.Linear)  # left as it was
