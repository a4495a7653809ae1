"""Sweeps: ``sweeps/*.yaml`` (data, not code) run as Ray Tune experiments and tracked in MLflow.

What runs where, in the order the modules import each other (each imports only those above it):

- :mod:`.spec` reads and validates a sweep file into a :class:`~.spec.SweepSpec`, and composes a trial's config.
- :mod:`.trial_callbacks` is what a trial's training reports to Ray (metrics, checkpoint, samples), shared
  by one-process trials and DDP workers.
- :mod:`.distributed` runs a trial on several Ray Train DDP workers; :mod:`.trial` is what one trial runs:
  compose the config, then the same ``train(cfg)`` as a single run.
- :mod:`.child_runs` is the driver-side Tune callback that logs one MLflow child run per trial;
  :mod:`.repeats` runs each sampled config with ``repeats`` seeds and tags the seeds of one config alike.
- :mod:`.leaderboard` reads the trials back as a ranked table; :mod:`.plots` draws it; :mod:`.report`
  renders report.html; :mod:`.views` logs every view of a finished sweep to its parent run.
- :mod:`.runner` wires them into a ``ray.tune.Tuner``.
"""
