"""The CLI surface: every command has --help mentioning --store; user errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ttstore._cli import build_parser, main


def _commands() -> list[list[str]]:
    out: list[list[str]] = []
    parser = build_parser()

    def walk(p, prefix):  # type: ignore[no-untyped-def]
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            out.append(prefix)
            return
        for name, child in subs[0].choices.items():
            walk(child, [*prefix, name])

    walk(parser, [])
    return out


def test_every_command_has_help_with_store(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands()
    assert ["demo"] in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "--store" in capsys.readouterr().out, cmd


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", "from ttstore._cli import run; run()", "demo",
         "--store", str(tmp_path / "s"), "--members", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "--members" in r.stderr



def test_options_must_be_spelled_out(capsys: pytest.CaptureFixture[str]) -> None:
    """No command takes an abbreviated option (``--cache`` for ``--cache-bytes``)."""
    for argv in (["api", "serve", "--no-auth", "--cache", "1"],
                 ["snapshot", "run", "--sel", "x"],
                 ["demo", "--memb", "10"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err, argv
    ns = build_parser().parse_args(["api", "serve", "--no-auth", "--cache-bytes", "1"])
    assert ns.cache_bytes == 1
