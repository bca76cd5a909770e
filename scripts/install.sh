#!/usr/bin/env bash
# Install lit-meta with everything its tests and benchmarks use into the ACTIVE Python environment
# (a virtualenv: `python3 -m venv .venv && . .venv/bin/activate` first).
#
# 1. torch 2.14.1 + torchvision 0.29.1: a pair that imports together (torchvision from PyPI does not
#    import beside the CPU-only torch 2.13.0 build); CUDA build, runs on CPU and GPU.
# 2. learn2learn 0.2.0, built from source (scripts/install_learn2learn.sh explains why).
# 3. lit-meta itself, editable, with the dev and l2l extras.
# 4. The Debian libraries for headless MuJoCo rendering (EGL, Mesa software fallback), when missing and
#    when this runs as root; without them everything but render_mode="rgb_array" works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
bash scripts/install_learn2learn.sh "$PY"
"$PY" -m pip install --quiet -e '.[dev,l2l]'
bash scripts/install_render.sh egl || echo "install.sh: headless rendering libraries not installed (see above); rendering tests will be skipped" >&2
"$PY" -c "import lit_meta, lit_meta.datamodules, lit_meta.callbacks, torch; print('lit-meta', lit_meta.__version__, 'installed with torch', torch.__version__)"
