"""Speed switches from the ``perf`` config group: channels-last memory format and ``torch.compile``.

Numeric precision is Lightning's own ``trainer.precision`` (``32-true``, ``bf16-mixed``, ``16-mixed``).
Both switches change how the model runs, never what it computes (up to floating-point rounding), and
neither changes a checkpoint: parameter names and shapes stay the same, so checkpoints load into a
model built with the switches off. README "Performance switches" says when each helps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deconvlab.errors import UserError

# Memory format per tensor rank: NHWC for 2-D feature maps, NDHWC for 3-D ones.
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-D (or 5-D) floating tensor in channels-last layout; any other tensor unchanged."""
    memory_format = CHANNELS_LAST.get(tensor.dim())
    if memory_format is None or not tensor.is_floating_point():
        return tensor
    return tensor.contiguous(memory_format=memory_format)


def model_to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D / 5-D parameter and buffer channels-last, in place (before the optimiser exists).

    ``Module.to(memory_format=...)`` takes one format for all ranks and fails on a model with both
    2-D and 3-D convolutions; this picks the format per tensor.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = to_channels_last(param.data)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    setattr(module, name, to_channels_last(buffer))
    return model


def check_compiler() -> None:
    """Raise a UserError unless torch.compile's code generator finds a C++ compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler, or RuntimeError
        raise UserError(f"torch.compile needs a C++ compiler, and none was found ({error})", "perf.compile",
                        "install one (apt-get install g++, or set CXX) or set perf.compile=false") from error


def apply_perf(task: Any, perf: dict[str, Any] | None) -> None:
    """Apply the ``perf`` switches to a task's model (in place), before training starts.

    Args:
        task: a :class:`deconvlab.tasks.base.BaseTask`; its ``model`` is converted and/or compiled and
            its ``channels_last`` flag makes it convert each batch to the same layout.
        perf: ``{"channels_last": bool, "compile": bool, "compile_mode": str | None,
            "compile_backend": str}``; None or missing keys leave the model as it is.

    Raises:
        UserError: ``compile`` is on with the inductor backend and no C++ compiler is available.
    """
    perf = perf or {}
    if perf.get("channels_last"):
        model_to_channels_last(task.model)
        task.channels_last = True
    if perf.get("compile"):
        backend = perf.get("compile_backend") or "inductor"
        if backend == "inductor":
            check_compiler()
        # Module.compile() compiles in place: state_dict keys keep their names (torch.compile(model) would
        # wrap it and prefix every key with "_orig_mod."), so checkpoints stay loadable either way.
        task.model.compile(backend=backend, mode=perf.get("compile_mode"))
