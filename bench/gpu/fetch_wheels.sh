#!/usr/bin/env bash
# Fetch, into the git-ignored .whl/, the Python 3.12 wheels of the service packages that the
# device machines' image lacks (it has torch, torchvision, numpy, OpenCV, Pillow, Jinja2,
# Werkzeug, click, prometheus-client; not Flask, Celery, SQLAlchemy, Alembic, redis-py, isal, gunicorn,
# pydicom, highdicom). Versions follow this checkout's .venv, so both machines run the same code.
# Run from the repository root on the CPU machine; bench/gpu/run_throughput.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="alembic amqp billiard blinker celery click-didyoumean click-plugins click-repl flask greenlet
itsdangerous kombu mako prompt-toolkit wcwidth sqlalchemy vine redis isal tzlocal tzdata pydicom highdicom pyjpegls
gunicorn packaging"
# (python-dateutil, click, Jinja2, Werkzeug, prometheus-client: already in the device image)
specs=()
for p in $PACKAGES; do
    v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}' || true)
    [ -n "$v" ] || echo "note: $p is not in $PY's environment; fetching its latest release" >&2
    specs+=("$p${v:+==$v}")
done
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
rm -rf .whl
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${specs[@]}"
ls .whl | wc -l
du -sh .whl
