"""Structured pruning: layers physically shrink, the output shape stays, and the pruned model
computes exactly what the original computes with the removed units' weights zeroed."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from sparseq.prune.structured import GROUP_KINDS, StructuredReport, structured


def removed_units(report, group_name):
    group = next(g for g in report.groups if g.name == group_name)
    return sorted(set(range(group.units_before)) - set(group.kept))


def zero_units(model, slices):
    """A copy of ``model`` with the given (module name, dim, unit indices, unit width) slices set
    to zero: dim 0 zeroes output rows/channels and their bias, dim 1 input columns/channels."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, dim, units, width in slices:
            index = torch.tensor([u * width + i for u in units for i in range(width)],
                                 dtype=torch.long)
            module = zeroed.get_submodule(name)
            module.weight.index_fill_(dim, index, 0.0)
            if dim == 0 and module.bias is not None:
                module.bias.index_fill_(0, index, 0.0)
    return zeroed


# ------------------------------------------------------------------------------------ MLP


def make_mlp(activation=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), activation(), nn.Linear(16, 12), activation(),
                         nn.Linear(12, 4)).double().eval()


def test_mlp_shrinks_to_the_stated_widths_and_parameter_count():
    model = make_mlp()
    x = torch.randn(5, 8, dtype=torch.float64)
    original_output_shape = model(x).shape
    returned = structured(model, 0.5, x)
    assert returned is model
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == \
        [(8, 8), (8, 6), (6, 4)]
    report = model.structured_report
    assert isinstance(report, StructuredReport)
    # 8*16+16 + 16*12+12 + 12*4+4 before; 8*8+8 + 8*6+6 + 6*4+4 after.
    assert (report.params_before, report.params_after) == (400, 154)
    assert sum(p.numel() for p in model.parameters()) == 154
    assert [(g.name, g.units_before, g.units_after) for g in report.groups] == \
        [("0", 16, 8), ("2", 12, 6)]
    assert report.skipped == {"4": "feeds the model's output"}
    assert model(x).shape == original_output_shape


def test_mlp_keeps_the_units_with_the_largest_l2_norm_of_weights_in_and_out():
    model = make_mlp()
    w1, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    scores = (w1.pow(2).sum(1) + w2.pow(2).sum(0)).sqrt()
    expected = sorted(torch.topk(scores, 8).indices.tolist())
    structured(model, 0.5, torch.randn(2, 8, dtype=torch.float64))
    assert model.structured_report.groups[0].kept == expected
    torch.testing.assert_close(model[0].weight, w1[expected])
    kept_second = model.structured_report.groups[1].kept
    torch.testing.assert_close(model[2].weight, w2[kept_second][:, expected])


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid])
def test_mlp_equals_the_original_with_the_removed_neurons_zeroed(activation):
    # Sigmoid(0) = 0.5: zeroing only the rows would not remove a neuron; zeroing the consumer's
    # columns too does, whatever the activation.
    model = make_mlp(activation)
    original = copy.deepcopy(model)
    x = torch.randn(7, 8, dtype=torch.float64)
    structured(model, 0.5, x)
    report = model.structured_report
    first, second = removed_units(report, "0"), removed_units(report, "2")
    zeroed = zero_units(original, [("0", 0, first, 1), ("2", 1, first, 1),
                                   ("2", 0, second, 1), ("4", 1, second, 1)])
    torch.testing.assert_close(model(x), zeroed(x), rtol=1e-12, atol=1e-12)


def test_pruned_mlp_trains():
    model = make_mlp()
    structured(model, 0.25, torch.randn(2, 8, dtype=torch.float64))
    model(torch.randn(3, 8, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ratio_rounding_round_to_and_zero_ratio():
    model = make_mlp()
    structured(model, 0.3, torch.randn(2, 8, dtype=torch.float64))  # 16 - floor(4.8); 12 - floor(3.6)
    assert [g.units_after for g in model.structured_report.groups] == [12, 9]
    model = make_mlp()
    structured(model, 0.3, torch.randn(2, 8, dtype=torch.float64), round_to=8)  # up to 16, 16->12
    assert [g.units_after for g in model.structured_report.groups] == [16, 12]
    model = make_mlp()
    structured(model, 0.99, torch.randn(2, 8, dtype=torch.float64))  # at least one stays
    assert [g.units_after for g in model.structured_report.groups] == [1, 1]
    model = make_mlp()
    original = copy.deepcopy(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    structured(model, 0.0, x)
    assert model.structured_report.params_after == model.structured_report.params_before
    torch.testing.assert_close(model(x), original(x))


def test_callable_importance_and_ignore():
    model = make_mlp()
    seen = {}

    def prefer_low_indices(name, unit_weights):
        seen[name] = [tuple(w.shape) for w in unit_weights]
        return -torch.arange(unit_weights[0].shape[0], dtype=torch.float32)

    structured(model, 0.5, torch.randn(2, 8, dtype=torch.float64), importance=prefer_low_indices,
               ignore=["4"])
    report = model.structured_report
    # Group "2" touches the ignored output layer "4" (its consumer), so it is left alone.
    assert [g.kept for g in report.groups] == [list(range(8))]
    assert report.skipped["2"] == "ignored"
    assert seen == {"0": [(16, 8), (16, 12)]}
    assert model[2].out_features == 12 and model[4].in_features == 12


def test_activation_importance_scores_the_energy_each_neuron_sends_on():
    model = make_mlp()
    with torch.no_grad():  # neuron 3 never fires but has the largest weights: l2 would keep it
        model[0].weight[3] = 10.0
        model[0].bias[3] = -1e6
        model[2].weight[:, 3] = 10.0
    calib = [torch.randn(6, 8, dtype=torch.float64) for _ in range(3)]
    x = torch.cat(calib)
    hidden = torch.relu(model[0](x))
    expected_first = (model[2].weight.pow(2).sum(0) * hidden.pow(2).sum(0)).sqrt()
    second = torch.relu(model[2](hidden))
    expected_second = (model[4].weight.pow(2).sum(0) * second.pow(2).sum(0)).sqrt()
    keep_first = sorted(torch.topk(expected_first, 8).indices.tolist())
    keep_second = sorted(torch.topk(expected_second, 6).indices.tolist())
    assert 3 not in keep_first
    structured(model, 0.5, calib[0], importance="activation", calib_data=calib)
    assert [g.kept for g in model.structured_report.groups] == [keep_first, keep_second]


def test_activation_importance_needs_calib_data_and_only_it_uses_it():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="importance='activation' needs calib_data"):
        structured(make_mlp(), 0.5, x, importance="activation")
    with pytest.raises(ValueError, match="calib_data is used only by importance='activation'"):
        structured(make_mlp(), 0.5, x, calib_data=[x])
    model = make_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calib_data: batch 0 could not be run"):
        structured(model, 0.5, x, importance="activation", calib_data=[torch.randn(2, 3)])
    assert_unchanged(model, state)


# ------------------------------------------------------------------------------------ CNN


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)))
        return torch.relu(x + self.bn_b(self.conv_b(y)))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-Conv-BN into a residual block, then a 1x1 conv, pooling and a Linear head
    that reads the flattened (channel, 4x4) features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.block = ResidualBlock(16)
        self.head_conv = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.head_conv(x)), 4)
        return self.fc(x.view(x.size(0), -1))


def make_cnn():
    torch.manual_seed(0)
    model = SmallCNN().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_cnn_prunes_chains_and_leaves_the_residual_stream_alone():
    model = make_cnn()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    structured(model, 0.5, x)
    report = model.structured_report
    assert {g.name: (g.units_before, g.units_after) for g in report.groups} == \
        {"conv1": (8, 4), "block.conv_a": (16, 8), "head_conv": (6, 3)}
    assert set(report.skipped) == {"conv2", "block.conv_b", "fc"}
    assert "residual addition" in report.skipped["conv2"]
    # The residual stream (conv2 / bn2 / conv_b / bn_b outputs, block input) keeps 16 channels.
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (4, 4, 4)
    assert (model.conv2.out_channels, model.bn2.num_features) == (16, 16)
    assert (model.block.conv_a.out_channels, model.block.bn_a.num_features,
            model.block.conv_b.in_channels, model.block.conv_b.out_channels) == (8, 8, 8, 16)
    assert (model.head_conv.out_channels, model.fc.in_features) == (3, 3 * 16)
    expected_params = sum(p.numel() for p in original.parameters()) - (
        4 * (3 * 9 + 1) + 4 * 2 + 16 * 4 * 9                      # conv1 rows, bn1, conv2 columns
        + 8 * (16 * 9 + 1) + 8 * 2 + 16 * 8 * 9                   # conv_a rows, bn_a, conv_b columns
        + 3 * (16 + 1) + 10 * 3 * 16)                             # head_conv rows, fc columns
    assert report.params_after == expected_params == sum(p.numel() for p in model.parameters())

    conv1, conv_a, head = (removed_units(report, name) for name in ("conv1", "block.conv_a",
                                                                     "head_conv"))
    zeroed = zero_units(original, [("conv2", 1, conv1, 1), ("block.conv_b", 1, conv_a, 1),
                                   ("fc", 1, head, 16)])
    torch.testing.assert_close(model(x), zeroed(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_cnn_units_that_contribute_nothing_are_removed_without_changing_the_output(importance):
    model = make_cnn()
    with torch.no_grad():  # conv1 channels 4..7 and conv_a channels 0..7 feed nothing on
        model.conv1.weight[4:].mul_(1e-3)
        model.conv2.weight[:, 4:] = 0
        model.block.conv_a.weight[:8].mul_(1e-3)
        model.block.conv_b.weight[:, :8] = 0
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    calib = [x] if importance == "activation" else None
    structured(model, 0.5, x, targets="conv", ignore=["head_conv"], importance=importance,
               calib_data=calib)
    report = model.structured_report
    assert [(g.name, g.units_after) for g in report.groups] == [("conv1", 4), ("block.conv_a", 8)]
    if importance == "l2":
        assert [g.kept for g in report.groups] == [[0, 1, 2, 3], list(range(8, 16))]
    # "activation" scores 0 for the units feeding nothing and for channels the ReLU silences on x:
    # it removes some of either, and the output on x is unchanged all the same.
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ transformers


def tiny_bert():
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    return transformers.BertModel(config).double().eval()


def bert_inputs():
    torch.manual_seed(1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": mask}


def test_bert_ffn_and_heads_equal_the_zeroed_model():
    model = tiny_bert()
    original = copy.deepcopy(model)
    inputs = bert_inputs()
    structured(model, 0.5, inputs)
    report = model.structured_report
    assert sorted((g.name, g.kind, g.units_before, g.units_after) for g in report.groups) == [
        ("encoder.layer.0.attention", "heads", 4, 2), ("encoder.layer.0.intermediate", "ffn", 64, 32),
        ("encoder.layer.1.attention", "heads", 4, 2), ("encoder.layer.1.intermediate", "ffn", 64, 32)]
    slices = []
    for i, layer in enumerate(model.encoder.layer):
        prefix = f"encoder.layer.{i}"
        attention = layer.attention.self
        assert (attention.num_attention_heads, attention.all_head_size) == (2, 16)
        assert (attention.query.out_features, layer.attention.output.dense.in_features) == (16, 16)
        assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (32, 32)
        heads = removed_units(report, f"{prefix}.attention")
        neurons = removed_units(report, f"{prefix}.intermediate")
        slices += [(f"{prefix}.attention.self.{p}", 0, heads, 8) for p in ("query", "key", "value")]
        slices += [(f"{prefix}.attention.output.dense", 1, heads, 8),
                   (f"{prefix}.intermediate.dense", 0, neurons, 1),
                   (f"{prefix}.output.dense", 1, neurons, 1)]
    expected = zero_units(original, slices)(**inputs).last_hidden_state
    pruned = model(**inputs).last_hidden_state
    assert pruned.shape == (2, 9, 32)
    torch.testing.assert_close(pruned, expected, rtol=1e-10, atol=1e-10)
    # hidden size: 2 layers x (3 x (32*16+16) - 3 x (32*32+32) attention rows, 16*32 output columns,
    # 32*32+32 intermediate rows, 32*32 output columns)
    removed = 2 * (3 * 16 * 33 + 16 * 32 + 32 * 33 + 32 * 32)
    assert report.params_before - report.params_after == removed


def test_bert_ffn_only_leaves_heads_alone():
    model = tiny_bert()
    structured(model, 0.5, bert_inputs()["input_ids"], targets=("ffn",))
    assert {g.kind for g in model.structured_report.groups} == {"ffn"}
    assert all(layer.attention.self.num_attention_heads == 4 for layer in model.encoder.layer)
    assert all(layer.intermediate.dense.out_features == 32 for layer in model.encoder.layer)


def tiny_llama(kv_heads):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_mlp_and_heads_equal_the_zeroed_model(kv_heads):
    model = tiny_llama(kv_heads)
    original = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 7))
    structured(model, 0.5, ids)
    report = model.structured_report
    group_size, head_dim = 4 // kv_heads, 8
    slices = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attention = f"{prefix}.self_attn"
        assert (layer.self_attn.k_proj.out_features, layer.self_attn.q_proj.out_features) == \
            (kv_heads // 2 * head_dim, 4 // 2 * head_dim)
        assert layer.self_attn.num_key_value_groups == group_size
        assert layer.mlp.down_proj.in_features == 32
        groups = removed_units(report, attention)
        neurons = removed_units(report, f"{prefix}.mlp")
        slices += [(f"{attention}.q_proj", 0, groups, group_size * head_dim),
                   (f"{attention}.k_proj", 0, groups, head_dim),
                   (f"{attention}.v_proj", 0, groups, head_dim),
                   (f"{attention}.o_proj", 1, groups, group_size * head_dim),
                   (f"{prefix}.mlp.gate_proj", 0, neurons, 1),
                   (f"{prefix}.mlp.up_proj", 0, neurons, 1),
                   (f"{prefix}.mlp.down_proj", 1, neurons, 1)]
    unit = "head" if kv_heads == 4 else "kv-group"
    assert {(g.kind, g.unit, g.units_before, g.units_after) for g in report.groups} == \
        {("heads", unit, kv_heads, kv_heads // 2), ("ffn", "neuron", 64, 32)}
    pruned = model(ids).logits
    assert pruned.shape == (2, 7, 100)
    torch.testing.assert_close(pruned, zero_units(original, slices)(ids).logits,
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- bad input


def assert_unchanged(model, state):
    after = model.state_dict()
    assert after.keys() == state.keys()
    for name, tensor in state.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name


@pytest.mark.parametrize("ratio, error, message", [
    (-0.1, ValueError, r"ratio must be in \[0, 1\)"), (1.0, ValueError, r"ratio must be in \[0, 1\)"),
    (True, TypeError, "ratio must be a number"), ("0.5", TypeError, "ratio must be a number")])
def test_ratio_outside_range_is_rejected(ratio, error, message):
    model = make_mlp()
    with pytest.raises(error, match=message):
        structured(model, ratio, torch.randn(2, 8, dtype=torch.float64))


def test_bad_arguments_are_rejected():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        structured(lambda t: t, 0.5, x)
    with pytest.raises(ValueError, match="importance must be"):
        structured(make_mlp(), 0.5, x, importance="l3")
    with pytest.raises(ValueError, match="targets must be"):
        structured(make_mlp(), 0.5, x, targets=("neurons",))
    with pytest.raises(ValueError, match="round_to must be"):
        structured(make_mlp(), 0.5, x, round_to=0)
    assert GROUP_KINDS == ("linear", "conv", "ffn", "heads")


def test_example_inputs_the_model_rejects():
    model = make_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="example_inputs: batch 0 could not be run"):
        structured(model, 0.5, torch.randn(2, 5, dtype=torch.float64))
    assert_unchanged(model, state)


def test_no_prunable_group_names_the_reasons():
    with pytest.raises(ValueError, match=r"no prunable group.*fc: feeds the model's output"):
        structured(nn.Sequential(OrderedDict(fc=nn.Linear(4, 3))).eval(), 0.5, torch.randn(2, 4))
    with pytest.raises(ValueError, match="no prunable group"):
        structured(make_mlp(), 0.5, torch.randn(2, 8, dtype=torch.float64), targets="conv")


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        hidden = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.out(torch.relu(self.fc2(hidden)))


def test_a_layer_called_twice_is_never_pruned():
    with pytest.raises(ValueError, match=r"fc1: feeds fc2, which is called more than once; "
                                         r"fc2: called more than once"):
        structured(CalledTwice().eval(), 0.5, torch.randn(2, 4))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 8), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_model_names_the_module():
    model = DataDependent().eval()
    with pytest.raises(ValueError, match=r"cannot analyse DataDependent.*'inner\.1'"):
        structured(model, 0.5, torch.randn(2, 4))


class HardCodedWidth(nn.Module):
    """Reads fc1's output with a hard-coded width: the graph looks channel-wise, but the pruned
    model fails on the example inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).reshape(-1, 16))


def test_a_model_that_fails_after_pruning_is_restored():
    model = HardCodedWidth().eval()
    layers = (model.fc1, model.fc2)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="failed the check on example_inputs.*restored unchanged"):
        structured(model, 0.5, torch.randn(4, 4))
    assert (model.fc1, model.fc2) == layers
    assert_unchanged(model, state)
    assert not hasattr(model, "structured_report")


def test_importance_returning_the_wrong_shape_changes_nothing():
    model = make_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"importance\('0', \.\.\.\) must return a tensor of shape \(16,\)"):
        structured(model, 0.5, torch.randn(2, 8, dtype=torch.float64),
                   importance=lambda name, weights: torch.ones(3))
    assert_unchanged(model, state)


def test_batchnorm_without_affine_parameters_is_sliced_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.arange(8.0))
    x = torch.randn(2, 3, 10, 10)
    shape = model(x).shape
    structured(model, 0.5, x)
    assert model[1].num_features == 4 and model[0].out_channels == 4 and model(x).shape == shape
    assert set(model[1].running_mean.tolist()) <= set(range(8))  # the kept channels' statistics
