#!/usr/bin/env bash
# Installs the test environment and runs each backend's tests in its own pytest
# process (both backends use a top-level package named `lib`).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
python -m pip install -q pytest
# lm-evaluation-harness for the zero-shot tests (they skip without it).
python -m pip install -q "lm-eval>=0.4.10,<0.5"
(cd harp_quip && python -m pytest -q -p no:cacheprovider)
(cd harp_qtip && python -m pytest -q -p no:cacheprovider)
