"""Every Python block in README.md runs as written, so the page cannot rot."""
import contextlib
import io
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index):
    code = python_blocks()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    if "na.generate(" in code:                       # the generation example prints its text
        assert len(out.getvalue().strip()) > 20


def test_public_api_is_documented():
    """Everything `help(numba_attn)` lists has a docstring, down to the public methods."""
    import inspect

    import numba_attn
    assert {"generate", "SamplingParams", "Tokenizer", "DEMO_MODEL", "Model"} <= \
        set(numba_attn.__all__)
    missing = []
    for name in numba_attn.__all__:
        obj = getattr(numba_attn, name)
        if name.startswith("__") or not callable(obj):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (callable(member) or isinstance(member, property)):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert not missing, missing
    assert os.path.isfile(os.path.join(numba_attn.DEMO_MODEL, "config.json"))
