//! The real binary in Lambda mode, end to end: a minimal Lambda Runtime API on 127.0.0.1
//! hands it events and collects its responses.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

/// What the function sent back for one invocation.
#[derive(Debug, PartialEq)]
enum Reply {
    Response(String, Value),
    Error(String, Value),
    InitError(Value),
}

/// What `/next` hands out: a status, the invocation's headers and its body. With `hold` > 0,
/// half the body is sent, then the rest once `hold` replies have come in (an invocation
/// still arriving while others are answered).
struct Next {
    status: &'static str,
    headers: String,
    body: String,
    hold: usize,
}

/// The headers of an invocation with `remaining_ms` to run.
fn invocation_headers(id: &str, remaining_ms: u128) -> String {
    let deadline = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + remaining_ms;
    format!(
        "Lambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\n\
         Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:deagg\r\n\
         Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n"
    )
}

/// The state shared by the server's connections.
#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<Next>>,
    /// Statuses to answer the next `/response` posts with (202 when empty).
    response_statuses: Mutex<VecDeque<&'static str>>,
    /// `/next` requests waiting for an invocation now.
    waiting: AtomicUsize,
    /// Responses and errors received so far.
    replied: AtomicUsize,
}

/// A minimal Runtime API: `next` hands out queued invocations, `response`, `error` and
/// `init/error` are reported on a channel.
struct RuntimeApi {
    port: u16,
    shared: Arc<Shared>,
    replies: Receiver<Reply>,
}

impl RuntimeApi {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared: Arc<Shared> = Default::default();
        let (tx, replies) = channel();
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, tx) = (s.clone(), tx.clone());
                std::thread::spawn(move || serve(conn, s, tx));
            }
        });
        RuntimeApi {
            port,
            shared,
            replies,
        }
    }

    /// Queues an event whose invocation has 30 s to run.
    fn push(&self, id: &str, event: String) {
        self.push_with_time(id, event, 30_000);
    }

    fn push_with_time(&self, id: &str, event: String, remaining_ms: u128) {
        self.push_next(Next {
            status: "200 OK",
            headers: invocation_headers(id, remaining_ms),
            body: event,
            hold: 0,
        });
    }

    fn push_next(&self, next: Next) {
        self.shared.queue.lock().unwrap().push_back(next);
    }

    /// Answers the next `/response` posts with these statuses.
    fn refuse_responses(&self, statuses: &[&'static str]) {
        self.shared
            .response_statuses
            .lock()
            .unwrap()
            .extend(statuses);
    }

    fn reply(&self) -> Reply {
        self.replies
            .recv_timeout(Duration::from_secs(30))
            .expect("the function did not answer within 30 s")
    }
}

/// Serves one keep-alive connection.
fn serve(conn: TcpStream, shared: Arc<Shared>, tx: Sender<Reply>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = request_line.split_whitespace().nth(1).unwrap().to_owned();
        let parts: Vec<&str> = path
            .trim_start_matches("/2018-06-01/runtime/")
            .split('/')
            .collect();
        let accepted = |reply: Reply| {
            shared.replied.fetch_add(1, SeqCst);
            tx.send(reply).unwrap();
        };
        let (status, headers, reply_body, hold) = match parts.as_slice() {
            ["invocation", "next"] => {
                shared.waiting.fetch_add(1, SeqCst);
                let next = loop {
                    if let Some(next) = shared.queue.lock().unwrap().pop_front() {
                        break next;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                shared.waiting.fetch_sub(1, SeqCst);
                (next.status, next.headers, next.body, next.hold)
            }
            ["invocation", id, "response"] => {
                let status = shared.response_statuses.lock().unwrap().pop_front();
                accepted(Reply::Response(id.to_string(), body));
                (
                    status.unwrap_or("202 Accepted"),
                    String::new(),
                    "{}".into(),
                    0,
                )
            }
            ["invocation", id, "error"] => {
                accepted(Reply::Error(id.to_string(), body));
                ("202 Accepted", String::new(), "{}".into(), 0)
            }
            ["init", "error"] => {
                tx.send(Reply::InitError(body)).unwrap();
                ("202 Accepted", String::new(), "{}".into(), 0)
            }
            _ => ("404 Not Found", String::new(), "{}".into(), 0),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
            reply_body.len()
        );
        let (first, rest) = reply_body.split_at(if hold > 0 {
            reply_body.len() / 2
        } else {
            reply_body.len()
        });
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(first.as_bytes()).is_err() {
            return;
        }
        if hold > 0 {
            let _ = conn.flush();
            let waited = std::time::Instant::now();
            while shared.replied.load(SeqCst) < hold && waited.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if conn.write_all(rest.as_bytes()).is_err() {
            return;
        }
    }
}

struct Function(Child);

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary under test: `KINESIS_DEAGG_BIN` when set (`make test` points it at the release
/// build, as Lambda runs it), else the one cargo built for the tests.
fn binary() -> String {
    std::env::var("KINESIS_DEAGG_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kinesis-deagg").into())
}

/// The command that starts the binary under test (through `KINESIS_DEAGG_RUNNER` when set).
fn function_command() -> Command {
    command(&binary())
}

fn start_function(api: &RuntimeApi, env: &[(&str, &str)]) -> Function {
    start_function_logging_to(api, env, Stdio::null())
}

fn start_function_logging_to(api: &RuntimeApi, env: &[(&str, &str)], stderr: Stdio) -> Function {
    start_function_with(api, env, Stdio::null(), stderr)
}

fn start_function_with(
    api: &RuntimeApi,
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> Function {
    let mut cmd = function_command();
    cmd.env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", api.port))
        .env("AWS_LAMBDA_FUNCTION_NAME", "deagg")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env_remove("RUST_LOG")
        .stdout(stdout)
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Function(cmd.spawn().unwrap())
}

fn failures(items: &[&str]) -> Value {
    json!({"batchItemFailures": items.iter().map(|s| json!({"itemIdentifier": s})).collect::<Vec<_>>()})
}

#[test]
fn the_binary_serves_several_events_through_the_runtime_api() {
    let api = RuntimeApi::start();
    let _function = start_function(&api, &[("DEAGG_TRANSFORM", "json")]);

    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "aggregated",
            event_json(vec![aggregate("100", &[("a", b"{}"), ("b", b"[1,2]")])]),
            failures(&[]),
        ),
        (
            "plain",
            event_json(vec![
                plain("200", "k", b"{\"n\":1}"),
                plain("201", "k", b"2"),
            ]),
            failures(&[]),
        ),
        (
            "mixed-json-failure",
            event_json(vec![
                plain("300", "k", b"{}"),
                aggregate("301", &[("a", b"{}"), ("b", b"not json"), ("c", b"{}")]),
                plain("302", "k", b"also not json"),
            ]),
            failures(&["301"]),
        ),
        (
            "corrupt",
            event_json(vec![
                plain("400", "k", b"{}"),
                plain("401", "a", &corrupt_aggregate_bytes()),
            ]),
            failures(&["401"]),
        ),
        (
            "invalid-base64",
            event_json(vec![record("500", "k", "%%%%"), plain("501", "k", b"{}")]),
            failures(&["500"]),
        ),
        ("empty", event_json(vec![]), failures(&[])),
    ];
    for (id, event, _) in &cases {
        api.push(id, event.to_string());
    }
    for (id, _, expected) in &cases {
        assert_eq!(
            api.reply(),
            Reply::Response(id.to_string(), expected.clone()),
            "event {id}"
        );
    }

    // An event that is not a Kinesis event is an invocation error, and the function lives on.
    api.push("not-kinesis", r#"{"Items":[]}"#.into());
    let Reply::Error(id, body) = api.reply() else {
        panic!("expected an error")
    };
    assert_eq!(id, "not-kinesis");
    assert!(body.to_string().contains("Records"), "{body}");
    api.push(
        "after",
        event_json(vec![plain("600", "k", b"{}")]).to_string(),
    );
    assert_eq!(api.reply(), Reply::Response("after".into(), failures(&[])));
}

/// Each sample event in events/, one invocation each, gives the response in events/expected/
/// (under the `json` transform). `make test-arm64` also runs this one on cargo-lambda's arm64
/// bootstrap, under qemu.
#[test]
fn each_sample_event_through_the_runtime_api_gives_its_expected_response() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("events");
    let mut names: Vec<String> = std::fs::read_dir(dir.join("expected"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 6, "sample events: {names:?}");
    let api = RuntimeApi::start();
    let _function = start_function(&api, &[("DEAGG_TRANSFORM", "json")]);
    for name in &names {
        api.push(name, std::fs::read_to_string(dir.join(name)).unwrap());
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected").join(name)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            api.reply(),
            Reply::Response(name.clone(), expected),
            "events/{name}"
        );
    }
}

#[test]
fn the_corrupt_policy_and_mode_come_from_the_environment() {
    let api = RuntimeApi::start();
    let _function = start_function(
        &api,
        &[
            ("DEAGG_TRANSFORM", "json"),
            ("DEAGG_ON_CORRUPT", "skip"),
            ("DEAGG_MODE", "concurrent"),
        ],
    );
    let event = event_json(vec![record("1", "k", "%%%%"), plain("2", "k", b"{}")]);
    api.push("skip", event.to_string());
    assert_eq!(api.reply(), Reply::Response("skip".into(), failures(&[])));
}

#[test]
fn a_bad_setting_is_reported_to_lambda_as_an_init_error() {
    let api = RuntimeApi::start();
    let mut function = start_function(&api, &[("DEAGG_ON_CORRUPT", "sometimes")]);
    let Reply::InitError(body) = api.reply() else {
        panic!("expected an init error")
    };
    assert_eq!(body["errorType"], "Runtime.InitError");
    assert!(
        body["errorMessage"].as_str().unwrap().contains("sometimes"),
        "{body}"
    );
    let status = function.0.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn the_deadline_from_the_runtime_api_is_honoured() {
    let api = RuntimeApi::start();
    let _function = start_function(
        &api,
        &[
            ("DEAGG_TRANSFORM", "discard"),
            ("DEAGG_DEADLINE_MARGIN_MS", "1000"),
        ],
    );
    let event = event_json(vec![plain("1", "k", b"x"), plain("2", "k", b"y")]).to_string();
    // No time left: nothing is processed, the first record is reported.
    api.push_with_time("late", event.clone(), 0);
    assert_eq!(
        api.reply(),
        Reply::Response("late".into(), failures(&["1"]))
    );
    // 300 ms left is inside the 1 s margin, which then takes half of it: the rest is enough.
    api.push_with_time("short", event.clone(), 300);
    assert_eq!(api.reply(), Reply::Response("short".into(), failures(&[])));
    api.push("long", event);
    assert_eq!(api.reply(), Reply::Response("long".into(), failures(&[])));
}

#[test]
fn json_logs_in_lambda_carry_the_request_id_and_the_record() {
    let api = RuntimeApi::start();
    let log = std::env::temp_dir().join(format!(
        "kinesis-deagg-runtime-api-{}.log",
        std::process::id()
    ));
    let file = std::fs::File::create(&log).unwrap();
    let function = start_function_logging_to(
        &api,
        &[
            ("DEAGG_TRANSFORM", "json"),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
        ],
        file.into(),
    );
    api.push(
        "req-42",
        event_json(vec![plain("9", "k", b"not json")]).to_string(),
    );
    assert_eq!(
        api.reply(),
        Reply::Response("req-42".into(), failures(&["9"]))
    );
    // An event that cannot be read fails the invocation, and says so in the log.
    api.push("req-43", "not an event".into());
    assert!(matches!(api.reply(), Reply::Error(id, _) if id == "req-43"));
    drop(function);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let error: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no JSON error line in:\n{text}"));
    assert_eq!(error["fields"]["sequence_number"], "9");
    assert!(
        error["spans"].to_string().contains("req-42"),
        "no request id in {error}"
    );
    assert_eq!(error["span"]["shard_id"], "shardId-000000000001");
    let failed = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["fields"]["message"]
                .to_string()
                .contains("the invocation failed")
        })
        .unwrap_or_else(|| panic!("no invocation error in:\n{text}"));
    assert!(failed["spans"].to_string().contains("req-43"), "{failed}");
    assert!(
        failed["fields"]["message"]
            .to_string()
            .contains("not a Kinesis event")
    );
}

/// The function's exit status, if it exits within 10 s.
fn exit_status(function: &mut Function) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(status) = function.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn error_of(reply: Reply, expected_id: &str) -> Value {
    match reply {
        Reply::Error(id, body) if id == expected_id => body,
        other => panic!("expected an error for {expected_id}, got {other:?}"),
    }
}

#[test]
fn an_invocation_whose_headers_cannot_be_read_is_answered_on_error() {
    let api = RuntimeApi::start();
    let mut function = start_function(&api, &[("DEAGG_TRANSFORM", "discard")]);
    let event = event_json(vec![plain("1", "k", b"x")]).to_string();
    let good = invocation_headers("x", 30_000);
    let without_deadline: String = good
        .lines()
        .filter(|l| !l.starts_with("Lambda-Runtime-Deadline-Ms"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cases = [
        (
            "no-deadline",
            without_deadline.clone(),
            "lambda-runtime-deadline-ms",
        ),
        (
            "empty-deadline",
            format!("{without_deadline}Lambda-Runtime-Deadline-Ms: \r\n"),
            "lambda-runtime-deadline-ms",
        ),
        (
            "word-deadline",
            format!("{without_deadline}Lambda-Runtime-Deadline-Ms: soon\r\n"),
            "lambda-runtime-deadline-ms",
        ),
        (
            "bad-client-context",
            format!("{good}Lambda-Runtime-Client-Context: {{not json\r\n"),
            "headers cannot be read",
        ),
    ];
    for (id, headers, says) in cases {
        api.push_next(Next {
            status: "200 OK",
            headers: headers.replace("Request-Id: x", &format!("Request-Id: {id}")),
            body: event.clone(),
            hold: 0,
        });
        let body = error_of(api.reply(), id);
        assert_eq!(
            body["errorType"], "InvalidInvocationHeaders",
            "{id}: {body}"
        );
        assert!(
            body["errorMessage"].as_str().unwrap().contains(says),
            "{id}: {body}"
        );
        // The function lives on and serves the next one.
        api.push("after", event.clone());
        assert_eq!(api.reply(), Reply::Response("after".into(), failures(&[])));
    }
    assert_eq!(function.0.try_wait().unwrap(), None);
}

#[test]
fn a_refused_next_is_asked_again_and_a_500_ends_the_process() {
    let api = RuntimeApi::start();
    let mut function = start_function(&api, &[("DEAGG_TRANSFORM", "discard")]);
    let event = event_json(vec![plain("1", "k", b"x")]).to_string();
    // A 503, then a 200 that names no request it could be answered for: both asked again.
    for (status, headers) in [
        (
            "503 Service Unavailable",
            invocation_headers("refused", 30_000),
        ),
        ("200 OK", String::new()),
    ] {
        api.push_next(Next {
            status,
            headers,
            body: event.clone(),
            hold: 0,
        });
    }
    api.push("served", event.clone());
    assert_eq!(api.reply(), Reply::Response("served".into(), failures(&[])));
    assert_eq!(function.0.try_wait().unwrap(), None);
    // "Container error. Non-recoverable state. Runtime should exit promptly."
    api.push_next(Next {
        status: "500 Internal Server Error",
        headers: invocation_headers("broken", 30_000),
        body: r#"{"errorMessage":"boom"}"#.into(),
        hold: 0,
    });
    let status = exit_status(&mut function).expect("the function did not exit after a 500");
    assert!(!status.success());
}

#[test]
fn a_response_refused_as_too_large_is_posted_as_an_error_and_a_500_ends_the_process() {
    let api = RuntimeApi::start();
    let mut function = start_function(&api, &[("DEAGG_TRANSFORM", "discard")]);
    let event = event_json(vec![plain("1", "k", b"x")]).to_string();
    api.refuse_responses(&["413 Payload Too Large"]);
    api.push("big", event.clone());
    assert_eq!(api.reply(), Reply::Response("big".into(), failures(&[])));
    let body = error_of(api.reply(), "big");
    assert_eq!(body["errorType"], "ResponseTooLarge", "{body}");
    api.push("after", event.clone());
    assert_eq!(api.reply(), Reply::Response("after".into(), failures(&[])));

    api.refuse_responses(&["500 Internal Server Error"]);
    api.push("last", event);
    assert_eq!(api.reply(), Reply::Response("last".into(), failures(&[])));
    let status = exit_status(&mut function).expect("the function did not exit after a 500");
    assert!(!status.success());
}

#[test]
fn with_a_max_concurrency_invocations_overlap_and_each_is_answered_for_itself() {
    let api = RuntimeApi::start();
    let stdout = std::env::temp_dir().join(format!(
        "kinesis-deagg-concurrency-{}.out",
        std::process::id()
    ));
    let function = start_function_with(
        &api,
        &[
            ("AWS_LAMBDA_MAX_CONCURRENCY", "4"),
            ("DEAGG_TRANSFORM", "json"),
        ],
        std::fs::File::create(&stdout).unwrap().into(),
        Stdio::null(),
    );
    let started = std::time::Instant::now();
    while api.shared.waiting.load(SeqCst) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "4 concurrent /next requests expected, {} seen",
            api.shared.waiting.load(SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Invocation i holds i + 1 records, the last not JSON: its response reports that one, its
    // metrics document counts i + 1 records. The first arrives only once the others are done.
    let event = |i: usize| {
        let mut records: Vec<_> = (0..i)
            .map(|j| plain(&format!("{i}0{j}"), "k", b"{}"))
            .collect();
        records.push(plain(&format!("{i}99"), "k", b"not json"));
        event_json(records).to_string()
    };
    for i in 0..4 {
        api.push_next(Next {
            status: "200 OK",
            headers: invocation_headers(&format!("req-{i}"), 30_000),
            body: event(i),
            hold: if i == 0 { 3 } else { 0 },
        });
    }
    let order: Vec<String> = (0..4)
        .map(|_| match api.reply() {
            Reply::Response(id, body) => {
                let i: usize = id.trim_start_matches("req-").parse().unwrap();
                assert_eq!(body, failures(&[&format!("{i}99")]), "{id}");
                id
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(order.last().map(String::as_str), Some("req-0"), "{order:?}");
    drop(function);
    let text = std::fs::read_to_string(&stdout).unwrap();
    let _ = std::fs::remove_file(&stdout);
    let mut counts: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|doc| doc.get("_aws").is_some())
        .map(|doc| {
            let count = |name: &str| doc[name].as_f64().unwrap() as u64;
            (count("KinesisRecords"), count("FailedRecords"))
        })
        .collect();
    counts.sort();
    assert_eq!(counts, [(1, 1), (2, 1), (3, 1), (4, 1)], "{text}");
}
