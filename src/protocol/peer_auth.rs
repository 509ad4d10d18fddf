//! Mutual authentication of a replication link with a shared secret
//! (`--cluster-secret-file`): an HMAC-SHA256 challenge-response, as a pure
//! state machine the link layer drives before any peer message passes.
//!
//! ```text
//! slave                                   master
//!   |--- AUTH_HELLO(nonce_s) ------------->|
//!   |<-- AUTH_CHALLENGE(nonce_m, mac_m) ---|  mac_m = HMAC(k, "dkvs-master" | nonce_s | nonce_m)
//!   |--- AUTH_PROOF(mac_s) --------------->|  mac_s = HMAC(k, "dkvs-slave" | nonce_m | nonce_s)
//!   |--- REGISTER ... -------------------->|  (held by the slave until its proof is sent)
//! ```
//!
//! Each side proves it knows the secret over a nonce the other chose, so
//! neither a recorded exchange nor the secret itself is ever of use to an
//! eavesdropper; comparisons are constant-time. The link is not encrypted:
//! this keeps strangers from joining or posing as the master, not an attacker
//! who can rewrite an established TCP stream (docs/SECURITY.md).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Slave → master: the slave's nonce.
pub const AUTH_HELLO: u8 = 0x4D;
/// Master → slave: the master's nonce and its proof.
pub const AUTH_CHALLENGE: u8 = 0x4E;
/// Slave → master: the slave's proof.
pub const AUTH_PROOF: u8 = 0x4F;

/// Bytes of each nonce.
pub const NONCE_BYTES: usize = 16;
/// Bytes of each proof (HMAC-SHA256).
pub const MAC_BYTES: usize = 32;
/// Shortest secret accepted: anything shorter is guessable.
pub const MIN_SECRET_BYTES: usize = 16;

/// The cluster's shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in a log.
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from a file's contents (surrounding whitespace dropped).
    pub fn from_file_contents(bytes: &[u8]) -> Result<Secret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the cluster secret has {} bytes; at least {MIN_SECRET_BYTES} are needed",
                trimmed.len()
            ));
        }
        Ok(Secret(trimmed.to_vec()))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(label);
        mac.update(first);
        mac.update(second);
        mac
    }
}

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// A frame other than the one expected at this step.
    Unexpected(u8),
    /// A frame of the right kind with the wrong length.
    BadLength(u8, usize),
    /// The other side's proof is wrong: it does not know the secret.
    BadProof,
    /// The OS gave no random bytes.
    NoRandomness(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Unexpected(op) => write!(
                f,
                "opcode 0x{op:02x} before the link was authenticated (is --cluster-secret-file \
                 the same on both sides?)"
            ),
            AuthError::BadLength(op, n) => write!(f, "opcode 0x{op:02x} with {n} payload bytes"),
            AuthError::BadProof => {
                write!(f, "wrong proof: the peer does not know the cluster secret")
            }
            AuthError::NoRandomness(e) => write!(f, "no random bytes for a nonce: {e}"),
        }
    }
}

fn nonce() -> Result<[u8; NONCE_BYTES], AuthError> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| AuthError::NoRandomness(e.to_string()))?;
    Ok(n)
}

/// Where one end of a link stands in the handshake.
#[derive(Debug)]
enum Step {
    /// Slave: HELLO sent with this nonce, waiting for the challenge.
    SlaveHello([u8; NONCE_BYTES]),
    /// Master: waiting for HELLO.
    MasterWaiting,
    /// Master: challenge sent, waiting for the proof.
    MasterChallenged {
        nonce_s: [u8; NONCE_BYTES],
        nonce_m: [u8; NONCE_BYTES],
    },
    /// Both sides proved themselves.
    Done,
}

/// One end's handshake.
#[derive(Debug)]
pub struct PeerAuth {
    secret: Secret,
    step: Step,
}

/// A frame the handshake wants sent: opcode and payload.
pub type AuthFrame = (u8, Vec<u8>);

impl PeerAuth {
    /// A slave's end, with the HELLO to send first.
    pub fn slave(secret: Secret) -> Result<(PeerAuth, AuthFrame), AuthError> {
        let nonce_s = nonce()?;
        Ok((
            PeerAuth {
                secret,
                step: Step::SlaveHello(nonce_s),
            },
            (AUTH_HELLO, nonce_s.to_vec()),
        ))
    }

    /// A master's end, waiting for the slave's HELLO.
    pub fn master(secret: Secret) -> PeerAuth {
        PeerAuth {
            secret,
            step: Step::MasterWaiting,
        }
    }

    /// Whether both sides have proved themselves.
    pub fn done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    /// Take one frame of the other side; returns the frame to answer with, if any.
    pub fn on_frame(&mut self, op: u8, payload: &[u8]) -> Result<Option<AuthFrame>, AuthError> {
        let expect = |want: u8, len: usize| {
            if op != want {
                Err(AuthError::Unexpected(op))
            } else if payload.len() != len {
                Err(AuthError::BadLength(op, payload.len()))
            } else {
                Ok(())
            }
        };
        match &self.step {
            Step::MasterWaiting => {
                expect(AUTH_HELLO, NONCE_BYTES)?;
                let mut nonce_s = [0u8; NONCE_BYTES];
                nonce_s.copy_from_slice(payload);
                let nonce_m = nonce()?;
                let mac_m = self
                    .secret
                    .mac(b"dkvs-master", &nonce_s, &nonce_m)
                    .finalize()
                    .into_bytes();
                let mut reply = nonce_m.to_vec();
                reply.extend_from_slice(&mac_m);
                self.step = Step::MasterChallenged { nonce_s, nonce_m };
                Ok(Some((AUTH_CHALLENGE, reply)))
            }
            Step::SlaveHello(nonce_s) => {
                expect(AUTH_CHALLENGE, NONCE_BYTES + MAC_BYTES)?;
                let (nonce_m, mac_m) = payload.split_at(NONCE_BYTES);
                self.secret
                    .mac(b"dkvs-master", nonce_s, nonce_m)
                    .verify_slice(mac_m)
                    .map_err(|_| AuthError::BadProof)?;
                let mac_s = self
                    .secret
                    .mac(b"dkvs-slave", nonce_m, nonce_s)
                    .finalize()
                    .into_bytes();
                self.step = Step::Done;
                Ok(Some((AUTH_PROOF, mac_s.to_vec())))
            }
            Step::MasterChallenged { nonce_s, nonce_m } => {
                expect(AUTH_PROOF, MAC_BYTES)?;
                self.secret
                    .mac(b"dkvs-slave", nonce_m, nonce_s)
                    .verify_slice(payload)
                    .map_err(|_| AuthError::BadProof)?;
                self.step = Step::Done;
                Ok(None)
            }
            Step::Done => Err(AuthError::Unexpected(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::from_file_contents(s.as_bytes()).expect("secret")
    }

    /// Run the handshake between a slave with `s` and a master with `m`.
    fn handshake(s: &str, m: &str) -> Result<(PeerAuth, PeerAuth), AuthError> {
        let (mut slave, (op, hello)) = PeerAuth::slave(secret(s))?;
        let mut master = PeerAuth::master(secret(m));
        let (op, challenge) = master.on_frame(op, &hello)?.expect("a challenge");
        let (op, proof) = slave.on_frame(op, &challenge)?.expect("a proof");
        assert_eq!(master.on_frame(op, &proof)?, None);
        Ok((slave, master))
    }

    #[test]
    fn the_same_secret_authenticates_both_ends() {
        let (slave, master) = handshake(
            "correct horse battery staple",
            "correct horse battery staple",
        )
        .expect("handshake");
        assert!(slave.done() && master.done());
    }

    #[test]
    fn a_different_secret_is_refused_by_the_slave_first() {
        // The master proves itself first: a fake master learns nothing usable.
        assert_eq!(
            handshake(
                "correct horse battery staple",
                "another secret, long enough"
            )
            .err(),
            Some(AuthError::BadProof)
        );
    }

    #[test]
    fn a_slave_without_the_secret_cannot_answer_the_challenge() {
        let mut master = PeerAuth::master(secret("correct horse battery staple"));
        let (_, challenge) = master
            .on_frame(AUTH_HELLO, &[7; NONCE_BYTES])
            .expect("challenge")
            .expect("frame");
        assert_eq!(challenge.len(), NONCE_BYTES + MAC_BYTES);
        // A proof replayed from another exchange (other nonces) is wrong here.
        assert_eq!(
            master.on_frame(AUTH_PROOF, &[0; MAC_BYTES]),
            Err(AuthError::BadProof)
        );
        assert!(!master.done());
    }

    #[test]
    fn anything_out_of_order_or_of_the_wrong_size_is_refused() {
        let mut master = PeerAuth::master(secret("correct horse battery staple"));
        assert_eq!(
            master.on_frame(0x40, b"register"),
            Err(AuthError::Unexpected(0x40))
        );
        assert_eq!(
            master.on_frame(AUTH_HELLO, &[1; 3]),
            Err(AuthError::BadLength(AUTH_HELLO, 3))
        );
        let (slave, _) = handshake(
            "correct horse battery staple",
            "correct horse battery staple",
        )
        .expect("handshake");
        let mut slave = slave;
        assert_eq!(
            slave.on_frame(AUTH_CHALLENGE, &[0; 48]),
            Err(AuthError::Unexpected(AUTH_CHALLENGE)),
            "nothing after the handshake"
        );
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert!(Secret::from_file_contents(b"short\n").is_err());
        let s = secret("  a secret with whitespace around  \n");
        assert_eq!(format!("{s:?}"), "Secret(31 bytes)");
    }
}
