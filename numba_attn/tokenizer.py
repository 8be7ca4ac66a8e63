"""Tokenizer: a model folder's `tokenizer.json` (or a GGUF file's vocabulary) through the
`tokenizers` library, the BOS rule, the chat template and its special tokens, and
StreamDecoder, which turns generated ids into text as they arrive (and stops at stop
strings)."""
import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from .loaders.gguf import is_gguf_file
from .loaders.gguf_tokenizer import read_gguf_tokenizer


class Tokenizer:
    """A model folder's tokenizer.json, or a GGUF file's vocabulary (through Hugging Face
    `tokenizers`) with the model's BOS rule: encode(text) -> ids, decode(ids) -> text,
    stream(ids) -> a StreamDecoder.

    chat_template: the model's chat template (Jinja source) or None; special_tokens: the
    strings a template may use, {"bos_token": "<s>", "eos_token": "</s>", ...}."""

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
        config = _read_config(folder)
        self.add_bos = _wants_bos(config, bos_token_id)
        self.chat_template = _chat_template(folder, config)
        self.special_tokens = _special_tokens(config, self.hf, bos_token_id)

    @property
    def vocab_size(self):
        """Token ids the tokenizer knows, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_bos=None):
        """Prompt ids. add_bos=None follows the model's rule: the tokenizer's own template runs
        (Llama 3's adds <|begin_of_text|>) and BOS is prepended when the model wants one and
        the template did not add it; True prepends BOS whatever the rule; False gives the
        text's tokens alone (a rendered chat template carries its own BOS). Special tokens
        written in the text (<s>, <|im_start|>) are encoded as themselves either way."""
        if add_bos is False:
            return self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is None:
            raise ValueError("add_bos=True, but the model has no BOS token")
        ids = self.hf.encode(text, add_special_tokens=True).ids
        if (add_bos or self.add_bos) and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        """Text of the token ids, special tokens (BOS, EOS) left out."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def stream(self, context=(), stop=()):
        """A StreamDecoder that continues after `context` (the prompt ids) and stops at any of
        the `stop` strings."""
        return StreamDecoder(self, context, stop)


def _read_config(folder):
    """tokenizer_config.json as a dict ({} when missing or unreadable)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _wants_bos(cfg, bos_token_id):
    """tokenizer_config.json decides when it says (add_bos_token, or bos_token null, as for
    Qwen2); otherwise the Llama convention: prepend BOS when the config names one."""
    if bos_token_id is None:
        return False
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"])
    if "bos_token" in cfg and cfg["bos_token"] is None:
        return False
    return True


def _chat_template(folder, cfg):
    """The chat template: chat_template.jinja beside the tokenizer (where transformers saves
    it), else tokenizer_config.json's chat_template, a string or a list of named templates
    (the one named "default"); None when there is none."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _special_tokens(cfg, hf, bos_token_id):
    """The special tokens' strings a chat template reads, from tokenizer_config.json (a string
    or an {"content": ...} entry each); BOS from the model's id when the file names none."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = cfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    if "bos_token" not in tokens and "bos_token" not in cfg and bos_token_id is not None:
        bos = hf.id_to_token(bos_token_id)
        if bos is not None:
            tokens["bos_token"] = bos
    return tokens


class StreamDecoder:
    """Incremental detokenisation. Decoding one token at a time goes wrong twice: a character
    split over several byte tokens decodes to U+FFFD, and SentencePiece decoders drop the
    leading space of the first token of a sequence. So each step decodes the new tokens
    together with the previous ones (prefix..read) and emits only the text that is new, and
    holds text back while it ends in an incomplete character (the text-generation-inference
    scheme).

    Stop strings: text is also held back while it ends in what could be the start of a stop
    string; once one appears, the text before it is emitted, the stop string and everything
    after it never are, and `stopped` turns true (the caller stops generating)."""

    CONTEXT = 4  # prompt tokens kept as context for the first generated token

    def __init__(self, tokenizer, context=(), stop=()):
        self.tokenizer = tokenizer
        self.ids = list(context)[-self.CONTEXT:]
        self.prefix = 0                  # ids[prefix:read] were already emitted
        self.read = len(self.ids)
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.stop = tuple(stop)
        self.held = ""                   # decoded text that may begin a stop string
        self.stopped = False

    def step(self, token):
        """Add one id; return the text it completes ("" while a character is incomplete, while
        the text may be the start of a stop string, and after a stop string)."""
        self.ids.append(int(token))
        return self._release(self._emit(final=False), final=False)

    def flush(self):
        """The text still held back at the end (e.g. a truncated multi-byte character, or the
        start of a stop string that never completed)."""
        return self._release(self._emit(final=True), final=True)

    def _emit(self, final):
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def _release(self, new, final):
        if self.stopped:
            return ""
        text = self.held + new
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        keep = 0 if final else _stop_start(text, self.stop)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]


def _stop_start(text, stops):
    """Length of the longest end of text that is the beginning of a stop string."""
    for n in range(min(len(text), max((len(s) - 1 for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
