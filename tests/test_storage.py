"""Study storage: default SQLite location and tuning, heartbeats, stale-trial failure and retry, load errors."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime

import optuna
import pytest
import sqlalchemy
from optuna.storages._heartbeat import HeartbeatThread
from optuna.trial import TrialState

from evomerge_opt.errors import ConfigError
from evomerge_opt.search import storage as S

optuna.logging.set_verbosity(optuna.logging.WARNING)
# These tests drive trials by hand (ask + heartbeats) to play a dead or live worker, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning")


def _backdate_heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> None:
    """Pretend the trial's worker died long ago (a fixed old date: no time-zone arithmetic)."""
    old = datetime(2000, 1, 1)
    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t WHERE trial_id = :i"),
            {"t": old, "i": trial_id},
        )


def test_default_storage_url_is_relative_sqlite_and_creates_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert S.default_storage_url("my-study_1") == "sqlite:///studies/my-study_1.db"
    assert (tmp_path / "studies").is_dir()
    with pytest.raises(ConfigError, match="study name"):
        S.default_storage_url("../escape")


def test_sqlite_storage_is_tuned_for_several_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = S.make_storage(study_name="tuned", heartbeat_interval=5, grace_period=20, max_retry=2)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 5 and storage.grace_period == 20
    assert isinstance(
        storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback
    )
    optuna.create_study(study_name="tuned", storage=storage)
    db = tmp_path / "studies" / "tuned.db"
    assert db.is_file()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as conn:  # every pooled connection waits instead of failing on a lock
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == S.SQLITE_BUSY_TIMEOUT_S * 1000


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="grace_period > heartbeat_interval"):
        S.make_storage(f"sqlite:///{tmp_path}/a.db", heartbeat_interval=10, grace_period=5)
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        S.make_storage("not a url")
    with pytest.raises(ConfigError, match="needs a storage URL or a study name"):
        S.make_storage()


def test_stale_trial_is_failed_and_retried_with_the_same_params(tmp_path):
    storage = S.make_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=2, max_retry=1)
    study = optuna.create_study(study_name="retry", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    dead = study.ask()  # a worker asks, samples, records a heartbeat ... then dies
    x = dead.suggest_float("x", 0, 1)
    dead.set_user_attr("genome", [x])
    storage.record_heartbeat(dead._trial_id)
    assert S.fail_stale_trials(study) == []  # heartbeat fresh: not failed
    _backdate_heartbeat(storage, dead._trial_id)

    assert S.fail_stale_trials(study) == [dead.number]
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1
    assert waiting[0].params == {"x": x} and waiting[0].user_attrs["genome"] == [x]
    assert waiting[0].system_attrs["failed_trial"] == dead.number

    retry = study.ask()  # the next worker takes the retry first and gets the same candidate
    assert retry.number == waiting[0].number and retry.suggest_float("x", 0, 1) == x
    storage.record_heartbeat(retry._trial_id)
    _backdate_heartbeat(storage, retry._trial_id)
    assert S.fail_stale_trials(study) == [retry.number]
    # max_retry=1: the second death of the same candidate is not retried again
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]


def test_wait_fails_dead_trials_and_spares_live_ones(tmp_path):
    storage = S.make_storage(f"sqlite:///{tmp_path}/w.db", heartbeat_interval=1, grace_period=2, max_retry=3)
    study = optuna.create_study(study_name="wait", storage=storage)
    dead = study.ask()
    dead.suggest_float("x", 0, 1)
    storage.record_heartbeat(dead._trial_id)  # one heartbeat, then silence (just killed)
    live = study.ask()
    live.suggest_float("x", 0, 1)
    beating = HeartbeatThread(live._trial_id, storage)
    beating.start()
    try:
        start = time.monotonic()
        assert S.fail_stale_trials(study, wait=True, poll_s=0.2) == [dead.number]
        assert time.monotonic() - start < 2 + 1 + 1 + 5  # bounded by grace + interval (+ slack)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        assert states[dead.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
        assert sum(s == TrialState.WAITING for s in states.values()) == 1
    finally:
        beating.join()


def test_heartbeat_off_leaves_running_trials_alone(tmp_path):
    storage = S.make_storage(f"sqlite:///{tmp_path}/o.db", heartbeat_interval=None)
    study = optuna.create_study(study_name="off", storage=storage)
    trial = study.ask()
    assert storage.get_heartbeat_interval() is None
    assert S.fail_stale_trials(study, wait=True) == []
    assert study.get_trials()[trial.number].state == TrialState.RUNNING


def test_load_study_lists_available_studies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = S.default_storage_url("alpha")
    optuna.create_study(study_name="alpha", storage=S.make_storage(url))
    optuna.create_study(study_name="beta", storage=S.make_storage(url))
    assert S.load_study("alpha").study_name == "alpha"  # default file of the study
    assert S.load_study("beta", url).study_name == "beta"
    with pytest.raises(ConfigError, match="Studies there: alpha, beta"):
        S.load_study("gamma", url)
    with pytest.raises(ConfigError, match="Study files found there: alpha"):
        S.load_study("gamma")  # no studies/gamma.db: nothing is created
    assert not (tmp_path / "studies" / "gamma.db").exists()


@pytest.mark.postgres
def test_postgres_url_is_passed_through(pg_url):
    storage = S.make_storage(pg_url, heartbeat_interval=2, grace_period=6)
    assert storage.engine.dialect.name == "postgresql"
    assert storage.engine.pool._pre_ping
    assert S.redact_url("postgresql+psycopg2://u:secret@h/db") == "postgresql+psycopg2://u:***@h/db"


def test_heartbeat_settings_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("EVOMERGE_GRACE_PERIOD", "7")
    monkeypatch.setenv("EVOMERGE_MAX_RETRY", "0")
    storage = S.make_storage(f"sqlite:///{tmp_path}/env.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (2, 7)
    assert storage.get_heartbeat_stale_trial_callback()._max_retry == 0
    assert (
        S.make_storage(f"sqlite:///{tmp_path}/env.db", heartbeat_interval=3, grace_period=9).grace_period == 9
    )
    monkeypatch.delenv("EVOMERGE_GRACE_PERIOD")
    monkeypatch.setenv("EVOMERGE_HEARTBEAT_INTERVAL", "20")
    assert S.make_storage(f"sqlite:///{tmp_path}/env.db").grace_period == 60  # never below 3 intervals
    monkeypatch.setenv("EVOMERGE_HEARTBEAT_INTERVAL", "none")
    assert S.make_storage(f"sqlite:///{tmp_path}/env.db").heartbeat_interval is None
    monkeypatch.setenv("EVOMERGE_HEARTBEAT_INTERVAL", "often")
    with pytest.raises(ConfigError, match="EVOMERGE_HEARTBEAT_INTERVAL must be an integer"):
        S.make_storage(f"sqlite:///{tmp_path}/env.db")


def test_wait_fails_a_trial_killed_before_its_first_heartbeat(tmp_path):
    storage = S.make_storage(f"sqlite:///{tmp_path}/n.db", heartbeat_interval=1, grace_period=2, max_retry=3)
    study = optuna.create_study(study_name="silent", storage=storage)
    dead = study.ask()  # popped and sampled, then killed before the heartbeat thread ran
    x = dead.suggest_float("x", 0, 1)
    assert S.fail_stale_trials(study) == []  # Optuna's own check cannot judge it
    assert S.fail_stale_trials(study, wait=True, poll_s=0.2) == [dead.number]
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert (
        len(retry) == 1
        and retry[0].params == {"x": x}
        and retry[0].system_attrs["failed_trial"] == dead.number
    )


def test_load_study_never_creates_a_missing_sqlite_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        S.load_study("x", f"sqlite:///{tmp_path}/typo.db")
    assert not (tmp_path / "typo.db").exists()
