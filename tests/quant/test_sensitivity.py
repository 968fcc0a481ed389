"""sensitivity: per-layer SQNR ordering, the model left as it was, and quantize_'s skip options."""
import pytest
import torch
import torch.nn as nn

from sparseq.nn import Int8Linear
from sparseq.quant import calibrate, quantize_, sensitivity


def model_with_a_hard_layer():
    """Layer "mid" reads an input with one huge channel: per-row int8 activations lose the other
    channels under it, so quantizing "mid" alone hurts the output most."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("first", nn.Linear(16, 32))
    model.add_module("mid", nn.Linear(32, 32))
    model.add_module("relu", nn.ReLU())
    model.add_module("last", nn.Linear(32, 8))
    with torch.no_grad():
        model.first.weight[7] *= 500.0
        model.first.bias[7] = 0.0
        model.mid.weight[:, 7] /= 500.0  # the float function keeps the outlier channel small again
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=gen) for _ in range(3)]


def test_the_hard_layer_comes_first_and_the_model_is_left_alone():
    model = model_with_a_hard_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sensitivity(model, batches(), "w8a8", act_bits=8)
    names = [name for name, _ in report.layers]
    assert names[0] == "mid" and sorted(names) == ["first", "last", "mid"]
    dbs = [db for _, db in report.layers]
    assert dbs == sorted(dbs) and dbs[0] < dbs[1] - 10
    assert report.full_sqnr_db is not None and report.full_sqnr_db <= dbs[0] + 0.5
    assert all(type(m) is nn.Linear for m in (model.first, model.mid, model.last))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    table = str(report)
    assert "mid" in table and "SQNR dB" in table and "(all layers)" in table


def test_static_sensitivity_needs_calibration():
    model = model_with_a_hard_layer()
    with pytest.raises(ValueError, match="run sparseq.quant.calibrate first"):
        sensitivity(model, batches(), "w8a8_static")
    calibrate(model, batches())
    assert len(sensitivity(model, batches(), "w8a8_static", full=False).layers) == 3


def test_quantize_skips_the_most_sensitive_layers():
    model = quantize_(model_with_a_hard_layer(), "w8a8", skip_sensitive=1, calib_data=batches(), act_bits=8)
    assert type(model.mid) is nn.Linear
    assert isinstance(model.first, Int8Linear) and isinstance(model.last, Int8Linear)

    report = sensitivity(model_with_a_hard_layer(), batches(), "w8a8", act_bits=8)
    threshold = (report.layers[0][1] + report.layers[1][1]) / 2
    model = quantize_(model_with_a_hard_layer(), "w8a8", min_sqnr_db=threshold, calib_data=batches(), act_bits=8)
    assert type(model.mid) is nn.Linear and isinstance(model.last, Int8Linear)


def test_skip_options_need_data():
    with pytest.raises(ValueError, match="need calib_data"):
        quantize_(model_with_a_hard_layer(), "w8a8", skip_sensitive=1)
    with pytest.raises(ValueError, match="non-negative int"):
        quantize_(model_with_a_hard_layer(), "w8a8", skip_sensitive=-1, calib_data=batches())
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        sensitivity(model_with_a_hard_layer(), batches(), "int4")
    with pytest.raises(ValueError, match="no Linear layers"):
        sensitivity(nn.Sequential(nn.ReLU()), batches())
