//! The JSON that etcd's v3 gRPC gateway speaks: protobuf messages in proto3 JSON form.
//!
//! The gateway (grpc-gateway with `OrigName`) uses the proto field names, encodes `bytes` as
//! standard base64 and `int64` as decimal strings, and omits every field that holds its zero
//! value (`false`, `0`, empty, the first enum variant). Decoding therefore defaults every field,
//! and accepts an int64 as a string or a bare number. Requests are encoded the same way.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// `bytes` fields: base64 in both directions.
pub mod b64 {
    use super::*;

    /// Encode bytes as standard base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    /// Decode standard base64; `null` is empty, as protobuf has no null bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        match text {
            None => Ok(Vec::new()),
            Some(t) => BASE64
                .decode(t.as_bytes())
                .map_err(|e| de::Error::custom(format!("bad base64: {e}"))),
        }
    }
}

/// `int64` fields: a decimal string on the wire (proto3 JSON), a bare number also accepted.
pub mod i64s {
    use super::*;

    /// Encode as a decimal string, the way the gateway itself does.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        Str(String),
        Num(i64),
    }

    /// Decode a string or a number; `null` is 0.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Option::<StrOrNum>::deserialize(d)? {
            None => Ok(0),
            Some(StrOrNum::Num(n)) => Ok(n),
            Some(StrOrNum::Str(s)) => s
                .parse()
                .map_err(|_| de::Error::custom(format!("bad int64 {s:?}"))),
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

// ---- Responses ----

/// `ResponseHeader`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Header {
    /// The store's revision when the request was served.
    #[serde(with = "i64s")]
    pub revision: i64,
    /// The raft term of the member that served it.
    #[serde(with = "i64s")]
    pub raft_term: i64,
}

/// `mvccpb.KeyValue`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KeyValueJson {
    /// The key.
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    /// Revision of the put that created the key (since its last delete).
    #[serde(with = "i64s")]
    pub create_revision: i64,
    /// Revision of the last put.
    #[serde(with = "i64s")]
    pub mod_revision: i64,
    /// Number of puts since creation.
    #[serde(with = "i64s")]
    pub version: i64,
    /// Lease attached to the key, 0 for none.
    #[serde(with = "i64s")]
    pub lease: i64,
}

/// `RangeResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RangeResponseJson {
    /// The header.
    pub header: Header,
    /// The keys found.
    pub kvs: Vec<KeyValueJson>,
    /// Number of keys in the range (may exceed `kvs.len()` when limited).
    #[serde(with = "i64s")]
    pub count: i64,
    /// More keys exist past the limit.
    pub more: bool,
}

/// Responses that carry only a header (`PutResponse`, `LeaseRevokeResponse`, ...).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HeaderOnlyJson {
    /// The header.
    pub header: Header,
}

/// `DeleteRangeResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DeleteRangeResponseJson {
    /// The header.
    pub header: Header,
    /// Number of keys deleted.
    #[serde(with = "i64s")]
    pub deleted: i64,
}

/// `ResponseOp`: exactly one field is set.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ResponseOpJson {
    /// Set for a range operation.
    pub response_range: Option<RangeResponseJson>,
    /// Set for a put operation.
    pub response_put: Option<HeaderOnlyJson>,
    /// Set for a delete operation.
    pub response_delete_range: Option<DeleteRangeResponseJson>,
}

/// `TxnResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct TxnResponseJson {
    /// The header; its revision is the transaction's.
    pub header: Header,
    /// The comparisons held (omitted by the gateway when false).
    pub succeeded: bool,
    /// One per operation of the branch taken.
    pub responses: Vec<ResponseOpJson>,
}

/// `LeaseGrantResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LeaseGrantResponseJson {
    /// The header.
    pub header: Header,
    /// The lease id.
    #[serde(rename = "ID", with = "i64s")]
    pub id: i64,
    /// The TTL granted, in seconds.
    #[serde(rename = "TTL", with = "i64s")]
    pub ttl: i64,
    /// Set when the grant failed.
    pub error: String,
}

/// `LeaseKeepAliveResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LeaseKeepAliveResponseJson {
    /// The header.
    pub header: Header,
    /// The lease id.
    #[serde(rename = "ID", with = "i64s")]
    pub id: i64,
    /// Seconds left; absent (0) when the lease no longer exists.
    #[serde(rename = "TTL", with = "i64s")]
    pub ttl: i64,
}

/// `LeaseTimeToLiveResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LeaseTimeToLiveResponseJson {
    /// The header.
    pub header: Header,
    /// The lease id.
    #[serde(rename = "ID", with = "i64s")]
    pub id: i64,
    /// Seconds left; -1 when the lease has expired or never existed.
    #[serde(rename = "TTL", with = "i64s")]
    pub ttl: i64,
    /// The TTL the lease was granted with.
    #[serde(rename = "grantedTTL", with = "i64s")]
    pub granted_ttl: i64,
}

/// `mvccpb.Event`; `type` is omitted for PUT (the zero enum value).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct EventJson {
    /// `"PUT"` (or absent) or `"DELETE"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The key after the event; for a delete only key and mod_revision are set.
    pub kv: KeyValueJson,
}

/// `WatchResponse`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct WatchResponseJson {
    /// The header.
    pub header: Header,
    /// The watch's id (0, and so absent, for the first watch of a stream).
    #[serde(with = "i64s")]
    pub watch_id: i64,
    /// The answer to the create request.
    pub created: bool,
    /// The watch ended (compaction, or an error named in `cancel_reason`).
    pub canceled: bool,
    /// Set when the start revision was compacted away.
    #[serde(with = "i64s")]
    pub compact_revision: i64,
    /// Why the watch was canceled.
    pub cancel_reason: String,
    /// The events, in revision order.
    pub events: Vec<EventJson>,
}

/// A gRPC error as the gateway reports it, in an HTTP error body or a stream message.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct GatewayErrorJson {
    /// The error text (the gateway sets both `error` and `message`).
    pub error: String,
    /// The same, in newer gateways.
    pub message: String,
    /// The gRPC status code (5 = NotFound, 11 = OutOfRange, 14 = Unavailable, ...).
    pub code: i64,
    /// The gRPC status code, as a stream's error message names it.
    pub grpc_code: i64,
}

/// One message of a server stream (`/v3/watch`, `/v3/lease/keepalive`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(bound = "T: Deserialize<'de>")]
pub struct StreamMessage<T> {
    /// The message, absent when the stream failed.
    #[serde(default)]
    pub result: Option<T>,
    /// The error that ended the stream.
    #[serde(default)]
    pub error: Option<GatewayErrorJson>,
}

// ---- Requests ----

/// `RangeRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct RangeRequestJson<'a> {
    /// First key.
    #[serde(with = "b64")]
    pub key: &'a [u8],
    /// End of the range (exclusive); empty for the single key.
    #[serde(with = "b64", skip_serializing_if = "<[u8]>::is_empty")]
    pub range_end: &'a [u8],
}

/// `PutRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct PutRequestJson<'a> {
    /// The key.
    #[serde(with = "b64")]
    pub key: &'a [u8],
    /// The value.
    #[serde(with = "b64")]
    pub value: &'a [u8],
    /// Lease to attach, 0 for none.
    #[serde(with = "i64s", skip_serializing_if = "is_zero")]
    pub lease: i64,
}

/// `DeleteRangeRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct DeleteRangeRequestJson<'a> {
    /// The key.
    #[serde(with = "b64")]
    pub key: &'a [u8],
}

/// `Compare`: `target` names which of the value fields is compared.
#[derive(Debug, Clone, Serialize)]
pub struct CompareJson<'a> {
    /// The key compared.
    #[serde(with = "b64")]
    pub key: &'a [u8],
    /// `"EQUAL"` (sent explicitly, though it is the zero value).
    pub result: &'static str,
    /// `"VERSION"`, `"CREATE"`, `"MOD"` or `"VALUE"`.
    pub target: &'static str,
    /// For target VERSION.
    #[serde(with = "opt_i64s", skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// For target CREATE.
    #[serde(with = "opt_i64s", skip_serializing_if = "Option::is_none")]
    pub create_revision: Option<i64>,
    /// For target MOD.
    #[serde(with = "opt_i64s", skip_serializing_if = "Option::is_none")]
    pub mod_revision: Option<i64>,
    /// For target VALUE.
    #[serde(with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a [u8]>,
}

mod opt_i64s {
    use super::*;
    pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => i64s::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

mod opt_b64 {
    use super::*;
    pub fn serialize<S: Serializer>(v: &Option<&[u8]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

/// `RequestOp`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestOpJson<'a> {
    /// A range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_range: Option<RangeRequestJson<'a>>,
    /// A put.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_put: Option<PutRequestJson<'a>>,
    /// A delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_delete_range: Option<DeleteRangeRequestJson<'a>>,
}

/// `TxnRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct TxnRequestJson<'a> {
    /// All must hold for `success` to run.
    pub compare: Vec<CompareJson<'a>>,
    /// Run when every comparison holds.
    pub success: Vec<RequestOpJson<'a>>,
    /// Run otherwise.
    pub failure: Vec<RequestOpJson<'a>>,
}

/// `CompactionRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct CompactionRequestJson {
    /// Revisions below this one are dropped.
    #[serde(with = "i64s")]
    pub revision: i64,
}

/// `LeaseGrantRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseGrantRequestJson {
    /// Requested TTL in seconds.
    #[serde(rename = "TTL", with = "i64s")]
    pub ttl: i64,
}

/// `LeaseKeepAliveRequest`, `LeaseRevokeRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseIdJson {
    /// The lease id.
    #[serde(rename = "ID", with = "i64s")]
    pub id: i64,
}

/// `WatchRequest` with a `create_request`.
#[derive(Debug, Clone, Serialize)]
pub struct WatchRequestJson<'a> {
    /// The watch to create.
    pub create_request: WatchCreateJson<'a>,
}

/// `WatchCreateRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct WatchCreateJson<'a> {
    /// The key watched.
    #[serde(with = "b64")]
    pub key: &'a [u8],
    /// End of a watched range; empty for one key.
    #[serde(with = "b64", skip_serializing_if = "<[u8]>::is_empty")]
    pub range_end: &'a [u8],
    /// First revision to report, 0 for "from now".
    #[serde(with = "i64s", skip_serializing_if = "is_zero")]
    pub start_revision: i64,
    /// Ask for periodic empty messages carrying the current revision.
    #[serde(skip_serializing_if = "is_false")]
    pub progress_notify: bool,
}

/// The end of the range holding every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`):
/// the prefix with its last byte below 0xff incremented and what follows dropped. A prefix of only
/// 0xff bytes (or an empty one) ranges to the end of the keyspace, written `\0`.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            let n = end.len();
            end[n - 1] = last + 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_response_decodes_strings_base64_and_defaults() {
        // As etcd 3.4.23 answers: int64 as strings, lease omitted when 0.
        let text = r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952",
            "revision":"2","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2",
            "mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#;
        let r: RangeResponseJson = serde_json::from_str(text).expect("decode");
        assert_eq!(r.header.revision, 2);
        assert_eq!(r.header.raft_term, 2);
        assert_eq!(r.count, 1);
        assert!(!r.more);
        assert_eq!(
            r.kvs,
            vec![KeyValueJson {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 0,
            }]
        );
    }

    #[test]
    fn absent_key_is_an_empty_kvs_list() {
        let r: RangeResponseJson =
            serde_json::from_str(r#"{"header":{"revision":"7"}}"#).expect("decode");
        assert!(r.kvs.is_empty());
        assert_eq!(r.header.revision, 7);
        assert_eq!(r.count, 0);
    }

    #[test]
    fn int64_accepts_numbers_and_null_and_rejects_junk() {
        let h: Header = serde_json::from_str(r#"{"revision":12,"raft_term":null}"#).expect("num");
        assert_eq!((h.revision, h.raft_term), (12, 0));
        let h: Header =
            serde_json::from_str(r#"{"revision":"-9223372036854775808"}"#).expect("min");
        assert_eq!(h.revision, i64::MIN);
        assert!(serde_json::from_str::<Header>(r#"{"revision":"12x"}"#).is_err());
        assert!(serde_json::from_str::<Header>(r#"{"revision":"9223372036854775808"}"#).is_err());
        assert!(serde_json::from_str::<Header>(r#"{"revision":true}"#).is_err());
    }

    #[test]
    fn bad_base64_is_an_error() {
        assert!(serde_json::from_str::<KeyValueJson>(r#"{"key":"!!!"}"#).is_err());
        let kv: KeyValueJson = serde_json::from_str(r#"{"key":"","value":null}"#).expect("empty");
        assert!(kv.key.is_empty() && kv.value.is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let h: Header =
            serde_json::from_str(r#"{"revision":"1","future_field":{"x":[1]}}"#).expect("decode");
        assert_eq!(h.revision, 1);
    }

    #[test]
    fn txn_response_succeeded_defaults_to_false() {
        let text = r#"{"header":{"revision":"2"},"responses":[{"response_range":{"header":
            {"revision":"2"},"kvs":[{"key":"Zm9v","version":"1","value":"YmFy"}],"count":"1"}}]}"#;
        let t: TxnResponseJson = serde_json::from_str(text).expect("decode");
        assert!(!t.succeeded);
        assert_eq!(t.responses.len(), 1);
        let range = t.responses[0].response_range.as_ref().expect("range");
        assert_eq!(range.kvs[0].value, b"bar");
        let t: TxnResponseJson = serde_json::from_str(
            r#"{"header":{"revision":"3"},"succeeded":true,"responses":[{"response_put":
            {"header":{"revision":"3"}}},{"response_delete_range":{"header":{},"deleted":"1"}}]}"#,
        )
        .expect("decode");
        assert!(t.succeeded);
        assert!(t.responses[0].response_put.is_some());
        assert_eq!(
            t.responses[1]
                .response_delete_range
                .as_ref()
                .map(|d| d.deleted),
            Some(1)
        );
    }

    #[test]
    fn lease_messages_use_upper_case_names() {
        let g: LeaseGrantResponseJson =
            serde_json::from_str(r#"{"header":{},"ID":"2324035752022473481","TTL":"5"}"#)
                .expect("grant");
        assert_eq!((g.id, g.ttl), (2324035752022473481, 5));
        // A keepalive of a lease that is gone: TTL omitted.
        let k: StreamMessage<LeaseKeepAliveResponseJson> =
            serde_json::from_str(r#"{"result":{"header":{},"ID":"77"}}"#).expect("keepalive");
        let k = k.result.expect("result");
        assert_eq!((k.id, k.ttl), (77, 0));
        let t: LeaseTimeToLiveResponseJson =
            serde_json::from_str(r#"{"ID":"77","TTL":"-1"}"#).expect("ttl");
        assert_eq!((t.ttl, t.granted_ttl), (-1, 0));
    }

    #[test]
    fn watch_messages_decode() {
        let created: StreamMessage<WatchResponseJson> =
            serde_json::from_str(r#"{"result":{"header":{"revision":"2"},"created":true}}"#)
                .expect("created");
        let created = created.result.expect("result");
        assert!(created.created && created.events.is_empty() && created.watch_id == 0);
        let delete: StreamMessage<WatchResponseJson> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE",
            "kv":{"key":"Zm9v","mod_revision":"4"}},{"kv":{"key":"Zm9v","version":"1"}}]}}"#,
        )
        .expect("events");
        let delete = delete.result.expect("result");
        assert_eq!(delete.events[0].kind.as_deref(), Some("DELETE"));
        assert_eq!(delete.events[0].kv.mod_revision, 4);
        assert_eq!(delete.events[1].kind, None);
        let compacted: StreamMessage<WatchResponseJson> = serde_json::from_str(
            r#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}"#,
        )
        .expect("compacted");
        let compacted = compacted.result.expect("result");
        assert!(compacted.canceled);
        assert_eq!(compacted.compact_revision, 4);
        let failed: StreamMessage<WatchResponseJson> =
            serde_json::from_str(r#"{"error":{"grpc_code":14,"message":"unavailable"}}"#)
                .expect("error");
        assert!(failed.result.is_none());
        assert_eq!(failed.error.expect("error").message, "unavailable");
    }

    #[test]
    fn gateway_error_body_decodes() {
        let e: GatewayErrorJson = serde_json::from_str(
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        )
        .expect("error");
        assert_eq!(e.code, 5);
        assert_eq!(e.error, "etcdserver: requested lease not found");
    }

    #[test]
    fn requests_encode_base64_strings_and_omit_zeroes() {
        let put = PutRequestJson {
            key: b"foo",
            value: b"",
            lease: 0,
        };
        assert_eq!(
            serde_json::to_string(&put).expect("put"),
            r#"{"key":"Zm9v","value":""}"#
        );
        let put = PutRequestJson {
            key: b"\xff\x00",
            value: b"bar",
            lease: 2324035752022473481,
        };
        assert_eq!(
            serde_json::to_string(&put).expect("put"),
            r#"{"key":"/wA=","value":"YmFy","lease":"2324035752022473481"}"#
        );
        let cmp = CompareJson {
            key: b"foo",
            result: "EQUAL",
            target: "VERSION",
            version: Some(0),
            create_revision: None,
            mod_revision: None,
            value: None,
        };
        assert_eq!(
            serde_json::to_string(&cmp).expect("compare"),
            r#"{"key":"Zm9v","result":"EQUAL","target":"VERSION","version":"0"}"#
        );
        let op = RequestOpJson {
            request_delete_range: Some(DeleteRangeRequestJson { key: b"k" }),
            ..RequestOpJson::default()
        };
        assert_eq!(
            serde_json::to_string(&op).expect("op"),
            r#"{"request_delete_range":{"key":"aw=="}}"#
        );
        let watch = WatchRequestJson {
            create_request: WatchCreateJson {
                key: b"foo",
                range_end: b"",
                start_revision: 5,
                progress_notify: false,
            },
        };
        assert_eq!(
            serde_json::to_string(&watch).expect("watch"),
            r#"{"create_request":{"key":"Zm9v","start_revision":"5"}}"#
        );
    }

    #[test]
    fn prefix_range_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_range_end(b"/dkvs/"), b"/dkvs0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
    }
}
