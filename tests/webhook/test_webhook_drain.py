"""Graceful drain for rollouts, against the real process: SIGTERM marks the server not ready at once, it keeps
answering admissions for --drain-duration, then exits 0; a second signal stops it at once."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
from test_webhook_server import Server, post
from webhook_fixtures import hello_pod, review_body


def _start(tmp: Path, drain: str) -> tuple[Server, Path]:
    bundle = tmp / "bundle.pem"
    srv = Server(tmp, "--ca-bundle-out", str(bundle), "--self-signed-dir", str(tmp / "tls"),
                 "--drain-duration", drain)
    srv.wait_ready(bundle)
    return srv, bundle


def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    srv, bundle = _start(tmp_path, "2s")
    try:
        with srv.client(bundle) as c:   # a keep-alive client, opened before the signal
            assert c.get("/readyz").status_code == 200
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            seen_503 = answered = 0
            while time.monotonic() - t0 < 1.5:
                if c.get("/readyz").status_code == 503:
                    seen_503 += 1
                mon = httpx.get(f"http://127.0.0.1:{srv.mon_port}/readyz", timeout=5)
                assert mon.status_code == 503, "the monitoring port's readiness must follow"
                r = post(c, review_body(hello_pod()))
                assert r.status_code == 200 and r.json()["response"]["allowed"] is True
                answered += 1
                # a new connection is still accepted during the drain
                with srv.client(bundle) as fresh:
                    assert post(fresh, review_body(hello_pod())).status_code == 200
                time.sleep(0.1)
            assert seen_503 >= 5 and answered >= 5
            assert srv.proc.poll() is None, "still serving during the drain"
        assert srv.proc.wait(10) == 0, srv.logs()
        assert time.monotonic() - t0 >= 1.9, "stopped before the drain duration"
        assert "Traceback" not in srv.logs()
    finally:
        srv.stop()


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    srv, bundle = _start(tmp_path, "60s")
    try:
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None
        with srv.client(bundle) as c:
            assert c.get("/readyz").status_code == 503
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(5)
        assert time.monotonic() - t0 < 3
    finally:
        srv.stop()


def test_bad_drain_duration_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from test_webhook_server import ROOT
    r = subprocess.run([sys.executable, "-m", "controlplane", "--ca-port", "0", "--drain-duration", "5 parsecs"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--drain-duration" in r.stderr and "Traceback" not in r.stderr
