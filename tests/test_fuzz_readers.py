"""Fuzzing the readers: PNG/JPEG, NIfTI (.nii, .nii.gz) and MNIST IDX files, truncated, bit-flipped or random.

Every reader either returns an array or raises the documented clean error, a UserError (DataError for the
data modules, IDXFormatError for IDX) whose line names the file. Never another exception, never a hang: each
read runs under a SIGALRM deadline that raises a BaseException, which no reader's ``except Exception`` can
swallow (pytest-timeout is not installed in this environment; this does the same job per read).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_phantom_case
from deconvlab import predict
from deconvlab.data import brats, camvid, images, mnist
from deconvlab.errors import UserError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
READ_DEADLINE_S = 10


class Hung(BaseException):
    """A reader ran past its deadline (BaseException: readers catching Exception cannot hide it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hung(f"reader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_or_clean_error(read: Callable[[Path], object], path: Path) -> object | None:
    """Run ``read(path)``: its result, or None after a UserError that names the file."""
    try:
        with deadline(READ_DEADLINE_S):
            return read(path)
    except UserError as error:
        assert path.name in error.one_line(), error.one_line()
        return None


# -- valid seeds and how they are damaged -----------------------------------------------------------------
def _png(mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (20, 24, 3) if mode == "RGB" else (20, 24)
    buffer = io.BytesIO()
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _nifti(compressed: bool) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(np.random.default_rng(2).random((6, 7, 5)).astype(np.float32), np.eye(4)).to_bytes()
    return gzip.compress(raw) if compressed else raw


def _idx(compressed: bool) -> bytes:
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 4, 4) + bytes(range(32))
    return gzip.compress(raw) if compressed else raw


SEEDS = {"png": _png(), "grey.png": _png("L"), "jpg": _jpeg(), "nii": _nifti(False), "nii.gz": _nifti(True),
         "idx": _idx(False), "idx.gz": _idx(True)}


@st.composite
def damaged(draw, seed: bytes) -> bytes:
    """The seed truncated, with bytes overwritten, with a run of bytes inserted, or replaced by noise."""
    how = draw(st.sampled_from(["truncate", "overwrite", "insert", "noise"]))
    if how == "truncate":
        return seed[: draw(st.integers(0, len(seed) - 1))]
    if how == "noise":
        return draw(st.binary(max_size=512))
    raw = bytearray(seed)
    if how == "insert":
        at = draw(st.integers(0, len(raw)))
        return bytes(raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:])
    for _ in range(draw(st.integers(1, 6))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def _write(folder: Path, name: str, raw: bytes) -> Path:
    path = folder / name
    path.write_bytes(raw)
    return path


# -- images -------------------------------------------------------------------------------------------------
@FUZZ
@given(st.sampled_from(["png", "grey.png", "jpg"]).flatmap(lambda k: st.tuples(st.just(k), damaged(SEEDS[k]))))
def test_damaged_images_are_read_or_refused_naming_the_file(tmp_path, case):
    kind, raw = case
    path = _write(tmp_path, f"fuzzed.{kind.split('.')[-1]}", raw)
    for read in (lambda p: images.load_image_files([p]), camvid._read, predict.read_image):
        array = read_or_clean_error(read, path)
        assert array is None or isinstance(array, (np.ndarray, list))


@FUZZ
@given(st.booleans(), st.data())
def test_damaged_segmentation_pairs_are_read_or_refused(tmp_path, damage_mask, data):
    # An RGB image and a 0..255 label image of the same size; one of the two is damaged.
    image = _write(tmp_path, "scene.png", SEEDS["png"] if damage_mask else data.draw(damaged(SEEDS["png"])))
    mask = _write(tmp_path, "scene_mask.png", data.draw(damaged(SEEDS["grey.png"])) if damage_mask
                  else SEEDS["grey.png"])
    pair = read_or_clean_error(lambda _: camvid.read_pair(image, mask, num_classes=256, ignore_index=255),
                               mask if damage_mask else image)
    assert pair is None or pair[0].shape[:2] == pair[1].shape


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_declaring_a_gigantic_size_is_refused_at_once(tmp_path):
    # A valid header (CRC included) claiming 60000 x 60000 pixels and no pixel data: a decompression bomb.
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    path = _write(tmp_path, "bomb.png", b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IEND", b""))
    for read in (lambda p: images.load_image_files([p]), camvid._read, predict.read_image):
        with pytest.raises(UserError, match="bomb.png"):
            with deadline(READ_DEADLINE_S):
                read(path)


# -- NIfTI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("brats") / "case0"
    write_phantom_case(folder, size=12)
    return folder


@FUZZ
@given(st.sampled_from(["nii", "nii.gz"]).flatmap(lambda k: st.tuples(st.just(k), damaged(SEEDS[k]))))
def test_damaged_nifti_volumes_are_read_or_refused_naming_the_file(tmp_path, case):
    kind, raw = case
    path = _write(tmp_path, f"volume.{kind}", raw)
    read_or_clean_error(predict.read_nifti, path)
    read_or_clean_error(lambda p: brats._load_nifti(p, np.float32), path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["flair", "otmulticlass", "brainmask"]), st.data())
def test_a_case_folder_with_one_damaged_volume_is_read_or_refused(tmp_path, phantom_case, modality, data):
    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(phantom_case, folder)
    target = folder / f"{modality}.nii.gz"
    target.write_bytes(data.draw(damaged(target.read_bytes())))
    case = read_or_clean_error(lambda _: brats.read_case(folder, ["flair", "t1c"]), target)
    assert case is None or case.image.shape[1:] == case.label.shape


def test_a_nifti_declaring_a_gigantic_volume_is_refused_at_once(tmp_path):
    raw = bytearray(SEEDS["nii"])
    raw[42:48] = struct.pack("<hhh", 32767, 32767, 32767)  # dim[1..3] of the NIfTI-1 header
    path = _write(tmp_path, "huge.nii", bytes(raw))
    for read in (predict.read_nifti, lambda p: brats._load_nifti(p, np.float32)):
        with pytest.raises(UserError, match="huge.nii"):
            with deadline(READ_DEADLINE_S):
                read(path)


# -- MNIST IDX -------------------------------------------------------------------------------------------------
@FUZZ
@given(st.sampled_from(["idx", "idx.gz"]).flatmap(lambda k: st.tuples(st.just(k), damaged(SEEDS[k]))))
def test_damaged_idx_files_are_read_or_refused_naming_the_file(tmp_path, case):
    kind, raw = case
    path = _write(tmp_path, f"digits-idx3-ubyte.{kind}", raw)
    array = read_or_clean_error(mnist.read_idx, path)
    if array is not None:  # it parsed: then it holds exactly the bytes its header declares
        assert array.size * array.dtype.itemsize <= len(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def test_an_idx_header_declaring_a_gigantic_array_is_refused_at_once(tmp_path):
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2**31, 2**31, 2**31) + bytes(16)
    path = _write(tmp_path, "huge-idx3-ubyte", raw)
    with pytest.raises(mnist.IDXFormatError, match="huge-idx3-ubyte: truncated"):
        with deadline(READ_DEADLINE_S):
            mnist.read_idx(path)
