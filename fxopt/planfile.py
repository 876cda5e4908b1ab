"""Plan files (depth plans, prune plans): JSON written complete or not at all, read back with
errors that name the file and say how to write one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxopt.errors import InputError


def save(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(path)
    return path


def load(path: str | Path, kind: str, file_format: str, written_by: str) -> dict[str, Any]:
    """The JSON object in ``path``, checked to be a ``kind`` plan of ``file_format``;
    ``written_by`` says what writes one (for the errors)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{kind} plan {path} does not exist (write one with {written_by})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{kind} plan {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != file_format:
        raise InputError(f"{kind} plan {path}: 'format' must be {file_format!r} (a plan written by {written_by})")
    return data
