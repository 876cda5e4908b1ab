"""Every code sample in README.md and docs/*.md runs here, and the reference pages cover the registries.

Fenced blocks, by language (the first word of the fence's info string):

- ``python``: run in order, one namespace per Markdown file, in a fresh temporary working directory
  per file (shared with the file's shell commands, so a later block can use what an earlier one
  wrote);
- ``sh`` / ``console`` / ``bash``: each line starting with ``$ `` is a command (``\\`` continues it;
  other lines are output, not checked). ``fxopt ...`` runs in this process through
  ``fxopt.cli.main``; anything else runs with bash, ``.venv/bin`` first on PATH. Each must exit 0;
- ``toml``: parsed;
- any block with ``file=NAME`` in its info string (```` ```toml file=board.toml ````,
  ```` ```c file=app.c ````) is written to NAME in the working directory instead of being run
  (TOML and Python are still parsed), for the commands after it.

Words after the language mark what a block needs (docs/index.md explains them to writers):
``cross`` runs only where the cross toolchains and qemu-user are installed (skipped otherwise,
like the test suite's cross tier); ``slow`` runs only in the slow tier (``pytest -m slow``);
``device`` (a GPU, a board, a device farm) and ``norun`` (installs, the test suite itself, tools
fxopt does not install) never run: Python is compiled and ``fxopt`` commands are parsed with the
real argument parser, so they still fail when an option is renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import linecache
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# as tests/conftest.py's cross tier: Linux cross toolchains, qemu-user, and the bare-metal RISC-V
# toolchain with qemu-system-riscv32 (microcontroller builds)
CROSS_TOOLS = ("aarch64-linux-gnu-g++", "riscv64-linux-gnu-g++", "qemu-aarch64", "qemu-riscv64",
               "riscv64-unknown-elf-gcc", "qemu-system-riscv32")
TAGS = {"cross", "slow", "device", "norun"}
RUNNABLE = {"python", "sh", "console", "bash", "toml"}
_FENCE = re.compile(r"^(\s*)```(.*)$")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # line of the opening fence, 1-based
    language: str
    tags: frozenset[str]
    options: dict[str, str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, info = match.group(1), match.group(2).split()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start}: code fence never closed")
        i += 1
        language = info[0] if info else ""
        words = info[1:]
        options = dict(w.split("=", 1) for w in words if "=" in w)
        tags = frozenset(w for w in words if "=" not in w)
        found.append(Block(page, start, language, tags, options, "\n".join(body) + "\n"))
    return found


def commands(block: Block) -> list[str]:
    """The ``$ `` commands of a shell block, continuation lines joined."""
    result, current = [], None
    for line in block.text.splitlines():
        if current is not None:
            current += " " + line.strip()
        elif line.startswith("$ "):
            current = line[2:].strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            result.append(current)
            current = None
    assert current is None, f"{block.where}: a command ends with a '\\' continuation"
    return result


def cross_missing() -> list[str]:
    """Missing cross tools; none when FXOPT_REQUIRE_CROSS=1 (`make test`), where a missing tool fails."""
    if os.environ.get("FXOPT_REQUIRE_CROSS") == "1":
        return []
    return [tool for tool in CROSS_TOOLS if shutil.which(tool) is None]


def _split(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def check_syntax(block: Block) -> None:
    """What a block that does not run can still be checked for."""
    if block.language == "python":
        compile(block.text, block.where, "exec")
    elif block.language in ("sh", "console", "bash"):
        from fxopt.cli import make_parser

        for command in commands(block):
            _, words = _split(command)
            if words and words[0] == "fxopt":
                try:
                    with contextlib.redirect_stderr(io.StringIO()) as err:
                        make_parser().parse_args(words[1:])
                except SystemExit as exc:  # 0 after --help
                    if exc.code not in (0, None):
                        raise AssertionError(f"{block.where}: `{command}` does not parse: {err.getvalue().strip()}") from exc
    elif block.language == "toml":
        tomllib.loads(block.text)


def run_command(block: Block, command: str) -> None:
    env, words = _split(command)
    start = time.perf_counter()
    if words and words[0] == "fxopt" and not any(c in command for c in "|><;&"):
        from fxopt.cli import main

        saved = {key: os.environ.get(key) for key in env}
        levels = {name: logging.getLogger(name).level for name in ("", "fxopt", "fxopt.progress")}
        os.environ.update(env)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(words[1:])
                except SystemExit as exc:  # argparse
                    code = exc.code
        finally:  # --quiet / --verbose set logger levels: they must not leak into later samples
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        output = out.getvalue() + err.getvalue()
    else:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PATH": path})
        code, output = proc.returncode, proc.stdout + proc.stderr
    print(f"$ {command}  ({time.perf_counter() - start:.1f} s)\n{output}")
    assert code == 0, f"{block.where}: `{command}` exited {code}:\n{output[-3000:]}"


def run_page(page: Path, slow: bool) -> None:
    """Run every block of ``page`` that this tier runs; the caller has chdir'ed to a fresh directory."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    missing = cross_missing()
    for block in blocks(page):
        unknown = block.tags - TAGS
        assert not unknown, f"{block.where}: unknown fence tag(s) {sorted(unknown)}; known: {sorted(TAGS)}"
        if "file" in block.options:  # any language: a file for the commands after it
            check_syntax(block)
            Path(block.options["file"]).write_text(block.text)
            continue
        if block.language not in RUNNABLE:
            continue
        check_syntax(block)
        if block.tags & {"device", "norun"} or ("slow" in block.tags and not slow):
            continue
        if "cross" in block.tags and missing:
            print(f"{block.where}: skipped, cross tier needs {', '.join(missing)}")
            continue
        start = time.perf_counter()
        if block.language == "python":
            # the page's own lines in tracebacks: "docs/passes.md:120" is the block's opening fence
            linecache.cache[block.where] = (len(block.text), None, block.text.splitlines(True), block.where)
            exec(compile(block.text, block.where, "exec"), namespace)
        elif block.language in ("sh", "console", "bash"):
            found = commands(block)
            assert found, (f"{block.where}: a shell block without `$ ` commands; prefix each command with `$ `, "
                           "or use ```text for output")
            for command in found:
                run_command(block, command)
        print(f"{block.where}: {block.language} {' '.join(sorted(block.tags))} ran in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_samples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page, slow=False)


SLOW_PAGES = [p for p in PAGES if any("slow" in b.tags for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=[str(p.relative_to(ROOT)) for p in SLOW_PAGES])
def test_slow_samples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page, slow=True)


# --------------------------------------------------------------------------------------------
# The reference pages cover the registries


def _gen_passes():
    spec = importlib.util.spec_from_file_location("gen_passes", DOCS / "gen_passes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passes_page_is_fresh_and_complete():
    """docs/passes.md has a section with an example for every registered pass, and its
    generated parts (summary, options, docstring algebra) match the code."""
    gen = _gen_passes()
    text = (DOCS / "passes.md").read_text()
    assert gen.render(text) == text, ("docs/passes.md is stale: a pass or its docstring changed. Regenerate it with "
                                      "`.venv/bin/python docs/gen_passes.py` and review the diff")
    sections = gen.sections(text)
    for name in gen.builtin_passes():
        assert name in sections, f"docs/passes.md has no section for pass {name!r}: run docs/gen_passes.py, then write its example"
        assert "```python" in sections[name], f"docs/passes.md: pass {name!r} has no ```python example"


def test_every_target_board_key_and_named_pipeline_is_documented():
    from fxopt.spec import named_pipelines
    from fxopt.targets import list_targets

    targets = (DOCS / "targets.md").read_text()
    missing = [t.name for t in list_targets() if f"`{t.name}`" not in targets]
    assert not missing, f"docs/targets.md does not mention target(s) {missing} (write each as `name`)"
    from fxopt.targets.boards import _ALLOWED

    missing = sorted(key for key in _ALLOWED if f"`{key}`" not in targets and f"`[{key}]`" not in targets)
    assert not missing, f"docs/targets.md does not mention board file key(s) {missing}"
    concepts = (DOCS / "concepts.md").read_text()
    missing = [name for name in named_pipelines() if f"`{name}`" not in concepts]
    assert not missing, f"docs/concepts.md does not mention named pipeline(s) {missing}"


def test_every_cli_command_is_documented():
    from fxopt.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = "\n".join(p.read_text() for p in PAGES)
    missing = [name for name in sub.choices if f"fxopt {name}" not in text]
    assert not missing, f"no page shows `fxopt {missing[0]}`" if missing else ""


def test_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_blocks_are_well_formed():
    """Fence tags are known, and shell blocks that are not output hold `$ ` commands."""
    for page in PAGES:
        for block in blocks(page):
            unknown = block.tags - TAGS
            assert not unknown, f"{block.where}: unknown fence tag(s) {sorted(unknown)}; known: {sorted(TAGS)}"
            if block.language in ("sh", "console", "bash"):
                assert commands(block), f"{block.where}: shell block without `$ ` commands (use ```text for output)"
            if block.language in ("python", "sh", "console", "bash", "toml"):
                check_syntax(block)
