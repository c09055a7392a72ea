"""The Python ADBC Flight SQL driver, pandas and polars, as analysts use them."""

import warnings

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest

from conftest import PATIENTS


def connect(server, user, password=None):
    with warnings.catch_warnings():
        # The driver warns that autocommit cannot be disabled: Lakegate is read-only.
        warnings.simplefilter("ignore")
        return flightsql.connect(
            f"grpc://{server}",
            db_kwargs={"username": user, "password": password or f"demo-{user}"},
        )


@pytest.fixture
def alice(server):
    conn = connect(server, "alice")
    yield conn
    conn.close()


def test_wrong_password_is_refused(server):
    with pytest.raises(adbc_driver_manager.Error) as err:
        connect(server, "alice", "not-her-password")
    assert "UNAUTHENTICATED" in str(err.value)
    assert "invalid user name or password" in str(err.value)


def test_execute_and_fetch_arrow(alice, server):
    cur = alice.cursor()
    cur.execute("SELECT count(*) AS n FROM clinical.patients")
    table = cur.fetch_arrow_table()
    assert table.column_names == ["n"]
    # alice sees consenting patients only; carol sees her site only; together fewer than all.
    consenting = table.to_pylist()[0]["n"]
    assert 0 < consenting < PATIENTS


def test_bound_parameters_match_literals(alice):
    cur = alice.cursor()
    cur.execute("SELECT count(*) FROM clinical.encounters WHERE encounter_class = 'inpatient' AND total_cost > 1000")
    literal = cur.fetchone()[0]
    assert literal > 0
    cur.execute(
        "SELECT count(*) FROM clinical.encounters WHERE encounter_class = ? AND total_cost > ?",
        ("inpatient", 1000),
    )
    assert cur.fetchone()[0] == literal
    # The same prepared statement with other values.
    cur.execute("SELECT count(*) FROM clinical.patients WHERE site_id = ?", ("SITE_A",))
    a = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM clinical.patients WHERE site_id = ?", ("SITE_B",))
    b = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM clinical.patients WHERE site_id IN ('SITE_A', 'SITE_B')")
    assert a + b == cur.fetchone()[0]


def test_get_info_objects_and_table_schema(alice):
    info = alice.adbc_get_info()
    assert info["vendor_name"] == "Lakegate"
    objects = alice.adbc_get_objects().read_all().to_pylist()
    tables = sorted(
        f"{s['db_schema_name']}.{t['table_name']}"
        for c in objects
        for s in c["catalog_db_schemas"]
        for t in s["db_schema_tables"]
    )
    assert tables == [
        "clinical.conditions",
        "clinical.encounters",
        "clinical.observations",
        "clinical.patients",
        "omics.variants",
    ]
    schema = alice.adbc_get_table_schema("patients", db_schema_filter="clinical")
    assert "ssn" in schema.names and "research_consent" in schema.names
    assert str(schema.field("birth_date").type) == "date32[day]"


def test_pandas_and_polars(alice):
    import polars as pl

    cur = alice.cursor()
    cur.execute(
        "SELECT loinc_code, avg(value) AS mean FROM clinical.observations GROUP BY loinc_code "
        "ORDER BY count(*) DESC, loinc_code LIMIT 10"
    )
    df = cur.fetch_df()
    assert len(df) == 10 and list(df.columns) == ["loinc_code", "mean"]
    pdf = pl.read_database("SELECT gene, count(*) AS n FROM omics.variants GROUP BY gene", connection=alice)
    assert pdf.height == 10 and pdf["n"].sum() > 0


def test_personas_through_adbc(server):
    """The scenario's personas, as an analyst's notebook would see them."""
    alice = connect(server, "alice")
    cur = alice.cursor()
    cur.execute("SELECT patient_id, ssn, first_name, birth_date, zip FROM clinical.patients LIMIT 20")
    rows = cur.fetch_arrow_table().to_pylist()
    assert rows and all(r["ssn"] is None and r["first_name"] is None for r in rows)
    assert all(r["patient_id"].startswith("ps_") and len(r["zip"]) == 3 for r in rows)
    assert all(r["birth_date"].month == 1 and r["birth_date"].day == 1 for r in rows)
    alice.close()

    carol = connect(server, "carol")
    cur = carol.cursor()
    cur.execute("SELECT DISTINCT site_id FROM clinical.patients")
    assert cur.fetchall() == [("SITE_A",)]
    cur.execute("SELECT ssn FROM clinical.patients LIMIT 5")
    assert all(s.startswith("***-**-") for (s,) in cur.fetchall())
    carol.close()

    bob = connect(server, "bob")
    cur = bob.cursor()
    with pytest.raises(adbc_driver_manager.Error) as err:
        cur.execute("SELECT * FROM clinical.patients")
    assert "PERMISSION_DENIED" in str(err.value) or "UNAUTHORIZED" in str(err.value)
    assert "only aggregate queries" in str(err.value)
    cur.execute("SELECT site_id, count(DISTINCT patient_id) AS n FROM clinical.patients GROUP BY site_id")
    assert all(n >= 11 for (_, n) in cur.fetchall())
    with pytest.raises(adbc_driver_manager.Error) as err:
        cur.execute("SELECT min(birth_date) FROM clinical.patients")
    assert "aggregate min is refused" in str(err.value)
    bob.close()

    dave = connect(server, "dave")
    with pytest.raises(adbc_driver_manager.Error) as err:
        dave.cursor().execute("SELECT * FROM omics.variants")
    assert "not found" in str(err.value)
    dave.close()


def test_mallory_sees_nothing(server):
    conn = connect(server, "mallory")
    objects = conn.adbc_get_objects().read_all().to_pylist()
    assert all(not c["catalog_db_schemas"] for c in objects)
    with pytest.raises(adbc_driver_manager.Error) as err:
        conn.cursor().execute("SELECT * FROM clinical.patients")
    assert "not found" in str(err.value)
    conn.close()


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELEC * FROM clinical.patients", "SQL error"),
        ("SELECT * FROM '/etc/passwd'", "not found"),
        ("SELECT * FROM 'curated/clinical/patients/part-00000.parquet'", "not found"),
        ("DROP TABLE clinical.patients", "DROP statements are refused"),
        ("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'", "CREATE statements are refused"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY statements are refused"),
        ("SET datafusion.catalog.information_schema = true", "SET statements are refused"),
        ("EXPLAIN SELECT * FROM clinical.patients", "EXPLAIN is refused"),
        # A flat chain parses into a tree as deep as it is long; 5,000 terms once crashed the server.
        ("SELECT " + "+".join(["1"] * 5000), "nests deeper than 1000 levels"),
        ("SELECT count(*) FROM clinical.encounters WHERE " + " OR ".join(["total_cost = 1"] * 2000), "nests deeper"),
    ],
)
def test_bad_input_gets_a_clear_error_and_server_keeps_serving(alice, sql, expected):
    cur = alice.cursor()
    with pytest.raises(adbc_driver_manager.Error) as err:
        cur.execute(sql)
        cur.fetchall()
    assert expected in str(err.value)
    assert "root:" not in str(err.value)
    cur.execute("SELECT 1 AS one")
    assert cur.fetchone() == (1,)


def test_constant_results_match_the_announced_schema(alice):
    # The driver compares DoGet's schema with GetFlightInfo's, nullability included; the
    # optimizer folds these into non-null literals.
    cur = alice.cursor()
    cur.execute("SELECT length('abc') AS n, 1 + 1 AS two, upper('x') AS u")
    assert cur.fetchall() == [(3, 2, "X")]
    cur.execute("SELECT length('abc') + ? AS n", parameters=(2,))
    assert cur.fetchall() == [(5,)]


def test_frank_sees_noisy_columns_and_his_budget(server):
    """What a notebook shows frank: noisy columns marked in the Arrow schema, his budget."""
    conn = connect(server, "frank")
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(DISTINCT patient_id) AS patients FROM clinical.patients")
        table = cur.fetch_arrow_table()
        # Noise of scale 1 at epsilon 1: outside +-21 with probability below 1e-9.
        assert abs(table.column(0)[0].as_py() - PATIENTS) <= 21
        field = table.schema.field("patients")
        assert field.metadata[b"lakegate.dp.noisy"] == b"true"
        assert field.metadata[b"lakegate.dp.mechanism"] == b"discrete_laplace"
        assert table.schema.metadata[b"lakegate.dp.epsilon_spent"] == b"1"

        cur.execute("SELECT rule, epsilon_spent, epsilon_remaining FROM lakegate.privacy_budget")
        rule, spent, remaining = cur.fetchone()
        assert rule == "public-health-dp"
        assert spent >= 1.0 and spent + remaining == 20.0

        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("SELECT max(total_cost) FROM clinical.encounters")
        assert "aggregate max is refused" in str(err.value)
        assert "rule: public-health-dp" in str(err.value)
    finally:
        conn.close()
