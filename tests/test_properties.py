"""Property-based tests (hypothesis): the sweep-file parser and the degradation/kernel code.

The parser: every well-formed distribution or sweep file generated is accepted and reads back the values
written; anything else (random text, wrong types, wrong shapes of YAML) is a UserError, never another
exception. The kernels: non-negative, sum 1, odd size, centred; blurring keeps shape, range and constants;
noise has the standard deviation asked for.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deconvlab.data import degrade
from deconvlab.errors import UserError
from deconvlab.sweep.spec import DISTRIBUTIONS, SCHEDULERS, SEARCHERS, SweepSpec, load_sweep, parse_distribution

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- the sweep-file parser ---------------------------------------------------------------------------------
names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
keys = st.lists(names, min_size=1, max_size=3).map(".".join)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
literals = st.one_of(st.integers(-1000, 1000), finite, names)


@st.composite
def bounded(draw, positive: bool) -> tuple[float, float]:
    low = draw(st.floats(1e-6, 1e3) if positive else finite)
    high = draw(st.floats(low, low + 1e6).filter(lambda h: h > low))
    return low, high


@st.composite
def distributions(draw) -> tuple[str, tuple]:
    """A valid (kind, args) pair."""
    kind = draw(st.sampled_from(DISTRIBUTIONS))
    if kind in ("choice", "grid"):
        return kind, (draw(st.lists(literals, min_size=1, max_size=5)),)
    low, high = draw(bounded(positive="log" in kind))
    return kind, (low, high, draw(st.floats(1e-3, 10))) if kind.startswith("q") else (low, high)


def as_text(kind: str, args: tuple) -> str:
    return f"{kind}({', '.join(repr(a) for a in args)})"


@FAST
@given(distributions())
def test_valid_distributions_parse_back_to_their_values(pair):
    kind, args = pair
    parsed = parse_distribution("optim.lr", as_text(kind, args))
    assert parsed.kind == kind
    assert [list(a) if isinstance(a, (list, tuple)) else a for a in parsed.args] == list(args)


@FAST
@given(st.text(max_size=40))
def test_any_text_is_a_distribution_or_a_user_error_naming_the_key(text):
    try:
        parsed = parse_distribution("model.width", text)
    except UserError as error:
        assert error.where == "search_space.model.width" and error.fix
    else:
        assert parsed.kind in DISTRIBUTIONS


@FAST
@given(st.sampled_from([d for d in DISTRIBUTIONS if d not in ("choice", "grid")]), bounded(positive=False))
def test_reversed_or_non_positive_bounds_are_refused(kind, bounds):
    low, high = bounds
    reversed_args = (high, low, 1.0) if kind.startswith("q") else (high, low)
    with pytest.raises(UserError, match="low < high"):
        parse_distribution("k", as_text(kind, reversed_args))
    if "log" in kind and low <= 0:
        args = (low, high, 1.0) if kind.startswith("q") else (low, high)
        with pytest.raises(UserError, match="positive bounds"):
            parse_distribution("k", as_text(kind, args))


@st.composite
def sweep_files(draw) -> dict:
    """A valid sweep file as data."""
    space = draw(st.dictionaries(keys, distributions(), min_size=1, max_size=4))
    data = {"experiment": draw(names), "metric": f"val/{draw(names)}", "mode": draw(st.sampled_from(["min", "max"])),
            "search_space": {k: as_text(*v) for k, v in space.items()},
            "overrides": draw(st.lists(st.builds("{}={}".format, keys, st.integers(0, 9)), max_size=3)),
            "scheduler": {"type": draw(st.sampled_from(SCHEDULERS))},
            "search": {"type": draw(st.sampled_from(SEARCHERS))},
            "num_samples": draw(st.integers(1, 50)), "max_concurrent_trials": draw(st.integers(0, 8)),
            "resources": {"cpu": draw(st.integers(1, 4)), "gpu": draw(st.integers(0, 2))}}
    return data


@FAST
@given(sweep_files())
def test_generated_sweep_files_load_with_the_values_written(tmp_path: Path, data):
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_sweep(str(path))
    assert (spec.experiment, spec.metric, spec.mode) == (data["experiment"], data["metric"], data["mode"])
    assert spec.num_samples == data["num_samples"] and spec.overrides == data["overrides"]
    assert spec.scheduler["type"] == data["scheduler"]["type"] and spec.search["type"] == data["search"]["type"]
    assert set(spec.search_space) == set(data["search_space"])
    # What Ray ships to the trials reads back to the same spec.
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert spec.trial_overrides({})[: 1 + len(data["overrides"])] == [f"experiment={data['experiment']}",
                                                                      *data["overrides"]]


yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | finite | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
                           max_leaves=6)


@FAST
@given(sweep_files(), st.sampled_from(["experiment", "metric", "mode", "search_space", "overrides", "scheduler",
                                       "search", "num_samples", "max_concurrent_trials", "resources",
                                       "workers_per_trial", "max_failures", "smoke_test"]), yaml_values)
def test_any_value_of_the_wrong_shape_is_a_user_error(tmp_path: Path, data, key, value):
    data = {**data, key: value}
    path = tmp_path / "mangled.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        spec = load_sweep(str(path))
    except UserError as error:
        assert str(path) in error.where or error.where.startswith("search_space."), error.one_line()
    else:
        assert spec.mode in ("min", "max") and spec.search_space and spec.num_samples >= 1


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_a_sweep_file_are_a_user_error(tmp_path: Path, raw):
    path = tmp_path / "noise.yaml"
    path.write_bytes(raw)
    with pytest.raises(UserError):
        load_sweep(str(path))


# -- kernels, blur and noise -------------------------------------------------------------------------------
def assert_is_a_blur_kernel(kernel: torch.Tensor, size: int) -> None:
    assert kernel.shape == (size, size) and size % 2 == 1
    assert bool((kernel >= 0).all()) and torch.isfinite(kernel).all()
    assert math.isclose(float(kernel.sum()), 1.0, abs_tol=1e-5)


def centroid(kernel: torch.Tensor) -> tuple[float, float]:
    k = kernel.double()
    rows, cols = torch.meshgrid(torch.arange(k.shape[0]).double(), torch.arange(k.shape[1]).double(),
                                indexing="ij")
    return float((k * rows).sum() / k.sum()), float((k * cols).sum() / k.sum())


@FAST
@given(st.floats(0.3, 12))
def test_disk_kernels(radius):
    kernel = degrade.disk_kernel(radius)
    assert_is_a_blur_kernel(kernel, 2 * math.ceil(radius) + 1)
    # A disk is symmetric under transposition and both flips.
    for same in (kernel.T, kernel.flip(0), kernel.flip(1)):
        torch.testing.assert_close(same, kernel)


@FAST
@given(st.floats(0.2, 5))
def test_gaussian_kernels(sigma):
    kernel = degrade.gaussian_kernel(sigma)
    size = 2 * math.ceil(3 * sigma) + 1
    assert_is_a_blur_kernel(kernel, size)
    assert int(kernel.argmax()) == (size // 2) * size + size // 2  # peak at the centre
    torch.testing.assert_close(kernel.T, kernel)


@FAST
@given(st.floats(1, 25), st.floats(-360, 360))
def test_motion_kernels_are_centred_segments(length, angle):
    kernel = degrade.motion_kernel(length, angle)
    size = 2 * math.ceil((length + 1) / 2) + 1
    assert_is_a_blur_kernel(kernel, size)
    # The segment is centred on the centre pixel and bilinear splatting keeps the centroid.
    row, col = centroid(kernel)
    assert abs(row - size // 2) < 1e-4 and abs(col - size // 2) < 1e-4


@st.composite
def images_and_kernels(draw) -> tuple[torch.Tensor, torch.Tensor]:
    kind = draw(st.sampled_from(["disk", "gaussian", "motion"]))
    kernel = {"disk": lambda: degrade.disk_kernel(draw(st.floats(0.5, 3))),
              "gaussian": lambda: degrade.gaussian_kernel(draw(st.floats(0.3, 1.2))),
              "motion": lambda: degrade.motion_kernel(draw(st.floats(1, 6)), draw(st.floats(0, 180)))}[kind]()
    h, w = draw(st.integers(kernel.shape[0], 24)), draw(st.integers(kernel.shape[1], 24))
    channels = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    image = torch.rand(channels, h, w, generator=torch.Generator().manual_seed(seed))
    return image, kernel


@FAST
@given(images_and_kernels(), st.sampled_from(["reflect", "replicate", "circular"]))
def test_blur_keeps_shape_range_and_constants(pair, padding):
    image, kernel = pair
    out = degrade.blur(image, kernel, padding)
    assert out.shape == image.shape and torch.isfinite(out).all()
    # A non-negative kernel summing to 1 averages: the output stays within the input's range.
    assert float(out.min()) >= float(image.min()) - 1e-5 and float(out.max()) <= float(image.max()) + 1e-5
    constant = torch.full_like(image, 0.37)
    torch.testing.assert_close(degrade.blur(constant, kernel, padding), constant)


@FAST
@given(images_and_kernels(), st.floats(-3, 3), st.floats(-3, 3))
def test_blur_is_linear(pair, a, b):
    image, kernel = pair
    other = image.flip(-1)
    mixed = degrade.blur(a * image + b * other, kernel)
    torch.testing.assert_close(mixed, a * degrade.blur(image, kernel) + b * degrade.blur(other, kernel),
                               atol=1e-5, rtol=1e-5)


@FAST
@given(st.floats(0.001, 0.5), st.integers(0, 2**31 - 1))
def test_noise_has_the_sigma_asked_for_and_repeats_by_seed(sigma, seed):
    zeros = torch.zeros(1, 64, 64)
    noisy = degrade.add_gaussian_noise(zeros, sigma, torch.Generator().manual_seed(seed))
    # 4096 samples: the sample std is within ~1.1% of sigma (one standard error); 8% is > 7 standard errors.
    assert abs(float(noisy.std()) / sigma - 1) < 0.08
    assert abs(float(noisy.mean())) < 5 * sigma / 64
    again = degrade.add_gaussian_noise(zeros, sigma, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(noisy, again)


@FAST
@given(images_and_kernels(), st.floats(0, 0.2), st.floats(1, 4), st.sampled_from([None, 30, 90]))
def test_degradation_output_is_a_valid_image(pair, sigma, gain, quality):
    image, kernel = pair
    degradation = degrade.Degradation(kernel, noise_sigma=sigma, saturation_gain=gain, jpeg_quality=quality)
    out = degradation(image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4).filter(lambda s: len(s) != 2))
def test_kernels_that_are_not_2d_are_refused(shape):
    with pytest.raises(ValueError, match="must be 2-D"):
        degrade.check_kernel(torch.ones(shape))
