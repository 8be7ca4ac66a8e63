"""Chat: a model's chat template rendered in Jinja's sandbox, and a conversation that keeps its
KV cache from turn to turn.

    session = ChatSession(model, tokenizer, system="You are terse.", max_tokens=128)
    for piece in session.send("Hello!"):      # the reply, streamed as text
        print(piece, end="")

Each turn renders the whole conversation with the template, encodes it, and prefills only the
tokens after the part already in the cache. The reply's tokens stay in the cache; when the
template renders the reply differently from how it was generated (trimmed, re-tokenized, cut at
a stop string), the cache is cut back to the first token that differs and re-run from there.
"""
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .generation import STOP_STRING, GenerationStats, generate
from .sampling import SamplingParams

# special tokens that end a turn in common templates (Llama 3, ChatML, Phi, Gemma): generation
# stops at them, besides the model's EOS, where the tokenizer has them as special tokens
TURN_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                   "<|endoftext|>", "<|end_of_text|>")
DEFAULT_MAX_TOKENS = 256   # tokens per reply


class ChatTemplateError(ValueError):
    """A chat template that does not parse, fails, refuses a conversation (raise_exception),
    or reaches for something its sandbox forbids."""


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context: start a new one (reset())."""


class ChatTemplate:
    """A chat template (Jinja source, as in tokenizer_config.json) rendered the way Hugging
    Face transformers renders it: trim_blocks and lstrip_blocks, the loop-controls extension,
    a JSON `tojson`, `raise_exception(message)` and `strftime_now(format)`, the special tokens
    as variables, in Jinja's immutable sandbox (no Python internals, no files, no changes to
    the messages)."""

    def __init__(self, source, special_tokens=None):
        """source: the template; special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...}
        (a Tokenizer's special_tokens)."""
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template is a string, got {type(source).__name__}")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not parse: {e.message} (line "
                                    f"{e.lineno})") from None

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_token_ids=()):
        """The tokenizer's own template with its special tokens (EOS from eos_token_ids, the
        model's, when the tokenizer names none). Raises ChatTemplateError when it has none."""
        if tokenizer.chat_template is None:
            raise ChatTemplateError("the model has no chat template (chat_template in "
                                    "tokenizer_config.json, or tokenizer.chat_template in a "
                                    "GGUF file)")
        tokens = dict(tokenizer.special_tokens)
        if "eos_token" not in tokens and eos_token_ids:
            eos = tokenizer.hf.id_to_token(eos_token_ids[0])
            if eos is not None:
                tokens["eos_token"] = eos
        return cls(tokenizer.chat_template, tokens)

    def render(self, messages, add_generation_prompt=True, **variables):
        """The conversation as the model's text: messages is a list of {"role", "content"}
        dicts (roles as the template knows them: system, user, assistant); with
        add_generation_prompt the text ends where the assistant's reply begins. variables:
        more for the template (e.g. a template's own options). Raises ChatTemplateError."""
        context = {"tools": None, "documents": None, **self.special_tokens, **variables,
                   "messages": _plain_messages(messages),
                   "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**context)
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the chat template tried something its sandbox forbids "
                                    f"({e})") from None
        except _Refusal as e:                  # the template's raise_exception(message)
            raise ChatTemplateError(f"the chat template refused the conversation: "
                                    f"{e.message}") from None
        except Exception as e:                 # the template's own code failed
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: "
                                    f"{e}") from None


def _environment():
    """The sandbox every template renders in, with transformers' helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise _Refusal(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()    # dict(...) without the dict type itself
    return env


class _Refusal(jinja2.TemplateError):
    pass


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)


def _plain_messages(messages):
    """Copies of the messages as plain dicts of plain values (what the template sees)."""
    if isinstance(messages, (str, dict)) or not hasattr(messages, "__iter__"):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    plain = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"each message must be a dict with string 'role' and 'content', "
                             f"got {m!r}")
        plain.append(json.loads(json.dumps(m)))
    return plain


def end_token_ids(model, tokenizer):
    """The ids that end a reply: the model's EOS ids, the tokenizer's EOS, and the turn-end
    tokens of common templates (<|eot_id|>, <|im_end|>, ...) the tokenizer knows as special
    tokens."""
    ids = set(model.config.eos_token_ids)
    special = {t.content: i for i, t in tokenizer.hf.get_added_tokens_decoder().items()
               if t.special}
    for name in (tokenizer.special_tokens.get("eos_token"), *TURN_END_TOKENS):
        if name in special and special[name] < model.config.vocab_size:
            ids.add(special[name])
    return tuple(sorted(ids))


class ChatSession:
    """A conversation with a model through its chat template, the KV cache kept between turns.

    send(text) adds a user message and returns the reply as a generator of text pieces; the
    reply joins the conversation when the generator ends, is closed early (e.g. on Ctrl-C: the
    part written so far is kept) or raises. The session owns the model's KV cache: do not run
    the model elsewhere between turns (or call reset()).

    messages: the conversation so far, {"role", "content"} dicts; stats: the last reply's
    GenerationStats."""

    def __init__(self, model, tokenizer, *, system=None, messages=(), template=None,
                 sampling=SamplingParams(), max_tokens=DEFAULT_MAX_TOKENS, stop=()):
        """system: a system message to start with; messages: an earlier conversation to
        continue; template: a ChatTemplate (default: the tokenizer's; ChatTemplateError when
        it has none); max_tokens: tokens per reply, or None for as many as the context holds
        (a reply is cut short when the context fills); stop: strings that end a reply (not
        part of it)."""
        if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.template = template or ChatTemplate.from_tokenizer(tokenizer,
                                                                model.config.eos_token_ids)
        self.sampling, self.max_tokens = sampling, max_tokens
        self.stop = tuple(stop)
        tokenizer.stream(stop=self.stop)                  # checks the stop strings
        self.end_ids = end_token_ids(model, tokenizer)
        self.system = system
        self.messages = []
        self.reset()
        self.messages.extend(dict(m) for m in messages)
        self.stats = GenerationStats()

    def reset(self):
        """Start a new conversation (the system message stays) with an empty KV cache."""
        self.messages = [] if self.system is None else [{"role": "system",
                                                         "content": self.system}]
        self.cached = []                 # the ids whose keys and values are in the cache
        self.model.reset()

    def send(self, text):
        """Add a user message; the reply as a generator of text pieces. Raises at once
        (ContextFullError, ChatTemplateError) with the conversation left as it was when the
        conversation would not fit the context or the template refuses it."""
        self.messages.append({"role": "user", "content": text})
        try:
            return self.reply()
        except ValueError:
            self.messages.pop()
            raise

    def reply(self):
        """The assistant's reply to the conversation as it stands, as a generator of text
        pieces (for a conversation given as messages=...). Raises ContextFullError when the
        conversation leaves no room for a reply."""
        ids = self.prompt_ids()
        context = self.model.max_seq
        if len(ids) >= context:
            raise ContextFullError(f"the conversation is {len(ids)} tokens and the context "
                                   f"holds {context}: start a new one (reset)")
        reuse = min(_common_prefix(self.cached, ids), self.model.position)
        fits = self.max_tokens is not None and len(ids) + self.max_tokens <= context
        return self._stream(ids, reuse, self.max_tokens if fits else None)

    def prompt_ids(self):
        """The token ids of the conversation rendered up to the assistant's turn."""
        return self.tokenizer.encode(self.template.render(self.messages), add_bos=False)

    def _stream(self, ids, reuse, max_tokens):
        self.stats = stats = GenerationStats()
        stream = self.tokenizer.stream(ids, stop=self.stop)
        tokens = generate(self.model, ids, start_pos=reuse, max_tokens=max_tokens,
                          sampling=self.sampling, eos_token_ids=self.end_ids, stats=stats)
        generated, pieces = [], []
        try:
            for token in tokens:
                generated.append(int(token))
                piece = stream.step(token)
                if piece:
                    pieces.append(piece)
                    yield piece
                if stream.stopped:
                    stats.stop_reason = STOP_STRING
                    break
            else:
                piece = stream.flush()
                if piece:
                    pieces.append(piece)
                    yield piece
        finally:
            tokens.close()
            self._keep(ids + generated, "".join(pieces))

    def _keep(self, sequence, reply):
        """After a reply (finished or not): the cache holds a prefix of prompt + reply tokens
        (every layer as far as the shortest one, should an interrupt have come in the middle of
        a forward pass), and the reply joins the conversation."""
        kept = min(self.model.cache.lengths)
        self.model.cache.truncate(kept)
        self.cached = sequence[:kept]
        self.messages.append({"role": "assistant", "content": reply})


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
