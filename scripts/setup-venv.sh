#!/usr/bin/env bash
# Create or refresh .venv at the repo root (idempotent: a stamp skips pip when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "$(uname -m)" in
  # PyPI's torchvision does not import beside the small CPU-only torch wheel; these pairs do
  # (on this project's build machines they are read from local disk).
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lightning-adafisher-stamp
want=$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pipq() { .venv/bin/python -m pip install -q "$@" >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }; }
  pipq --upgrade pip
  pipq $TORCH
  pipq -e ".[test,cli,recipes,docs,diagnostics]"
  .venv/bin/python -c "import torch, torchvision, lightning, lightning_adafisher" 
  echo "$want" > "$stamp"
fi
