"""float32 linear layers on CPU through oneDNN with prepacked weights.

torch's default CPU float32 matmul reaches a third of the machine's memory bandwidth on the
small row counts of decoding (one row per running sequence). oneDNN with the weight
reordered once into its blocked layout computes the same float32 product (errors of the
order of 1e-6, like the default path) 2.4x faster at 1 row and 3.3x at 32 on the 2-core
machine this was measured on: the decode ceiling in float32 moves that much without
giving up any precision. These are the ops Inductor's CPU freezing pass emits; they are
private to torch, so when they are missing the model keeps plain nn.Linear layers.
"""

import torch
from torch import nn


class OneDNNLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def binary(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        """linear(x) `op` other ("add" or "mul", same shape as the output) in one oneDNN call."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed_weight, self.bias, op)


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linears(model: nn.Module) -> int:
    """Replaces every float32 CPU nn.Linear in `model` by a OneDNNLinear; returns how many."""
    if not onednn_available():
        return 0
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"]
    for parent, name in targets:  # one at a time, so each original weight is freed as soon as it is packed
        setattr(parent, name, OneDNNLinear(getattr(parent, name)))
    return len(targets)
