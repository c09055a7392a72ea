//! The demo lake of `shared/SCENARIO.md`: synthetic, Synthea-shaped clinical data.
//!
//! Deterministic: the same seed and patient count give byte-identical Parquet, whatever the
//! number of threads, because every part of the lake has its own random stream derived from
//! (seed, part) and parts are written independently.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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

use crate::ingest::{ingest, IngestOptions, KeyCache};
use crate::{Catalog, CatalogError, ColumnType, Dataset, FileFormat, Lake, Result};

/// Options of the demo generator.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub patients: u64,
    pub seed: u64,
    /// Encrypt every dataset at rest with fresh data keys wrapped by the lake handle's keyring
    /// (random keys and nonces: the files are then no longer byte-identical between builds).
    pub encrypted: bool,
    /// How the lake is built.
    pub layout: DemoLayout,
}

/// How the demo lake is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DemoLayout {
    /// Through the ingest path, as a hospital fills its lake: each dataset declared by its
    /// contract (`catalogs/contracts/demo/`), the generated extracts fed to `ingest` in
    /// [`FEEDS`] feeds, each landing in `raw/`, checked row by row and committed as one
    /// version of the dataset's Delta table. What `lakegate demo` builds.
    #[default]
    Ingested,
    /// Plain Parquet folders written straight into `curated/` (the shape of a lake that an
    /// outside pipeline writes and a hand-written catalog describes), for tests of that shape.
    Folders,
}

/// Feeds per demo dataset: each a quarter of the patients, so every table has several
/// versions and several files.
pub const FEEDS: u64 = 4;

/// Who `lakegate demo`'s feeds are recorded as (in each version's lineage).
pub const DEMO_PRINCIPAL: &str = "lakegate-demo";

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

/// The demo datasets' contracts (in `catalogs/contracts/demo/`), in the order their datasets
/// are declared and fed: a dataset's `references` name only datasets before it.
pub const DEMO_CONTRACTS: &[(&str, &str)] = &[
    (
        "clinical.patients.toml",
        include_str!("../contracts/demo/clinical.patients.toml"),
    ),
    (
        "clinical.encounters.toml",
        include_str!("../contracts/demo/clinical.encounters.toml"),
    ),
    (
        "clinical.conditions.toml",
        include_str!("../contracts/demo/clinical.conditions.toml"),
    ),
    (
        "clinical.observations.toml",
        include_str!("../contracts/demo/clinical.observations.toml"),
    ),
    (
        "omics.variants.toml",
        include_str!("../contracts/demo/omics.variants.toml"),
    ),
];

/// The catalog of the demo lake: the datasets, schemas and labels of `shared/SCENARIO.md`, as
/// its contracts declare them (Delta tables, encrypted at rest).
pub fn demo_catalog() -> Catalog {
    let mut catalog = Catalog {
        version: 1,
        datasets: Vec::new(),
    };
    for (file, text) in DEMO_CONTRACTS {
        let dataset = crate::parse_contract(file, text).expect("the demo contracts parse");
        catalog
            .add_dataset(dataset)
            .expect("the demo contracts fit together");
    }
    catalog
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
) -> Result<(usize, Vec<u8>)> {
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
    let batch_rows = batch.num_rows();
    let mut writer =
        ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    Ok((batch_rows, buf))
}

/// Build the demo lake, or finish one that an interrupted build left (see [`unfinished`]).
/// `progress(done, total)` counts work in steps of one patient generated, then one patient's
/// rows ingested.
pub async fn build_demo_lake(
    lake: &Lake,
    options: &DemoOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<Catalog> {
    match options.layout {
        DemoLayout::Ingested => build_ingested(lake, options, progress).await,
        DemoLayout::Folders => build_folders(lake, options, progress).await,
    }
}

/// Written when an ingested demo build has committed every feed.
const BUILT_MARKER: &str = "catalog/demo-built.json";

/// Whether `lake`'s catalog declares a demo dataset as a Delta table but the build that
/// declared it never finished (it was interrupted): `lakegate demo` then finishes it.
pub async fn unfinished(lake: &Lake) -> Result<bool> {
    let catalog = Catalog::load(lake).await?;
    let demo = demo_catalog();
    let declared = catalog.datasets.iter().any(|d| {
        d.format == FileFormat::Delta
            && demo
                .dataset(&d.name)
                .is_some_and(|x| x.columns == d.columns)
    });
    if !declared {
        return Ok(false);
    }
    match lake.store().head(&Path::from(BUILT_MARKER)).await {
        Ok(_) => Ok(false),
        Err(object_store::Error::NotFound { .. }) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The names of the source files that the versions of `dataset` committed.
async fn committed_sources(lake: &Lake, dataset: &str) -> Result<HashSet<String>> {
    Ok(crate::ingest::history(lake, dataset)
        .await?
        .into_iter()
        .filter_map(|v| v.ingest)
        .flat_map(|c| c.sources.into_iter().map(|s| s.source))
        .collect())
}

/// One generated part of one dataset, as a Parquet file.
struct Extract {
    dataset: &'static str,
    part: u64,
    rows: usize,
    bytes: Vec<u8>,
}

/// The generated parts of the lake, in parallel, each handed to `sink` as one Parquet file per
/// dataset (name, part number, bytes). Returns after every part is generated.
async fn generate<F, Fut>(
    catalog: &Arc<Catalog>,
    options: &DemoOptions,
    encryption: &Arc<HashMap<String, Arc<FileEncryptionProperties>>>,
    sink: F,
    progress: &(impl Fn(u64, u64) + Send + Sync),
    total: u64,
) -> Result<u64>
where
    F: Fn(Vec<Extract>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let patients = options.patients;
    let parts = patients.div_ceil(PATIENTS_PER_PART).max(MIN_PARTS);
    let per_part = patients.div_ceil(parts).max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut done = 0;
    progress(0, total);
    let mut results = futures::stream::iter(0..parts)
        .map(|part| {
            let catalog = Arc::clone(catalog);
            let encryption = Arc::clone(encryption);
            let seed = options.seed;
            let first = (part * per_part).min(patients);
            let end = ((part + 1) * per_part).min(patients);
            async move {
                let files = tokio::task::spawn_blocking(move || -> Result<_> {
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
                        let encryption = encryption.get(name).cloned();
                        let (rows, bytes) = to_parquet(d, cols, encryption)?;
                        files.push(Extract {
                            dataset: name,
                            part,
                            rows,
                            bytes,
                        });
                    }
                    Ok(files)
                })
                .await
                .map_err(|e| CatalogError::Malformed(format!("generator task failed: {e}")))??;
                Ok::<_, CatalogError>((files, end - first))
            }
        })
        .buffer_unordered(threads);
    while let Some(r) = results.next().await {
        let (files, n) = r?;
        sink(files).await?;
        done += n;
        progress(done, total);
    }
    Ok(parts)
}

/// The demo lake through the ingest path: contracts declared, extracts generated into a
/// scratch folder (sealed with the dataset's own data keys when the lake is encrypted, so the
/// `raw/` zone never holds them in the clear), then fed.
async fn build_ingested(
    lake: &Lake,
    options: &DemoOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<Catalog> {
    let mut catalog = match Catalog::load(lake).await {
        Ok(c) => c,
        Err(CatalogError::NoCatalog) => Catalog {
            version: 1,
            datasets: Vec::new(),
        },
        Err(e) => return Err(e),
    };
    let mut encryption = HashMap::new();
    for mut d in demo_catalog().datasets {
        d.encrypted = options.encrypted;
        let name = d.name.clone();
        catalog.declare(lake, d).await?;
        let d = catalog.dataset(&name).expect("declared");
        if d.encrypted {
            let keys = crate::keys::load(lake, &name).await?;
            encryption.insert(name, keys.encryption(d)?);
        }
    }
    let catalog = Arc::new(catalog);
    let encryption = Arc::new(encryption);
    let scratch = tempfile::tempdir().map_err(|e| CatalogError::Source {
        path: "a scratch folder for the demo's extracts".into(),
        reason: e.to_string(),
    })?;
    let root = scratch.path().to_path_buf();
    let total = 2 * options.patients;
    let write = |files: Vec<Extract>| {
        let root = root.clone();
        async move {
            tokio::task::spawn_blocking(move || -> Result<()> {
                for Extract {
                    dataset: name,
                    part,
                    rows,
                    bytes,
                } in files
                {
                    // An empty extract is refused by ingest as a whole: a part without rows
                    // of a table (a few patients, none sequenced) is simply not delivered.
                    if rows == 0 {
                        continue;
                    }
                    let dir = root.join(name);
                    let path = dir.join(format!("part-{part:05}.parquet"));
                    std::fs::create_dir_all(&dir)
                        .and_then(|_| std::fs::write(&path, bytes))
                        .map_err(|e| CatalogError::Source {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                }
                Ok(())
            })
            .await
            .map_err(|e| CatalogError::Malformed(format!("writer task failed: {e}")))?
        }
    };
    let parts = generate(&catalog, options, &encryption, write, &progress, total).await?;

    // Each dataset in FEEDS feeds of consecutive parts; patients first, then encounters (the
    // others reference them), then the other three at once.
    let done = AtomicU64::new(options.patients);
    // Every feed after the first of each dataset checks its references against the same
    // files: read once.
    let cache = Arc::new(KeyCache::default());
    let feed_all = |name: &'static str| {
        let root = &root;
        let cache = &cache;
        let done = &done;
        let progress = &progress;
        async move {
            let committed = committed_sources(lake, name).await?;
            for feed in 0..FEEDS {
                let sources: Vec<String> = (feed * parts / FEEDS..(feed + 1) * parts / FEEDS)
                    .map(|part| format!("part-{part:05}.parquet"))
                    .filter(|file| !committed.contains(file))
                    .map(|file| root.join(name).join(file))
                    .filter(|path| path.exists())
                    .map(|path| path.display().to_string())
                    .collect();
                if !sources.is_empty() {
                    feed_demo(lake, name, &sources, cache).await?;
                }
                let step = options.patients / FEEDS / 5;
                let now = done.fetch_add(step, Ordering::Relaxed) + step;
                progress(now.min(total), total);
            }
            Ok::<(), CatalogError>(())
        }
    };
    feed_all("clinical.patients").await?;
    feed_all("clinical.encounters").await?;
    futures::try_join!(
        feed_all("clinical.conditions"),
        feed_all("clinical.observations"),
        feed_all("omics.variants"),
    )?;
    let marker = serde_json::json!({
        "patients": options.patients,
        "seed": options.seed,
        "encrypted": options.encrypted,
    });
    lake.store()
        .put(
            &Path::from(BUILT_MARKER),
            PutPayload::from(marker.to_string()),
        )
        .await?;
    progress(total, total);
    let mut catalog = Catalog::load(lake).await?;
    catalog.datasets.retain(|d| d.name != crate::AUDIT_DATASET);
    Ok(catalog)
}

/// One feed of generated extracts: every row must keep the contract (the generator is
/// checked by the same contracts a hospital's feeds are).
async fn feed_demo(
    lake: &Lake,
    dataset: &str,
    sources: &[String],
    cache: &Arc<KeyCache>,
) -> Result<()> {
    let options = IngestOptions {
        principal: DEMO_PRINCIPAL.into(),
        max_reject_ratio: 0.0,
        key_cache: Some(Arc::clone(cache)),
        ..Default::default()
    };
    let report = ingest(lake, dataset, sources, &options).await?;
    if report.refused.is_some() || report.quarantined > 0 {
        return Err(CatalogError::NotIngestible {
            dataset: dataset.into(),
            reason: format!(
                "the demo generator's rows broke the dataset's contract ({}; rules {:?})",
                report.summary(),
                report.by_rule
            ),
        });
    }
    Ok(())
}

/// The demo lake as plain Parquet folders in `curated/`, then the catalog (written last, so a
/// lake with a catalog is a complete lake).
async fn build_folders(
    lake: &Lake,
    options: &DemoOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<Catalog> {
    let mut catalog = demo_catalog();
    let mut encryption = HashMap::new();
    for d in &mut catalog.datasets {
        d.format = FileFormat::Parquet;
        d.encrypted = options.encrypted;
        if options.encrypted {
            let keys = crate::keys::create(lake, &d.name).await?;
            encryption.insert(d.name.clone(), keys.encryption(d)?);
        }
    }
    let catalog = Arc::new(catalog);
    let encryption = Arc::new(encryption);
    let store = lake.store();
    let write = |files: Vec<Extract>| {
        let store = Arc::clone(&store);
        let catalog = Arc::clone(&catalog);
        async move {
            for Extract {
                dataset: name,
                part,
                bytes,
                ..
            } in files
            {
                let d = catalog.dataset(name).expect("demo dataset");
                let path = Path::from(format!("{}part-{part:05}.parquet", d.location));
                store.put(&path, PutPayload::from(bytes)).await?;
            }
            Ok(())
        }
    };
    generate(
        &catalog,
        options,
        &encryption,
        write,
        &progress,
        options.patients,
    )
    .await?;
    catalog.save(lake).await?;
    Ok((*catalog).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(layout: DemoLayout) -> DemoOptions {
        DemoOptions {
            patients: 300,
            seed: 7,
            encrypted: false,
            layout,
        }
    }

    #[tokio::test]
    async fn a_folder_lake_is_deterministic_and_verifies() {
        let opts = options(DemoLayout::Folders);
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

    /// The SHA-256 of every data file of the newest version of each demo dataset, sorted.
    async fn contents(lake: &Lake, catalog: &Catalog) -> Vec<(String, Vec<String>)> {
        use sha2::{Digest, Sha256};
        let mut out = Vec::new();
        for d in &catalog.datasets {
            let (_, files) = crate::delta::files(lake, d, None).await.unwrap();
            let mut sums = Vec::new();
            for f in files {
                let bytes = lake.store().get(&f.location).await.unwrap().bytes().await;
                sums.push(format!("{:x}", Sha256::digest(bytes.unwrap())));
            }
            sums.sort();
            out.push((d.name.clone(), sums));
        }
        out
    }

    #[tokio::test]
    async fn the_ingested_lake_is_deterministic_versioned_and_resumable() {
        let opts = options(DemoLayout::Ingested);
        let a = Lake::in_memory();
        let b = Lake::in_memory();
        let catalog = build_demo_lake(&a, &opts, |_, _| {}).await.unwrap();
        assert_eq!(catalog.datasets.len(), 5);
        build_demo_lake(&b, &opts, |_, _| {}).await.unwrap();
        let (x, y) = (contents(&a, &catalog).await, contents(&b, &catalog).await);
        assert_eq!(x, y, "two builds with the same seed hold the same files");
        for (name, files) in &x {
            assert!(files.len() as u64 >= FEEDS, "{name}: {} files", files.len());
            let history = crate::ingest::history(&a, name).await.unwrap();
            // Version 0 (declared, empty), then one version per feed, each with its lineage.
            assert_eq!(history.len() as u64, FEEDS + 1, "{name}");
            for v in &history[1..] {
                let record = v.ingest.as_ref().expect("lineage");
                assert_eq!(record.principal, DEMO_PRINCIPAL);
                assert!(record.sources.iter().all(|s| s.quarantined == 0));
            }
        }
        assert!(!unfinished(&a).await.unwrap());

        // An interrupted build: the newest feed of one dataset never committed. Building again
        // commits only what is missing.
        let c = Lake::in_memory();
        let full = build_demo_lake(&c, &opts, |_, _| {}).await.unwrap();
        let variants = full.dataset("omics.variants").unwrap();
        let log = Path::from(format!(
            "{}_delta_log/{:020}.json",
            variants.location, FEEDS
        ));
        c.store().delete(&log).await.unwrap();
        c.store().delete(&Path::from(BUILT_MARKER)).await.unwrap();
        assert!(unfinished(&c).await.unwrap());
        build_demo_lake(&c, &opts, |_, _| {}).await.unwrap();
        assert!(!unfinished(&c).await.unwrap());
        let history = crate::ingest::history(&c, "omics.variants").await.unwrap();
        assert_eq!(history.len() as u64, FEEDS + 1);
        let patients = crate::ingest::history(&c, "clinical.patients")
            .await
            .unwrap();
        assert_eq!(patients.len() as u64, FEEDS + 1, "no feed committed twice");
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
