#!/bin/sh
# Entry point for `make bench`: the proxy benchmark (see bench/README.md).
# Usage: bench/run.sh [--quick] [--rounds N] [--duration S] [--keep-tmp]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py="$here/../.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" "$here/run.py" "$@"
