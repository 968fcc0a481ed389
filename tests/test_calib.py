"""The batch convention and the all-or-nothing guard that every pass shares."""
import pytest
import torch
import torch.nn as nn

from sparseq.calib import (StopForward, all_or_nothing, call_model, input_hooks, iter_batches, token_rows,
                           main_output, run_batches)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale=1.0):
        return self.fc(x) * scale


def test_call_model_by_batch_type():
    model = TwoInputs()
    x = torch.randn(2, 4)
    expected = model(x) * 2.0
    torch.testing.assert_close(call_model(model, {"x": x, "scale": 2.0}), expected)
    torch.testing.assert_close(call_model(model, (x, 2.0)), expected)
    torch.testing.assert_close(call_model(model, [x, 2.0]), expected)
    torch.testing.assert_close(call_model(model, x), model(x))
    with pytest.raises(TypeError, match="a batch must be a dict"):
        call_model(model, 3)


def test_iter_batches_rejects_single_batches_and_empty_data():
    with pytest.raises(TypeError, match="wrap one batch"):
        list(iter_batches(torch.randn(2, 4)))
    with pytest.raises(TypeError, match="iterable of batches"):
        list(iter_batches(5))
    with pytest.raises(ValueError, match="calib_data is empty"):
        list(iter_batches([]))
    assert len(list(iter_batches([1, 2, 3], max_batches=2))) == 2


def test_run_batches_sees_inputs_restores_training_and_names_bad_batches():
    model = TwoInputs().train()
    seen = []
    with input_hooks({"fc": model.fc}, lambda name, mod, x: seen.append((name, x.shape, mod.training))):
        assert run_batches(model, [torch.randn(2, 4), torch.randn(5, 4)]) == 2
    assert seen == [("fc", torch.Size([2, 4]), False), ("fc", torch.Size([5, 4]), False)]
    assert model.training and model.fc.training
    with pytest.raises(ValueError, match="batch 1 could not be run"):
        run_batches(model, [torch.randn(2, 4), torch.randn(2, 7)])
    model.fc.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(StopForward()))
    assert run_batches(model, [torch.randn(2, 4)]) == 1


def test_main_output_finds_the_tensor():
    t = torch.ones(2)
    assert main_output(t) is t
    assert main_output((t, torch.zeros(1))) is t
    assert main_output({"other": torch.zeros(1), "logits": t}) is t
    with pytest.raises(TypeError):
        main_output("text")


def test_all_or_nothing_restores_parameters_on_error():
    model = TwoInputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with all_or_nothing(model):
            with torch.no_grad():
                model.fc.weight.zero_()
            raise RuntimeError("boom")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with all_or_nothing(model):
        with torch.no_grad():
            model.fc.bias.zero_()
    assert bool((model.fc.bias == 0).all())


def test_token_rows_leave_out_padded_positions_of_the_running_batch():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, attention_mask):
            return self.fc(x)

    model = Tokens()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    seen = []
    with input_hooks({"fc": model.fc}, lambda name, mod, inp: seen.append(token_rows(inp))):
        run_batches(model, [{"x": x, "attention_mask": mask}, (x, mask)])
    torch.testing.assert_close(seen[0], x[mask.bool()])  # the 5 real tokens
    assert seen[1].shape == (8, 3)  # a tuple batch names no mask: every row counts
    assert token_rows(x).shape == (8, 3)  # outside a run
