"""benchmarks/gpu_check.py: the prepared GPU check runs its CPU fallbacks where there is no GPU."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_unknown_rows_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        _gpu_check().main(["--rows", "mri,warp"])
    assert exit_.value.code == 2 and "unknown rows ['warp']" in capsys.readouterr().err


def test_a_failing_check_is_a_row_with_its_error_and_a_gpu_only_one_says_why(monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "gpu", lambda: False)

    def broken() -> str:
        raise RuntimeError("CUDA error: no kernel image is available\nmore")

    row = gpu_check.run_row("broken", broken)
    assert row.status == "error" and row.result == "RuntimeError: CUDA error: no kernel image is available"
    skipped = gpu_check.run_row("fp16", lambda: gpu_check.precision_row("quickstart", "16-mixed", 1))
    assert skipped.status == "skipped" and "a CUDA path" in skipped.result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_fallback_of_the_dense_mri_row(capsys):
    environment = dict(os.environ)
    assert _gpu_check().main(["--rows", "mri"]) == 0
    # In-process, its temporary output root must not outlive it (it broke a later test's multirun once).
    assert dict(os.environ) == environment
    out = capsys.readouterr().out
    assert out.startswith("no GPU") and "1 checks, 0 failed" in out
    assert re.search(r"dense MRI GPU vs CPU +ok .* voxels/s \(no GPU: the CPU side only\)", out)


@pytest.mark.benchmark
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_fallback_of_every_row():
    # The sweep at cpu 0.5, quickstart and FCN-8s at each precision, compile, a 1-worker Ray Train trial, MRI.
    result = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "1"], capture_output=True, text=True,
                            timeout=1200, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout.strip().splitlines()[-1]
