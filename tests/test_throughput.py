"""The hot training loop stays cheap: logging is not synced every step, NIfTI cases are decoded once,
loaders batch and cache without changing the data, and the perf switches take effect."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, write_phantom_case
from deconvlab.data import brats, shapes
from deconvlab.data.base import uses_gpu
from deconvlab.data.brats import BratsDataModule
from deconvlab.data.mnist import MNISTDataModule
from deconvlab.data.shapes import ShapesDataModule

STEPS = 14  # 14 steps (under one quickstart epoch), more than one logging interval


class LightningItemCounter(pl.Callback):
    """Counts ``Tensor.item()`` calls made by Lightning (not the optimiser) during each training step.

    A step's count covers its ``on_train_batch_start`` to the next one, so it includes the logging
    Lightning does after ``on_train_batch_end``. ``.item()`` waits for the device: one per step is a
    sync per step on a GPU.
    """

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._counting = False

    def count(self) -> None:
        if not self._counting:
            return
        frame = sys._getframe(2)
        while frame is not None:
            if "torch/optim/" in frame.f_code.co_filename:
                return  # Adam reads its CPU step counters: no device sync, and a plain loop does it too
            if "pytorch_lightning" in frame.f_code.co_filename:
                self.per_step[-1] += 1
                return
            frame = frame.f_back

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.per_step.append(0)
        self._counting = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._counting = False


def train_quickstart(tmp: Path, tracked: bool, counter: LightningItemCounter | None = None):
    """One epoch of a narrow quickstart at the default logging interval (``.item()`` calls counted)."""
    from deconvlab.config import compose_config
    from deconvlab.train import train

    original_item = torch.Tensor.item

    def counting_item(self: torch.Tensor):  # noqa: ANN202
        if counter is not None:
            counter.count()
        return original_item(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp / "artifacts"))
        mp.setenv("DECONVLAB_OUTPUT_ROOT", str(tmp / "outputs"))
        mp.setattr(torch.Tensor, "item", counting_item)
        cfg = compose_config(["experiment=quickstart", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                              f"trainer.limit_train_batches={STEPS}", "trainer.limit_val_batches=1",
                              "trainer.enable_progress_bar=false", "model.width=8", "model.depth=2",
                              "data.max_eval_size=32", f"logger.enabled={str(tracked).lower()}"])
        return cfg, train(cfg, callbacks=[counter] if counter else [])


def test_default_trainer_logs_every_few_steps():
    config = yaml.safe_load((REPO_ROOT / "conf" / "trainer" / "default.yaml").read_text())
    assert config["log_every_n_steps"] > 1


@pytest.mark.slow  # ~8 s, nearly all of it creating the SQLite store (MLflow's schema migrations)
def test_step_loss_reaches_mlflow_only_every_log_interval(tmp_path):
    cfg, result = train_quickstart(tmp_path, tracked=True)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result.run_id,
                                                                                    "train/loss_step")
    every = cfg.trainer.log_every_n_steps
    assert every == 10  # the default config, not a test override
    # Lightning logs on the steps whose 1-based index is a multiple of the interval.
    assert sorted(m.step for m in history) == [s - 1 for s in range(every, STEPS + 1, every)]


def test_training_steps_do_not_sync_for_logging(tmp_path):
    counter = LightningItemCounter()
    train_quickstart(tmp_path, tracked=False, counter=counter)
    assert len(counter.per_step) == STEPS
    syncing_steps = sum(1 for n in counter.per_step if n)
    # Only the steps that write to the loggers may read values back from the device.
    assert syncing_steps <= STEPS // 10 + 1, counter.per_step


def test_epoch_loss_is_the_sample_weighted_mean_of_the_step_losses(compose):
    from deconvlab.train import train

    losses: list[tuple[float, int]] = []

    class StepLosses(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            losses.clear()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            losses.append((float(outputs["loss"]), len(batch["label"])))

    # 100 digits in batches of 32: the last batch (4) must weigh less than the others.
    result = train(compose("experiment=autoencoder_fc", "data.max_samples=100", "data.batch_size=32",
                           "trainer.limit_train_batches=null", "logger.enabled=false"), callbacks=[StepLosses()])
    assert [n for _, n in losses] == [32, 32, 32, 4]
    expected = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert result.metrics["train/loss_epoch"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["train/loss"] == result.metrics["train/loss_epoch"]


def write_case(folder: Path, seed: int, size: int = 16) -> None:
    write_phantom_case(folder, seed, size)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_brats_decodes_each_case_once_not_per_patch(tmp_path, monkeypatch, num_workers):
    for split, seeds in (("train", (0, 1)), ("validation", (2,))):
        for seed in seeds:
            write_case(tmp_path / "data" / split / f"case{seed}", seed)
    # A file, not a list: DataLoader workers are forked processes and would count in their own copy.
    log = tmp_path / "loads.txt"
    original_load = nib.load

    def counting_load(path, *args, **kwargs):  # noqa: ANN001, ANN202
        with log.open("a") as f:
            f.write(f"{path}\n")
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    monkeypatch.setattr(brats, "_CASE_CACHE", {})
    datamodule = BratsDataModule(root=str(tmp_path / "data"), samples_per_epoch=512, eval_samples=256,
                                 batch_size=64, num_workers=num_workers, phantom_size=16)
    datamodule.setup("fit")
    patches = 0
    for _ in range(2):  # two epochs
        for batch in datamodule.train_dataloader():
            patches += len(batch["label"])
    for batch in datamodule.val_dataloader():
        patches += len(batch["label"])
    loads = log.read_text().split()
    assert patches == 2 * 512 + 256
    # 3 cases x (2 modalities + label + brain mask), each decoded exactly once.
    assert len(loads) == 3 * 4 and len(set(loads)) == 3 * 4
    BratsDataModule(root=str(tmp_path / "data"), num_workers=num_workers).setup("fit")
    assert len(log.read_text().split()) == 3 * 4  # a second data module reuses the process cache


# -- data loaders: batched indexing, caching, determinism, pinning -------------------------------------------

def _batches(loader) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    return [dict(batch) for batch in loader]


def _same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(first, second, strict=True))


def test_mnist_batched_loader_gives_the_per_sample_batches_and_is_seeded():
    datamodule = MNISTDataModule(batch_size=48, max_samples=300, seed=3)
    datamodule.setup("fit")
    batched = _batches(datamodule.train_dataloader())
    datamodule.batched_indexing = False  # the per-sample path: DataLoader's own sampling and collation
    per_sample = _batches(datamodule.train_dataloader())
    assert _same_batches(batched, per_sample)
    assert [len(b["label"]) for b in batched] == [48] * 6 + [12]  # max_samples=300 digits, last batch short
    assert batched[0]["image"].shape == (48, 1, 28, 28) and batched[0]["image"].dtype == torch.float32
    # The same seed gives the same shuffled batches in a new data module; another seed does not.
    again = MNISTDataModule(batch_size=48, max_samples=300, seed=3)
    again.setup("fit")
    assert _same_batches(_batches(again.train_dataloader()), batched)
    other = MNISTDataModule(batch_size=48, max_samples=300, seed=4)
    other.setup("fit")
    assert not _same_batches(_batches(other.train_dataloader()), batched)
    # Evaluation batches keep the data set's order.
    labels = torch.cat([b["label"] for b in datamodule.val_dataloader()])
    assert torch.equal(labels, datamodule.eval_set.labels)
    # One sample, whatever kind of integer indexes it, is one [1, 28, 28] digit.
    for index in (5, np.int64(5), torch.tensor(5)):
        sample = datamodule.eval_set[index]
        assert sample["image"].shape == (1, 28, 28) and sample["label"] == datamodule.eval_set.labels[5]


def test_shapes_are_drawn_once_then_served_from_memory(monkeypatch):
    calls = []
    original = shapes.make_shapes_sample

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(shapes, "make_shapes_sample", counting)
    datamodule = ShapesDataModule(num_train=24, num_val=8, batch_size=8, height=32, width=32, seed=5)
    datamodule.setup("fit")
    calls.clear()  # the data sets draw sample 0 once to validate their config
    loader = datamodule.train_dataloader()  # one loader for the run, iterated once per epoch
    first_epoch = _batches(loader)
    assert sorted(calls) == list(range(24))
    second_epoch = _batches(loader)
    assert len(calls) == 24  # nothing drawn again
    # Served from the cache, a sample equals a fresh drawing of the same (seed, split, index).
    fresh = original(5, "train", 7, datamodule.config)
    cached = datamodule.train_set[7]
    assert torch.equal(cached["image"], torch.from_numpy(fresh.image).permute(2, 0, 1))
    assert torch.equal(cached["mask"], torch.from_numpy(fresh.mask).long())
    # Reshuffled each epoch, same samples; the same seed gives the same batches again.
    assert not _same_batches(first_epoch, second_epoch)
    again = ShapesDataModule(num_train=24, num_val=8, batch_size=8, height=32, width=32, seed=5)
    again.setup("fit")
    assert _same_batches(_batches(again.train_dataloader()), first_epoch)


def test_shapes_cache_respects_its_memory_budget(monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_CACHE_BYTES", 3 * (32 * 32 * 3 * 4 + 32 * 32))  # room for 3 samples
    dataset = ShapesDataModule(num_train=6, height=32, width=32)
    dataset.setup("fit")
    for index in range(6):
        dataset.train_set[index]
    assert sorted(dataset.train_set._cache) == [0, 1, 2]


def test_batches_are_pinned_only_for_a_gpu_trainer():
    from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator

    class FakeTrainer:  # uses_gpu only reads the accelerator
        def __init__(self, accelerator) -> None:  # noqa: ANN001
            self.accelerator = accelerator

    assert not uses_gpu(None)
    assert not uses_gpu(FakeTrainer(CPUAccelerator()))
    assert uses_gpu(FakeTrainer(CUDAAccelerator()))
    datamodule = MNISTDataModule(max_samples=100)
    datamodule.setup("fit")
    assert datamodule.train_dataloader().pin_memory is False  # no trainer attached: nothing to copy to


@pytest.mark.parametrize("module", ["shapes", "mnist"])
def test_loader_workers_persist_and_keep_the_batches(module):
    """num_workers=1 (persistent) is reproducible by the seed and starts from in-process loading's batches.

    Later epochs differ from in-process loading's (a persistent loader draws fewer numbers from the
    shuffling generator per epoch), but not between runs with the same seed and worker count.
    """
    def build(workers: int):  # noqa: ANN202
        if module == "shapes":
            dm = ShapesDataModule(num_train=16, batch_size=8, height=32, width=32, num_workers=workers, seed=2)
        else:
            dm = MNISTDataModule(max_samples=100, batch_size=30, num_workers=workers, seed=2)
        dm.setup("fit")
        return dm.train_dataloader()

    with_worker, again = build(1), build(1)
    assert with_worker.persistent_workers
    run, rerun = [_batches(with_worker) for _ in range(2)], [_batches(again) for _ in range(2)]
    assert _same_batches(run[0], _batches(build(0)))
    assert _same_batches(run[0], rerun[0]) and _same_batches(run[1], rerun[1])
    assert not _same_batches(run[0], run[1])  # still reshuffled every epoch


# -- perf switches: channels-last, torch.compile, precision --------------------------------------------------

class FirstModelInput(pl.Callback):
    """Keeps the first tensor the model is called with in training."""

    seen: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        def keep(module, inputs) -> None:  # noqa: ANN001
            if self.seen is None:
                self.seen = inputs[0]

        pl_module.model.register_forward_pre_hook(keep)


SMALL_SEGMENTATION = ["experiment=fcn8s_shapes", "model.width=0.0625", "model.fc_channels=256", "data.height=32",
                      "data.width=32", "data.num_val=8", "logger.enabled=false"]
SMALL_VOLUMETRIC = ["experiment=phantom_tinyvol", "data.volume_size=16", "data.patch_size=8", "logger.enabled=false"]


@pytest.mark.parametrize(("overrides", "memory_format"), [(SMALL_SEGMENTATION, torch.channels_last),
                                                          (SMALL_VOLUMETRIC, torch.channels_last_3d)],
                         ids=["2d", "3d"])
def test_channels_last_reaches_weights_and_batches_and_keeps_results(compose, overrides, memory_format):
    from deconvlab.build import build_task
    from deconvlab.perf import apply_perf
    from deconvlab.train import train

    first = FirstModelInput()
    cfg = compose(*overrides, "perf.channels_last=true")
    result = train(cfg, callbacks=[first])
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    conv_weights = [v for k, v in state.items() if v.dim() >= 4 and v.shape[1] > 1 and v.shape[2] > 1]
    assert conv_weights and all(w.is_contiguous(memory_format=memory_format) for w in conv_weights)
    assert not any(w.is_contiguous() for w in conv_weights)  # really NHWC/NDHWC, not the default layout
    image = first.seen
    assert image.is_contiguous(memory_format=memory_format) and not image.is_contiguous()
    # The checkpoint loads into a model built without the switch, and computes the same outputs.
    plain = build_task(compose(*overrides))
    plain.load_state_dict(state)
    fast = build_task(cfg)
    apply_perf(fast, cfg.perf)
    fast.load_state_dict(state)
    plain.eval(), fast.eval()
    x = image.contiguous()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=memory_format)), plain(x), rtol=1e-4, atol=1e-5)


def test_compile_without_a_compiler_is_a_user_error(compose, monkeypatch):
    from torch._inductor import cpp_builder

    from deconvlab.errors import UserError
    from deconvlab.train import train

    def no_compiler() -> str:
        raise RuntimeError("Failed to find a working C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(UserError, match=r"perf\.compile"):
        train(compose("experiment=quickstart", "model.width=4", "model.depth=2", "perf.compile=true"))


@pytest.mark.slow  # aot_eager ~5-11 s (dynamo tracing); inductor ~40 s idle, ~100 s under load (its g++ builds)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_switch_trains_through_the_compiled_model(compose, backend):
    """aot_eager traces forward and backward as inductor does, without generating and building C++."""
    import torch._dynamo

    from deconvlab.build import build_task
    from deconvlab.train import train

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # One input shape for training and one for validation (eval images cropped to the patch size), so
    # compilation happens twice, not once per validation image size.
    overrides = ["experiment=quickstart", "model.width=4", "model.depth=2", "data.patch_size=16",
                 "data.max_eval_size=16", "data.samples_per_epoch=32", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger.enabled=false"]
    result = train(compose(*overrides, "perf.compile=true", f"perf.compile_backend={backend}"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model
    assert torch._dynamo.utils.counters["aot_autograd"]["total"] >= 1  # ... and its backward
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # compiled in place: checkpoint names unchanged
    plain = build_task(compose(*overrides))
    plain.load_state_dict(state)
    assert math.isfinite(result.metrics["val/psnr"])


def test_bf16_mixed_precision_trains_on_cpu(compose):
    from deconvlab.train import train

    conv_output_dtypes: set[torch.dtype] = set()

    class ConvDtypes(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            conv = next(m for m in pl_module.model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.register_forward_hook(lambda module, inputs, output: conv_output_dtypes.add(output.dtype))

    overrides = ["experiment=quickstart", "model.width=8", "model.depth=2", "data.max_eval_size=32",
                 "logger.enabled=false", "trainer.precision=bf16-mixed"]
    result = train(compose(*overrides), callbacks=[ConvDtypes()])
    assert conv_output_dtypes == {torch.bfloat16}  # convolutions ran in bf16 (training and validation)
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # fp32 master weights
    assert math.isfinite(result.metrics["val/loss"]) and math.isfinite(result.metrics["train/loss_epoch"])
