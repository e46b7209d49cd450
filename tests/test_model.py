import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.checkpoint import load_model, save_model
from compressor.model import HybridLM
from compressor.presets import get_preset
from tests.conftest import hf_state_dict, tiny_configs, to_transformers

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


def test_skipping_blocks_equals_pruning_them_away():
    from compressor.importance import estimate
    from compressor.prune import Target, prune

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
