"""`evo-merge dashboard`: optuna-dashboard's HTTP API lists the study and its trials."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
from _synthetic_study import fake_models, make_study

from evomerge_opt.search.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, deadline: float, proc: subprocess.Popen) -> dict:
    """GET ``url`` until the server answers (bounded by ``deadline``)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError) as exc:
            if proc.poll() is not None:
                raise AssertionError(f"dashboard exited early: {proc.communicate()[1][-2000:]}") from exc
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_dashboard_serves_the_study_and_its_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/d.db"
    study = make_study(make_storage(url, heartbeat_interval=None), fake_models(tmp_path / "m"), name="dash")
    optuna.create_study(study_name="other", storage=make_storage(url, heartbeat_interval=None))
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "evomerge_opt.cli.main",
        "dashboard",
        "--study",
        "dash",
        "--storage",
        url,
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        listing = _get_json(f"{base}/api/studies", time.monotonic() + 60, proc)
        by_name = {s["study_name"]: s for s in listing["study_summaries"]}
        assert set(by_name) == {"dash", "other"}
        assert {a["key"] for a in by_name["dash"]["user_attrs"]} >= {"space", "kind", "objectives"}
        detail = _get_json(f"{base}/api/studies/{by_name['dash']['study_id']}", time.monotonic() + 30, proc)
        trials = detail["trials"]
        assert [t["number"] for t in trials] == [t.number for t in study.get_trials()]
        states = [t["state"] for t in trials]
        assert states.count("Complete") == 11 and states.count("Fail") == 1 and states.count("Pruned") == 1
        baselines = [a["value"] for t in trials for a in t["user_attrs"] if a["key"] == "baseline"]
        assert baselines == ["source:ft0", "ties_0.5", "dare_ties_0.5"]
        assert detail["best_trials"][0]["number"] == study.best_trial.number
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=15)
    assert f"http://127.0.0.1:{port}/dashboard/studies/" in out


def test_dashboard_unknown_study_is_an_error(tmp_path):
    url = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(study_name="only", storage=make_storage(url, heartbeat_interval=None))
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge_opt.cli.main", "dashboard", "--study", "nope", "--storage", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Studies there: only" in proc.stderr
