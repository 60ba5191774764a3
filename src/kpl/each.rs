//! The iterator of [`deaggregate_each`](super::deaggregate_each): a batch's records
//! deaggregated in order, the work shared with a second core when there is one.
//!
//! Alone, this thread computes every MD5 first (side by side), then splits each aggregate
//! when the caller reaches it: one aggregate's user records in memory at a time.
//!
//! With a helper thread, the helper computes the MD5s, in batch order, and sends each verdict
//! as soon as it is known; then it splits aggregates from the end of the batch backwards. This
//! thread splits from the front: the record the caller reaches, and the ones after it while a
//! verdict is awaited. The two meet in the middle (each claims a record before splitting it),
//! so each aggregate is split once, and the caller gets the same results in the same order
//! either way; it only waits when the helper is behind.
//!
//! A verdict, in the terms of `finish`: `Some(true)` the MD5 trailer matches, `Some(false)` it
//! does not, `None` the record is not shaped like an aggregate (or is not checked).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::md5_many::{Order, md5_each};
use super::{DeaggError, Deaggregated, checksum_parts, finish};

type Outcome = Result<Deaggregated, DeaggError>;

pub(super) struct Deaggregating<'a> {
    records: &'a [Bytes],
    /// The next record to give.
    next: usize,
    /// By record; `None` while the helper computes it.
    verdicts: Vec<Option<Option<bool>>>,
    /// By record (with a helper): its split, made ahead, the verdict not yet applied.
    split: Vec<Option<Outcome>>,
    helper: Option<Helper>,
}

/// The second thread, and what it sends.
struct Helper {
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

enum Message {
    /// A record's checksum matches, or not.
    Verdict(usize, bool),
    /// A record split by the helper, its verdict not applied.
    Split(usize, Outcome),
}

impl<'a> Deaggregating<'a> {
    /// Every verdict computed here and now, side by side: those of `parts`, the records'
    /// [`Aggregates`] (`None`: the checksums are not verified).
    pub(super) fn alone(records: &'a [Bytes], parts: Option<Aggregates<'a>>) -> Self {
        let mut verdicts = vec![None; records.len()];
        if let Some(Aggregates {
            shaped,
            bodies,
            trailers,
        }) = parts
        {
            // A mismatch until its digest says otherwise: the safe side.
            for &i in &shaped {
                verdicts[i] = Some(false);
            }
            md5_each(&bodies, Order::LongestFirst, &mut |k, digest| {
                verdicts[shaped[k]] = Some(digest[..] == *trailers[k]);
                true
            });
        }
        Deaggregating {
            records,
            next: 0,
            verdicts: verdicts.into_iter().map(Some).collect(),
            split: Vec::new(),
            helper: None,
        }
    }

    /// The checksums of `parts` (the records' [`Aggregates`]) verified and the work shared
    /// with a helper thread (or done [`alone`](Self::alone) if no thread can be made: a
    /// process limit only costs the parallelism).
    pub(super) fn with_helper(records: &'a [Bytes], parts: Aggregates<'a>) -> Self {
        let shaped = parts.shaped;
        let mut verdicts = vec![Some(None); records.len()];
        for &i in &shaped {
            verdicts[i] = None;
        }
        let shared = Arc::new(Shared {
            unclaimed: Mutex::new(0..records.len()),
            stop: AtomicBool::new(false),
        });
        let (send, messages) = mpsc::channel();
        // The helper owns its records (sharing their buffers).
        let owned = records.to_vec();
        let its = shared.clone();
        let work = move || {
            let Aggregates {
                bodies, trailers, ..
            } = Aggregates::of(&owned);
            md5_each(&bodies, Order::AsGiven, &mut |k, digest| {
                let matches = digest[..] == *trailers[k];
                send.send(Message::Verdict(shaped[k], matches)).is_ok() && !its.stopped()
            });
            while !its.stopped()
                && let Some(k) = its.claim_back()
            {
                let split = finish(owned[k].clone(), None);
                if send.send(Message::Split(k, split)).is_err() {
                    return;
                }
            }
        };
        match std::thread::Builder::new().spawn(work) {
            Ok(thread) => Deaggregating {
                records,
                next: 0,
                verdicts,
                split: std::iter::repeat_with(|| None)
                    .take(records.len())
                    .collect(),
                helper: Some(Helper {
                    messages,
                    shared,
                    thread: Some(thread),
                }),
            },
            Err(_) => Self::alone(records, Some(Aggregates::of(records))),
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
                Message::Verdict(i, matches) => self.verdicts[i] = Some(Some(matches)),
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
                // While the verdict is awaited, split ahead.
                None => {
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
        if let Some(thread) = self.thread.take() {
            // A panic there was already raised by `receive`, or concerns work no one needs.
            let _ = thread.join();
        }
    }
}

/// The records of a batch shaped like aggregates.
pub(super) struct Aggregates<'a> {
    /// Their indices in the batch.
    shaped: Vec<usize>,
    /// Their protobuf bodies.
    bodies: Vec<&'a [u8]>,
    /// Their MD5 trailers.
    trailers: Vec<&'a [u8]>,
}

impl<'a> Aggregates<'a> {
    pub(super) fn of(records: &'a [Bytes]) -> Self {
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
    pub(super) fn body_bytes(&self) -> usize {
        self.bodies.iter().map(|body| body.len()).sum()
    }
}
