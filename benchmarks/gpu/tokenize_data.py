"""Token files for the GPU check: examples/data/{sample,valid}.txt as the example model reads them, packed
into sequences of SEQ_LEN tokens (`.npy`, int32, (n, SEQ_LEN)).

The check's parts pass these as `--data`, so the GPU machine tokenizes nothing and its runs do not depend on
the `datasets` library working with that machine's pyarrow and fsspec (the text path is CPU code, tested in CI).

    python benchmarks/gpu/tokenize_data.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from compressor.config import HybridConfig  # noqa: E402
from compressor.data import DataSpec, read_sequences  # noqa: E402

MODEL = ROOT / "examples" / "model"
TEXTS = ("sample", "valid")
SEQ_LEN = 256  # the example model's runs in the README and the check


def main() -> None:
    out = Path(sys.argv[1])
    eos_id = HybridConfig.from_file(MODEL).eos_id
    for name in TEXTS:
        spec = DataSpec(ROOT / "examples" / "data" / f"{name}.txt", SEQ_LEN)
        sequences = read_sequences(spec, MODEL, eos_id=eos_id)
        path = sequences.save(out / f"{name}-{SEQ_LEN}.npy")
        print(f"{path.name}: {len(sequences)} x {SEQ_LEN} tokens")


if __name__ == "__main__":
    main()
