//! One batch's delivery: the transform's lanes push what they accepted, and a driver running
//! beside them on the same task packs it into entries, sends full requests, sends the
//! refused entries again after a back-off, and reports the first undelivered user record.
//!
//! At most one request is in flight, so the entries of a shard reach the destination in the
//! order they were pushed unless one is retried.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc;

use super::backoff::Backoff;
use super::{EntryOutcome, Limits, Position, SendErrorKind, Sink, SinkStats, Staged};
use crate::kpl::UserRecord;
use crate::transform::RecordContext;

/// How hard the driver tries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Sends of one entry before it is given up.
    pub(crate) max_attempts: u32,
    /// How long one request may take before it counts as failed (and is sent again).
    pub(crate) request_timeout: Duration,
    /// The first back-off's ceiling, and the most any back-off waits.
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
}

/// What the driver tells the batch: the first undelivered user record so far, and why.
pub(crate) trait Report {
    /// The lowest Kinesis record index that will be reported (the batch's length if none).
    fn floor(&self) -> usize;
    /// The user record at `first` (and maybe more after it) was not delivered.
    fn undelivered(&self, first: Position, message: String);
}

/// The lanes' side: what they push and when they are done.
pub(crate) struct Outbox {
    sender: RefCell<Option<mpsc::UnboundedSender<(UserRecord, RecordContext)>>>,
    /// Bytes pushed and not yet taken by the driver (data and partition keys).
    waiting: Cell<usize>,
    /// A full request's worth of bytes and records: a lane that pushes past it yields, so
    /// that the driver starts sending.
    request_bytes: usize,
    request_entries: usize,
    waiting_records: Cell<usize>,
}

/// The driver's side.
pub(crate) struct Driver<'a, S: Sink> {
    sink: &'a S,
    limits: Limits,
    policy: Policy,
    /// When sending stops; what is not delivered by then is reported.
    stop_at: Option<Instant>,
    receiver: mpsc::UnboundedReceiver<(UserRecord, RecordContext)>,
    outbox: &'a Outbox,
}

/// An entry and what the driver knows of it.
struct Pending<E> {
    staged: Staged<E>,
    attempts: u32,
    last_error: Option<String>,
}

impl Outbox {
    pub(crate) fn new(
        limits: Limits,
    ) -> (Self, mpsc::UnboundedReceiver<(UserRecord, RecordContext)>) {
        let (sender, receiver) = mpsc::unbounded();
        let outbox = Outbox {
            sender: RefCell::new(Some(sender)),
            waiting: Cell::new(0),
            request_bytes: limits.max_request_bytes,
            request_entries: limits.max_entries,
            waiting_records: Cell::new(0),
        };
        (outbox, receiver)
    }

    /// Hands one accepted user record to the driver; false when the driver has stopped (the
    /// user record is then undelivered).
    pub(crate) fn push(&self, record: UserRecord, context: RecordContext) -> bool {
        let bytes = record.data().len() + record.partition_key().len();
        let sent = match &*self.sender.borrow() {
            Some(sender) => sender.unbounded_send((record, context)).is_ok(),
            None => false,
        };
        if sent {
            self.waiting.set(self.waiting.get() + bytes);
            self.waiting_records.set(self.waiting_records.get() + 1);
        }
        sent
    }

    /// True once a full request's worth was pushed since the last time it said so: a lane
    /// then yields, so that the driver starts sending while the transform goes on.
    pub(crate) fn request_waiting(&self) -> bool {
        let full = self.waiting.get() >= self.request_bytes
            || self.waiting_records.get() >= self.request_entries;
        if full {
            self.waiting.set(0);
            self.waiting_records.set(0);
        }
        full
    }

    /// No more user records: the driver sends what it holds and ends.
    pub(crate) fn close(&self) {
        self.sender.borrow_mut().take();
    }
}

impl<'a, S: Sink> Driver<'a, S> {
    pub(crate) fn new(
        sink: &'a S,
        policy: Policy,
        stop_at: Option<Instant>,
        outbox: &'a Outbox,
        receiver: mpsc::UnboundedReceiver<(UserRecord, RecordContext)>,
    ) -> Self {
        Driver {
            sink,
            limits: sink.limits(),
            policy,
            stop_at,
            receiver,
            outbox,
        }
    }

    fn past_stop(&self) -> bool {
        self.stop_at
            .is_some_and(|t| tokio::time::Instant::now() >= t.into())
    }

    /// Delivers everything the lanes push until they close, or until it cannot.
    pub(crate) async fn run(mut self, report: &impl Report) -> SinkStats {
        let mut stats = SinkStats::default();
        let mut packer = match self.packer().await {
            Ok(packer) => packer,
            Err(e) => {
                let why = format!("the sink could not start: {e}");
                self.give_up_incoming(report, &mut stats, &why);
                return stats;
            }
        };
        let mut ready: VecDeque<Pending<S::Entry>> = VecDeque::new();
        let mut staged = Vec::new();
        let mut closed = false;
        let mut backoff = Backoff::new(self.policy.backoff_base, self.policy.backoff_cap);
        let mut wait_before_next = false;
        loop {
            // Take everything pushed so far without waiting.
            while !closed {
                match self.receiver.try_recv() {
                    Ok(item) => self.stage(item, &mut *packer, &mut staged, report, &mut stats),
                    Err(mpsc::TryRecvError::Closed) => {
                        closed = true;
                        packer.finish(&mut staged);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
                self.admit(&mut staged, &mut ready, &mut stats, report);
            }
            // Entries at or after the floor will be delivered again with their records.
            let floor = report.floor();
            ready.retain(|p| {
                let keep = p.staged.first.index < floor;
                if !keep {
                    stats.undelivered_user_records += p.staged.user_records as u64;
                }
                keep
            });
            if ready.is_empty() && closed {
                break;
            }
            if !closed && !self.full(&ready) {
                // Wait for the lanes: one more user record, or their end.
                if let Some(item) = self.receiver.next().await {
                    self.stage(item, &mut *packer, &mut staged, report, &mut stats);
                    self.admit(&mut staged, &mut ready, &mut stats, report);
                }
                continue;
            }
            if wait_before_next {
                let wait = backoff.next_wait();
                let until = tokio::time::Instant::now() + wait;
                if self.stop_at.is_some_and(|t| until >= t.into()) {
                    self.give_up(
                        &mut ready,
                        report,
                        &mut stats,
                        "the deadline came before its next attempt",
                    );
                    break;
                }
                tokio::time::sleep_until(until).await;
            }
            if self.past_stop() {
                self.give_up(
                    &mut ready,
                    report,
                    &mut stats,
                    "the deadline came before it was sent",
                );
                break;
            }
            let outcome = self
                .send_one(&mut ready, &mut staged, &mut *packer, report, &mut stats)
                .await;
            match outcome {
                Round::AllDelivered => {
                    wait_before_next = false;
                    backoff.reset();
                }
                Round::SomeRefused => wait_before_next = true,
                Round::Stop => {
                    self.give_up(&mut ready, report, &mut stats, "the sink stopped");
                    break;
                }
            }
        }
        // Anything the lanes push from now on is undelivered.
        self.receiver.close();
        self.give_up_incoming(report, &mut stats, "the sink stopped before it was sent");
        stats
    }

    /// Hands one pushed user record to the packer (unless it will be delivered again anyway).
    fn stage(
        &self,
        (record, context): (UserRecord, RecordContext),
        packer: &mut dyn super::Pack<S::Entry>,
        staged: &mut Vec<Staged<S::Entry>>,
        report: &impl Report,
        stats: &mut SinkStats,
    ) {
        let at = Position::of(&context);
        if at.index >= report.floor() {
            return;
        }
        if let Err(e) = packer.add(record, &context, staged) {
            let seq = context.sequence_number();
            tracing::error!(
                sequence_number = seq,
                sub_sequence_number = at.sub_sequence_number,
                "record {seq}: the sink cannot take user record {}: {e}",
                context.idempotency_key()
            );
            lose(
                stats,
                report,
                at,
                1,
                format!("the sink cannot take it: {e}"),
            );
        }
    }

    /// The sink's packer, retrying a transient failure to make it within the deadline.
    async fn packer(&self) -> Result<Box<dyn super::Pack<S::Entry> + 'a>, super::SendError> {
        let mut backoff = Backoff::new(self.policy.backoff_base, self.policy.backoff_cap);
        let mut attempt = 1;
        loop {
            let e = match self.sink.packer().await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            let until = tokio::time::Instant::now() + backoff.next_wait();
            if e.kind == SendErrorKind::Permanent
                || attempt >= self.policy.max_attempts
                || self.stop_at.is_some_and(|t| until >= t.into())
            {
                tracing::error!("the sink could not start: {e}");
                return Err(e);
            }
            tracing::warn!(attempt, "the sink could not start, trying again: {e}");
            tokio::time::sleep_until(until).await;
            attempt += 1;
        }
    }

    /// True when `ready` holds at least a full request.
    fn full(&self, ready: &VecDeque<Pending<S::Entry>>) -> bool {
        if ready.len() >= self.limits.max_entries {
            return true;
        }
        let mut bytes = 0;
        for p in ready {
            bytes += self.sink.size(&p.staged.entry);
            if bytes >= self.limits.max_request_bytes {
                return true;
            }
        }
        false
    }

    /// Moves freshly staged entries into `ready`, refusing those too large to ever send.
    fn admit(
        &self,
        staged: &mut Vec<Staged<S::Entry>>,
        ready: &mut VecDeque<Pending<S::Entry>>,
        stats: &mut SinkStats,
        report: &impl Report,
    ) {
        for s in staged.drain(..) {
            let size = self.sink.size(&s.entry);
            let most = self
                .limits
                .max_entry_bytes
                .min(self.limits.max_request_bytes);
            if size > most {
                let message =
                    format!("an entry of {size} bytes is over the destination's limit of {most}");
                tracing::error!(
                    index = s.first.index,
                    sub_sequence_number = s.first.sub_sequence_number,
                    "{message}; its user records are not delivered"
                );
                lose(stats, report, s.first, s.user_records as u64, message);
                continue;
            }
            ready.push_back(Pending {
                staged: s,
                attempts: 0,
                last_error: None,
            });
        }
    }

    /// Sends the request at the front of `ready` and sorts out what became of each entry.
    async fn send_one(
        &self,
        ready: &mut VecDeque<Pending<S::Entry>>,
        staged: &mut Vec<Staged<S::Entry>>,
        packer: &mut dyn super::Pack<S::Entry>,
        report: &impl Report,
        stats: &mut SinkStats,
    ) -> Round {
        // The first entries that fit, but at most one per order key: the destination does not
        // order a request's entries, so the next one of a key waits for this one's outcome.
        let mut request: Vec<Pending<S::Entry>> = Vec::new();
        let mut waiting = Vec::new();
        let mut bytes = 0;
        while let Some(p) = ready.pop_front() {
            let size = self.sink.size(&p.staged.entry);
            if request.len() == self.limits.max_entries
                || (!request.is_empty() && bytes + size > self.limits.max_request_bytes)
            {
                ready.push_front(p);
                break;
            }
            let key = self.sink.order_key(&p.staged.entry);
            if key.is_some()
                && request
                    .iter()
                    .any(|q| self.sink.order_key(&q.staged.entry) == key)
            {
                waiting.push(p);
                continue;
            }
            bytes += size;
            request.push(p);
        }
        for p in waiting.into_iter().rev() {
            ready.push_front(p);
        }
        let (meta, entries): (Vec<_>, Vec<_>) = request
            .into_iter()
            .map(|p| {
                let Pending {
                    staged,
                    attempts,
                    last_error,
                } = p;
                (
                    (staged.first, staged.user_records, attempts + 1, last_error),
                    staged.entry,
                )
            })
            .unzip();
        stats.requests += 1;
        let timeout = tokio::time::Instant::now() + self.policy.request_timeout;
        let until = match self.stop_at {
            Some(t) => timeout.min(t.into()),
            None => timeout,
        };
        let result = match tokio::time::timeout_at(until, self.sink.send(&entries)).await {
            Ok(Ok(outcomes)) if outcomes.len() == entries.len() => Ok(outcomes),
            Ok(Ok(outcomes)) => Err((
                SendErrorKind::Transient,
                format!(
                    "the response has {} results for {} entries",
                    outcomes.len(),
                    entries.len()
                ),
            )),
            Ok(Err(e)) => Err((e.kind, e.message)),
            Err(_) => Err((SendErrorKind::Transient, "no response in time".to_string())),
        };
        let outcomes: Vec<EntryOutcome> = match result {
            Ok(outcomes) => outcomes,
            Err((SendErrorKind::Permanent, message)) => {
                tracing::error!("the sink's request failed and will not succeed: {message}");
                for ((first, users, ..), _) in meta.into_iter().zip(entries) {
                    lose(stats, report, first, users as u64, message.clone());
                }
                return Round::Stop;
            }
            Err((kind, message)) => {
                let throttled = kind == SendErrorKind::Throttled;
                tracing::warn!(
                    entries = entries.len(),
                    throttled,
                    "the sink's request failed; sending it again: {message}"
                );
                entries
                    .iter()
                    .map(|_| EntryOutcome::Retry {
                        code: message.clone(),
                        throttled,
                    })
                    .collect()
            }
        };
        let mut again = Vec::new();
        let mut refused = false;
        let mut codes: Vec<String> = Vec::new();
        for (((first, users, attempts, last_error), entry), outcome) in
            meta.into_iter().zip(entries).zip(outcomes)
        {
            let size = self.sink.size(&entry);
            let staged_entry = Staged {
                entry,
                first,
                user_records: users,
            };
            match outcome {
                EntryOutcome::Delivered => {
                    stats.delivered_user_records += users as u64;
                    stats.delivered_bytes += size as u64;
                }
                EntryOutcome::Failed { code, message } => {
                    let message = format!("{code}: {message}");
                    tracing::error!(
                        index = first.index,
                        sub_sequence_number = first.sub_sequence_number,
                        "the destination refused an entry for good: {message}"
                    );
                    lose(stats, report, first, users as u64, message);
                }
                EntryOutcome::Retry { code, throttled } => {
                    refused = true;
                    if throttled {
                        stats.throttled_entries += 1;
                    }
                    if !codes.contains(&code) {
                        codes.push(code.clone());
                    }
                    if attempts >= self.policy.max_attempts {
                        let message = format!("not delivered after {attempts} attempts: {code}");
                        tracing::error!(
                            index = first.index,
                            sub_sequence_number = first.sub_sequence_number,
                            "{message}"
                        );
                        lose(stats, report, first, users as u64, message);
                        continue;
                    }
                    stats.retried_entries += 1;
                    again.push((staged_entry, attempts, Some(code)));
                }
                EntryOutcome::Resend => {
                    stats.retried_entries += 1;
                    again.push((staged_entry, attempts, last_error));
                }
            }
        }
        if !codes.is_empty() {
            tracing::warn!(
                entries = again.len(),
                "entries refused, sent again after a back-off: {}",
                codes.join(", ")
            );
        }
        // Sent again first, in their order, and rebuilt where the sink says so.
        for (s, attempts, last_error) in again.into_iter().rev() {
            packer.repack(s, staged);
            for s in staged.drain(..).rev() {
                ready.push_front(Pending {
                    staged: s,
                    attempts,
                    last_error: last_error.clone(),
                });
            }
        }
        if refused {
            Round::SomeRefused
        } else {
            Round::AllDelivered
        }
    }

    /// Reports every entry of `ready` as undelivered.
    fn give_up(
        &self,
        ready: &mut VecDeque<Pending<S::Entry>>,
        report: &impl Report,
        stats: &mut SinkStats,
        why: &str,
    ) {
        if let Some(first) = ready.iter().map(|p| p.staged.first).min() {
            let p = ready
                .iter()
                .find(|p| p.staged.first == first)
                .expect("the minimum is in ready");
            let message = match &p.last_error {
                Some(code) => format!("{why} (last refused: {code})"),
                None => why.to_string(),
            };
            tracing::warn!(
                entries = ready.len(),
                "{message}; its user records are not delivered"
            );
            report.undelivered(first, message);
        }
        for p in ready.drain(..) {
            stats.undelivered_user_records += p.staged.user_records as u64;
        }
    }

    /// Reports the user records pushed but never packed as undelivered.
    fn give_up_incoming(&mut self, report: &impl Report, stats: &mut SinkStats, why: &str) {
        self.receiver.close();
        while let Ok((_, context)) = self.receiver.try_recv() {
            lose(stats, report, Position::of(&context), 1, why.to_string());
        }
        self.outbox.close();
    }
}

/// Counts `user_records` undelivered, the first at `first`, and reports it, saying why.
fn lose(
    stats: &mut SinkStats,
    report: &impl Report,
    first: Position,
    user_records: u64,
    why: String,
) {
    stats.undelivered_user_records += user_records;
    report.undelivered(first, why);
}

/// What one request came to.
enum Round {
    AllDelivered,
    SomeRefused,
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After each of `n` pushes of `pk` and `data` bytes: whether a request was waiting.
    fn waiting_after(limits: Limits, n: usize, pk: &str, data: &[u8]) -> Vec<bool> {
        let (outbox, _receiver) = Outbox::new(limits);
        (0..n)
            .map(|_| {
                let record = UserRecord::plain(pk, None, bytes::Bytes::copy_from_slice(data));
                assert!(outbox.push(record, RecordContext::new("1")));
                outbox.request_waiting()
            })
            .collect()
    }

    #[test]
    fn a_request_is_waiting_once_a_full_one_was_pushed_by_bytes_or_by_records() {
        let limits = |max_entries, max_request_bytes| Limits {
            max_entries,
            max_request_bytes,
            max_entry_bytes: max_request_bytes,
        };
        // 12 bytes a push (data and key): the 9th reaches 100, the 18th 100 again.
        let by_bytes = waiting_after(limits(1_000, 100), 18, "pk", &[0; 10]);
        let at: Vec<_> = (0..18).filter(|&i| by_bytes[i]).map(|i| i + 1).collect();
        assert_eq!(at, [9, 18]);
        let by_records = waiting_after(limits(4, 1 << 20), 8, "pk", b"x");
        let at: Vec<_> = (0..8).filter(|&i| by_records[i]).map(|i| i + 1).collect();
        assert_eq!(at, [4, 8]);
    }
}
