//! Logs a producer cannot forge: record data and partition keys holding newlines, a forged
//! `ERROR` line and terminal escape sequences come out escaped, one event per line, in the
//! text and the JSON log formats (the binary, run with `invoke`).

mod common;

use std::process::{Output, Stdio};

use common::*;
use serde_json::Value;

const FORGED: &str = "\nERROR kinesis_deagg: transform failed\n";
const CLEAR_SCREEN: &str = "\x1b[2J";
const BEL: &str = "\x07";

/// The binary under test: `KINESIS_DEAGG_BIN` when set (`make test` points it at the release
/// build), else the one cargo built for the tests.
fn invoke(env: &[(&str, &str)], event: &str) -> Output {
    use std::io::Write;
    let binary = std::env::var("KINESIS_DEAGG_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kinesis-deagg").into());
    let mut child = command(&binary)
        .args(["invoke", "-"])
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env_remove("AWS_LAMBDA_LOG_LEVEL")
        .env_remove("AWS_LAMBDA_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .env("DEAGG_METRICS", "off")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let event = event.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(event.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    out
}

/// Data and a key that try to forge a line and to reach a terminal.
fn hostile() -> (String, String) {
    let data = format!("hello{FORGED}{CLEAR_SCREEN}{BEL}bye");
    let key = format!("key{FORGED}{CLEAR_SCREEN}\r{BEL}");
    (data, key)
}

/// An event with the hostile data as a plain record (its key escaped in the JSON, so the
/// event is read the serde way) and inside a KPL aggregate (read on the fast path).
fn hostile_event() -> String {
    let (data, key) = hostile();
    event_json(vec![
        plain("1", &key, data.as_bytes()),
        aggregate("2", &[(&key, data.as_bytes())]),
    ])
    .to_string()
}

fn no_raw_controls(stderr: &[u8]) {
    for byte in [0x1b, 0x07, b'\r'] {
        assert!(
            !stderr.contains(&byte),
            "raw {byte:#x} in the log:\n{}",
            String::from_utf8_lossy(stderr)
        );
    }
}

#[test]
fn text_logs_escape_what_records_hold() {
    for (transform, lines) in [("log", 2), ("json", 2)] {
        let out = invoke(&[("DEAGG_TRANSFORM", transform)], &hostile_event());
        no_raw_controls(&out.stderr);
        let log = String::from_utf8(out.stderr).unwrap();
        // Every line is an event of its own, starting with its timestamp: none is forged.
        for line in log.lines() {
            assert!(
                line.starts_with(|c: char| c.is_ascii_digit()),
                "a line that is no event of ours: {line:?}\n{log}"
            );
            assert!(
                !line.trim_start().starts_with("ERROR kinesis_deagg"),
                "{log}"
            );
        }
        assert_eq!(log.lines().count(), lines, "{log}");
        if transform == "log" {
            // Shown escaped, as Rust writes them.
            let shown = r#"data="hello\nERROR kinesis_deagg: transform failed\n\u{1b}[2J\u{7}bye""#;
            assert_eq!(log.matches(shown).count(), 2, "{log}");
            let key =
                r#"partition_key="key\nERROR kinesis_deagg: transform failed\n\u{1b}[2J\r\u{7}""#;
            assert_eq!(log.matches(key).count(), 2, "{log}");
        } else {
            // The json transform fails the first record: its reason is a sentence, not Rust.
            let warn = log.lines().find(|l| l.contains(" WARN ")).unwrap();
            assert!(
                warn.contains("reason=transform failed: user record is not one JSON document"),
                "{warn}"
            );
            assert!(!warn.contains("TransformError"), "{warn}");
        }
    }
}

#[test]
fn json_logs_escape_what_records_hold_and_keep_it_exact() {
    let (data, key) = hostile();
    let out = invoke(&[("AWS_LAMBDA_LOG_FORMAT", "JSON")], &hostile_event());
    no_raw_controls(&out.stderr);
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for line in lines {
        let fields = &line["fields"];
        assert_eq!(fields["message"], "user record");
        assert_eq!(fields["data"], data.as_str());
        assert_eq!(fields["partition_key"], key.as_str());
    }
}

#[test]
fn corrupt_records_log_their_policy_by_name() {
    let event = event_json(vec![record("1", "k", "%%%")]).to_string();
    let out = invoke(&[], &event);
    let log = String::from_utf8(out.stderr).unwrap();
    let error = log.lines().find(|l| l.contains("ERROR")).unwrap();
    assert!(error.contains("action=fail"), "{error}");
    let warn = log.lines().find(|l| l.contains(" WARN ")).unwrap();
    assert!(
        warn.contains("reason=corrupt record: `data` is not valid base64"),
        "{warn}"
    );
}
