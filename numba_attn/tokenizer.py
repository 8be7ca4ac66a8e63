"""Tokenizer: a model folder's `tokenizer.json` (or a GGUF file's vocabulary) through the
`tokenizers` library, the BOS rule, and StreamDecoder, which turns generated ids into text as
they arrive."""
import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from .loaders.gguf import is_gguf_file
from .loaders.gguf_tokenizer import read_gguf_tokenizer


class Tokenizer:
    """A model folder's tokenizer.json, or a GGUF file's vocabulary (through Hugging Face
    `tokenizers`) with the model's BOS rule: encode(text) -> ids, decode(ids) -> text,
    stream(ids) -> a StreamDecoder. chat_template: the model's chat template (Jinja source) or
    None."""

    chat_template = None

    def __init__(self, path, bos_token_id=None):
        """path: a model folder (or its tokenizer.json), or a GGUF file; bos_token_id: from the
        model config (a GGUF file names its own)."""
        path = os.fspath(path)
        if os.path.isfile(path) and is_gguf_file(path):
            vocab = read_gguf_tokenizer(path)
            self.hf = vocab.tokenizer
            self.bos_token_id = vocab.bos_token_id if bos_token_id is None else bos_token_id
            self.add_bos = vocab.add_bos and self.bos_token_id is not None
            self.chat_template = vocab.chat_template
            self.special_tokens = vocab.special_tokens
            return
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer.json not found in {folder}")
        try:
            self.hf = _HFTokenizer.from_file(file)
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise ValueError(f"cannot read {file}: {e}") from None
        self.bos_token_id = bos_token_id
        self.add_bos = _wants_bos(folder, bos_token_id)

    @property
    def vocab_size(self):
        """Token ids the tokenizer knows, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Prompt ids. The tokenizer's own template runs (Llama 3's adds <|begin_of_text|>);
        BOS is prepended when the model wants one and the template did not add it."""
        ids = self.hf.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        """Text of the token ids, special tokens (BOS, EOS) left out."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def stream(self, context=()):
        """A StreamDecoder that continues after `context` (the prompt ids)."""
        return StreamDecoder(self, context)


def _wants_bos(folder, bos_token_id):
    """tokenizer_config.json decides when it says (add_bos_token, or bos_token null, as for
    Qwen2); otherwise the Llama convention: prepend BOS when the config names one."""
    if bos_token_id is None:
        return False
    cfg = {}
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, UnicodeDecodeError):
            cfg = {}
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"])
    if "bos_token" in cfg and cfg["bos_token"] is None:
        return False
    return True


class StreamDecoder:
    """Incremental detokenisation. Decoding one token at a time goes wrong twice: a character
    split over several byte tokens decodes to U+FFFD, and SentencePiece decoders drop the
    leading space of the first token of a sequence. So each step decodes the new tokens
    together with the previous ones (prefix..read) and emits only the text that is new, and
    holds text back while it ends in an incomplete character (the text-generation-inference
    scheme)."""

    CONTEXT = 4  # prompt tokens kept as context for the first generated token

    def __init__(self, tokenizer, context=()):
        self.tokenizer = tokenizer
        self.ids = list(context)[-self.CONTEXT:]
        self.prefix = 0                  # ids[prefix:read] were already emitted
        self.read = len(self.ids)

    def step(self, token):
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self):
        """The text still held back at the end (e.g. a truncated multi-byte character)."""
        return self._emit(final=True)

    def _emit(self, final):
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
