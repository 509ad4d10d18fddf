//! Client authentication (`--requirepass-file`) and protected mode: the
//! decisions, free of sockets and clocks (time is an argument), unit-tested.
//!
//! The password is never stored in the clear: the server keeps a random
//! per-process HMAC key and `HMAC(key, password)`, and a candidate is checked
//! by comparing `HMAC(key, candidate)` with it in constant time, so neither
//! the comparison's time nor a memory dump of the tag tells the password.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::Opcode;

/// RESP reply (Redis 7's text) to a command before a successful AUTH.
pub const RESP_NOAUTH: &str = "NOAUTH Authentication required.";
/// RESP reply (Redis 7's text) to HELLO without AUTH before a successful AUTH.
pub const RESP_NOAUTH_HELLO: &str = "NOAUTH HELLO must be called with the client already \
     authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to \
     authenticate the client and select the RESP protocol version at the same time";
/// RESP reply (Redis's text) to a wrong password, or a user other than `default`.
pub const RESP_WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
/// RESP reply (Redis's text) to `AUTH password` on a server without a password.
pub const RESP_NO_PASSWORD: &str = "ERR AUTH <password> called without any password configured \
     for the default user. Are you sure your configuration is correct?";
/// RESP reply to a client refused by protected mode (Redis's `-DENIED`, dkvs's remedies).
pub const RESP_DENIED: &str = "DENIED dkvs is running in protected mode because it is bound to a \
     non-loopback address and no password is set. In this mode connections are only accepted \
     from the loopback interface. To accept other clients, restart dkvs-server with \
     --requirepass-file PATH (recommended), or with --protected-mode no if every host that can \
     reach the port is trusted.";
/// Binary protocol message of `NOAUTH` over TCP.
pub const NOAUTH_MESSAGE: &str = "authentication required: send AUTH with the password first";
/// Binary protocol message of `NOAUTH` over UDP.
pub const NOAUTH_UDP_MESSAGE: &str =
    "authentication required: the server has a password and UDP cannot authenticate; use TCP";
/// Binary protocol message of a wrong password.
pub const WRONG_PASSWORD_MESSAGE: &str = "invalid password";
/// Binary protocol message of AUTH while no password is configured.
pub const NO_PASSWORD_MESSAGE: &str =
    "AUTH sent but the server has no password configured (--requirepass-file)";
/// Binary protocol message of a protected-mode refusal.
pub const DENIED_MESSAGE: &str = "protected mode: this server is bound to a non-loopback \
     address without a password and accepts clients from loopback only; restart it with \
     --requirepass-file PATH, or --protected-mode no";

/// A client password, kept only as a keyed hash.
#[derive(Clone)]
pub struct Password {
    key: [u8; 32],
    tag: [u8; 32],
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in a log, not even its length.
        f.write_str("Password(..)")
    }
}

impl Password {
    /// The password held by a `--requirepass-file`: its contents with one
    /// trailing line end (`\n` or `\r\n`) removed. Empty is an error.
    pub fn from_file_contents(bytes: &[u8]) -> Result<Password, String> {
        // Read as the client library reads its `--password-file`, so both agree.
        let crate::client::ClientPassword(bytes) =
            crate::client::ClientPassword::from_file_contents(bytes)?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| format!("no randomness for the password key: {e}"))?;
        let tag = mac(&key, &bytes).finalize().into_bytes().into();
        Ok(Password { key, tag })
    }

    /// Whether `candidate` is the password, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        mac(&self.key, candidate).verify_slice(&self.tag).is_ok()
    }
}

fn mac(key: &[u8; 32], message: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(message);
    mac
}

/// Binary protocol: whether `op` may run on a connection that has not authenticated.
pub fn allowed_before_auth(op: Opcode) -> bool {
    matches!(op, Opcode::Ping | Opcode::Auth)
}

/// RESP: whether the command named `name` (lower case) may run before AUTH.
/// As Redis 7: AUTH, HELLO (which answers NOAUTH itself unless it carries
/// AUTH) and QUIT; PING is refused, as Redis refuses it.
pub fn resp_allowed_before_auth(name: &str) -> bool {
    matches!(name, "auth" | "hello" | "quit")
}

/// Protected mode: whether it applies to a server bound to `bound` with
/// `password_set`, when enabled: bound to a non-loopback address without a password.
pub fn protected_mode_applies(enabled: bool, bound: IpAddr, password_set: bool) -> bool {
    enabled && !password_set && !bound.to_canonical().is_loopback()
}

/// Protected mode: whether a client from `peer` is refused by a server bound
/// to `bound` with `password_set`, when protected mode is `enabled`.
pub fn protected_refusal(enabled: bool, bound: IpAddr, password_set: bool, peer: IpAddr) -> bool {
    protected_mode_applies(enabled, bound, password_set) && !peer.to_canonical().is_loopback()
}

/// How often one refused source is logged.
const DENIED_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Sources remembered for rate-limiting the log; past it the map is cleared.
const DENIED_LOG_SOURCES: usize = 1024;

/// Rate limit of the protected-mode log: each source at most once a minute.
#[derive(Debug, Default)]
pub struct DeniedLog {
    last: HashMap<IpAddr, Instant>,
}

impl DeniedLog {
    /// Whether a refusal of `peer` at `now` should be logged (and note it).
    pub fn should_log(&mut self, peer: IpAddr, now: Instant) -> bool {
        if let Some(&at) = self.last.get(&peer)
            && now.saturating_duration_since(at) < DENIED_LOG_INTERVAL
        {
            return false;
        }
        if self.last.len() >= DENIED_LOG_SOURCES {
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < DENIED_LOG_INTERVAL);
            if self.last.len() >= DENIED_LOG_SOURCES {
                self.last.clear();
            }
        }
        self.last.insert(peer, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_loses_one_line_end_and_must_not_be_empty() {
        let p = Password::from_file_contents(b"s3cret\n").unwrap();
        assert!(p.matches(b"s3cret"));
        assert!(!p.matches(b"s3cret\n"));
        assert!(!p.matches(b"s3cre"));
        assert!(!p.matches(b""));
        let p = Password::from_file_contents(b"two words \r\n").unwrap();
        assert!(p.matches(b"two words "));
        // Only one line end goes: a password may end in a newline of its own.
        assert!(
            Password::from_file_contents(b"x\n\n")
                .unwrap()
                .matches(b"x\n")
        );
        assert!(Password::from_file_contents(b"").is_err());
        assert!(Password::from_file_contents(b"\n").is_err());
        assert!(Password::from_file_contents(b"\r\n").is_err());
        assert_eq!(format!("{p:?}"), "Password(..)");
    }

    #[test]
    fn only_ping_and_auth_run_before_auth() {
        for byte in 0..=0xFF {
            if let Some(op) = Opcode::from_u8(byte) {
                assert_eq!(
                    allowed_before_auth(op),
                    matches!(op, Opcode::Ping | Opcode::Auth),
                    "{op:?}"
                );
            }
        }
        assert!(resp_allowed_before_auth("auth"));
        assert!(resp_allowed_before_auth("hello"));
        assert!(resp_allowed_before_auth("quit"));
        assert!(!resp_allowed_before_auth("ping"));
        assert!(!resp_allowed_before_auth("get"));
        assert!(!resp_allowed_before_auth("multi"));
    }

    #[test]
    fn protected_mode_refuses_only_remote_clients_of_a_public_server_without_password() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let mapped_lo: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let public: IpAddr = "192.0.2.2".parse().unwrap();
        let remote: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped_remote: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert!(protected_refusal(true, any, false, remote));
        assert!(protected_refusal(true, any6, false, mapped_remote));
        assert!(protected_refusal(true, public, false, public));
        assert!(!protected_refusal(true, any, false, lo));
        assert!(!protected_refusal(true, any6, false, lo6));
        assert!(!protected_refusal(true, any6, false, mapped_lo));
        // Bound to loopback: nobody else can connect anyway.
        assert!(!protected_refusal(true, lo, false, remote));
        // A password, or protected mode off, lets everyone in (to AUTH).
        assert!(!protected_refusal(true, any, true, remote));
        assert!(!protected_refusal(false, any, false, remote));
    }

    #[test]
    fn the_denied_log_names_each_source_once_a_minute_and_stays_bounded() {
        let mut log = DeniedLog::default();
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(log.should_log(a, t0));
        assert!(!log.should_log(a, t0 + Duration::from_secs(59)));
        assert!(log.should_log(b, t0 + Duration::from_secs(1)));
        assert!(log.should_log(a, t0 + Duration::from_secs(60)));
        for i in 0..5000u32 {
            log.should_log(IpAddr::from(i.to_be_bytes()), t0 + Duration::from_secs(61));
        }
        assert!(log.last.len() <= DENIED_LOG_SOURCES);
    }
}
