"""The same lake on S3: a real S3-compatible server (moto's server mode, its own process on
loopback, speaking the S3 HTTP protocol to object_store's signed requests) holds the lake at
s3://bucket/prefix for `demo`, serving and `audit verify`."""

import os
import re
import socket
import subprocess
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import lakegate_binary, start_lakegate, stop_lakegate
from test_adbc import connect

BUCKET = "lakegate-interop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Start moto's S3 server, make a bucket, and point object_store at it through the
    environment (as a deployment would); yield a boto3 client of the same server. The servers
    run in a folder of their own: for a remote lake the demo keeps its keys in the working
    folder."""
    home = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("s3-workdir"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "lakegate-interop",
        "AWS_SECRET_ACCESS_KEY": "lakegate-interop-secret",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)
        os.chdir(home)


def _keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _verify(lake):
    return subprocess.run(
        [lakegate_binary(), "audit", "verify", "--lake", lake],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lakegate(*args):
    return subprocess.run(
        [lakegate_binary(), *args], capture_output=True, text=True, timeout=120
    )


def _serve_and_query(lake):
    proc, address = start_lakegate(lake, patients=300)
    try:
        alice = connect(address, "alice")
        cur = alice.cursor()
        cur.execute("SELECT site_id, count(*) FROM clinical.patients GROUP BY site_id")
        sites = cur.fetchall()
        cur.execute("SELECT ssn, patient_id FROM clinical.patients LIMIT 20")
        rows = cur.fetchall()
        alice.close()
        bob = connect(address, "bob")
        cur = bob.cursor()
        cur.execute("SELECT count(*) FROM clinical.patients")
        (total,) = cur.fetchone()
        bob.close()
    finally:
        stop_lakegate(proc)
    return sites, rows, total


def test_a_lake_on_s3_is_built_served_governed_and_audited(s3):
    lake = f"s3://{BUCKET}/hospital"
    sites, rows, total = _serve_and_query(lake)
    assert sites and all(n > 0 for _, n in sites)
    assert all(ssn is None for ssn, _ in rows), "alice must not see SSNs"
    assert all(pid.startswith("ps_") for _, pid in rows), "alice sees pseudonyms"
    assert 0 < total <= 300

    keys = _keys(s3, "hospital/")
    assert "hospital/catalog/datasets.json" in keys
    assert any(k.startswith("hospital/curated/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("hospital/audit/events/") for k in keys)

    result = _verify(lake)
    assert result.returncode == 0, result.stderr
    assert "audit trail intact" in result.stdout

    # The catalog describes the lake on S3: names, labels and files, never a value.
    listing = _lakegate("catalog", "list", "--lake", lake)
    assert listing.returncode == 0, listing.stderr
    assert "clinical.patients" in listing.stdout and "phi.direct" in listing.stdout
    shown = _lakegate("catalog", "show", "--lake", lake, "clinical.patients")
    assert shown.returncode == 0, shown.stderr
    assert "ssn" in shown.stdout and "phi.direct" in shown.stdout
    assert not re.search(r"\b\d{3}-\d{2}-\d{4}\b", listing.stdout + shown.stdout)
    unknown = _lakegate("catalog", "show", "--lake", lake, "clinical.nope")
    assert unknown.returncode == 1 and "no such dataset" in unknown.stderr

    # Served again: the lake is found as it was left, and the chain continues on S3.
    _serve_and_query(lake)
    result = _verify(lake)
    assert result.returncode == 0, result.stderr


def test_a_tampered_trail_on_s3_is_named(s3):
    lake = f"s3://{BUCKET}/tampered"
    _serve_and_query(lake)
    assert _verify(lake).returncode == 0

    segments = sorted(k for k in _keys(s3, "tampered/audit/events/"))
    victim = segments[len(segments) // 2]
    text = s3.get_object(Bucket=BUCKET, Key=victim)["Body"].read().decode()
    seq = text.splitlines()[0].split('"seq":')[1].split(",")[0]
    s3.put_object(Bucket=BUCKET, Key=victim,
                  Body=text.replace('"outcome":"', '"outcome":"x', 1).encode())
    result = _verify(lake)
    assert result.returncode != 0
    assert f"seq {seq}" in result.stderr, result.stderr
    assert "modified" in result.stderr, result.stderr


def test_a_missing_bucket_is_a_clear_error(s3):
    result = subprocess.run(
        [lakegate_binary(), "demo", "--patients", "50", "--lake", "s3://no-such-bucket/x",
         "--build-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "panicked" not in result.stderr
    assert "no-such-bucket" in result.stderr or "NoSuchBucket" in result.stderr, result.stderr


def test_two_servers_on_one_bucket_share_one_intact_trail(s3):
    # The audit trail's segments are written create-only: were a second server's write of the
    # same sequence number to overwrite the first's, the chain would break.
    lake = f"s3://{BUCKET}/shared"
    first, a = start_lakegate(lake, patients=100)
    second = None
    try:
        second, b = start_lakegate(lake, patients=100)
        conns = [connect(a, "alice"), connect(b, "alice"), connect(a, "carol"), connect(b, "carol")]
        for _ in range(5):
            for conn in conns:
                cur = conn.cursor()
                cur.execute("SELECT count(*) FROM clinical.patients")
                cur.fetchall()
        for conn in conns:
            conn.close()
    finally:
        stop_lakegate(first)
        if second is not None:
            stop_lakegate(second)
    result = _verify(lake)
    assert result.returncode == 0, result.stderr
    assert "audit trail intact" in result.stdout
    events = int(result.stdout.split("intact: ")[1].split(" events")[0])
    assert events >= 40, result.stdout  # 20 queries, each decided and completed


LABS_CONTRACT = """
dataset = "clinical.lab_results"
owner = "lab-informatics"

[[columns]]
name = "result_id"
type = "utf8"
nullable = false
label = "identifier"
unique = true

[[columns]]
name = "patient_id"
type = "utf8"
nullable = false
label = "identifier"
references = "clinical.patients.patient_id"

[[columns]]
name = "loinc_code"
type = "utf8"
label = "clinical"
shape = "loinc"

[[columns]]
name = "value"
type = "float64"
label = "clinical"
min = 0
"""


def test_feeds_are_ingested_into_versions_on_s3_and_served_governed(s3, tmp_path):
    lake = f"s3://{BUCKET}/ingest"
    proc, address = start_lakegate(lake, patients=300)
    try:
        carol = connect(address, "carol")
        cur = carol.cursor()
        cur.execute("SELECT patient_id FROM clinical.patients ORDER BY patient_id LIMIT 3")
        mine = [r[0] for r in cur.fetchall()]
        carol.close()
    finally:
        stop_lakegate(proc)

    contract = tmp_path / "labs.toml"
    contract.write_text(LABS_CONTRACT)
    added = _lakegate("catalog", "add", "--lake", lake, "--contract", str(contract))
    assert added.returncode == 0, added.stderr
    assert "version 0" in added.stdout
    bad_contract = tmp_path / "bad.toml"
    bad_contract.write_text(LABS_CONTRACT.replace('"clinical"', '"secret"'))
    refused = _lakegate("catalog", "add", "--lake", lake, "--contract", str(bad_contract))
    assert refused.returncode == 1 and "unknown label 'secret'" in refused.stderr

    # A local extract with one row of an unknown patient and one bad LOINC code.
    feed = tmp_path / "labs-1.csv"
    rows = [f"R{i},{mine[i % 3]},2345-7,{i}.5" for i in range(20)]
    rows += ["R90,nobody,2345-7,1", f"R91,{mine[0]},E11.9,1"]
    feed.write_text("result_id,patient_id,loinc_code,value\n" + "\n".join(rows) + "\n")
    done = _lakegate(
        "ingest", "--lake", lake, "--dataset", "clinical.lab_results",
        "--max-reject-ratio", "0.2", "--as", "gina", str(feed),
    )
    assert done.returncode == 0, done.stderr
    assert "22 rows read, 20 accepted, 2 quarantined" in done.stdout
    assert "committed clinical.lab_results version 1" in done.stdout
    again = _lakegate(
        "ingest", "--lake", lake, "--dataset", "clinical.lab_results", "--as", "gina", str(feed)
    )
    assert again.returncode == 0 and "already ingested" in again.stdout

    # A second feed from the same object store, by URL; then one refused as a whole.
    s3.put_object(
        Bucket=BUCKET,
        Key="incoming/labs-2.csv",
        Body=f"result_id,patient_id,loinc_code,value\nR100,{mine[1]},4548-4,6.1\n".encode(),
    )
    done = _lakegate(
        "ingest", "--lake", lake, "--dataset", "clinical.lab_results", "--as", "gina",
        f"s3://{BUCKET}/incoming/labs-2.csv",
    )
    assert done.returncode == 0, done.stderr
    assert "version 2" in done.stdout
    worse = tmp_path / "labs-3.csv"
    worse.write_text("result_id,patient_id,loinc_code,value\nR200,nobody,1-1,1\n")
    refused = _lakegate(
        "ingest", "--lake", lake, "--dataset", "clinical.lab_results", "--as", "gina", str(worse)
    )
    assert refused.returncode == 1
    assert "feed refused, nothing committed" in refused.stderr
    # Writing is a grant of its own: alice may read de-identified rows, not load data.
    denied = _lakegate(
        "ingest", "--lake", lake, "--dataset", "clinical.lab_results", "--as", "alice", str(worse)
    )
    assert denied.returncode == 1
    assert "refused: alice may not ingest into clinical.lab_results" in denied.stderr

    keys = _keys(s3, "ingest/")
    assert "ingest/curated/clinical/lab_results/_delta_log/00000000000000000002.json" in keys
    assert not any("lab_results/_delta_log/00000000000000000003" in k for k in keys)
    assert any(k.startswith("ingest/raw/clinical/lab_results/") for k in keys)
    assert any(k.endswith("/rows.jsonl") for k in keys if k.startswith("ingest/quarantine/"))
    history = _lakegate("catalog", "history", "--lake", lake, "clinical.lab_results")
    assert history.returncode == 0, history.stderr
    assert "v1" in history.stdout and "ingest by gina" in history.stdout
    assert "labs-1.csv" in history.stdout and "labs-2.csv" in history.stdout

    proc, address = start_lakegate(lake, patients=300)
    try:
        carol = connect(address, "carol")
        cur = carol.cursor()
        cur.execute("SELECT count(*) FROM clinical.lab_results")
        assert cur.fetchone()[0] == 21
        cur.execute('SELECT count(*) FROM clinical."lab_results@v1"')
        assert cur.fetchone()[0] == 20
        carol.close()
        # Every ingest and every refusal is in the audit trail, which erin reads.
        erin = connect(address, "erin")
        cur = erin.cursor()
        cur.execute(
            "SELECT principal, outcome FROM audit.events WHERE kind = 'ingest' ORDER BY seq"
        )
        assert cur.fetchall() == [
            ("gina", "completed"),
            ("gina", "completed"),
            ("gina", "completed"),
            ("gina", "refused"),
            ("alice", "refused"),
        ]
        erin.close()
        # gina's grant is to load, not to read.
        gina = connect(address, "gina")
        cur = gina.cursor()
        with pytest.raises(Exception):
            cur.execute("SELECT count(*) FROM clinical.lab_results")
            cur.fetchall()
        gina.close()
        mallory = connect(address, "mallory")
        cur = mallory.cursor()
        with pytest.raises(Exception):
            cur.execute("SELECT count(*) FROM clinical.lab_results")
            cur.fetchall()
        mallory.close()
    finally:
        stop_lakegate(proc)

    # The lake in the bucket is encrypted at rest: its curated objects are not Parquet any
    # reader opens, and rotating the master key re-wraps the data keys in the bucket without
    # rewriting a data object.
    part = next(k for k in keys if k.startswith("ingest/curated/clinical/lab_results/")
                and k.endswith(".parquet"))
    body = s3.get_object(Bucket=BUCKET, Key=part)["Body"].read()
    with pytest.raises(Exception):
        pq.read_table(pa.BufferReader(body))
    etags = {k: _etag(s3, k) for k in keys if k.startswith("ingest/curated/")
             and k.endswith(".parquet")}
    rotated = _lakegate("keys", "rotate", "--lake", lake, "--retire-old")
    assert rotated.returncode == 0, rotated.stderr
    assert "clinical.lab_results: 3 data keys re-wrapped" in rotated.stdout
    assert {k: _etag(s3, k) for k in etags} == etags
    proc, address = start_lakegate(lake, patients=300)
    try:
        carol = connect(address, "carol")
        cur = carol.cursor()
        cur.execute("SELECT count(*) FROM clinical.lab_results")
        assert cur.fetchone()[0] == 21
        carol.close()
    finally:
        stop_lakegate(proc)


def _etag(s3, key):
    return s3.head_object(Bucket=BUCKET, Key=key)["ETag"]
