#!/usr/bin/env bash
# Install certbench and everything it needs into ./.venv (or $VENV), from the package
# registries only. Used by the README's first command (`make run`) and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[dev]'
# auto_LiRPA 0.3 is the only release on PyPI; its metadata pins torch<1.13, so it goes in
# without dependencies (its runtime needs are in pyproject.toml) and certbench.bounds.lirpa_compat makes
# it work on torch 2.14.
"$VENV/bin/python" -m pip install --quiet --no-deps auto-LiRPA==0.3
# torchattacks 3.5.1 (AutoAttack) pins requests~=2.25.1, which its code never imports; its other needs
# (torch, torchvision, scipy, tqdm, numpy) are in pyproject.toml.
"$VENV/bin/python" -m pip install --quiet --no-deps torchattacks==3.5.1

# Full Fashion-MNIST from Debian (IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist as root);" \
             "the default DAG does not need it" >&2
    fi
fi
touch "$VENV/.certbench-installed"
echo "certbench installed in $VENV"
