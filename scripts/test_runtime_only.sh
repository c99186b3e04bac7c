#!/usr/bin/env bash
# The session, driver, CLI and server tests on a runtime-only install: `pip install -e .[serve]` plus the test
# tools, no torch, no transformers, no onnx. tests/conftest.py then runs them on the committed tiny bundle
# (tests/fixtures/tiny-bundle). CI runs this after the full suite (~1.5 min, ~25 s of it the install).
#
#   bash scripts/test_runtime_only.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${EDGE_DUET_RUNTIME_VENV:-${TMPDIR:-/tmp}/edge-duet-runtime-only}"
PYTHON="${PYTHON:-python3}"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[serve]" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6"
for heavy in torch transformers onnx; do
  if "$VENV/bin/python" -c "import $heavy" 2>/dev/null; then
    echo "error: $heavy is installed in the runtime-only venv $VENV: the test would not show what it should" >&2
    exit 1
  fi
done
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_session.py tests/test_assistant.py tests/test_run_cli.py tests/test_server.py tests/test_bad_input.py \
  "$@"
