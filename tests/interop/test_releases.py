"""Releases as a training team and a compliance officer meet them: alice makes a release with
the CLI, it is refused by the risk gate until suppressed, erin approves it, alice reads it over
ADBC into pyarrow (pseudonyms joining her live tables), dave cannot, the copied file opens in
no Parquet reader, `release verify` names a changed file, and `lifecycle`/`hold` answer."""

import subprocess
from pathlib import Path

import adbc_driver_manager
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import lakegate_binary, start_lakegate, stop_lakegate
from test_adbc import connect
from test_pyarrow_flight import client_for

PATIENTS = 800


def _lakegate(*args):
    return subprocess.run(
        [lakegate_binary(), *args], capture_output=True, text=True, timeout=300
    )


def _scalar(address, user, sql):
    conn = connect(address, user)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    folder = tmp_path_factory.mktemp("releases")
    lake = folder / "lake"
    built = _lakegate("demo", "--patients", str(PATIENTS), "--lake", str(lake), "--build-only")
    assert built.returncode == 0, built.stderr
    return lake


def test_a_release_from_creation_to_training_read(lake: Path, tmp_path: Path):
    query = tmp_path / "cohort.sql"
    query.write_text(
        "SELECT e.patient_id, e.start_time, e.encounter_class, e.total_cost, p.sex\n"
        "FROM clinical.encounters e JOIN clinical.patients p ON e.patient_id = p.patient_id;\n"
    )
    create = ["release", "create", "--lake", str(lake), "--name", "onc-1", "--as", "alice",
              "--query", str(query)]
    refused = _lakegate(*create)
    assert refused.returncode != 0
    assert "rule: release-k-anonymity" in refused.stderr
    assert "records at risk" in refused.stderr
    made = _lakegate(*create, "--suppress")
    assert made.returncode == 0, made.stderr
    assert "pending approval" in made.stdout and "suppressed" in made.stdout

    by_creator = _lakegate("release", "approve", "onc-1", "--lake", str(lake), "--as", "alice")
    assert by_creator.returncode != 0 and "release_approver" in by_creator.stderr
    approved = _lakegate("release", "approve", "onc-1", "--lake", str(lake), "--as", "erin")
    assert approved.returncode == 0, approved.stderr
    listed = _lakegate("release", "list", "--lake", str(lake))
    assert "onc-1  approved by erin" in listed.stdout

    proc, address = start_lakegate(lake, PATIENTS)
    try:
        conn = connect(address, "alice")
        cur = conn.cursor()
        cur.execute('SELECT * FROM releases."onc-1".cohort')
        table = cur.fetch_arrow_table()
        assert table.num_rows > 0
        assert table.column_names == ["patient_id", "start_time", "encounter_class",
                                      "total_cost", "sex"]
        # Pseudonyms of her project: they join her live tables.
        cur.execute(
            'SELECT count(*) FROM releases."onc-1".cohort r '
            "JOIN clinical.patients p ON r.patient_id = p.patient_id"
        )
        assert cur.fetchone()[0] == table.num_rows
        conn.close()
        with pytest.raises(adbc_driver_manager.Error) as refused:
            _scalar(address, "dave", 'SELECT count(*) FROM releases."onc-1".cohort')
        assert "is not available to you" in str(refused.value)

        # A plain Flight client (no Flight SQL): the release table by its path, then DoGet.
        client, options = client_for(address, "alice")
        descriptor = flight.FlightDescriptor.for_path("releases", "onc-1", "cohort")
        info = client.get_flight_info(descriptor, options)
        assert info.schema.names == table.column_names
        plain = client.do_get(info.endpoints[0].ticket, options).read_all()
        assert plain.num_rows == table.num_rows
        assert sorted(plain.column("patient_id").to_pylist()) == sorted(
            table.column("patient_id").to_pylist())
        client, options = client_for(address, "dave")
        with pytest.raises(flight.FlightError) as refused:
            client.get_flight_info(descriptor, options)
        assert "is not available to you" in str(refused.value)
    finally:
        stop_lakegate(proc)

    # Copied out of the lake, the release's file opens in no Parquet reader.
    files = sorted((lake / "releases" / "onc-1").rglob("*.parquet"))
    assert files
    with pytest.raises(Exception):
        pq.read_table(files[0])

    # A changed file is named by verify.
    assert _lakegate("release", "verify", "onc-1", "--lake", str(lake)).returncode == 0
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 1
    files[0].write_bytes(bytes(data))
    verify = _lakegate("release", "verify", "onc-1", "--lake", str(lake))
    assert verify.returncode != 0
    assert "table cohort part 0: changed" in verify.stdout

    # Holds: compliance only; the lifecycle's plan names the hold of an expired release
    # only once it expires, and otherwise has nothing to do.
    refused = _lakegate("hold", "add", "onc-1", "--reason", "audit", "--lake", str(lake),
                        "--as", "alice")
    assert refused.returncode != 0 and "legal-hold-compliance-only" in refused.stderr
    held = _lakegate("hold", "add", "onc-1", "--reason", "audit 7", "--lake", str(lake),
                     "--as", "erin")
    assert held.returncode == 0, held.stderr
    assert "onc-1  placed by erin" in _lakegate("hold", "list", "--lake", str(lake)).stdout
    plan = _lakegate("lifecycle", "run", "--lake", str(lake), "--dry-run")
    assert plan.returncode == 0 and "nothing to do" in plan.stdout
    tiers = _lakegate("lifecycle", "run", "--lake", str(lake), "--dry-run",
                      "--cold-after-days", "0")
    assert "move raw/clinical/" in tiers.stdout
