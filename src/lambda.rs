//! The Lambda glue: the batch processor, served by [`run`](crate::run), or as a tower
//! `Service` by `lambda_runtime::run` (and any tower layer).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use lambda_runtime::{LambdaEvent, Service};

use std::io::Write;

use tracing::Instrument;

use crate::batch::{self, BatchOutcome, Response};
use crate::event::{EventError, EventRecord, KinesisEvent, TumblingWindow};
use crate::kpl::Verifier;
use crate::metrics::{self, Dimensions};
use crate::settings::Settings;
use crate::settings::Switch;
use crate::sink::{NoSink, Sink};
use crate::transform::{Batch, Transform};
use crate::window::{self, ErasedWindow, Step, Window, WindowError};

/// A transform and the settings it runs with: the handler of a Kinesis Lambda function.
///
/// Cloning is cheap (the two are shared), as tower services expect.
///
/// # Examples
///
/// What [`kinesis_deagg::main`](crate::main) does inside Lambda, in a `main` of one's own
/// (with tokio's `rt` and `macros` features):
///
/// ```no_run
/// use kinesis_deagg::prelude::*;
///
/// #[tokio::main(flavor = "current_thread")]
/// async fn main() -> Result<(), Error> {
///     kinesis_deagg::logging::init();
///     let transform = |record: UserRecord, ctx: RecordContext| async move {
///         tracing::info!(key = %ctx.idempotency_key(), bytes = record.data().len(), "got one");
///         Ok::<(), Error>(())
///     };
///     kinesis_deagg::run(Processor::new(transform, Settings::from_env()?)).await
/// }
/// ```
///
/// A processor is also a tower `Service<LambdaEvent<KinesisEvent>>`, so `lambda_runtime::run`
/// and tower layers serve it too, at the cost described in [`run`](crate::run).
pub struct Processor<T, S = NoSink> {
    inner: Arc<Inner<T, S>>,
}

struct Inner<T, S> {
    transform: T,
    /// Where accepted user records go, if anywhere.
    sink: Option<S>,
    /// What a tumbling-window event's state is, if the function keeps one.
    window: Option<Arc<dyn ErasedWindow>>,
    settings: Settings,
    /// The metrics' `FunctionName` dimension.
    function_name: String,
}

impl<T, S> Clone for Processor<T, S> {
    fn clone(&self) -> Self {
        Processor {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Transform> Processor<T> {
    /// A processor running `transform` with `settings`, without a sink. Its metrics name the
    /// function `AWS_LAMBDA_FUNCTION_NAME` (outside Lambda, the name of the executable).
    pub fn new(transform: T, settings: Settings) -> Self {
        Self::make(transform, None, settings)
    }
}

impl<T: Transform, S: Sink> Processor<T, S> {
    /// A processor running `transform` with `settings`, delivering what it accepts to
    /// `sink` (see [`crate::sink`]).
    pub fn with_sink(transform: T, sink: S, settings: Settings) -> Self {
        Self::make(transform, Some(sink), settings)
    }

    fn make(transform: T, sink: Option<S>, settings: Settings) -> Self {
        let function_name =
            std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| program_name());
        Processor {
            inner: Arc::new(Inner {
                transform,
                sink,
                window: None,
                settings,
                function_name,
            }),
        }
    }

    /// The processor with `window` keeping the state of tumbling-window events (see
    /// [`crate::window`]). Without one, a window event is answered with an empty state.
    ///
    /// # Panics
    ///
    /// When the processor was cloned already: give it its window first.
    pub fn with_window(self, window: impl Window + 'static) -> Self {
        self.with_erased_window(Some(Arc::new(window)))
    }

    pub(crate) fn with_erased_window(mut self, window: Option<Arc<dyn ErasedWindow>>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_window is called before the processor is cloned")
            .window = window;
        self
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Processes one event: what the Lambda handler does, without the Runtime API. Unless
    /// `DEAGG_METRICS=off`, it prints the invocation's metrics document (EMF) on stdout.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::{Processor, Settings, event::KinesisEvent};
    /// use kinesis_deagg::transform::{Builtin, BuiltinTransform};
    ///
    /// let processor = Processor::new(BuiltinTransform::new(Builtin::Json, 0), Settings::default());
    /// let event = KinesisEvent::from_slice(br#"{"Records":[
    ///   {"kinesis":{"sequenceNumber":"1","data":"e30="}},
    ///   {"kinesis":{"sequenceNumber":"2","data":"bm90IGpzb24="}}]}"#).unwrap();
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// let outcome = rt.block_on(processor.handle(&event, None)).unwrap();
    /// assert_eq!(outcome.failure.unwrap().sequence_number, "2");
    /// assert_eq!(outcome.stats.succeeded, 1);
    /// ```
    ///
    /// # Errors
    ///
    /// Only for a tumbling-window event, when the invocation must fail as a whole (see
    /// [`WindowError`]).
    pub async fn handle(
        &self,
        event: &KinesisEvent,
        deadline: Option<Instant>,
    ) -> Result<BatchOutcome, WindowError> {
        let window = event.window.as_ref();
        self.handle_verified(event.records.clone(), window, Verifier::default(), deadline)
            .await
    }

    /// [`Processor::handle`] on records of its own (they become the batch the contexts
    /// share), with the checks `verifier` has under way.
    async fn handle_verified(
        &self,
        records: Vec<EventRecord>,
        window: Option<&TumblingWindow>,
        verifier: Verifier,
        deadline: Option<Instant>,
    ) -> Result<BatchOutcome, WindowError> {
        let Inner {
            transform,
            sink,
            window: keeper,
            settings,
            function_name,
        } = &*self.inner;
        let (invoked_at, started) = (SystemTime::now(), Instant::now());
        let batch = Batch::new(records);
        let mut dims = dimensions(function_name, &batch.records);
        // A window's final invocation often has no record: the window names its shard.
        if let (Some(w), true) = (window, batch.records.is_empty()) {
            if let Some(shard) = &w.shard_id {
                dims.shard_id = shard.clone();
            }
            if let Some((_, name)) = w
                .event_source_arn
                .as_deref()
                .and_then(|a| a.split_once(":stream/"))
            {
                dims.stream_name = name.into();
            }
        }
        let span =
            tracing::info_span!("batch", shard_id = %dims.shard_id, stream = %dims.stream_name);
        let keep = window.is_some() && keeper.is_some();
        let (mut outcome, user_records) = batch::process_verified(
            &batch,
            verifier,
            transform,
            sink.as_ref(),
            settings,
            deadline,
            keep,
        )
        .instrument(span.clone())
        .await;
        let namespace = (settings.metrics == Switch::On).then_some(&*settings.metrics_namespace);
        match (window, keeper) {
            (Some(window), Some(keeper)) => {
                let step = Step {
                    window,
                    batch: &batch,
                    user_records: &user_records,
                    floor: outcome
                        .failure
                        .as_ref()
                        .map_or(batch.records.len(), |f| f.index),
                    max_state_bytes: settings.window_state_max_bytes,
                    dims: &dims,
                    namespace,
                    sink: sink.is_some(),
                };
                let result = async {
                    let mut answer = keeper.run(step).await?;
                    if let (Some(sink), false) = (sink, answer.emitted.is_empty()) {
                        let emitted = std::mem::take(&mut answer.emitted);
                        let (stats, delivered) =
                            batch::deliver_emitted(sink, emitted, window, settings, deadline).await;
                        outcome.stats.sink.get_or_insert_default().add(&stats);
                        answer.stats.emitted = delivered.map_err(WindowError::Undelivered)?;
                    }
                    Ok(answer)
                };
                let answer = result
                    .instrument(span)
                    .await
                    .inspect_err(|e: &WindowError| tracing::error!("{e}"))?;
                outcome.state = Some(answer.state);
                outcome.stats.window = Some(answer.stats);
                // `close` may have added some.
                outcome.metrics = batch.metrics.snapshot();
            }
            (Some(_), None) => outcome.state = Some(window::empty_state()),
            (None, _) => {}
        }
        if settings.metrics == Switch::On {
            let doc = metrics::document(
                &settings.metrics_namespace,
                &dims,
                &outcome,
                invoked_at,
                started.elapsed(),
            );
            // Lambda reads EMF documents from stdout. A closed stdout loses the metrics, not
            // the batch.
            if let Err(e) = writeln!(std::io::stdout().lock(), "{doc}") {
                tracing::warn!("could not write the metrics document: {e}");
            }
        }
        Ok(outcome)
    }

    /// Handles one invocation body as Lambda sends it: reads the event (its data decoded in
    /// the body, see [`KinesisEvent::from_owned`]), processes it and gives the response. What
    /// [`run`](crate::run) calls.
    ///
    /// # Errors
    ///
    /// When the body is not a Kinesis event (see [`KinesisEvent::from_slice`]): Lambda
    /// retries the whole batch.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::{Processor, Settings};
    /// use kinesis_deagg::transform::{Builtin, BuiltinTransform};
    ///
    /// let processor = Processor::new(BuiltinTransform::new(Builtin::Json, 0), Settings::default());
    /// let body = br#"{"Records":[{"kinesis":{"sequenceNumber":"7","data":"bm90IGpzb24="}}]}"#;
    /// let context = lambda_runtime::Context::default();
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// let response = rt.block_on(processor.handle_body(&body[..], &context)).unwrap();
    /// assert_eq!(response.batch_item_failures[0].item_identifier.as_deref(), Some("7"));
    /// ```
    pub async fn handle_body(
        &self,
        body: impl Into<bytes::BytesMut>,
        context: &lambda_runtime::Context,
    ) -> Result<Response, InvocationError> {
        // The aggregates' MD5s are checked on a second core while the rest of the body is
        // read, when there is one.
        let mut verifier = Verifier::default();
        let verify = self.inner.settings.verify_checksum;
        let event = KinesisEvent::from_owned_each(body, |data| {
            if verify {
                verifier.push(data);
            }
        })?;
        let window = event.window.as_ref();
        let outcome = self.handle_verified(event.records, window, verifier, deadline(context));
        Ok(outcome.await?.response())
    }
}

/// Why an invocation fails as a whole (Lambda retries the batch).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    /// The body is not a Kinesis event.
    #[error(transparent)]
    Event(#[from] EventError),
    /// A tumbling-window event's state or result (see [`WindowError`]).
    #[error(transparent)]
    Window(#[from] WindowError),
}

impl InvocationError {
    /// The `errorType` Lambda is told: `EventError` or `WindowError`.
    pub fn error_type(&self) -> &'static str {
        match self {
            InvocationError::Event(_) => "EventError",
            InvocationError::Window(_) => "WindowError",
        }
    }
}

/// The name of the running executable (`kinesis-deagg` when it has none).
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "kinesis-deagg".into())
}

/// The metrics' dimensions for an event: one invocation holds records of one shard.
fn dimensions(function_name: &str, records: &[EventRecord]) -> Dimensions {
    let first = records.first();
    let stream_name = first
        .and_then(|r| r.event_source_arn.as_deref())
        .and_then(|arn| arn.split_once(":stream/"))
        .map_or("unknown", |(_, name)| name);
    let shard_id = first
        .and_then(|r| r.shard_id.as_deref())
        .unwrap_or("unknown");
    Dimensions {
        function_name: function_name.into(),
        stream_name: stream_name.into(),
        shard_id: shard_id.into(),
    }
}

/// Deadlines below this (September 2001, in ms since the epoch) are not timestamps.
const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;

/// The invocation's deadline as an `Instant`; `None` when the context has none.
///
/// Lambda sends the deadline as milliseconds since the epoch. Some emulators do not
/// (cargo-lambda 1.9's `watch` sends the timeout, `600000`): read as a timestamp, that is in
/// 1970 and the handler would stop before its first record. Such a value is not a deadline.
fn deadline(context: &lambda_runtime::Context) -> Option<Instant> {
    if context.deadline < EPOCH_MS_FLOOR {
        if context.deadline != 0 {
            tracing::warn!(
                deadline_ms = context.deadline,
                "the invocation deadline is not a timestamp (an emulator?); running without one"
            );
        }
        return None;
    }
    let deadline = SystemTime::UNIX_EPOCH + Duration::from_millis(context.deadline);
    let remaining = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tracing::debug!(
        deadline_ms = context.deadline,
        remaining_ms = remaining.as_millis() as u64,
        "invocation deadline"
    );
    Some(Instant::now() + remaining)
}

impl<T: Transform + 'static, S: Sink + 'static> Service<LambdaEvent<KinesisEvent>>
    for Processor<T, S>
{
    type Response = Response;
    type Error = lambda_runtime::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, lambda_runtime::Error>>>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: LambdaEvent<KinesisEvent>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let deadline = deadline(&request.context);
            // The event is ours: its records go to the batch without a copy.
            let KinesisEvent { records, window } = request.payload;
            let outcome =
                this.handle_verified(records, window.as_ref(), Verifier::default(), deadline);
            Ok(outcome.await?.response())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(deadline: u64) -> lambda_runtime::Context {
        let mut c = lambda_runtime::Context::default();
        c.deadline = deadline;
        c
    }

    #[test]
    fn a_deadline_in_epoch_milliseconds_becomes_an_instant() {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let left = deadline(&context(now_ms + 5_000)).unwrap() - Instant::now();
        assert!(
            left > Duration::from_millis(4_000) && left <= Duration::from_millis(5_000),
            "{left:?}"
        );
        // Already past: no time left, not a panic.
        assert!(deadline(&context(now_ms - 5_000)).unwrap() <= Instant::now());
    }

    #[test]
    fn a_missing_or_relative_deadline_is_no_deadline() {
        assert_eq!(deadline(&context(0)), None);
        assert_eq!(deadline(&context(600_000)), None);
    }

    #[tokio::test]
    async fn as_a_service_it_reports_the_failed_record_and_gives_contexts_their_details() {
        use crate::kpl::UserRecord;
        use crate::transform::RecordContext;
        let transform = |r: UserRecord, c: RecordContext| async move {
            match (&r.data()[..], c.shard_id()) {
                (b"bad", Some("shardId-7")) => Err("bad"),
                _ => Ok(()),
            }
        };
        let mut processor = Processor::new(transform, Settings::default());
        let record = |seq: &str, data: &str| {
            format!(
                r#"{{"eventID":"shardId-7:{seq}","kinesis":{{"sequenceNumber":"{seq}","data":"{data}"}}}}"#
            )
        };
        let json = format!(
            r#"{{"Records":[{},{}]}}"#,
            record("1", "b2s="),
            record("2", "YmFk")
        );
        let event: KinesisEvent = serde_json::from_str(&json).unwrap();
        let request = LambdaEvent::new(event, lambda_runtime::Context::default());
        let response = processor.call(request).await.unwrap();
        let failed: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_deref())
            .collect();
        assert_eq!(failed, [Some("2")]);
    }
}
