"""The quickstart (README: `deconvlab train experiment=quickstart`, `deconvlab sweep quickstart`) visibly deblurs:
its settings, its network's field, its sweep's early stopping, and +1.5 dB over the blurred input."""

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate

from deconvlab.config import compose_config
from deconvlab.models.simple import ResidualDeblurCNN, dilation_ramp
from deconvlab.sweep.spec import load_sweep, validate
from deconvlab.train import train

# The claim the README and issue 26 make: the champion, and a plain train, end this far above the input.
MIN_GAIN_DB = 1.5


def test_dilation_ramp_widens_the_field_without_gaps():
    assert dilation_ramp(7, 8) == [1, 2, 4, 8, 4, 2, 1]
    assert dilation_ramp(7, 2) == [1, 2, 2, 2, 2, 2, 1]
    assert dilation_ramp(5, 1) == [1] * 5
    assert dilation_ramp(2, 4) == [1, 1]
    for depth in range(1, 10):
        for peak in (1, 2, 4, 8):
            ramp = dilation_ramp(depth, peak)
            # A field stays contiguous while each dilation is at most the field's width so far.
            reach = [1 + 2 * sum(ramp[:i]) for i in range(depth)]
            assert all(d <= r for d, r in zip(ramp, reach, strict=True)), ramp
    with pytest.raises(ValueError, match="max_dilation"):
        dilation_ramp(3, 0)


def _field_of_one_output_pixel(model: nn.Module, size: int) -> int:
    """The side of the input window that changes one centre output pixel (measured by its gradient)."""
    x = torch.rand(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, size // 2, size // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(dim=1))
    return int(rows.max() - rows.min() + 1)


def test_a_dilated_network_sees_further_at_the_same_parameters_and_starts_at_the_identity():
    torch.manual_seed(0)
    plain, dilated = ResidualDeblurCNN(width=4, depth=7), ResidualDeblurCNN(width=4, depth=7, max_dilation=2)
    x = torch.rand(2, 1, 40, 40)
    assert torch.equal(dilated(x), x)  # zero-initialised last layer: output = blurred input
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in dilated.parameters())
    for model in (plain, dilated):
        nn.init.normal_(model.body[-1].weight)  # open the residual path so gradients reach the input
    assert _field_of_one_output_pixel(plain, 63) == plain.receptive_field == 15
    assert _field_of_one_output_pixel(dilated, 63) == dilated.receptive_field == 25


def test_quickstart_composes_with_its_tuned_settings(tracking_uri):
    cfg = compose_config(["experiment=quickstart"])
    model = instantiate(cfg.model)
    # The settings measured to reach +2.5 to +3.3 dB in 16 epochs (conf/experiment/quickstart.yaml).
    assert (cfg.model.width, cfg.model.depth, cfg.model.max_dilation) == (16, 7, 2)
    assert model.receptive_field == 25
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.optim.lr) == (8, 16, 2.0e-3)
    # The degradation the +1.5 dB claim is about: a disk of radius 3 and 1 % noise, on scikit-image's images.
    degradation = instantiate(cfg.data.degradation)
    assert degradation.kernel.shape == (7, 7) and degradation.noise_sigma == 0.01 and cfg.data.root is None


def test_quickstart_sweep_judges_trials_after_a_few_epochs_and_trains_the_best_as_long_as_a_plain_run(
        tracking_uri):
    spec = load_sweep("quickstart")
    validate(spec)  # every search-space value composes
    trial = compose_config(spec.trial_overrides({}))
    plain = compose_config(["experiment=quickstart"])
    assert spec.scheduler["type"] == "asha"
    assert spec.scheduler.get("max_t", trial.trainer.max_epochs) == trial.trainer.max_epochs \
        == plain.trainer.max_epochs
    # After one epoch val/psnr ranks how fast a trial leaves the identity, not where it ends.
    assert spec.scheduler["grace_period"] >= 4
    assert (spec.num_samples, spec.max_concurrent_trials) == (6, 2)


@pytest.mark.slow  # ~20 s on one core: the experiment's whole budget
def test_quickstart_train_ends_at_least_1_5_db_above_the_blurred_input(compose):
    """`deconvlab train experiment=quickstart` as the README runs it, untracked. Measured (one thread, seeds
    0-2): +3.3, +2.7, +2.8 dB over the input's 23.7 dB; the test's seed 0 leaves a dB of margin for other
    BLAS builds and thread counts."""
    cfg = compose("experiment=quickstart", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                  "logger=none", tiny=False)
    metrics = train(cfg).metrics
    assert metrics["val/psnr"] - metrics["val/psnr_input"] >= MIN_GAIN_DB, metrics
