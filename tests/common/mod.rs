//! Helpers shared by the integration tests: building Lambda Kinesis events.
#![allow(dead_code)]

pub mod servers;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::Aggregator;
use serde_json::{Value, json};

/// One Kinesis record of a test event: its sequence number, outer key and raw `data` text.
pub fn record(seq: &str, pk: &str, data_b64: &str) -> Value {
    json!({
        "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": pk, "sequenceNumber": seq,
                    "data": data_b64, "approximateArrivalTimestamp": 1_700_000_000.5},
        "eventSource": "aws:kinesis", "eventVersion": "1.0",
        "eventID": format!("shardId-000000000001:{seq}"), "eventName": "aws:kinesis:record",
        "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/test",
    })
}

/// A plain record holding `data`.
pub fn plain(seq: &str, pk: &str, data: &[u8]) -> Value {
    record(seq, pk, &STANDARD.encode(data))
}

/// A KPL aggregate of `(partition key, data)` user records, made by our own aggregator.
pub fn aggregate(seq: &str, users: &[(&str, &[u8])]) -> Value {
    let mut agg = Aggregator::new();
    for (pk, data) in users {
        assert!(agg.add(pk, None, data).unwrap().is_none());
    }
    let r = agg.finish().unwrap();
    record(seq, &r.partition_key, &STANDARD.encode(&r.data))
}

/// The KPL envelope around any bytes: magic, the bytes, and their MD5.
pub fn envelope(protobuf: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    [
        &kinesis_deagg::kpl::MAGIC[..],
        protobuf,
        &Md5::digest(protobuf),
    ]
    .concat()
}

/// Bytes of an aggregate whose MD5 is right but whose protobuf is not.
pub fn corrupt_aggregate_bytes() -> Vec<u8> {
    envelope(&[0xFF; 20])
}

/// Runs the `kinesis-deagg` binary outside Lambda with `env` (after `RUST_LOG=warn`) and
/// `stdin`, and waits for it. Stdin is written from another thread: the binary writes while
/// it reads, and pipes are small.
pub fn run_binary(args: &[&str], env: &[(&str, &str)], stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = command(env!("CARGO_BIN_EXE_kinesis-deagg"));
    cmd.args(args)
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    out
}

/// A command that runs `program`, through `KINESIS_DEAGG_RUNNER` when that is set: a command
/// line, split on whitespace, that the program is passed to (`make test-arm64` runs the
/// aarch64 builds with `qemu-aarch64-static -L /usr/aarch64-linux-gnu`).
pub fn command(program: &str) -> std::process::Command {
    let runner = std::env::var("KINESIS_DEAGG_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    match runner.next() {
        Some(first) => {
            let mut cmd = std::process::Command::new(first);
            cmd.args(runner).arg(program);
            cmd
        }
        None => std::process::Command::new(program),
    }
}

pub fn event_json(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}

pub fn event(records: Vec<Value>) -> KinesisEvent {
    serde_json::from_value(event_json(records)).unwrap()
}

/// The user records of `event`, counted by unpacking each record (what a batch delivers).
pub fn user_records_in(event: &KinesisEvent) -> usize {
    let settings = kinesis_deagg::Settings::default();
    event
        .records
        .iter()
        .map(|r| {
            kinesis_deagg::batch::unpack(r, &settings)
                .user_records
                .len()
        })
        .sum()
}

/// The EMF metrics document of `outcome`, as the processor prints it (namespace `NS`).
pub fn metrics_document(outcome: &kinesis_deagg::batch::BatchOutcome) -> Value {
    let dims = kinesis_deagg::metrics::Dimensions {
        function_name: "f".into(),
        stream_name: "s".into(),
        shard_id: "shardId-0".into(),
    };
    kinesis_deagg::metrics::document(
        "NS",
        &dims,
        outcome,
        std::time::SystemTime::now(),
        std::time::Duration::ZERO,
    )
}

/// What one thread logged while a [`capture_logs`] guard lived.
#[derive(Clone, Default)]
pub struct Captured(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl Captured {
    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.borrow().clone()).unwrap()
    }
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// The global subscriber's writer: into this thread's capture, if it has one.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(c) = &*c.borrow() {
                c.0.borrow_mut().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stops the capture of its thread when dropped.
pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| c.borrow_mut().take());
    }
}

/// Captures, as text, what this thread logs while the guard lives. The subscriber is global
/// (installed once per test binary) and each thread writes to its own capture: a scoped
/// subscriber misses events when another test's thread logs at the same moment.
pub fn capture_logs() -> (Captured, CaptureGuard) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThreadCapture)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
    });
    let logs = Captured::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    (logs, CaptureGuard)
}
