"""Three worker processes on one real PostgreSQL server finish exactly the requested number of trials.

One `evo-merge search` creates the study (space, baselines) and works on it; two `evo-merge worker`
processes join it through the same URL. Needs EVOMERGE_TEST_PG_URL (scripts/postgres.sh; CI's
scripts/run_tests.sh starts a server and exports it); skipped otherwise.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import optuna
import pytest
from _search_harness import FINISHED, evo_merge, read_trials, start, subprocess_env, tail, write_space
from optuna.trial import TrialState

from evomerge_opt.search.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

TOTAL = 12


def has_space(url: str, study: str) -> bool:
    storage = make_storage(url, heartbeat_interval=None)
    try:
        return any(s.study_name == study and "space" in s.user_attrs for s in storage.get_all_studies())
    finally:
        storage.engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(500)
def test_three_workers_share_one_postgres_study(tmp_path, tiny_llama_family, pg_url):
    study = f"pg_{uuid.uuid4().hex[:10]}"
    space = write_space(tmp_path, tiny_llama_family, study, TOTAL, lines=2000)
    env = subprocess_env(EVOMERGE_HEARTBEAT_INTERVAL="2", EVOMERGE_GRACE_PERIOD="10")
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"proc{i}.log" for i in range(3)]
    try:
        search = start(
            evo_merge(
                "search", "--space", str(space), "--trials", str(TOTAL), "--storage", pg_url, "--study", study
            ),
            tmp_path,
            env,
            logs[0],
        )
        procs.append(search)
        deadline = time.monotonic() + 180
        while not has_space(pg_url, study):  # a worker reads the search space from the study
            assert search.poll() is None, tail(logs[0])
            assert time.monotonic() < deadline, "the search did not create its study in time:\n" + tail(
                logs[0]
            )
            time.sleep(0.2)
        for i in (1, 2):
            procs.append(
                start(
                    evo_merge("worker", "--study", study, "--storage", pg_url, "--trials", str(TOTAL)),
                    tmp_path,
                    env,
                    logs[i],
                )
            )
        for p, log in zip(procs, logs):
            assert p.wait(timeout=400) == 0, tail(log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    trials = read_trials(pg_url, study)
    assert [t.number for t in trials] == list(range(len(trials)))
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == TOTAL, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    # Every finished trial names the process that ran it, and only our three processes ran trials.
    # (How many of them got trials is a matter of timing, so it is reported on failure, not asserted.)
    pids = {p.pid for p in procs}
    workers = [t.user_attrs.get("worker", "") for t in finished]
    assert all(w and int(w.rsplit(":", 1)[1]) in pids for w in workers), (workers, pids)
    optuna.delete_study(study_name=study, storage=pg_url)
