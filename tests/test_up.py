"""``timetravel up`` starts the stack on loopback, answers /healthz, and stops cleanly on SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def _wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if _get(url)[0] == 200:
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow
def test_up_with_sim_starts_everything_and_stops_on_sigint(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("ingest", "api", "sim")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ttstore._cli import run; run()", "up",
         "--store", str(tmp_path / "store"), "--ingest-port", str(ports["ingest"]),
         "--api-port", str(ports["api"]), "--with-sim", "--sim-port", str(ports["sim"]),
         "--sim-members", "200", "--now", "2026-11-01T00:00:00Z"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for raw in proc.stdout:  # up says it is ready once every part has started
            lines.append(raw.decode())
            if raw.startswith(b"Press Ctrl-C"):
                break
        for name in ("ingest", "api", "sim"):
            assert _wait(f"http://127.0.0.1:{ports[name]}/healthz", proc), name
        status, body = _get(f"http://127.0.0.1:{ports['api']}/v1/catalog")
        assert status == 200
        # The panel was selected from the simulated population before the scheduler started.
        assert json.loads(body)["selections"], body
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    text = "".join(lines) + out.decode()
    assert f"http://127.0.0.1:{ports['api']}" in text and "stopping" in text
    for port in ports.values():  # every child is gone: nothing answers any more
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 0
