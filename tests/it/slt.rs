//! sqllogictest-style files, one per persona (`tests/slt/<persona>.slt`), run against the real
//! server on the shared test lake (400 patients, seed 42).
//!
//! Format (a subset of sqllogictest):
//!
//! ```text
//! # comment
//! query rowsort            <- or `query`: rows compared in order
//! SELECT ...
//! ----
//! value value              <- one line per row, values separated by single spaces
//!
//! statement error <text>   <- the query must fail with a message containing <text>
//! SELECT ...
//! ```
//!
//! `LAKEGATE_SLT_COMPLETE=1 cargo test -p lakegate-tests slt` rewrites the expected rows from
//! what the server returns, for review in the diff.

use std::path::{Path, PathBuf};

use lakegate_tests::TestServer;

use crate::common::{column_text, login, sql};

enum Block {
    Query {
        sort: bool,
        sql: String,
        expected: Vec<String>,
    },
    Error {
        text: String,
        sql: String,
    },
    Comment(String),
}

fn parse(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with('#') {
            blocks.push(Block::Comment(line.to_string()));
            continue;
        }
        let mut sql_lines = Vec::new();
        while let Some(l) = lines.peek() {
            if l.trim().is_empty() || *l == "----" {
                break;
            }
            sql_lines.push(lines.next().unwrap_or_default().to_string());
        }
        let sql = sql_lines.join("\n");
        if let Some(text) = line.strip_prefix("statement error ") {
            blocks.push(Block::Error {
                text: text.to_string(),
                sql,
            });
        } else if line.starts_with("query") {
            let mut expected = Vec::new();
            if lines.peek() == Some(&"----") {
                lines.next();
                while let Some(l) = lines.peek() {
                    if l.trim().is_empty() {
                        break;
                    }
                    expected.push(lines.next().unwrap_or_default().to_string());
                }
            }
            blocks.push(Block::Query {
                sort: line.contains("rowsort"),
                sql,
                expected,
            });
        } else {
            panic!("unrecognised slt line: {line}");
        }
    }
    blocks
}

fn render(blocks: &[Block]) -> String {
    let mut out = String::new();
    for b in blocks {
        match b {
            Block::Comment(c) => {
                out.push_str(c);
                out.push('\n');
            }
            Block::Error { text, sql } => {
                out.push_str(&format!("\nstatement error {text}\n{sql}\n"))
            }
            Block::Query {
                sort,
                sql,
                expected,
            } => {
                out.push_str(&format!(
                    "\nquery{}\n{sql}\n----\n",
                    if *sort { " rowsort" } else { "" }
                ));
                for e in expected {
                    out.push_str(e);
                    out.push('\n');
                }
            }
        }
    }
    out
}

async fn run_file(server: &TestServer, path: &Path) -> Vec<String> {
    let persona = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("persona file name");
    let mut client = login(server, persona).await;
    let complete = std::env::var("LAKEGATE_SLT_COMPLETE").is_ok();
    let mut blocks = parse(&std::fs::read_to_string(path).expect("slt file"));
    let mut failures = Vec::new();
    for b in &mut blocks {
        match b {
            Block::Comment(_) => {}
            Block::Error { text, sql: q } => match sql(&mut client, q).await {
                Ok(_) => failures.push(format!("{persona}: expected an error for\n{q}")),
                Err(e) if !e.to_string().contains(text.as_str()) => failures.push(format!(
                    "{persona}: {q}\n  expected error containing '{text}', got: {e}"
                )),
                Err(_) => {}
            },
            Block::Query {
                sort,
                sql: q,
                expected,
            } => match sql(&mut client, q).await {
                Err(e) => failures.push(format!("{persona}: {q}\n  failed: {e}")),
                Ok(batches) => {
                    let ncols = batches.first().map_or(0, |b| b.num_columns());
                    let cols: Vec<Vec<String>> =
                        (0..ncols).map(|i| column_text(&batches, i)).collect();
                    let nrows = cols.first().map_or(0, Vec::len);
                    let mut actual: Vec<String> = (0..nrows)
                        .map(|r| {
                            cols.iter()
                                .map(|c| c[r].clone())
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .collect();
                    if *sort {
                        actual.sort();
                    }
                    if complete {
                        *expected = actual;
                    } else if *expected != actual {
                        failures.push(format!(
                            "{persona}: {q}\n  expected:\n    {}\n  actual:\n    {}",
                            expected.join("\n    "),
                            actual.join("\n    ")
                        ));
                    }
                }
            },
        }
    }
    if complete {
        std::fs::write(path, render(&blocks).trim_start()).expect("rewrite slt");
    }
    failures
}

#[tokio::test]
async fn persona_sqllogictests() {
    let server = TestServer::start().await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/slt")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "one .slt file per persona");
    let mut failures = Vec::new();
    for f in &files {
        failures.extend(run_file(&server, f).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
