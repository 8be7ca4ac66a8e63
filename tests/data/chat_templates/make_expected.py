"""Write expected.json: what Hugging Face transformers' apply_chat_template gives for each
template here (published templates of Llama 3 8B Instruct, Qwen2 Instruct, Mistral 7B Instruct
v0.1 and Zephyr 7B beta) on a few conversations. tests/test_chat.py checks numba_attn's
rendering against these strings. Needs transformers (not a dependency of numba-attn):

    python tests/data/chat_templates/make_expected.py            # writes expected.json
    python tests/data/chat_templates/make_expected.py --stdout   # prints it instead
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# each template's special tokens, as its model's tokenizer_config.json gives them
SPECIAL_TOKENS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": "</s>"},
}

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
USER2 = {"role": "user", "content": "  And of Japan? Answer in \"quotes\", {{ not a template }}, "
                                    "héllo wörld 日本 ✓\n"}
CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "two_turns": [USER, ASSISTANT, USER2],
    "system_two_turns": [SYSTEM, USER, ASSISTANT, USER2],
    "ends_with_assistant": [USER, ASSISTANT],
}


def render(template, special_tokens, messages, add_generation_prompt):
    """transformers' apply_chat_template on a tokenizer with this template and these tokens:
    (text, None) or (None, the error message)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(sorted(set(special_tokens.values()) | {"<unk>"}))}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                  chat_template=template, **special_tokens)
    try:
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt), None
    except Exception as e:      # the template's raise_exception(...)
        return None, str(e)


def cases():
    for name, tokens in SPECIAL_TOKENS.items():
        with open(os.path.join(HERE, f"{name}.jinja"), encoding="utf-8") as f:
            template = f.read()
        for conversation, messages in CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                yield dict(template=name, special_tokens=tokens, conversation=conversation,
                           messages=messages, add_generation_prompt=add_generation_prompt), \
                    template


def main():
    import transformers
    out = []
    for case, template in cases():
        expected, error = render(template, case["special_tokens"], case["messages"],
                                 case["add_generation_prompt"])
        out.append({**case, "expected": expected, "error": error})
    text = json.dumps({"transformers": transformers.__version__, "cases": out}, indent=1,
                      ensure_ascii=False) + "\n"
    if "--stdout" in sys.argv:
        sys.stdout.write(text)
        return
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
