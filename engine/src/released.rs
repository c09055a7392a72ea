//! What a threshold lets out: the check that counts the groups it suppresses, and the order
//! released groups leave in (set by their own values, never by the files').

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::ExecutionPlan;

/// Released groups of a thresholded aggregate in an order set by their own values.
///
/// DataFusion emits groups in the order it first meets them, and that is the order of the rows
/// in the files: `GROUP BY <site is X> LIMIT 1` answered with the group of the first patient of
/// a file, a fact about one person that no threshold hides. Directly above each threshold
/// filter of the optimized physical plan (where no optimizer pass can take it out again), every
/// partition is sorted by all its columns; a limit DataFusion fused into the filter moves onto
/// the sort, so it picks among the sorted groups. Which partition a group lands in follows a
/// hash of its own (released) values.
///
/// Where the plan already sorts a threshold filter's groups by every grouping column directly
/// above it (the order `apply_thresholds` asks for, unless the caller's own ORDER BY replaced
/// it), that sort is kept and none is added: groups are unique in their keys, so it is already
/// an order set by their own values, and rebuilding the plan above a second sort cost 60 us
/// of planning each thresholded query.
pub(crate) fn order_released_groups(
    plan: Arc<dyn ExecutionPlan>,
) -> DFResult<Arc<dyn ExecutionPlan>> {
    use datafusion::arrow::compute::SortOptions;
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_expr::{
        conjunction, split_conjunction, LexOrdering, PhysicalSortExpr, ScalarFunctionExpr,
    };
    use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
    use datafusion::physical_plan::filter::FilterExecBuilder;
    use datafusion::physical_plan::sorts::sort::SortExec;
    let is_check = |e: &Arc<dyn datafusion::physical_expr::PhysicalExpr>| {
        let mut found = false;
        e.apply(|e| {
            found |= e
                .downcast_ref::<ScalarFunctionExpr>()
                .is_some_and(|f| f.name() == ThresholdCheck::NAME);
            Ok(TreeNodeRecursion::Continue)
        })
        .map(|_| found)
    };
    // Threshold filters (by address) already under such a sort. A filter whose subtree changes
    // below is rebuilt at a new address before it is visited, and then gets a sort of its own.
    let mut ordered: HashSet<*const ()> = HashSet::new();
    plan.apply(|node| {
        let Some(sort) = node.downcast_ref::<SortExec>() else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let Some(filter) = sort.input().downcast_ref::<FilterExec>() else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let only_check = split_conjunction(filter.predicate())
            .into_iter()
            .try_fold(true, |all, e| Ok::<_, DataFusionError>(all && is_check(e)?))?;
        // Only the check, no rows picked by a limit.
        let plain_filter = only_check && filter.fetch().is_none();
        let groups = filter
            .input()
            .downcast_ref::<AggregateExec>()
            .filter(|a| {
                matches!(
                    a.mode(),
                    AggregateMode::Final
                        | AggregateMode::FinalPartitioned
                        | AggregateMode::Single
                        | AggregateMode::SinglePartitioned
                ) && a.group_expr().is_single()
            })
            .map_or(0, |a| a.group_expr().expr().len());
        // The aggregate's columns the sort orders by (its grouping columns come first).
        let sorted: HashSet<usize> = sort
            .expr()
            .iter()
            .filter_map(|e| e.expr.downcast_ref::<Column>().map(Column::index))
            .filter_map(|i| match filter.projection() {
                Some(p) => p.get(i).copied(),
                None => Some(i),
            })
            .collect();
        if plain_filter && groups > 0 && (0..groups).all(|i| sorted.contains(&i)) {
            ordered.insert(Arc::as_ptr(sort.input()) as *const ());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    plan.transform_up(|node| {
        let Some(filter) = node.downcast_ref::<FilterExec>() else {
            return Ok(Transformed::no(node));
        };
        if !is_check(filter.predicate())? || ordered.contains(&(Arc::as_ptr(&node) as *const ())) {
            return Ok(Transformed::no(node));
        }
        // The optimizer merges a HAVING over the aggregate into the threshold's filter, whose
        // conjunction evaluates the caller's part on every group, suppressed ones too: there
        // `HAVING 1 / (count(DISTINCT patient_id) - 1) > 0` failed with division by zero exactly
        // when some group held one patient. The caller's part runs above, on released groups.
        let (check, theirs): (Vec<_>, Vec<_>) = split_conjunction(filter.predicate())
            .into_iter()
            .cloned()
            .try_fold((vec![], vec![]), |(mut c, mut t), e| {
                if is_check(&e)? {
                    c.push(e)
                } else {
                    t.push(e)
                }
                Ok::<_, datafusion::error::DataFusionError>((c, t))
            })?;
        let node: Arc<dyn ExecutionPlan> = if theirs.is_empty() {
            node
        } else {
            let released = FilterExecBuilder::new(conjunction(check), Arc::clone(filter.input()))
                .with_batch_size(filter.batch_size())
                .build()?;
            Arc::new(
                FilterExecBuilder::new(conjunction(theirs), Arc::new(released))
                    .apply_projection(filter.projection().as_ref().map(|p| p.to_vec()))?
                    .with_batch_size(filter.batch_size())
                    .with_fetch(filter.fetch())
                    .build()?,
            )
        };
        let schema = node.schema();
        let ordering = LexOrdering::new(schema.fields().iter().enumerate().map(|(i, f)| {
            PhysicalSortExpr::new(
                Arc::new(Column::new(f.name(), i)),
                SortOptions {
                    descending: false,
                    nulls_first: true,
                },
            )
        }));
        let Some(ordering) = ordering else {
            return Ok(Transformed::yes(node));
        };
        let fetch = node.fetch();
        let input = match fetch {
            Some(_) => node.with_fetch(None).ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(
                    "threshold filter keeps its limit".into(),
                )
            })?,
            None => node,
        };
        Ok(Transformed::yes(Arc::new(
            SortExec::new(ordering, input)
                .with_preserve_partitioning(true)
                .with_fetch(fetch),
        ) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// The aggregation threshold's test, `units >= k`, counting the groups it suppresses so the
/// audit trail can say how many were withheld.
#[derive(Debug, Clone)]
pub(crate) struct ThresholdCheck {
    k: i64,
    suppressed: Arc<AtomicU64>,
    signature: Signature,
}

impl PartialEq for ThresholdCheck {
    fn eq(&self, other: &Self) -> bool {
        self.k == other.k && Arc::ptr_eq(&self.suppressed, &other.suppressed)
    }
}
impl Eq for ThresholdCheck {}
impl std::hash::Hash for ThresholdCheck {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.k.hash(state);
        (Arc::as_ptr(&self.suppressed) as usize).hash(state)
    }
}

impl ThresholdCheck {
    pub(crate) const NAME: &'static str = "lg_threshold";

    /// The least number of units a released group holds (0: a release check only).
    pub(crate) fn k(&self) -> i64 {
        self.k
    }

    pub(crate) fn expr(suppressed: Arc<AtomicU64>, units: Expr, k: i64) -> Expr {
        ScalarUDF::from(Self {
            k,
            suppressed,
            signature: Signature::exact(vec![DataType::Int64], Volatility::Volatile),
        })
        .call(vec![units])
    }

    /// A check with k = 0, which every group passes: it marks an aggregate that is under no
    /// threshold but whose groups must leave sorted by their own values, because a raw id
    /// decided the order they were formed in (`counted.rs`); `order_released_groups` sorts
    /// above it as above a threshold.
    pub(crate) fn release_every_group(count: Expr) -> Expr {
        Self::expr(Arc::new(AtomicU64::new(0)), count, 0)
    }
}

impl ScalarUDFImpl for ThresholdCheck {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let units = arrays[0].as_primitive::<Int64Type>();
        let out: BooleanArray = units
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= self.k)))
            .collect();
        let released = out.true_count();
        self.suppressed
            .fetch_add((out.len() - released) as u64, Ordering::Relaxed);
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}
