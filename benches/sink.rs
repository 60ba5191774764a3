//! The Kinesis sink's cost: whole events through `Processor::handle_body` with the `discard`
//! transform, without a sink and with the Kinesis sink (re-aggregating, signing, sending) to a
//! local server on another thread that accepts every entry at once.
//!
//! `cargo bench --bench sink -- FILE...` prints one JSON line per file: the median of 30 runs
//! (after 3 warm-ups) of each, and their ratio. Driven by tools/bench/compare.py (`make bench`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Instant;

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use kinesis_deagg::settings::Switch;
use kinesis_deagg::sink::kinesis::KinesisSink;
use kinesis_deagg::sink::{SinkKind, SinkSettings};
use kinesis_deagg::transform::{Builtin, BuiltinTransform};
use kinesis_deagg::{Processor, Settings};

/// Serves `ListShards` (4 shards) and accepts every `PutRecords` entry, on a thread per
/// connection; returns the port.
fn server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            std::thread::spawn(move || serve(stream));
        }
    });
    port
}

fn serve(stream: std::net::TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.set_nodelay(true).unwrap();
    let mut writer = stream;
    loop {
        let (mut length, mut target) = (0, String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "x-amz-target" => target = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let reply = if target.ends_with("ListShards") {
            let quarter = u128::MAX / 4;
            let shards: Vec<_> = (0..4u128)
                .map(|i| {
                    let end = if i == 3 { u128::MAX } else { quarter * (i + 1) - 1 };
                    serde_json::json!({"ShardId": format!("shardId-{i:012}"),
                        "HashKeyRange": {"StartingHashKey": (quarter * i).to_string(), "EndingHashKey": end.to_string()},
                        "SequenceNumberRange": {"StartingSequenceNumber": "0"}})
                })
                .collect();
            serde_json::json!({ "Shards": shards }).to_string()
        } else {
            // One `PartitionKey` per entry (base64 data holds no quote).
            let n = memchr::memmem::find_iter(&body, b"\"PartitionKey\"").count();
            let records = vec![r#"{"SequenceNumber":"1"}"#; n].join(",");
            format!(r#"{{"FailedRecordCount":0,"Records":[{records}]}}"#)
        };
        // One write: a second small one would wait for the client's delayed ACK (Nagle).
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn median_ms<F: FnMut()>(mut run: F) -> f64 {
    let mut times = Vec::new();
    for i in 0..33 {
        let start = Instant::now();
        run();
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    assert!(kinesis_deagg::memory::retain_freed_memory());
    let port = server();
    let settings = Settings {
        metrics: Switch::Off,
        ..Settings::default()
    };
    let sink_settings = SinkSettings {
        kind: SinkKind::Kinesis,
        target: Some("bench".into()),
        ..SinkSettings::default()
    };
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .build();
    let sink =
        KinesisSink::new(aws_sdk_kinesis::Client::from_conf(config), &sink_settings).unwrap();
    let discard = BuiltinTransform::new(Builtin::Discard, 0);
    let plain = Processor::new(discard, settings.clone());
    let sinking = Processor::with_sink(discard, sink, settings);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let context = lambda_runtime::Context::default();
    for path in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        let body = std::fs::read(&path).unwrap();
        let copy = || bytes::BytesMut::from(&body[..]);
        // Copies are made outside the clock: one per run, before it.
        let mut copies: Vec<_> = (0..33).map(|_| copy()).collect();
        let discard_ms = median_ms(|| {
            let r = rt.block_on(plain.handle_body(copies.pop().unwrap(), &context));
            assert!(r.unwrap().batch_item_failures.is_empty());
        });
        let mut copies: Vec<_> = (0..33).map(|_| copy()).collect();
        let sink_ms = median_ms(|| {
            let r = rt.block_on(sinking.handle_body(copies.pop().unwrap(), &context));
            assert!(r.unwrap().batch_item_failures.is_empty());
        });
        let event = kinesis_deagg::event::KinesisEvent::from_slice(&body).unwrap();
        let outcome = rt.block_on(sinking.handle(&event, None)).unwrap();
        let stats = outcome.stats.sink.unwrap();
        println!(
            "{}",
            serde_json::json!({"file": path, "discard_ms": discard_ms, "sink_ms": sink_ms,
                "ratio": sink_ms / discard_ms, "user_records": outcome.stats.user_records,
                "requests": stats.requests, "bytes_sent": stats.delivered_bytes})
        );
    }
}
