//! Every `DEAGG_*` setting, parsed once, shared by the command line and the Lambda handler.
//!
//! Each setting is a command-line flag with an environment variable as its fallback, so the
//! binary reads the same configuration in Lambda (environment only) and in a terminal.

use std::time::Duration;

use clap::{ArgAction, Args, Parser};

use crate::batch::{Mode, OnCorrupt};
use crate::transform::Builtin;

/// How the handler behaves; see the README's configuration table.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct Settings {
    /// Built-in transform run on each user record.
    #[arg(long, env = "DEAGG_TRANSFORM", value_enum, default_value = "log")]
    pub transform: Builtin,

    /// What happens to invalid base64 or a corrupt KPL aggregate: report it as a batch item
    /// failure (`fail`), deliver it raw to the transform (`passthrough`), or log, count and
    /// acknowledge it (`skip`).
    #[arg(long, env = "DEAGG_ON_CORRUPT", value_enum, default_value = "fail")]
    pub on_corrupt: OnCorrupt,

    /// `ordered` processes user records one by one and stops at the first failure;
    /// `concurrent` runs different partition keys side by side, in order within each key.
    #[arg(long, env = "DEAGG_MODE", value_enum, default_value = "ordered")]
    pub mode: Mode,

    /// Partition keys processed at once in the concurrent mode.
    #[arg(long, env = "DEAGG_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Stop and report the first unprocessed record when less than this many milliseconds of
    /// the invocation remain, so Lambda keeps the progress made instead of timing out.
    #[arg(long, env = "DEAGG_DEADLINE_MARGIN_MS", default_value_t = 1000)]
    pub deadline_margin_ms: u64,

    /// Bytes of data shown per user record by the `log` transform.
    #[arg(long, env = "DEAGG_LOG_MAX_BYTES", default_value_t = 256)]
    pub log_max_bytes: usize,

    /// Verify each aggregate's MD5. Turning it off is faster but only safe for producers
    /// that write nothing but KPL aggregates.
    #[arg(long, env = "DEAGG_VERIFY_CHECKSUM", default_value_t = true, action = ArgAction::Set)]
    pub verify_checksum: bool,

    /// Print one CloudWatch Embedded Metric Format document per invocation on stdout.
    #[arg(long, env = "DEAGG_METRICS", value_enum, default_value = "on")]
    pub metrics: Switch,

    /// CloudWatch namespace of the metrics.
    #[arg(long, env = "DEAGG_METRICS_NAMESPACE", default_value = "KinesisDeagg")]
    pub metrics_namespace: String,
}

/// An on/off setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Parser)]
struct FromEnv {
    #[command(flatten)]
    settings: Settings,
}

impl Settings {
    /// Reads the settings from the `DEAGG_*` environment variables, with defaults.
    ///
    /// # Errors
    ///
    /// A clap error naming the variable when one holds a value it does not accept.
    ///
    /// # Examples
    ///
    /// ```
    /// let settings = kinesis_deagg::Settings::from_env().unwrap();
    /// assert!(settings.verify_checksum);
    /// ```
    pub fn from_env() -> Result<Self, clap::Error> {
        FromEnv::try_parse_from(["kinesis-deagg"]).map(|p| p.settings)
    }

    /// The deadline margin as a duration.
    pub fn deadline_margin(&self) -> Duration {
        Duration::from_millis(self.deadline_margin_ms)
    }
}

impl Default for Settings {
    /// The defaults, ignoring the environment.
    fn default() -> Self {
        Settings {
            transform: Builtin::Log,
            on_corrupt: OnCorrupt::Fail,
            mode: Mode::Ordered,
            concurrency: 8,
            deadline_margin_ms: 1000,
            log_max_bytes: 256,
            verify_checksum: true,
            metrics: Switch::On,
            metrics_namespace: "KinesisDeagg".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_the_command_line_defaults() {
        // No test sets DEAGG_* variables, so parsing sees only the defaults.
        let parsed = FromEnv::try_parse_from(["kinesis-deagg"]).unwrap().settings;
        assert_eq!(parsed, Settings::default());
    }

    #[test]
    fn a_concurrency_of_zero_is_refused() {
        assert!(FromEnv::try_parse_from(["x", "--concurrency", "0"]).is_err());
    }
}
