"""The KV cache's memory: one pool of fixed-size blocks, allocated once at start from a budget
in bytes. Which sequence holds which block is block_manager.py's business; attention reads
the blocks through each sequence's block table (models/paged_attention.py).

The pool is allocated with torch.empty, not zeros: no reader ever looks past a sequence's
computed positions (the attention paths are tested with NaN planted there), so the pages of
blocks never used are never touched and do not count in the server's resident memory.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from aserve.models.llama import ModelArgs

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(value: str | int | float) -> int:
    """'3.5GiB', '512MiB', '2GB' or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not an amount of memory: {value!r} (examples: 2GiB, 512MiB, 1000000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(eq=False)
class KVCache:
    k: torch.Tensor  # [layers, blocks, kv_heads, block_size, head_dim]
    v: torch.Tensor

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * args.num_layers * args.num_kv_heads * block_size * args.head_dim * itemsize

    @classmethod
    def allocate(cls, args: ModelArgs, memory_bytes: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> "KVCache":
        num_blocks = memory_bytes // cls.bytes_per_block(args, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"a KV-cache budget of {memory_bytes} bytes holds no block of {block_size} positions "
                             f"({cls.bytes_per_block(args, block_size, dtype)} bytes for this model)")
        shape = (args.num_layers, num_blocks, args.num_kv_heads, block_size, args.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_blocks(self, copies: Iterable[tuple[int, int, int]]) -> None:
        """(source block, destination block, leading positions): run on the model thread, before a forward."""
        for src, dst, n in copies:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
