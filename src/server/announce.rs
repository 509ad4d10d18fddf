//! The address a node announces to others (`--announce-addr HOST:PORT`): the
//! one a slave puts in REGISTER and a failover leader records in etcd.
//!
//! It is what other hosts use to reach this node, so it must name one: the
//! unspecified addresses (`0.0.0.0`, `::`) only mean "every local address"
//! to a bind and reach nobody else, and multicast or broadcast addresses are
//! not a host. The text comes from an operator, but it ends up in STATS and
//! etcd, so it is held to what a host name or address may contain.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Longest host name accepted (DNS's limit for a full name).
const MAX_HOST_LEN: usize = 253;

/// A validated `HOST:PORT` to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceAddr {
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

impl AnnounceAddr {
    /// Parse `HOST:PORT`: an IPv4 address, a bracketed IPv6 address
    /// (`[2001:db8::1]:9100`) or a host name, and a port from 1 to 65535.
    pub fn parse(text: &str) -> Result<AnnounceAddr, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("'{text}' is not HOST:PORT (no port)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{port}' is not a port (1 to 65535)"))?;
        if port == 0 {
            return Err("port 0 cannot be announced: other nodes need the real port".into());
        }
        let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip: IpAddr = v6
                .parse()
                .map_err(|_| format!("'{v6}' in brackets is not an IPv6 address"))?;
            if !ip.is_ipv6() {
                return Err(format!("'{v6}' in brackets is not an IPv6 address"));
            }
            Host::Ip(ip)
        } else if host.contains(':') {
            return Err(format!(
                "'{host}': write an IPv6 address in brackets, as [{host}]:{port}"
            ));
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Ip(ip)
        } else {
            Host::Name(parse_host_name(host)?)
        };
        if let Host::Ip(ip) = host {
            check_reachable(ip)?;
        }
        Ok(AnnounceAddr { host, port })
    }

    /// The announced address as a socket address, when the host is an IP
    /// address (a host name would need a DNS lookup).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for AnnounceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            // SocketAddr's Display brackets IPv6, as the parser expects.
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// Letters, digits, '-' and '.', in labels of 1 to 63 characters that do not
/// start or end with '-' (RFC 1123).
fn parse_host_name(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "the host name has {} characters, at most {MAX_HOST_LEN} are allowed",
            host.len()
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "'{}' is not a host name or IP address (letters, digits, '-' and '.')",
                host.escape_debug()
            ));
        }
    }
    Ok(host.to_string())
}

/// Refuse addresses that do not name one host another node could reach.
fn check_reachable(ip: IpAddr) -> Result<(), String> {
    // `::ffff:0.0.0.0` is 0.0.0.0 in IPv6 clothing.
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        return Err(format!(
            "{ip} is the unspecified address: it means every local address to a bind \
             and reaches no host; announce an address other nodes can connect to"
        ));
    }
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!("{ip} is not the address of one host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_round_trip_through_display() {
        for text in [
            "10.0.0.7:9100",
            "[2001:db8::1]:9100",
            "[::1]:1",
            "db-1.example.com:65535",
            "localhost:9099",
            "node7.:9100",
        ] {
            let addr = AnnounceAddr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!(
            AnnounceAddr::parse("10.0.0.7:9100")
                .ok()
                .and_then(|a| a.socket_addr()),
            "10.0.0.7:9100".parse().ok()
        );
        assert_eq!(
            AnnounceAddr::parse("db:9100")
                .ok()
                .and_then(|a| a.socket_addr()),
            None
        );
    }

    #[test]
    fn unreachable_or_malformed_addresses_are_refused_with_a_reason() {
        for (text, why) in [
            ("0.0.0.0:9100", "unspecified"),
            ("[::]:9100", "unspecified"),
            ("[::ffff:0.0.0.0]:9100", "unspecified"),
            ("224.0.0.1:9100", "not the address of one host"),
            ("[ff02::1]:9100", "not the address of one host"),
            ("255.255.255.255:9100", "not the address of one host"),
            ("10.0.0.7", "no port"),
            ("10.0.0.7:", "not a port"),
            ("10.0.0.7:0", "port 0"),
            ("10.0.0.7:65536", "not a port"),
            ("10.0.0.7:-1", "not a port"),
            ("::1:9100", "in brackets"),
            ("[10.0.0.7]:9100", "not an IPv6"),
            ("[nope]:9100", "not an IPv6"),
            (":9100", "empty"),
            ("a b:9100", "not a host name"),
            ("x\nrole slave:9100", "not a host name"),
            ("-db:9100", "not a host name"),
            ("db..example:9100", "not a host name"),
            ("db_1:9100", "not a host name"),
        ] {
            let err = AnnounceAddr::parse(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
        }
        let long = format!("{}:9100", "a.".repeat(127));
        assert!(
            AnnounceAddr::parse(&long)
                .expect_err("too long")
                .contains("at most 253")
        );
    }
}
