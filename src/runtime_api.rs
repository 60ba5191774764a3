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
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt;
use http::StatusCode;
use http::request::Builder;
use http_body_util::BodyExt;
use lambda_runtime::Context;
use lambda_runtime_api_client::{Client, body::Body, build_request};
use serde_json::json;
use tracing::Instrument;

use crate::lambda::Processor;
use crate::sink::Sink;
use crate::transform::Transform;

/// The error type of the loop: what stops the function (the Runtime API is unreachable or
/// answers nonsense). A handler's error only fails its invocation.
pub type Error = lambda_runtime::Error;

/// No Lambda payload is larger (6 MB today): a bigger `Content-Length` is not believed when
/// reserving memory (the body is still read whole).
const MAX_RESERVED: usize = 64 << 20;

/// `/next` failures in a row (refused, unreachable, or an invocation that cannot be answered)
/// after which the loop gives up and the process exits, so that Lambda starts a new one.
const NEXT_ATTEMPTS: u32 = 8;

/// The first pause after a failed `/next`; it doubles with each failure, up to
/// [`NEXT_BACKOFF_MAX`] (6.5 s in all before giving up).
const NEXT_BACKOFF: Duration = Duration::from_millis(50);
const NEXT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Serves `processor` through the Runtime API at `AWS_LAMBDA_RUNTIME_API` until the API
/// fails: the function's main loop.
///
/// With `AWS_LAMBDA_MAX_CONCURRENCY` set (Lambda Managed Instances), that many invocations
/// are served at once, each with its own body buffer, deadline, tracing span and metrics
/// document; they share the thread `run` is polled on.
///
/// The Runtime API's rules are followed: a `/next` or response refused with status 500
/// ("non-recoverable state") ends the loop at once; other failures of `/next` are retried
/// with back-off (50 ms, doubling, 8 attempts) before it ends; an invocation whose headers
/// cannot be read, or whose response is refused as too large (413), is answered on
/// `/error`.
///
/// # Errors
///
/// When the Runtime API asks the runtime to exit, or cannot be reached for `/next`; at once
/// outside Lambda (`AWS_LAMBDA_RUNTIME_API` is not set: [`crate::main`] runs a sample event
/// there instead).
///
/// [`kinesis_deagg::main`](crate::main) calls it; [`Processor`] shows a `main` of one's own
/// that does.
pub async fn run<T: Transform + 'static, S: Sink + 'static>(
    processor: Processor<T, S>,
) -> Result<(), Error> {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        return Err("not inside Lambda: AWS_LAMBDA_RUNTIME_API is not set".into());
    }
    let api = Api {
        client: Client::builder().build()?,
        config: Arc::new(config()),
    };
    let loops = max_concurrency(std::env::var("AWS_LAMBDA_MAX_CONCURRENCY").ok().as_deref());
    if loops > 1 {
        tracing::info!(
            concurrency = loops,
            "serving {loops} invocations at once (AWS_LAMBDA_MAX_CONCURRENCY)"
        );
    }
    let serving = (0..loops).map(|_| api.serve(&processor));
    futures::future::try_join_all(serving).await?;
    Ok(())
}

/// The function's configuration from Lambda's variables (what `lambda_runtime::Config::from_env`
/// reads, without its panic when one is missing: the context then has an empty value).
fn config() -> lambda_runtime::Config {
    let var = |name| std::env::var(name).unwrap_or_default();
    lambda_runtime::Config {
        function_name: var("AWS_LAMBDA_FUNCTION_NAME"),
        memory: var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").parse().unwrap_or(0),
        version: var("AWS_LAMBDA_FUNCTION_VERSION"),
        log_stream: var("AWS_LAMBDA_LOG_STREAM_NAME"),
        log_group: var("AWS_LAMBDA_LOG_GROUP_NAME"),
    }
}

/// How many invocations to serve at once: `AWS_LAMBDA_MAX_CONCURRENCY` when it is a positive
/// number, else one (with a warning when it is set to something else).
fn max_concurrency(value: Option<&str>) -> usize {
    match value.map(|v| v.trim().parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            tracing::warn!(
                value = value.unwrap_or_default(),
                "AWS_LAMBDA_MAX_CONCURRENCY is not a positive number; serving one invocation at a time"
            );
            1
        }
    }
}

struct Api {
    client: Client,
    config: Arc<lambda_runtime::Config>,
}

/// An invocation as `/next` handed it out.
struct Invocation {
    request_id: String,
    headers: http::HeaderMap,
    body: BytesMut,
}

/// Why `/next` gave no invocation.
enum NextError {
    /// Try again after a pause.
    Retry(String),
    /// The Runtime API says to exit.
    Exit(String),
}

impl Api {
    /// One poll loop: invocation after invocation, until the Runtime API fails.
    async fn serve<T: Transform + 'static, S: Sink + 'static>(
        &self,
        processor: &Processor<T, S>,
    ) -> Result<(), Error> {
        let mut buffer = BytesMut::new();
        let mut failures = 0;
        loop {
            let invocation = match self.next(&mut buffer).await {
                Ok(invocation) => invocation,
                Err(NextError::Exit(why)) => return Err(why.into()),
                Err(NextError::Retry(why)) => {
                    failures += 1;
                    if failures >= NEXT_ATTEMPTS {
                        return Err(format!("{why}; giving up after {failures} attempts").into());
                    }
                    let pause = NEXT_BACKOFF
                        .saturating_mul(1 << (failures - 1))
                        .min(NEXT_BACKOFF_MAX);
                    tracing::warn!(
                        attempt = failures,
                        "{why}; asking again in {} ms",
                        pause.as_millis()
                    );
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            failures = 0;
            self.answer(processor, invocation).await?;
        }
    }

    /// Waits for the next invocation and reads its body into `buffer`'s memory.
    async fn next(&self, buffer: &mut BytesMut) -> Result<Invocation, NextError> {
        let request = build_request()
            .method("GET")
            .uri("/2018-06-01/runtime/invocation/next")
            .body(Body::empty())
            .map_err(|e| NextError::Exit(e.to_string()))?;
        let response =
            self.client.call(request).await.map_err(|e| {
                NextError::Retry(format!("the Runtime API could not be reached: {e}"))
            })?;
        let (parts, mut incoming) = response.into_parts();
        let reserve = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        // The allocation of the last body comes back here once its records are all dropped,
        // so every event lands in the same memory (no heap growth from one event to the next).
        buffer.reserve(reserve.min(MAX_RESERVED));
        while let Some(frame) = incoming.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        buffer.extend_from_slice(&data);
                    }
                }
                Err(e) => {
                    buffer.clear();
                    return Err(NextError::Retry(format!(
                        "the invocation's body could not be read: {e}"
                    )));
                }
            }
        }
        let body = buffer.split();
        match parts.status {
            StatusCode::OK => {}
            StatusCode::INTERNAL_SERVER_ERROR => {
                return Err(NextError::Exit(format!(
                    "the Runtime API answered /next with 500 (non-recoverable): {}",
                    text(&body)
                )));
            }
            status => {
                return Err(NextError::Retry(format!(
                    "the Runtime API answered /next with {status}: {}",
                    text(&body)
                )));
            }
        }
        match request_id(&parts.headers) {
            Some(request_id) => Ok(Invocation {
                request_id: request_id.to_owned(),
                headers: parts.headers,
                body,
            }),
            None => Err(NextError::Retry(
                "an invocation without a usable lambda-runtime-aws-request-id header cannot be answered"
                    .into(),
            )),
        }
    }

    /// Handles one invocation and posts its response (or its error).
    async fn answer<T: Transform + 'static, S: Sink + 'static>(
        &self,
        processor: &Processor<T, S>,
        invocation: Invocation,
    ) -> Result<(), Error> {
        let Invocation {
            request_id,
            headers,
            body,
        } = invocation;
        let context = match context(&request_id, &self.config, &headers) {
            Ok(context) => context,
            Err(why) => {
                let span = tracing::info_span!("Lambda runtime invoke", requestId = %request_id);
                let (payload, error_type) = error_payload(&span, "InvalidInvocationHeaders", &why);
                return self.post(&request_id, "error", payload, error_type).await;
            }
        };
        let span = lambda_runtime::layers::trace::request_span(&context);
        let outcome = AssertUnwindSafe(processor.handle_body(body, &context))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let (path, payload, error_type) = match outcome {
            Ok(Ok(response)) => ("response", serde_json::to_vec(&response)?, None),
            Ok(Err(e)) => with_path(error_payload(&span, e.error_type(), &e.to_string())),
            Err(panic) => with_path(error_payload(&span, "Panic", &panic_message(&*panic))),
        };
        match self
            .post(&request_id, path, payload, error_type)
            .instrument(span.clone())
            .await
        {
            Err(refused) if refused.is::<TooLarge>() => {
                let (payload, error_type) =
                    error_payload(&span, "ResponseTooLarge", &refused.to_string());
                self.post(&request_id, "error", payload, error_type).await
            }
            status => status,
        }
    }

    /// Posts a response or an error for `request_id`. A 500 ends the loop (the Runtime API
    /// asks the runtime to exit); a 413 is a [`TooLarge`] error; any other refusal, or a
    /// failed connection, is logged: Lambda times the invocation out and retries the batch.
    async fn post(
        &self,
        request_id: &str,
        path: &str,
        payload: Vec<u8>,
        error_type: Option<&'static str>,
    ) -> Result<(), Error> {
        let size = payload.len();
        let mut request: Builder = build_request().method("POST").uri(format!(
            "/2018-06-01/runtime/invocation/{request_id}/{path}"
        ));
        if let Some(error_type) = error_type {
            request = request.header("lambda-runtime-function-error-type", error_type);
        }
        let response = match self.client.call(request.body(Body::from(payload))?).await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!("the {path} of the invocation could not be posted: {e}");
                return Ok(());
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => Err(format!(
                "the Runtime API answered the {path} with 500 (non-recoverable): {}",
                text(&body)
            )
            .into()),
            StatusCode::PAYLOAD_TOO_LARGE if path == "response" => Err(TooLarge(format!(
                "the response of {size} bytes was refused as too large: {}",
                text(&body)
            ))
            .into()),
            _ => {
                tracing::error!(
                    "the Runtime API refused the {path} with {status}: {}",
                    text(&body)
                );
                Ok(())
            }
        }
    }
}

/// A response refused with 413.
#[derive(Debug)]
struct TooLarge(String);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooLarge {}

/// The request id, when it can go into a URL path as it is.
fn request_id(headers: &http::HeaderMap) -> Option<&str> {
    let id = headers
        .get("lambda-runtime-aws-request-id")?
        .to_str()
        .ok()?;
    let usable = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    usable.then_some(id)
}

/// The invocation's context, or why its headers cannot be read. `Context::new` panics on a
/// missing deadline; it is checked here first.
fn context(
    request_id: &str,
    config: &Arc<lambda_runtime::Config>,
    headers: &http::HeaderMap,
) -> Result<Context, String> {
    match headers.get("lambda-runtime-deadline-ms") {
        None => return Err("the lambda-runtime-deadline-ms header is missing".into()),
        Some(v)
            if v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .is_none() =>
        {
            return Err(format!(
                "the lambda-runtime-deadline-ms header is not a number of milliseconds: {v:?}"
            ));
        }
        Some(_) => {}
    }
    Context::new(request_id, config.clone(), headers)
        .map_err(|e| format!("the invocation's headers cannot be read: {e}"))
}

/// Up to 200 characters of a Runtime API answer, for a log line.
fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

fn with_path(
    (payload, error_type): (Vec<u8>, Option<&'static str>),
) -> (&'static str, Vec<u8>, Option<&'static str>) {
    ("error", payload, error_type)
}

/// An `/error` payload as Lambda shows it, and the error type header; the error is also
/// logged in the invocation's span (Lambda retries the whole batch).
fn error_payload(
    span: &tracing::Span,
    error_type: &'static str,
    message: &str,
) -> (Vec<u8>, Option<&'static str>) {
    span.in_scope(|| tracing::error!(error_type, "the invocation failed: {message}"));
    let body = json!({"errorType": error_type, "errorMessage": message});
    (body.to_string().into_bytes(), Some("unhandled"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_concurrency_is_the_variable_when_it_is_a_positive_number() {
        assert_eq!(max_concurrency(None), 1);
        assert_eq!(max_concurrency(Some("4")), 4);
        assert_eq!(max_concurrency(Some("0")), 1);
        assert_eq!(max_concurrency(Some("many")), 1);
    }

    #[test]
    fn a_request_id_must_fit_in_a_url_path() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(request_id(&headers), None);
        headers.insert(
            "lambda-runtime-aws-request-id",
            "8476a536-e9f4".parse().unwrap(),
        );
        assert_eq!(request_id(&headers), Some("8476a536-e9f4"));
        headers.insert("lambda-runtime-aws-request-id", "a/../b".parse().unwrap());
        assert_eq!(request_id(&headers), None);
    }
}
