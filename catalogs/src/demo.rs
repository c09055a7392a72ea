//! The demo lake of `shared/SCENARIO.md`: synthetic, Synthea-shaped clinical data.
//!
//! Deterministic: the same seed and patient count give byte-identical Parquet, whatever the
//! number of threads, because every part of the lake has its own random stream derived from
//! (seed, part) and parts are written independently.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::properties::WriterProperties;
use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Catalog, CatalogError, ColumnDef, ColumnType, Dataset, Lake, Result};

/// Options of the demo generator.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub patients: u64,
    pub seed: u64,
    /// Encrypt every dataset at rest with fresh data keys wrapped by the lake handle's keyring
    /// (random keys and nonces: the files are then no longer byte-identical between builds).
    pub encrypted: bool,
}

/// Patients per Parquet part: big enough for efficient files, small enough that a part's
/// observations (about 20 per patient) stay a few tens of MB in memory while generated.
const PATIENTS_PER_PART: u64 = 25_000;
/// Even a small lake is split so that scans exercise multi-file datasets.
const MIN_PARTS: u64 = 4;

/// ZIP3 areas that HIPAA Safe Harbor treats as restricted (population under 20,000).
pub const RESTRICTED_ZIP3: &[&str] = &[
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// Rare conditions, each planted on a fixed handful of patients (fewer than 11 at any scale)
/// so that small-group suppression has something to suppress.
const RARE_CONDITIONS: &[(&str, &str, u64)] = &[
    ("E75.22", "Gaucher disease", 3),
    ("Q87.40", "Marfan syndrome", 7),
    ("D81.0", "Severe combined immunodeficiency", 1),
    ("G71.01", "Duchenne muscular dystrophy", 10),
];

const COMMON_CONDITIONS: &[(&str, &str)] = &[
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("I10", "Essential (primary) hypertension"),
    ("J45.909", "Unspecified asthma, uncomplicated"),
    ("I50.9", "Heart failure, unspecified"),
    ("N18.3", "Chronic kidney disease, stage 3"),
    (
        "J44.9",
        "Chronic obstructive pulmonary disease, unspecified",
    ),
    ("E78.5", "Hyperlipidemia, unspecified"),
    ("F32.9", "Major depressive disorder, single episode"),
    ("C50.919", "Malignant neoplasm of breast, unspecified"),
    ("C34.90", "Malignant neoplasm of lung, unspecified"),
    (
        "I25.10",
        "Atherosclerotic heart disease of native coronary artery",
    ),
    ("M54.5", "Low back pain"),
];

const LABS: &[(&str, &str, &str, f64, f64)] = &[
    ("8867-4", "Heart rate", "/min", 50.0, 120.0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95.0, 180.0),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55.0, 110.0),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        65.0,
        250.0,
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        9.0,
        18.0,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        120.0,
        300.0,
    ),
    (
        "39156-5",
        "Body mass index (BMI) [Ratio]",
        "kg/m2",
        16.0,
        45.0,
    ),
    ("29463-7", "Body weight", "kg", 40.0, 140.0),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        11.0,
    ),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.5,
        3.5,
    ),
];

const FIRST_NAMES: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "José",
    "María",
    "Zoë",
    "Renée",
    "Björn",
    "Søren",
    "Nguyễn",
    "Łukasz",
    "Chloé",
    "Aiyana",
    "Wei",
    "Fatima",
    "Oluwaseun",
    "Dmitri",
    "Siobhán",
    "李",
    "Ana",
];
const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "García",
    "Miller",
    "Davis",
    "Rodríguez",
    "Martínez",
    "Hernández",
    "López",
    "Müller",
    "O'Brien",
    "Nguyễn",
    "Kowalski",
    "Øyelaran",
    "Dubois",
    "Ferreira",
    "Chen",
    "王",
    "Johansson",
    "Nakamura",
    "Patel",
    "Begay",
];
const CITIES: &[(&str, &str)] = &[
    ("Boston", "MA"),
    ("Worcester", "MA"),
    ("Springfield", "MA"),
    ("Portland", "ME"),
    ("Providence", "RI"),
    ("Hartford", "CT"),
    ("Albany", "NY"),
    ("Burlington", "VT"),
    ("Manchester", "NH"),
    ("Cheyenne", "WY"),
    ("Reno", "NV"),
    ("El Paso", "TX"),
];
const STREETS: &[&str] = &[
    "Main",
    "Oak",
    "Maple",
    "Cedar",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
];
const RACES: &[&str] = &["white", "black", "asian", "native", "hawaiian", "other"];
const ETHNICITIES: &[&str] = &["nonhispanic", "hispanic"];
const CLASSES: &[&str] = &[
    "ambulatory",
    "emergency",
    "inpatient",
    "outpatient",
    "wellness",
    "urgentcare",
];
const PAYERS: &[&str] = &[
    "Medicare",
    "Medicaid",
    "Blue Cross",
    "Aetna",
    "UnitedHealthcare",
    "Cigna",
    "Self-pay",
];
const GENES: &[&str] = &[
    "BRCA1", "BRCA2", "TP53", "KRAS", "EGFR", "APOE", "CFTR", "HBB", "LDLR", "PCSK9",
];
const BASES: &[&str] = &["A>G", "G>A", "C>T", "T>C", "del", "dup"];
const SITES: &[&str] = &["SITE_A", "SITE_B", "SITE_C", "SITE_D", "SITE_E"];

/// 2015-01-01 and 2026-01-01 in days since the epoch: the window of care in the demo.
const CARE_START_DAY: i32 = 16_436;
const CARE_END_DAY: i32 = 20_454;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Syllables of the synthetic towns past [`CITIES`], and the states they lie in.
const TOWN_STARTS: &[&str] = &[
    "Ash", "Bell", "Brook", "Cedar", "Clear", "Elm", "Fair", "Green", "High", "Lake", "Maple",
    "Mill", "North", "Oak", "Pine", "Red", "River", "Rock", "Silver", "Spring", "Stone", "Sun",
    "West", "Wood", "Glen",
];
const TOWN_ENDS: &[&str] = &[
    "ton", "ville", "field", "wood", "ford", "dale", "port", "burg", "view", "haven", "ridge",
    "crest", "mont", "brook", "land", "stead",
];
const STATES: &[&str] = &[
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS",
    "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY",
    "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV",
    "WI", "WY",
];
/// Towns by size rank, Zipf-distributed (exponent 1): at a million patients the 12 cities of
/// [`CITIES`] hold about a third of them and thousands of towns fewer than 11.
const TOWNS: usize = 20_000;
/// Long tails past the common codes: ICD-10-shaped reason and condition codes, LOINC-shaped
/// lab codes, Zipf-distributed (exponent 1.2), so that at any scale many codes are held by
/// fewer than 11 patients.
const TAIL_CONDITIONS: usize = 10_000;
const TAIL_LABS: usize = 20_000;
/// Share of draws from the long tail rather than the common codes.
const TAIL_SHARE: f64 = 0.2;
/// Share of patients who are frequent flyers: 50 to 120 encounters, most of them for one
/// chronic condition drawn evenly from the long tail (so usually a rare one).
const FREQUENT_FLYERS: f64 = 0.01;
/// Race groups in proportions of a US population, so the smallest are small.
const RACE_WEIGHTS: &[f64] = &[60.0, 13.0, 6.0, 1.0, 0.2, 19.8];

/// Weights `1 / rank^exponent` for ranks 1..=n.
fn zipf(n: usize, exponent: f64) -> WeightedIndex<f64> {
    WeightedIndex::new((1..=n).map(|r| (r as f64).powf(-exponent))).expect("positive weights")
}

/// The samplers of the skewed columns, built once.
struct Skew {
    towns: WeightedIndex<f64>,
    common_conditions: WeightedIndex<f64>,
    tail_conditions: WeightedIndex<f64>,
    labs: WeightedIndex<f64>,
    tail_labs: WeightedIndex<f64>,
    races: WeightedIndex<f64>,
}

static SKEW: std::sync::LazyLock<Skew> = std::sync::LazyLock::new(|| Skew {
    towns: zipf(TOWNS, 1.0),
    common_conditions: zipf(COMMON_CONDITIONS.len(), 1.0),
    tail_conditions: zipf(TAIL_CONDITIONS, 1.2),
    labs: zipf(LABS.len(), 0.5),
    tail_labs: zipf(TAIL_LABS, 1.2),
    races: WeightedIndex::new(RACE_WEIGHTS).expect("positive weights"),
});

/// The town of size rank `rank`: a real city for the largest, a synthetic name and state for
/// the rest (every pair distinct).
fn town(rank: usize) -> (String, &'static str) {
    if let Some((city, state)) = CITIES.get(rank) {
        return (city.to_string(), state);
    }
    let r = rank - CITIES.len();
    let names = TOWN_STARTS.len() * TOWN_ENDS.len();
    let name = format!(
        "{}{}",
        TOWN_STARTS[r % TOWN_STARTS.len()],
        TOWN_ENDS[(r / TOWN_STARTS.len()) % TOWN_ENDS.len()]
    );
    (name, STATES[(r / names) % STATES.len()])
}

/// The condition code and description of long-tail rank `rank`: ICD-10-shaped (`A07.38`), with
/// a last digit no code of the short lists uses.
fn tail_condition(rank: usize) -> (String, String) {
    const LETTERS: &[u8] = b"ABCDEGHIKLMNR";
    let code = format!(
        "{}{:02}.{}8",
        char::from(LETTERS[rank % LETTERS.len()]),
        (rank / LETTERS.len()) % 100,
        (rank / (LETTERS.len() * 100)) % 10
    );
    let description = format!("Other specified condition ({code})");
    (code, description)
}

/// A reason or condition: a common one, or one from the long tail.
fn condition(rng: &mut ChaCha8Rng) -> (String, String) {
    if rng.gen_bool(TAIL_SHARE) {
        tail_condition(SKEW.tail_conditions.sample(rng))
    } else {
        let (code, description) = COMMON_CONDITIONS[SKEW.common_conditions.sample(rng)];
        (code.to_string(), description.to_string())
    }
}

/// A lab test `(code, description, unit, low, high)`: a common one, or one from the long tail
/// (LOINC-shaped, `NNNNN-N`).
fn lab(rng: &mut ChaCha8Rng) -> (String, String, &'static str, f64, f64) {
    if rng.gen_bool(TAIL_SHARE) {
        let rank = SKEW.tail_labs.sample(rng);
        let code = format!("{}-{}", 50_000 + rank, rank % 10);
        let description = format!("Laboratory test ({code})");
        (code, description, "U/L", 1.0, 100.0)
    } else {
        let (code, description, unit, lo, hi) = LABS[SKEW.labs.sample(rng)];
        (code.to_string(), description.to_string(), unit, lo, hi)
    }
}

fn col(name: &str, t: ColumnType, nullable: bool, label: &str) -> ColumnDef {
    ColumnDef {
        name: name.into(),
        data_type: t,
        nullable,
        label: label.into(),
        checks: Default::default(),
    }
}

/// The catalog of the demo lake: the datasets, schemas and labels of `shared/SCENARIO.md`.
pub fn demo_catalog() -> Catalog {
    use ColumnType::*;
    let ds = |name: &str, columns: Vec<ColumnDef>, tags: &[&str], description: &str| {
        let (schema, table) = name.split_once('.').expect("qualified name");
        Dataset {
            name: name.into(),
            zone: "curated".into(),
            location: format!("curated/{schema}/{table}/"),
            columns,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            owner: "demo-data-steward".into(),
            description: description.into(),
            format: Default::default(),
            retention_days: None,
            encrypted: false,
        }
    };
    Catalog {
        version: 1,
        datasets: vec![
            ds(
                "clinical.patients",
                vec![
                    col("patient_id", Utf8, false, "identifier"),
                    col("mrn", Utf8, false, "phi.direct"),
                    col("first_name", Utf8, false, "phi.direct"),
                    col("last_name", Utf8, false, "phi.direct"),
                    col("ssn", Utf8, false, "phi.direct"),
                    col("birth_date", Date32, false, "phi.quasi"),
                    col("death_date", Date32, true, "phi.quasi"),
                    col("sex", Utf8, false, "phi.quasi"),
                    col("race", Utf8, false, "phi.quasi"),
                    col("ethnicity", Utf8, false, "phi.quasi"),
                    col("address", Utf8, false, "phi.direct"),
                    col("city", Utf8, false, "phi.quasi"),
                    col("state", Utf8, false, "clinical"),
                    col("zip", Utf8, false, "phi.quasi"),
                    col("phone", Utf8, true, "phi.direct"),
                    col("email", Utf8, true, "phi.direct"),
                    col("site_id", Utf8, false, "clinical"),
                    col("research_consent", Bool, false, "clinical"),
                ],
                &["phi"],
                "One row per patient: demographics and identifiers.",
            ),
            ds(
                "clinical.encounters",
                vec![
                    col("encounter_id", Utf8, false, "identifier"),
                    col("patient_id", Utf8, false, "identifier"),
                    col("site_id", Utf8, false, "clinical"),
                    col("start_time", TimestampUtc, false, "phi.quasi"),
                    col("stop_time", TimestampUtc, false, "phi.quasi"),
                    col("encounter_class", Utf8, false, "clinical"),
                    col("provider_id", Utf8, false, "clinical"),
                    col("payer", Utf8, true, "clinical"),
                    col("total_cost", Float64, false, "clinical"),
                    col("reason_code", Utf8, true, "clinical"),
                    col("readmitted_30d", Bool, false, "clinical"),
                ],
                &["phi"],
                "Visits: inpatient, outpatient, emergency and others.",
            ),
            ds(
                "clinical.conditions",
                vec![
                    col("patient_id", Utf8, false, "identifier"),
                    col("encounter_id", Utf8, false, "identifier"),
                    col("onset_date", Date32, false, "phi.quasi"),
                    col("code", Utf8, false, "clinical"),
                    col("description", Utf8, false, "clinical"),
                ],
                &["phi"],
                "Diagnoses (ICD-10) with onset dates.",
            ),
            ds(
                "clinical.observations",
                vec![
                    col("observation_id", Utf8, false, "identifier"),
                    col("patient_id", Utf8, false, "identifier"),
                    col("encounter_id", Utf8, false, "identifier"),
                    col("obs_time", TimestampUtc, false, "phi.quasi"),
                    col("loinc_code", Utf8, false, "clinical"),
                    col("description", Utf8, false, "clinical"),
                    col("value", Float64, true, "clinical"),
                    col("unit", Utf8, false, "clinical"),
                ],
                &["phi"],
                "Vital signs and lab results (LOINC).",
            ),
            ds(
                "omics.variants",
                vec![
                    col("patient_id", Utf8, false, "identifier"),
                    col("gene", Utf8, false, "clinical"),
                    col("variant", Utf8, false, "clinical"),
                    col("zygosity", Utf8, false, "clinical"),
                ],
                &["omics", "phi"],
                "Germline variants from sequencing.",
            ),
        ],
    }
}

/// Builders for one part of every table.
struct PartBuilders {
    patients: Vec<ColumnBuilder>,
    encounters: Vec<ColumnBuilder>,
    conditions: Vec<ColumnBuilder>,
    observations: Vec<ColumnBuilder>,
    variants: Vec<ColumnBuilder>,
}

enum ColumnBuilder {
    Utf8(StringBuilder),
    Bool(BooleanBuilder),
    Float64(Float64Builder),
    Date32(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
}

impl ColumnBuilder {
    fn for_type(t: ColumnType) -> Self {
        match t {
            ColumnType::Utf8 => Self::Utf8(StringBuilder::new()),
            ColumnType::Bool => Self::Bool(BooleanBuilder::new()),
            ColumnType::Float64 => Self::Float64(Float64Builder::new()),
            ColumnType::Date32 => Self::Date32(Date32Builder::new()),
            ColumnType::TimestampUtc => {
                Self::Ts(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            ColumnType::Int32 | ColumnType::Int64 => {
                unreachable!("the demo has no integer columns")
            }
        }
    }
    fn s(&mut self, v: Option<&str>) {
        if let Self::Utf8(b) = self {
            b.append_option(v)
        }
    }
    fn b(&mut self, v: bool) {
        if let Self::Bool(b) = self {
            b.append_value(v)
        }
    }
    fn f(&mut self, v: Option<f64>) {
        if let Self::Float64(b) = self {
            b.append_option(v)
        }
    }
    fn d(&mut self, v: Option<i32>) {
        if let Self::Date32(b) = self {
            b.append_option(v)
        }
    }
    fn t(&mut self, v: i64) {
        if let Self::Ts(b) = self {
            b.append_value(v)
        }
    }
    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Utf8(b) => Arc::new(b.finish()),
            Self::Bool(b) => Arc::new(b.finish()),
            Self::Float64(b) => Arc::new(b.finish()),
            Self::Date32(b) => Arc::new(b.finish()),
            Self::Ts(b) => Arc::new(b.finish()),
        }
    }
}

fn builders(d: &Dataset) -> Vec<ColumnBuilder> {
    d.columns
        .iter()
        .map(|c| ColumnBuilder::for_type(c.data_type))
        .collect()
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn digits(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
        .collect()
}

/// Generate one part: patients `[first, end)` and everything that hangs off them.
fn generate_part(catalog: &Catalog, seed: u64, part: u64, first: u64, end: u64) -> PartBuilders {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let ds = |n: &str| builders(catalog.dataset(n).expect("demo dataset"));
    let mut out = PartBuilders {
        patients: ds("clinical.patients"),
        encounters: ds("clinical.encounters"),
        conditions: ds("clinical.conditions"),
        observations: ds("clinical.observations"),
        variants: ds("omics.variants"),
    };
    let mut s = String::new();
    for idx in first..end {
        let pid = format!("P{idx:08}");
        let p = &mut out.patients;
        // Ages: mostly 0-89; about 1.5% aged 90 and over (born before 1936).
        let birth = if rng.gen_bool(0.015) {
            rng.gen_range(-14_600..-12_400)
        } else {
            rng.gen_range(-12_400..19_000)
        };
        let death = rng
            .gen_bool(0.05)
            .then(|| rng.gen_range(birth.max(CARE_START_DAY)..CARE_END_DAY));
        let first_name = *pick(&mut rng, FIRST_NAMES);
        let last_name = *pick(&mut rng, LAST_NAMES);
        let (city, state) = town(SKEW.towns.sample(&mut rng));
        let zip = if rng.gen_bool(0.03) {
            format!("{}{}", pick(&mut rng, RESTRICTED_ZIP3), digits(&mut rng, 2))
        } else {
            format!("{:03}{}", rng.gen_range(10..999), digits(&mut rng, 2))
        };
        let site = *pick(&mut rng, SITES);
        p[0].s(Some(&pid));
        p[1].s(Some(&format!("MRN{}", digits(&mut rng, 9))));
        p[2].s(Some(first_name));
        p[3].s(Some(last_name));
        p[4].s(Some(&format!(
            "{}-{}-{}",
            rng.gen_range(100..900),
            digits(&mut rng, 2),
            digits(&mut rng, 4)
        )));
        p[5].d(Some(birth));
        p[6].d(death);
        p[7].s(Some(if rng.gen_bool(0.5) { "F" } else { "M" }));
        p[8].s(Some(RACES[SKEW.races.sample(&mut rng)]));
        p[9].s(Some(*pick(&mut rng, ETHNICITIES)));
        p[10].s(Some(&format!(
            "{} {} St",
            rng.gen_range(1..9999),
            pick(&mut rng, STREETS)
        )));
        p[11].s(Some(&city));
        p[12].s(Some(state));
        p[13].s(Some(&zip));
        let phone = rng
            .gen_bool(0.9)
            .then(|| format!("555-{}-{}", digits(&mut rng, 3), digits(&mut rng, 4)));
        p[14].s(phone.as_deref());
        let email = rng.gen_bool(0.8).then(|| {
            format!(
                "{}.{}{}@example.org",
                first_name.to_lowercase(),
                last_name.to_lowercase(),
                idx % 1000
            )
        });
        p[15].s(email.as_deref());
        p[16].s(Some(site));
        p[17].b(rng.gen_bool(0.7));

        // Encounters: 5..=15 per patient (about 10); frequent flyers 50..=120, most of them for
        // one chronic condition of the long tail.
        let chronic = rng
            .gen_bool(FREQUENT_FLYERS)
            .then(|| tail_condition(SKEW.tail_conditions.sample(&mut rng)));
        let n_enc = if chronic.is_some() {
            rng.gen_range(50..=120u32)
        } else {
            rng.gen_range(5..=15u32)
        };
        let mut enc_ids = Vec::with_capacity(n_enc as usize);
        for k in 0..n_enc {
            let eid = format!("E{idx:08}{k:03}");
            let day = rng.gen_range(CARE_START_DAY..CARE_END_DAY) as i64;
            let start = day * MICROS_PER_DAY + rng.gen_range(0..MICROS_PER_DAY);
            let stop = start + rng.gen_range(900_000_000..259_200_000_000i64);
            let e = &mut out.encounters;
            e[0].s(Some(&eid));
            e[1].s(Some(&pid));
            e[2].s(Some(site));
            e[3].t(start);
            e[4].t(stop);
            e[5].s(Some(*pick(&mut rng, CLASSES)));
            s.clear();
            s.push_str(&format!("PR{:05}", rng.gen_range(0..5000)));
            e[6].s(Some(&s));
            let payer = rng.gen_bool(0.95).then(|| *pick(&mut rng, PAYERS));
            e[7].s(payer);
            e[8].f(Some(
                (rng.gen_range(50.0..50_000.0f64) * 100.0).round() / 100.0,
            ));
            let reason = match &chronic {
                Some((code, _)) if rng.gen_bool(0.7) => Some(code.clone()),
                _ => rng.gen_bool(0.9).then(|| condition(&mut rng).0),
            };
            e[9].s(reason.as_deref());
            e[10].b(rng.gen_bool(0.1));
            enc_ids.push((eid, start));
        }

        // Conditions: 1..=5 (about 3), plus planted rare conditions.
        let n_cond = rng.gen_range(1..=5u32);
        let mut conds: Vec<(String, String)> = (0..n_cond).map(|_| condition(&mut rng)).collect();
        conds.extend(chronic);
        for (i, (code, desc, count)) in RARE_CONDITIONS.iter().enumerate() {
            // Patients 13+i, 13+i+97, ... up to `count` of them: fewer than 11 at any scale.
            let offset = 13 + i as u64;
            if idx >= offset && (idx - offset).is_multiple_of(97) && (idx - offset) / 97 < *count {
                conds.push((code.to_string(), desc.to_string()));
            }
        }
        for (code, desc) in conds {
            let (eid, start) = &enc_ids[rng.gen_range(0..enc_ids.len())];
            let c = &mut out.conditions;
            c[0].s(Some(&pid));
            c[1].s(Some(eid));
            c[2].d(Some((start / MICROS_PER_DAY) as i32));
            c[3].s(Some(&code));
            c[4].s(Some(&desc));
        }

        // Observations: 15..=25 (about 20), each tied to one of the patient's encounters.
        let n_obs = rng.gen_range(15..=25u32);
        for k in 0..n_obs {
            let (eid, start) = &enc_ids[rng.gen_range(0..enc_ids.len())];
            let (loinc, desc, unit, lo, hi) = lab(&mut rng);
            let o = &mut out.observations;
            o[0].s(Some(&format!("O{idx:08}{k:03}")));
            o[1].s(Some(&pid));
            o[2].s(Some(eid));
            o[3].t(start + rng.gen_range(0..3_600_000_000i64));
            o[4].s(Some(&loinc));
            o[5].s(Some(&desc));
            let value = rng
                .gen_bool(0.98)
                .then(|| (rng.gen_range(lo..hi) * 10.0f64).round() / 10.0);
            o[6].f(value);
            o[7].s(Some(unit));
        }

        // Variants: about a third of patients were sequenced, 1..=3 variants each.
        if rng.gen_bool(0.33) {
            for _ in 0..rng.gen_range(1..=3u32) {
                let v = &mut out.variants;
                v[0].s(Some(&pid));
                v[1].s(Some(*pick(&mut rng, GENES)));
                v[2].s(Some(&format!(
                    "c.{}{}",
                    rng.gen_range(1..6000),
                    pick(&mut rng, BASES)
                )));
                v[3].s(Some(if rng.gen_bool(0.85) {
                    "heterozygous"
                } else {
                    "homozygous"
                }));
            }
        }
    }
    out
}

fn to_parquet(
    d: &Dataset,
    cols: &mut [ColumnBuilder],
    encryption: Option<Arc<FileEncryptionProperties>>,
) -> Result<Vec<u8>> {
    let arrays: Vec<ArrayRef> = cols.iter_mut().map(ColumnBuilder::finish).collect();
    let batch =
        RecordBatch::try_new(d.schema(), arrays).map_err(|e| CatalogError::InvalidEntry {
            dataset: d.name.clone(),
            reason: e.to_string(),
        })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_created_by("lakegate demo".into());
    let props = match encryption {
        Some(e) => props.with_file_encryption_properties(e),
        None => props,
    }
    .build();
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
    let parquet_err = |e: parquet::errors::ParquetError| CatalogError::CorruptFile {
        dataset: d.name.clone(),
        reason: e.to_string(),
    };
    let mut writer =
        ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    Ok(buf)
}

/// Build the demo lake: Parquet files in `curated/`, then the catalog (written last, so a lake
/// with a catalog is a complete lake). `progress(done, total)` counts patients.
pub async fn build_demo_lake(
    lake: &Lake,
    options: &DemoOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<Catalog> {
    let mut catalog = demo_catalog();
    let mut encryption = HashMap::new();
    if options.encrypted {
        for d in &mut catalog.datasets {
            d.encrypted = true;
            let keys = crate::keys::create(lake, &d.name).await?;
            encryption.insert(d.name.clone(), keys.encryption(d)?);
        }
    }
    let catalog = Arc::new(catalog);
    let encryption = Arc::new(encryption);
    let total = options.patients;
    let parts = total.div_ceil(PATIENTS_PER_PART).max(MIN_PARTS);
    let per_part = total.div_ceil(parts).max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let store = lake.store();
    let done = std::sync::atomic::AtomicU64::new(0);
    progress(0, total);

    let mut results = futures::stream::iter(0..parts)
        .map(|part| {
            let catalog = Arc::clone(&catalog);
            let encryption = Arc::clone(&encryption);
            let store = Arc::clone(&store);
            let seed = options.seed;
            async move {
                let first = (part * per_part).min(total);
                let end = ((part + 1) * per_part).min(total);
                let files = tokio::task::spawn_blocking(move || -> Result<Vec<(Path, Vec<u8>)>> {
                    let mut b = generate_part(&catalog, seed, part, first, end);
                    let mut files = Vec::new();
                    for (name, cols) in [
                        ("clinical.patients", &mut b.patients),
                        ("clinical.encounters", &mut b.encounters),
                        ("clinical.conditions", &mut b.conditions),
                        ("clinical.observations", &mut b.observations),
                        ("omics.variants", &mut b.variants),
                    ] {
                        let d = catalog.dataset(name).expect("demo dataset");
                        let path = Path::from(format!("{}part-{part:05}.parquet", d.location));
                        let encryption = encryption.get(name).cloned();
                        files.push((path, to_parquet(d, cols, encryption)?));
                    }
                    Ok(files)
                })
                .await
                .map_err(|e| CatalogError::Malformed(format!("generator task failed: {e}")))??;
                for (path, bytes) in files {
                    store.put(&path, PutPayload::from(bytes)).await?;
                }
                Ok::<u64, CatalogError>(end - first)
            }
        })
        .buffer_unordered(threads);
    while let Some(r) = results.next().await {
        let n = r?;
        let now = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress(now, total);
    }
    catalog.save(lake).await?;
    Ok((*catalog).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn demo_lake_is_deterministic_and_verifies() {
        let opts = DemoOptions {
            patients: 300,
            seed: 7,
            encrypted: false,
        };
        let a = Lake::in_memory();
        let b = Lake::in_memory();
        let catalog = build_demo_lake(&a, &opts, |_, _| {}).await.unwrap();
        build_demo_lake(&b, &opts, |_, _| {}).await.unwrap();
        catalog.verify(&a).await.unwrap();
        for d in &catalog.datasets {
            let fa = d.files(&a.store()).await.unwrap();
            assert_eq!(fa.len() as u64, MIN_PARTS, "{}", d.name);
            for f in fa {
                let x = a.store().get(&f).await.unwrap().bytes().await.unwrap();
                let y = b.store().get(&f).await.unwrap().bytes().await.unwrap();
                assert!(x == y, "{f} differs between two runs with the same seed");
            }
        }
    }

    /// The columns of one generated part's table, as text, by column name.
    fn texts(d: &Dataset, cols: &mut [ColumnBuilder], names: &[&str]) -> Vec<Vec<String>> {
        use arrow::array::{Array, AsArray};
        let arrays: Vec<ArrayRef> = cols.iter_mut().map(ColumnBuilder::finish).collect();
        names
            .iter()
            .map(|n| {
                let i = d.columns.iter().position(|c| c.name == *n).unwrap();
                let a = arrays[i].as_string::<i32>();
                (0..a.len())
                    .map(|r| if a.is_valid(r) { a.value(r) } else { "" }.to_string())
                    .collect()
            })
            .collect()
    }

    /// Distinct `unit`s per `key`, and rows per `key`.
    fn spread(keys: &[String], units: &[String]) -> HashMap<String, (HashSet<String>, usize)> {
        let mut out: HashMap<String, (HashSet<String>, usize)> = HashMap::new();
        for (k, u) in keys.iter().zip(units).filter(|(k, _)| !k.is_empty()) {
            let e = out.entry(k.clone()).or_default();
            e.0.insert(u.clone());
            e.1 += 1;
        }
        out
    }

    use std::collections::{HashMap, HashSet};

    #[test]
    fn distributions_are_skewed_like_a_real_population() {
        let catalog = demo_catalog();
        let mut b = generate_part(&catalog, 42, 0, 0, 25_000);
        let ds = |n: &str| catalog.dataset(n).unwrap();
        let p = texts(
            ds("clinical.patients"),
            &mut b.patients,
            &["patient_id", "city", "state", "race"],
        );
        let towns = spread(
            &p[1]
                .iter()
                .zip(&p[2])
                .map(|(c, s)| format!("{c}, {s}"))
                .collect::<Vec<_>>(),
            &p[0],
        );
        // Zipf: a big city of thousands, and many towns of fewer than 11 patients.
        assert!(towns.values().any(|(pts, _)| pts.len() > 1_000));
        assert!(towns.values().filter(|(pts, _)| pts.len() < 11).count() > 1_000);
        let races = spread(&p[3], &p[0]);
        assert!(
            races.values().any(|(pts, _)| pts.len() < 100),
            "a small race group"
        );

        let e = texts(
            ds("clinical.encounters"),
            &mut b.encounters,
            &["patient_id", "reason_code"],
        );
        let per_patient = spread(&e[0], &e[0]);
        let flyers = per_patient.values().filter(|(_, rows)| *rows >= 50).count();
        assert!((200..=600).contains(&flyers), "{flyers} frequent flyers");
        assert!(per_patient
            .values()
            .all(|(_, rows)| *rows >= 5 && *rows <= 120));
        let reasons = spread(&e[1], &e[0]);
        assert!(reasons.len() > 1_000, "a long tail of reason codes");
        assert!(reasons.values().filter(|(pts, _)| pts.len() < 11).count() > 500);
        // Frequent flyers' chronic codes: many rows, few patients.
        assert!(reasons
            .values()
            .any(|(pts, rows)| pts.len() < 11 && *rows >= 50));

        let c = texts(
            ds("clinical.conditions"),
            &mut b.conditions,
            &["patient_id", "code"],
        );
        let codes = spread(&c[1], &c[0]);
        assert!(codes.values().filter(|(pts, _)| pts.len() < 11).count() > 500);
        let o = texts(
            ds("clinical.observations"),
            &mut b.observations,
            &["patient_id", "loinc_code"],
        );
        let labs = spread(&o[1], &o[0]);
        assert!(labs.values().filter(|(pts, _)| pts.len() < 11).count() > 500);
        assert!(labs.values().any(|(pts, _)| pts.len() > 10_000));
    }
}
