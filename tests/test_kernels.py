"""The CUDA fast path (mamba-ssm kernels) against the pure-torch reference. Runs only where both exist."""

import importlib.util
import sys

import pytest
import torch

from compressor import kernels
from compressor.model import HybridLM
from compressor.presets import get_preset

needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs CUDA and mamba-ssm",
)


def test_cpu_never_uses_or_imports_the_kernels():
    assert not kernels.available(torch.device("cpu"))
    HybridLM(get_preset("tiny"))(torch.zeros(1, 5, dtype=torch.long))
    assert kernels._loaded is None  # nothing was even tried
    assert "mamba_ssm" not in sys.modules


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_torch_path(monkeypatch, dtype):
    torch.manual_seed(0)
    model = HybridLM(get_preset("small")).to("cuda", dtype).eval()
    ids = torch.randint(0, 4096, (2, 200), device="cuda")
    assert kernels.available(ids.device)
    with torch.no_grad():
        fast = model(ids).float()
        cache = model.allocate_cache(2, 200)
        stepwise = torch.cat(
            [model(ids[:, :150], cache)] + [model(ids[:, i : i + 1], cache) for i in range(150, 200)], 1
        )
        monkeypatch.setenv("COMPRESSOR_DISABLE_KERNELS", "1")
        reference = model(ids).float()
    tolerance = 2e-3 if dtype == torch.float32 else 5e-2
    scale = reference.abs().max()
    assert (fast - reference).abs().max() <= tolerance * scale
    assert (stepwise.float() - reference).abs().max() <= tolerance * scale
