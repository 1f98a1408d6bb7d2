"""The PNG report of a context set: each stratum's share of the population and of the sample.

Under proportional allocation the two bars match (up to rounding and floors); under equal or
Neyman allocation the gap is the oversampling that the weights undo. Rendered with matplotlib's
Agg canvas on a private ``Figure`` (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io

import numpy as np

from ._design import ContextSet

MAX_BARS = 40  # beyond this, the smallest strata are pooled into one "other" bar


def report_shares(cs: ContextSet) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What the report draws: the bars' names, and each one's share of the population and of
    the sample (beyond ``MAX_BARS`` strata, the smallest are pooled into one bar)."""
    d = cs.design
    names = [s.name for s in d.strata_detail]
    pop = np.array([s.population_size for s in d.strata_detail], dtype=np.float64)
    smp = np.array([s.sample_size for s in d.strata_detail], dtype=np.float64)
    if len(names) > MAX_BARS:
        keep = np.sort(np.argsort(-pop, kind="stable")[: MAX_BARS - 1])
        rest = np.setdiff1d(np.arange(len(names)), keep)
        names = [names[i] for i in keep] + [f"({rest.size} other strata)"]
        pop = np.append(pop[keep], pop[rest].sum())
        smp = np.append(smp[keep], smp[rest].sum())
    return names, pop / max(pop.sum(), 1.0), smp / max(smp.sum(), 1.0)


def render_report(cs: ContextSet) -> bytes:
    """Render the population-vs-sample stratum shares of ``cs`` as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    d = cs.design
    names, pop_share, smp_share = report_shares(cs)
    height_in = 1.6 + 0.32 * len(names)
    fig = Figure(figsize=(9.0, height_in), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    ax.barh(y - 0.2, pop_share, height=0.4, label=f"population (N={d.population_size:,})",
            color="#4c72b0")
    ax.barh(y + 0.2, smp_share, height=0.4, label=f"sample (n={d.sample_size:,})",
            color="#dd8452")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share")
    ax.xaxis.set_major_formatter("{x:.0%}")
    ax.set_title(
        f"{d.selection_id}: {d.allocation_used} allocation"
        + (f" (asked {d.allocation})" if d.allocation_used != d.allocation else ""),
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
