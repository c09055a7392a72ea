//! What the server hands out and takes back: signed tickets, prepared-statement handles and
//! the bound parameters they carry, and how long each lives. Every byte of them comes back
//! from a client, so decoding is checked here, in one place.

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::sql::{Any, Command};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use datafusion::scalar::ScalarValue;
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::signing::Signer;
use crate::status::token_status;

/// Lifetimes of what the server hands out.
#[derive(Clone, Debug)]
pub struct Lifetimes {
    pub session_secs: u64,
    pub ticket_secs: u64,
    pub handle_secs: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            session_secs: 3600,
            ticket_secs: 300,
            handle_secs: 3600,
        }
    }
}

/// What a ticket stands for. Signed, so the server can trust it; holds no file location.
#[derive(Serialize, Deserialize)]
pub(crate) enum TicketBody {
    /// A query and, for prepared statements, its bound parameters (an Arrow IPC stream).
    Query { sql: String, params: Option<String> },
    /// A metadata command (its protobuf `Any`, base64).
    Metadata { command: String },
}

/// What a verified DoGet ticket asks for.
pub enum TicketRequest {
    /// A query and its bound parameters (an Arrow IPC stream, base64), decoded when it runs.
    Query { sql: String, params: Option<String> },
    /// A metadata command.
    Metadata(Command),
}

/// Verify a DoGet ticket for `caller` and decode what it asks for: the whole path of untrusted
/// ticket bytes, in one place (`fuzz/` drives it with arbitrary input).
pub fn decode_ticket(signer: &Signer, raw: &[u8], caller: &str) -> Result<TicketRequest, Status> {
    let body: TicketBody = signer
        .verify_for("ticket", raw, caller)
        .map_err(token_status)?;
    Ok(match body {
        TicketBody::Query { sql, params } => TicketRequest::Query { sql, params },
        TicketBody::Metadata { command } => {
            let malformed = || Status::invalid_argument("malformed ticket");
            let bytes = STANDARD.decode(command).map_err(|_| malformed())?;
            let any = Any::decode(bytes.as_slice()).map_err(|_| malformed())?;
            TicketRequest::Metadata(Command::try_from(any).map_err(|_| malformed())?)
        }
    })
}

/// A prepared statement handle's content.
#[derive(Serialize, Deserialize)]
pub(crate) struct HandleBody {
    pub(crate) id: String,
    pub(crate) sql: String,
    pub(crate) params: Option<String>,
}

/// Most parameter bindings kept for clients that ignore the updated handle DoPut returns.
pub(crate) const MAX_BOUND_PARAMS: usize = 10_000;

pub(crate) fn encode_params(batch: &RecordBatch) -> Result<String, Status> {
    let mut buf = Vec::new();
    let mut w = StreamWriter::try_new(&mut buf, &batch.schema())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    w.write(batch)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    w.finish()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    drop(w);
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// Bound parameters as a ticket or handle carries them (base64 Arrow IPC stream, one row).
pub fn decode_params(encoded: &str) -> Result<Vec<ScalarValue>, Status> {
    let bad = |e: String| Status::invalid_argument(format!("bound parameters are unreadable: {e}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| bad(e.to_string()))?;
    // The push decoder, not StreamReader: StreamReader allocates (and zeroes) whatever body
    // length a message header claims before reading it, so a few forged bytes could claim
    // gigabytes (found by the `ticket` fuzz target); the decoder grows only with real input.
    let mut decoder = StreamDecoder::new();
    let mut buffer = arrow::buffer::Buffer::from(bytes);
    while !buffer.is_empty() {
        let Some(batch) = decoder
            .decode(&mut buffer)
            .map_err(|e| bad(e.to_string()))?
        else {
            continue;
        };
        if batch.num_rows() == 0 {
            continue;
        }
        return batch
            .columns()
            .iter()
            .map(|col| ScalarValue::try_from_array(col, 0).map_err(|e| bad(e.to_string())))
            .collect();
    }
    decoder.finish().map_err(|e| bad(e.to_string()))?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use std::sync::Arc;

    #[test]
    fn bound_parameters_round_trip() {
        let batch = RecordBatch::try_from_iter([(
            "a",
            Arc::new(Int64Array::from(vec![42])) as arrow::array::ArrayRef,
        )])
        .unwrap();
        let encoded = encode_params(&batch).unwrap();
        assert_eq!(
            decode_params(&encoded).unwrap(),
            vec![ScalarValue::Int64(Some(42))]
        );
    }

    #[test]
    fn a_forged_length_claim_allocates_nothing() {
        // A message header claiming ~2 GiB of metadata, then a few bytes: refused, without
        // reserving what the header claims (the fuzz target's RSS shows the difference).
        let mut forged = vec![0xff, 0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0x7f];
        forged.extend_from_slice(&[1, 2, 3, 4]);
        let encoded = URL_SAFE_NO_PAD.encode(forged);
        assert!(decode_params(&encoded).is_err());
    }
}
