"""Throw-away Python environments with ONE transformers version each (the DFS compatibility matrix).

    python scripts/compat_env.py 4.57.6 5.25.0      # prints "VERSION PYTHON" per line, building when missing

Each environment is a venv holding ``transformers==VERSION`` (and what it depends on) plus safetensors,
and the torch of the interpreter that runs this script, shared read-only through a ``.pth`` file that
points at an overlay directory of symlinks to torch and its own dependencies. Sharing torch is what
keeps an environment cheap (seconds, ~50 MB) and makes it work on a clean CI machine that has the
project venv and PyPI: a fresh ``pip install torch`` there would pull several GB of CUDA wheels. The
environment cannot import evo-merge (nothing points at the project, the editable-install hook lives in
the project venv's site-packages, which the new venv never processes).

Environments are cached under ``$EVOMERGE_COMPAT_ROOT`` (default ``$XDG_CACHE_HOME/evomerge/compat``,
i.e. ``~/.cache/evomerge/compat``), in a folder keyed by Python, torch and transformers version, so a
re-run is instant. Concurrent builders of the same key wait on a file lock; a build happens in a
staging folder renamed into place only when the environment imports the right versions.

Stdlib only (no torch import): used by ``tests/test_dfs_compat.py`` and by hand.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Oldest (the last 4.x), first 5.x, a middle 5.x, the project's pin, the first with `cache=`, the newest on PyPI.
MATRIX_VERSIONS = ("4.57.6", "5.0.0", "5.12.1", "5.23.0", "5.24.0", "5.25.0")
# What CI runs on every change (tests marked `compat` without `slow`): the two ends of the range.
CI_VERSIONS = ("4.57.6", "5.25.0")
STAMP = "evomerge-compat.json"


class CompatEnvError(RuntimeError):
    """An environment could not be built (pip failed, the wrong versions import, ...)."""


def compat_root() -> Path:
    root = os.environ.get("EVOMERGE_COMPAT_ROOT")
    if root:
        return Path(root).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "evomerge" / "compat"


def torch_version() -> str:
    return metadata.version("torch")


def env_key(version: str, extras: tuple[str, ...] = ()) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"{py}-torch{torch_version()}-transformers{version}"
    return key + "".join(f"+{re.sub(r'[^A-Za-z0-9.=_-]', '_', extra)}" for extra in sorted(extras))


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of ``dist``'s unconditional requirements (and those whose marker holds here)."""
    names = []
    for line in dist.requires or []:
        requirement, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        if marker.strip() and not _marker_holds(marker):
            continue
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement)
        if match:
            names.append(match.group(1))
    return names


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:  # no packaging: keep the requirement (an extra symlink harms nothing)
        return True
    return Marker(marker.strip()).evaluate()


def _closure(root: str) -> list[metadata.Distribution]:
    """``root``'s distribution and everything it requires, recursively (as installed here)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        seen[key] = dist
        todo.extend(_requirement_names(dist))
    return list(seen.values())


def build_torch_overlay(root: Path) -> Path:
    """A folder of symlinks to this interpreter's torch and its dependencies (top-level entries only)."""
    overlay = root / f"torch-overlay-py{sys.version_info.major}{sys.version_info.minor}-{torch_version()}"
    if (overlay / ".complete").exists():
        return overlay
    staging = overlay.with_name(overlay.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for dist in _closure("torch"):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            if top in ("__pycache__", "bin") or top.endswith(".pth"):
                continue
            source = base / top
            if source.exists() and not (staging / top).exists():
                (staging / top).symlink_to(source)
    (staging / ".complete").write_text("ok\n")
    shutil.rmtree(overlay, ignore_errors=True)
    staging.rename(overlay)
    return overlay


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompatEnvError(f"{what} failed (`{' '.join(cmd)}`, exit {proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_env(version: str, *, extras: tuple[str, ...] = (), log=print) -> Path:
    """The python of the environment for ``transformers==version`` (plus ``extras``, pip requirement
    strings such as ``sentencepiece``), built when missing."""
    root = compat_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / env_key(version, tuple(extras))
    with open(root / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds the stamp
        if (venv / STAMP).is_file():
            return _venv_python(venv)
        overlay = build_torch_overlay(root)
        staging = venv.with_name(venv.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        log(f"building {venv.name} (transformers=={version}, torch {torch_version()} shared)")
        _run([sys.executable, "-m", "venv", "--without-pip", str(staging)], "creating the venv")
        purelib = Path(subprocess.run(
            [str(_venv_python(staging)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip())
        (purelib / "evomerge_torch_overlay.pth").write_text(str(overlay) + "\n")
        # This interpreter's pip installs into the new venv (--python), so the venv needs no pip of its own.
        _run([sys.executable, "-m", "pip", "--python", str(_venv_python(staging)), "install", "--quiet",
              "--no-input", f"transformers=={version}", "safetensors", *extras], f"installing transformers=={version}")
        # Relocating a venv breaks its scripts' shebangs, not `bin/python -c`; only that is used.
        shutil.rmtree(venv, ignore_errors=True)
        staging.rename(venv)
        _fix_venv_paths(venv, staging)
        info = _probe(_venv_python(venv))
        if info["transformers"] != version or info["torch"] != torch_version().split("+")[0] or info["evomerge_opt"]:
            shutil.rmtree(venv, ignore_errors=True)
            raise CompatEnvError(f"environment for transformers=={version} imports {info}; expected "
                                 f"transformers {version}, torch {torch_version()} and no evomerge_opt.")
        (venv / STAMP).write_text(json.dumps(info, indent=2) + "\n")
        log(f"built {venv} ({info})")
        return _venv_python(venv)


def _fix_venv_paths(venv: Path, staging: Path) -> None:
    """After renaming ``staging`` to ``venv``: point pyvenv.cfg's and the .pth's paths at the new name."""
    cfg = venv / "pyvenv.cfg"
    if cfg.is_file():
        cfg.write_text(cfg.read_text().replace(str(staging), str(venv)))


def _probe(python: Path) -> dict:
    code = ("import importlib.util, json, torch, transformers, safetensors; "
            "print(json.dumps({'transformers': transformers.__version__, "
            "'torch': torch.__version__.split('+')[0], 'safetensors': safetensors.__version__, "
            "'evomerge_opt': importlib.util.find_spec('evomerge_opt') is not None}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False, env=env,
                          cwd=str(python.parent))
    if proc.returncode != 0:
        raise CompatEnvError(f"{python} cannot import torch/transformers:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# llama.cpp's HF -> GGUF converter is not a PyPI package of its own; llama-cpp-python's source
# distribution vendors llama.cpp, converter and gguf-py included. Only those files are used (nothing is
# compiled); the converter's requirements pin transformers 4.57.6 and need sentencepiece.
LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER_TRANSFORMERS = "4.57.6"
CONVERTER_EXTRAS = ("sentencepiece",)


def ensure_gguf_converter(*, log=print) -> tuple[Path, Path]:
    """``(python, llama.cpp dir)``: an environment the converter runs in, and the folder holding
    ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (downloaded once, cached)."""
    import tarfile

    root = compat_root()
    python = ensure_env(CONVERTER_TRANSFORMERS, extras=CONVERTER_EXTRAS, log=log)
    target = root / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "convert_hf_to_gguf.py").is_file():
            return python, target
        download = root / "downloads"
        download.mkdir(exist_ok=True)
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution (llama.cpp's converter)")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(download)], "downloading llama-cpp-python")
        archive = download / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(keep) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return python, target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help=f"transformers versions (default: {' '.join(MATRIX_VERSIONS)})")
    args = parser.parse_args(argv)
    for version in args.versions or MATRIX_VERSIONS:
        python = ensure_env(version, log=lambda msg: print(msg, file=sys.stderr))
        print(version, python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
