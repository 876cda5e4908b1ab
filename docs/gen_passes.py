"""Refresh the generated parts of docs/passes.md from the pass registry.

    .venv/bin/python docs/gen_passes.py           # rewrite docs/passes.md in place
    .venv/bin/python docs/gen_passes.py --check   # exit 1 when docs/passes.md is stale

Each pass has a hand-written section in docs/passes.md (``## `name` ``, with an example that
tests/test_docs.py runs). Inside it, the lines between ``<!-- generated: name -->`` and
``<!-- end generated: name -->`` come from the pass class: its summary (the docstring's first
paragraph), whether it is exact, its options with their defaults, and the rest of its docstring
(algebra, preconditions, declines, stats). Edit the docstring, then run this script; never edit
those lines by hand. A registered pass without a section gets one appended, with a note to
write its example.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "passes.md"
_HEADING = re.compile(r"^## `([a-z0-9_]+)`\s*$", re.M)


def summary_and_body(cls) -> tuple[str, str]:
    """The docstring's first paragraph (one line) and the rest (dedented)."""
    doc = textwrap.dedent("\n".join((cls.__doc__ or "").strip("\n").splitlines()[1:]))
    first_line = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    paragraphs = (first_line + "\n" + doc).strip().split("\n\n", 1)
    summary = " ".join(line.strip() for line in paragraphs[0].splitlines())
    body = paragraphs[1].strip("\n") if len(paragraphs) > 1 else ""
    return summary, textwrap.dedent(body)


def generated(name: str, cls) -> str:
    summary, body = summary_and_body(cls)
    fields = dataclasses.fields(cls)
    from fxopt.spec import _scalar_text  # options as the pipeline text writes them

    options = ", ".join(f"`{f.name}={_scalar_text(f.default)}`" for f in fields) if fields else "none"
    kind = "exact" if cls.exact else "**lossy** (an explicit plan step)"
    return "\n".join([
        f"<!-- generated: {name} (from {cls.__module__}.{cls.__qualname__}'s docstring by docs/gen_passes.py) -->",
        f"{summary}",
        "",
        f"Kind: {kind}. Options: {options}. Class: `{cls.__module__}.{cls.__qualname__}`.",
        "",
        "```text",
        body,
        "```",
        f"<!-- end generated: {name} -->",
    ])


def sections(text: str) -> dict[str, str]:
    """Pass name -> the text of its section (up to the next ``## `` heading)."""
    found = {}
    starts = list(_HEADING.finditer(text))
    for i, match in enumerate(starts):
        end = text.find("\n## ", match.end())
        found[match.group(1)] = text[match.start(): end if end != -1 else len(text)]
    return found


def builtin_passes() -> dict:
    """fxopt's own passes: the registry also holds any a user (or a test) registered."""
    from fxopt.pass_manager import registered_passes

    return {name: cls for name, cls in registered_passes().items() if cls.__module__.startswith("fxopt.")}


def render(text: str) -> str:
    """``text`` with every pass's generated block refreshed (and missing sections appended)."""
    for name, cls in builtin_passes().items():
        block = generated(name, cls)
        pattern = re.compile(rf"<!-- generated: {name} [^\n]*-->\n.*?<!-- end generated: {name} -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        elif name in sections(text):
            heading = _HEADING.search(text, text.index(f"## `{name}`"))
            text = text[:heading.end()] + "\n\n" + block + text[heading.end():]
        else:
            text = text.rstrip("\n") + f"\n\n## `{name}`\n\n{block}\n\nExample: not written yet (tests/test_docs.py fails until it is).\n"
    return text


def main(argv: list[str]) -> int:
    text = PAGE.read_text()
    fresh = render(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{PAGE} is stale: run `.venv/bin/python docs/gen_passes.py`", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        PAGE.write_text(fresh)
        print(f"rewrote {PAGE}")
    else:
        print(f"{PAGE} is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PAGE.parent.parent))
    sys.exit(main(sys.argv[1:]))
