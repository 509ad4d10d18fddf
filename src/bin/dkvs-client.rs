//! `dkvs-client`: one request to a dkvs server from the command line.
//!
//! Exit status: 0 success, 1 key not found, 2 usage error, 3 server or network error,
//! 4 a compare-and-set or transaction condition did not hold (nothing written).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use dkvs::client::{Cas, Client, ClientConfig, ClientError, ClientPassword, Transport, TxnOutcome};
use dkvs::protocol::txn::{Check, Condition, MAX_TXN_CONDITIONS, MAX_TXN_WRITES, Txn, TxnWrite};
use dkvs::protocol::{EXPECT_ABSENT, Opcode};

const EXIT_NOT_FOUND: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 3;
const EXIT_CONDITION_FAILED: u8 = 4;

/// Command-line client for dkvs.
///
/// Either a subcommand (`put KEY VALUE`, `get KEY`, ...) or the original form
/// `-o OP -k KEY [-v VALUE]` with OP 0 update, 1 get, 2 delete, 3 put.
/// VALUE `-` reads the value from standard input.
#[derive(Parser, Debug)]
#[command(
    name = "dkvs-client",
    version,
    about,
    after_help = "Exit status: 0 success, 1 key not found, 2 usage error, 3 server or network error, \
                  4 a condition did not hold (--if-version, --if-absent, txn): nothing written."
)]
struct Args {
    /// Server host, or several servers of a cluster as `host[:port],host[:port],…`
    /// (the first that accepts a connection is used; a slave redirects writes).
    #[arg(short = 's', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Ask etcd at these endpoints (comma-separated http://host:port) which
    /// server is the master of --cluster, and use it.
    #[arg(long = "etcd", value_delimiter = ',', requires = "cluster")]
    etcd: Vec<String>,
    /// The cluster's name in etcd (with --etcd).
    #[arg(long = "cluster", requires = "etcd")]
    cluster: Option<String>,
    /// Server port.
    #[arg(short = 'p', long = "port", default_value_t = 9099)]
    port: u16,
    /// Use TCP (the default).
    #[arg(short = 't', long = "tcp", conflicts_with = "udp")]
    tcp: bool,
    /// Use UDP.
    #[arg(short = 'u', long = "udp")]
    udp: bool,
    /// Time allowed for the request, retries included, in milliseconds.
    #[arg(long = "timeout-ms", default_value_t = 5000)]
    timeout_ms: u64,
    /// File holding the server's password (`dkvs-server --requirepass-file`;
    /// one trailing newline is dropped): the connection sends AUTH first. A
    /// file, not a flag value, so that the password never shows in `ps`.
    /// Over UDP a server with a password answers only PING.
    #[arg(long = "password-file", value_name = "PATH")]
    password_file: Option<std::path::PathBuf>,
    /// Original form: operation 0 update, 1 get, 2 delete, 3 put.
    #[arg(short = 'o', long = "op", value_parser = clap::value_parser!(u8).range(0..=3),
          requires = "key")]
    op: Option<u8>,
    /// Original form: the key.
    #[arg(short = 'k', long = "key", requires = "op")]
    key: Option<String>,
    /// Original form: the value (`-` for standard input).
    #[arg(short = 'v', long = "value", requires = "op")]
    value: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Compare-and-set: write only if the key's version is as expected.
#[derive(ClapArgs, Debug, Clone, Default)]
struct Expect {
    /// Write only if KEY exists with exactly this version (as `get -V` prints it).
    #[arg(long = "if-version", value_name = "VERSION",
          value_parser = clap::value_parser!(u64).range(1..u64::MAX),
          conflicts_with = "if_absent")]
    if_version: Option<u64>,
    /// Write only if KEY does not exist (put only).
    #[arg(long = "if-absent")]
    if_absent: bool,
}

impl Expect {
    /// The header's expected version: 0 none, EXPECT_ABSENT, or the version.
    fn version(&self) -> u64 {
        if self.if_absent {
            EXPECT_ABSENT
        } else {
            self.if_version.unwrap_or(0)
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Create or replace KEY.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        expect: Expect,
        /// Expire the key this many milliseconds from now.
        #[arg(long = "ttl-ms", value_name = "MS", conflicts_with = "expire_at_ms",
              value_parser = clap::value_parser!(u64).range(1..))]
        ttl_ms: Option<u64>,
        /// Expire the key at this unix time in milliseconds.
        #[arg(long = "expire-at-ms", value_name = "UNIX_MS",
              value_parser = clap::value_parser!(u64).range(1..))]
        expire_at_ms: Option<u64>,
    },
    /// Make KEY expire MS milliseconds from now (the master deletes it everywhere).
    Expire {
        key: String,
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        ms: u64,
    },
    /// Remove the deadline of KEY.
    Persist { key: String },
    /// Print the milliseconds KEY has left to live, or -1 if it never expires.
    Ttl { key: String },
    /// Replace KEY only if it exists.
    Update {
        key: String,
        value: String,
        #[command(flatten)]
        expect: Expect,
    },
    /// Print the value of KEY (with -V, its version on a second line).
    Get {
        key: String,
        /// Also print the key's version (for --if-version and txn).
        #[arg(short = 'V', long = "version")]
        show_version: bool,
    },
    /// Remove KEY.
    Delete {
        key: String,
        #[command(flatten)]
        expect: Expect,
    },
    /// Check the server answers.
    Ping,
    /// Print the server's statistics.
    Stats,
    /// Atomic multi-key transaction: conditions, then writes, all or nothing.
    ///
    /// `txn [if KEY version N | if KEY absent | if KEY exists]... then
    /// [put KEY VALUE [ttl-ms MS | expire-at-ms UNIX_MS] | update KEY VALUE |
    ///  delete KEY | expire KEY MS | expire-at KEY UNIX_MS | persist KEY]...`
    /// (`then` may be left out when there is no condition). Prints
    /// `OK version N`, or names the first condition that failed and exits 4
    /// with nothing written.
    #[command(verbatim_doc_comment)]
    Txn {
        /// The conditions and writes, as above.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        words: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = match command_of(&args) {
        Ok(command) => command,
        Err(msg) => {
            eprintln!("dkvs-client: {msg}\n\nFor more information, try '--help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let password = match &args.password_file {
        None => None,
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| ClientPassword::from_file_contents(&bytes))
        {
            Ok(password) => Some(password),
            Err(e) => {
                eprintln!("dkvs-client: --password-file {}: {e}", path.display());
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let config = ClientConfig {
        password,
        transport: if args.udp {
            Transport::Udp
        } else {
            Transport::Tcp
        },
        timeout: Duration::from_millis(args.timeout_ms),
        ..ClientConfig::default()
    };
    let servers = match &args.cluster {
        Some(cluster) => dkvs::client::master_from_etcd(args.etcd.clone(), cluster, config.timeout)
            .map(|server| vec![server]),
        None => {
            dkvs::client::parse_servers(&args.host, args.port).map_err(ClientError::InvalidRequest)
        }
    };
    let servers = match servers {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dkvs-client: {e}");
            return ExitCode::from(match e {
                ClientError::InvalidRequest(_) => EXIT_USAGE,
                _ => EXIT_FAILURE,
            });
        }
    };
    let shown = servers
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    match run(&servers, config, command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dkvs-client: {shown}: {e}");
            let code = match e {
                ClientError::InvalidRequest(_) => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
            ExitCode::from(code)
        }
    }
}

/// The operation asked for, from either command-line form.
fn command_of(args: &Args) -> Result<Command, String> {
    if let Some(command) = &args.command {
        if args.op.is_some() {
            return Err("give either a subcommand or -o OP, not both".into());
        }
        return Ok(command.clone());
    }
    let (Some(op), Some(key)) = (args.op, args.key.clone()) else {
        return Err(
            "no operation given: use a subcommand (put, get, update, delete, ping, \
                    stats) or -o OP -k KEY [-v VALUE]"
                .into(),
        );
    };
    let value = || {
        args.value
            .clone()
            .ok_or_else(|| format!("-o {op} needs a value: -v VALUE (or -v - for stdin)"))
    };
    let expect = Expect::default();
    Ok(match op {
        0 => Command::Update {
            key,
            value: value()?,
            expect,
        },
        1 => Command::Get {
            key,
            show_version: false,
        },
        2 => Command::Delete { key, expect },
        _ => Command::Put {
            key,
            value: value()?,
            expect,
            ttl_ms: None,
            expire_at_ms: None,
        },
    })
}

/// Turn a VALUE argument into bytes: `-` reads standard input to its end.
fn value_bytes(value: &str) -> Result<Vec<u8>, ClientError> {
    if value != "-" {
        return Ok(value.as_bytes().to_vec());
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| ClientError::InvalidRequest(format!("cannot read value from stdin: {e}")))?;
    Ok(bytes)
}

fn check_key(key: &str) -> Result<&[u8], ClientError> {
    if key.is_empty() {
        return Err(ClientError::InvalidRequest(
            "key must not be empty".to_string(),
        ));
    }
    Ok(key.as_bytes())
}

/// One write of a transaction as typed (owned).
#[derive(Debug, Clone, PartialEq, Eq)]
enum WordWrite {
    /// `put KEY VALUE [ttl-ms MS | expire-at-ms UNIX_MS]`.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        deadline_ms: Option<u64>,
    },
    /// `update KEY VALUE`.
    Update { key: Vec<u8>, value: Vec<u8> },
    /// `delete KEY`.
    Delete { key: Vec<u8> },
    /// `expire KEY MS`, `expire-at KEY UNIX_MS` (`Some`), `persist KEY` (`None`).
    Expire {
        key: Vec<u8>,
        deadline_ms: Option<u64>,
    },
}

impl WordWrite {
    fn as_write(&self) -> TxnWrite<'_> {
        match self {
            WordWrite::Put {
                key,
                value,
                deadline_ms: None,
            } => TxnWrite::Put { key, value },
            WordWrite::Put {
                key,
                value,
                deadline_ms: Some(deadline_ms),
            } => TxnWrite::PutExpiring {
                key,
                value,
                deadline_ms: *deadline_ms,
            },
            WordWrite::Update { key, value } => TxnWrite::Update { key, value },
            WordWrite::Delete { key } => TxnWrite::Delete { key },
            WordWrite::Expire { key, deadline_ms } => TxnWrite::Expire {
                key,
                deadline_ms: *deadline_ms,
            },
        }
    }
}

/// A transaction as typed: owned conditions and writes.
#[derive(Debug, Default, PartialEq, Eq)]
struct TxnWords {
    conditions: Vec<(Vec<u8>, Check)>,
    writes: Vec<WordWrite>,
}

/// The txn syntax, for usage errors.
const TXN_SYNTAX: &str = "txn [if KEY version N | if KEY absent | if KEY exists]... then \
     [put KEY VALUE [ttl-ms MS | expire-at-ms UNIX_MS] | update KEY VALUE | delete KEY | \
     expire KEY MS | expire-at KEY UNIX_MS | persist KEY]...";

/// Parse `if KEY version N | absent | exists ... then put KEY VALUE | delete KEY ...`;
/// relative times (`ttl-ms`, `expire KEY MS`) count from `now_ms` (unix ms).
fn parse_txn(words: &[String], now_ms: u64) -> Result<TxnWords, ClientError> {
    let usage =
        |why: String| ClientError::InvalidRequest(format!("txn: {why} (syntax: {TXN_SYNTAX})"));
    // A deadline: MS from now (relative) or a unix time, neither 0 nor overflowing.
    let deadline = |word: &str, relative: bool| -> Result<u64, ClientError> {
        let n = word
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| usage(format!("bad time '{word}' (milliseconds, above 0)")))?;
        if relative {
            now_ms
                .checked_add(n)
                .ok_or_else(|| usage(format!("time '{word}' overflows")))
        } else {
            Ok(n)
        }
    };
    let mut txn = TxnWords::default();
    let mut rest = words;
    while let Some(word) = rest.first() {
        match word.as_str() {
            "if" => {
                let (check, used) = match rest.get(1..3).map(|w| (w[0].as_str(), w[1].as_str())) {
                    Some((_, "absent")) => (Check::Absent, 3),
                    Some((_, "exists")) => (Check::Exists, 3),
                    Some((_, "version")) => {
                        let n = rest
                            .get(3)
                            .ok_or_else(|| usage("'version' needs N".into()))?;
                        match n.parse::<u64>() {
                            Ok(v) if v > 0 && v != EXPECT_ABSENT => (Check::Version(v), 4),
                            _ => return Err(usage(format!("bad version '{n}'"))),
                        }
                    }
                    _ => {
                        return Err(usage(
                            "'if' needs KEY and absent, exists or version N".into(),
                        ));
                    }
                };
                txn.conditions.push((check_key(&rest[1])?.to_vec(), check));
                rest = &rest[used..];
            }
            "then" => {
                rest = &rest[1..];
                break;
            }
            _ if txn.conditions.is_empty() => break,
            other => return Err(usage(format!("expected 'if' or 'then', got '{other}'"))),
        }
    }
    while let Some(word) = rest.first() {
        let (write, used) = match (word.as_str(), rest.len()) {
            ("put", 3..) => {
                let key = check_key(&rest[1])?.to_vec();
                let value = value_bytes(&rest[2])?;
                let option = rest.get(3).map(String::as_str);
                let (deadline_ms, used) = match (option, rest.get(4)) {
                    (Some("ttl-ms"), Some(n)) => (Some(deadline(n, true)?), 5),
                    (Some("expire-at-ms"), Some(n)) => (Some(deadline(n, false)?), 5),
                    (Some("ttl-ms" | "expire-at-ms"), None) => {
                        return Err(usage(format!("'{}' needs a time", rest[3])));
                    }
                    _ => (None, 3),
                };
                let put = WordWrite::Put {
                    key,
                    value,
                    deadline_ms,
                };
                (put, used)
            }
            ("update", 3..) => {
                let key = check_key(&rest[1])?.to_vec();
                let value = value_bytes(&rest[2])?;
                (WordWrite::Update { key, value }, 3)
            }
            ("delete", 2..) => {
                let key = check_key(&rest[1])?.to_vec();
                (WordWrite::Delete { key }, 2)
            }
            ("expire" | "expire-at", 3..) => {
                let key = check_key(&rest[1])?.to_vec();
                let deadline_ms = Some(deadline(&rest[2], word == "expire")?);
                (WordWrite::Expire { key, deadline_ms }, 3)
            }
            ("persist", 2..) => {
                let key = check_key(&rest[1])?.to_vec();
                let persist = WordWrite::Expire {
                    key,
                    deadline_ms: None,
                };
                (persist, 2)
            }
            ("put" | "update" | "delete" | "expire" | "expire-at" | "persist", _) => {
                return Err(usage(format!("'{word}' is missing its arguments")));
            }
            (other, _) => {
                return Err(usage(format!(
                    "expected put, update, delete, expire, expire-at or persist, got '{other}'"
                )));
            }
        };
        txn.writes.push(write);
        rest = &rest[used..];
    }
    if txn.conditions.len() > MAX_TXN_CONDITIONS || txn.writes.len() > MAX_TXN_WRITES {
        return Err(usage(format!(
            "at most {MAX_TXN_CONDITIONS} conditions and {MAX_TXN_WRITES} writes"
        )));
    }
    Ok(txn)
}

/// Unix time in milliseconds (deadlines are absolute; the server's clock decides).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn describe(check: Check) -> String {
    match check {
        Check::Version(v) => format!("version {v}"),
        Check::Absent => "absent".into(),
        Check::Exists => "exists".into(),
    }
}

fn run(
    servers: &[(String, u16)],
    config: ClientConfig,
    command: Command,
) -> Result<u8, ClientError> {
    // Read stdin and check the key before connecting, so usage errors need no server.
    let (key, value) = match &command {
        Command::Put { key, value, .. } | Command::Update { key, value, .. } => {
            (check_key(key)?, value_bytes(value)?)
        }
        Command::Get { key, .. }
        | Command::Delete { key, .. }
        | Command::Expire { key, .. }
        | Command::Persist { key }
        | Command::Ttl { key } => (check_key(key)?, Vec::new()),
        Command::Ping | Command::Stats | Command::Txn { .. } => (&[][..], Vec::new()),
    };
    let txn_words = match &command {
        Command::Txn { words } => Some(parse_txn(words, unix_ms())?),
        _ => None,
    };
    let expect = match &command {
        Command::Put { expect, .. } => expect.version(),
        Command::Update { expect, .. } | Command::Delete { expect, .. } if expect.if_absent => {
            return Err(ClientError::InvalidRequest(
                "--if-absent is for put only".into(),
            ));
        }
        Command::Update { expect, .. } | Command::Delete { expect, .. } => expect.version(),
        _ => 0,
    };
    let mut client = Client::connect_first(servers, config)?;
    let mut stdout = std::io::stdout().lock();
    let not_found = |what: &str| {
        eprintln!("dkvs-client: {what}: key not found");
        Ok(EXIT_NOT_FOUND)
    };
    let mismatch = |what: &str, current: u64| {
        if current == 0 {
            eprintln!("dkvs-client: {what}: version mismatch: the key is absent; nothing written");
        } else {
            eprintln!(
                "dkvs-client: {what}: version mismatch: the key is at version {current}; \
                 nothing written"
            );
        }
        Ok(EXIT_CONDITION_FAILED)
    };
    let written = |stdout: &mut std::io::StdoutLock<'_>, text: String| {
        writeln!(stdout, "{text}")
            .map(|_| 0)
            .map_err(ClientError::Io)
    };
    let cas = |client: &mut Client, op: Opcode| client.write_if(op, key, &value, expect);
    match command {
        Command::Put {
            ttl_ms,
            expire_at_ms,
            ..
        } if ttl_ms.is_some() || expire_at_ms.is_some() => {
            let deadline = expire_at_ms.unwrap_or_else(|| unix_ms() + ttl_ms.unwrap_or(0));
            match client.put_expiring(key, &value, deadline, expect)? {
                Cas::Done(version) => written(&mut stdout, format!("OK version {version}")),
                Cas::NotFound => Err(ClientError::Mismatch("PUT answered NOT_FOUND".into())),
                Cas::Mismatch(current) => mismatch("put", current),
            }
        }
        Command::Expire { ms, .. } => match client.expire(key, Some(unix_ms() + ms))? {
            Some(version) => written(&mut stdout, format!("OK version {version}")),
            None => not_found("expire"),
        },
        Command::Persist { .. } => match client.expire(key, None)? {
            Some(version) => written(&mut stdout, format!("OK version {version}")),
            None => not_found("persist"),
        },
        Command::Ttl { .. } => match client.ttl(key)? {
            Some((Some(deadline), _)) => {
                let left = deadline.saturating_sub(unix_ms());
                written(&mut stdout, left.to_string())
            }
            Some((None, _)) => written(&mut stdout, "-1".into()),
            None => not_found("ttl"),
        },
        Command::Put { .. } => match cas(&mut client, Opcode::Put)? {
            Cas::Done(version) => written(&mut stdout, format!("OK version {version}")),
            Cas::NotFound => Err(ClientError::Mismatch("PUT answered NOT_FOUND".into())),
            Cas::Mismatch(current) => mismatch("put", current),
        },
        Command::Update { .. } => match cas(&mut client, Opcode::Update)? {
            Cas::Done(version) => written(&mut stdout, format!("OK version {version}")),
            Cas::NotFound => not_found("update"),
            Cas::Mismatch(current) => mismatch("update", current),
        },
        Command::Get { show_version, .. } => match client.get(key)? {
            Some(found) => {
                stdout.write_all(&found.value).map_err(ClientError::Io)?;
                written(&mut stdout, String::new())?;
                if show_version {
                    written(&mut stdout, format!("version {}", found.version))?;
                }
                Ok(0)
            }
            None => not_found("get"),
        },
        Command::Delete { .. } => match cas(&mut client, Opcode::Delete)? {
            Cas::Done(_) => written(&mut stdout, "OK".into()),
            Cas::NotFound => not_found("delete"),
            Cas::Mismatch(current) => mismatch("delete", current),
        },
        Command::Ping => {
            client.ping()?;
            written(&mut stdout, "PONG".into())
        }
        Command::Stats => {
            let text = client.stats()?;
            stdout.write_all(text.as_bytes()).map_err(ClientError::Io)?;
            Ok(0)
        }
        Command::Txn { .. } => {
            let words = txn_words.unwrap_or_default();
            let txn = Txn {
                conditions: words
                    .conditions
                    .iter()
                    .map(|(key, check)| Condition { key, check: *check })
                    .collect(),
                writes: words.writes.iter().map(WordWrite::as_write).collect(),
            };
            match client.txn(&txn)? {
                TxnOutcome::Committed(version) => {
                    written(&mut stdout, format!("OK version {version}"))
                }
                TxnOutcome::Failed { index, current } => {
                    let (key, check) = usize::try_from(index)
                        .ok()
                        .and_then(|i| words.conditions.get(i))
                        .map(|(k, c)| (String::from_utf8_lossy(k).into_owned(), describe(*c)))
                        .unwrap_or_else(|| ("?".into(), "?".into()));
                    let now = if current == 0 {
                        "absent".to_string()
                    } else {
                        format!("at version {current}")
                    };
                    eprintln!(
                        "dkvs-client: txn: condition {} (if {key} {check}) failed: the key is \
                         {now}; nothing written",
                        index + 1
                    );
                    Ok(EXIT_CONDITION_FAILED)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn txn_syntax_parses() {
        let txn = parse_txn(
            &words("if a version 5 if b absent if c exists then put a 1 delete c"),
            0,
        )
        .expect("parses");
        assert_eq!(
            txn.conditions,
            vec![
                (b"a".to_vec(), Check::Version(5)),
                (b"b".to_vec(), Check::Absent),
                (b"c".to_vec(), Check::Exists),
            ]
        );
        assert_eq!(
            txn.writes,
            vec![
                WordWrite::Put {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                    deadline_ms: None
                },
                WordWrite::Delete { key: b"c".to_vec() }
            ]
        );
        let plain = parse_txn(&words("put x 1 put y 2"), 0).expect("no conditions");
        assert_eq!(plain.writes.len(), 2);
    }

    #[test]
    fn txn_update_and_deadline_words_parse() {
        let txn = parse_txn(
            &words(
                "put a 1 ttl-ms 500 put b 2 expire-at-ms 9000 put ttl-ms 3 update c 4 \
                 expire d 100 expire-at e 7000 persist f",
            ),
            1_000,
        )
        .expect("parses");
        let writes: Vec<TxnWrite<'_>> = txn.writes.iter().map(WordWrite::as_write).collect();
        assert_eq!(
            writes,
            vec![
                TxnWrite::PutExpiring {
                    key: b"a",
                    value: b"1",
                    deadline_ms: 1_500
                },
                TxnWrite::PutExpiring {
                    key: b"b",
                    value: b"2",
                    deadline_ms: 9_000
                },
                // A key named like an option is just a key.
                TxnWrite::Put {
                    key: b"ttl-ms",
                    value: b"3"
                },
                TxnWrite::Update {
                    key: b"c",
                    value: b"4"
                },
                TxnWrite::Expire {
                    key: b"d",
                    deadline_ms: Some(1_100)
                },
                TxnWrite::Expire {
                    key: b"e",
                    deadline_ms: Some(7_000)
                },
                TxnWrite::Expire {
                    key: b"f",
                    deadline_ms: None
                },
            ]
        );
    }

    #[test]
    fn txn_syntax_errors_are_usage_errors() {
        for bad in [
            "if a",
            "if a version",
            "if a version zero",
            "if a version 0",
            "if a maybe then put a 1",
            "if a absent put a 1",
            "then put a",
            "then frob a",
            "put a 1 ttl-ms",
            "put a 1 ttl-ms 0",
            "put a 1 ttl-ms x",
            "put a 1 expire-at-ms -5",
            "put a 1 ttl-ms 18446744073709551615",
            "update a",
            "expire a",
            "expire a 0",
            "expire-at a soon",
            "persist",
        ] {
            assert!(
                matches!(
                    parse_txn(&words(bad), 1),
                    Err(ClientError::InvalidRequest(_))
                ),
                "{bad}"
            );
        }
    }
}
