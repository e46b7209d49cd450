"""Optional CUDA fast path: mamba-ssm's fused Triton kernels and causal-conv1d.

Nothing here imports mamba-ssm until a CUDA tensor asks for it, so CPU machines never touch the package.
Each function has the same meaning as its pure-torch twin in `compressor.ssd`, which is the reference
the kernels are tested against on a GPU (tests/test_kernels.py). Set COMPRESSOR_DISABLE_KERNELS=1 to
force the torch path everywhere.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

_loaded: SimpleNamespace | None | bool = None  # None: not tried yet; False: unavailable


def _load() -> SimpleNamespace | None:
    global _loaded
    if _loaded is None:
        try:
            from causal_conv1d import causal_conv1d_fn
            from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            _loaded = SimpleNamespace(
                chunk_scan=mamba_chunk_scan_combined,
                conv=causal_conv1d_fn,
                rmsnorm=rmsnorm_fn,
                state_update=selective_state_update,
            )
        except ImportError:
            _loaded = False
    return _loaded or None


def available(device: torch.device) -> bool:
    """True when the fused kernels can run on `device` (CUDA with mamba-ssm and causal-conv1d importable)."""
    if device.type != "cuda" or os.environ.get("COMPRESSOR_DISABLE_KERNELS") == "1":
        return False
    return _load() is not None


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
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SSD with the D skip. dt is the raw projection (softplus(dt + dt_bias) happens inside).

    Returns y (b, t, h, p) and the final state (b, h, p, n) fp32.
    """
    y, final = _load().chunk_scan(
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
        dt_limit=dt_limit,
        return_final_states=True,
    )
    return y, final


def conv(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv + SiLU of a fresh sequence. xbc (b, t, d) -> (b, t, d)."""
    return _load().conv(xbc.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)


def gated_rms_norm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
) -> torch.Tensor:
    """Grouped gated RMSNorm, gate applied before the norm (as Nemotron-H does)."""
    group_size = y.shape[-1] // n_groups
    return _load().rmsnorm(y, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=False)


def step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
) -> torch.Tensor:
    """One decoding step with the D skip; updates `state` (b, h, p, n) in place. x (b, h, p); dt (b, h) raw."""
    h, p, n = state.shape[1:]
    return _load().state_update(
        state,
        x,
        dt[..., None].expand(-1, -1, p),
        A[:, None, None].expand(h, p, n),
        B,
        C,
        D=D[:, None].expand(h, p),
        dt_bias=dt_bias[:, None].expand(h, p),
        dt_softplus=True,
    )
