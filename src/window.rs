//! Tumbling windows: typed state carried from invocation to invocation, exact under partial
//! failures, and the window's result at its final invocation.
//!
//! With `TumblingWindowInSeconds` on the event source mapping, each invocation gets the state
//! the previous invocation of the window answered, and must answer a state (Lambda counts a
//! response without one as a failed invocation). A [`Window`] says how a user record changes
//! the state and what to do with the final state; the processor does the rest:
//!
//! - **Exact state.** Lambda retries from the reported Kinesis record, every user record of
//!   it again. So the state answered reflects every user record of the Kinesis records before
//!   the reported one and none of it or after it: the state is folded after the batch, over
//!   the records that count, in batch order (also in the concurrent mode, and with a sink
//!   whose failures are known only at the end).
//! - **The final invocation** (`isFinalInvokeForWindow`, or `isWindowTerminatedEarly`) calls
//!   [`Window::close`] once every record of it succeeded. If one did not, or `close` fails,
//!   the invocation fails as a whole: Lambda retries a failed final invocation until it
//!   succeeds, with the same state, so the result is emitted once, complete. What `close`
//!   hands to the sink ([`WindowEnd::emit`]) is delivered at least once: a record not
//!   delivered fails the invocation too.
//! - **State size.** Lambda keeps at most 1 MB of state per shard. A state that would
//!   serialize larger than `DEAGG_WINDOW_STATE_MAX_BYTES` is closed early instead (with
//!   [`WindowEnd::cut_by_size`] set) and the window goes on from the default state, so no
//!   user record is lost from the results: one window then has two results, each exact.
//!
//! `docs/windows.md` cites Lambda's documented behaviour behind these rules.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::TumblingWindow;
use crate::kpl::{UserRecord, UserRecords};
use crate::metrics::{Dimensions, Metrics};
use crate::transform::{Batch, Error, RecordContext};

mod report;

pub use report::{HotKeyReport, KeyCount, ReportState};

/// An aggregation over a tumbling window: see the [module docs](self).
///
/// # Examples
///
/// Counting user records per partition key, and logging the counts when the window ends:
///
/// ```
/// use std::collections::BTreeMap;
/// use kinesis_deagg::kpl::UserRecord;
/// use kinesis_deagg::transform::{Error, RecordContext};
/// use kinesis_deagg::window::{Window, WindowEnd};
///
/// struct PerKey;
///
/// impl Window for PerKey {
///     type State = BTreeMap<String, u64>;
///     fn update(&self, state: &mut Self::State, record: &UserRecord, _: &RecordContext) {
///         *state.entry(record.partition_key().to_owned()).or_default() += 1;
///     }
///     async fn close(&self, state: Self::State, end: &WindowEnd) -> Result<(), Error> {
///         tracing::info!(start = %end.start(), counts = ?state, "window closed");
///         Ok(())
///     }
/// }
/// ```
pub trait Window {
    /// What is carried from one invocation of a window to the next. It must serialize as a
    /// JSON object (Lambda's `state`); a window's first invocation (state `{}` or none)
    /// starts from `Default`.
    type State: Serialize + DeserializeOwned + Default;

    /// Counts one user record in the state. Called after the batch, in batch order, for the
    /// user records of every Kinesis record before the reported one (the transform accepted
    /// them all, and a sink delivered them).
    fn update(&self, state: &mut Self::State, record: &UserRecord, context: &RecordContext);

    /// [`Window::update`] for each user record of one Kinesis record. The built-in report
    /// counts an aggregate here without making its user records.
    #[doc(hidden)]
    fn update_all(
        &self,
        state: &mut Self::State,
        users: &UserRecords,
        context: &mut RecordContext,
    ) {
        for user in users.clone() {
            context.set_sub_sequence_number(user.sub_sequence_number());
            self.update(state, &user, context);
        }
    }

    /// Called once after the invocation's updates, before the state is answered or closed:
    /// for work better done once per batch than once per user record.
    fn settle(&self, state: &mut Self::State) {
        let _ = state;
    }

    /// Emits the result of a window from its final state: to the log, to the invocation's
    /// metrics document ([`WindowEnd::metrics`]), to the processor's sink
    /// ([`WindowEnd::emit`]), or anywhere else. An `Err` fails the invocation, and Lambda
    /// calls it again with the same state.
    fn close(&self, state: Self::State, end: &WindowEnd)
    -> impl Future<Output = Result<(), Error>>;
}

/// What [`Window::close`] knows of the window that ends.
#[derive(Debug)]
pub struct WindowEnd {
    window: TumblingWindow,
    cut_by_size: bool,
    metrics: Metrics,
    pub(crate) dims: Dimensions,
    pub(crate) namespace: Option<String>,
    /// What [`WindowEnd::emit`] was given; `None` when the processor has no sink.
    emitted: Option<Mutex<Vec<UserRecord>>>,
}

impl WindowEnd {
    /// When the window started (ISO 8601, as Lambda sent it).
    pub fn start(&self) -> &str {
        &self.window.start
    }

    /// When it ends.
    pub fn end(&self) -> &str {
        &self.window.end
    }

    /// The shard (`shardId`).
    pub fn shard_id(&self) -> Option<&str> {
        self.window.shard_id.as_deref()
    }

    /// The stream or consumer ARN.
    pub fn event_source_arn(&self) -> Option<&str> {
        self.window.event_source_arn.as_deref()
    }

    /// Lambda ended the window before its time (`isWindowTerminatedEarly`).
    pub fn terminated_early(&self) -> bool {
        self.window.is_window_terminated_early
    }

    /// The state grew past the size limit: this is part of the window's result, and the
    /// window goes on from the default state.
    pub fn cut_by_size(&self) -> bool {
        self.cut_by_size
    }

    /// Counters for the invocation's metrics document.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends `record` to the processor's sink (the one `DEAGG_SINK` names, or
    /// [`Processor::with_sink`](crate::Processor::with_sink)'s) once `close` returns `Ok`.
    /// If the sink cannot deliver every record emitted, the invocation fails with
    /// [`WindowError::Undelivered`] and Lambda calls `close` again with the same state: a
    /// result is delivered at least once. Each record's
    /// [`idempotency_key`](crate::transform::RecordContext::idempotency_key) names its content,
    /// `window:<shard>:<start>:<MD5 of its keys and data>`: the same on every try, whatever the
    /// order of emission (two identical records of one window share it).
    ///
    /// # Examples
    ///
    /// ```
    /// # use kinesis_deagg::kpl::UserRecord;
    /// # use kinesis_deagg::transform::{Error, RecordContext};
    /// # use kinesis_deagg::window::{Window, WindowEnd};
    /// struct Total;
    ///
    /// impl Window for Total {
    ///     type State = std::collections::BTreeMap<String, u64>;
    ///     fn update(&self, state: &mut Self::State, _: &UserRecord, _: &RecordContext) {
    ///         *state.entry("userRecords".into()).or_default() += 1;
    ///     }
    ///     async fn close(&self, state: Self::State, end: &WindowEnd) -> Result<(), Error> {
    ///         let body = serde_json::to_vec(&state)?;
    ///         end.emit(UserRecord::plain(end.shard_id().unwrap_or("all"), None, body.into()))
    ///     }
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// When the processor has no sink.
    pub fn emit(&self, record: UserRecord) -> Result<(), Error> {
        let emitted = self.emitted.as_ref().ok_or(
            "the window's result cannot be emitted: the function has no sink (DEAGG_SINK)",
        )?;
        emitted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(record);
        Ok(())
    }

    fn take_emitted(self) -> Vec<UserRecord> {
        self.emitted
            .map(|e| {
                e.into_inner()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            })
            .unwrap_or_default()
    }
}

/// What the window step made of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowStats {
    /// Bytes of the state answered.
    pub state_bytes: u64,
    /// Windows closed: 1 at a final invocation, 1 when the state was cut by size.
    pub closed: u64,
    /// Times the state was cut by size (0 or 1).
    pub cut_by_size: u64,
    /// User records the window's result delivered to the sink ([`WindowEnd::emit`]).
    pub emitted: u64,
}

/// Why a window invocation fails as a whole (Lambda retries it with the same state).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// The state Lambda sent does not read as the window's state type.
    #[error("the window state does not read as this function's state: {0}")]
    State(String),
    /// The state does not serialize, or not as a JSON object.
    #[error("the window state does not serialize as a JSON object: {0}")]
    Serialize(String),
    /// A record of the final invocation failed: the result would miss it.
    #[error(
        "record {0} of the window's final invocation failed; failing the invocation so that Lambda retries it whole"
    )]
    FinalIncomplete(String),
    /// [`Window::close`] failed.
    #[error("closing the window failed: {0}")]
    Close(Error),
    /// The sink did not deliver every record [`WindowEnd::emit`] was given.
    #[error("the sink did not deliver the window's result: {0}")]
    Undelivered(String),
}

/// The state of a window event's response: a serialized JSON object.
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct State(Box<RawValue>);

impl State {
    /// The state's JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

/// A [`Window`] with its state type erased, so that the processor holds any window (the
/// state is converted once per invocation; `update` is called without indirection).
pub(crate) trait ErasedWindow {
    fn run<'a>(&'a self, step: Step<'a>) -> Running<'a>;
}

/// The window step of one invocation, under way.
pub(crate) type Running<'a> = Pin<Box<dyn Future<Output = Result<Answer, WindowError>> + 'a>>;

/// What the window step answers: the state, its stats, and what `close` emitted, for the
/// processor to deliver to its sink.
pub(crate) struct Answer {
    pub(crate) state: State,
    pub(crate) stats: WindowStats,
    pub(crate) emitted: Vec<UserRecord>,
}

/// What one invocation gives the window step.
pub(crate) struct Step<'a> {
    pub(crate) window: &'a TumblingWindow,
    pub(crate) batch: &'a Arc<Batch>,
    /// Each Kinesis record's user records, for the records reached.
    pub(crate) user_records: &'a [UserRecords],
    /// The reported record's index (the batch's length when none is).
    pub(crate) floor: usize,
    pub(crate) max_state_bytes: usize,
    pub(crate) dims: &'a Dimensions,
    /// The metrics namespace, when metrics are on.
    pub(crate) namespace: Option<&'a str>,
    /// Whether the processor has a sink for [`WindowEnd::emit`].
    pub(crate) sink: bool,
}

impl<W: Window> ErasedWindow for W {
    fn run<'a>(&'a self, step: Step<'a>) -> Running<'a> {
        Box::pin(run(self, step))
    }
}

async fn run<W: Window>(window: &W, step: Step<'_>) -> Result<Answer, WindowError> {
    // A window's first invocation brings `{}` (or nothing).
    let mut state: W::State = match &step.window.state {
        serde_json::Value::Null => W::State::default(),
        serde_json::Value::Object(fields) if fields.is_empty() => W::State::default(),
        value => W::State::deserialize(value).map_err(|e| WindowError::State(e.to_string()))?,
    };
    for (index, users) in step.user_records[..step.floor].iter().enumerate() {
        let mut context = RecordContext::of(step.batch, index, None);
        window.update_all(&mut state, users, &mut context);
    }
    window.settle(&mut state);
    let mut stats = WindowStats {
        state_bytes: 0,
        closed: 0,
        cut_by_size: 0,
        emitted: 0,
    };
    let end = |cut_by_size| WindowEnd {
        window: step.window.clone(),
        cut_by_size,
        metrics: step.batch.metrics.clone(),
        dims: step.dims.clone(),
        namespace: step.namespace.map(str::to_owned),
        emitted: step.sink.then(Mutex::default),
    };
    let w = step.window;
    if w.is_final_invoke_for_window || w.is_window_terminated_early {
        if let Some(reported) = step.batch.records.get(step.floor) {
            return Err(WindowError::FinalIncomplete(
                reported.sequence_number.to_string(),
            ));
        }
        let answered = serialize(&state)?;
        let end = end(false);
        window
            .close(state, &end)
            .await
            .map_err(WindowError::Close)?;
        stats.closed = 1;
        stats.state_bytes = answered.json().len() as u64;
        return Ok(Answer {
            state: answered,
            stats,
            emitted: end.take_emitted(),
        });
    }
    let mut answered = serialize(&state)?;
    let mut emitted = Vec::new();
    if answered.json().len() > step.max_state_bytes {
        tracing::error!(
            state_bytes = answered.json().len(),
            max_state_bytes = step.max_state_bytes,
            window_start = %w.start,
            "the window state would exceed DEAGG_WINDOW_STATE_MAX_BYTES: closing this part of the window now and going on from the default state"
        );
        let end = end(true);
        window
            .close(state, &end)
            .await
            .map_err(WindowError::Close)?;
        stats.closed = 1;
        stats.cut_by_size = 1;
        answered = serialize(&W::State::default())?;
        emitted = end.take_emitted();
    }
    stats.state_bytes = answered.json().len() as u64;
    Ok(Answer {
        state: answered,
        stats,
        emitted,
    })
}

/// The state as Lambda takes it: a JSON object.
fn serialize<S: Serialize>(state: &S) -> Result<State, WindowError> {
    let json = serde_json::to_string(state).map_err(|e| WindowError::Serialize(e.to_string()))?;
    if !json.starts_with('{') {
        return Err(WindowError::Serialize(format!(
            "it serializes as {}",
            json.chars().take(40).collect::<String>()
        )));
    }
    RawValue::from_string(json)
        .map(State)
        .map_err(|e| WindowError::Serialize(e.to_string()))
}

/// The state answered by a processor without a window: an empty object.
pub(crate) fn empty_state() -> State {
    State(RawValue::from_string("{}".into()).expect("valid JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_equal_when_their_json_is() {
        let state = |v: serde_json::Value| serialize(&v).unwrap();
        let a = state(serde_json::json!({"a": 1}));
        assert_eq!(a, state(serde_json::json!({"a": 1})));
        assert_ne!(a, state(serde_json::json!({"a": 2})));
        assert_eq!(empty_state(), state(serde_json::json!({})));
        assert!(serialize(&[1]).is_err());
    }
}
