//! Column masks as DataFusion expressions: type-preserving, NULL in -> NULL out, safe on any
//! UTF-8 input. The keyed masks (pseudonym, date shift) are UDFs that carry their project's key;
//! they are never registered in a session, so no query can call them with another key.

use std::sync::Arc;

use chrono::Datelike;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, StringBuilder, TimestampMicrosecondArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{exec_err, Result as DFResult, ScalarValue};
use datafusion::logical_expr::{
    cast, lit, when, ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use lakegate_policies::Mask;

pub use crate::digests::ProjectKey;
use crate::digests::{subject_digests, Digest, RunDigests};
use crate::strings::Strings;

/// ZIP3 areas with fewer than 20,000 people (HIPAA Safe Harbor, 2000 census), which must become
/// `000`. Versioned so a policy decision can say which list it used.
pub const RESTRICTED_ZIP3_VERSION: &str = "safe-harbor-census-2000";
pub const RESTRICTED_ZIP3: &[&str] = &[
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

const DAY_MICROS: i64 = 86_400_000_000;

/// What one masking UDF computes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kernel {
    Pseudonym(ProjectKey),
    DateShift {
        key: ProjectKey,
        max_days: u32,
    },
    ShowLast(usize),
    ShowFirst(usize),
    Zip3,
    YearOnly {
        collapse_age_over: Option<u32>,
        this_year: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MaskUdf {
    name: &'static str,
    kernel: Kernel,
    signature: Signature,
}

impl MaskUdf {
    fn udf(name: &'static str, kernel: Kernel, arity: usize) -> ScalarUDF {
        ScalarUDF::from(Self {
            name,
            kernel,
            signature: Signature::any(arity, Volatility::Immutable),
        })
    }
}

/// `ps_` and 24 hex digits (96 bits of the HMAC).
const PSEUDONYM_LEN: usize = 27;

fn map_strings(a: &ArrayRef, mut f: impl FnMut(&str, &mut String)) -> DFResult<ArrayRef> {
    let strings = Strings::of(a)?;
    let mut out =
        StringBuilder::with_capacity(strings.len(), strings.value_bytes() + 16 * strings.len());
    let mut buf = String::new();
    for i in 0..strings.len() {
        match strings.get(i) {
            Some(s) => {
                buf.clear();
                f(s, &mut buf);
                out.append_value(&buf);
            }
            None => out.append_null(),
        }
    }
    Ok(Arc::new(out.finish()))
}

fn keep(s: &str, n: usize, from_end: bool, out: &mut String) {
    let len = s.chars().count();
    let shown = n.min(len);
    for (i, c) in s.chars().enumerate() {
        let visible = if from_end {
            i >= len - shown
        } else {
            i < shown
        };
        // Separators stay so the shape of an SSN or phone number is still recognisable.
        out.push(if visible || c == '-' { c } else { '*' });
    }
}

/// `values` with each run's offset applied by `shift`. A null slot's value is whatever the
/// source held, shifted too (saturating): it stays hidden under the null buffer.
fn shifted<T: Copy>(
    values: &[T],
    runs: &[(std::ops::Range<usize>, i64)],
    shift: impl Fn(T, i64) -> T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for (run, offset) in runs {
        out.extend(values[run.clone()].iter().map(|&v| shift(v, *offset)));
    }
    out
}

/// The offset of a subject's dates, from bytes of its digest that its pseudonym does not show
/// (the pseudonym shows the first 12), so knowing one tells nothing of the other.
fn shift_days(digest: &Digest, max_days: u32) -> i64 {
    let n = u64::from_le_bytes(digest[24..32].try_into().expect("8 bytes"));
    let span = 2 * u64::from(max_days) + 1;
    (n % span) as i64 - i64::from(max_days)
}

/// The offset of a subject's times, in microseconds: its dates' whole days plus a part of a day
/// (from other bytes of the digest that the pseudonym does not show). A whole-day shift left
/// each time of day as it was, to the microsecond: two projects' shifted times of the same
/// encounters matched, linking their pseudonyms one to one. With a sub-day part no field of a
/// time (hour, minute, second, fraction) survives; intervals between one subject's times do, as
/// they must for the data to be of clinical use.
fn shift_micros(digest: &Digest, max_days: u32) -> i64 {
    let n = u64::from_le_bytes(digest[16..24].try_into().expect("8 bytes"));
    shift_days(digest, max_days) * DAY_MICROS + (n % DAY_MICROS as u64) as i64
}

/// The pseudonyms of a column whose runs of subjects have `digests`, written straight into the
/// array's buffers: every pseudonym has the same length and a run is its pseudonym repeated.
/// This runs on every row a training stream reads, where a builder's bookkeeping per value cost
/// more than the HMACs (one per run).
fn pseudonyms(
    digests: &RunDigests,
    len: usize,
    nulls: Option<NullBuffer>,
) -> DFResult<datafusion::arrow::array::StringArray> {
    use datafusion::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
    if i32::try_from(len.saturating_mul(PSEUDONYM_LEN)).is_err() {
        return exec_err!("{len} pseudonyms do not fit in one string array");
    }
    let mut values = Vec::with_capacity(len * PSEUDONYM_LEN);
    let mut offsets = Vec::with_capacity(len + 1);
    offsets.push(0i32);
    let mut end = 0i32;
    for (run, digest) in digests.iter() {
        match digest {
            Some(d) => {
                let mut p = [0u8; PSEUDONYM_LEN];
                p[..3].copy_from_slice(b"ps_");
                for (i, b) in d[..12].iter().enumerate() {
                    p[3 + 2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
                    p[4 + 2 * i] = b"0123456789abcdef"[usize::from(b & 15)];
                }
                for _ in run.clone() {
                    values.extend_from_slice(&p);
                    end += PSEUDONYM_LEN as i32;
                    offsets.push(end);
                }
            }
            // A null subject's rows stay null and hold no bytes.
            None => offsets.extend(std::iter::repeat_n(end, run.len())),
        }
    }
    Ok(datafusion::arrow::array::StringArray::try_new(
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Buffer::from_vec(values),
        nulls,
    )?)
}

fn year_start_days(year: i32) -> i32 {
    chrono::NaiveDate::from_ymd_opt(year, 1, 1)
        .map(|d| {
            (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days() as i32
        })
        .unwrap_or(0)
}

fn year_of_days(days: i32) -> i32 {
    (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")
        + chrono::Duration::days(i64::from(days)))
    .year()
}

impl ScalarUDFImpl for MaskUdf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        // Type-preserving, except that masked strings are always plain `Utf8`.
        Ok(match &arg_types[0] {
            DataType::Utf8View => DataType::Utf8,
            other => other.clone(),
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = &arrays[0];
        let out: ArrayRef = match &self.kernel {
            Kernel::Pseudonym(key) => {
                let digests = subject_digests(key, a)?;
                Arc::new(pseudonyms(&digests, a.len(), a.logical_nulls())?)
            }
            Kernel::ShowLast(n) => map_strings(a, |s, out| keep(s, *n, true, out))?,
            Kernel::ShowFirst(n) => map_strings(a, |s, out| keep(s, *n, false, out))?,
            Kernel::Zip3 => map_strings(a, |s, out| {
                let prefix: String = s.chars().take(3).collect();
                if prefix.len() == 3
                    && prefix.bytes().all(|b| b.is_ascii_digit())
                    && !RESTRICTED_ZIP3.contains(&prefix.as_str())
                {
                    out.push_str(&prefix);
                } else {
                    out.push_str("000");
                }
            })?,
            Kernel::DateShift { key, max_days } => {
                let subjects = Strings::of(&arrays[1])?;
                let digests = subject_digests(key, &arrays[1])?;
                // One offset per run of a subject's rows; a row without a subject cannot be
                // shifted consistently: hidden (null), as a null value stays null.
                let nulls = NullBuffer::union(a.logical_nulls().as_ref(), subjects.nulls());
                let runs = |offset: fn(&Digest, u32) -> i64| -> Vec<(std::ops::Range<usize>, i64)> {
                    digests
                        .iter()
                        .map(|(run, digest)| {
                            (
                                run.clone(),
                                digest.as_ref().map_or(0, |d| offset(d, *max_days)),
                            )
                        })
                        .collect()
                };
                match a.data_type() {
                    DataType::Date32 => {
                        let d = a.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
                        let values = shifted(d.values(), &runs(shift_days), |v, o| {
                            v.saturating_add(o as i32)
                        });
                        Arc::new(Date32Array::new(values.into(), nulls))
                    }
                    DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                        let t = a
                            .as_primitive::<datafusion::arrow::datatypes::TimestampMicrosecondType>(
                            );
                        let values =
                            shifted(t.values(), &runs(shift_micros), |v, o| v.saturating_add(o));
                        Arc::new(
                            TimestampMicrosecondArray::new(values.into(), nulls)
                                .with_timezone_opt(tz.clone()),
                        )
                    }
                    other => return exec_err!("date shift does not apply to {other}"),
                }
            }
            Kernel::YearOnly {
                collapse_age_over,
                this_year,
            } => {
                let floor_year = |y: i32| match collapse_age_over {
                    Some(limit) if this_year - y > *limit as i32 => this_year - *limit as i32 - 1,
                    _ => y,
                };
                match a.data_type() {
                    DataType::Date32 => {
                        let d = a.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
                        Arc::new(Date32Array::from_iter(d.iter().map(|v| {
                            v.map(|x| year_start_days(floor_year(year_of_days(x))))
                        })))
                    }
                    DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                        let t = a
                            .as_primitive::<datafusion::arrow::datatypes::TimestampMicrosecondType>(
                            );
                        Arc::new(
                            TimestampMicrosecondArray::from_iter(t.iter().map(|v| {
                                v.map(|x| {
                                    let days = x.div_euclid(DAY_MICROS) as i32;
                                    i64::from(year_start_days(floor_year(year_of_days(days))))
                                        * DAY_MICROS
                                })
                            }))
                            .with_timezone_opt(tz.clone()),
                        )
                    }
                    other => return exec_err!("year_only does not apply to {other}"),
                }
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// The expression that replaces `column` (of type `data_type`) under `mask`.
///
/// `key` is the principal's project key (required by pseudonym and date shift) and
/// `subject` the column expression the date shift keys on.
pub fn mask_expr(
    mask: &Mask,
    column: Expr,
    data_type: &DataType,
    key: Option<&ProjectKey>,
    subject: Option<Expr>,
) -> Result<Expr, String> {
    let this_year = chrono::Utc::now().year();
    Ok(match mask {
        Mask::Nullify => lit(ScalarValue::try_from(data_type).map_err(|e| e.to_string())?),
        Mask::Redact { text } => when(column.is_null(), lit(ScalarValue::Utf8(None)))
            .otherwise(lit(text.clone()))
            .map_err(|e| e.to_string())?,
        Mask::ShowLast { n } => {
            MaskUdf::udf("lg_show_last", Kernel::ShowLast(*n), 1).call(vec![column])
        }
        Mask::ShowFirst { n } => {
            MaskUdf::udf("lg_show_first", Kernel::ShowFirst(*n), 1).call(vec![column])
        }
        Mask::Zip3 => MaskUdf::udf("lg_zip3", Kernel::Zip3, 1).call(vec![column]),
        Mask::YearOnly { collapse_age_over } => MaskUdf::udf(
            "lg_year_only",
            Kernel::YearOnly {
                collapse_age_over: *collapse_age_over,
                this_year,
            },
            1,
        )
        .call(vec![column]),
        Mask::Pseudonym => {
            let key = key.ok_or("pseudonym mask needs a project key")?.clone();
            MaskUdf::udf("lg_pseudonym", Kernel::Pseudonym(key), 1).call(vec![column])
        }
        Mask::DateShift { max_days, .. } => {
            let key = key.ok_or("date shift needs a project key")?.clone();
            let subject = subject.ok_or("date shift needs its subject column")?;
            MaskUdf::udf(
                "lg_date_shift",
                Kernel::DateShift {
                    key,
                    max_days: *max_days,
                },
                2,
            )
            .call(vec![column, subject])
        }
        Mask::Bucket { width } => {
            let bucketed = datafusion::functions::math::expr_fn::floor(
                cast(column, DataType::Float64) / lit(*width),
            ) * lit(*width);
            cast(bucketed, data_type.clone())
        }
    })
}

/// A mask's kind, as named in policy files (for the audit trail; never its parameters' secrets).
/// Makes the digests of `ids` known under `key`, so that pseudonyms and date shifts of these
/// subjects under this key are read from a table instead of computed (see `digests.rs`). The
/// engine does this itself, in the background, for every pseudonymized column a scan reads.
pub fn remember_subjects(key: &ProjectKey, ids: &datafusion::arrow::array::StringArray) {
    crate::digests::remember(key, ids);
}

/// The project key of a pseudonym mask expression (`lg_pseudonym(column)`), if it is one.
pub(crate) fn pseudonym_key(mask: &Expr) -> Option<&ProjectKey> {
    match mask {
        Expr::ScalarFunction(f) => match f.func.inner().downcast_ref::<MaskUdf>() {
            Some(MaskUdf {
                kernel: Kernel::Pseudonym(key),
                ..
            }) => Some(key),
            _ => None,
        },
        _ => None,
    }
}

pub fn mask_name(m: &Mask) -> &'static str {
    match m {
        Mask::Nullify => "nullify",
        Mask::Redact { .. } => "redact",
        Mask::ShowLast { .. } => "show_last",
        Mask::ShowFirst { .. } => "show_first",
        Mask::Pseudonym => "pseudonym",
        Mask::YearOnly { .. } => "year_only",
        Mask::Zip3 => "zip3",
        Mask::DateShift { .. } => "date_shift",
        Mask::Bucket { .. } => "bucket",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    fn run(
        expr_mask: &Mask,
        input: ArrayRef,
        key: Option<&ProjectKey>,
        subject: Option<ArrayRef>,
    ) -> ArrayRef {
        let dt = input.data_type().clone();
        let udf_expr = mask_expr(
            expr_mask,
            datafusion::prelude::col("x"),
            &dt,
            key,
            subject.as_ref().map(|_| datafusion::prelude::col("s")),
        )
        .unwrap();
        let Expr::ScalarFunction(f) = udf_expr else {
            panic!("expected a UDF")
        };
        let mut args = vec![ColumnarValue::Array(input.clone())];
        if let Some(s) = subject {
            args.push(ColumnarValue::Array(s));
        }
        let n = input.len();
        let r = f
            .func
            .invoke_with_args(ScalarFunctionArgs {
                args,
                arg_fields: vec![],
                number_rows: n,
                return_field: Arc::new(datafusion::arrow::datatypes::Field::new(
                    "x",
                    f.func.return_type(&[dt]).unwrap(),
                    true,
                )),
                config_options: Default::default(),
            })
            .unwrap();
        r.into_array(n).unwrap()
    }

    fn strings(a: &ArrayRef) -> Vec<Option<String>> {
        a.as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    }

    #[test]
    fn show_last_keeps_shape_and_handles_non_ascii_and_nulls() {
        let input: ArrayRef = Arc::new(StringArray::from(vec![
            Some("123-45-6789"),
            None,
            Some("Zoë"),
            Some(""),
        ]));
        let out = strings(&run(&Mask::ShowLast { n: 4 }, input, None, None));
        assert_eq!(
            out,
            vec![
                Some("***-**-6789".into()),
                None,
                Some("Zoë".into()),
                Some("".into())
            ]
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_project_and_differ_across_projects() {
        let a = ProjectKey([1; 32]);
        let b = ProjectKey([2; 32]);
        let input: ArrayRef = Arc::new(StringArray::from(vec![
            Some("P1"),
            Some("P1"),
            Some("李"),
            None,
        ]));
        let x = strings(&run(&Mask::Pseudonym, input.clone(), Some(&a), None));
        let y = strings(&run(&Mask::Pseudonym, input, Some(&b), None));
        assert_eq!(x[0], x[1]);
        assert_ne!(x[0], y[0]);
        assert_ne!(x[0], x[2]);
        assert!(x[0].as_ref().unwrap().starts_with("ps_"));
        assert_eq!(x[3], None);
    }

    #[test]
    fn zip3_restricted_areas_become_000() {
        let input: ArrayRef = Arc::new(StringArray::from(vec![
            Some("02139"),
            Some("03601"),
            Some("89012"),
            Some("1"),
            None,
        ]));
        let out = strings(&run(&Mask::Zip3, input, None, None));
        assert_eq!(
            out,
            vec![
                Some("021".into()),
                Some("000".into()),
                Some("000".into()),
                Some("000".into()),
                None
            ]
        );
    }

    #[test]
    fn year_only_collapses_ages_over_89() {
        let this_year = chrono::Utc::now().year();
        let born_1980 = chrono::NaiveDate::from_ymd_opt(1980, 7, 14).unwrap();
        let born_old = chrono::NaiveDate::from_ymd_opt(this_year - 95, 3, 2).unwrap();
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let days = |d: chrono::NaiveDate| (d - epoch).num_days() as i32;
        let input: ArrayRef = Arc::new(Date32Array::from(vec![
            Some(days(born_1980)),
            Some(days(born_old)),
            None,
        ]));
        let out = run(
            &Mask::YearOnly {
                collapse_age_over: Some(89),
            },
            input,
            None,
            None,
        );
        let out = out.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
        assert_eq!(year_of_days(out.value(0)), 1980);
        assert_eq!(out.value(0), year_start_days(1980));
        assert_eq!(year_of_days(out.value(1)), this_year - 90);
        assert!(out.is_null(2));
    }

    #[test]
    fn date_shift_is_per_subject_bounded_and_stable() {
        let key = ProjectKey([7; 32]);
        let input: ArrayRef = Arc::new(Date32Array::from(vec![
            Some(20_000),
            Some(20_010),
            Some(20_000),
            None,
            Some(20_000),
        ]));
        let subjects: ArrayRef = Arc::new(StringArray::from(vec![
            Some("P1"),
            Some("P1"),
            Some("P2"),
            Some("P3"),
            None,
        ]));
        let mask = Mask::DateShift {
            subject: "s".into(),
            max_days: 30,
        };
        let out = run(&mask, input, Some(&key), Some(subjects));
        let out = out.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
        // Intervals within a subject are preserved.
        assert_eq!(out.value(1) - out.value(0), 10);
        for i in 0..3 {
            assert!((out.value(i) - [20_000, 20_010, 20_000][i]).abs() <= 30);
        }
        assert!(out.is_null(3));
        // A date without a subject cannot be shifted consistently: hidden.
        assert!(out.is_null(4));
    }

    #[test]
    fn times_shift_by_days_and_a_part_of_a_day_keeping_intervals() {
        let key = ProjectKey([7; 32]);
        let other = ProjectKey([8; 32]);
        let t0 = 1_600_000_000_123_456_i64;
        let times: ArrayRef = Arc::new(
            TimestampMicrosecondArray::from(vec![Some(t0), Some(t0 + 3_600_000_000), Some(t0)])
                .with_timezone("UTC"),
        );
        let subjects: ArrayRef =
            Arc::new(StringArray::from(vec![Some("P1"), Some("P1"), Some("P2")]));
        let mask = Mask::DateShift {
            subject: "s".into(),
            max_days: 30,
        };
        let shifted = |key: &ProjectKey| {
            let out = run(
                &mask,
                Arc::clone(&times),
                Some(key),
                Some(Arc::clone(&subjects)),
            );
            out.as_primitive::<datafusion::arrow::datatypes::TimestampMicrosecondType>()
                .values()
                .to_vec()
        };
        let (mine, theirs) = (shifted(&key), shifted(&other));
        // One offset per subject: intervals are kept, within 30 days and a day.
        assert_eq!(mine[1] - mine[0], 3_600_000_000);
        assert!((mine[0] - t0).abs() <= 31 * DAY_MICROS);
        // The time of day moves too, and differs between subjects and between projects.
        let time_of_day = |t: i64| t.rem_euclid(DAY_MICROS);
        assert_ne!(time_of_day(mine[0]), time_of_day(t0));
        assert_ne!(time_of_day(mine[0]), time_of_day(mine[2]));
        assert_ne!(time_of_day(mine[0]), time_of_day(theirs[0]));
    }

    #[test]
    fn pseudonym_and_date_shift_derive_from_one_digest_of_the_subject() {
        // Known answer: the pseudonym shows the digest's first 12 bytes, the date shift reads
        // its last 8, so one HMAC per subject serves both and neither reveals the other.
        let key = ProjectKey([9; 32]);
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key.0).unwrap();
        m.update(b"pseudonym\0P1");
        let d = m.finalize().into_bytes();
        let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
        let n = u64::from_le_bytes(d[24..32].try_into().unwrap());
        let offset = (n % 61) as i32 - 30;

        let ids: ArrayRef = Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
            Some("P1"),
            Some("P1"),
            None,
            Some("P2"),
        ]));
        let dates: ArrayRef = Arc::new(Date32Array::from(vec![Some(20_000); 4]));
        let shift = Mask::DateShift {
            subject: "s".into(),
            max_days: 30,
        };
        // In either order on the same array (as one projection evaluates them), and on a copy
        // of it (computed afresh), the answers are the same.
        let shifted = run(
            &shift,
            Arc::clone(&dates),
            Some(&key),
            Some(Arc::clone(&ids)),
        );
        let pseudonyms = strings(&run(&Mask::Pseudonym, Arc::clone(&ids), Some(&key), None));
        assert_eq!(pseudonyms[0].as_deref(), Some(format!("ps_{hex}").as_str()));
        assert_eq!(pseudonyms[0], pseudonyms[1]);
        assert_eq!(pseudonyms[2], None);
        assert_ne!(pseudonyms[3], pseudonyms[0]);
        let days = shifted.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
        assert_eq!(days.value(0), 20_000 + offset);
        assert!(days.is_null(2));

        let copy: ArrayRef = Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
            Some("P1"),
            Some("P1"),
            None,
            Some("P2"),
        ]));
        let fresh = strings(&run(&Mask::Pseudonym, Arc::clone(&copy), Some(&key), None));
        assert_eq!(fresh, pseudonyms);
        assert_eq!(
            &run(&shift, Arc::clone(&dates), Some(&key), Some(copy)),
            &shifted
        );
        // Another project's key on the same array is not answered from the first one's digests.
        let other = ProjectKey([10; 32]);
        let theirs = strings(&run(&Mask::Pseudonym, Arc::clone(&ids), Some(&other), None));
        assert_ne!(theirs[0], pseudonyms[0]);
    }

    #[test]
    fn adjacent_rows_share_an_answer_only_when_their_strings_are_equal() {
        // Kernels reuse one answer per run of equal strings: inline views, long views at
        // different offsets, equal prefixes and lengths, nulls beside empty strings.
        let values = vec![
            Some("P00000001"),
            Some("P00000001"),
            Some("P00000002"),
            Some("patient-000000000001"),
            Some("patient-000000000001"),
            Some("patient-000000000002"),
            Some("patient-0000000000021"),
            None,
            Some("P00000002"),
            None,
            None,
            Some(""),
            Some(""),
            None,
        ];
        let views: ArrayRef = Arc::new(datafusion::arrow::array::StringViewArray::from(
            values.clone(),
        ));
        let plain: ArrayRef = Arc::new(StringArray::from(values.clone()));
        for a in [&views, &plain] {
            let strings = Strings::of(a).unwrap();
            // Runs cover every row in order; each is all null or all one string, and a new run
            // starts exactly where the value or its nullness changes: a null never joins an
            // empty string, equal long strings stored apart share a run.
            let runs = strings.runs();
            let starts: Vec<usize> = runs.iter().map(|r| r.start).collect();
            assert_eq!(starts, [0, 2, 3, 5, 6, 7, 8, 9, 11, 13]);
            assert_eq!(runs.last().map(|r| r.end), Some(values.len()));
            assert!(runs.windows(2).all(|w| w[0].end == w[1].start));
        }
        // Each row's pseudonym is the one it gets alone.
        let key = ProjectKey([5; 32]);
        let all = strings(&run(&Mask::Pseudonym, views, Some(&key), None));
        for (i, v) in values.iter().enumerate() {
            let alone: ArrayRef = Arc::new(StringArray::from(vec![*v]));
            let alone = strings(&run(&Mask::Pseudonym, alone, Some(&key), None));
            assert_eq!(all[i], alone[0], "row {i}");
        }
    }

    #[test]
    fn masks_read_string_views_as_they_read_utf8() {
        // The lake's raw strings arrive as views; masks must answer exactly as on plain Utf8,
        // and always produce plain Utf8.
        let values = vec![
            Some("123-45-6789"),
            None,
            Some("Zoë Ngô, a name longer than twelve bytes"),
            Some(""),
            Some("03601"),
        ];
        let plain: ArrayRef = Arc::new(StringArray::from(values.clone()));
        let views: ArrayRef = Arc::new(datafusion::arrow::array::StringViewArray::from(values));
        let key = ProjectKey([3; 32]);
        for mask in [
            Mask::Pseudonym,
            Mask::ShowLast { n: 4 },
            Mask::ShowFirst { n: 2 },
            Mask::Zip3,
        ] {
            let a = run(&mask, Arc::clone(&plain), Some(&key), None);
            let b = run(&mask, Arc::clone(&views), Some(&key), None);
            assert_eq!(b.data_type(), &DataType::Utf8, "{mask:?}");
            assert_eq!(strings(&a), strings(&b), "{mask:?}");
        }
        let dates: ArrayRef = Arc::new(Date32Array::from(vec![Some(20_000); 5]));
        let shift = Mask::DateShift {
            subject: "s".into(),
            max_days: 30,
        };
        let a = run(&shift, Arc::clone(&dates), Some(&key), Some(plain));
        let b = run(&shift, dates, Some(&key), Some(views));
        assert_eq!(&a, &b);
    }
}
