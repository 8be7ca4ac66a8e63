"""The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*`), built as a Hugging
Face `tokenizers` object the way the model's own tokenizer.json would have it.

- "llama": a SentencePiece BPE vocabulary (tokens, scores, token types). A BPE model with byte
  fallback whose merges come from the scores (every split of a piece into two pieces, the
  best-scoring piece first: SentencePiece merges the pair whose result scores highest); text
  has "▁" prepended and its spaces replaced by "▁" (tokenizer.ggml.add_space_prefix, default
  on); the decoder undoes both and fuses byte tokens.
- "gpt2": a byte-level BPE vocabulary (tokens, merges, token types), split before BPE as
  tokenizer.ggml.pre names: GPT-2's regex, Llama 3's, Qwen2's, SmolLM's single digits.

Token types (llama.cpp's): control and unknown tokens are special added tokens (matched whole
in the text, left out when decoding), user-defined ones plain added tokens (matched whole,
decoded as text).
"""
import os
import warnings
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
    pre_tokenizers, processors

from ..weights import CheckpointError, LoadNotice
from .gguf import open_reader, read_metadata

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"     # SentencePiece's visible space

GPT2_SPLIT = None    # GPT-2's own regex, ByteLevel(use_regex=True)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's pre-tokenizer names: these vocabularies want BOS when the file does not say
BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
# tokenizer.ggml.pre -> (split regex, NFC normalizer, BPE ignore_merges), as the models'
# tokenizer.json files have them ("smollm": single digits, then GPT-2's regex)
PRE_TOKENIZERS = {
    "default": (GPT2_SPLIT, False, False),
    "gpt-2": (GPT2_SPLIT, False, False),
    "smollm": ("digits", False, False),
    **{name: (LLAMA3_SPLIT, False, True) for name in BOS_BY_DEFAULT},
    **{name: (LLAMA3_SPLIT, False, False) for name in ("dbrx", "smaug-bpe")},
    **{name: (QWEN2_SPLIT, True, False) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}
SPECIAL_TOKEN_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown",
                     "pad_token": "padding"}


@dataclass
class GGUFVocab:
    tokenizer: Tokenizer           # the tokenizers object
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool                  # prepend BOS (tokenizer.ggml.add_bos_token)
    add_eos: bool                  # append EOS (tokenizer.ggml.add_eos_token)
    chat_template: str | None      # tokenizer.chat_template
    special_tokens: dict = field(default_factory=dict)   # {"bos_token": "<s>", ...}


def read_gguf_tokenizer(path):
    """The GGUFVocab of a GGUF file; CheckpointError when it has no usable vocabulary."""
    path = os.fspath(path)
    meta = read_metadata(open_reader(path))     # the reader itself is let go here
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError(f"{path} holds no tokenizer (tokenizer.ggml.model and "
                              f"tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    ids = {k: meta.get(f"tokenizer.ggml.{v}_token_id") for k, v in SPECIAL_TOKEN_IDS.items()}
    for k, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{SPECIAL_TOKEN_IDS[k]}_token_id {i} "
                                  f"is outside the vocabulary of {len(tokens)}")
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{path}: a 'llama' vocabulary needs one score per token")
        tok = _sentencepiece(tokens, scores, types, ids["unk_token"],
                             meta.get("tokenizer.ggml.add_space_prefix", True))
    elif kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise CheckpointError(f"{path}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
        tok = _byte_level(tokens, merges, meta.get("tokenizer.ggml.pre"))
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported; "
                              f"supported: llama (SentencePiece), gpt2 (byte-level BPE)")
    _add_special_tokens(tok, tokens, types, ids)
    add_bos = meta.get("tokenizer.ggml.add_bos_token",
                       kind == "llama" or meta.get("tokenizer.ggml.pre") in BOS_BY_DEFAULT)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = ids["bos_token"], ids["eos_token"]
    add_bos, add_eos = bool(add_bos) and bos is not None, bool(add_eos) and eos is not None
    if add_bos or add_eos:     # the template a tokenizer.json has: BOS $A, $A EOS
        ends = [(tokens[bos], bos)] * add_bos + [(tokens[eos], eos)] * add_eos
        tok.post_processor = processors.TemplateProcessing(
            single=[tokens[bos]] * add_bos + ["$A"] + [tokens[eos]] * add_eos,
            special_tokens=list(dict.fromkeys(ends)))
    template = meta.get("tokenizer.chat_template")
    return GGUFVocab(
        tokenizer=tok, bos_token_id=bos, eos_token_id=eos, add_bos=add_bos, add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
        special_tokens={k: tokens[i] for k, i in ids.items() if i is not None})


def _sentencepiece(tokens, scores, types, unk_id, add_space_prefix):
    vocab = _vocab(tokens)
    unk = tokens[unk_id] if unk_id is not None else next(
        (t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    bpe = models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores, types),
                     unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) \
        if add_space_prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def merges_from_scores(tokens, scores, types):
    """BPE merges of a SentencePiece vocabulary: each normal piece's splits into two pieces of
    the vocabulary, the highest-scoring piece's first (then longer left parts, then by id), as
    transformers converts a SentencePiece model to tokenizer.json."""
    vocab = _vocab(tokens)
    merges = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = sorted(((a, b) for a, b in splits if a in vocab and b in vocab),
                        key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(score, a, b) for a, b in splits]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)   # stable
    return [(a, b) for _, a, b in merges]


def _byte_level(tokens, merges, pre):
    split, nfc, ignore_merges = PRE_TOKENIZERS.get(pre or "default", (None, False, False))
    if pre is not None and pre not in PRE_TOKENIZERS:
        warnings.warn(f"tokenizer.ggml.pre {pre!r} is not one this engine knows; text is split "
                      f"as GPT-2 splits it", LoadNotice, stacklevel=3)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"tokenizer.ggml.merges holds {m!r}, not two tokens")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _vocab(tokens):
    """{token: id}, the first id of a token listed twice."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _add_special_tokens(tok, tokens, types, ids):
    """Control and unknown tokens (and BOS, EOS, UNK, PAD whatever their type) as special added
    tokens, user-defined ones as plain added tokens."""
    named = {i for i in ids.values() if i is not None}
    special = [t for i, (t, ty) in enumerate(zip(tokens, types))
               if t and (ty in (CONTROL, UNKNOWN) or i in named)]
    plain = [t for t, ty in zip(tokens, types) if t and ty == USER_DEFINED]
    if special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
