"""How a segmentation net leaves its start: training loss against the constant predictor's, val mIoU.

Trains the model of an experiment (default ``deconvnet_shapes``) with Adam in a plain loop, no schedule, and
every ``--every`` steps prints the mean training loss of those steps, the loss of the best constant
predictor (the entropy of the training pixels' class frequencies: what "all background" costs) and the
val mIoU (present-class mean, as ``val/miou``) and pixel accuracy with BatchNorm in eval and in train mode
(a gap between them would point at BatchNorm's running statistics).

    python benchmarks/deconvnet_start.py [--steps 960] [--lr 1e-3] [--start prior|default] [OVERRIDE ...]

``--start prior`` starts the classifier at the class frequencies (``init_class_prior``, what
``task.class_prior_init`` does before fitting); ``default`` keeps PyTorch's start. Needs no data files.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from deconvlab.build import build_task
from deconvlab.config import compose_config
from deconvlab.tasks.segmentation import class_frequencies, class_scores, confusion_counts


@torch.no_grad()
def val_scores(model: torch.nn.Module, loader, num_classes: int, train_mode: bool) -> tuple[float, float]:
    """(mIoU over the classes present, pixel accuracy) on ``loader``."""
    model.train(train_mode)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch in loader:
        confusion += confusion_counts(model(batch["image"]).argmax(dim=1), batch["mask"], num_classes)
    scores = class_scores(confusion)
    return float(scores["miou"]), float(scores["pixel_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="deconvnet_shapes")
    parser.add_argument("--steps", type=int, default=960)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--start", choices=("prior", "default"), default="prior")
    parser.add_argument("--every", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = compose_config([f"experiment={args.experiment}", *args.overrides])
    model, num_classes = build_task(cfg).model, int(cfg.data.num_classes)
    data = instantiate(cfg.data)
    data.setup("fit")
    train, val = data.train_dataloader(), data.val_dataloader()
    prior = class_frequencies(train, num_classes)
    constant_loss = float(-(prior * prior.log()).sum())
    if args.start == "prior":
        model.init_class_prior(prior)
    print(f"{args.experiment} {' '.join(args.overrides)}: start {args.start}, Adam lr {args.lr}; class "
          f"frequencies {[round(p, 3) for p in prior.tolist()]}, constant-predictor loss {constant_loss:.3f}")
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses: list[float] = []
    start = time.perf_counter()
    while len(losses) < args.steps:
        for batch in train:
            model.train()
            loss = F.cross_entropy(model(batch["image"]), batch["mask"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if len(losses) % args.every == 0:
                recent = sum(losses[-args.every:]) / args.every
                evaluated, batch_stats = (val_scores(model, val, num_classes, mode) for mode in (False, True))
                print(f"step {len(losses):5d}  loss {recent:.3f}  val mIoU / pixel acc: eval-mode "
                      f"{evaluated[0]:.3f} / {evaluated[1]:.3f}, train-mode {batch_stats[0]:.3f} / "
                      f"{batch_stats[1]:.3f}  {time.perf_counter() - start:.0f} s", flush=True)
            if len(losses) >= args.steps:
                break


if __name__ == "__main__":
    main()
