"""``deconvlab predict``: apply a model to files, one output per input, by task family.

============== ============================== ==================================================
family         input                          output (in ``-o OUT``)
============== ============================== ==================================================
restoration    a degraded image (PNG, JPEG..) ``<stem>_restored.png``, same size
segmentation   an RGB image                   ``<stem>_labels.png`` (palette colours) and
                                              ``<stem>_overlay.png`` (labels blended on the image)
volumetric     a NIfTI volume, modalities on  ``<stem>_labels.nii.gz``: uint8 labels, same grid and
               a 4th axis                     affine
reconstruction an MNIST-like grey image       ``<stem>_reconstruction.png``, same size
localisation   an RGB image                   ``<stem>_box.png`` (the predicted box drawn in its class's
                                              colour) and ``<stem>_box.json`` (class, probability, box)
============== ============================== ==================================================

Inputs are prepared the way the family's data modules prepare training data (grey or RGB in [0, 1];
volumes z-scored per modality inside the non-zero region). Missing inputs and inputs of the wrong kind
are refused before anything is written; an unreadable file or one of the wrong shape stops the command
with one line naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from skimage.color import rgb2gray

from deconvlab.boxes import draw_box
from deconvlab.build import build_datamodule
from deconvlab.errors import UserError, first_line
from deconvlab.model_io import LoadedModel, load_model
from deconvlab.models.localisation import split_output
from deconvlab.tasks.base import to_uint8
from deconvlab.tasks.segmentation import colourise
from deconvlab.volume.dense import dense_probabilities

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Networks that pool need sizes divisible by their total stride: inputs are padded to this multiple
# when the network does not return an output of the input's size as is.
PAD_MULTIPLE = 32


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "image" if name.endswith(IMAGE_SUFFIXES) else None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", *IMAGE_SUFFIXES, ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_inputs(paths: Sequence[Path], family: str, model_name: str) -> None:
    """Every input exists and is of the kind the family takes (before anything is written)."""
    wanted = PREDICTORS[family].reads
    described = {"image": "images (" + ", ".join(IMAGE_SUFFIXES) + ")",
                 "nifti": "NIfTI volumes (.nii, .nii.gz)"}
    for path in paths:
        if not path.is_file():
            raise UserError(f"input {path} does not exist", str(path), "check the path")
        if _kind(path) != wanted:
            raise UserError(f"{path.name} is not one of the {described[wanted]} that the {family} model "
                            f"{model_name} takes", str(path), f"pass {described[wanted]}")


# -- reading -------------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """An image as float32 in [0, 1], H x W or H x W x C."""
    try:
        with Image.open(path) as picture:
            picture.load()
            array = np.asarray(picture)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path.name}: {first_line(exc)}", str(path),
                        "pass a valid PNG/JPEG file") from None
    if array.dtype == bool:
        return array.astype(np.float32)
    scale = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
    return array.astype(np.float32) / scale


def as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """H x W (x C) -> C x H x W with ``channels`` channels (grey <-> RGB as the data modules do)."""
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[-1] == 2:  # grey + alpha
        image = image[..., 0]
    if channels == 1:
        grey = rgb2gray(image) if image.ndim == 3 else image
        return grey[None].astype(np.float32)
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    return np.moveaxis(rgb[..., :channels], -1, 0).astype(np.float32)


def read_nifti(path: Path):
    """A NIfTI image whose voxels can be read, or a UserError."""
    try:
        volume = nib.load(str(path))
        data = np.asarray(volume.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types (ImageFileError, EOFError, zlib...)
        raise UserError(f"cannot read NIfTI {path.name}: {first_line(exc)}", str(path),
                        "pass a valid .nii or .nii.gz volume") from None
    return volume, data


# -- running the network -------------------------------------------------------------------------------
def _expected_channels(loaded: LoadedModel, default: int) -> int:
    if loaded.input_shape and len(loaded.input_shape) > 1 and loaded.input_shape[1] > 0:
        return int(loaded.input_shape[1])
    for section in (loaded.cfg.model, loaded.cfg.data):
        if section.get("in_channels") is not None:
            return int(section.in_channels)
    return default


def _check_size(loaded: LoadedModel, x: torch.Tensor, path: Path) -> None:
    """Fixed-size networks (e.g. fully connected) state their size in the signature: say it plainly."""
    fixed = loaded.input_shape[2:] if loaded.input_shape else ()
    if fixed and all(n > 0 for n in fixed) and tuple(x.shape[2:]) != tuple(fixed):
        size, wanted = "x".join(map(str, x.shape[2:])), "x".join(map(str, fixed))
        raise UserError(f"{path.name} is {size} but model {loaded.uri} takes {wanted} inputs", str(path),
                        f"resize the input to {wanted}")


def _forward(loaded: LoadedModel, x: torch.Tensor, path: Path) -> torch.Tensor:
    try:
        with torch.no_grad():
            return loaded.network(x)
    except RuntimeError as exc:
        raise UserError(f"model {loaded.uri} cannot take {path.name} of shape {tuple(x.shape[1:])}: "
                        f"{first_line(exc, 160)}", str(path),
                        "pass an input like the ones the model was trained on") from None


def run_same_size(loaded: LoadedModel, x: torch.Tensor, path: Path) -> torch.Tensor:
    """The network's output at the input's spatial size, padding to a multiple of 32 if it needs it."""
    _check_size(loaded, x, path)
    size = tuple(x.shape[2:])
    try:
        with torch.no_grad():
            output = loaded.network(x)
        if tuple(output.shape[2:]) == size:
            return output
    except RuntimeError:
        pass
    pads = [(-n) % PAD_MULTIPLE for n in size]
    padding = [p for pad in reversed(pads) for p in (0, pad)]
    mode = "reflect" if all(p < n for p, n in zip(pads, size, strict=True)) else "replicate"
    output = _forward(loaded, F.pad(x, padding, mode=mode), path)
    if tuple(output.shape[2:]) != tuple(n + p for n, p in zip(size, pads, strict=True)):
        raise UserError(f"model {loaded.uri} returns {tuple(output.shape[2:])} for an input of {size}",
                        str(path), "predict needs a model whose output matches its input's size")
    return output[(..., *(slice(0, n) for n in size))]


def _save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


# -- one function per family ---------------------------------------------------------------------------
def restore(loaded: LoadedModel, path: Path, out: Path) -> list[Path]:
    x = torch.from_numpy(as_channels(read_image(path), _expected_channels(loaded, 1)))[None]
    restored = run_same_size(loaded, x, path)[0]
    return [_save_png(to_uint8(restored), out / f"{_stem(path)}_restored.png")]


def reconstruct(loaded: LoadedModel, path: Path, out: Path) -> list[Path]:
    x = torch.from_numpy(as_channels(read_image(path), _expected_channels(loaded, 1)))[None]
    _check_size(loaded, x, path)
    reconstruction = _forward(loaded, x, path)[0]
    return [_save_png(to_uint8(reconstruction), out / f"{_stem(path)}_reconstruction.png")]


def segment(loaded: LoadedModel, path: Path, out: Path) -> list[Path]:
    image = torch.from_numpy(as_channels(read_image(path), _expected_channels(loaded, 3)))[None]
    size = tuple(image.shape[2:])
    trained_size = loaded.cfg.data.get("image_size")
    # Run at the resolution the model was trained at, then bring the logits back to the file's size.
    x = image if not trained_size else _resize(image, tuple(trained_size))
    logits = run_same_size(loaded, x, path)
    if tuple(logits.shape[2:]) != size:
        logits = _resize(logits, size)
    colours = colourise(logits[0].argmax(0), _palette(loaded))
    picture = to_uint8(image[0])
    overlay = (0.5 * picture.astype(np.float32) + 0.5 * colours.astype(np.float32) + 0.5).astype(np.uint8)
    stem = _stem(path)
    return [_save_png(colours, out / f"{stem}_labels.png"), _save_png(overlay, out / f"{stem}_overlay.png")]


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _palette(loaded: LoadedModel) -> np.ndarray:
    """The data set's class colours (from its config, or as its data module reads them), else the task's."""
    palette = loaded.cfg.data.get("palette")
    if palette is None:
        try:  # e.g. CamVid reads camvid11_palette.png from its root
            palette = getattr(build_datamodule(loaded.cfg.data), "palette", None)
        except UserError:  # the data may not be on this machine: the task's colours will do
            palette = None
    return np.asarray(palette if palette is not None else loaded.task.palette, np.uint8)


def zscore_inside(volume: np.ndarray) -> np.ndarray:
    """[C, ...] volume z-scored per channel over the voxels where any channel is non-zero (zero outside)."""
    inside = np.any(volume != 0, axis=0)
    if not inside.any():
        return volume.astype(np.float32)
    out = np.zeros_like(volume, dtype=np.float32)
    for c, channel in enumerate(volume):
        values = channel[inside]
        out[c][inside] = (values - values.mean()) / (values.std() + 1e-6)
    return out


def segment_volume(loaded: LoadedModel, path: Path, out: Path) -> list[Path]:
    volume, data = read_nifti(path)
    network = loaded.network
    patch_net = hasattr(network, "dense_logits")  # classifies a patch's centre: dense tiled inference
    # A patch net's dense input is the modalities (a 2-D net's slices are cut from the volume).
    channels = (network.in_channels if network.dims == 3 else None) if patch_net else _expected_channels(loaded, 1)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4 or (channels is not None and data.shape[-1] != channels):
        raise UserError(f"{path.name} has shape {data.shape} but model {loaded.uri} takes {channels} "
                        "modalities", str(path), f"pass a 4-D NIfTI X x Y x Z x {channels} (modalities last)")
    image = zscore_inside(np.moveaxis(data, -1, 0))
    if patch_net:
        labels = dense_probabilities(network, image, mask=np.any(image != 0, axis=0)).argmax(0).astype(np.uint8)
    else:
        x = torch.from_numpy(image)[None]
        logits = _forward(loaded, x, path)
        if tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise UserError(f"model {loaded.uri} predicts {tuple(logits.shape[2:])} for a volume of "
                            f"{tuple(x.shape[2:])}", str(path),
                            "predict needs a dense (same-size) volumetric model")
        labels = logits[0].argmax(0).numpy().astype(np.uint8)
    result = nib.Nifti1Image(labels, volume.affine)
    result.header.set_zooms(volume.header.get_zooms()[:3])
    target = out / f"{_stem(path)}_labels.nii.gz"
    nib.save(result, str(target))
    return [target]


def localise(loaded: LoadedModel, path: Path, out: Path) -> list[Path]:
    image = torch.from_numpy(as_channels(read_image(path), _expected_channels(loaded, 3)))[None]
    data = loaded.cfg.data
    trained_size = data.get("image_size") or ([data.height, data.width] if "height" in data else None)
    # The box is normalised: predicted at the training resolution, it is drawn on the file as it is.
    x = image if not trained_size else _resize(image, tuple(trained_size))
    logits, boxes = split_output(_forward(loaded, x, path))
    label = int(logits[0].argmax())
    height, width = image.shape[2:]
    box = boxes[0].tolist()
    palette = _palette(loaded)
    drawn = draw_box(to_uint8(image[0]), box, palette[label % len(palette)], max(1, min(height, width) // 64))
    stem = _stem(path)
    record = {"class": label, "probability": float(logits[0].softmax(0)[label]), "box_normalised": box,
              "box_pixels": [box[0] * width, box[1] * height, box[2] * width, box[3] * height]}
    (out / f"{stem}_box.json").write_text(json.dumps(record, indent=1))
    return [_save_png(drawn, out / f"{stem}_box.png"), out / f"{stem}_box.json"]


@dataclass(frozen=True)
class Predictor:
    """How a task family predicts: the kind of file it reads (``image`` or ``nifti``) and the function
    that writes its outputs for one file."""

    reads: str
    run: Callable[[LoadedModel, Path, Path], list[Path]]


# One entry per task family (``BaseTask.family``); a test checks that every family has one.
PREDICTORS: dict[str, Predictor] = {
    "restoration": Predictor("image", restore), "segmentation": Predictor("image", segment),
    "volumetric": Predictor("nifti", segment_volume), "reconstruction": Predictor("image", reconstruct),
    "localisation": Predictor("image", localise),
}


def predict(uri: str, inputs: Sequence[str | Path], out_dir: str | Path, tracking_uri: str | None = None,
            trust: bool = False) -> list[Path]:
    """Apply the model behind ``uri`` to ``inputs``; write the outputs into ``out_dir``.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID``.
        inputs: files of the kind the model's family takes (see the module docstring).
        out_dir: created if missing.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).
        trust: allow unpickling (see :func:`deconvlab.model_io.load_model`).

    Returns:
        The files written, in input order.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files", "INPUT", "pass one or more files to predict on")
    loaded = load_model(uri, tracking_uri, trust)
    check_inputs(paths, loaded.family, uri)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in paths:
        written += PREDICTORS[loaded.family].run(loaded, path, out)
    return written
