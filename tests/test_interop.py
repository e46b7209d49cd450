"""Every output kind in the engines people serve with: each either computes our logits or refuses it.

The transformers part runs everywhere (it is the reference in the dev extra). The vLLM and llama.cpp part
runs the same cells through `benchmarks/engine_runners.py` where `bash benchmarks/engines.sh` has set the
engines up and COMPRESSOR_INTEROP=1 asks for it (each vLLM start takes about a minute):

    COMPRESSOR_INTEROP=1 python -m pytest tests/test_interop.py

`python benchmarks/interop.py` runs the whole matrix on the example model's real outputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from compressor.checkpoint import load_model, save_model
from compressor.config import HybridConfig
from compressor.model import HybridLM
from compressor.presets import get_preset
from tests.conftest import randomize_routers, transformers_dt_bounds

KINDS = ("uniform", "per-block MLP", "per-block attention", "per-block Mamba", "MoE per-block", "fp8")
FORMATS = {
    "uniform": "nemotron_h",
    "per-block MLP": "nemotron_h_puzzle",
    "per-block attention": "nemotron_h_puzzle",
    "per-block Mamba": "nemotron_h_compressor",
    "MoE per-block": "nemotron_h_puzzle",
    "fp8": "nemotron_h_puzzle",
}


def _config(kind: str) -> HybridConfig:
    """A tiny architecture of each output kind (per-block ones: one block differs)."""
    if kind == "MoE per-block":
        config = get_preset("tiny-moe")
        moe = [i for i, k in enumerate(config.block_kinds) if k == "moe"]
        return config.replace(block_overrides={moe[-1]: {"n_routed_experts": config.n_routed_experts // 2}})
    config = get_preset("tiny")
    first = {k: config.block_kinds.index(k) for k in ("mlp", "attention", "mamba")}
    overrides = {
        "per-block MLP": {first["mlp"]: {"intermediate_size": config.intermediate_size // 2}},
        "per-block attention": {first["attention"]: {"num_attention_heads": config.num_key_value_heads}},
        "per-block Mamba": {first["mamba"]: {"mamba_num_heads": config.mamba_num_heads // 2}},
    }.get(kind, {})
    return config.replace(block_overrides=overrides)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    """Each output kind written by compressor, as a checkpoint folder."""
    root = tmp_path_factory.mktemp("outputs")
    folders = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = HybridLM(_config(kind)).eval()
        with torch.no_grad():  # weights with some spread, so that a wrong read shows in the logits
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0, 0.1)
        randomize_routers(model)
        if kind == "fp8":
            pytest.importorskip("modelopt.torch.quantization")
            from compressor.quantize import export_quantized, quantize

            ids = [torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))]
            folders[kind] = str(export_quantized(quantize(model.to(torch.bfloat16), "fp8", ids), root / "fp8"))
        else:
            folders[kind] = str(save_model(model, root / kind.replace(" ", "_")))
        assert HybridConfig.from_file(folders[kind]).served_format == FORMATS[kind]
    return folders


IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_computes_each_output_as_we_do_or_refuses_it(outputs, kind):
    transformers = pytest.importorskip("transformers")
    path = outputs[kind]
    try:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    except (ValueError, OSError, RuntimeError) as refusal:  # unknown type / custom code / shapes
        assert kind != "uniform", refusal
        return
    assert kind == "uniform", f"transformers loaded the {kind} output"
    config = HybridConfig.from_file(path)
    with torch.no_grad():
        gap = (load_model(path, dtype="float32")(IDS) - theirs(IDS, use_cache=False).logits).abs().max()
    if transformers_dt_bounds(config) == config.time_step_limit:  # 5.15-5.24 floor dt: another model there
        assert gap <= 1e-4


# ----- real engines (opt-in) ---------------------------------------------------------------------------------
def _engines():
    if os.environ.get("COMPRESSOR_INTEROP") != "1":
        pytest.skip("real engines run with COMPRESSOR_INTEROP=1 (after bash benchmarks/engines.sh)")
    from benchmarks import engine_runners

    missing = [name for name, version in engine_runners.available().items() if version is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not set up: bash benchmarks/engines.sh")
    return engine_runners


PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(48)] for i in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_vllm_and_llamacpp_compute_each_output_as_we_do_or_refuse_it(outputs, kind):
    runners = _engines()
    path = outputs[kind]
    ours = runners.compressor_logprobs(path, PROMPTS, max_new_tokens=4)
    assert ours.error is None, ours.error
    config = HybridConfig.from_file(path)
    puzzle, quantized = config.served_format == "nemotron_h_puzzle", config.is_quantized
    vllm = runners.vllm_logprobs(
        path, PROMPTS, dtype="bfloat16" if quantized else "float32", max_new_tokens=4, trust_remote_code=puzzle
    )
    llama = runners.llamacpp_logprobs(path, PROMPTS, kv_type="f32")
    for run, served in ((vllm, kind != "per-block Mamba"), (llama, None)):
        if run.error:
            assert served is not True, f"{run.engine} refused the {kind} output: {run.error}"
            continue
        agreement = runners.compare(ours, run)
        assert kind != "per-block Mamba", f"{run.engine} loaded per-block Mamba widths it reads globally"
        if quantized:
            assert agreement.top1_agreement >= 0.95, agreement
        else:
            assert agreement.max_abs_delta_logprob <= 1e-4 and agreement.top1_agreement == 1.0, agreement
