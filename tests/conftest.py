"""Shared fixtures: tiny tokenizers and random-weight models, built once per test session."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

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


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the module's in-process servers (modules may define their own)."""
    async with aiohttp.ClientSession() as session:
        yield session
