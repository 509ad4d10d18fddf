//! `dkvs-client`: one request to a dkvs server from the command line.
//!
//! Exit status: 0 success, 1 key not found, 2 usage error, 3 server or network error.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dkvs::client::{Client, ClientConfig, ClientError, Transport};

const EXIT_NOT_FOUND: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 3;

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
    after_help = "Exit status: 0 success, 1 key not found, 2 usage error, 3 server or network error."
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

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Create or replace KEY.
    Put { key: String, value: String },
    /// Replace KEY only if it exists.
    Update { key: String, value: String },
    /// Print the value of KEY.
    Get { key: String },
    /// Remove KEY.
    Delete { key: String },
    /// Check the server answers.
    Ping,
    /// Print the server's statistics.
    Stats,
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
    let config = ClientConfig {
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
    Ok(match op {
        0 => Command::Update {
            key,
            value: value()?,
        },
        1 => Command::Get { key },
        2 => Command::Delete { key },
        _ => Command::Put {
            key,
            value: value()?,
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

fn run(
    servers: &[(String, u16)],
    config: ClientConfig,
    command: Command,
) -> Result<u8, ClientError> {
    // Read stdin and check the key before connecting, so usage errors need no server.
    let (key, value) = match &command {
        Command::Put { key, value } | Command::Update { key, value } => {
            (check_key(key)?, value_bytes(value)?)
        }
        Command::Get { key } | Command::Delete { key } => (check_key(key)?, Vec::new()),
        Command::Ping | Command::Stats => (&[][..], Vec::new()),
    };
    let mut client = Client::connect_first(servers, config)?;
    let mut stdout = std::io::stdout().lock();
    let not_found = |what: &str| {
        eprintln!("dkvs-client: {what}: key not found");
        Ok(EXIT_NOT_FOUND)
    };
    let written = |stdout: &mut std::io::StdoutLock<'_>, text: String| {
        writeln!(stdout, "{text}")
            .map(|_| 0)
            .map_err(ClientError::Io)
    };
    match command {
        Command::Put { .. } => {
            let version = client.put(key, &value)?;
            written(&mut stdout, format!("OK version {version}"))
        }
        Command::Update { .. } => match client.update(key, &value)? {
            Some(version) => written(&mut stdout, format!("OK version {version}")),
            None => not_found("update"),
        },
        Command::Get { .. } => match client.get(key)? {
            Some(found) => {
                stdout.write_all(&found.value).map_err(ClientError::Io)?;
                written(&mut stdout, String::new())
            }
            None => not_found("get"),
        },
        Command::Delete { .. } => {
            if client.delete(key)? {
                written(&mut stdout, "OK".into())
            } else {
                not_found("delete")
            }
        }
        Command::Ping => {
            client.ping()?;
            written(&mut stdout, "PONG".into())
        }
        Command::Stats => {
            let text = client.stats()?;
            stdout.write_all(text.as_bytes()).map_err(ClientError::Io)?;
            Ok(0)
        }
    }
}
