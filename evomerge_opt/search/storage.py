"""Where studies live: SQLite by default, any SQLAlchemy URL (PostgreSQL for many machines) on request.

Every storage made here has Optuna heartbeats switched on. A worker's trial thread records a heartbeat
every ``heartbeat_interval`` seconds; a RUNNING trial whose heartbeat is older than ``grace_period`` is
*stale* (its worker died: ``kill -9``, OOM killer, lost machine). Any worker of the study fails stale
trials before it starts its next trial (Optuna does this inside ``study.optimize``; :func:`fail_stale_trials`
does it on demand, e.g. when a search restarts), and the storage's
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback` re-enqueues the failed trial as a WAITING
trial with the *same* params and user attributes (up to ``max_retry`` times), so the next free worker
re-runs exactly that candidate. The retry carries ``system_attrs['failed_trial']`` (the first trial of
the series) and ``system_attrs['retry_history']``.

SQLite is tuned for several processes on ONE machine: WAL journal (readers never block the writer), a
60 s busy timeout instead of an immediate ``database is locked`` error, ``synchronous=NORMAL``. It must
not sit on a network file system; use PostgreSQL when workers run on several machines.
"""

from __future__ import annotations

import copy
import logging
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from evomerge_opt.config.names import STUDY_NAME_PATTERN
from evomerge_opt.errors import ConfigError
from evomerge_opt.search import _optuna_compat as compat

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 10
DEFAULT_GRACE_PERIOD = 30
DEFAULT_MAX_RETRY = 3
STUDIES_DIR = "studies"
SQLITE_BUSY_TIMEOUT_S = 60

def check_study_name(study_name: str) -> None:
    if not isinstance(study_name, str) or not STUDY_NAME_PATTERN.match(study_name):
        raise ConfigError(
            f"A study name must match {STUDY_NAME_PATTERN.pattern!r} (letters, digits, '.', '_', '-'; no path "
            f"separators), but got {study_name!r}; choose another --study."
        )


def default_storage_url(study_name: str, root: str | Path = STUDIES_DIR) -> str:
    """``sqlite:///studies/<study>.db`` (relative to the current directory); creates ``studies/``."""
    check_study_name(study_name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / f'{study_name}.db').as_posix()}"


def redact_url(url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _parse_url(url: str) -> Any:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(
            f"--storage must be an SQLAlchemy URL such as 'sqlite:///studies/NAME.db' or "
            f"'postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB', but got {url!r} ({exc})."
        ) from exc


def _sqlite_file(parsed: Any) -> Path | None:
    """The database file of a sqlite URL, or None for an in-memory database."""
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _prepare_sqlite_file(path: Path) -> None:
    """Create the file's folder and switch the database to WAL (a persistent, per-file setting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning(
                "SQLite at %s refused WAL journal mode (got %s); concurrency will be lower.", path, mode
            )
    finally:
        connection.close()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class _FromEnv:
    """Default marker: take the value from the environment variable, else the built-in default."""

    def __repr__(self) -> str:
        return "<from env>"


FROM_ENV: Any = _FromEnv()
ENV_HEARTBEAT_INTERVAL = "EVOMERGE_HEARTBEAT_INTERVAL"
ENV_GRACE_PERIOD = "EVOMERGE_GRACE_PERIOD"
ENV_MAX_RETRY = "EVOMERGE_MAX_RETRY"


def _env_int(name: str, default: int | None) -> int | None:
    """An integer setting from the environment ('' or unset: ``default``; 'none' or '0': None/0)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"Environment variable {name} must be an integer (or 'none'), but got {text!r}."
        ) from None


def make_storage(
    url: str | None = None,
    study_name: str | None = None,
    heartbeat_interval: int | None = FROM_ENV,
    grace_period: int | None = FROM_ENV,
    max_retry: int | None = FROM_ENV,
) -> RDBStorage:
    """An :class:`optuna.storages.RDBStorage` with heartbeats and a retry callback for dead workers' trials.

    ``url=None`` means :func:`default_storage_url` of ``study_name``. ``heartbeat_interval=None`` (or 0)
    switches heartbeats off (then dead workers' trials stay RUNNING forever); ``max_retry=None`` retries
    without limit. ``grace_period`` must exceed ``heartbeat_interval`` (a live worker must never look dead).
    Arguments left at their default come from ``EVOMERGE_HEARTBEAT_INTERVAL`` (default 10 s),
    ``EVOMERGE_GRACE_PERIOD`` (default 30 s, at least 3 heartbeat intervals) and ``EVOMERGE_MAX_RETRY``
    (default 3), so every worker of a deployment can be tuned without new command-line flags.
    """
    import sqlalchemy

    if heartbeat_interval is FROM_ENV:
        heartbeat_interval = _env_int(ENV_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_INTERVAL)
    if grace_period is FROM_ENV:
        grace_period = _env_int(ENV_GRACE_PERIOD, None)
        if grace_period is None and heartbeat_interval:
            grace_period = max(DEFAULT_GRACE_PERIOD, 3 * heartbeat_interval)
    if max_retry is FROM_ENV:
        max_retry = _env_int(ENV_MAX_RETRY, DEFAULT_MAX_RETRY)
    if url is None:
        if study_name is None:
            raise ConfigError(
                "make_storage needs a storage URL or a study name (for the default SQLite file)."
            )
        url = default_storage_url(study_name)
    if heartbeat_interval is not None and heartbeat_interval <= 0:
        heartbeat_interval = None
    if heartbeat_interval is not None:
        if grace_period is None:
            grace_period = 3 * heartbeat_interval
        if grace_period <= heartbeat_interval:
            raise ConfigError(
                f"`grace_period > heartbeat_interval` must hold, but got ({grace_period=}, "
                f"{heartbeat_interval=}); a live worker would look dead. Use e.g. grace_period = 3 x interval."
            )
    if max_retry is not None and max_retry < 0:
        raise ConfigError(f"`max_retry >= 0` must hold, but got {max_retry=}; use 0 to never retry.")

    parsed = _parse_url(url)
    backend = parsed.get_backend_name()
    engine_kwargs: dict[str, Any] = {}
    sqlite_file: Path | None = None
    if backend == "sqlite":
        sqlite_file = _sqlite_file(parsed)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if sqlite_file is not None:
            _prepare_sqlite_file(sqlite_file)
    else:
        # A worker idles for minutes while it evaluates; the server may have dropped its connections.
        engine_kwargs["pool_pre_ping"] = True
        engine_kwargs["pool_recycle"] = 1800

    kwargs: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat_interval is not None:
                kwargs = {
                    "heartbeat_interval": int(heartbeat_interval),
                    "grace_period": int(grace_period),
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                }
            storage = _open_rdb_storage(url, engine_kwargs, kwargs)
    except ImportError as exc:
        hint = (
            " Install it with `pip install 'evomerge-opt[postgres]'`."
            if backend.startswith("postgres")
            else ""
        )
        raise ConfigError(
            f"The database driver for {redact_url(url)!r} is not installed ({exc.__cause__ or exc}).{hint}"
        ) from exc
    except sqlalchemy.exc.OperationalError as exc:
        raise ConfigError(
            f"Cannot open the study storage {redact_url(url)!r}: {exc.orig}. Check that the server runs, "
            "the URL (host, port, user, database) is right and the database exists."
        ) from exc
    if backend == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_on_connect)
        storage.engine.dispose()  # connections opened during set-up lack the pragmas; reopen lazily
    logger.debug(
        "storage %s (heartbeat %ss, grace %ss, max_retry %s)",
        redact_url(url),
        heartbeat_interval,
        grace_period,
        max_retry,
    )
    return storage


def _open_rdb_storage(url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any], attempts: int = 5) -> RDBStorage:
    """``RDBStorage(url)``, retried when another process is creating the same schema at that moment.

    Two workers opening a brand-new database together can both run ``CREATE TABLE``; the loser gets
    "table ... already exists". A second attempt finds the tables and goes on.
    """
    import sqlalchemy

    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise
            logger.debug("schema creation raced with another process (%s); retrying", exc.orig)
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def list_study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(
    study_name: str,
    url: str | None = None,
    *,
    storage: optuna.storages.BaseStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    **storage_kwargs: Any,
) -> optuna.Study:
    """Load an existing study; a wrong name is an error that lists the studies the storage holds.

    ``url=None`` means the default SQLite file of ``study_name``, which must already exist (this never
    creates an empty database; neither does a sqlite URL naming a missing file). ``storage_kwargs`` go to
    :func:`make_storage`.
    """
    if storage is None:
        if url is None:
            check_study_name(study_name)
            path = Path(STUDIES_DIR) / f"{study_name}.db"
            if not path.is_file():
                found = (
                    sorted(p.stem for p in Path(STUDIES_DIR).glob("*.db"))
                    if Path(STUDIES_DIR).is_dir()
                    else []
                )
                raise ConfigError(
                    f"No study database {str(path)!r} in {str(Path.cwd())!r}. Study files found there: "
                    f"{', '.join(found) or 'none'}. Run from the folder the search ran in, or pass --storage URL."
                )
        elif _parse_url(url).get_backend_name() == "sqlite":
            path = _sqlite_file(_parse_url(url))
            if path is not None and not path.is_file():
                raise ConfigError(
                    f"The study database {str(path)!r} of --storage {url!r} does not exist (relative paths are "
                    f"relative to {str(Path.cwd())!r}); check the URL."
                )
        storage = make_storage(url, study_name=study_name, **storage_kwargs)
    names = list_study_names(storage)
    if study_name not in names:
        backend = rdb_backend(storage)
        where = redact_url(backend.url) if backend is not None else type(storage).__name__
        raise ConfigError(
            f"No study named {study_name!r} in {where}. Studies there: {', '.join(names) or 'none'}; "
            "pass one of them as --study (or the right --storage)."
        )
    return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)


def rdb_backend(storage: optuna.storages.BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind ``storage`` (Optuna wraps it in a cache inside studies), else None."""
    backend = compat.cached_storage_backend(storage)
    return backend if isinstance(backend, RDBStorage) else None


def _running_trial_ids(study: optuna.Study) -> dict[int, int]:
    """trial_id -> number of the study's RUNNING trials."""
    return {compat.trial_id(t): t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _fail_stale_now(study: optuna.Study) -> list[int]:
    before = _running_trial_ids(study)
    if not before:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = _running_trial_ids(study)
    storage = compat.study_storage(study)
    failed = []
    for trial_id, number in before.items():
        if trial_id not in after and storage.get_trial(trial_id).state == TrialState.FAIL:
            failed.append(number)
    return sorted(failed)


def _fail_silent(study: optuna.Study, storage: RDBStorage, trial_ids: set[int]) -> list[int]:
    """Fail RUNNING trials that never recorded a heartbeat and run the retry callback on them."""
    failed = []
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in sorted(trial_ids):
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished or failed it meanwhile
        frozen = copy.deepcopy(storage.get_trial(trial_id))
        failed.append(frozen.number)
        if callback is not None:
            callback(study, frozen)
    return failed


def fail_stale_trials(study: optuna.Study, wait: bool = False, poll_s: float = 0.5) -> list[int]:
    """Fail the study's stale RUNNING trials (their retries get enqueued); returns the failed trial numbers.

    With ``wait=True`` (for a search restarted right after a crash) it also watches the RUNNING trials
    that still look fresh, for up to ``grace_period + heartbeat_interval`` seconds:

    * a trial whose heartbeat advances belongs to a live worker and is left alone;
    * one whose heartbeat stays still is failed as soon as it is older than the grace period;
    * one that never records a heartbeat during the whole watch is failed too: its worker died between
      starting the trial and its first heartbeat (a window Optuna's own check never catches, so such a
      trial would otherwise stay RUNNING forever). Every worker made by :func:`make_storage` records its
      first heartbeat as the trial starts, so a live one is never mistaken for dead.

    The wait ends early once every watched trial is judged.
    """
    storage = rdb_backend(compat.study_storage(study))
    failed = _fail_stale_now(study)
    if storage is None or storage.heartbeat_interval is None:
        return failed
    interval = storage.heartbeat_interval
    grace = storage.grace_period if storage.grace_period is not None else 2 * interval
    running = _running_trial_ids(study)
    first = compat.heartbeat_times(storage, set(running))
    pending = set(first)
    silent = set(running) - pending
    if wait and running:
        logger.info(
            "Waiting up to %ss to see whether running trial(s) %s still have a live worker.",
            grace + interval,
            sorted(running.values()),
        )
        deadline = time.monotonic() + grace + interval + 1
        while (pending or silent) and time.monotonic() < deadline:
            time.sleep(poll_s)
            failed += _fail_stale_now(study)
            still = _running_trial_ids(study)
            beats = compat.heartbeat_times(storage, pending | silent)
            pending = {i for i in pending if i in still and beats.get(i) == first[i]}
            silent = {i for i in silent if i in still and i not in beats}
        if silent:
            failed += _fail_silent(study, storage, silent)
    elif running:
        logger.info(
            "Trial(s) %s are RUNNING with a recent (or no) heartbeat; they are failed and retried once their "
            "heartbeat is older than %ss.",
            sorted(running.values()),
            grace,
        )
    if failed:
        logger.warning(
            "Failed stale trial(s) %s of a dead worker; they are re-enqueued for retry.", sorted(failed)
        )
    return sorted(set(failed))
