"""Writes random LoRA adapters for a model with PEFT, to measure serving many adapters.

    python bench/make_lora.py /tmp/adapters --count 4 --rank 16
    aserve serve --enable-lora true --lora-modules a0=/tmp/adapters/a0,a1=/tmp/adapters/a1,...

Every linear the server adapts is targeted (q, k, v, o, gate, up, down); B is random, not
zero (PEFT's init_lora_weights=False), so an adapter changes the output as a trained one does.
The weights are random: the adapters measure speed, not quality.
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from aserve.models.store import default_cache_dir, resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="HF dir or .gguf (default: the default model)")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    path = resolve_model(args.model, default_cache_dir())
    for i in range(args.count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                                init_lora_weights=False))
        model.save_pretrained(args.out / f"a{i}")
        print(args.out / f"a{i}")


if __name__ == "__main__":
    main()
