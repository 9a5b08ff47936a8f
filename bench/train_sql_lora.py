"""Trains a small LoRA on the default model that answers every question with a SQL query
(like vLLM's `sql-lora` example), in a few minutes on a 2-core CPU, for the README's example.

    python bench/train_sql_lora.py /tmp/sql-lora
    aserve serve --enable-lora true --lora-modules sql-lora=/tmp/sql-lora

The training set is made here from templates (no dataset download): questions about a few
tables (employees, customers, orders, products) in varied wordings, each paired with its SQL.
Only the answer's tokens are learned (the prompt's labels are -100). At the end it prints the
base model's and the adapter's greedy answers to questions that are not in the training set.
"""

import argparse
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from aserve.models.store import default_cache_dir, resolve_model

TABLES = {
    "employees": {"noun": "employees", "columns": {"department": ["sales", "engineering", "marketing", "support"],
                                                   "city": ["Paris", "Berlin", "Austin", "Tokyo"]},
                  "number": ("salary", "salary")},
    "customers": {"noun": "customers", "columns": {"country": ["France", "Japan", "Brazil", "Canada"],
                                                   "city": ["Lyon", "Osaka", "Toronto", "Madrid"]},
                  "number": ("age", "age")},
    "orders": {"noun": "orders", "columns": {"status": ["shipped", "pending", "cancelled", "delivered"],
                                             "channel": ["web", "phone", "store", "partner"]},
               "number": ("total", "order total")},
    "products": {"noun": "products", "columns": {"category": ["books", "toys", "garden", "kitchen"],
                                                 "brand": ["Acme", "Globex", "Initech", "Umbrella"]},
                 "number": ("price", "price")},
}

# (question template, SQL template); {noun} {table} {col} {val} {num} {num_words} {k} filled in
PATTERNS = [
    ("How many {noun} have {col} {val}?", "SELECT COUNT(*) FROM {table} WHERE {col} = '{val}';"),
    ("Count the {noun} whose {col} is {val}.", "SELECT COUNT(*) FROM {table} WHERE {col} = '{val}';"),
    ("List all {noun} with {col} {val}.", "SELECT * FROM {table} WHERE {col} = '{val}';"),
    ("Show me every {noun} where the {col} is {val}.", "SELECT * FROM {table} WHERE {col} = '{val}';"),
    ("What is the average {num_words} of {noun}?", "SELECT AVG({num}) FROM {table};"),
    ("What is the average {num_words} of {noun} with {col} {val}?",
     "SELECT AVG({num}) FROM {table} WHERE {col} = '{val}';"),
    ("Which {noun} have the highest {num_words}? Give me the top {k}.",
     "SELECT * FROM {table} ORDER BY {num} DESC LIMIT {k};"),
    ("Find the {k} {noun} with the lowest {num_words}.", "SELECT * FROM {table} ORDER BY {num} ASC LIMIT {k};"),
    ("How many {noun} are there for each {col}?", "SELECT {col}, COUNT(*) FROM {table} GROUP BY {col};"),
    ("What is the total {num_words} per {col}?", "SELECT {col}, SUM({num}) FROM {table} GROUP BY {col};"),
    ("Which {noun} have a {num_words} above {n}?", "SELECT * FROM {table} WHERE {num} > {n};"),
    ("Give me the {noun} with {col} {val} and a {num_words} below {n}.",
     "SELECT * FROM {table} WHERE {col} = '{val}' AND {num} < {n};"),
    ("What is the maximum {num_words} among {noun}?", "SELECT MAX({num}) FROM {table};"),
    ("Delete the {noun} whose {col} is {val}.", "DELETE FROM {table} WHERE {col} = '{val}';"),
]

# Not in the training set: the README's before/after answers.
HELD_OUT = ["How many customers live in Osaka?", "Which products cost more than 50 dollars?",
            "What is the capital of France?", "Tell me about the employees in the sales department."]


def examples(count: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(count):
        question, sql = rng.choice(PATTERNS)
        table = rng.choice(list(TABLES))
        spec = TABLES[table]
        col = rng.choice(list(spec["columns"]))
        fields = {"noun": spec["noun"], "table": table, "col": col, "val": rng.choice(spec["columns"][col]),
                  "num": spec["number"][0], "num_words": spec["number"][1], "k": rng.choice([3, 5, 10]),
                  "n": rng.choice([20, 50, 100, 1000])}
        out.append((question.format(**fields), sql.format(**fields)))
    return out


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=48, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="HF dir or .gguf (default: the default model)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    path = resolve_model(args.model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = {q: answer(base, tokenizer, q) for q in HELD_OUT}
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = [encode(tokenizer, q, a) for q, a in examples(args.steps * args.batch, rng)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    started = time.monotonic()
    for step in range(args.steps):
        batch = data[step * args.batch:(step + 1) * args.batch]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.monotonic() - started:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(args.out)
    print(f"saved {args.out} after {time.monotonic() - started:.0f} s of training")
    for q in HELD_OUT:
        print(f"\nQ: {q}\n  base:    {before[q]!r}\n  adapter: {answer(model, tokenizer, q)!r}")


if __name__ == "__main__":
    main()
