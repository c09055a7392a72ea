//! The demo personas and grants of `shared/SCENARIO.md`.

use std::collections::BTreeMap;

use lakegate_policies::{PolicyError, UserStore};

/// The demo personas: user NAME, password `demo-NAME`, and their attributes.
pub const PERSONAS: &[(&str, &[(&str, &str)])] = &[
    (
        "alice",
        &[
            ("role", "data_scientist"),
            ("project", "oncology"),
            ("purpose", "model_training"),
            ("environment", "sandbox"),
        ],
    ),
    (
        "bob",
        &[
            ("role", "analyst"),
            ("project", "readmissions"),
            ("purpose", "operations"),
        ],
    ),
    (
        "carol",
        &[
            ("role", "clinician"),
            ("site", "SITE_A"),
            ("purpose", "treatment"),
        ],
    ),
    (
        "dave",
        &[
            ("role", "data_scientist"),
            ("project", "cardiology"),
            ("purpose", "model_training"),
            ("environment", "production"),
        ],
    ),
    (
        "erin",
        &[("role", "compliance_auditor"), ("release_approver", "true")],
    ),
    (
        "frank",
        &[("role", "researcher"), ("purpose", "public_health")],
    ),
    (
        "gina",
        &[("role", "data_engineer"), ("purpose", "data_ingestion")],
    ),
    ("mallory", &[]),
];

/// The demo policy (policies/demo/policy.toml).
pub const DEMO_POLICY: &str = include_str!("../../policies/demo/policy.toml");

/// Projects that get a pseudonymization key in the demo's key file.
pub const DEMO_PROJECTS: &[&str] = &["oncology", "cardiology", "readmissions"];

/// The demo users, with Argon2-hashed passwords. Hashing is slow by design: call it off the
/// async workers.
pub fn demo_users() -> Result<UserStore, PolicyError> {
    let mut users = UserStore::default();
    for (name, attrs) in PERSONAS {
        let attributes: BTreeMap<String, String> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        users.add(name, &format!("demo-{name}"), attributes)?;
    }
    Ok(users)
}
