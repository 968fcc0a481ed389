"""SmoothQuant: the float model is unchanged, outliers move into the weights, W8A8 gets better,
and folds that would change the model are refused."""
import copy

import pytest
import torch
import torch.nn as nn

from sparseq.quant import calibrate, quantized_sqnr_db, smooth_quant


class Block(nn.Module):
    """A pre-LN transformer block in miniature (the residual stream bypasses the norms)."""

    def __init__(self, d=32, act=nn.ReLU):
        super().__init__()
        self.ln1, self.q, self.k, self.v, self.o = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), act(), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        attention = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4, dim=-1)
        x = x + self.o(attention @ self.v(h))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def outlier_model(act=nn.ReLU):
    """Two blocks whose norms blow up a few channels, as LLM activations do."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(act=act), Block(act=act))
    with torch.no_grad():
        for block in model:
            block.ln1.weight[[3, 17]] = 40.0
            block.ln2.weight[5] = 60.0
    return model


def batches(n=3, shape=(2, 6, 32)):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def assert_float_equal(model_a, model_b, data):
    for batch in data:
        a, b = model_a(batch), model_b(batch)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_float_model_is_unchanged_and_every_group_is_found():
    model, data = outlier_model(), batches()
    original = copy.deepcopy(model)
    report = smooth_quant(model, data, alpha=0.5)
    assert_float_equal(original, model, data)
    groups = {g.producer: g.consumers for g in report.smoothed}
    assert groups["0.ln1"] == ["0.q", "0.k", "0.v"] and groups["1.ln2"] == ["1.fc1"]
    assert groups["0.v"] == ["0.o"]  # the attention output takes its scale from the value rows
    assert groups["0.fc1"] == ["0.fc2"]  # ReLU(x / s) = ReLU(x) / s for s > 0
    assert not report.left_alone
    # the outlier channels were divided down in the norm and multiplied into the weights
    s = original[0].ln1.weight / model[0].ln1.weight
    assert torch.allclose(model[0].q.weight, original[0].q.weight * s[None, :])
    assert s[3] > 5 * s[0]
    assert "0.ln1 (norm) -> 0.q, 0.k, 0.v" in str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_models_fold_by_powers_of_two_exactly(dtype):
    model = outlier_model().to(dtype)
    data = [batch.to(dtype) for batch in batches()]
    original = copy.deepcopy(model)
    report = smooth_quant(model, data, alpha=0.5)
    assert {g.producer for g in report.smoothed} >= {"0.ln1", "1.ln2"}
    for batch in data:
        assert torch.equal(model(batch), original(batch))  # x / 2^p and W * 2^p round nowhere
    s = original[0].ln1.weight.float() / model[0].ln1.weight.float()
    assert torch.equal(s, torch.pow(2.0, torch.round(torch.log2(s)))) and s[3] > 4 * s[0]


def test_smoothing_improves_w8a8():
    model, data = outlier_model(), batches()
    plain_dynamic = quantized_sqnr_db(model, data, "w8a8", act_bits=8)
    plain_static = quantized_sqnr_db(calibrate(copy.deepcopy(model), data), data, "w8a8_static")
    smooth_quant(model, data, alpha=0.5)
    smoothed_dynamic = quantized_sqnr_db(model, data, "w8a8", act_bits=8)
    smoothed_static = quantized_sqnr_db(calibrate(model, data), data, "w8a8_static")
    assert smoothed_dynamic > plain_dynamic + 3
    assert smoothed_static > plain_static + 3


def test_alpha_zero_and_one_keep_the_model_equal():
    for alpha in (0, 1.0):
        model, data = outlier_model(), batches()
        original = copy.deepcopy(model)
        smooth_quant(model, data, alpha=alpha)
        assert_float_equal(original, model, data)


def test_a_nonlinearity_between_linears_is_left_alone():
    model, data = outlier_model(act=nn.GELU), batches()
    original = copy.deepcopy(model)
    report = smooth_quant(model, data)
    assert "0.fc2" in report.left_alone and "0.fc2" not in report.smoothed_layers
    assert torch.equal(model[0].fc2.weight, original[0].fc2.weight)


def test_a_norm_that_also_feeds_a_residual_is_left_alone():
    class PostNorm(nn.Module):  # BERT-style: the norm output is the residual stream
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            h = self.ln(x)
            return h + self.fc(h)

    torch.manual_seed(0)
    model, data = PostNorm(), batches(shape=(4, 16))
    original = copy.deepcopy(model)
    report = smooth_quant(model, data)
    assert "residual" in report.left_alone["fc"]
    assert torch.equal(model.ln.weight, original.ln.weight) and torch.equal(model.fc.weight, original.fc.weight)


def test_tiny_bert_stays_equal():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (2, 9), generator=gen)}, {"input_ids": torch.randint(0, 50, (3, 5), generator=gen)}]
    original = copy.deepcopy(bert)
    report = smooth_quant(bert, data)
    for batch in data:
        a, b = original(**batch).last_hidden_state, bert(**batch).last_hidden_state
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    # post-LN BERT: the norms feed the residual stream, so only value -> attention output folds
    assert {(g.producer, tuple(g.consumers)) for g in report.smoothed} == {
        (f"encoder.layer.{i}.attention.self.value", (f"encoder.layer.{i}.attention.output.dense",)) for i in range(2)}
    assert "residual" in report.left_alone["encoder.layer.0.attention.self.query"]


def test_llama_rmsnorm_folds():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32)
    llama = transformers.LlamaModel(config).eval()
    data = [{"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))}]
    original = copy.deepcopy(llama)
    report = smooth_quant(llama, data)
    groups = {g.producer: g.consumers for g in report.smoothed}
    assert groups["layers.0.input_layernorm"] == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert groups["layers.0.post_attention_layernorm"] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    assert groups["layers.0.self_attn.v_proj"] == ["layers.0.self_attn.o_proj"]
    a, b = original(**data[0]).last_hidden_state, llama(**data[0]).last_hidden_state
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_stale_observers_are_dropped():
    model, data = outlier_model(), batches()
    calibrate(model, data)
    smooth_quant(model, data)
    assert not hasattr(model[0].q, "act_observer")


def test_bad_input_leaves_the_model_unchanged():
    model = outlier_model()
    original = copy.deepcopy(model)
    for alpha in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a number in"):
            smooth_quant(model, batches(), alpha=alpha)
    with pytest.raises(ValueError, match="batch 0 could not be run"):
        smooth_quant(model, batches(shape=(2, 6, 31)))
    nan_data = batches()
    nan_data[2][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        smooth_quant(model, nan_data)
    with pytest.raises(ValueError, match="no Linear layers"):
        smooth_quant(nn.Sequential(nn.ReLU()), batches())
    for a, b in zip(original.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
