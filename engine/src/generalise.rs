//! The generalisations a policy's `[release]` section names, as SQL over a release query's
//! output: dates and times to a month, year or decade, dates of birth to age bands, ZIP codes
//! to their state, or a column left out. The expressions keep each column's lineage, so a
//! generalised quasi-identifier is still counted by the risk gate.

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, SchemaRef};
use lakegate_policies::{Generalisation, ReleaseRules};

use crate::{EngineError, Result};

/// The oldest age Safe Harbor lets stand on its own: every age above it is one band.
const AGE_TOP: i32 = 89;

/// US ZIP3 prefixes (inclusive ranges) and the state or territory each belongs to, after the
/// USPS's assignment. Military (AA, AE, AP) and unassigned prefixes name no state.
const ZIP3_STATES: &[(&str, &str, &str)] = &[
    ("005", "005", "NY"),
    ("006", "007", "PR"),
    ("008", "008", "VI"),
    ("009", "009", "PR"),
    ("010", "027", "MA"),
    ("028", "029", "RI"),
    ("030", "038", "NH"),
    ("039", "049", "ME"),
    ("050", "059", "VT"),
    ("060", "069", "CT"),
    ("070", "089", "NJ"),
    ("100", "149", "NY"),
    ("150", "196", "PA"),
    ("197", "199", "DE"),
    ("200", "200", "DC"),
    ("201", "201", "VA"),
    ("202", "205", "DC"),
    ("206", "219", "MD"),
    ("220", "246", "VA"),
    ("247", "268", "WV"),
    ("270", "289", "NC"),
    ("290", "299", "SC"),
    ("300", "319", "GA"),
    ("320", "339", "FL"),
    ("341", "349", "FL"),
    ("350", "369", "AL"),
    ("370", "385", "TN"),
    ("386", "397", "MS"),
    ("398", "399", "GA"),
    ("400", "427", "KY"),
    ("430", "459", "OH"),
    ("460", "479", "IN"),
    ("480", "499", "MI"),
    ("500", "528", "IA"),
    ("530", "549", "WI"),
    ("550", "567", "MN"),
    ("569", "569", "DC"),
    ("570", "577", "SD"),
    ("580", "588", "ND"),
    ("590", "599", "MT"),
    ("600", "629", "IL"),
    ("630", "658", "MO"),
    ("660", "679", "KS"),
    ("680", "693", "NE"),
    ("700", "714", "LA"),
    ("716", "729", "AR"),
    ("730", "732", "OK"),
    ("733", "733", "TX"),
    ("734", "749", "OK"),
    ("750", "799", "TX"),
    ("800", "816", "CO"),
    ("820", "831", "WY"),
    ("832", "838", "ID"),
    ("840", "847", "UT"),
    ("850", "865", "AZ"),
    ("870", "884", "NM"),
    ("885", "885", "TX"),
    ("889", "898", "NV"),
    ("900", "961", "CA"),
    ("967", "968", "HI"),
    ("969", "969", "GU"),
    ("970", "979", "OR"),
    ("980", "994", "WA"),
    ("995", "999", "AK"),
];

pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn state_of(c: &str) -> String {
    let p = format!("substr(CAST({c} AS VARCHAR), 1, 3)");
    let mut sql = format!("CASE WHEN NOT regexp_like({p}, '^[0-9]{{3}}$') THEN NULL");
    for (lo, hi, state) in ZIP3_STATES {
        if lo == hi {
            sql.push_str(&format!(" WHEN {p} = '{lo}' THEN '{state}'"));
        } else {
            sql.push_str(&format!(
                " WHEN {p} BETWEEN '{lo}' AND '{hi}' THEN '{state}'"
            ));
        }
    }
    sql.push_str(" END");
    sql
}

/// The band of ages `width` wide that a date of birth gives in `year`.
fn age_band_of(c: &str, width: u8, year: i32) -> String {
    let age = format!("greatest({year} - CAST(date_part('year', {c}) AS INT), 0)");
    let low = format!("({age} / {width} * {width})");
    format!(
        "CASE WHEN {c} IS NULL THEN NULL WHEN {age} > {AGE_TOP} THEN '90+' \
         ELSE concat(CAST({low} AS VARCHAR), '-', \
         CAST(least({low} + {}, {AGE_TOP}) AS VARCHAR)) END",
        width - 1
    )
}

/// The SQL that applies the policy's generalisations to a query's output, with what was
/// generalised (column -> how, as the risk report states it) and what dropped. `year` is the
/// year that ages are counted to.
pub(crate) fn generalise(
    sql: &str,
    schema: &SchemaRef,
    rules: &ReleaseRules,
    year: i32,
) -> Result<(String, BTreeMap<String, String>, Vec<String>)> {
    let mut exprs = Vec::new();
    let mut generalised = BTreeMap::new();
    let mut dropped = Vec::new();
    for f in schema.fields() {
        let c = quote(f.name());
        let Some(g) = rules.generalise.get(f.name()) else {
            exprs.push(c);
            continue;
        };
        let is_date = matches!(f.data_type(), DataType::Date32 | DataType::Date64);
        let is_time = matches!(f.data_type(), DataType::Timestamp(_, _));
        let is_text = matches!(
            f.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        );
        let (expr, stated) = match g {
            Generalisation::Drop => {
                dropped.push(f.name().clone());
                continue;
            }
            Generalisation::Month | Generalisation::Year if is_date => (
                format!("CAST(date_trunc('{g}', {c}) AS DATE)"),
                g.to_string(),
            ),
            Generalisation::Month | Generalisation::Year if is_time => {
                (format!("date_trunc('{g}', {c})"), g.to_string())
            }
            Generalisation::Decade if is_date => (
                format!(
                    "CAST(make_date(CAST(date_part('year', {c}) AS INT) / 10 * 10, 1, 1) AS DATE)"
                ),
                g.to_string(),
            ),
            Generalisation::AgeBand(width) if is_date || is_time => (
                age_band_of(&c, *width, year),
                format!("{g} (age in {year})"),
            ),
            Generalisation::State if is_text => (state_of(&c), g.to_string()),
            g => {
                let applies = match g {
                    Generalisation::Month | Generalisation::Year => "dates and times",
                    Generalisation::Decade => "dates",
                    Generalisation::AgeBand(_) => "dates of birth",
                    _ => "ZIP codes as text",
                };
                return Err(EngineError::InvalidConfig(format!(
                    "the policy's [release] section generalises {} to {g}, which applies to \
                     {applies}, not to {}",
                    f.name(),
                    f.data_type()
                )));
            }
        };
        generalised.insert(f.name().clone(), stated);
        exprs.push(format!("{expr} AS {c}"));
    }
    if exprs.is_empty() {
        return Err(EngineError::InvalidConfig(
            "the policy's [release] section drops every column of the query".into(),
        ));
    }
    Ok((
        format!(
            "SELECT {} FROM ({sql}) AS lakegate_release",
            exprs.join(", ")
        ),
        generalised,
        dropped,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Date32Array, RecordBatch, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::SessionContext;

    use super::*;

    /// The state a ZIP code's first three digits belong to, if any.
    fn zip3_state(zip: &str) -> Option<&'static str> {
        let p = zip.get(..3)?;
        if !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ZIP3_STATES
            .iter()
            .find(|(lo, hi, _)| *lo <= p && p <= *hi)
            .map(|(_, _, s)| *s)
    }

    #[test]
    fn zip3_prefixes_name_their_state() {
        assert_eq!(zip3_state("02139"), Some("MA"));
        assert_eq!(zip3_state("021"), Some("MA"));
        assert_eq!(zip3_state("10001"), Some("NY"));
        assert_eq!(zip3_state("20500"), Some("DC"));
        assert_eq!(zip3_state("201"), Some("VA"));
        assert_eq!(zip3_state("73301"), Some("TX"));
        assert_eq!(zip3_state("94110"), Some("CA"));
        assert_eq!(zip3_state("99501"), Some("AK"));
        // Restricted areas masked to 000, military and unassigned prefixes, and non-ZIPs.
        for none in ["000", "09012", "340", "96201", "715", "12", "A1234", ""] {
            assert_eq!(zip3_state(none), None, "{none}");
        }
        // The table is ordered and its ranges do not overlap.
        for w in ZIP3_STATES.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:?}");
        }
    }

    /// The SQL that `generalise` writes, run by DataFusion, agrees with the Rust table for
    /// every 3-digit prefix, and bands ages with 90+ together.
    #[tokio::test]
    async fn the_generalising_sql_gives_states_and_age_bands() {
        let zips: Vec<Option<String>> = (0..1000)
            .map(|p| Some(format!("{p:03}42")))
            .chain([None, Some("000".into()), Some("x1".into())])
            .collect();
        let n = zips.len();
        // Birth years 1900..=2026 in turn, and one null.
        let births: Vec<Option<i32>> = (0..n)
            .map(|i| {
                (i + 1 < n).then(|| {
                    let year = 1900 + (i % 127) as i32;
                    chrono::NaiveDate::from_ymd_opt(year, 6, 1)
                        .unwrap()
                        .signed_duration_since(chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
                        .num_days() as i32
                })
            })
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("zip", DataType::Utf8, true),
            Field::new("birth_date", DataType::Date32, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(zips.clone())),
                Arc::new(Date32Array::from(births.clone())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_batch("t", batch).unwrap();
        let mut rules = ReleaseRules::default();
        rules.generalise.insert("zip".into(), Generalisation::State);
        rules
            .generalise
            .insert("birth_date".into(), Generalisation::AgeBand(10));
        let (sql, stated, dropped) = generalise("SELECT * FROM t", &schema, &rules, 2026).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(stated["zip"], "state");
        assert_eq!(stated["birth_date"], "age_band_10 (age in 2026)");
        let out = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        let out = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
        let states = arrow::compute::cast(out.column(0), &DataType::Utf8).unwrap();
        let states = states.as_any().downcast_ref::<StringArray>().unwrap();
        let bands = arrow::compute::cast(out.column(1), &DataType::Utf8).unwrap();
        let bands = bands.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(out.num_rows(), n);
        for i in 0..n {
            let want = zips[i].as_deref().and_then(zip3_state);
            let got = states.is_valid(i).then(|| states.value(i));
            assert_eq!(got, want, "{:?}", zips[i]);
            let got = bands.is_valid(i).then(|| bands.value(i).to_string());
            let want = births[i].map(|_| {
                let age = 2026 - (1900 + (i % 127) as i32);
                if age >= 90 {
                    "90+".to_string()
                } else {
                    let low = age / 10 * 10;
                    format!("{low}-{}", (low + 9).min(89))
                }
            });
            assert_eq!(got, want, "row {i}");
        }
        // A band width that does not divide 90 stops at 89.
        let mut rules = ReleaseRules::default();
        rules
            .generalise
            .insert("birth_date".into(), Generalisation::AgeBand(20));
        let (sql, _, _) = generalise("SELECT * FROM t", &schema, &rules, 2026).unwrap();
        let out = ctx
            .sql(&format!(
                "SELECT DISTINCT birth_date FROM ({sql}) ORDER BY 1"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&out)
            .unwrap()
            .to_string();
        for band in ["0-19", "20-39", "40-59", "60-79", "80-89", "90+"] {
            assert!(text.contains(&format!("| {band} ")), "{band}: {text}");
        }
        assert!(!text.contains("80-99"), "{text}");
        // A generalisation that does not fit the column's type is a configuration error.
        let mut rules = ReleaseRules::default();
        rules.generalise.insert("zip".into(), Generalisation::Month);
        let e = generalise("SELECT * FROM t", &schema, &rules, 2026).unwrap_err();
        assert!(e.to_string().contains("zip to month"), "{e}");
        let mut rules = ReleaseRules::default();
        rules
            .generalise
            .insert("birth_date".into(), Generalisation::State);
        let e = generalise("SELECT * FROM t", &schema, &rules, 2026).unwrap_err();
        assert!(e.to_string().contains("ZIP codes"), "{e}");
    }
}
