"""Chat templates and chat sessions.

- Templates: numba_attn's rendering equals transformers' apply_chat_template on published
  templates (Llama 3, Qwen2, Mistral, Zephyr), as fixed strings made once with transformers
  (tests/data/chat_templates/make_expected.py) and live where transformers is around; the
  sandbox stops templates that reach for Python internals, files or the messages.
- The tokenizer's chat template, special tokens and encode(add_bos=...).
- Stop strings in StreamDecoder: the text before one comes out, the stop string never does.
- generate(start_pos=...) continues the KV cache.
- ChatSession on the demo model: each turn prefills only its new tokens, the cache after two
  turns gives the logits of a full recompute, a reply rendered differently is re-run from the
  first token that differs, interrupts and a full context leave a usable conversation.
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import numba_attn
from numba_attn import (ChatSession, ChatTemplate, ChatTemplateError, ContextFullError, Model,
                        SamplingParams, Tokenizer, generate)
from numba_attn.chat import end_token_ids
from numba_attn.tokenizer import StreamDecoder

DEMO = numba_attn.DEMO_MODEL
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_templates")
GREEDY = SamplingParams(temperature=0.0)


def template_source(name):
    with open(os.path.join(DATA, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def expected_cases():
    with open(os.path.join(DATA, "expected.json"), encoding="utf-8") as f:
        return json.load(f)["cases"]


def case_id(case):
    return f"{case['template']}-{case['conversation']}-{'gen' if case['add_generation_prompt'] else 'nogen'}"


def check_case(case, expected, error):
    template = ChatTemplate(template_source(case["template"]), case["special_tokens"])
    if error is None:
        assert template.render(case["messages"], case["add_generation_prompt"]) == expected
    else:
        with pytest.raises(ChatTemplateError, match="refused the conversation") as e:
            template.render(case["messages"], case["add_generation_prompt"])
        assert error in str(e.value)


# -- templates: the same text as transformers --

@pytest.mark.parametrize("case", expected_cases(), ids=case_id)
def test_template_renders_as_transformers(case):
    check_case(case, case["expected"], case["error"])


def test_expected_strings_cover_every_template_both_ways():
    cases = expected_cases()
    assert {c["template"] for c in cases} == {"llama3", "qwen2", "mistral", "zephyr"}
    assert {c["add_generation_prompt"] for c in cases} == {True, False}
    assert sum(c["error"] is None for c in cases) >= 30


def transformers_python():
    """A Python that has transformers: this one, or $TRANSFORMERS_PYTHON; None when neither."""
    try:
        import transformers  # noqa: F401
        return sys.executable
    except ImportError:
        return os.environ.get("TRANSFORMERS_PYTHON")


def test_template_renders_as_transformers_live():
    python = transformers_python()
    if python is None:
        pytest.skip("transformers is not installed (set TRANSFORMERS_PYTHON to a Python that "
                    "has it)")
    out = subprocess.run([python, os.path.join(DATA, "make_expected.py"), "--stdout"],
                         capture_output=True, text=True, check=True).stdout
    live = json.loads(out)["cases"]
    assert len(live) == len(expected_cases())
    for case in live:
        check_case(case, case["expected"], case["error"])


def test_render_leaves_the_messages_alone():
    messages = [{"role": "user", "content": "hi"}]
    before = json.dumps(messages)
    ChatTemplate(template_source("zephyr"), {"eos_token": "</s>"}).render(messages)
    assert json.dumps(messages) == before


def test_helpers_as_transformers_has_them():
    t = ChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') }}|"
                     "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                     "{{ m.content }}{% endfor %}|{{ dict(a=1)['a'] }}|{{ bos_token }}",
                     {"bos_token": "<s>"})
    messages = [{"role": "user", "content": "<é> & \"x\""}, {"role": "user", "content": "2"}]
    import datetime
    assert t.render(messages) == (json.dumps(messages, ensure_ascii=False) + "|"
                                  + str(datetime.datetime.now().year) + "|<é> & \"x\"|1|<s>")
    # trim_blocks and lstrip_blocks: block tags leave no newline or indentation behind
    assert ChatTemplate("{% if true %}\n  a\n  {% endif %}\nb").render([]) == "  a\nb"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{% set x = messages.pop() %}",
])
def test_sandbox_refuses_python_internals(source):
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("source", [
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ open('/etc/passwd').read() }}",
    "{{ range(10 ** 9) | list | length }}",
    "{{ messages[5].content.upper() }}",
])
def test_sandbox_has_no_files_and_fails_cleanly(source):
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_template_errors_are_value_errors_with_a_clear_message():
    with pytest.raises(ChatTemplateError, match=r"does not parse: .*line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="refused the conversation: no system here"):
        ChatTemplate("{{ raise_exception('no system here') }}").render([])
    assert issubclass(ChatTemplateError, ValueError)
    with pytest.raises(ValueError, match="role"):
        ChatTemplate("x").render([{"content": "no role"}])
    with pytest.raises(ValueError, match="list"):
        ChatTemplate("x").render("hello")


# -- the tokenizer's side --

def write_folder(path, tokenizer_config=None, template_file=None):
    from tiny_model import build_tokenizer
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    tok.add_special_tokens(["<|im_end|>", "<|im_start|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    if tokenizer_config is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f)
    if template_file is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template_file)
    return str(path)


def test_tokenizer_reads_the_chat_template_and_special_tokens(tmp_path):
    plain = Tokenizer(write_folder(tmp_path / "a", {}), bos_token_id=0)
    assert plain.chat_template is None
    assert plain.special_tokens == {"bos_token": "<s>"}          # from the model's BOS id
    named = Tokenizer(write_folder(tmp_path / "b", {
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "D"}],
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "<|im_end|>",
        "pad_token": None}), bos_token_id=0)
    assert named.chat_template == "D"
    assert named.special_tokens == {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    qwen = Tokenizer(write_folder(tmp_path / "c", {"chat_template": "Q", "bos_token": None}), 0)
    assert qwen.chat_template == "Q" and "bos_token" not in qwen.special_tokens
    jinja_file = Tokenizer(write_folder(tmp_path / "d", {"chat_template": "old"}, "new"), 0)
    assert jinja_file.chat_template == "new"                       # as transformers loads it


def test_demo_model_has_a_chat_template():
    tok = Tokenizer(DEMO, 1)
    assert tok.special_tokens["bos_token"] == "<s>" and tok.special_tokens["eos_token"] == "</s>"
    text = ChatTemplate.from_tokenizer(tok).render(
        [{"role": "user", "content": "Good morning."}, {"role": "assistant", "content": "Ah."},
         {"role": "user", "content": "Indeed?"}])
    assert text == "<s>Good morning.</s><s>Ah.</s><s>Indeed?</s><s>"


def test_encode_add_bos(tmp_path):
    tok = Tokenizer(write_folder(tmp_path / "a", {}), bos_token_id=0)
    plain = tok.hf.encode("Once upon", add_special_tokens=False).ids
    assert tok.encode("Once upon") == [0] + plain                  # the model's rule
    assert tok.encode("Once upon", add_bos=False) == plain
    assert tok.encode("<s>Once upon", add_bos=False) == [0] + plain   # written specials count
    no_bos = Tokenizer(write_folder(tmp_path / "b", {"add_bos_token": False}), bos_token_id=0)
    assert no_bos.encode("Once upon") == plain
    assert no_bos.encode("Once upon", add_bos=True) == [0] + plain
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer(tmp_path / "b", bos_token_id=None).encode("x", add_bos=True)


def test_end_tokens_include_the_templates_turn_end(tmp_path):
    tok = Tokenizer(write_folder(tmp_path / "a", {"eos_token": "</s>"}), bos_token_id=0)
    im_end = tok.hf.token_to_id("<|im_end|>")
    model = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_ids=(1,),
                                                               vocab_size=400))
    assert end_token_ids(model, tok) == (1, im_end)
    model.config.vocab_size = im_end                                # not a model token
    assert end_token_ids(model, tok) == (1,)


# -- stop strings --

class CharTokenizer:
    """Token id = the character's code point: decode is exact, one character per token."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def stream_text(text, stop):
    stream = StreamDecoder(CharTokenizer(), stop=stop)
    out = []
    for ch in text:
        out.append(stream.step(ord(ch)))
        if stream.stopped:
            break
    else:
        out.append(stream.flush())
    return out, stream.stopped


@pytest.mark.parametrize("text, stop, want", [
    ("Hello world. Bye", ["."], "Hello world"),
    ("Hello world. Bye", ["world"], "Hello "),
    ("abab abc abcd", ["abcd", "c a"], "abab ab"),
    ("no stop here", ["xyz"], "no stop here"),
    ("ends with a partial sto", ["stop"], "ends with a partial sto"),
    ("User: hi\nUser:", ["\nUser:"], "User: hi"),
])
def test_stop_strings_are_cut_and_never_emitted(text, stop, want):
    pieces, stopped = stream_text(text, stop)
    assert "".join(pieces) == want
    assert stopped == (want != text)
    emitted = ""
    for piece in pieces:                          # no piece ever shows part of a stop string
        emitted += piece
        assert not any(s in emitted for s in stop)


def test_stop_text_is_held_back_only_while_it_may_start_a_stop_string():
    stream = StreamDecoder(CharTokenizer(), stop=["END"])
    assert [stream.step(ord(c)) for c in "aE"] == ["a", ""]       # "E" may begin "END"
    assert stream.step(ord("x")) == "Ex"                          # it did not
    assert stream.step(ord("E")) + stream.step(ord("N")) == ""
    assert stream.step(ord("D")) == "" and stream.stopped
    assert stream.step(ord("z")) == "" and stream.flush() == ""


def test_stop_must_be_nonempty_strings():
    for bad in ("x", [""], [3]):
        with pytest.raises(ValueError, match="stop"):
            StreamDecoder(CharTokenizer(), stop=bad)


# -- generate(start_pos=...) --

@pytest.fixture(scope="module")
def demo():
    return Model.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def demo_tok(demo):
    return Tokenizer(DEMO, demo.config.bos_token_id)


class CountingModel:
    """Wraps a model's forward to record how many tokens each call runs, at which position."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        forward = model.forward

        def counted(tokens, start_pos=0, **kwargs):
            self.calls.append((len(tokens), start_pos))
            return forward(tokens, start_pos, **kwargs)
        monkeypatch.setattr(model, "forward", counted)

    def prefills(self):
        return [c for c in self.calls if c[0] > 1]


def test_generate_continues_the_cache(demo, demo_tok, monkeypatch):
    ids = demo_tok.encode("It is a truth universally acknowledged, that a single man")
    whole = list(generate(demo, ids, max_tokens=12, sampling=GREEDY))
    demo.forward(np.array(ids[:6]), 0)                 # the cache holds the first 6
    counter = CountingModel(demo, monkeypatch)
    stats = numba_attn.GenerationStats()
    assert list(generate(demo, ids, start_pos=6, max_tokens=12, sampling=GREEDY,
                         stats=stats)) == whole
    assert counter.calls[0] == (len(ids) - 6, 6)        # only the new tokens, at position 6
    assert (stats.prompt_tokens, stats.cached_tokens) == (len(ids) - 6, 6)


def test_generate_start_pos_cuts_back_and_reruns_the_last_token(demo, demo_tok, monkeypatch):
    ids = demo_tok.encode("It is a truth universally acknowledged")
    whole = list(generate(demo, ids, max_tokens=8, sampling=GREEDY))
    assert demo.position > len(ids)                     # prompt + 7 decoded tokens
    counter = CountingModel(demo, monkeypatch)
    assert list(generate(demo, ids, start_pos=len(ids), max_tokens=8,
                         sampling=GREEDY)) == whole
    assert counter.calls[0] == (1, len(ids) - 1)        # the last prompt token, for logits
    demo.reset()
    with pytest.raises(ValueError, match="past the 0 tokens"):
        next(generate(demo, ids, start_pos=3, max_tokens=2))
    with pytest.raises(ValueError, match="start_pos"):
        next(generate(demo, ids, start_pos=len(ids) + 1, max_tokens=2))


# -- ChatSession --

def assert_logits_close(got, want):
    # float32 sums in another order (a decode GEMV against a prefill GEMM, each CPU's own
    # kernels) move a logit by a few float32 steps of the largest one; a wrong cache moves it
    # by tenths
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max())


def full_recompute_logits(ids):
    fresh = Model.from_pretrained(DEMO, max_seq=256)
    return np.array(fresh.forward(np.array(ids), 0), np.float64)


def last_logits_from_cache(model, ids):
    """The logits of ids[-1] with the first len(ids) - 1 tokens' keys and values as the cache
    holds them."""
    model.cache.truncate(len(ids) - 1)
    return np.array(model.forward(np.array(ids[-1:]), len(ids) - 1), np.float64)


def test_second_turn_prefills_only_its_tokens_and_matches_a_recompute(demo, demo_tok,
                                                                      monkeypatch):
    session = ChatSession(demo, demo_tok, sampling=GREEDY, max_tokens=30)
    counter = CountingModel(demo, monkeypatch)
    first = "".join(session.send("Good morning, Mr. Darcy. How is your sister?"))
    assert first and session.messages[-1] == {"role": "assistant", "content": first}
    cached = list(session.cached)
    counter.calls.clear()
    second = "".join(session.send("And your aunt?"))
    ids2 = demo_tok.encode(session.template.render(session.messages[:3]), add_bos=False)
    assert ids2[:len(cached)] == cached                 # the rendering extends the cache
    assert counter.prefills()[0] == (len(ids2) - len(cached), len(cached))
    assert session.stats.cached_tokens == len(cached)
    assert session.stats.prompt_tokens == len(ids2) - len(cached)
    assert second and session.messages[-1]["content"] == second

    got = last_logits_from_cache(demo, session.cached)
    want = full_recompute_logits(session.cached)
    assert_logits_close(got, want)
    assert got.argmax() == want.argmax()


def test_reply_rendered_differently_is_rerun_from_the_first_difference(demo, demo_tok,
                                                                       monkeypatch):
    """A stop string ends the reply, so the tokens after it sit in the cache but not in the
    next rendering: the cache is cut back to the first differing token and re-run."""
    probe = ChatSession(demo, demo_tok, sampling=GREEDY, max_tokens=30)
    reply = "".join(probe.send("Good morning, Mr. Darcy. How is your sister?"))
    n_prompt = len(demo_tok.encode(probe.template.render(probe.messages[:1]), add_bos=False))
    tokens = probe.cached[n_prompt:]
    stop = demo_tok.decode(tokens[8:11])                # spans three tokens: two get cached
    assert reply.find(stop) > 0
    session = ChatSession(demo, demo_tok, sampling=GREEDY, max_tokens=30, stop=[stop])
    cut = "".join(session.send("Good morning, Mr. Darcy. How is your sister?"))
    assert cut == reply[:reply.find(stop)] and session.stats.stop_reason == "stop"
    cached = list(session.cached)
    counter = CountingModel(demo, monkeypatch)
    "".join(session.send("And your aunt?"))
    ids2 = demo_tok.encode(session.template.render(session.messages[:3]), add_bos=False)
    common = next(i for i, (a, b) in enumerate(zip(cached, ids2)) if a != b)
    assert common < len(cached)                         # the cache held more than the text
    assert counter.prefills()[0] == (len(ids2) - common, common)
    assert_logits_close(last_logits_from_cache(demo, session.cached),
                        full_recompute_logits(session.cached))


@pytest.mark.parametrize("decode", ["compiled", "steps"])
def test_interrupt_keeps_the_part_written_and_a_consistent_cache(demo, demo_tok, monkeypatch,
                                                                  decode):
    session = ChatSession(demo, demo_tok, sampling=GREEDY, max_tokens=40)
    steps = []
    if decode == "steps":                               # mid-forward, in a decode step's layer
        monkeypatch.setattr(demo, "decoder", None)
        write = demo.cache.write                        # under append and decode steps

        def interrupting_write(layer, k, v):
            if k.shape[0] == 1 and layer == 2:
                steps.append(1)
                if len(steps) == 6:
                    raise KeyboardInterrupt
            return write(layer, k, v)
        monkeypatch.setattr(demo.cache, "write", interrupting_write)
    else:             # the compiled step: every layer's keys written, the length not yet moved
        step = demo.decoder.step

        def interrupting_step(token, pos):
            logits = step(token, pos)
            steps.append(1)
            if len(steps) == 6:
                raise KeyboardInterrupt
            return logits
        monkeypatch.setattr(demo.decoder, "step", interrupting_step)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.send("Good morning, Mr. Darcy. How is your sister?"):
            pieces.append(piece)
    assert len(steps) == 6
    monkeypatch.undo()
    assert decode == "steps" or demo.decoder.why_not is None
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert len(set(demo.cache.lengths)) == 1 and demo.position == len(session.cached)
    "".join(session.send("And your aunt?"))
    assert_logits_close(last_logits_from_cache(demo, session.cached),
                        full_recompute_logits(session.cached))


def test_closing_a_reply_early_keeps_it(demo, demo_tok):
    session = ChatSession(demo, demo_tok, sampling=GREEDY, max_tokens=40)
    reply = session.send("Good morning, Mr. Darcy.")
    first = next(reply)
    reply.close()
    assert session.messages[-1] == {"role": "assistant", "content": first}
    assert demo.position == len(session.cached)


def test_full_context_is_an_error_that_leaves_the_conversation(demo_tok):
    model = Model.from_pretrained(DEMO, max_seq=48)
    session = ChatSession(model, demo_tok, sampling=GREEDY, max_tokens=None,
                          system="It was a fine morning.")
    "".join(session.send("Good morning, Mr. Darcy. How is your sister?"))
    assert session.stats.stop_reason in ("eos", "context")
    before = [dict(m) for m in session.messages]
    with pytest.raises(ContextFullError, match="reset"):
        session.send("And now a long question about your aunt and your cousins? " * 3)
    assert session.messages == before                  # the message that did not fit is gone
    session.reset()
    assert session.messages == [{"role": "system", "content": "It was a fine morning."}]
    assert model.position == 0 and session.cached == []
    assert "".join(session.send("Indeed?"))


def test_reply_cut_short_by_the_context(demo_tok):
    model = Model.from_pretrained(DEMO, max_seq=24)
    session = ChatSession(model, demo_tok, sampling=GREEDY, max_tokens=100)
    "".join(session.send("It is a truth universally acknowledged"))
    assert session.stats.stop_reason == "context"
    assert session.stats.cached_tokens + session.stats.prompt_tokens \
        + session.stats.generated_tokens == 24
    with pytest.raises(ContextFullError):
        session.send("Indeed?")


def test_continue_a_given_conversation(demo, demo_tok):
    messages = [{"role": "user", "content": "Good morning, Mr. Darcy."},
                {"role": "assistant", "content": "\"Good morning,\" said he."},
                {"role": "user", "content": "How is your sister?"}]
    session = ChatSession(demo, demo_tok, messages=messages, sampling=GREEDY, max_tokens=20)
    ids = session.prompt_ids()
    assert ids == demo_tok.encode(session.template.render(messages), add_bos=False)
    reply = "".join(session.reply())
    want = demo_tok.decode(generate(demo, ids, max_tokens=20, sampling=GREEDY,
                                    eos_token_ids=session.end_ids))
    assert reply == want
    assert session.messages[:3] == messages and session.messages[3]["role"] == "assistant"


def test_model_without_a_template_is_refused(tiny_folder, tiny_model):
    tok = Tokenizer(tiny_folder, tiny_model.config.bos_token_id)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatSession(tiny_model, tok)
