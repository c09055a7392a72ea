//! Data contracts: the TOML document that declares a dataset (`lakegate catalog add`).
//!
//! A contract names the dataset, its columns with their types, nullability and sensitivity
//! labels, and the checks every ingested row must pass. It becomes a catalog entry in the
//! `curated` zone; `docs/ingestion.md` documents the format.

use serde::Deserialize;

use crate::model::{Bound, ColumnChecks, ColumnDef, ColumnType, Shape};
use crate::{Catalog, CatalogError, Dataset, FileFormat, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContractDoc {
    dataset: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    retention_days: Option<u32>,
    /// Encrypted at rest unless the contract says otherwise.
    #[serde(default = "yes")]
    encrypted: bool,
    columns: Vec<ColumnDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnDoc {
    name: String,
    #[serde(rename = "type")]
    data_type: ColumnType,
    #[serde(default = "yes")]
    nullable: bool,
    label: String,
    #[serde(default)]
    allowed: Option<Vec<String>>,
    #[serde(default)]
    min: Option<Bound>,
    #[serde(default)]
    max: Option<Bound>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    shape: Option<Shape>,
    #[serde(default)]
    unique: bool,
    #[serde(default)]
    references: Option<String>,
}

fn yes() -> bool {
    true
}

/// Parse a contract into the dataset it declares, checked on its own (names, labels, checks
/// that fit their column types). `source` names the contract in errors.
pub fn parse_contract(source: &str, text: &str) -> Result<Dataset> {
    let doc: ContractDoc = toml::from_str(text).map_err(|e| CatalogError::Contract {
        file: source.to_string(),
        reason: e.to_string(),
    })?;
    let (schema, table) = doc.dataset.split_once('.').unwrap_or(("", &doc.dataset));
    let dataset = Dataset {
        location: format!("curated/{schema}/{table}/"),
        name: doc.dataset,
        zone: "curated".into(),
        columns: doc
            .columns
            .into_iter()
            .map(|c| ColumnDef {
                name: c.name,
                data_type: c.data_type,
                nullable: c.nullable,
                label: c.label,
                checks: ColumnChecks {
                    allowed: c.allowed,
                    min: c.min,
                    max: c.max,
                    regex: c.regex,
                    shape: c.shape,
                    unique: c.unique,
                    references: c.references,
                },
            })
            .collect(),
        tags: doc.tags,
        owner: doc.owner,
        description: doc.description,
        format: FileFormat::Delta,
        retention_days: doc.retention_days,
        encrypted: doc.encrypted,
    };
    dataset.validate()?;
    Ok(dataset)
}

impl Catalog {
    /// Declare a dataset from its contract. A dataset of that name must not exist yet,
    /// unless it is declared identically (adding the same contract twice changes nothing);
    /// its references must name columns of datasets in the catalog.
    pub fn add_dataset(&mut self, dataset: Dataset) -> Result<bool> {
        if dataset.name == crate::AUDIT_DATASET {
            return Err(CatalogError::InvalidEntry {
                dataset: dataset.name,
                reason: "the audit trail is Lakegate's own dataset".into(),
            });
        }
        if let Some(existing) = self.dataset(&dataset.name) {
            if existing == &dataset {
                return Ok(false);
            }
            return Err(CatalogError::InvalidEntry {
                dataset: dataset.name,
                reason: "already declared with a different contract".into(),
            });
        }
        if self.datasets.iter().any(|d| {
            d.location.starts_with(&dataset.location) || dataset.location.starts_with(&d.location)
        }) {
            return Err(CatalogError::InvalidEntry {
                dataset: dataset.name,
                reason: "its folder overlaps another dataset's".into(),
            });
        }
        self.datasets.push(dataset);
        self.validate()?;
        Ok(true)
    }

    /// Declare `dataset` in `lake`: its empty Delta table (version 0), its data keys when it
    /// is encrypted at rest, then the catalog entry, in that order, so a catalog never names a
    /// dataset whose table or keys are missing. An interrupted declaration is finished by the
    /// next one. Returns false when the same contract was already declared.
    pub async fn declare(&mut self, lake: &crate::Lake, dataset: Dataset) -> Result<bool> {
        let declared = dataset.clone();
        if !self.add_dataset(dataset)? {
            return Ok(false);
        }
        if declared.encrypted {
            if crate::keys::exists(lake, &declared.name).await? {
                // Left by an interrupted declaration: kept only if this keyring unwraps them.
                crate::keys::load(lake, &declared.name).await?;
            } else {
                crate::keys::create(lake, &declared.name).await?;
            }
        }
        if !crate::delta::exists(lake, &declared).await? {
            crate::delta::create(lake, &declared).await?;
        }
        self.save(lake).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABS: &str = r#"
dataset = "clinical.lab_results"
description = "Lab results from the hospital's LIS"
owner = "lab-informatics"
retention_days = 2557

[[columns]]
name = "result_id"
type = "utf8"
nullable = false
label = "identifier"
unique = true
regex = "^R[0-9]{6}$"

[[columns]]
name = "loinc_code"
type = "utf8"
nullable = false
label = "clinical"
shape = "loinc"

[[columns]]
name = "value"
type = "float64"
label = "clinical"
min = 0
max = 10000

[[columns]]
name = "taken"
type = "date32"
label = "phi.quasi"
min = "1900-01-01"
"#;

    #[test]
    fn a_contract_declares_a_curated_dataset_with_its_checks() {
        let d = parse_contract("labs.toml", LABS).unwrap();
        assert_eq!(d.name, "clinical.lab_results");
        assert_eq!(d.location, "curated/clinical/lab_results/");
        assert_eq!(d.columns.len(), 4);
        assert!(d.columns[0].checks.unique);
        assert_eq!(d.columns[1].checks.shape, Some(Shape::Loinc));
        assert_eq!(d.columns[2].checks.max, Some(Bound::Number(10000.0)));
        assert_eq!(
            d.columns[3].bound(d.columns[3].checks.min.as_ref().unwrap()),
            Ok(-25567.0)
        );
        let mut catalog = Catalog {
            version: 1,
            datasets: vec![],
        };
        assert!(catalog.add_dataset(d.clone()).unwrap());
        assert!(
            !catalog.add_dataset(d.clone()).unwrap(),
            "same contract again"
        );
        let mut other = d;
        other.description = "changed".into();
        assert!(catalog.add_dataset(other).is_err());
    }

    #[test]
    fn a_bad_contract_is_refused_naming_what_is_wrong() {
        let cases = [
            (
                LABS.replace("\"clinical\"\nshape", "\"secret\"\nshape"),
                "unknown label 'secret'",
            ),
            (
                LABS.replace("type = \"float64\"", "type = \"decimal\""),
                "unknown variant `decimal`",
            ),
            (
                LABS.replace("^R[0-9]{6}$", "^R[0-9"),
                "regex does not compile",
            ),
            (
                LABS.replace("max = 10000", "max = -1"),
                "min 0 is above max -1",
            ),
            (
                LABS.replace("min = \"1900-01-01\"", "min = 5"),
                "bound 5 does not fit a date32",
            ),
            (
                LABS.replace("shape = \"loinc\"", "shape = \"snomed\""),
                "unknown variant `snomed`",
            ),
            (
                LABS.replace("unique = true", "uniqe = true"),
                "unknown field `uniqe`",
            ),
            (
                LABS.replace("[[columns]]", "[[column]]"),
                "unknown field `column`",
            ),
            ("dataset = 3".to_string(), "invalid type"),
            (
                LABS.replace("clinical.lab_results", "Lab Results"),
                "schema.table",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_contract("labs.toml", &text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
    }

    #[test]
    fn references_must_name_a_column_of_the_same_type() {
        let patients = parse_contract(
            "p.toml",
            "dataset = \"clinical.people\"\n[[columns]]\nname = \"pid\"\ntype = \"utf8\"\n\
             label = \"identifier\"\nunique = true\n",
        )
        .unwrap();
        let visits = |target: &str| {
            parse_contract(
                "v.toml",
                &format!(
                    "dataset = \"clinical.visits\"\n[[columns]]\nname = \"pid\"\ntype = \"utf8\"\n\
                     label = \"identifier\"\nreferences = \"{target}\"\n"
                ),
            )
            .unwrap()
        };
        let mut catalog = Catalog {
            version: 1,
            datasets: vec![patients],
        };
        let err = catalog
            .clone()
            .add_dataset(visits("clinical.people.nope"))
            .unwrap_err();
        assert!(err.to_string().contains("not a utf8 column"), "{err}");
        catalog.add_dataset(visits("clinical.people.pid")).unwrap();
    }
}
