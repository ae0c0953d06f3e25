"""Resume after `kill -9`: a real `evo-merge search` subprocess is killed mid-trial, the same command is run
again, and the study ends with exactly the requested trials: nothing lost, nothing duplicated, the killed
trial failed (heartbeat gone stale) and retried with the same parameters.

The kill lands inside a trial without depending on how long a trial takes: once a trial is RUNNING
with its whole genome suggested, the process is frozen (SIGSTOP) and the study re-read; if that trial
is still RUNNING the frozen process is killed there, otherwise (it finished in between) it is resumed
(SIGCONT) and the watch goes on. No test-only hook in the product; the heartbeat is tuned through the
product's own environment settings (EVOMERGE_HEARTBEAT_INTERVAL / EVOMERGE_GRACE_PERIOD) so the
restart need not wait 30 s.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import optuna
import pytest
from _search_harness import (
    FINISHED,
    evo_merge,
    read_trials,
    start,
    subprocess_env,
    tail,
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
        before = _stop_inside_a_trial(first, url, study, log)
        first.send_signal(signal.SIGKILL)  # frozen inside the trial: the kill lands there
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


def _inside_a_trial(trials: list, n_genome: int | None) -> bool:
    """At least two trials done and one RUNNING with every genome coordinate already suggested."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return len(done) >= 2 and n_genome is not None and any(
        t.state == TrialState.RUNNING and len(t.params) == n_genome for t in trials
    )


def _genome_size(url: str, study: str) -> int | None:
    from evomerge_opt.search.storage import make_storage

    storage = make_storage(url, heartbeat_interval=None)
    try:
        names = optuna.load_study(study_name=study, storage=storage).user_attrs.get("genome_names")
        return len(names) if names else None
    finally:
        storage.engine.dispose()


def _stop_inside_a_trial(proc: subprocess.Popen, url: str, study: str, log, timeout: float = 240) -> list:
    """Freeze ``proc`` (SIGSTOP) at a moment the study shows it inside a trial; return the trials then."""
    deadline = time.monotonic() + timeout
    n_genome = None
    while time.monotonic() < deadline:
        trials = read_trials(url, study)
        if trials and n_genome is None:
            n_genome = _genome_size(url, study)
        if _inside_a_trial(trials, n_genome):
            proc.send_signal(signal.SIGSTOP)
            frozen = read_trials(url, study)  # nothing changes now: this is what the kill will see
            if _inside_a_trial(frozen, n_genome):
                return frozen
            proc.send_signal(signal.SIGCONT)  # the trial ended in between: watch the next one
        if proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before a trial could be caught:\n{tail(log)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting to catch a running trial:\n{tail(log)}")
