"""Issue 21: Havaei's two-phase training and cascades on TwoPathCNN, and DeepMedic of the paper's shape
(residual connections, training on segments)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from deconvlab.build import build_task
from deconvlab.data.brats import BratsDataModule
from deconvlab.models.mri import Pathway, SegmentDeepMedic, TwoPathCascade, TwoPathCNN
from deconvlab.train import train


class Snapshot(pl.Callback):
    """The task's parameters and buffers at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, module):
        self.states.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})


def test_two_phase_training_changes_only_the_output_layer_on_the_true_label_distribution(compose, tmp_path):
    cfg = compose("experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20", "data.phantom_cases=2",
                  "data.samples_per_epoch=64", "data.eval_samples=16", "data.batch_size=16",
                  "task.volume_eval=never", "task.two_phase_epochs=1", f"paths.output_dir={tmp_path}")
    pl.seed_everything(0, verbose=False)
    data, task, snapshot = instantiate(cfg.data), build_task(cfg), Snapshot()
    pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=1, callbacks=[snapshot]).fit(task, datamodule=data)
    first_phase_end, second_phase_end = snapshot.states[1], snapshot.states[2]
    changed = {k for k, v in second_phase_end.items() if not torch.equal(v, first_phase_end[k])}
    assert changed == {"fuse.6.weight", "fuse.6.bias"}  # the output layer; BatchNorm statistics stay too
    assert {k for k, v in first_phase_end.items() if not torch.equal(v, snapshot.states[0][k])} > changed
    # Phase 2 drew its patches from the true distribution (mostly background), phase 1 class-balanced ones.
    sampling = json.loads((tmp_path / "patch_plan.json").read_text())["sampling"]
    assert sampling["natural_from_epoch"] == 2
    train_set = data.train_set
    background = [np.mean([train_set.cases[c].label[z, y, x] == 0 for c, z, y, x in train_set.centres_of(e)])
                  for e in (1, 2)]
    assert background[0] < 0.7 < background[1]


def test_two_phase_training_needs_a_first_phase(compose):
    from deconvlab.errors import UserError

    cfg = compose("experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20", "data.phantom_cases=1",
                  "data.samples_per_epoch=16", "data.eval_samples=16", "task.two_phase_epochs=1")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserError, match="task.two_phase_epochs=1 leaves no first phase"):
        trainer.fit(build_task(cfg), datamodule=instantiate(cfg.data))


@pytest.mark.parametrize("join, side, first_voxel, shape", [
    ("input", 65, 0, (33, 33)),   # probabilities over the second net's whole 33^2 patch
    ("local", 57, 4, (24, 24)),   # over the local pathway's first-block maps (left-of-centre voxel)
    ("output", 53, 6, (21, 21)),  # over the classifier's 21^2 input maps
])
def test_twopath_cascade_joins_the_first_nets_per_voxel_probabilities(join, side, first_voxel, shape):
    """An independent composition: the first TwoPathCNN classifies each voxel the second net needs with
    its own 33^2 patch; those probabilities join the second net where Havaei's cascade says."""
    torch.manual_seed(0)
    cascade = TwoPathCascade(2, 5, join, first_local_width=2, first_global_width=3, local_width=3,
                             global_width=4).eval()
    assert cascade.patch_size == side
    x = torch.randn(1, 2, side, side)
    second_start = side // 2 - 16  # the second net's 33^2 patch around the centre
    second_patch = x[:, :, second_start:second_start + 33, second_start:second_start + 33]
    with torch.no_grad():
        rows = []
        for i in range(shape[0]):
            y0 = second_start + first_voxel + i - 16
            patches = torch.cat([x[:, :, y0:y0 + 33, x0:x0 + 33]
                                 for x0 in range(second_start + first_voxel - 16,
                                                 second_start + first_voxel - 16 + shape[1])])
            rows.append(torch.softmax(cascade.first(patches), 1).T)  # [K, W]
        probabilities = torch.stack(rows, 1)[None]  # [1, K, H, W]
        second = cascade.second
        if join == "input":
            expected = second(torch.cat([second_patch, probabilities], 1))
        else:
            local = second.local[:3](second_patch)
            if join == "local":
                local = torch.cat([local, probabilities], 1)
            features = torch.cat([second.local[3:](local), second.global_(second_patch)], 1)
            if join == "output":
                features = torch.cat([features, probabilities], 1)
            expected = second.classifier(features).flatten(1)
        torch.testing.assert_close(cascade(x), expected, atol=1e-5, rtol=1e-5)
    assert cascade.output_layers() == [second.classifier]


def test_residual_connections_add_the_output_of_the_layer_two_before():
    torch.manual_seed(0)
    pathway = Pathway(2, [3, 3, 4, 4], residual_at=[3, 4]).eval()
    x = torch.randn(1, 2, 11, 11, 11)
    with torch.no_grad():
        out1 = pathway[0](x)
        out2 = pathway[1](out1)
        out3 = pathway[2](out2) + F.pad(out1[:, :, 2:-2, 2:-2, 2:-2], [0] * 6 + [0, 1])  # 3 -> 4 channels
        out4 = pathway[3](out3) + F.pad(out2[:, :, 2:-2, 2:-2, 2:-2], [0] * 6 + [0, 1])
        torch.testing.assert_close(pathway(x), out4)
    with pytest.raises(ValueError, match="narrower"):
        Pathway(2, [8, 8, 4], residual_at=[3])


def test_segment_deepmedic_labels_a_block_per_forward_and_trains_on_segments(compose):
    cfg = compose("experiment=deepmedic_v2_phantom", "logger=none", "data.phantom_size=20",
                  "data.phantom_cases=1", "data.samples_per_epoch=32", "data.eval_samples=16",
                  "data.batch_size=8", "task.volume_eval=never", "trainer.max_epochs=1")
    data: BratsDataModule = instantiate(cfg.data)
    data.setup("fit")
    net = instantiate(cfg.model)
    assert (net.segment, net.patch_size) == (3, 27) and data.geometry.side == 29
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 2, 29, 29, 29) and batch["label"].shape == (8, 3, 3, 3)
    # Each block is the label volume around its centre (zero outside the volume).
    case, *centre = data.train_set.centres_of(0)[0]
    label = np.pad(data.train_set.cases[case].label, 1)
    np.testing.assert_array_equal(batch["label"][0].numpy(),
                                  label[tuple(slice(c, c + 3) for c in centre)])
    assert net(batch["image"]).shape == (8, 5, 3, 3, 3)
    assert net(batch["image"][:, :, 1:-1, 1:-1, 1:-1]).shape == (8, 5)  # a plain patch: its centre voxel
    result = train(cfg)
    assert np.isfinite(result.metrics["val/dice_mean"])
    plan = json.loads((Path(cfg.paths.output_dir) / "patch_plan.json").read_text())
    assert plan["sampling"]["labelled_voxels_per_sample"] == 27


def test_the_paper_shaped_deepmedic_has_the_papers_shape():
    net = SegmentDeepMedic()
    widths = [block[0].out_channels for block in net.net.normal]
    assert widths == [30, 30, 40, 40, 40, 40, 50, 50] and net.net.normal.residual_at == (4, 6, 8)
    assert net.net.context_factor == 3 and net.net.fuse[0].out_channels == 150
    assert (net.net.patch_size, net.patch_size, net.segment) == (17, 51, 9)
    assert isinstance(TwoPathCNN().classifier, torch.nn.Conv2d)
