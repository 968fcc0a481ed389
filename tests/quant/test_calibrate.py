import logging

import pytest
import torch
import torch.nn as nn

from sparseq.quant import MinMaxObserver, PercentileObserver, calibrate


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, generator=gen) for _ in range(n)]


def test_minmax_observers_hold_each_layers_input_range():
    model, data = mlp(), batches()
    assert calibrate(model, data) is model
    first, second = model[0].act_observer, model[2].act_observer
    assert isinstance(first, MinMaxObserver)
    expected_first = max(float(b.abs().max()) for b in data)
    with torch.no_grad():
        expected_second = max(float(torch.relu(model[0](b)).abs().max()) for b in data)
    assert first.scale(127) == pytest.approx(expected_first / 127, rel=1e-6)
    assert second.scale(127) == pytest.approx(expected_second / 127, rel=1e-6)
    assert first.count == 3 * 4 * 6


def test_observer_choice_skip_targets_and_max_batches():
    model, data = mlp(), batches()
    calibrate(model, data, observer=lambda: PercentileObserver(50.0), skip=["2"], max_batches=1)
    assert isinstance(model[0].act_observer, PercentileObserver)
    assert model[0].act_observer.count == 4 * 6  # one batch only
    assert not hasattr(model[2], "act_observer")


def test_dict_and_tuple_batches_and_training_flag_restored():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b=None):
            return self.fc(a + (0 if b is None else b))

    model = TwoInputs().train()
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    calibrate(model, [{"a": a, "b": b}, (a,)])
    assert model.fc.act_observer.amax == 3.0
    assert model.training and model.fc.training


def test_layers_the_data_never_reaches_get_no_observer(caplog):
    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused_head = mlp(), nn.Linear(3, 2)

        def forward(self, x):
            return self.body(x)

    model = WithHead()
    with caplog.at_level(logging.WARNING, logger="sparseq"):
        calibrate(model, batches())
    assert "unused_head" in caplog.text
    assert not hasattr(model.unused_head, "act_observer") and hasattr(model.body[0], "act_observer")


def test_bad_input_leaves_the_model_without_observers():
    model = mlp()
    with pytest.raises(ValueError, match="batch 0 could not be run"):
        calibrate(model, [torch.randn(4, 5)])
    nan_batch = torch.randn(4, 6)
    nan_batch[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*NaN"):
        calibrate(model, [torch.randn(4, 6), nan_batch])
    assert not any(hasattr(m, "act_observer") for m in model.modules())
    with pytest.raises(ValueError, match="unknown observer"):
        calibrate(model, batches(), observer="absmax")
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        calibrate(lambda x: x, batches())
    with pytest.raises(ValueError, match="no .*Linear.* layers"):
        calibrate(nn.Sequential(nn.ReLU()), batches())


def test_a_failed_recalibration_keeps_the_previous_observers():
    model = mlp()
    calibrate(model, batches())
    before = model[0].act_observer
    with pytest.raises(ValueError):
        calibrate(model, [torch.randn(4, 5)])
    assert model[0].act_observer is before
