"""Recipes: presets, YAML files and lists read into checked steps; every rejection names the step,
the key and what is allowed."""
import json
import re

import pytest

from sparseq.quant import SCHEMES
from sparseq.recipes import PRESETS, RecipeError, check_inputs, load_recipe, recipe_as_list

ISSUE_EXAMPLE = """\
- prune: {method: wanda, sparsity: 0.5, pattern: "2:4", ignore: ["pooler.*"]}
- distill: {epochs: 1}
- quantize: {scheme: w8a8, smoothquant: 0.5}
"""


def test_presets_are_the_six_documented_recipes_and_parse():
    assert list(PRESETS) == ["w8a8", "w8a16", "2:4", "2:4+w8a8", "sparse90", "sparse90+w8a8"]
    kinds = {name: [step.kind for step in load_recipe(name)] for name in PRESETS}
    assert kinds == {"w8a8": ["quantize"], "w8a16": ["quantize"], "2:4": ["prune"],
                     "2:4+w8a8": ["prune", "quantize"], "sparse90": ["prune", "distill"],
                     "sparse90+w8a8": ["prune", "distill", "quantize"]}
    two_four = load_recipe("2:4+w8a8")[0].options
    assert (two_four["method"], two_four["pattern"], two_four["sparsity"]) == ("sparsegpt", "2:4", 0.5)
    assert load_recipe("sparse90")[0].options["sparsity"] == 0.9
    assert load_recipe("w8a16")[0].source == "preset 'w8a16'"


def test_presets_say_which_data_they_need():
    for name in ("w8a8", "w8a16"):
        check_inputs(load_recipe(name), has_calib=False, has_train=False, has_teacher=False)
    for name in ("2:4", "2:4+w8a8", "sparse90", "sparse90+w8a8"):
        with pytest.raises(RecipeError, match=rf"preset '{re.escape(name)}' step 1 .*needs calib_data"):
            check_inputs(load_recipe(name), has_calib=False, has_train=True, has_teacher=False)
        check_inputs(load_recipe(name), has_calib=True, has_train=False, has_teacher=False)


def test_list_recipe_fills_defaults_and_round_trips_as_json():
    steps = load_recipe([{"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "ignore": "pooler.*"}},
                         {"distill": {"steps": 3, "features": ["encoder"]}},
                         {"quantize": {"scheme": "w8a8_static", "smoothquant": 0.5}}])
    normalised = recipe_as_list(steps)
    assert normalised == [
        {"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "ignore": ["pooler.*"],
                   "max_batches": None, "sequential": True}},
        {"distill": {"epochs": None, "steps": 3, "lr": 1e-4, "temperature": 4.0, "alpha": 0.5,
                     "features": {"encoder": "encoder"}}},
        {"quantize": {"scheme": "w8a8_static", "act_bits": 8, "smoothquant": 0.5, "fuse_gelu": True,
                      "observer": "minmax", "pow2_scales": False, "skip": [], "skip_sensitive": 0,
                      "min_sqnr_db": None, "embeddings": None}}]
    assert json.loads(json.dumps(normalised)) == normalised
    assert recipe_as_list(load_recipe(normalised)) == normalised  # the normalised form reads back as itself
    for name in PRESETS:
        again = recipe_as_list(load_recipe(name))
        assert recipe_as_list(load_recipe(again)) == again


def test_prune_options_per_method():
    magnitude, = load_recipe([{"prune": {"method": "magnitude", "ratio": 0.8, "pattern": (4, 4), "scope": "layer",
                                         "targets": ["Linear", "Conv2d"]}}])
    assert magnitude.options == {"method": "magnitude", "sparsity": 0.8, "pattern": [4, 4], "scope": "layer",
                                 "targets": ["Linear", "Conv2d"], "ignore": []}
    structured, = load_recipe([{"prune": {"method": "structured", "sparsity": 0.25, "targets": "ffn",
                                          "importance": "activation", "round_to": 8}}])
    assert structured.options == {"method": "structured", "ratio": 0.25, "importance": "activation",
                                  "targets": ["ffn"], "ignore": [], "round_to": 8}
    sparsegpt, = load_recipe([{"prune": {"method": "sparsegpt", "pattern": "4:8", "blocksize": 64}}])
    assert (sparsegpt.options["sparsity"], sparsegpt.options["blocksize"], sparsegpt.options["percdamp"]) == \
        (0.5, 64, 0.01)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".txt"])
def test_yaml_file_as_str_or_path(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(ISSUE_EXAMPLE)
    expected = [{"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "ignore": ["pooler.*"]}},
                {"distill": {"epochs": 1}}, {"quantize": {"scheme": "w8a8", "smoothquant": 0.5}}]
    for recipe in (str(path), path):
        steps = load_recipe(recipe)
        assert recipe_as_list(steps) == recipe_as_list(load_recipe(expected))
        assert steps[0].source == f"recipe file 'recipe{suffix}'"


def test_yaml_bare_step_names_take_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- prune: {method: magnitude, sparsity: 0.5}\n- distill\n- quantize:\n")
    steps = load_recipe(path)
    assert [step.kind for step in steps] == ["prune", "distill", "quantize"]
    assert steps[1].options["epochs"] == 1 and steps[2].options["scheme"] == "w8a8"


def test_yaml_unquoted_n_m_gets_a_hint(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- prune: {method: sparsegpt, pattern: 2:4}\n")  # YAML 1.1: the number 124
    with pytest.raises(RecipeError, match=r"step 1 \(prune, method 'sparsegpt'\): key 'pattern'.*quote it"):
        load_recipe(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_recipe(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("- prune: {method: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("prune: {method: magnitude}\n")
    with pytest.raises(RecipeError, match="must hold a list of steps"):
        load_recipe(mapping)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="must hold a list"):
        load_recipe(empty)


PRUNE_HALF = {"prune": {"method": "magnitude", "sparsity": 0.5}}

# (recipe, the message's expected parts as one regex)
REJECTED = [
    ("int4", r"unknown recipe 'int4': not a preset \(w8a8, w8a16, 2:4"),
    (42, r"a recipe is a preset name .* got int"),
    ([], r"recipe has no steps"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5}, "distill": {}}], r"recipe step 1: a step is a one-key dict"),
    ([PRUNE_HALF, {"finetune": {}}], r"recipe step 2: unknown step 'finetune'; steps are prune, distill, quantize"),
    ([{"distill": [1]}], r"step 1 \(distill\): the options must be a dict"),
    ([{"prune": {"sparsity": 0.5}}], r"step 1 \(prune\): key 'method' is required; one of magnitude, wanda"),
    ([{"prune": {"method": "random", "sparsity": 0.5}}], r"key 'method': 'random' is not one of magnitude"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "amount": 1}}],
     r"step 1 \(prune, method 'wanda'\): key 'amount' is not an option of method 'wanda'; allowed keys: ignore, "
     r"max_batches, pattern, sequential, sparsity"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "scope": "global"}}], r"key 'scope' .*only magnitude ranks"),
    ([{"prune": {"method": "structured", "ratio": 0.5, "pattern": "2:4"}}],
     r"key 'pattern' is not an option of method 'structured' \(structured pruning removes whole"),
    ([{"prune": {"method": "structured"}}], r"key 'ratio' is required"),
    ([{"prune": {"method": "magnitude", "sparsity": "half"}}], r"key 'sparsity': expected a number in \[0, 1\)"),
    ([{"prune": {"method": "magnitude", "sparsity": 1.0}}], r"key 'sparsity': expected a number in \[0, 1\)"),
    ([{"prune": {"method": "magnitude", "sparsity": True}}], r"key 'sparsity': expected a number"),
    ([{"prune": {"method": "magnitude"}}], r"key 'sparsity': a sparsity in \[0, 1\) is required"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "ratio": 0.5}}], r"give one of 'sparsity' and 'ratio'"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.7, "pattern": "2:4"}}], r"pattern 2:4 fixes the sparsity at 0.5"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "3:2"}}], r"key 'pattern': N:M pattern '3:2' needs"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": [4]}}], r"key 'pattern': a block pattern must be"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "diagonal"}}], r"unknown sparsity pattern"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "model"}}], r"key 'scope': 'model' is not one of"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "targets": ["Embedding"]}}],
     r"key 'targets': expected a non-empty list drawn from Linear, Conv1d, Conv2d, Conv3d"),
    ([{"prune": {"method": "structured", "ratio": 0.5, "targets": ["mlp"]}}],
     r"key 'targets': expected a non-empty list drawn from linear, conv, ffn, heads"),
    ([{"prune": {"method": "magnitude", "sparsity": 0.5, "ignore": [3]}}], r"key 'ignore': expected a string or a list"),
    ([{"prune": {"method": "sparsegpt", "sparsity": 0.5, "blocksize": 0}}], r"key 'blocksize': expected an integer >= 1"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "sequential": "yes"}}], r"key 'sequential': expected true or false"),
    ([PRUNE_HALF, {"distill": {"epochs": 1.5}}], r"step 2 \(distill\): key 'epochs': expected an integer >= 1"),
    ([PRUNE_HALF, {"distill": {"lr": 0}}], r"key 'lr': expected a number in \(0, inf\)"),
    ([PRUNE_HALF, {"distill": {"alpha": 2}}], r"key 'alpha': expected a number in \[0, 1\]"),
    ([PRUNE_HALF, {"distill": {"features": 3}}], r"key 'features': expected \{student module: teacher module\}"),
    ([PRUNE_HALF, {"distill": {"teacher": "bert"}}], r"key 'teacher' is not an option of distill; allowed keys: alpha"),
    ([{"quantize": {"scheme": "int4"}}], r"step 1 \(quantize\): key 'scheme': 'int4' is not one of w8a8, w8a8_static"),
    ([{"quantize": {"scheme": "w8a16", "smoothquant": 0.5}}],
     r"step 1 \(quantize, scheme 'w8a16'\): key 'smoothquant' is not an option of scheme 'w8a16' \(weight-only"),
    ([{"quantize": {"scheme": "w8a16", "act_bits": 8}}], r"key 'act_bits' is not an option of scheme 'w8a16'"),
    ([{"quantize": {"scheme": "w8a8", "observer": "mse"}}], r"key 'observer' .*only w8a8_static calibrates"),
    ([{"quantize": {"scheme": "w8a8_static", "observer": "max"}}], r"key 'observer': 'max' is not one of"),
    ([{"quantize": {"scheme": "w8a8", "act_bits": 6}}], r"key 'act_bits': 6 is not one of 'auto', 7, 8"),
    ([{"quantize": {"scheme": "w8a8_static", "act_bits": "auto"}}], r"key 'act_bits': 'auto' is not one of 7, 8"),
    ([{"quantize": {"smoothquant": "yes"}}], r"key 'smoothquant': expected a number in \[0, 1\] or null"),
    ([{"quantize": {"pow2_scales": 1}}], r"key 'pow2_scales': expected true or false"),
    ([{"quantize": {"embeddings": 6}}], r"key 'embeddings': 6 is not one of None, 8, 4"),
    ([{"quantize": {"scheme": "w8a16", "fuse_gelu": True}}], r"key 'fuse_gelu' .*only the W8A8 kernels fuse"),
    ([{"quantize": {"skip_sensitive": -1}}], r"key 'skip_sensitive': expected an integer >= 0"),
    ([{"quantize": {"scheme": "w8a8"}}, {"quantize": {"scheme": "w8a16"}}],
     r"step 2 \(quantize, scheme 'w8a16'\): comes after the quantize step 1; quantize must be the last step"),
    ([{"quantize": {}}, PRUNE_HALF], r"step 2 \(prune, method 'magnitude'\): comes after the quantize step 1"),
    ([PRUNE_HALF, {"quantize": {}}, {"distill": {}}], r"step 3 \(distill\): comes after the quantize step 2"),
    ([PRUNE_HALF, {"prune": {"method": "structured", "ratio": 0.5}}],
     r"step 2 \(prune, method 'structured'\): a structured prune step cannot follow the prune step 1"),
    ([PRUNE_HALF, {"quantize": {"pow2_scales": True}}], r"pow2_scales cannot follow the prune step 1"),
]


@pytest.mark.parametrize("recipe, message", REJECTED, ids=[str(i) for i in range(len(REJECTED))])
def test_rejections_name_the_step_the_key_and_the_choices(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_structured_then_unstructured_and_pow2_without_prune_are_fine():
    load_recipe([{"prune": {"method": "structured", "ratio": 0.5}}, PRUNE_HALF])
    load_recipe([{"prune": {"method": "structured", "ratio": 0.5}}, {"quantize": {"pow2_scales": True}}])
    load_recipe([{"quantize": {"scheme": "w8a8_static", "pow2_scales": True}}])


@pytest.mark.parametrize("step, reason", [
    ({"prune": {"method": "wanda", "sparsity": 0.5}}, "Wanda scores weights"),
    ({"prune": {"method": "sparsegpt", "sparsity": 0.5}}, "SparseGPT builds"),
    ({"prune": {"method": "structured", "ratio": 0.5}}, "example batch"),
    ({"prune": {"method": "structured", "ratio": 0.5, "importance": "activation"}}, "scores units by their activations"),
    ({"quantize": {"smoothquant": 0.5}}, "SmoothQuant measures"),
    ({"quantize": {"scheme": "w8a8_static"}}, "w8a8_static calibrates"),
    ({"quantize": {"skip_sensitive": 2}}, "sensitivity"),
    ({"quantize": {"min_sqnr_db": 30}}, "sensitivity"),
])
def test_steps_that_need_calibration_data(step, reason):
    steps = load_recipe([step])
    with pytest.raises(RecipeError, match=f"step 1 .*needs calib_data \\(.*{reason}"):
        check_inputs(steps, has_calib=False, has_train=True, has_teacher=True)
    check_inputs(steps, has_calib=True, has_train=False, has_teacher=False)


def test_magnitude_and_plain_quantize_need_no_data():
    check_inputs(load_recipe([PRUNE_HALF, {"quantize": {"scheme": "w8a16"}}]), False, False, False)


def test_distill_needs_training_data_and_something_to_learn():
    steps = load_recipe([PRUNE_HALF, {"distill": {}}])
    with pytest.raises(RecipeError, match=r"step 2 \(distill\): needs training data"):
        check_inputs(steps, has_calib=False, has_train=False, has_teacher=True)
    check_inputs(steps, has_calib=False, has_train=True, has_teacher=False)
    check_inputs(steps, has_calib=True, has_train=False, has_teacher=False)
    alone = load_recipe([{"distill": {}}])
    with pytest.raises(RecipeError, match=r"step 1 \(distill\): has nothing to learn"):
        check_inputs(alone, has_calib=True, has_train=True, has_teacher=False)
    check_inputs(alone, has_calib=True, has_train=True, has_teacher=True)


def test_every_quantize_scheme_has_options():
    for scheme in SCHEMES:
        assert load_recipe([{"quantize": {"scheme": scheme}}])[0].options["scheme"] == scheme


def test_recipe_as_tuple():
    assert recipe_as_list(load_recipe((PRUNE_HALF,))) == recipe_as_list(load_recipe([PRUNE_HALF]))
