"""Lightning callbacks from config (conf/callbacks/), next to the platform's own."""

from __future__ import annotations

import pytest
from pytorch_lightning.callbacks import EarlyStopping

from deconvlab.build import build_callbacks
from deconvlab.callbacks import LearningRateLog
from deconvlab.config import compose_config
from deconvlab.errors import UserError
from deconvlab.train import train

QUICK = ["experiment=quickstart", "debug=smoke", "logger=none"]


def test_a_list_of_callbacks_composes_and_builds_with_the_tasks_monitor():
    cfg = compose_config([*QUICK, "callbacks=[early_stopping,lr_monitor]"])
    built = build_callbacks(cfg)
    assert [type(c) for c in built] == [EarlyStopping, LearningRateLog]
    assert built[0].monitor == "val/psnr" and built[0].mode == "max"
    assert build_callbacks(compose_config(QUICK)) == []


def test_trainer_callbacks_are_refused_instead_of_dropped():
    cfg = compose_config([*QUICK, "+trainer.callbacks=[]"])
    with pytest.raises(UserError, match="callbacks=\\[early_stopping,lr_monitor\\]"):
        build_callbacks(cfg)


def test_a_callback_that_cannot_be_built_is_one_user_error():
    cfg = compose_config([*QUICK, "+callbacks.stop={_target_:pytorch_lightning.callbacks.EarlyStopping,nonsense:1}"])
    with pytest.raises(UserError, match="callbacks.stop"):
        build_callbacks(cfg)
    cfg = compose_config([*QUICK, "+callbacks.odd={_target_:collections.OrderedDict}"])
    with pytest.raises(UserError, match="not a Lightning Callback"):
        build_callbacks(cfg)


def test_early_stopping_stops_and_the_learning_rate_is_logged_without_a_logger(tmp_path):
    # lr 0: the monitor never improves after the first epoch, so patience 1 stops after the second of 10.
    cfg = compose_config([*QUICK, "callbacks=[early_stopping,lr_monitor]", "callbacks.early_stopping.patience=1",
                          "trainer.max_epochs=10", "optim.lr=0.0", f"paths.root_dir={tmp_path}"])
    result = train(cfg)
    assert result.metrics["lr"] == 0.0
    log = next(tmp_path.glob("quickstart/*/train.log")).read_text()
    assert log.count(" epoch ") == 2 and "lr=0" in log
