"""Start a real `lakegate demo` server for the interop tests and hand out its address."""

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATIENTS = 500


def lakegate_binary() -> str:
    explicit = os.environ.get("LAKEGATE_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        candidate = ROOT / "target" / profile / "lakegate"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("build the server first: cargo build --bin lakegate (or set LAKEGATE_BIN)")


def start_lakegate(lake: Path, patients: int = PATIENTS, extra=()):
    """Start `lakegate demo` on a free port; return (process, "127.0.0.1:PORT")."""
    proc = subprocess.Popen(
        [lakegate_binary(), "demo", "--patients", str(patients), "--lake", str(lake), "--port", "0",
         *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"lakegate exited early: {proc.stderr.read()}")
            continue
        match = re.search(r"grpc(?:\+tls)?://(\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("lakegate did not report its address in time")


def stop_lakegate(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server():
    """Yield the server's address ("127.0.0.1:PORT") and stop it afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_lakegate(Path(tmp) / "lake")
        try:
            yield address
        finally:
            stop_lakegate(proc)
