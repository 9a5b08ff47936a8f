"""Writes a model directory of a real model's shape, for `aserve serve --load-format dummy`.

The weights are random (no weight files are written; the server initializes them), the
tokenizer and chat template are the default model's, and the vocabulary is the tokenizer's
size so that every sampled token decodes to text. Send requests with "ignore_eos": true.

    python bench/model_shape.py llama-3.1-8b /tmp/llama8b
    aserve serve --model /tmp/llama8b --load-format dummy --device cuda
"""

import argparse
import shutil
from pathlib import Path

from aserve.models.store import default_cache_dir, resolve_model

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True, rope_theta=1e5),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True, rope_theta=5e5),
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False, rope_theta=5e5),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False, rope_theta=1e6),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_shape(name: str, out: Path, max_position_embeddings: int = 8192) -> Path:
    from transformers import GenerationConfig, LlamaConfig, Qwen2Config, PreTrainedTokenizerFast

    source = resolve_model(None, default_cache_dir())  # the default model lends its tokenizer
    out.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (source / file).exists():
            shutil.copy(source / file, out / file)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    shape = dict(SHAPES[name])
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape.pop("arch")]
    rope_theta = shape.pop("rope_theta")
    config = config_cls(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                        eos_token_id=2, bos_token_id=1, **shape)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]]
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=2, bos_token_id=1).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(write_shape(args.shape, args.out))


if __name__ == "__main__":
    main()
