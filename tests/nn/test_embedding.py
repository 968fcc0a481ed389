"""QuantizedEmbedding and quantize_embeddings_: accuracy against the float table, exact
to_dense, dtype handling, state_dict, torch.compile, and bad input."""
import copy

import pytest
import torch
import torch.nn as nn

from sparseq.nn import QuantizedEmbedding
from sparseq.quant import quantize_embeddings_


def table(num=50, dim=64, seed=0, dtype=torch.float32, padding_idx=None):
    torch.manual_seed(seed)
    return nn.Embedding(num, dim, padding_idx=padding_idx).to(dtype)


def ids(num=50, shape=(3, 7), seed=1):
    return torch.randint(0, num, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits, group_size, max_rel_err", [(8, None, 0.01), (4, None, 0.1), (4, 16, 0.1), (8, 8, 0.01)])
def test_lookups_match_the_float_table(bits, group_size, max_rel_err):
    dense = table()
    layer = QuantizedEmbedding.from_dense(dense, bits=bits, group_size=group_size)
    x = ids()
    out, ref = layer(x), dense(x).detach()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # Per group, every value is within half a quantization step of the float one.
    qmax = 2 ** (bits - 1) - 1
    group = layer.group_size
    groups = ref.reshape(*ref.shape[:-1], -1, group)
    step = groups.abs().amax(-1, keepdim=True) / qmax
    assert ((out.reshape(groups.shape) - groups).abs() <= 0.5 * step * (1 + 1e-2) + 1e-6).all()
    assert (out - ref).norm() / ref.norm() < max_rel_err


def test_defaults_and_storage():
    layer8 = QuantizedEmbedding.from_dense(table(dim=64), bits=8)
    layer4 = QuantizedEmbedding.from_dense(table(dim=64), bits=4)
    assert layer8.group_size == 64 and layer8.codes.dtype == torch.int8 and layer8.codes.shape == (50, 64)
    assert layer4.group_size == 32 and layer4.codes.dtype == torch.uint8 and layer4.codes.shape == (50, 32)
    assert layer4.scales.shape == (50, 2) and layer4.scales.dtype == torch.float16
    assert "bits=4, group_size=32" in repr(layer4)


@pytest.mark.parametrize("bits", [8, 4])
def test_to_dense_is_exactly_what_the_codes_stand_for(bits):
    layer = QuantizedEmbedding.from_dense(table(padding_idx=3), bits=bits)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Embedding) and dense.padding_idx == 3
    x = ids()
    assert torch.equal(dense(x), layer(x))
    assert torch.equal(QuantizedEmbedding.from_dense(dense, bits=bits)(x), layer(x))  # idempotent


def test_a_zero_row_and_int32_indices():
    dense = table()
    with torch.no_grad():
        dense.weight[5] = 0
    layer = QuantizedEmbedding.from_dense(dense, bits=4)
    assert torch.equal(layer(torch.tensor([5], dtype=torch.int32)), torch.zeros(1, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_tables_and_model_casts(dtype):
    layer = QuantizedEmbedding.from_dense(table(dtype=dtype), bits=4)
    assert layer(ids()).dtype == dtype
    cast = copy.deepcopy(layer).float()
    assert cast(ids()).dtype == torch.float32 and cast.scales.dtype == torch.float16
    torch.testing.assert_close(cast(ids()), layer(ids()).float(), rtol=1e-2, atol=1e-2)
    assert layer.to(torch.bfloat16).out_dtype == torch.bfloat16


def test_state_dict_round_trip():
    layer = QuantizedEmbedding.from_dense(table(), bits=4, group_size=8)
    fresh = QuantizedEmbedding(50, 64, bits=4, group_size=8)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(ids()), layer(ids()))


def test_torch_compile_fullgraph():
    layer = QuantizedEmbedding.from_dense(table(), bits=4)
    x = ids()
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(x), layer(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 3}, "bits must be 8 or 4"),
    ({"bits": 8, "group_size": 7}, "group_size must be a positive divisor of embedding_dim=64"),
    ({"bits": 8, "group_size": 0}, "group_size must be a positive divisor"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizedEmbedding.from_dense(table(), **kwargs)


def test_bad_tables_and_indices():
    with pytest.raises(ValueError, match="group_size must be even"):
        QuantizedEmbedding(10, 6, bits=4, group_size=3)
    with pytest.raises(TypeError, match="expects an nn.Embedding"):
        QuantizedEmbedding.from_dense(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_norm"):
        QuantizedEmbedding.from_dense(nn.Embedding(10, 8, max_norm=1.0))
    nan_table = table()
    with torch.no_grad():
        nan_table.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantizedEmbedding.from_dense(nan_table)
    layer = QuantizedEmbedding.from_dense(table())
    with pytest.raises(TypeError, match="int64 or int32 indices"):
        layer(torch.zeros(3))
    with pytest.raises(IndexError):
        layer(torch.tensor([50]))


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(40, 32)
        self.positions = nn.Embedding(16, 32)
        self.shared = self.words  # the same table under a second name
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.words(x) + self.positions(torch.arange(x.shape[-1])))


def test_quantize_embeddings_swaps_every_table_and_keeps_sharing():
    torch.manual_seed(0)
    model = TwoTables()
    x = torch.randint(0, 40, (2, 16))
    ref = model(x)
    assert quantize_embeddings_(model, bits=8) is model
    assert isinstance(model.words, QuantizedEmbedding) and isinstance(model.positions, QuantizedEmbedding)
    assert model.shared is model.words and isinstance(model.head, nn.Linear)
    assert (model(x) - ref).norm() / ref.norm() < 0.02


def test_quantize_embeddings_skip_and_errors_leave_the_model_alone():
    model = TwoTables()
    quantize_embeddings_(model, bits=4, skip=["positions"])
    assert isinstance(model.words, QuantizedEmbedding) and type(model.positions) is nn.Embedding
    model = TwoTables()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="embedding 'words'.*group_size"):
        quantize_embeddings_(model, bits=4, group_size=24)
    assert type(model.words) is nn.Embedding
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        quantize_embeddings_(nn.Embedding(4, 4))
