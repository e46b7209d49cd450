"""The GPU check's environment: device, versions, and which path each Mamba op takes (kernel or torch).

    python benchmarks/gpu/env.py

Prints what it found and, last, a one-line summary. Exits 1 when mamba-ssm's Triton ops (chunk_scan, step,
gated_rms_norm) are not active: without them no part measures the fast path. The convolution ops running in
torch is reported, not a failure: causal-conv1d is compiled on the machine only when time allows (the conv
part says why it is absent).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compressor import kernels  # noqa: E402

REQUIRED = {"chunk_scan", "step", "gated_rms_norm"}  # mamba-ssm's ops


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        module = sys.modules.get(name.replace("-", "_"))
        return getattr(module, "__version__", "absent")


def main() -> None:
    names = ("torch", "triton", "transformers", "mamba-ssm", "causal-conv1d", "nvidia-modelopt", "liger-kernel")
    print(f"python {sys.version.split()[0]}; " + ", ".join(f"{name} {version(name)}" for name in names))
    print(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        backend = kernels.backend(torch.device("cuda"), torch.bfloat16, 4)
    for warning in said:
        print(warning.message)
    fast = set(backend.fast_ops())
    ops = list(kernels.Backend.__dataclass_fields__)
    for library, library_ops in kernels.LIBRARIES.items():
        for op, (module, function) in library_ops.items():
            print(f"  {op}: {f'{library} {module}.{function}' if op in fast else 'torch (compressor.ssd)'}")
    torch_ops = [op for op in ops if op not in fast]
    line = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {version('triton')}; kernel ops "
        f"{len(fast)}/{len(ops)}" + (f" (torch: {', '.join(torch_ops)})" if torch_ops else "")
    )
    print(line)
    sys.exit(0 if fast >= REQUIRED else 1)


if __name__ == "__main__":
    main()
