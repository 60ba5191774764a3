//! The checksum verdicts of a batch's aggregates: computed side by side on this thread, or on
//! a second core and handed over one by one as they are known, so that the caller can split
//! and use the first aggregates while the MD5s of the later ones are still being computed.
//!
//! A verdict, in the terms of `finish`: `Some(true)` the MD5 trailer matches, `Some(false)` it
//! does not, `None` the record is not shaped like an aggregate (or is not checked).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;

use super::checksum_parts;
use super::md5_many::{Order, md5_each};

pub(super) struct Verdicts {
    /// By record; `None` while its MD5 is still being computed.
    known: Vec<Option<Option<bool>>>,
    coming: Option<Coming>,
}

/// The thread computing the MD5s, and what it has sent.
struct Coming {
    /// (record index, whether its checksum matches), in the order the MD5s finish.
    verdicts: mpsc::Receiver<(usize, bool)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Verdicts {
    /// Every record's verdict, computed here, side by side.
    pub(super) fn now(records: &[Bytes]) -> Self {
        let (shaped, bodies, trailers) = aggregates(records);
        // A mismatch until its digest says otherwise: the safe side.
        let mut verdicts = vec![None; records.len()];
        for &i in &shaped {
            verdicts[i] = Some(false);
        }
        md5_each(&bodies, Order::LongestFirst, &mut |k, digest| {
            verdicts[shaped[k]] = Some(digest[..] == *trailers[k]);
            true
        });
        Verdicts {
            known: verdicts.into_iter().map(Some).collect(),
            coming: None,
        }
    }

    /// No record checked: every verdict `None`.
    pub(super) fn unchecked(records: &[Bytes]) -> Self {
        Verdicts {
            known: vec![Some(None); records.len()],
            coming: None,
        }
    }

    /// The verdicts computed on another thread, in batch order, each one known as soon as its
    /// MD5 is (or all of them now, on this thread, if no thread can be made: a process limit
    /// only costs the parallelism).
    pub(super) fn on_a_thread(records: &[Bytes]) -> Self {
        let (shaped, _, _) = aggregates(records);
        let mut known = vec![Some(None); records.len()];
        for &i in &shaped {
            known[i] = None;
        }
        // The thread owns its records (sharing their buffers) and sends what it finds.
        let owned: Vec<Bytes> = shaped.iter().map(|&i| records[i].clone()).collect();
        let (send, verdicts) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let work = move || {
            let (_, bodies, trailers) = aggregates(&owned);
            md5_each(&bodies, Order::AsGiven, &mut |k, digest| {
                let matches = digest[..] == *trailers[k];
                send.send((shaped[k], matches)).is_ok() && !stopped.load(Ordering::Relaxed)
            });
        };
        match std::thread::Builder::new().spawn(work) {
            Ok(thread) => Verdicts {
                known,
                coming: Some(Coming {
                    verdicts,
                    stop,
                    thread: Some(thread),
                }),
            },
            Err(_) => Self::now(records),
        }
    }

    /// Record `i`'s verdict if it is known yet.
    pub(super) fn get(&mut self, i: usize) -> Option<Option<bool>> {
        if self.known[i].is_none()
            && let Some(coming) = &self.coming
        {
            for (j, matches) in coming.verdicts.try_iter() {
                self.known[j] = Some(Some(matches));
            }
        }
        self.known[i]
    }

    /// Record `i`'s verdict, waiting for it if need be.
    pub(super) fn wait(&mut self, i: usize) -> Option<bool> {
        loop {
            if let Some(verdict) = self.get(i) {
                return verdict;
            }
            let Some(coming) = &mut self.coming else {
                unreachable!("a verdict is only missing while a thread computes it")
            };
            match coming.verdicts.recv() {
                Ok((j, matches)) => self.known[j] = Some(Some(matches)),
                Err(_) => {
                    // The thread ended without it: a panic there is a bug, raised here as
                    // such; otherwise a mismatch is the safe verdict.
                    if let Some(Err(panic)) = coming.thread.take().map(JoinHandle::join) {
                        std::panic::resume_unwind(panic);
                    }
                    for verdict in self.known.iter_mut().filter(|v| v.is_none()) {
                        *verdict = Some(Some(false));
                    }
                }
            }
        }
    }
}

impl Drop for Coming {
    /// Stops the thread at its next digest and waits for it, so that no buffer of the batch
    /// outlives the batch (the runtime reuses the body's memory for the next event).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic there was already raised by `wait`, or concerns verdicts no one needs.
            let _ = thread.join();
        }
    }
}

/// The records shaped like aggregates: their indices, protobuf bodies and MD5 trailers.
fn aggregates(records: &[Bytes]) -> (Vec<usize>, Vec<&[u8]>, Vec<&[u8]>) {
    let mut shaped = Vec::new();
    let mut bodies = Vec::new();
    let mut trailers = Vec::new();
    for (i, data) in records.iter().enumerate() {
        if let Some((body, trailer)) = checksum_parts(data) {
            shaped.push(i);
            bodies.push(body);
            trailers.push(trailer);
        }
    }
    (shaped, bodies, trailers)
}
