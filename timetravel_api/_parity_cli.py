"""``timetravel parity``: the online/offline parity report over the logged served features."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ttstore import InvalidInput

from ._parity import SERVED_FEATURES, ParityReport, parity_report
from ._repo import FeatureRepo


def register_cli(sub: Any) -> None:
    """Add ``timetravel parity`` to the dispatcher."""
    from ttstore import add_common_options  # noqa: PLC0415

    p = sub.add_parser(
        "parity", help="check online/offline parity of the feature encoders",
        description="Recompute every served feature value logged to FACT_TYPE at its request's "
                    "logged_at and compare with what was served (SPEC §5). Exits 1 when a "
                    "fact-fed encoder mismatches.")
    add_common_options(p)
    p.add_argument("--fact-type", default=SERVED_FEATURES,
                   help=f"where services logged their served values (default {SERVED_FEATURES})")
    p.add_argument("--since", metavar="RFC3339", help="only requests logged at or after this")
    p.add_argument("--until", metavar="RFC3339", help="only requests logged at or before this")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--show", type=int, default=10, metavar="N",
                   help="mismatches to list in the text report (default 10)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not args.repo:
        raise InvalidInput("parity needs the feature repo: --repo PATH or TIMETRAVEL_REPO",
                           field="repo")
    repo = FeatureRepo.load(args.repo)
    report = parity_report(args.store, repo, fact_type=args.fact_type, since=args.since,
                           until=args.until)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report, show=args.show))
    return 0 if report.ok else 1


def render(report: ParityReport, *, show: int = 10) -> str:
    """The report as a few lines of text."""
    lines = [f"requests: {report.requests}"]
    fact_fed = report.fact_fed_mismatches
    lines.append(f"fact-fed mismatches: {len(fact_fed)}"
                 + ("" if fact_fed else " (parity holds)"))
    for name in sorted(report.compared):
        n_bad = sum(1 for m in report.mismatches if m.feature == name)
        lines.append(f"  {name} [{report.versions.get(name, '?')}]: "
                     f"{report.compared[name]} compared, {n_bad} differ")
    for enc, by_service in sorted(report.staleness.items()):
        for service, st in sorted(by_service.items()):
            if st.rows:
                ages = f"p50 {st.p50_s:.0f} s, p90 {st.p90_s:.0f} s, max {st.max_s:.0f} s"
            else:
                ages = "no snapshot rows"
            statuses = ", ".join(f"{k} {v}" for k, v in sorted(st.statuses.items()))
            lines.append(f"  staleness {enc} <- {service}: {ages} ({statuses})")
    for name, n in sorted(report.version_skew.items()):
        lines.append(f"  {name}: {n} request(s) served by another version, not compared")
    for name, n in sorted(report.unknown.items()):
        lines.append(f"  {name}: not an encoder of the repo ({n} request(s))")
    for m in fact_fed[:show]:
        lines.append(f"  mismatch {m.feature} request {m.request_id} entity {m.entity}: "
                     f"online {m.online!r}, offline {m.offline!r} ({m.offline_status})")
    return "\n".join(lines) + "\n"
