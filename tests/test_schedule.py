"""The plateau learning-rate drop and the stop rule on controlled error sequences."""

import pytest

from engine.errors import UsageError
from engine.training import STOP_CAP, STOP_TARGET, PlateauSchedule, TrainConfig


def run(errors, **config):
    schedule = PlateauSchedule(TrainConfig(**config))
    lrs = []
    for error in errors:
        if schedule.stopped:
            break
        schedule.update(error)
        lrs.append(schedule.lr)
    return schedule, lrs


def test_drop_after_ten_epochs_without_decrease():
    # Epoch 1 sets the best (0.5); epochs 2..11 do not decrease it, so the drop is after epoch 11.
    schedule, lrs = run([0.5] + [0.5] * 10 + [0.6])
    assert schedule.lr_drops == [11]
    assert lrs[9] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.0025)
    assert schedule.stop_reason is None


def test_decrease_resets_the_count():
    errors = [0.5] + [0.6] * 9 + [0.4] + [0.45] * 9
    schedule, _ = run(errors)
    assert schedule.lr_drops == []
    assert schedule.epochs_without_decrease == 9


def test_equal_error_is_not_a_decrease():
    schedule, _ = run([0.3] * 11)
    assert schedule.lr_drops == [11]


def test_count_restarts_after_a_drop():
    schedule, _ = run([0.5] * 31)
    assert schedule.lr_drops == [11, 21, 31]
    assert schedule.lr == pytest.approx(0.01 / 4**3)


def test_stop_below_target_is_strict():
    schedule, _ = run([0.5, 0.01, 0.0099, 0.0])
    assert schedule.stop_reason == STOP_TARGET
    assert schedule.epoch == 3


def test_stop_at_cap():
    schedule, _ = run([0.5] * 20, max_epochs=7)
    assert schedule.stop_reason == STOP_CAP
    assert schedule.epoch == 7


def test_target_wins_on_the_last_epoch():
    schedule, _ = run([0.5, 0.5, 0.005], max_epochs=3)
    assert schedule.stop_reason == STOP_TARGET


def test_custom_knobs():
    schedule, _ = run([0.5] * 4, plateau_epochs=2, lr_drop_factor=10.0, lr=0.1)
    assert schedule.lr_drops == [3]
    assert schedule.lr == pytest.approx(0.01)


def test_update_after_stop_raises():
    schedule, _ = run([0.0])
    with pytest.raises(RuntimeError):
        schedule.update(0.0)


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0.0), ("batch_size", 0), ("max_epochs", -1), ("plateau_epochs", 1.5), ("precision", "fp8")],
)
def test_invalid_config_rejected(field, value):
    with pytest.raises(UsageError, match=field):
        TrainConfig(**{field: value})


def test_from_dict_rejects_unknown_key():
    with pytest.raises(UsageError, match="unknown training option 'momentun'"):
        TrainConfig.from_dict({"momentun": 0.9})
