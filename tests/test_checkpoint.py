import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compressor.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_model, save_model
from compressor.config import loaders
from compressor.errors import CheckpointError, CompressorError, ConfigError
from compressor.model import HybridLM
from compressor.presets import get_preset
from tests.conftest import transformers_dt_bounds, transformers_floors_dt, with_time_step_limit

EXAMPLE_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "data" / "tokenizer.json"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(get_preset("tiny")).eval()


def _assert_bit_exact(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("shard_bytes", [None, 60_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_exact(tmp_path, model, shard_bytes, dtype):
    source = HybridLM(model.config).to(dtype)
    source.load_state_dict(model.state_dict())
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    path = save_model(source, tmp_path / "ckpt", **kwargs)
    files = {p.name for p in path.iterdir()}
    if shard_bytes is None:
        assert files == {WEIGHTS_NAME, "config.json"}
    else:
        shards = sorted(f for f in files if f.startswith("model-"))
        assert len(shards) > 2 and INDEX_NAME in files
        index = json.loads((path / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(source.state_dict())
    loaded = load_model(path)
    _assert_bit_exact(loaded, source)
    assert json.loads((path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_load_with_dtype_choice(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    loaded = load_model(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())


def test_tokenizer_files_are_copied_and_nothing_else(tmp_path, model):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(EXAMPLE_TOKENIZER, source / "tokenizer.json")
    (source / "generation_config.json").write_text('{"fake": true}')
    (source / "modeling_evil.py").write_text("raise SystemExit")
    path = save_model(model, tmp_path / "out", tokenizer_from=source)
    assert (path / "tokenizer.json").read_bytes() == EXAMPLE_TOKENIZER.read_bytes()
    assert (path / "generation_config.json").read_text() == '{"fake": true}'
    assert not (path / "modeling_evil.py").exists()


def test_existing_output_needs_overwrite(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    before = (path / WEIGHTS_NAME).read_bytes()
    with pytest.raises(CompressorError, match="already exists.*--overwrite"):
        save_model(HybridLM(model.config), path)
    assert (path / WEIGHTS_NAME).read_bytes() == before
    save_model(HybridLM(model.config), path, overwrite=True)
    assert (path / WEIGHTS_NAME).read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left


def test_failed_save_leaves_nothing(tmp_path, model, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("compressor.checkpoint.write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_missing_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path / "ckpt")


def test_unknown_model_type(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'mamba2' is not supported"):
        load_model(path)


def test_missing_shard(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt", max_shard_bytes=60_000)
    shard = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} listed in {INDEX_NAME} is missing"):
        load_model(path)


def test_shape_mismatch_names_the_tensor(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["backbone.layers.1.mixer.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value).startswith(
        "tensor backbone.layers.1.mixer.up_proj.weight has shape [100, 64] in model.safetensors, "
        "but config.json implies [128, 64]"
    )


def test_missing_and_unexpected_tensors(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    state = dict(model.state_dict())
    state.pop("backbone.norm_f.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="lacks tensor.*backbone.norm_f.weight"):
        load_model(path)
    state["extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="tensor extra.weight .* is not part of the architecture"):
        load_model(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_are_refused(tmp_path, model, name):
    path = save_model(model, tmp_path / "ckpt")
    (path / WEIGHTS_NAME).unlink()
    marker = tmp_path / "pickle-ran"
    # a pickle that would create `marker` if anything unpickled it
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (path / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match=f"pickle-based weights \\({name}\\).*safetensors only"):
        load_model(path)
    assert not marker.exists()


def test_not_a_folder(tmp_path):
    with pytest.raises(CompressorError, match="no config.json|is not a folder"):
        load_model(tmp_path / "missing")


def test_empty_folder_with_config_only(tmp_path, model):
    path = save_model(model, tmp_path / "ckpt")
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(path)
    shutil.rmtree(path)


def test_written_files_are_standard_safetensors(tmp_path, model):
    # the writer lays shards out from shapes and dtypes and fills them tensor by tensor, in any order
    from safetensors import safe_open
    from safetensors.torch import load_file

    from compressor.checkpoint import write_weights

    state = {**model.state_dict(), "mask": torch.tensor([True, False, True]), "half": torch.ones(3, 5).half()}
    state["backbone.norm_f.weight"] = state["backbone.norm_f.weight"].bfloat16()
    layout = {name: t.to("meta") for name, t in state.items()}  # shapes and dtypes only
    folder = tmp_path / "w"
    folder.mkdir()
    write_weights(folder, layout, reversed(list(state.items())), max_shard_bytes=50_000)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(state) and len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for file in set(index["weight_map"].values()):
        loaded = load_file(folder / file)  # the library reads (and validates) every file
        for name, tensor in loaded.items():
            assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
        with safe_open(folder / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    with pytest.raises(CheckpointError, match="no data was given for tensor"):
        write_weights(tmp_path, layout, list(state.items())[:-1])
    with pytest.raises(CheckpointError, match="wrong shape"):
        write_weights(tmp_path, layout, [("mask", torch.ones(4, dtype=torch.bool))])


def test_loading_keeps_the_stored_dtype_and_maps_the_file(tmp_path, model):
    # bf16 stays bf16 (no fp32 detour) and a tensor in the wanted dtype is the file's memory, not a copy
    source = HybridLM(model.config).to(torch.bfloat16)
    path = save_model(source, tmp_path / "ckpt")
    loaded = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not loaded.lm_head.weight.untyped_storage().resizable()  # backed by the file's memory map
    assert load_model(path, dtype="float32").lm_head.weight.untyped_storage().resizable()  # converted: a copy


def test_init_fills_an_empty_model_in_the_target_dtype(tmp_path):
    from compressor.checkpoint import init_checkpoint

    config = get_preset("tiny-moe").replace(hidden_size=128, initializer_range=0.02)
    params = init_checkpoint(tmp_path / "bf16", config, dtype="bfloat16", seed=3)
    model = load_model(tmp_path / "bf16")
    assert params == model.num_parameters()
    state = model.state_dict()
    assert state["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32  # the router stays fp32
    assert state["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    # the distribution of HybridLM.reset_parameters: normal linears, S4D A, unit norms, log-uniform dt
    weights = state["backbone.layers.0.mixer.in_proj.weight"].float()
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.001
    a_log = torch.log(torch.arange(1.0, 9.0)).bfloat16()
    assert torch.equal(state["backbone.layers.0.mixer.A_log"], a_log)
    assert torch.all(state["backbone.norm_f.weight"] == 1)
    init_checkpoint(tmp_path / "again", config, dtype="bfloat16", seed=3)
    again = load_model(tmp_path / "again").state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)  # the seed decides


def _auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def vocab_model():
    """The tiny architecture with the example tokenizer's vocabulary (4096)."""
    torch.manual_seed(0)
    return HybridLM(get_preset("tiny").replace(vocab_size=4096)).eval()


def test_saved_tokenizer_has_bos_eos_pad_from_the_config(tmp_path, vocab_model):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(EXAMPLE_TOKENIZER, source / "tokenizer.json")
    path = save_model(vocab_model, tmp_path / "out", tokenizer_from=source)
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in path.iterdir()}
    tokenizer = _auto_tokenizer(path)
    config = vocab_model.config
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    text = "ROMEO. But soft, what light through yonder window breaks?"
    from tokenizers import Tokenizer

    # transformers encodes and decodes exactly as the tokenizer.json compressor itself uses
    assert tokenizer(text).input_ids == Tokenizer.from_file(str(EXAMPLE_TOKENIZER)).encode(text).ids
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_derived_tokens_follow_config_ids(tmp_path):
    torch.manual_seed(0)
    config = get_preset("tiny").replace(vocab_size=4096, bos_token_id=None, eos_token_id=[1, 2], pad_token_id=2)
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(EXAMPLE_TOKENIZER, source / "tokenizer.json")
    path = save_model(HybridLM(config), tmp_path / "out", tokenizer_from=source)
    derived = json.loads((path / "tokenizer_config.json").read_text())
    assert "bos_token" not in derived and derived["eos_token"] == "<s>" and derived["pad_token"] == "</s>"
    tokenizer = _auto_tokenizer(path)
    assert tokenizer.bos_token is None and (tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2)


def test_existing_tokenizer_config_is_kept(tmp_path, vocab_model):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(EXAMPLE_TOKENIZER, source / "tokenizer.json")
    own = '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "model_max_length": 77}'
    (source / "tokenizer_config.json").write_text(own)
    path = save_model(vocab_model, tmp_path / "out", tokenizer_from=source)
    assert (path / "tokenizer_config.json").read_text() == own
    assert not (path / "special_tokens_map.json").exists()
    assert _auto_tokenizer(path).model_max_length == 77


def test_unreadable_tokenizer_is_refused(tmp_path, model):
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"fake": true}')
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        save_model(model, tmp_path / "out", tokenizer_from=source)
    assert not (tmp_path / "out").exists()


def test_init_writes_a_complete_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "model"
    args = ["init", str(out), "--preset", "tiny", "--set", "vocab_size=4096", "--tokenizer", str(EXAMPLE_TOKENIZER)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tokenizer = _auto_tokenizer(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)


def test_transformers_agrees_under_the_dt_bounds_it_applies(tmp_path, transformers_world):
    """On a model whose step sizes fall under time_step_min, as trained ones do: transformers' logits equal
    ours under the bounds it applies (time_step_limit from 5.25, time_step_min's floor before), differ from
    ours by more than rounding where those bounds differ from the checkpoint's, and a checkpoint whose
    time_step_limit already starts at time_step_min agrees in either behaviour."""
    transformers = pytest.importorskip("transformers")
    floors = transformers_floors_dt()
    assert floors == {"floor": True, "limit": False}.get(transformers_world, floors)
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).eval()
    assert model.config.time_step_limit == (0.0, math.inf)
    with torch.no_grad():  # as in trained models, some heads step below time_step_min (0.001)
        for block in model.backbone.layers:
            if block.kind == "mamba":
                block.mixer.dt_bias[::2] = math.log(math.expm1(0.0008))
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(1))
    steps = []
    hooks = [
        b.mixer.in_proj.register_forward_hook(
            lambda mod, args, out, m=b.mixer: steps.append(F.softplus(out[..., -m.num_heads :] + m.dt_bias))
        )
        for b in model.backbone.layers
        if b.kind == "mamba"
    ]
    with torch.no_grad():
        ours = model(ids)
    for hook in hooks:
        hook.remove()
    below = float(torch.cat([s.flatten() for s in steps]).lt(0.001).float().mean())
    assert 0.1 < below < 0.9
    path = save_model(model, tmp_path / "ckpt")

    def theirs(folder):
        with torch.no_grad():
            return transformers.NemotronHForCausalLM.from_pretrained(folder).eval()(ids, use_cache=False).logits

    floored = (0.001, math.inf)
    raised = with_time_step_limit(path, tmp_path / "raised", floored)
    with torch.no_grad():
        ours_floored = load_model(raised)(ids)
    shipped = theirs(path)
    expected = ours_floored if transformers_dt_bounds(model.config) == floored else ours
    assert (expected - shipped).abs().max() <= 1e-5
    gap = float((ours - shipped).abs().max())
    assert gap > 1e-4 if floors else gap <= 1e-5
    # time_step_limit starting at time_step_min: the same floor in either behaviour, so both engines agree,
    # and it is another model than the shipped one
    assert (ours_floored - theirs(raised)).abs().max() <= 1e-5
    assert (ours_floored - ours).abs().max() > 1e-4


def test_loaders_say_where_a_checkpoint_loads(tmp_path):
    """Uniform: every engine; per-block MLP / attention / MoE widths and quantized exports: the Puzzle format
    vLLM reads (its configuration module in the folder) and transformers refuses; per-block Mamba widths:
    compressor's own type, which transformers refuses too; a raised time_step_limit: not vLLM nor llama.cpp."""
    transformers = pytest.importorskip("transformers")
    config = get_preset("tiny")
    assert loaders(config) == ["compressor", "transformers", "vLLM", "llama.cpp"]
    assert loaders(config.replace(time_step_limit=(0.001, math.inf))) == ["compressor", "transformers"]
    quantized = config.replace(extra={"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}})
    assert loaders(quantized) == [
        "compressor",
        "vLLM (trust_remote_code, bf16/fp16)",
        "llama.cpp (weights dequantized)",
    ]
    mlp = next(i for i, kind in enumerate(config.block_kinds) if kind == "mlp")
    per_block = config.replace(block_overrides={mlp: {"intermediate_size": config.intermediate_size // 2}})
    assert loaders(per_block) == ["compressor", "vLLM (trust_remote_code)", "llama.cpp"]
    moe = get_preset("tiny-moe")
    last = len(moe.block_kinds) - 1 - moe.block_kinds[::-1].index("moe")
    experts = moe.replace(block_overrides={last: {"n_routed_experts": moe.n_routed_experts // 2}})
    assert loaders(experts) == ["compressor", "vLLM (trust_remote_code)"]  # llama.cpp: one expert count
    mamba = per_block.replace(block_overrides={0: {"mamba_num_heads": config.mamba_num_heads // 2}})
    assert loaders(mamba) == ["compressor"]
    torch.manual_seed(0)
    for name, each in (("per_block", per_block), ("mamba", mamba)):
        path = save_model(HybridLM(each).eval(), tmp_path / name)
        assert load_model(path).config.block_overrides == each.block_overrides
        assert (path / "configuration_nemotron_h_puzzle.py").is_file() == (name == "per_block")
        with pytest.raises(ValueError):  # custom code it may not run / a model type it does not know
            transformers.AutoConfig.from_pretrained(path)
    module = transformers.AutoConfig.from_pretrained(tmp_path / "per_block", trust_remote_code=True)
    assert module.get_nemotron_h_config_for_layer(mlp).intermediate_size == config.intermediate_size // 2
    assert module.get_nemotron_h_config_for_layer(mlp + 1).intermediate_size == config.intermediate_size
    with pytest.raises(ValueError, match="Unrecognized configuration class"):  # no per-block model there
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "per_block", trust_remote_code=True)
