#!/usr/bin/env bash
# Installs aserve into a virtualenv with the pinned dependencies (constraints.txt). `make setup`
# (into .venv, with the test extras) and the container build (deploy/Containerfile, with the
# cluster extras) run this one script, so the image holds what `make serve` runs here.
#   deploy/install.sh VENV [EXTRAS]      ($PYTHON picks the interpreter; default python3)
set -euo pipefail
venv=${1:?usage: deploy/install.sh VENV [EXTRAS]}
extras=${2:-}
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and alone: pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
"$venv/bin/python" -m pip install -q -c constraints.txt torch
"$venv/bin/python" -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
