"""Setup's last step: does each carried package import, and from the folder it was installed into?

    python benchmarks/gpu/imports.py SITE

Prints one line per package (version, the file its first module came from) and, last, a one-line summary.
Exits 1 when a package fails to import, except that packages built on Triton are only reported where Triton
itself is absent (a CPU-only torch): the GPU parts are skipped there anyway.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor.kernels import LIBRARIES  # noqa: E402

# distribution -> the modules the check imports from it
MODULES = {
    "nvidia-modelopt": ["modelopt.torch.quantization", "modelopt.torch.export.unified_export_hf"],
    "datasets": ["datasets"],
    "liger-kernel": ["liger_kernel.transformers.fused_linear_jsd"],
    "mamba-ssm": sorted({module for module, _ in LIBRARIES["mamba-ssm"].values()}),
}
NEEDS_TRITON = ("liger-kernel", "mamba-ssm")


def check(distribution: str, site: Path) -> tuple[str, bool]:
    """A short status for `distribution` and whether it counts as a failure."""
    try:
        version = md.version(distribution)
    except md.PackageNotFoundError:
        return f"{distribution} is not installed", True
    try:
        loaded = [importlib.import_module(name) for name in MODULES[distribution]]
    except Exception as error:
        return f"{distribution} {version}: {type(error).__name__}: {error}", True
    where = Path(loaded[0].__file__).resolve()
    print(f"{distribution} {version}: {', '.join(MODULES[distribution])} from {where}")
    if not where.is_relative_to(site.resolve()):
        return f"{distribution} {version} imported from {where}, not from {site}", True
    return f"{distribution} {version}", False


def main() -> None:
    site = Path(sys.argv[1])
    has_triton = importlib.util.find_spec("triton") is not None
    said, failed = [], False
    for distribution in MODULES:
        if distribution in NEEDS_TRITON and not has_triton:
            said.append(f"{distribution} not imported (no triton here)")
            continue
        status, bad = check(distribution, site)
        said.append(status)
        failed |= bad
    print(("imports FAILED: " if failed else "imports: ") + "; ".join(said))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
