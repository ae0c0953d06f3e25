"""Shared helpers for the benchmark scripts: measured subprocess runs, separate venvs, tables.

Every benchmark compares against a baseline measured *in the same run* (CONTRIBUTING.md), so the
helpers here measure any command the same way:

* ``run_measured(argv)`` starts a command, polls its whole process tree through ``/proc`` (psutil)
  every 20 ms and returns wall time, peak RSS (sum over the tree at each poll), peak anonymous RSS
  (RSS minus file-backed/shared pages, i.e. memory that cannot be dropped by the kernel: mmap'ed
  safetensors pages count in RSS but not here) and the CPU time of the tree from ``wait4`` rusage
  (user + sys, which is far less sensitive than wall time to other load on a shared machine).
  The main process's kernel-kept high-water mark (``VmHWM`` in ``/proc/PID/status``, read at every
  poll) is folded into the peak, so a spike of the main process shorter than the poll interval is
  still seen. (``ru_maxrss`` from ``wait4`` is *not* used: after ``vfork``/``fork`` + ``exec`` Linux
  seeds it with the parent's high-water mark, so a big harness would inflate every child's figure.)
* ``ensure_venv(path, requirements, constraints=...)`` makes a separate virtual environment for an
  outside tool (e.g. mergekit) so it can never disturb the project's own ``.venv``.
* ``format_table(headers, rows)`` renders a plain-text table.

Nothing here imports torch: the harness itself stays light so it does not distort the measurements.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError as exc:  # pragma: no cover - psutil is in the [dev] extra
    raise SystemExit(
        "The benchmarks need psutil to measure peak memory: `.venv/bin/pip install psutil` "
        "(or install the project with `pip install -e '.[dev]'`)."
    ) from exc

MIB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """A benchmark step failed (a tool could not be installed, a run exited non-zero, ...)."""


@dataclass
class RunResult:
    """What one measured subprocess run gave."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # max over polls of the summed RSS of the process tree (>= main VmHWM)
    peak_anon_bytes: int  # max over polls of the summed (RSS - shared/file-backed) of the tree
    cpu_s: float  # user + sys of the main process and its reaped children (wait4 rusage)
    samples: int
    log_path: Path | None = None
    output_tail: str = ""

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / MIB

    @property
    def peak_anon_mib(self) -> float:
        return self.peak_anon_bytes / MIB

    def check(self, what: str) -> RunResult:
        """Raise :class:`BenchmarkError` with the output tail when the run failed; return self."""
        if self.returncode != 0:
            where = f" (full log: {self.log_path})" if self.log_path else ""
            raise BenchmarkError(
                f"{what} failed with exit code {self.returncode}{where}:\n  $ {' '.join(self.argv)}\n"
                f"{self.output_tail}"
            )
        return self


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _tree_memory(procs: Iterable[psutil.Process]) -> tuple[int, int]:
    """(sum of RSS, sum of RSS - shared) over ``procs``; processes that vanished count as 0."""
    rss = anon = 0
    for proc in procs:
        try:
            info = proc.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        # On Linux psutil's `shared` is RssFile + RssShmem, so rss - shared is RssAnon.
        anon += max(info.rss - getattr(info, "shared", 0), 0)
    return rss, anon


def _high_water_mark(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes (peak RSS since its exec), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


def run_measured(
    argv: Sequence[str | os.PathLike],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    poll_interval: float = 0.02,
    timeout: float | None = None,
) -> RunResult:
    """Run ``argv`` to completion and measure wall time, peak RSS of its process tree and CPU time.

    stdout and stderr go to ``log_path`` (or are discarded when it is None, apart from the last few
    KiB kept for error messages, which then go to a temporary file). ``env`` *replaces* the
    environment when given (pass ``{**os.environ, ...}`` to extend it). On ``timeout`` the whole
    process group is killed and the result has returncode -9.
    """
    argv = [str(a) for a in argv]
    if log_path is None:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="bench_", suffix=".log")
        os.close(fd)
        log = Path(name)
        keep_log = False
    else:
        log = Path(log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        keep_log = True

    with open(log, "wb") as out:
        start = time.perf_counter()
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
            cwd=cwd, start_new_session=True,
        )
        root = psutil.Process(popen.pid)
        peak_rss = peak_anon = samples = 0
        status = None
        rusage = None
        while True:
            # Reap ourselves with wait4 so we get the child's rusage (CPU time of it and its children).
            pid, status, rusage = os.wait4(popen.pid, os.WNOHANG)
            if pid != 0:
                break
            rss, anon = _tree_memory(_tree(root))
            peak_rss, peak_anon = max(peak_rss, rss, _high_water_mark(popen.pid)), max(peak_anon, anon)
            samples += 1
            if timeout is not None and time.perf_counter() - start > timeout:
                os.killpg(popen.pid, signal.SIGKILL)
            time.sleep(poll_interval)
        wall = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    popen.returncode = returncode  # already reaped: keep Popen from waiting again
    tail = _tail(log)
    if not keep_log:
        log.unlink(missing_ok=True)
    return RunResult(
        argv=argv, returncode=returncode, wall_s=wall, peak_rss_bytes=peak_rss, peak_anon_bytes=peak_anon,
        cpu_s=rusage.ru_utime + rusage.ru_stime, samples=samples, log_path=log if keep_log else None,
        output_tail=tail,
    )


@dataclass
class Summary:
    """Median (and min/max) of repeated runs of one configuration."""

    label: str
    runs: list[RunResult] = field(default_factory=list)

    def _median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def wall_s(self) -> float:
        return self._median("wall_s")

    @property
    def cpu_s(self) -> float:
        return self._median("cpu_s")

    @property
    def peak_rss_mib(self) -> float:
        return self._median("peak_rss_mib")

    @property
    def peak_anon_mib(self) -> float:
        return self._median("peak_anon_mib")

    @property
    def wall_range(self) -> str:
        walls = [r.wall_s for r in self.runs]
        return f"{min(walls):.2f}-{max(walls):.2f}" if len(walls) > 1 else f"{walls[0]:.2f}"


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, ``inf`` for a zero denominator (never raises)."""
    return numerator / denominator if denominator else float("inf")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], floatfmt: str = ".2f") -> str:
    """Plain-text table; floats are formatted with ``floatfmt``, numbers right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False
               for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep, *(line(r) for r in text_rows)])


def venv_bin(venv: str | os.PathLike, name: str) -> Path:
    """Path of executable ``name`` inside virtual environment ``venv``."""
    return Path(venv) / ("Scripts" if os.name == "nt" else "bin") / name


def ensure_venv(
    venv: str | os.PathLike,
    requirements: Sequence[str],
    *,
    constraints: Sequence[str] = (),
    first: Sequence[str] = (),
    check_executable: str | None = None,
    python: str | None = None,
    log: Callable[[str], object] = print,
) -> Path:
    """Create virtual environment ``venv`` (when missing) and install ``requirements`` into it.

    ``first`` is installed before ``requirements`` (e.g. a pinned CPU torch, so the tool's resolver
    never pulls a CUDA build); ``constraints`` (pip constraint lines such as ``torch==2.13.0``) apply
    to both steps. When ``check_executable`` already exists in the venv nothing is installed. Raises
    :class:`BenchmarkError` naming the failing pip command and its output when an install fails.
    """
    venv = Path(venv)
    if check_executable and venv_bin(venv, check_executable).exists():
        return venv
    py = venv_bin(venv, "python")
    if not py.exists():
        log(f"creating virtual environment {venv}")
        proc = subprocess.run([python or sys.executable, "-m", "venv", str(venv)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchmarkError(f"could not create the virtual environment {venv}:\n{proc.stderr[-2000:]}")
    constraint_args: list[str] = []
    if constraints:
        cfile = venv / "bench-constraints.txt"
        cfile.write_text("\n".join(constraints) + "\n")
        constraint_args = ["-c", str(cfile)]
    for group in (list(first), list(requirements)):
        if not group:
            continue
        cmd = [str(py), "-m", "pip", "install", "--quiet", *constraint_args, *group]
        log(f"installing into {venv}: {' '.join(group)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchmarkError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
    if check_executable and not venv_bin(venv, check_executable).exists():
        raise BenchmarkError(f"{check_executable} is missing from {venv} after installing {list(requirements)}")
    return venv


def find_executable(name: str, *venvs: str | os.PathLike) -> Path | None:
    """``name`` from the first venv that has it, else from PATH (None when nowhere)."""
    for venv in venvs:
        candidate = venv_bin(venv, name)
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def summarize_pyspy_raw(path: str | os.PathLike, top: int = 20) -> str:
    """Self and inclusive sample counts per frame from a ``py-spy record -f raw`` file (all threads).

    Each line of the raw format is ``frame;frame;...;leaf COUNT`` (root first). Inclusive counts a
    frame once per stack even under recursion. Frames are ``function (file:line)``.
    """
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in set(frames[1:]):  # frames[0] is the thread
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return "no samples"

    def block(title: str, counts: dict[str, int]) -> str:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return format_table([title, "samples", "%"], [[k, v, 100.0 * v / total] for k, v in rows], floatfmt=".1f")

    return f"{total} samples\n" + block("self", self_counts) + "\n\n" + block("inclusive", inclusive)
