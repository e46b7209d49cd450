"""Mamba-2 state-space scan (SSD) in pure PyTorch: the reference path of the engine.

Notation (Mamba-2): b batch, t time, h heads, p head_dim, g groups, k = h / g heads per group, n state
size, c chunks of length l. Per head, with a_t = exp(dt_t * A):

    state_t = a_t * state_{t-1} + dt_t * x_t (outer) B_t        state: (p, n)
    y_t     = state_t @ C_t

B and C are shared by the k heads of a group; the code keeps them at group granularity (never repeated
to h heads), which saves memory and time over a naive port. `ssd_chunked` is the fast exact form used for
prefill and training; `ssd_step` is one recurrent step for decoding; `ssd_naive` is the sequential loop
that both are tested against.

The Mamba layer calls five ops, the contract this module shares with its CUDA twin `compressor.kernels`
(same names, signatures and meanings; the mixer picks one backend per device):

    chunk_scan(x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state) -> (y, final_state)
    step(state, x, dt, A, B, C, D, dt_bias, dt_limit) -> y                  state updated in place
    conv(xbc, weight, bias) -> out                                        a fresh sequence
    conv_update(xbc, weight, bias, state) -> out                          continues; state updated in place
    gated_rms_norm(y, gate, weight, n_groups, eps) -> out

dt is the raw projection: both discretise it as clamp(softplus(dt + dt_bias), *dt_limit); y includes the
D skip (y + D * x). The torch ops return fp32; the kernels return their input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    x (b, t, h, p); dt (b, t, h) fp32, already softplus-ed and clamped; A (h,) fp32, negative;
    B, C (b, t, g, n); initial_state (b, h, p, n) or None.
    Returns y (b, t, h, p) fp32 (without the D skip) and the final state (b, h, p, n) fp32.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    k, l = h // g, chunk_size
    pad = (-t) % l
    if pad:  # padded steps have dt = 0: no decay and no input, so the final state is unchanged
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (t + pad) // l
    x = x.float().view(b, c, l, g, k, p)
    B = B.float().view(b, c, l, g, n)
    C = C.float().view(b, c, l, g, n)
    dt = dt.view(b, c, l, g, k)
    xdt = x * dt[..., None]  # (b, c, l, g, k, p)
    log_decay = (dt * A.view(g, k)).cumsum(dim=2)  # (b, c, l, g, k): log of the decay since chunk start

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) xdt_j.
    cum = log_decay.permute(0, 1, 3, 4, 2)  # (b, c, g, k, l)
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -torch.inf))
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)[:, :, :, None] * decay  # (b, c, g, k, l, l)
    y = torch.einsum("bcgkij,bcjgkp->bcigkp", scores, xdt)

    # 2. The state each chunk adds by its end.
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay)  # (b, c, l, g, k)
    chunk_states = torch.einsum("bclgn,bclgkp->bcgkpn", B, xdt * to_end[..., None])

    # 3. The state entering each chunk: a short sequential pass over chunks (c = t / l steps).
    chunk_decay = torch.exp(log_decay[:, :, -1])  # (b, c, g, k)
    if initial_state is None:
        state = x.new_zeros(b, g, k, p, n)
    else:
        state = initial_state.float().reshape(b, g, k, p, n)
    entering = []
    for i in range(c):
        entering.append(state)
        state = state * chunk_decay[:, i, :, :, None, None] + chunk_states[:, i]
    start_states = torch.stack(entering, dim=1)  # (b, c, g, k, p, n)

    # 4. What the entering state contributes to each position of its chunk.
    y = y + torch.einsum("bclgn,bcgkpn->bclgkp", C, start_states) * torch.exp(log_decay)[..., None]
    y = y.reshape(b, c * l, h, p)[:, :t]
    return y, state.reshape(b, h, p, n)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step. state (b, h, p, n); x (b, h, p); dt (b, h) fp32; A (h,); B, C (b, g, n).

    Returns the new state (fp32) and y (b, h, p) fp32 (without the D skip).
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    k = h // g
    decay = torch.exp(dt * A).view(b, g, k, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, g, k, p, 1)
    new_state = state.float().view(b, g, k, p, n) * decay + xdt * B.float().view(b, g, 1, 1, n)
    y = torch.einsum("bgkpn,bgn->bgkp", new_state, C.float())
    return new_state.view(b, h, p, n), y.reshape(b, h, p)


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential definition, one step per token; the ground truth for tests. Shapes as `ssd_chunked`."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for i in range(t):
        state, y = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def causal_conv1d(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution + SiLU over time.

    xbc (b, t, d); weight (d, K); bias (d,) or None; state (b, d, K-1): the previous K-1 inputs, or None
    for a fresh sequence (zeros). Returns the activated output (b, t, d) and the new state (b, d, K-1).
    """
    width = weight.shape[-1]
    seq = xbc.transpose(1, 2)  # (b, d, t)
    if state is None:
        seq = F.pad(seq, (width - 1, 0))
    else:
        seq = torch.cat([state.to(seq.dtype), seq], dim=-1)
    out = F.conv1d(seq, weight.unsqueeze(1), bias, groups=seq.shape[1])
    new_state = seq[:, :, seq.shape[-1] - (width - 1) :]
    return F.silu(out).transpose(1, 2), new_state


def gated_rms_norm(
    y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
) -> torch.Tensor:
    """Mamba-2's grouped gated RMSNorm: y * silu(gate), RMS-normalised within each of `n_groups` equal
    channel groups, then scaled by `weight`. Computed in fp32; the result is fp32."""
    out = y.float() * F.silu(gate.float())
    grouped = out.view(*out.shape[:-1], n_groups, -1)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return grouped.view(out.shape) * weight.float()


def discretize(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """dt = clamp(softplus(dt + dt_bias), *dt_limit) in fp32; dt (..., h) raw, dt_bias (h,)."""
    dt = F.softplus(dt.float() + dt_bias.float())
    low, high = dt_limit
    return dt if (low, high) == (0.0, math.inf) else dt.clamp(low, high)


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
    """Prefill / training scan with the D skip. dt (b, t, h) raw; other shapes as `ssd_chunked`.

    Returns y (b, t, h, p) and the final state (b, h, p, n), both fp32.
    """
    y, final = ssd_chunked(x, discretize(dt, dt_bias, dt_limit), A, B, C, chunk_size, initial_state)
    return y + D.float()[:, None] * x.float(), final


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
    """One decoding step with the D skip; updates `state` (b, h, p, n) in place. x (b, h, p); dt (b, h) raw;
    B, C (b, g, n). Returns y (b, h, p) fp32."""
    new_state, y = ssd_step(state, x, discretize(dt, dt_bias, dt_limit), A, B, C)
    state.copy_(new_state)
    return y + D.float()[:, None] * x.float()


def conv(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv + SiLU of a fresh sequence (zeros before it). xbc (b, t, d) -> (b, t, d)."""
    return causal_conv1d(xbc, weight, bias, None)[0]


def conv_update(
    xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> torch.Tensor:
    """Causal depthwise conv + SiLU continuing from `state` (b, d, K-1), which is updated in place to the
    last K-1 inputs. xbc (b, t, d) -> (b, t, d), any t >= 1 (a decoding step or a continued prompt)."""
    out, new_state = causal_conv1d(xbc, weight, bias, state)
    state.copy_(new_state)
    return out


def conv_tail(xbc: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state a fresh sequence leaves: its last `width` (K-1) inputs, (b, d, width), zero-padded on
    the left when the sequence is shorter. A view of `xbc` (b, t, d) when t >= width: never a copy of it."""
    tail = xbc[:, max(xbc.shape[1] - width, 0) :].transpose(1, 2)
    return F.pad(tail, (width - tail.shape[-1], 0)) if tail.shape[-1] < width else tail
