//! Compatibility with the official deaggregation modules, installed by `make deps` into
//! `.venv` (Python `aws-kinesis-agg`) and `node_modules` (Node `aws-kinesis-agg`): their
//! aggregates deaggregate correctly here, and ours deaggregate correctly there.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{Aggregator, Deaggregated, UserRecord, deaggregate, effective_hash_key};
use serde_json::{Value, json};

/// A user record as the tests compare it: partition key, explicit hash key, data.
type User = (String, Option<String>, Vec<u8>);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `make deps` first",
        p.display()
    );
    p
}

fn node() -> PathBuf {
    assert!(
        root().join("node_modules/aws-kinesis-agg").exists(),
        "node_modules/aws-kinesis-agg is missing: run `make deps` first"
    );
    PathBuf::from("node")
}

/// Runs an official module's driver script and returns its JSON lines.
fn drive(program: PathBuf, script: &str, mode: &str, input: &str) -> Vec<Value> {
    let mut child = Command::new(&program)
        .arg(root().join("tests/compat").join(script))
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    // Write from another thread: the child writes while it reads, and both pipes are small.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{script} {mode} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A deterministic mix of user records: ASCII, unicode and long keys, empty, text and binary
/// data, with and without explicit hash keys. Keys never look like integers, because the Node
/// aggregator reorders such keys (it builds its key table with `Object.keys`), and are never
/// empty, because the Node aggregator refuses them.
fn users(n: usize) -> Vec<User> {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let pk = match i % 5 {
                0 => format!("user-{}", next() % 7),
                1 => format!("ключ-{}-été", next() % 3),
                2 => format!("k{}", "x".repeat(200 + i % 50)),
                _ => format!("device:{}", next() % 11),
            };
            let ehk = (i % 3 == 0).then(|| (u128::from(next()) * u128::from(next())).to_string());
            let data: Vec<u8> = match i % 4 {
                0 => Vec::new(),
                1 => format!("{{\"event\":{i},\"text\":\"héllo\"}}").into_bytes(),
                _ => (0..(next() % 3000) as usize)
                    .map(|_| next() as u8)
                    .collect(),
            };
            (pk, ehk, data)
        })
        .collect()
}

fn user_lines(users: &[User]) -> String {
    users
        .iter()
        .map(|(pk, ehk, data)| {
            json!({"partitionKey": pk, "explicitHashKey": ehk, "data": STANDARD.encode(data)})
                .to_string()
                + "\n"
        })
        .collect()
}

/// Their Kinesis records (JSON lines) as a Lambda event, and what we make of it.
fn ours_from(kinesis_records: &[Value]) -> Vec<User> {
    let records = kinesis_records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            common::record(
                &format!("{i}"),
                r["partitionKey"].as_str().unwrap(),
                r["data"].as_str().unwrap(),
            )
        })
        .collect();
    let event: KinesisEvent = common::event(records);
    let mut out = Vec::new();
    for record in &event.records {
        let Ok(Deaggregated::Aggregated(users)) = deaggregate(record.decode_data().unwrap()) else {
            panic!(
                "record {} is not a verified aggregate",
                record.sequence_number
            )
        };
        let users: Vec<_> = users.collect();
        out.extend(users.into_iter().map(|u| {
            (
                u.partition_key().to_owned(),
                u.explicit_hash_key().map(str::to_owned),
                u.data().to_vec(),
            )
        }));
    }
    out
}

#[test]
fn python_aggregates_deaggregate_to_the_same_user_records_here() {
    // Enough data (about 1.5 MB) for the 1 MiB limit to split it.
    let input = users(1500);
    let records = drive(
        python(),
        "python_compat.py",
        "aggregate",
        &user_lines(&input),
    );
    assert!(records.len() > 1, "expected several aggregates");
    assert_eq!(ours_from(&records), input);
}

#[test]
fn node_aggregates_deaggregate_to_the_same_user_records_here() {
    let input = users(1500);
    let records = drive(node(), "node_compat.js", "aggregate", &user_lines(&input));
    assert!(records.len() > 1, "expected several aggregates");
    assert_eq!(ours_from(&records), input);
}

/// Our aggregates of `input` as a Lambda event, and the sequence numbers used.
fn our_event(input: &[User], limit: usize) -> String {
    let mut agg = Aggregator::with_max_size(limit).unwrap();
    let mut finished = Vec::new();
    for (pk, ehk, data) in input {
        finished.extend(agg.add(pk, ehk.as_deref(), data).unwrap());
    }
    finished.extend(agg.finish());
    assert!(finished.len() > 1, "expected several aggregates");
    let records = finished
        .iter()
        .enumerate()
        .map(|(i, r)| {
            common::record(
                &format!("{}", 1000 + i),
                &r.partition_key,
                &STANDARD.encode(&r.data),
            )
        })
        .collect();
    common::event_json(records).to_string()
}

/// Compares an official deaggregator's output with what went in. Explicit hash keys are
/// compared only where the user record has one: both official modules give a record without
/// one the table's entry 0, a bug we check separately.
fn assert_same(theirs: &[Value], input: &[User]) {
    assert_eq!(theirs.len(), input.len());
    let mut subs = std::collections::HashMap::<&str, u64>::new();
    for (t, (pk, ehk, data)) in theirs.iter().zip(input) {
        assert_eq!(t["partitionKey"].as_str().unwrap(), pk);
        assert_eq!(STANDARD.decode(t["data"].as_str().unwrap()).unwrap(), *data);
        if let Some(ehk) = ehk {
            assert_eq!(t["explicitHashKey"].as_str(), Some(ehk.as_str()));
        }
        let seq = t["sequenceNumber"].as_str().unwrap();
        let expected_sub = subs.entry(seq).or_default();
        assert_eq!(t["subSequenceNumber"].as_u64(), Some(*expected_sub));
        *expected_sub += 1;
    }
}

#[test]
fn our_aggregates_deaggregate_correctly_in_python() {
    let input = users(300);
    let theirs = drive(
        python(),
        "python_compat.py",
        "deaggregate",
        &our_event(&input, 64 * 1024),
    );
    assert_same(&theirs, &input);
}

#[test]
fn our_aggregates_deaggregate_correctly_in_node() {
    let input = users(300);
    let theirs = drive(
        node(),
        "node_compat.js",
        "deaggregate",
        &our_event(&input, 64 * 1024),
    );
    assert_same(&theirs, &input);
}

#[test]
fn the_official_modules_misreport_a_missing_explicit_hash_key_and_we_do_not() {
    let input: Vec<User> = vec![
        ("with".into(), Some("12345".into()), b"a".to_vec()),
        ("without".into(), None, b"b".to_vec()),
        ("with-too".into(), Some("777".into()), b"c".to_vec()),
    ];
    let mut agg = Aggregator::new();
    for (pk, ehk, data) in &input {
        agg.add(pk, ehk.as_deref(), data).unwrap();
    }
    let r = agg.finish().unwrap();
    let event = common::event_json(vec![common::record(
        "1",
        &r.partition_key,
        &STANDARD.encode(&r.data),
    )])
    .to_string();
    for theirs in [
        drive(python(), "python_compat.py", "deaggregate", &event),
        drive(node(), "node_compat.js", "deaggregate", &event),
    ] {
        assert_eq!(
            theirs[1]["explicitHashKey"], "12345",
            "their entry-0 bug is gone: update the README"
        );
    }
    let Ok(Deaggregated::Aggregated(ours)) = deaggregate(r.data) else {
        panic!()
    };
    let ours: Vec<_> = ours.collect();
    assert_eq!(ours[1].explicit_hash_key(), None);
}

/// Partition keys of every kind (ASCII, unicode, long, integer-like), each without an explicit
/// hash key and with one of several sizes (0, 1, 2^127, 2^128 - 1, others). Never an empty partition key:
/// the Node aggregator refuses them (the empty key's MD5 is checked in the unit tests).
fn hash_key_cases() -> Vec<(String, Option<String>)> {
    let mut keys: Vec<String> = (0..400)
        .map(|i| match i % 5 {
            0 => format!("user-{i}"),
            1 => format!("ключ-{i}-été"),
            2 => format!("k{i}{}", "x".repeat(i % 250)),
            3 => format!("device:{}", i * 7919),
            _ => format!("{i}"),
        })
        .collect();
    keys.extend(
        [
            "a",
            "0",
            "42",
            " ",
            "\u{0}",
            "日本語のキー",
            "emoji-🦀",
            "tab\tkey",
        ]
        .map(String::from),
    );
    keys.push("z".repeat(256));
    keys.sort();
    keys.dedup();
    let mut cases: Vec<_> = keys.iter().map(|k| (k.clone(), None)).collect();
    let explicit = [
        "0".to_owned(),
        "1".to_owned(),
        "170141183460469231731687303715884105728".to_owned(),
        u128::MAX.to_string(),
    ];
    for (i, k) in keys.iter().enumerate().step_by(7) {
        let ehk = match explicit.get(i % 11) {
            Some(e) => e.clone(),
            None => {
                ((u128::from(i as u64 + 1) * 0x1234_5678_9ABC_DEF1_u128) << (i % 60)).to_string()
            }
        };
        cases.push((k.clone(), Some(ehk)));
    }
    cases
}

fn theirs_hash_keys(
    program: PathBuf,
    script: &str,
    cases: &[(String, Option<String>)],
) -> Vec<String> {
    let input: String = cases
        .iter()
        .map(|(pk, ehk)| json!({"partitionKey": pk, "explicitHashKey": ehk}).to_string() + "\n")
        .collect();
    drive(program, script, "hashkey", &input)
        .iter()
        .map(|v| v["hashKey"].as_str().unwrap().to_owned())
        .collect()
}

/// The hash key that decides the shard, for many keys with and without an explicit one: ours
/// (the function, a plain user record's, a deaggregated user record's) is what the official
/// Python and Node modules send Kinesis.
#[test]
fn the_effective_hash_key_is_the_official_modules() {
    let cases = hash_key_cases();
    assert!(cases.len() > 300 && cases.iter().filter(|(_, e)| e.is_some()).count() > 40);
    let ours: Vec<String> = cases
        .iter()
        .map(|(pk, ehk)| effective_hash_key(pk, ehk.as_deref()).unwrap().to_string())
        .collect();
    let plain: Vec<String> = cases
        .iter()
        .map(|(pk, ehk)| {
            UserRecord::plain(pk, ehk.as_deref(), "x".into())
                .hash_key()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(plain, ours);
    let mut agg = Aggregator::new();
    let mut aggregates = Vec::new();
    for (pk, ehk) in &cases {
        aggregates.extend(agg.add(pk, ehk.as_deref(), b"x").unwrap());
    }
    aggregates.extend(agg.finish());
    let mut deaggregated = Vec::new();
    for a in aggregates {
        let Ok(Deaggregated::Aggregated(users)) = deaggregate(a.data) else {
            panic!("not an aggregate")
        };
        deaggregated.extend(users.map(|u| u.hash_key().unwrap().to_string()));
    }
    assert_eq!(deaggregated, ours);
    assert_eq!(theirs_hash_keys(python(), "python_compat.py", &cases), ours);
    assert_eq!(theirs_hash_keys(node(), "node_compat.js", &cases), ours);
}
