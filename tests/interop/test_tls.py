"""ADBC and pyarrow.flight over TLS and mutual TLS, with certificates made by the test."""

import datetime
import ipaddress
import tempfile
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import PATIENTS, start_lakegate, stop_lakegate
from test_pyarrow_flight import statement_query

COUNT = "SELECT count(*) AS n FROM clinical.patients"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(cn, key, issuer_cert=None, issuer_key=None, ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def mtls_server():
    """`lakegate demo` with TLS and client certificates required; yields (address, pems)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ca_key = _key()
        ca = _cert("Interop CA", ca_key, ca=True)
        server_key = _key()
        server = _cert("localhost", server_key, ca, ca_key)
        alice_key = _key()
        alice = _cert("alice", alice_key, ca, ca_key)
        rogue_key = _key()
        rogue_ca = _cert("Rogue CA", rogue_key, ca=True)
        rogue_alice_key = _key()
        rogue_alice = _cert("alice", rogue_alice_key, rogue_ca, rogue_key)
        files = {
            "ca.pem": _pem(ca),
            "server.pem": _pem(server),
            "server.key": _pem_key(server_key),
        }
        for name, data in files.items():
            (d / name).write_bytes(data)
        proc, address = start_lakegate(
            d / "lake",
            extra=[
                "--tls-cert", str(d / "server.pem"),
                "--tls-key", str(d / "server.key"),
                "--tls-client-ca", str(d / "ca.pem"),
            ],
        )
        pems = {
            "ca": _pem(ca),
            "alice": (_pem(alice), _pem_key(alice_key)),
            "rogue": (_pem(rogue_alice), _pem_key(rogue_alice_key)),
        }
        try:
            yield address, pems
        finally:
            stop_lakegate(proc)


def test_adbc_over_mutual_tls(mtls_server):
    address, pems = mtls_server
    cert, key = pems["alice"]
    with flightsql.connect(
        f"grpc+tls://{address}",
        db_kwargs={
            "username": "alice",
            "password": "demo-alice",
            "adbc.flight.sql.client_option.tls_root_certs": pems["ca"].decode(),
            "adbc.flight.sql.client_option.mtls_cert_chain": cert.decode(),
            "adbc.flight.sql.client_option.mtls_private_key": key.decode(),
        },
    ) as conn, conn.cursor() as cur:
        cur.execute(COUNT)
        n = cur.fetch_arrow_table().to_pylist()[0]["n"]
        assert 0 < n < PATIENTS  # alice's consenting patients only


def test_pyarrow_flight_with_the_certificate_alone(mtls_server):
    address, pems = mtls_server
    cert, key = pems["alice"]
    client = flight.FlightClient(
        f"grpc+tls://{address}", tls_root_certs=pems["ca"], cert_chain=cert, private_key=key
    )
    # No password and no token: the certificate's CN names alice.
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(COUNT)))
    n = client.do_get(info.endpoints[0].ticket).read_all().to_pylist()[0]["n"]
    assert 0 < n < PATIENTS
    # Over alice's certificate, bob's password is refused.
    with pytest.raises(flight.FlightUnauthenticatedError, match="mtls-binding"):
        client.authenticate_basic_token("bob", "demo-bob")


def test_no_or_foreign_client_certificate_is_refused(mtls_server):
    address, pems = mtls_server
    for extra in ({}, dict(zip(("cert_chain", "private_key"), pems["rogue"]))):
        client = flight.FlightClient(f"grpc+tls://{address}", tls_root_certs=pems["ca"], **extra)
        with pytest.raises(flight.FlightError):
            client.authenticate_basic_token("alice", "demo-alice")
    # And plaintext gets nowhere.
    client = flight.FlightClient(f"grpc://{address}")
    with pytest.raises(flight.FlightError):
        client.authenticate_basic_token("alice", "demo-alice")
