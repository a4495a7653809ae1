"""A command-line override of a key the search space samples is refused before anything starts."""

import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from deconvlab.cli import main
from deconvlab.errors import UserError
from deconvlab.sweep.spec import check_overrides_leave_samples, load_sweep, parse_distribution


@pytest.mark.parametrize("override", ["optim.lr=1e-3", "+optim.lr=1e-3", "++optim.lr=1e-3", "~optim.lr"])
def test_overriding_a_sampled_key_is_refused_before_any_run(tracking_uri, tmp_path, capsys, override):
    capsys.readouterr()
    code = main(["sweep", "quickstart", override, "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: optim.lr is sampled by the sweep's search space") and "quickstart.yaml" in err
    assert err.endswith("drop the override or edit search_space")
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not (tmp_path / "ray").exists()  # no Ray experiment either


def test_what_counts_as_overriding_a_sampled_key():
    spec = load_sweep("quickstart")
    spec = dataclasses.replace(spec, search_space={
        **spec.search_space, "data.degradation.noise_sigma": parse_distribution("x", "uniform(0.0, 0.05)")})
    # A value above a sampled key replaces it.
    with pytest.raises(UserError, match=r"data.degradation is sampled .*\(it holds data.degradation.noise_sigma\)"):
        check_overrides_leave_samples(spec, ["data.degradation={noise_sigma: 0.02}"])
    with pytest.raises(UserError, match="model.depth is sampled"):
        check_overrides_leave_samples(spec, ["trainer.max_epochs=2", "model.depth=8"])
    # A group choice picks the config the sampled value lands in; other keys, and the seed, are free.
    check_overrides_leave_samples(spec, ["model=residual_deblur_cnn", "seed=3", "optim.weight_decay=0.1",
                                         "data.degradation.kernel.radius=2"])
