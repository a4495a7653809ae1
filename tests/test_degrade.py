"""The degradation model: kernels, blur, noise, saturation, JPEG, validation, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from deconvlab.data import degrade
from deconvlab.data.degrade import (
    Degradation,
    blur,
    boost_highlights,
    disk_kernel,
    gaussian_kernel,
    jpeg_compress,
    load_kernel,
    make_kernel,
    motion_kernel,
)


def _image(size: int = 64) -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    return torch.from_numpy(resize(data.camera() / 255.0, (size, size), anti_aliasing=True)).float()[None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("kernel", [disk_kernel(3), gaussian_kernel(1.5), motion_kernel(9, 30)])
def test_kernels_are_normalised_odd_and_non_negative(kernel: torch.Tensor) -> None:
    assert kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(kernel.min()) >= 0


def test_motion_kernel_is_a_segment_of_the_given_length_and_angle() -> None:
    horizontal = motion_kernel(9, 0.0)
    centre = horizontal.shape[0] // 2
    assert torch.count_nonzero(horizontal.sum(dim=1)) == 1  # one row only
    assert int(torch.count_nonzero(horizontal[centre] > 1e-3)) == 9
    # 90 degrees is the same segment, vertical; 45 degrees runs from bottom-left to top-right.
    torch.testing.assert_close(motion_kernel(9, 90.0), horizontal.T, atol=1e-6, rtol=0)
    diagonal, c = motion_kernel(9, 45.0), centre
    assert float(diagonal[c - 2, c + 2]) > 0 and float(diagonal[c - 2, c - 2]) == 0


def test_make_kernel_switches_kind_and_ignores_other_kinds_parameters() -> None:
    torch.testing.assert_close(make_kernel("disk", radius=3, length=15), disk_kernel(3))
    torch.testing.assert_close(make_kernel("motion", radius=3, length=7, angle=10), motion_kernel(7, 10))
    with pytest.raises(ValueError, match="'gaussian' kernel needs 'sigma'"):
        make_kernel("gaussian", radius=3)
    with pytest.raises(ValueError, match="kernel kind must be one of"):
        make_kernel("box", radius=3)


@pytest.mark.parametrize("suffix", [".npy", ".txt", ".csv", ".png"])
def test_load_kernel_from_files_pads_to_odd_and_normalises(tmp_path, suffix: str) -> None:
    raw = np.zeros((4, 6))
    raw[1:3, 1:5] = [[1, 2, 2, 1], [1, 2, 2, 1]]
    path = tmp_path / f"k{suffix}"
    if suffix == ".npy":
        np.save(path, raw)
    elif suffix == ".png":
        from skimage import io

        io.imsave(path, (raw / raw.max() * 255).astype(np.uint8), check_contrast=False)
    else:
        np.savetxt(path, raw, delimiter="," if suffix == ".csv" else " ")
    kernel = load_kernel(path)
    assert tuple(kernel.shape) == (5, 7)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(kernel[:4, :6], torch.from_numpy(raw / raw.sum()).float(), atol=2e-3, rtol=0)
    # A path is accepted wherever a kernel is.
    torch.testing.assert_close(Degradation(str(path)).kernel, kernel)


def test_blur_matches_scipy_convolution() -> None:
    image, kernel = _image(40)[0], motion_kernel(7, 30)
    reference = ndimage.convolve(image.double().numpy(), kernel.double().numpy(), mode="mirror")
    np.testing.assert_allclose(blur(image, kernel).numpy(), reference, atol=1e-5)


def test_degradation_is_reproducible_by_seed_and_adds_the_requested_noise() -> None:
    image = _image()
    deg = Degradation(kernel=disk_kernel(3), noise_sigma=0.05, clip=False)
    a = deg(image, torch.Generator().manual_seed(7))
    b = deg(image, torch.Generator().manual_seed(7))
    c = deg(image, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    noise = a - blur(image, disk_kernel(3))
    assert float(noise.std()) == pytest.approx(0.05, rel=0.1)


def test_saturation_clips_blurred_highlights() -> None:
    image = torch.full((1, 32, 32), 0.3)
    image[:, 12:20, 12:20] = 0.95  # a bright patch that a boost pushes past the sensor's range
    plain = Degradation(disk_kernel(3))(image)
    saturated = Degradation(disk_kernel(3), saturation_gain=3.0, saturation_threshold=0.8)(image)
    assert float(plain.max()) < 0.96
    assert float(saturated.max()) == 1.0
    assert int((saturated == 1.0).sum()) > 16  # a clipped plateau, not a single pixel
    torch.testing.assert_close(boost_highlights(torch.tensor([0.5, 0.9]), 2.0, 0.8), torch.tensor([0.5, 1.0]))


def test_jpeg_quality_orders_the_error_and_quantises_to_8_bit() -> None:
    image = _image(64)
    q90, q20 = jpeg_compress(image, 90), jpeg_compress(image, 20)
    assert 30 < _psnr(q90, image) and _psnr(q20, image) < _psnr(q90, image) - 3
    assert torch.equal((q90 * 255).round() / 255, q90)
    torch.testing.assert_close(jpeg_compress(image, 90), q90, rtol=0, atol=0)
    colour = jpeg_compress(image.expand(3, -1, -1).contiguous(), 90)
    assert colour.shape == (3, 64, 64) and _psnr(colour, image.expand(3, -1, -1)) > 30


def test_full_degradation_from_hydra_style_config() -> None:
    from hydra.utils import instantiate

    cfg = {
        "_target_": "deconvlab.data.degrade.Degradation",
        "kernel": {"_target_": "deconvlab.data.degrade.make_kernel", "kind": "disk", "radius": 3.0},
        "noise_sigma": 0.01,
        "saturation_gain": 2.0,
        "jpeg_quality": 90,
    }
    deg = instantiate(cfg)
    out = deg(_image(), torch.Generator().manual_seed(0))
    assert out.shape == (1, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert deg.jpeg_quality == 90 and deg.clip


@pytest.mark.parametrize(
    ("kernel", "error", "message"),
    [
        (torch.ones(5), ValueError, r"must be 2-D \[K, K\], got shape \(5,\)"),
        (torch.ones(1, 3, 3), ValueError, r"got shape \(1, 3, 3\)"),
        (torch.tensor([[1.0, -1.0, 0.0]]), ValueError, "sums to 0"),
        (torch.full((3, 3), float("nan")), ValueError, "NaN or inf"),
    ],
)
def test_bad_kernels_are_refused_with_the_offending_value(kernel, error, message) -> None:
    with pytest.raises(error, match=message):
        Degradation(kernel)


def test_bad_images_are_refused_with_the_offending_value() -> None:
    deg = Degradation(disk_kernel(3))
    with pytest.raises(ValueError, match=r"kernel of size \(7, 7\) is larger than the image \(5, 5\)"):
        deg(torch.rand(1, 5, 5))
    with pytest.raises(TypeError, match="torch.uint8"):
        deg(torch.zeros(1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"channels-last \[H, W, C\]"):
        deg(torch.rand(16, 16, 3))
    with pytest.raises(ValueError, match="jpeg_quality must be in 1..100"):
        Degradation(disk_kernel(3), jpeg_quality=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        degrade.load_kernel("/nonexistent/kernel.npy")
