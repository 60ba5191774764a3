//! The fields a tumbling-window event adds beside `Records`.
//!
//! With `TumblingWindowInSeconds` set on the event source mapping, Lambda adds `window`
//! (`start`, `end`), `state` (what the previous invocation of the window answered), `shardId`,
//! `eventSourceARN`, `isFinalInvokeForWindow` and `isWindowTerminatedEarly`. An event with a
//! `window` is a window event; any other is a plain one.

use serde::Deserialize;
use serde_json::Value;

/// The top-level fields of a window event (both readers keep these, and only these, beside
/// `Records`).
pub(super) const WINDOW_FIELDS: [&str; 6] = [
    "window",
    "state",
    "shardId",
    "eventSourceARN",
    "isFinalInvokeForWindow",
    "isWindowTerminatedEarly",
];

/// What a tumbling-window event says about its window.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::event::KinesisEvent;
/// let event = KinesisEvent::from_slice(br#"{"Records":[],
///     "window":{"start":"2020-12-09T07:04:00Z","end":"2020-12-09T07:06:00Z"},
///     "state":{"1":282},"shardId":"shardId-000000000006","isFinalInvokeForWindow":true}"#).unwrap();
/// let window = event.window.unwrap();
/// assert_eq!(window.end, "2020-12-09T07:06:00Z");
/// assert_eq!(window.state["1"], 282);
/// assert!(window.is_final_invoke_for_window && !window.is_window_terminated_early);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct TumblingWindow {
    /// When the window starts (ISO 8601, as Lambda wrote it).
    pub start: String,
    /// When it ends.
    pub end: String,
    /// The state the previous invocation of this window answered (`null` when absent, as in
    /// a window's first invocation).
    pub state: Value,
    /// The shard (`shardId`).
    pub shard_id: Option<String>,
    /// The stream or consumer ARN (`eventSourceARN`).
    pub event_source_arn: Option<String>,
    /// The last invocation of the window: the state is final, the result is due.
    pub is_final_invoke_for_window: bool,
    /// Lambda ended the window before its time (its state grew past 1 MB, or the shard
    /// ended); the next invocation starts afresh.
    pub is_window_terminated_early: bool,
}

/// The window fields as they come; serde refuses a field given twice, in both readers.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct WindowFields {
    window: Option<Bounds>,
    #[serde(default)]
    state: Value,
    shard_id: Option<String>,
    #[serde(rename = "eventSourceARN")]
    event_source_arn: Option<String>,
    is_final_invoke_for_window: Option<bool>,
    is_window_terminated_early: Option<bool>,
}

#[derive(Deserialize)]
struct Bounds {
    start: String,
    end: String,
}

impl WindowFields {
    /// The window, when the event has one (`null` counts as none).
    pub(super) fn into_window(self) -> Option<TumblingWindow> {
        let Bounds { start, end } = self.window?;
        Some(TumblingWindow {
            start,
            end,
            state: self.state,
            shard_id: self.shard_id,
            event_source_arn: self.event_source_arn,
            is_final_invoke_for_window: self.is_final_invoke_for_window.unwrap_or(false),
            is_window_terminated_early: self.is_window_terminated_early.unwrap_or(false),
        })
    }
}
