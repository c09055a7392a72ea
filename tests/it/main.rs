//! Integration tests: a real Lakegate server on 127.0.0.1:0, the arrow-flight Flight SQL client.

mod attacks;
mod audit;
mod common;
mod counted;
mod differential;
mod encryption;
mod flight_sql;
mod identity;
mod ingest;
mod limits;
mod lookup;
mod personas;
mod policy_admin;
mod private;
mod releases;
mod slt;

// The server's allocator, so the soak's resident-memory bound measures what a server does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
