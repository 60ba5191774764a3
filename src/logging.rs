//! The text log format's fields, with every control character escaped.
//!
//! Record data and partition keys come from producers, and in the text format each line is a
//! CloudWatch event of its own: a newline in a record would let it write a line of its own
//! (a forged `ERROR ... transform failed`, say), and an escape sequence would reach whoever
//! reads the log in a terminal. [`TextFields`] writes the message and every field value
//! with control characters (C0, DEL, C1) and the Unicode line and paragraph separators
//! escaped, as `\n`, `\r`, `\t` or `\u{1b}`, so that one event is always one line. (The JSON
//! format escapes them already, being JSON.)

use std::fmt::{self, Write};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Sets up logging as Lambda expects it, for the whole process: to stderr (stdout is for
/// metrics documents and responses), JSON when `AWS_LAMBDA_LOG_FORMAT=JSON` (what Lambda's
/// `LoggingConfig` sets), else text with [`TextFields`]; at the level of
/// `AWS_LAMBDA_LOG_LEVEL`, else the `tracing` filter in `RUST_LOG`, else `info`.
///
/// [`crate::main`] calls it; call it yourself in a `main` of your own. Only the first call
/// (of this or any other `tracing` subscriber) takes effect.
pub fn init() {
    use tracing_subscriber::EnvFilter;
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into())
        .to_lowercase()
        // Lambda's levels include FATAL, which tracing calls error.
        .replace("fatal", "error");
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"))
    {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
    } else {
        // Each line is an event: no record data may break one or reach a terminal as is.
        builder
            .fmt_fields(TextFields)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// Formats the fields of an event or span as the default text format does (`message
/// name=value ...`, strings quoted), with control characters escaped (see the module docs).
///
/// # Examples
///
/// ```
/// let subscriber = tracing_subscriber::fmt()
///     .fmt_fields(kinesis_deagg::logging::TextFields)
///     .finish();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = FieldVisitor {
            out: Escaping(&mut writer),
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldVisitor<W> {
    out: Escaping<W>,
    first: bool,
    result: fmt::Result,
}

impl<W: Write> Visit for FieldVisitor<W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match field.name() {
            "message" => write!(self.out, "{sep}{value:?}"),
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.out, "{sep}{name}={value:?}")
            }
        };
    }
}

/// A writer that escapes what [`needs_escape`] says before passing text on.
struct Escaping<W>(W);

impl<W: Write> Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean = 0;
        for (i, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            self.0.write_str(&s[clean..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            clean = i + c.len_utf8();
        }
        self.0.write_str(&s[clean..])
    }
}

/// Control characters (C0, DEL, C1) and the line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = Escaping(String::new());
        out.write_str(s).unwrap();
        out.0
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escaped("plain é ✓"), "plain é ✓");
        assert_eq!(
            escaped("a\nERROR b\r\tc\x1b[2J\x07\x7f\u{9b}\u{2028}end"),
            "a\\nERROR b\\r\\tc\\u{1b}[2J\\u{7}\\u{7f}\\u{9b}\\u{2028}end"
        );
        assert_eq!(escaped("\n"), "\\n");
    }

    #[test]
    fn fields_are_written_as_the_default_text_format_writes_them() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(TextFields)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let data = "x\nERROR kinesis_deagg: forged\x1b[2J";
            tracing::warn!(key = "k\n", n = 3, data = %data, "saw {data}");
        });
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            " WARN saw x\\nERROR kinesis_deagg: forged\\u{1b}[2J key=\"k\\n\" n=3 \
             data=x\\nERROR kinesis_deagg: forged\\u{1b}[2J\n"
        );
    }
}
