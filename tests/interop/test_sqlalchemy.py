"""SQLAlchemy 2 through the ADBC Flight SQL driver (`sqlalchemy-adbc`), as a notebook or an
application using SQLAlchemy connects."""

import warnings

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("sqlalchemy_adbc")

from sqlalchemy import exc, inspect, text  # noqa: E402


@pytest.fixture
def engine(server):
    engines = []

    def make(user, password=None):
        password = password or f"demo-{user}"
        # Lakegate's demo serves plaintext gRPC on loopback; credentials go to the driver.
        url = f"adbc+flightsql://{server}?tls=false&username={user}&password={password}"
        e = sa.create_engine(url)
        engines.append(e)
        return e

    with warnings.catch_warnings():
        # The driver warns that autocommit cannot be disabled: Lakegate is read-only.
        warnings.simplefilter("ignore")
        yield make
    for e in engines:
        e.dispose()


def test_reflected_columns_have_sql_types(engine):
    with engine("bob").connect() as c:
        encounters = sa.Table("encounters", sa.MetaData(), schema="clinical", autoload_with=c)
    types = {col.name: type(col.type) for col in encounters.columns}
    # Without Flight SQL's column metadata every column reflected as NullType.
    assert issubclass(types["patient_id"], sa.String)
    assert issubclass(types["start_time"], sa.DateTime)
    assert issubclass(types["total_cost"], sa.Float)
    assert issubclass(types["readmitted_30d"], sa.Boolean)
    assert inspect(engine("bob")).get_schema_names() == ["clinical"]


def test_bob_counts_through_core_and_bound_parameters(engine):
    with engine("bob").connect() as c:
        patients = sa.Table("patients", sa.MetaData(), schema="clinical", autoload_with=c)
        q = (
            sa.select(
                patients.c.site_id,
                sa.func.count(patients.c.patient_id.distinct()).label("n"),
            )
            .group_by(patients.c.site_id)
            .order_by(patients.c.site_id)
        )
        groups = c.execute(q).all()
        assert [s for s, _ in groups] == ["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E"]
        assert all(n >= 11 for _, n in groups)
        # A bound parameter travels as a prepared statement's parameter, not as SQL text.
        bound = c.execute(
            text("SELECT count(DISTINCT patient_id) FROM clinical.patients WHERE site_id = :s"),
            {"s": "SITE_B"},
        ).scalar_one()
        assert bound == dict(groups)["SITE_B"]
        with pytest.raises(exc.DBAPIError) as err:
            c.execute(text("SELECT ssn FROM clinical.patients")).all()
        assert "only aggregate queries" in str(err.value)
        with pytest.raises(exc.DBAPIError) as err:
            c.execute(sa.select(sa.func.max(patients.c.birth_date))).all()
        assert "aggregate max is refused" in str(err.value)


def test_carol_and_mallory(engine):
    with engine("carol").connect() as c:
        sites = c.execute(text("SELECT DISTINCT site_id FROM clinical.patients")).scalars().all()
        assert sites == ["SITE_A"]
        ssns = c.execute(text("SELECT ssn FROM clinical.patients LIMIT 5")).scalars().all()
        assert ssns and all(s.startswith("***-**-") for s in ssns)

    mallory = engine("mallory")
    assert inspect(mallory).get_schema_names() == []
    assert not inspect(mallory).has_table("patients", schema="clinical")
    with mallory.connect() as c, pytest.raises(exc.DBAPIError) as err:
        c.execute(text("SELECT count(*) FROM clinical.patients")).all()
    assert "not found" in str(err.value)


def test_wrong_password_is_refused(engine):
    with pytest.raises(exc.DBAPIError) as err:
        engine("alice", "not-her-password").connect()
    assert "invalid user name or password" in str(err.value)
