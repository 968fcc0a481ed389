"""sparseq.save / load / inspect_file: bitwise round trips of every layer type (rebuilt whole and
into a skeleton), compressed size, tied weights, corrupted and foreign files, bad skeletons,
atomic writes, nothing unpickled."""
import hashlib
import json
import os
import pickle

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from safetensors import safe_open

import sparseq
import sparseq.prune as prune
from sparseq.nn import (BlockSparseLinear, Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear,
                        QuantizedEmbedding, Sparse24Linear, SparseInt8Linear, SparseLinear)
from sparseq.quant import quantize_, quantize_embeddings_
from sparseq.serialization import (METADATA_CHECKSUM_KEY, METADATA_KEY, SparseqFileError,
                                   format_inspection, inspect_file)


def pruned_linear(k, n, sparsity=0.0, pattern="unstructured", dtype=torch.float32, seed=0):
    """An nn.Linear with random weights and bias, magnitude-pruned to ``pattern``."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.bias.normal_()
    if sparsity or pattern == "2:4":
        prune.magnitude(nn.Sequential(linear), None if pattern == "2:4" else sparsity, pattern=pattern)
    return linear.to(dtype)


def with_neighbours(layer, k, n, dtype=torch.float32):
    """[layer(k -> n), ReLU, LayerNorm, Linear(n -> 8)] in eval mode: a sparseq layer among plain
    modules; and the dense skeleton of the same architecture."""
    model = nn.Sequential(layer, nn.ReLU(), nn.LayerNorm(n), nn.Linear(n, 8)).to(dtype).eval()
    skeleton = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.LayerNorm(n), nn.Linear(n, 8))
    return model, skeleton


def sample(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


LAYERS = {
    "int8-act8": lambda: Int8Linear.from_dense(pruned_linear(48, 24), act_bits=8),
    "int8-act7-pow2": lambda: Int8Linear.from_dense(pruned_linear(48, 24), act_bits=7, pow2_scales=True),
    "int8-static": lambda: Int8StaticLinear.from_dense(pruned_linear(48, 24), x_scale=0.02),
    "int8-static-act7-pow2": lambda: Int8StaticLinear.from_dense(pruned_linear(48, 24), x_scale=0.03,
                                                                 act_bits=7, pow2_scales=True),
    "int8-weight-only": lambda: Int8WeightOnlyLinear.from_dense(pruned_linear(48, 24)),
    "sparse-csr": lambda: SparseLinear.from_dense(pruned_linear(48, 24, 0.9), format="csr"),
    "sparse-2:4": lambda: SparseLinear.from_dense(pruned_linear(48, 24, pattern="2:4"), format="2:4"),
    "sparse-bsr": lambda: SparseLinear.from_dense(pruned_linear(48, 24, 0.75, (4, 4)), format="bsr", block=(4, 4)),
    "sparse-dense": lambda: SparseLinear.from_dense(pruned_linear(48, 24, 0.3), format="dense"),
    "sparse24": lambda: Sparse24Linear.from_dense(pruned_linear(48, 24, pattern="2:4")),
    "block-sparse": lambda: BlockSparseLinear.from_dense(pruned_linear(48, 24, 0.75, (1, 8)), block=(1, 8)),
    "sparse-int8-csr": lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, 0.9), format="csr"),
    "sparse-int8-2:4": lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, pattern="2:4"), format="2:4"),
    "sparse-int8-2:4-act8": lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, pattern="2:4"),
                                                                format="2:4", act_bits=8),
    "sparse-int8-bsr": lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, 0.75, (4, 4)),
                                                           format="bsr", block=(4, 4)),
    "sparse-int8-sell-act8": lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, 0.9), act_bits=8),
}

HALF_LAYERS = {
    "csr-bf16": (lambda: SparseLinear.from_dense(pruned_linear(48, 24, 0.9, dtype=torch.bfloat16), format="csr"),
                 torch.bfloat16),
    "2:4-fp16": (lambda: Sparse24Linear.from_dense(pruned_linear(48, 24, pattern="2:4", dtype=torch.float16)),
                 torch.float16),
    "bsr-bf16": (lambda: BlockSparseLinear.from_dense(pruned_linear(48, 24, 0.75, (4, 4), dtype=torch.bfloat16),
                                                      block=(4, 4)), torch.bfloat16),
    "dense-fp16": (lambda: SparseLinear.from_dense(pruned_linear(48, 24, 0.3, dtype=torch.float16), format="dense"),
                   torch.float16),
    "int8-in-bf16-model": (lambda: Int8Linear.from_dense(pruned_linear(48, 24), act_bits=8), torch.bfloat16),
    "sparse-int8-in-fp16-model": (lambda: SparseInt8Linear.from_dense(pruned_linear(48, 24, 0.9)), torch.float16),
}


def assert_same_layer(loaded, original):
    assert type(loaded) is type(original)
    assert loaded.extra_repr() == original.extra_repr()
    for key, tensor in original.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert loaded.state_dict()[key].dtype == tensor.dtype
            assert torch.equal(loaded.state_dict()[key], tensor), key


def check_round_trip(tmp_path, layer, dtype=torch.float32):
    model, skeleton = with_neighbours(layer, 48, 24, dtype)
    x = sample(5, 48, dtype=dtype)
    expected = model(x)
    path = tmp_path / "model.safetensors"
    sparseq.save(model, path)

    whole = sparseq.load(path)
    assert not whole.training
    assert torch.equal(whole(x), expected)
    assert_same_layer(whole[0], layer)

    returned = sparseq.load(path, skeleton)
    assert returned is skeleton
    assert torch.equal(skeleton.eval()(x), expected)
    assert_same_layer(skeleton[0], layer)


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_round_trips_bitwise(tmp_path, name):
    check_round_trip(tmp_path, LAYERS[name]())


@pytest.mark.parametrize("name", HALF_LAYERS)
def test_half_precision_layers_round_trip_bitwise(tmp_path, name):
    make, dtype = HALF_LAYERS[name]
    check_round_trip(tmp_path, make(), dtype)


def test_plain_nn_modules_round_trip_whole(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.GELU(approximate="tanh"),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1),
        nn.ModuleList([SparseInt8Linear.from_dense(pruned_linear(64, 32, 0.9)), nn.SiLU()]),
        nn.ModuleDict({"head": Int8Linear.from_dense(pruned_linear(32, 10)), "norm": nn.LayerNorm(10, eps=1e-3)}),
    )
    with torch.no_grad():  # non-default running statistics, so a lost buffer would show
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    model[4].train()  # one submodule's training flag differs from the root's

    def run(m, x):
        h = m[5](m[4](m[3](m[2](m[1](m[0](x))))))
        return m[7]["norm"](m[7]["head"](m[6][1](m[6][0](h))))

    x = sample(3, 1, 8, 8)
    expected = run(model, x)
    path = tmp_path / "plain.safetensors"
    sparseq.save(model, path)
    loaded = sparseq.load(path)
    assert isinstance(loaded[6], nn.ModuleList) and isinstance(loaded[7], nn.ModuleDict)
    assert loaded[0].padding == (1, 1) and loaded[0].bias is None
    assert loaded[2].approximate == "tanh" and loaded[7]["norm"].eps == 1e-3
    assert not loaded.training and loaded[4].training and not loaded[6][0].training
    assert torch.equal(loaded[1].running_var, model[1].running_var)
    assert torch.equal(run(loaded, x), expected)


PLAIN_MODULES = [
    nn.Flatten(0, 1), nn.Unflatten(1, (2, 3)), nn.Linear(3, 4, bias=False), nn.Bilinear(2, 3, 4),
    nn.Conv1d(2, 3, 3, stride=2, padding="valid"), nn.Conv2d(2, 4, (3, 1), padding="same", groups=2,
                                                             padding_mode="reflect"),
    nn.Conv3d(1, 2, 3), nn.ConvTranspose1d(2, 3, 3, output_padding=1, stride=2), nn.ConvTranspose2d(2, 3, 3),
    nn.BatchNorm1d(3, momentum=None), nn.BatchNorm2d(3, affine=False), nn.BatchNorm3d(3, track_running_stats=False),
    nn.LayerNorm([3, 4], bias=False), nn.GroupNorm(2, 4), nn.RMSNorm(5, eps=None), nn.Dropout(0.3),
    nn.Dropout1d(), nn.Dropout2d(), nn.MaxPool1d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool1d(2),
    nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool1d(3), nn.AdaptiveAvgPool2d((2, None)),
    nn.AdaptiveMaxPool1d(2), nn.AdaptiveMaxPool2d(2), nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.2),
    nn.PReLU(3, init=0.1), nn.ELU(0.5), nn.GELU("tanh"), nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.Tanh(),
    nn.Hardswish(), nn.Hardsigmoid(), nn.Softplus(2, 10), nn.Softmax(dim=1), nn.LogSoftmax(dim=-1),
    nn.Embedding(10, 3, padding_idx=0, max_norm=1.0), nn.Identity(),
]


def test_every_plain_module_class_is_rebuilt_with_its_arguments(tmp_path):
    model = nn.ModuleList(PLAIN_MODULES)
    path = tmp_path / "plain.safetensors"
    sparseq.save(model, path)
    loaded = sparseq.load(path)
    assert repr(loaded) == repr(model)
    for original, rebuilt in zip(model, loaded):
        assert type(rebuilt) is type(original)
        for key, tensor in original.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], tensor), (original, key)


def test_ninety_percent_sparse_int8_file_is_a_small_fraction_of_fp32(tmp_path):
    dense = nn.Sequential(*[pruned_linear(256, 256, 0.9, seed=seed) for seed in range(3)])
    dense_path = tmp_path / "dense.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_path))
    sparseq.sparsify_(dense, int8=True, format="csr")
    assert all(isinstance(layer, SparseInt8Linear) for layer in dense)
    path = tmp_path / "sparse.safetensors"
    sparseq.save(dense, path)
    ratio = os.path.getsize(path) / os.path.getsize(dense_path)
    assert ratio < 0.20, ratio


def test_tied_and_shared_are_stored_once_and_retied(tmp_path):
    embedding = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight
    shared = SparseLinear.from_dense(pruned_linear(16, 16, 0.9), format="csr")
    model = nn.ModuleDict({"embedding": embedding, "block": nn.Sequential(shared, nn.Tanh(), shared),
                           "head": head}).eval()
    path = tmp_path / "tied.safetensors"
    sparseq.save(model, path)
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    assert "embedding.weight" in keys and "head.weight" not in keys
    assert not any(key.startswith("block.2.") for key in keys)
    info = inspect_file(path)
    assert info["alias_count"] == 1 + len(shared.state_dict()) - 1  # head.weight + block.2's tensors
    assert {"name": "block.2", "same_as": "block.0"} in info["layers"]

    tokens = torch.tensor([[1, 7, 49]])

    def run(m):
        return m["head"](m["block"](m["embedding"](tokens)))

    loaded = sparseq.load(path)
    assert loaded["head"].weight is loaded["embedding"].weight
    assert loaded["block"][0] is loaded["block"][2]
    assert torch.equal(run(loaded), run(model))

    skeleton = nn.ModuleDict({"embedding": nn.Embedding(50, 16),
                              "block": nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)),
                              "head": nn.Linear(16, 50, bias=False)})
    sparseq.load(path, skeleton)
    assert skeleton["head"].weight is skeleton["embedding"].weight
    assert skeleton["block"][0] is skeleton["block"][2]
    assert torch.equal(run(skeleton), run(model))


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------

def tiny_bert(cls_name="BertModel"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def compress_bert(model):
    # The MLM head's decoder shares its weight with the input embedding: left dense.
    prune.magnitude(model, pattern="2:4", ignore=["*attention*", "*pooler*", "cls*"])
    sparseq.sparsify_(model, int8=True, format="2:4", skip=["cls*"])
    quantize_(model, "w8a8", act_bits=8, skip=["*pooler*", "cls*"])
    return model


def bert_inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_compressed_round_trips_whole_and_into_a_skeleton(tmp_path):
    model = compress_bert(tiny_bert())
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"SparseInt8Linear", "Int8Linear", "Linear"} <= kinds
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    path = tmp_path / "bert.safetensors"
    recipe = [{"prune": {"method": "magnitude", "pattern": "2:4"}}, {"quantize": {"scheme": "w8a8"}}]
    sparseq.save(model, path, recipe=recipe)

    info = inspect_file(path)
    assert info["architecture"] == {"kind": "transformers", "class": "BertModel"}
    assert info["recipe"] == recipe
    formats = {layer["name"]: layer["format"] for layer in info["layers"]}
    assert formats["encoder.layer.0.intermediate.dense"] == "2:4 int8"
    assert formats["encoder.layer.0.attention.self.query"] == "int8 w8a8 (act_bits=8)"

    whole = sparseq.load(path)
    assert type(whole).__name__ == "BertModel" and not whole.training
    assert not any(t.is_meta for t in list(whole.parameters()) + list(whole.buffers()))
    with torch.no_grad():
        assert torch.equal(whole(**inputs).last_hidden_state, expected)

    skeleton = tiny_bert()
    sparseq.load(path, skeleton)
    with torch.no_grad():
        assert torch.equal(skeleton(**inputs).last_hidden_state, expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_bert_with_quantized_embeddings_round_trips(tmp_path, bits):
    model = quantize_embeddings_(compress_bert(tiny_bert()), bits=bits)
    assert isinstance(model.embeddings.word_embeddings, QuantizedEmbedding)
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    path = tmp_path / "bert.safetensors"
    sparseq.save(model, path)
    formats = {layer["name"]: layer["format"] for layer in inspect_file(path)["layers"]}
    assert formats["embeddings.word_embeddings"] == f"int{bits} embedding (groups of 32)"
    for loaded in (sparseq.load(path), sparseq.load(path, tiny_bert())):
        assert isinstance(loaded.embeddings.position_embeddings, QuantizedEmbedding)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).last_hidden_state, expected)
    wrong = tiny_bert()
    wrong.embeddings.word_embeddings = nn.Embedding(99, 32)
    with pytest.raises(SparseqFileError, match=r"'embeddings.word_embeddings' has an nn.Embedding weight of shape \(99, 32\)"):
        sparseq.load(path, wrong)
    wrong.embeddings.word_embeddings = nn.Linear(32, 100)
    with pytest.raises(SparseqFileError, match="can only replace an nn.Embedding"):
        sparseq.load(path, wrong)


def test_bert_tied_output_embedding_is_stored_once_and_retied(tmp_path):
    model = compress_bert(tiny_bert("BertForMaskedLM"))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    path = tmp_path / "mlm.safetensors"
    sparseq.save(model, path)
    with safe_open(str(path), "pt") as handle:
        assert "cls.predictions.decoder.weight" not in handle.keys()
    loaded = sparseq.load(path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_bert_without_pooler_and_structurally_pruned_rebuilds_whole(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    inputs = bert_inputs()
    prune.structured(model, 0.5, inputs, targets=("ffn", "heads"))  # narrower layers, one head
    assert model.encoder.layer[0].attention.self.num_attention_heads == 1
    prune.magnitude(model, 0.9, ignore=["*attention*"])
    sparseq.sparsify_(model, int8=True)
    quantize_(model, "w8a8")
    model.sparseq_recipe = [{"prune": {"method": "structured", "ratio": 0.5}}]
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    path = tmp_path / "pruned.safetensors"
    sparseq.save(model, path)  # the recipe comes from model.sparseq_recipe
    assert inspect_file(path)["recipe"] == model.sparseq_recipe

    loaded = sparseq.load(path)
    assert loaded.pooler is None and loaded.encoder.layer[1].attention.self.num_attention_heads == 1
    assert loaded.encoder.layer[0].intermediate.dense.out_features == 32
    assert loaded.sparseq_recipe == model.sparseq_recipe
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, expected)


def test_a_transformers_subclass_needs_a_skeleton(tmp_path):
    transformers = pytest.importorskip("transformers")

    class MyBert(transformers.BertModel):
        pass

    model = MyBert(tiny_bert().config).eval()
    path = tmp_path / "mine.safetensors"
    sparseq.save(model, path)
    with pytest.raises(ValueError, match="MyBert.*not a class of the transformers package.*pass a skeleton"):
        sparseq.load(path)
    inputs = bert_inputs()
    with torch.no_grad():
        assert torch.equal(sparseq.load(path, MyBert(model.config).eval())(**inputs).last_hidden_state,
                           model(**inputs).last_hidden_state)


def test_load_never_builds_from_a_dense_weight_nor_unpickles(tmp_path, monkeypatch):
    model = compress_bert(tiny_bert())
    path = tmp_path / "bert.safetensors"
    sparseq.save(model, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not call this")

    for cls in (SparseLinear, SparseInt8Linear, Int8Linear):
        monkeypatch.setattr(cls, "from_dense", classmethod(forbidden))
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    inputs = bert_inputs()
    with torch.no_grad():
        assert torch.equal(sparseq.load(path)(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


# ----------------------------------------------------------------------------------------------
# Damaged and foreign files
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model, skeleton = with_neighbours(LAYERS["sparse-int8-csr"](), 48, 24)
    path = tmp_path / "model.safetensors"
    sparseq.save(model, path, recipe="sparse90+w8a8")
    return path


def rewrite(path, edit_document, fix_checksum=True):
    """Rewrite the file with its sparseq metadata document changed by ``edit_document``."""
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    document = json.loads(metadata[METADATA_KEY])
    edit_document(document, tensors)
    text = json.dumps(document)
    metadata[METADATA_KEY] = text
    if fix_checksum:
        metadata[METADATA_CHECKSUM_KEY] = hashlib.sha256(text.encode()).hexdigest()
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def expect_file_error(path, match, model=None):
    with pytest.raises(SparseqFileError, match=match) as info:
        sparseq.load(path, model)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-100])
    expect_file_error(saved, "not a readable safetensors file")
    saved.write_bytes(data[:20])
    expect_file_error(saved, "not a readable safetensors file")


def test_flipped_byte_in_the_data(saved):
    data = bytearray(saved.read_bytes())
    data[-50] ^= 0x01
    saved.write_bytes(bytes(data))
    expect_file_error(saved, "does not match its checksum: the file is corrupted")


def test_header_that_is_not_safetensors(saved):
    data = bytearray(saved.read_bytes())
    data[8:12] = b"\x00\xff{]"
    saved.write_bytes(bytes(data))
    expect_file_error(saved, "not a readable safetensors file")
    saved.write_bytes(b"certainly not a model")
    expect_file_error(saved, "not a readable safetensors file")


def test_edited_metadata_without_its_checksum(saved):
    rewrite(saved, lambda doc, tensors: doc["layers"]["0"]["config"].update(act_bits=8), fix_checksum=False)
    expect_file_error(saved, "metadata does not match its checksum")


def test_metadata_that_is_not_json(saved):
    with safe_open(str(saved), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    text = "{not json"
    safetensors.torch.save_file(tensors, str(saved), metadata={
        METADATA_KEY: text, METADATA_CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()})
    expect_file_error(saved, "not valid JSON")


def test_plain_safetensors_file_without_sparseq_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(nn.Linear(4, 2).state_dict(), str(path))
    expect_file_error(path, "no sparseq metadata")
    with pytest.raises(SparseqFileError, match="no sparseq metadata"):
        inspect_file(path)


def test_newer_format_version(saved):
    rewrite(saved, lambda doc, tensors: doc.update(format_version=doc["format_version"] + 1))
    expect_file_error(saved, "format version 2.*upgrade sparseq")
    with pytest.raises(SparseqFileError, match="upgrade sparseq"):
        inspect_file(saved)


def test_metadata_without_a_field(saved):
    rewrite(saved, lambda doc, tensors: doc.pop("layers"))
    expect_file_error(saved, "metadata's 'layers' is missing")


def test_tensor_whose_dtype_differs_from_the_metadata(saved):
    def retype(doc, tensors):
        tensors["0.w_scale"] = tensors["0.w_scale"].view(torch.int32)
    rewrite(saved, retype)
    expect_file_error(saved, "'0.w_scale' is torch.int32 .* metadata records float32")


def test_consistent_file_with_a_wrong_layer_dtype_is_refused(tmp_path):
    model, _ = with_neighbours(LAYERS["int8-act8"](), 48, 24)
    path = tmp_path / "int8.safetensors"
    sparseq.save(model, path)

    def retype(doc, tensors):
        from sparseq.serialization import _sha256
        tensors["0.w_scale"] = tensors["0.w_scale"].double()
        doc["tensors"]["0.w_scale"].update(dtype="float64", sha256=_sha256(tensors["0.w_scale"]))
    rewrite(path, retype)
    expect_file_error(path, "'0.w_scale' is torch.float64; the layer there needs torch.float32")


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        sparseq.load("/nonexistent/model.safetensors")


# ----------------------------------------------------------------------------------------------
# Skeletons that do not fit
# ----------------------------------------------------------------------------------------------

def unchanged_after_failure(skeleton, path, match):
    modules = dict(skeleton.named_modules())
    tensors = {name: t for name, t in skeleton.state_dict(keep_vars=True).items()}
    expect_file_error(path, match, skeleton)
    assert dict(skeleton.named_modules()) == modules
    after = skeleton.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)


def test_skeleton_without_the_module(saved):
    skeleton = nn.ModuleDict({"encoder": nn.Linear(48, 24)})
    unchanged_after_failure(skeleton, saved, "has no module '0'")


def test_skeleton_with_another_module_class(saved):
    skeleton = nn.Sequential(nn.Conv1d(48, 24, 1), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 8))
    unchanged_after_failure(skeleton, saved, "module '0' is a Conv1d")


def test_skeleton_with_other_features(saved):
    skeleton = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 8))
    unchanged_after_failure(skeleton, saved, r"module '0' has an nn.Linear weight of shape \(24, 40\), the file's layer stands for \(24, 48\)")


def test_skeleton_with_extra_and_reshaped_tensors(saved):
    skeleton = nn.Sequential(nn.Linear(48, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 8), nn.Linear(8, 2))
    unchanged_after_failure(skeleton, saved, "Missing key.*4.weight")
    skeleton = nn.Sequential(nn.Linear(48, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 9))
    unchanged_after_failure(skeleton, saved, "size mismatch for 3.weight")
    skeleton = nn.Sequential(nn.Linear(48, 24), nn.ReLU(), nn.Identity(), nn.Linear(24, 8))
    unchanged_after_failure(skeleton, saved, "Unexpected key.*2.weight")


def test_skeleton_on_the_meta_device(saved):
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(48, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 8))
    sparseq.load(saved, skeleton)
    assert all(t.device.type == "cpu" for t in skeleton.state_dict().values() if isinstance(t, torch.Tensor))
    x = sample(3, 48)
    assert torch.equal(skeleton.eval()(x), sparseq.load(saved)(x))


def test_single_layer_saved_alone(tmp_path):
    layer = LAYERS["sparse-bsr"]()
    path = tmp_path / "layer.safetensors"
    sparseq.save(layer, path)
    x = sample(3, 48)
    loaded = sparseq.load(path)
    assert_same_layer(loaded, layer)
    assert torch.equal(loaded(x), layer(x))
    expect_file_error(path, "call load\\(path\\) without a model", nn.Linear(48, 24))


# ----------------------------------------------------------------------------------------------
# Models sparseq cannot rebuild, what cannot be saved, atomic writes
# ----------------------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(x)


def test_custom_class_needs_a_skeleton(tmp_path):
    model = Residual(32)
    model.fc = SparseLinear.from_dense(pruned_linear(32, 32, 0.9), format="csr")
    path = tmp_path / "custom.safetensors"
    sparseq.save(model, path)
    assert inspect_file(path)["architecture"]["kind"] == "custom"
    with pytest.raises(ValueError, match=r"Residual.*pass a skeleton.*model=MyModel"):
        sparseq.load(path)
    x = sample(4, 32)
    assert torch.equal(sparseq.load(path, Residual(32))(x), model(x))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_registered_user_class_is_rebuilt(tmp_path):
    from sparseq.serialization import register_rebuildable

    model = nn.Sequential(Int8WeightOnlyLinear.from_dense(pruned_linear(16, 8)), Scale(0.5))
    path = tmp_path / "scaled.safetensors"
    sparseq.save(model, path)
    with pytest.raises(ValueError, match="Scale is not a class sparseq can rebuild"):
        sparseq.load(path)
    register_rebuildable(Scale)
    sparseq.save(model, path)
    loaded = sparseq.load(path)
    assert isinstance(loaded[1], Scale) and loaded[1].factor == 0.5
    x = sample(2, 16)
    assert torch.equal(loaded(x), model(x))


class JsonlessExtraState(nn.Linear):
    def get_extra_state(self):
        return {"when": object()}

    def set_extra_state(self, state):
        pass


def test_what_cannot_be_saved(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="extra_state.*object.*nothing is pickled"):
        sparseq.save(nn.Sequential(JsonlessExtraState(2, 2)), path)
    with pytest.raises(ValueError, match="recipe.*function"):
        sparseq.save(nn.Linear(2, 2), path, recipe=[{"prune": len}])
    with torch.device("meta"):
        meta_model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        sparseq.save(meta_model, path)
    with pytest.raises(ValueError, match="is a directory"):
        sparseq.save(nn.Linear(2, 2), tmp_path)
    assert not path.exists()


def test_recipe_and_extra_state_round_trip_as_json(tmp_path):
    class JsonExtraState(nn.Linear):
        def get_extra_state(self):
            return {"block": (4, 4), "dtype": torch.bfloat16, "tags": ["a"]}

        def set_extra_state(self, state):
            self.received = state

    path = tmp_path / "x.safetensors"
    recipe = [{"prune": {"pattern": (4, 4), "sparsity": 0.5}}, "w8a8"]
    sparseq.save(nn.Sequential(JsonExtraState(2, 2)), path, recipe=recipe)
    assert inspect_file(path)["recipe"] == recipe
    skeleton = nn.Sequential(JsonExtraState(2, 2))
    sparseq.load(path, skeleton)
    assert skeleton[0].received == {"block": (4, 4), "dtype": torch.bfloat16, "tags": ["a"]}


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    sparseq.save(nn.Sequential(nn.Linear(4, 2)), path)
    before = path.read_bytes()

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        sparseq.save(nn.Sequential(nn.Linear(8, 2)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_inspect_lists_the_layers_without_reading_tensors(saved, monkeypatch):
    info = inspect_file(saved)
    assert info["format"] == "sparseq" and info["format_version"] == 1
    assert info["sparseq_version"] == sparseq.__version__ and info["torch_version"] == torch.__version__
    assert info["recipe"] == "sparse90+w8a8"
    assert info["architecture"] == {"kind": "torch.nn", "class": "torch.nn.Sequential"}
    [layer] = info["layers"]
    assert layer["name"] == "0" and layer["class"] == "SparseInt8Linear"
    assert layer["format"] == "csr int8" and layer["shape"] == [24, 48]
    assert 0 < layer["bytes"] < info["total_bytes"] < info["file_bytes"]
    assert info["total_bytes"] == info["layer_bytes"] + info["other_bytes"]
    text = format_inspection(info)
    for expected in ("SparseInt8Linear", "csr int8", "24x48", "sparse90+w8a8", "torch.nn.Sequential"):
        assert expected in text
    assert inspect_file(saved, verify=True)["verified"]
