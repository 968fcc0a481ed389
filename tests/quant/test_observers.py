import pytest
import torch

from sparseq.quant import MinMaxObserver, MSEObserver, PercentileObserver
from sparseq.quant.observers import make_observer, quantization_mse


def test_minmax_scale_is_the_largest_magnitude_over_qmax():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([[-3.0, 1.0], [2.0, 0.5]]))
    obs.observe(torch.tensor([2.5]))
    assert obs.amax == 3.0 and obs.count == 5
    assert obs.scale(127) == 3.0 / 127
    assert obs.scale(63) == 3.0 / 63


def test_all_zero_activations_give_the_unit_range():
    obs = MinMaxObserver()
    obs.observe(torch.zeros(4, 3))
    assert obs.scale(127) == 1.0 / 127


def test_percentile_on_hand_checkable_data_across_batches():
    obs = PercentileObserver(percentile=90.0)
    values = torch.arange(1, 1001, dtype=torch.float32)
    for chunk in values.flip(0).split(300):  # four batches, negative signs too
        obs.observe(-chunk)
    # torch.quantile's linear interpolation: position 0.9 * 999 = 899.1 -> 900 + 0.1
    assert obs.scale(127) == pytest.approx(900.1 / 127, rel=1e-6)
    assert obs.amax == 1000.0


def test_percentile_sample_is_bounded_and_uniform():
    obs = PercentileObserver(percentile=50.0, max_samples=2000)
    for seed in range(10):
        obs.observe(torch.rand(10_000, generator=torch.Generator().manual_seed(100 + seed)) * 2 - 1)
    assert obs.sample.numel() == 2000
    # the median of |U(-1, 1)| is 0.5; a uniform 2000-sample lands within a few percent
    assert obs.scale(1) == pytest.approx(0.5, abs=0.04)


def test_mse_finds_the_clip_of_least_error():
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(20_000, generator=gen), torch.tensor([40.0])])
    qmax = 7  # a coarse grid makes clipping the one outlier worth it
    obs = MSEObserver()
    obs.observe(data)
    clip = obs.scale(qmax) * qmax
    fine_grid = torch.linspace(0.01, 40.0, 4000).tolist()
    best = min(quantization_mse(data, c, qmax) for c in fine_grid)
    assert clip < 20
    assert quantization_mse(data, clip, qmax) <= best * 1.01
    assert quantization_mse(data, clip, qmax) < quantization_mse(data, 40.0, qmax)


def test_mse_search_is_redone_after_new_data():
    obs = MSEObserver()
    obs.observe(torch.linspace(-1, 1, 101))
    first = obs.scale(127)
    obs.observe(torch.linspace(-10, 10, 101))
    assert obs.scale(127) > 5 * first


@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MSEObserver])
def test_bad_use_raises(cls):
    obs = cls()
    with pytest.raises(RuntimeError, match="seen no activations"):
        obs.scale(127)
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs.observe(torch.tensor([float("inf")]))
    with pytest.raises(TypeError, match="float tensors"):
        obs.observe(torch.tensor([1, 2]))
    obs.observe(torch.tensor([1.0]))
    for qmax in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="qmax"):
            obs.scale(qmax)


def test_make_observer():
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("mse"), MSEObserver)
    custom = make_observer(lambda: PercentileObserver(99.0))
    assert isinstance(custom, PercentileObserver) and custom.percentile == 99.0
    with pytest.raises(ValueError, match="unknown observer 'max'"):
        make_observer("max")
    with pytest.raises(TypeError, match="lacks observe"):
        make_observer(lambda: 3)
    with pytest.raises(TypeError, match="observer must be"):
        make_observer(3)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0)
