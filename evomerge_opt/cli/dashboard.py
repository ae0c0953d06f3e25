"""`evo-merge dashboard --study NAME [--storage URL] [--host 127.0.0.1] [--port 8080]`.

Serves optuna-dashboard on the study's storage (live: it reads the database on every request, so a
running search shows up as it goes). The server is optuna-dashboard's own (wsgiref, one process); for
a shared deployment run `optuna-dashboard URL` behind a real WSGI server instead.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study", required=True, help="Study name (checked to exist; the dashboard lists every study)."
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study storage (default: sqlite:///studies/<study>.db).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes it to the network)."
    )
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on.")


def run(args: argparse.Namespace) -> int:
    import logging

    from optuna_dashboard import run_server

    from evomerge_opt.errors import ConfigError
    from evomerge_opt.search import _optuna_compat as compat
    from evomerge_opt.search.storage import load_study, rdb_backend

    if not 0 < args.port < 65536:
        raise ConfigError(f"`0 < --port < 65536` must hold, but got --port {args.port}.")
    # The dashboard only reads and annotates trials: no heartbeat thread, no retry callback needed here.
    study = load_study(args.study, args.storage, heartbeat_interval=None)
    storage = rdb_backend(compat.study_storage(study)) or compat.study_storage(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    print(
        f"optuna-dashboard for study {args.study!r}: http://{host}:{args.port}/dashboard/studies/{study_id}",
        flush=True,
    )
    print("Press Ctrl-C to stop.", flush=True)
    logging.getLogger("evomerge_opt.cli.dashboard").info("serving on %s:%d", args.host, args.port)
    try:
        run_server(storage, host=args.host, port=args.port)
    except OSError as exc:  # port in use, address not available
        raise ConfigError(
            f"Cannot serve on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port."
        ) from exc
    return 0
