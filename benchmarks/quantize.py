"""What does quantization cost the example model? Post-training quantization with ModelOpt (FP8, NVFP4,
INT8 SmoothQuant, INT4 AWQ), calibrated on `examples/data/sample.txt`, evaluated on the held-out plays
(`examples/data/valid.txt`): loss, KL to the bf16 model and top-1 agreement, with the stored weight bytes
next to what `compressor.budget` predicts for fp8 / fp4.

    python benchmarks/quantize.py                      # the comparison of formats (docs/quantization.md)
    python benchmarks/quantize.py --formats fp8,nvfp4  # fewer formats

Each format: load the bf16 checkpoint (its values exactly, in fp32), `quantize` it (calibration through
compressor's forward), `export_quantized` (bf16 for the unquantized tensors), then load the export, which
dequantizes the weights, and `quantize_activations` fake-quantizes each quantized layer's input at its
stored input scale: W8A8 / W4A4 as deployed, on CPU. ModelOpt's own fake quantization runs on CPU for FP8
(shown as a row of its own: it must agree with the export row); its NVFP4 fake quantization needs CUDA,
hence the simulation. All evaluation computes in fp32, so the differences come from the formats alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.budget import MIB, weight_bytes  # noqa: E402
from compressor.checkpoint import load_model  # noqa: E402
from compressor.data import load_sequences, load_tokenizer  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.quantize import (  # noqa: E402
    FORMATS,
    export_quantized,
    quantize,
    quantize_activations,
    stored_weight_bytes,
)

BUDGET_DTYPES = {"fp8": "fp8", "nvfp4": "fp4"}
DESCRIPTIONS = {
    "fp8": "FP8 W8A8",
    "nvfp4": "NVFP4 W4A4",
    "int8_sq": "INT8 SmoothQuant W8A8",
    "int4_awq": "INT4 AWQ W4A16",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--max-sequences", type=int, default=128, help="held-out sequences")
    args = parser.parse_args()
    seq_len = 256
    tokenizer = load_tokenizer(args.model)
    calibration = load_sequences(
        ROOT / "examples/data/sample.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=args.samples
    )
    valid = load_sequences(
        ROOT / "examples/data/valid.txt", seq_len=seq_len, tokenizer=tokenizer, max_sequences=args.max_sequences
    )

    def held_out():
        return valid.batches(8, shuffle=False, drop_last=False)

    reference = load_model(args.model, dtype="float32")
    config = reference.config
    rows = [("bf16 (original)", stored_weight_bytes(args.model).total, None, evaluate(reference, held_out()))]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            start = time.perf_counter()
            model = quantize(load_model(args.model, dtype="float32"), fmt, calibration.batches(8, shuffle=False))
            seconds = time.perf_counter() - start
            predicted = weight_bytes(config, BUDGET_DTYPES[fmt]) if fmt in BUDGET_DTYPES else None
            if fmt == "fp8":
                fake = evaluate(model, held_out(), teacher=reference)
                rows.append(("fp8, ModelOpt fake quantization", None, None, fake))
            path = export_quantized(model, Path(tmp) / fmt, dtype="bfloat16", tokenizer_from=args.model)
            stored = stored_weight_bytes(path).total
            loaded = load_model(path, dtype="float32")
            if fmt == "nvfp4":
                rows.append(
                    ("nvfp4 export, weights only", stored, predicted, evaluate(loaded, held_out(), teacher=reference))
                )
            quantize_activations(loaded, path)
            rows.append((f"{fmt} export ({DESCRIPTIONS[fmt]})", stored, predicted,
                         evaluate(loaded, held_out(), teacher=reference)))  # fmt: skip
            print(f"{fmt}: quantized and calibrated on {args.samples} x {seq_len} tokens in {seconds:.1f} s",
                  file=sys.stderr)  # fmt: skip

    tokens = rows[0][3].tokens
    print("| model | weights stored | budget | loss | perplexity | KL to bf16 | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, stored, predicted, result in rows:
        size = f"{stored / MIB:.2f} MiB" if stored is not None else ""
        budget = f"{predicted / MIB:.2f} MiB" if predicted is not None else ""
        kl = f"{result.kl:.4f}" if result.kl is not None else "0"
        agreement = f"{result.top1_agreement:.1%}" if result.top1_agreement is not None else "100%"
        print(f"| {name} | {size} | {budget} | {result.loss:.4f} | {result.perplexity:.2f} | {kl} | {agreement} |")
    print(f"\n({tokens:,} held-out tokens of examples/data/valid.txt; calibration: {args.samples} sequences of "
          f"{seq_len} tokens of examples/data/sample.txt; weights stored = tensor bytes of the export)")  # fmt: skip


if __name__ == "__main__":
    main()
