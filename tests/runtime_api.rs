//! The real binary in Lambda mode, end to end: a minimal Lambda Runtime API on 127.0.0.1
//! hands it events and collects its responses.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
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

/// A minimal Runtime API: `next` hands out queued events, `response`, `error` and
/// `init/error` are reported on a channel.
struct RuntimeApi {
    port: u16,
    queue: Arc<Mutex<VecDeque<(String, String, u128)>>>,
    replies: Receiver<Reply>,
}

impl RuntimeApi {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let queue: Arc<Mutex<VecDeque<(String, String, u128)>>> = Default::default();
        let (tx, replies) = channel();
        let q = queue.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (q, tx) = (q.clone(), tx.clone());
                std::thread::spawn(move || serve(conn, q, tx));
            }
        });
        RuntimeApi {
            port,
            queue,
            replies,
        }
    }

    /// Queues an event whose invocation has 30 s to run.
    fn push(&self, id: &str, event: String) {
        self.push_with_time(id, event, 30_000);
    }

    fn push_with_time(&self, id: &str, event: String, remaining_ms: u128) {
        let deadline = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + remaining_ms;
        self.queue
            .lock()
            .unwrap()
            .push_back((id.to_owned(), event, deadline));
    }

    fn reply(&self) -> Reply {
        self.replies
            .recv_timeout(Duration::from_secs(30))
            .expect("the function did not answer within 30 s")
    }
}

/// Serves one keep-alive connection.
fn serve(conn: TcpStream, queue: Arc<Mutex<VecDeque<(String, String, u128)>>>, tx: Sender<Reply>) {
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
        let (status, headers, reply_body) = match parts.as_slice() {
            ["invocation", "next"] => {
                let (id, event, deadline) = loop {
                    if let Some(next) = queue.lock().unwrap().pop_front() {
                        break next;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                let headers = format!(
                    "Lambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\n\
                     Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:deagg\r\n\
                     Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n"
                );
                ("200 OK", headers, event)
            }
            ["invocation", id, "response"] => {
                tx.send(Reply::Response(id.to_string(), body)).unwrap();
                ("202 Accepted", String::new(), "{}".into())
            }
            ["invocation", id, "error"] => {
                tx.send(Reply::Error(id.to_string(), body)).unwrap();
                ("202 Accepted", String::new(), "{}".into())
            }
            ["init", "error"] => {
                tx.send(Reply::InitError(body)).unwrap();
                ("202 Accepted", String::new(), "{}".into())
            }
            _ => ("404 Not Found", String::new(), "{}".into()),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{reply_body}",
            reply_body.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
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

fn start_function(api: &RuntimeApi, env: &[(&str, &str)]) -> Function {
    start_function_logging_to(api, env, Stdio::null())
}

fn start_function_logging_to(api: &RuntimeApi, env: &[(&str, &str)], stderr: Stdio) -> Function {
    let mut cmd = Command::new(binary());
    cmd.env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", api.port))
        .env("AWS_LAMBDA_FUNCTION_NAME", "deagg")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
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
    // 300 ms left is inside the 1 s margin: nothing is processed, the first record is reported.
    api.push_with_time("short", event.clone(), 300);
    assert_eq!(
        api.reply(),
        Reply::Response("short".into(), failures(&["1"]))
    );
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
