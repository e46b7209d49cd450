import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.ssd import causal_conv1d, conv_tail, ssd_chunked, ssd_naive


def _inputs(seed, b, t, g, k, p, n):
    gen = torch.Generator().manual_seed(seed)
    h = g * k
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 4
    B = torch.randn(b, t, g, n, generator=gen)
    C = torch.randn(b, t, g, n, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, state


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    t=st.integers(1, 40),
    g=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 3),
    p=st.sampled_from([1, 4]),
    n=st.sampled_from([1, 3, 8]),
    chunk=st.sampled_from([1, 4, 7, 16, 64]),
    with_state=st.booleans(),
)
def test_chunked_scan_equals_sequential_scan(seed, b, t, g, k, p, n, chunk, with_state):
    x, dt, A, B, C, state = _inputs(seed, b, t, g, k, p, n)
    initial = state if with_state else None
    y, final = ssd_chunked(x, dt, A, B, C, chunk, initial)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, initial)
    scale = 1 + y_ref.abs().max()
    torch.testing.assert_close(y / scale, y_ref / scale, atol=2e-5, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=2e-5 * (1 + final_ref.abs().max()), rtol=0)


def test_chunked_scan_gradients_match_sequential():
    x, dt, A, B, C, _ = _inputs(0, 2, 21, 2, 2, 4, 8)
    leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
    y, _ = ssd_chunked(*leaves, 8)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    grads = [v.grad for v in leaves]
    leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
    y, _ = ssd_naive(*leaves)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    for got, want in zip(grads, (v.grad for v in leaves), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_split_scan_continues_from_state():
    x, dt, A, B, C, _ = _inputs(1, 2, 30, 2, 2, 4, 8)
    y_full, final_full = ssd_chunked(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, final_full, atol=1e-5, rtol=1e-5)


def test_causal_conv_with_state_equals_whole_sequence():
    gen = torch.Generator().manual_seed(0)
    xbc = torch.randn(2, 11, 6, generator=gen)
    weight, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    whole, _ = causal_conv1d(xbc, weight, bias, None)
    reference = F.silu(F.conv1d(xbc.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :11])
    torch.testing.assert_close(whole, reference.transpose(1, 2))
    first, state = causal_conv1d(xbc[:, :5], weight, bias, None)
    pieces = [first]
    for i in range(5, 11):
        out, state = causal_conv1d(xbc[:, i : i + 1], weight, bias, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)


def test_conv_state_keeps_the_last_inputs_without_copying_the_prompt():
    xbc = torch.randn(2, 1000, 12)
    tail = conv_tail(xbc, 3)
    assert tail.shape == (2, 12, 3) and tail.untyped_storage().data_ptr() == xbc.untyped_storage().data_ptr()
    torch.testing.assert_close(tail, xbc[:, -3:].transpose(1, 2))
    short = conv_tail(xbc[:, :2], 3)
    torch.testing.assert_close(short, F.pad(xbc[:, :2].transpose(1, 2), (1, 0)))
    assert conv_tail(xbc, 0).shape == (2, 12, 0)
