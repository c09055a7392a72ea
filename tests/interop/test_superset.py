"""The SQLAlchemy dialect Apache Superset loads for Flight SQL (`flightsql-dbapi`, URL scheme
`datafusion://`), driven the way Superset drives it: schema and table listings, column
reflection, SQL Lab queries with Superset's row limit, and charts' time-grain aggregates.

flightsql-dbapi requires SQLAlchemy 1.4 (as Superset does), so this file runs in its own
virtualenv (`scripts/test`), apart from the rest of the interop suite."""

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("flightsql")

import pyarrow as pa  # noqa: E402
from sqlalchemy import exc, inspect, text  # noqa: E402

# flightsql-dbapi lets the Flight client's errors through unwrapped (Superset shows their text).
ERRORS = (exc.DBAPIError, pa.ArrowException)


def engine(server, user, password=None):
    password = password or f"demo-{user}"
    # `insecure=true`: the demo serves plaintext gRPC on loopback.
    return sa.create_engine(f"datafusion://{user}:{password}@{server}?insecure=true")


def test_superset_lists_and_reflects_what_bob_may_query(server):
    e = engine(server, "bob")
    insp = inspect(e)
    assert insp.get_schema_names() == ["clinical"]
    assert sorted(insp.get_table_names(schema="clinical")) == [
        "conditions",
        "encounters",
        "observations",
        "patients",
    ]
    assert insp.has_table("encounters", schema="clinical")
    columns = {c["name"]: c["type"] for c in insp.get_columns("encounters", schema="clinical")}
    assert isinstance(columns["start_time"], sa.types.TIMESTAMP)
    assert isinstance(columns["total_cost"], sa.types.Float)
    assert isinstance(columns["encounter_class"], sa.types.Text)


def test_sql_lab_and_charts_as_bob(server):
    with engine(server, "bob").connect() as c:
        # SQL Lab appends its row limit.
        rows = c.execute(
            text(
                "SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients "
                "GROUP BY site_id ORDER BY site_id LIMIT 1001"
            )
        ).fetchall()
        assert [r[0] for r in rows] == ["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E"]
        assert all(r[1] >= 11 for r in rows)
        # A chart: a metric by month, built with SQLAlchemy Core as Superset builds it.
        enc = sa.Table("encounters", sa.MetaData(), schema="clinical", autoload_with=c)
        month = sa.func.date_trunc("month", enc.c.start_time).label("__timestamp")
        q = (
            sa.select(month, sa.func.count(enc.c.patient_id.distinct()).label("patients"))
            .where(enc.c.encounter_class == "inpatient")
            .group_by(month)
            .order_by(month)
            .limit(10000)
        )
        by_month = c.execute(q).fetchall()
        # Months with fewer than 11 inpatients are suppressed, never shown.
        assert all(n >= 11 for _, n in by_month)
        # Row-level reads and unsafe aggregates are refused with the rule's reason.
        with pytest.raises(ERRORS) as err:
            c.execute(text("SELECT ssn FROM clinical.patients LIMIT 1001")).fetchall()
        assert "only aggregate queries" in str(err.value)
        with pytest.raises(ERRORS) as err:
            c.execute(text("SELECT min(total_cost) FROM clinical.encounters")).fetchall()
        assert "aggregate min is refused" in str(err.value)


def test_carol_alice_and_mallory(server):
    with engine(server, "carol").connect() as c:
        assert c.execute(text("SELECT DISTINCT site_id FROM clinical.patients")).fetchall() == [
            ("SITE_A",)
        ]
        ssns = [r[0] for r in c.execute(text("SELECT ssn FROM clinical.patients LIMIT 5"))]
        assert ssns and all(s.startswith("***-**-") for s in ssns)
    with engine(server, "alice").connect() as c:
        rows = c.execute(
            text("SELECT patient_id, ssn, zip FROM clinical.patients LIMIT 20")
        ).fetchall()
        # The dialect reads results through pandas: a nullified SSN arrives as NaN.
        assert rows
        for pseudonym, ssn, zip3 in rows:
            assert pseudonym.startswith("ps_") and len(zip3) == 3
            assert ssn is None or ssn != ssn

    mallory = engine(server, "mallory")
    assert inspect(mallory).get_schema_names() == []
    assert inspect(mallory).get_table_names(schema="clinical") == []
    with mallory.connect() as c, pytest.raises(ERRORS) as err:
        c.execute(text("SELECT count(*) FROM clinical.patients")).fetchall()
    assert "not found" in str(err.value)


def test_wrong_password_is_refused(server):
    with pytest.raises(ERRORS) as err:
        engine(server, "bob", "not-his-password").connect()
    assert "invalid user name or password" in str(err.value)
