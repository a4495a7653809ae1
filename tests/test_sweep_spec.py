"""Sweep files: distributions, smoke-test variants, and errors caught before any trial starts."""

import textwrap

import pytest

from deconvlab.errors import UserError
from deconvlab.sweep.spec import Distribution, load_sweep, parse_distribution, validate


@pytest.mark.parametrize("text, kind, args", [
    ("choice([0.25, 0.5])", "choice", ([0.25, 0.5],)),
    ("loguniform(1e-4, 1e-2)", "loguniform", (1e-4, 1e-2)),
    ("uniform(0, 1)", "uniform", (0, 1)),
    ("randint(3, 7)", "randint", (3, 7)),
    ("grid(['a', 'b'])", "grid", (["a", "b"],)),
    ("qloguniform(1e-4, 1e-1, 5e-5)", "qloguniform", (1e-4, 1e-1, 5e-5)),
])
def test_parse_distribution(text, kind, args):
    assert parse_distribution("k", text) == Distribution(kind, args)


@pytest.mark.parametrize("text, message", [
    ("gaussian(0, 1)", "unknown distribution 'gaussian'"),
    ("loguniform(0, 1)", "positive bounds"),
    ("uniform(2, 1)", "low < high"),
    ("choice([])", "non-empty list"),
    ("choice(1, 2", "not a distribution"),
    ("uniform(a, b)", "cannot read the arguments"),
    ("0.5", "not a distribution"),
])
def test_bad_distributions_name_the_key(text, message):
    with pytest.raises(UserError, match=message) as info:
        parse_distribution("optim.lr", text)
    assert info.value.where == "search_space.optim.lr"


def test_samplers_come_from_ray_tune():
    from ray import tune

    assert parse_distribution("k", "grid([1, 2])").to_tune() == tune.grid_search([1, 2])
    sample = parse_distribution("k", "loguniform(1e-4, 1e-2)").to_tune().sample()
    assert 1e-4 <= sample <= 1e-2


def _write(tmp_path, body: str):
    path = tmp_path / "mysweep.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    experiment: quickstart
    metric: val/psnr
    mode: max
    search_space:
      optim.lr: loguniform(1e-4, 1e-2)
      model.width: choice([8, 16])
    num_samples: 5
    smoke_test: {num_samples: 2, overrides: [debug=smoke]}
"""


def test_load_validate_and_smoke_variant(tmp_path):
    spec = load_sweep(_write(tmp_path, GOOD))
    validate(spec)
    smoke = spec.with_smoke_test()
    assert (spec.num_samples, smoke.num_samples) == (5, 2) and smoke.overrides[-1] == "debug=smoke"
    overrides = spec.trial_overrides({"optim.lr": 0.001, "model.width": 8})
    assert overrides == ["experiment=quickstart", "optim.lr=0.001", "model.width=8"]


def test_every_shipped_sweep_is_valid_with_its_smoke_test():
    from deconvlab.sweep.spec import sweeps_dir

    names = sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
    assert "quickstart" in names
    for name in names:
        spec = load_sweep(name)
        validate(spec.with_smoke_test())


@pytest.mark.parametrize("body, message", [
    ("experiment: quickstart\nmetric: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("experiment: quickstart\nmetric: val/psnr\nmode: max\n", "missing key"),
    (GOOD + "    colour: blue\n", "unknown key"),
    (GOOD.replace("mode: max", "mode: best"), "mode must be min or max"),
    (GOOD + "    scheduler: {type: hyperband}\n", "unknown scheduler"),
    (GOOD.replace("optim.lr: loguniform", "optim.lr: lognormal"), "unknown distribution"),
])
def test_malformed_sweep_files(tmp_path, body, message):
    with pytest.raises(UserError, match=message):
        load_sweep(_write(tmp_path, body))


@pytest.mark.parametrize("change, message", [
    (("optim.lr:", "optim.lrr:"), "search key 'optim.lrr' is not in the config"),
    (("metric: val/psnr", "metric: val/accuracy"), "metric 'val/accuracy' is never reported"),
    (("model.width: choice([8, 16])", "model.width: choice(['wide'])"), "wrong type"),
])
def test_sweep_that_cannot_run_is_refused_before_trials(tmp_path, change, message):
    spec = load_sweep(_write(tmp_path, GOOD.replace(*change)))
    with pytest.raises(UserError, match=message):
        validate(spec)


def test_unknown_sweep_name_points_to_the_listing():
    with pytest.raises(UserError, match="unknown sweep") as info:
        load_sweep("no_such_sweep")
    assert "deconvlab list sweeps" in info.value.fix


def test_a_model_switch_that_cannot_build_is_refused_before_trials(tmp_path):
    # The sweep's overrides set model.freeze_deconv, which the Wiener model does not take.
    spec = load_sweep(_write(tmp_path, """
        experiment: xu_full_disk7_sat_jpeg90_bsd68
        overrides: ["++model.freeze_deconv=true"]
        metric: val/psnr
        mode: max
        search_space:
          model: grid(["xu_full", "wiener"])
    """))
    with pytest.raises(UserError, match="cannot be built") as info:
        validate(spec)
    assert "model=wiener" in info.value.where


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "true"])
def test_repeats_must_be_a_whole_number_of_at_least_one_one_line_exit_2_no_run(value, tmp_path, tracking_uri,
                                                                              capsys):
    from mlflow.tracking import MlflowClient

    from deconvlab.cli import main

    path = _write(tmp_path, GOOD + f"    repeats: {value}\n")
    assert main(["sweep", path, "--storage", str(tmp_path / "ray")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "repeats must be a whole number >= 1" in err and f"{path}: repeats" in err
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not (tmp_path / "ray").exists()


def test_repeats_default_to_one_and_a_smoke_test_may_change_them(tmp_path):
    assert load_sweep(_write(tmp_path, GOOD)).repeats == 1
    spec = load_sweep(_write(tmp_path, GOOD.replace("num_samples: 5", "num_samples: 5\n    repeats: 3")
                             .replace("{num_samples: 2,", "{num_samples: 2, repeats: 2,")))
    assert (spec.repeats, spec.with_smoke_test().repeats) == (3, 2)
    assert spec.to_dict()["repeats"] == 3


def test_repeats_and_a_sampled_seed_are_refused_before_trials(tmp_path):
    spec = load_sweep(_write(tmp_path, GOOD + "    repeats: 2\n"))
    spec.search_space["seed"] = parse_distribution("seed", "choice([1, 2])")
    with pytest.raises(UserError, match="repeats: 2 sets the seed of every trial") as info:
        validate(spec)
    assert info.value.where.endswith(": repeats")


def test_a_repeats_seed_wins_over_a_seed_on_the_command_line(tmp_path):
    from deconvlab.sweep.spec import trial_config

    spec = load_sweep(_write(tmp_path, GOOD + "    repeats: 2\n"))
    cfg = trial_config(spec.to_dict(), {"optim.lr": 0.001, "seed": 8}, str(tmp_path / "out"), ["seed=7"])
    assert cfg.seed == 8 and cfg.optim.lr == 0.001
