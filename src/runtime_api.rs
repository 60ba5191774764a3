//! The Lambda Runtime API loop: wait for an invocation, handle it, send the response.
//!
//! `lambda_runtime::run` works too ([`Processor`] is a tower `Service`), and this loop keeps
//! its behaviour (the same context and tracing span, handler errors and panics sent to
//! `/error`) but one: it does not set `_X_AMZN_TRACE_ID`. Changing the environment of a
//! running process is `unsafe` in Rust 2024 and cannot be proved sound while a transform's
//! threads may read it; the trace id is on the invocation's span (`xrayTraceId`). A transform
//! whose AWS SDK calls must carry it can run under `lambda_runtime::run` instead.
//!
//! The loop exists for two measured costs of `lambda_runtime::run` on a 6 MB event:
//! - the body arrives in chunks that `lambda_runtime` collects, then copies into one buffer,
//!   so the event is held twice for a moment (peak RSS). Here the chunks go straight into
//!   one buffer of the announced size;
//! - the event is then read through serde. Here the bytes go to
//!   [`KinesisEvent::from_slice`](crate::event::KinesisEvent::from_slice), whose fast path
//!   reads a Lambda event several times faster, and the body is freed once it is read.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::BytesMut;
use futures::FutureExt;
use http_body_util::BodyExt;
use lambda_runtime::Context;
use lambda_runtime_api_client::{Client, body::Body, build_request};
use serde_json::json;
use tracing::Instrument;

use crate::lambda::Processor;
use crate::transform::Transform;

/// The error type of the loop: what stops the function (the Runtime API is unreachable or
/// answers nonsense). A handler's error only fails its invocation.
pub type Error = lambda_runtime::Error;

/// No Lambda payload is larger (6 MB today): a bigger `Content-Length` is not believed when
/// reserving memory (the body is still read whole).
const MAX_RESERVED: usize = 64 << 20;

/// Serves `processor` through the Runtime API at `AWS_LAMBDA_RUNTIME_API` until the API
/// fails: the function's main loop.
///
/// # Errors
///
/// When the Runtime API cannot be reached or sends an invocation without a request id.
///
/// # Panics
///
/// Outside Lambda: the `AWS_LAMBDA_*` variables it reads must be set, as with
/// `lambda_runtime::run`.
///
/// # Examples
///
/// A complete Lambda function with its own transform:
///
/// ```no_run
/// use kinesis_deagg::{Processor, Settings};
/// use kinesis_deagg::kpl::UserRecord;
/// use kinesis_deagg::transform::RecordContext;
///
/// #[tokio::main(flavor = "current_thread")]
/// async fn main() -> Result<(), kinesis_deagg::runtime_api::Error> {
///     let transform = |record: UserRecord, ctx: RecordContext| async move {
///         println!("{} has {} bytes", ctx.idempotency_key(), record.data().len());
///         Ok::<(), lambda_runtime::Error>(())
///     };
///     kinesis_deagg::run(Processor::new(transform, Settings::from_env()?)).await
/// }
/// ```
pub async fn run<T: Transform + 'static>(processor: Processor<T>) -> Result<(), Error> {
    let client = Client::builder().build()?;
    let config = Arc::new(lambda_runtime::Config::from_env());
    let mut buffer = BytesMut::new();
    loop {
        let next = build_request()
            .method("GET")
            .uri("/2018-06-01/runtime/invocation/next")
            .body(Body::empty())?;
        let (parts, mut incoming) = client.call(next).await?.into_parts();
        let reserve = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        // The allocation of the last body comes back here once its records are all dropped,
        // so every event lands in the same memory (no heap growth from one event to the next).
        buffer.reserve(reserve.min(MAX_RESERVED));
        while let Some(frame) = incoming.frame().await {
            if let Ok(data) = frame?.into_data() {
                buffer.extend_from_slice(&data);
            }
        }
        let body = buffer.split();
        let request_id = parts
            .headers
            .get("lambda-runtime-aws-request-id")
            .and_then(|v| v.to_str().ok())
            .ok_or("an invocation without a lambda-runtime-aws-request-id header")?;
        let context = Context::new(request_id, config.clone(), &parts.headers)?;
        let span = lambda_runtime::layers::trace::request_span(&context);
        let outcome = AssertUnwindSafe(processor.handle_body(body, &context))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let (path, payload, error_type) = match outcome {
            Ok(Ok(response)) => ("response", serde_json::to_vec(&response)?, None),
            Ok(Err(e)) => error_payload(&span, "EventError", &e.to_string()),
            Err(panic) => error_payload(&span, "Panic", &panic_message(&*panic)),
        };
        let mut request = build_request().method("POST").uri(format!(
            "/2018-06-01/runtime/invocation/{request_id}/{path}"
        ));
        if let Some(error_type) = error_type {
            request = request.header("lambda-runtime-function-error-type", error_type);
        }
        client.call(request.body(Body::from(payload))?).await?;
    }
}

/// An `/error` payload as Lambda shows it, and the error type header; the error is also
/// logged in the invocation's span (Lambda retries the whole batch).
fn error_payload(
    span: &tracing::Span,
    error_type: &'static str,
    message: &str,
) -> (&'static str, Vec<u8>, Option<&'static str>) {
    span.in_scope(|| tracing::error!(error_type, "the invocation failed: {message}"));
    let body = json!({"errorType": error_type, "errorMessage": message});
    ("error", body.to_string().into_bytes(), Some("unhandled"))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("the handler panicked: {}", text.unwrap_or("(no message)"))
}

/// Tells Lambda why the function cannot start (`/runtime/init/error`), so that the failed
/// invocation carries the reason instead of a bare exit status. Best effort: the caller also
/// prints the message, and stderr reaches CloudWatch.
pub async fn report_init_error(message: &str) {
    let Ok(client) = Client::builder().build() else {
        return;
    };
    let body = json!({"errorType": "Runtime.InitError", "errorMessage": message}).to_string();
    let request = build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("lambda-runtime-function-error-type", "Runtime.InitError")
        .body(body.into());
    if let Ok(request) = request {
        let _ = client.call(request).await;
    }
}
