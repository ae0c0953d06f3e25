#!/usr/bin/env bash
# Runs the test suite. Starts a throw-away PostgreSQL server for the multi-worker tests when one can be
# had (installing Debian's postgresql under CI), and treats pytest's exit code 5 (no tests) as failure.
# The default marker ("not slow") includes the `compat` tests of the oldest and newest transformers
# (tests/test_dfs_compat.py: throw-away venvs from PyPI, cached under ~/.cache/evomerge/compat); the
# rest of that matrix is also `slow` (make test-all / make test-compat).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
marker="not slow"
if [ "${1:-}" = "--all" ]; then marker=""; shift; fi

if [ -z "${EVOMERGE_TEST_PG_URL:-}" ]; then
  was_running=0
  bash scripts/postgres.sh status 2>/dev/null && was_running=1
  if url=$(bash scripts/postgres.sh start 2>/tmp/evomerge_pg.log); then
    export EVOMERGE_TEST_PG_URL="$url"
    # Stop the server afterwards only if this run started it.
    [ "$was_running" = 1 ] || trap 'bash scripts/postgres.sh stop >/dev/null 2>&1 || true' EXIT
  else
    echo "PostgreSQL not available (see /tmp/evomerge_pg.log); its tests will be skipped." >&2
  fi
fi

"$VENV/bin/python" -m pytest ${marker:+-m "$marker"} "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose." >&2
  exit 1
fi
exit "$rc"
