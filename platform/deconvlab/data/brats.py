"""BraTS MRI volumes as class-balanced, voxel-centred patches (with a downsampled context patch).

Layout of a root folder (``../shared/data/brats``; any folder laid out like it via ``data.root``)::

    <root>/<split>/<case>/flair.nii.gz, t1c.nii.gz, ...   one file per modality
    <root>/<split>/<case>/otmulticlass.nii.gz             labels 0..4 (BraTS: 1 necrosis, 2 edema,
                                                          3 non-enhancing, 4 enhancing)
    <root>/<split>/<case>/brainmask.nii.gz                 0/1

``root: null`` is the fresh-install default: synthetic phantoms (:mod:`deconvlab.data.phantom`).

Each case is decoded and normalised ONCE (z-score inside the brain mask, 0 outside) and kept in a
process-wide cache; patches are then plain slices of the cached, padded array.

Patch layouts (the model contract is one input tensor; cut by :mod:`deconvlab.data.patches`):

* ``patch_dims=3`` (DeepMedic-like): ``[2C, S, S, S]``: channels ``0..C-1`` are the S^3 patch around
  the centre voxel; channels ``C..2C-1`` are the context patch, the ``(f*S)^3`` region around the same
  centre averaged over ``f^3`` blocks down to ``S^3`` (``f = context_factor``, odd, so the centre block
  is centred on the centre voxel). ``context_factor=1`` drops the context channels: ``[C, S, S, S]``.
* ``patch_dims=2`` (Havaei two-pathway, 2-D or 2.5-D): ``[C * slices, S, S]`` in the plane of axes
  0 and 1; channel ``c * slices + k`` is modality ``c`` at slice offset ``k - slices // 2`` on axis 2.

The label of a patch is its centre voxel's class (``[B]`` long in a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deconvlab.console import progress
from deconvlab.data.base import SplitDataModule, uses_gpu
from deconvlab.data.patches import PatchAugmentation, PatchGeometry, channel_modalities, extract_patch, pad_image
from deconvlab.data.patches import layout_of as patch_layout_of  # the argument's name is taken
from deconvlab.data.phantom import make_phantom, split_seed
from deconvlab.data.planning import plan_cases, write_plan
from deconvlab.data.sampling import EpochSampler, FreshCentres, sample_uniform_centres
from deconvlab.errors import DataError, MissingDataError

LABEL_FILE, MASK_FILE = "otmulticlass", "brainmask"
NIFTI_SUFFIX = ".nii.gz"
# The modalities BraTS models read, in their channel order, unless data.modalities says otherwise.
DEFAULT_MODALITIES: tuple[str, ...] = ("flair", "t1c")
# The BraTS label regions (name -> labels it unites): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)}


@dataclass
class Case:
    """One normalised volume.

    Attributes:
        name: case folder name.
        image: ``[C, D, H, W]`` float32, z-scored inside the brain, 0 outside.
        label: ``[D, H, W]`` uint8.
        brain: ``[D, H, W]`` bool.
        affine: the 4x4 voxel-to-world matrix of the label file (identity for phantoms: 1 mm voxels).
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each array axis: the lengths of the affine's first three columns (as
        the plan's ``spacing_mm``). Distances in the volume metrics (HD95) are measured with it."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


# ------------------------------------------------------------------------------------------- reading
def _load_nifti(path: Path, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise MissingDataError(f"missing file {path.name}", str(path),
                               "every case folder needs each modality, the label and the brain mask as .nii.gz")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # nibabel raises several types for truncated or foreign files
        raise DataError(f"cannot read NIfTI file: {error}", str(path),
                        "check that the file is a valid .nii.gz") from error
    data = np.squeeze(data)
    if data.ndim != 3:
        raise DataError(f"expected a 3-D volume, got shape {data.shape}", str(path),
                        "give one 3-D volume per file (no 2-D slices, no 4-D series)")
    return data, image.affine


def normalise_in_mask(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score ``volume`` with the mean and std of its voxels inside ``mask``; 0 outside.

    MRI intensities are arbitrary per scanner and scan, so only statistics inside the brain are
    meaningful; the background would dominate them otherwise.
    """
    inside = volume[mask]
    std = float(inside.std()) if inside.size else 1.0
    out = (volume - (float(inside.mean()) if inside.size else 0.0)) / max(std, 1e-6)
    return np.where(mask, out, 0.0).astype(np.float32)


def read_case(folder: Path, modalities: Sequence[str], num_classes: int = 5) -> Case:
    """Read, check and normalise one case folder.

    Raises:
        MissingDataError: naming the missing modality, label or mask file.
        DataError: naming the file at fault for an unreadable or non-3-D volume, shapes or affines that
            disagree, or label values outside ``0..num_classes-1``.
    """
    label, affine = _load_nifti(folder / f"{LABEL_FILE}{NIFTI_SUFFIX}", np.float32)
    files = [folder / f"{m}{NIFTI_SUFFIX}" for m in modalities] + [folder / f"{MASK_FILE}{NIFTI_SUFFIX}"]
    volumes = []
    for path in files:
        data, other_affine = _load_nifti(path, np.float32)
        if data.shape != label.shape:
            raise DataError(f"shape {data.shape} differs from the label's {label.shape}", str(path),
                            "all modalities, label and mask of a case must be co-registered on one grid")
        if not np.allclose(other_affine, affine, atol=1e-3):
            raise DataError("affine differs from the label file's affine", str(path),
                            "resample all volumes of a case to the same grid")
        volumes.append(data)
    values = np.unique(label)
    if not np.all(np.isin(values, np.arange(num_classes))):
        raise DataError(f"label values {values.tolist()} outside 0..{num_classes - 1}",
                        str(folder / f"{LABEL_FILE}{NIFTI_SUFFIX}"),
                        "use BraTS labels 0-4 or set data.num_classes")
    brain = volumes.pop() > 0
    image = np.stack([normalise_in_mask(v, brain) for v in volumes])
    return Case(folder.name, image, label.astype(np.uint8), brain, affine)


_CASE_CACHE: dict[tuple, Case] = {}


def load_case(folder: Path, modalities: Sequence[str], num_classes: int = 5) -> Case:
    """:func:`read_case` through a process-wide cache (decoding a .nii.gz takes ~0.3 s per file)."""
    label_path = folder / f"{LABEL_FILE}{NIFTI_SUFFIX}"
    stamp = label_path.stat().st_mtime_ns if label_path.exists() else 0
    key = (str(folder.resolve()), tuple(modalities), num_classes, stamp)
    if key not in _CASE_CACHE:
        _CASE_CACHE[key] = read_case(folder, modalities, num_classes)
    return _CASE_CACHE[key]


def list_cases(root: Path, split: str) -> list[Path]:
    """Case folders of ``<root>/<split>``, sorted; a clear error if there are none."""
    folder = root / split
    cases = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not cases:
        raise MissingDataError(f"no case folders in {folder}", "data.root",
                               f"point data.root at a folder with {split}/<case>/ sub-folders, or null for phantoms")
    return cases


def phantom_cases(count: int, first_seed: int, size: int) -> list[Case]:
    """Synthetic phantom cases (the fresh-install default), brain = nonzero voxels."""
    cases = []
    for i in range(count):
        image, label = make_phantom(size, first_seed + i)
        cases.append(Case(f"phantom{first_seed + i}", image, label, np.any(image != 0, axis=0), np.eye(4)))
    return cases


class CentredPatchDataset(Dataset):
    """Patches around centre voxels; each item is ``{"image": patch, "label": centre class}`` (for a
    segment geometry, ``label`` is the ``label_size^3`` block around the centre, 0 outside the volume).

    Args:
        cases: the volumes.
        centres: ``[N, 4]`` int array of (case index, z, y, x), fixed; or a callable ``epoch -> [N, 4]``
            (:class:`FreshCentres`), indexed by ``(epoch, i)`` keys (:class:`EpochSampler`).
        geometry: how patches are cut.
        augment: optional ``(patch, label, epoch, index) -> (patch, label)`` (:class:`PatchAugmentation`).
    """

    def __init__(self, cases: Sequence[Case], centres: np.ndarray | Callable[[int], np.ndarray],
                 geometry: PatchGeometry, augment: PatchAugmentation | None = None) -> None:
        self.cases, self.centres, self.geometry, self.augment = list(cases), centres, geometry, augment
        # Padded (and context-pooled) once per case, shared by all patches: extraction is then pure slicing.
        self.padded = [pad_image(case.image, geometry.margin) for case in self.cases]
        self.pooled = [geometry.pooled(p) for p in self.padded]
        half = geometry.label_size // 2
        self.labels = [np.pad(case.label, half) if half else case.label for case in self.cases]

    def centres_of(self, epoch: int) -> np.ndarray:
        """The ``[N, 4]`` centres of ``epoch`` (the same every epoch for fixed centres)."""
        return self.centres(epoch) if callable(self.centres) else self.centres

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        case, *centre = (int(v) for v in self.centres_of(epoch)[index])
        patch = extract_patch(self.padded[case], centre, self.geometry, self.pooled[case])
        size = self.geometry.label_size
        label = self.labels[case][tuple(slice(c, c + size) for c in centre)] if size > 1 \
            else self.labels[case][tuple(centre)]
        if self.augment is not None:
            patch, label = self.augment(patch, np.asarray(label), epoch, index)
        return {"image": torch.from_numpy(patch), "label": torch.as_tensor(np.asarray(label, np.int64))}


# --------------------------------------------------------------------------------------- datamodule
class BratsDataModule(SplitDataModule):
    """Voxel-centred patches of BraTS cases (or synthetic phantoms) for the volumetric task.

    Training patches are class-balanced by the plan's ``label_fractions`` (or the ones given) and drawn
    afresh every epoch from the data seed and the epoch (:class:`FreshCentres`): epochs see new patches,
    the same seed sees the same ones. :meth:`sample_naturally_from` switches later epochs to the true
    label distribution (Havaei's two-phase training). Validation patches are centred on voxels drawn once,
    uniformly inside the brain, so the task's Dice over them estimates the volume Dice. ``plan_dir``
    receives ``patch_plan.json``, with the sampling under ``"sampling"``.

    Cases are decoded once, in ``setup`` (the loader workers inherit them).

    Args:
        root: a folder laid out as in the module docstring; None = synthetic phantoms.
        split: the split val/test dataloaders read ("validation" on disk is accepted for "val").
        modalities: modality file stems, in channel order.
        patch_dims, patch_size, context_factor, slices, label_size: patch geometry (see :class:`PatchGeometry`).
        tumour_fraction: share of training patches centred on tumour voxels.
        label_fractions: explicit per-label shares; None derives them in the plan.
        samples_per_epoch, eval_samples: training / validation patches.
        phantom_cases, phantom_size: number and side of phantom cases per split when ``root`` is None.
        plan_dir: where to write the plan (the run's output folder); None writes nothing.
        augment: training augmentation, keyword arguments of :class:`PatchAugmentation` (``flip``,
            ``scale_std``, ``shift_std``); None (default) = none. Validation patches are never augmented.
        layout_of: a patch net, or its config (``${model}`` in a config: the data config's
            ``_recursive_: false`` keeps Hydra from building it), whose input layout replaces ``patch_dims``,
            ``patch_size``, ``context_factor``, ``slices`` and ``label_size``: a sweep over architectures
            then switches the patch layout with the net. A config is read without building a real net (see
            :func:`deconvlab.data.patches.layout_of`).
    """

    seeded_shuffle = False
    persistent_workers = False

    def __init__(self, root: str | None = None, split: str = "val",
                 modalities: Sequence[str] = DEFAULT_MODALITIES,
                 patch_dims: int = 3, patch_size: int = 9, context_factor: int = 3, slices: int = 1,
                 tumour_fraction: float = 0.5, label_fractions: Sequence[float] | None = None,
                 samples_per_epoch: int = 2048, eval_samples: int = 2048, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, num_classes: int = 5, ignore_index: int = -100,
                 in_channels: int | None = None, phantom_cases: int = 3, phantom_size: int = 32,
                 plan_dir: str | None = None, layout_of: Any = None, label_size: int = 1,
                 augment: dict[str, Any] | None = None) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.root, self.split, self.modalities = root, split, tuple(modalities)
        modality_count = len(self.modalities) if root is not None else 2
        self.geometry = (patch_layout_of(layout_of, modality_count) if layout_of is not None
                         else PatchGeometry(patch_dims, patch_size, context_factor, slices, label_size))
        self.tumour_fraction, self.label_fractions = tumour_fraction, label_fractions
        self.samples_per_epoch, self.eval_samples = samples_per_epoch, eval_samples
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.in_channels = self.geometry.channels(modality_count)
        if in_channels is not None and in_channels != self.in_channels:
            raise DataError(f"data.in_channels={in_channels} but the patch layout gives {self.in_channels} "
                            f"channels", "data.in_channels", "leave it null (derived) or fix the geometry")
        self.phantom_cases, self.phantom_size, self.plan_dir = phantom_cases, phantom_size, plan_dir
        self.augment = None if augment is None else augmentation(augment, self.geometry, modality_count, seed)
        self.plan: dict | None = None

    def cases(self, split: str) -> list[Case]:
        """The normalised cases of ``split`` ("train", "val"/"validation" or "test")."""
        if self.root is None:
            first_seed = split_seed(self.seed, "val" if split == "validation" else split)
            return phantom_cases(self.phantom_cases, first_seed, self.phantom_size)
        root = Path(self.root)
        folder = split if (root / split).is_dir() or split != "val" else "validation"
        folders = list_cases(root, folder)
        return [load_case(p, self.modalities, self.num_classes)
                for p in progress(folders, f"decoding {len(folders)} {folder} cases")]

    def _make_plan(self, cases: list[Case]) -> dict:
        g = self.geometry
        plan = plan_cases(cases, g.patch_dims, g.patch_size, g.context_factor, self.tumour_fraction,
                          self.num_classes)
        if self.label_fractions is not None:
            plan["label_fractions"] = [float(f) for f in self.label_fractions]
        plan["sampling"] = sampling_record(self.seed, self.samples_per_epoch, self.eval_samples, g.label_size)
        plan["augmentation"] = None if self.augment is None else {
            "flip_axis0": self.augment.flip, "scale_std": self.augment.scale_std,
            "shift_std": self.augment.shift_std, "rng": f"numpy.random.default_rng([{self.seed}, epoch, index])"}
        return plan

    def _write_plan(self) -> None:
        if self.plan_dir is not None and self.plan is not None:
            write_plan(self.plan, self.plan_dir)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            cases = self.cases("train")
            self.plan = self._make_plan(cases)
            self._write_plan()
            centres = FreshCentres(cases, self.samples_per_epoch, self.plan["label_fractions"], self.seed)
            self.train_set = CentredPatchDataset(cases, centres, self.geometry, self.augment)
        if self.eval_set is None:
            cases = self.cases(self.split)
            centres = sample_uniform_centres(cases, self.eval_samples, self.seed + 1)
            self.eval_set = CentredPatchDataset(cases, centres, self.geometry)

    def sample_naturally_from(self, epoch: int | None) -> None:
        """Draw the training centres of ``epoch`` and later uniformly inside the brain (the true label
        distribution) instead of class-balanced; None switches back. Recorded in the plan file."""
        if self.train_set is None:
            raise RuntimeError("BratsDataModule.setup('fit') must run before choosing the sampling")
        self.train_set.centres.natural_from = epoch
        self.plan["sampling"]["natural_from_epoch"] = epoch
        self._write_plan()

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("BratsDataModule.setup() must run before asking for a dataloader")
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSampler(len(self.train_set)),
                          num_workers=self.num_workers, pin_memory=uses_gpu(self.trainer))


def augmentation(settings: Mapping[str, Any], geometry: PatchGeometry, modalities: int, seed: int) -> PatchAugmentation:
    """The :class:`PatchAugmentation` of ``data.augment`` (its ``flip``, ``scale_std``, ``shift_std``)."""
    unknown = set(settings) - {"flip", "scale_std", "shift_std"}
    if unknown:
        raise DataError(f"unknown augmentation setting(s) {sorted(unknown)}", "data.augment",
                        "use flip, scale_std and shift_std")
    channels = tuple(channel_modalities(geometry, modalities).tolist())
    return PatchAugmentation(channels, seed, **dict(settings))


def sampling_record(seed: int, samples_per_epoch: int, eval_samples: int, label_size: int) -> dict[str, Any]:
    """How the training and validation centres are drawn, as the plan file records it."""
    return {
        "train": "class-balanced by label_fractions, fresh centres every epoch",
        "train_rng": f"numpy.random.default_rng([{seed}, epoch])",
        "natural_from_epoch": None,  # set by two-phase training: uniform in the brain from that epoch on
        "samples_per_epoch": samples_per_epoch,
        "labelled_voxels_per_sample": label_size ** 3,
        "validation": f"uniform in the brain, drawn once: numpy.random.default_rng({seed + 1})",
        "eval_samples": eval_samples,
    }
