# Sourced (from the repository root) by the scripts that call `edge-duet`: after `make demo` or `make test` it is
# installed in .venv, which a new shell has not activated.
if ! command -v edge-duet >/dev/null 2>&1; then
  if [ -x .venv/bin/edge-duet ]; then
    export PATH="$PWD/.venv/bin:$PATH"
  else
    echo "edge-duet is not installed: run \`make demo\` (or \`pip install -e .\` in your venv) first" >&2
    exit 1
  fi
fi
