"""The audit trail from the outside: erin reads it over ADBC, nobody else can; a server killed
with SIGKILL in mid-stream leaves a trail that verifies and holds the interrupted query;
`lakegate audit verify` names the first tampered position."""

import signal
import subprocess
import tempfile
from pathlib import Path

import adbc_driver_manager
import pyarrow.flight as flight
import pytest

from conftest import lakegate_binary, start_lakegate, stop_lakegate
from test_adbc import connect
from test_pyarrow_flight import client_for, statement_query


def test_erin_reads_the_trail_and_alice_cannot(server):
    alice = connect(server, "alice")
    cur = alice.cursor()
    cur.execute("SELECT count(*) AS interop_audit_probe FROM clinical.patients WHERE ssn = '123-45-6789'")
    cur.fetch_arrow_table()
    with pytest.raises(adbc_driver_manager.Error) as err:
        cur.execute("SELECT count(*) FROM audit.events")
    assert "not found" in str(err.value)
    alice.close()

    erin = connect(server, "erin")
    cur = erin.cursor()
    cur.execute(
        "SELECT kind, outcome, fingerprint, datasets FROM audit.events "
        "WHERE principal = 'alice' AND fingerprint LIKE '%interop_audit_probe%' ORDER BY seq"
    )
    table = cur.fetch_arrow_table().to_pylist()
    kinds = [r["kind"] for r in table]
    assert "plan" in kinds and "query" in kinds, kinds
    assert all("123-45-6789" not in r["fingerprint"] for r in table)
    assert {r["datasets"] for r in table} == {"clinical.patients"}
    # erin sees nothing clinical.
    with pytest.raises(adbc_driver_manager.Error):
        cur.execute("SELECT count(*) FROM clinical.patients")
    erin.close()


def verify(lake):
    return subprocess.run(
        [lakegate_binary(), "audit", "verify", "--lake", str(lake)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kill_9_mid_stream_leaves_a_verifiable_trail_with_the_query():
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        proc, address = start_lakegate(lake, patients=200)
        try:
            client, options = client_for(address, "alice")
            # A cross join streams far longer than the test waits.
            sql = ("SELECT a.observation_id AS crash_probe FROM clinical.observations a, "
                   "clinical.observations b")
            info = client.get_flight_info(flight.FlightDescriptor.for_command(
                statement_query(sql)), options)
            reader = client.do_get(info.endpoints[0].ticket, options)
            first = reader.read_chunk()
            assert first.data.num_rows > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()

        result = verify(lake)
        assert result.returncode == 0, result.stderr
        assert "audit trail intact" in result.stdout

        # The chain continues after the crash, and the interrupted query is in it.
        proc, address = start_lakegate(lake, patients=200)
        try:
            erin = connect(address, "erin")
            cur = erin.cursor()
            cur.execute(
                "SELECT kind, principal FROM audit.events WHERE fingerprint LIKE '%crash_probe%'"
            )
            rows = cur.fetch_arrow_table().to_pylist()
            erin.close()
        finally:
            stop_lakegate(proc)
        assert {"kind": "query", "principal": "alice"} in rows, rows
        result = verify(lake)
        assert result.returncode == 0, result.stderr


def test_verify_names_the_first_tampered_position():
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        proc, address = start_lakegate(lake, patients=200)
        try:
            alice = connect(address, "alice")
            cur = alice.cursor()
            for _ in range(3):
                cur.execute("SELECT count(*) FROM clinical.patients")
                cur.fetch_arrow_table()
            alice.close()
        finally:
            stop_lakegate(proc)
        assert verify(lake).returncode == 0

        segments = sorted((lake / "audit" / "events").iterdir())
        victim = segments[len(segments) // 2]
        text = victim.read_text()
        first = text.splitlines()[0]
        seq = first.split('"seq":')[1].split(",")[0]
        victim.write_text(text.replace('"outcome":"', '"outcome":"x', 1))
        result = verify(lake)
        assert result.returncode != 0
        assert f"seq {seq}" in result.stderr, result.stderr
        assert "modified" in result.stderr, result.stderr


def test_a_lake_never_served_has_an_empty_intact_trail():
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp) / "lake"
        subprocess.run(
            [lakegate_binary(), "demo", "--patients", "100", "--lake", str(lake), "--build-only"],
            check=True, capture_output=True, timeout=120,
        )
        result = verify(lake)
        assert result.returncode == 0, result.stderr
        assert "audit trail empty" in result.stdout
        # Once anything is in the audit zone, a trusted key is required to vouch for it.
        (lake / "audit" / "events").mkdir(parents=True)
        (lake / "audit" / "events" / "00000000000000000000.jsonl").write_text("{}\n")
        result = verify(lake)
        assert result.returncode != 0
        assert "no trusted public key" in result.stderr
