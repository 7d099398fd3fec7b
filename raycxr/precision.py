"""The numeric precision and memory layout a trial trains in, and what the CPU offers for them.

``precision: auto|fp32|bf16`` is a searchable hyperparameter (:data:`raycxr.config.PARAMS`),
resolved on the worker that trains the trial, since the nodes of a cluster may differ:

- on a GPU, ``auto`` is bf16 autocast where the card has it, else fp16 with a gradient scaler;
  channels_last always (cuDNN's convolutions are faster on NHWC);
- on a CPU, ``auto`` is bf16 autocast where the CPU multiplies bf16 natively (AMX tiles or
  AVX512-BF16: PyTorch's CPU autocast routes convolutions and matmuls through oneDNN, which uses
  them), except for networks built on depthwise convolutions (EfficientNet, MobileNet), which oneDNN
  does not speed up in bf16: they train in fp32, where channels_last alone gains most.
  channels_last is on except for bf16 with depthwise convolutions (slower there).
  (scripts/bench/cpu_precision.py measures all four combinations; BENCHMARKS.md has the figures.)

Training only: the weights stay fp32 (autocast casts per operation), checkpoints are fp32, and
validation, promote and predict score in fp32, the precision the model is served in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """What a trial trains in: the autocast dtype (None: fp32), NHWC or not, and the name reported."""

    dtype: "torch.dtype | None"
    channels_last: bool

    @property
    def name(self) -> str:
        import torch

        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")


def cpu_flags() -> dict[str, bool]:
    """What PyTorch sees of this CPU's bf16/int8 hardware (printed by the benchmark, used by ``auto``)."""
    import torch

    cpu = torch.cpu
    return {"avx512": cpu._is_avx512_supported(), "avx512_bf16": cpu._is_avx512_bf16_supported(),
            "amx_tile": cpu._is_amx_tile_supported(), "vnni": cpu._is_vnni_supported()}


def native_cpu_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    flags = cpu_flags()
    return flags["amx_tile"] or flags["avx512_bf16"]


def has_depthwise(model: "torch.nn.Module") -> bool:
    """True if any convolution is depthwise (one group per input channel, more than one channel)."""
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def resolve(requested: str, *, device: "torch.device", model: "torch.nn.Module") -> Precision:
    """The :class:`Precision` a trial of ``model`` trains in on ``device`` for ``requested``."""
    import torch

    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: allowed: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        dtype = {"fp32": None, "bf16": torch.bfloat16}.get(requested, torch.bfloat16 if bf16 else torch.float16)
        return Precision(dtype=dtype, channels_last=True)
    depthwise = has_depthwise(model)
    bf16 = requested == "bf16" or (requested == "auto" and native_cpu_bf16() and not depthwise)
    return Precision(dtype=torch.bfloat16 if bf16 else None, channels_last=not (bf16 and depthwise))


def set_cpu_threads(cpus: float) -> None:
    """Intra-op threads = the trial's CPUs; inter-op threads 1 (a CNN's graph is a chain: a second
    inter-op thread only competes for the trial's cores). Torch fixes the inter-op pool once a
    process has used it, so a reused trial process keeps the first setting, which is this one."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # the pool already started in this process (a reused Tune actor)
            pass
