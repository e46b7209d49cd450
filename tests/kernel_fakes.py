"""Torch stand-ins for mamba-ssm and causal-conv1d, for testing the fast path's calling code on CPU.

Each fake has its library's call signature (mamba-ssm 2.3, causal-conv1d 1.6), raises where the real one
raises (the shape asserts of the Python wrappers, the TORCH_CHECKs of the C++ extension: dtypes, widths
2..4, the channel-last stride and alignment rules, the conv state's dtype; the dt_bias strides that
`selective_state_update` reads) and computes its documented result with independent torch code, in fp32
and cast to the input's dtype as the kernels do. `install` puts them in sys.modules where
`compressor.kernels` imports the real ones.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Calls(list):
    """The names of the fake kernels called, in order."""


def _no_autocast(function):
    """The kernels ignore autocast; so do the fakes' torch computations."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)

    return wrapped


def _check(condition: bool, message: str) -> None:
    """TORCH_CHECK: the C++ extension raises RuntimeError."""
    if not condition:
        raise RuntimeError(message)


# causal-conv1d


def _check_conv_args(x, weight, bias) -> None:
    _check(x.dtype in DTYPES, f"causal_conv1d not implemented for input type '{x.dtype}'")
    _check(weight.dtype in DTYPES, f"causal_conv1d not implemented for weight type '{weight.dtype}'")
    batch, dim, _ = x.shape
    width = weight.shape[-1]
    _check(weight.shape == (dim, width), "weight must have shape (dim, width)")
    _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        _check(bias.dtype == weight.dtype, "bias.scalar_type() == weight_type")
        _check(bias.stride(-1) == 1 and bias.shape == (dim,), "bias must have shape (dim) and stride 1")


def _check_channel_last(x, name: str = "x") -> None:
    _check(x.shape[1] % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
    _check(
        x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
        f"causal_conv1d with channel last layout requires strides ({name}.stride(0) and {name}.stride(2)) "
        "to be multiples of 8",
    )
    # the kernel reads 16 bytes per vector load
    _check(x.data_ptr() % 16 == 0, "CUDA error: misaligned address")


def _conv_reference(x, weight, bias, silu: bool) -> torch.Tensor:
    """x (b, d, t) -> (b, d, t): zeros before the sequence, accumulated in fp32."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x.float(), (width - 1, 0)), weight.float()[:, None], bias, groups=x.shape[1])
    return F.silu(out) if silu else out


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, channel_last):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.channel_last = silu, channel_last
        out = _conv_reference(x, weight, None if bias is None else bias.float(), silu)
        return torch.empty_like(x).copy_(out)  # the layout the kernel writes: x's

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        if ctx.channel_last:  # what causal_conv1d_bwd does to dout before its checks
            if dout.stride(1) != 1:
                dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
            _check_channel_last(dout, "dout")
        elif dout.stride(2) != 1:
            dout = dout.contiguous()
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
            out = _conv_reference(leaves[0], leaves[1], leaves[2].float() if bias is not None else None, ctx.silu)
            grads = torch.autograd.grad(out, leaves, dout.float())
        dx = torch.empty_like(x).copy_(grads[0])
        return dx, grads[1].to(weight.dtype), grads[2].to(bias.dtype) if bias is not None else None, None, None


@_no_autocast
def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """x (batch, dim, seqlen); weight (dim, width); bias (dim,). Returns (batch, dim, seqlen)."""
    CALLS.append("causal_conv1d_fn")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if seq_idx is not None or initial_states is not None or return_final_states or final_states_out is not None:
        raise NotImplementedError("the fake models fresh sequences only")
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    _check_conv_args(x, weight, bias)
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _check_channel_last(x)
    return _CausalConv1dFn.apply(x, weight, bias, activation is not None, channel_last)


@_no_autocast
def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """x (batch, dim) or (batch, dim, seqlen); conv_state (batch, dim, state_len >= width - 1), updated in
    place to the last state_len inputs. No autograd (a custom op without a backward)."""
    CALLS.append("causal_conv1d_update")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError("the fake models a plain (non-circular) state")
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    _check_conv_args(x, weight, bias)
    _check(conv_state.dtype == x.dtype, "conv_state.scalar_type() == input_type")
    batch, dim, seqlen = x.shape
    width, state_len = weight.shape[-1], conv_state.shape[-1]
    _check(state_len >= width - 1, "conv_state_len >= width - 1")
    _check(conv_state.shape == (batch, dim, state_len), "conv_state must have shape (batch, dim, state_len)")
    with torch.no_grad():
        joined = torch.cat([conv_state, x], dim=-1)
        conv_state.copy_(joined[:, :, joined.shape[-1] - state_len :])
        out = F.conv1d(joined[:, :, -(seqlen + width - 1) :].float(), weight.float()[:, None], groups=dim)
        out = out + (bias.float()[:, None] if bias is not None else 0)
        out = (F.silu(out) if activation is not None else out).to(x.dtype)
    return out.squeeze(-1) if unsqueeze else out


# mamba-ssm


def _discretize(dt, dt_bias, softplus: bool, dt_limit) -> torch.Tensor:
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _recurrence(x, dt, A, B, C, state):
    """state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T; y_t = state_t C_t, one token at a time, in fp32.
    x (b, t, h, p); dt (b, t, h); A (h,); B, C (b, t, g, n); state (b, h, p, n)."""
    heads, groups = x.shape[2], B.shape[2]
    B, C = (v.float().repeat_interleave(heads // groups, dim=2) for v in (B, C))  # (b, t, h, n)
    ys = []
    for i in range(x.shape[1]):
        decay = torch.exp(dt[:, i] * A.float())[:, :, None, None]
        state = state * decay + (dt[:, i, :, None, None] * x[:, i, :, :, None].float()) * B[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, i]))
    return torch.stack(ys, dim=1), state


@_no_autocast
def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    return_varlen_states=False,
):
    """x (b, t, h, p); dt (b, t, h); A (h,); B, C (b, t, g, n); D (h,) or (h, p); dt_bias (h,);
    initial_states (b, h, p, n). Returns out (x's dtype) and, if asked, the final states (fp32)."""
    CALLS.append("mamba_chunk_scan_combined")
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    assert nheads % ngroups == 0
    assert B.shape == (batch, seqlen, ngroups, dstate) and C.shape == B.shape
    assert dt.shape == (batch, seqlen, nheads)
    assert A.shape == (nheads,)
    if D is not None:
        assert D.shape == (nheads, headdim) or D.shape == (nheads,)
    if dt_bias is not None:
        assert dt_bias.shape == (nheads,)
    if initial_states is not None:
        assert initial_states.shape == (batch, nheads, headdim, dstate)
    if z is not None or seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("the fake models z=None, one sequence per row")
    dt = _discretize(dt, dt_bias, dt_softplus, dt_limit)
    state = x.new_zeros(batch, nheads, headdim, dstate, dtype=torch.float32)
    if initial_states is not None:
        state = initial_states.float()
    y, final = _recurrence(x, dt, A, B, C, state)
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    out = y.to(x.dtype)
    return (out, final) if return_final_states else out


@_no_autocast
def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    """state (b, h, p, n), updated in place; x, dt (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p).
    Returns out (b, h, p) in x's dtype. No autograd (a Triton kernel)."""
    CALLS.append("selective_state_update")
    assert state.dim() == 4 and x.dim() == 3, "the fake models the per-head form"
    _, nheads, dim, dstate = state.shape
    batch = x.shape[0]
    assert x.shape == (batch, nheads, dim)
    assert dt.shape == x.shape
    assert A.shape == (nheads, dim, dstate)
    ngroups = B.shape[1]
    assert nheads % ngroups == 0, "nheads must be divisible by ngroups"
    assert B.shape == (batch, ngroups, dstate) and C.shape == B.shape
    if D is not None:
        assert D.shape == (nheads, dim)
    if dt_bias is not None:
        assert dt_bias.shape == (nheads, dim)
    if z is not None or state_batch_indices is not None:
        raise NotImplementedError("the fake models z=None, no batch indices")
    # The real wrapper computes this unconditionally: a None dt_bias raises here.
    tie_hdim = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
    del tie_hdim
    with torch.no_grad():
        dt = _discretize(dt, dt_bias, dt_softplus, (0.0, float("inf")))  # (b, h, p)
        B, C = (v.float().repeat_interleave(nheads // ngroups, dim=1) for v in (B, C))  # (b, h, n)
        new = state.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * B[:, :, None]
        state.copy_(new)
        out = torch.einsum("bhpn,bhn->bhp", new, C)
        if D is not None:
            out = out + x.float() * D.float()
    return out.to(x.dtype)


@_no_autocast
def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Grouped RMSNorm of x (..., N), gated by silu(z) before or after the norm; x's dtype."""
    CALLS.append("rmsnorm_fn")
    if z is not None:
        assert z.shape == x.shape
    n = x.shape[-1]
    group_size = n if group_size is None else group_size
    assert n % group_size == 0
    assert weight.shape == (n,)
    h = x.float()
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.float())
    grouped = h.unflatten(-1, (n // group_size, group_size))
    out = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


CALLS = Calls()
MODULES = {
    "causal_conv1d": {"causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": causal_conv1d_update},
    "mamba_ssm": {},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": mamba_chunk_scan_combined},
    "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": selective_state_update},
    "mamba_ssm.ops.triton.layernorm_gated": {"rmsnorm_fn": rmsnorm_fn},
}


def install(monkeypatch: pytest.MonkeyPatch, skip: tuple[str, ...] = ()) -> Calls:
    """Puts the fakes in sys.modules (all but the top-level packages in `skip`); returns the call log."""
    CALLS.clear()
    for name, functions in MODULES.items():
        if name.split(".")[0] in skip:
            continue
        module = ModuleType(name)
        vars(module).update(functions)
        monkeypatch.setitem(sys.modules, name, module)
    return CALLS
