#!/bin/sh
# Run the benchmark suite: installs the bench-only dependencies into the virtual environment
# (never package dependencies), then `python -m bench "$@"` (e.g. --quick, --only cold_start).
#
# The environment: $VIRTUAL_ENV when one is active, else .venv in the repository (created, with
# chronosd installed editable, when missing). As root, wrk (listener benchmark) and cron (a
# peer in fire_precision) are installed from Debian when absent.
set -eu
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
    venv=$VIRTUAL_ENV
else
    venv=.venv
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet -e .
    fi
fi
py=$venv/bin/python
"$py" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=""
    command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
    command -v cron >/dev/null 2>&1 || missing="$missing cron"
    if [ -n "$missing" ]; then
        echo "bench/run.sh: installing$missing from Debian" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } \
            >/dev/null 2>&1 || echo "bench/run.sh: could not install$missing; going on" >&2
    fi
fi

exec "$py" -m bench "$@"
