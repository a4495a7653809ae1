"""Run ids as git takes commits: any unique prefix of >= 6 characters names a run, wherever a run id is
accepted (``runs:/ID``, promote, report, train --from-run); ambiguous, unknown and too short prefixes are one
line each; a bare id given as a model URI gets a did-you-mean; a sweep's parent run used as a model names its
best trial.

The store is a real SQLite MLflow store; run ids are chosen (MLflow draws them from ``uuid.uuid4``) so that
prefixes can collide on purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import mlflow.store.tracking.sqlalchemy_store as sqlalchemy_store
import pytest
from mlflow.tracking import MlflowClient

from deconvlab.cli import main
from deconvlab.errors import UserError
from deconvlab.model_io import load_model
from deconvlab.store import find_source_run, get_run, resolve_run_id, run_config

FIRST = "abcdef01" + "0" * 24
SECOND = "abcdef02" + "0" * 24
OTHER = "123abc45" + "6" * 24


@pytest.fixture
def make_run(tracking_uri: str, tmp_path) -> Callable[..., str]:
    """make_run(run_id, experiment, name, tags=, params=, metrics=, checkpoint=) -> run_id, in a fresh store."""
    client = MlflowClient(tracking_uri)

    def _make(run_id: str, experiment: str, name: str, tags=None, params=None, metrics=None,
              checkpoint: bool = False) -> str:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=(tmp_path / "artifacts" / experiment).as_uri())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sqlalchemy_store.uuid, "uuid4", lambda: uuid.UUID(run_id))
            created = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
        for key, value in (params or {}).items():
            client.log_param(created, key, value)
        for key, value in (metrics or {}).items():
            client.log_metric(created, key, value)
        if checkpoint:
            client.log_text(created, "not a real checkpoint", "checkpoints/best.ckpt")
        client.set_terminated(created)
        return created

    return _make


@pytest.fixture
def two_similar(make_run) -> MlflowClient:
    """Runs abcdef01..., abcdef02... (in two experiments) and 123abc45..."""
    make_run(FIRST, "quickstart", "first")
    make_run(SECOND, "fcn32s_shapes", "second")
    make_run(OTHER, "quickstart", "other")
    from deconvlab.store import client_for

    return client_for()


def test_a_unique_prefix_names_its_run_with_or_without_runs_scheme(two_similar):
    client = two_similar
    assert resolve_run_id(client, "123abc") == OTHER
    assert resolve_run_id(client, "runs:/123ABC45/") == OTHER
    assert resolve_run_id(client, "abcdef01") == FIRST
    assert get_run(client, "abcdef02").info.run_id == SECOND
    assert resolve_run_id(client, FIRST) == FIRST  # a full id needs no search


def test_an_ambiguous_prefix_lists_every_match_with_experiment_and_name(two_similar):
    with pytest.raises(UserError) as caught:
        resolve_run_id(two_similar, "abcdef")
    message = caught.value.one_line()
    assert "ambiguous" in message and "\n" not in message
    assert f"{FIRST} (quickstart / first)" in message
    assert f"{SECOND} (fcn32s_shapes / second)" in message
    assert OTHER not in message


def test_unknown_and_too_short_prefixes_say_so(two_similar):
    with pytest.raises(UserError, match="no run id starts with 999999"):
        resolve_run_id(two_similar, "999999")
    with pytest.raises(UserError, match="too short.*at least 6"):
        resolve_run_id(two_similar, "abcde")
    with pytest.raises(UserError, match="not a run id"):
        resolve_run_id(two_similar, "quickstart")


def test_run_config_and_the_cli_take_prefixes(two_similar, capsys):
    two_similar.log_text(OTHER, "seed: 7\n", "config.yaml")
    assert run_config(two_similar, "123abc45").seed == 7
    # promote: an ambiguous prefix is one line and exit 2, before anything is registered
    assert main(["promote", "abcdef", "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ambiguous" in err and FIRST in err and SECOND in err
    assert main(["promote", "abcde", "--name", "x"]) == 2
    assert "too short" in capsys.readouterr().err


def test_a_sweep_named_like_a_prefix_is_the_sweep(make_run):
    parent = make_run("decade00" + "1" * 24, "sweep-decade", "decade", tags={"deconvlab.role": "parent"})
    make_run("decade99" + "2" * 24, "quickstart", "plain")
    from deconvlab.store import client_for

    client = client_for()
    assert find_source_run(client, "decade").info.run_id == parent
    assert find_source_run(client, "decade99").info.run_id == "decade99" + "2" * 24


@pytest.fixture
def sweep(make_run) -> dict[str, str]:
    """A finished sweep: a parent run and two trials with checkpoints, the second the best by val/psnr."""
    parent = make_run("5eeb0000" + "a" * 24, "sweep-quickstart", "quickstart",
                      tags={"deconvlab.role": "parent", "deconvlab.sweep": "quickstart"},
                      params={"sweep.metric": "val/psnr", "sweep.mode": "max"})
    trial = {"mlflow.parentRunId": parent, "deconvlab.sweep": "quickstart"}
    worse = make_run("7e1a1000" + "b" * 24, "sweep-quickstart", "t0", tags=trial, metrics={"best/val/psnr": 20.0},
                     checkpoint=True)
    best = make_run("7e1a2000" + "c" * 24, "sweep-quickstart", "t1", tags=trial, metrics={"best/val/psnr": 25.0},
                    checkpoint=True)
    return {"parent": parent, "best": best, "worse": worse}


def test_a_sweep_parent_as_a_model_names_its_best_trial(sweep, capsys):
    with pytest.raises(UserError) as caught:
        load_model(f"runs:/{sweep['parent'][:8]}")  # a prefix in runs:/ is resolved first
    message = caught.value.one_line()
    assert f"runs:/{sweep['best']}" in message and sweep["worse"] not in message
    assert "deconvlab promote quickstart" in message and "promote a finished run" not in message
    assert main(["evaluate", f"runs:/{sweep['parent']}", "--no-log"]) == 2
    assert f"runs:/{sweep['best']}" in capsys.readouterr().err


def test_a_bare_run_id_as_a_model_uri_gets_did_you_mean(sweep, capsys):
    with pytest.raises(UserError, match=f"did you mean runs:/{sweep['best']}\\?"):
        load_model(sweep["best"][:10])
    assert main(["evaluate", sweep["best"], "--no-log"]) == 2
    err = capsys.readouterr().err
    assert f"did you mean runs:/{sweep['best']}?" in err and "unsupported model URI" not in err
    with pytest.raises(UserError, match="unsupported model URI.*no run id starts with"):
        load_model("fedcba98")
