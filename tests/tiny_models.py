"""Tiny random-weight models and tokenizers, built at test time (no model hub needed).

The tokenizers are deliberately hostile to naive streaming: many CJK characters and emoji are
split over several byte tokens, and the SentencePiece-style one drops the leading space of a
single-token decode (lessons-from-peers items 1 and 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Once upon a time, there was a little robot who loved to read stories.",
    "I am testing out streaming of tokens with spaces between the words.",
    "Daenerys is the Khaleesi of the great grass sea.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "You are a helpful assistant. Answer the question briefly and clearly.",
    "Streaming output must match the non-streaming output, byte for byte.",
    "你好世界",
    "你好，世界！今天天气很好。",
    "巴黎是法国的首都。东京是日本的首都。",
    "我可以帮助你完成各种任务。",
    "中文文本的流式输出不能出现乱码。",
    "Emoji time: 👋🌍🎉 and a family 👨‍👩‍👧 waving 👋 at the world 🌍.",
    "Party 🎉🎉 with friends 😀 and cake 🎂!",
    "Mixed: hello 你好 👋 world 世界 🌍 party 🎉.",
]


def _training_corpus() -> list[str]:
    # Repeat the English lines so the merges mostly go to English words; CJK and emoji stay
    # rare and therefore remain split over several byte tokens.
    return [line for line in CORPUS for _ in range(3 if line.isascii() else 1)]


def _save_transformers_tokenizer(tok: Tokenizer, out_dir: Path, bos: str | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=bos,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_bpe_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 / Qwen / SmolLM style), vocab ~500."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    _save_transformers_tokenizer(tok, Path(out_dir))


def build_sentencepiece_tokenizer(out_dir: Path) -> None:
    """Llama/SentencePiece style: Metaspace "▁", BPE with byte fallback, Strip(start=1) decoder."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # Train on an ASCII(+▁) alphabet only, so every non-ASCII character goes through <0xNN>
    # byte-fallback tokens, as rare characters do in Llama.
    ascii_alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=ascii_alphabet,
        limit_alphabet=len(ascii_alphabet),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_training_corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(trained["vocab"].items(), key=lambda kv: kv[1])

    # Llama id layout: special tokens, then the 256 byte tokens, then the learned pieces.
    vocab: dict[str, int] = {}
    for t in SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]:
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    _save_transformers_tokenizer(tok, Path(out_dir))


_ARCHES = {
    # tie_word_embeddings differs on purpose so loaders see both layouts.
    "llama": (LlamaConfig, dict(head_dim=16, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),  # q/k/v bias is built into Qwen2
    "qwen3": (Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
}


def build_tiny_model(out_dir: Path, arch: str = "llama", tokenizer: str = "bpe", seed: int = 0,
                     max_positions: int = 512) -> Path:
    """A 2-layer random-weight causal LM plus its tokenizer, saved as a HF model dir."""
    out_dir = Path(out_dir)
    if tokenizer == "bpe":
        build_bpe_tokenizer(out_dir)
    elif tokenizer in ("sp", "sentencepiece"):
        build_sentencepiece_tokenizer(out_dir)
    else:
        raise ValueError(f"unknown tokenizer kind {tokenizer!r}")
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    config_cls, extra = _ARCHES[arch]
    config = config_cls(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,  # large, so greedy argmax varies by position instead of repeating
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
        pad_token_id=tok.token_to_id(PAD_TOKEN),
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Default init leaves norms at 1 and biases at 0; randomize them so a loader that drops
        # or misplaces them gives different logits than transformers does.
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def build_tiny_sentence_transformer(out_dir: Path, pooling: str = "mean", normalize: bool = True,
                                    seed: int = 0) -> Path:
    """A 2-layer random-weight BERT with a WordPiece tokenizer, saved as a sentence-transformers
    directory (modules.json, 1_Pooling/config.json, sentence_bert_config.json)."""
    import json

    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_training_corpus(), trainer=trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=128).save_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    BertModel(config).save_pretrained(str(out_dir), safe_serialization=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out_dir / "modules.json").write_text(json.dumps(modules))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    modes = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
             "lasttoken": "pooling_mode_lasttoken"}
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{key: key == modes[pooling] for key in modes.values()}}))
    (out_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return out_dir


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """The tiny Llama in `hf_dir` as llama.cpp's convert_hf_to_gguf.py would write it, in float32:
    its config as llama.* metadata, its byte-level BPE tokenizer as tokenizer.ggml.*, and q/k rows
    permuted as llama.cpp stores them."""
    import json

    from gguf import GGUFWriter, TokenType
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    special = {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = {**{i: t for t, i in tok["model"]["vocab"].items()}, **{i: t for t, i in special.items()}}
    tokens = [tokens[i] for i in range(len(tokens))]
    writer = GGUFWriter(out, "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    weights = load_file(hf_dir / "model.safetensors")

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", weights["lm_head.weight"].numpy())
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(cfg["num_hidden_layers"]):
        for hf, name in parts.items():
            w = weights[f"model.layers.{layer}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                w = permute(w, cfg["num_attention_heads" if name == "attn_q" else "num_key_value_heads"])
            writer.add_tensor(f"blk.{layer}.{name}.weight", w.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
