"""predict on inputs larger than its tile size: tile by tile, equal to the one pass (issue 24)."""

from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image

import deconvlab.predict as predict_module
from deconvlab.cli import main
from test_predict_inputs import model_uri  # noqa: F401  (the tiny promoted models, trained on first use)


def _restored(tmp_path, uri, image, tile: str, capsys):
    source = tmp_path / "camera.png"
    Image.fromarray(image).save(source)
    out = tmp_path / f"out{tile}"
    code = main(["predict", uri, str(source), "-o", str(out), "--tile", tile])
    printed, err = capsys.readouterr()
    assert code == 0, err
    return np.asarray(Image.open(out / "camera_restored.png")), printed


def test_a_large_image_predicted_in_tiles_equals_one_pass(model_uri, tmp_path, capsys):  # noqa: F811
    uri = model_uri("restoration")
    image = skimage.data.camera()[40:190, 60:193]  # 150 x 133: four tiles of 48 and more
    tiled, printed = _restored(tmp_path, uri, image, "48", capsys)
    assert "camera: 150x133 predicted in tiles of 48" in printed
    whole, printed = _restored(tmp_path, uri, image, "0", capsys)
    assert "tiles" not in printed
    assert np.array_equal(tiled, whole)


def test_a_network_that_cannot_be_tiled_exactly_runs_in_one_pass_and_says_so(model_uri, tmp_path, capsys,  # noqa: F811
                                                                            monkeypatch):
    monkeypatch.setattr(predict_module, "plan_tiles", lambda *args: None)
    image = skimage.data.camera()[:100, :100]
    restored, printed = _restored(tmp_path, model_uri("restoration"), image, "32", capsys)
    assert "go through in one pass" in printed and restored.shape == (100, 100)


def test_a_negative_tile_size_is_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "camera.png"
    Image.fromarray(skimage.data.camera()[:64, :64]).save(source)
    assert main(["predict", "models:/whatever@champion", str(source), "-o", str(tmp_path / "out"),
                 "--tile", "-3"]) == 2
    assert "--tile must be" in capsys.readouterr().err and not (tmp_path / "out").exists()
