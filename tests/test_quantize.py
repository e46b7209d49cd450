import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.budget import weight_bytes, weight_bytes_by_component
from compressor.checkpoint import load_model, nvfp4_fake_quant, save_model, write_checkpoint
from compressor.config import HybridConfig
from compressor.errors import CheckpointError, CompressorError
from compressor.evaluate import evaluate, teacher_targets
from compressor.generate import generate
from compressor.losses import LossSpec, LossStats, head_loss, next_token_labels
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.quantize import (
    HF_QUANT_CONFIG,
    QuantizedCheckpoint,
    QuantRecipe,
    export_qad_checkpoint,
    export_quantized,
    prepare_qad,
    quantize,
    quantize_activations,
    read_quantizer_state,
    restore_fake_quant,
    split_quantizer_state,
    stored_weight_bytes,
    write_quantizer_state,
)
from tests.conftest import hf_state_dict, to_transformers

BUDGET_DTYPES = {"fp8": "fp8", "nvfp4": "fp4"}
# ModelOpt's exclude names under transformers 5.24 carry this stray suffix (its reverse rename rewrites
# ModelOpt's internal sentinel); normalise before comparing.
SENTINEL = ".\x00backbone.pt_name_sentinel"
QUANTIZED = (
    "backbone.layers.0.mixer.in_proj",
    "backbone.layers.0.mixer.out_proj",
    "backbone.layers.1.mixer.up_proj",
    "backbone.layers.1.mixer.down_proj",
)


def _quantized(config: HybridConfig) -> set[str]:
    """The recipe's quantized Linears: Mamba in/out_proj and MLP up/down_proj (attention stays bf16)."""
    names = {"mamba": ("in_proj", "out_proj"), "mlp": ("up_proj", "down_proj"), "attention": ()}
    return {f"backbone.layers.{i}.mixer.{n}" for i, kind in enumerate(config.block_kinds) for n in names[kind]}


def _modelopt():
    return pytest.importorskip("modelopt.torch.quantization")


def _model(config: HybridConfig, dtype=torch.bfloat16, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(config).eval().to(dtype)


def _copy(model: HybridLM) -> HybridLM:
    twin = HybridLM(model.config).eval().to(model.lm_head.weight.dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def _batches(config: HybridConfig, count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (2, 32), generator=generator) for _ in range(count)]


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _int4_config() -> HybridConfig:
    """Widths that INT4 AWQ packs (inputs a multiple of 128)."""
    return HybridConfig(hybrid_override_pattern="M-*", vocab_size=256, hidden_size=128, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_num_heads=4,
                        mamba_head_dim=32, n_groups=2, ssm_state_size=16, chunk_size=16)  # fmt: skip


# ----- without ModelOpt ------------------------------------------------------------------------------------


def test_unknown_format_is_refused():
    with pytest.raises(CompressorError, match="unknown quantization format 'fp6': use fp8, nvfp4, int8_sq, int4_awq"):
        QuantRecipe("fp6")


def test_missing_modelopt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    with pytest.raises(CompressorError, match=r'needs nvidia-modelopt .*pip install -e "\.\[modelopt\]"'):
        quantize(_model(get_preset("tiny")), "fp8", _batches(get_preset("tiny")))


def test_nvfp4_training_needs_cuda():
    config = get_preset("tiny")
    with pytest.raises(CompressorError, match="nvfp4 fake quantization needs a CUDA GPU"):
        prepare_qad(_model(config, torch.float32), "nvfp4", _batches(config))
    with pytest.raises(CompressorError, match="supports fp8, nvfp4, not int8_sq"):
        prepare_qad(_model(config, torch.float32), "int8_sq", _batches(config))


def test_int4_widths_are_checked_before_calibrating():
    config = get_preset("tiny")  # hidden 64: not a multiple of AWQ's 128-input groups
    with pytest.raises(CompressorError, match="int4_awq packs 128 inputs per scale, but backbone.layers.0.mixer"):
        quantize(_model(config), "int4_awq", _batches(config))


def test_stored_bytes_of_a_plain_checkpoint_equal_the_budget(tmp_path):
    config = get_preset("tiny")
    path = save_model(_model(config), tmp_path / "plain")
    stored = stored_weight_bytes(path)
    assert stored.quant_algo is None and stored.budget_dtype is None and stored.by_dtype == {"BF16": stored.total}
    assert stored.by_component == weight_bytes_by_component(config, "bf16")


def test_nvfp4_fake_quant_matches_modelopt():
    from_modelopt = pytest.importorskip("modelopt.torch.quantization.qtensor")
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-2, 1, 64)
    x[0, :16] = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 6]
    )
    global_scale = x.abs().max() / (6 * 448)
    packed, block_scale, _ = from_modelopt.NVFP4QTensor.quantize(x, 16, None, global_scale)
    expected = packed.dequantize(torch.float32, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    assert torch.equal(nvfp4_fake_quant(x, global_scale), expected)


# ----- export compared with ModelOpt's own exporter -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_export_matches_modelopt_hf_export(tmp_path, fmt):
    """The same weights, recipe and calibration through transformers' NemotronHForCausalLM and ModelOpt's
    `export_hf_checkpoint` give the same tensors (names, dtypes, shapes, values) and quantization config."""
    mtq = _modelopt()
    from modelopt.torch.export import export_hf_checkpoint

    config = get_preset("tiny")
    ours = _model(config)
    reference = to_transformers(config).to(torch.bfloat16)
    reference.load_state_dict(hf_state_dict(ours.state_dict()))
    reference.config.architectures = ["NemotronHForCausalLM"]  # export raises TypeError without it
    batches = _batches(config)
    recipe = QuantRecipe(fmt)
    mtq.quantize(reference, recipe.modelopt_config(), lambda model: [model(ids) for ids in batches])
    export_hf_checkpoint(reference, export_dir=tmp_path / "reference")
    export_quantized(quantize(ours, recipe, batches), tmp_path / "ours")

    expected, found = _tensors(tmp_path / "reference"), _tensors(tmp_path / "ours")
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (found[name].dtype, found[name].shape) == (tensor.dtype, tensor.shape), name
        if name.endswith("input_scale"):  # from activations: the two forwards round differently in bf16
            torch.testing.assert_close(found[name], tensor, rtol=0.03, atol=0)
        else:  # weights and weight scales: bit for bit
            assert torch.equal(found[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    assert {n.removesuffix(".weight_scale") for n in found if n.endswith(".weight_scale")} == _quantized(config)

    def normalised(text: str):
        return json.loads(text.replace(SENTINEL.replace("\x00", "\\u0000"), ""))

    ours_hf = normalised((tmp_path / "ours" / HF_QUANT_CONFIG).read_text())
    theirs_hf = normalised((tmp_path / "reference" / HF_QUANT_CONFIG).read_text())
    for quant in (ours_hf["quantization"], theirs_hf["quantization"]):
        quant["exclude_modules"] = sorted(quant["exclude_modules"])
    assert ours_hf == theirs_hf
    ours_config = normalised((tmp_path / "ours" / "config.json").read_text())
    theirs_config = normalised((tmp_path / "reference" / "config.json").read_text())
    for raw in (ours_config, theirs_config):
        raw["quantization_config"]["ignore"] = sorted(raw["quantization_config"]["ignore"])
    assert ours_config["quantization_config"] == theirs_config["quantization_config"]
    assert ours_config["dtype"] == theirs_config["dtype"] == "bfloat16"


def test_nvfp4_export_follows_the_documented_layout(tmp_path):
    _modelopt()
    config = get_preset("tiny")
    model = _model(config)
    source = _copy(model)
    path = export_quantized(quantize(model, "nvfp4", _batches(config)), tmp_path / "nvfp4")
    tensors = _tensors(path)
    for name in QUANTIZED:
        weight = source.get_submodule(name).weight.detach().float()
        out, inp = weight.shape
        packed, scale, scale_2 = (tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2"))
        assert (packed.dtype, packed.shape) == (torch.uint8, (out, inp // 2))
        assert (scale.dtype, scale.shape) == (torch.float8_e4m3fn, (out, inp // 16))
        assert scale_2.shape == () and tensors[f"{name}.input_scale"].shape == ()
        torch.testing.assert_close(scale_2, weight.abs().max() / (6 * 448))
        # e2m1 (even column in the low nibble) * scale per 16 * global scale
        codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()
        e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
        dequantized = (e2m1[codes].view(out, -1, 16) * scale.float()[..., None] * scale_2).view(out, inp)
        error = float((dequantized - weight).norm() / weight.norm())
        assert error < 0.12
        swapped = e2m1[codes.view(out, -1, 2).flip(-1).flatten(-2)].view(out, -1, 16) * scale.float()[..., None]
        assert float((swapped.view(out, inp) * scale_2 - weight).norm() / weight.norm()) > 5 * error
        layer = QuantizedCheckpoint.read(path).layer(f"{name}.weight")
        assert torch.equal(layer.dequantize(packed), dequantized)
    for name in ("lm_head.weight", "backbone.embeddings.weight", "backbone.layers.3.mixer.q_proj.weight",
                 "backbone.layers.0.mixer.conv1d.weight"):  # fmt: skip
        assert tensors[name].dtype == torch.bfloat16 and f"{name}_scale" not in tensors
    quant = json.loads((path / HF_QUANT_CONFIG).read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert {"lm_head", "backbone.embeddings", "backbone.layers.3*", "backbone.layers.0.mixer.conv1d"} <= set(
        quant["exclude_modules"]
    )
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}


# ----- loading and evaluating quantized checkpoints ------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "config", "tolerance"),
    [
        ("fp8", get_preset("tiny"), 0.04),
        ("nvfp4", get_preset("tiny"), 0.12),
        ("int8_sq", get_preset("tiny"), 0.02),
        ("int4_awq", _int4_config(), 0.15),
    ],
)
def test_load_dequantizes_each_format(tmp_path, fmt, config, tolerance):
    _modelopt()
    model = _model(config)
    source = _copy(model)
    path = export_quantized(quantize(model, fmt, _batches(config)), tmp_path / fmt, tokenizer_from=None)
    loaded = load_model(path)
    assert "quantization_config" not in loaded.config.extra
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    quantized = QuantizedCheckpoint.read(path).layers
    assert set(quantized) == _quantized(config)
    for name, tensor in source.state_dict().items():
        found = loaded.state_dict()[name]
        if name.removesuffix(".weight") in quantized:
            error = float((found.float() - tensor.float()).norm() / tensor.float().norm())
            assert 0 < error < tolerance, (name, error)
        else:
            assert torch.equal(found, tensor), name
    ids = _batches(config, count=1, seed=7)[0]
    with torch.no_grad():
        reference, plain = source(ids), loaded(ids)
        quantize_activations(loaded, path)
        simulated = loaded(ids)
    assert 0 < _kl(reference, plain) < 0.01 and _kl(reference, simulated) < 0.02
    assert torch.equal(simulated, plain) == (fmt == "int4_awq")  # weight-only AWQ has no input scales
    generated = generate(loaded, ids[:, :8], 4)  # compress generate: prefill + cached steps, hooks included
    assert generated.shape == (2, 12) and torch.equal(generated[:, 8], simulated[:, 7].argmax(-1))
    # a loaded quantized checkpoint saves as a plain one
    again = load_model(save_model(loaded, tmp_path / "plain"))
    assert torch.equal(again.backbone.layers[0].mixer.in_proj.weight, loaded.backbone.layers[0].mixer.in_proj.weight)


def test_fp8_fake_quant_eval_on_cpu_equals_the_loaded_export(tmp_path):
    _modelopt()
    config = get_preset("tiny")
    model = _model(config, torch.float32)
    source = _copy(model)
    quantize(model, "fp8", _batches(config))
    held_out = _batches(config, count=2, seed=5)
    fake = evaluate(model, held_out, teacher=source)
    assert 0 < fake.kl < 0.01 and abs(fake.loss - evaluate(source, held_out).loss) < 0.05
    with torch.no_grad():
        fake_logits = model(held_out[0])
    path = export_quantized(model, tmp_path / "fp8")
    loaded = load_model(path, dtype="float32")
    quantize_activations(loaded, path)
    with torch.no_grad():
        assert _kl(fake_logits, loaded(held_out[0])) < 1e-4
    assert evaluate(loaded, held_out).loss == pytest.approx(fake.loss, abs=2e-3)


def test_tied_embeddings_export_and_load(tmp_path):
    _modelopt()
    config = get_preset("tiny").replace(tie_word_embeddings=True)
    model = _model(config)
    source = _copy(model)
    path = export_quantized(quantize(model, "fp8", _batches(config)), tmp_path / "tied")
    assert "lm_head.weight" not in _tensors(path)
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight)


def test_transformers_refuses_a_quantized_export_it_would_compute_wrong(tmp_path):
    """transformers skips `quant_method: modelopt` with a warning and would read the packed weights as plain
    ones: the export is written in the Puzzle format, which it refuses with or without trust_remote_code,
    and which carries the configuration module vLLM reads."""
    transformers = pytest.importorskip("transformers")
    _modelopt()
    config = get_preset("tiny")
    path = export_quantized(quantize(_model(config), "fp8", _batches(config)), tmp_path / "fp8")
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "nemotron_h_puzzle" and (path / "configuration_nemotron_h_puzzle.py").is_file()
    assert [entry["block_type"] for entry in raw["block_configs"]] == config.block_kinds
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert (
        HybridConfig.from_file(path).is_quantized
        and load_model(path).num_parameters() == _model(config).num_parameters()
    )


def test_foreign_quantization_is_refused(tmp_path):
    config = get_preset("tiny")
    path = save_model(_model(config), tmp_path / "ckpt")
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quantized by 'compressed-tensors': compressor reads ModelOpt exports"):
        load_model(path)
    raw["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MXFP4"}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quantized as MXFP4: compressor reads FP8, NVFP4"):
        load_model(path)


# ----- budget ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_budget_matches_the_exported_bytes(tmp_path, fmt):
    _modelopt()
    config = get_preset("tiny")
    path = export_quantized(quantize(_model(config), fmt, _batches(config)), tmp_path / fmt)
    stored = stored_weight_bytes(path)
    predicted = weight_bytes_by_component(config, BUDGET_DTYPES[fmt])
    assert stored.quant_algo == fmt.upper() and stored.budget_dtype == BUDGET_DTYPES[fmt]
    assert abs(stored.total - weight_bytes(config, BUDGET_DTYPES[fmt])) <= 0.01 * stored.total
    assert stored.by_component == predicted  # within 1% asked; equal, scales included, in fact
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert stored.total < files < stored.total + 64 * 1024  # tensors + the safetensors header


# ----- quantization-aware distillation -----------------------------------------------------------------


def test_fp8_qad_trains_saves_resumes_and_exports(tmp_path):
    _modelopt()
    config = get_preset("tiny")
    teacher = _model(config, torch.float32, seed=1)
    student = _model(config, torch.float32, seed=2)
    batches = _batches(config, count=3)
    prepare_qad(student, "fp8", batches[:2])
    assert student.training
    before = student.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids = batches[2]
    spec, labels, target = LossSpec(), next_token_labels(ids), teacher_targets(teacher, ids)

    def distill_head(hidden, weight):
        return head_loss(hidden.flatten(0, 1), weight, spec, labels=labels, teacher=target, stats=LossStats())

    # quantized layers (through their weight quantizers) and what lies before them (through input quantizers)
    reached = ("backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.down_proj", "backbone.embeddings")
    losses = []
    for _ in range(4):
        loss = student(ids, head=distill_head)
        loss.backward()
        assert all(student.get_submodule(name).weight.grad.abs().sum() > 0 for name in reached)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not torch.equal(student.backbone.layers[0].mixer.in_proj.weight, before)

    # save as the trainer would: a standard checkpoint + the quantizer state
    weights, quantizers = split_quantizer_state(student.state_dict())
    assert quantizers and all("_quantizer." in name for name in quantizers)
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    write_checkpoint(folder, config, weights)
    write_quantizer_state(folder, QuantRecipe("fp8"), quantizers)
    recipe, tensors = read_quantizer_state(folder)
    assert recipe == QuantRecipe("fp8") and tensors.keys() == quantizers.keys()
    resumed = restore_fake_quant(load_model(folder), recipe, tensors)
    ids = batches[0]
    with torch.no_grad():
        assert torch.equal(resumed(ids), student.eval()(ids))
        expected = student(ids)
    assert read_quantizer_state(tmp_path) is None

    path = export_qad_checkpoint(folder, tmp_path / "exported")
    assert json.loads((path / HF_QUANT_CONFIG).read_text())["quantization"]["quant_algo"] == "FP8"
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_slice("backbone.layers.0.mixer.in_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("backbone.layers.0.norm.weight").get_dtype() == "BF16"
    deployed = load_model(path, dtype="float32")
    quantize_activations(deployed, path)
    with torch.no_grad():
        assert _kl(expected, deployed(ids)) < 1e-3  # bf16 rounding of the unquantized tensors only


# ----- the command line and the training recipe --------------------------------------------------------
def test_cli_quantize_eval_estimate_and_quantization_aware_distillation(tmp_path):
    """`compress quantize` writes the export, `eval` runs it as deployed (dequantized weights, quantized
    activations), `estimate` sizes it in its format, `distill --quantize fp8` trains a fake-quantized
    student, resumes, and exports it."""
    import numpy as np
    from typer.testing import CliRunner

    from cli import app
    from compressor.train import TrainConfig, train

    _modelopt()
    config = get_preset("tiny").replace(vocab_size=64)
    save_model(_model(config, torch.float32), tmp_path / "model")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tokens.npy", (np.cumsum(rng.choice([1, 1, 2], size=64 * 32)) % 64).astype(np.int32))
    data = str(tmp_path / "tokens.npy")

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    result = run("quantize", tmp_path / "model", "--format", "fp8", "--data", data, "--samples", "8",
                 "--seq-len", "32", "--out", tmp_path / "fp8", "--device", "cpu", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["quant_algo"] == "FP8" and record["stored_bytes"] == record["budget_bytes"]
    result = run("eval", tmp_path / "model", tmp_path / "fp8", "--data", data, "--seq-len", "32",
                 "--teacher", tmp_path / "model", "--device", "cpu", "--json")  # fmt: skip
    rows = json.loads(result.output)
    assert [r["format"] for r in rows] == ["F32", "FP8"] and 0 < rows[1]["kl"] < 0.05
    weights_only = run("eval", tmp_path / "fp8", "--data", data, "--seq-len", "32", "--teacher", tmp_path / "model",
                       "--weights-only", "--device", "cpu", "--json")  # fmt: skip
    assert json.loads(weights_only.output)["kl"] != rows[1]["kl"]  # the activations were quantized before
    estimate = json.loads(run("estimate", tmp_path / "fp8", "--ctx", "1k", "--json").output)
    assert estimate["memory"]["weight_dtype"] == "fp8" and estimate["memory"]["weights"] == record["budget_bytes"]
    result = run("quantize", tmp_path / "model", "--format", "fp5", "--data", data, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "unknown quantization format 'fp5'" in result.output
    # quantization-aware distillation: interrupted after its first checkpoint, resumed, exported
    common = dict(student=str(tmp_path / "model"), teacher=str(tmp_path / "model"), data=data, seq_len=32,
                  batch_size=4, micro_batch_size=4, lr=1e-3, eval_every=2, save_every=2, eval_sequences=4,
                  calib_sequences=8, quantize="fp8", valid_fraction=0.1, log_every=1, device="cpu")  # fmt: skip
    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=4, **common))
    assert (tmp_path / "whole" / "model" / "quantizer_state.safetensors").is_file()
    exported = json.loads((tmp_path / "whole" / "quantized" / HF_QUANT_CONFIG).read_text())
    assert exported["quantization"]["quant_algo"] == "FP8"

    class Interrupt:  # stops the run after its checkpoint of step 2
        def start(self, *args):
            pass

        def step(self, record):
            if record["step"] == 3:
                raise KeyboardInterrupt

        def evaluated(self, record):
            pass

        def note(self, text):
            pass

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "split"), steps=4, **common), Interrupt())
    resumed = train(TrainConfig(out=str(tmp_path / "split"), steps=4, resume=True, **common))
    assert resumed.final_eval["val_loss"] == whole.final_eval["val_loss"]
    for name, tensor in load_file(tmp_path / "whole" / "quantized" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(tmp_path / "split" / "quantized" / "model.safetensors")[name]), name
    result = run("distill", tmp_path / "model", tmp_path / "model", "--data", data, "--out", tmp_path / "q",
                 "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4", "--steps", "1",
                 "--eval-sequences", "4", "--quantize", "int4", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 1 and "--quantize must be fp8 or nvfp4" in result.output
