"""Convert one of our checkpoint folders to GGUF with llama.cpp's own converter, patched at run time.

Runs in the llama venv: `python llamacpp_convert.py LLAMA_CPP_SRC MODEL_DIR OUT.gguf OUTTYPE`.
It imports the vendored `convert_hf_to_gguf.py` (kept by benchmarks/engines.sh under llama/llama.cpp-src)
and applies three workarounds in this process only; the vendored files are never edited:

1. Config read from config.json, not `AutoConfig(...).to_dict()`: with transformers 5.x the latter fills
   in MoE defaults (`num_experts_per_tok`, ...) for `nemotron_h`, so a DENSE model is taken for
   `nemotron_h_moe` and written with every FFN width 0, silently. Reading the file gives the converter
   exactly the keys the checkpoint has (a real MoE checkpoint still carries its MoE keys).
2. SSM head size passed as `mamba_d_head`: the granite-hybrid parent asserts the SSM inner size is a
   multiple of `d_head`, which defaults to 64 when absent, so e.g. 12 heads x 20 fails although llama.cpp
   itself has no such limit; the real head size is `mamba_head_dim`.
3. Pre-tokenizer: our tokenizers' byte-level BPE with the GPT-2 split regex is not among the hashes the
   converter knows ("BPE pre-tokenizer was not recognized"); it is exactly llama.cpp's `gpt-2`
   pre-tokenizer, which is named when tokenizer.json says so. Anything else still fails as before.
4. A `nemotron_h_puzzle` folder without MoE blocks (per-block MLP widths or attention heads): llama.cpp's
   Puzzle converter writes MoE models only (it stops with KeyError 'moe_shared_expert_intermediate_size').
   llama.cpp's runtime reads the FFN width and the head counts per layer (`n_ff(il)`, `n_head(il)`,
   `n_head_kv(il)`), so the folder is converted by the dense NemotronH converter, with those three written
   per layer from `block_configs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUR_MODEL_TYPES = {"nemotron_h", "nemotron_h_puzzle"}


def note(message: str) -> None:
    print(f"[llamacpp_convert] {message}", file=sys.stderr, flush=True)


def read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json", encoding="utf-8") as f:
        return json.load(f)


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def is_gpt2_byte_level(model_dir: Path) -> bool:
    """True when tokenizer.json is a BPE that pre-tokenizes as GPT-2 does: byte-level with GPT-2's regex,
    written either as ByteLevel(use_regex) or as Split(GPT-2 regex) followed by ByteLevel."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    if (tokenizer.get("model") or {}).get("type") != "BPE":
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True)
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    return (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == GPT2_SPLIT
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    )


def patch_converter(base) -> None:
    """Apply workarounds 1-3 (module docstring) to the converter's `conversion.base` module."""
    original_load_hparams = base.ModelBase.load_hparams
    original_vocab_pre = base.TextModel.get_vocab_base_pre

    def load_hparams(dir_model, is_mistral_format):
        dir_model = Path(dir_model)
        config_path = dir_model / "config.json"
        if not is_mistral_format and config_path.is_file():
            config = read_config(dir_model)
            if config.get("model_type") in OUR_MODEL_TYPES:
                note("workaround 1: hyperparameters read from config.json, not AutoConfig")
                if "mamba_head_dim" in config:
                    config.setdefault("mamba_d_head", config["mamba_head_dim"])
                    note(f"workaround 2: mamba_d_head = mamba_head_dim = {config['mamba_d_head']}")
                blocks = config.get("block_configs") or []
                if config["model_type"] == "nemotron_h_puzzle" and all(b["block_type"] != "moe" for b in blocks):
                    note("workaround 4: a dense nemotron_h_puzzle: per-layer widths from block_configs")
                    config["architectures"] = ["NemotronHForCausalLM"]
                return config
        return original_load_hparams(dir_model, is_mistral_format)

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original_vocab_pre(self, tokenizer)
        except NotImplementedError:
            if is_gpt2_byte_level(Path(self.dir_model)):
                note("workaround 3: byte-level BPE with GPT-2's regex: pre-tokenizer 'gpt-2'")
                return "gpt-2"
            raise

    base.ModelBase.load_hparams = staticmethod(load_hparams)
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def patch_dense_puzzle(nemotron) -> None:
    """Workaround 4 (module docstring): per-layer FFN widths and head counts from `block_configs`."""
    original = nemotron.NemotronHModel.set_gguf_parameters

    def set_gguf_parameters(self):
        original(self)
        blocks = self.hparams.get("block_configs")
        if not blocks:
            return

        def per_layer(kind: str, key: str, other: int = 0) -> list[int]:
            return [b.get(key, self.hparams[key]) if b["block_type"] == kind else other for b in blocks]

        self.gguf_writer.add_feed_forward_length(per_layer("mlp", "intermediate_size"))
        self.gguf_writer.add_head_count_kv(per_layer("attention", "num_key_value_heads"))
        # the global head count for other layers, as the dense converter writes it: llama.cpp derives
        # defaults from layer 0's
        self.gguf_writer.add_head_count(
            per_layer("attention", "num_attention_heads", self.hparams["num_attention_heads"])
        )

    nemotron.NemotronHModel.set_gguf_parameters = set_gguf_parameters


def main() -> None:
    src, model_dir, out, outtype = sys.argv[1:5]
    src = Path(src).resolve()
    sys.path[:0] = [str(src), str(src / "gguf-py")]  # the converter's package and its matching gguf-py
    import conversion.base
    import conversion.nemotron
    import convert_hf_to_gguf

    patch_converter(conversion.base)
    patch_dense_puzzle(conversion.nemotron)
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
