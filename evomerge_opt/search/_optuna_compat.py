"""The only place that touches Optuna's private names (supported: ``optuna>=5,<6``).

Everything else in evo-merge uses Optuna's public API (``study.optimize``, ``trial.suggest_float``,
``trial.set_user_attr``, ``trial.report``, ``study.enqueue_trial``, ``study.get_trials``, the public
``BaseStorage`` methods). What the public API cannot do, and why:

* **Study/trial system attributes and the storage behind a study** (``study._storage``,
  ``study._study_id``, ``FrozenTrial._trial_id``): Optuna 5 has no public ``Study.system_attrs``, and
  a sampler that keeps its state in the study (pycma's ES, ``search/samplers.py``) or the exact budget
  must reach the storage. The public ``BaseStorage`` methods are then used on it.
* **The exact budget's claim of a WAITING trial** (``Study._pop_waiting_trial_id``): ``Study.ask``
  (and so ``optimize``, which also runs the heartbeat thread and the stale-trial retry) takes a
  WAITING trial or creates a new one; it has no hook to refuse. :class:`ClaimingStudy` routes that one
  call to :meth:`ClaimingStudy.claim_trial_id`.
* **The storage behind Optuna's cache wrapper** (``_CachedStorage._backend``) and **heartbeat times**
  (the ``trial_heartbeats`` table, ``optuna.storages._rdb.models``): needed to tell a dead worker's
  silent trial from a live one on restart (``search/storage.py``).

:func:`require` checks every name used here against the installed Optuna and raises
:class:`OptunaCompatError` (an :class:`~evomerge_opt.errors.EvoMergeError`, so the CLI prints it) naming
the version and what moved; :class:`~evomerge_opt.search.runner.SearchRunner` calls it in ``setup()``,
before any trial starts, so a renamed internal never raises ``AttributeError`` mid-study.
``tests/test_optuna_compat.py`` exercises each function on the installed version (run it under every
supported Optuna version: 5.0.0 and 5.1.0 were checked).

What the removed batching saved (measured, ``benchmarks/optuna_overhead.py``): evo-merge used to write
a trial's 50-100 genome parameters and its ~10 user attributes in one SQLite transaction each, through
``_rdb.models`` and ``_set_trial_attr_without_commit``. The public per-call API costs more storage time
per trial: measured on SQLite (2-core machine, interleaved), +0.075 s per trial for 130 genome
coordinates and +0.158 s for 260, against 95.5 s for building and scoring one SmolLM2-360M-shaped
TIES candidate on the CPU (0.1-0.2%); details in ``benchmarks/README.md`` ("Optuna storage overhead").
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

from evomerge_opt.errors import EvoMergeError

SUPPORTED = ">=5,<6"


class OptunaCompatError(EvoMergeError):
    """The installed Optuna lacks an internal evo-merge relies on (see this module's docstring)."""


def _problems() -> list[str]:
    out = []
    major = optuna.__version__.split(".")[0]
    if major != "5":
        out.append(f"optuna {optuna.__version__} is installed, but evo-merge supports optuna{SUPPORTED}")
    if not callable(getattr(optuna.Study, "_pop_waiting_trial_id", None)):
        out.append("optuna.Study._pop_waiting_trial_id is gone (the exact budget claims WAITING trials through it)")
    # Attributes set in __init__ appear among the names its code stores.
    for cls, names in ((optuna.Study, ("_storage", "_study_id")), (FrozenTrial, ("_trial_id",)),
                       (optuna.Trial, ("_trial_id",))):
        for name in names:
            if name not in cls.__init__.__code__.co_names:
                out.append(f"{cls.__module__}.{cls.__name__} no longer sets `{name}`")
    if "_backend" not in _cached_storage_init_names():
        out.append("optuna's _CachedStorage no longer wraps its storage as `_backend`")
    try:
        from optuna.storages._rdb import models

        models.TrialHeartbeatModel.trial_id  # noqa: B018  (the column the heartbeat query reads)
        models.TrialHeartbeatModel.heartbeat  # noqa: B018
    except (ImportError, AttributeError) as exc:
        out.append(f"optuna.storages._rdb.models.TrialHeartbeatModel moved ({exc})")
    return out


def _cached_storage_init_names() -> tuple[str, ...]:
    try:
        from optuna.storages._cached_storage import _CachedStorage
    except ImportError:
        return ()
    return _CachedStorage.__init__.__code__.co_names


_PROBLEMS = _problems()


def require() -> None:
    """Raise :class:`OptunaCompatError` if the installed Optuna lacks an internal used here."""
    if _PROBLEMS:
        raise OptunaCompatError(
            f"This evo-merge needs optuna{SUPPORTED}; with the installed optuna {optuna.__version__}: "
            + "; ".join(_PROBLEMS)
            + f". Install a supported version: pip install 'optuna{SUPPORTED}'."
        )


# ---- the storage behind a study, system attributes ------------------------------------------------------


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (Optuna's cache wrapper around an RDBStorage)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage."""
    return study._study_id


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The trial's id in its storage (``Trial`` exposes ``_trial_id`` too)."""
    return trial._trial_id


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes, read fresh from the storage."""
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def set_trial_system_attr(study: optuna.Study, trial: FrozenTrial | optuna.Trial, key: str, value: Any) -> None:
    """Set a system attribute of a running trial (what samplers do in ``sample_relative``)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def cached_storage_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage behind Optuna's in-process cache wrapper (``study_storage`` returns the wrapper)."""
    return getattr(storage, "_backend", storage)


# ---- heartbeats -------------------------------------------------------------------------------------------


def heartbeat_times(storage: optuna.storages.RDBStorage, trial_ids: set[int]) -> dict[int, Any]:
    """trial_id -> last heartbeat time (database clock) for the trials that have one."""
    from optuna.storages._rdb import models

    if not trial_ids:
        return {}
    session = storage.scoped_session()
    try:
        rows = (
            session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
            .filter(models.TrialHeartbeatModel.trial_id.in_(sorted(trial_ids)))
            .all()
        )
    finally:
        session.close()
    return {tid: beat for tid, beat in rows}


# ---- claiming WAITING trials --------------------------------------------------------------------------------


class ClaimingStudy(optuna.Study):
    """An :class:`optuna.Study` whose ``ask`` (and so ``optimize``) takes its trial from
    :meth:`claim_trial_id` instead of Optuna's "first WAITING trial, else a new one"."""

    def claim_trial_id(self) -> int | None:
        """The id of a trial this worker moved from WAITING to RUNNING, or ``None`` (Optuna then creates
        a new trial). Override it; the default is Optuna's own choice."""
        return super()._pop_waiting_trial_id()

    def _pop_waiting_trial_id(self) -> int | None:  # Optuna's hook inside Study.ask
        return self.claim_trial_id()
