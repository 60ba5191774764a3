//! The iterator of [`deaggregate_each`](super::deaggregate_each): a batch's records
//! deaggregated in order, the work shared with a second core when there is one.
//!
//! Alone, this thread computes the MD5s of the next [`HASH_AHEAD`] aggregates side by side
//! when the caller reaches the first of them, then splits each aggregate when the caller
//! reaches it: one aggregate's user records in memory at a time, and nothing hashed past the
//! record where a caller stops (a failure in the ordered mode).
//!
//! With a helper thread, the helper computes the MD5s in the order it is sent the
//! aggregates, side by side, and sends each digest as soon as it is known; then it splits
//! aggregates from the end of the batch backwards. This thread splits from the front: the
//! record the caller reaches, and the ones after it while a verdict is awaited. The two meet
//! in the middle (each claims a record before splitting it), so each aggregate is split once,
//! and the caller gets the same results in the same order either way; it only waits when the
//! helper is behind.
//!
//! The helper can start before the batch is even read: a [`Verifier`] is pushed each
//! aggregate as the event's reader decodes it, and the helper hashes it while the rest of the
//! event is read. The batch is then matched to what was pushed, buffer by buffer.
//!
//! A verdict, in the terms of `finish`: `Some(true)` the MD5 trailer matches, `Some(false)` it
//! does not, `None` the record is not shaped like an aggregate (or is not checked).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::md5_many::{Next, md5_each, md5_stream};
use super::{DeaggError, Deaggregated, checksum_parts, finish};

type Outcome = Result<Deaggregated, DeaggError>;

pub(crate) struct Deaggregating<'a> {
    records: &'a [Bytes],
    /// The next record to give.
    next: usize,
    /// By record; `None` while the helper computes it.
    verdicts: Vec<Option<Option<bool>>>,
    /// By digest the helper sends (in the order it was asked): which record it is about, if
    /// any (an aggregate pushed early that is not in the batch has none).
    record_of: Vec<Option<usize>>,
    /// By record (with a helper): its split, made ahead, the verdict not yet applied.
    split: Vec<Option<Outcome>>,
    helper: Option<Helper>,
    /// Alone: the aggregates, and how many of them are hashed.
    unhashed: Option<(Aggregates<'a>, usize)>,
}

/// Alone, the aggregates hashed at once: 8 per lane of the widest kernel, so that lanes are
/// kept busy, and few enough that a caller who stops early leaves most of a big batch
/// unhashed.
const HASH_AHEAD: usize = 64;

/// The second thread: what it is sent, and what it sends.
struct Helper {
    inputs: mpsc::Sender<Input>,
    messages: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// The records nobody has claimed to split yet: this thread claims from the front, the
    /// helper from the back.
    unclaimed: Mutex<Range<usize>>,
    stop: AtomicBool,
}

enum Input {
    /// An aggregate's protobuf bytes, to hash: the next digest's subject.
    Hash(Bytes),
    /// The batch, the last input: the helper splits from its back once every check is sent.
    Split(Vec<Bytes>),
}

enum Message {
    /// The MD5 of the n-th aggregate the helper was sent.
    Digest(usize, [u8; 16]),
    /// A record split by the helper, its verdict not applied.
    Split(usize, Outcome),
}

impl<'a> Deaggregating<'a> {
    /// The verdicts of `parts`, the records' [`Aggregates`], computed on this thread as the
    /// records are reached (`None`: the checksums are not verified).
    fn alone(records: &'a [Bytes], parts: Option<Aggregates<'a>>) -> Self {
        let mut verdicts = vec![Some(None); records.len()];
        for &i in parts.iter().flat_map(|p| &p.shaped) {
            verdicts[i] = None;
        }
        Deaggregating {
            records,
            next: 0,
            verdicts,
            record_of: Vec::new(),
            split: Vec::new(),
            helper: None,
            unhashed: parts.map(|p| (p, 0)),
        }
    }

    /// Alone: the verdicts of the next [`HASH_AHEAD`] aggregates, side by side. False with a
    /// helper, which computes them.
    fn hash_ahead(&mut self) -> bool {
        let Some((parts, hashed)) = &mut self.unhashed else {
            return false;
        };
        let (from, to) = (*hashed, parts.shaped.len().min(*hashed + HASH_AHEAD));
        let shaped = &parts.shaped[from..to];
        // A mismatch until its digest says otherwise: the safe side.
        for &i in shaped {
            self.verdicts[i] = Some(Some(false));
        }
        let trailers = &parts.trailers[from..to];
        md5_each(&parts.bodies[from..to], &mut |k, digest| {
            self.verdicts[shaped[k]] = Some(Some(digest[..] == *trailers[k]));
            true
        });
        *hashed = to;
        true
    }

    /// The checksums of `parts` (the records' [`Aggregates`]) verified and the work shared
    /// with `helper`, which was sent `pushed` (in order) before the batch was read.
    fn with_helper(
        records: &'a [Bytes],
        parts: Aggregates<'a>,
        helper: Helper,
        pushed: &[Bytes],
    ) -> Self {
        let mut verdicts = vec![Some(None); records.len()];
        let mut record_of = vec![None; pushed.len()];
        let mut matched = 0;
        for (k, &i) in parts.shaped.iter().enumerate() {
            verdicts[i] = None;
            // Both buffers are alive, so the same place and length are the same bytes.
            let data = &records[i];
            if pushed
                .get(matched)
                .is_some_and(|p| p.as_ptr() == data.as_ptr() && p.len() == data.len())
            {
                record_of[matched] = Some(i);
                matched += 1;
            } else {
                record_of.push(Some(i));
                helper.send(Input::Hash(data.slice_ref(parts.bodies[k])));
            }
        }
        *helper.shared.claims() = 0..records.len();
        // The helper owns its records (sharing their buffers).
        helper.send(Input::Split(records.to_vec()));
        Deaggregating {
            records,
            next: 0,
            verdicts,
            record_of,
            split: std::iter::repeat_with(|| None)
                .take(records.len())
                .collect(),
            helper: Some(helper),
            unhashed: None,
        }
    }

    /// Takes what the helper has sent; with `wait`, waits for at least one message.
    fn receive(&mut self, wait: bool) {
        let Some(helper) = &mut self.helper else {
            return;
        };
        let first = match wait.then(|| helper.messages.recv()) {
            Some(Err(_)) => return self.helper_gone(),
            Some(Ok(message)) => Some(message),
            None => None,
        };
        for message in first.into_iter().chain(helper.messages.try_iter()) {
            match message {
                Message::Digest(n, digest) => {
                    if let Some(&Some(i)) = self.record_of.get(n) {
                        let trailer = checksum_parts(&self.records[i]).map(|(_, t)| t);
                        self.verdicts[i] = Some(Some(trailer == Some(&digest[..])));
                    }
                }
                Message::Split(i, split) => self.split[i] = Some(split),
            }
        }
    }

    /// The helper ended before sending all: a panic there is a bug, raised here as such.
    /// Otherwise (never seen) this thread does the rest itself, each missing verdict a
    /// mismatch, the safe side.
    fn helper_gone(&mut self) {
        let mut helper = self.helper.take().expect("only called with a helper");
        if let Some(Err(panic)) = helper.thread.take().map(JoinHandle::join) {
            std::panic::resume_unwind(panic);
        }
        for verdict in self.verdicts.iter_mut().filter(|v| v.is_none()) {
            *verdict = Some(Some(false));
        }
    }

    /// Claims record `i` if nobody has.
    fn claim(&self, i: usize) -> bool {
        let Some(helper) = &self.helper else {
            return true;
        };
        let mut unclaimed = helper.shared.claims();
        unclaimed.start == i && unclaimed.next().is_some()
    }

    /// Claims the first record nobody has claimed, if any.
    fn claim_front(&self) -> Option<usize> {
        self.helper.as_ref()?.shared.claims().next()
    }
}

impl Iterator for Deaggregating<'_> {
    type Item = Outcome;

    fn next(&mut self) -> Option<Outcome> {
        let i = self.next;
        let data = self.records.get(i)?.clone();
        self.next += 1;
        loop {
            self.receive(false);
            match self.verdicts[i] {
                Some(Some(false)) => {
                    // A split made ahead is of no use: drop it now, not with the iterator.
                    self.split.get_mut(i).map(Option::take);
                    return Some(finish(data, Some(false)));
                }
                Some(verdict) => {
                    if let Some(split) = self.split.get_mut(i).and_then(Option::take) {
                        return Some(split);
                    }
                    // Record i is this thread's to split, unless the helper claimed it.
                    if self.claim(i) {
                        return Some(finish(data, verdict));
                    }
                }
                // Alone, it is computed now; with the helper, split ahead while it is awaited.
                None => {
                    if self.hash_ahead() {
                        continue;
                    }
                    if let Some(k) = self.claim_front() {
                        self.split[k] = Some(finish(self.records[k].clone(), None));
                        continue;
                    }
                }
            }
            self.receive(true);
        }
    }
}

impl Helper {
    /// `None` if no thread can be made: a process limit only costs the parallelism.
    fn spawn() -> Option<Self> {
        let shared = Arc::new(Shared {
            unclaimed: Mutex::new(0..0),
            stop: AtomicBool::new(false),
        });
        let (inputs, their_inputs) = mpsc::channel();
        let (their_messages, messages) = mpsc::channel();
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .spawn(move || work(&their_inputs, &their_messages, &theirs))
            .ok()?;
        Some(Helper {
            inputs,
            messages,
            shared,
            thread: Some(thread),
        })
    }

    /// If the helper has ended, what it was sent is not needed: its end is found by
    /// [`Deaggregating::receive`].
    fn send(&self, input: Input) {
        let _ = self.inputs.send(input);
    }
}

/// The helper's work: hash each aggregate it is sent, sending each digest as soon as it is
/// known (those that come while others are hashed join them), until the batch comes; then
/// split from the batch's back. Ends early when told to stop, or when nothing more will come.
fn work(inputs: &mpsc::Receiver<Input>, send: &mpsc::Sender<Message>, shared: &Shared) {
    let (mut sent, mut batch) = (0, None);
    let mut next = |wait| {
        let input = match wait {
            true => inputs.recv().ok(),
            false => match inputs.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return Next::NotYet,
                input => input.ok(),
            },
        };
        match input {
            Some(Input::Hash(body)) => {
                sent += 1;
                Next::Message(sent - 1, body)
            }
            Some(Input::Split(records)) => {
                batch = Some(records);
                Next::End
            }
            None => Next::End,
        }
    };
    md5_stream(&mut next, &mut |n, digest| {
        send.send(Message::Digest(n, digest)).is_ok() && !shared.stopped()
    });
    let Some(records) = batch else {
        return;
    };
    while !shared.stopped()
        && let Some(k) = shared.claim_back()
    {
        let split = finish(records[k].clone(), None);
        if send.send(Message::Split(k, split)).is_err() {
            return;
        }
    }
}

impl Shared {
    fn claims(&self) -> std::sync::MutexGuard<'_, Range<usize>> {
        // The claims stay consistent whatever panicked while they were held.
        self.unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_back(&self) -> Option<usize> {
        self.claims().next_back()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

impl Drop for Helper {
    /// Stops the helper at its next digest or split and waits for it, so that no buffer of
    /// the batch outlives the iterator (the runtime reuses the body's memory for the next
    /// event).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Closes its inputs, should it be waiting for more.
        self.inputs = mpsc::channel().0;
        if let Some(thread) = self.thread.take() {
            // A panic there was already raised by `receive`, or concerns work no one needs.
            let _ = thread.join();
        }
    }
}

/// The checks of a batch's MD5 trailers, started while the batch is still being read.
///
/// Each aggregate [`push`](Verifier::push)ed is hashed on a helper thread as soon as it
/// comes, once they add up to 64 KiB on a machine with a second core (below that, or on one
/// core, nothing starts and the checks are made as [`deaggregate_each`](super::deaggregate_each)
/// makes them). [`Verifier::deaggregate_each`] then takes the verdict of each record that is
/// the very buffer pushed, and has the others checked as before.
#[derive(Default)]
pub(crate) struct Verifier {
    /// The aggregates pushed, in order.
    pushed: Vec<Bytes>,
    /// The bytes they hash.
    bytes: usize,
    /// Started, and sent every aggregate pushed.
    helper: Option<Helper>,
}

/// Below this, a thread costs more than it saves.
const PARALLEL_MIN_BYTES: usize = 64 * 1024;

impl Verifier {
    /// Takes `data` to check if it is shaped like an aggregate.
    pub(crate) fn push(&mut self, data: &Bytes) {
        let Some(body) = body_of(data) else {
            return;
        };
        self.bytes += body.len();
        self.pushed.push(data.clone());
        if let Some(helper) = &self.helper {
            helper.send(Input::Hash(body));
        } else if self.bytes >= PARALLEL_MIN_BYTES && spare_core() {
            self.helper = Helper::spawn();
            if let Some(helper) = &self.helper {
                for body in self.pushed.iter().filter_map(body_of) {
                    helper.send(Input::Hash(body));
                }
            }
        }
    }

    /// [`deaggregate_each`](super::deaggregate_each) on `records`, with the checks already
    /// made or under way for the buffers pushed.
    pub(crate) fn deaggregate_each(
        self,
        records: &[Bytes],
        verify_checksum: bool,
    ) -> Deaggregating<'_> {
        if !verify_checksum {
            return Deaggregating::alone(records, None);
        }
        // Found once: a batch of plain records is looked through once, not twice.
        let parts = Aggregates::of(records);
        let (helper, pushed) = match self.helper {
            Some(helper) => (Some(helper), self.pushed),
            None if spare_core() && parts.body_bytes() >= PARALLEL_MIN_BYTES => {
                (Helper::spawn(), Vec::new())
            }
            None => (None, Vec::new()),
        };
        match helper {
            Some(helper) => Deaggregating::with_helper(records, parts, helper, &pushed),
            None => Deaggregating::alone(records, Some(parts)),
        }
    }

    /// A verifier whose helper runs whatever the batch's size and the machine's cores.
    #[cfg(test)]
    pub(super) fn started() -> Self {
        Verifier {
            helper: Helper::spawn(),
            ..Verifier::default()
        }
    }
}

/// The protobuf bytes of data shaped like an aggregate, sharing its buffer.
fn body_of(data: &Bytes) -> Option<Bytes> {
    checksum_parts(data).map(|(body, _)| data.slice_ref(body))
}

/// True when this process may run on more than one core (cached: the answer does not change
/// while a Lambda execution environment lives).
fn spare_core() -> bool {
    static SPARE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPARE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// The records of a batch shaped like aggregates.
struct Aggregates<'a> {
    /// Their indices in the batch.
    shaped: Vec<usize>,
    /// Their protobuf bodies.
    bodies: Vec<&'a [u8]>,
    /// Their MD5 trailers.
    trailers: Vec<&'a [u8]>,
}

impl<'a> Aggregates<'a> {
    fn of(records: &'a [Bytes]) -> Self {
        let mut parts = Aggregates {
            shaped: Vec::new(),
            bodies: Vec::new(),
            trailers: Vec::new(),
        };
        for (i, data) in records.iter().enumerate() {
            if let Some((body, trailer)) = checksum_parts(data) {
                parts.shaped.push(i);
                parts.bodies.push(body);
                parts.trailers.push(trailer);
            }
        }
        parts
    }

    /// The bytes to hash.
    fn body_bytes(&self) -> usize {
        self.bodies.iter().map(|body| body.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpl::{Aggregator, deaggregate};

    /// 150 small aggregates, their MD5 trailers wrong on both sides of each chunk's edge.
    fn batch() -> Vec<Bytes> {
        (0..150)
            .map(|i| {
                let mut agg = Aggregator::new();
                agg.add(&format!("k{i}"), None, vec![i as u8; 10]).unwrap();
                let data = agg.finish().unwrap().data;
                if [0, 63, 64, 127, 128, 149].contains(&i) {
                    let mut bad = data.to_vec();
                    *bad.last_mut().unwrap() ^= 1;
                    return bad.into();
                }
                data
            })
            .collect()
    }

    fn hashed(d: &Deaggregating<'_>) -> usize {
        d.unhashed.as_ref().map_or(0, |(_, n)| *n)
    }

    #[test]
    fn alone_the_checksums_are_computed_a_chunk_ahead_of_the_caller() {
        let records = batch();
        let mut each = Deaggregating::alone(&records, Some(Aggregates::of(&records)));
        assert_eq!(hashed(&each), 0);
        each.next();
        assert_eq!(hashed(&each), HASH_AHEAD);
        for _ in 1..HASH_AHEAD {
            each.next();
        }
        assert_eq!(hashed(&each), HASH_AHEAD);
        each.next();
        assert_eq!(hashed(&each), 2 * HASH_AHEAD);
        // Every verdict is the one a record alone gets, across the chunks' edges.
        let rest: Vec<_> = each.collect();
        let expected: Vec<_> = records[HASH_AHEAD + 1..]
            .iter()
            .map(|r| deaggregate(r.clone()))
            .collect();
        assert_eq!(rest, expected);
        let all: Vec<_> = Deaggregating::alone(&records, Some(Aggregates::of(&records))).collect();
        let mismatches: Vec<usize> = (0..all.len())
            .filter(|&i| matches!(all[i], Ok(Deaggregated::ChecksumMismatch(_))))
            .collect();
        assert_eq!(mismatches, [0, 63, 64, 127, 128, 149]);
    }

    /// A helper whose thread runs `f` and ends, having sent nothing and claimed nothing.
    fn idle_helper(f: impl FnOnce() + Send + 'static) -> Helper {
        let (inputs, _) = mpsc::channel();
        let (sender, messages) = mpsc::channel::<Message>();
        let thread = std::thread::spawn(move || {
            let _sender = sender;
            f()
        });
        Helper {
            inputs,
            messages,
            shared: Arc::new(Shared {
                unclaimed: Mutex::new(0..0),
                stop: AtomicBool::new(false),
            }),
            thread: Some(thread),
        }
    }

    #[test]
    fn a_batch_that_is_what_was_pushed_is_not_hashed_again() {
        let records = batch();
        let mut verifier = Verifier::started();
        for r in &records {
            verifier.push(r);
        }
        let helper = verifier.helper.take().unwrap();
        let each = Deaggregating::with_helper(
            &records,
            Aggregates::of(&records),
            helper,
            &verifier.pushed,
        );
        // Each digest awaited is one pushed, about its record; none was asked for again.
        let expected: Vec<_> = (0..records.len()).map(Some).collect();
        assert_eq!(each.record_of, expected);
    }

    #[test]
    fn the_helper_splits_from_the_back_once_the_checks_are_sent() {
        let records = batch();
        let helper = Helper::spawn().unwrap();
        let mut each = Deaggregating::with_helper(&records, Aggregates::of(&records), helper, &[]);
        // This thread takes nothing: the helper claims and splits every record.
        let waited = std::time::Instant::now();
        while each.split.iter().any(Option::is_none) {
            assert!(waited.elapsed().as_secs() < 60, "the helper split nothing");
            std::thread::sleep(std::time::Duration::from_millis(1));
            each.receive(false);
        }
        assert!(each.verdicts.iter().all(Option::is_some));
        let expected: Vec<_> = records.iter().map(|r| deaggregate(r.clone())).collect();
        assert_eq!(each.collect::<Vec<_>>(), expected);
    }

    #[test]
    fn a_stopped_helper_ends_at_its_next_digest() {
        let (inputs, their_inputs) = mpsc::channel();
        let (their_messages, messages) = mpsc::channel();
        for _ in 0..100 {
            inputs.send(Input::Hash(vec![7; 1000].into())).unwrap();
        }
        drop(inputs);
        let shared = Shared {
            unclaimed: Mutex::new(0..0),
            stop: AtomicBool::new(true),
        };
        work(&their_inputs, &their_messages, &shared);
        assert_eq!(messages.try_iter().count(), 1);
    }

    /// An aggregate of one user record of `n` bytes: a protobuf of a little more than `n`.
    fn aggregate(n: usize) -> Bytes {
        let mut agg = Aggregator::new();
        agg.add("k", None, vec![1; n]).unwrap();
        agg.finish().unwrap().data
    }

    #[test]
    fn aggregates_pushed_start_the_helper_once_they_add_up_to_64_kib() {
        let mut verifier = Verifier::default();
        // Plain data is not pushed, whatever its size.
        verifier.push(&Bytes::from(vec![0; 100_000]));
        let mut bytes = 0;
        for _ in 0..100 {
            let record = aggregate(1000);
            verifier.push(&record);
            bytes += body_of(&record).unwrap().len();
            let started = spare_core() && bytes >= 64 * 1024;
            assert_eq!(verifier.helper.is_some(), started, "after {bytes} bytes");
        }
        assert_eq!(verifier.pushed.len(), 100);
    }

    #[test]
    fn a_batch_gets_a_helper_from_64_kib_of_aggregates() {
        // 60 and 70 aggregates of a little more than 1,000 bytes: below and above 64 KiB.
        for (n, helped) in [(60, false), (70, true)] {
            let records: Vec<Bytes> = (0..n).map(|_| aggregate(1000)).collect();
            let each = Verifier::default().deaggregate_each(&records, true);
            assert_eq!(each.helper.is_some(), helped && spare_core(), "{n}");
            // Unchecked, nothing is hashed.
            let unchecked = Verifier::default().deaggregate_each(&records, false);
            assert!(unchecked.helper.is_none());
        }
    }

    #[test]
    fn a_record_is_split_by_whoever_claims_it_first() {
        let records = batch();
        let each =
            Deaggregating::with_helper(&records, Aggregates::of(&records), idle_helper(|| ()), &[]);
        let shared = &each.helper.as_ref().unwrap().shared;
        assert_eq!(shared.claim_back(), Some(149));
        assert!(!each.claim(149), "the helper's");
        assert!(!each.claim(1), "not the first unclaimed");
        assert!(each.claim(0));
        assert!(!each.claim(0), "claimed already");
        assert_eq!(each.claim_front(), Some(1));
    }

    #[test]
    fn a_helper_that_ends_early_leaves_mismatches_and_its_panic_is_raised_here() {
        let records = batch();
        let each =
            Deaggregating::with_helper(&records, Aggregates::of(&records), idle_helper(|| ()), &[]);
        // No verdict will come: each aggregate is a mismatch, the safe side.
        assert!(
            each.take(3)
                .all(|r| matches!(r, Ok(Deaggregated::ChecksumMismatch(_))))
        );
        let mut each = Deaggregating::with_helper(
            &records,
            Aggregates::of(&records),
            idle_helper(|| panic!("a bug in the helper")),
            &[],
        );
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| each.next()));
        assert_eq!(
            panic.unwrap_err().downcast_ref::<&str>(),
            Some(&"a bug in the helper")
        );
    }
}
