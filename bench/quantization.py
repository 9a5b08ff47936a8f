"""Quality and speed of dtype/--quantization modes against the float32 de-quantized reference.

`python bench/quantization.py --modes bfloat16:none bfloat16:auto float32:fp16 bfloat16:int4`

Every mode is DTYPE:QUANTIZATION and is compared with float32:none, the model's weights
widened to float32 (for a GGUF, the de-quantized file: what "identical to the file" means).

Quality, as llama.cpp's `llama-perplexity --kl-divergence` measures it:
- `kl`: the mean KL divergence KL(reference || mode) of the next-token distributions at
  every position of a fixed text (TEXT below, about 600 tokens);
- `top1`: the share of those positions whose most likely token is the same;
- `exact`: the share of prompts (load.py's chat prompts plus plain-text ones) whose whole
  greedy continuation of --tokens tokens is identical;
- `agree`: the mean share of greedy tokens generated before the first difference.
Speed: decode tokens/s at batch 1 and 32 at context 128 (runner_ceiling.py's measure), one
mode after the other in one run.
"""

import argparse
import statistics
from pathlib import Path

import torch
from transformers import AutoTokenizer

from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
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

TEXT = """\
The history of the printing press begins long before Johannes Gutenberg. In China, woodblock
printing was in use by the seventh century, and Bi Sheng made movable type from baked clay
around 1040. Korean printers cast movable metal type in the thirteenth century, and the
Jikji, printed in 1377, is the oldest surviving book made that way. What Gutenberg brought
together in Mainz around 1450 was a system: a hand mould that cast uniform type quickly, an
oil-based ink that stuck to metal, and a screw press adapted from those used to make wine
and paper. The combination made printing fast and cheap enough to change Europe.

Within fifty years, presses were at work in more than two hundred cities, and millions of
books had been printed. Prices fell, and reading spread beyond monasteries and universities.
Scholars could compare identical copies of a text, which made it easier to correct errors and
to build on the work of others. Pamphlets carried the arguments of the Reformation across
borders faster than any authority could suppress them. Printed maps, tables and diagrams
helped navigators, merchants and astronomers share precise information.

def moving_average(values, window):
    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

A recipe for bread needs only flour, water, salt and yeast. Mix 500 grams of flour with 350
grams of warm water and let it rest for thirty minutes. Add ten grams of salt and five grams
of yeast, then knead until the dough is smooth. Leave it to rise for two hours, shape it, let
it rise again, and bake at 230 degrees Celsius for about forty minutes, until the crust is
deep brown and the loaf sounds hollow when tapped.
"""


def greedy(runner: ModelRunner, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    seqs = prefill(runner, prompts)
    for _ in range(tokens - 1):
        decode_step(runner, seqs)
    for seq in seqs:
        runner.blocks.free(seq)
    return [s.output_ids for s in seqs]


@torch.inference_mode()
def position_log_probs(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token at every position of `ids`: [len(ids), vocab]."""
    seq = Sequence("text", ids, SamplingParams(max_tokens=1, temperature=0), status=SequenceStatus.RUNNING)
    assert runner.blocks.reserve(seq, len(ids))
    batch = runner._build_batch([ScheduledSeq(seq, len(ids))])[0]
    batch.logits_indices = torch.arange(len(ids))
    logits = runner.model(batch, runner.kv_cache.k, runner.kv_cache.v)
    runner.blocks.free(seq)
    return torch.log_softmax(logits.float(), dim=-1)


def agreement(reference: list[int], other: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), len(reference))
    return same / len(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF dir or .gguf (default: the default model)")
    parser.add_argument("--modes", nargs="+", default=["bfloat16:none", "bfloat16:auto", "float32:fp16"],
                        metavar="DTYPE:QUANTIZATION")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per speed point")
    args = parser.parse_args()
    path = Path(resolve_model(args.model, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in PROMPTS] + [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    text = tokenizer.encode(TEXT)
    max_len = max(len(text), max(map(len, prompts)) + args.tokens) + 160
    reference: tuple[list[list[int]], torch.Tensor] | None = None
    print("mode               linears               kl        top1    exact   agree   tok/s@1  tok/s@32")
    for mode in ["float32:none"] + [m for m in args.modes if m != "float32:none"]:
        dtype, _, quantization = mode.partition(":")
        loaded = load_model(path, "cpu", dtype, max_len, quantization=quantization or "none")
        runner = paged_runner(loaded, max(32, len(prompts)), loaded.max_model_len)
        outputs, log_probs = greedy(runner, prompts, args.tokens), position_log_probs(runner, text)
        if reference is None:
            reference = outputs, log_probs
        ref_outputs, ref_log_probs = reference
        kl = torch.nn.functional.kl_div(log_probs, ref_log_probs, log_target=True, reduction="none").sum(-1).mean()
        top1 = (log_probs.argmax(-1) == ref_log_probs.argmax(-1)).float().mean()
        exact = sum(a == b for a, b in zip(ref_outputs, outputs)) / len(prompts)
        agree = statistics.mean(agreement(a, b) for a, b in zip(ref_outputs, outputs))
        speed = [batch * args.steps / measure(runner, batch, 128, args.steps) for batch in (1, 32)]
        linears = " ".join(f"{n} {kind}" for kind, n in loaded.linears.items())
        print(f"{mode:17s}  {linears:20s}  {kl.item():.6f}  {top1.item():6.1%}  {exact:6.1%}  {agree:6.1%}  "
              f"{speed[0]:7.1f}  {speed[1]:8.1f}", flush=True)
    print(f"(kl, top1: {len(text)} positions of a fixed text; exact, agree: {len(prompts)} prompts, {args.tokens} "
          "greedy tokens each, against float32:none)")


if __name__ == "__main__":
    main()
