"""Writing a whole-volume label map as NIfTI, so it overlays the scan it was computed from.

Apart from :mod:`deconvlab.volume.report` so that nibabel (~30 ms on top of torch, ``python -X importtime``)
is imported only by who writes a file, not by every training start that imports the report.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


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
