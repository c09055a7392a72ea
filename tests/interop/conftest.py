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


@pytest.fixture(scope="session")
def server():
    """Yield the server's address ("127.0.0.1:PORT") and stop it afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        proc = subprocess.Popen(
            [lakegate_binary(), "demo", "--patients", str(PATIENTS), "--lake", str(lake), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        address = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                if proc.poll() is not None:
                    raise RuntimeError(f"lakegate exited early: {proc.stderr.read()}")
                continue
            match = re.search(r"grpc://(\S+)", line)
            if match:
                address = match.group(1)
                break
        if address is None:
            proc.kill()
            raise RuntimeError("lakegate did not report its address in time")
        try:
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
