//! The end-to-end suite's Lambda function (tests/e2e/): a transform that fails, panics and
//! sleeps past the deadline on purpose, and logs every success.
//!
//! Environment: `E2E_LOG` (file to append one JSON line per successful user record to),
//! `E2E_FAIL_PER_MILLE` (user records that fail on their first one or two attempts),
//! `E2E_PANIC_PER_MILLE` (panic on their first attempt), `E2E_SLEEP_PER_MILLE` and
//! `E2E_SLEEP_MS` (sleep on their first attempt), `E2E_WORK_US` (time every user record takes,
//! so that a batch lasts long enough to be killed in its middle). A user record whose data contains
//! `"poison":true` fails every time. Which records misbehave is decided by a hash of their
//! idempotency key, so runs are repeatable; attempts are counted in memory, so a killed
//! process forgets them (and its records may fail again, as after a real cold start).
//!
//! With `E2E_WINDOW_LOG` set, a tumbling window counts how often each user record (by the
//! `"i"` in its data) is in the state, and appends the counts to that file when it closes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::window::{Window, WindowEnd};
use kinesis_deagg::{Processor, Settings};

/// A numeric setting from the environment, 0 when absent.
fn per_mille(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// FNV-1a: a stable hash, the same in every process.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn attempt(key: &str) -> u64 {
    static ATTEMPTS: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    let mut attempts = ATTEMPTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let n = attempts.entry(key.to_owned()).or_default();
    *n += 1;
    *n
}

async fn faulty(record: UserRecord, ctx: RecordContext) -> Result<(), Error> {
    let key = ctx.idempotency_key();
    // Blocking on purpose: this stands for CPU work.
    std::thread::sleep(Duration::from_micros(per_mille("E2E_WORK_US")));
    let text = String::from_utf8_lossy(record.data());
    if text.contains("\"poison\":true") {
        return Err(format!("{key} is poison").into());
    }
    let (hash, attempt) = (fnv(&key), attempt(&key));
    let roll = hash % 1000;
    let (fail, panic, sleep) = (
        per_mille("E2E_FAIL_PER_MILLE"),
        per_mille("E2E_PANIC_PER_MILLE"),
        per_mille("E2E_SLEEP_PER_MILLE"),
    );
    if roll < fail && attempt <= 1 + (hash >> 20) % 2 {
        return Err(format!("{key}: injected failure, attempt {attempt}").into());
    }
    if (fail..fail + panic).contains(&roll) && attempt == 1 {
        panic!("{key}: injected panic");
    }
    if (fail + panic..fail + panic + sleep).contains(&roll) && attempt == 1 {
        tokio::time::sleep(Duration::from_millis(per_mille("E2E_SLEEP_MS"))).await;
    }
    static LOG: OnceLock<Mutex<File>> = OnceLock::new();
    let line = serde_json::json!({
        "shard": ctx.shard_id(), "seq": ctx.sequence_number(),
        "sub": ctx.sub_sequence_number(), "data": text,
    });
    append(&LOG, "E2E_LOG", &line)
}

/// Appends a JSON line to the file named by `var`: one write per line, on a file opened for
/// appending, so lines stay whole.
fn append(file: &OnceLock<Mutex<File>>, var: &str, line: &serde_json::Value) -> Result<(), Error> {
    let file = file.get_or_init(|| {
        let path = std::env::var(var).unwrap_or_else(|_| panic!("{var} names a log file"));
        Mutex::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open {var}: {e}")),
        )
    });
    file.lock()
        .unwrap_or_else(|p| p.into_inner())
        .write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Counts each user record's `"i"` in the window's state.
struct Seen;

impl Window for Seen {
    type State = BTreeMap<String, u64>;

    fn update(&self, state: &mut Self::State, record: &UserRecord, _: &RecordContext) {
        let i = serde_json::from_slice::<serde_json::Value>(record.data())
            .ok()
            .and_then(|v| v["i"].as_u64());
        *state
            .entry(i.map_or_else(|| "not an e2e record".into(), |i| i.to_string()))
            .or_default() += 1;
    }

    async fn close(&self, state: Self::State, end: &WindowEnd) -> Result<(), Error> {
        static LOG: OnceLock<Mutex<File>> = OnceLock::new();
        let line = serde_json::json!({
            "shard": end.shard_id(), "start": end.start(), "end": end.end(),
            "terminatedEarly": end.terminated_early(), "cutBySize": end.cut_by_size(),
            "counts": state,
        });
        append(&LOG, "E2E_WINDOW_LOG", &line)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let processor = Processor::new(faulty, Settings::from_env()?);
    if std::env::var_os("E2E_WINDOW_LOG").is_some() {
        return kinesis_deagg::run(processor.with_window(Seen)).await;
    }
    kinesis_deagg::run(processor).await
}
