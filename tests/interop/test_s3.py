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
