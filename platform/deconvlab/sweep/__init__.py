"""Sweeps: ``sweeps/*.yaml`` (data, not code) run as Ray Tune experiments and tracked in MLflow.

- :mod:`.spec` reads and validates a sweep file into a :class:`~.spec.SweepSpec`.
- :mod:`.trial` is what one trial runs: compose the config, then the same ``train(cfg)`` as a single run.
- :mod:`.tracking` is the driver-side MLflow callback (parent run, one child run per trial, leaderboard).
- :mod:`.runner` wires them into a ``ray.tune.Tuner``.
"""
