"""The deconvlab command: train and sweep models, check data, compare runs, promote, evaluate and predict.

User errors print one line ``error: <what> (<where>): <what to do>`` and exit 2; internal errors exit 1
with one line too, and ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from deconvlab.errors import did_you_mean, first_line, user_error_in, was_interrupted

EXIT_USER_ERROR, EXIT_INTERNAL_ERROR = 2, 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
KINDS = {"experiments": "experiment", "models": "model", "data": "data"}


class OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line ``error: <what> (<where>): <what to do>``, exit 2.

    Adds the hints a Hydra or git user needs: a did-you-mean for a mistyped subcommand, ``experiment=NAME``
    for ``--experiment NAME``, and ``deconvlab sweep`` for Hydra's ``-m``.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        what, fix = self._explain(message)
        print(f"error: {what} ({self.prog}): {fix}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    def _explain(self, message: str) -> tuple[str, str]:
        if "invalid choice: '" in message:  # argparse lists every choice: name the closest one instead
            word = message.split("invalid choice: '")[1].split("'")[0]
            choices = message.split("(choose from ")[-1].rstrip(")").replace("'", "").split(", ")
            kind = "command" if " " not in self.prog else "choice"
            return f"unknown {kind} {word!r}", f"{did_you_mean(word, choices)}see {self.prog} --help"
        return message, self._fix_for(message)

    def _fix_for(self, message: str) -> str:
        unknown = message.removeprefix("unrecognized arguments: ").split()
        dashed = [arg for arg in unknown if arg.startswith("--") and arg[2:].replace("-", "_").isidentifier()]
        if dashed and message.startswith("unrecognized"):
            key = dashed[0][2:].split("=")[0]
            return f"config values are Hydra overrides without dashes: write {key}=VALUE (see {self.prog} --help)"
        return f"see {self.prog} --help"


def _quiet_environment() -> None:
    # No telemetry, no update checks, no usage stats: this runs offline and in CI.
    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                       "NO_ALBUMENTATIONS_UPDATE": "1", "HYDRA_FULL_ERROR": "0",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)


def cmd_train(args: argparse.Namespace) -> int:
    if args.multirun:
        return _multirun(args)
    if args.dry_run:
        from deconvlab.errors import UserError

        raise UserError("--dry-run plans a multirun", "deconvlab train --dry-run",
                        "add -m and comma lists (deconvlab train -m --dry-run experiment=NAME key=a,b), or drop it")
    if not (args.from_run or args.cfg):  # printing the bare defaults is harmless; training them is not
        from deconvlab.config import require_experiment

        require_experiment(args.overrides, "deconvlab train", "deconvlab train experiment=quickstart")
    quiet = ["trainer.enable_progress_bar=false"] if args.quiet else []
    if args.from_run:
        from deconvlab.train import rerun_config

        cfg, tags = rerun_config(args.from_run, [*args.overrides, *quiet])
    else:
        from deconvlab.config import compose_config

        cfg, tags = compose_config([*args.overrides, *quiet]), {}
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=args.resolve))
        return 0
    from deconvlab.train import train

    result = train(cfg, tags=tags)
    monitor, _ = result.monitor
    print(f"run {result.run_id}: best {monitor} = {result.metrics.get(f'best/{monitor}', float('nan')):.4f}")
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def _multirun(args: argparse.Namespace) -> int:
    """``train -m``: the grid of comma lists written as a sweep file, then run (or planned) as that sweep."""
    from deconvlab.sweep.multirun import write_multirun_sweep

    overrides = args.overrides
    if args.from_run or args.cfg:
        from deconvlab.errors import UserError

        raise UserError("-m does not combine with --from-run or --cfg", "deconvlab train -m",
                        "write the grid as overrides: deconvlab train -m experiment=NAME key=a,b")
    args.overrides, args.smoke_test, args.address, args.storage, args.resume = [], False, None, None, False
    if args.dry_run:  # nothing is written: the sweep file lives as long as the plan takes
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            args.sweep = str(write_multirun_sweep(overrides, scratch))
            return cmd_sweep(args)
    args.sweep = str(write_multirun_sweep(overrides))
    print(f"multirun: the grid is sweep file {args.sweep} (deconvlab sweep {args.sweep} runs it again)", flush=True)
    return cmd_sweep(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.dry_run:
        from deconvlab.sweep.dry_run import format_plan, plan_sweep

        print("\n".join(format_plan(plan_sweep(args.sweep, args.overrides, smoke_test=args.smoke_test))))
        return 0
    from deconvlab.sweep.runner import run_sweep

    outcome = run_sweep(args.sweep, args.overrides, address=args.address, smoke_test=args.smoke_test,
                        storage_path=args.storage, quiet=args.quiet, resume=args.resume,
                        verbose=args.verbose or args.debug)
    print(f"sweep parent run {outcome.parent_run_id} in experiment {outcome.experiment_name}; "
          f"best trial {outcome.best_trial} (run {outcome.best_run_id})")
    if outcome.best_sample:
        print(f"the best trial's before/after image (input | output | target): {outcome.best_sample}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from deconvlab.config import group_options, project_root

    kinds = [args.kind] if args.kind else [*KINDS, "sweeps"]
    for kind in kinds:
        if args.kind == "models":
            # The model catalogue: name, family, builder, read from the models' source (importing them would
            # load torch: 1.2-1.8 s instead of 0.2 s); tests/test_models.py holds it equal to the catalogue.
            from deconvlab.model_list import listed_models

            specs = listed_models()
            width = max(len(s.name) for s in specs)
            names = [f"{s.name:<{width}}  {s.family:<14}  {s.target}" for s in specs]
        elif kind == "sweeps":
            names = sorted(p.stem for p in (project_root() / "sweeps").glob("*.yaml"))
        else:
            names = group_options(KINDS[kind])
        print(f"{kind}:")
        for name in names:
            print(f"  {name}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from deconvlab.datacheck import check_data, format_checks

    checks = check_data(args.overrides)
    data = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("data=")), "of the default config")
    print("\n".join(format_checks(checks, data)))
    return EXIT_USER_ERROR if any(check.problems for check in checks) else 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.json:
        import json

        from deconvlab.runs import run_rows

        print(json.dumps(run_rows(args.experiment, args.tracking_uri, args.max_results), indent=2))
        return 0
    from deconvlab.runs import print_runs_table

    print_runs_table(args.experiment, args.tracking_uri, args.max_results, wide=args.wide)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from deconvlab.runs import mlflow_ui_command
    from deconvlab.sweep.ui_view import describe_links, experiments_url, local_ui_url, sweep_links

    url = local_ui_url(args.host, args.port)
    # The sweep is looked up first: an unknown one is one line and exit 2, before any server starts.
    lines = (describe_links(sweep_links(args.sweep, args.tracking_uri, url)) if args.sweep
             else [f"experiments, in Model training: {experiments_url(url)}"])
    command = mlflow_ui_command(args.tracking_uri, args.port, args.host)
    print(f"MLflow UI on {url} ({' '.join(command)})", flush=True)
    print("\n".join(lines), flush=True)
    os.execvp(command[0], command)
    return 0  # not reached


def cmd_report(args: argparse.Namespace) -> int:
    from deconvlab.sweep.report import write_report

    print(write_report(args.sweep, args.output, args.tracking_uri, measure_costs=_measure_costs))
    return 0


def _measure_costs(client, run_ids: list[str]) -> dict:
    """Costs of the trials of a sweep that ran before the driver logged them: torch and the model builders
    (~4 s) are imported only for such a sweep."""
    from deconvlab.cost import trial_costs

    return trial_costs(client, run_ids, log=False)


def cmd_promote(args: argparse.Namespace) -> int:
    from deconvlab.promote import describe, promote

    promotion = promote(args.source, args.name, metric=args.metric, mode=args.mode, alias=args.alias,
                        force=args.force, tracking_uri=args.tracking_uri)
    print("\n".join(describe(promotion)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deconvlab.evaluate import evaluate, format_metrics

    evaluation = evaluate(args.model_uri, args.overrides, tracking_uri=args.tracking_uri, trust=args.trust,
                          log=not args.no_log, per_item=args.per_item, config=args.config)
    if args.json:
        import json

        print(json.dumps(evaluation.to_dict(), indent=2))
    else:
        print("\n".join(format_metrics(evaluation)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from deconvlab.compare import compare, format_comparison

    comparison = compare(args.model_a, args.model_b, args.overrides, metric=args.metric,
                         tracking_uri=args.tracking_uri, trust=args.trust, log=not args.no_log,
                         config_a=args.config_a, config_b=args.config_b)
    if args.json:
        import json

        print(json.dumps(comparison.to_dict(), indent=2))
    else:
        print("\n".join(format_comparison(comparison)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from deconvlab.predict import predict

    # How each input was read (which file fed which modality, RGB restored per channel) comes first, then
    # every file written, one path a line: the lines a user checks and a script reads.
    written = predict(args.model_uri, args.inputs, args.output, tracking_uri=args.tracking_uri,
                      trust=args.trust, say=print, tile=args.tile)
    print("\n".join(str(path) for path in written))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from deconvlab.runs import list_versions, print_versions

    rows = list_versions(args.tracking_uri, args.name)
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        print_versions(rows, args.tracking_uri)
    return 0


def _add_registry_commands(sub: argparse._SubParsersAction) -> None:
    uri_help = "default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    trust_help = "allow unpickling (checkpoints holding Python objects, other MLflow flavours): trusted only"
    promote = sub.add_parser("promote", help="register the best checkpoint of a sweep or run; move an alias")
    promote.add_argument("source", help="a sweep name (its latest run), a sweep's parent run id, or a run id "
                                        "(a unique prefix of >= 6 characters will do)")
    promote.add_argument("--name", required=True, help="registered model name, e.g. quickstart-deblur")
    promote.add_argument("--metric", help="ranking metric (default: the sweep's, or the task's monitor)")
    promote.add_argument("--mode", choices=["max", "min"], help="default: the sweep's/task's")
    promote.add_argument("--alias", default="champion",
                         help="alias to move when the new version is better (default: champion)")
    promote.add_argument("--force", action="store_true", help="move the alias even if not better")
    promote.add_argument("--tracking-uri", help=uri_help)
    promote.set_defaults(func=cmd_promote)

    evaluate = sub.add_parser("evaluate", help="a model's metrics on its validation split or on other data")
    model_help = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a .ckpt file written by train"
    config_help = "the config.yaml of a .ckpt (default: found next to it or through its tracked run)"
    evaluate.add_argument("model_uri", help=model_help)
    evaluate.add_argument("overrides", nargs="*", help="data overrides, e.g. data.split=test data.root=DIR")
    evaluate.add_argument("--per-item", metavar="FILE.csv",
                          help="also write one row per image/case (its id and every metric); logged as per_item.csv")
    evaluate.add_argument("--config", metavar="FILE", help=config_help)
    _add_result_options(evaluate, "do not log an evaluation run", trust_help, uri_help)
    evaluate.set_defaults(func=cmd_evaluate)

    compare = sub.add_parser("compare", help="two models on the same items: paired difference, CI, p-value")
    compare.add_argument("model_a", help=f"model A: {model_help}")
    compare.add_argument("model_b", help="model B, of the same task family")
    compare.add_argument("overrides", nargs="*", help="data overrides of A's data config (both get the result)")
    compare.add_argument("--metric", help="a per-item metric, e.g. val/ssim (default: A's task monitor)")
    compare.add_argument("--config-a", metavar="FILE", help=config_help)
    compare.add_argument("--config-b", metavar="FILE", help=config_help)
    _add_result_options(compare, "do not log a run in experiment comparisons", trust_help, uri_help)
    compare.set_defaults(func=cmd_compare)

    predict_description = """\
Apply a model to files. What each task family takes, and writes into -o OUT:
  restoration     grey or RGB image (PNG, JPEG, ...) -> NAME_restored.png, same size and channels
                  (RGB through a one-channel model: restored channel by channel, written as RGB)
  segmentation    RGB image -> NAME_labels.png (class index per pixel, 8-bit grey like the data sets'
                  annotations), NAME_colour.png (class colours), NAME_overlay.png (colours on the image)
  volumetric      a case folder (modalities found by name: flair.nii.gz or *_flair.nii.gz, t1c/t1ce,
                  t1, t2), the modality files (named so, or in the model's order: its data.modalities,
                  flair t1c for BraTS models), or one 4-D NIfTI (modalities last)
                  -> CASE_labels.nii.gz (uint8, the input's grid, affine, qform/sform codes and units)
  reconstruction  grey image of the training size (e.g. a 28x28 digit) -> NAME_reconstruction.png
  localisation    RGB image -> NAME_box.png (the box in its class colour), NAME_box.json

It prints which file fed which modality (and any per-channel processing), then every file written.
All or nothing: every input is read and checked first; if any fails, no output is left, nor an
output folder this call created."""
    predict = sub.add_parser("predict", help="apply a model to files: images, MRI case folders, NIfTI volumes",
                             description=predict_description, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a .ckpt "
                                           "file written by train")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, or for a volume model case folders, modality files or 4-D NIfTIs "
                              "(what each task family takes: above)")
    predict.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    predict.add_argument("--tile", type=int, metavar="N",
                         help="inputs with a side above N run tile by tile, equal to one pass (same-size networks "
                              "that can be tiled exactly; others run in one pass and predict says so); "
                              "default: 1024 pixels for images, 128 voxels for volumes; 0: never tile")
    predict.add_argument("--trust", action="store_true", help=trust_help)
    predict.add_argument("--tracking-uri", help=uri_help)
    predict.set_defaults(func=cmd_predict)

    models = sub.add_parser("models", help="registered models: versions, aliases, metrics, lineage")
    models.add_argument("name", nargs="?", help="only this registered model")
    models.add_argument("--json", action="store_true", help="print the rows as JSON")
    models.add_argument("--tracking-uri", help=uri_help)
    models.set_defaults(func=cmd_models)


def _add_result_options(parser: argparse.ArgumentParser, no_log_help: str, trust_help: str,
                        uri_help: str) -> None:
    """The options evaluate and compare share: JSON output, logging, trust and the store."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-log", action="store_true", help=no_log_help)
    parser.add_argument("--trust", action="store_true", help=trust_help)
    parser.add_argument("--tracking-uri", help=uri_help)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="deconvlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the stack's own output: Lightning/MLflow/Ray info lines, deprecation "
                             "warnings, Ray Tune's trial tables and the trials' worker logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train one run: deconvlab train experiment=quickstart key=value ...",
                           epilog="deconvlab list experiments shows the experiments; deconvlab list "
                                  "[models|data] the groups to combine; --cfg job the composed config.")
    train.add_argument("overrides", nargs="*",
                       help="Hydra overrides: experiment=NAME (required, see deconvlab list experiments), "
                            "then key=value, e.g. optim.lr=1e-3")
    train.add_argument("--from-run", metavar="RUN_ID",
                       help="train again from a tracked run's or sweep trial's logged config.yaml (same seed); "
                            "the overrides apply on top of it")
    train.add_argument("--cfg", choices=["job", "all"],
                       help="print the composed config and exit (job and all print the same: a run's config "
                            "has no separate hydra: section)")
    train.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations")
    train.add_argument("--quiet", action="store_true", help="no progress bars (for scripts and logs)")
    train.add_argument("-m", "--multirun", action="store_true",
                       help="Hydra's multirun: every key=a,b list is a grid dimension; the grid runs as a sweep "
                            "(Ray Tune, one MLflow parent run) from a sweep file written under outputs/multirun/")
    train.add_argument("--dry-run", action="store_true", help="with -m: print the grid's trials and exit")
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser("sweep",
                           help="run a Ray Tune sweep: deconvlab sweep quickstart [overrides] [--smoke-test]")
    sweep.add_argument("sweep", help="a name under sweeps/ or a path to a sweep YAML")
    sweep.add_argument("overrides", nargs="*", help="Hydra overrides for every trial")
    sweep.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: a local cluster)")
    sweep.add_argument("--smoke-test", action="store_true", help="tiny data, few short trials")
    sweep.add_argument("--storage", help="Ray storage_path for checkpoints and state (default ./ray_results)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the newest interrupted run of this sweep "
                            "(same --storage and tracking store)")
    sweep.add_argument("--quiet", action="store_true", help="no progress output or leaderboard")
    sweep.add_argument("--dry-run", action="store_true",
                       help="validate, print the search space and the first trials' overrides, and exit "
                            "(no Ray, no run)")
    sweep.set_defaults(func=cmd_sweep)

    listing = sub.add_parser("list", help="what can be run: experiments, models, data, sweeps")
    listing.add_argument("kind", nargs="?", choices=[*KINDS, "sweeps"])
    listing.set_defaults(func=cmd_list)

    data = sub.add_parser("data",
                          help="check a data set before training: deconvlab data check data=camvid data.root=DIR")
    data.add_argument("action", choices=["check"],
                      help="check: read every item of the train, val and test splits once; counts, input shapes, "
                           "label histograms and every problem with its file; exit 2 if any")
    data.add_argument("overrides", nargs="*", help="data=NAME, data.root=DIR, or experiment=NAME for its data")
    data.set_defaults(func=cmd_data)

    runs = sub.add_parser("runs", help="a table of tracked runs and their key metrics, per experiment",
                          description="The newest runs, one table per experiment: the experiment's ranking metric "
                                      "first, then the other best/ val/ test/ metrics sorted, as many columns as "
                                      "the terminal fits. Ids are shown as the shortest unique prefix (>= 8); any "
                                      "unique prefix of >= 6 characters works wherever a run id is accepted.")
    runs.add_argument("--experiment", metavar="NAME",
                      help="an experiment, or a sweep as you ran it (quickstart finds sweep-quickstart) "
                           "(default: all experiments)")
    runs.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    runs.add_argument("--max-results", type=int, default=50, metavar="N",
                      help="show the N newest runs (default: 50)")
    runs.add_argument("--wide", action="store_true", help="every metric column, however wide")
    runs.add_argument("--json", action="store_true",
                      help="print the runs as JSON: full ids, every metric (for scripts)")
    runs.set_defaults(func=cmd_runs)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the same store")
    ui.add_argument("sweep", nargs="?", metavar="SWEEP",
                    help="a sweep name (its latest run), or a parent or trial run id: print the URL that opens its "
                         "comparison (trials, metric, sampled values, cost, charts)")
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default loopback only; 0.0.0.0 exposes the UI to the network)")
    ui.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ui.set_defaults(func=cmd_ui)

    report = sub.add_parser("report", help="a sweep as one self-contained HTML page (images inlined)")
    report.add_argument("sweep", help="a sweep name (its latest run), or the run id of its parent or a trial")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default: report.html)")
    report.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    report.set_defaults(func=cmd_report)

    _add_registry_commands(sub)
    parser.commands = sub.choices
    completion = sub.add_parser("completion",
                                help="print a shell completion script: eval \"$(deconvlab completion bash)\"")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=lambda args: _print_completion(parser, args.shell))
    helping = sub.add_parser("help", help="help on deconvlab or one command: deconvlab help train")
    helping.add_argument("topic", nargs="?", choices=sorted(sub.choices), metavar="COMMAND")
    helping.set_defaults(func=lambda args: _print_help(parser, sub, args.topic))
    for command in sub.choices.values():  # `deconvlab train ... --debug` works as well as `deconvlab --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="also show the stack's own output (see deconvlab --help)")
    return parser


def _print_help(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction, topic: str | None) -> int:
    """``deconvlab help [COMMAND]``, as git has it: the same text as ``--help``."""
    (sub.choices[topic] if topic else parser).print_help()
    return 0


def _print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    from deconvlab.completion import completion_script

    print(completion_script(parser, shell), end="")
    return 0


def _refused_by_tracking_server(exc: Exception, tracking_uri: str | None):
    """A request a team tracking server refused (HTTP 401/403) as a user error naming what is missing.

    Only looked at once MLflow is loaded: before that no request was made (and ``deconvlab --help`` stays fast).
    """
    if "mlflow" not in sys.modules:
        return None
    from deconvlab.access import refusal

    return refusal(exc, tracking_uri=tracking_uri)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning exceptions into one line and an exit code.

    A UserError (also one that Hydra's ``instantiate`` wrapped) exits 2, Ctrl-C exits 130, anything
    else is internal and exits 1; with ``--debug`` the traceback is shown instead.
    """
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the guard, not in Python's exit flush
        return code
    except (KeyboardInterrupt, SystemExit) as exc:
        if not was_interrupted(exc):  # a deliberate sys.exit(code) goes through unchanged
            raise
        print(f"error: interrupted (deconvlab {args.command}): runs were closed KILLED; "
              "a sweep continues with deconvlab sweep NAME --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `deconvlab runs | head`: the reader left, which is not an error. Python would report the pipe
        # again when flushing stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        user_error = user_error_in(exc) or _refused_by_tracking_server(exc, getattr(args, "tracking_uri", None))
        if user_error is not None:
            print(f"error: {user_error.one_line()}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {type(exc).__name__}: {first_line(exc, 300)} (internal, deconvlab {args.command}): "
              "rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deconvlab`` console script."""
    _quiet_environment()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # `train experiment=x --quiet key=value`: argparse stops at the option
        args.overrides += [arg for arg in unknown if not arg.startswith("-")]
        unknown = [arg for arg in unknown if arg.startswith("-")]
    if unknown:  # reported by the subcommand's parser, so the error names `deconvlab train`, not `deconvlab`
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from deconvlab.console import quiet_third_party, set_progress

    quiet_third_party(verbose=args.verbose or args.debug)
    set_progress(not getattr(args, "quiet", False))
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
