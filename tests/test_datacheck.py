"""``deconvlab data check``: every split read once before training, every problem named with its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from deconvlab.cli import main
from deconvlab.data.shapes import ShapesConfig, write_shapes_folder
from deconvlab.datacheck import check_data

SIZE = ShapesConfig(36, 44)


@pytest.fixture
def camvid_like(tmp_path: Path) -> Path:
    return write_shapes_folder(tmp_path / "camvid_like", {"train": 4, "val": 3}, seed=5, config=SIZE)


def _overrides(root: Path) -> list[str]:
    return ["data=camvid", f"data.root={root}", "data.num_classes=4", "data.image_size=null"]


def test_a_clean_folder_reports_counts_shapes_and_a_label_histogram(camvid_like, capsys):
    checks = {c.split: c for c in check_data(_overrides(camvid_like))}
    assert (checks["train"].items, checks["val"].items) == (4, 3)
    assert checks["test"].absent and not checks["test"].problems
    assert set(checks["train"].shapes) == {(3, 36, 44)}
    assert sum(checks["val"].labels.values()) == 3 * 36 * 44 and set(checks["val"].labels) <= {0, 1, 2, 3}
    assert main(["data", "check", *_overrides(camvid_like)]) == 0
    out = capsys.readouterr().out
    assert "train: 4 items, 0 problems" in out and out.strip().endswith("no problems")


def test_every_broken_file_is_named_and_the_rest_still_read(camvid_like, capsys):
    broken = sorted((camvid_like / "train").iterdir())[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:40])  # truncated: the header survives, the pixels do not
    checks = {c.split: c for c in check_data(_overrides(camvid_like))}
    assert checks["train"].items == 2 and len(checks["train"].problems) == 2
    assert [p.split(":")[0] for p in checks["train"].problems] == [str(p) for p in broken]
    assert checks["val"].items == 3 and not checks["val"].problems
    assert main(["data", "check", *_overrides(camvid_like)]) == 2
    assert "2 problems" in capsys.readouterr().out


def test_a_missing_split_is_a_problem_unless_it_is_the_test_split(tmp_path, capsys):
    root = write_shapes_folder(tmp_path / "only_train", {"train": 2}, seed=1, config=SIZE)
    checks = {c.split: c for c in check_data(_overrides(root))}
    assert checks["train"].items == 2 and checks["val"].problems and "val" in checks["val"].problems[0]
    assert checks["test"].absent


class _Terminal:
    """A stand-in for an interactive stderr."""

    def __init__(self) -> None:
        self.text = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_shows_on_a_terminal_and_not_under_quiet(monkeypatch):
    import sys

    from deconvlab.console import progress, set_progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(3), "decoding 3 cases")) == [0, 1, 2]
    assert "decoding 3 cases" in "".join(terminal.text)
    terminal.text.clear()
    set_progress(False)
    try:
        assert list(progress(range(3), "decoding 3 cases")) == [0, 1, 2]
    finally:
        set_progress(True)
    assert terminal.text == []


def test_an_unknown_data_set_is_one_line(capsys):
    assert main(["data", "check", "data=camvd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'camvid'" in err[0]
