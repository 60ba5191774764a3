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

#[cfg(test)]
mod tests {
    use aws_smithy_types::error::ErrorMetadata;

    use super::*;

    fn service_error(code: Option<&str>) -> SendError {
        let mut error = ErrorMetadata::builder().message("it said no");
        if let Some(code) = code {
            error = error.code(code);
        }
        let error = SdkError::<ErrorMetadata, ()>::service_error(error.build(), ());
        classify(&error, "PutRecords")
    }

    #[test]
    fn a_service_error_is_retried_or_not_by_its_code() {
        use SendErrorKind::*;
        for (code, kind) in [
            (Some("ProvisionedThroughputExceededException"), Throttled),
            (Some("ThrottlingException"), Throttled),
            (Some("InternalFailure"), Transient),
            (Some("ServiceUnavailableException"), Transient),
            (Some("ResourceNotFoundException"), Permanent),
            (Some("AccessDeniedException"), Permanent),
            // An answer without a code is not the service's refusal of the request.
            (Some(""), Transient),
            (None, Transient),
        ] {
            assert_eq!(service_error(code).kind, kind, "{code:?}");
        }
        assert_eq!(
            service_error(Some("AccessDeniedException")).message,
            "PutRecords: AccessDeniedException: it said no"
        );
    }

    /// An error that has a source, as a connector's does.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("io error")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn no_answer_is_transient_and_says_every_cause() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let error = SdkError::<ErrorMetadata, ()>::timeout_error(Outer(reset));
        let sent = classify(&error, "ListShards");
        assert_eq!(sent.kind, SendErrorKind::Transient);
        assert!(sent.message.starts_with("ListShards: "), "{}", sent.message);
        assert!(
            sent.message.ends_with(": io error: reset by peer"),
            "{}",
            sent.message
        );
    }
}
