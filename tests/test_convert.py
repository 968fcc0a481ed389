import torch.nn as nn

from sparseq.convert import swap_modules


def make_model():
    inner = nn.Module()
    inner.act = nn.ReLU()
    inner.stack = nn.ModuleList([nn.ReLU(), nn.Sequential(nn.Tanh(), nn.ReLU())])
    model = nn.Module()
    model.first = nn.ReLU()
    model.inner = inner
    model.table = nn.ModuleDict({"a": nn.ReLU(), "b": nn.Identity()})
    return model


def relu_to_gelu(module, name):
    return nn.GELU() if isinstance(module, nn.ReLU) else None


def test_replaces_in_every_container_and_reports_names():
    model = make_model()
    replaced = swap_modules(model, relu_to_gelu)
    assert replaced == ["first", "inner.act", "inner.stack.0", "inner.stack.1.1", "table.a"]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 5
    assert isinstance(model.inner.stack[1][0], nn.Tanh)


def test_filter_fn_and_skip_patterns():
    model = make_model()
    replaced = swap_modules(model, relu_to_gelu, filter_fn=lambda m, name: name != "first",
                            skip=["inner.stack"])
    assert replaced == ["inner.act", "table.a"]
    assert isinstance(model.first, nn.ReLU) and isinstance(model.inner.stack[0], nn.ReLU)
    assert swap_modules(make_model(), relu_to_gelu, skip="*.stack.*") == ["first", "inner.act", "table.a"]


def test_children_of_a_replaced_module_are_not_visited():
    model = make_model()
    seen = []

    def replace_stack(module, name):
        seen.append(name)
        return nn.Identity() if name == "inner.stack" else None

    assert swap_modules(model, replace_stack) == ["inner.stack"]
    assert not any(name.startswith("inner.stack.") for name in seen)
    assert isinstance(model.inner.stack, nn.Identity)


def test_the_root_is_never_replaced():
    root = nn.ReLU()
    assert swap_modules(root, relu_to_gelu) == []
