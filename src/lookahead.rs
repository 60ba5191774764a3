//! The concurrent mode's scheduler: a window of look-ahead over the user records of a batch,
//! in batch order, from which workers take the earliest record whose key is free.
//!
//! Lambda checkpoints at the first Kinesis record not fully processed, so what counts is how
//! fast the completed prefix of the batch grows, not how much is done overall. The window
//! gives both:
//!
//! - a user record is started only when every earlier record of its key has finished (order
//!   within a key), and among the records that may start, the earliest goes first;
//! - no record more than [`Lookahead::span`] positions after the earliest unfinished one is
//!   started, so work never runs far ahead of the checkpoint (what runs ahead is done again
//!   on a retry) and the window's memory is bounded whatever the batch holds;
//! - a transform that never waits runs the records one after another in batch order, exactly
//!   as the ordered mode would; one that waits has up to `concurrency` keys in flight.
//!
//! Keys are told apart by a 64-bit hash: two keys that collide share a lane, which only
//! serialises them (each stays in order).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::task::{Context, Poll, Waker};

/// A record in the window.
struct Slot<T> {
    /// Taken when the record starts.
    item: Option<T>,
    key: u64,
    /// The next waiting record of the same key.
    next: Option<usize>,
    done: bool,
}

/// The records of one key that are in the window and not finished.
#[derive(Default)]
struct Lane {
    /// One of its records is running.
    busy: bool,
    /// Its first and last waiting records.
    head: Option<usize>,
    tail: Option<usize>,
}

/// What a worker gets from [`Lookahead::take`].
pub(crate) enum Next<T> {
    /// A record to run, with its position (give it back to [`Lookahead::finish`]).
    Run(usize, T),
    /// Nothing is left to run.
    Done,
}

/// See the module docs. `I` yields each record with its key.
pub(crate) struct Lookahead<T, I> {
    items: I,
    /// No more records will be pulled.
    exhausted: bool,
    /// Position `p` lives in `slots[p % span]`.
    slots: Box<[Option<Slot<T>>]>,
    /// The earliest unfinished position and the next to pull.
    start: usize,
    end: usize,
    lanes: HashMap<u64, Lane>,
    /// Lane heads that may start (their lane is not busy), earliest first.
    ready: BinaryHeap<Reverse<usize>>,
    /// Workers waiting for a record, by worker.
    waiting: Vec<Option<Waker>>,
    hasher: RandomState,
}

/// A record with a key: records of one key run one at a time, in order.
pub(crate) trait Keyed {
    fn key(&self) -> &[u8];
}

impl<T: Keyed, I: Iterator<Item = T>> Lookahead<T, I> {
    /// A window of `span` positions over `items`, for `workers` workers.
    pub(crate) fn new(items: I, span: usize, workers: usize) -> Self {
        let span = span.max(1);
        Lookahead {
            items,
            exhausted: false,
            slots: std::iter::repeat_with(|| None).take(span).collect(),
            start: 0,
            end: 0,
            lanes: HashMap::new(),
            ready: BinaryHeap::with_capacity(span),
            waiting: vec![None; workers],
            hasher: RandomState::new(),
        }
    }

    fn span(&self) -> usize {
        self.slots.len()
    }

    fn slot(&mut self, pos: usize) -> &mut Slot<T> {
        let span = self.span();
        self.slots[pos % span]
            .as_mut()
            .expect("positions in the window have a slot")
    }

    /// Pulls the next record into the window, if there is one and `keep` keeps it (the first
    /// record refused ends the pulling: the records are in batch order).
    fn pull(&mut self, keep: impl Fn(&T) -> bool) {
        let Some(item) = self.items.next().filter(|item| keep(item)) else {
            self.exhausted = true;
            return;
        };
        let key = self.hasher.hash_one(item.key());
        let pos = self.end;
        self.end += 1;
        let span = self.span();
        self.slots[pos % span] = Some(Slot {
            item: Some(item),
            key,
            next: None,
            done: false,
        });
        let lane = self.lanes.entry(key).or_default();
        match lane.tail.replace(pos) {
            Some(tail) => self.slot(tail).next = Some(pos),
            None => {
                lane.head = Some(pos);
                if !lane.busy {
                    self.ready.push(Reverse(pos));
                }
            }
        }
    }

    /// The earliest record that may start and that `keep` keeps (the others are dropped as
    /// finished); `Poll::Pending` (worker `worker` woken later) while every record left waits
    /// for a running one.
    pub(crate) fn take(
        &mut self,
        worker: usize,
        keep: impl Fn(&T) -> bool + Copy,
        cx: &mut Context<'_>,
    ) -> Poll<Next<T>> {
        loop {
            if let Some(Reverse(pos)) = self.ready.pop() {
                let slot = self.slot(pos);
                let (key, next) = (slot.key, slot.next);
                let item = slot.item.take().expect("a ready record has not started");
                let lane = self.lanes.get_mut(&key).expect("a ready record has a lane");
                lane.busy = true;
                lane.head = next;
                if next.is_none() {
                    lane.tail = None;
                }
                if keep(&item) {
                    return Poll::Ready(Next::Run(pos, item));
                }
                self.finish(pos);
            } else if !self.exhausted && self.end - self.start < self.span() {
                self.pull(keep);
            } else if self.exhausted && self.lanes.is_empty() {
                return Poll::Ready(Next::Done);
            } else {
                self.waiting[worker] = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
    }

    /// Marks the record at `pos` finished: the next of its key may start.
    pub(crate) fn finish(&mut self, pos: usize) {
        let slot = self.slot(pos);
        slot.done = true;
        let key = slot.key;
        let lane = self
            .lanes
            .get_mut(&key)
            .expect("a running record has a lane");
        lane.busy = false;
        match lane.head {
            Some(head) => self.ready.push(Reverse(head)),
            None => {
                self.lanes.remove(&key);
            }
        }
        let span = self.span();
        while self.start < self.end
            && self.slots[self.start % span]
                .as_ref()
                .is_some_and(|s| s.done)
        {
            self.slots[self.start % span] = None;
            self.start += 1;
        }
        for waker in self.waiting.iter_mut().filter_map(Option::take) {
            waker.wake();
        }
    }
}

/// Runs `work` on the records of `lookahead` with `workers` workers on the current task, as
/// described in the module docs; `keep` says whether a record should still run.
pub(crate) async fn run_all<T: Keyed, I: Iterator<Item = T>, F: Future>(
    lookahead: Lookahead<T, I>,
    workers: usize,
    keep: impl Fn(&T) -> bool + Copy,
    work: impl Fn(T) -> F,
) {
    let lookahead = RefCell::new(lookahead);
    let worker = |id: usize| {
        let (lookahead, work) = (&lookahead, &work);
        async move {
            // A transform that never waits would keep the other workers from ever being
            // polled: a worker yields after this many records in a row that did not wait.
            let mut streak = 0;
            loop {
                let next =
                    std::future::poll_fn(|cx| lookahead.borrow_mut().take(id, keep, cx)).await;
                let Next::Run(pos, item) = next else {
                    return;
                };
                let waited = Waited::default();
                waited.watch(work(item)).await;
                lookahead.borrow_mut().finish(pos);
                streak = if waited.get() { 0 } else { streak + 1 };
                if streak >= YIELD_AFTER {
                    streak = 0;
                    yield_now().await;
                }
            }
        }
    };
    futures::future::join_all((0..workers.max(1)).map(worker)).await;
}

const YIELD_AFTER: u32 = 32;

/// Whether a future was ever pending.
#[derive(Default)]
struct Waited(std::cell::Cell<bool>);

impl Waited {
    async fn watch<F: Future>(&self, future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| {
            let poll = future.as_mut().poll(cx);
            if poll.is_pending() {
                self.0.set(true);
            }
            poll
        })
        .await
    }

    fn get(&self) -> bool {
        self.0.get()
    }
}

/// Lets the other futures of the task run once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Rec(&'static str, usize);

    impl Keyed for Rec {
        fn key(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }

    /// Runs records (key, position) where key `slow` waits 100 ms and the others 1 ms; gives
    /// (position, started at ms) in start order.
    async fn starts(keys: &[&'static str], span: usize, workers: usize) -> Vec<(usize, u64)> {
        let t0 = tokio::time::Instant::now();
        let started = RefCell::new(Vec::new());
        let items = keys.iter().enumerate().map(|(i, k)| Rec(k, i));
        run_all(
            Lookahead::new(items, span, workers),
            workers,
            |_| true,
            |r| {
                started
                    .borrow_mut()
                    .push((r.1, t0.elapsed().as_millis() as u64));
                let ms = if r.0 == "slow" { 100 } else { 1 };
                tokio::time::sleep(Duration::from_millis(ms))
            },
        )
        .await;
        started.into_inner()
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_starts_beyond_the_span_after_the_earliest_unfinished_record() {
        let keys = ["slow", "a", "b", "c", "d", "e", "f", "g"];
        let s = starts(&keys, 4, 8).await;
        // Positions 0-3 start at once; 4 and later only once the slow record 0 is done.
        assert!(s.iter().all(|&(p, t)| (p < 4) == (t < 100)), "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_runs_in_order_and_the_earliest_ready_record_goes_first() {
        let keys = ["a", "a", "b", "a", "c"];
        let s = starts(&keys, 16, 2).await;
        let order: Vec<usize> = s.iter().map(|&(p, _)| p).collect();
        // 0 and 2 first (1 waits for 0); when 0 ends, 1 (earlier than 4); when 2 ends, 4
        // (3 waits for 1); then 3.
        assert_eq!(order, [0, 2, 1, 4, 3]);
    }
}
