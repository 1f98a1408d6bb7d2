"""What a benchmark reports: a figure, its baseline from the same run, and its target."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Op = Literal[">=", "<="]


@dataclass(frozen=True)
class Target:
    """A goal for one figure: on its value (``value >= 3e6``) or on its ratio to the baseline
    measured in the same run (``value / baseline >= 3``).

    Args:
        op: ``">="`` (more is better) or ``"<="`` (less is better).
        threshold: the bound.
        on: ``"value"`` or ``"ratio"``.
        stretch: an optional, more ambitious bound on the value (reported, not required).
    """

    op: Op
    threshold: float
    on: Literal["value", "ratio"] = "value"
    stretch: float | None = None

    def met(self, value: float, ratio: float | None) -> bool | None:
        """Whether the target is met; None when it cannot be judged (no baseline)."""
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x >= self.threshold if self.op == ">=" else x <= self.threshold

    def stretch_met(self, value: float) -> bool | None:
        if self.stretch is None or math.isnan(value):
            return None
        return value >= self.stretch if self.op == ">=" else value <= self.stretch

    def describe(self, unit: str) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        if self.on == "ratio":
            text = f"{sign} {self.threshold:g}× baseline"
        else:
            text = f"{sign} {fmt_value(self.threshold, unit)}"
        if self.stretch is not None:
            text += f" (stretch {sign} {fmt_value(self.stretch, unit)})"
        return text


def at_least(threshold: float, *, stretch: float | None = None) -> Target:
    return Target(">=", threshold, "value", stretch)


def at_most(threshold: float, *, stretch: float | None = None) -> Target:
    return Target("<=", threshold, "value", stretch)


def ratio_at_least(threshold: float, *, stretch: float | None = None) -> Target:
    return Target(">=", threshold, "ratio", stretch)


def ratio_at_most(threshold: float, *, stretch: float | None = None) -> Target:
    return Target("<=", threshold, "ratio", stretch)


@dataclass(frozen=True)
class Result:
    """One measured figure.

    Args:
        metric: what was measured, specific enough to stand alone in the table.
        value: the figure, in ``unit``.
        unit: such as ``"facts/s"``, ``"µs"``, ``"ms"``, ``"s"``, ``"MB"``.
        baseline: the same measurement of a baseline, same process and data, same unit.
        baseline_name: what the baseline is (``"JSON lines"``, ``"DuckDB"``).
        target: the goal, if the issue sets one.
        note: anything a reader needs to interpret the figure (sizes, caveats).
    """

    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``value / baseline``, when there is a baseline."""
        if self.baseline is None or self.baseline == 0 or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value, self.ratio)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["met"] = self.met
        if self.target is not None:
            d["target"] = {**asdict(self.target), "text": self.target.describe(self.unit),
                           "stretch_met": self.target.stretch_met(self.value)}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        t = d.get("target")
        target = None if t is None else Target(t["op"], t["threshold"], t["on"], t["stretch"])
        return cls(metric=d["metric"], value=float(d["value"]), unit=d["unit"],
                   baseline=d.get("baseline"), baseline_name=d.get("baseline_name"),
                   target=target, note=d.get("note", ""))


_SI = ((1e9, "G"), (1e6, "M"), (1e3, "k"))


def fmt_value(x: float | None, unit: str) -> str:
    """``3.41M facts/s``, ``4.2 µs``, ``0.93 s``: compact, with the unit."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "n/a"
    if unit.endswith("/s") or unit in ("facts", "rows", "contexts", "requests"):
        for scale, prefix in _SI:
            if abs(x) >= scale:
                return f"{x / scale:.3g}{prefix} {unit}"
    if abs(x) >= 100:
        return f"{x:,.0f} {unit}"
    return f"{x:.3g} {unit}"
