"""``deconvlab predict``: apply a model to files, one output per input (per case for volumes), by task family.

============== ================================ ================================================
family         input                            output (in ``-o OUT``)
============== ================================ ================================================
restoration    a degraded image (PNG, JPEG..)   ``<stem>_restored.png``, same size and channels
                                                (an RGB image through a one-channel model is
                                                restored channel by channel and written as RGB)
segmentation   an RGB image                     ``<stem>_labels.png`` (the class index of each
                                                pixel, 8-bit grey, like the data sets' annotation
                                                PNGs), ``<stem>_colour.png`` (the classes'
                                                colours) and ``<stem>_overlay.png`` (colours
                                                blended on the image)
volumetric     a case folder (modality files    ``<case>_labels.nii.gz``: uint8 labels on the
               found by name), the modality     input's grid, with its affine, qform/sform codes
               files (named, or in the model's  and units
               order), or one 4-D NIfTI
reconstruction an MNIST-like grey image         ``<stem>_reconstruction.png``, same size
localisation   an RGB image                     ``<stem>_box.png`` (the predicted box drawn in its
                                                class's colour) and ``<stem>_box.json`` (class,
                                                probability, box)
============== ================================ ================================================

Inputs are prepared the way the family's data modules prepare training data (grey or RGB in [0, 1];
volumes z-scored per modality inside the non-zero region). Which file fed which modality, and any change
of format (an RGB image restored channel by channel), is said in one line per input (``say``).

All or nothing: every input is read and checked before the model runs, and the outputs are written into a
hidden staging folder inside ``OUT`` and moved into ``OUT`` only once every input has succeeded. If any input
fails, nothing is left: no output, no staging folder, and no output folder that this call created. Existing
files in ``OUT`` are replaced only by a call that succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from skimage.color import rgb2gray

from deconvlab.boxes import draw_box
from deconvlab.build import build_datamodule
from deconvlab.data.brats import DEFAULT_MODALITIES
from deconvlab.errors import UserError, first_line
from deconvlab.model_io import LoadedModel, load_model
from deconvlab.models.localisation import split_output
from deconvlab.tasks.base import to_uint8
from deconvlab.tasks.segmentation import colourise
from deconvlab.tiling import TilePlan, plan_tiles, tiled_forward
from deconvlab.volume.dense import dense_probabilities
from deconvlab.volume.nifti import (
    NIFTI_SUFFIXES,
    CaseFiles,
    gather_cases,
    read_modalities,
    read_nifti,
    save_labels_like,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Networks that pool need sizes divisible by their total stride: inputs are padded to this multiple
# when the network does not return an output of the input's size as is.
PAD_MULTIPLE = 32
# The modality order of a volume model whose data config names none (the phantoms mimic FLAIR and T1c):
# the BraTS data module's default, read off its signature so the two cannot disagree.
STAGING_PREFIX = ".predict-"
# Inputs with a side above this run in tiles (predict --tile overrides; 0 never tiles), by dimensionality.
DEFAULT_TILE = {2: 1024, 3: 128}
# Families whose networks map an input to an output of its own size, the ones tiling applies to.
TILED_FAMILIES = {"restoration", "segmentation", "volumetric"}


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
    """Every input exists and is of the kind the family takes (a case folder counts for volumes)."""
    wanted = PREDICTORS[family].reads
    described = {"image": "images (" + ", ".join(IMAGE_SUFFIXES) + ")",
                 "nifti": "NIfTI volumes (.nii, .nii.gz) or case folders"}
    for path in paths:
        if path.is_dir() and wanted == "nifti":
            continue
        if path.is_dir():
            raise UserError(f"{path} is a folder; the {family} model {model_name} takes image files",
                            str(path), f"pass the images in it, e.g. {path}/*.png")
        if not path.exists():
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


def _without_alpha(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[-1] == 4:
        return image[..., :3]
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 2 else image  # grey + alpha


def as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """H x W (x C) -> C x H x W with ``channels`` channels (grey <-> RGB as the data modules do)."""
    image = _without_alpha(image)
    if channels == 1:
        grey = rgb2gray(image) if image.ndim == 3 else image
        return grey[None].astype(np.float32)
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    return np.moveaxis(rgb[..., :channels], -1, 0).astype(np.float32)


@dataclass
class Item:
    """One input read and checked, ready to run: the file (or case) it came from, the name its outputs take,
    what the family's writer needs, and a line telling the user how it was read (or None)."""

    source: Path
    stem: str
    data: Any
    note: str | None = None
    per_channel: bool = False
    tiling: Tiling | None = None  # set by predict for inputs larger than its tile size


@dataclass(frozen=True)
class Tiling:
    """How predict runs an input larger than ``size``: in tiles of ``size`` with ``plan``'s halo and grid."""

    size: int
    plan: TilePlan


def _image_item(loaded: LoadedModel, path: Path, default_channels: int, per_channel: bool = False) -> Item:
    """An image as the model's input batch. With ``per_channel``, an RGB image for a one-channel model
    becomes a batch of its three channels (restored one by one and put back together as RGB), and a grey
    image for a three-channel model is said to be repeated; otherwise it is converted as the data modules do."""
    image = _without_alpha(read_image(path))
    channels = _expected_channels(loaded, default_channels)
    note, split = None, per_channel and channels == 1 and image.ndim == 3
    if split:
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image[..., :3], -1, 0)[:, None]))
        note = f"{path.name}: RGB image, one-channel model: processed channel by channel, written as RGB"
    else:
        x = torch.from_numpy(as_channels(image, channels))[None]
        if per_channel and channels == 3 and image.ndim == 2:
            note = f"{path.name}: grey image, three-channel model: given as RGB (grey repeated), written as RGB"
    _check_size(loaded, x, path)
    return Item(path, _stem(path), x, note, split)


def _images(default_channels: int, per_channel: bool = False) -> Callable[[LoadedModel, list[Path]], list[Item]]:
    def prepare(loaded: LoadedModel, paths: list[Path]) -> list[Item]:
        return [_image_item(loaded, path, default_channels, per_channel) for path in paths]
    return prepare


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


def run_same_size(loaded: LoadedModel, x: torch.Tensor, path: Path, tiling: Tiling | None = None) -> torch.Tensor:
    """The network's output at the input's spatial size, padding to a multiple of 32 if it needs it; with
    ``tiling``, tile by tile (padded to the plan's grid), which equals the one pass (see deconvlab.tiling)."""
    _check_size(loaded, x, path)
    size = tuple(x.shape[2:])
    if tiling is not None:
        pads = [(-n) % tiling.plan.multiple for n in size]
        padded = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)], mode="replicate") if any(pads) else x
        output = tiled_forward(loaded.network, padded, tiling.size, tiling.plan.halo, tiling.plan.multiple)
        return output[(..., *(slice(0, n) for n in size))]
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


def _picture(output: torch.Tensor, item: Item) -> np.ndarray:
    """A batch of outputs -> one uint8 picture: the channels of a per-channel batch put back together."""
    return to_uint8(output[:, 0] if item.per_channel else output[0])


# -- one writer per family -----------------------------------------------------------------------------
def restore(loaded: LoadedModel, item: Item, out: Path) -> list[Path]:
    restored = run_same_size(loaded, item.data, item.source, item.tiling)
    return [_save_png(_picture(restored, item), out / f"{item.stem}_restored.png")]


def reconstruct(loaded: LoadedModel, item: Item, out: Path) -> list[Path]:
    reconstruction = _forward(loaded, item.data, item.source)
    return [_save_png(_picture(reconstruction, item), out / f"{item.stem}_reconstruction.png")]


def _class_indices(labels: torch.Tensor) -> np.ndarray:
    """[H, W] classes as the data sets' annotation PNGs store them: 8-bit grey (16-bit past 255 classes)."""
    array = labels.cpu().numpy()
    return array.astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)


def segment(loaded: LoadedModel, item: Item, out: Path) -> list[Path]:
    image = item.data
    size = tuple(image.shape[2:])
    trained_size = loaded.cfg.data.get("image_size")
    # Run at the resolution the model was trained at, then bring the logits back to the file's size.
    x = image if not trained_size else _resize(image, tuple(trained_size))
    logits = run_same_size(loaded, x, item.source, item.tiling if x is image else None)
    if tuple(logits.shape[2:]) != size:
        logits = _resize(logits, size)
    labels = logits[0].argmax(0)
    colours = colourise(labels, _palette(loaded))
    picture = to_uint8(image[0])
    overlay = (0.5 * picture.astype(np.float32) + 0.5 * colours.astype(np.float32) + 0.5).astype(np.uint8)
    return [_save_png(_class_indices(labels), out / f"{item.stem}_labels.png"),
            _save_png(colours, out / f"{item.stem}_colour.png"),
            _save_png(overlay, out / f"{item.stem}_overlay.png")]


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


def localise(loaded: LoadedModel, item: Item, out: Path) -> list[Path]:
    image, data = item.data, loaded.cfg.data
    trained_size = data.get("image_size") or ([data.height, data.width] if "height" in data else None)
    # The box is normalised: predicted at the training resolution, it is drawn on the file as it is.
    x = image if not trained_size else _resize(image, tuple(trained_size))
    logits, boxes = split_output(_forward(loaded, x, item.source))
    label = int(logits[0].argmax())
    height, width = image.shape[2:]
    box = boxes[0].tolist()
    palette = _palette(loaded)
    drawn = draw_box(to_uint8(image[0]), box, palette[label % len(palette)], max(1, min(height, width) // 64))
    record = {"class": label, "probability": float(logits[0].softmax(0)[label]), "box_normalised": box,
              "box_pixels": [box[0] * width, box[1] * height, box[2] * width, box[3] * height]}
    (out / f"{item.stem}_box.json").write_text(json.dumps(record, indent=1))
    return [_save_png(drawn, out / f"{item.stem}_box.png"), out / f"{item.stem}_box.json"]


# -- volumes -------------------------------------------------------------------------------------------
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


def volume_modalities(loaded: LoadedModel) -> tuple[int | None, tuple[str, ...]]:
    """How many modalities the volume model takes (None: a 2-D patch net, whose channel count is not the
    modality count) and their names in channel order: the data config's, else the BraTS default."""
    network = loaded.network
    if hasattr(network, "dense_logits"):  # a patch net's dense input is the modalities
        count = network.in_channels if network.dims == 3 else None
    else:
        count = _expected_channels(loaded, 1)
    names = loaded.cfg.data.get("modalities")
    if names:
        return count, tuple(names)
    if count is None or count == len(DEFAULT_MODALITIES):
        return count, DEFAULT_MODALITIES
    return count, tuple(f"channel{c}" for c in range(count))


def _volume_item(loaded: LoadedModel, case: CaseFiles, count: int | None) -> Item:
    if case.stacked is None:
        reference, image = read_modalities(case)
    else:
        reference, data = read_nifti(case.stacked)
        if data.ndim != 4 or (count is not None and data.shape[-1] != count):
            raise UserError(f"{case.stacked.name} has shape {data.shape} but model {loaded.uri} takes {count} "
                            f"modalities ({', '.join(case.files)})", str(case.stacked),
                            f"pass a 4-D NIfTI X x Y x Z x {count} (modalities last), a case folder or the "
                            "modality files")
        image = np.moveaxis(data, -1, 0)
    source = case.stacked or next(iter(case.files.values()))
    return Item(source, case.name, (reference, zscore_inside(image)), case.describe())


def prepare_volumes(loaded: LoadedModel, paths: list[Path]) -> list[Item]:
    """Every input read as a case (see :func:`gather_cases`), z-scored as the volume data modules do."""
    count, modalities = volume_modalities(loaded)
    return [_volume_item(loaded, case, count) for case in gather_cases(paths, modalities)]


def segment_volume(loaded: LoadedModel, item: Item, out: Path) -> list[Path]:
    reference, image = item.data
    network = loaded.network
    if hasattr(network, "dense_logits"):  # classifies a patch's centre: dense tiled inference
        labels = dense_probabilities(network, image, mask=np.any(image != 0, axis=0)).argmax(0).astype(np.uint8)
    else:
        x = torch.from_numpy(image)[None]
        logits = (tiled_forward(loaded.network, x, item.tiling.size, item.tiling.plan.halo, item.tiling.plan.multiple)
                  if item.tiling else _forward(loaded, x, item.source))
        if tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise UserError(f"model {loaded.uri} predicts {tuple(logits.shape[2:])} for a volume of "
                            f"{tuple(x.shape[2:])}", str(item.source),
                            "predict needs a dense (same-size) volumetric model")
        labels = logits[0].argmax(0).numpy().astype(np.uint8)
    return [save_labels_like(labels, reference, out / f"{item.stem}_labels.nii.gz")]


@dataclass(frozen=True)
class Predictor:
    """How a task family predicts: the kind of file it reads (``image`` or ``nifti``), how it reads and
    checks every input before anything runs (``prepare``), and how it writes one item's outputs."""

    reads: str
    prepare: Callable[[LoadedModel, list[Path]], list[Item]]
    run: Callable[[LoadedModel, Item, Path], list[Path]]


# One entry per task family (``BaseTask.family``); a test checks that every family has one.
PREDICTORS: dict[str, Predictor] = {
    "restoration": Predictor("image", _images(1, per_channel=True), restore),
    "segmentation": Predictor("image", _images(3), segment),
    "volumetric": Predictor("nifti", prepare_volumes, segment_volume),
    "reconstruction": Predictor("image", _images(1, per_channel=True), reconstruct),
    "localisation": Predictor("image", _images(3), localise),
}


# -- all or nothing ------------------------------------------------------------------------------------
def _check_distinct(items: Sequence[Item]) -> None:
    """Two inputs whose outputs would have the same name would overwrite each other: refuse up front."""
    seen: dict[str, Path] = {}
    for item in items:
        if item.stem in seen:
            raise UserError(f"{seen[item.stem]} and {item.source} would both write {item.stem}_*",
                            str(item.source), "predict them in separate calls or rename one")
        seen[item.stem] = item.source


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); the folders this created, deepest first."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file", str(out), "pass a folder with -o")
    created, folder = [], out
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def write_all(items: Sequence[Item], write: Callable[[Item, Path], list[Path]], out: Path) -> list[Path]:
    """Write every item's outputs into a staging folder inside ``out``, then move them into ``out``.

    On any failure the staged files, the files already moved and the folders this call created are removed,
    and the error is raised again: a failed call leaves ``out`` as it found it (or absent).
    """
    created = _make_folder(out)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    moved: list[Path] = []
    try:
        staged = [path for item in items for path in write(item, staging)]
        for path in staged:
            os.replace(path, out / path.name)
            moved.append(out / path.name)
        return moved
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # something else appeared in it meanwhile: leave it
                break
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _input_shape(item: Item) -> tuple[int, tuple[int, ...]] | None:
    """(channels, spatial size) of an image batch or a volume item's array; None for anything else."""
    data = item.data
    if isinstance(data, torch.Tensor) and data.dim() >= 4:
        return int(data.shape[1]), tuple(data.shape[2:])
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], np.ndarray) and data[1].ndim >= 3:
        return int(data[1].shape[0]), tuple(data[1].shape[1:])
    return None


def _tiling_for(loaded: LoadedModel, items: Sequence[Item], tile: int | None,
                say: Callable[[str], None] | None) -> None:
    """Mark the inputs larger than ``tile`` (default by dimensionality) to run in tiles, when the network can
    be tiled exactly; otherwise they run in one pass, and ``say`` is told why."""
    if tile == 0 or loaded.family not in TILED_FAMILIES or hasattr(loaded.network, "dense_logits"):
        return  # fixed-size nets cannot be tiled; patch nets already run densely over any volume
    shapes = {id(item): _input_shape(item) for item in items}

    def too_large(item: Item) -> bool:
        shape = shapes[id(item)]
        return shape is not None and max(shape[1]) > (tile or DEFAULT_TILE[len(shape[1])])

    large = [item for item in items if too_large(item)]
    if not large:
        return
    channels, spatial = shapes[id(large[0])]
    plan = plan_tiles(loaded.network, channels, len(spatial))
    if plan is None:
        if say is not None:
            say(f"{len(large)} input(s) larger than the tile size go through in one pass: model {loaded.uri} "
                "is not translation-equivariant, so tiles would not equal one pass")
        return
    for item in large:
        spatial = shapes[id(item)][1]
        item.tiling = Tiling(tile or DEFAULT_TILE[len(spatial)], plan)
        if say is not None:
            say(f"{item.stem}: {'x'.join(map(str, spatial))} predicted in tiles of {item.tiling.size} "
                f"(halo {plan.halo}, grid {plan.multiple}), equal to one pass")


def predict(uri: str, inputs: Sequence[str | Path], out_dir: str | Path, tracking_uri: str | None = None,
            trust: bool = False, say: Callable[[str], None] | None = None, tile: int | None = None) -> list[Path]:
    """Apply the model behind ``uri`` to ``inputs``; write the outputs into ``out_dir``, all or nothing.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID`` or a ``.ckpt`` file.
        inputs: files (or, for volumes, case folders) of the kind the model's family takes (see the
            module docstring).
        out_dir: created if missing (and removed again if this call fails).
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).
        trust: allow unpickling (see :func:`deconvlab.model_io.load_model`).
        say: called with one line per input that was read in a way worth saying (which file fed which
            modality; an RGB image restored channel by channel; tiling), before anything is written.
        tile: inputs with a side larger than this run tile by tile (same-size networks that can be tiled
            exactly: deconvlab.tiling); None: 1024 pixels for images, 128 voxels for volumes; 0: never.

    Returns:
        The files written, in input order.

    Raises:
        UserError: an input that is missing, of the wrong kind, unreadable or refused by the model; nothing
            is written then.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files", "INPUT", "pass one or more files to predict on")
    if tile is not None and tile < 0:
        raise UserError(f"--tile must be a size in pixels/voxels >= 0, got {tile}", "--tile",
                        "e.g. --tile 512, or --tile 0 to never tile")
    loaded = load_model(uri, tracking_uri, trust)
    predictor = PREDICTORS[loaded.family]
    check_inputs(paths, loaded.family, uri)
    items = predictor.prepare(loaded, paths)
    _check_distinct(items)
    _tiling_for(loaded, items, tile, say)
    for item in items:
        if item.note and say is not None:
            say(item.note)
    return write_all(items, lambda item, folder: predictor.run(loaded, item, folder), Path(out_dir))
