"""Train the example model: Shakespeare mixed with retrieval rows, one head per attention block guided to copy.

Reproduces `examples/model` (run by `examples/train_example.sh`, about 110 minutes on 2 CPU cores). Each
step is `ROWS` rows of one stage's `LENGTH` tokens: a `SHARE` of them retrieval rows, the rest text (random
windows of `--text`, tokenized with the model's tokenizer). Retrieval rows are phonebooks in the evaluation's
format (`compressor.tasks`: two-word names, four digits; here half of the entries are asked, the
evaluation asks 16) and, for a quarter of them, copy rows (a random segment of words or of digits,
repeated). Their generator seeds are drawn per step and never meet the evaluation's fixed sequences.

Why the guidance: a hybrid this small trained on next-token loss alone sits on a plateau on retrieval,
its answers at the uniform guess over the ten digits (2.30 nats), while the attention has not found where
the answer is and the value path has not learned to copy, each waiting for the other. On 2 CPU cores that
plateau outlasted every budget tried (phonebook, MQAR and copy rows, a dozen runs of up to 1,300 steps).
An auxiliary loss breaks it: at every position that predicts a retrieval answer, one head of each
attention block has its attention weight on the token to copy (the answer's occurrence in the book, or in
the first half of a copy row) pushed up by cross-entropy, `--guidance` times the language-model loss.
With it the heads attend to the right place within about 200 steps and the copy follows; the weights are
an ordinary Nemotron-H checkpoint (the guidance is a training signal, not a change of architecture).
The guidance stays on for the whole run: a run that dropped it after 500 steps, continuing with `compress
train` on `examples/mix_retrieval.py`'s mix at a higher learning rate, lost the retrieval in 60 steps and
did not find it again.

`examples/train_example.sh` runs it three times: the default stages from `compress init`'s weights; a second
schedule from that model (`--stages 1024:600:8:0.125 --lr 6e-4 --seed 1`: one retrieval row in eight,
the learning rate warmed up again), which spends its steps on the text: held-out perplexity falls
there while the retrieval, guidance still on, holds; and a third of 500 such steps (`--lr 4e-4 --seed 2
--weight-decay 0.5 --average-from 50 --average-every 25`) whose averaged weights are the shipped model.

`--average-from STEP` writes, as the final model, the mean of the weights taken every `--average-every`
steps after STEP (stochastic weight averaging) instead of the last weights. By then the model fits the
training plays more than the held-out ones; the weights along one schedule do so in different directions,
and their mean does better on the held-out plays than any one of them (perplexity 62.51 against 63.30 for
the third run's last weights).

Checkpoints (weights, AdamW moments, the step and the running weight average, in safetensors) go to
`OUT/checkpoint` every `--save-every` steps; `--resume` continues from there, and since each step's data is
drawn from a generator seeded by (seed, step), a resumed run sees the same rows as an unbroken one. The
final model is written to OUT/model (the last weights stay in OUT/checkpoint).

Usage:
    python examples/train_example.py runs/example/init runs/example/train
    python examples/train_example.py runs/example/init runs/example/train --resume   # after a kill
    python examples/train_example.py runs/example/train/model runs/example/long --stages 1024:600:8:0.125 \
        --lr 6e-4 --seed 1
    python examples/train_example.py runs/example/long/model runs/example/average --stages 1024:500:8:0.125 \
        --lr 4e-4 --seed 2 --weight-decay 0.5 --average-from 50 --average-every 25
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from compressor import load_model, save_model
from compressor.checkpoint import write_checkpoint
from compressor.config import ATTENTION
from compressor.data import find_eos_id, load_sequences, load_tokenizer
from compressor.model import log_attention
from compressor.outputs import atomic_output
from compressor.tasks import TaskSpec, TaskVocabulary, make_examples, score

NAME_WORDS = 2
DIGITS = 4
COPY_SHARE = 0.25  # of the retrieval rows
GUIDED_HEAD = 0  # the head of each attention block the auxiliary loss guides
# LENGTH:STEPS:ROWS:SHARE per stage: tokens per row, steps, rows per step, share of retrieval rows
STAGES = "128:250:16:0.5,256:250:16:0.5,1024:680:8:0.3"


def phonebook_rows(vocab: TaskVocabulary, count: int, length: int, rng: np.random.Generator):
    """`count` phonebooks of `length` tokens, half of the entries asked, and each position's copy source.

    `source[i, p]` is the position of the token that position p should copy (the answer it predicts next,
    where it stands in the book), -1 where p predicts no answer.
    """
    entry = NAME_WORDS + 1 + DIGITS + 1
    slots = length // entry
    asked_count, entries = slots // 2, slots - slots // 2
    rows = np.full((count, length), vocab.eos, dtype=np.int64)
    source = np.full((count, length), -1, dtype=np.int64)
    digit = NAME_WORDS + 1 + np.arange(DIGITS)  # the digits' offsets within an entry
    for row in range(count):
        names = vocab.words[rng.choice(len(vocab.words), size=(entries, NAME_WORDS), replace=False)]
        numbers = vocab.digits[rng.integers(0, 10, size=(entries, DIGITS))]
        book = np.concatenate(
            [names, np.full((entries, 1), vocab.colon), numbers, np.full((entries, 1), vocab.newline)], axis=1
        )
        asked = rng.choice(entries, asked_count, replace=False)
        tokens = np.concatenate([book.ravel(), book[asked].ravel()])
        rows[row, : len(tokens)] = tokens
        answers = entries * entry + np.arange(asked_count)[:, None] * entry + digit  # (asked, digits)
        source[row, answers - 1] = asked[:, None] * entry + digit
    return rows, source


def copy_rows(vocab: TaskVocabulary, count: int, length: int, rng: np.random.Generator):
    """`count` rows of a random segment repeated (words in even rows, digits in odd), with copy sources."""
    half = length // 2
    rows = np.empty((count, length), dtype=np.int64)
    source = np.full((count, length), -1, dtype=np.int64)
    for row in range(count):
        segment = rng.choice(vocab.words if row % 2 == 0 else vocab.digits, half)
        rows[row] = np.concatenate([segment, segment, segment[: length - 2 * half]])
        source[row, half : 2 * half - 1] = np.arange(1, half)
    return rows, source


def capture_attention_inputs(model) -> dict[int, torch.Tensor]:
    """A dict that every forward fills with each attention block's input (block index -> normed hidden)."""
    inputs: dict[int, torch.Tensor] = {}
    for spec in model.config.blocks:
        if spec.kind == ATTENTION:
            model.backbone.layers[spec.index].mixer.register_forward_hook(
                lambda module, call, output, index=spec.index: inputs.__setitem__(index, call[0])
            )
    return inputs


def guidance_loss(model, inputs: dict[int, torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the guided heads' attention against the copy sources."""
    batch, position = source.ge(0).nonzero(as_tuple=True)
    losses = []
    for index, hidden in inputs.items():
        attention = model.backbone.layers[index].mixer
        d, group = attention.head_dim, attention.num_heads // attention.num_kv_heads
        q = F.linear(hidden, attention.q_proj.weight[GUIDED_HEAD * d : (GUIDED_HEAD + 1) * d])
        kv = GUIDED_HEAD // group
        k = F.linear(hidden, attention.k_proj.weight[kv * d : (kv + 1) * d])
        every = torch.arange(q.shape[1], device=q.device)
        log_weights = log_attention(q[:, None], k[:, None], every)[:, 0]  # (batch, t, t), one head
        losses.append(-log_weights[batch, position, source[batch, position]].mean())
    return torch.stack(losses).mean()


def parse_stages(text: str) -> list[tuple[int, int, int, float]]:
    """'LENGTH:STEPS:ROWS:SHARE,...' -> [(length, steps, rows, retrieval share), ...]."""
    stages = []
    for part in text.split(","):
        length, steps, rows, share = part.split(":")
        stages.append((int(length), int(steps), int(rows), float(share)))
    return stages


def batch(stage, text: np.ndarray, vocab: TaskVocabulary, rng: np.random.Generator):
    """One step's token rows (text first, then phonebooks, then copy rows) and their copy sources."""
    length, _, rows, share = stage
    retrieval = round(rows * share)
    copies = round(retrieval * COPY_SHARE)
    starts = rng.integers(0, len(text) - length, rows - retrieval)
    book, book_source = phonebook_rows(vocab, retrieval - copies, length, rng)
    copied, copied_source = copy_rows(vocab, copies, length, rng)
    ids = np.concatenate([np.stack([text[s : s + length] for s in starts]).reshape(-1, length), book, copied])
    source = np.concatenate([np.full((len(starts), length), -1), book_source, copied_source])
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(source)


class WeightAverage:
    """The running mean of a model's weights, one snapshot every `every` steps after step `start`."""

    def __init__(self, model, start: int, every: int):
        self.start, self.every, self.count = start, every, 0
        self.mean = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def update(self, model, step: int) -> None:
        """Take a snapshot if `step` (steps done) is one of this average's."""
        if step <= self.start or (step - self.start) % self.every:
            return
        self.count += 1
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.mean[name] += (value.detach() - self.mean[name]) / self.count
            else:
                self.mean[name].copy_(value)

    def restore(self, mean: dict[str, torch.Tensor], step: int) -> None:
        """The mean saved after `step` steps (its snapshot count follows from the step)."""
        self.count = max(0, (step - self.start) // self.every)
        self.mean = mean


def save_checkpoint(folder: Path, model, optimizer, step: int, tokenizer_from: Path, average=None) -> None:
    """Weights, AdamW moments, the step (and the weight average), written beside and swapped in whole."""
    moments = {}
    for index, param in enumerate(model.parameters()):
        for key, value in optimizer.state.get(param, {}).items():
            moments[f"{index}.{key}"] = value.detach().reshape(-1).clone() if value.ndim == 0 else value
    with atomic_output(folder, overwrite=True) as tmp:
        write_checkpoint(tmp, model.config, model.state_dict(), tokenizer_from=tokenizer_from)
        save_file({k: v.contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
        if average is not None:
            save_file({k: v.contiguous() for k, v in average.mean.items()}, tmp / "average.safetensors")
        (tmp / "step.json").write_text(json.dumps({"step": step}) + "\n")


def load_checkpoint(folder: Path, model, optimizer, average=None) -> int:
    """Restore weights, AdamW moments (and the weight average) from `folder`; the step to continue from."""
    model.load_state_dict(load_model(folder, dtype="float32").state_dict())
    moments = load_file(folder / "optimizer.safetensors")
    for index, param in enumerate(model.parameters()):
        state = {key.split(".", 1)[1]: value for key, value in moments.items() if key.split(".", 1)[0] == str(index)}
        if state:
            state["step"] = state["step"].reshape(())
            optimizer.state[param] = state
    step = int(json.loads((folder / "step.json").read_text())["step"])
    if average is not None:
        average.restore(load_file(folder / "average.safetensors"), step)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("init", type=Path, help="the model to start from (compress init's output)")
    parser.add_argument("out", type=Path, help="run folder: checkpoint/ while training, model/ at the end")
    parser.add_argument("--stages", default=STAGES, help="LENGTH:STEPS:ROWS:SHARE,... trained in order")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (cosine to a tenth)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, on the matrices")
    parser.add_argument("--guidance", type=float, default=1.0, help="weight of the attention guidance loss")
    parser.add_argument("--text", type=Path, default=Path("examples/data/train.txt"))
    parser.add_argument("--every", type=int, default=50, help="report (and probe phonebook at 1k) every N steps")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--average-from", type=int, default=None, metavar="STEP",
        help="write OUT/model as the mean of the weights taken every --average-every steps after STEP",
    )  # fmt: skip
    parser.add_argument("--average-every", type=int, default=25, help="steps between averaged snapshots")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = load_model(args.init, dtype="float32").train()
    tokenizer = load_tokenizer(args.init)
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    text = load_sequences(args.text, seq_len=256, tokenizer=tokenizer, eos_id=find_eos_id(tokenizer))
    text = text.to_numpy().reshape(-1)
    inputs = capture_attention_inputs(model)
    probe = make_examples(TaskSpec("phonebook", sequences=4, queries=16), tokenizer, 1024, vocab)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    checkpoint = args.out / "checkpoint"
    if args.resume and not (checkpoint / "step.json").is_file():
        raise SystemExit(f"nothing to resume: no checkpoint in {checkpoint}; run without --resume")
    stages = parse_stages(args.stages)
    total = sum(stage[1] for stage in stages)
    average = None
    if args.average_from is not None:
        if not 0 <= args.average_from < total or args.average_every < 1:
            raise SystemExit(f"--average-from must be a step in [0, {total}) and --average-every at least 1")
        average = WeightAverage(model, args.average_from, args.average_every)
    step = load_checkpoint(checkpoint, model, optimizer, average) if args.resume else 0
    ends = np.cumsum([stage[1] for stage in stages])
    start, losses = time.perf_counter(), []
    while step < total:
        stage = stages[int(np.searchsorted(ends, step, side="right"))]
        warmup = min(1.0, (step + 1) / 30)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))
        ids, source = batch(stage, text, vocab, np.random.default_rng([args.seed, step]))
        logits = model(ids)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        guidance = guidance_loss(model, inputs, source)
        optimizer.zero_grad()
        (lm + args.guidance * guidance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append((lm.item(), guidance.item()))
        step += 1
        if average is not None:
            average.update(model, step)
        if step % args.save_every == 0 or step == total:
            save_checkpoint(checkpoint, model, optimizer, step, args.init, average)
        if step % args.every == 0 or step == total:
            model.eval()
            result = score(model, probe)
            model.train()
            lm_mean, guidance_mean = np.mean(losses, axis=0)
            losses = []
            print(
                f"step {step}/{total} (length {stage[0]}): loss {lm_mean:.3f}, guidance {guidance_mean:.3f}, "
                f"phonebook@1k {result.accuracy:.1%} (log-lik {result.log_likelihood:.2f}), "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    if average is not None and average.count:
        model.load_state_dict(average.mean)
        print(f"the model is the mean of {average.count} snapshots (steps {args.average_from}+{args.average_every}k)")
    save_model(model, args.out / "model", tokenizer_from=args.init, overwrite=True)
    print(f"wrote {args.out / 'model'}")


if __name__ == "__main__":
    main()
