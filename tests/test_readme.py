"""README.md's calls name only arguments that exist: every `mk.<name>(...)` (and `marginkern.<module>.<name>(...)`)
in the README, code blocks and prose alike, passes keywords its callable accepts (a user audit found two documented
`labels=` keywords that raise TypeError: the distillation functions take `target=`)."""
import importlib
import inspect
import re
from pathlib import Path

import pytest

import marginkern as mk

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CALL = re.compile(r"\b(mk|marginkern(?:\.\w+)*)\.(\w+)\(")


def call_arguments(text, start):
    """The text between the parenthesis opening at `start` and its match (None if the README leaves it open)."""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1:end]
    return None


def keywords(arguments):
    """The keyword names at the call's own level (not inside nested calls, lists or strings)."""
    names, depth, quoted = [], 0, None
    for i, ch in enumerate(arguments):
        if quoted:
            quoted = None if ch == quoted else quoted
        elif ch in "\"'":
            quoted = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "=" and depth == 0 and arguments[i + 1:i + 2] != "=" and arguments[i - 1:i] not in "=!<>":
            name = re.search(r"(\w+)\s*$", arguments[:i])
            if name:
                names.append(name.group(1))
    return names


def readme_calls():
    calls = []
    for match in CALL.finditer(README):
        arguments = call_arguments(README, match.end() - 1)
        if arguments is not None and "..." not in keywords(arguments):
            line = README.count("\n", 0, match.start()) + 1
            calls.append(pytest.param(match.group(1), match.group(2), keywords(arguments), id=f"line {line}"))
    return calls


@pytest.mark.parametrize("owner, name, names", readme_calls())
def test_readme_call_keywords_exist(owner, name, names):
    function = getattr(mk if owner == "mk" else importlib.import_module(owner), name)
    signature = inspect.signature(function)
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = [n for n in names if n not in signature.parameters]
    assert not unknown, f"README's {owner}.{name}(...) passes {unknown}; it takes {list(signature.parameters)}"


def test_the_readme_has_calls_to_check():
    assert len(readme_calls()) > 40
