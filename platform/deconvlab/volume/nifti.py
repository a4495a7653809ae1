"""NIfTI in and out of a whole-volume prediction: a case's modality files found by name, read onto one grid,
and a label map written so it overlays the scan it was computed from.

Apart from :mod:`deconvlab.volume.report` so that nibabel (~30 ms on top of torch, ``python -X importtime``)
is imported only by who reads or writes a file, not by every training start that imports the report.

A modality file is recognised by the last part of its name (split at ``_``, ``-`` and ``.``, case ignored),
so the data set's own ``flair.nii.gz``, BraTS 2013-2021's ``Brats18_..._t1ce.nii.gz`` and BraTS 2023's
``BraTS-GLI-..-t2f.nii.gz`` all name their modality (:data:`MODALITY_ALIASES`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from deconvlab.errors import UserError, first_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What each modality's file is called across BraTS releases and BIDS-like exports (the name's last part).
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "t2flair"),
    "t1c": ("t1c", "t1ce", "t1gd", "t1post"),
    "t1": ("t1", "t1n", "t1w"),
    "t2": ("t2", "t2w"),
}
# A case's other volumes (labels, masks) simply match no modality; the grid check allows float noise.
AFFINE_TOLERANCE = 1e-3


@dataclass
class CaseFiles:
    """Where one case's modalities come from: one file per modality, or one 4-D file (modalities last).

    Attributes:
        name: what its outputs are named after (the case folder, or the files' common name part).
        files: modality -> file, in the model's order (empty for a 4-D file).
        stacked: the 4-D NIfTI holding every modality, if the case is one file.
        first: position of its first file among the inputs (outputs keep the input order).
    """

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    stacked: Path | None = None
    first: int = 0

    def describe(self) -> str:
        """One line: which file was used for which modality."""
        if self.stacked is not None:
            return f"{self.name}: {self.stacked} (4-D), modalities {', '.join(self.files) or '?'} on its 4th axis"
        return f"{self.name}: " + ", ".join(f"{m} <- {path}" for m, path in self.files.items())


# -- names -----------------------------------------------------------------------------------------------
def nifti_stem(path: Path) -> str:
    """The file name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _aliases(modality: str) -> tuple[str, ...]:
    return MODALITY_ALIASES.get(modality.lower(), (modality.lower(),))


def modality_of(path: Path, modalities: Sequence[str]) -> str | None:
    """Which of ``modalities`` the file ``path`` holds, judged by the last part of its name; None if none."""
    last = re.split(r"[_\-. ]+", nifti_stem(path).lower())[-1]
    return next((m for m in modalities if last in _aliases(m)), None)


def expected_names(modality: str) -> str:
    """How a file of ``modality`` may be named, for error messages."""
    others = [a for a in _aliases(modality) if a != modality.lower()]
    also = f" (or ending in {', '.join(others)})" if others else ""
    return f"{modality}.nii.gz or *_{modality}.nii.gz{also}"


def _case_prefix(path: Path) -> str:
    """The name without its modality part: ``Brats18_X_t1ce`` -> ``Brats18_X``; ``flair`` -> ``''``."""
    parts = re.split(r"([_\-. ]+)", nifti_stem(path))
    return "".join(parts[:-2]) if len(parts) >= 3 else ""


def _name_of(prefixes: Sequence[str], folder: Path) -> str:
    common = os.path.commonprefix(list(prefixes)).rstrip("_-. ")
    return common or folder.resolve().name or "case"


# -- finding a case's files ------------------------------------------------------------------------------
def case_folder_files(folder: Path, modalities: Sequence[str]) -> CaseFiles:
    """The modality files of a case folder, found by name (other files, e.g. labels and masks, are ignored).

    Raises:
        UserError: a modality has no file (one line naming it and the names looked for), or two.
    """
    volumes = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    files: dict[str, Path] = {}
    for modality in modalities:
        matches = [p for p in volumes if modality_of(p, [modality])]
        if not matches:
            raise UserError(f"case folder {folder} has no {modality} volume: expected {expected_names(modality)}",
                            str(folder), f"add it, or pass the modality files ({', '.join(modalities)}) themselves")
        if len(matches) > 1:
            raise UserError(f"case folder {folder} has {len(matches)} {modality} volumes: "
                            f"{', '.join(p.name for p in matches)}", str(folder),
                            f"keep one, or pass the modality files ({', '.join(modalities)}) themselves")
        files[modality] = matches[0]
    return CaseFiles(folder.resolve().name, files)


def group_modality_files(paths: Sequence[tuple[int, Path]], modalities: Sequence[str]) -> list[CaseFiles]:
    """3-D modality files (with their input positions) -> cases.

    Files whose names say their modality are grouped by folder and by the rest of their name
    (``p1_flair``, ``p1_t1c`` and ``p2_flair``, ``p2_t1c`` are two cases); files that say nothing are taken
    in the order given, ``len(modalities)`` at a time, in the order of ``modalities``.

    Raises:
        UserError: named and unnamed files mixed, a case missing a modality or holding one twice, or a
            number of unnamed files that is not a multiple of the modality count.
    """
    named = [(i, p, modality_of(p, modalities)) for i, p in paths]
    unnamed = [(i, p) for i, p, m in named if m is None]
    order = ", ".join(modalities)
    if unnamed and len(unnamed) < len(named):
        path = unnamed[0][1]
        raise UserError(f"{path.name} is not named after one of the modalities {order} and the other files are",
                        str(path), f"name it like {expected_names(modalities[0])}, or name none and pass "
                                   f"them in the order {order}")
    if unnamed:
        return _cases_in_order(unnamed, modalities)
    groups: dict[tuple[Path, str], CaseFiles] = {}
    for i, path, modality in named:
        key = (path.resolve().parent, _case_prefix(path))
        case = groups.setdefault(key, CaseFiles(_name_of([key[1]], key[0]), first=i))
        if modality in case.files:
            raise UserError(f"two {modality} volumes for case {case.name}: {case.files[modality].name} and "
                            f"{path.name}", str(path), "pass one file per modality and case")
        case.files[modality] = path
    for case in groups.values():
        missing = [m for m in modalities if m not in case.files]
        if missing:
            given = next(iter(case.files.values()))
            raise UserError(f"case {case.name} has no {missing[0]} volume: expected "
                            f"{expected_names(missing[0])} beside {given.name}", str(given),
                            f"pass all of {order}")
        case.files = {m: case.files[m] for m in modalities}
    return list(groups.values())


def _cases_in_order(paths: Sequence[tuple[int, Path]], modalities: Sequence[str]) -> list[CaseFiles]:
    count = len(modalities)
    if len(paths) % count:
        raise UserError(f"{len(paths)} 3-D volume(s) whose names do not say their modality, for a model that "
                        f"takes {count} ({', '.join(modalities)})", str(paths[0][1]),
                        f"pass a case folder, the {count} files named like {expected_names(modalities[0])}, "
                        f"the files in the order {', '.join(modalities)}, or one 4-D NIfTI")
    cases = []
    for start in range(0, len(paths), count):
        chunk = paths[start:start + count]
        name = _name_of([nifti_stem(p) for _, p in chunk], chunk[0][1].resolve().parent)
        cases.append(CaseFiles(name, {m: p for m, (_, p) in zip(modalities, chunk, strict=True)}, first=chunk[0][0]))
    return cases


def gather_cases(paths: Sequence[Path], modalities: Sequence[str]) -> list[CaseFiles]:
    """Inputs -> cases in input order: a folder is a case, a 4-D NIfTI is a case, 3-D NIfTI files are
    modality files grouped by name (or taken in order; :func:`group_modality_files`)."""
    cases, singles = [], []
    for i, path in enumerate(paths):
        if path.is_dir():
            case = case_folder_files(path, modalities)
            case.first = i
            cases.append(case)
        elif nifti_ndim(path) > 3:
            cases.append(CaseFiles(nifti_stem(path), dict.fromkeys(modalities), stacked=path, first=i))
        else:
            singles.append((i, path))
    if singles:
        cases += group_modality_files(singles, modalities)
    return sorted(cases, key=lambda case: case.first)


# -- reading ---------------------------------------------------------------------------------------------
def read_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A NIfTI image and its voxels as float32, or a UserError naming the file."""
    try:
        volume = nib.load(str(path))
        data = np.asarray(volume.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types (ImageFileError, EOFError, zlib...)
        raise UserError(f"cannot read NIfTI {path.name}: {first_line(exc)}", str(path),
                        "pass a valid .nii or .nii.gz volume") from None
    return volume, data


def nifti_ndim(path: Path) -> int:
    """How many axes the NIfTI's header declares, trailing single ones dropped (no voxels read)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # noqa: BLE001 - as read_nifti
        raise UserError(f"cannot read NIfTI {path.name}: {first_line(exc)}", str(path),
                        "pass a valid .nii or .nii.gz volume") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return len(shape)


def read_modalities(case: CaseFiles) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A case's modality files -> (the first file's image, for its header; ``[C, X, Y, Z]`` float32).

    Raises:
        UserError: naming a file that cannot be read, is not 3-D, or is not on the first file's grid.
    """
    reference, channels = None, []
    for modality, path in case.files.items():
        image, data = read_nifti(path)
        data = data.reshape(data.shape[:3]) if data.ndim > 3 and data.size == np.prod(data.shape[:3]) else data
        if data.ndim != 3:
            raise UserError(f"{path.name} ({modality}) has shape {data.shape}: a modality file holds one 3-D "
                            "volume", str(path), "pass 3-D volumes, or one 4-D NIfTI with every modality")
        if reference is None:
            reference, first = image, path
        elif data.shape != channels[0].shape or not np.allclose(image.affine, reference.affine,
                                                                atol=AFFINE_TOLERANCE):
            raise UserError(f"{path.name} ({modality}) is not on the grid of {first.name} (shape {data.shape} vs "
                            f"{channels[0].shape}, or another affine)", str(path),
                            "resample the modalities of a case onto one grid")
        channels.append(data)
    return reference, np.stack(channels)


# -- writing ---------------------------------------------------------------------------------------------
def save_segmentation(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map as NIfTI (uint8) with the input scan's affine, so it overlays the scan.

    Args:
        label: ``[D, H, W]`` labels.
        affine: the scan's 4x4 voxel-to-world matrix (written as both qform and sform).
        path: the ``.nii.gz`` file to write; its folder is created.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(label.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def save_labels_like(label: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str | Path) -> Path:
    """Write a label map (uint8) with the spatial header of the scan it was computed from.

    The qform and sform are copied with their codes (scanner, aligned, ...), as are the spatial units and
    voxel sizes, so a viewer places the labels exactly where it places the scan; nibabel's defaults would
    otherwise write qform code 0, sform code 2 and unknown units whatever the scan said.

    Args:
        label: ``[X, Y, Z]`` labels on the reference's grid.
        reference: the input scan (any modality of the case, or the 4-D file).
        path: the ``.nii.gz`` file to write (its folder must exist).

    Returns:
        ``path``.
    """
    header = reference.header
    image = nib.Nifti1Image(label.astype(np.uint8), reference.affine)
    if hasattr(header, "get_qform"):  # NIfTI-1/2; an Analyze-like header has the affine only
        image.set_qform(header.get_qform(), code=int(header["qform_code"]))
        image.set_sform(header.get_sform(), code=int(header["sform_code"]))
        image.header.set_xyzt_units(*header.get_xyzt_units())
    image.header.set_zooms(header.get_zooms()[:3])
    nib.save(image, str(path))
    return Path(path)
