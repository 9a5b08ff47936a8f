"""Speed and quality of --quantization modes against float32, on the model runner alone.

`python bench/quantization.py --modes none fp16 --tokens 64`

Quality: every prompt of a fixed set (load.py's chat prompts plus plain-text ones) is run
greedily for --tokens tokens in float32 and in each mode. Reported per mode: the share of
prompts whose whole continuation is identical, and the mean share of tokens generated
before the first difference (1.0 = identical). Speed: decode tokens/s at batch 1 and 32 at
context 128, measured as runner_ceiling.py does, one mode after the other in one run.
"""

import argparse
import statistics
from pathlib import Path

from transformers import AutoTokenizer

from aserve.engine.model_runner import ModelRunner
from aserve.models.loader import load_model
from aserve.models.store import default_cache_dir, resolve_model
from load import PROMPTS
from runner_ceiling import decode_step, measure, paged_runner, prefill

PLAIN_PROMPTS = (
    "The three most important inventions of the twentieth century are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of a forest,",
    "To make a cup of tea, first",
    "The mitochondria is",
    "import numpy as np\n\n# compute the mean of each column\n",
    "Paris is the capital of France. Berlin is the capital of",
    "In 1969, the first humans",
)


def greedy(runner: ModelRunner, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    seqs = prefill(runner, prompts)
    for _ in range(tokens - 1):
        decode_step(runner, seqs)
    for seq in seqs:
        runner.blocks.free(seq)
    return [s.output_ids for s in seqs]


def agreement(reference: list[int], other: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), len(reference))
    return same / len(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF dir or .gguf (default: the default model)")
    parser.add_argument("--modes", nargs="+", default=["none", "fp16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per speed point")
    args = parser.parse_args()
    path = resolve_model(args.model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in PROMPTS] + [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    max_len = max(map(len, prompts)) + args.tokens + 160
    outputs: dict[str, list[list[int]]] = {}
    print("mode   exact   agree   tok/s@1  tok/s@32")
    for mode in ["none"] + [m for m in args.modes if m != "none"]:
        loaded = load_model(Path(path), "cpu", "float32", max_len, quantization=mode)
        runner = paged_runner(loaded, max(32, len(prompts)), loaded.max_model_len)
        outputs[mode] = greedy(runner, prompts, args.tokens)
        ref = outputs["none"]
        exact = sum(a == b for a, b in zip(ref, outputs[mode])) / len(prompts)
        agree = statistics.mean(agreement(a, b) for a, b in zip(ref, outputs[mode]))
        speed = [batch * args.steps / measure(runner, batch, 128, args.steps) for batch in (1, 32)]
        print(f"{mode:5s}  {exact:6.1%}  {agree:6.1%}  {speed[0]:7.1f}  {speed[1]:8.1f}", flush=True)
    print(f"({len(prompts)} prompts, {args.tokens} greedy tokens each; agree = mean share of tokens before the first "
          "difference from float32)")


if __name__ == "__main__":
    main()
