"""What predict takes and what it leaves (issue 26): MRI case folders and modality files found by name or
order, a missing modality named in one line, all-or-none outputs, class-index label PNGs, RGB through a
one-channel restoration model, and the input's NIfTI header codes kept.

Tiny tracked runs (the families of tests/test_evaluate_predict.py), trained once per module on first use.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import TINY_TRAINER, use_store_under, write_phantom_case
from deconvlab.cli import main
from deconvlab.config import compose_config
from deconvlab.errors import UserError
from deconvlab.model_io import load_model
from deconvlab.predict import PREDICTORS, Predictor, predict
from deconvlab.promote import promote
from deconvlab.train import train
from test_evaluate_predict import FAMILIES
from test_evaluate_predict import _run_cli as _cli


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    """family -> ``models:/<family>-tiny@champion`` of a tiny run (trained on first use)."""
    cache: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        use_store_under(mp, tmp_path_factory.mktemp("models"))

        def get(family: str) -> str:
            if family not in cache:
                result = train(compose_config([*TINY_TRAINER, *FAMILIES[family]]))
                promote(result.run_id, f"{family}-tiny")
                cache[family] = f"models:/{family}-tiny@champion"
            return cache[family]

        yield get


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _stacked(folder: Path, order: tuple[str, ...], target: Path) -> Path:
    """The case's modality files stacked by hand into one 4-D NIfTI (the only input predict took before)."""
    volumes = [nib.load(str(folder / f"{name}.nii.gz")) for name in order]
    data = np.stack([np.asarray(v.dataobj, np.float32) for v in volumes], axis=-1)
    nib.save(nib.Nifti1Image(data, volumes[0].affine), str(target))
    return target


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """A phantom written as a case folder of the data set's layout: flair, t1c, label and brain mask."""
    folder = tmp_path_factory.mktemp("cases") / "pat0007"
    write_phantom_case(folder, seed=3, size=24)
    return folder


@pytest.fixture(scope="module")
def reference_labels(model_uri, case, tmp_path_factory) -> np.ndarray:
    """What the model predicts on the case stacked by hand in its order (flair, t1c)."""
    tmp = tmp_path_factory.mktemp("reference")
    (written,) = predict(model_uri("volumetric"), [_stacked(case, ("flair", "t1c"), tmp / "ref.nii.gz")],
                         tmp / "out")
    labels = _labels(written)
    # The order of the modalities must matter to this model, or the tests below could not tell a swap.
    (swapped,) = predict(model_uri("volumetric"), [_stacked(case, ("t1c", "flair"), tmp / "swap.nii.gz")],
                         tmp / "out_swapped")
    assert len(np.unique(labels)) > 1 and not np.array_equal(labels, _labels(swapped))
    return labels


# -- volumes: case folders, modality files, missing modalities ---------------------------------------------
def test_a_case_folder_is_read_by_its_modality_names(model_uri, case, reference_labels, tmp_path, capsys):
    code, out, err = _cli(capsys, "predict", model_uri("volumetric"), str(case), "-o", str(tmp_path / "out"))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"pat0007: flair <- {case / 'flair.nii.gz'}, t1c <- {case / 't1c.nii.gz'}"
    assert lines[1:] == [str(tmp_path / "out" / "pat0007_labels.nii.gz")]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pat0007_labels.nii.gz"]  # no staging folder left
    assert np.array_equal(_labels(Path(lines[1])), reference_labels)


def test_brats_release_names_are_recognised_in_a_folder_and_as_files(model_uri, case, reference_labels, tmp_path,
                                                                     capsys):
    """BraTS 2018-style names (``*_t1ce``) beside other modalities and the segmentation, in a folder and passed
    as files in any order; files that do not say their modality are taken in the model's order."""
    folder = tmp_path / "Brats18_TCIA_001"
    folder.mkdir()
    for mine, theirs in (("flair", "flair"), ("t1c", "t1ce"), ("flair", "t2"), ("t1c", "t1"),
                         ("otmulticlass", "seg")):
        shutil.copy(case / f"{mine}.nii.gz", folder / f"Brats18_TCIA_001_{theirs}.nii.gz")
    uri = model_uri("volumetric")
    (from_folder,) = predict(uri, [folder], tmp_path / "a")
    assert from_folder.name == "Brats18_TCIA_001_labels.nii.gz"
    assert np.array_equal(_labels(from_folder), reference_labels)

    t1ce, flair = folder / "Brats18_TCIA_001_t1ce.nii.gz", folder / "Brats18_TCIA_001_flair.nii.gz"
    code, out, err = _cli(capsys, "predict", uri, str(t1ce), str(flair), "-o", str(tmp_path / "b"))
    assert code == 0, err
    assert f"flair <- {flair}, t1c <- {t1ce}" in out.splitlines()[0]
    assert np.array_equal(_labels(tmp_path / "b" / "Brats18_TCIA_001_labels.nii.gz"), reference_labels)

    first, second = tmp_path / "scan_a.nii.gz", tmp_path / "scan_b.nii.gz"
    shutil.copy(case / "flair.nii.gz", first)
    shutil.copy(case / "t1c.nii.gz", second)
    notes: list[str] = []
    (in_order,) = predict(uri, [first, second], tmp_path / "c", say=notes.append)
    assert notes == [f"scan: flair <- {first}, t1c <- {second}"] and in_order.name == "scan_labels.nii.gz"
    assert np.array_equal(_labels(in_order), reference_labels)


def test_a_missing_modality_is_one_line_naming_it_and_the_expected_names(model_uri, case, tmp_path, capsys):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    shutil.copy(case / "flair.nii.gz", folder / "flair.nii.gz")
    shutil.copy(case / "otmulticlass.nii.gz", folder / "otmulticlass.nii.gz")
    uri, out = model_uri("volumetric"), tmp_path / "out"
    for inputs in ([folder], [folder / "flair.nii.gz"], [case / "flair.nii.gz", case / "flair.nii.gz"]):
        code, _, err = _cli(capsys, "predict", uri, *map(str, inputs), "-o", str(out))
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = _cli(capsys, "predict", uri, str(folder), "-o", str(out))
    assert "no t1c volume" in err and "t1c.nii.gz or *_t1c.nii.gz (or ending in t1ce" in err, err
    _, _, err = _cli(capsys, "predict", uri, str(case / "flair.nii.gz"), "-o", str(out))
    assert "has no t1c volume" in err, err  # a named file alone: its case's other modality is missing


def test_the_labels_volume_keeps_the_inputs_header_codes_and_units(model_uri, case, tmp_path):
    affine = np.array([[-1.0, 0, 0, 90], [0, 1.2, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    folder = tmp_path / "scanner"
    folder.mkdir()
    for name in ("flair", "t1c"):
        image = nib.Nifti1Image(np.asarray(nib.load(str(case / f"{name}.nii.gz")).dataobj, np.float32), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
        nib.save(image, str(folder / f"{name}.nii.gz"))
    four_d = nib.Nifti1Image(np.stack([np.asarray(nib.load(str(folder / f"{n}.nii.gz")).dataobj)
                                       for n in ("flair", "t1c")], axis=-1), affine)
    four_d.set_qform(affine, code=1)
    four_d.set_sform(affine, code=1)
    four_d.header.set_xyzt_units("mm", "sec")
    nib.save(four_d, str(tmp_path / "stacked.nii.gz"))
    written = predict(model_uri("volumetric"), [folder, tmp_path / "stacked.nii.gz"], tmp_path / "out")
    for path in written:
        header = nib.load(str(path)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1), path
        assert header.get_xyzt_units()[0] == "mm"
        assert np.allclose(header.get_qform(), affine) and np.allclose(header.get_sform(), affine)
        assert np.allclose(header.get_zooms()[:3], (1.0, 1.2, 1.5))


# -- all or nothing ------------------------------------------------------------------------------------------
def test_a_failing_second_input_leaves_nothing(model_uri, tmp_path, capsys):
    uri = model_uri("restoration")
    good = tmp_path / "camera.png"
    Image.fromarray(skimage.data.camera()[:40, :48]).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    created = tmp_path / "new" / "out"
    code, out, err = _cli(capsys, "predict", uri, str(good), str(broken), "-o", str(created))
    assert code == 2 and "broken.png" in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "new").exists()  # neither the output nor the folders this call made

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "camera_restored.png").write_bytes(b"an earlier result")
    with pytest.raises(UserError, match="broken.png"):
        predict(uri, [good, broken], existing)
    assert sorted(p.name for p in existing.iterdir()) == ["camera_restored.png"]
    assert (existing / "camera_restored.png").read_bytes() == b"an earlier result"


def test_a_failure_while_writing_removes_what_was_written(model_uri, tmp_path, monkeypatch):
    """An input that passes every check but fails as the model runs (the second one here): the first
    output, already written, is removed with the staging folder and the output folder this call created."""
    uri = model_uri("restoration")
    inputs = []
    for name in ("first", "second"):
        inputs.append(tmp_path / f"{name}.png")
        Image.fromarray(skimage.data.camera()[:32, :32]).save(inputs[-1])
    real = PREDICTORS["restoration"]
    written_before_failure: list[Path] = []

    def fail_on_second(loaded, item, out):
        if item.stem == "second":
            raise UserError("the model failed on second.png", str(item.source), "")
        written_before_failure.extend(real.run(loaded, item, out))
        return written_before_failure

    monkeypatch.setitem(PREDICTORS, "restoration", Predictor(real.reads, real.prepare, fail_on_second))
    with pytest.raises(UserError, match="second.png"):
        predict(uri, inputs, tmp_path / "out")
    assert written_before_failure and not written_before_failure[0].exists()
    assert not (tmp_path / "out").exists()


# -- images: class indices, RGB through a one-channel model ---------------------------------------------------
def test_segmentation_labels_are_class_indices_beside_a_colour_rendering(model_uri, tmp_path):
    from deconvlab.data.shapes import ShapesConfig, make_shapes_sample

    sample = make_shapes_sample(4, "test", 0, ShapesConfig(32, 32))
    sample_image = (sample.image * 255 + 0.5).astype(np.uint8)
    Image.fromarray(sample_image).save(tmp_path / "shapes.png")
    labels_path, colour_path, overlay_path = predict(model_uri("segmentation"), [tmp_path / "shapes.png"],
                                                     tmp_path / "out")
    assert (labels_path.name, colour_path.name, overlay_path.name) == (
        "shapes_labels.png", "shapes_colour.png", "shapes_overlay.png")
    labels = Image.open(labels_path)
    assert labels.mode == "L"  # like the data sets' annotation PNGs
    values = np.asarray(labels)
    network = load_model(model_uri("segmentation")).network
    with torch.no_grad():
        predicted = network(torch.from_numpy(sample_image).permute(2, 0, 1)[None] / 255.0)[0].argmax(0)
    assert np.array_equal(values, predicted.numpy())  # the class of each pixel, not a colour
    palette = np.asarray(compose_config(FAMILIES["segmentation"]).data.palette, np.uint8)
    assert np.array_equal(np.asarray(Image.open(colour_path)), palette[values])


def test_rgb_through_a_one_channel_restoration_model_is_restored_per_channel(model_uri, tmp_path, capsys):
    rgb = skimage.data.astronaut()[100:140, 180:228]
    Image.fromarray(rgb).save(tmp_path / "astronaut.png")
    for c in range(3):
        Image.fromarray(rgb[..., c]).save(tmp_path / f"channel{c}.png")
    uri = model_uri("restoration")
    code, out, err = _cli(capsys, "predict", uri, str(tmp_path / "astronaut.png"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "astronaut.png: RGB image, one-channel model: processed channel by channel, written as RGB" in out
    restored = Image.open(tmp_path / "out" / "astronaut_restored.png")
    assert restored.mode == "RGB" and restored.size == (48, 40)
    channels = predict(uri, [tmp_path / f"channel{c}.png" for c in range(3)], tmp_path / "grey")
    expected = np.stack([np.asarray(Image.open(p)) for p in channels], axis=-1)
    assert np.array_equal(np.asarray(restored), expected)


def test_predict_help_states_every_familys_input_and_output(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    for family, output in (("restoration", "_restored.png"), ("segmentation", "_labels.png"),
                           ("volumetric", "_labels.nii.gz"), ("reconstruction", "_reconstruction.png"),
                           ("localisation", "_box.json")):
        assert re.search(rf"^  {family} .*", text, re.M) and output in text, family
    assert "case folder" in text and "4-D NIfTI" in text and "flair t1c" in text
    assert "All or nothing" in text and "_colour.png" in text


def test_a_folder_for_an_image_model_says_to_pass_its_images(model_uri, tmp_path, capsys):
    code, _, err = _cli(capsys, "predict", model_uri("restoration"), str(tmp_path), "-o", str(tmp_path / "o"))
    assert code == 2 and "is a folder" in err and "does not exist" not in err, err
