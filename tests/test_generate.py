import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from compressor.generate import generate
from compressor.model import HybridLM
from compressor.pipelines.generating import TextStream
from compressor.presets import get_preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(get_preset("tiny")).eval()


def test_greedy_equals_argmax_of_full_forwards(model):
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, 10)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_p=1e-6), greedy)


def test_eos_ends_generation(model):
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, 10)[0, 5:].tolist()
    eos = greedy[-1]
    first = greedy.index(eos)  # generation stops at the first time the model emits it
    out = generate(model, prompt, 10, eos_token_id=eos)
    assert out.shape[1] == 5 + first + 1 and out[0, -1] == eos
    assert out[0, 5:].tolist() == greedy[: first + 1]


def test_stop_callback_ends_each_sequence(model):
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, 10)[:, 5:]
    calls = []

    def stop(new):  # row 0 is finished after 3 tokens, row 1 after 6
        calls.append(new.clone())
        return torch.tensor([new.shape[1] >= 3, new.shape[1] >= 6])

    out = generate(model, prompt, 10, stop=stop)
    assert out.shape[1] == 5 + 6 and torch.equal(out[:, 5:], greedy[:, :6])
    assert [c.shape for c in calls] == [(2, n) for n in range(1, 7)] and torch.equal(calls[-1], greedy[:, :6])
    out = generate(model, prompt, 10, stop=stop, eos_token_id=511)
    assert out[0, 5 + 3 :].eq(511).all() and torch.equal(out[1, 5:], greedy[1, :6])


def test_a_stream_passes_on_the_text_as_decoded_and_never_half_a_character():
    """Byte-level tokens can end inside a character (é, ✓ and 日 are 2 to 3 bytes): the stream holds such a
    piece back until the character is whole; its pieces make up the text the whole continuation decodes to."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(["To be, or not to be: that is the question. " * 20], trainer)
    text = "To be, héllo wörld ✓ 日本 — or not"
    ids = tokenizer.encode(text).ids
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for token in ids:
        stream.add(torch.tensor([token]))
    stream.finish(tokenizer.decode(ids))
    assert tokenizer.decode(ids) == text and "".join(pieces) == text
    assert len(pieces) > 10 and not any("\ufffd" in piece for piece in pieces)
    assert len(ids) > len(text.encode("utf-8")) // 2  # the characters beyond ASCII are split into byte tokens
