"""Looking at the store from the terminal: tracked runs, registered model versions; the MLflow UI command.

A local SQLite store is read directly, read-only, with the standard library's ``sqlite3``: importing MLflow
alone takes longer (1-2 s on a small machine) than a listing may take, and MLflow would create the database
file if it were missing. Any other store (a tracking server, Postgres), or a SQLite file whose tables this
reader does not know, is read through ``MlflowClient``; ``tests/test_runs_table.py`` holds both readers to
the same rows.

``deconvlab runs`` prints one table per experiment (newest activity first), with only the metric columns
its runs have: the experiment's ranking metric first (a sweep's ``sweep.metric``, else the runs' task
monitor, as ``best/<metric>``), then the others sorted by name. Columns that do not fit the terminal are
left out and counted (``--wide`` shows them; ``--json`` prints every value). Run ids are shown as the
shortest prefix (at least 8 characters) that no other run in the store shares, which every command
accepts (:func:`deconvlab.store.resolve_run_id`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deconvlab import tracking
from deconvlab.errors import UserError, did_you_mean
from deconvlab.locks import is_lock_name
from deconvlab.store import TAG, client_for, experiment_names, find_version

KEY_METRIC_PREFIXES = ("best/", "val/", "test/")
RANKING_PARAMS = ("sweep.metric", "sweep.mode", "task.monitor", "task.monitor_mode")
LISTED_TAGS = ("mlflow.parentRunId", f"{TAG}role", f"{TAG}sweep")
SHORT_ID_MIN = 8
NAME_MAX = 24  # a longer run name is cut (with an ellipsis) before any metric column is dropped
SQL_CHUNK = 500  # ids per IN (...): far below SQLite's limit on bound parameters
DELETED_VERSION_STAGE = "Deleted_Internal"  # MLflow's marker of a deleted model version row


@dataclass
class RunRecord:
    """One tracked run as the listing shows it (only the params and tags it needs)."""

    run_id: str
    experiment: str
    name: str
    status: str
    start_time: int | None  # ms since the epoch
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


# -- reading: SQLite directly, or MLflow ----------------------------------------------------------------
def sqlite_file(uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///PATH`` URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    return Path(uri.removeprefix("sqlite:///"))


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        yield connection
    finally:
        connection.close()


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), SQL_CHUNK):
        yield items[start:start + SQL_CHUNK]


class SqliteReader:
    """The runs of a local SQLite store, read-only, with the schema MLflow 2.x/3.x writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        if not self.path.is_file():  # no store yet: nothing to list, and nothing is created
            return []
        with _read_only(self.path) as connection:
            return connection.execute(sql, tuple(args)).fetchall()

    def experiments(self) -> dict[str, str]:
        rows = self._rows("SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active'")
        return {str(i): name for i, name in rows}

    def run_ids(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT run_uuid FROM runs WHERE lifecycle_stage = 'active'")]

    def runs(self, experiments: dict[str, str], max_results: int) -> list[RunRecord]:
        marks = ", ".join("?" * len(experiments))
        rows = self._rows(f"SELECT run_uuid, name, status, start_time, experiment_id FROM runs WHERE "
                          f"lifecycle_stage = 'active' AND experiment_id IN ({marks}) "
                          "ORDER BY start_time DESC, run_uuid LIMIT ?", [*map(int, experiments), max_results])
        records = {r[0]: RunRecord(r[0], experiments[str(r[4])], r[1] or "", r[2], r[3]) for r in rows}
        for ids in _chunks(list(records)):
            marks = ", ".join("?" * len(ids))
            for run, key, value, is_nan in self._rows(
                    f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})", ids):
                records[run].metrics[key] = math.nan if is_nan else value
            for table, keys, target in (("params", RANKING_PARAMS, "params"), ("tags", LISTED_TAGS, "tags")):
                wanted = ", ".join("?" * len(keys))
                for run, key, value in self._rows(f"SELECT run_uuid, key, value FROM {table} WHERE run_uuid "
                                                  f"IN ({marks}) AND key IN ({wanted})", [*ids, *keys]):
                    getattr(records[run], target)[key] = value
        return list(records.values())

    def versions(self) -> list[dict[str, Any]]:
        """Every model version: name, version, run_id, tags and aliases (lock models included)."""
        tags: dict[tuple[str, int], dict[str, str]] = {}
        for name, version, key, value in self._rows("SELECT name, version, key, value FROM model_version_tags"):
            tags.setdefault((name, int(version)), {})[key] = value
        aliases: dict[tuple[str, int], list[str]] = {}
        for name, alias, version in self._rows("SELECT name, alias, version FROM registered_model_aliases"):
            aliases.setdefault((name, int(version)), []).append(alias)
        rows = self._rows("SELECT name, version, run_id FROM model_versions WHERE current_stage != ?",
                          [DELETED_VERSION_STAGE])
        return [{"name": n, "version": int(v), "run_id": run, "tags": tags.get((n, int(v)), {}),
                 "aliases": sorted(aliases.get((n, int(v)), []))} for n, v, run in rows]

    def model_names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM registered_models")]


class MlflowReader:
    """The same reads through ``MlflowClient``: for tracking servers and other SQL stores."""

    def __init__(self, uri: str) -> None:
        self.client = client_for(uri)

    def experiments(self) -> dict[str, str]:
        return experiment_names(self.client)

    def runs(self, experiments: dict[str, str], max_results: int) -> list[RunRecord]:
        found = self.client.search_runs(list(experiments), max_results=max_results,
                                        order_by=["attributes.start_time DESC", "attributes.run_id ASC"])
        return [RunRecord(r.info.run_id, experiments[r.info.experiment_id], r.info.run_name or "", r.info.status,
                          r.info.start_time, dict(r.data.metrics),
                          {k: v for k, v in r.data.params.items() if k in RANKING_PARAMS},
                          {k: v for k, v in r.data.tags.items() if k in LISTED_TAGS}) for r in found]

    def run_ids(self) -> list[str]:
        return []  # a server's runs are not all read for this: prefixes are unique among the listed runs

    def versions(self) -> list[dict[str, Any]]:
        rows = []
        for model in self.client.search_registered_models():
            by_version: dict[str, list[str]] = {}
            for alias, number in model.aliases.items():
                by_version.setdefault(str(number), []).append(alias)
            rows += [{"name": model.name, "version": int(v.version), "run_id": v.run_id, "tags": dict(v.tags),
                      "aliases": sorted(by_version.get(str(v.version), []))}
                     for v in self.client.search_model_versions(f"name='{model.name}'")]
        return rows

    def model_names(self) -> list[str]:
        return [m.name for m in self.client.search_registered_models()]


def open_reader(tracking_uri: str | None) -> SqliteReader | MlflowReader:
    """A reader for the store: SQLite directly when its tables are the ones known here, else MLflow."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    path = sqlite_file(uri)
    if path is not None:
        reader = SqliteReader(path)
        try:
            reader.experiments()
            reader._rows("SELECT run_uuid, name, status, start_time, experiment_id, lifecycle_stage FROM runs "
                         "LIMIT 0")
            return reader
        except sqlite3.Error:  # an older or newer schema: MLflow knows how to read it
            pass
    return MlflowReader(uri)


# -- runs ----------------------------------------------------------------------------------------------
def find_experiment(text: str, names: Sequence[str], uri: str) -> str:
    """The experiment ``text`` names: its name, a sweep's name (``quickstart`` -> ``sweep-quickstart``) or
    a sweep file's path; any letter case.

    Raises:
        UserError: no such experiment, with the closest name and the list of them.
    """
    stem = Path(text).stem if text.endswith((".yaml", ".yml")) else text
    for candidate in (text, f"sweep-{stem}"):
        exact = [n for n in names if n == candidate] or [n for n in names if n.lower() == candidate.lower()]
        if exact:
            return exact[0]
    choices = sorted({*names, *(n.removeprefix("sweep-") for n in names)})
    raise UserError(f"no experiment {text!r}", uri, f"{did_you_mean(text, choices)}experiments: "
                    f"{', '.join(sorted(names)) or 'none yet (run deconvlab train experiment=quickstart)'}")


def list_runs(experiment: str | None, tracking_uri: str | None,
              max_results: int = 50) -> tuple[list[RunRecord], list[str]]:
    """The newest ``max_results`` runs of one experiment (see :func:`find_experiment`) or of all of them,
    newest first; and every run id of the store, to shorten ids against (empty for a server)."""
    reader = open_reader(tracking_uri)
    experiments = reader.experiments()
    if experiment:
        name = find_experiment(experiment, list(experiments.values()),
                               tracking.resolve_tracking_uri(tracking_uri))
        experiments = {i: n for i, n in experiments.items() if n == name}
    runs = reader.runs(experiments, max_results) if experiments else []
    return runs, reader.run_ids()


def short_id_length(shown: Sequence[str], every: Sequence[str], minimum: int = SHORT_ID_MIN) -> int:
    """The prefix length (>= ``minimum``) at which each of ``shown`` differs from every other id of ``every``."""
    ordered = sorted({*shown, *every})
    wanted = set(shown)
    length = minimum
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before in wanted or after in wanted:  # sorted: an id's longest shared prefix is with a neighbour
            length = max(length, len(os.path.commonprefix([before, after])) + 1)
    return length


def ranking_metric(runs: Sequence[RunRecord]) -> tuple[str, str] | None:
    """``(best/<metric>, mode)`` that ranks an experiment's runs: its sweep's metric, else the most common
    task monitor; None for runs that record neither (evaluations, comparisons)."""
    sweep = next((r for r in runs if r.params.get("sweep.metric")), None)
    if sweep is not None:
        return f"best/{sweep.params['sweep.metric']}", sweep.params.get("sweep.mode", "max")
    monitors = Counter((r.params["task.monitor"], r.params.get("task.monitor_mode", "max"))
                       for r in runs if r.params.get("task.monitor"))
    if not monitors:
        return None
    (metric, mode), _ = monitors.most_common(1)[0]
    return f"best/{metric}", mode


def metric_columns(runs: Sequence[RunRecord]) -> list[str]:
    """The key metrics (best/, val/, test/) the runs have: the ranking metric first, then sorted by name."""
    present = sorted({k for r in runs for k in r.metrics if k.startswith(KEY_METRIC_PREFIXES)})
    ranking = ranking_metric(runs)
    if ranking and ranking[0] in present:
        return [ranking[0], *(k for k in present if k != ranking[0])]
    return present


def group_by_experiment(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by experiment, the experiment with the newest run first, each newest first (as read)."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    return groups


def _started(ms: int | None, now: datetime) -> str:
    if ms is None:
        return ""
    when = datetime.fromtimestamp(ms / 1000)
    return when.strftime("%m-%d %H:%M" if when.year == now.year else "%Y-%m-%d")


def _number(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.4g}"


def fitted_table(columns: list[tuple[str, list[str]]], keep: int, width: int | None,
                 right: Sequence[str] = (), cut: str | None = None) -> tuple[Table, int]:
    """A table of ``(header, cells)`` columns fitting ``width`` (None: all of them, uncut).

    The first ``keep`` columns always show (``cut``'s cells cut at :data:`NAME_MAX` with an ellipsis); the
    others follow in order while they fit. Returns the table and how many columns were left out.
    """
    natural = [max(len(h), *(len(c) for c in cells)) if cells else len(h) for h, cells in columns]
    limit = {i: min(natural[i], NAME_MAX) for i, (h, _) in enumerate(columns) if h == cut and width is not None}
    used = sum(limit.get(i, natural[i]) for i in range(keep)) + 2 * (keep - 1)
    shown = list(range(keep))
    for i in range(keep, len(columns)):
        if width is not None and used + 2 + natural[i] > width:
            break
        used += 2 + natural[i]
        shown.append(i)
    table = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False, header_style="bold")
    for i in shown:
        header = columns[i][0]
        table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=limit.get(i),
                         justify="right" if header in right else "left")
    for row in zip(*(columns[i][1] for i in shown), strict=True):
        table.add_row(*map(Text, row))
    return table, len(columns) - len(shown)


def runs_table(runs: Sequence[RunRecord], id_length: int, width: int | None) -> tuple[Table, int]:
    """One experiment's runs as a table fitting ``width`` (None: every column); and how many were left out."""
    now = datetime.now()
    metrics = metric_columns(runs)
    columns = [("run", [r.run_id[:id_length] for r in runs]), ("name", [r.name for r in runs]),
               ("status", [r.status for r in runs]), ("started", [_started(r.start_time, now) for r in runs]),
               *((m, [_number(r.metrics.get(m)) for r in runs]) for m in metrics)]
    return fitted_table(columns, 4, width, right=metrics, cut="name")


def terminal_width() -> int:
    """The terminal's width (``COLUMNS`` if set; 80 when the output is not a terminal)."""
    return shutil.get_terminal_size().columns


def print_runs_table(experiment: str | None, tracking_uri: str | None, max_results: int = 50,
                     wide: bool = False, width: int | None = None) -> None:
    """One table per experiment: its ranking metric first, the columns that fit the terminal (all if ``wide``)."""
    runs, every_id = list_runs(experiment, tracking_uri, max_results)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    width = width or terminal_width()
    console = Console(width=100_000 if wide else width, soft_wrap=False, highlight=False)
    if not runs:
        console.print(Text(f"no runs in {uri} yet: deconvlab train experiment=quickstart makes one"))
        return
    id_length = short_id_length([r.run_id for r in runs], every_id)
    hidden = 0
    for name, group in group_by_experiment(runs).items():
        ranking = ranking_metric(group)
        ranked = f", ranked by {ranking[0]} ({ranking[1]})" if ranking else ""
        console.print(Text(f"{name}: {len(group)} run{'s' * (len(group) != 1)}{ranked}"[:width], style="bold"))
        table, left_out = runs_table(group, id_length, None if wide else width)
        console.print(table)
        console.print()
        hidden = max(hidden, left_out)
    if hidden:  # before the store's URI, which may be long enough to be cut
        console.print(Text(f"+{hidden} metric columns did not fit: --wide shows them, --json every value"[:width]))
    footer = f"{len(runs)} run{'s' * (len(runs) != 1)} in {uri}"
    console.print(Text(footer if wide else footer[:width]))


def run_rows(experiment: str | None, tracking_uri: str | None, max_results: int = 50) -> list[dict[str, Any]]:
    """``deconvlab runs --json``: one object per run, grouped and ordered as the table, every metric."""
    runs, every_id = list_runs(experiment, tracking_uri, max_results)
    id_length = short_id_length([r.run_id for r in runs], every_id) if runs else SHORT_ID_MIN
    rows = []
    for name, group in group_by_experiment(runs).items():
        ranking = ranking_metric(group)
        for r in group:
            rows.append({"run_id": r.run_id, "short_id": r.run_id[:id_length], "experiment": name,
                         "name": r.name, "status": r.status,
                         "start_time": datetime.fromtimestamp(r.start_time / 1000).astimezone().isoformat()
                         if r.start_time else None,
                         "parent_run_id": r.tags.get("mlflow.parentRunId"), "role": r.tags.get(f"{TAG}role"),
                         "ranking_metric": ranking[0] if ranking else None,
                         "metrics": {k: (v if math.isfinite(v) else None) for k, v in sorted(r.metrics.items())}})
    return rows


def mlflow_ui_command(tracking_uri: str | None, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``mlflow ui`` command line serving the same store, on loopback unless ``host`` says otherwise."""
    mlflow_exe = shutil.which("mlflow") or f"{sys.executable} -m mlflow"
    uri = tracking.resolve_tracking_uri(tracking_uri)
    command = [*mlflow_exe.split(), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               # One worker: the default four take a minute to answer on a small, busy machine.
               "--workers", "1"]
    if not uri.startswith("http"):
        command += ["--default-artifact-root", tracking.artifact_location()]
    return command


# -- registered models ---------------------------------------------------------------------------------
def list_versions(tracking_uri: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, metric, value, source run, sweep, dataset."""
    reader = open_reader(tracking_uri)
    if name is not None and name not in reader.model_names():
        if isinstance(reader, MlflowReader):
            find_version(reader.client, name)  # the server's own error (a refusal, say), else the one below
        names = sorted(n for n in reader.model_names() if not is_lock_name(n))
        raise UserError(f"no registered model {name!r}", tracking.resolve_tracking_uri(tracking_uri),
                        f"{did_you_mean(name, names)}registered models: "
                        f"{', '.join(names) or 'none yet: run deconvlab promote'}")
    rows = []
    for version in sorted(reader.versions(), key=lambda v: (v["name"], v["version"])):
        if name not in (None, version["name"]) or is_lock_name(version["name"]):
            continue
        tags = version["tags"]
        rows.append({"name": version["name"], "version": version["version"], "aliases": version["aliases"],
                     "metric": tags.get(f"{TAG}metric"), "value": float(tags.get(f"{TAG}metric_value", "nan")),
                     "run_id": version["run_id"], "sweep": tags.get(f"{TAG}sweep"),
                     "trial": tags.get(f"{TAG}trial_id"), "dataset": tags.get(f"{TAG}dataset"),
                     "family": tags.get(f"{TAG}family")})
    return rows


def print_versions(rows: list[dict[str, Any]], tracking_uri: str | None = None, width: int | None = None) -> None:
    """A table of :func:`list_versions` rows fitting the terminal: the lineage columns go when it is narrow."""
    width = width or terminal_width()
    console = Console(width=width, soft_wrap=False, highlight=False)
    if not rows:
        console.print(Text("no registered models yet: run deconvlab promote"))
        return
    console.print(Text(f"registered models in {tracking.resolve_tracking_uri(tracking_uri)}"[:width], style="bold"))
    cells = {"name": [r["name"] for r in rows], "version": [str(r["version"]) for r in rows],
             "aliases": [", ".join(r["aliases"]) for r in rows], "metric": [r["metric"] or "" for r in rows],
             "value": [_number(r["value"]) for r in rows], "run": [(r["run_id"] or "")[:SHORT_ID_MIN] for r in rows],
             "family": [r["family"] or "" for r in rows],
             "sweep / trial": [f"{r['sweep']} / {r['trial']}" if r["sweep"] else "-" for r in rows],
             "dataset": [r["dataset"] or "" for r in rows]}
    table, _ = fitted_table(list(cells.items()), 2, width, right=("version", "value"), cut="name")
    console.print(table)
