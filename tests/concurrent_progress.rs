//! The concurrent mode moves the checkpoint at least as fast as the ordered mode: modelled
//! as Lambda's event source mapping retries a batch (each retry starts at the reported
//! record), every invocation advances the checkpoint, and the batch is done in no more
//! invocations than the ordered mode needs.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use kinesis_deagg::Settings;
use kinesis_deagg::batch::{self, Mode};
use kinesis_deagg::event::EventRecord;
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::transform::{Error, RecordContext};

/// 10 KPL aggregates, each with one user record for each of `keys` partition keys (as KPL
/// aggregates of many keys are).
fn batch_of(keys: usize) -> Vec<EventRecord> {
    let names: Vec<String> = (0..keys).map(|k| format!("key-{k}")).collect();
    let records = (0..10)
        .map(|i| {
            let users: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
            aggregate(&format!("{:04}", i), &users)
        })
        .collect();
    event(records).records
}

#[derive(Clone, Copy, Debug)]
enum Cost {
    /// Busy for this long without yielding (CPU work, or a blocking call), on tokio's paused
    /// clock: the time passes, exactly, whatever else the machine is doing.
    Blocking(Duration),
    /// Awaits a timer this long.
    Async(Duration),
}

/// The retries of one batch: the checkpoint (index into the batch) after each invocation, and
/// the most transform calls that were in flight at once.
async fn retries(keys: usize, mode: Mode, cost: Cost, budget: Duration) -> (Vec<usize>, usize) {
    let records = batch_of(keys);
    let settings = Settings {
        mode,
        concurrency: 8,
        // Below half the time left, so it is not shrunk: the budget is what is left.
        deadline_margin_ms: 50,
        ..Settings::default()
    };
    let (in_flight, most) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
    let transform = |_: UserRecord, _: RecordContext| {
        let (in_flight, most) = (in_flight.clone(), most.clone());
        async move {
            in_flight.set(in_flight.get() + 1);
            most.set(most.get().max(in_flight.get()));
            match cost {
                Cost::Blocking(d) => {
                    // `advance` moves the clock on its first poll, before its one yield,
                    // which is dropped here: the call takes `d` and never yields.
                    let mut advance = std::pin::pin!(tokio::time::advance(d));
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    let _ = advance.as_mut().poll(&mut cx);
                }
                Cost::Async(d) => tokio::time::sleep(d).await,
            }
            in_flight.set(in_flight.get() - 1);
            Ok::<(), Error>(())
        }
    };
    let (mut start, mut checkpoints) = (0, Vec::new());
    while start < records.len() {
        assert!(checkpoints.len() < 50, "no end in sight: {checkpoints:?}");
        let deadline = tokio::time::Instant::now().into_std() + budget + settings.deadline_margin();
        let outcome =
            batch::process(&records[start..], &transform, &settings, Some(deadline)).await;
        start += outcome.failure.map_or(records.len() - start, |f| f.index);
        checkpoints.push(start);
    }
    (checkpoints, most.get())
}

fn assert_progress(keys: usize, cost: Cost, budget: Duration) -> (Vec<usize>, Vec<usize>, usize) {
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let (ordered, _) = rt().block_on(retries(keys, Mode::Ordered, cost, budget));
    let (concurrent, most) = rt().block_on(retries(keys, Mode::Concurrent, cost, budget));
    for w in concurrent.windows(2) {
        assert!(
            w[0] < w[1],
            "{keys} keys, {cost:?}: the checkpoint stood still: {concurrent:?}"
        );
    }
    assert!(
        concurrent[0] > 0,
        "{keys} keys, {cost:?}: the first invocation made no progress"
    );
    assert!(
        concurrent.len() <= ordered.len(),
        "{keys} keys, {cost:?}: concurrent took {concurrent:?}, ordered {ordered:?}"
    );
    (ordered, concurrent, most)
}

// Budgets of one call fewer than the next aggregate needs.

#[test]
fn with_a_blocking_transform_the_checkpoint_moves_every_invocation_for_20_keys() {
    // 39 calls of 5 ms fit; one aggregate needs 20.
    let budget = Duration::from_millis(195);
    let (ordered, concurrent, most) =
        assert_progress(20, Cost::Blocking(Duration::from_millis(5)), budget);
    // A transform that never waits runs in batch order either way, one call at a time: one
    // aggregate per retry.
    assert_eq!(ordered, (1..=10).collect::<Vec<_>>());
    assert_eq!(concurrent, ordered);
    assert_eq!(most, 1);
}

#[test]
fn with_a_blocking_transform_the_checkpoint_moves_every_invocation_for_8_keys() {
    // 23 calls of 5 ms fit; two aggregates need 16.
    let budget = Duration::from_millis(115);
    let (ordered, concurrent, most) =
        assert_progress(8, Cost::Blocking(Duration::from_millis(5)), budget);
    assert_eq!(ordered, [2, 4, 6, 8, 10]);
    assert_eq!(concurrent, ordered);
    assert_eq!(most, 1);
}

#[test]
fn with_an_async_transform_keys_run_side_by_side_for_20_keys() {
    // 600 ms of 30 ms calls: 20 in order (one aggregate per invocation), 160 concurrently.
    // (One lane per key over the whole batch never let keys 16 to 19 start: aggregate 0
    // was reported every time.)
    let budget = Duration::from_millis(600);
    let (ordered, concurrent, most) =
        assert_progress(20, Cost::Async(Duration::from_millis(30)), budget);
    assert_eq!(ordered, (1..=10).collect::<Vec<_>>());
    assert_eq!(concurrent, [8, 10]);
    assert_eq!(most, 8);
}

#[test]
fn with_an_async_transform_keys_run_side_by_side_for_8_keys() {
    let budget = Duration::from_millis(600);
    let (ordered, concurrent, most) =
        assert_progress(8, Cost::Async(Duration::from_millis(40)), budget);
    // 15 calls of 40 ms in order: one aggregate per invocation (10 in all).
    assert_eq!(ordered.len(), 10, "{ordered:?}");
    // 8 at a time: 15 aggregates' worth per invocation.
    assert_eq!(concurrent, [10]);
    assert_eq!(most, 8);
}

/// With 64 workers the concurrent mode looks 64 × 32 user records ahead: the other keys
/// behind 400 user records of one hot key start at once instead of waiting for it.
#[test]
fn the_lookahead_grows_with_the_workers_past_a_hot_key() {
    let mut records: Vec<_> = (0..400)
        .map(|i| plain(&format!("{i:04}"), "hot", b"x"))
        .collect();
    records.extend((0..63).map(|k| plain(&format!("{:04}", 400 + k), &format!("cold-{k}"), b"x")));
    let records = event(records).records;
    let settings = Settings {
        mode: Mode::Concurrent,
        concurrency: 64,
        ..Settings::default()
    };
    let started: Rc<std::cell::RefCell<Vec<(String, Duration)>>> = Rc::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let begin = rt.block_on(async { tokio::time::Instant::now() });
    let transform = |record: UserRecord, _: RecordContext| {
        let started = started.clone();
        async move {
            let at = tokio::time::Instant::now() - begin;
            started
                .borrow_mut()
                .push((record.partition_key().to_owned(), at));
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<(), Error>(())
        }
    };
    let outcome = rt.block_on(batch::process(&records, &transform, &settings, None));
    assert!(outcome.failure.is_none());
    let started = started.borrow();
    let last_cold = started
        .iter()
        .filter(|(key, _)| key.starts_with("cold"))
        .map(|(_, at)| *at)
        .max()
        .unwrap();
    // Before the hot key's second user record (10 ms).
    assert!(last_cold < Duration::from_millis(10), "{last_cold:?}");
    assert_eq!(started.len(), 463);
}
