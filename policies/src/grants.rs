//! Dataset-level grants decided from principal attributes.
//!
//! A rule allows (or denies) a set of datasets to every principal whose attributes match its
//! `when` table; deny beats allow; no matching allow means no access (fail closed).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{PolicyError, Principal, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// One rule of the grant policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRule {
    pub name: String,
    pub effect: Effect,
    /// Attribute name -> accepted values; every listed attribute must match.
    #[serde(default)]
    pub when: BTreeMap<String, Vec<String>>,
    /// Dataset names or `schema.*` patterns.
    pub datasets: Vec<String>,
}

impl GrantRule {
    fn matches(&self, principal: &Principal, dataset: &str) -> bool {
        let attrs_ok = self.when.iter().all(|(k, accepted)| {
            principal
                .attribute(k)
                .is_some_and(|v| accepted.iter().any(|a| a == v))
        });
        attrs_ok && self.datasets.iter().any(|p| pattern_matches(p, dataset))
    }
}

fn pattern_matches(pattern: &str, dataset: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(schema) => dataset.split_once('.').is_some_and(|(s, _)| s == schema),
        None => pattern == "*" || pattern == dataset,
    }
}

/// The outcome of a decision, with the rule that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow { rule: String },
    Deny { rule: Option<String> },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    #[serde(default, rename = "rule")]
    rules: Vec<GrantRule>,
}

/// A loaded grant policy.
#[derive(Clone, Debug, Default)]
pub struct GrantPolicy {
    rules: Vec<GrantRule>,
}

impl GrantPolicy {
    /// Parse a policy file; `known_datasets` catches rules that name a dataset that does not
    /// exist (a typo would otherwise silently grant nothing or, worse, be trusted to deny).
    pub fn from_toml(file: &str, text: &str, known_datasets: &[String]) -> Result<Self> {
        let invalid = |reason: String| PolicyError::InvalidFile {
            file: file.to_string(),
            reason,
        };
        let parsed: GrantFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for r in &parsed.rules {
            for p in &r.datasets {
                if !known_datasets.iter().any(|d| pattern_matches(p, d)) {
                    return Err(invalid(format!(
                        "rule '{}': '{p}' matches no dataset in the catalog",
                        r.name
                    )));
                }
            }
        }
        Ok(Self {
            rules: parsed.rules,
        })
    }

    /// Decide whether `principal` may query `dataset`.
    pub fn decide(&self, principal: &Principal, dataset: &str) -> Decision {
        let matching = || self.rules.iter().filter(|r| r.matches(principal, dataset));
        if let Some(deny) = matching().find(|r| r.effect == Effect::Deny) {
            return Decision::Deny {
                rule: Some(deny.name.clone()),
            };
        }
        match matching().find(|r| r.effect == Effect::Allow) {
            Some(r) => Decision::Allow {
                rule: r.name.clone(),
            },
            None => Decision::Deny { rule: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(attrs: &[(&str, &str)]) -> Principal {
        Principal {
            name: "x".into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn deny_beats_allow_and_default_is_deny() {
        let known = vec![
            "clinical.patients".to_string(),
            "omics.variants".to_string(),
        ];
        let policy = GrantPolicy::from_toml(
            "p.toml",
            r#"
            [[rule]]
            name = "all-scientists"
            effect = "allow"
            when = { role = ["data_scientist"] }
            datasets = ["*"]
            [[rule]]
            name = "no-omics-in-production"
            effect = "deny"
            when = { environment = ["production"] }
            datasets = ["omics.*"]
            "#,
            &known,
        )
        .unwrap();
        let alice = p(&[("role", "data_scientist"), ("environment", "sandbox")]);
        let dave = p(&[("role", "data_scientist"), ("environment", "production")]);
        assert!(policy.decide(&alice, "omics.variants").is_allowed());
        assert_eq!(
            policy.decide(&dave, "omics.variants"),
            Decision::Deny {
                rule: Some("no-omics-in-production".into())
            }
        );
        assert_eq!(
            policy.decide(&p(&[]), "clinical.patients"),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn rule_naming_unknown_dataset_is_refused() {
        let err = GrantPolicy::from_toml(
            "p.toml",
            "[[rule]]\nname='r'\neffect='allow'\ndatasets=['clinical.patinets']\n",
            &["clinical.patients".to_string()],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "p.toml: rule 'r': 'clinical.patinets' matches no dataset in the catalog"
        );
    }
}
