"""`numba-attn chat` end to end on the built-in demo model (its own chat template): messages piped
in one per line, /reset, /exit, the end of input, a full context, --stop, --stats, a model
without a template; a terminal session through a pseudo-terminal; and `generate --chat`,
`generate --stop`."""
import os
import re
import select
import signal
import sys
import time

import pytest
from click.testing import CliRunner

import numba_attn
from numba_attn import ChatSession, ChatTemplate, Model, SamplingParams, Tokenizer, cli, generate
from numba_attn.chat import end_token_ids

DEMO = numba_attn.DEMO_MODEL
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(temperature=0.0)
FIRST, SECOND, THIRD = ("Good morning, Mr. Darcy. How is your sister?", "And your aunt?",
                        "Is it not a fine day?")
ARGS = ["--temperature", "0", "--max-tokens", "30"]


def invoke(*args, input=None):
    try:
        runner = CliRunner(mix_stderr=False)   # click 8.1
    except TypeError:
        runner = CliRunner()                   # click >= 8.2: stderr kept apart
    return runner.invoke(cli.main, list(args), input=input)


def assert_one_line_error(result, *parts):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def demo():
    model = Model.from_pretrained(DEMO)
    return model, Tokenizer(DEMO, model.config.bos_token_id)


def api_replies(demo, *turns, max_tokens=30, **options):
    """The replies a ChatSession gives (None in turns: reset)."""
    model, tok = demo
    session = ChatSession(model, tok, sampling=GREEDY, max_tokens=max_tokens, **options)
    replies = []
    for text in turns:
        if text is None:
            session.reset()
        else:
            replies.append("".join(session.send(text)))
    return replies


def test_two_turns_reset_and_exit(demo):
    result = invoke("chat", *ARGS, "--stats",
                    input=f"{FIRST}\n{SECOND}\n/reset\n{THIRD}\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output + result.stderr
    want = api_replies(demo, FIRST, SECOND, None, THIRD)
    assert result.stdout == "".join(reply + "\n" for reply in want)
    summaries = [line for line in result.stderr.splitlines() if line.startswith("prompt ")]
    assert len(summaries) == 3                                  # one per reply, with --stats
    assert re.match(r"prompt \d+ tokens \(\d+ cached\), generated", summaries[1])
    assert "cached" not in summaries[0] and "cached" not in summaries[2]   # after /reset
    assert "(new conversation)" in result.stderr
    assert "> " not in result.stdout                            # no prompt when piped


def test_end_of_input_ends_the_session_and_blank_lines_are_skipped(demo):
    result = invoke("chat", *ARGS, input=f"\n{FIRST}\n   \n{SECOND}")   # no final newline
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "".join(r + "\n" for r in api_replies(demo, FIRST, SECOND))
    assert "prompt " not in result.stderr                       # no summary without --stats


def test_system_message(demo):
    system = "It was a fine morning at Pemberley."
    result = invoke("chat", *ARGS, "--system", system, input=f"{FIRST}\n/reset\n{FIRST}\n")
    assert result.exit_code == 0, result.stderr
    reply = api_replies(demo, FIRST, system=system)[0]
    assert reply != api_replies(demo, FIRST)[0]
    assert result.stdout == f"{reply}\n{reply}\n"               # the system message survives /reset


def test_unknown_command():
    result = invoke("chat", *ARGS, input="/help\n")
    assert result.exit_code == 0 and result.stdout == ""
    assert "unknown command /help: /reset, /exit" in result.stderr


def test_full_context_says_so_and_offers_reset(demo):
    long = "Pray, what is the meaning of all this, and why are you here so early? " * 2
    result = invoke("chat", *ARGS, "--context", "64", "--stats",
                    input=f"{long}\n{long}\n{long}\n/reset\n{THIRD}\n")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.output
    assert "the context of 64 tokens is full: /reset starts a new conversation" in result.stderr
    model = Model.from_pretrained(DEMO, max_seq=64)
    third = "".join(ChatSession(model, demo[1], sampling=GREEDY, max_tokens=30).send(THIRD))
    assert result.stdout.endswith(third + "\n")                 # after /reset it goes on


def test_stop_string_is_not_printed(demo):
    reply = api_replies(demo, FIRST)[0]
    stop = reply[12:16]
    assert reply.find(stop) > 0
    result = invoke("chat", *ARGS, "--stop", "zzz", "--stop", stop, "--stats",
                    input=f"{FIRST}\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reply[:reply.find(stop)] + "\n"
    assert "stopped: stop string" in result.stderr


def test_model_without_a_template_is_refused(tiny_folder):
    assert_one_line_error(invoke("chat", "--model", tiny_folder, input="hi\n"),
                          "no chat template", "numba-attn generate")


def test_bad_options():
    assert_one_line_error(invoke("chat", "--max-tokens", "0"), "--max-tokens")
    assert_one_line_error(invoke("chat", "--stop", ""), "--stop")
    assert_one_line_error(invoke("chat", "--top-p", "0"), "top-p")


def test_every_chat_option_help_gives_default_and_range():
    result = invoke("chat", "--help")
    assert result.exit_code == 0
    for opt in cli.chat.params:
        if isinstance(opt, cli.click.Option) and opt.name != "help":
            assert "default" in (opt.help or "") or opt.show_default, opt.name
    shared = {"model_dir", "context", "device", "weight_dtype", "temperature", "top_k", "top_p",
              "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop", "max_tokens"}
    for command in (cli.chat, cli.generate):
        assert shared <= {p.name for p in command.params}


# -- a terminal --

def read_until(fd, marker=None, timeout=120.0):
    """Read the pseudo-terminal until `marker` has appeared (None: until the child closes it);
    everything read."""
    out, end = b"", time.monotonic() + timeout
    while marker is None or marker.encode() not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            what = repr(marker) if marker is not None else "the terminal's close"
            raise AssertionError(f"{what} not seen within {timeout} s; got {out!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:                               # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return out.decode("utf-8", "replace")


def run_in_pty(lines, end):
    """Run `numba-attn chat` on a pseudo-terminal: wait for each "> " prompt, type the next
    line, then `end` (b"\\x04" Ctrl-D or b"\\x03" Ctrl-C) at the last prompt. (transcript,
    exit status)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:                                       # the child: the CLI on the terminal
        os.chdir(REPO)
        # Ctrl-C must reach it: a shell without job control starts background jobs with
        # SIGINT ignored, and an ignored signal stays ignored across exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "numba_attn", "chat", *ARGS])
    transcript = ""
    try:
        for line in lines:
            transcript += read_until(fd, "> ")
            os.write(fd, line.encode() + b"\r")
        transcript += read_until(fd, "> ")
        transcript += _end_session(fd, end)
    finally:
        status = _reap(pid)
        os.close(fd)
    return transcript, os.waitstatus_to_exitcode(status)


def _end_session(fd, end, timeout=60.0):
    """Type `end` at the prompt and read until the child closes the terminal; type it again
    only after 2 s in which nothing came back (a key typed the instant the prompt appears can
    be lost), never once the child answers: a second Ctrl-C would reach it as it exits. What
    it wrote meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.write(fd, end)
        if select.select([fd], [], [], 2.0)[0]:
            return read_until(fd, None, max(0.0, deadline - time.monotonic()))
    raise AssertionError(f"the session did not end on {end!r} within {timeout} s")


def _reap(pid, grace=30.0):
    """The child's exit status: waited for up to `grace` seconds, then killed (a test that
    failed while the CLI still waits at its prompt must not hang the run)."""
    end = time.monotonic() + grace
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_terminal_session_through_a_pty(demo):
    transcript, code = run_in_pty([FIRST, "/reset", FIRST], b"\x04")
    assert code == 0, transcript
    reply = api_replies(demo, FIRST)[0]
    assert transcript.count(reply) == 2, transcript
    assert "/reset starts a new conversation" in transcript            # the greeting
    assert "(new conversation)" in transcript
    assert "Traceback" not in transcript


def test_ctrl_c_at_the_prompt_ends_cleanly():
    transcript, code = run_in_pty([], b"\x03")
    assert code == 0, transcript
    assert "Traceback" not in transcript and "Aborted" not in transcript


# -- generate --chat and --stop --

def test_generate_chat_is_one_user_message(demo):
    model, tok = demo
    for system in (None, "It was a fine morning at Pemberley."):
        messages = [{"role": "user", "content": FIRST}]
        extra = []
        if system:
            messages.insert(0, {"role": "system", "content": system})
            extra = ["--system", system]
        text = ChatTemplate.from_tokenizer(tok).render(messages)
        ids = tok.encode(text, add_bos=False)
        want = tok.decode(generate(model, ids, max_tokens=30, sampling=GREEDY,
                                   eos_token_ids=end_token_ids(model, tok)))
        result = invoke("generate", FIRST, "--chat", *extra, *ARGS)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == want + "\n"
        assert f"prompt {len(ids)} tokens" in result.stderr
    shown = invoke("generate", FIRST, "--chat", *ARGS, "--show-prompt")
    assert shown.stdout.startswith(f"<s>{FIRST}</s><s>")         # as the template renders it


def test_generate_chat_needs_a_template_and_system_needs_chat(tiny_folder):
    assert_one_line_error(invoke("generate", "hi", "--model", tiny_folder, "--chat"),
                          "no chat template", "without --chat")
    assert_one_line_error(invoke("generate", "hi", "--system", "x"), "--system needs --chat")


def test_generate_stop_string_is_not_printed(demo):
    model, tok = demo
    prompt = "It is a truth universally acknowledged"
    text = tok.decode(generate(model, tok.encode(prompt), max_tokens=24, sampling=GREEDY))
    stop = text[10:14]
    assert text.find(stop) > 0
    result = invoke("generate", prompt, "--temperature", "0", "--max-tokens", "24",
                    "--stop", stop)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == text[:text.find(stop)] + "\n"
    assert "stopped: stop string" in result.stderr
    whole = invoke("generate", prompt, "--temperature", "0", "--max-tokens", "24",
                   "--stop", "no such text")
    assert whole.stdout == text + "\n" and "stopped: max tokens" in whole.stderr
