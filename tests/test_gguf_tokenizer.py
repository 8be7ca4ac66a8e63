"""Tokenizers from GGUF metadata give the ids of the model's own tokenizer: byte-level BPE
vocabularies ("gpt2": the demo model's, and ones split like Llama 3, Qwen2 and SmolLM) against
their tokenizer.json, and a SentencePiece BPE vocabulary ("llama": tokens and scores, as
llama.cpp's converter writes it) against SentencePiece's algorithm written out here."""
import json
import os

import pytest
from tokenizers import Regex, Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, \
    trainers

from gguf_file import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, vocab_from_tokenizer_json, \
    write_vocab_gguf
from numba_attn import DEMO_MODEL, Tokenizer
from numba_attn.loaders.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT
from numba_attn.weights import CheckpointError
from tiny_model import CORPUS

TEXTS = [
    "Hello world", " leading space", "   three leading spaces", "multiple   spaces  inside",
    "trailing space ", "digits 1234567 and 3.14159, 2024-01-02", "accents: héllo wörld, ça va? "
    "naïve café Ünïcödé", "decomposed: cafe\u0301", "emoji 😀👍🏽 ✓ and ☕", "日本語のテキスト。",
    "code:\ndef f(x):\n    return x ** 2  # square\n", "tabs\tand\nnewlines\r\n\n end",
    "don't I'LL we've they'd", "", " ", "\n", "once upon a time there was a little fox",
    "<s> special </s> tokens", "a<s>b",
]
MORE_TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.", "def main():\n    print('hello, world')\n    return 0\n",
    "The year 1813 saw 42 editions; 3.5 million copies later, café naïve.",
] + CORPUS


def byte_level_vocab(tmp_path, name, pre_tokenizer, pre, normalizer=None, ignore_merges=False):
    """A byte-level BPE trained here, split by pre_tokenizer, saved as tokenizer.json (with the
    BPE option ignore_merges as Llama 3's has it) and as a gpt2 GGUF vocabulary named pre."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(MORE_TEXT * 3, trainer)
    tok.add_tokens(["<tool>"])                              # a user-defined added token
    path = tmp_path / f"{name}.json"
    tok.save(str(path))
    if ignore_merges:
        tj = json.loads(path.read_text())
        tj["model"]["ignore_merges"] = True
        path.write_text(json.dumps(tj))
    vocab = vocab_from_tokenizer_json(str(path))
    vocab.update(pre=pre, bos=0, eos=1)
    gguf_path = tmp_path / f"{name}.gguf"
    write_vocab_gguf(gguf_path, vocab, add_bos=True)
    return HFTokenizer.from_file(str(path)), gguf_path


def assert_same_ids(reference, tok, texts=TEXTS, bos=None):
    for text in texts:
        want = reference.encode(text).ids
        if bos is not None:
            want = [bos] + want
        assert tok.encode(text) == want, text
        assert tok.decode(tok.encode(text)) == reference.decode(want, skip_special_tokens=True)


def test_demo_model_vocabulary_round_trips(tmp_path):
    """The demo's byte-level BPE (GPT-2's split) written as a gpt2 vocabulary, as the converter
    does: the same ids and text as its tokenizer.json."""
    demo = Tokenizer(DEMO_MODEL, 1)
    vocab = vocab_from_tokenizer_json(os.path.join(DEMO_MODEL, "tokenizer.json"))
    assert vocab["pre"] == "gpt-2"
    vocab.update(bos=1, eos=2)
    path = tmp_path / "demo.gguf"
    write_vocab_gguf(path, vocab, add_bos=True)
    tok = Tokenizer(path)
    assert tok.bos_token_id == 1 and tok.add_bos and tok.vocab_size == demo.vocab_size
    for text in TEXTS + MORE_TEXT:
        assert tok.encode(text) == demo.encode(text), text
        assert tok.decode(tok.encode(text)) == demo.decode(demo.encode(text))


@pytest.mark.parametrize("style", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_byte_level_splits_as_the_model_does(tmp_path, style):
    split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(style)
    if style == "gpt-2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    reference, path = byte_level_vocab(
        tmp_path, style, pre, style, normalizer=normalizers.NFC() if style == "qwen2" else None,
        ignore_merges=style == "llama-bpe")
    tok = Tokenizer(path)
    assert_same_ids(reference, tok, TEXTS + MORE_TEXT + ["<|begin|>hi<|end|> <tool> x"], bos=0)
    ids = tok.encode("a <tool> b <|end|>")
    assert reference.token_to_id("<tool>") in ids and reference.token_to_id("<|end|>") in ids
    assert tok.decode(ids) == "a <tool> b "                 # control tokens left out


# -- SentencePiece ("llama") -----------------------------------------------------------------

def sentencepiece_vocab():
    """A SentencePiece-style BPE vocabulary as llama.cpp's converter writes it: <unk>, <s>,
    </s>, the 256 byte tokens, then pieces (words split at "▁"), each merged piece's score
    minus its merge rank, single characters last."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                 split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False)
    tok.train_from_iterator(MORE_TEXT * 3, trainer)
    trained = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    chars = [t for t, _ in trained if len(t) == 1]
    merged = [t for t, _ in trained if len(t) > 1]        # in merge order
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    scores = [0.0] * 259 + [-float(i) for i in range(len(merged))] + \
        [-1e9 - i for i in range(len(chars))]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(merged) + len(chars))
    tokens.append("<tool>")                               # a user-defined token
    scores.append(0.0)
    types.append(USER_DEFINED)
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "bos": 1, "eos": 2, "unk": 0}


def sentencepiece_encode(vocab, text, prefix=True):
    """SentencePiece BPE as llama.cpp runs it: "▁" + text with spaces as "▁" (no "▁" first
    without prefix), characters
    merged pairwise, the pair whose piece scores highest first (the leftmost of equals), until
    no pair is a piece; characters without a piece as their UTF-8 byte tokens."""
    ids = {t: i for i, t in enumerate(vocab["tokens"]) if vocab["types"][i] == NORMAL}
    scores = vocab["scores"]
    out = []
    for part in _split_user_defined(vocab, text, prefix):
        if isinstance(part, int):
            out.append(part)
            continue
        symbols = list(part)
        while True:
            best = None
            for i in range(len(symbols) - 1):
                piece = symbols[i] + symbols[i + 1]
                if piece in ids and (best is None or scores[ids[piece]] > best[0]):
                    best = (scores[ids[piece]], i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for s in symbols:
            out += [ids[s]] if s in ids else [3 + b for b in s.encode("utf-8")]
    return out


def _split_user_defined(vocab, text, prefix):
    """The text cut at its special and user-defined tokens (ids), the pieces between as
    "▁"-text, each with "▁" prepended when prefix (as the Prepend normalizer does)."""
    specials = {t: i for i, t in enumerate(vocab["tokens"])
                if vocab["types"][i] in (CONTROL, UNKNOWN, USER_DEFINED)}
    parts, rest = [], text
    while rest:
        hits = [(rest.find(t), t) for t in specials if t in rest]
        if not hits:
            parts.append(rest)
            break
        at, t = min(hits, key=lambda h: (h[0], -len(h[1])))
        if at:
            parts.append(rest[:at])
        parts.append(specials[t])
        rest = rest[at + len(t):]
    lead = "▁" if prefix else ""
    return [lead + p.replace(" ", "▁") if isinstance(p, str) else p for p in parts]


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path):
    vocab = sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, vocab)                          # no add_bos flag: llama adds BOS
    tok = Tokenizer(path)
    assert tok.bos_token_id == 1 and tok.add_bos
    for text in TEXTS + MORE_TEXT:
        if not text:
            continue
        want = [1] + sentencepiece_encode(vocab, text)
        assert tok.encode(text) == want, text
    for text in TEXTS + MORE_TEXT:
        if "<s>" in text or "</s>" in text:
            continue
        assert tok.decode(tok.encode(text)) == text, text   # byte tokens fused back
    ids = tok.encode("a <tool> b")
    assert vocab["tokens"].index("<tool>") in ids          # matched whole
    # the text after it starts with "▁" again (legacy Llama tokenizers, llama.cpp)
    assert ids == [1] + sentencepiece_encode(vocab, "a <tool> b")
    assert tok.decode(ids) == "a <tool>  b"
    assert tok.encode("<s>x")[:2] == [1, 1]                # <s> in the text is BOS


def test_sentencepiece_without_space_prefix(tmp_path):
    vocab = dict(sentencepiece_vocab(), add_space_prefix=False)
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, vocab, add_bos=False)
    tok = Tokenizer(path)
    assert not tok.add_bos
    for text in ("hello world", " leading", "once upon a time"):
        assert tok.encode(text) == sentencepiece_encode(vocab, text, prefix=False), text
        assert tok.decode(tok.encode(text)) == text


def test_flags_template_and_special_tokens(tmp_path):
    vocab = dict(sentencepiece_vocab(), add_eos=True)
    path = tmp_path / "flags.gguf"
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    write_vocab_gguf(path, vocab, add_bos=True, chat_template=template)
    tok = Tokenizer(path)
    ids = tok.encode("hello")
    assert ids[0] == 1 and ids[-1] == 2                    # BOS and EOS added
    assert tok.chat_template == template
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_vocabulary_errors(tmp_path):
    path = tmp_path / "none.gguf"
    write_vocab_gguf(path, {"model": "bert", "tokens": ["a", "b"], "types": [1, 1]})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model 'bert' is not supported"):
        Tokenizer(path)
    path = tmp_path / "noscores.gguf"
    write_vocab_gguf(path, {"model": "llama", "tokens": ["a", "b"], "types": [1, 1]})
    with pytest.raises(CheckpointError, match="one score per token"):
        Tokenizer(path)
    path = tmp_path / "badbos.gguf"
    write_vocab_gguf(path, {"model": "gpt2", "tokens": ["a", "b"], "types": [1, 1],
                            "merges": ["a b"], "bos": 7})
    with pytest.raises(CheckpointError, match="bos_token_id 7 is outside the vocabulary"):
        Tokenizer(path)
    path = tmp_path / "text.gguf"
    path.write_text("not a gguf")
    with pytest.raises(ValueError, match="cannot read"):   # not GGUF: read as tokenizer.json
        Tokenizer(path)
