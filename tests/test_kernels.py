"""The fast path (compressor.kernels) against the torch reference (compressor.ssd).

Every parity test runs twice: on CPU with torch stand-ins for mamba-ssm and causal-conv1d that enforce
the libraries' call signatures and requirements (tests/kernel_fakes.py), which proves the calling code;
and on CUDA with the real libraries, skipped unless a CUDA device and mamba_ssm import (the convolution's
tests also need causal_conv1d; without it the other tests run the convolution in torch, as the model then does).
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import warnings

import pytest
import torch

from compressor import kernels, ssd
from compressor.generate import generate
from compressor.model import HybridLM, MambaMixer
from compressor.presets import get_preset
from tests import kernel_fakes


def _why_no_kernels(*libraries: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    for name in libraries:
        try:
            importlib.import_module(name)
        except Exception as error:
            return f"needs {name} importable ({type(error).__name__}: {error})"
    return None


WHY_NO_KERNELS = _why_no_kernels("mamba_ssm")
WHY_NO_CONV_KERNELS = _why_no_kernels("mamba_ssm", "causal_conv1d")
needs_kernels = pytest.mark.skipif(WHY_NO_KERNELS is not None, reason=WHY_NO_KERNELS or "")

# Error floors (relative, in norm) the kernels may add over the torch path: the fakes compute in fp32;
# mamba-ssm's Triton dots run in TF32 for fp32 inputs and the kernels round their outputs to the input's dtype.
FLOOR = {
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1e-2,
    ("cuda", torch.float32): 5e-3,
    ("cuda", torch.bfloat16): 2e-2,
}
GRAD_FLOOR_SCALE = 10  # gradients sum many rounded terms: ten times the output floor


@pytest.fixture(params=["fake", pytest.param("cuda", marks=needs_kernels)])
def device(request, monkeypatch) -> torch.device:
    """Where the kernel path runs: CPU with the fakes installed, or CUDA with the real libraries."""
    kernels.reset()
    if request.param == "fake":
        kernel_fakes.install(monkeypatch)
        monkeypatch.setattr(kernels, "DEVICE_TYPE", "cpu")
    monkeypatch.delenv("COMPRESSOR_DISABLE_KERNELS", raising=False)
    yield torch.device("cpu" if request.param == "fake" else "cuda")
    kernels.reset()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def _assert_as_close(fast, reference, truth, floor, what) -> None:
    """The kernel result is no further from the truth (fp32 inputs, or an fp64 model) than twice the torch
    path's error plus `floor`."""
    fast_error, reference_error = _relative_error(fast, truth), _relative_error(reference, truth)
    assert fast_error <= 2 * reference_error + floor, (
        f"{what}: kernel path error {fast_error:.2e}, torch path {reference_error:.2e}, floor {floor:.0e}"
    )


def test_the_two_backends_share_one_contract():
    for field in kernels.Backend.__dataclass_fields__:
        assert inspect.signature(getattr(ssd, field)) == inspect.signature(getattr(kernels, field)), field
    assert kernels.TORCH.fast_ops() == []


def test_cpu_never_tries_the_kernels():
    kernels.reset()
    assert kernels.backend(torch.device("cpu"), torch.float32, 4) is kernels.TORCH
    HybridLM(get_preset("tiny"))(torch.zeros(1, 5, dtype=torch.long))
    assert kernels._library.cache_info().misses == 0  # no import was even attempted


# Op by op


def _scan_inputs(device, dtype, b=2, t=37, h=6, p=20, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = torch.randn(b, t, h, generator=gen) - 1
    A = -torch.rand(h, generator=gen) * 4 - 0.5
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    D, dt_bias = torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen)
    move = {"device": device}
    return (
        x.to(dtype=dtype, **move),
        dt.to(dtype=dtype, **move),
        A.to(**move),
        B.to(dtype=dtype, **move),
        C.to(dtype=dtype, **move),
        D.to(**move),
        dt_bias.to(**move),
        state.to(**move),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.2, 0.6)])
def test_chunk_scan_and_step_equal_torch(device, dtype, dt_limit):
    x, dt, A, B, C, D, dt_bias, state = _scan_inputs(device, dtype)
    floor = FLOOR[device.type, dtype]
    fast_ops = kernels.backend(device, dtype, 4)
    assert set(fast_ops.fast_ops()) >= {"chunk_scan", "step"}
    truth = ssd.chunk_scan(*(v.float() for v in (x, dt, A, B, C, D, dt_bias)), dt_limit, 16, state.float())
    reference = ssd.chunk_scan(x, dt, A, B, C, D, dt_bias, dt_limit, 16, state)
    fast = fast_ops.chunk_scan(x, dt, A, B, C, D, dt_bias, dt_limit, 16, state)
    assert fast[0].dtype == dtype and fast[1].dtype == torch.float32
    for name, got, want, ref in zip(("y", "final state"), fast, truth, reference, strict=True):
        _assert_as_close(got, ref, want, floor, f"chunk_scan {name}")

    states = {"truth": state.float().clone(), "reference": state.clone(), "fast": state.clone()}
    for i in range(4):  # decoding steps continue the state
        args = (x[:, i], dt[:, i], A, B[:, i], C[:, i], D, dt_bias)
        want = ssd.step(states["truth"], *(v.float() for v in args), dt_limit)
        reference = ssd.step(states["reference"], *args, dt_limit)
        got = fast_ops.step(states["fast"], *args, dt_limit)
        assert got.dtype == dtype
        _assert_as_close(got, reference, want, floor, f"step {i} y")
    _assert_as_close(states["fast"], states["reference"], states["truth"], floor, "step state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("dim", "offset", "row", "width"),
    [
        (496, 240, 748, 4),  # the 12 x 20 model's in_proj row: a channel-last view would break the stride rule
        (496, 0, 504, 4),  # a view causal-conv1d takes as is
        (174, 140, 326, 4),  # conv_dim not a multiple of 8: channel-first
        (48, 2, 56, 2),  # strides fine, data not 16-byte aligned
        (64, 8, 80, 3),
    ],
)
def test_conv_and_conv_update_equal_torch(device, dtype, dim, offset, row, width):
    """xbc (conv_dim wide) is a slice of a wider row, as in in_proj's output: layouts causal-conv1d may refuse."""
    if device.type == "cuda" and WHY_NO_CONV_KERNELS is not None:
        pytest.skip(WHY_NO_CONV_KERNELS)
    gen = torch.Generator().manual_seed(dim + offset)
    row = torch.randn(2, 23, row, generator=gen).to(device, dtype)
    xbc = row[..., offset : offset + dim]  # (b, t, d)
    weight = torch.randn(dim, width, generator=gen).to(device, dtype)
    bias = torch.randn(dim, generator=gen).to(device, dtype)
    fast_ops = kernels.backend(device, dtype, width)
    assert set(fast_ops.fast_ops()) >= {"conv", "conv_update"}
    floor = FLOOR[device.type, dtype]
    truth = ssd.conv(xbc.float(), weight.float(), bias.float())
    _assert_as_close(fast_ops.conv(xbc, weight, bias), ssd.conv(xbc, weight, bias), truth, floor, "conv")

    # continuation: a prompt, a continued prompt, then single steps, from a K-1 state
    state = ssd.conv_tail(xbc[:, :9], width - 1).contiguous()
    truth_state = state.float().clone()
    for start, stop in ((9, 16), (16, 17), (17, 18)):
        got = fast_ops.conv_update(xbc[:, start:stop], weight, bias, state)
        want = ssd.conv_update(xbc[:, start:stop].float(), weight.float(), bias.float(), truth_state)
        _assert_as_close(got, want.to(dtype), want, floor, f"conv_update {start}:{stop}")
        torch.testing.assert_close(state.float(), truth_state)  # the state holds inputs: exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_equals_torch(device, dtype):
    gen = torch.Generator().manual_seed(0)
    y, gate = (torch.randn(2, 7, 240, generator=gen).to(device, dtype) for _ in range(2))
    weight = torch.rand(240, generator=gen).to(device) + 0.5
    truth = ssd.gated_rms_norm(y.float(), gate.float(), weight, 4, 1e-5)
    fast = kernels.backend(device, dtype, 4).gated_rms_norm(y, gate, weight, 4, 1e-5)
    assert fast.dtype == dtype
    reference = ssd.gated_rms_norm(y, gate, weight, 4, 1e-5)
    _assert_as_close(fast, reference, truth, FLOOR[device.type, dtype], "gated_rms_norm")


# The whole model

CONFIGS = {
    # the quick start's pruned shape: 12 heads x 20, in_proj rows not a multiple of 8 wide
    "12x20 heads": dict(mamba_num_heads=12, mamba_head_dim=20),
    # conv_dim 174: not a multiple of 8 (channel-first conv); dt clamped on both sides; width 2
    "7x20 heads, dt limit": dict(
        mamba_num_heads=7, mamba_head_dim=20, n_groups=1, ssm_state_size=17, time_step_limit=(0.02, 0.05)
    ),
    "width 2, dt floor": dict(conv_kernel=2, chunk_size=8, time_step_limit=(0.05, math.inf)),
}


def _model(changes, device, dtype) -> HybridLM:
    """Mamba-heavy, with weights large enough (init std 0.3) that a wrong Mamba step shows in the logits
    well above bf16 rounding (unclamped dt in decoding: 10-50% relative error; bf16 rounding: 1%)."""
    torch.manual_seed(0)
    config = get_preset("tiny").replace(hybrid_override_pattern="M-M*M", initializer_range=0.3, **changes)
    return HybridLM(config).to(device, dtype)


def _runs(model, ids):
    """Logits of a full forward; of a cached prompt, continued prompt and decoding steps; the gradients."""
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(ids.shape[0], ids.shape[1])
        prompt, continued = model(ids[:, :9], cache), model(ids[:, 9:16], cache)
        steps = torch.cat([model(ids[:, i : i + 1], cache) for i in range(16, ids.shape[1])], 1)
    model.zero_grad(set_to_none=True)
    model(ids).float().logsumexp(-1).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if ".mixer." in name}
    return {"forward": full, "prompt": prompt, "continued prompt": continued, "decoding": steps}, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("changes", CONFIGS.values(), ids=CONFIGS.keys())
def test_model_kernel_path_equals_torch_path(device, monkeypatch, dtype, changes):
    model = _model(changes, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cpu":
        calls = kernel_fakes.CALLS
        calls.clear()
    fast, fast_grads = _runs(model, ids)
    if device.type == "cpu":  # every op of the fast path ran, decoding and continuation included
        assert set(calls) == {
            "causal_conv1d_fn",
            "causal_conv1d_update",
            "mamba_chunk_scan_combined",
            "selective_state_update",
            "rmsnorm_fn",
        }
    monkeypatch.setenv("COMPRESSOR_DISABLE_KERNELS", "1")
    reference, reference_grads = _runs(model, ids)
    truth, truth_grads = _runs(_model(changes, device, torch.float64), ids)
    floor = FLOOR[device.type, dtype]
    for part in truth:
        _assert_as_close(fast[part], reference[part], truth[part], floor, part)
    for name in truth_grads:
        _assert_as_close(
            fast_grads[name], reference_grads[name], truth_grads[name], GRAD_FLOOR_SCALE * floor, f"grad {name}"
        )


def test_generate_on_the_kernel_path_picks_the_reference_argmax(device, monkeypatch):
    model = _model(CONFIGS["7x20 heads, dt limit"], device, torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    tokens = generate(model, prompt.to(device), 12)
    monkeypatch.setenv("COMPRESSOR_DISABLE_KERNELS", "1")
    with torch.no_grad():
        logits = model(tokens[:, :-1])[:, prompt.shape[1] - 1 :].float()  # the logits each new token followed
    chosen = logits.gather(-1, tokens[:, prompt.shape[1] :, None])[..., 0]
    # greedy on the kernel path = argmax of the torch path, up to the kernels' rounding on near-ties
    slack = FLOOR[device.type, torch.float32] * logits.abs().max()
    assert (chosen >= logits.max(-1).values - slack).all()


def test_autocast_decoding_converts_the_conv_state(device, monkeypatch):
    """Under autocast the activations are bf16 while an fp32 model's cache is fp32: causal_conv1d_update
    needs its state in the input's dtype, so it gets a converted copy that is written back."""
    model = _model(CONFIGS["12x20 heads"], device, torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3)).to(device)

    def stepwise():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            cache = model.allocate_cache(2, 20)
            return torch.cat([model(ids[:, :12], cache)] + [model(ids[:, i : i + 1], cache) for i in range(12, 20)], 1)

    fast = stepwise()
    monkeypatch.setenv("COMPRESSOR_DISABLE_KERNELS", "1")
    reference = stepwise()
    with torch.no_grad():
        truth = _model(CONFIGS["12x20 heads"], device, torch.float64)(ids)
    _assert_as_close(fast, reference, truth, FLOOR[device.type, torch.bfloat16], "autocast decoding")


# What the CPU fakes prove about the libraries' requirements, and the import guard


def test_fakes_refuse_what_the_libraries_refuse():
    fakes = kernel_fakes
    in_proj_out = torch.randn(2, 9, 748)  # the 12 x 20 model's in_proj row: z 240, xbc 496, dt 12
    xbc = in_proj_out[..., 240:736]
    with pytest.raises(RuntimeError, match="multiples of 8"):  # the old layout: a channel-last view of the row
        fakes.causal_conv1d_fn(xbc.transpose(1, 2), torch.randn(496, 4), activation="silu")
    with pytest.raises(RuntimeError, match="divisible by 8"):
        fakes.causal_conv1d_fn(torch.randn(2, 9, 174).transpose(1, 2), torch.randn(174, 4))
    with pytest.raises(RuntimeError, match="misaligned"):
        fakes.causal_conv1d_fn(torch.randn(2, 9, 64)[..., 2:50].transpose(1, 2), torch.randn(48, 4))
    with pytest.raises(RuntimeError, match="width between 2 and 4"):
        fakes.causal_conv1d_fn(torch.randn(2, 8, 9), torch.randn(8, 5))
    with pytest.raises(RuntimeError, match="not implemented for input type"):
        fakes.causal_conv1d_fn(torch.randn(2, 8, 9, dtype=torch.float64), torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="conv_state.scalar_type"):
        fakes.causal_conv1d_update(torch.randn(2, 8), torch.zeros(2, 8, 3, dtype=torch.bfloat16), torch.randn(8, 4))
    x, dt, A, B, C, D, dt_bias, state = _scan_inputs("cpu", torch.float32)
    h, p, n = state.shape[1:]
    with pytest.raises(AttributeError):  # selective_state_update reads dt_bias.stride()
        fakes.selective_state_update(
            state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, p), A[:, None, None].expand(h, p, n), B[:, 0], C[:, 0]
        )


def test_a_library_that_fails_to_import_leaves_only_its_ops_in_torch(monkeypatch, tmp_path):
    kernels.reset()
    kernel_fakes.install(monkeypatch, skip=("causal_conv1d",))
    # an extension built against another torch fails at import with something other than ImportError
    (tmp_path / "causal_conv1d.py").write_text("raise OSError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "causal_conv1d", raising=False)
    monkeypatch.setattr(kernels, "DEVICE_TYPE", "cpu")
    monkeypatch.delenv("COMPRESSOR_DISABLE_KERNELS", raising=False)
    with pytest.warns(kernels.KernelWarning, match=r"causal-conv1d cannot be used \(OSError: undefined symbol"):
        chosen = kernels.backend(torch.device("cpu"), torch.float32, 4)
    assert sorted(chosen.fast_ops()) == ["chunk_scan", "gated_rms_norm", "step"]
    assert chosen.conv is ssd.conv and chosen.conv_update is ssd.conv_update
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning for another dtype
        assert kernels.backend(torch.device("cpu"), torch.bfloat16, 4).fast_ops() == chosen.fast_ops()
    kernels.reset()


def test_layers_the_kernels_cannot_take_run_in_torch_and_say_why(monkeypatch):
    kernels.reset()
    kernel_fakes.install(monkeypatch)
    monkeypatch.setattr(kernels, "DEVICE_TYPE", "cpu")
    monkeypatch.delenv("COMPRESSOR_DISABLE_KERNELS", raising=False)
    cpu = torch.device("cpu")
    with pytest.warns(kernels.KernelWarning, match="conv_kernel=5"):
        assert sorted(kernels.backend(cpu, torch.float32, 5).fast_ops()) == ["chunk_scan", "gated_rms_norm", "step"]
    with pytest.warns(kernels.KernelWarning, match="float64"):
        assert kernels.backend(cpu, torch.float64, 4) is kernels.TORCH
    monkeypatch.setenv("COMPRESSOR_DISABLE_KERNELS", "1")
    assert kernels.backend(cpu, torch.float32, 4) is kernels.TORCH
    # a width-5 model still runs, its convolution in torch
    model = HybridLM(get_preset("tiny").replace(conv_kernel=5))
    monkeypatch.delenv("COMPRESSOR_DISABLE_KERNELS")
    kernel_fakes.CALLS.clear()
    model(torch.zeros(1, 5, dtype=torch.long))
    assert "mamba_chunk_scan_combined" in kernel_fakes.CALLS and "causal_conv1d_fn" not in kernel_fakes.CALLS
    kernels.reset()


def test_mixer_backend_is_chosen_per_device_and_dtype(monkeypatch):
    kernels.reset()
    kernel_fakes.install(monkeypatch)
    monkeypatch.setattr(kernels, "DEVICE_TYPE", "cpu")
    monkeypatch.delenv("COMPRESSOR_DISABLE_KERNELS", raising=False)
    model = HybridLM(get_preset("tiny"))
    assert any(isinstance(m, MambaMixer) for m in model.modules())
    for _ in range(3):
        model(torch.zeros(1, 5, dtype=torch.long))
    info = kernels._backend.cache_info()
    assert info.misses == 1 and info.hits >= 2  # one choice, reused by every layer and call
    kernels.reset()
