//! Lakegate's Arrow Flight SQL server: the only door into the lake.
//!
//! [`serve`] runs the gRPC service over an [`Engine`]; the `lakegate` binary (see `main.rs`)
//! wires configuration, the demo lake and logging around it.

pub mod audited;
pub mod config;
pub mod demo;
pub mod identity;
pub mod limits;
mod metadata;
pub mod reload;
pub mod service;
pub mod signing;
pub mod status;
mod tickets;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use lakegate_engine::audit::AuditLog;
use lakegate_engine::Engine;
use tokio::net::TcpListener;

pub use identity::Identity;
pub use limits::Limiter;
pub use service::{LakegateService, Lifetimes};

/// Largest gRPC message a client may send (SQL text, bound parameters).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Build the gRPC service with message-size limits applied.
pub fn flight_service(
    engine: Engine,
    identity: Arc<Identity>,
    limiter: Arc<Limiter>,
    lifetimes: Lifetimes,
    audit: AuditLog,
) -> FlightServiceServer<LakegateService> {
    FlightServiceServer::new(LakegateService::new(
        engine, identity, limiter, lifetimes, audit,
    ))
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(usize::MAX)
}

/// Serve on an already bound listener until `shutdown` resolves; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    service: FlightServiceServer<LakegateService>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // tonic's TLS is built with tls-ring; say so to rustls, which has aws-lc-rs compiled
        // in as well (an error means a provider is already installed, which is as good).
        let _ = rustls::crypto::ring::default_provider().install_default();
        builder = builder.tls_config(tls)?;
    }
    // The builder's tcp_nodelay applies only to listeners tonic binds itself: set it on ours,
    // or Nagle's algorithm holds each small response until the client's delayed ACK (40 ms per
    // round trip; a point lookup took 90 ms over Flight against 11 ms in the engine).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Bind `addr` (port 0 picks a free port) and report the address actually bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
