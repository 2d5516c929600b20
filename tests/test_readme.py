"""The README's examples run as written."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test -->\n```python\n(.*?)```", re.S)


def _blocks():
    return BLOCK.findall(README.read_text())


def test_readme_has_tested_examples():
    assert len(_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs_and_prints_what_it_claims(index):
    code = _blocks()[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README block {index}", "exec"), {})
    # Every `print(...)  # value` comment in the block is the printed value.
    claims = re.findall(r"^print\(.*\)[ \t]+# (.+)$", code, re.M)
    printed = [line for line in out.getvalue().splitlines() if not line.startswith(("Epoch", "\x1b"))]
    for claim in claims:
        assert any(line.strip() == claim.strip() for line in printed), (claim, printed)
