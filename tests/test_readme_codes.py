"""Every error code the product can answer with is listed in the README (its Errors section), so
an operator can look up any ``code`` a response or the CLI shows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("ttstore", "factlog", "snapshotter", "timetravel_api")
#: ``code = "..."`` on an error class, or ``code="..."`` where one is raised or rejected
CODE = re.compile(r'\bcode\s*=\s*"([a-z_]+)"')


def _codes() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for m in CODE.finditer(path.read_text()):
                found.setdefault(m.group(1), []).append(str(path.relative_to(ROOT)))
    return found


def test_every_error_code_is_in_the_readme() -> None:
    codes = _codes()
    assert {"unauthorized", "too_many_rows", "object_exists", "missing_field"} <= set(codes)
    readme = (ROOT / "README.md").read_text()
    errors = readme[readme.index("## Errors"):]
    missing = {c: where for c, where in codes.items() if f"`{c}`" not in errors}
    assert not missing, f"error codes not listed under the README's Errors section: {missing}"
