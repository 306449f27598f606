#!/usr/bin/env bash
# Rewrite requirements/constraints.txt from the current .venv (after changing runtime.txt,
# delete .venv, run tools/setup_env.sh, then this, and commit the result).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$repo/requirements/constraints.txt"
{
  sed -n '1,3p' "$out"
  "$repo/.venv/bin/python" -m pip freeze --disable-pip-version-check \
    | grep -v -e '^-e' -e '^megatron[-_]sapo' \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -c '==' "$out") pins)"
