import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.checkpoint import load_model, save_model
from compressor.model import HybridLM, MoE
from compressor.presets import get_preset
from tests.conftest import hf_state_dict, randomize_routers, tiny_configs, tiny_moe_configs, to_transformers

pytest.importorskip("transformers")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _ids(config, batch, length, seed=0):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(config=tiny_configs(), batch=st.integers(1, 3), length=st.integers(1, 37), seed=st.integers(0, 999))
def test_logits_equal_transformers_via_checkpoints_both_ways(tmp_path_factory, config, batch, length, seed):
    torch.manual_seed(seed)
    ours = HybridLM(config).eval()
    ids = _ids(config, batch, length, seed)
    # ours -> checkpoint -> transformers
    path = tmp_path_factory.mktemp("ours") / "ckpt"
    save_model(ours, path)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        want = theirs(ids, use_cache=False).logits
        assert (ours(ids) - want).abs().max() <= 1e-4
    # transformers (fresh random weights) -> checkpoint -> ours
    theirs = to_transformers(config)
    other = tmp_path_factory.mktemp("theirs") / "ckpt"
    theirs.save_pretrained(other)
    loaded = load_model(other)
    with torch.no_grad():
        assert (loaded(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "changes, batch, length",
    [
        ({}, 3, 45),  # tiny: n_groups 2, GQA 4/2, chunk 16 (45 is not a multiple)
        ({"n_groups": 4, "num_attention_heads": 6, "num_key_value_heads": 3, "chunk_size": 8}, 2, 29),
        (
            {
                "hybrid_override_pattern": "MM*-*M",
                "mamba_head_dim": 16,
                "ssm_state_size": 32,
                "chunk_size": 32,
            },
            2,
            70,
        ),
    ],
)
def test_logits_equal_transformers_on_fixed_configs(tmp_path, changes, batch, length):
    config = get_preset("tiny").replace(time_step_limit=(0.001, math.inf), **changes)
    torch.manual_seed(0)
    ours = HybridLM(config).eval()
    save_model(ours, tmp_path / "ours")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids(config, batch, length)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-4
        theirs.save_pretrained(tmp_path / "theirs")
        assert (load_model(tmp_path / "theirs")(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-4


def test_default_dt_limit_matches_transformers_when_no_clamp_applies():
    # transformers clamps dt below at time_step_min; checkpoints say time_step_limit = [0, inf] (no clamp),
    # which compressor follows. The two agree wherever softplus(dt) stays above time_step_min.
    config = get_preset("tiny")
    assert config.time_step_limit == (0.0, math.inf)
    torch.manual_seed(0)
    ours = HybridLM(config).eval()
    with torch.no_grad():
        for block in ours.backbone.layers:
            if block.kind == "mamba":
                block.mixer.dt_bias.fill_(1.0)  # softplus >= 0.3 for these small projections
    theirs = to_transformers(config)
    theirs.load_state_dict(hf_state_dict(ours.state_dict()))
    ids = _ids(config, 2, 40)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-5


@SETTINGS
@given(config=tiny_configs(transformers_clamp=False), split=st.integers(1, 20), seed=st.integers(0, 999))
def test_cached_decoding_equals_full_forward(config, split, seed):
    torch.manual_seed(seed)
    model = HybridLM(config).eval()
    ids = _ids(config, 2, 24, seed)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 24)
        pieces = [model(ids[:, :split], cache)]
        for i in range(split, 24):
            pieces.append(model(ids[:, i : i + 1], cache))
        assert cache.seen == 24
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
        # a prompt continued in several multi-token pieces (chunked prefill)
        cache = model.allocate_cache(2, 24)
        pieces = [model(ids[:, :split], cache), model(ids[:, split:], cache)] if split < 24 else [model(ids, cache)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_cache_overflow_is_refused():
    model = HybridLM(get_preset("tiny")).eval()
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_cache_ssm_state_is_fp32_by_default_and_configurable():
    model = HybridLM(get_preset("tiny")).to(torch.bfloat16)
    cache = model.allocate_cache(1, 8)
    mamba_states = [s for s in cache.layers.values() if hasattr(s, "ssm")]
    assert mamba_states and all(s.ssm.dtype == torch.float32 and s.conv.dtype == torch.bfloat16 for s in mamba_states)
    model = HybridLM(get_preset("tiny").replace(mamba_ssm_cache_dtype="bfloat16"))
    assert all(s.ssm.dtype == torch.bfloat16 for s in model.allocate_cache(1, 8).layers.values() if hasattr(s, "ssm"))


def test_bf16_forward_tracks_fp32():
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).eval()
    ids = _ids(model.config, 2, 30)
    with torch.no_grad():
        full = model(ids)
        half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()


def test_parameter_names_follow_the_checkpoint_format():
    with torch.device("meta"):
        model = HybridLM(get_preset("tiny"))
    names = set(model.state_dict())
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"} <= names
    assert "backbone.layers.0.mixer.in_proj.weight" in names and "backbone.layers.0.mixer.A_log" in names
    assert "backbone.layers.1.mixer.up_proj.weight" in names
    assert "backbone.layers.3.mixer.q_proj.weight" in names


def test_tied_embeddings_share_one_tensor(tmp_path):
    model = HybridLM(get_preset("tiny").replace(tie_word_embeddings=True))
    assert model.lm_head.weight is model.backbone.embeddings.weight
    save_model(model, tmp_path / "tied")
    loaded = load_model(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_heterogeneous_blocks_build_and_run():
    config = get_preset("tiny").replace(
        block_overrides={
            0: {"mamba_num_heads": 4},
            1: {"intermediate_size": 24},
            3: {"num_attention_heads": 2},
        }
    )
    model = HybridLM(config).eval()
    assert model.backbone.layers[0].mixer.in_proj.weight.shape[0] == 2 * 4 * 8 + 2 * 2 * 16 + 4
    assert model.backbone.layers[1].mixer.up_proj.weight.shape == (24, 64)
    ids = _ids(config, 2, 20)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 20)
        stepwise = torch.cat([model(ids[:, :5], cache)] + [model(ids[:, i : i + 1], cache) for i in range(5, 20)], 1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-4)


# ----- MoE blocks ------------------------------------------------------------------------------------------
def _moe_model(config, seed=0):
    torch.manual_seed(seed)
    model = HybridLM(config).eval()
    randomize_routers(model, seed)
    return model


@SETTINGS
@given(config=tiny_moe_configs(), batch=st.integers(1, 3), length=st.integers(1, 29), seed=st.integers(0, 999))
def test_moe_logits_equal_transformers_via_checkpoints_both_ways(tmp_path_factory, config, batch, length, seed):
    transformers = pytest.importorskip("transformers")
    ours = _moe_model(config, seed)
    ids = _ids(config, batch, length, seed)
    path = tmp_path_factory.mktemp("ours") / "ckpt"
    save_model(ours, path)
    theirs = transformers.NemotronHForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-4
    theirs = to_transformers(config)
    randomize_routers(theirs, seed + 1)
    other = tmp_path_factory.mktemp("theirs") / "ckpt"
    theirs.save_pretrained(other)
    loaded = load_model(other)
    with torch.no_grad():
        assert (loaded(ids) - theirs(ids, use_cache=False).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "changes",
    [
        {},  # tiny-moe: 8 experts, top-2, scaling 2.5, Mamba / attention / MLP blocks around
        {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "norm_topk_prob": False},
        {"moe_latent_size": 40, "mlp_bias": True, "routed_scaling_factor": 1.0},
    ],
)
def test_moe_logits_equal_transformers_on_fixed_configs(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    config = get_preset("tiny-moe").replace(time_step_limit=(0.001, math.inf), **changes)
    ours = _moe_model(config)
    save_model(ours, tmp_path / "ours")
    names = set(load_model(tmp_path / "ours").state_dict())
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in names
    assert "backbone.layers.1.mixer.gate.e_score_correction_bias" in names
    theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids(config, 3, 41)
    with torch.no_grad():
        want = theirs(ids, use_cache=False).logits
        assert (ours(ids) - want).abs().max() <= 1e-4
        # the routing is spread: the comparison covers most experts
        block = ours.backbone.layers[1]
        _, experts = block.mixer.gate(block.norm(ours.backbone.embeddings(ids)).flatten(0, 1))
        assert experts.unique().numel() >= config.n_routed_experts * 3 // 4


def _naive_moe(mixer: MoE, hidden: torch.Tensor) -> torch.Tensor:
    """The MoE block token by token (the reference the vectorised dispatch is held to)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    weights, experts = mixer.gate(x)
    rows = []
    for t in range(x.shape[0]):
        token = x[t] if mixer.fc1_latent_proj is None else mixer.fc1_latent_proj(x[t])
        out = sum(w * mixer.experts[e](token) for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True))
        rows.append(out if mixer.fc2_latent_proj is None else mixer.fc2_latent_proj(out))
    return torch.stack(rows).view_as(hidden) + mixer.shared_experts(hidden)


@pytest.mark.parametrize("latent", [None, 24])
def test_moe_dispatch_equals_the_token_by_token_reference(latent):
    config = get_preset("tiny-moe").replace(moe_latent_size=latent, n_group=2, topk_group=1)
    mixer = _moe_model(config).backbone.layers[1].mixer
    hidden = torch.randn(3, 11, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), _naive_moe(mixer, hidden), atol=1e-6, rtol=1e-5)
        # grouped routing: each token's experts lie in one group of 4
        _, experts = mixer.gate(hidden.flatten(0, 1))
        assert torch.equal(experts[:, 0] // 4, experts[:, 1] // 4)


def test_router_stays_fp32_in_a_bf16_model(tmp_path):
    model = _moe_model(get_preset("tiny-moe"))
    save_model(model, tmp_path / "fp32")
    loaded = load_model(tmp_path / "fp32", dtype="bfloat16")
    gate = loaded.backbone.layers[1].mixer.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.backbone.layers[1].mixer.experts[0].up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(gate.weight, model.backbone.layers[1].mixer.gate.weight)  # not rounded to bf16
    ids = _ids(loaded.config, 2, 16)
    with torch.no_grad():
        half, full = loaded(ids), model(ids)
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.05 * full.abs().max()
    # a bf16 model saved and reloaded without a dtype: the router still comes back fp32
    save_model(loaded, tmp_path / "bf16")
    again = load_model(tmp_path / "bf16")
    assert again.backbone.layers[1].mixer.gate.weight.dtype == torch.float32
    assert again.lm_head.weight.dtype == torch.bfloat16


@SETTINGS
@given(config=tiny_moe_configs(transformers_clamp=False), split=st.integers(1, 15), seed=st.integers(0, 999))
def test_moe_cached_decoding_equals_full_forward(config, split, seed):
    model = _moe_model(config, seed)
    ids = _ids(config, 2, 16, seed)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 16)
        pieces = [model(ids[:, :split], cache)] + [model(ids[:, i : i + 1], cache) for i in range(split, 16)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)


def test_moe_gradients_reach_router_and_routed_experts_only():
    model = _moe_model(get_preset("tiny-moe")).train()
    ids = _ids(model.config, 2, 24)
    model(ids).logsumexp(-1).mean().backward()
    mixer = model.backbone.layers[1].mixer
    assert mixer.gate.weight.grad is not None and mixer.gate.weight.grad.abs().sum() > 0
    assert mixer.gate.e_score_correction_bias.grad is None  # a buffer: set by load balancing, not by gradients
    assert mixer.shared_experts.up_proj.weight.grad.abs().sum() > 0
    used = [e.up_proj.weight.grad is not None and e.up_proj.weight.grad.abs().sum() > 0 for e in mixer.experts]
    assert any(used)


def test_skipping_blocks_equals_pruning_them_away():
    from compressor.importance import estimate
    from compressor.prune import prune
    from compressor.target import Target

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).eval()  # M-M*-M*M-
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    scores = estimate(model, [ids])
    for dropped in ((3,), (3, 6), (0, 5)):
        pruned = prune(model, scores, Target.uniform(model.config, drop_blocks=dropped))
        with torch.no_grad():
            expected = pruned(ids)
            torch.testing.assert_close(model(ids, skip_blocks=set(dropped)), expected, atol=1e-5, rtol=1e-5)
            cache = model.allocate_cache(2, 30)  # the cached path skips them too
            pieces = [model(ids[:, :17], cache, skip_blocks=dropped), model(ids[:, 17:], cache, skip_blocks=dropped)]
            torch.testing.assert_close(torch.cat(pieces, 1), expected, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(model(ids), expected)


def test_activation_checkpointing_saves_only_block_inputs_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).train()
    ids = torch.randint(0, 512, (2, 40))

    def run(checkpointing):
        model.zero_grad()
        model.backbone.checkpointing = checkpointing
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).float().square().mean()
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, grads = run(False)
    kept, recomputed = run(True)
    assert kept < full / 3  # what autograd keeps outside the blocks: their inputs, the head's
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7)
