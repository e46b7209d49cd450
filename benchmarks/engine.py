"""Forward throughput and peak memory: compressor's HybridLM vs transformers' NemotronHForCausalLM on the
CPU, or compressor with and without its CUDA kernels on a GPU.

CPU: both run the same architecture and weights in fp32 (transformers falls back to its pure-torch path
there, as compressor does). CUDA (`--device cuda`): compressor in bf16 with the mamba-ssm / causal-conv1d
kernels against its torch path (COMPRESSOR_DISABLE_KERNELS=1); it stops if the kernels are not active.
Each measurement runs in a fresh subprocess that builds the model and runs one warm-up pass. Speed: the
median of the timed passes. Memory (a separate process): on the CPU the peak-RSS mark is reset (Linux
/proc/self/clear_refs) and one pass runs, peak memory being the rise of the peak RSS above the resident
size at the reset; on CUDA the rise of the allocator's peak over what is allocated before the pass. Either
way it is what the pass itself allocates (activations and workspace, not the weights). Run it on an
otherwise idle machine.

    python benchmarks/engine.py                 # the table in docs/engine.md
    python benchmarks/engine.py --quick         # smaller, for a smoke run
    python benchmarks/engine.py --train         # forward + backward as well
    python benchmarks/engine.py --device cuda   # kernels vs torch path on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    # name: (config overrides on the "small" preset, batch, seq_len)
    "tiny / seq 256": (dict(preset="tiny"), 4, 256),
    "small / seq 1024": (dict(preset="small"), 2, 1024),
    "h512 x 8 blocks / seq 2048": (
        dict(
            preset="small",
            hybrid_override_pattern="M-M*M-M-",
            hidden_size=512,
            intermediate_size=1536,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            mamba_num_heads=16,
            mamba_head_dim=64,
            n_groups=4,
            ssm_state_size=64,
            chunk_size=128,
        ),
        1,
        2048,
    ),
}
IMPLS = {"cpu": ("compressor", "transformers"), "cuda": ("kernels", "torch path")}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
QUICK = {"tiny / seq 256": CASES["tiny / seq 256"], "small / seq 1024": (dict(preset="small"), 1, 512)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(
    impl: str, overrides: dict, batch: int, seq_len: int, repeats: int, train: bool, what: str, device: str = "cpu"
) -> float:
    """Runs inside the subprocess: tokens/s (`what="speed"`) or peak extra MiB (`what="memory"`)."""
    import torch

    from compressor import kernels
    from compressor.model import HybridLM
    from compressor.presets import get_preset

    torch.manual_seed(0)
    overrides = dict(overrides)
    config = get_preset(overrides.pop("preset")).replace(**overrides)
    dtype = getattr(torch, DTYPES[device])
    if impl == "kernels":
        fast = kernels.backend(torch.device(device), dtype, config.conv_kernel).fast_ops()
        if len(fast) < len(kernels.Backend.__dataclass_fields__):
            raise SystemExit(f"the CUDA kernels are not active (only {fast or 'none'}); see the warning above")
    if impl != "transformers":
        model = HybridLM(config)
        forward = model
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config.to_dict()))

        def forward(ids):
            return model(ids, use_cache=False).logits

    model = model.to(device, dtype).train(train)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def one_pass():
        if train:
            model.zero_grad(set_to_none=True)
            forward(ids).float().logsumexp(-1).mean().backward()
        else:
            with torch.inference_mode():
                forward(ids)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    one_pass()  # warm-up (on CUDA it also compiles and autotunes the Triton kernels)
    synchronize()
    if what == "memory" and device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_pass()
        synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if what == "memory":
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        base = _rss_kib("VmRSS")
        one_pass()
        return (_rss_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        synchronize()
        times.append(time.perf_counter() - start)
    return batch * seq_len / statistics.median(times)


def run_case(impl: str, case: tuple, repeats: int, train: bool, what: str, device: str = "cpu") -> float:
    overrides, batch, seq_len = case
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.engine import measure; "
        f"print(measure({impl!r}, {overrides!r}, {batch}, {seq_len}, {repeats}, {train!r}, {what!r}, {device!r}))"
    )
    env = dict(os.environ)
    env.pop("COMPRESSOR_DISABLE_KERNELS", None)
    if impl == "torch path":
        env["COMPRESSOR_DISABLE_KERNELS"] = "1"
    if what == "memory" and device == "cpu":
        # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so the peak RSS of
        # the measured pass is not hidden by memory the warm-up left in the heap. It slows allocation,
        # which is why speed is measured in a separate process without it.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{impl} / {what} failed:\n{out.stderr.strip()[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller cases, for a smoke run")
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=sorted(IMPLS), default="cpu", help="cuda: kernels vs torch path")
    args = parser.parse_args()
    import torch

    cases = QUICK if args.quick else CASES
    modes = [False, True] if args.train else [False]
    impls = IMPLS[args.device]
    if args.device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, CUDA")
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(
        f"| case | pass | {impls[0]} tok/s | {impls[1]} tok/s | speed ratio "
        f"| {impls[0]} peak MiB | {impls[1]} peak MiB | memory ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, case in cases.items():
        for train in modes:
            speed = [run_case(impl, case, args.repeats, train, "speed", args.device) for impl in impls]
            memory = [run_case(impl, case, args.repeats, train, "memory", args.device) for impl in impls]
            print(
                f"| {name} (batch {case[1]}) | {'fwd+bwd' if train else 'forward'} "
                f"| {speed[0]:,.0f} | {speed[1]:,.0f} | {speed[0] / speed[1]:.2f}x "
                f"| {memory[0]:,.0f} | {memory[1]:,.0f} | {memory[0] / max(memory[1], 1e-9):.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
