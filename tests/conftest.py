"""Shared test helpers: random tiny architectures, the transformers reference and short training runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from compressor.config import HybridConfig


@st.composite
def tiny_configs(draw, *, transformers_clamp: bool = True) -> HybridConfig:
    """Small random architectures covering n_groups > 1, GQA and every block kind.

    With `transformers_clamp`, dt is clamped below at time_step_min, as transformers' nemotron_h does.
    """
    pattern = draw(st.text(alphabet="M*-", min_size=1, max_size=6))
    n_groups = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([1, 2]))
    return HybridConfig(
        hybrid_override_pattern=pattern,
        vocab_size=draw(st.integers(32, 96)),
        hidden_size=draw(st.sampled_from([16, 32, 48])),
        intermediate_size=draw(st.sampled_from([16, 40])),
        num_attention_heads=kv_heads * draw(st.sampled_from([1, 2, 3])),
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        mamba_num_heads=n_groups * draw(st.sampled_from([1, 2, 3])),
        mamba_head_dim=draw(st.sampled_from([4, 8])),
        n_groups=n_groups,
        ssm_state_size=draw(st.sampled_from([4, 8, 16])),
        conv_kernel=draw(st.sampled_from([2, 4])),
        chunk_size=draw(st.sampled_from([4, 8, 16])),
        time_step_limit=(0.001, math.inf) if transformers_clamp else (0.0, math.inf),
    )


def to_transformers(config: HybridConfig):
    """A transformers NemotronHForCausalLM with the same architecture (random weights)."""
    transformers = pytest.importorskip("transformers")
    return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config.to_dict())).eval()


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (checkpoint) parameter names -> transformers' module names (`backbone.` -> `model.`)."""
    return {("model." + k.removeprefix("backbone.") if k.startswith("backbone.") else k): v for k, v in state.items()}


PIPELINE_SEQ = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small random hybrid checkpoint and a token file of 48 sequences of PIPELINE_SEQ tokens, for the
    pipeline tests (prune, search)."""
    from compressor.checkpoint import save_model
    from compressor.model import HybridLM
    from compressor.presets import get_preset

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    save_model(HybridLM(get_preset("tiny").replace(hidden_size=128, intermediate_size=256)), root / "model")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", (np.cumsum(rng.choice([1, 1, 2], size=48 * PIPELINE_SEQ)) % 512).astype(np.int32))
    return root


@st.composite
def tiny_moe_configs(draw, *, transformers_clamp: bool = True) -> HybridConfig:
    """Small random hybrid MoE architectures: grouped routing, latent projections, biases, unnormalised
    top-k weights, scaling factors, next to Mamba, attention and MLP blocks."""
    base = draw(tiny_configs(transformers_clamp=transformers_clamp))
    pattern = draw(st.text(alphabet="ME*-", max_size=3)) + "E" + draw(st.text(alphabet="ME*-", max_size=2))
    n_group = draw(st.sampled_from([1, 2, 4]))
    experts = n_group * draw(st.sampled_from([2, 3]))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(4, topk_group * experts // n_group)))
    return base.replace(
        hybrid_override_pattern=pattern,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=draw(st.sampled_from([8, 20])),
        moe_shared_expert_intermediate_size=draw(st.sampled_from([12, 24])),
        moe_latent_size=draw(st.sampled_from([None, 8, 24])),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        norm_topk_prob=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
    )


@torch.no_grad()
def randomize_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every MoE router (ours or transformers') weights that spread its sigmoid scores and a random
    score-correction bias, so that routing is neither near-tied nor trivially uniform."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            experts, hidden = module.weight.shape
            module.weight.copy_(torch.randn(experts, hidden, generator=gen) * 1.5 / math.sqrt(hidden))
            module.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.3)


# ----- training runs (tests/test_train.py, tests/test_attention_transfer.py) -------------------------------
TRAIN_VOCAB = 64


def write_cyclic_tokens(path, size: int = 12_000) -> None:
    """Token data with structure a model can learn: each token is usually the previous one + 1."""
    rng = np.random.default_rng(0)
    np.save(path, (np.cumsum(rng.choice([1, 1, 1, 2], size=size)) % TRAIN_VOCAB).astype(np.int32))


def train_config(workspace, out, **changes):
    """A few-step CPU run of `workspace`'s student on its tokens.npy (compressor.train.TrainConfig)."""
    from compressor.train import TrainConfig

    base = dict(
        student=str(workspace / "student"), out=str(out), data=str(workspace / "tokens.npy"), seq_len=32,
        batch_size=8, micro_batch_size=4, steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4,
        eval_sequences=8, save_every=2, log_every=1, valid_fraction=0.1,
        device="cpu",  # the figures these tests compare are CPU fp32 ones, also on a GPU machine
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)


def train_records(out, kind: str = "train") -> list[dict]:
    """The `kind` records of a run's metrics.jsonl."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def distill_in_one_and_two_processes(args: list[str], one, two) -> None:
    """Run `compress ARGS` in this process into `one`, and under torchrun with two gloo processes into `two`."""
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, [*args, "--out", str(one)])
    assert result.exit_code == 0, result.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", cli.__file__]
    done = subprocess.run([*launch, *args, "--out", str(two)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
