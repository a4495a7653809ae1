"""What the sweep driver records in MLflow, by name, and the query that finds a sweep's trial runs again.

The read side of a sweep (:mod:`.leaderboard`, :mod:`.plots`, :mod:`.report`: ``deconvlab report``) stands on
this module and imports nothing heavier than MLflow, so reading a finished sweep never loads torch, Lightning
or Ray (about 4 s of a 6 s report on a 2-core machine). The writers (:mod:`.child_runs`, :mod:`.repeats`,
:mod:`.trial_callbacks`, :mod:`deconvlab.cost`) use the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

# Tags of a trial's child run.
TRIAL_TAG = "deconvlab.trial_id"
STOP_REASON_TAG = "deconvlab.stop_reason"
EPOCHS_TAG = "deconvlab.epochs"
# The sampled config a trial ran (its seeds share it, in a sweep with repeats).
CONFIG_TAG = "deconvlab.config_id"
# The artifact folder of a trial's sample images, one ``epoch_NNN`` folder per validated epoch.
SAMPLES_DIR = "samples"
# Cost metrics the driver logs to every trial's run (:mod:`deconvlab.cost`), and the leaderboard columns
# they become ("params" comes from the trained model's own model/num_params metric). "MACs/px" is per
# labelled output pixel.
COST_COLUMNS = {"cost/macs_per_pixel": "MACs/px", "cost/latency_ms": "latency ms"}
# What each trial logs per epoch: its cumulative training multiply-accumulates so far.
COMPUTE_KEY = "compute/train_macs"


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str | None = None) -> list:
    """The trial runs of a sweep's parent run (optionally only those with ``status``)."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return client.search_runs([experiment_id], query, max_results=10_000)


@dataclass
class DriverLog:
    """What the sweep driver wrote to its trials' runs, kept in memory so that the end of the sweep does not
    read it back: each trial's ``config.yaml`` (for its cost) and its curves (for the plots), one to three
    round trips per trial otherwise, most of a large sweep's end.

    Only the driver that wrote everything may pass it on: a resumed sweep's driver saw part of the results.
    """

    configs: dict[str, str] = field(default_factory=dict)  # run id -> the config.yaml text logged
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # run id -> key -> points

    def add_run(self, run_id: str) -> None:
        """A run the driver created: from now on every point of it goes through :meth:`add_point`."""
        self.histories.setdefault(run_id, {})

    def add_point(self, run_id: str, key: str, step: int, value: float) -> None:
        self.histories[run_id].setdefault(key, []).append((step, value))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]] | None:
        """The ``(step, value)`` points logged for ``key`` (empty: none), or None for a run the driver did not
        create."""
        if run_id not in self.histories:
            return None
        return list(self.histories[run_id].get(key, []))
