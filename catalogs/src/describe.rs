//! What the catalog says about the lake, as an operator or a compliance officer reads it:
//! `lakegate catalog list` and `lakegate catalog show DATASET`. Names, labels, contracts and
//! the files' sizes and times; never a data value.

use std::collections::BTreeMap;
use std::fmt::Write;

use object_store::ObjectMeta;

use crate::{Catalog, CatalogError, Dataset, Lake, Result, LABELS};

/// One line per dataset: zone, format, files, bytes, columns per sensitivity label,
/// retention and owner.
pub async fn list(lake: &Lake) -> Result<String> {
    let catalog = Catalog::load(lake).await?;
    let store = lake.store();
    let mut rows = vec![[
        "dataset".to_string(),
        "zone".into(),
        "format".into(),
        "files".into(),
        "bytes".into(),
        "columns by label".into(),
        "retention".into(),
        "owner".into(),
    ]];
    for d in &catalog.datasets {
        let files = d.file_versions(&store).await?;
        rows.push([
            d.name.clone(),
            d.zone.clone(),
            catalog_name(&d.format),
            files.len().to_string(),
            bytes(&files).to_string(),
            labels(d),
            retention(d),
            d.owner.clone(),
        ]);
    }
    Ok(table(&rows))
}

/// One dataset in full: its description, tags, owner and retention, its contract (each
/// column's type, nullability and label) and its files (path within the dataset, size, last
/// change).
pub async fn show(lake: &Lake, name: &str) -> Result<String> {
    let catalog = Catalog::load(lake).await?;
    let Some(d) = catalog.dataset(name) else {
        let known: Vec<&str> = catalog.datasets.iter().map(|d| d.name.as_str()).collect();
        return Err(CatalogError::InvalidEntry {
            dataset: name.to_string(),
            reason: format!("no such dataset; the catalog has {}", known.join(", ")),
        });
    };
    let files = d.file_versions(&lake.store()).await?;
    let mut out = String::new();
    let _ = writeln!(out, "dataset      {}", d.name);
    if !d.description.is_empty() {
        let _ = writeln!(out, "description  {}", d.description);
    }
    let _ = writeln!(out, "zone         {}", d.zone);
    let _ = writeln!(out, "format       {}", catalog_name(&d.format));
    let _ = writeln!(out, "location     {}", d.location);
    let _ = writeln!(out, "owner        {}", or_dash(&d.owner));
    let _ = writeln!(out, "tags         {}", or_dash(&d.tags.join(", ")));
    let _ = writeln!(out, "retention    {}", retention(d));
    let _ = writeln!(out, "labels       {}", labels(d));
    out.push('\n');
    let mut rows = vec![[
        "column".to_string(),
        "type".into(),
        "nullable".into(),
        "label".into(),
        "checks".into(),
    ]];
    for c in &d.columns {
        rows.push([
            c.name.clone(),
            catalog_name(&c.data_type),
            if c.nullable { "yes" } else { "no" }.into(),
            c.label.clone(),
            checks(&c.checks),
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let _ = writeln!(out, "{} files, {} bytes", files.len(), bytes(&files));
    let prefix = format!("{}/", d.location.trim_end_matches('/'));
    let mut rows = vec![["file".to_string(), "bytes".into(), "modified (UTC)".into()]];
    for f in &files {
        let path = f.location.as_ref();
        rows.push([
            path.strip_prefix(&prefix).unwrap_or(path).to_string(),
            f.size.to_string(),
            f.last_modified.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    if !files.is_empty() {
        out.push_str(&table(&rows));
    }
    Ok(out)
}

/// A column's contract checks, in the contract's own words (`unique, shape=loinc, min=0`).
fn checks(k: &crate::ColumnChecks) -> String {
    let mut parts = Vec::new();
    if k.unique {
        parts.push("unique".to_string());
    }
    if let Some(r) = &k.references {
        parts.push(format!("references={r}"));
    }
    if let Some(s) = &k.shape {
        parts.push(format!("shape={}", catalog_name(s)));
    }
    if let Some(a) = &k.allowed {
        parts.push(format!("allowed={}", a.join("|")));
    }
    if let Some(b) = &k.min {
        parts.push(format!("min={b}"));
    }
    if let Some(b) = &k.max {
        parts.push(format!("max={b}"));
    }
    if let Some(r) = &k.regex {
        parts.push(format!("regex={r}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// A type or format as `catalog/datasets.json` spells it (`timestamp_utc`, `ndjson`).
fn catalog_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".into(),
    }
}

fn bytes(files: &[ObjectMeta]) -> u64 {
    files.iter().map(|f| f.size).sum()
}

/// `phi.direct=2 phi.quasi=3 ...`, in the order of [`LABELS`].
fn labels(d: &Dataset) -> String {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for c in &d.columns {
        let rank = LABELS
            .iter()
            .position(|l| *l == c.label)
            .unwrap_or(LABELS.len());
        *counts.entry(rank).or_default() += 1;
    }
    counts
        .iter()
        .map(|(rank, n)| format!("{}={n}", LABELS.get(*rank).unwrap_or(&"other")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn retention(d: &Dataset) -> String {
    match d.retention_days {
        Some(days) => format!("{days} days"),
        None => "-".into(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Left-aligned columns separated by two spaces, the first row a header.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{build_demo_lake, DemoOptions};

    async fn demo_lake() -> Lake {
        let lake = Lake::in_memory();
        let opts = DemoOptions {
            patients: 60,
            seed: 42,
            encrypted: false,
            layout: crate::demo::DemoLayout::Folders,
        };
        build_demo_lake(&lake, &opts, |_, _| {}).await.unwrap();
        lake
    }

    #[tokio::test]
    async fn list_names_every_dataset_with_its_files_and_labels() {
        let lake = demo_lake().await;
        let out = list(&lake).await.unwrap();
        let catalog = Catalog::load(&lake).await.unwrap();
        assert_eq!(out.lines().count(), catalog.datasets.len() + 1, "{out}");
        let patients = out
            .lines()
            .find(|l| l.starts_with("clinical.patients "))
            .unwrap();
        let d = catalog.dataset("clinical.patients").unwrap();
        let files = d.file_versions(&lake.store()).await.unwrap();
        let direct = d.columns.iter().filter(|c| c.label == "phi.direct").count();
        assert!(direct > 0);
        assert!(
            patients.contains(&format!("phi.direct={direct}")),
            "{patients}"
        );
        assert!(
            patients.contains(&format!("  {}  ", files.len())),
            "{patients}"
        );
        assert!(patients.contains(&bytes(&files).to_string()), "{patients}");
        // The audit trail is listed with its retention, though it has no files yet.
        let audit = out
            .lines()
            .find(|l| l.starts_with("audit.events "))
            .unwrap();
        assert!(audit.contains("2196 days"), "{audit}");
    }

    #[tokio::test]
    async fn show_gives_the_contract_and_files_but_no_values() {
        let lake = demo_lake().await;
        let out = show(&lake, "clinical.patients").await.unwrap();
        let catalog = Catalog::load(&lake).await.unwrap();
        let d = catalog.dataset("clinical.patients").unwrap();
        for c in &d.columns {
            let line = out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(c.name.as_str()))
                .unwrap_or_else(|| panic!("no line for {}: {out}", c.name));
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells[3], c.label, "{line}");
        }
        assert!(out.contains("part-00000.parquet"), "{out}");
        // Not one value of the data: no patient id appears.
        assert!(!out.contains("P0000"), "{out}");
    }

    #[tokio::test]
    async fn an_unknown_dataset_names_the_ones_there_are() {
        let lake = demo_lake().await;
        let err = show(&lake, "clinical.nope").await.unwrap_err().to_string();
        assert!(err.contains("clinical.nope"), "{err}");
        assert!(err.contains("clinical.patients"), "{err}");
        let empty = Lake::in_memory();
        assert!(matches!(
            list(&empty).await.unwrap_err(),
            CatalogError::NoCatalog
        ));
    }
}
