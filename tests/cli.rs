//! The real `dkvs-client` and `dkvs-server` command lines: output, exit codes, flags.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{ServerProcess, bin};

fn client(server: &ServerProcess, args: &[&str]) -> Output {
    client_with_stdin(server, args, None)
}

fn client_with_stdin(server: &ServerProcess, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(bin("dkvs-client"))
        .args(["-p", &server.port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dkvs-client");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        pipe.write_all(bytes).expect("write stdin");
    }
    drop(pipe);
    child.wait_with_output().expect("wait")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn subcommands_over(transport: &str) {
    let server = ServerProcess::start(&[]);
    let t = |args: &[&str]| {
        let mut all = vec![transport];
        all.extend_from_slice(args);
        client(&server, &all)
    };
    let out = t(&["put", "fruit", "apple"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("OK version "), "{}", stdout(&out));
    let out = t(&["get", "fruit"]);
    assert_eq!((code(&out), stdout(&out)), (0, "apple\n".to_string()));
    let out = t(&["update", "fruit", "pear"]);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&t(&["get", "fruit"])), "pear\n");
    let out = t(&["update", "vegetable", "leek"]);
    assert_eq!(code(&out), 1, "update of an absent key exits 1");
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = t(&["delete", "fruit"]);
    assert_eq!((code(&out), stdout(&out)), (0, "OK\n".to_string()));
    let out = t(&["get", "fruit"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stdout(&out), "");
    assert_eq!(code(&t(&["delete", "fruit"])), 1);
    assert_eq!(stdout(&t(&["ping"])), "PONG\n");
    let out = t(&["stats"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("role master"), "{}", stdout(&out));
}

#[test]
fn subcommands_over_tcp() {
    subcommands_over("-t");
}

#[test]
fn subcommands_over_udp() {
    subcommands_over("-u");
}

#[test]
fn original_option_form() {
    let server = ServerProcess::start(&[]);
    assert_eq!(
        code(&client(&server, &["-o", "3", "-k", "k", "-v", "v1"])),
        0
    );
    let out = client(&server, &["-o", "1", "-k", "k"]);
    assert_eq!((code(&out), stdout(&out)), (0, "v1\n".to_string()));
    assert_eq!(
        code(&client(&server, &["-o", "0", "-k", "k", "-v", "v2"])),
        0
    );
    assert_eq!(
        stdout(&client(&server, &["-u", "-o", "1", "-k", "k"])),
        "v2\n"
    );
    assert_eq!(code(&client(&server, &["-o", "2", "-k", "k"])), 0);
    assert_eq!(code(&client(&server, &["-o", "1", "-k", "k"])), 1);
    assert_eq!(
        code(&client(&server, &["-o", "0", "-k", "k", "-v", "x"])),
        1
    );
}

#[test]
fn value_from_stdin_is_binary_safe() {
    let server = ServerProcess::start(&[]);
    let value: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let out = client_with_stdin(&server, &["put", "blob", "-"], Some(&value));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = client(&server, &["get", "blob"]);
    assert_eq!(code(&out), 0);
    assert_eq!(&out.stdout[..value.len()], &value[..]);
    assert_eq!(&out.stdout[value.len()..], b"\n");
    let out = client_with_stdin(
        &server,
        &["-o", "0", "-k", "blob", "-v", "-"],
        Some(b"small"),
    );
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&client(&server, &["-u", "get", "blob"])), "small\n");
}

#[test]
fn usage_errors_exit_2() {
    let server = ServerProcess::start(&[]);
    for args in [
        &[][..],
        &["frobnicate", "k"][..],
        &["get"][..],
        &["put", "k"][..],
        &["-o", "3", "-k", "k"][..],
        &["-o", "9", "-k", "k"][..],
        &["-k", "k"][..],
        &["-o", "1", "-k", "k", "get", "k"][..],
        &["get", ""][..],
        &["-t", "-u", "ping"][..],
    ] {
        let out = client(&server, args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} explains itself");
    }
}

#[test]
fn unreachable_server_exits_3_with_the_reason() {
    // Port 1 (tcpmux) is privileged and served by nothing here; a port freed by
    // another test could be reused by a concurrent test's server or client.
    let port = 1;
    let out = Command::new(bin("dkvs-client"))
        .args(["-p", &port.to_string(), "get", "k"])
        .output()
        .expect("run");
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
    let out = Command::new(bin("dkvs-client"))
        .args([
            "-u",
            "--timeout-ms",
            "300",
            "-p",
            &port.to_string(),
            "get",
            "k",
        ])
        .output()
        .expect("run");
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("no reply"), "{}", stderr(&out));
}

/// Assert `BINARY --help` succeeds and mentions every word.
fn assert_help_mentions(binary: &str, words: &[&str]) {
    let out = Command::new(bin(binary))
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(code(&out), 0);
    let help = stdout(&out);
    for word in words {
        assert!(help.contains(word), "{binary} --help lacks {word}:\n{help}");
    }
}

#[test]
fn help_explains_the_flags() {
    let client_words = [
        "put",
        "update",
        "get",
        "delete",
        "ping",
        "stats",
        "--op",
        "--password-file",
        "Exit status",
    ];
    assert_help_mentions("dkvs-client", &client_words);
    let server_words = [
        "--host",
        "--port",
        "--tcp",
        "--udp",
        "--log",
        "--logfile",
        "--max-value-size",
        "--mhost",
        "--qport",
        "--tpc-timeout-ms",
        "--min-slaves",
        "--repl-backlog-mb",
        "--requirepass-file",
        "--protected-mode",
    ];
    assert_help_mentions("dkvs-server", &server_words);
}

#[test]
fn server_bad_flags_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["-p", "notaport"][..],
        &["-l", "verbose"][..],
        &["-t", "-u"][..],
    ] {
        let out = Command::new(bin("dkvs-server"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(code(&out), 2, "{args:?}");
        assert!(!stderr(&out).is_empty());
    }
}

#[test]
fn server_logs_to_a_file_at_debug_level() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("server.log");
    let log_arg = log.to_str().expect("utf-8 path");
    let server = ServerProcess::start(&["-l", "2", "--logfile", log_arg]);
    assert_eq!(code(&client(&server, &["ping"])), 0);
    drop(server);
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("connected"), "debug lines are logged: {text}");
}

/// The version `OK version N` names.
fn version_of(out: &Output) -> String {
    let text = stdout(out);
    text.trim()
        .strip_prefix("OK version ")
        .unwrap_or_else(|| panic!("not an OK line: {text:?} {}", stderr(out)))
        .to_string()
}

#[test]
fn compare_and_set_transactions_and_expiry_from_the_command_line() {
    let server = ServerProcess::start(&[]);
    let v1 = version_of(&client(&server, &["put", "c", "1"]));
    let out = client(&server, &["get", "-V", "c"]);
    assert_eq!(stdout(&out), format!("1\nversion {v1}\n"));
    let v2 = version_of(&client(&server, &["put", "--if-version", &v1, "c", "2"]));
    let out = client(&server, &["put", "--if-version", &v1, "c", "3"]);
    assert_eq!(code(&out), 4, "a stale version exits 4");
    assert!(
        stderr(&out).contains(&format!("version {v2}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&client(&server, &["put", "--if-absent", "c", "x"])), 4);
    assert_eq!(
        code(&client(&server, &["put", "--if-absent", "new", "x"])),
        0
    );
    assert_eq!(code(&client(&server, &["delete", "--if-absent", "c"])), 2);
    // A transaction: all its writes, or none of them.
    let cond = [
        "txn", "if", "c", "version", &v2, "if", "d", "absent", "then",
    ];
    let out = client(
        &server,
        &[
            &cond[..],
            &["put", "c", "10", "put", "d", "20", "delete", "new"],
        ]
        .concat(),
    );
    let vt = version_of(&out);
    assert_eq!(
        stdout(&client(&server, &["get", "-V", "d"])),
        format!("20\nversion {vt}\n")
    );
    let out = client(&server, &[&cond[..], &["put", "c", "99"]].concat());
    assert_eq!(code(&out), 4);
    assert!(
        stderr(&out).contains("condition 1 (if c version"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&client(&server, &["get", "c"])), "10\n");
    assert_eq!(code(&client(&server, &["get", "new"])), 1);
    for bad in [
        &["txn", "if", "c"][..],
        &["txn", "frob"],
        &["txn", "put", "k"],
    ] {
        assert_eq!(code(&client(&server, bad)), 2, "{bad:?}");
    }
    // Expiry.
    assert_eq!(
        code(&client(&server, &["put", "--ttl-ms", "60000", "s", "v"])),
        0
    );
    let left: u64 = stdout(&client(&server, &["ttl", "s"]))
        .trim()
        .parse()
        .expect("ms");
    assert!(left > 50_000 && left <= 60_000, "{left}");
    assert_eq!(code(&client(&server, &["persist", "s"])), 0);
    assert_eq!(stdout(&client(&server, &["ttl", "s"])), "-1\n");
    assert_eq!(code(&client(&server, &["ttl", "nope"])), 1);
    assert_eq!(code(&client(&server, &["expire", "s", "1"])), 0);
    common::wait_until("s expired", std::time::Duration::from_secs(10), || {
        code(&client(&server, &["get", "s"])) == 1
    });
}

#[test]
fn txn_updates_and_deadlines_from_the_command_line() {
    let server = ServerProcess::start(&[]);
    let slave = ServerProcess::start_slave(&server, &[]);
    assert_eq!(code(&client(&server, &["put", "u", "old"])), 0);
    assert_eq!(
        code(&client(&server, &["put", "--ttl-ms", "60000", "p", "v"])),
        0
    );
    let ms = |server: &ServerProcess, key: &str| -> i64 {
        let out = client(server, &["ttl", key]);
        stdout(&out).trim().parse().unwrap_or(-2)
    };
    let out = client(
        &server,
        &[
            "txn",
            "if",
            "u",
            "exists",
            "then",
            "put",
            "t",
            "1",
            "ttl-ms",
            "60000",
            "update",
            "u",
            "new",
            "update",
            "missing",
            "x",
            "expire",
            "u",
            "120000",
            "persist",
            "p",
            "put",
            "gone",
            "1",
            "expire-at-ms",
            "1",
        ],
    );
    let committed = version_of(&out);
    let left = ms(&server, "t");
    assert!(left > 50_000 && left <= 60_000, "{left}");
    let left = ms(&server, "u");
    assert!(left > 110_000 && left <= 120_000, "{left}");
    assert_eq!(ms(&server, "p"), -1, "persisted");
    assert_eq!(stdout(&client(&server, &["get", "u"])), "new\n");
    assert_eq!(
        code(&client(&server, &["get", "missing"])),
        1,
        "update of absent"
    );
    assert_eq!(
        code(&client(&server, &["get", "gone"])),
        1,
        "deadline passed"
    );
    // The slave applied the same transaction.
    common::wait_until(
        "the slave applied the txn",
        std::time::Duration::from_secs(20),
        || stdout(&client(&slave, &["get", "-V", "u"])) == format!("new\nversion {committed}\n"),
    );
    let left = ms(&slave, "t");
    assert!(left > 50_000 && left <= 60_000, "slave: {left}");
    assert_eq!(ms(&slave, "p"), -1, "slave: persisted");
    for bad in [
        &["txn", "put", "k", "v", "ttl-ms"][..],
        &["txn", "expire", "k", "0"],
        &["txn", "persist"],
    ] {
        assert_eq!(code(&client(&server, bad)), 2, "{bad:?}");
    }
}
