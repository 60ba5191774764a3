//! The Firehose and SQS sinks against moto in server mode, started here on 127.0.0.1: what
//! Firehose delivers into moto's S3 and what SQS queues, read back, is what the batch held;
//! FIFO queues get the partition key as the group and the idempotency key as the
//! deduplication id, so that Lambda's retry of a batch queues nothing twice. And the Kinesis
//! sink with a stream's ARN, which kinesalite does not take.
#![cfg(all(feature = "sink-firehose", feature = "sink-sqs"))]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::servers::{Server, moto, proxy, root};
use kinesis_deagg::batch::BatchOutcome;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::settings::Switch;
use kinesis_deagg::sink::firehose::FirehoseSink;
use kinesis_deagg::sink::sqs::SqsSink;
use kinesis_deagg::sink::{Sink, SinkKind, SinkSettings};
use kinesis_deagg::testing::EventBuilder;
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::{Processor, Settings};

fn config(port: u16) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"),
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build()
}

fn s3(port: u16, command: &str, bucket: &str) -> String {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/e2e/moto_s3.py"))
        .args([command, &port.to_string(), bucket])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn settings(kind: SinkKind, target: &str) -> Settings {
    Settings {
        metrics: Switch::Off,
        sink: SinkSettings {
            kind,
            target: Some(target.into()),
            timeout_ms: 5_000,
            ..SinkSettings::default()
        },
        ..Settings::default()
    }
}

async fn accept(_: UserRecord, _: RecordContext) -> Result<(), Error> {
    Ok(())
}

async fn deliver<S: Sink + 'static>(
    sink: S,
    settings: Settings,
    event: &KinesisEvent,
) -> BatchOutcome {
    Processor::with_sink(accept, sink, settings)
        .handle(event, None)
        .await
        .unwrap()
}

/// Plain records and aggregates, text and binary: `(partition key, data)` in order.
fn source() -> (KinesisEvent, Vec<(String, Vec<u8>)>) {
    let mut b = EventBuilder::new();
    let mut users = Vec::new();
    for i in 0..40 {
        let per = 1 + i % 4;
        let records: Vec<(String, Vec<u8>)> = (0..per)
            .map(|j| {
                let key = format!("key-{}", (i + j) % 5);
                let data = match (i + j) % 7 {
                    // Bytes SQS does not take in a body, and a NUL.
                    0 => vec![0, 159, 146, 150, j as u8],
                    1 => format!("{{\"n\":{i},\"j\":{j}}}\n").into_bytes(),
                    _ => format!("{{\"n\":{i},\"j\":{j},\"s\":\"é😀\"}}").into_bytes(),
                };
                (key, data)
            })
            .collect();
        if per == 1 {
            b = b.plain(&records[0].0, &records[0].1);
        } else {
            let refs: Vec<(&str, &[u8])> =
                records.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
            b = b.aggregate(&refs);
        }
        users.extend(records);
    }
    (b.build(), users)
}

/// A Firehose stream `name` delivering into the moto S3 bucket `bucket`.
async fn firehose_into_s3(port: u16, name: &str, bucket: &str) -> aws_sdk_firehose::Client {
    s3(port, "create", bucket);
    let firehose = aws_sdk_firehose::Client::new(&config(port));
    firehose
        .create_delivery_stream()
        .delivery_stream_name(name)
        .extended_s3_destination_configuration(
            aws_sdk_firehose::types::ExtendedS3DestinationConfiguration::builder()
                .role_arn("arn:aws:iam::123456789012:role/firehose")
                .bucket_arn(format!("arn:aws:s3:::{bucket}"))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    firehose
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firehose_delivers_every_user_record_into_s3_one_line_each() {
    let server: Server = moto();
    let firehose = firehose_into_s3(server.port, "lines", "lake").await;
    let (event, users) = source();
    let mut settings = settings(
        SinkKind::Firehose,
        "arn:aws:firehose:us-east-1:123456789012:deliverystream/lines",
    );
    settings.sink.newline = Switch::On;
    // Small requests: several PutRecordBatch calls, several objects.
    settings.sink.max_request_bytes = Some(1_000);
    let sink = FirehoseSink::new(firehose, &settings.sink).unwrap();
    let outcome = deliver(sink, settings, &event).await;
    assert_eq!(outcome.failure, None);
    let stats = outcome.stats.sink.clone().unwrap();
    assert!(stats.requests > 1, "{stats:?}");

    let objects: Vec<String> = serde_json::from_str(&s3(server.port, "read", "lake")).unwrap();
    assert!(objects.len() > 1);
    // Each object is whole lines, one per user record, each ending with exactly one newline
    // (Firehose keeps no order across requests: lines are compared as a multiset).
    let mut lines = Vec::new();
    for o in objects {
        let data = STANDARD.decode(o).unwrap();
        assert!(data.ends_with(b"\n"));
        lines.extend(
            data[..data.len() - 1]
                .split(|b| *b == b'\n')
                .map(<[u8]>::to_vec),
        );
    }
    let mut want: Vec<Vec<u8>> = users
        .iter()
        .map(|(_, d)| d.strip_suffix(b"\n").unwrap_or(d).to_vec())
        .collect();
    lines.sort();
    want.sort();
    assert!(
        lines == want,
        "{} lines written, {} user records",
        lines.len(),
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firehose_reports_a_record_it_can_never_take() {
    let server = moto();
    let firehose = firehose_into_s3(server.port, "lines", "lake").await;
    let event = EventBuilder::new()
        .plain("a", b"small")
        .plain("b", &vec![b'x'; 1_000 * 1024 + 1])
        .plain("c", b"after")
        .build();
    let settings = settings(SinkKind::Firehose, "lines");
    let sink = FirehoseSink::new(firehose, &settings.sink).unwrap();
    let outcome = deliver(sink, settings, &event).await;
    // Over PutRecordBatch's 1,000 KiB, the second record is never sent: it is reported, and
    // what came before it was delivered.
    let failure = outcome.failure.expect("reported");
    assert_eq!(failure.index, 1, "{failure:?}");
    let objects: Vec<String> = serde_json::from_str(&s3(server.port, "read", "lake")).unwrap();
    let written: Vec<u8> = objects
        .iter()
        .flat_map(|o| STANDARD.decode(o).unwrap())
        .collect();
    assert!(written.starts_with(b"small"), "{written:?}");
    assert!(!written.windows(3).any(|w| w == b"xxx"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_firehose_stream_fails_the_batch_at_its_first_record() {
    let server = moto();
    let firehose = aws_sdk_firehose::Client::new(&config(server.port));
    let (event, _) = source();
    let settings = settings(SinkKind::Firehose, "nowhere");
    let sink = FirehoseSink::new(firehose, &settings.sink).unwrap();
    let failure = deliver(sink, settings, &event)
        .await
        .failure
        .expect("reported");
    assert_eq!(failure.index, 0);
    assert!(
        failure
            .reason
            .to_string()
            .contains("PutRecordBatch: ResourceNotFound"),
        "{}",
        failure.reason
    );
}

/// A stream named by its ARN: every call names it so (kinesalite takes no ARN; moto does).
#[cfg(feature = "sink-kinesis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_takes_the_streams_arn() {
    use aws_sdk_kinesis::types::ShardIteratorType;
    use kinesis_deagg::kpl::{Deaggregated, deaggregate};
    use kinesis_deagg::sink::kinesis::KinesisSink;

    let server = moto();
    let kinesis = aws_sdk_kinesis::Client::new(&config(server.port));
    let name = "by-arn";
    kinesis
        .create_stream()
        .stream_name(name)
        .shard_count(1)
        .send()
        .await
        .unwrap();
    let summary = kinesis
        .describe_stream_summary()
        .stream_name(name)
        .send()
        .await
        .unwrap();
    let arn = summary
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_string();
    let (event, users) = source();
    let settings = settings(SinkKind::Kinesis, &arn);
    let sink = KinesisSink::new(kinesis.clone(), &settings.sink).unwrap();
    let outcome = deliver(sink, settings, &event).await;
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);

    let iterator = kinesis
        .get_shard_iterator()
        .stream_name(name)
        .shard_id("shardId-000000000000")
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap();
    let page = kinesis
        .get_records()
        .shard_iterator(iterator.shard_iterator().unwrap())
        .send()
        .await
        .unwrap();
    let mut landed = Vec::new();
    for record in page.records() {
        match deaggregate(bytes::Bytes::copy_from_slice(record.data().as_ref())).unwrap() {
            Deaggregated::Aggregated(records) => landed.extend(
                records
                    .into_iter()
                    .map(|u| (u.partition_key().to_string(), u.data().to_vec())),
            ),
            other => panic!("not an aggregate: {other:?}"),
        }
    }
    assert_eq!(landed, users);
}

async fn receive_all(sqs: &aws_sdk_sqs::Client, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let page = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        if page.messages().is_empty() {
            return all;
        }
        for m in page.messages() {
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
        all.extend(page.messages().iter().cloned());
    }
}

/// A message's data: the body, or its base64 when the attribute says so.
fn data_of(m: &aws_sdk_sqs::types::Message) -> Vec<u8> {
    let body = m.body().unwrap();
    match m
        .message_attributes()
        .and_then(|a| a.get("content-transfer-encoding"))
        .and_then(|v| v.string_value())
    {
        Some("base64") => STANDARD.decode(body).unwrap(),
        None => body.as_bytes().to_vec(),
        Some(other) => panic!("unknown encoding {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_queues_text_as_it_is_and_binary_in_base64() {
    let server = moto();
    let sqs = aws_sdk_sqs::Client::new(&config(server.port));
    let url = sqs
        .create_queue()
        .queue_name("plain")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let (event, users) = source();
    let settings = settings(SinkKind::Sqs, &url);
    let sink = SqsSink::new(sqs.clone(), &settings.sink).unwrap();
    let outcome = deliver(sink, settings, &event).await;
    assert_eq!(outcome.failure, None);
    assert!(outcome.stats.sink.unwrap().requests >= users.len() as u64 / 10);

    let messages = receive_all(&sqs, &url).await;
    let mut got: Vec<Vec<u8>> = messages.iter().map(data_of).collect();
    let mut want: Vec<Vec<u8>> = users.iter().map(|(_, d)| d.clone()).collect();
    // Text stays text: only the binary records are encoded.
    let encoded = messages
        .iter()
        .filter(|m| m.message_attributes().is_some_and(|a| !a.is_empty()))
        .count();
    assert_eq!(encoded, want.iter().filter(|d| d[0] == 0).count());
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_queue_keeps_each_partition_keys_order_and_a_retried_batch_is_not_queued_twice() {
    let server = moto();
    let sqs = aws_sdk_sqs::Client::new(&config(server.port));
    let url = sqs
        .create_queue()
        .queue_name("ordered.fifo")
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let (event, users) = source();
    for _ in 0..2 {
        // The second time is Lambda's retry of the same batch.
        let settings = settings(SinkKind::Sqs, &url);
        let sink = SqsSink::new(sqs.clone(), &settings.sink).unwrap();
        assert_eq!(deliver(sink, settings, &event).await.failure, None);
    }
    let messages = receive_all(&sqs, &url).await;
    assert_eq!(messages.len(), users.len(), "the retry was deduplicated");

    // Each group's messages are its partition key's user records, in order; the
    // deduplication ids are the idempotency keys, all distinct.
    let mut per_group: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut ids = std::collections::BTreeSet::new();
    for m in &messages {
        let attributes = m.attributes().unwrap();
        let group = &attributes[&MessageSystemAttributeName::MessageGroupId];
        let id = &attributes[&MessageSystemAttributeName::MessageDeduplicationId];
        assert!(id.starts_with("4959"), "{id}");
        assert!(ids.insert(id.clone()), "{id} twice");
        per_group.entry(group.clone()).or_default().push(data_of(m));
    }
    let mut want: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (key, data) in users {
        want.entry(key).or_default().push(data);
    }
    assert_eq!(per_group, want);
}

/// `n` Kinesis records of text user records (`r<i>.<j>`), plain and aggregated, and each
/// user record's data by Kinesis record.
fn text_source(n: usize) -> (KinesisEvent, Vec<Vec<String>>) {
    let mut b = EventBuilder::new();
    let mut records = Vec::new();
    for i in 0..n {
        let users: Vec<(String, String)> = (0..1 + i % 4)
            .map(|j| (format!("key-{}", (i + j) % 5), format!("r{i}.{j}")))
            .collect();
        let refs: Vec<(&str, &[u8])> = users
            .iter()
            .map(|(k, d)| (k.as_str(), d.as_bytes()))
            .collect();
        b = if refs.len() == 1 {
            b.plain(refs[0].0, refs[0].1)
        } else {
            b.aggregate(&refs)
        };
        records.push(users.into_iter().map(|(_, d)| d).collect());
    }
    (b.build(), records)
}

/// The first Kinesis record with a user record that did not arrive.
fn first_missing(records: &[Vec<String>], arrived: &[String]) -> Option<usize> {
    let arrived: std::collections::BTreeSet<&str> = arrived.iter().map(String::as_str).collect();
    records
        .iter()
        .position(|users| users.iter().any(|u| !arrived.contains(u.as_str())))
}

/// Delivers `text_source(60)` to `kind` through the fault proxy with `plan`, trying each entry
/// `attempts` times; checks that the reported record is exactly the first one missing at the
/// destination, and returns whether one was reported.
async fn through_faults(kind: SinkKind, plan: &str, attempts: u32) -> bool {
    let server = moto();
    let faults = proxy(&server, plan);
    let (event, records) = text_source(60);
    let direct = config(server.port);
    let faulty = config(faults.port);
    let mut settings = settings(kind, "");
    settings.sink.max_attempts = attempts;
    settings.sink.timeout_ms = 1_000;
    let (outcome, arrived) = match kind {
        SinkKind::Firehose => {
            firehose_into_s3(server.port, "lines", "lake").await;
            settings.sink.target = Some("lines".into());
            settings.sink.newline = Switch::On;
            let sink = FirehoseSink::new(aws_sdk_firehose::Client::new(&faulty), &settings.sink);
            let outcome = deliver(sink.unwrap(), settings, &event).await;
            let objects: Vec<String> =
                serde_json::from_str(&s3(server.port, "read", "lake")).unwrap();
            let mut lines = Vec::new();
            for o in objects {
                let text = String::from_utf8(STANDARD.decode(o).unwrap()).unwrap();
                lines.extend(text.lines().map(str::to_string));
            }
            (outcome, lines)
        }
        _ => {
            let sqs = aws_sdk_sqs::Client::new(&direct);
            let url = sqs.create_queue().queue_name("q").send().await.unwrap();
            settings.sink.target = url.queue_url().map(str::to_string);
            let sink = SqsSink::new(aws_sdk_sqs::Client::new(&faulty), &settings.sink);
            let outcome = deliver(sink.unwrap(), settings, &event).await;
            let url = url.queue_url().unwrap();
            let bodies = receive_all(&sqs, url).await;
            (
                outcome,
                bodies
                    .iter()
                    .map(|m| m.body().unwrap().to_string())
                    .collect(),
            )
        }
    };
    let reported = outcome.failure.as_ref().map(|f| f.index);
    assert_eq!(
        reported,
        first_missing(&records, &arrived),
        "{:?}",
        outcome.failure
    );
    reported.is_some()
}

const RECOVERABLE: &str = r#"{"seed": 3, "entry_throttle": 0.3, "request_throttle": 0.1,
    "server_error": 0.1, "reset": 0.05, "delay": 0.05, "delay_ms": 1500}"#;
const HOPELESS: &str = r#"{"seed": 5, "entry_throttle": 0.6, "request_throttle": 0.1,
    "server_error": 0.1, "reset": 0.05}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firehose_entries_refused_in_its_own_shape_are_retried_and_the_report_is_exact() {
    assert!(!through_faults(SinkKind::Firehose, RECOVERABLE, 20).await);
    assert!(through_faults(SinkKind::Firehose, HOPELESS, 2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_messages_failed_in_its_own_shape_are_retried_and_the_report_is_exact() {
    assert!(!through_faults(SinkKind::Sqs, RECOVERABLE, 20).await);
    assert!(through_faults(SinkKind::Sqs, HOPELESS, 2).await);
}
