"""Reconstruction (autoencoders): the image in, the same image out through a bottleneck."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection

from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8


def per_image(loss_fn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]``: an elementwise loss averaged over each image's channels and pixels."""
    return loss_fn(output.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def _bce(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Clamped: a reconstruction of exactly 0 or 1 must not produce an infinite BCE.
    return F.binary_cross_entropy(output.clamp(1e-6, 1 - 1e-6), target, reduction=reduction)


MAX_SCATTER_POINTS = 2000


def _code_size(model: torch.nn.Module) -> int | None:
    """The code size of an autoencoder (its ``code_size`` attribute and an ``encode`` method); None otherwise."""
    size = getattr(model, "code_size", None)
    return int(size) if size is not None and hasattr(model, "encode") else None


def code_scatter(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 2-D code scatter coloured by digit class, as an H x W x 3 uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    points = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=4, vmin=0, vmax=9)
    fig.colorbar(points, ax=ax, label="digit")
    ax.set_xlabel("code[0]")
    ax.set_ylabel("code[1]")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def spread_over_classes(labels: list[int], wanted: int) -> list[int]:
    """Positions of up to ``wanted`` items covering as many classes as there are: the first item of each
    class in order of appearance, then (fewer classes than ``wanted``) the earliest items not yet taken.

    Args:
        labels: the class of every item, in validation order.
        wanted: how many positions to return at most.

    Returns:
        The positions, the first of each class first, sorted by class.
    """
    first: dict[int, int] = {}
    for position, label in enumerate(labels):
        first.setdefault(label, position)
    picked = [first[label] for label in sorted(first)][:wanted]
    taken = set(picked)
    return picked + [i for i in range(len(labels)) if i not in taken][: wanted - len(picked)]


class ReconstructionTask(BaseTask):
    """Trains an autoencoder; reports MSE and BCE on validation.

    ``val/mse`` and ``val/bce`` are per-image means: each image's loss averaged over its pixels, then the
    mean over the split's images (equal to the per-pixel mean when, as for MNIST, all images have one size).

    Args:
        loss: "mse" or "bce" (both on reconstructions in [0, 1]).
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "reconstruction"

    def __init__(self, *args, loss: str = "mse", **kwargs) -> None:
        if loss not in ("mse", "bce"):
            raise ValueError(f"unknown reconstruction loss {loss!r}; choose 'mse' or 'bce'")
        self.loss_name = loss
        kwargs.setdefault("monitor", "val/mse")
        kwargs.setdefault("monitor_mode", "min")
        super().__init__(*args, **kwargs)
        self.code_size = _code_size(self.model)
        self._codes: list[torch.Tensor] = []
        self._code_labels: list[torch.Tensor] = []
        # Sample candidates of this validation epoch: (label, image, reconstruction) on the CPU.
        self._candidates: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.sample_labels: list[int] = []  # the classes of the last rendered samples, in grid order

    def build_metrics(self) -> MetricCollection:
        # Fed one by one (update_metrics): compute groups would merge the two means' identical states.
        return MetricCollection({"mse": MeanMetric(), "bce": MeanMetric()}, compute_groups=False)

    def item_aggregates(self) -> dict[str, str]:
        return {"val/mse": "mean", "val/bce": "mean"}

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    target_of = input_of

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["image"])
        loss_fn = F.mse_loss if self.loss_name == "mse" else _bce
        return loss_fn(output, batch["image"]), output

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        values = {"mse": per_image(F.mse_loss, output, batch["image"]), "bce": per_image(_bce, output, batch["image"])}
        for name, per_item in values.items():
            self.val_metrics[name].update(per_item)
        self.record(batch, {f"val/{name}": v for name, v in values.items()})
        if self._wants_code_scatter() and sum(len(c) for c in self._codes) < MAX_SCATTER_POINTS:
            with torch.no_grad():
                self._codes.append(self.model.encode(batch["image"]).float().cpu())
            self._code_labels.append(batch.get("label", torch.zeros(len(batch["image"]))).cpu())

    def _wants_code_scatter(self) -> bool:
        # Only a 2-D code can be drawn as it is; larger codes would need a projection that distorts them.
        return self.code_size == 2 and self._wants_samples()

    def _collect_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor, batch_idx: int) -> None:
        """Keep candidates for a sample grid that spans the classes (rendered at the end of the epoch).

        The base class shows the first ``num_samples`` validation images, but MNIST's validation split is
        sorted by class: those would all be zeros. Kept instead: the first image of every class met, plus the
        first ``num_samples`` images as a fallback for a split with fewer classes (at most 10 + 8 digits).
        Batches without labels keep the base class's behaviour.
        """
        if "label" not in batch:
            super()._collect_samples(batch, output, batch_idx)
            return
        if batch_idx == 0:
            self.rendered_samples, self._candidates = {}, []
        if not self._wants_samples():
            return
        seen = {label for label, _, _ in self._candidates}
        for i, label in enumerate(batch["label"].tolist()):
            if label not in seen or len(self._candidates) < self.num_samples:
                seen.add(label)
                self._candidates.append((label, batch["image"][i].detach().cpu(), output[i].detach().float().cpu()))

    def _render_spread_samples(self) -> None:
        """The sample grid of :func:`spread_over_classes` over this epoch's candidates."""
        labels = [label for label, _, _ in self._candidates]
        chosen = [self._candidates[i] for i in spread_over_classes(labels, self.num_samples)]
        self._candidates = []
        if not chosen:
            return
        self.sample_labels = [label for label, _, _ in chosen]
        batch = {"image": torch.stack([image for _, image, _ in chosen])}
        for name, image in self.render_samples(batch, torch.stack([out for _, _, out in chosen])).items():
            self.rendered_samples[name] = image

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._render_spread_samples()
        if self._codes:
            codes, labels = torch.cat(self._codes).numpy(), torch.cat(self._code_labels).numpy()
            self.rendered_samples["code_scatter"] = code_scatter(codes, labels)
        self._codes, self._code_labels = [], []

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """One grid: originals on the top row, reconstructions below."""
        top = side_by_side(*(to_uint8(x) for x in batch["image"]))
        bottom = side_by_side(*(to_uint8(x) for x in output))
        return {"reconstructions": np.concatenate([top, np.full_like(top[:2], 255), bottom], axis=0)}
