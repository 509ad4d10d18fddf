//! Fuzz the RESP2 reply reader a forwarding slave runs on its master's bytes
//! (protocol::resp_reply): any input delimits, asks for more, or fails, never
//! panics; a delimited reply lies within the input and the limit, every prefix
//! of it is incomplete, and transcoding, the error and the ROLE readers accept
//! whatever was delimited.

#![no_main]

use dkvs::protocol::resp::RespVersion;
use dkvs::protocol::resp_reply::{error_text, master_offset, reply_len, transcode};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(len)) = reply_len(data, LIMIT) else {
        return;
    };
    assert!(len > 0 && len <= data.len() && len <= LIMIT + LIMIT);
    let reply = &data[..len];
    for cut in [0, len / 2, len - 1] {
        assert!(matches!(reply_len(&reply[..cut], LIMIT), Ok(None)));
    }
    let mut out = Vec::new();
    transcode(reply, RespVersion::Three, &mut out);
    // A RESP3 copy is still one delimited reply (nulls become `_`, which only
    // the RESP3 reader knows): at most as long as the original.
    assert!(out.len() <= reply.len());
    out.clear();
    transcode(reply, RespVersion::Two, &mut out);
    assert_eq!(out, reply);
    let _ = error_text(reply);
    let _ = master_offset(reply);
});
