"""What a run of fxopt did: one row per pass, plus verification and build figures.

The report records the pipeline spec that actually ran, as one line of text, so any build can
be replayed from it. It prints as a table and saves as JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PassRow:
    name: str
    changed: bool
    stats: dict[str, int]
    declines: dict[str, int]  # "rule: reason" -> count
    before: dict[str, int | None]  # nodes, params, macs
    after: dict[str, int | None]
    seconds: float
    iteration: int | None = None
    exact: bool = True


@dataclass
class Report:
    model: str = ""
    capture: str = "fx"  # how the graph was captured: "fx" or "export"
    capture_note: str = ""  # why the auto capture fell back to torch.export
    pipeline: str = ""  # the spec that ran, as one-line text
    passes: list[PassRow] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    build: dict[str, Any] | None = None

    def add_pass(self, p, result, before: dict, after: dict, iteration: int | None) -> None:
        declines = Counter(f"{d.rule}: {d.reason}" for d in result.declines)
        self.passes.append(PassRow(
            name=p.name, changed=result.changed, stats=dict(result.stats), declines=dict(declines),
            before=before, after=after, seconds=result.seconds, iteration=iteration, exact=p.exact,
        ))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        rows = [PassRow(**row) for row in data.get("passes", [])]
        return cls(**{**data, "passes": rows})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def to_text(self) -> str:
        lines = [f"model: {self.model}   capture: {self.capture}" + (f" ({self.capture_note})" if self.capture_note else ""),
                 f"pipeline: {self.pipeline or '(none)'}"]
        header = ("pass", "changed", "stats", "nodes", "params", "MACs", "time")
        rows = [header]
        for row in self.passes:
            name = row.name + (f"#{row.iteration}" if row.iteration else "") + ("" if row.exact else " (lossy)")
            stats = ", ".join(f"{k}={v}" for k, v in row.stats.items()) or "-"
            rows.append((
                name, "yes" if row.changed else "no", stats,
                _arrow(row.before["nodes"], row.after["nodes"]),
                _arrow(row.before["params"], row.after["params"], _si),
                _arrow(row.before["macs"], row.after["macs"], _si),
                f"{row.seconds * 1000:.1f} ms",
            ))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        for index, r in enumerate(rows):
            lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        for row in self.passes:
            for decline, count in row.declines.items():
                lines.append(f"  {row.name} declined {count}x: {decline}")
        if self.verification:
            v = self.verification
            status = "ok" if v.get("ok") else "FAILED"
            lines.append(f"verification vs {v.get('against', 'eager')}: {status}, max abs error "
                         f"{v.get('max_abs_error', 0):.3g}, relative to output scale {v.get('max_rel_error', 0):.3g}")
        if self.build:
            build = dict(self.build)
            check = build.pop("check", None)
            tuning = build.pop("tuning", None)
            lines.append("build: " + ", ".join(f"{k}={_fmt(v)}" for k, v in build.items()))
            if tuning:
                lines.append(_tuning_line(tuning))
            if check is not None and check.get("ok") is None:
                lines.append(f"build check vs eager: not run ({check.get('skipped', 'skipped')})")
            elif check is not None:
                lines.append(f"build check vs eager, run {check.get('ran', 'natively')}: {'ok' if check['ok'] else 'FAILED'}, "
                             f"max abs error {check['max_abs_error']:.3g}, relative to output scale {check['max_rel_error']:.3g}")
        return "\n".join(lines)


def _tuning_line(t: dict[str, Any]) -> str:
    """``tuning: 64 trials measured for 2 of 3 tasks (1 from the database) in 41.2 s; 3 schedules
    applied from DIR``."""
    if "tasks" not in t:  # the build did not report what tuning did
        return f"tuning: budget {t.get('budget')} trials, database {t.get('database')}"
    text = (f"tuning: {t.get('measured', 0)} trials measured for {t.get('tuned', 0)} of {t['tasks']} tasks "
            f"({t.get('reused', 0)} from the database) in {_fmt(float(t.get('seconds', 0.0)))} s")
    if t.get("failed"):
        text += f", {t['failed']} failed"
    if t.get("applied") is not None:
        text += f"; {t['applied']} schedules applied"
    text += f" from {t.get('database')}" + (f" ({t['target_key']})" if t.get("target_key") else "")
    return text + (" (interrupted)" if t.get("interrupted") else "")


def _si(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _arrow(before: int | None, after: int | None, fmt=str) -> str:
    if before is None or after is None:
        return "?"
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
