import pytest
import torch
import torch.nn as nn

from sparseq.nn import Int8Linear, Int8WeightOnlyLinear
from sparseq.quant import quantize_, sqnr_db


class Net(nn.Module):
    """Linear layers at every kind of place a model keeps them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(32, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.heads = nn.ModuleList([nn.Linear(64, 16), nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 16))])
        self.by_name = nn.ModuleDict({"gate": nn.Linear(64, 64)})
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)  # out_proj must stay nn.Linear
        self.already = Int8Linear.from_dense(nn.Linear(64, 64))

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp(h) * torch.sigmoid(self.by_name["gate"](h))
        h = self.already(h)
        return torch.cat([head(h) for head in self.heads], dim=-1)


SWAPPED = {"embed", "mlp.0", "mlp.2", "heads.0", "heads.1.1", "by_name.gate"}


def linear_names(model, cls):
    return {name for name, module in model.named_modules() if type(module) is cls}


@pytest.mark.parametrize("scheme,cls", [("w8a8", Int8Linear), ("w8a16", Int8WeightOnlyLinear)])
def test_swaps_exactly_the_linear_layers_in_place(scheme, cls):
    model = Net()
    already = model.already
    x = torch.randn(2, 5, 32)
    expected = model(x)

    assert quantize_(model, scheme) is model
    assert linear_names(model, cls) - {"already"} == SWAPPED
    assert linear_names(model, nn.Linear) == set()  # MultiheadAttention's out_proj is its own subclass
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.already is already
    assert sqnr_db(expected, model(x)) >= 25


def test_filter_fn_is_respected_and_sees_names():
    model = Net()
    seen = []

    def only_mlp(module, name):
        seen.append(name)
        return name.startswith("mlp.")

    quantize_(model, "w8a8", filter_fn=only_mlp)
    assert linear_names(model, Int8Linear) - {"already"} == {"mlp.0", "mlp.2"}
    assert isinstance(model.embed, nn.Linear) and isinstance(model.heads[0], nn.Linear)
    assert {"embed", "mlp.0", "heads.1.1", "by_name.gate"} <= set(seen)


def test_skip_patterns_leave_subtrees_alone():
    model = quantize_(Net(), "w8a16", skip=("heads", "by_*"))
    assert linear_names(model, Int8WeightOnlyLinear) == {"embed", "mlp.0", "mlp.2"}


def test_layer_kwargs_reach_the_layers():
    model = quantize_(Net(), "w8a8", act_bits=7, backend="reference")
    layers = [module for name, module in model.named_modules() if name in SWAPPED]
    assert len(layers) == len(SWAPPED)
    assert all(layer.act_bits == 7 and layer.backend == "reference" for layer in layers)


def test_shared_linear_stays_shared():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_(model)
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]


def test_quantized_model_state_dict_loads_into_a_fresh_quantized_skeleton():
    model = quantize_(Net(), "w8a8")
    torch.manual_seed(123)  # the skeleton starts from other weights; only the state dict matters
    fresh = quantize_(Net(), "w8a8")
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


def test_unknown_scheme_lists_the_choices():
    with pytest.raises(ValueError, match=r"w8a4.*\['w8a16', 'w8a8', 'w8a8_static'\]"):
        quantize_(Net(), "w8a4")


def test_a_bare_linear_cannot_be_swapped_in_place():
    with pytest.raises(ValueError, match="from_dense"):
        quantize_(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_(torch.randn(4, 4))


def test_sqnr_db():
    reference = torch.tensor([3.0, -4.0])
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0)
    assert sqnr_db(reference, reference) == float("inf")
