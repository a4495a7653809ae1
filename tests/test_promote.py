"""The model registry: promotion from a sweep and from runs, alias moves, lineage, races, bad input.

One smoke sweep (the quickstart sweep's --smoke-test, ~30 s) plus two single quickstart runs on the same
validation data are the promotion sources for the whole module.
"""

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import TINY_TRAINER, start_local_ray, use_store_under
from deconvlab.build import build_task
from deconvlab.cli import main
from deconvlab.config import compose_config
from deconvlab.evaluate import evaluate
from deconvlab.locks import HOLDER_TAG, TOKEN_TAG, is_lock_name, lock_name, registry_lock
from deconvlab.promote import PREVIOUS_ALIAS, promote
from deconvlab.runs import list_versions
from deconvlab.sweep.runner import run_sweep
from deconvlab.train import train

# The smoke sweep evaluates on 48 x 48 crops: single runs use the same validation data, so that every
# source's best/val/psnr is comparable.
SAME_VAL_DATA = ["experiment=quickstart", "data.samples_per_epoch=48", "data.max_eval_size=48"]


@dataclass
class Sources:
    client: MlflowClient
    uri: str
    sweep: object  # SweepOutcome
    low: object  # TrainResult: lr=0 keeps the network at its identity initialisation
    high: object  # TrainResult: a few more steps than the sweep's smoke trials

    def value(self, run_id: str) -> float:
        return self.client.get_run(run_id).data.metrics["best/val/psnr"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("registry")
    start_local_ray()
    try:
        with pytest.MonkeyPatch.context() as mp:
            uri = use_store_under(mp, root)
            sweep = run_sweep("quickstart", smoke_test=True, storage_path=str(root / "ray"), quiet=True)
            low = train(compose_config([*TINY_TRAINER, *SAME_VAL_DATA, "optim.lr=0.0"]))
            high = train(compose_config([*TINY_TRAINER, *SAME_VAL_DATA, "trainer.max_epochs=3",
                                         "trainer.limit_train_batches=8", "optim.lr=3e-3"]))
            yield Sources(MlflowClient(uri), uri, sweep, low, high)
    finally:
        ray.shutdown()


def registry_state(client: MlflowClient) -> list:
    """Every registered model with its aliases and versions (and their tags): to compare before/after."""
    state = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        state.append((model.name, sorted(model.aliases.items()),
                      sorted((int(v.version), sorted(v.tags.items())) for v in versions)))
    return sorted(state)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_alias_moves_only_when_better_and_previous_keeps_the_old_holder(sources):
    client, uri = sources.client, sources.uri
    candidates = {"quickstart": sources.value(sources.sweep.best_run_id),
                  sources.low.run_id: sources.value(sources.low.run_id),
                  sources.high.run_id: sources.value(sources.high.run_id)}
    assert len(set(candidates.values())) == 3, candidates
    worst, middle, best = sorted(candidates, key=candidates.get)

    first = promote(worst, "deblur", tracking_uri=uri)
    assert first.moved and first.version == "1" and _aliases(client, "deblur") == {"champion": "1"}
    second = promote(best, "deblur", tracking_uri=uri)
    assert second.moved and second.previous_version == "1" and "beats" in second.reason
    assert _aliases(client, "deblur") == {"champion": "2", PREVIOUS_ALIAS: "1"}
    third = promote(middle, "deblur", tracking_uri=uri)
    assert not third.moved and third.version == "3" and "does not beat" in third.reason
    assert _aliases(client, "deblur") == {"champion": "2", PREVIOUS_ALIAS: "1"}
    # --force moves it anyway; promoting the same run again registers no new version.
    forced = promote(middle, "deblur", force=True, tracking_uri=uri)
    assert forced.moved and not forced.newly_registered and forced.version == "3"
    assert _aliases(client, "deblur") == {"champion": "3", PREVIOUS_ALIAS: "2"}
    versions = client.search_model_versions("name='deblur'")
    assert len(versions) == 3
    assert {float(v.tags["deconvlab.metric_value"]) for v in versions} == set(candidates.values())


def test_sweep_version_carries_lineage_and_a_safe_model_with_signature(sources, tmp_path):
    import mlflow.pyfunc
    from mlflow.models import Model

    client, uri, sweep = sources.client, sources.uri, sources.sweep
    promotion = promote("quickstart", "sweep-lineage", tracking_uri=uri)
    assert promotion.candidate.run_id == sweep.best_run_id
    tags = client.get_model_version("sweep-lineage", promotion.version).tags
    assert tags["deconvlab.sweep"] == "quickstart" and tags["deconvlab.trial_id"] == sweep.best_trial
    assert tags["deconvlab.sweep_run_id"] == sweep.parent_run_id
    assert tags["deconvlab.source_run_id"] == sweep.best_run_id
    assert float(tags["deconvlab.metric_value"]) == sources.value(sweep.best_run_id)
    assert tags["deconvlab.metric"] == "val/psnr" and tags["deconvlab.mode"] == "max"
    assert tags["deconvlab.git_commit"] and "NaturalImagesDataModule(root=None" in tags["deconvlab.dataset"]
    assert "experiment=quickstart" in tags["deconvlab.config"] and tags["deconvlab.family"] == "restoration"

    model_dir = client.download_artifacts(sweep.best_run_id, "model", str(tmp_path))
    meta = Model.load(f"{model_dir}/MLmodel")
    assert meta.get_input_schema().inputs[0].shape == (-1, 1, -1, -1)  # any batch, any image size
    example = np.asarray(meta.load_input_example(model_dir))
    assert example.shape == (2, 1, 48, 48)
    # MLflow's own pyfunc loader goes through deconvlab's safe rebuild and matches the checkpoint.
    predicted = mlflow.pyfunc.load_model("models:/sweep-lineage@champion").predict(example)
    config = client.download_artifacts(sweep.best_run_id, "config.yaml", str(tmp_path))
    task = build_task(OmegaConf.create(Path(config).read_text()))
    checkpoint = client.download_artifacts(sweep.best_run_id, "checkpoints/checkpoint.ckpt", str(tmp_path))
    task.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    with torch.no_grad():
        reference = task.model.eval()(torch.from_numpy(example)).numpy()
    assert np.allclose(predicted, reference, atol=1e-6)


def test_evaluate_on_the_alias_reproduces_the_trials_validation_metric(sources):
    promote("quickstart", "sweep-eval", tracking_uri=sources.uri)
    evaluation = evaluate("models:/sweep-eval@champion", tracking_uri=sources.uri, log=False)
    trial_value = sources.value(sources.sweep.best_run_id)
    assert evaluation.metrics["val/psnr"] == pytest.approx(trial_value, abs=1e-4)


def _check_consistent(client: MlflowClient, name: str, runs: dict[str, float]) -> None:
    """Each run registered once; exactly one champion, held by the best run."""
    versions = client.search_model_versions(f"name='{name}'")
    registered = [v.tags["deconvlab.source_run_id"] for v in versions]
    assert sorted(registered) == sorted(runs)
    aliases = client.get_registered_model(name).aliases
    champion = client.get_model_version(name, str(aliases["champion"]))
    assert champion.tags["deconvlab.source_run_id"] == max(runs, key=runs.get)
    assert str(aliases.get(PREVIOUS_ALIAS)) != str(aliases["champion"])


def test_racing_promotions_in_threads_leave_a_consistent_registry(sources):
    runs = {r.run_id: sources.value(r.run_id) for r in (sources.low, sources.high)}
    order = [sources.low.run_id, sources.high.run_id] * 2
    barrier, errors = threading.Barrier(len(order)), []

    def racer(run_id: str) -> None:
        try:
            barrier.wait()
            promote(run_id, "race-threads", tracking_uri=sources.uri)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(run_id,)) for run_id in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    _check_consistent(sources.client, "race-threads", runs)


def test_a_lock_released_while_mlflow_reads_it_back_is_taken_at_once(tracking_uri, monkeypatch):
    # MLflow's SQL store answers a taken name by reading the model back; the holder's release can land in
    # between, and the create then fails "not found" (seen once in CI, 4 promotions racing in threads).
    client = MlflowClient(tracking_uri)
    lock = lock_name("handed-over")
    client.create_registered_model(lock, tags={TOKEN_TAG: "holder", HOLDER_TAG: "a finishing promotion"})
    store_class = type(client._get_registry_client().store)
    read_back, released = store_class.get_registered_model, []

    def released_just_before(store, name):
        if name == lock and not released:
            released.append(name)
            store.delete_registered_model(name)
        return read_back(store, name)

    monkeypatch.setattr(store_class, "get_registered_model", released_just_before)
    with registry_lock(client, "handed-over", timeout_s=5):
        assert released and client.get_registered_model(lock).tags[TOKEN_TAG] != "holder"
    assert not [m for m in client.search_registered_models() if is_lock_name(m.name)]


def test_racing_promotions_in_two_processes_leave_a_consistent_registry(sources):
    runs = {r.run_id: sources.value(r.run_id) for r in (sources.low, sources.high)}
    command = [sys.executable, "-m", "deconvlab.cli", "promote", "--name", "race-processes",
               "--tracking-uri", sources.uri]
    processes = [subprocess.Popen([*command, run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for run_id in runs]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    _check_consistent(sources.client, "race-processes", runs)


def test_bad_input_is_one_line_and_leaves_the_registry_unchanged(sources, capsys):
    client, uri = sources.client, sources.uri
    promote(sources.low.run_id, "guarded", tracking_uri=uri)
    experiment = client.get_run(sources.low.run_id).info.experiment_id
    no_checkpoint = client.create_run(experiment).info.run_id
    client.log_param(no_checkpoint, "task.monitor", "val/psnr")
    client.log_metric(no_checkpoint, "best/val/psnr", 99.0)
    client.set_terminated(no_checkpoint)
    before = registry_state(client)
    cases = [
        (["no-such-sweep", "--name", "guarded"], "no sweep 'no-such-sweep'"),
        (["0" * 32, "--name", "guarded"], "no run 000"),
        ([no_checkpoint, "--name", "guarded"], "has no checkpoint"),
        ([sources.high.run_id, "--name", "bad/name"], "invalid model name"),
        ([sources.high.run_id, "--name", "guarded", "--alias", "v2"], "invalid alias"),
        ([sources.high.run_id, "--name", "guarded", "--metric", "val/nope"], "no finite best/val/nope"),
        (["quickstart", "--name", "guarded", "--metric", "val/ssim"], "has a best/val/ssim value"),
    ]
    for argv, message in cases:
        code = main(["promote", *argv, "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert message in err, err
    assert registry_state(client) == before


def test_models_lists_versions_aliases_and_metrics(sources, capsys):
    uri = sources.uri
    promote(sources.high.run_id, "listed", tracking_uri=uri)
    assert main(["models", "listed", "--json", "--tracking-uri", uri]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "listed" and row["version"] == 1 and row["aliases"] == ["champion"]
    assert row["value"] == sources.value(sources.high.run_id) and row["run_id"] == sources.high.run_id
    assert row["metric"] == "val/psnr" and row["family"] == "restoration"
    assert main(["models", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "listed" in table and "champion" in table
    assert {r["name"] for r in list_versions(uri)} >= {"listed"}
    assert main(["models", "nope", "--tracking-uri", uri]) == 2
