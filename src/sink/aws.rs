//! What the sinks built on the AWS SDK share: the SDK's configuration, and what a failed
//! call says about trying again.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{SendError, SendErrorKind};

/// The SDK's configuration from the environment (region, credentials,
/// `AWS_ENDPOINT_URL_<SERVICE>` or `AWS_ENDPOINT_URL`), with the SDK's own retries off: the
/// sinks retry within the invocation's deadline.
pub(crate) async fn config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}

/// What a failed call says about trying again.
pub(crate) fn classify<
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
>(
    error: &SdkError<E, R>,
    operation: &str,
) -> SendError {
    let (kind, what) = match error {
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or("");
            let kind = match code {
                "ProvisionedThroughputExceededException"
                | "KMSThrottlingException"
                | "LimitExceededException"
                | "ThrottlingException"
                | "Throttling"
                | "RequestLimitExceeded"
                | "TooManyRequestsException"
                | "RequestThrottled"
                | "KmsThrottled" => SendErrorKind::Throttled,
                "InternalFailure"
                | "InternalError"
                | "InternalFailureException"
                | "ServiceUnavailable"
                | "ServiceUnavailableException" => SendErrorKind::Transient,
                _ if code.is_empty() => SendErrorKind::Transient,
                // ResourceNotFound, AccessDenied, InvalidArgument, Validation, KMS...: the
                // same request fails the same way.
                _ => SendErrorKind::Permanent,
            };
            let message = e.err().message().unwrap_or("");
            (kind, format!("{code}: {message}"))
        }
        // No answer, or one that is not the service's: a timeout, a reset connection, a 5xx
        // from a proxy.
        other => (SendErrorKind::Transient, error_chain(other)),
    };
    SendError::new(kind, format!("{operation}: {what}"))
}

/// An error and its sources, on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
