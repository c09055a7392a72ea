//! Per-principal memory budgets: a caller's queries share one budget, inside the server's pool.
//!
//! A [`MemoryBudget`] is a [`GreedyMemoryPool`] of the principal's size. Each of that
//! principal's sessions runs on a [`BudgetedPool`] that reserves every byte in the budget first
//! and then in the server-wide pool, so one caller's runaway query fails (or spills) at its own
//! budget while everyone else keeps the shared pool's memory.

use std::fmt;
use std::sync::Arc;

use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// The start of the message a budget refusal carries; the error mapping keeps it whole.
pub const BUDGET_EXCEEDED: &str = "this principal's memory budget";

/// The memory one principal's running queries may hold together.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    pool: Arc<GreedyMemoryPool>,
    bytes: usize,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        Self {
            pool: Arc::new(GreedyMemoryPool::new(bytes)),
            bytes,
        }
    }

    /// Identity of the budget (clones share it): the address of its pool.
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.pool) as usize
    }

    /// Bytes reserved now by the principal's queries.
    pub fn reserved(&self) -> usize {
        self.pool.reserved()
    }

    pub fn limit(&self) -> usize {
        self.bytes
    }
}

/// The pool one budgeted session runs on: the principal's budget, then the server's pool.
#[derive(Debug)]
pub(crate) struct BudgetedPool {
    pub(crate) budget: MemoryBudget,
    pub(crate) shared: Arc<dyn MemoryPool>,
}

impl fmt::Display for BudgetedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "budget({}) in {}", self.budget.bytes, self.shared)
    }
}

impl MemoryPool for BudgetedPool {
    fn name(&self) -> &str {
        "lakegate-budget"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.budget.pool.register(consumer);
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.budget.pool.unregister(consumer);
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.budget.pool.grow(reservation, additional);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.budget.pool.shrink(reservation, shrink);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::common::Result<()> {
        if self.budget.pool.try_grow(reservation, additional).is_err() {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{BUDGET_EXCEEDED} of {} MiB is used up by its running queries (rule: limits.memory_mb)",
                self.budget.bytes >> 20
            )));
        }
        if let Err(e) = self.shared.try_grow(reservation, additional) {
            self.budget.pool.shrink(reservation, additional);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.budget.pool.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        match self.shared.memory_limit() {
            MemoryLimit::Finite(n) => MemoryLimit::Finite(n.min(self.budget.bytes)),
            _ => MemoryLimit::Finite(self.budget.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::FairSpillPool;

    #[test]
    fn budget_refuses_before_the_shared_pool_and_gives_back_on_failure() {
        let shared: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(10 << 20));
        let budget = MemoryBudget::new(1 << 20);
        let pool: Arc<dyn MemoryPool> = Arc::new(BudgetedPool {
            budget: budget.clone(),
            shared: Arc::clone(&shared),
        });
        let r = MemoryConsumer::new("t").register(&pool);
        r.try_grow(512 << 10).unwrap();
        assert_eq!(budget.reserved(), 512 << 10);
        assert_eq!(shared.reserved(), 512 << 10);
        let err = r.try_grow(1 << 20).unwrap_err().to_string();
        assert!(err.contains(BUDGET_EXCEEDED), "{err}");
        assert_eq!(
            shared.reserved(),
            512 << 10,
            "nothing leaked into the shared pool"
        );
        // Another session of the same principal shares the budget.
        let pool2: Arc<dyn MemoryPool> = Arc::new(BudgetedPool {
            budget: budget.clone(),
            shared: Arc::clone(&shared),
        });
        let r2 = MemoryConsumer::new("t2").register(&pool2);
        assert!(r2.try_grow(600 << 10).is_err());
        drop(r);
        r2.try_grow(600 << 10).unwrap();
        drop(r2);
        assert_eq!(budget.reserved(), 0);
        assert_eq!(shared.reserved(), 0);
    }

    #[test]
    fn shared_pool_failure_rolls_back_the_budget() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1 << 20));
        let budget = MemoryBudget::new(8 << 20);
        let pool: Arc<dyn MemoryPool> = Arc::new(BudgetedPool {
            budget: budget.clone(),
            shared,
        });
        let r = MemoryConsumer::new("t").register(&pool);
        assert!(r.try_grow(2 << 20).is_err());
        assert_eq!(budget.reserved(), 0);
    }
}
