"""The exact trial budget shared by every worker of a study.

**Budget.** ``--trials N`` is the study's total, counted over every trial it holds (COMPLETE, PRUNED,
FAIL, RUNNING and WAITING; the baselines included), so a restarted search finishes exactly ``N``. A
trial failed by the heartbeat (its worker died) and re-enqueued as a retry counts once. ``N`` is the
study system attribute ``evomerge:budget_total``. A worker never lets Optuna create a trial: it claims
a WAITING one (Optuna's atomic WAITING -> RUNNING transition), enqueuing one parameter-less "token"
trial first when none is waiting and the budget allows, and then checks its *rank* (the counted trials
numbered below it). Two workers racing for the last slot both see a rank; the one ranked beyond ``N``
puts its token back as WAITING (marked ``evomerge:surplus``, never counted or claimed) and stops. So
several workers (processes or machines) finish exactly ``N`` trials between them. Tokens are created
one at a time because every WAITING trial is re-read from the database on each Optuna trial query.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.search import _optuna_compat as compat
from evomerge_opt.search._optuna_compat import ClaimingStudy

BUDGET_ATTR = "evomerge:budget_total"
TOKEN_ATTR = "evomerge:budget"
SURPLUS_ATTR = "evomerge:surplus"


def budget_total(study: optuna.Study) -> int | None:
    """The study's total budget (``None``: not a study made by ``evo-merge search``)."""
    total = compat.study_system_attrs(study).get(BUDGET_ATTR)
    return None if total is None else int(total)


def set_budget_total(study: optuna.Study, total: int) -> None:
    compat.set_study_system_attr(study, BUDGET_ATTR, int(total))


class BudgetExhausted(Exception):
    """No trial of the budget is left for this worker to start."""


def _superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of FAILED trials that were re-enqueued as retries (the retry counts instead)."""
    retried: set[int] = set()
    for t in trials:
        retried.update(t.system_attrs.get("retry_history", []) or [])
    return {t.number for t in trials if t.state == TrialState.FAIL and t.number in retried}


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use the budget: all but superseded failures and surplus tokens."""
    skip = _superseded(trials)
    return [t for t in trials if t.number not in skip and not t.system_attrs.get(SURPLUS_ATTR)]


def budget_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """``started`` (finished or running, retries counted once), ``waiting``, ``finished``."""
    started = finished = waiting = 0
    for t in _counted(trials):
        if t.state == TrialState.WAITING:
            waiting += 1
        else:
            started += 1
            finished += t.state.is_finished()
    return {"started": started, "waiting": waiting, "finished": finished}


class BudgetedStudy(ClaimingStudy):
    """An Optuna study whose workers only start trials the budget allows (see the module docstring).

    ``Study.ask`` creates a brand-new trial when no WAITING one is left; here the worker claims a
    waiting trial (or a token it enqueues) instead, or stops with :class:`BudgetExhausted`.
    """

    def claim_trial_id(self) -> int | None:
        storage, study_id = compat.study_storage(self), compat.study_id(self)
        total = storage.get_study_system_attrs(study_id).get(BUDGET_ATTR)
        if total is None:  # not a study made by SearchRunner: plain Optuna behaviour
            return super().claim_trial_id()
        total = int(total)
        for _ in range(1000):
            trials = storage.get_all_trials(study_id, deepcopy=False)
            counts = budget_counts(trials)
            if counts["started"] >= total:
                raise BudgetExhausted(f"the study's {total} trials are all started")
            waiting = [t for t in trials if t.state == TrialState.WAITING and not t.system_attrs.get(SURPLUS_ATTR)]
            if not waiting:
                # A parameter-less token (the sampler fills it when the trial starts), claimed at once.
                token = optuna.create_trial(state=TrialState.WAITING, system_attrs={TOKEN_ATTR: True})
                trial_id = storage.create_new_trial(study_id, template_trial=token)
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    self._check_rank(trial_id, storage.get_trial_number_from_id(trial_id), True, total)
                    return trial_id
                continue
            for candidate in waiting:
                try:
                    if not storage.set_trial_state_values(compat.trial_id(candidate), state=TrialState.RUNNING):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                self._check_rank(compat.trial_id(candidate), candidate.number,
                                 bool(candidate.system_attrs.get(TOKEN_ATTR)), total)
                return compat.trial_id(candidate)
        raise BudgetExhausted("could not claim a waiting trial (other workers took them all)")

    def _check_rank(self, trial_id: int, number: int, is_token: bool, total: int) -> None:
        """Give the claimed trial back (and stop) when ``total`` counted trials are numbered below it."""
        storage = compat.study_storage(self)
        trials = storage.get_all_trials(compat.study_id(self), deepcopy=False)
        rank = sum(1 for t in _counted(trials) if t.number < number)
        if rank < total:
            return
        if is_token:
            storage.set_trial_system_attr(trial_id, SURPLUS_ATTR, True)
        storage.set_trial_state_values(trial_id, state=TrialState.WAITING)
        raise BudgetExhausted(f"trial {number} is beyond the budget of {total} (another worker was first)")
