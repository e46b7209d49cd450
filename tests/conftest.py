"""Shared test helpers: random tiny architectures, the transformers reference and short training runs."""

from __future__ import annotations

import json
import math
import shutil
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

    With `transformers_clamp`, time_step_limit is [time_step_min, inf]: every supported transformers then
    clamps dt as we do (5.15-5.24 floor it at time_step_min, 5.25 and newer apply time_step_limit).
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


# ----- the reference's dt bounds, by behaviour rather than by version number ----------------------------------
# transformers 5.15-5.24 (the oldest the suite supports) floor the Mamba step size softplus(dt + dt_bias) at
# config.time_step_min and ignore time_step_limit; 5.25 and newer clamp it to config.time_step_limit only.
# compressor applies time_step_limit. (5.6-5.14 floored too, in their forward pass only, and their chunked scan
# also differs from ours across chunk boundaries: 5e-3 on this suite's tiny model, hence >= 5.15.)
# The documented relation, for either behaviour: transformers' logits equal ours computed under the bounds
# transformers applies (`transformers_dt_bounds`).


def transformers_floors_dt() -> bool:
    """Whether the installed transformers floors dt at time_step_min whatever time_step_limit says.

    Measured, not looked up: one tiny NemotronH whose step sizes lie between 1e-4 and 1e-3 is run with
    time_step_min 1e-3 and 1e-4 (time_step_limit [0, inf] in both); a floor shows as different logits.
    """
    transformers = pytest.importorskip("transformers")
    config = HybridConfig(
        hybrid_override_pattern="M", vocab_size=16, hidden_size=16, mamba_num_heads=2, mamba_head_dim=8,
        n_groups=1, ssm_state_size=4, conv_kernel=2, chunk_size=4,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(12).reshape(1, 12) % config.vocab_size
    logits, state = [], None
    for time_step_min in (1e-3, 1e-4):
        model = transformers.NemotronHForCausalLM(
            transformers.NemotronHConfig(**config.replace(time_step_min=time_step_min).to_dict())
        ).eval()
        with torch.no_grad():
            if state is None:  # unit-scale weights, so that the SSM's share of the logits is far above rounding
                for parameter in model.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
                for module in model.modules():
                    if hasattr(module, "dt_bias"):
                        module.dt_bias.fill_(math.log(math.expm1(3e-4)))
                        module.in_proj.weight[-module.num_heads :].mul_(1e-3)  # dt stays near dt_bias
                state = {name: value.clone() for name, value in model.state_dict().items()}
            model.load_state_dict(state)
            logits.append(model(ids, use_cache=False).logits)
    return not torch.equal(logits[0], logits[1])


def transformers_dt_bounds(config: HybridConfig) -> tuple[float, float]:
    """The bounds the installed transformers applies to softplus(dt + dt_bias) for a checkpoint of `config`."""
    return (config.time_step_min, math.inf) if transformers_floors_dt() else config.time_step_limit


@pytest.fixture(params=["installed", "floor", "limit"])
def transformers_world(request, monkeypatch) -> str:
    """transformers as installed, or made to behave as the other releases do (both behaviours in every run).

    "floor" (5.15-5.24): the mixer clamps at time_step_min and ignores time_step_limit; "limit" (5.25 and
    newer): it clamps to time_step_limit only. Each release reads one of the two attributes set here, so
    setting both gives the chosen behaviour on either release.
    """
    transformers = pytest.importorskip("transformers")
    if request.param != "installed":
        mixer = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer
        init = mixer.__init__

        def patched(self, config, *args, **kwargs):
            init(self, config, *args, **kwargs)
            low, high = tuple(config.time_step_limit)
            if request.param == "floor":
                self.time_step_limit = (config.time_step_min, math.inf)
                self.time_step_min = config.time_step_min
            else:
                self.time_step_limit = (low, high)
                self.time_step_min = low

        monkeypatch.setattr(mixer, "__init__", patched)
    return request.param


def with_time_step_limit(path: Path, out: Path, limit: tuple[float, float]) -> Path:
    """A copy of checkpoint folder `path` at `out` whose config.json says time_step_limit = `limit`."""
    shutil.copytree(path, out)
    raw = json.loads((out / "config.json").read_text())
    raw["time_step_limit"] = list(limit)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def assert_transformers_agrees(path: Path, tmp: Path, *, atol: float = 1e-5) -> None:
    """transformers' logits for checkpoint `path` equal ours computed under the dt bounds it applies."""
    transformers = pytest.importorskip("transformers")
    from compressor.checkpoint import load_model

    config = HybridConfig.from_file(path)
    bounds = transformers_dt_bounds(config)
    ours = load_model(path if bounds == config.time_step_limit else with_time_step_limit(path, tmp, bounds))
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = transformers.NemotronHForCausalLM.from_pretrained(path).eval()(ids, use_cache=False).logits
        assert (ours(ids) - theirs).abs().max() <= atol


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
