"""Resume after `kill -9`: a real `evo-merge search` subprocess is killed mid-trial, the same command is run
again, and the study ends with exactly the requested trials: nothing lost, nothing duplicated, the killed
trial failed (heartbeat gone stale) and retried with the same parameters.

Trials are made slow enough to be caught RUNNING by a fitness dataset of a few hundred thousand tokens
(no test-only hook in the product); the heartbeat is tuned through the product's own environment
settings (EVOMERGE_HEARTBEAT_INTERVAL / EVOMERGE_GRACE_PERIOD) so the restart need not wait 30 s.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from datetime import datetime, timedelta

import optuna
import pytest
from _search_harness import (
    FINISHED,
    evo_merge,
    read_trials,
    start,
    subprocess_env,
    tail,
    wait_for,
    write_space,
)
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_TRIALS = 5


@pytest.mark.timeout(400)
def test_search_resumes_after_kill_9_without_losing_or_duplicating_trials(tmp_path, tiny_llama_family):
    study = f"resume_{uuid.uuid4().hex[:8]}"
    space = write_space(tmp_path, tiny_llama_family, study, N_TRIALS, baselines=False)  # sampled params
    url = f"sqlite:///{tmp_path}/studies/{study}.db"
    cmd = evo_merge(
        "search", "--space", str(space), "--trials", str(N_TRIALS), "--storage", url, "--study", study
    )
    env = subprocess_env(EVOMERGE_HEARTBEAT_INTERVAL="1", EVOMERGE_GRACE_PERIOD="3")

    log = tmp_path / "first.log"
    first = start(cmd, tmp_path, env, log)
    try:

        def two_done_one_running() -> list:
            trials = read_trials(url, study)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            # a trial that started < 0.5 s ago: the kill lands well inside it, not between two trials
            now = datetime.now()
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and t.params
                and now - t.datetime_start < timedelta(seconds=0.5)
            ]
            return trials if len(done) >= 2 and running else []

        before = wait_for(two_done_one_running, first, 240, "2 completed trials and 1 running", log)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    # Re-read after the kill: the trial that was RUNNING at the kill is the one that must be retried.
    at_kill = read_trials(url, study)
    killed = [t for t in at_kill if t.state == TrialState.RUNNING]
    assert len(killed) == 1, ([(t.number, t.state) for t in at_kill], tail(log))
    killed = killed[0]
    done_before = {t.number: t.values for t in at_kill if t.state in FINISHED}
    assert len(done_before) >= 2 and len(done_before) >= len([t for t in before if t.state in FINISHED])

    second = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-4000:]

    trials = read_trials(url, study)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no duplicated or missing trial numbers
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == N_TRIALS, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, values in done_before.items():  # no completed trial lost or changed
        assert trials[number].state in FINISHED and trials[number].values == values
    assert trials[killed.number].state == TrialState.FAIL  # the dead worker's trial was failed ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state in FINISHED  # ... and retried once, to completion
    assert killed.params and retries[0].params == killed.params  # the same candidate, not a new sample
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    for t in finished:
        assert "recipe" in t.user_attrs and "genome" in t.user_attrs
