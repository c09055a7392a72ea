//! Per-principal limits: concurrent queries, memory budget, query timeout, SQL size, request
//! rate; and per client address, the Handshake rate. Exceeding one answers ResourceExhausted
//! naming the limit; other callers are unaffected because every counter belongs to one
//! principal or one address.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use lakegate_engine::MemoryBudget;
use lakegate_policies::Principal;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// One principal's limits. Every field may be set in `[limits]` (the default for everyone),
/// `[limits.roles.ROLE]` or `[limits.users.NAME]` (most specific wins, field by field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent_queries: u32,
    pub memory_mb: u64,
    pub query_timeout_secs: u64,
    pub max_sql_bytes: usize,
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_queries: 8,
            memory_mb: 1024,
            query_timeout_secs: 900,
            max_sql_bytes: 64 << 10,
            requests_per_second: 100,
            burst: 200,
        }
    }
}

/// A partial [`Limits`], as written in the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    pub max_concurrent_queries: Option<u32>,
    pub memory_mb: Option<u64>,
    pub query_timeout_secs: Option<u64>,
    pub max_sql_bytes: Option<usize>,
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
}

impl LimitsPatch {
    fn apply(&self, l: &mut Limits) {
        let LimitsPatch {
            max_concurrent_queries,
            memory_mb,
            query_timeout_secs,
            max_sql_bytes,
            requests_per_second,
            burst,
        } = self;
        if let Some(v) = max_concurrent_queries {
            l.max_concurrent_queries = *v;
        }
        if let Some(v) = memory_mb {
            l.memory_mb = *v;
        }
        if let Some(v) = query_timeout_secs {
            l.query_timeout_secs = *v;
        }
        if let Some(v) = max_sql_bytes {
            l.max_sql_bytes = *v;
        }
        if let Some(v) = requests_per_second {
            l.requests_per_second = *v;
        }
        if let Some(v) = burst {
            l.burst = *v;
        }
    }
}

/// The `[limits]` table: defaults, then overrides by role and by user.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_concurrent_queries: Option<u32>,
    pub memory_mb: Option<u64>,
    pub query_timeout_secs: Option<u64>,
    pub max_sql_bytes: Option<usize>,
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    /// Handshakes (password checks) one client address may start per minute, sustained.
    /// Per address, not per principal: the caller is not known before it authenticates.
    pub handshakes_per_minute: Option<u32>,
    /// Handshakes one client address may start at once before the rate applies.
    pub handshake_burst: Option<u32>,
    #[serde(default)]
    pub roles: BTreeMap<String, LimitsPatch>,
    #[serde(default)]
    pub users: BTreeMap<String, LimitsPatch>,
}

impl LimitSettings {
    /// The limits everyone gets before role and user overrides.
    fn defaults(&self) -> LimitsPatch {
        LimitsPatch {
            max_concurrent_queries: self.max_concurrent_queries,
            memory_mb: self.memory_mb,
            query_timeout_secs: self.query_timeout_secs,
            max_sql_bytes: self.max_sql_bytes,
            requests_per_second: self.requests_per_second,
            burst: self.burst,
        }
    }

    /// Check that every limit is usable (a zero would lock a principal out silently).
    pub fn validate(&self) -> Result<(), String> {
        let defaults = self.defaults();
        let all = std::iter::once(("[limits]".to_string(), &defaults))
            .chain(
                self.roles
                    .iter()
                    .map(|(k, v)| (format!("[limits.roles.{k}]"), v)),
            )
            .chain(
                self.users
                    .iter()
                    .map(|(k, v)| (format!("[limits.users.{k}]"), v)),
            );
        for (field, v) in [
            ("handshakes_per_minute", self.handshakes_per_minute),
            ("handshake_burst", self.handshake_burst),
        ] {
            if v == Some(0) {
                return Err(format!("[limits] {field} must be at least 1"));
            }
        }
        for (table, p) in all {
            let zero = [
                (
                    "max_concurrent_queries",
                    p.max_concurrent_queries.map(u64::from),
                ),
                ("memory_mb", p.memory_mb),
                ("query_timeout_secs", p.query_timeout_secs),
                ("max_sql_bytes", p.max_sql_bytes.map(|v| v as u64)),
                ("requests_per_second", p.requests_per_second.map(u64::from)),
                ("burst", p.burst.map(u64::from)),
            ]
            .into_iter()
            .find(|(_, v)| *v == Some(0));
            if let Some((field, _)) = zero {
                return Err(format!("{table} {field} must be at least 1"));
            }
        }
        Ok(())
    }

    /// The limits that apply to `principal`.
    pub fn resolve(&self, principal: &Principal) -> Limits {
        let mut l = Limits::default();
        self.defaults().apply(&mut l);
        if let Some(p) = principal.attribute("role").and_then(|r| self.roles.get(r)) {
            p.apply(&mut l);
        }
        if let Some(p) = self.users.get(&principal.name) {
            p.apply(&mut l);
        }
        l
    }
}

/// One principal's live counters.
struct Counters {
    limits: Limits,
    rate: DefaultDirectRateLimiter,
    queries: Arc<Semaphore>,
    memory: MemoryBudget,
}

impl Counters {
    fn new(limits: Limits) -> Self {
        let rps = NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            rate: RateLimiter::direct(Quota::per_second(rps).allow_burst(burst)),
            queries: Arc::new(Semaphore::new(limits.max_concurrent_queries as usize)),
            memory: MemoryBudget::new((limits.memory_mb as usize) << 20),
            limits,
        }
    }

    fn idle(&self) -> bool {
        self.queries.available_permits() == self.limits.max_concurrent_queries as usize
            && self.memory.reserved() == 0
    }
}

/// Most principals (and client addresses) tracked at once; idle ones are forgotten beyond it.
const MAX_TRACKED: usize = 10_000;

/// Handshakes per minute one client address may start by default: a person or a pool of
/// connections logs in a few times a minute; a password-guessing loop wants thousands.
pub const DEFAULT_HANDSHAKES_PER_MINUTE: u32 = 120;
pub const DEFAULT_HANDSHAKE_BURST: u32 = 60;

/// The limits of every principal and their live counters.
pub struct Limiter {
    settings: LimitSettings,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    handshakes: DefaultKeyedRateLimiter<IpAddr>,
    handshakes_per_minute: u32,
}

/// What a running query holds: its concurrency slot, its memory budget and its deadline.
pub struct QueryGrant {
    pub permit: OwnedSemaphorePermit,
    pub memory: MemoryBudget,
    pub timeout: Duration,
}

impl Limiter {
    pub fn new(settings: LimitSettings) -> Self {
        let per_minute = settings
            .handshakes_per_minute
            .unwrap_or(DEFAULT_HANDSHAKES_PER_MINUTE);
        let burst = settings.handshake_burst.unwrap_or(DEFAULT_HANDSHAKE_BURST);
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            settings,
            counters: Mutex::new(HashMap::new()),
            handshakes: RateLimiter::keyed(quota),
            handshakes_per_minute: per_minute,
        }
    }

    /// Count one Handshake against its client address's rate, before any password is checked:
    /// a guessing loop is slowed per address instead of queueing everyone behind the Argon2
    /// slots. A connection without a peer address (in-process transports) is not limited.
    pub fn admit_handshake(&self, client: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = client else { return Ok(()) };
        // One IPv6 host holds a whole /64: count the prefix, not each address in it.
        let ip = match ip {
            IpAddr::V6(v6) => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
            v4 => v4,
        };
        if self.handshakes.len() >= MAX_TRACKED {
            // Addresses whose bucket has refilled hold no information: forget them.
            self.handshakes.retain_recent();
            self.handshakes.shrink_to_fit();
        }
        self.handshakes.check_key(&ip).map_err(|_| {
            Status::resource_exhausted(format!(
                "too many handshakes from this address: {} per minute; retry later (limit: handshakes_per_minute)",
                self.handshakes_per_minute
            ))
        })
    }

    fn counters(&self, principal: &Principal) -> Arc<Counters> {
        let limits = self.settings.resolve(principal);
        let mut map = match self.counters.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = map.get(&principal.name) {
            if c.limits == limits {
                return Arc::clone(c);
            }
        }
        if map.len() >= MAX_TRACKED {
            map.retain(|_, c| !c.idle());
        }
        // New principal, or its limits changed (a new role): fresh counters. Queries still
        // running keep the old ones until they end.
        let c = Arc::new(Counters::new(limits));
        map.insert(principal.name.clone(), Arc::clone(&c));
        c
    }

    /// Count one RPC against the principal's request rate.
    pub fn admit_request(&self, principal: &Principal) -> Result<(), Status> {
        let c = self.counters(principal);
        c.rate.check().map_err(|_| {
            Status::resource_exhausted(format!(
                "request rate limit of {} per second reached; retry shortly (limit: requests_per_second)",
                c.limits.requests_per_second
            ))
        })
    }

    /// Check the SQL text's size against the principal's limit.
    pub fn admit_sql(&self, principal: &Principal, sql: &str) -> Result<(), Status> {
        let max = self.counters(principal).limits.max_sql_bytes;
        if sql.len() > max {
            return Err(Status::resource_exhausted(format!(
                "SQL text is {} bytes; the limit is {max} (limit: max_sql_bytes)",
                sql.len()
            )));
        }
        Ok(())
    }

    /// A slot for one running query, or ResourceExhausted when the principal already runs its
    /// maximum.
    pub fn start_query(&self, principal: &Principal) -> Result<QueryGrant, Status> {
        let c = self.counters(principal);
        let permit = Arc::clone(&c.queries).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} queries of this principal are already running (limit: max_concurrent_queries)",
                c.limits.max_concurrent_queries
            ))
        })?;
        Ok(QueryGrant {
            permit,
            memory: c.memory.clone(),
            timeout: Duration::from_secs(c.limits.query_timeout_secs),
        })
    }

    /// The principal's memory budget (also for planning).
    pub fn memory(&self, principal: &Principal) -> MemoryBudget {
        self.counters(principal).memory.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, role: &str) -> Principal {
        Principal {
            name: name.into(),
            attributes: [("role".to_string(), role.to_string())].into(),
        }
    }

    #[test]
    fn most_specific_limit_wins_field_by_field() {
        let s: LimitSettings = toml::from_str(
            "max_concurrent_queries = 2\nmemory_mb = 100\n\
             [roles.data_scientist]\nmemory_mb = 4096\nquery_timeout_secs = 7200\n\
             [users.alice]\nmax_concurrent_queries = 1\n",
        )
        .unwrap();
        s.validate().unwrap();
        let alice = s.resolve(&principal("alice", "data_scientist"));
        assert_eq!(alice.max_concurrent_queries, 1);
        assert_eq!(alice.memory_mb, 4096);
        assert_eq!(alice.query_timeout_secs, 7200);
        let bob = s.resolve(&principal("bob", "analyst"));
        assert_eq!((bob.max_concurrent_queries, bob.memory_mb), (2, 100));
        assert_eq!(bob.burst, Limits::default().burst);
        let bad: LimitSettings = toml::from_str("[users.x]\nburst = 0\n").unwrap();
        assert_eq!(
            bad.validate().unwrap_err(),
            "[limits.users.x] burst must be at least 1"
        );
        assert!(toml::from_str::<LimitSettings>("max_queries = 1\n").is_err());
    }

    #[test]
    fn concurrency_and_rate_are_per_principal() {
        let s: LimitSettings =
            toml::from_str("max_concurrent_queries = 1\nrequests_per_second = 1\nburst = 2\n")
                .unwrap();
        let limiter = Limiter::new(s);
        let alice = principal("alice", "x");
        let bob = principal("bob", "x");
        let held = limiter.start_query(&alice).unwrap();
        let refused = limiter.start_query(&alice).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_concurrent_queries"));
        assert!(limiter.start_query(&bob).is_ok(), "bob is unaffected");
        drop(held);
        assert!(limiter.start_query(&alice).is_ok(), "the slot came back");
        assert!(limiter.admit_request(&alice).is_ok());
        assert!(limiter.admit_request(&alice).is_ok());
        let err = limiter.admit_request(&alice).unwrap_err();
        assert!(err.message().contains("requests_per_second"));
        assert!(limiter.admit_request(&bob).is_ok());
    }

    #[test]
    fn handshakes_are_limited_per_client_address() {
        let s: LimitSettings =
            toml::from_str("handshakes_per_minute = 1\nhandshake_burst = 2\n").unwrap();
        s.validate().unwrap();
        let limiter = Limiter::new(s);
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(limiter.admit_handshake(Some(guesser)).is_ok());
        assert!(limiter.admit_handshake(Some(guesser)).is_ok());
        let err = limiter.admit_handshake(Some(guesser)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("handshakes_per_minute"));
        assert!(
            limiter.admit_handshake(Some(other)).is_ok(),
            "another address is unaffected"
        );
        assert!(limiter.admit_handshake(None).is_ok());
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        limiter.admit_handshake(v6("2001:db8::1")).unwrap();
        limiter.admit_handshake(v6("2001:db8::2")).unwrap();
        assert!(
            limiter.admit_handshake(v6("2001:db8::3")).is_err(),
            "one /64 is one client"
        );
        let zero: LimitSettings = toml::from_str("handshake_burst = 0\n").unwrap();
        assert_eq!(
            zero.validate().unwrap_err(),
            "[limits] handshake_burst must be at least 1"
        );
    }
}
