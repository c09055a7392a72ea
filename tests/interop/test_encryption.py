"""Encryption at rest, as an operator meets it: `lakegate demo` encrypts by default, a copied
curated file opens in neither pyarrow nor DuckDB, `--encryption off` leaves plain files, and
`lakegate keys rotate` re-wraps the data keys without touching a data file."""

import hashlib
import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import lakegate_binary, start_lakegate, stop_lakegate
from test_adbc import connect

PATIENTS = 200


def _lakegate(*args):
    return subprocess.run(
        [lakegate_binary(), *args], capture_output=True, text=True, timeout=300
    )


def _curated(lake: Path) -> dict:
    """Every Parquet file of the lake: the curated tables and the extracts in raw/."""
    return {
        str(p.relative_to(lake)): hashlib.sha256(p.read_bytes()).hexdigest()
        for zone in ("curated", "raw")
        for p in sorted((lake / zone).rglob("*.parquet"))
    }


def _count(address: str, user: str = "carol") -> int:
    conn = connect(address, user)
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM clinical.encounters")
        return cur.fetchone()[0]
    finally:
        conn.close()


def test_the_demo_lake_is_encrypted_and_rotation_rewrites_no_data_file(tmp_path):
    lake = tmp_path / "lake"
    built = _lakegate("demo", "--patients", str(PATIENTS), "--lake", str(lake), "--build-only")
    assert built.returncode == 0, built.stderr
    assert "encrypted at rest" in built.stderr
    keyring = tmp_path / "lake.keyring.toml"
    assert keyring.exists() and oct(keyring.stat().st_mode & 0o777) == "0o600"

    files = _curated(lake)
    assert len(files) >= 5
    assert any(name.startswith("raw/") for name in files), files
    for name in files:
        with pytest.raises(Exception) as refused:
            pq.read_table(lake / name)
        assert "encrypt" in str(refused.value).lower(), (name, refused.value)
        with pytest.raises(duckdb.Error):
            duckdb.sql(f"SELECT count(*) FROM read_parquet('{lake / name}')").fetchall()

    proc, address = start_lakegate(lake, patients=PATIENTS)
    try:
        before = _count(address)
    finally:
        stop_lakegate(proc)
    assert before > 0

    rotated = _lakegate("keys", "rotate", "--lake", str(lake), "--retire-old")
    assert rotated.returncode == 0, rotated.stderr
    assert "no data file was rewritten" in rotated.stdout
    assert "retired 1 old master key" in rotated.stdout
    assert _curated(lake) == files

    proc, address = start_lakegate(lake, patients=PATIENTS)
    try:
        assert _count(address) == before
    finally:
        stop_lakegate(proc)

    # A keyring kept inside the lake protects nothing; the server refuses to use one.
    inside = lake / "keyring.toml"
    inside.write_bytes(keyring.read_bytes())
    refused = _lakegate("keys", "rotate", "--lake", str(lake), "--keyring", str(inside))
    assert refused.returncode != 0 and "inside the lake" in refused.stderr


def test_without_its_keyring_the_lake_is_refused_by_name(tmp_path):
    lake = tmp_path / "lake"
    built = _lakegate("demo", "--patients", "100", "--lake", str(lake), "--build-only")
    assert built.returncode == 0, built.stderr
    (tmp_path / "lake.keyring.toml").rename(tmp_path / "elsewhere.toml")
    proc, address = start_lakegate(lake, patients=100)
    try:
        # bob's counts read clinical.encounters directly (carol's row filter reads
        # clinical.patients first, and a row filter's read names no dataset).
        with pytest.raises(Exception) as refused:
            _count(address, "bob")
        text = str(refused.value)
        assert "clinical.encounters" in text and "encrypted at rest" in text, text
    finally:
        stop_lakegate(proc)

    # The keyring as a secret in the environment (`env:NAME`) serves the lake the same.
    os.environ["LAKEGATE_TEST_SECRET"] = (tmp_path / "elsewhere.toml").read_text()
    os.environ["LAKEGATE_KEYRING"] = "env:LAKEGATE_TEST_SECRET"
    try:
        proc, address = start_lakegate(lake, patients=100)
        try:
            assert _count(address, "bob") > 0
        finally:
            stop_lakegate(proc)
        refused = _lakegate("keys", "rotate", "--lake", str(lake))
        assert refused.returncode != 0 and "comes from the environment" in refused.stderr
        rewrapped = _lakegate("keys", "rotate", "--lake", str(lake), "--no-new-key")
        assert rewrapped.returncode == 0, rewrapped.stderr
        assert "0 data keys now wrapped" in rewrapped.stdout
    finally:
        del os.environ["LAKEGATE_TEST_SECRET"]
        del os.environ["LAKEGATE_KEYRING"]


def test_encryption_off_leaves_plain_parquet(tmp_path):
    lake = tmp_path / "lake"
    built = _lakegate(
        "demo", "--patients", "100", "--lake", str(lake), "--build-only", "--encryption", "off"
    )
    assert built.returncode == 0, built.stderr
    assert "NOT encrypted at rest" in built.stderr
    assert not (tmp_path / "lake.keyring.toml").exists()
    part = next((lake / "curated" / "clinical" / "patients").glob("*.parquet"))
    table = pq.read_table(part)
    assert table.num_rows > 0
    ((count,),) = duckdb.sql(f"SELECT count(*) FROM read_parquet('{part}')").fetchall()
    assert count == table.num_rows
