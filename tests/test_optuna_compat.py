"""search/_optuna_compat.py against the installed Optuna: every function does its job, and a moved
internal is a clear error before a study starts (run this file under each supported Optuna version)."""

from __future__ import annotations

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from evomerge_opt.search import _optuna_compat as compat
from evomerge_opt.search.storage import make_storage


@pytest.fixture
def study(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'c.db'}", heartbeat_interval=None)
    return optuna.create_study(study_name="compat", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))


def test_installed_optuna_is_supported():
    assert compat._problems() == []
    compat.require()


def test_a_moved_internal_is_named_before_the_study_starts(monkeypatch, tmp_path):
    monkeypatch.delattr(optuna.Study, "_pop_waiting_trial_id")
    problems = compat._problems()
    assert any("_pop_waiting_trial_id" in p for p in problems)
    monkeypatch.setattr(compat, "_PROBLEMS", problems)
    with pytest.raises(compat.OptunaCompatError, match=r"optuna>=5,<6.*_pop_waiting_trial_id"):
        compat.require()
    # The runner checks in setup(), before it opens storage, loads models or runs a trial.
    from evomerge_opt.search.runner import SearchRunner

    runner = SearchRunner.__new__(SearchRunner)
    runner.worker = True
    with pytest.raises(compat.OptunaCompatError):
        runner.setup()


def test_storage_ids_and_system_attrs_round_trip(study):
    storage = compat.study_storage(study)
    assert storage.get_study_id_from_name("compat") == compat.study_id(study)
    assert isinstance(compat.cached_storage_backend(storage), RDBStorage)
    compat.set_study_system_attr(study, "k", {"a": [1, 2]})
    assert compat.study_system_attrs(study)["k"] == {"a": [1, 2]}
    trial = study.ask()
    compat.set_trial_system_attr(study, trial, "slot", 3)
    (frozen,) = study.get_trials()
    assert compat.trial_id(frozen) == compat.trial_id(trial)
    assert frozen.system_attrs["slot"] == 3


def test_heartbeat_times(study):
    backend = compat.cached_storage_backend(compat.study_storage(study))
    silent, beating = study.ask(), study.ask()
    backend.record_heartbeat(compat.trial_id(beating))
    times = compat.heartbeat_times(backend, {compat.trial_id(silent), compat.trial_id(beating)})
    assert set(times) == {compat.trial_id(beating)}
    assert compat.heartbeat_times(backend, set()) == {}


def test_claiming_study_routes_ask_through_the_hook(study):
    claims = []

    class Refusing(compat.ClaimingStudy):
        def claim_trial_id(self):
            claims.append(1)
            waiting = self.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting:
                raise LookupError("nothing to claim")
            storage = compat.study_storage(self)
            assert storage.set_trial_state_values(compat.trial_id(waiting[-1]), TrialState.RUNNING)
            return compat.trial_id(waiting[-1])

    claiming = Refusing(study_name="compat", storage=compat.study_storage(study))
    claiming.enqueue_trial({"x": 0.1})
    claiming.enqueue_trial({"x": 0.9})
    trial = claiming.ask()  # takes the LAST waiting trial: the hook decided, not Optuna's queue order
    assert trial.suggest_float("x", 0, 1) == 0.9 and claims == [1]
    claiming.tell(trial, 1.0)
    assert claiming.ask().suggest_float("x", 0, 1) == 0.1
    with pytest.raises(LookupError):
        claiming.ask()  # no fall-back to a fresh trial behind the hook's back
    # The default hook is Optuna's own behaviour: the first WAITING trial, else a new one.
    plain = compat.ClaimingStudy(study_name="compat", storage=compat.study_storage(study))
    plain.enqueue_trial({"x": 0.5})
    assert plain.ask().suggest_float("x", 0, 1) == 0.5
    assert plain.ask().number == len(plain.get_trials()) - 1
