"""sparseq.compress end to end on small models: presets, YAML and list recipes, distillation, the
conversion's layer choices, rejections that leave the model untouched, and restores after a step
fails part way."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import sparseq
from sparseq.nn import FusedActivation, Int8Linear, QuantizedEmbedding
from sparseq.nn._frozen import FrozenLinearBase
from sparseq.recipes import PRESETS, RecipeError, load_recipe, recipe_as_list

import sparseq.compression as compress_module


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def mlp_batches(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=generator) for _ in range(count)]


def make_bert():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    return BertModel(config).eval()


def bert_batches(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 9:] = 0  # one padded sequence
        batches.append({"input_ids": torch.randint(0, 100, (4, 12), generator=generator), "attention_mask": mask})
    return batches


def linear_layers(model):
    """name -> module for every nn.Linear and sparseq layer (outermost only)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, FrozenLinearBase))}


def kinds(model):
    """name -> (class name, sparse format or None)."""
    return {name: (type(module).__name__, getattr(module, "format", None))
            for name, module in linear_layers(model).items()}


class Snapshot:
    """The model's state_dict values, module classes and attributes, to show nothing changed."""

    def __init__(self, model):
        self.model = model
        self.state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        self.modules = {name: module for name, module in model.named_modules()}

    def assert_unchanged(self):
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        for name, tensor in self.state.items():
            assert torch.equal(state[name], tensor), name
        assert dict(self.model.named_modules()) == self.modules  # the same module objects
        assert not hasattr(self.model, "sparseq_recipe")
        assert not hasattr(self.model, "structured_report")


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ----------------------------------------------------------------------------------------------
# Presets


PRESET_LAYERS = {
    "w8a8": ("Int8Linear", None),
    "w8a16": ("Int8WeightOnlyLinear", None),
    "2:4": ("SparseLinear", "2:4"),
    "2:4+w8a8": ("SparseInt8Linear", "2:4"),
    "sparse90": ("SparseLinear", "csr"),
    "sparse90+w8a8": ("SparseInt8Linear", "csr"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_converts_a_bert_and_runs(preset, caplog):
    assert set(PRESET_LAYERS) == set(PRESETS)
    model, batches = make_bert(), bert_batches()
    with torch.no_grad():
        reference = model(**batches[0]).last_hidden_state
    with caplog.at_level("INFO", logger="sparseq.compression"):
        assert sparseq.compress(model, preset, calib_data=batches) is model
    layers = kinds(model)
    assert len(layers) == 13  # 2 x (q, k, v, attention output, intermediate, output) + pooler
    assert set(layers.values()) == {PRESET_LAYERS[preset]}
    with torch.no_grad():
        output = model(**batches[0]).last_hidden_state
    assert output.shape == reference.shape and torch.isfinite(output).all()
    assert cosine(output, reference) > 0.9
    assert model.sparseq_recipe == recipe_as_list(load_recipe(preset))
    assert json.loads(json.dumps(model.sparseq_recipe)) == model.sparseq_recipe
    assert len(model.sparseq_report.lines) == len(PRESETS[preset]) + (preset in ("2:4", "sparse90"))
    assert str(model.sparseq_report) in caplog.text
    if preset.startswith("sparse90"):
        for module in linear_layers(model).values():  # 90% held through the distillation
            zeros = (module.dense_weight() == 0).float().mean().item()
            assert zeros == pytest.approx(0.9, abs=0.01)
    if preset == "2:4+w8a8":
        assert all(module.act_bits is None for module in linear_layers(model).values())


def test_preset_without_the_data_it_needs_is_refused_untouched():
    model = make_bert()
    snapshot = Snapshot(model)
    with pytest.raises(RecipeError, match=r"preset 'sparse90' step 1 \(prune, method 'sparsegpt'\): needs calib_data"):
        sparseq.compress(model, "sparse90", train_data=[(bert_batches()[0], None)])
    snapshot.assert_unchanged()


# ----------------------------------------------------------------------------------------------
# Recipes: YAML and lists


def test_yaml_recipe_from_the_issue(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text('- prune: {method: wanda, sparsity: 0.5, pattern: "2:4", ignore: ["pooler.*"]}\n'
                    "- distill: {epochs: 1}\n"
                    "- quantize: {scheme: w8a8, smoothquant: 0.5}\n")
    model = make_bert()
    sparseq.compress(model, path, calib_data=bert_batches())
    layers = kinds(model)
    assert layers.pop("pooler.dense") == ("Int8Linear", None)  # ignored by the prune step, quantized dense
    assert set(layers.values()) == {("SparseInt8Linear", "2:4")}
    assert [line[0] for line in model.sparseq_report.lines] == [
        "1. prune, method 'wanda'", "2. distill", "3. quantize, scheme 'w8a8'"]
    assert "4 steps on calib_data" in model.sparseq_report.lines[1][1]
    assert model.sparseq_recipe[0]["prune"]["ignore"] == ["pooler.*"]


def test_list_recipe_with_train_data_and_int8_activations_on_2_4(capsys):
    model = make_mlp()
    generator = torch.Generator().manual_seed(2)
    train = [(torch.randn(8, 16, generator=generator), torch.randint(0, 8, (8,), generator=generator))
             for _ in range(3)]
    recipe = [{"prune": {"method": "magnitude", "pattern": "2:4"}},
              {"distill": {"steps": 5, "lr": 1e-3}},
              {"quantize": {"scheme": "w8a8", "act_bits": 8}}]
    sparseq.compress(model, recipe, train_data=train, progress=True)
    assert "compress" in capsys.readouterr().err  # the bar over the steps
    assert set(kinds(model).values()) == {("SparseInt8Linear", "2:4")}
    assert all(module.act_bits == 8 for module in linear_layers(model).values())
    assert "5 steps on train_data" in model.sparseq_report.lines[1][1]
    assert torch.isfinite(model(mlp_batches()[0])).all()


def test_distill_on_calib_data_trains_and_holds_the_zeros():
    recipe = [{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "layer"}}, {"distill": {"steps": 3, "lr": 1e-2}}]
    pruned_only = make_mlp()
    sparseq.compress(pruned_only, recipe[:1])
    model = make_mlp()
    sparseq.compress(model, recipe, calib_data=mlp_batches())
    assert "3 steps on calib_data" in model.sparseq_report.lines[1][1]
    for index in (0, 2, 4):  # 50% per layer: too few zeros for a sparse kernel, the layers stay dense
        pruned, trained = pruned_only[index].weight, model[index].weight
        assert type(model[index]) is nn.Linear
        assert torch.equal(trained == 0, pruned == 0)  # the mask held through training
        assert not torch.equal(trained, pruned)


class RecordingDistiller(compress_module.Distiller):
    seen = []

    def __init__(self, teacher, student, **kwargs):
        RecordingDistiller.seen.append((teacher, student))
        super().__init__(teacher, student, **kwargs)


def test_default_teacher_is_a_copy_taken_before_the_first_step(monkeypatch):
    monkeypatch.setattr(compress_module, "Distiller", RecordingDistiller)
    RecordingDistiller.seen.clear()
    model = make_mlp()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sparseq.compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.8}}, {"distill": {"steps": 1}},
                             {"distill": {"steps": 1}}], calib_data=mlp_batches())
    (first_teacher, student), (second_teacher, _) = RecordingDistiller.seen
    assert student is model and first_teacher is not model and second_teacher is first_teacher
    for name, tensor in first_teacher.state_dict().items():  # dense: the weights before pruning
        assert torch.equal(tensor, before[name]), name
    assert not any(parameter.requires_grad for parameter in first_teacher.parameters())


def test_given_teacher_is_used(monkeypatch):
    monkeypatch.setattr(compress_module, "Distiller", RecordingDistiller)
    RecordingDistiller.seen.clear()
    teacher = make_mlp()
    model = make_mlp()
    sparseq.compress(model, [{"distill": {"steps": 1}}], teacher=teacher, calib_data=mlp_batches())
    assert RecordingDistiller.seen == [(teacher, model)]


# ----------------------------------------------------------------------------------------------
# The conversion


def test_static_int8_with_smoothquant_on_bert():
    model, batches = make_bert(), bert_batches()
    with torch.no_grad():
        reference = model(**batches[0]).last_hidden_state
    sparseq.compress(model, [{"quantize": {"scheme": "w8a8_static", "smoothquant": 0.5, "observer": "percentile"}}],
                     calib_data=batches)
    assert set(kinds(model).values()) == {("Int8StaticLinear", None)}
    assert model.sparseq_report.lines[0][1].startswith("SmoothQuant smoothed")
    with torch.no_grad():
        assert cosine(model(**batches[0]).last_hidden_state, reference) > 0.99


def test_quantize_step_also_quantizes_the_embedding_tables():
    model, batches = make_bert(), bert_batches()
    with torch.no_grad():
        reference = model(**batches[0]).last_hidden_state
    sparseq.compress(model, [{"quantize": {"scheme": "w8a8", "embeddings": 4}}])
    tables = [m for m in model.modules() if isinstance(m, (nn.Embedding, QuantizedEmbedding))]
    assert tables and all(isinstance(m, QuantizedEmbedding) and m.bits == 4 for m in tables)
    assert model.sparseq_recipe[0]["quantize"]["embeddings"] == 4
    with torch.no_grad():
        assert cosine(model(**batches[0]).last_hidden_state, reference) > 0.95


def test_w8a8_fuses_the_ffn_gelu_unless_asked_not_to():
    model, batches = make_bert(), bert_batches()
    with torch.no_grad():
        reference = model(**batches[0]).last_hidden_state
    sparseq.compress(model, "w8a8")
    intermediate = model.encoder.layer[0].intermediate
    assert intermediate.dense.activation == "gelu" and isinstance(intermediate.intermediate_act_fn, FusedActivation)
    assert "GELU fused into 2 int8 layers" in model.sparseq_report.lines[0][1]
    with torch.no_grad():
        assert cosine(model(**batches[0]).last_hidden_state, reference) > 0.99
    unfused = sparseq.compress(make_bert(), [{"quantize": {"scheme": "w8a8", "fuse_gelu": False}}])
    assert unfused.encoder.layer[0].intermediate.dense.activation == "none"
    assert not isinstance(unfused.encoder.layer[0].intermediate.intermediate_act_fn, FusedActivation)


def test_structured_then_int8_quantizes_the_smaller_layers():
    model = make_bert()
    sparseq.compress(model, [{"prune": {"method": "structured", "ratio": 0.5, "targets": ["ffn"]}},
                             {"quantize": {"scheme": "w8a8"}}], calib_data=bert_batches())
    intermediate = model.encoder.layer[0].intermediate.dense
    assert isinstance(intermediate, Int8Linear) and intermediate.out_features == 32
    assert set(kinds(model).values()) == {("Int8Linear", None)}
    assert "2 groups shrunk" in model.sparseq_report.lines[0][1]


def test_sparse_dense_skipped_and_unpruned_layers_each_get_their_layer():
    model = make_mlp()
    sparseq.compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.9, "scope": "layer", "ignore": ["4"]}},
                             {"quantize": {"scheme": "w8a8", "skip": ["2"]}}])
    assert kinds(model) == {"0": ("SparseInt8Linear", "csr"),  # pruned, int8
                            "2": ("SparseLinear", "csr"),  # pruned, skipped by quantize: float sparse
                            "4": ("Int8Linear", None)}  # not pruned: the scheme's dense layer
    assert model[0].act_bits is None


def test_pruned_layers_too_dense_for_sparse_kernels_take_the_schemes_dense_layer():
    model = make_mlp()
    sparseq.compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "layer"}},
                             {"quantize": {"scheme": "w8a16"}}])
    assert set(kinds(model).values()) == {("Int8WeightOnlyLinear", None)}
    assert (model[0].dense_weight() == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_skip_sensitive_leaves_layers_in_float():
    model = make_mlp()
    sparseq.compress(model, [{"quantize": {"skip_sensitive": 1}}], calib_data=mlp_batches())
    classes = sorted(name for name, _ in kinds(model).values())
    assert classes == ["Int8Linear", "Int8Linear", "Linear"]


def test_one_shot_iterator_is_read_once_for_every_step():
    model = make_bert()
    sparseq.compress(model, [{"prune": {"method": "sparsegpt", "pattern": "2:4"}},
                             {"quantize": {"scheme": "w8a8", "act_bits": 8, "smoothquant": 0.5}}],
                     calib_data=iter(bert_batches()))
    assert set(kinds(model).values()) == {("SparseInt8Linear", "2:4")}
    assert "SmoothQuant smoothed" in model.sparseq_report.lines[1][1]


def test_a_second_compress_appends_its_recipe():
    model = make_mlp()
    sparseq.compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.9, "ignore": ["4"]}}])
    sparseq.compress(model, "w8a8")
    assert [next(iter(step)) for step in model.sparseq_recipe] == ["prune", "quantize"]
    assert kinds(model)["4"] == ("Int8Linear", None)


def test_pruned_convolutions_keep_their_zeros_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    sparseq.compress(model, [{"prune": {"method": "magnitude", "sparsity": 0.9, "scope": "layer",
                                        "targets": ["Linear", "Conv2d"]}}, {"quantize": {}}])
    assert type(model[0]) is nn.Conv2d
    assert (model[0].weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert kinds(model) == {"2": ("SparseInt8Linear", "csr")}
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 8)


def test_unused_train_data_and_teacher_are_reported(caplog):
    with caplog.at_level("WARNING", logger="sparseq.compression"):
        sparseq.compress(make_mlp(), "w8a16", train_data=[(mlp_batches()[0], None)], teacher=make_mlp())
    assert "train_data is given but the recipe has no distill step" in caplog.text
    assert "teacher is given but the recipe has no distill step" in caplog.text


# ----------------------------------------------------------------------------------------------
# Rejections: nothing is modified


MAGNITUDE = {"prune": {"method": "magnitude", "sparsity": 0.5}}
REJECTED = [
    ("unknown step", [{"finetune": {}}], {}, RecipeError, r"recipe step 1: unknown step 'finetune'"),
    ("unknown key", [MAGNITUDE, {"quantize": {"bits": 4}}], {}, RecipeError, r"step 2 .*key 'bits'"),
    ("wrong type", [{"prune": {"method": "magnitude", "sparsity": "0.5"}}], {}, RecipeError, r"key 'sparsity'"),
    ("two quantize steps", [{"quantize": {}}, {"quantize": {}}], {}, RecipeError, r"step 2 .*comes after the quantize step 1"),
    ("preset names as steps", ["w8a8"], {}, RecipeError, r"unknown step 'w8a8'"),
    ("prune after quantize", [{"quantize": {}}, MAGNITUDE], {}, RecipeError, r"comes after the quantize step 1"),
    ("distill after quantize", [MAGNITUDE, {"quantize": {}}, {"distill": {}}], {"calib": True}, RecipeError,
     r"step 3 \(distill\): comes after"),
    ("pow2 after prune", [MAGNITUDE, {"quantize": {"pow2_scales": True}}], {}, RecipeError, r"pow2_scales"),
    ("pattern the layers do not fit", [{"prune": {"method": "magnitude", "pattern": "1:6"}}], {}, RecipeError,
     r"step 1 \(prune, method 'magnitude'\): layer '0': pattern 1:6 needs the input dimension"),
    ("block larger than a layer", [{"prune": {"method": "wanda", "sparsity": 0.5, "pattern": [64, 64]}}],
     {"calib": True}, RecipeError, r"block \(64, 64\) is larger than the weight"),
    ("everything ignored", [{"prune": {"method": "magnitude", "sparsity": 0.5, "ignore": "*"}}], {}, RecipeError,
     r"no prunable layers"),
    ("wanda without calib_data", [{"prune": {"method": "wanda", "sparsity": 0.5}}], {}, RecipeError,
     r"needs calib_data \(Wanda"),
    ("structured without calib_data", [{"prune": {"method": "structured", "ratio": 0.5}}], {}, RecipeError,
     r"needs calib_data \(structured"),
    ("smoothquant without calib_data", [{"quantize": {"smoothquant": 0.5}}], {}, RecipeError,
     r"needs calib_data \(SmoothQuant"),
    ("static without calib_data", [{"quantize": {"scheme": "w8a8_static"}}], {}, RecipeError,
     r"needs calib_data \(w8a8_static"),
    ("skip_sensitive without calib_data", [{"quantize": {"skip_sensitive": 1}}], {}, RecipeError,
     r"needs calib_data \(skip_sensitive"),
    ("distill without data", [MAGNITUDE, {"distill": {}}], {}, RecipeError, r"step 2 \(distill\): needs training data"),
    ("distill from itself", [{"distill": {}}], {"calib": True}, RecipeError, r"has nothing to learn"),
    ("missing feature module", [MAGNITUDE, {"distill": {"features": ["9"]}}], {"calib": True}, RecipeError,
     r"key 'features': the student has no module '9'"),
    ("teacher is the model", [MAGNITUDE, {"distill": {}}], {"calib": True, "teacher": "self"}, ValueError,
     r"teacher is the model itself"),
    ("teacher not a module", [MAGNITUDE, {"distill": {}}], {"calib": True, "teacher": "text"}, TypeError,
     r"teacher must be an nn.Module"),
    ("calib_data one tensor", [MAGNITUDE], {"calib": torch.randn(8, 16)}, TypeError, r"wrap one batch as \[batch\]"),
    ("calib_data empty", [MAGNITUDE], {"calib": []}, ValueError, r"calib_data is empty"),
    ("train_data not pairs", [MAGNITUDE, {"distill": {}}], {"train": mlp_batches()}, TypeError,
     r"train_data batches are \(inputs, labels\) pairs"),
]


@pytest.mark.parametrize("recipe, data, error, message", [case[1:] for case in REJECTED],
                         ids=[case[0] for case in REJECTED])
def test_rejected_before_anything_is_modified(recipe, data, error, message):
    model = make_mlp()
    snapshot = Snapshot(model)
    calib = data.get("calib")
    teacher = {"self": model, "text": "text"}.get(data.get("teacher"))
    with pytest.raises(error, match=message):
        sparseq.compress(model, recipe, calib_data=mlp_batches() if calib is True else calib,
                         teacher=teacher, train_data=data.get("train"))
    snapshot.assert_unchanged()


def test_model_must_be_a_module_holding_layers():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        sparseq.compress("model", "w8a8")
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        sparseq.compress(nn.Linear(4, 4), "w8a8")


# ----------------------------------------------------------------------------------------------
# A step that fails part way restores the model


class BadBatches:
    """Re-iterable training data (not a list, so it is not checked up front) whose batch the
    model rejects."""

    def __iter__(self):
        return iter([(torch.randn(8, 5), None)])


def test_failed_distill_restores_the_pruned_weights():
    model = make_mlp()
    snapshot = Snapshot(model)
    with pytest.raises(ValueError, match=r"recipe step 2 \(distill\) failed and the model was restored"):
        sparseq.compress(model, [MAGNITUDE, {"distill": {"steps": 1}}], train_data=BadBatches())
    snapshot.assert_unchanged()


def test_failed_conversion_restores_swapped_modules_and_attributes(monkeypatch):
    def broken_quantize(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(compress_module, "quantize_", broken_quantize)
    model = make_bert()
    snapshot = Snapshot(model)
    attention = model.encoder.layer[0].attention.self
    heads = attention.num_attention_heads
    with pytest.raises(RuntimeError, match=r"step 2 \(quantize, scheme 'w8a8'\) failed .*simulated failure"):
        sparseq.compress(model, [{"prune": {"method": "structured", "ratio": 0.5}}, {"quantize": {}}],
                         calib_data=bert_batches())
    snapshot.assert_unchanged()
    assert attention.num_attention_heads == heads
    with torch.no_grad():
        assert torch.isfinite(model(**bert_batches()[0]).last_hidden_state).all()
