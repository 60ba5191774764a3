//! Every `DEAGG_*` setting, parsed once, shared by the command line and the Lambda handler.
//!
//! Each setting is a command-line flag with an environment variable as its fallback, so the
//! same configuration is read in Lambda (environment only) and in a terminal. [`Settings`] is
//! what every consumer uses; [`BuiltinSettings`] only the built-in transforms.

use std::error::Error as _;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};

use crate::batch::{Mode, OnCorrupt};
use crate::sink::SinkSettings;
use crate::transform::Builtin;

/// How the handler behaves; see the README's configuration table.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct Settings {
    /// What happens to invalid base64 or a corrupt KPL aggregate: report it as a batch item
    /// failure (`fail`), deliver it raw to the transform (`passthrough`), or log, count and
    /// acknowledge it (`skip`).
    #[arg(
        long,
        env = "DEAGG_ON_CORRUPT",
        value_enum,
        ignore_case = true,
        default_value = "fail"
    )]
    pub on_corrupt: OnCorrupt,

    /// `ordered` processes user records one by one and stops at the first failure;
    /// `concurrent` runs different partition keys side by side, in order within each key.
    #[arg(
        long,
        env = "DEAGG_MODE",
        value_enum,
        ignore_case = true,
        default_value = "ordered"
    )]
    pub mode: Mode,

    /// Partition keys processed at once in the concurrent mode.
    #[arg(long, env = "DEAGG_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Stop and report the first unprocessed record when less than this many milliseconds of
    /// the invocation remain, so Lambda keeps the progress made instead of timing out.
    #[arg(long, env = "DEAGG_DEADLINE_MARGIN_MS", default_value_t = 1000)]
    pub deadline_margin_ms: u64,

    /// Verify each aggregate's MD5. Turning it off is faster but only safe for producers
    /// that write nothing but KPL aggregates.
    #[arg(long, env = "DEAGG_VERIFY_CHECKSUM", default_value_t = true, action = ArgAction::Set)]
    pub verify_checksum: bool,

    /// Print one CloudWatch Embedded Metric Format document per invocation on stdout.
    #[arg(
        long,
        env = "DEAGG_METRICS",
        value_enum,
        ignore_case = true,
        default_value = "on"
    )]
    pub metrics: Switch,

    /// CloudWatch namespace of the metrics.
    #[arg(long, env = "DEAGG_METRICS_NAMESPACE", default_value = "KinesisDeagg")]
    pub metrics_namespace: String,

    /// Where accepted user records are delivered.
    #[command(flatten)]
    pub sink: SinkSettings,

    /// The largest tumbling-window state answered, in bytes of JSON (Lambda keeps at most
    /// 1 MB per shard). A larger one closes that part of the window early instead.
    #[arg(long, env = "DEAGG_WINDOW_STATE_MAX_BYTES", default_value_t = 1_000_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_048_576))]
    pub window_state_max_bytes: usize,
}

/// The settings of the built-in transforms (`kinesis-deagg`'s own binary): a consumer with
/// its own transform neither reads nor needs them.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct BuiltinSettings {
    /// Built-in transform run on each user record.
    #[arg(
        long,
        env = "DEAGG_TRANSFORM",
        value_enum,
        ignore_case = true,
        default_value = "log"
    )]
    pub transform: Builtin,

    /// Bytes of data shown per user record by the `log` transform.
    #[arg(long, env = "DEAGG_LOG_MAX_BYTES", default_value_t = 256)]
    pub log_max_bytes: usize,

    /// For tumbling-window events: keep the hot-key report in the state and publish it when
    /// the window closes.
    #[arg(
        long,
        env = "DEAGG_WINDOW_REPORT",
        value_enum,
        ignore_case = true,
        default_value = "on"
    )]
    pub window_report: Switch,

    /// Partition keys the window report ranks (by bytes and by user records), 1 to 20.
    #[arg(long, env = "DEAGG_WINDOW_REPORT_TOP", default_value_t = 10,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=20))]
    pub window_report_top: usize,
}

/// No settings of its own: what [`crate::main`] reads for a consumer's transform.
#[derive(Args, Clone, Copy, Debug, Default, PartialEq)]
pub struct NoSettings {}

/// A setting whose value is not accepted, in one line that names its environment variable
/// (or flag) and the values it takes.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsError(String);

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

impl SettingsError {
    /// Says in one line what clap's `error` says in several, naming the environment variable
    /// rather than the flag when `from_env` (no flag was given).
    pub(crate) fn from_clap(error: &clap::Error, command: &clap::Command, from_env: bool) -> Self {
        use clap::error::{ContextKind, ContextValue};
        let context = |kind| match error.get(kind) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            Some(ContextValue::Strings(v)) => Some(v.join(", ")),
            _ => None,
        };
        let (Some(flag), Some(value)) = (
            context(ContextKind::InvalidArg),
            context(ContextKind::InvalidValue),
        ) else {
            // Not about one value: clap's own first line.
            let text = error.render().to_string();
            let line = text.lines().next().unwrap_or_default();
            return SettingsError(line.trim_start_matches("error: ").to_owned());
        };
        let long = flag.trim_start_matches("--");
        let long = long.split_whitespace().next().unwrap_or(long);
        let variable = env_of(command, long);
        let name = match (from_env, variable) {
            (true, Some(variable)) => variable,
            (_, Some(variable)) => format!("--{long} (or {variable})"),
            _ => format!("--{long}"),
        };
        let why = match context(ContextKind::ValidValue) {
            Some(valid) => format!("expected one of: {valid} (any case)"),
            None => error
                .source()
                .map_or_else(|| "not accepted".to_owned(), |e| e.to_string()),
        };
        SettingsError(format!("{name}={value:?} is not valid: {why}"))
    }
}

/// The environment variable of the flag `--long` of `command` or of its subcommands.
fn env_of(command: &clap::Command, long: &str) -> Option<String> {
    let own = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env());
    match own {
        Some(v) => Some(v.to_string_lossy().into_owned()),
        None => command.get_subcommands().find_map(|c| env_of(c, long)),
    }
}

/// Reads `A` from the environment (its flags' variables), with defaults.
pub(crate) fn from_env<A: Args + FromArgMatches>() -> Result<A, SettingsError> {
    #[derive(Parser)]
    struct FromEnv<A: Args> {
        #[command(flatten)]
        settings: A,
    }
    let mut command = FromEnv::<A>::command();
    let parsed = command
        .try_get_matches_from_mut(["kinesis-deagg"])
        .and_then(|m| A::from_arg_matches(&m));
    parsed.map_err(|e| SettingsError::from_clap(&e, &command, true))
}

/// Every `DEAGG_*` variable a setting reads.
pub(crate) fn known_variables() -> Vec<String> {
    #[derive(Parser)]
    struct All {
        #[command(flatten)]
        settings: Settings,
        #[command(flatten)]
        builtin: BuiltinSettings,
    }
    All::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .collect()
}

/// Warns of each `DEAGG_*` environment variable that no setting reads, with the closest name
/// that one does: a misspelled setting would otherwise silently be its default.
pub fn warn_unknown_variables() {
    for warning in unknown_variables(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))
    {
        tracing::warn!("{warning}");
    }
}

/// What [`warn_unknown_variables`] says of the variables named `vars`.
fn unknown_variables(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    let known = known_variables();
    let unknown = vars
        .into_iter()
        .filter(|name| name.starts_with("DEAGG_") && !known.contains(name));
    unknown
        .map(|name| {
            let closest = known
                .iter()
                .map(|k| (strsim::levenshtein(k, &name), k))
                .min()
                .filter(|(distance, _)| *distance <= 4);
            match closest {
                Some((_, k)) => {
                    format!("{name} is not a setting (did you mean {k}?); it is ignored")
                }
                None => format!("{name} is not a setting; it is ignored"),
            }
        })
        .collect()
}

impl BuiltinSettings {
    /// Reads the settings from `DEAGG_TRANSFORM` and `DEAGG_LOG_MAX_BYTES`, with defaults.
    ///
    /// # Errors
    ///
    /// When a variable holds a value it does not accept: the message names it.
    pub fn from_env() -> Result<Self, SettingsError> {
        from_env()
    }
}

impl Default for BuiltinSettings {
    fn default() -> Self {
        BuiltinSettings {
            transform: Builtin::Log,
            log_max_bytes: 256,
            window_report: Switch::On,
            window_report_top: 10,
        }
    }
}

/// An on/off setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Settings {
    /// Reads the settings from the `DEAGG_*` environment variables, with defaults.
    ///
    /// # Errors
    ///
    /// When a variable holds a value it does not accept: the message, one line, names it and
    /// the values it takes.
    ///
    /// # Examples
    ///
    /// ```
    /// let settings = kinesis_deagg::Settings::from_env().unwrap();
    /// assert!(settings.verify_checksum);
    /// ```
    pub fn from_env() -> Result<Self, SettingsError> {
        from_env()
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
            on_corrupt: OnCorrupt::Fail,
            mode: Mode::Ordered,
            concurrency: 8,
            deadline_margin_ms: 1000,
            verify_checksum: true,
            metrics: Switch::On,
            metrics_namespace: "KinesisDeagg".into(),
            sink: SinkSettings::default(),
            window_state_max_bytes: 1_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn default_matches_the_command_line_defaults() {
        // No test sets DEAGG_* variables, so parsing sees only the defaults.
        assert_eq!(Settings::from_env().unwrap(), Settings::default());
        assert_eq!(
            BuiltinSettings::from_env().unwrap(),
            BuiltinSettings::default()
        );
    }

    fn error(args: &[&str], from_env: bool) -> String {
        let mut command = Flags::command();
        let e = command.try_get_matches_from_mut(args).unwrap_err();
        SettingsError::from_clap(&e, &command, from_env).to_string()
    }

    #[test]
    fn a_bad_value_is_named_in_one_line_with_what_is_accepted() {
        assert_eq!(
            error(&["x", "--mode", "fast"], true),
            r#"DEAGG_MODE="fast" is not valid: expected one of: ordered, concurrent (any case)"#
        );
        assert_eq!(
            error(&["x", "--mode", "fast"], false),
            r#"--mode (or DEAGG_MODE)="fast" is not valid: expected one of: ordered, concurrent (any case)"#
        );
        let zero = error(&["x", "--concurrency", "0"], true);
        assert!(
            zero.starts_with(r#"DEAGG_CONCURRENCY="0" is not valid: "#),
            "{zero}"
        );
        assert!(zero.ends_with("0 is not in 1..=65535"), "{zero}");
        assert!(!zero.contains('\n'));
    }

    #[test]
    fn values_are_read_in_any_case() {
        let flags =
            Flags::try_parse_from(["x", "--mode", "CONCURRENT", "--metrics", "Off"]).unwrap();
        assert_eq!(flags.settings.mode, Mode::Concurrent);
        assert_eq!(flags.settings.metrics, Switch::Off);
    }

    #[test]
    fn a_misspelled_variable_is_named_with_the_closest_setting() {
        let vars = [
            "DEAGG_MODE",
            "DEAGG_ONCORRUPT",
            "DEAGG_SOMETHING_ELSE_ENTIRELY",
            "HOME",
        ];
        assert_eq!(
            unknown_variables(vars.map(String::from)),
            [
                "DEAGG_ONCORRUPT is not a setting (did you mean DEAGG_ON_CORRUPT?); it is ignored",
                "DEAGG_SOMETHING_ELSE_ENTIRELY is not a setting; it is ignored",
            ]
        );
    }

    #[test]
    fn every_setting_and_builtin_setting_is_a_known_variable() {
        let known = known_variables();
        for name in [
            "DEAGG_MODE",
            "DEAGG_TRANSFORM",
            "DEAGG_LOG_MAX_BYTES",
            "DEAGG_METRICS_NAMESPACE",
            "DEAGG_SINK",
            "DEAGG_SINK_TARGET",
            "DEAGG_SINK_MAX_ATTEMPTS",
        ] {
            assert!(known.iter().any(|k| k == name), "{name}: {known:?}");
        }
    }
}
