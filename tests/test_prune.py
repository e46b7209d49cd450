"""Pruning: identity, each axis against transformers, dropped blocks, heterogeneous widths."""

import math

import pytest
import torch

from compressor.checkpoint import load_model, save_model
from compressor.config import MOE
from compressor.errors import CompressorError
from compressor.importance import estimate
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.prune import prune
from compressor.target import BlockTarget, Target


@pytest.fixture(scope="module")
def model():
    # transformers clamps dt at time_step_min; use that limit so both engines agree exactly
    torch.manual_seed(0)
    config = get_preset("tiny").replace(time_step_limit=(0.001, math.inf), num_attention_heads=8)
    return HybridLM(config).eval()


@pytest.fixture(scope="module")
def scores(model):
    gen = torch.Generator().manual_seed(0)
    return estimate(model, [torch.randint(0, 512, (2, 24), generator=gen) for _ in range(3)])


def _ids(seed=1):
    return torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(seed))


def test_keeping_everything_is_the_identity(model, scores):
    pruned = prune(model, scores, Target.identity(model.config))
    assert pruned.config == model.config
    with torch.no_grad():
        assert torch.equal(pruned(_ids()), model(_ids()))


AXES = {
    "hidden": dict(hidden_size=40),
    "ffn": dict(intermediate_size=72),
    "mamba heads": dict(mamba_num_heads=4),
    "mamba head_dim": dict(mamba_head_dim=6),
    "attention heads": dict(num_attention_heads=4),
    "kv groups": dict(num_attention_heads=4, num_key_value_heads=1),
    "blocks": dict(drop_blocks=(1, 3, 5)),
    "all at once": dict(hidden_size=48, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=4, drop_blocks=(8,)),
}


@pytest.mark.parametrize("axis", list(AXES))
def test_each_axis_gives_a_checkpoint_transformers_agrees_with(model, scores, tmp_path, axis):
    transformers = pytest.importorskip("transformers")
    target = Target.uniform(model.config, **AXES[axis])
    pruned = prune(model, scores, target)
    assert pruned.config.is_uniform
    assert pruned.num_parameters() < model.num_parameters()
    save_model(pruned, tmp_path / "pruned")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ours = load_model(tmp_path / "pruned")
    with torch.no_grad():
        want = theirs(_ids(), use_cache=False).logits
        assert (ours(_ids()) - want).abs().max() <= 1e-4
        assert (pruned(_ids()) - want).abs().max() <= 1e-4


def test_dropping_blocks_equals_skipping_them(model, scores):
    pruned = prune(model, scores, Target.uniform(model.config, drop_blocks=(2, 4)))
    assert pruned.config.pattern == "M-*M*M-"
    ids = _ids()
    with torch.no_grad():
        hidden = model.backbone.embeddings(ids)
        for block in model.backbone.layers:
            if block.index not in (2, 4):
                hidden = block(hidden)
        skipped = model.lm_head(model.backbone.norm_f(hidden))
        torch.testing.assert_close(pruned(ids), skipped)


def test_kept_channels_are_the_most_important(model, scores):
    pruned = prune(model, scores, Target.uniform(model.config, intermediate_size=16))
    kept = scores.ffn[1].topk(16).indices.sort().values
    torch.testing.assert_close(
        pruned.backbone.layers[1].mixer.up_proj.weight, model.backbone.layers[1].mixer.up_proj.weight[kept]
    )
    heads, channels = scores.keep_mamba(0, 4, 8, 2)
    assert torch.equal(heads // 4, torch.tensor([0, 0, 1, 1]))  # two heads from each group


def test_heterogeneous_targets_round_trip(model, scores, tmp_path):
    blocks = []
    for spec in model.config.blocks:
        widths = dict(
            intermediate_size=[32, 64, 96][spec.index % 3],
            mamba_num_heads=4 if spec.index == 2 else 8,
            mamba_head_dim=8,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
        blocks.append(BlockTarget(source=spec.index, kind=spec.kind, **widths))
    target = Target(hidden_size=64, blocks=tuple(blocks))
    pruned = prune(model, scores, target)
    assert not pruned.config.is_uniform and pruned.config.block(2).mamba_num_heads == 4
    save_model(pruned, tmp_path / "hetero")
    loaded = load_model(tmp_path / "hetero")
    assert loaded.config.blocks == pruned.config.blocks and loaded.config.hidden_size == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), pruned(_ids()))


def test_bad_targets(model, scores):
    with pytest.raises(CompressorError, match="cannot keep 200 of 128"):
        prune(model, scores, Target.uniform(model.config, intermediate_size=200))
    with pytest.raises(CompressorError, match="not divisible by n_groups"):
        prune(model, scores, Target.uniform(model.config, mamba_num_heads=3))
    with pytest.raises(CompressorError, match="at least one block"):
        Target.uniform(model.config, drop_blocks=tuple(range(9))).config(model.config)


# ----- MoE blocks ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[{}, {"n_group": 2, "topk_group": 1, "moe_latent_size": 40, "mlp_bias": True}])
def moe_model(request):
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    config = get_preset("tiny-moe").replace(time_step_limit=(0.001, math.inf), **request.param)
    model = HybridLM(config).eval()
    randomize_routers(model)
    return model


@pytest.fixture(scope="module")
def moe_scores(moe_model):
    gen = torch.Generator().manual_seed(0)
    return estimate(moe_model, [torch.randint(0, 512, (2, 24), generator=gen) for _ in range(3)])


MOE_AXES = {
    "experts": dict(n_routed_experts=4),
    "expert ffn": dict(moe_intermediate_size=20),
    "shared ffn": dict(moe_shared_expert_intermediate_size=24),
    "hidden": dict(hidden_size=48),
    "all at once": dict(
        hidden_size=56, n_routed_experts=6, moe_intermediate_size=16, moe_shared_expert_intermediate_size=40,
        mamba_num_heads=4, drop_blocks=(4,),
    ),
}  # fmt: skip


def test_keeping_every_expert_is_the_identity(moe_model, moe_scores):
    pruned = prune(moe_model, moe_scores, Target.identity(moe_model.config))
    assert pruned.config == moe_model.config
    with torch.no_grad():
        assert torch.equal(pruned(_ids()), moe_model(_ids()))


@pytest.mark.parametrize("axis", list(MOE_AXES))
def test_each_moe_axis_gives_a_checkpoint_transformers_agrees_with(moe_model, moe_scores, tmp_path, axis):
    transformers = pytest.importorskip("transformers")
    pruned = prune(moe_model, moe_scores, Target.uniform(moe_model.config, **MOE_AXES[axis]))
    assert pruned.config.is_uniform and pruned.num_parameters() < moe_model.num_parameters()
    save_model(pruned, tmp_path / "pruned")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ours = load_model(tmp_path / "pruned")
    with torch.no_grad():
        want = theirs(_ids(), use_cache=False).logits
        assert (ours(_ids()) - want).abs().max() <= 1e-4
        assert (pruned(_ids()) - want).abs().max() <= 1e-4


def test_kept_experts_and_neurons_are_the_most_important(moe_model, moe_scores):
    config = moe_model.config
    pruned = prune(
        moe_model, moe_scores, Target.uniform(config, n_routed_experts=4, moe_intermediate_size=12, hidden_size=64)
    )
    source, mixer = moe_model.backbone.layers[4].mixer, pruned.backbone.layers[4].mixer
    kept = moe_scores.keep_experts(4, 4, config.n_group)
    if config.n_group == 2:  # two of each routing group of 4
        assert torch.equal(kept // 4, torch.tensor([0, 0, 1, 1]))
    else:
        assert set(kept.tolist()) == set(moe_scores.expert_routing[4].topk(4).indices.tolist())
    torch.testing.assert_close(mixer.gate.weight, source.gate.weight[kept])
    torch.testing.assert_close(mixer.gate.e_score_correction_bias, source.gate.e_score_correction_bias[kept])
    for new, old in enumerate(kept.tolist()):  # renumbered in order, each with its own best neurons
        neurons = moe_scores.expert_ffn[4][old].topk(12).indices.sort().values
        torch.testing.assert_close(mixer.experts[new].up_proj.weight, source.experts[old].up_proj.weight[neurons])
        torch.testing.assert_close(
            mixer.experts[new].down_proj.weight, source.experts[old].down_proj.weight[:, neurons]
        )
    assert len(mixer.experts) == 4 and pruned.config.n_routed_experts == 4


def test_heterogeneous_moe_targets_round_trip(moe_model, moe_scores, tmp_path):
    config = moe_model.config
    blocks = []
    for spec in config.blocks:
        widths = {name: getattr(spec, name) for name in ("intermediate_size", "mamba_num_heads", "mamba_head_dim")}
        widths.update(num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads)
        experts = {1: 4, 4: 8, 7: 6}.get(spec.index, spec.n_routed_experts)
        blocks.append(
            BlockTarget(
                source=spec.index, kind=spec.kind, n_routed_experts=experts,
                moe_intermediate_size=16 if spec.index == 7 else 32, moe_shared_expert_intermediate_size=48, **widths,
            )
        )  # fmt: skip
    target = Target(hidden_size=64, blocks=tuple(blocks))
    pruned = prune(moe_model, moe_scores, target)
    assert not pruned.config.is_uniform
    assert [pruned.config.block(i).n_routed_experts for i in (1, 4, 7)] == [4, 8, 6]
    assert (
        pruned.config.block(7).moe_intermediate_size == 16 and pruned.config.moe_shared_expert_intermediate_size == 48
    )
    assert Target.from_dict(target.to_dict()) == target
    assert target.summary(config)["num_moe_experts"] == [b.n_routed_experts for b in target.blocks if b.kind == MOE]
    save_model(pruned, tmp_path / "hetero")
    loaded = load_model(tmp_path / "hetero")
    assert loaded.config.blocks == pruned.config.blocks
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), pruned(_ids()))


def test_bad_moe_targets(moe_model, moe_scores):
    config = moe_model.config
    with pytest.raises(CompressorError, match="exceeds the 1 routed experts"):
        Target.uniform(config, n_routed_experts=1).config(config)
    if config.n_group == 2:
        with pytest.raises(CompressorError, match="not divisible by n_group"):
            prune(moe_model, moe_scores, Target.uniform(config, n_routed_experts=5))
    with pytest.raises(CompressorError, match="cannot keep 40 of 32"):
        prune(moe_model, moe_scores, Target.uniform(config, moe_intermediate_size=40))


def test_write_pruned_equals_prune_then_save(model, scores, tmp_path):
    # the streamed checkpoint (no pruned model built) holds exactly what the pruned model would save
    from compressor.prune import write_pruned

    target = Target.uniform(model.config, hidden_size=48, intermediate_size=40, mamba_num_heads=8, drop_blocks=(2,))
    source = HybridLM(model.config).to(torch.bfloat16)
    source.load_state_dict(model.state_dict())
    save_model(prune(source, scores, target), tmp_path / "built")
    (tmp_path / "streamed").mkdir()
    config = write_pruned(source, scores, target, tmp_path / "streamed")
    built, streamed = load_model(tmp_path / "built"), load_model(tmp_path / "streamed")
    assert config.to_dict() | {"dtype": "bfloat16"} == built.config.to_dict() == streamed.config.to_dict()
    a, b = built.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a
    )


def test_a_pruned_model_shares_no_memory_with_its_source(moe_model, moe_scores):
    pruned = prune(moe_model, moe_scores, Target.identity(moe_model.config))
    source = {t.untyped_storage().data_ptr() for t in moe_model.state_dict().values()}
    assert not source & {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
