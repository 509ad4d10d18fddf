//! `dkvs-cas-bench`: compare-and-set increments of shared counters from many
//! connections, against dkvs (GET, then PUT with the expected version), Redis
//! (WATCH + GET, then MULTI, SET, EXEC) or etcd (range, then a txn comparing the
//! mod_revision), with the same client code around all three: two round trips
//! per attempt on each side, retried until the write commits.
//!
//! Prints one line per run: committed increments per second, attempts per
//! increment, and the latency of an increment (retries included) p50/p99/max.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use dkvs::client::{Cas, Client, ClientConfig};
use dkvs::protocol::{EXPECT_ABSENT, Opcode};
use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// dkvs binary protocol: GET, then PUT carrying the expected version.
    Dkvs,
    /// Redis protocol: WATCH + GET, then MULTI, SET, EXEC (nil: retry).
    Resp,
    /// etcd v3 over its JSON gateway: range, then a txn comparing the key's
    /// mod_revision with the one read (0: absent) that puts on success.
    Etcd,
}

/// CAS increments from many connections.
#[derive(Parser, Debug)]
#[command(name = "dkvs-cas-bench", version, about)]
struct Args {
    #[arg(long, value_enum, default_value_t = Protocol::Dkvs)]
    protocol: Protocol,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Connections, one thread each.
    #[arg(short = 'c', long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    connections: u64,
    /// Counters shared by the connections (1: every increment contends).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    counters: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
}

/// Attempts one increment may take before the run is declared broken.
const MAX_ATTEMPTS: u64 = 1_000_000;

/// One connection's way of doing read-then-conditional-write.
trait Counter {
    /// Read the counter: its value and whatever the conditional write needs.
    fn read(&mut self, key: &[u8]) -> Result<(u64, u64), String>;
    /// Write `value` if the counter is still as read; whether it committed.
    fn write(&mut self, key: &[u8], value: u64, token: u64) -> Result<bool, String>;
}

struct DkvsCounter(Client);

impl Counter for DkvsCounter {
    fn read(&mut self, key: &[u8]) -> Result<(u64, u64), String> {
        match self.0.get(key).map_err(|e| e.to_string())? {
            None => Ok((0, EXPECT_ABSENT)),
            Some(held) => Ok((parse(&held.value)?, held.version)),
        }
    }

    fn write(&mut self, key: &[u8], value: u64, version: u64) -> Result<bool, String> {
        let value = value.to_string();
        match self.0.write_if(Opcode::Put, key, value.as_bytes(), version) {
            Ok(Cas::Done(_)) => Ok(true),
            Ok(Cas::Mismatch(_)) => Ok(false),
            Ok(Cas::NotFound) => Err("PUT answered NOT_FOUND".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct RespCounter {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl RespCounter {
    fn send(&mut self, commands: &[&[&[u8]]]) -> Result<(), String> {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in *args {
                out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                out.extend_from_slice(arg);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.reader
            .get_mut()
            .write_all(&out)
            .map_err(|e| e.to_string())
    }

    /// One reply line (a bulk's payload is read as the next line: values here are numbers).
    fn line(&mut self) -> Result<&[u8], String> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line);
        match n {
            Ok(0) => Err("server closed the connection".into()),
            Ok(_) if self.line.ends_with(b"\r\n") => Ok(&self.line[..self.line.len() - 2]),
            Ok(_) => Err("reply line without CRLF".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn expect(&mut self, want: &[u8]) -> Result<(), String> {
        let got = self.line()?;
        if got == want {
            Ok(())
        } else {
            Err(format!("expected {:?}, got {:?}", s(want), s(got)))
        }
    }
}

impl Counter for RespCounter {
    fn read(&mut self, key: &[u8]) -> Result<(u64, u64), String> {
        self.send(&[&[b"WATCH", key], &[b"GET", key]])?;
        self.expect(b"+OK")?;
        let head = self.line()?.to_vec();
        if head == b"$-1" {
            return Ok((0, 0));
        }
        let value = parse(self.line()?)?;
        Ok((value, 0))
    }

    fn write(&mut self, key: &[u8], value: u64, _: u64) -> Result<bool, String> {
        let value = value.to_string();
        self.send(&[&[b"MULTI"], &[b"SET", key, value.as_bytes()], &[b"EXEC"]])?;
        self.expect(b"+OK")?;
        self.expect(b"+QUEUED")?;
        match self.line()? {
            b"*-1" => Ok(false),
            b"*1" => self.expect(b"+OK").map(|_| true),
            other => Err(format!("EXEC answered {:?}", s(other))),
        }
    }
}

/// etcd's v3 JSON gateway over one HTTP/1.1 keep-alive connection.
struct EtcdCounter {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl EtcdCounter {
    /// POST `body` to `path` and return the response body.
    fn post(&mut self, path: &str, body: &str) -> Result<String, String> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let io = |e: std::io::Error| e.to_string();
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(io)?;
        let mut length = None;
        let mut chunked = false;
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line).map_err(io)? == 0 {
                return Err("etcd closed the connection".into());
            }
            let header = s(&self.line).trim().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(n) = header.strip_prefix("content-length:") {
                length = n.trim().parse::<usize>().ok();
            }
            chunked |= header == "transfer-encoding: chunked";
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                self.line.clear();
                self.reader.read_until(b'\n', &mut self.line).map_err(io)?;
                let size =
                    usize::from_str_radix(s(&self.line).trim(), 16).map_err(|e| e.to_string())?;
                if size > 1 << 20 {
                    return Err(format!("etcd chunk of {size} bytes"));
                }
                let mut chunk = vec![0; size + 2];
                std::io::Read::read_exact(&mut self.reader, &mut chunk).map_err(io)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            let length = length.ok_or("etcd reply without a length")?;
            if length > 1 << 20 {
                return Err(format!("etcd reply of {length} bytes"));
            }
            body.resize(length, 0);
            std::io::Read::read_exact(&mut self.reader, &mut body).map_err(io)?;
        }
        Ok(s(&body))
    }
}

/// The string value of `"name":"..."` in a flat JSON text.
fn json_field<'a>(json: &'a str, name: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let end = json[start..].find('"')? + start;
    Some(&json[start..end])
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u32> = text
        .bytes()
        .filter(|&c| c != b'=')
        .map(|c| B64.iter().position(|&d| d == c).map(|p| p as u32))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("bad base64 {text:?}"))?;
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | d << (18 - 6 * i));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}

impl Counter for EtcdCounter {
    fn read(&mut self, key: &[u8]) -> Result<(u64, u64), String> {
        let reply = self.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", b64(key)))?;
        let found = (
            json_field(&reply, "value"),
            json_field(&reply, "mod_revision"),
        );
        let (Some(value), Some(revision)) = found else {
            return Ok((0, 0));
        };
        let revision = revision
            .parse()
            .map_err(|_| format!("bad mod_revision in {reply}"))?;
        Ok((parse(&unb64(value)?)?, revision))
    }

    fn write(&mut self, key: &[u8], value: u64, revision: u64) -> Result<bool, String> {
        let (key, value) = (b64(key), b64(value.to_string().as_bytes()));
        // A key that does not exist compares as mod_revision 0.
        let body = format!(
            "{{\"compare\":[{{\"key\":\"{key}\",\"target\":\"MOD\",\"result\":\"EQUAL\",\
             \"mod_revision\":\"{revision}\"}}],\"success\":[{{\"request_put\":{{\"key\":\"{key}\",\
             \"value\":\"{value}\"}}}}]}}"
        );
        let reply = self.post("/v3/kv/txn", &body)?;
        if !reply.contains("\"header\"") {
            return Err(format!("etcd txn answered {reply}"));
        }
        Ok(reply.contains("\"succeeded\":true"))
    }
}

fn s(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn parse(value: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("counter holds {:?}, not a number", s(value)))
}

/// A TCP stream for the text protocols, with Nagle off and a read timeout.
fn tcp(args: &Args) -> Result<BufReader<TcpStream>, String> {
    let io = |e: std::io::Error| e.to_string();
    let stream = TcpStream::connect((args.host.as_str(), args.port)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    Ok(BufReader::new(stream))
}

fn connect(args: &Args) -> Result<Box<dyn Counter + Send>, String> {
    Ok(match args.protocol {
        Protocol::Dkvs => {
            let config = ClientConfig {
                timeout: Duration::from_secs(10),
                ..ClientConfig::default()
            };
            let client =
                Client::connect(&args.host, args.port, config).map_err(|e| e.to_string())?;
            Box::new(DkvsCounter(client))
        }
        Protocol::Resp => Box::new(RespCounter {
            reader: tcp(args)?,
            line: Vec::new(),
        }),
        Protocol::Etcd => Box::new(EtcdCounter {
            reader: tcp(args)?,
            line: Vec::new(),
        }),
    })
}

/// What one connection did.
struct Run {
    increments: u64,
    attempts: u64,
    latency_us: Histogram<u64>,
}

fn worker(
    mut counter: Box<dyn Counter + Send>,
    index: u64,
    counters: u64,
    stop: &AtomicBool,
) -> Result<Run, String> {
    let mut run = Run {
        increments: 0,
        attempts: 0,
        latency_us: Histogram::new(3).map_err(|e| e.to_string())?,
    };
    let mut next = index;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("cas:{}", next % counters);
        next += 1;
        let started = Instant::now();
        let mut committed = false;
        for _ in 0..MAX_ATTEMPTS {
            run.attempts += 1;
            let (value, token) = counter.read(key.as_bytes())?;
            if counter.write(key.as_bytes(), value + 1, token)? {
                committed = true;
                break;
            }
        }
        if !committed {
            return Err(format!(
                "no increment of {key} committed in {MAX_ATTEMPTS} attempts"
            ));
        }
        run.increments += 1;
        let _ = run.latency_us.record(started.elapsed().as_micros() as u64);
    }
    Ok(run)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..args.connections {
        let counter = match connect(&args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dkvs-cas-bench: cannot connect: {e}");
                return std::process::ExitCode::from(3);
            }
        };
        let stop = stop.clone();
        let counters = args.counters;
        threads.push(thread::spawn(move || worker(counter, i, counters, &stop)));
    }
    let started = Instant::now();
    thread::sleep(Duration::from_secs_f64(args.duration.max(0.1)));
    stop.store(true, Ordering::Relaxed);
    let mut total = Run {
        increments: 0,
        attempts: 0,
        latency_us: Histogram::new(3).expect("histogram"),
    };
    for t in threads {
        match t.join() {
            Ok(Ok(run)) => {
                total.increments += run.increments;
                total.attempts += run.attempts;
                let _ = total.latency_us.add(&run.latency_us);
            }
            Ok(Err(e)) => {
                eprintln!("dkvs-cas-bench: {e}");
                return std::process::ExitCode::from(3);
            }
            Err(_) => return std::process::ExitCode::from(3),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let h = &total.latency_us;
    println!(
        "{:?} {} conns {} counters: {:.0} increments/s, {:.2} attempts/increment, \
         latency us p50 {} p99 {} max {}",
        args.protocol,
        args.connections,
        args.counters,
        total.increments as f64 / secs,
        total.attempts as f64 / total.increments.max(1) as f64,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for text in [&b""[..], b"f", b"fo", b"foo", b"foob", b"cas:17", b"12345"] {
            assert_eq!(unb64(&b64(text)).expect("decodes"), text);
        }
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"fo"), "Zm8=");
    }

    #[test]
    fn json_fields_are_found() {
        let reply = r#"{"kvs":[{"key":"YQ==","mod_revision":"7","value":"MTI="}]}"#;
        assert_eq!(json_field(reply, "mod_revision"), Some("7"));
        assert_eq!(json_field(reply, "value"), Some("MTI="));
        assert_eq!(json_field(reply, "nope"), None);
    }
}
