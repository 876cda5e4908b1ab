"""Pipeline specs: one pipeline, three spellings that round-trip.

- Python: ``["canonicalize", {"name": "fold_bn"}, {"fixpoint": ["a", "b"], "max_iters": 4}]``
  (Pass objects are accepted too);
- TOML: ``passes = ["canonicalize", {name = "fold_bn"}, {fixpoint = ["a", "b"], max_iters = 4}]``;
- text: ``canonicalize,fold_bn,fixpoint{max_iters=4}(a,b)``.

The normal form (what ``normalize`` returns and the report records) is a list whose items are a
pass name, ``{"name": ..., **non_default_options}``, or ``{"fixpoint": [...], "max_iters": N}``.
Named pipelines are TOML files in ``fxopt/pipelines/``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from fxopt.errors import SpecError
from fxopt.pass_manager import Fixpoint, Pass, Pipeline, create_pass

PIPELINES_DIR = Path(__file__).parent / "pipelines"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def build_pass(item: Pass | str | dict) -> Pass:
    """One spec item (or a Pass object) as a Pass."""
    if isinstance(item, Pass):
        return item
    if isinstance(item, str):
        return create_pass(item)
    if isinstance(item, dict):
        if "fixpoint" in item:
            extra = set(item) - {"fixpoint", "max_iters"}
            if extra:
                raise SpecError(f"fixpoint item has unknown option(s) {sorted(extra)}: only 'max_iters' is allowed")
            inner = item["fixpoint"]
            if not isinstance(inner, list):
                raise SpecError(f"fixpoint must hold a list of passes, got {inner!r}")
            return Fixpoint(inner, **({"max_iters": item["max_iters"]} if "max_iters" in item else {}))
        if "name" not in item or not isinstance(item["name"], str):
            raise SpecError(f"pipeline item {item!r} needs a 'name' (or 'fixpoint') key")
        options = {k: v for k, v in item.items() if k != "name"}
        return create_pass(item["name"], **options)
    raise SpecError(f"pipeline item {item!r} is neither a pass name, a table of a pass and its options, nor a Pass")


def build_pipeline(items: Sequence[Pass | str | dict]) -> Pipeline:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise SpecError(f"a pipeline is a list of passes, got {type(items).__name__}")
    return Pipeline(items)


def normalize(items: Sequence[Pass | str | dict]) -> list:
    """The normal form of a spec (validated: every pass and option exists)."""
    return build_pipeline(items).spec()


# ---------------------------------------------------------------------------------------------
# text form


def to_text(items: Sequence[str | dict]) -> str:
    return ",".join(_item_text(item) for item in items)


def _item_text(item: str | dict) -> str:
    if isinstance(item, str):
        return item
    if "fixpoint" in item:
        opts = f"{{max_iters={item['max_iters']}}}" if "max_iters" in item else ""
        return f"fixpoint{opts}({to_text(item['fixpoint'])})"
    options = {k: v for k, v in item.items() if k != "name"}
    if not options:
        return item["name"]
    return item["name"] + "{" + ",".join(f"{k}={_scalar_text(v)}" for k, v in options.items()) + "}"


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not (isinstance(value, float) and math.isinf(value)) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)
    raise SpecError(f"option value {value!r} cannot be written in a pipeline spec (use numbers, booleans, strings)")


class _TextParser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, expected: str) -> SpecError:
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
        return SpecError(
            f"pipeline text {self.text!r}: expected {expected} at column {self.pos + 1}, found {found} "
            "(form: name,name{option=value},fixpoint{max_iters=N}(name,...))"
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.fail(repr(char))
        self.pos += 1

    def name(self) -> str:
        self.skip_space()
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.fail("a pass name")
        self.pos = match.end()
        return match.group()

    def items(self, closing: str) -> list:
        result: list = []
        if self.peek() == closing:
            return result
        while True:
            result.append(self.item())
            if self.peek() != ",":
                return result
            self.pos += 1

    def item(self) -> str | dict:
        name = self.name()
        options = self.options() if self.peek() == "{" else {}
        if name == "fixpoint":
            self.expect("(")
            inner = self.items(")")
            self.expect(")")
            return {"fixpoint": inner, **options}
        return {"name": name, **options} if options else name

    def options(self) -> dict:
        self.expect("{")
        options: dict = {}
        if self.peek() != "}":
            while True:
                key = self.name()
                self.expect("=")
                options[key] = self.value()
                if self.peek() != ",":
                    break
                self.pos += 1
        self.expect("}")
        return options

    def value(self) -> Any:
        self.skip_space()
        match = re.compile(r'"(?:[^"\\]|\\.)*"|[^,{}()\s]+').match(self.text, self.pos)
        if not match:
            raise self.fail("an option value")
        self.pos = match.end()
        token = match.group()
        if token.startswith('"'):
            return json.loads(token)
        try:
            return tomllib.loads(f"v = {token}")["v"]
        except tomllib.TOMLDecodeError:
            return token  # a bare word is a string


def from_text(text: str) -> list:
    parser = _TextParser(text)
    items = parser.items("")
    if parser.peek():
        raise parser.fail("',' or the end")
    return items


# ---------------------------------------------------------------------------------------------
# TOML form


def to_toml(items: Sequence[str | dict]) -> str:
    lines = ["passes = ["] + [f"    {_toml_value(item)}," for item in items] + ["]"]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _scalar_text(value)


def from_toml(text: str, source: str = "<string>") -> list:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: malformed pipeline TOML: {exc}") from exc
    if "passes" not in data:
        raise SpecError(f"{source}: a pipeline file needs a top-level `passes = [...]` list")
    unknown = set(data) - {"passes", "description"}
    if unknown:
        raise SpecError(f"{source}: unknown top-level key(s) {sorted(unknown)}; a pipeline file has `passes` and optionally `description`")
    items = data["passes"]
    try:
        normalize(items)
    except SpecError as exc:
        line = _line_naming(text, exc)
        raise SpecError(f"{source}{f' line {line}' if line else ''}: {exc}") from exc
    return items


def _line_naming(text: str, exc: SpecError) -> int | None:
    """Best effort: the first line of the file that holds a quoted name from the message."""
    for name in re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", str(exc)):
        for number, line in enumerate(text.splitlines(), start=1):
            if re.search(rf"\b{name}\b", line):
                return number
    return None


def load_file(path: str | Path) -> list:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read pipeline file {path}: {exc.strerror}") from exc
    return from_toml(text, str(path))


def named_pipelines() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PIPELINES_DIR.glob("*.toml"))}


def resolve(pipeline: Pass | Sequence | str) -> Pipeline:
    """A Pipeline from a Pass, a list, a named pipeline, a TOML file path or a one-line text."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, Pass):
        return Pipeline([pipeline])
    if isinstance(pipeline, (str, Path)):
        text = str(pipeline)
        named = named_pipelines()
        if text in named:
            return build_pipeline(load_file(named[text]))
        if text.endswith(".toml") or Path(text).is_file():
            return build_pipeline(load_file(text))
        return build_pipeline(from_text(text))
    return build_pipeline(pipeline)
