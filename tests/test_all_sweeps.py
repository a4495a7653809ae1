"""Every sweep under sweeps/ runs with --smoke-test and its best trial is promotable (slow: minutes)."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import start_local_ray
from deconvlab.sweep.spec import sweeps_dir

pytestmark = pytest.mark.slow
# quickstart's and quickstart_pbt's smoke sweeps are exercised in tests/test_sweep.py and test_pbt_resume.py.
SWEEPS = sorted(p.stem for p in sweeps_dir().glob("*.yaml") if p.stem not in ("quickstart", "quickstart_pbt"))


def _skip_without_its_data(name: str) -> None:
    """Sweeps on real data sets (CamVid, BSD68...) skip when ../shared/data is absent."""
    from hydra.utils import instantiate

    from deconvlab.config import compose_config
    from deconvlab.sweep.spec import load_sweep

    spec = load_sweep(name).with_smoke_test()
    try:
        instantiate(compose_config(spec.trial_overrides({})).data).setup("validate")
    except Exception as exc:  # Hydra wraps a constructor's error: the missing folder is its cause
        missing = exc if isinstance(exc, FileNotFoundError) else exc.__cause__
        if not isinstance(missing, FileNotFoundError):
            raise
        pytest.skip(f"data for sweep {name} is absent: {missing}")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", SWEEPS)
def test_smoke_sweep_runs_and_promotes(name, ray_cluster, tmp_path, tracking_uri):
    from deconvlab.promote import promote
    from deconvlab.sweep.runner import run_sweep

    _skip_without_its_data(name)
    outcome = run_sweep(name, smoke_test=True, storage_path=str(tmp_path / "ray"), quiet=True)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(outcome.experiment_name).experiment_id])
    assert len(runs) == len(outcome.leaderboard) + 1 and all(r.info.status == "FINISHED" for r in runs)
    promotion = promote(outcome.parent_run_id, f"{name}-smoke")
    assert promotion.moved and str(client.get_model_version_by_alias(f"{name}-smoke", "champion").version) == "1"
