#!/usr/bin/env bash
# The package as a user gets it (CI runs this after the tests):
#   1. `python -m build` makes the sdist and the wheel, and prints no warning;
#   2. the wheel goes into a fresh venv with its runtime dependencies only (no torch: pip reuses its cache);
#   3. from outside the source tree, the installed `edge-duet` plays the bundled demo model, and the commands that
#      need torch say which extra to install (exit 9), without a traceback.
#   bash scripts/check_wheel.sh            (PYTHON=... picks the interpreter that builds; default .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/edge-duet-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "check_wheel: $*" >&2; exit 1; }

# byte-compiling off (PYTHONDONTWRITEBYTECODE) makes setuptools warn; it is not the package's doing
if ! env -u PYTHONDONTWRITEBYTECODE "$PY" -m build -o "$work/dist" . >"$work/build.log" 2>&1; then
  tail -30 "$work/build.log" >&2
  fail "python -m build failed"
fi
if grep -in "warning" "$work/build.log" >&2; then
  fail "python -m build printed the warnings above"
fi
ls "$work"/dist/*.whl "$work"/dist/*.tar.gz >/dev/null || fail "no wheel or no sdist in $work/dist"

"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/*.whl || fail "the wheel does not install"
cd "$work"  # the source tree must not be what runs
ed="$work/venv/bin/edge-duet"
"$ed" --version
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then fail "the wheel's runtime dependencies pulled torch"; fi

"$ed" run --demo --fast --tts none --events events.jsonl >out.txt 2>err.txt || { cat err.txt >&2; fail "run --demo failed"; }
grep -q "assistant:" out.txt || fail "the demo printed no reply: $(cat out.txt)"
tail -n 1 events.jsonl | grep -q '"reason": "eof"' || fail "the demo did not end at the end of its scene"

for cmd in "make-checkpoint ckpt" "train-demo trained"; do
  set +e
  "$ed" $cmd 2>err.txt
  rc=$?
  set -e
  [ "$rc" -eq 9 ] || fail "$cmd without the export extra exited $rc, not 9: $(cat err.txt)"
  grep -q 'edge-duet\[export\]' err.txt || fail "$cmd did not name the extra: $(cat err.txt)"
  if grep -q Traceback err.txt; then fail "$cmd printed a traceback"; fi
done
echo "check_wheel: $(basename "$work"/dist/*.whl) builds without warnings, installs, and runs the demo"
