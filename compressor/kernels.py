"""Optional CUDA fast path: mamba-ssm's fused Triton kernels and causal-conv1d's CUDA convolution.

The five ops here have the names, signatures and meanings of their pure-torch twins in `compressor.ssd`
(the contract is written there). `backend()` picks, once per device, dtype and conv width, which twin a
Mamba layer runs for each op:

- mamba-ssm >= 2.3 (`mamba_chunk_scan_combined`, `selective_state_update`, gated `rmsnorm_fn`): the chunk
  scan, the decoding step and the gated norm;
- causal-conv1d >= 1.6 (`causal_conv1d_fn`, `causal_conv1d_update`): the convolution of a fresh sequence and
  its continuation from a K-1 state (decoding and continued prompts); it takes widths 2..4 only.

Each library is optional on its own: one that is missing or fails to import leaves its ops on the torch
path while the other still runs, and a warning says once what is off and why. Nothing is imported until
a CUDA tensor asks, so CPU machines never touch either package. COMPRESSOR_DISABLE_KERNELS=1 forces the
torch path everywhere. Install: `pip install --no-build-isolation -e ".[cuda]"` (both build against the
installed torch; on a machine without network, `benchmarks/gpu_check.sh` installs them as docs/gpu.md says).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch

from compressor import ssd

DEVICE_TYPE = "cuda"  # where the kernels run
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what both libraries take
CONV_WIDTHS = range(2, 5)  # causal-conv1d's kernel widths
INSTALL = "'mamba-ssm>=2.3' 'causal-conv1d>=1.6'"  # the `cuda` extra
# library -> {our op: (module, function)}
LIBRARIES = {
    "mamba-ssm": {
        "chunk_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
        "step": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
        "gated_rms_norm": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
    },
    "causal-conv1d": {
        "conv": ("causal_conv1d", "causal_conv1d_fn"),
        "conv_update": ("causal_conv1d", "causal_conv1d_update"),
    },
}


class KernelWarning(UserWarning):
    """The CUDA fast path is off for some ops; the message says which and why."""


@dataclass(frozen=True)
class Backend:
    """The ops one Mamba layer runs, each either `compressor.ssd`'s or its kernel twin in this module."""

    chunk_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    step: Callable[..., torch.Tensor]
    conv: Callable[..., torch.Tensor]
    conv_update: Callable[..., torch.Tensor]
    gated_rms_norm: Callable[..., torch.Tensor]

    @classmethod
    def mixed(cls, fast: set[str]) -> Backend:
        """The kernel twin for the ops in `fast`, the torch op for the others."""
        return cls(**{f.name: getattr(sys.modules[__name__] if f.name in fast else ssd, f.name) for f in fields(cls)})

    def fast_ops(self) -> list[str]:
        """The ops this backend runs with kernels."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not getattr(ssd, f.name)]


TORCH = Backend.mixed(set())  # every op in torch


def backend(device: torch.device, dtype: torch.dtype, conv_kernel: int) -> Backend:
    """The backend for a Mamba layer whose activations have `dtype` on `device`: kernels where they exist
    and take the layer, torch otherwise. Cheap: the choice is made once per argument set."""
    return _backend(device.type, dtype, conv_kernel, os.environ.get("COMPRESSOR_DISABLE_KERNELS") == "1")


def reset() -> None:
    """Forget the choices made and the libraries tried (after installing one, or in tests)."""
    for cached in (_backend, _library, _say):
        cached.cache_clear()


@functools.cache
def _backend(device_type: str, dtype: torch.dtype, conv_kernel: int, disabled: bool) -> Backend:
    if device_type != DEVICE_TYPE or disabled:  # nothing to say: no kernels here, or asked for none
        return TORCH
    if dtype not in DTYPES:
        _say(f"Mamba kernels off for {dtype} activations (the kernels take float32, float16, bfloat16)")
        return TORCH
    fast = set()
    for name, ops in LIBRARIES.items():
        library = _library(name)
        if isinstance(library, str):
            _say(f"{library}; {', '.join(ops)} run in torch. Install: pip install --no-build-isolation {INSTALL}")
        else:
            fast |= set(ops)
    if conv_kernel not in CONV_WIDTHS and fast & {"conv", "conv_update"}:
        _say(f"conv_kernel={conv_kernel}: causal-conv1d takes widths 2..4, so this layer's conv runs in torch")
        fast -= {"conv", "conv_update"}
    return Backend.mixed(fast)


@functools.cache
def _library(name: str) -> SimpleNamespace | str:
    """The library's functions by our op names, or why it cannot be used."""
    try:
        return SimpleNamespace(
            **{op: getattr(importlib.import_module(module), attr) for op, (module, attr) in LIBRARIES[name].items()}
        )
    except Exception as error:  # not only ImportError: a build against another torch or CUDA fails otherwise
        return f"{name} cannot be used ({type(error).__name__}: {error})"


@functools.cache
def _say(message: str) -> None:
    """Warns once per distinct message."""
    warnings.warn(f"compressor: {message}", KernelWarning, stacklevel=4)


# The kernel twins of compressor.ssd's ops (see the contract there).


def chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_limit: tuple[float, float],
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd.chunk_scan` fused: softplus, bias, limit and D skip inside the kernel. y in x's dtype, state fp32."""
    y, final = _library("mamba-ssm").chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        dt_bias=dt_bias,
        initial_states=initial_state,
        dt_softplus=True,
        dt_limit=tuple(dt_limit),
        return_final_states=True,
    )
    return y, final


def step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    dt_limit: tuple[float, float],
) -> torch.Tensor:
    """`ssd.step` with `selective_state_update`; updates `state` in place, y in x's dtype.

    The kernel has no dt limit, so dt is discretised (and clamped) here and handed over with softplus off
    and a zero bias (the kernel reads the bias's strides, so it cannot be None). Every tensor is expanded
    over head_dim with stride 0, which the kernel reads once per head.
    """
    h, p, n = state.shape[1:]
    dt = ssd.discretize(dt, dt_bias, dt_limit)  # (b, h) fp32
    return _library("mamba-ssm").step(
        state,
        x,
        dt[..., None].expand(-1, -1, p),
        A[:, None, None].expand(h, p, n),
        B,
        C,
        D=D[:, None].expand(h, p),
        dt_bias=dt.new_zeros(()).expand(h, p),
        dt_softplus=False,
    )


def conv(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`ssd.conv` with `causal_conv1d_fn`. xbc (b, t, d) -> (b, t, d) in xbc's dtype."""
    out = _library("causal-conv1d").conv(_conv_layout(xbc), weight, bias, activation="silu")  # (b, d, t)
    return out.transpose(1, 2).contiguous()  # a no-op copy for the channel-last layout


def conv_update(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> torch.Tensor:
    """`ssd.conv_update` with `causal_conv1d_update`, which takes any layout and a (b, d, K-1) state of the
    input's dtype (a differently typed cache state is converted for the call and written back)."""
    conv_state = state if state.dtype == xbc.dtype else state.to(xbc.dtype)
    out = _library("causal-conv1d").conv_update(xbc.transpose(1, 2), conv_state, weight, bias, activation="silu")
    if conv_state is not state:
        state.copy_(conv_state)
    return out.transpose(1, 2)


def gated_rms_norm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
) -> torch.Tensor:
    """`ssd.gated_rms_norm` with mamba-ssm's fused norm (gate before the norm, as Nemotron-H does); y's dtype."""
    group_size = y.shape[-1] // n_groups
    return _library("mamba-ssm").gated_rms_norm(
        y, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=False
    )


def _conv_layout(xbc: torch.Tensor) -> torch.Tensor:
    """xbc (b, t, d) as causal_conv1d_fn takes it, (b, d, t).

    A channel-last view (stride 1 over d) is used as is when causal-conv1d accepts it: d and the batch and
    time strides multiples of 8, and 16-byte aligned data for its vector loads. in_proj's output slice often
    is not (its row holds z and dt too), so it is copied to a contiguous (b, t, d) first, as mamba's
    `ensure_stride` does. When d itself is not a multiple of 8, the channel-first layout (b, d, t)
    contiguous is used, which has no such requirement.
    """
    if xbc.shape[-1] % 8:
        return xbc.transpose(1, 2).contiguous()
    aligned = xbc.stride(2) == 1 and xbc.stride(1) % 8 == 0 and xbc.stride(0) % 8 == 0 and xbc.data_ptr() % 16 == 0
    return (xbc if aligned else xbc.contiguous()).transpose(1, 2)
