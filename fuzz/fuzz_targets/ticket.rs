//! DoGet tickets are untrusted bytes: decoding them must never panic, whether they are forged
//! (the MAC fails) or, as if a key had leaked, validly signed around arbitrary content.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use lakegate_flight_server::service::{decode_params, decode_ticket, TicketRequest};
use lakegate_flight_server::signing::Signer;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let signer = Signer::with_key(KEY);
    // As received: arbitrary bytes.
    let _ = decode_ticket(&signer, data, "alice");
    let _ = signer.verify::<()>("session", data);
    // Signed: the parsers behind the MAC (claims JSON, metadata protobuf, bound parameters).
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&KEY).expect("any key length");
    mac.update(data);
    let token = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(data),
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );
    if let Ok(TicketRequest::Query {
        params: Some(p), ..
    }) = decode_ticket(&signer, token.as_bytes(), "alice")
    {
        let _ = decode_params(&p);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode_params(text);
    }
});
