//! How deeply a query may nest, checked on the parsed SQL before DataFusion plans it.
//!
//! DataFusion walks expressions recursively (the derived `Clone` and `Drop` of `Expr`, physical
//! evaluation), and a flat chain `a OR b OR ...` or `1 + 1 + ...` parses, without recursion,
//! into a tree as deep as it is long: 5,000 terms overflowed a worker's stack and aborted the
//! server, for every caller (apache/datafusion#22936). sqlparser's recursion limit bounds only
//! explicit nesting (parentheses, subqueries). So a parsed statement is measured, and one that
//! nests deeper than [`MAX_DEPTH`] is refused. Parsing, measuring and dropping the refused tree
//! (dropping recurses as deep as the tree) run on a stack of their own, sized for the deepest
//! tree the SQL size limit allows.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DFStatement;
use sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};

/// Levels of expression (or of set operations: `UNION` chains parse the same way) a query may
/// nest. Generous for hand-written and generated SQL (a 1,000-term `OR` list is better written
/// `IN (...)`, which does not nest), and far below where DataFusion's recursion runs out of a
/// worker thread's 2 MiB stack (about 5,000 levels).
pub const MAX_DEPTH: usize = 1000;

/// The least stack that parsing and measuring run on: a statement of the default size limit
/// (64 KiB) nests at most 32K levels, and dropping such a tree takes a few MiB.
const PARSE_STACK: usize = 16 << 20;

/// Stack per byte of SQL beyond that: a level of nesting takes at least two bytes of SQL (`+1`)
/// and under 128 bytes of stack to drop (debug builds included).
const STACK_PER_BYTE: usize = 256;

/// SQL this short parses into at most a few thousand levels (each takes two bytes or more, or
/// counts against the parser's recursion limit), which the calling thread's stack holds.
const SHORT_SQL: usize = 4 << 10;

/// Run `f` (parsing `sql`, then [`check`]) on a stack deep enough for any tree that `sql` can
/// parse into, including dropping it when refused. Short SQL (nearly every query) runs where it
/// is; longer SQL on a stack of its own, reserved per call (mapping it costs more than planning
/// a short query gains from skipping it: bob's cohort count planned 0.9 ms slower with it).
pub(crate) fn on_parse_stack<T>(sql: &str, f: impl FnOnce() -> T) -> T {
    if sql.len() <= SHORT_SQL {
        return f();
    }
    let size = PARSE_STACK.max(sql.len().saturating_mul(STACK_PER_BYTE));
    stacker::grow(size, f)
}

/// `Err` with the reason when `statement` nests deeper than [`MAX_DEPTH`].
pub(crate) fn check(statement: &DFStatement) -> Result<(), String> {
    match statement {
        DFStatement::Statement(statement) => check_sql(statement),
        _ => Ok(()),
    }
}

/// [`check`] for a statement parsed by sqlparser directly.
pub(crate) fn check_sql(statement: &sqlparser::ast::Statement) -> Result<(), String> {
    let mut depth = Depth { now: 0 };
    match statement.visit(&mut depth) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(format!(
            "the query nests deeper than {MAX_DEPTH} levels (a chain of N operators such as \
             `a OR b OR ...` counts N); write long lists of alternatives as `IN (...)`"
        )),
    }
}

struct Depth {
    /// Expressions open on the way down from the statement.
    now: usize,
}

impl Visitor for Depth {
    type Break = ();

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.now += 1;
        // Breaking here also bounds this visit's own recursion.
        if self.now > MAX_DEPTH {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.now -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // `SELECT .. UNION SELECT .. UNION ..` is a left-deep chain of set operations, which the
        // visitor passes through without a hook: walk its spine here, without recursion.
        let mut spine = 0;
        let mut body = query.body.as_ref();
        while let SetExpr::SetOperation { left, .. } = body {
            spine += 1;
            if spine > MAX_DEPTH {
                return ControlFlow::Break(());
            }
            body = left.as_ref();
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn parse(sql: &str) -> DFStatement {
        on_parse_stack(sql, || {
            DFParser::parse_sql(sql)
                .unwrap()
                .pop_front()
                .expect("a statement")
        })
    }

    #[test]
    fn deep_chains_are_refused_and_shallow_ones_pass() {
        let chain = |n: usize, op: &str| format!("SELECT {}", vec!["1"; n].join(op));
        let unions = |n: usize| vec!["SELECT 1"; n].join(" UNION ALL ");
        for ok in [
            chain(MAX_DEPTH - 10, " + "),
            chain(500, " OR "),
            unions(MAX_DEPTH - 10),
            "SELECT a FROM t WHERE a IN (1, 2, 3) AND b = 'x'".to_string(),
        ] {
            assert_eq!(check(&parse(&ok)), Ok(()), "{}", &ok[..40]);
        }
        // The deepest chain short enough to be parsed on the caller's stack.
        let short = chain(2_044, "+");
        assert!(short.len() <= SHORT_SQL, "{}", short.len());
        for deep in [
            short,
            chain(MAX_DEPTH + 1, " + "),
            chain(30_000, " OR "),
            format!(
                "SELECT 1 FROM t WHERE {}",
                vec!["a = 1"; 2_000].join(" AND ")
            ),
            format!("SELECT x{}", "::int".repeat(5_000)),
            unions(2_000),
        ] {
            let statement = parse(&deep);
            let why = check(&statement).expect_err(&deep[..60]);
            assert!(why.contains("nests deeper than 1000"), "{why}");
            // Dropping it needs the deep stack too.
            on_parse_stack(&deep, move || drop(statement));
        }
    }
}
