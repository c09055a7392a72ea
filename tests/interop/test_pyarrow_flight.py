"""Raw pyarrow.flight: the Flight protocol underneath Flight SQL, tickets as untrusted input."""

import pyarrow.flight as flight
import pytest

from conftest import PATIENTS
from flightsql_command import statement_query


def client_for(server, user):
    client = flight.FlightClient(f"grpc://{server}")
    header = client.authenticate_basic_token(user, f"demo-{user}")
    return client, flight.FlightCallOptions(headers=[header])


def test_statement_via_raw_flight(server):
    client, options = client_for(server, "alice")
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query("SELECT count(*) AS n FROM clinical.patients")), options)
    assert info.schema.names == ["n"]
    assert all(not ep.locations for ep in info.endpoints)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert 0 < table.to_pylist()[0]["n"] < PATIENTS  # consenting patients only


def test_training_stream_arrives_in_batches(server):
    client, options = client_for(server, "alice")
    sql = "SELECT patient_id, start_time, encounter_class, total_cost FROM clinical.encounters"
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(sql)), options)
    reader = client.do_get(info.endpoints[0].ticket, options)
    batches = 0
    rows = 0
    for chunk in reader:
        batches += 1
        rows += chunk.data.num_rows
    assert batches >= 1 and rows >= PATIENTS * 2


def test_no_token_and_forged_tickets_are_refused(server):
    anonymous = flight.FlightClient(f"grpc://{server}")
    with pytest.raises(flight.FlightUnauthenticatedError):
        anonymous.get_flight_info(flight.FlightDescriptor.for_command(statement_query("SELECT 1")))

    client, options = client_for(server, "alice")
    # Garbage is refused as an invalid argument (pyarrow raises ArrowInvalid for that code).
    import pyarrow

    with pytest.raises(pyarrow.ArrowInvalid):
        client.do_get(flight.Ticket(b"forged"), options).read_all()

    # A real ticket, replayed by another user.
    info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_query("SELECT ssn FROM clinical.patients")), options)
    carol, carol_options = client_for(server, "carol")
    with pytest.raises(flight.FlightUnauthorizedError) as err:
        carol.do_get(info.endpoints[0].ticket, carol_options).read_all()
    assert "another caller" in str(err.value)

    # The server still serves the owner, with masked values.
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert table.num_rows > 0 and table.column("ssn").null_count == table.num_rows


def test_wrong_password(server):
    client = flight.FlightClient(f"grpc://{server}")
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token("alice", "nope")
