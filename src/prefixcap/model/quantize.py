"""Inference-only weight quantization of a loaded LM on the CPU (`--quantize int8`).

"int8" is PyTorch's dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic`, per-channel
weights): every linear layer of the LM keeps its weights as int8 (one fp32 scale per output row) and
quantizes its input on the fly, per call, to run fbgemm's int8 x int8 kernels. At batch 1 a decoding
step reads each weight once per token, so reading a quarter of the bytes is where the speed comes
from (measured in docs/caption.md). Weight-only int8 (torchao's `Int8WeightOnlyConfig`, aten's
`_weight_int8pack_mm`) was measured too: without torch.compile it is ~2x *slower* than fp32 here.

What is quantized and what is not:
  - GPT-2's `Conv1D` layers (weight stored (in, out)) become `nn.Linear` first, weights transposed,
    so they are quantized like every other linear layer;
  - the LM head, tied to the input embedding, is quantized as a separate copy: the input embedding
    (a lookup, no matmul) stays fp32 and so does the prefix the mapper writes into it;
  - the mapper and the CLIP encoder are untouched (they run once per image, not once per token).

The result is for decoding only: it cannot be trained or saved back as an artifact.
torch.ao.quantization is deprecated in favour of torchao (pytorch/ao#2259); if a torch release drops
it, "int8" fails with one line naming the torch version instead of falling back silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from prefixcap.errors import UsageError

if TYPE_CHECKING:  # torch is imported where it is used: the CLIs read QUANTIZE_MODES for --help
    import torch
    from torch import nn


class QuantizeError(UsageError):
    """An unknown --quantize mode, or one asked for where it cannot run (a GPU, half-precision weights)."""


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without GPT-2's Conv1D has no such layers to convert
        return None
    return Conv1D


def conv1d_to_linear(module: nn.Module, skip: set[int] = frozenset()) -> int:
    """Replace every transformers `Conv1D` (y = x @ W + b, W: (in, out)) inside `module` (but those whose
    id is in `skip`) with the equivalent `nn.Linear` (W transposed to (out, in)); returns how many."""
    import torch
    from torch import nn

    conv1d = _conv1d_type()
    if conv1d is None:
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, conv1d) and id(child) not in skip:
                n_in, n_out = child.weight.shape  # (in, out)
                linear = nn.Linear(n_in, n_out, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())  # (out, in)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def untie_output_embeddings(lm: nn.Module) -> bool:
    """Give the LM head its own copy of the weight it shares with the input embedding (so that
    quantizing the head leaves the embedding fp32); returns whether it was tied."""
    import torch
    from torch import nn

    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    if not isinstance(head, nn.Linear) or embed is None or head.weight is not embed.weight:
        return False
    copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                     device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        copy.weight.copy_(head.weight)
        if head.bias is not None:
            copy.bias.copy_(head.bias)
    lm.set_output_embeddings(copy)
    return True


def _dynamic_int8(lm: nn.Module) -> nn.Module:
    """int8 weights per output channel, int8 activations quantized per call (fbgemm / x86 kernels)."""
    import torch
    from torch import nn

    from prefixcap.model.adapters import adapter_layer_parts

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice, once per load
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as err:
            raise QuantizeError(f"--quantize int8 needs torch.ao.quantization, which torch {torch.__version__} "
                                f"no longer has ({err})") from err
        adapter_parts = adapter_layer_parts(lm)  # a LoRA model's adapter layers stay fp32 (PEFT reads .weight)
        conv1d_to_linear(lm, skip=adapter_parts)
        untie_output_embeddings(lm)
        spec = {name: per_channel_dynamic_qconfig for name, m in lm.named_modules()
                if type(m) is nn.Linear and id(m) not in adapter_parts}
        return quantize_dynamic(lm, spec, dtype=torch.qint8, inplace=True)


# mode -> what it does to a loaded fp32 LM (in place; returns it)
QUANTIZE_MODES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "int8": _dynamic_int8,
}


def list_quantize_modes() -> list[str]:
    return list(QUANTIZE_MODES)


def check_quantize(mode: str, device: str | torch.device | None = "cpu", dtype: torch.dtype | None = None) -> None:
    """Raise QuantizeError (one line) unless `mode` can run: a known mode, the CPU (None: not chosen yet,
    quantize_lm checks where the weights are), fp32 weights."""
    import torch

    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize {mode!r} is not a quantization mode; expected one of "
                            f"{', '.join(QUANTIZE_MODES)}")
    if device is not None and str(device).partition(":")[0] != "cpu":
        raise QuantizeError(f"--quantize {mode} runs on the CPU only (its int8 kernels are CPU kernels), "
                            f"but the device is {str(device)!r}; use --device cpu, or leave --quantize out")
    if dtype is not None and dtype != torch.float32:
        raise QuantizeError(f"--quantize {mode} quantizes float32 weights, but --dtype is "
                            f"{str(dtype).removeprefix('torch.')}; leave --dtype out (or float32)")


def quantize_lm(lm: nn.Module, mode: str) -> nn.Module:
    """Quantize a loaded CPU fp32 LM in place for inference with `mode` (see QUANTIZE_MODES); returns it."""
    import torch

    weight = lm.get_input_embeddings().weight
    check_quantize(mode, weight.device)
    if weight.dtype != torch.float32:
        raise QuantizeError(f"--quantize {mode} quantizes float32 weights, but the LM's are "
                            f"{str(weight.dtype).removeprefix('torch.')}")
    return QUANTIZE_MODES[mode](lm.eval())


def quantized_linear_count(module: nn.Module) -> int:
    """How many dynamically quantized linear layers `module` holds (what quantize_lm made)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in module.modules())
