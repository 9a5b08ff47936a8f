"""Shared fixtures: tiny tokenizers and random-weight models, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import tiny_models`

from tiny_models import build_bpe_tokenizer, build_sentencepiece_tokenizer, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    build_bpe_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp_tokenizer")
    build_sentencepiece_tokenizer(out)
    return out


def _tiny_model_fixture(arch: str, tokenizer: str):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}_{tokenizer}"), arch, tokenizer)

    return fixture


tiny_llama_dir = _tiny_model_fixture("llama", "bpe")
tiny_qwen2_dir = _tiny_model_fixture("qwen2", "bpe")
tiny_qwen3_dir = _tiny_model_fixture("qwen3", "bpe")
