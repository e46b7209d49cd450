"""Compile causal-conv1d's CUDA extension for this machine's GPU only, from its source distribution.

    python benchmarks/gpu/build_conv.py SDIST BUILD_DIR OUT_SITE

causal-conv1d's setup.py compiles for nine GPU architectures. torch's JIT builder (`cpp_extension.load`,
ninja, MAX_JOBS parallel compiles) compiles the same sources with the same flags for the present GPU's
architecture alone. OUT_SITE then holds `causal_conv1d/` (the package's Python code) and
`causal_conv1d_cuda.so`, ready to be put on PYTHONPATH. BUILD_DIR is reused: an unchanged build is not
compiled again.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

# setup.py's flags for nvcc (causal-conv1d 1.7.0), less its architecture list and --ptxas-options=-v
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
]
SOURCES = ("causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu")
EXTENSION = "causal_conv1d_cuda"  # the module name causal_conv1d/cpp_functions.py imports


def main() -> None:
    sdist, build, site = (Path(arg) for arg in sys.argv[1:4])
    import torch
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # the present GPU only
    os.environ.setdefault("MAX_JOBS", str(len(SOURCES)))
    # the ninja this interpreter's environment installed, if its bin folder is not on PATH
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        archive.extractall(build, filter="data")
    source = build / top
    version = re.search(r'__version__ = "(.+)"', (source / "causal_conv1d" / "__init__.py").read_text()).group(1)
    start = time.perf_counter()
    module = cpp_extension.load(
        name=EXTENSION,
        sources=[str(source / "csrc" / name) for name in SOURCES],
        extra_include_paths=[str(source / "csrc")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build),
        verbose=True,
    )
    seconds = time.perf_counter() - start
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy2(module.__file__, site / f"{EXTENSION}.so")
    shutil.copytree(source / "causal_conv1d", site / "causal_conv1d", dirs_exist_ok=True)
    print(f"causal-conv1d {version} built for sm_{major}{minor} in {seconds:.0f} s (torch {torch.__version__})")


if __name__ == "__main__":
    main()
