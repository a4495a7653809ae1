"""``deconvlab data check``: read a data set's splits once, before any training, and name every problem.

A file that cannot be used otherwise surfaces mid-epoch (CamVid reads its image/annotation pairs in
``__getitem__``) as a traceback in a trial. The check builds the data module exactly as training and
evaluation do, once per split (``data.split=train|val|test``), and reads every item of the split's
evaluation set: each item's failure is recorded with its file's name (or its index), and the rest goes
on. Per split it reports the item count, the input shapes, and for labelled data the histogram of labels
(pixels per class for masks, items per class for per-item labels).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deconvlab.build import build_datamodule
from deconvlab.config import compose_config
from deconvlab.console import progress
from deconvlab.errors import MissingDataError, UserError, first_line

SPLITS = ("train", "val", "test")
# A split the data set may simply not have: its absence is reported, not a problem.
OPTIONAL_SPLITS = {"test"}
INPUT_KEYS = ("input", "image")
LABEL_KEYS = ("mask", "label", "box_label", "target_label")
MAX_SHAPES = 3  # distinct input shapes listed per split (the rest are counted)


@dataclass
class SplitCheck:
    """What reading one split found.

    Attributes:
        split: train, val or test.
        items: items read without error.
        shapes: input shape -> count.
        labels: label value -> pixels (masks) or items (per-item labels); empty for unlabelled data.
        problems: one line per unusable item, file or split, naming it.
        absent: why an optional split is not there (None when it is).
    """

    split: str
    items: int = 0
    shapes: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    absent: str | None = None


def _item_name(dataset: Any, index: int) -> str:
    pairs = getattr(dataset, "pairs", None)  # folder data sets keep (image, annotation) paths
    if pairs is not None and index < len(pairs):
        return str(pairs[index][0])
    return f"item {index}"


def _tally(check: SplitCheck, item: Any) -> None:
    if not isinstance(item, dict):
        return
    tensor = next((item[k] for k in INPUT_KEYS if isinstance(item.get(k), torch.Tensor)), None)
    if tensor is not None:
        check.shapes[tuple(tensor.shape)] += 1
    for key in LABEL_KEYS:
        label = item.get(key)
        if isinstance(label, torch.Tensor) and not label.is_floating_point():
            values, counts = torch.unique(label, return_counts=True)
            check.labels.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
            break


def check_split(overrides: Sequence[str], split: str) -> SplitCheck:
    """Build the data module for ``split`` and read every item of it once."""
    check = SplitCheck(split)
    cfg = compose_config([*overrides, f"data.split={split}"])
    try:
        datamodule = build_datamodule(cfg.data, "validate", f"the {split} split")
    except MissingDataError as exc:
        if split in OPTIONAL_SPLITS:
            check.absent = exc.what
        else:
            check.problems.append(exc.one_line())
        return check
    except UserError as exc:  # present but unusable: a corrupt file found while preparing the split
        check.problems.append(exc.one_line())
        return check
    dataset = datamodule.eval_set
    for index in progress(range(len(dataset)), f"reading {len(dataset)} {split} items"):
        try:
            item = dataset[index]
        except Exception as exc:  # noqa: BLE001 - every item's failure is a finding, not a crash
            check.problems.append(f"{_item_name(dataset, index)}: {type(exc).__name__}: {first_line(exc, 300)}")
            continue
        check.items += 1
        _tally(check, item)
    if check.items == 0 and not check.problems:
        check.problems.append(f"the {split} split has no items")
    return check


def check_data(overrides: Sequence[str] = (), splits: Sequence[str] = SPLITS) -> list[SplitCheck]:
    """Check every split of the data set that ``overrides`` compose (``data=camvid data.root=...``)."""
    return [check_split(list(overrides), split) for split in splits]


def _shapes(shapes: Counter) -> str:
    shown = ", ".join(f"{'x'.join(map(str, shape))} ({count})" for shape, count in shapes.most_common(MAX_SHAPES))
    more = len(shapes) - MAX_SHAPES
    return shown + (f", and {more} more" if more > 0 else "")


def format_checks(checks: list[SplitCheck], data_name: str) -> list[str]:
    """One block per split: counts, shapes, the label histogram, then every problem."""
    lines = []
    for check in checks:
        if check.absent:
            lines.append(f"{check.split}: absent ({check.absent})")
            continue
        lines.append(f"{check.split}: {check.items} items, {len(check.problems)} problems; "
                     f"inputs {_shapes(check.shapes)}")
        if check.labels:
            total = sum(check.labels.values())
            histogram = "  ".join(f"{label}: {count / total:.1%}" for label, count in sorted(check.labels.items()))
            lines.append(f"  labels ({total} counted): {histogram}")
        lines += [f"  problem: {problem}" for problem in check.problems]
    problems = sum(len(c.problems) for c in checks)
    lines.append(f"data {data_name}: {'no problems' if not problems else f'{problems} problems'}")
    return lines
