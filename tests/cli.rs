//! The command line: `invoke`, `decode`, `aggregate`, outside Lambda.

mod common;

use std::process::Output;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use serde_json::Value;

fn run(args: &[&str], stdin: &str) -> Output {
    run_binary(args, &[], stdin)
}

fn stdout_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn decode_prints_exactly_what_the_java_kpl_wrote() {
    let out = run(&["decode", "tests/data/kpl-java-generated.event.json"], "");
    assert!(out.status.success());
    let expected: Vec<Value> = include_str!("data/kpl-java-generated.expected.ndjson")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each line also shows its data as text when it is UTF-8 (the expected lines predate it).
    let mut lines = stdout_lines(&out);
    for line in &mut lines {
        let text = line.as_object_mut().unwrap().remove("text").unwrap();
        let data = STANDARD.decode(line["data"].as_str().unwrap()).unwrap();
        assert_eq!(text.as_str(), std::str::from_utf8(&data).ok(), "{line}");
    }
    assert_eq!(lines, expected);
}

#[test]
fn decode_reports_a_failed_record_prints_the_rest_and_exits_1() {
    let event = event_json(vec![record("1", "k", "%%%"), plain("2", "k", b"hello")]).to_string();
    let out = run(&["decode", "-"], &event);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_lines(&out);
    assert_eq!(lines[0]["sequenceNumber"], "1");
    assert!(lines[0]["error"].as_str().unwrap().contains("base64"));
    assert_eq!(lines[1]["data"], "aGVsbG8=");
    assert_eq!(lines[1]["subSequenceNumber"], Value::Null);
    // Under passthrough the raw text comes out as data instead, and the exit code is 0.
    let out = run(&["decode", "--on-corrupt", "passthrough"], &event);
    assert!(out.status.success());
    assert_eq!(stdout_lines(&out).len(), 2);
}

#[test]
fn decode_reads_get_records_output() {
    let event = r#"{"Records":[{"SequenceNumber":"9","PartitionKey":"pk","Data":"aGk=",
        "ApproximateArrivalTimestamp":1700000000.123}],"NextShardIterator":"x","MillisBehindLatest":0}"#;
    let out = run(&["decode"], event);
    assert!(out.status.success());
    let lines = stdout_lines(&out);
    assert_eq!(
        (
            lines[0]["sequenceNumber"].as_str(),
            lines[0]["partitionKey"].as_str()
        ),
        (Some("9"), Some("pk"))
    );
}

#[test]
fn aggregate_then_decode_gives_back_the_user_records() {
    let users = "{\"partitionKey\":\"a\",\"text\":\"one\"}\n\
                 {\"partitionKey\":\"b\",\"explicitHashKey\":\"99\",\"data\":\"dHdv\"}\n\
                 {\"partitionKey\":\"c\",\"text\":\"three\",\"plain\":true}\n";
    let out = run(&["aggregate"], users);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event = String::from_utf8(out.stdout).unwrap();
    let lines = stdout_lines(&run(&["decode"], &event));
    let summary: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["partitionKey"].as_str().unwrap(),
                l["explicitHashKey"].as_str(),
                l["subSequenceNumber"].as_u64(),
                l["data"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a", None, Some(0), "b25l"),
            ("b", Some("99"), Some(1), "dHdv"),
            ("c", None, None, "dGhyZWU=")
        ]
    );
    assert_ne!(lines[0]["sequenceNumber"], lines[2]["sequenceNumber"]);
}

#[test]
fn aggregate_names_the_line_it_cannot_read() {
    let out = run(
        &["aggregate"],
        "{\"partitionKey\":\"a\",\"text\":\"ok\"}\n{\"text\":\"no key\"}\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn aggregate_refuses_zero_user_records_per_aggregate() {
    let line = "{\"partitionKey\":\"a\",\"text\":\"ok\"}\n";
    let out = run(&["aggregate", "--per-aggregate", "0"], line);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--per-aggregate") && err.contains("1.."),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let out = run(&["aggregate", "--per-aggregate", "1"], line);
    assert!(out.status.success());
}

#[test]
fn invoke_prints_the_response_as_the_last_line_and_exits_0_on_failures() {
    let event = event_json(vec![plain("1", "k", b"{}"), plain("2", "k", b"nope")]).to_string();
    let out = run(
        &["invoke", "--transform", "echo", "--on-corrupt", "fail"],
        &event,
    );
    assert!(out.status.success());
    let lines = stdout_lines(&out);
    assert_eq!(
        lines.len(),
        4,
        "two echo lines, the metrics document and the response"
    );
    assert_eq!(lines[1]["sequenceNumber"], "2");
    assert!(lines[2].get("_aws").is_some());
    let out = run(&["invoke", "--transform", "json"], &event);
    let lines = stdout_lines(&out);
    assert_eq!(
        lines.last().unwrap().to_string(),
        r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#
    );
}

#[test]
fn invoke_honours_the_settings_from_the_environment_too() {
    let event = event_json(vec![record("1", "k", "%%%")]).to_string();
    let out = run_binary(
        &["invoke", "-"],
        &[("DEAGG_ON_CORRUPT", "skip"), ("RUST_LOG", "off")],
        &event,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some(r#"{"batchItemFailures":[]}"#)
    );
}

#[test]
fn invoke_with_no_time_left_reports_the_first_record() {
    let event = event_json(vec![plain("7", "k", b"{}")]).to_string();
    let out = run(
        &[
            "invoke",
            "--remaining-time-ms",
            "0",
            "--transform",
            "discard",
        ],
        &event,
    );
    assert_eq!(
        stdout_lines(&out).last().unwrap().to_string(),
        r#"{"batchItemFailures":[{"itemIdentifier":"7"}]}"#
    );
}

#[test]
fn an_unreadable_event_is_a_clear_error_and_a_nonzero_exit() {
    for (args, stdin, says) in [
        (
            &["invoke", "-"][..],
            "this is not json",
            "not a Kinesis event",
        ),
        (&["invoke", "-"][..], r#"{"Items":[]}"#, "Records"),
        (
            &["invoke", "no/such/file.json"][..],
            "",
            "cannot read no/such/file.json",
        ),
        (
            &["decode", "-"][..],
            r#"{"Records":[{"kinesis":{"data":"aGk="}}]}"#,
            "sequenceNumber",
        ),
    ] {
        let out = run(args, stdin);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn outside_lambda_without_a_command_it_says_what_to_do() {
    let out = run(&[], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_LAMBDA_RUNTIME_API"));
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["invoke", "--help"],
        &["decode", "--help"],
        &["aggregate", "--help"],
    ] {
        let out = run(args, "");
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn flags_name_their_environment_variables_in_help() {
    let help = String::from_utf8(run(&["invoke", "--help"], "").stdout).unwrap();
    for var in [
        "DEAGG_TRANSFORM",
        "DEAGG_ON_CORRUPT",
        "DEAGG_MODE",
        "DEAGG_CONCURRENCY",
        "DEAGG_DEADLINE_MARGIN_MS",
        "DEAGG_LOG_MAX_BYTES",
        "DEAGG_VERIFY_CHECKSUM",
        "DEAGG_METRICS",
        "DEAGG_METRICS_NAMESPACE",
    ] {
        assert!(help.contains(var), "{var} missing from help");
    }
}

#[test]
fn the_kinesis_sink_without_a_target_is_refused_in_one_line() {
    let event = event_json(vec![plain("7", "k", b"{}")]).to_string();
    let out = run_binary(&["invoke", "-"], &[("DEAGG_SINK", "kinesis")], &event);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // A build without the sink (cargo feature sink-kinesis) refuses it just as clearly.
    let want = if cfg!(feature = "sink-kinesis") {
        "DEAGG_SINK=kinesis needs DEAGG_SINK_TARGET"
    } else {
        "DEAGG_SINK=kinesis: this build has no such sink"
    };
    assert!(err.contains(want), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty(), "no response without a sink");
    let out = run(&["invoke", "--sink", "pigeon", "-"], &event);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none, kinesis, firehose, sqs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
