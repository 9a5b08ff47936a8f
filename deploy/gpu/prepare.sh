#!/usr/bin/env bash
# Gets the GPU checks ready to travel (run here, once, from the repository root):
#   .whl/  wheels the GPU machine's image lacks (its Python is 3.12 with torch, transformers,
#          aiohttp, uvloop, pytest, peft and numpy already; /work/.library/device/KINDS.md)
#   .gpu/  a random-weight Llama 3.2 1B shape: config and tokenizer only (bench/model_shape.py)
# Both are git-ignored and small (about 20 MiB); the device tool's `carry` takes them along.
# Then, on the lent machine: run(command="bash deploy/gpu/check.sh", carry=[".whl", ".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# What aserve and its CUDA tests import that the image does not hold; exact versions from
# constraints.txt where it pins them.
pins() { for name in "$@"; do grep -i "^$name==" constraints.txt || echo "$name"; done; }
# pip matches a manylinux tag exactly: offer every glibc version up to the image's 2.39.
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl $(pins orjson llguidance gguf pydantic pydantic-core annotated-types typing-inspection \
                 aiohttp-cors pytest-asyncio aiohttp-sse-client)
"$PY" bench/model_shape.py llama-3.2-1b .gpu/llama-3.2-1b
du -sh .whl .gpu
