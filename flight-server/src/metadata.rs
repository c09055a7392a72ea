//! What clients learn about the server and the lake: SqlInfo, and table schemas with Flight
//! SQL's column metadata (type names BI tools and SQLAlchemy reflect).

use arrow::datatypes::Schema;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{SqlInfo, SqlSupportedTransaction};

pub(crate) fn sql_info() -> SqlInfoData {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Lakegate");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.build().expect("static SqlInfo")
}

pub(crate) fn lakegate_engine_catalog() -> &'static str {
    "lakegate"
}

/// A table's schema as GetTables reports it, each column carrying Flight SQL's column metadata
/// (`ARROW:FLIGHT:SQL:*`). Clients build their column listings from it: the ADBC driver's
/// `xdbc_type_name`, and from that SQLAlchemy's reflected types (without a type name, every
/// column reflects as `NullType`, and a BI tool cannot tell a measure from a dimension).
pub(crate) fn with_column_metadata(schema: &Schema, db_schema: &str, table: &str) -> Schema {
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut metadata = f.metadata().clone();
            for (key, value) in [
                ("CATALOG_NAME", lakegate_engine_catalog()),
                ("SCHEMA_NAME", db_schema),
                ("TABLE_NAME", table),
                ("TYPE_NAME", sql_type_name(f.data_type())),
                ("IS_READ_ONLY", "1"),
                ("IS_SEARCHABLE", "1"),
                ("IS_CASE_SENSITIVE", "1"),
                ("IS_AUTO_INCREMENT", "0"),
            ] {
                metadata.insert(format!("ARROW:FLIGHT:SQL:{key}"), value.to_string());
            }
            f.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// The SQL name of an Arrow type, as the engine's SQL dialect spells it in a `CAST`.
pub(crate) fn sql_type_name(t: &arrow::datatypes::DataType) -> &'static str {
    use arrow::datatypes::DataType as T;
    match t {
        T::Boolean => "BOOLEAN",
        T::Int8 => "TINYINT",
        T::Int16 => "SMALLINT",
        T::Int32 => "INTEGER",
        T::Int64 => "BIGINT",
        T::UInt8 => "TINYINT UNSIGNED",
        T::UInt16 => "SMALLINT UNSIGNED",
        T::UInt32 => "INTEGER UNSIGNED",
        T::UInt64 => "BIGINT UNSIGNED",
        T::Float16 | T::Float32 => "REAL",
        T::Float64 => "DOUBLE",
        T::Decimal32(..) | T::Decimal64(..) | T::Decimal128(..) | T::Decimal256(..) => "DECIMAL",
        T::Utf8 | T::LargeUtf8 | T::Utf8View => "VARCHAR",
        T::Binary | T::LargeBinary | T::BinaryView | T::FixedSizeBinary(_) => "BYTEA",
        T::Date32 | T::Date64 => "DATE",
        T::Time32(_) | T::Time64(_) => "TIME",
        T::Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE",
        T::Timestamp(_, None) => "TIMESTAMP",
        T::Interval(_) => "INTERVAL",
        _ => "OTHER",
    }
}
