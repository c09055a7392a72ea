//! Statement fingerprints: the SQL's shape with every literal removed, so the trail can say
//! which query ran without ever holding a value the caller typed (an SSN, a name).

use std::ops::ControlFlow;

use sha2::{Digest, Sha256};
use sqlparser::ast::{Expr, Value, ValueWithSpan};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// `(normalized SQL, hex SHA-256 of it)`. Literals, typed literals (`DATE '...'`) and
/// intervals become `?`. SQL that does not parse yields a fixed marker and no hash: hashing raw
/// text would let anyone brute-force a short literal (an SSN) back out of the digest.
///
/// It parses the caller's SQL again, before the engine refuses anything, so it runs on the
/// engine's parse stack and leaves a statement that nests too deep unrendered (see `depth.rs`).
pub fn fingerprint(sql: &str) -> (String, String) {
    crate::depth::on_parse_stack(sql, || normalize(sql))
}

fn normalize(sql: &str) -> (String, String) {
    let Ok(mut statements) = Parser::parse_sql(&GenericDialect {}, sql) else {
        return ("<unparsable>".into(), String::new());
    };
    if statements
        .iter()
        .any(|s| crate::depth::check_sql(s).is_err())
    {
        return ("<too deep>".into(), String::new());
    }
    for s in &mut statements {
        let _ = sqlparser::ast::visit_expressions_mut(s, |e| {
            let literal = match e {
                Expr::Value(v) => !matches!(v.value, Value::Placeholder(_)),
                Expr::TypedString(_) | Expr::Interval(_) => true,
                _ => false,
            };
            if literal {
                *e = Expr::Value(ValueWithSpan::from(Value::Placeholder("?".into())));
            }
            ControlFlow::<()>::Continue(())
        });
    }
    let normalized = statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let digest = super::hex(&Sha256::digest(normalized.as_bytes()));
    (normalized, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_never_survive() {
        let sql = "SELECT first_name, 'Zoë' AS x FROM clinical.patients \
                   WHERE ssn = '123-45-6789' AND birth_date > DATE '1950-01-01' \
                   AND age IN (91, 92) AND mrn LIKE 'MRN0%' LIMIT 5";
        let (f, h) = fingerprint(sql);
        for secret in ["123-45-6789", "Zoë", "1950", "91", "MRN0", "5"] {
            assert!(!f.contains(secret), "{secret} leaked into {f}");
        }
        assert!(f.contains("FROM clinical.patients"), "{f}");
        assert_eq!(h.len(), 64);
        // Same shape, other literals: same fingerprint.
        let other = sql.replace("123-45-6789", "987-65-4321");
        assert_eq!(fingerprint(&other), (f, h));
    }

    #[test]
    fn unparsable_sql_is_not_hashed() {
        assert_eq!(
            fingerprint("SELEC '123-45-6789'"),
            ("<unparsable>".into(), String::new())
        );
        // Nor a statement too deep to render: its literals stay out too.
        let deep = format!("SELECT {}", vec!["'123-45-6789'"; 40_000].join("||"));
        assert_eq!(fingerprint(&deep), ("<too deep>".into(), String::new()));
    }
}
