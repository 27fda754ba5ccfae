"""Inference-only fp32 linear layers whose weights are prepacked once for oneDNN, for decoding on CPU.

Decoding runs every linear layer of the LM once per generated token on a handful of rows (the batch,
or one row at batch 1). PyTorch's default CPU path (MKL `addmm`, re-reading a plain row-major weight
on each call) reaches 0.4-0.75 of this machine's large-GEMM rate on such shapes; GPT-2's 50,257-way
output projection at 32 rows ran at 70 GFLOP/s against 183 for a 2048^3 matmul. oneDNN with the
weight reordered once into its blocked layout reaches 190-220 GFLOP/s on the same shapes (measured
on a 2-core Zen 4; bench/ANALYSIS.md). These are the kernels `torch.compile(..., freezing=True)`
swaps in on CPU (`mkldnn._reorder_linear_weight` / `mkldnn._linear_pointwise`); calling them
directly keeps `generate`'s dynamic shapes without a compile or a recompilation per shape. The CLIP
encoders (model/encoders.py) get the same layers: ViT-B/32 at batch 32 ran 1.10x (1 thread) to 1.13x
(2 threads) faster.

The result is the same function to float rounding (|diff| ~1e-6 on the outputs), not bit-identical:
tests/caption/test_packing.py checks that the decoded tokens equal the unpacked model's on the fixtures.
Only exact `nn.Linear` and transformers' `Conv1D` (GPT-2's projections) are replaced, and none inside a
PEFT LoRA layer (its forward reads its linears' `.weight`); subclasses such as quantized linears keep
their own forward. The packed copy is frozen and is not in the state dict: use it for inference only,
never on a model that is still being trained or that will be saved.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prefixcap.model.adapters import adapter_layer_parts

logger = logging.getLogger(__name__)


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (x86/ARM CPU builds do)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout; x of any shape (..., in_features).

    `activation="gelu_tanh"` applies the tanh-approximated GELU inside the same kernel (y = gelu(x W^T + b)).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
        super().__init__()
        self.set_activation(activation)
        self.out_features, self.in_features = weight.shape  # weight: (out, in), nn.Linear's layout
        # No batch-size hint: the hint-free layout was as fast at 1, 32 and 128 rows (bench_limits).
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous())
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(),
                             persistent=False)

    def set_activation(self, activation: str) -> None:
        """"none" or "gelu_tanh" (oneDNN's post-op names: attr "gelu", algorithm "tanh")."""
        if activation not in ("none", "gelu_tanh"):
            raise ValueError(f"unknown activation {activation!r}: expected 'none' or 'gelu_tanh'")
        self.activation = activation
        self._attr, self._algorithm = ("gelu", "tanh") if activation == "gelu_tanh" else ("none", "")

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight: its dtype, device and (out, in) shape are right for code that checks them
        (T5 casts its activations to `wo.weight.dtype`); it is an opaque oneDNN tensor for anything else."""
        return self.packed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self._attr, [], self._algorithm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation}")


# MLPs computed as `act(fc(x))`: (fc, act) child names, by LM family (GPT-2 and GPT-Neo: c_fc; GPT-J: fc_in).
# Where `act` is a tanh-approximated GELU it runs inside fc's kernel: at batch 128 the Python formula's
# five element-wise passes over (B, 4D) took ~7 % of GPT-2's decoding time.
MLP_CHILDREN: tuple[tuple[str, str], ...] = (("c_fc", "act"), ("fc_in", "act"))
TANH_GELUS = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")  # transformers' names of one function


def _fuse_gelu(model: nn.Module) -> int:
    """Move each MLP's tanh-GELU into its packed input projection; returns how many were fused."""
    fused = 0
    for module in model.modules():
        for fc_name, act_name in MLP_CHILDREN:
            fc, act = getattr(module, fc_name, None), getattr(module, act_name, None)
            if (isinstance(fc, PackedLinear) and fc.activation == "none" and isinstance(act, nn.Module)
                    and type(act).__name__ in TANH_GELUS):
                fc.set_activation("gelu_tanh")
                setattr(module, act_name, nn.Identity())
                fused += 1
    return fused


def _packable(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of an exact nn.Linear / Conv1D on the CPU in fp32, else None."""
    from transformers.pytorch_utils import Conv1D

    kind = type(module)
    if kind is nn.Linear:
        weight = module.weight
    elif kind is Conv1D:
        weight = module.weight.t()  # Conv1D stores (in, out)
    else:
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    return weight


@torch.no_grad()
def pack_linear_layers(model: nn.Module) -> int:
    """Replace, in place, every packable linear layer of `model` by a PackedLinear, and fuse each MLP's
    tanh-GELU into the layer before it (MLP_CHILDREN); returns how many layers were packed.

    A no-op (0) where oneDNN is missing or the model is not an fp32 CPU model. Tied weights (an LM
    head sharing the input embedding) are copied into the packed layout: the embedding stays as is.
    """
    if not packing_available():
        return 0
    adapter_parts = adapter_layer_parts(model)  # LoRA layers keep their own linears
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            weight = None if id(child) in adapter_parts else _packable(child)
            if weight is not None:
                swaps.append((parent, name, weight, getattr(child, "bias", None)))
    for parent, name, weight, bias in swaps:
        setattr(parent, name, PackedLinear(weight, bias))
    if swaps:
        fused = _fuse_gelu(model)
        logger.debug("prefixcap: %d linear layers prepacked for oneDNN, %d GELUs fused", len(swaps), fused)
    return len(swaps)
