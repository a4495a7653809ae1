"""Xu et al.'s DCNN / ODCNN: SVD initialisation equals the separable Wiener filter, training, configs."""

from __future__ import annotations

import pytest
import torch

from deconvlab.data.degrade import Degradation, disk_kernel, motion_kernel
from deconvlab.models import get_model_spec, list_models
from deconvlab.models.wiener import pseudo_inverse_kernel, separable_factors, separable_filter
from deconvlab.models.xu import DeconvCNN, DeconvOutlierCNN, OutlierRejectionCNN


def _pairs(
    kernel: torch.Tensor, count: int, size: int = 48, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred/sharp pairs cut from the camera image (a real texture, not noise)."""
    from skimage import data

    camera = torch.from_numpy(data.camera() / 255.0).float()
    g = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, 512 - size, (count, 2), generator=g)
    sharp = torch.stack([camera[r : r + size, c : c + size] for r, c in corners.tolist()])[:, None]
    blurred = torch.stack([Degradation(kernel, 0.01)(s, g) for s in sharp])
    return blurred, sharp


@pytest.mark.parametrize("model_cls", [DeconvCNN, DeconvOutlierCNN])
def test_svd_initialised_network_equals_the_separable_wiener_filter(model_cls) -> None:
    kernel = motion_kernel(7, 30)
    model = model_cls(kernel, support=21, rank=6, snr=50.0)
    x = torch.rand(2, 3, 40, 36)
    k_dagger = pseudo_inverse_kernel(kernel, 21, 50.0)
    expected = separable_filter(x, *separable_factors(k_dagger, 6))
    with torch.no_grad():
        assert float((model(x) - expected).abs().max()) < 1e-4


def test_outlier_network_even_kernels_do_not_shift_the_image() -> None:
    # Box filters (all positive, so ReLU is inert): a shift would move the centroid of an impulse.
    net = OutlierRejectionCNN(width=1, kernel_sizes=(4, 1, 2), residual=False)
    with torch.no_grad():
        for conv in net.convs:
            conv.weight.fill_(1.0 / conv.weight[0].numel())
            conv.bias.zero_()
        impulse = torch.zeros(1, 1, 15, 15)
        impulse[..., 7, 7] = 1
        out = net(impulse)[0, 0]
    grid = torch.arange(15.0)
    assert float((out.sum(1) * grid).sum() / out.sum()) == pytest.approx(7.0, abs=1e-5)
    assert float((out.sum(0) * grid).sum() / out.sum()) == pytest.approx(7.0, abs=1e-5)


def test_residual_outlier_network_starts_as_the_identity() -> None:
    x = torch.rand(2, 1, 20, 20)
    torch.testing.assert_close(OutlierRejectionCNN(width=4, kernel_sizes=(4, 1, 2))(x), x)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_training_lowers_the_loss(init: str) -> None:
    torch.manual_seed(0)
    kernel = disk_kernel(2)
    blurred, sharp = _pairs(kernel, 8)
    model = DeconvOutlierCNN(kernel, support=15, rank=4, snr=30.0, init=init, width=8, kernel_sizes=(6, 1, 4))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3 if init == "svd" else 3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.mse_loss(model(blurred), sharp)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]


def test_frozen_deconvolution_stays_the_wiener_filter_while_the_outlier_net_learns() -> None:
    kernel = disk_kernel(2)
    blurred, sharp = _pairs(kernel, 4)
    model = DeconvOutlierCNN(kernel, support=15, rank=4, width=8, kernel_sizes=(6, 1, 4), freeze_deconv=True)
    before = model.deconv.horizontal.weight.clone()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(blurred), sharp)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.testing.assert_close(model.deconv.horizontal.weight, before, rtol=0, atol=0)
    assert float(model.outlier.convs[-1].weight.abs().sum()) > 0


def test_svd_start_beats_random_start_before_training() -> None:
    torch.manual_seed(0)
    kernel = disk_kernel(2)
    blurred, sharp = _pairs(kernel, 4)
    with torch.no_grad():
        svd = torch.nn.functional.mse_loss(DeconvCNN(kernel, 15, 4, 30.0, "svd")(blurred), sharp)
        rand = torch.nn.functional.mse_loss(DeconvCNN(kernel, 15, 4, 30.0, "random")(blurred), sharp)
        identity = torch.nn.functional.mse_loss(blurred, sharp)
    assert float(svd) < float(identity) < float(rand)


def test_models_are_registered_for_restoration() -> None:
    names = {spec.name for spec in list_models(family="restoration")}
    assert {"wiener", "xu_dcnn", "xu_dcnn_random", "xu_odcnn", "xu_full"} <= names
    spec = get_model_spec("xu_full")
    model = spec.build_tiny()
    x = torch.rand(2, *spec.example_shape, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="needs the blur kernel"):
        DeconvCNN(None, support=15, rank=4)
    with pytest.raises(ValueError, match="init must be one of"):
        DeconvCNN(disk_kernel(2), init="xavier")
    with pytest.raises(ValueError, match="support=14"):
        DeconvCNN(disk_kernel(2), support=14)
    model = DeconvCNN(disk_kernel(2), support=15, rank=4, channels=1)
    with pytest.raises(ValueError, match="built for 1 channel"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(TypeError, match="torch.uint8"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got shape \(32, 32\)"):
        model(torch.rand(32, 32))
    with pytest.raises(ValueError, match="larger than 7 pixels"):
        model(torch.rand(1, 1, 6, 40))


TINY_DATA = [
    "data.patch_size=40",
    "data.samples_per_epoch=8",
    "data.batch_size=4",
    "data.max_eval_size=48",
    "trainer.limit_val_batches=1",
]
TINY_XU = ["model.support=15", "model.rank=4"]


def _train(compose, *overrides: str) -> dict[str, float]:
    from deconvlab.train import train

    given = {o.split("=", 1)[0] for o in overrides}
    result = train(compose(*overrides, *(o for o in TINY_DATA if o.split("=", 1)[0] not in given)))
    assert result.best_checkpoint is not None
    return result.metrics


def _validation_metrics(cfg, task) -> dict[str, float]:
    """The validation metrics of ``task`` (e.g. untrained) on the data the run was scored on."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=cfg.trainer.limit_val_batches)
    (results,) = trainer.validate(task, datamodule=instantiate(cfg.data), verbose=False)
    return results


@pytest.mark.slow  # ~14 s: most of it loads the eleven scikit-image training images
def test_xu_full_trains_end_to_end_and_beats_its_blurred_input(compose) -> None:
    # Support 91 (rank 16) is the smallest whose SVD start, the separable Wiener filter, clearly helps on
    # disk 7 (support 15 to 61 sit at or below the input's PSNR); lr 1e-4 keeps 8 steps from undoing it
    # (1e-3 lost 7 dB on one seed of four). Measured over seeds 0-3: +2.5 to +3.8 dB over the input.
    # Catches a broken SVD start or DCNN -> ODCNN wiring, and a PSNR that is not the model's: the input
    # (~21 dB) passes a bare "> 15".
    metrics = _train(compose, "experiment=xu_full_disk7_skimage", "model.support=91", "model.rank=16",
                     "model.outlier.width=8", "optim.lr=1e-4", "data.patch_size=48")
    assert metrics["val/psnr"] > metrics["val/psnr_input"] + 1.0


@pytest.mark.data
@pytest.mark.parametrize(
    ("experiment", "model_overrides"),
    [
        ("xu_dcnn_randinit_disk7_sat_jpeg90_bsd68", TINY_XU),
        ("wiener_disk7_sat_jpeg90_bsd68", ["model.snr=30"]),
    ],
)
def test_bsd68_experiments_train_end_to_end(compose, experiment: str, model_overrides: list[str]) -> None:
    from conftest import shared_data
    from deconvlab.build import build_task

    root = shared_data("deblur", "BSD68")
    metrics = _train(compose, f"experiment={experiment}", f"data.root={root}", *model_overrides)
    assert metrics["val/psnr_input"] > 15
    if experiment.startswith("wiener"):
        assert metrics["val/psnr"] > metrics["val/psnr_input"]
    else:
        # A random start outputs values far below 0 (-0.56..-0.51 here), so its clamped output is black
        # and its PSNR (9.9 dB against the input's 23.7) does not move in 4 steps; its loss must (0.696 ->
        # 0.670 measured). Catches training that never reaches the deconvolution's weights (the random
        # start frozen, as freeze_deconv does for the SVD one, or an optimiser over the wrong parameters).
        cfg = compose(f"experiment={experiment}", f"data.root={root}", *model_overrides, *TINY_DATA)
        torch.manual_seed(0)
        untrained = _validation_metrics(cfg, build_task(cfg))
        assert metrics["val/loss"] < 0.98 * untrained["val/loss"]


def test_a_module_lr_scale_gives_its_parameters_their_own_learning_rate() -> None:
    from functools import partial

    from deconvlab.tasks.base import parameter_groups

    model = DeconvOutlierCNN(disk_kernel(2), support=15, rank=4, width=4, kernel_sizes=(4, 1, 2))
    model.deconv.lr_scale = 0.01
    groups = parameter_groups(model, partial(torch.optim.Adam, lr=2e-3))
    optimiser = torch.optim.Adam(groups, lr=2e-3)
    lr_of = {id(p): g["lr"] for g in optimiser.param_groups for p in g["params"]}
    assert lr_of[id(model.deconv.horizontal.weight)] == pytest.approx(2e-5)
    assert lr_of[id(model.outlier.convs[0].weight)] == pytest.approx(2e-3)
    assert len(lr_of) == sum(1 for _ in model.parameters())
    model.deconv.requires_grad_(False)  # frozen parameters stay out of the optimiser
    frozen = parameter_groups(model, partial(torch.optim.Adam, lr=2e-3))
    assert sum(len(g["params"]) for g in frozen) == sum(1 for _ in model.outlier.parameters())


def test_loss_border_trains_on_the_crop_interior_only() -> None:
    from deconvlab.tasks.restoration import RestorationTask

    class Spoil(torch.nn.Module):  # exact inside, wrong in a 3-pixel frame
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            wrong = torch.ones_like(x)
            wrong[..., 3:-3, 3:-3] = 0
            return x + wrong

    batch = {"input": torch.rand(2, 1, 16, 16)}
    batch["target"] = batch["input"].clone()
    for border, expected_zero in ((3, True), (2, False)):
        task = RestorationTask(Spoil(), loss="mse", loss_border=border)
        loss, output = task.step(batch)
        assert (float(loss) == 0.0) is expected_zero
        assert output.shape == batch["input"].shape
    task.eval()  # validation losses cover the whole image
    assert float(task.step(batch)[0]) > 0
    with pytest.raises(ValueError, match="loss_border"):
        RestorationTask(Spoil(), loss_border=8).step(batch)


def test_a_dilated_outlier_network_starts_at_the_wiener_filter_and_runs_per_channel() -> None:
    from deconvlab.models.simple import ResidualDeblurCNN

    kernel = motion_kernel(7, 30)
    model = DeconvOutlierCNN(kernel, support=21, rank=6, snr=50.0,
                             outlier=ResidualDeblurCNN(width=4, depth=3, max_dilation=2))
    x = torch.rand(2, 3, 40, 36)
    expected = separable_filter(x, *separable_factors(pseudo_inverse_kernel(kernel, 21, 50.0), 6))
    with torch.no_grad():
        assert float((model(x) - expected).abs().max()) < 1e-4
        model.outlier.body[-1].bias.fill_(0.5)  # now it acts: on every channel alike
        torch.testing.assert_close(model(x), expected + 0.5, atol=1e-4, rtol=0)


def _saturated_jpeg_crops(image, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of ``image`` (uint8) degraded as in the BSD68 experiments: disk 3 + 1 % noise + saturation + JPEG."""
    degradation = Degradation(disk_kernel(3.0), 0.01, saturation_gain=2.0, saturation_threshold=0.8,
                              jpeg_quality=90)
    g = torch.Generator().manual_seed(seed)
    sharp_image = torch.from_numpy(image / 255.0).float()
    corners = [(int(torch.randint(sharp_image.shape[0] - size, (1,), generator=g)),
                int(torch.randint(sharp_image.shape[1] - size, (1,), generator=g))) for _ in range(count)]
    sharp = torch.stack([sharp_image[r:r + size, c:c + size][None] for r, c in corners])
    return torch.stack([degradation(s, g) for s in sharp]), sharp


def test_xu_ordering_holds_on_a_small_setting() -> None:
    # Issue 19's ordering at equal steps (60 Adam steps, the loss on the crops' interior): the outlier network
    # adds to the SVD-started DCNN (measured +0.81 dB), which beats the DCNN from a random start (+7.5 dB).
    # Fails if the outlier network stops helping (its output dropped, or frozen at its zero start), if the
    # learning-rate scale stops protecting the SVD start, or if the SVD start stops mattering.
    from functools import partial

    from skimage import data

    from deconvlab.models.simple import ResidualDeblurCNN
    from deconvlab.tasks.base import parameter_groups
    from deconvlab.tasks.restoration import psnr_per_image

    train_x, train_y = _saturated_jpeg_crops(data.camera(), 64, 48, seed=0)
    val_x, val_y = _saturated_jpeg_crops(data.camera()[:, ::-1].copy(), 8, 96, seed=1)

    def trained_psnr(model: torch.nn.Module, steps: int = 60, lr: float = 2e-3) -> float:
        optimiser = torch.optim.Adam(parameter_groups(model, partial(torch.optim.Adam, lr=lr)), lr=lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            pick = torch.randint(len(train_x), (8,), generator=g)
            loss = torch.nn.functional.mse_loss(model(train_x[pick])[..., 8:-8, 8:-8], train_y[pick][..., 8:-8, 8:-8])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return float(psnr_per_image(model(val_x).clamp(0, 1), val_y).mean())

    kernel = disk_kernel(3.0)
    torch.manual_seed(0)
    full = trained_psnr(DeconvOutlierCNN(kernel, 31, 8, 100.0, "svd", deconv_lr_scale=0.01,
                                         outlier=ResidualDeblurCNN(1, 8, 5, 4)))
    svd = trained_psnr(DeconvCNN(kernel, 31, 8, 100.0, "svd", lr_scale=0.01))
    torch.manual_seed(0)
    random_start = trained_psnr(DeconvCNN(kernel, 31, 8, 100.0, "random"))
    assert full > svd + 0.4, (full, svd)
    assert svd > random_start + 3.0, (svd, random_start)
