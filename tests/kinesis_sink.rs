//! The Kinesis sink against kinesalite, started here on 127.0.0.1, with the fault proxy
//! (`tests/e2e/fault_proxy.py`) in front of it: what lands in the destination stream, read
//! back with `GetRecords`, deaggregates (here and with the official Python and Node modules)
//! to what the batch held; each aggregate holds only user records of the shard it is on; and
//! under every fault, the reported record is the first with a user record missing at the
//! destination.
#![cfg(feature = "sink-kinesis")]

mod common;

use common::servers::{kinesalite, proxy, root};
use common::user_records_in;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::ShardIteratorType;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use kinesis_deagg::batch::{BatchOutcome, Mode};
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Deaggregated, UserRecord, deaggregate, effective_hash_key};
use kinesis_deagg::settings::Switch;
use kinesis_deagg::sink::SinkSettings;
use kinesis_deagg::sink::kinesis::KinesisSink;
use kinesis_deagg::testing::EventBuilder;
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::{Processor, Settings};

fn client(port: u16) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(client, name).await;
}

/// Waits for `name` to be ACTIVE (after a create or a split).
async fn wait_active(client: &Client, name: &str) {
    for _ in 0..100 {
        let d = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        if d.stream_description_summary()
            .unwrap()
            .stream_status()
            .as_str()
            == "ACTIVE"
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("stream {name} never became active");
}

/// A record read back from the destination, with the shard it was read from.
struct Landed {
    shard: String,
    range: (u128, u128),
    partition_key: String,
    data: Bytes,
}

/// Every record of every shard (closed ones too), in shard order.
async fn read_all(client: &Client, stream: &str) -> Vec<Landed> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut landed = Vec::new();
    for shard in shards.shards() {
        let range = shard.hash_key_range().unwrap();
        let range = (
            range.starting_hash_key().parse().unwrap(),
            range.ending_hash_key().parse().unwrap(),
        );
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator
            .unwrap();
        loop {
            let page = client
                .get_records()
                .shard_iterator(&iterator)
                .send()
                .await
                .unwrap();
            for r in page.records() {
                landed.push(Landed {
                    shard: shard.shard_id().to_string(),
                    range,
                    partition_key: r.partition_key().to_string(),
                    data: Bytes::copy_from_slice(r.data().as_ref()),
                });
            }
            match page.next_shard_iterator() {
                Some(next) if !page.records().is_empty() => iterator = next.to_string(),
                _ => break,
            }
        }
    }
    landed
}

/// A user record as compared: partition key, explicit hash key, data.
type Key = (String, Option<String>, Vec<u8>);

fn key(u: &UserRecord) -> Key {
    (
        u.partition_key().to_string(),
        u.explicit_hash_key().map(str::to_string),
        u.data().to_vec(),
    )
}

/// The user records at the destination, each checked against the shard it was read from as
/// a KCL consumer checks it (one outside the shard would be dropped); and how many records
/// were aggregates.
fn user_records_of(landed: &[Landed]) -> (BTreeMap<Key, usize>, usize) {
    let mut users = BTreeMap::new();
    let mut aggregates = 0;
    for l in landed {
        match deaggregate(l.data.clone()).unwrap() {
            Deaggregated::Aggregated(records) => {
                aggregates += 1;
                for u in records {
                    let h = u.hash_key().unwrap();
                    assert!(
                        (l.range.0..=l.range.1).contains(&h),
                        "user record {:?} in an aggregate on {} hashes outside it",
                        u.partition_key(),
                        l.shard
                    );
                    *users.entry(key(&u)).or_default() += 1;
                }
            }
            Deaggregated::Plain(data) => {
                *users
                    .entry((l.partition_key.clone(), None, data.to_vec()))
                    .or_default() += 1;
            }
            Deaggregated::ChecksumMismatch(_) => panic!("a record with a wrong MD5"),
        }
    }
    (users, aggregates)
}

/// `n` Kinesis records: aggregates of 1..=6 user records (some with explicit hash keys), and
/// every fifth record plain; data unique per user record.
fn source(n: usize, tag: &str) -> (KinesisEvent, Vec<Vec<Key>>) {
    let mut b = EventBuilder::new();
    let mut keys = Vec::new();
    for i in 0..n {
        if i % 5 == 4 {
            let pk = format!("plain-{}", i % 7);
            let data = format!("{tag}-{i}");
            b = b.plain(&pk, data.as_bytes());
            keys.push(vec![(pk, None, data.into_bytes())]);
            continue;
        }
        let per = 1 + i % 6;
        let users: Vec<(String, Vec<u8>)> = (0..per)
            .map(|j| {
                (
                    format!("key-{}", (i * 7 + j) % 23),
                    format!("{tag}-{i}.{j}").into_bytes(),
                )
            })
            .collect();
        let refs: Vec<(&str, &[u8])> = users.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
        b = b.aggregate(&refs);
        keys.push(users.into_iter().map(|(k, d)| (k, None, d)).collect());
    }
    (b.build(), keys)
}

fn settings(stream: &str, mode: Mode) -> Settings {
    Settings {
        mode,
        metrics: Switch::Off,
        sink: SinkSettings {
            kind: kinesis_deagg::sink::SinkKind::Kinesis,
            target: Some(stream.into()),
            // Small aggregates and requests, so that a batch makes several of each.
            aggregate_max_bytes: 300,
            max_request_bytes: Some(1_000),
            timeout_ms: 2_000,
            ..SinkSettings::default()
        },
        ..Settings::default()
    }
}

async fn accept(_: UserRecord, _: RecordContext) -> Result<(), Error> {
    Ok(())
}

async fn deliver(
    port: u16,
    settings: Settings,
    event: &KinesisEvent,
    deadline: Option<Duration>,
) -> BatchOutcome {
    let sink = KinesisSink::new(client(port), &settings.sink).unwrap();
    let deadline = deadline.map(|d| std::time::Instant::now() + d);
    Processor::with_sink(accept, sink, settings)
        .handle(event, deadline)
        .await
        .unwrap()
}

/// The first source record with a user record missing at the destination.
fn first_missing(source: &[Vec<Key>], landed: &BTreeMap<Key, usize>) -> Option<usize> {
    source
        .iter()
        .position(|users| users.iter().any(|u| !landed.contains_key(u)))
}

#[tokio::test]
async fn user_records_are_reaggregated_per_destination_shard_and_all_arrive_once() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "dest", 4).await;
    let (event, keys) = source(60, "a");
    let outcome = deliver(server.port, settings("dest", Mode::Ordered), &event, None).await;
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let landed = read_all(&kinesis, "dest").await;
    let (users, aggregates) = user_records_of(&landed);
    let expected: BTreeMap<Key, usize> = keys.iter().flatten().map(|k| (k.clone(), 1)).collect();
    assert_eq!(users, expected);
    // Re-aggregated: far fewer records than user records, on every shard.
    let total: usize = keys.iter().map(Vec::len).sum();
    assert_eq!(aggregates, landed.len());
    assert!(
        landed.len() * 4 < total,
        "{} records for {total} user records",
        landed.len()
    );
    assert_eq!(
        landed
            .iter()
            .map(|l| &l.shard)
            .collect::<BTreeSet<_>>()
            .len(),
        4
    );
    let stats = outcome.stats.sink.unwrap();
    assert_eq!(stats.delivered_user_records, total as u64);
    assert!(stats.requests > 1, "{stats:?}");
}

#[tokio::test]
async fn plain_puts_keep_each_user_record_as_a_record() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "plain", 2).await;
    let (event, keys) = source(20, "p");
    let mut settings = settings("plain", Mode::Ordered);
    settings.sink.aggregate = Switch::Off;
    let outcome = deliver(server.port, settings, &event, None).await;
    assert!(outcome.failure.is_none());
    let landed = read_all(&kinesis, "plain").await;
    let total: usize = keys.iter().map(Vec::len).sum();
    assert_eq!(landed.len(), total);
    let (users, aggregates) = user_records_of(&landed);
    assert_eq!(aggregates, 0);
    assert_eq!(users.len(), total);
    // Each landed on the shard its partition key hashes to.
    for l in &landed {
        let h = effective_hash_key(&l.partition_key, None).unwrap();
        assert!((l.range.0..=l.range.1).contains(&h));
    }
}

#[tokio::test]
async fn the_official_deaggregators_read_the_aggregates_the_sink_wrote() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "official", 3).await;
    let (event, keys) = source(30, "o");
    assert!(
        deliver(
            server.port,
            settings("official", Mode::Concurrent),
            &event,
            None
        )
        .await
        .failure
        .is_none()
    );
    let landed = read_all(&kinesis, "official").await;
    // The destination's records as a Lambda event, for the drivers of tests/cross_compat.rs.
    let records: Vec<serde_json::Value> = landed
        .iter()
        .enumerate()
        .map(|(i, l)| {
            common::record(
                &format!("{i:04}"),
                &l.partition_key,
                &STANDARD.encode(&l.data),
            )
        })
        .collect();
    let event = common::event_json(records).to_string();
    let expected: BTreeSet<(String, Vec<u8>)> = keys
        .iter()
        .flatten()
        .map(|(k, _, d)| (k.clone(), d.clone()))
        .collect();
    for (program, script) in [
        (
            root().join(".venv/bin/python").display().to_string(),
            "python_compat.py",
        ),
        ("node".to_string(), "node_compat.js"),
    ] {
        let out = std::process::Command::new(&program)
            .arg(root().join("tests/compat").join(script))
            .arg("deaggregate")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(event.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "{script}");
        let theirs: BTreeSet<(String, Vec<u8>)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["partitionKey"].as_str().unwrap().to_string(),
                    STANDARD.decode(v["data"].as_str().unwrap()).unwrap(),
                )
            })
            .collect();
        assert_eq!(theirs, expected, "{script}");
    }
}

/// Delivers through the fault proxy with `plan`; checks that the reported record is the first
/// with a user record missing at the destination (at most that, when the plan delays
/// responses: a late answer's records landed, unknown to the sink).
async fn under_faults(plan: &str, mode: Mode, exact: bool) -> (BatchOutcome, usize) {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "faults", 3).await;
    let faulty = proxy(&server, plan);
    let (event, keys) = source(50, "f");
    let outcome = deliver(
        faulty.port,
        settings("faults", mode),
        &event,
        Some(Duration::from_secs(20)),
    )
    .await;
    let landed = read_all(&kinesis, "faults").await;
    let (users, _) = user_records_of(&landed);
    let missing = first_missing(&keys, &users);
    let reported = outcome.failure.as_ref().map(|f| f.index);
    if exact {
        assert_eq!(reported, missing, "{plan}: {:?}", outcome.failure);
    } else {
        // Nothing before the reported record is missing.
        assert!(
            missing.is_none() || reported.is_some_and(|r| r <= missing.unwrap()),
            "{plan}: reported {reported:?}, missing {missing:?}"
        );
    }
    let duplicates = users.values().map(|n| n - 1).sum();
    (outcome, duplicates)
}

#[tokio::test]
async fn throttled_entries_and_requests_are_retried_until_everything_lands() {
    for (seed, mode) in [(1, Mode::Ordered), (2, Mode::Concurrent)] {
        let plan = format!(
            r#"{{"seed":{seed},"entry_throttle":0.2,"request_throttle":0.1,"server_error":0.05,"reset":0.05}}"#
        );
        let (outcome, _) = under_faults(&plan, mode, true).await;
        assert!(outcome.failure.is_none(), "{plan}: {:?}", outcome.failure);
        let stats = outcome.stats.sink.unwrap();
        assert!(
            stats.throttled_entries > 0 && stats.retried_entries > 0,
            "{stats:?}"
        );
    }
}

#[tokio::test]
async fn hopeless_throttling_reports_exactly_the_first_record_left_out() {
    // Most entries throttled every time: some are given up after 10 attempts.
    let (outcome, _) =
        under_faults(r#"{"seed":3,"entry_throttle":0.9}"#, Mode::Ordered, true).await;
    let failure = outcome.failure.expect("something was given up");
    assert!(
        failure
            .reason
            .to_string()
            .contains("ProvisionedThroughputExceededException"),
        "{}",
        failure.reason
    );
}

#[tokio::test]
async fn a_permanent_error_stops_at_once_at_the_first_undelivered_record() {
    let started = std::time::Instant::now();
    let (outcome, _) = under_faults(r#"{"permanent_after":1}"#, Mode::Ordered, true).await;
    let failure = outcome.failure.unwrap();
    assert!(
        failure
            .reason
            .to_string()
            .contains("ResourceNotFoundException"),
        "{}",
        failure.reason
    );
    assert_eq!(outcome.stats.sink.unwrap().requests, 2);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn late_answers_are_sent_again_and_nothing_before_the_report_is_missing() {
    let plan = r#"{"seed":4,"delay":0.3,"delay_ms":2500}"#;
    let (outcome, duplicates) = under_faults(plan, Mode::Ordered, false).await;
    // A request answered after the 2 s timeout was written, and sent again: duplicates.
    assert!(duplicates > 0 || outcome.failure.is_some(), "{outcome:?}");
}

#[tokio::test]
async fn a_stream_that_does_not_exist_is_a_permanent_error_naming_it() {
    let server = kinesalite();
    let (event, _) = source(5, "n");
    let outcome = deliver(
        server.port,
        settings("missing", Mode::Ordered),
        &event,
        None,
    )
    .await;
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.index, 0);
    assert!(
        failure
            .reason
            .to_string()
            .contains("ResourceNotFoundException"),
        "{}",
        failure.reason
    );
}

#[tokio::test]
async fn a_user_record_over_the_record_limit_is_reported_and_nothing_after_it_is_sent() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "big", 1).await;
    let big = vec![b'x'; 5_000];
    let event = EventBuilder::new()
        .plain("a", b"small")
        .plain("b", &big)
        .plain("c", b"after")
        .build();
    let mut settings = settings("big", Mode::Ordered);
    settings.sink.max_record_bytes = Some(4_096);
    let outcome = deliver(server.port, settings, &event, None).await;
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.index, 1);
    assert!(
        failure
            .reason
            .to_string()
            .contains("over the destination's limit"),
        "{}",
        failure.reason
    );
    let landed = read_all(&kinesis, "big").await;
    let (users, _) = user_records_of(&landed);
    assert_eq!(
        users.keys().map(|k| k.2.clone()).collect::<Vec<_>>(),
        [b"small".to_vec()]
    );
}

#[tokio::test]
async fn after_a_reshard_every_user_record_is_on_a_shard_a_kcl_consumer_keeps_it_on() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "reshard", 2).await;
    let settings = settings("reshard", Mode::Ordered);
    let sink = KinesisSink::new(client(server.port), &settings.sink).unwrap();
    let processor = Processor::with_sink(accept, sink, settings);
    let (first, _) = source(20, "before");
    assert!(
        processor
            .handle(&first, None)
            .await
            .unwrap()
            .failure
            .is_none()
    );
    // Split shard 0 in the middle of its range: the sink's map is now stale.
    let shards = kinesis
        .list_shards()
        .stream_name("reshard")
        .send()
        .await
        .unwrap();
    let shard0 = &shards.shards()[0];
    let range = shard0.hash_key_range().unwrap();
    let (start, end): (u128, u128) = (
        range.starting_hash_key().parse().unwrap(),
        range.ending_hash_key().parse().unwrap(),
    );
    kinesis
        .split_shard()
        .stream_name("reshard")
        .shard_to_split(shard0.shard_id())
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(&kinesis, "reshard").await;
    let (second, keys) = source(40, "after");
    let outcome = processor.handle(&second, None).await.unwrap();
    assert!(outcome.failure.is_none());
    // The aggregates built for the closed shard landed on its children and were put again.
    assert!(outcome.stats.sink.unwrap().retried_entries > 0);
    // Every user record of the second batch is in some record that a KCL consumer keeps it
    // in: on a shard whose range holds its hash key (user_records_of checks aggregates; a
    // misplaced aggregate was rebuilt and put again).
    let landed = read_all(&kinesis, "reshard").await;
    let mut kept = BTreeSet::new();
    for l in &landed {
        if let Ok(Deaggregated::Aggregated(records)) = deaggregate(l.data.clone()) {
            for u in records {
                if (l.range.0..=l.range.1).contains(&u.hash_key().unwrap()) {
                    kept.insert(key(&u));
                }
            }
        } else {
            kept.insert((l.partition_key.clone(), None, l.data.to_vec()));
        }
    }
    for k in keys.iter().flatten() {
        assert!(
            kept.contains(k),
            "{k:?} is only in aggregates a KCL consumer drops"
        );
    }
}

/// Emits the number of user records the window counted, keyed by its shard.
struct Total;

impl kinesis_deagg::window::Window for Total {
    type State = BTreeMap<String, u64>;
    fn update(&self, state: &mut Self::State, _: &UserRecord, _: &RecordContext) {
        *state.entry("userRecords".into()).or_default() += 1;
    }
    async fn close(
        &self,
        state: Self::State,
        end: &kinesis_deagg::window::WindowEnd,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(&state)?;
        end.emit(UserRecord::plain(
            end.shard_id().unwrap(),
            None,
            body.into(),
        ))
    }
}

#[tokio::test]
async fn a_windows_result_emitted_at_its_final_invocation_lands_in_the_stream() {
    let server = kinesalite();
    let kinesis = client(server.port);
    create_stream(&kinesis, "results", 1).await;
    let mut settings = settings("results", Mode::Ordered);
    settings.sink.aggregate = Switch::Off;
    let sink = KinesisSink::new(client(server.port), &settings.sink).unwrap();
    let processor = Processor::with_sink(accept, sink, settings).with_window(Total);
    let mut window = kinesis_deagg::event::TumblingWindow::default();
    window.start = "2026-12-04T06:00:00Z".into();
    window.end = "2026-12-04T06:05:00Z".into();
    window.shard_id = Some("shardId-000000000007".into());
    window.state = serde_json::json!({"userRecords": 41});
    window.is_final_invoke_for_window = true;
    let (event, _) = source(3, "w");
    let event = KinesisEvent {
        records: event.records,
        window: Some(window),
    };
    let outcome = processor.handle(&event, None).await.unwrap();
    assert!(outcome.failure.is_none());
    let users = user_records_in(&event);
    let landed = read_all(&kinesis, "results").await;
    // The batch's own user records, then the result.
    assert_eq!(landed.len(), users + 1);
    let result = landed.last().unwrap();
    assert_eq!(result.partition_key, "shardId-000000000007");
    let body: serde_json::Value = serde_json::from_slice(&result.data).unwrap();
    assert_eq!(body, serde_json::json!({"userRecords": 41 + users}));
}
