//! The `main` of a Kinesis consumer: inside Lambda it serves invocations, outside it runs the
//! handler on an event file, as `kinesis-deagg invoke` does.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser};

use crate::event::KinesisEvent;
use crate::lambda::Processor;
use crate::settings::{NoSettings, Settings, SettingsError};
use crate::sink::{Sink, SinkKind};
use crate::transform::Transform;
use crate::window::{ErasedWindow, Window};

/// A transform and, for tumbling-window events, the [`Window`] keeping their state: what
/// [`lambda`] and [`invoke`] run.
pub struct Consumer<T> {
    transform: T,
    window: Option<std::sync::Arc<dyn ErasedWindow>>,
}

impl<T: Transform> Consumer<T> {
    /// A consumer running `transform`; window events are answered with an empty state.
    pub fn new(transform: T) -> Self {
        Consumer {
            transform,
            window: None,
        }
    }

    /// The consumer with `window` keeping the state of window events.
    pub fn with_window(mut self, window: impl Window + 'static) -> Self {
        self.window = Some(std::sync::Arc::new(window));
        self
    }
}

/// The whole `main` of a consumer with its own transform, in and outside Lambda.
///
/// - Inside Lambda (`AWS_LAMBDA_RUNTIME_API` set), it reads the [`Settings`] from the
///   environment and serves invocations with [`run`](crate::run). A setting it cannot read
///   is reported to Lambda as an init error and the process exits with status 2.
/// - Outside, it runs the handler on an event, as `kinesis-deagg invoke` does: `my-consumer
///   [invoke] [FILE|-] [--remaining-time-ms N] [--mode ...]`, every setting a flag too
///   (`--help` lists them), the event from a file or stdin, the response printed as the last
///   line of stdout; exit status 0 when the event was handled (whatever it reports), 2 when
///   it could not be (no event, not a Kinesis event, a bad flag).
///
/// Either way it first sets up logging ([`crate::logging::init`]) and the memory tuning
/// ([`crate::memory::retain_freed_memory`]), and warns of `DEAGG_*` variables no setting
/// reads.
///
/// # Examples
///
/// ```no_run
/// use kinesis_deagg::prelude::*;
///
/// async fn handle(record: UserRecord, ctx: RecordContext) -> Result<(), Error> {
///     tracing::info!(key = %ctx.idempotency_key(), bytes = record.data().len(), "got one");
///     Ok(())
/// }
///
/// fn main() -> std::process::ExitCode {
///     kinesis_deagg::main(handle)
/// }
/// ```
pub fn main<T: Transform + 'static>(transform: T) -> ExitCode {
    main_with(|_: NoSettings| transform)
}

/// [`main`] for a consumer that also aggregates tumbling windows with `window` (see
/// [`crate::window`]).
pub fn main_windowed<T: Transform + 'static>(
    transform: T,
    window: impl Window + 'static,
) -> ExitCode {
    consumer_main(|_: NoSettings| Consumer::new(transform).with_window(window))
}

/// [`main`] for a transform with settings of its own: `A`'s flags (and their environment
/// variables) are read with the others, and `make` builds the transform from them. The
/// `kinesis-deagg` binary runs its built-in transforms this way, with
/// [`BuiltinSettings`](crate::settings::BuiltinSettings).
pub fn main_with<A, T>(make: impl FnOnce(A) -> T) -> ExitCode
where
    A: Args + FromArgMatches,
    T: Transform + 'static,
{
    consumer_main(|a| Consumer::new(make(a)))
}

/// [`main_with`] for a [`Consumer`].
fn consumer_main<A, T>(make: impl FnOnce(A) -> Consumer<T>) -> ExitCode
where
    A: Args + FromArgMatches,
    T: Transform + 'static,
{
    crate::memory::retain_freed_memory();
    crate::logging::init();
    if in_lambda() {
        return lambda(make);
    }
    // `invoke` may be said or not: `my-consumer events/x.json` is `my-consumer invoke events/x.json`.
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "invoke") {
        args.remove(1);
    }
    #[derive(Parser)]
    #[command(
        about = "Runs the Kinesis consumer's handler on an event and prints its response \
                 (inside Lambda, it serves invocations)"
    )]
    struct Cli<A: Args> {
        #[command(flatten)]
        invoke: Invoke<A>,
    }
    let mut command = Cli::<A>::command();
    let parsed = command
        .try_get_matches_from_mut(args)
        .and_then(|m| Cli::<A>::from_arg_matches(&m));
    match parsed {
        Ok(cli) => invoke(cli.invoke, make),
        Err(e) => flag_error(&e, &command),
    }
}

/// What a command line does with clap's error `e` (of parsing `command`): a value a flag or
/// its environment variable does not accept in one line naming both, status 2; `--help` and
/// `--version` (status 0) and the rest (status 2) as clap prints them.
pub fn flag_error(e: &clap::Error, command: &clap::Command) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            fail(&SettingsError::from_clap(e, command, false))
        }
        _ => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}

/// True inside Lambda: the Runtime API is there to serve.
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// The arguments of an invocation outside Lambda: the event and the settings, and `A`, the
/// transform's own settings ([`NoSettings`] for a plain transform).
#[derive(Args, Debug)]
pub struct Invoke<A: Args> {
    /// Lambda Kinesis event JSON; `-` or nothing for stdin.
    pub file: Option<PathBuf>,
    /// Pretend the invocation has this many milliseconds left (to try the deadline).
    #[arg(long)]
    pub remaining_time_ms: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub settings: Settings,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub transform: A,
}

/// Serves invocations inside Lambda with the transform `make` builds from `A`, both read
/// from the environment; what [`main_with`] does there.
pub fn lambda<A, T>(make: impl FnOnce(A) -> Consumer<T>) -> ExitCode
where
    A: Args + FromArgMatches,
    T: Transform + 'static,
{
    crate::settings::warn_unknown_variables();
    let runtime = match current_thread() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    let settings = Settings::from_env().and_then(|s| Ok((s, crate::settings::from_env::<A>()?)));
    let (settings, own) = match settings {
        Ok(both) => both,
        Err(e) => {
            runtime.block_on(crate::runtime_api::report_init_error(&e.to_string()));
            return fail(&e);
        }
    };
    let served = runtime.block_on(async {
        match with_sink(make(own), settings, Serve).await {
            Ok(served) => served,
            Err(e) => {
                crate::runtime_api::report_init_error(&e).await;
                Err(e.into())
            }
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&*e),
    }
}

/// What to do with a processor, whatever its sink: a generic closure.
trait WithProcessor<T> {
    type Output;
    async fn call<S: Sink + 'static>(self, processor: Processor<T, S>) -> Self::Output;
}

/// Serves invocations.
struct Serve;

impl<T: Transform + 'static> WithProcessor<T> for Serve {
    type Output = Result<(), crate::transform::Error>;
    async fn call<S: Sink + 'static>(self, processor: Processor<T, S>) -> Self::Output {
        crate::run(processor).await
    }
}

/// Handles one event.
struct Handle<'a>(&'a KinesisEvent, Option<Instant>);

impl<T: Transform + 'static> WithProcessor<T> for Handle<'_> {
    type Output = Result<crate::batch::BatchOutcome, crate::window::WindowError>;
    async fn call<S: Sink + 'static>(self, processor: Processor<T, S>) -> Self::Output {
        processor.handle(self.0, self.1).await
    }
}

/// Gives `with` a processor of `transform` with the built-in sink `settings.sink` names.
///
/// # Errors
///
/// When the sink cannot be made (no target, a limit out of range, not in this build).
async fn with_sink<T: Transform + 'static, W: WithProcessor<T>>(
    consumer: Consumer<T>,
    settings: Settings,
    with: W,
) -> Result<W::Output, String> {
    let Consumer { transform, window } = consumer;
    // Each built-in sink, where this build has it.
    #[cfg_attr(not(feature = "aws"), allow(unused_macros))]
    macro_rules! with_built_in {
        ($sink:ty) => {{
            // Refused before the SDK's configuration is loaded (which may probe the network).
            settings.sink.target()?;
            let sink = <$sink>::from_settings(&settings.sink).await?;
            let processor = Processor::with_sink(transform, sink, settings);
            Ok(with.call(processor.with_erased_window(window)).await)
        }};
    }
    match settings.sink.kind {
        SinkKind::None => {
            let processor = Processor::new(transform, settings).with_erased_window(window);
            Ok(with.call(processor).await)
        }
        #[cfg(feature = "sink-kinesis")]
        SinkKind::Kinesis => with_built_in!(crate::sink::kinesis::KinesisSink),
        #[cfg(feature = "sink-firehose")]
        SinkKind::Firehose => with_built_in!(crate::sink::firehose::FirehoseSink),
        #[cfg(feature = "sink-sqs")]
        SinkKind::Sqs => with_built_in!(crate::sink::sqs::SqsSink),
        #[allow(unreachable_patterns)]
        other => {
            let name = clap::ValueEnum::to_possible_value(&other)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            Err(format!(
                "DEAGG_SINK={name}: this build has no such sink (cargo feature sink-{name})"
            ))
        }
    }
}

/// Runs the handler on the event `args` names, outside Lambda; what [`main_with`] does there.
pub fn invoke<A, T>(args: Invoke<A>, make: impl FnOnce(A) -> Consumer<T>) -> ExitCode
where
    A: Args,
    T: Transform + 'static,
{
    crate::settings::warn_unknown_variables();
    let outcome = (|| -> Result<(), Box<dyn std::error::Error>> {
        let event = read_event(args.file.as_ref())?;
        let deadline = args
            .remaining_time_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let transform = make(args.transform);
        let outcome = current_thread()?.block_on(with_sink(
            transform,
            args.settings,
            Handle(&event, deadline),
        ))??;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&outcome.response())?)?;
        Ok(())
    })();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`... | head`) is the reader's choice, not an error.
        Err(e) if is_broken_pipe(&*e) => ExitCode::SUCCESS,
        Err(e) => fail(&*e),
    }
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Prints `e` after the program's name; status 2.
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{}: {e}", crate::lambda::program_name());
    ExitCode::from(2)
}

/// True when `e` is a closed pipe.
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The bytes of `file`, or of stdin for `-` or nothing (not a terminal: that would wait for
/// typing).
pub fn read_input(file: Option<&PathBuf>) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    match file {
        Some(path) if path.as_os_str() != "-" => {
            buf =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        }
        _ => {
            if std::io::stdin().is_terminal() {
                return Err("no input: give a file, or pipe JSON into stdin".into());
            }
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
        }
    }
    Ok(buf)
}

/// The event in `file` (or stdin), or why it is not one, naming where it came from.
pub fn read_event(file: Option<&PathBuf>) -> Result<KinesisEvent, String> {
    let bytes = read_input(file)?;
    let name = file.map_or("stdin".into(), |p| p.display().to_string());
    KinesisEvent::from_slice(&bytes).map_err(|e| format!("{name}: {e}"))
}
