//! The Flight SQL service: authentication on every RPC, queries planned, audited and streamed,
//! and metadata that lists only what the caller may query.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::SqlInfoData;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Command, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use futures::{stream, Stream, TryStreamExt};
use lakegate_engine::audit::{fingerprint, AuditEvent, AuditLog};
use lakegate_engine::{Engine, EngineError, PlannedQuery};
use lakegate_policies::Principal;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::audited::{audit_unavailable, outcome_of, reason_of, with_report, AuditedStream};
use crate::identity::{AuthError, Identity};
use crate::limits::Limiter;
use crate::metadata::{lakegate_engine_catalog, sql_info, with_column_metadata};
use crate::signing::{now_secs, Signer};
use crate::status::{query_status, token_status};
pub use crate::tickets::{decode_params, decode_ticket, Lifetimes, TicketRequest};
use crate::tickets::{encode_params, HandleBody, TicketBody, MAX_BOUND_PARAMS};

type DataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

pub struct LakegateService {
    engine: Engine,
    audit: AuditLog,
    identity: Arc<Identity>,
    limiter: Arc<Limiter>,
    /// Argon2 verifications running at once. Each takes ~19 MiB for a fraction of a second:
    /// unbounded, a flood of wrong passwords would be a memory attack.
    password_checks: Arc<tokio::sync::Semaphore>,
    signer: Signer,
    lifetimes: Lifetimes,
    /// Handle id -> (owner, parameters, expiry): the fallback for stateful clients.
    bound: Mutex<HashMap<String, (String, String, u64)>>,
    sql_info: SqlInfoData,
}

impl LakegateService {
    pub fn new(
        engine: Engine,
        identity: Arc<Identity>,
        limiter: Arc<Limiter>,
        lifetimes: Lifetimes,
        audit: AuditLog,
    ) -> Self {
        Self {
            engine,
            audit,
            identity,
            limiter,
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )),
            signer: Signer::random(),
            lifetimes,
            bound: Mutex::new(HashMap::new()),
            sql_info: sql_info(),
        }
    }

    /// Authenticate a request and count it against the caller's request rate; a failure is
    /// audited. The principal is derived afresh on every call (users file as it is now, JWT
    /// verified in full), so a revoked user loses access on their next call.
    async fn principal<T>(&self, request: &Request<T>, action: &str) -> Result<Principal, Status> {
        let principal = self.authenticate(request).await.inspect_err(|status| {
            let mut e = AuditEvent::new("auth", action);
            e.client = client_of(request);
            e.outcome = outcome_of(status).into();
            e.reason = reason_of(status);
            self.audit.record_later(e);
        })?;
        self.limiter
            .admit_request(&principal)
            .inspect_err(|status| {
                let mut e = AuditEvent::new("limit", action).by(&principal);
                e.client = client_of(request);
                e.outcome = outcome_of(status).into();
                e.reason = reason_of(status);
                self.audit.record_later(e);
            })?;
        Ok(principal)
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let certified = self.certificate_principal(request)?;
        let principal = match request.metadata().get("authorization") {
            None => certified.clone().ok_or_else(|| {
                Status::unauthenticated(
                    "no credentials: authenticate with Handshake (Basic), a bearer JWT or a client certificate",
                )
            })?,
            Some(header) => {
                let token = header
                    .to_str()
                    .ok()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Status::unauthenticated("expected 'authorization: Bearer <token>'")
                    })?;
                self.bearer(token).await?
            }
        };
        bind_certificate(certified.as_ref(), &principal)?;
        narrow_purpose(
            principal,
            request.metadata().get(PURPOSE_HEADER).map(|v| v.to_str()),
        )
    }

    /// A bearer token: this server's session token, or (when configured) an identity
    /// provider's JWT, which has three dot-separated parts where a session token has two.
    async fn bearer(&self, token: &str) -> Result<Principal, Status> {
        if token.split('.').count() == 3 && self.identity.accepts_jwt() {
            return self
                .identity
                .jwt_principal(token)
                .await
                .map_err(auth_status);
        }
        let (sub, ()) = self
            .signer
            .verify("session", token.as_bytes())
            .map_err(token_status)?;
        self.identity.session_principal(&sub).map_err(auth_status)
    }

    /// The principal a verified client certificate names (mutual TLS), if one was presented.
    fn certificate_principal<T>(&self, request: &Request<T>) -> Result<Option<Principal>, Status> {
        let Some(certs) = request.peer_certs() else {
            return Ok(None);
        };
        let Some(leaf) = certs.first() else {
            return Ok(None);
        };
        self.identity
            .certificate_principal(leaf.as_ref())
            .map(Some)
            .map_err(auth_status)
    }

    fn ticket_info(
        &self,
        principal: &Principal,
        schema: &Schema,
        body: TicketBody,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let token = self
            .signer
            .sign("ticket", &principal.name, self.lifetimes.ticket_secs, &body);
        let ticket = TicketStatementQuery {
            statement_handle: token.into(),
        };
        // No location: the data comes back through this same server, never from storage.
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("schema encoding: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_total_records(-1)
            .with_total_bytes(-1);
        Ok(Response::new(info))
    }

    /// A query's FlightInfo: planned (audited as a `plan` event) to learn its schema and refuse
    /// bad SQL early, nothing executed, with a signed ticket that runs it.
    async fn query_info(
        &self,
        principal: &Principal,
        action: &str,
        sql: String,
        params: Option<String>,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let mut event = AuditEvent::new("plan", action);
        event.client = client_of(&request);
        let planned = self.describe(principal, event, &sql).await?;
        let body = TicketBody::Query { sql, params };
        self.ticket_info(principal, &planned.schema(), body, request.into_inner())
    }

    async fn metadata_info(
        &self,
        request: Request<FlightDescriptor>,
        command: Command,
        schema: &Schema,
    ) -> Result<Response<FlightInfo>, Status> {
        let action = format!("GetFlightInfo({})", command_name(&command));
        let principal = self.principal(&request, &action).await?;
        let mut e = AuditEvent::new("metadata", &action).by(&principal);
        e.client = client_of(&request);
        e.policy_version = self.engine.policy().version().to_string();
        e.outcome = "allowed".into();
        self.audit.record(e).await.map_err(audit_unavailable)?;
        let body = TicketBody::Metadata {
            command: STANDARD.encode(command.into_any().encode_to_vec()),
        };
        self.ticket_info(&principal, schema, body, request.into_inner())
    }

    /// The audit fingerprint of `sql`; SQL over the size limit (refused, and audited, for its
    /// size) is not even parsed.
    fn fingerprint(&self, sql: &str) -> (String, String) {
        if sql.len() <= self.engine.config().max_sql_bytes {
            fingerprint(sql)
        } else {
            ("<too long>".to_string(), String::new())
        }
    }

    /// Plan `sql` for `principal` and audit the decision (`kind`: plan, prepare, query). An
    /// allowed decision that cannot be recorded is refused.
    async fn plan_audited(
        &self,
        principal: &Principal,
        event: AuditEvent,
        sql: &str,
    ) -> Result<(PlannedQuery, AuditEvent), Status> {
        let (normalized, digest) = self.fingerprint(sql);
        let mut e = event.by(principal);
        e.fingerprint = normalized;
        e.fingerprint_sha256 = digest;
        e.policy_version = self.engine.policy().version().to_string();
        if let Err(status) = self.limiter.admit_sql(principal, sql) {
            e.outcome = outcome_of(&status).into();
            e.reason = reason_of(&status);
            self.audit.record_later(e);
            return Err(status);
        }
        let budget = self.limiter.memory(principal);
        let planned = async {
            let session = self.engine.session_within(principal, Some(&budget)).await?;
            Ok::<_, EngineError>((
                session.policy_version().to_string(),
                session.plan(sql).await?,
            ))
        }
        .await;
        match planned {
            Ok((version, planned)) => {
                e.policy_version = version;
                let e = with_report(e, planned.report());
                Ok((planned, e))
            }
            Err(err) => {
                let status = query_status(err, &e.query_id);
                e.outcome = outcome_of(&status).into();
                e.reason = reason_of(&status);
                self.audit.record_later(e);
                Err(status)
            }
        }
    }

    /// Plan only (GetFlightInfo, CreatePreparedStatement): the decision is audited, nothing runs.
    async fn describe(
        &self,
        principal: &Principal,
        event: AuditEvent,
        sql: &str,
    ) -> Result<PlannedQuery, Status> {
        let started = std::time::Instant::now();
        let (planned, mut e) = self.plan_audited(principal, event, sql).await?;
        e.outcome = "allowed".into();
        e.duration_us = Some(started.elapsed().as_micros() as u64);
        self.audit.record(e).await.map_err(audit_unavailable)?;
        Ok(planned)
    }

    async fn run_query(
        &self,
        principal: &Principal,
        client: String,
        action: &str,
        sql: &str,
        params: Option<&str>,
    ) -> Result<DataStream, Status> {
        let started = std::time::Instant::now();
        let mut event = AuditEvent::new("query", action);
        event.client = client;
        event.query_id = random_id();
        let grant = match self.limiter.start_query(principal) {
            Ok(g) => g,
            Err(status) => {
                let mut e = event.by(principal);
                let (normalized, digest) = self.fingerprint(sql);
                e.fingerprint = normalized;
                e.fingerprint_sha256 = digest;
                e.outcome = outcome_of(&status).into();
                e.reason = reason_of(&status);
                self.audit.record_later(e);
                return Err(status);
            }
        };
        let (planned, template) = self.plan_audited(principal, event, sql).await?;
        let refuse = |status: Status, mut e: AuditEvent| {
            e.outcome = outcome_of(&status).into();
            e.reason = reason_of(&status);
            self.audit.record_later(e);
            status
        };
        let params = match params.map(decode_params).transpose() {
            Ok(p) => p,
            Err(status) => return Err(refuse(status, template)),
        };
        let (stream, report) = match planned.execute_with_report(params).await {
            Ok(x) => x,
            Err(err) => {
                let status = query_status(err, &template.query_id);
                return Err(refuse(status, template));
            }
        };
        // The decision is durable before the first batch can leave.
        let mut decision = with_report(template, &report);
        decision.outcome = "allowed".into();
        let mut end = decision.clone();
        self.audit
            .record(decision)
            .await
            .map_err(audit_unavailable)?;
        end.kind = "query_end".into();
        let query_id = end.query_id.clone();
        let rows = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&rows);
        let schema = stream.schema();
        let batches = stream
            .map_ok(move |b| {
                counted.fetch_add(b.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
                b
            })
            .map_err(move |e| {
                FlightError::Tonic(Box::new(query_status(EngineError::from(e), &query_id)))
            });
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Box::pin(
            AuditedStream::new(
                Box::pin(data),
                rows,
                self.audit.clone(),
                end,
                report,
                started,
            )
            .within(grant),
        ))
    }

    fn metadata_batch(
        &self,
        principal: &Principal,
        command: Command,
    ) -> Result<RecordBatch, Status> {
        let visible = self.engine.visible_datasets(principal);
        let built = match command {
            Command::CommandGetCatalogs(c) => {
                let mut b = c.into_builder();
                b.append(lakegate_engine_catalog());
                b.build()
            }
            Command::CommandGetDbSchemas(c) => {
                let mut b = c.into_builder();
                let mut schemas: Vec<String> =
                    visible.iter().map(|d| d.qualified().schema).collect();
                schemas.dedup();
                for s in schemas {
                    b.append(lakegate_engine_catalog(), s);
                }
                b.build()
            }
            Command::CommandGetTables(c) => {
                let mut b = c.into_builder();
                for d in &visible {
                    let q = d.qualified();
                    b.append(
                        lakegate_engine_catalog(),
                        &q.schema,
                        &q.table,
                        "TABLE",
                        &with_column_metadata(&d.schema(), &q.schema, &q.table),
                    )
                    .map_err(|e| Status::internal(e.to_string()))?;
                }
                b.build()
            }
            Command::CommandGetTableTypes(c) => {
                let mut b = c.into_builder();
                b.append("TABLE");
                b.build()
            }
            Command::CommandGetSqlInfo(c) => c.into_builder(&self.sql_info).build(),
            other => {
                return Err(Status::unimplemented(format!(
                    "{} is not supported",
                    other.type_url()
                )))
            }
        };
        built.map_err(|e| Status::internal(e.to_string()))
    }

    fn handle(&self, principal: &Principal, raw: &[u8]) -> Result<HandleBody, Status> {
        self.signer
            .verify_for::<HandleBody>("prepared statement handle", raw, &principal.name)
            .map_err(token_status)
    }
}

/// Request header by which a client narrows its purpose of use (per call; ADBC sets it per
/// connection with `adbc.flight.sql.rpc.call_header.x-lakegate-purpose`).
pub const PURPOSE_HEADER: &str = "x-lakegate-purpose";

/// A principal's `purpose` attribute lists the purposes of use its identity allows
/// (comma-separated). A client may pick one of them, never add one; without a choice the first
/// applies. Nothing else a client sends changes an attribute.
fn narrow_purpose(
    mut principal: Principal,
    requested: Option<Result<&str, tonic::metadata::errors::ToStrError>>,
) -> Result<Principal, Status> {
    let allowed: Vec<String> = principal
        .attribute("purpose")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let chosen = match requested {
        None => allowed.first().cloned(),
        Some(Ok(want)) if allowed.iter().any(|a| a == want.trim()) => Some(want.trim().to_string()),
        Some(_) => {
            return Err(Status::permission_denied(
                "the requested purpose of use is not one this principal's identity allows (rule: purpose-of-use)",
            ))
        }
    };
    match chosen {
        Some(p) => {
            principal.attributes.insert("purpose".into(), p);
        }
        None => {
            principal.attributes.remove("purpose");
        }
    }
    Ok(principal)
}

fn one_batch(batch: RecordBatch) -> DataStream {
    let schema = batch.schema();
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(stream::once(async move { Ok(batch) }))
            .map_err(Status::from),
    )
}

fn schema_ipc(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(bytes)
}

/// `(user, password)` from a Basic authorization header.
fn basic_credentials<T>(request: &Request<T>) -> Result<(String, String), Status> {
    let basic = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(|| {
            Status::unauthenticated(
                "Handshake needs 'authorization: Basic <base64(user:password)>'",
            )
        })?;
    // Clients differ on padding (Go's Flight client sends none): accept both.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = lenient
        .decode(basic.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Status::unauthenticated("malformed Basic credentials"))?;
    decoded
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .ok_or_else(|| Status::unauthenticated("malformed Basic credentials"))
}

/// Under mutual TLS, any other credential must name the certificate's own principal: a stolen
/// token is useless without the matching certificate.
fn bind_certificate(certified: Option<&Principal>, principal: &Principal) -> Result<(), Status> {
    match certified {
        Some(c) if c.name != principal.name => Err(Status::unauthenticated(
            "the credential names another principal than the client certificate (rule: mtls-binding)",
        )),
        _ => Ok(()),
    }
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::KeysUnavailable => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn client_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The Flight SQL command's message name, e.g. `CommandGetTables`.
fn command_name(command: &Command) -> String {
    let url = command.type_url();
    url.rsplit('.').next().unwrap_or(url).to_string()
}

fn random_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

impl LakegateService {
    /// Every write is refused, and audited as refused.
    async fn refuse_update<T>(&self, request: &Request<T>) -> Result<i64, Status> {
        let principal = self.principal(request, "DoPut").await?;
        let status = read_only();
        let mut e = AuditEvent::new("update", "DoPut").by(&principal);
        e.client = client_of(request);
        e.policy_version = self.engine.policy().version().to_string();
        e.outcome = "refused".into();
        e.reason =
            "Lakegate is read-only: updates and ingestion are refused (rule: read-only)".into();
        self.audit.record_later(e);
        Err(status)
    }
}

fn read_only() -> Status {
    Status::invalid_argument("Lakegate is read-only: updates and ingestion are refused")
}

#[tonic::async_trait]
impl FlightSqlService for LakegateService {
    type FlightService = LakegateService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let mut event = AuditEvent::new("auth", "Handshake");
        event.client = client_of(&request);
        let refuse = |status: Status, mut event: AuditEvent, attempted: String| {
            event.principal = attempted;
            event.outcome = outcome_of(&status).into();
            event.reason = reason_of(&status);
            self.audit.record_later(event);
            status
        };
        if let Err(status) = self
            .limiter
            .admit_handshake(request.remote_addr().map(|a| a.ip()))
        {
            return Err(refuse(status, event, String::new()));
        }
        let certified = match self.certificate_principal(&request) {
            Ok(c) => c,
            Err(status) => return Err(refuse(status, event, String::new())),
        };
        let principal = match (basic_credentials(&request), certified.clone()) {
            // A client certificate alone is a credential (mutual TLS).
            (Err(_), Some(p)) if request.metadata().get("authorization").is_none() => p,
            (Err(status), _) => return Err(refuse(status, event, String::new())),
            (Ok((user, password)), _) => {
                // Argon2 verification is deliberately slow: keep it off the async workers.
                let attempted = user.clone();
                let users = self.identity.users();
                let slot = Arc::clone(&self.password_checks)
                    .acquire_owned()
                    .await
                    .map_err(|_| Status::internal("internal error"))?;
                let result = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    users.authenticate(&user, &password)
                })
                .await
                .map_err(|_| Status::internal("internal error"))?;
                match result {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!("authentication failed");
                        return Err(refuse(
                            Status::unauthenticated(e.to_string()),
                            event,
                            attempted,
                        ));
                    }
                }
            }
        };
        if let Err(status) = bind_certificate(certified.as_ref(), &principal) {
            let name = principal.name.clone();
            return Err(refuse(status, event, name));
        }
        tracing::info!(user = %principal.name, "authenticated");
        let mut event = event.by(&principal);
        event.policy_version = self.engine.policy().version().to_string();
        event.outcome = "allowed".into();
        self.audit.record(event).await.map_err(audit_unavailable)?;
        let token = self
            .signer
            .sign("session", &principal.name, self.lifetimes.session_secs, &());
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::internal("internal error"))?;
        let out = HandshakeResponse {
            protocol_version: 0,
            payload: token.into(),
        };
        let mut response: Response<
            Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>,
        > = Response::new(Box::pin(stream::iter(vec![Ok(out)])));
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let action = "GetFlightInfo(CommandStatementQuery)";
        let principal = self.principal(&request, action).await?;
        self.query_info(&principal, action, query.query, None, request)
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let action = "GetFlightInfo(CommandPreparedStatementQuery)";
        let principal = self.principal(&request, action).await?;
        let handle = self.handle(&principal, &cmd.prepared_statement_handle)?;
        let params = handle.params.or_else(|| {
            let bound = self.bound.lock().ok()?;
            bound
                .get(&handle.id)
                .filter(|(owner, _, _)| owner == &principal.name)
                .map(|(_, p, _)| p.clone())
        });
        self.query_info(&principal, action, handle.sql, params, request)
            .await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, Command::CommandGetCatalogs(query), &schema)
            .await
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, Command::CommandGetDbSchemas(query), &schema)
            .await
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, Command::CommandGetTables(query), &schema)
            .await
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, Command::CommandGetTableTypes(query), &schema)
            .await
    }

    /// A plain Flight client (no Flight SQL) reads an approved release table by path:
    /// `GetFlightInfo` with the descriptor path `["releases", NAME, TABLE]` answers with a
    /// signed ticket for `SELECT * FROM releases."NAME"."TABLE"`, planned, checked and
    /// audited like any query, and DoGet streams it.
    async fn get_flight_info_fallback(
        &self,
        cmd: Command,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let action = "GetFlightInfo(path)";
        let principal = self.principal(&request, action).await?;
        let descriptor = request.get_ref();
        let sql = match descriptor.r#type() {
            DescriptorType::Path => lakegate_engine::releases::path_query(&descriptor.path)
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "a descriptor path names a release table: [\"releases\", NAME, TABLE]",
                    )
                })?,
            _ => {
                return Err(Status::unimplemented(format!(
                    "{} is not supported",
                    cmd.type_url()
                )))
            }
        };
        self.query_info(&principal, action, sql, None, request)
            .await
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        self.metadata_info(request, Command::CommandGetSqlInfo(query), &schema)
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let principal = self.principal(&request, "DoGet").await?;
        let client = client_of(&request);
        let body = decode_ticket(&self.signer, &ticket.statement_handle, &principal.name)
            .inspect_err(|status| {
                let mut e = AuditEvent::new("query", "DoGet").by(&principal);
                e.client = client.clone();
                e.outcome = outcome_of(status).into();
                e.reason = reason_of(status);
                self.audit.record_later(e);
            })?;
        let stream = match body {
            TicketRequest::Query { sql, params } => {
                self.run_query(&principal, client, "DoGet", &sql, params.as_deref())
                    .await?
            }
            TicketRequest::Metadata(command) => {
                let mut e =
                    AuditEvent::new("metadata", &format!("DoGet({})", command_name(&command)))
                        .by(&principal);
                e.client = client;
                e.policy_version = self.engine.policy().version().to_string();
                let listed = matches!(
                    command,
                    Command::CommandGetTables(_) | Command::CommandGetDbSchemas(_)
                );
                let batch = self.metadata_batch(&principal, command)?;
                if listed {
                    let names: Vec<String> = self
                        .engine
                        .visible_datasets(&principal)
                        .iter()
                        .map(|d| d.name.clone())
                        .collect();
                    e.datasets = names.join(", ");
                }
                e.rows = Some(batch.num_rows() as u64);
                e.outcome = "allowed".into();
                self.audit.record(e).await.map_err(audit_unavailable)?;
                one_batch(batch)
            }
        };
        Ok(Response::new(stream))
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        // Some clients skip GetFlightInfo and send the handle itself as the ticket.
        let action = "DoGet(CommandPreparedStatementQuery)";
        let principal = self.principal(&request, action).await?;
        let handle = self.handle(&principal, &query.prepared_statement_handle)?;
        let stream = self
            .run_query(
                &principal,
                client_of(&request),
                action,
                &handle.sql,
                handle.params.as_deref(),
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let action = "DoAction(CreatePreparedStatement)";
        let principal = self.principal(&request, action).await?;
        let mut event = AuditEvent::new("prepare", action);
        event.client = client_of(&request);
        let planned = self.describe(&principal, event, &query.query).await?;
        let id = {
            use rand::RngCore;
            let mut b = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut b);
            URL_SAFE_NO_PAD.encode(b)
        };
        let handle = self.signer.sign(
            "prepared statement handle",
            &principal.name,
            self.lifetimes.handle_secs,
            &HandleBody {
                id,
                sql: query.query,
                params: None,
            },
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: schema_ipc(&planned.schema())?,
            parameter_schema: schema_ipc(&planned.parameters())?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let principal = self
            .principal(&request, "DoPut(CommandPreparedStatementQuery)")
            .await?;
        let handle = self.handle(&principal, &query.prepared_statement_handle)?;
        let data = request.into_inner().map_err(FlightError::from);
        let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
        // Read only as far as a second row: a client streaming batches without end must not
        // make the server hold them (each message is bounded, their number is not).
        let mut row = None;
        while let Some(batch) = batches.try_next().await.map_err(|e| {
            Status::invalid_argument(format!("bound parameters are unreadable: {e}"))
        })? {
            if batch.num_rows() == 0 {
                continue;
            }
            if row.is_some() || batch.num_rows() > 1 {
                return Err(Status::invalid_argument(
                    "a query takes one row of parameters; bind one row per execution",
                ));
            }
            row = Some(batch);
        }
        let params = match row {
            Some(b) => Some(encode_params(&b)?),
            None => None,
        };
        if let (Some(p), Ok(mut bound)) = (&params, self.bound.lock()) {
            let now = now_secs();
            bound.retain(|_, (_, _, exp)| *exp > now);
            if bound.len() < MAX_BOUND_PARAMS {
                bound.insert(
                    handle.id.clone(),
                    (
                        principal.name.clone(),
                        p.clone(),
                        now + self.lifetimes.handle_secs,
                    ),
                );
            }
        }
        // Stateless path: the updated handle carries the parameters itself.
        let updated = self.signer.sign(
            "prepared statement handle",
            &principal.name,
            self.lifetimes.handle_secs,
            &HandleBody {
                id: handle.id,
                sql: handle.sql,
                params,
            },
        );
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(updated.into()),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let principal = self
            .principal(&request, "DoAction(ClosePreparedStatement)")
            .await?;
        let handle = self.handle(&principal, &query.prepared_statement_handle)?;
        if let Ok(mut bound) = self.bound.lock() {
            bound.remove(&handle.id);
        }
        Ok(())
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.refuse_update(&request).await
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.refuse_update(&request).await
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.refuse_update(&request).await
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
