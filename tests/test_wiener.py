"""Classical deconvolution: inverse filter, Wiener (vs scikit-image), k-dagger and its separable SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deconvlab.data.degrade import Degradation, disk_kernel, gaussian_kernel, motion_kernel
from deconvlab.models.wiener import (
    Wiener,
    choose_rank,
    estimate_noise_sigma,
    inverse_filter,
    pseudo_inverse_kernel,
    psf_to_otf,
    separable_factors,
    separable_filter,
    spatial_filter,
    wiener_deconvolve,
)


@pytest.fixture(scope="module")
def camera() -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    return torch.from_numpy(resize(data.camera() / 255.0, (128, 128), anti_aliasing=True)).float()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.clamp(0, 1) - b) ** 2).mean()))


def _degrade(image: torch.Tensor, kernel: torch.Tensor, sigma: float) -> torch.Tensor:
    return Degradation(kernel, sigma)(image[None], torch.Generator().manual_seed(0))[0]


@pytest.mark.parametrize("balance", [1e-3, 3e-2])
def test_wiener_matches_scikit_image(camera: torch.Tensor, balance: float) -> None:
    from skimage.restoration import wiener

    kernel = motion_kernel(7, 20).double()
    blurred = _degrade(camera, kernel.float(), 0.01).double()
    # An identity regulariser (a 1x1 impulse) makes skimage's filter the textbook 1/SNR one; both periodic.
    reference = wiener(blurred.numpy(), kernel.numpy(), balance, reg=np.ones((1, 1)), clip=False)
    ours = wiener_deconvolve(blurred, kernel, snr=1 / balance, boundary="circular")
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-10)


def test_wiener_restores_a_blurred_image_above_30_db_at_low_noise(camera: torch.Tensor) -> None:
    kernel = disk_kernel(3)
    blurred = _degrade(camera, kernel, 1e-3)
    restored = wiener_deconvolve(blurred, kernel, snr=1e3)
    assert _psnr(blurred, camera) < 25
    assert _psnr(restored, camera) > 30


def test_edge_tapering_removes_wrap_around_ringing(camera: torch.Tensor) -> None:
    kernel = disk_kernel(3)
    blurred = _degrade(camera, kernel, 1e-3)  # blurred with reflected borders, as a real photo is
    periodic = wiener_deconvolve(blurred, kernel, snr=1e3, boundary="circular")
    tapered = wiener_deconvolve(blurred, kernel, snr=1e3, boundary="taper")
    assert _psnr(tapered, camera) > _psnr(periodic, camera) + 10
    border = (slice(None), slice(0, 8))  # the left 8 columns, where the periodic filter wraps around
    assert _psnr(tapered[border], camera[border]) > 25


def test_inverse_filter_is_exact_without_noise_and_blows_up_with_it(camera: torch.Tensor) -> None:
    kernel = gaussian_kernel(1.0).double()
    image = camera.double()
    otf = psf_to_otf(kernel, tuple(image.shape))
    blurred = torch.fft.irfft2(torch.fft.rfft2(image) * otf, s=image.shape)  # a periodic blur, no noise
    exact = inverse_filter(blurred, kernel, eps=1e-12, boundary="circular")
    torch.testing.assert_close(exact, image, atol=1e-6, rtol=0)
    noisy = _degrade(camera, disk_kernel(3), 0.01)
    naive = inverse_filter(noisy, disk_kernel(3))
    assert _psnr(naive, camera) < _psnr(wiener_deconvolve(noisy, disk_kernel(3), snr=100), camera) - 5


def test_noise_estimate_and_estimated_snr(camera: torch.Tensor) -> None:
    blurred = _degrade(camera, gaussian_kernel(2.0), 0.03)
    assert float(estimate_noise_sigma(blurred)) == pytest.approx(0.03, rel=0.15)
    restored = wiener_deconvolve(blurred[None].expand(2, -1, -1), gaussian_kernel(2.0), snr=None)
    assert restored.shape == (2, 128, 128) and _psnr(restored[0], camera) > _psnr(blurred, camera)


@pytest.mark.parametrize(
    ("kernel", "snr", "support"),
    [(disk_kernel(3), 100.0, 61), (motion_kernel(9, 30), 30.0, 31)],
    ids=["disk3", "motion9"],
)
def test_k_dagger_and_its_picked_rank_match_fft_wiener(camera, kernel, snr: float, support: int) -> None:
    blurred = _degrade(camera, kernel, 0.01)
    k_dagger = pseudo_inverse_kernel(kernel, support, snr)
    exact = _psnr(wiener_deconvolve(blurred, kernel, snr), camera)
    full = _psnr(spatial_filter(blurred, k_dagger), camera)
    rank = choose_rank(k_dagger)
    separable = _psnr(separable_filter(blurred, *separable_factors(k_dagger, rank)), camera)
    assert rank < support
    assert abs(full - exact) < 0.2
    assert abs(separable - full) < 0.1


def test_full_rank_separable_filter_equals_the_2d_filter(camera: torch.Tensor) -> None:
    k_dagger = pseudo_inverse_kernel(motion_kernel(5, 60), 15, 50.0)
    blurred = camera[None, None].expand(2, 3, -1, -1)
    expected = spatial_filter(blurred.double(), k_dagger)
    actual = separable_filter(blurred.double(), *separable_factors(k_dagger, 15))
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)


def test_k_dagger_inverts_the_kernel_on_its_passband() -> None:
    kernel = gaussian_kernel(1.0).double()
    k_dagger = pseudo_inverse_kernel(kernel, 31, 1e4)
    impulse = torch.zeros(63, 63, dtype=torch.float64)
    impulse[31, 31] = 1
    blurred = spatial_filter(impulse, kernel)
    response = spatial_filter(blurred, k_dagger)  # k_dagger * k * delta: close to delta again
    assert float(response.sum()) == pytest.approx(1 / (1 + 1e-4), abs=1e-6)  # the Wiener DC gain
    assert int(response.argmax()) == int(impulse.argmax())
    assert float((response - impulse).norm()) < 0.6 * float((blurred - impulse).norm())


def test_wiener_module_equals_the_function_and_can_learn_its_snr(camera: torch.Tensor) -> None:
    kernel = disk_kernel(3)
    batch = _degrade(camera, kernel, 0.01)[None, None].expand(2, 1, -1, -1)
    model = Wiener(kernel, snr=1000.0, learn_snr=True)
    torch.testing.assert_close(model(batch), wiener_deconvolve(batch, kernel, 1000.0).clamp(0, 1))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.2)
    target = camera[None, None].expand(2, 1, -1, -1)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(batch), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert float(torch.exp(-model.log_nsr)) < 1000.0  # it learnt to regularise more
    assert list(Wiener(kernel, snr=None).parameters()) == []


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="rank must be in 1..5"):
        separable_factors(torch.ones(5, 5), 6)
    with pytest.raises(ValueError, match="positive odd number, got 8"):
        pseudo_inverse_kernel(disk_kernel(2), 8, 10.0)
    with pytest.raises(ValueError, match="boundary must be one of"):
        Wiener(disk_kernel(2), boundary="zero")
    with pytest.raises(ValueError, match="sums to 0"):
        Wiener(torch.tensor([[1.0, 0.0, -1.0]]))
    with pytest.raises(TypeError, match="torch.uint8"):
        Wiener(disk_kernel(2))(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small for a 31x31 filter"):
        spatial_filter(torch.rand(10, 10), torch.ones(31, 31))
