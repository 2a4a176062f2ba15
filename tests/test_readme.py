"""The README's usage snippet runs as written, and its two set-up commands are the ones CI runs."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\n(.+?)\n```\n<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def test_usage_snippet_runs():
    text = README.read_text()
    match = re.search(r"```python\n(.+?)```", text, re.S)
    assert match, "README.md has no python usage block"
    scope: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)  # noqa: S102
    assert scope["logp"].shape == (2048,) and scope["seq"].shape == (8,)
    assert scope["nce"].shape == (64,) and scope["rank"].shape == (16,)


def test_two_commands_are_stated_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "fastpref-train --loss rorpo" in _block(text, "main-command")
    assert _block(text, "test-command").endswith("pytest tests")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci and "ruff check" in ci
