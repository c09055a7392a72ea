//! Reading an incoming file into batches of the contract's columns, row by row, so that one
//! bad row is quarantined with its rule instead of failing the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int32Builder, Int64Builder,
    RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::compute::kernels::cast_utils::Parser;
use arrow::datatypes::{
    DataType, Date32Type, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use parquet::encryption::decrypt::FileDecryptionProperties;
use serde_json::Value;

use crate::model::{ColumnType, Dataset};

/// Rows per batch handed to the checks and the writer.
pub(super) const BATCH_ROWS: usize = 16 * 1024;

/// The formats an incoming file may have, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    Csv,
    Ndjson,
    Parquet,
}

impl SourceFormat {
    /// The format a file name declares (`.csv`, `.jsonl` / `.ndjson` / `.json`, `.parquet`).
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let ext = lower.rsplit_once('.').map(|(_, e)| e)?;
        match ext {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" | "json" => Some(Self::Ndjson),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// One rule that a row broke.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The contract column, or none for a whole-row rule (column count, JSON).
    pub column: Option<usize>,
    /// The rule's stable name (`ColumnChecks::RULES`).
    pub rule: &'static str,
    /// What was expected, never the value itself.
    pub reason: String,
}

/// A batch of decoded rows: every contract column (all nullable here; `not_null` is a rule),
/// each row's number in its file (1-based, header excluded) and what it broke so far.
pub struct Chunk {
    pub batch: RecordBatch,
    pub rows: Vec<u64>,
    pub failures: Vec<Vec<Failure>>,
}

/// Whatever makes a whole file unreadable as its declared format.
#[derive(Debug)]
pub struct FileProblem(pub String);

/// The contract's columns, all nullable: rows are decoded before `not_null` is checked.
pub(super) fn loose_schema(dataset: &Dataset) -> SchemaRef {
    Arc::new(Schema::new(
        dataset
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.to_arrow(), true))
            .collect::<Vec<_>>(),
    ))
}

/// A reader of one incoming file.
pub trait Decoder: Send {
    /// The next rows, or none at the end.
    fn next_chunk(&mut self) -> Result<Option<Chunk>, FileProblem>;
}

/// Open `path` as `format` for `dataset`; `read` counts the bytes consumed (progress). A
/// Parquet file sealed with `keys` (the dataset's own data keys, when it is encrypted at rest)
/// is read with them.
pub fn open(
    format: SourceFormat,
    path: &FsPath,
    dataset: &Dataset,
    keys: Option<Arc<FileDecryptionProperties>>,
    read: Arc<AtomicU64>,
) -> Result<Box<dyn Decoder>, FileProblem> {
    let file = File::open(path).map_err(|e| FileProblem(format!("cannot open: {e}")))?;
    let counted = Counted {
        inner: file,
        read: Arc::clone(&read),
    };
    Ok(match format {
        SourceFormat::Csv => Box::new(CsvDecoder::new(counted, dataset)?),
        SourceFormat::Ndjson => Box::new(NdjsonDecoder::new(counted, dataset)),
        SourceFormat::Parquet => {
            let file = File::open(path).map_err(|e| FileProblem(format!("cannot open: {e}")))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            Box::new(ParquetDecoder::new(file, size, dataset, keys, read)?)
        }
    })
}

struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// One column being built from text or JSON values.
enum Column {
    Utf8(StringBuilder),
    Bool(BooleanBuilder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Column {
    fn new(t: ColumnType) -> Self {
        match t {
            ColumnType::Utf8 => Column::Utf8(StringBuilder::new()),
            ColumnType::Bool => Column::Bool(BooleanBuilder::new()),
            ColumnType::Int32 => Column::Int32(Int32Builder::new()),
            ColumnType::Int64 => Column::Int64(Int64Builder::new()),
            ColumnType::Float64 => Column::Float64(Float64Builder::new()),
            ColumnType::Date32 => Column::Date32(Date32Builder::new()),
            ColumnType::TimestampUtc => {
                Column::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
        }
    }

    fn push_null(&mut self) {
        match self {
            Column::Utf8(b) => b.append_null(),
            Column::Bool(b) => b.append_null(),
            Column::Int32(b) => b.append_null(),
            Column::Int64(b) => b.append_null(),
            Column::Float64(b) => b.append_null(),
            Column::Date32(b) => b.append_null(),
            Column::Timestamp(b) => b.append_null(),
        }
    }

    /// What a value of the column must look like.
    fn expected(&self) -> &'static str {
        match self {
            Column::Utf8(_) => "text",
            Column::Bool(_) => "not a boolean (true/false)",
            Column::Int32(_) => "not a 32-bit integer",
            Column::Int64(_) => "not a 64-bit integer",
            Column::Float64(_) => "not a finite number",
            Column::Date32(_) => "not a date (YYYY-MM-DD)",
            Column::Timestamp(_) => "not a timestamp (ISO 8601; UTC unless an offset is given)",
        }
    }

    /// Append a text value parsed as the column's type; on failure append null and say what
    /// was expected.
    fn push_text(&mut self, s: &str) -> Result<(), &'static str> {
        if let Column::Utf8(b) = self {
            b.append_value(s);
            return Ok(());
        }
        let t = s.trim();
        let ok = match self {
            Column::Utf8(_) => unreachable!("text is appended as it is"),
            Column::Bool(b) => {
                let v = match t.to_ascii_lowercase().as_str() {
                    "true" | "t" | "1" => Some(true),
                    "false" | "f" | "0" => Some(false),
                    _ => None,
                };
                v.map(|v| b.append_value(v)).is_some()
            }
            Column::Int32(b) => t.parse().map(|v| b.append_value(v)).is_ok(),
            Column::Int64(b) => t.parse().map(|v| b.append_value(v)).is_ok(),
            Column::Float64(b) => t
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(|v| b.append_value(v))
                .is_some(),
            Column::Date32(b) => Date32Type::parse(t).map(|v| b.append_value(v)).is_some(),
            Column::Timestamp(b) => TimestampMicrosecondType::parse(t)
                .map(|v| b.append_value(v))
                .is_some(),
        };
        if ok {
            return Ok(());
        }
        self.push_null();
        Err(self.expected())
    }

    /// Append a JSON value: strings for text, dates and times; numbers and booleans as such.
    fn push_json(&mut self, v: &Value) -> Result<(), &'static str> {
        let ok = match (&mut *self, v) {
            (_, Value::Null) => {
                self.push_null();
                true
            }
            (Column::Date32(_) | Column::Timestamp(_), Value::String(s)) => {
                return self.push_text(s);
            }
            (Column::Utf8(b), Value::String(s)) => {
                b.append_value(s);
                true
            }
            (Column::Bool(b), Value::Bool(x)) => {
                b.append_value(*x);
                true
            }
            (Column::Int32(b), Value::Number(n)) => n
                .as_i64()
                .and_then(|x| i32::try_from(x).ok())
                .map(|x| b.append_value(x))
                .is_some(),
            (Column::Int64(b), Value::Number(n)) => n.as_i64().map(|x| b.append_value(x)).is_some(),
            (Column::Float64(b), Value::Number(n)) => {
                n.as_f64().map(|x| b.append_value(x)).is_some()
            }
            _ => false,
        };
        if ok {
            return Ok(());
        }
        self.push_null();
        Err(match v {
            Value::Number(_) | Value::String(_) | Value::Bool(_) => self.expected(),
            _ => "a JSON value of the wrong kind for the column's type",
        })
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Utf8(b) => {
                // The next chunk starts with room for as much text as this one held.
                let bytes = b.values_slice().len();
                let array = b.finish();
                *b = StringBuilder::with_capacity(BATCH_ROWS, bytes + bytes / 8);
                Arc::new(array)
            }
            Column::Bool(b) => Arc::new(b.finish()),
            Column::Int32(b) => Arc::new(b.finish()),
            Column::Int64(b) => Arc::new(b.finish()),
            Column::Float64(b) => Arc::new(b.finish()),
            Column::Date32(b) => Arc::new(b.finish()),
            Column::Timestamp(b) => Arc::new(b.finish()),
        }
    }
}

/// Rows decoded from text (CSV, NDJSON) into a chunk.
struct Rows {
    schema: SchemaRef,
    columns: Vec<Column>,
    rows: Vec<u64>,
    failures: Vec<Vec<Failure>>,
}

impl Rows {
    fn new(dataset: &Dataset) -> Self {
        Self {
            schema: loose_schema(dataset),
            columns: dataset
                .columns
                .iter()
                .map(|c| Column::new(c.data_type))
                .collect(),
            rows: Vec::with_capacity(BATCH_ROWS),
            failures: Vec::with_capacity(BATCH_ROWS),
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// A row that could not be split into columns: nulls everywhere, one whole-row failure.
    fn push_broken(&mut self, row: u64, rule: &'static str, reason: String) {
        for c in &mut self.columns {
            c.push_null();
        }
        self.rows.push(row);
        self.failures.push(vec![Failure {
            column: None,
            rule,
            reason,
        }]);
    }

    fn take(&mut self) -> Option<Chunk> {
        if self.rows.is_empty() {
            return None;
        }
        let arrays = self.columns.iter_mut().map(Column::finish).collect();
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .expect("builders follow the schema");
        Some(Chunk {
            batch,
            rows: std::mem::take(&mut self.rows),
            failures: std::mem::take(&mut self.failures),
        })
    }
}

struct CsvDecoder {
    reader: csv::Reader<Counted<File>>,
    /// For each contract column, its field in the file.
    fields: Vec<usize>,
    width: usize,
    rows: Rows,
    row: u64,
    record: csv::ByteRecord,
    done: bool,
}

impl CsvDecoder {
    fn new(source: Counted<File>, dataset: &Dataset) -> Result<Self, FileProblem> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(source);
        let header = reader
            .byte_headers()
            .map_err(|e| FileProblem(format!("not a CSV file: {e}")))?
            .clone();
        if header.is_empty() {
            return Err(FileProblem("the file is empty".into()));
        }
        let names: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let h = if i == 0 {
                    h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h)
                } else {
                    h
                };
                std::str::from_utf8(h)
                    .map(|s| s.trim().to_string())
                    .map_err(|_| FileProblem("the header is not UTF-8 text: not a CSV file".into()))
            })
            .collect::<Result<_, _>>()?;
        let fields = match_columns(dataset, &names)?;
        Ok(Self {
            reader,
            fields,
            width: names.len(),
            rows: Rows::new(dataset),
            row: 0,
            record: csv::ByteRecord::new(),
            done: false,
        })
    }
}

/// Where each contract column is among a file's column names: every contract column once,
/// nothing else (a missing or extra column is a whole-file problem, never a silent NULL).
fn match_columns(dataset: &Dataset, names: &[String]) -> Result<Vec<usize>, FileProblem> {
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        if at.insert(n.as_str(), i).is_some() {
            return Err(FileProblem(format!("wrong columns: '{n}' appears twice")));
        }
    }
    let missing: Vec<&str> = dataset
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| !at.contains_key(n))
        .collect();
    let extra: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| dataset.column(n).is_none())
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(FileProblem(format!(
            "wrong columns: missing [{}], not in the contract [{}]",
            missing.join(", "),
            extra.join(", ")
        )));
    }
    Ok(dataset
        .columns
        .iter()
        .map(|c| at[c.name.as_str()])
        .collect())
}

impl Decoder for CsvDecoder {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, FileProblem> {
        while !self.done && self.rows.len() < BATCH_ROWS {
            match self.reader.read_byte_record(&mut self.record) {
                Ok(false) => self.done = true,
                Ok(true) => {
                    self.row += 1;
                    if self.record.len() != self.width {
                        let reason = format!(
                            "{} fields where the header has {}",
                            self.record.len(),
                            self.width
                        );
                        self.rows.push_broken(self.row, "column_count", reason);
                        continue;
                    }
                    let mut failures = Vec::new();
                    // UTF-8 checked once per row; a field is text when the row is and the
                    // field starts and ends on character boundaries.
                    let whole = std::str::from_utf8(self.record.as_slice()).ok();
                    for (j, &f) in self.fields.iter().enumerate() {
                        let column = &mut self.rows.columns[j];
                        let bytes = &self.record[f];
                        if bytes.is_empty() {
                            column.push_null();
                            continue;
                        }
                        let text = match (whole, self.record.range(f)) {
                            (Some(all), Some(r))
                                if all.is_char_boundary(r.start) && all.is_char_boundary(r.end) =>
                            {
                                Ok(&all[r])
                            }
                            _ => std::str::from_utf8(bytes),
                        };
                        let Ok(text) = text else {
                            column.push_null();
                            failures.push(Failure {
                                column: Some(j),
                                rule: "utf8",
                                reason: "not UTF-8 text".into(),
                            });
                            continue;
                        };
                        if let Err(reason) = column.push_text(text) {
                            failures.push(Failure {
                                column: Some(j),
                                rule: "type",
                                reason: reason.into(),
                            });
                        }
                    }
                    self.rows.rows.push(self.row);
                    self.rows.failures.push(failures);
                }
                Err(e) => {
                    return Err(FileProblem(format!(
                        "unreadable after row {}: {}",
                        self.row,
                        e.kind_summary()
                    )))
                }
            }
        }
        Ok(self.rows.take())
    }
}

trait KindSummary {
    fn kind_summary(&self) -> String;
}

impl KindSummary for csv::Error {
    /// The csv error without the record's content.
    fn kind_summary(&self) -> String {
        match self.kind() {
            csv::ErrorKind::Io(e) => e.to_string(),
            _ => "malformed CSV".into(),
        }
    }
}

struct NdjsonDecoder {
    reader: BufReader<Counted<File>>,
    names: HashMap<String, usize>,
    rows: Rows,
    row: u64,
    line: Vec<u8>,
    done: bool,
}

impl NdjsonDecoder {
    fn new(source: Counted<File>, dataset: &Dataset) -> Self {
        Self {
            reader: BufReader::with_capacity(1 << 20, source),
            names: dataset
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            rows: Rows::new(dataset),
            row: 0,
            line: Vec::new(),
            done: false,
        }
    }

    fn decode_line(&mut self) {
        let line = self.line.trim_ascii();
        let Ok(text) = std::str::from_utf8(line) else {
            return self
                .rows
                .push_broken(self.row, "utf8", "the line is not UTF-8 text".into());
        };
        let object = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                return self
                    .rows
                    .push_broken(self.row, "json", "not a JSON object".into())
            }
            Err(e) => {
                let reason = format!("not JSON ({} at column {})", classify(&e), e.column());
                return self.rows.push_broken(self.row, "json", reason);
            }
        };
        let mut failures = Vec::new();
        let mut seen = vec![false; self.rows.columns.len()];
        for (key, value) in &object {
            let Some(&j) = self.names.get(key) else {
                failures.push(Failure {
                    column: None,
                    rule: "unknown_column",
                    reason: format!("key '{key}' is not a column of the contract"),
                });
                continue;
            };
            seen[j] = true;
            if let Err(reason) = self.rows.columns[j].push_json(value) {
                failures.push(Failure {
                    column: Some(j),
                    rule: "type",
                    reason: reason.into(),
                });
            }
        }
        for (j, s) in seen.iter().enumerate() {
            if !s {
                self.rows.columns[j].push_null();
            }
        }
        self.rows.rows.push(self.row);
        self.rows.failures.push(failures);
    }
}

fn classify(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong data",
        serde_json::error::Category::Eof => "cut short",
    }
}

impl Decoder for NdjsonDecoder {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, FileProblem> {
        while !self.done && self.rows.len() < BATCH_ROWS {
            self.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .map_err(|e| FileProblem(format!("unreadable after row {}: {e}", self.row)))?;
            if n == 0 {
                self.done = true;
                break;
            }
            if self.line.trim_ascii().is_empty() {
                continue;
            }
            self.row += 1;
            if self.row == 1 && !self.line.trim_ascii_start().starts_with(b"{") {
                return Err(FileProblem(
                    "not NDJSON: the first line is not a JSON object".into(),
                ));
            }
            self.decode_line();
        }
        Ok(self.rows.take())
    }
}

struct ParquetDecoder {
    reader: ParquetRecordBatchReader,
    /// For each contract column, its column in the file's batches.
    fields: Vec<usize>,
    schema: SchemaRef,
    row: u64,
    read: Arc<AtomicU64>,
    size: u64,
    total_rows: u64,
}

impl ParquetDecoder {
    fn new(
        file: File,
        size: u64,
        dataset: &Dataset,
        keys: Option<Arc<FileDecryptionProperties>>,
        read: Arc<AtomicU64>,
    ) -> Result<Self, FileProblem> {
        let mut options = ArrowReaderOptions::new();
        if let Some(keys) = keys {
            options = options.with_file_decryption_properties(keys);
        }
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
            .map_err(|e| FileProblem(format!("not a Parquet file: {e}")))?;
        let file_schema = Arc::clone(builder.schema());
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let names: Vec<String> = file_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let fields = match_columns(dataset, &names)?;
        for (c, &f) in dataset.columns.iter().zip(&fields) {
            let actual = file_schema.field(f).data_type();
            if !castable(actual, &c.data_type.to_arrow()) {
                return Err(FileProblem(format!(
                    "wrong columns: '{}' is {actual} in the file, the contract says {}",
                    c.name,
                    c.data_type.name()
                )));
            }
        }
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| FileProblem(format!("not a Parquet file: {e}")))?;
        Ok(Self {
            reader,
            fields,
            schema: loose_schema(dataset),
            row: 0,
            read,
            size,
            total_rows,
        })
    }
}

/// Whether a Parquet column's type converts to the contract's without loss or guesswork:
/// the same type, another string encoding, a narrower integer, a UTC timestamp of another unit.
fn castable(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    from == to
        || match (from, to) {
            (LargeUtf8 | Utf8View, Utf8) => true,
            (Int8 | Int16 | UInt8 | UInt16, Int32) => true,
            (Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32, Int64) => true,
            (Float32, Float64) => true,
            (Timestamp(_, Some(tz)), Timestamp(TimeUnit::Microsecond, Some(_))) => {
                matches!(tz.as_ref(), "UTC" | "+00:00" | "Z" | "Etc/UTC")
            }
            _ => false,
        }
}

impl Decoder for ParquetDecoder {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, FileProblem> {
        let Some(batch) = self.reader.next() else {
            self.read.store(self.size, Ordering::Relaxed);
            return Ok(None);
        };
        let batch =
            batch.map_err(|e| FileProblem(format!("unreadable after row {}: {e}", self.row)))?;
        let arrays = self
            .fields
            .iter()
            .zip(self.schema.fields())
            .map(|(&f, field)| arrow::compute::cast(batch.column(f), field.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FileProblem(format!("a column does not convert: {e}")))?;
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map_err(|e| FileProblem(e.to_string()))?;
        let n = batch.num_rows() as u64;
        let rows = (self.row + 1..=self.row + n).collect();
        self.row += n;
        // Progress by rows: a Parquet file is read by column chunks, not front to back.
        if self.total_rows > 0 {
            let done = self.size as u128 * self.row as u128 / self.total_rows as u128;
            self.read.store(done as u64, Ordering::Relaxed);
        }
        Ok(Some(Chunk {
            failures: vec![Vec::new(); n as usize],
            batch,
            rows,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    fn two_text_columns() -> Dataset {
        crate::parse_contract(
            "test",
            r#"
dataset = "t.t"
[[columns]]
name = "a"
type = "utf8"
label = "clinical"
[[columns]]
name = "b"
type = "utf8"
label = "clinical"
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_character_split_across_two_fields_is_not_text_in_either() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        // Row 1: "é" (C3 A9) cut by the delimiter; the row's bytes without the delimiter
        // would be valid UTF-8, its fields are not. Row 2: the same letter whole.
        std::fs::write(&path, b"a,b\nx\xC3,\xA9y\nok,\xC3\xA9\n").unwrap();
        let dataset = two_text_columns();
        let mut decoder = open(
            SourceFormat::Csv,
            &path,
            &dataset,
            None,
            Arc::new(AtomicU64::new(0)),
        )
        .unwrap();
        let chunk = decoder.next_chunk().unwrap().unwrap();
        assert_eq!(chunk.rows, vec![1, 2]);
        let rules: Vec<_> = chunk.failures[0]
            .iter()
            .map(|f| (f.column, f.rule))
            .collect();
        assert_eq!(rules, vec![(Some(0), "utf8"), (Some(1), "utf8")]);
        assert!(chunk.failures[1].is_empty());
        let b = chunk.batch.column(1).as_string::<i32>();
        assert_eq!(b.value(1), "é");
        assert!(decoder.next_chunk().unwrap().is_none());
    }
}
