//! `kinesis-deagg`: the Lambda `bootstrap` inside Lambda, a command-line tool outside it.
//!
//! Only wiring lives here: the built-in transforms served by the library's entry point
//! ([`kinesis_deagg::entry`]), and the `decode` and `aggregate` tools.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kinesis_deagg::Settings;
use kinesis_deagg::batch::{OnCorrupt, RecordOutcome, unpack};
use kinesis_deagg::entry::Consumer;
use kinesis_deagg::entry::{self, Invoke, read_event, read_input};
use kinesis_deagg::event::KinesisEvent;
use kinesis_deagg::kpl::{AggregatedRecord, Aggregator};
use kinesis_deagg::settings::{BuiltinSettings, Switch};
use kinesis_deagg::transform::{BuiltinTransform, decode_line};
use kinesis_deagg::window::HotKeyReport;
use serde_json::{Value, json};

/// Deaggregates KPL records in Kinesis Lambda events and reports partial batch failures.
///
/// Inside Lambda (`AWS_LAMBDA_RUNTIME_API` set) and run without a command, it serves
/// invocations with the transform named by `DEAGG_TRANSFORM`.
#[derive(Parser)]
#[command(name = "kinesis-deagg", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Lambda handler in-process on an event and print its response as the last line
    /// of stdout.
    Invoke(Invoke<BuiltinSettings>),
    /// Print one JSON line per user record of an event or of `aws kinesis get-records` output
    /// (exit 1 when a record is reported as failed).
    Decode {
        /// Event or get-records JSON; `-` or nothing for stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        settings: DecodeSettings,
    },
    /// Build a Lambda Kinesis event from JSON lines of user records.
    ///
    /// Each line: `partitionKey`, optional `explicitHashKey`, and `data` (standard base64) or
    /// `text` (UTF-8); `"plain": true` puts that user record in a Kinesis record of its own,
    /// not aggregated; `rawData` makes a Kinesis record whose `data` field is that string as
    /// given (to write invalid base64 or hand-made bytes into sample events).
    Aggregate(AggregateArgs),
}

#[derive(Args)]
struct DecodeSettings {
    /// What happens to invalid base64 or a corrupt aggregate.
    #[arg(
        long,
        env = "DEAGG_ON_CORRUPT",
        value_enum,
        ignore_case = true,
        default_value = "fail"
    )]
    on_corrupt: OnCorrupt,
    /// Verify each aggregate's MD5.
    #[arg(long, env = "DEAGG_VERIFY_CHECKSUM", default_value_t = true, action = clap::ArgAction::Set)]
    verify_checksum: bool,
}

#[derive(Args)]
struct AggregateArgs {
    /// JSON lines of user records; `-` or nothing for stdin.
    file: Option<PathBuf>,
    /// Put every user record in a Kinesis record of its own.
    #[arg(long)]
    plain: bool,
    /// Largest aggregate in bytes (data plus outer partition key).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_size: usize,
    /// At most this many user records per aggregate (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    per_aggregate: Option<u64>,
    /// Shard id written in each record's `eventID`.
    #[arg(long, default_value = "shardId-000000000000")]
    shard_id: String,
    /// Stream ARN written in `eventSourceARN`.
    #[arg(
        long,
        default_value = "arn:aws:kinesis:us-east-1:123456789012:stream/kinesis-deagg-sample"
    )]
    stream_arn: String,
    /// Print a PutRecords request (`{"Records":[{"Data","PartitionKey","ExplicitHashKey"}]}`,
    /// for `aws kinesis put-records --cli-input-json`) instead of a Lambda event.
    #[arg(long)]
    put_records: bool,
    /// Arrival time of the first record, in seconds since the epoch (later ones add 1 ms).
    #[arg(long, default_value_t = 1_764_000_000.0)]
    arrival: f64,
    /// Make a tumbling-window event: the window's start (ISO 8601, e.g.
    /// `2025-11-24T16:00:00Z`); needs `--window-end`.
    #[arg(long, requires = "window_end", conflicts_with = "put_records")]
    window_start: Option<String>,
    /// The window's end.
    #[arg(long, requires = "window_start")]
    window_end: Option<String>,
    /// The window event's `state`: a file holding a JSON object (by default `{}`).
    #[arg(long, requires = "window_start")]
    state: Option<PathBuf>,
    /// Mark the window event as the window's final invocation (`isFinalInvokeForWindow`).
    #[arg(long = "final", requires = "window_start")]
    final_invoke: bool,
}

fn main() -> ExitCode {
    kinesis_deagg::memory::retain_freed_memory();
    kinesis_deagg::logging::init();
    let mut command = Cli::command();
    let cli = match command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => return entry::flag_error(&e, &command),
    };
    let builtin = |b: BuiltinSettings| {
        let consumer = Consumer::new(BuiltinTransform::new(b.transform, b.log_max_bytes));
        match b.window_report {
            Switch::On => consumer.with_window(HotKeyReport::new(b.window_report_top)),
            Switch::Off => consumer,
        }
    };
    let result = match cli.command {
        None if entry::in_lambda() => return entry::lambda(builtin),
        None => Err("not inside Lambda (AWS_LAMBDA_RUNTIME_API is not set); \
             use a command, e.g. `kinesis-deagg invoke events/aggregated.json`, or see --help"
            .into()),
        Some(Command::Invoke(args)) => return entry::invoke(args, builtin),
        Some(Command::Decode { file, settings }) => read_event(file.as_ref())
            .map_err(Error::from)
            .and_then(|e| decode(e, settings)),
        Some(Command::Aggregate(args)) => aggregate(args),
    };
    match result {
        Ok(code) => code,
        Err(e) if entry::is_broken_pipe(&*e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kinesis-deagg: {e}");
            ExitCode::from(2)
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn decode(event: KinesisEvent, decode: DecodeSettings) -> Result<ExitCode, Error> {
    let settings = Settings {
        on_corrupt: decode.on_corrupt,
        verify_checksum: decode.verify_checksum,
        ..Settings::default()
    };
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for record in &event.records {
        let unpacked = unpack(record, &settings);
        if let RecordOutcome::Corrupt(error, OnCorrupt::Fail) = &unpacked.outcome {
            failed = true;
            let line = json!({"sequenceNumber": &*record.sequence_number, "error": error.kind.to_string()});
            writeln!(out, "{line}")?;
        }
        for user in unpacked.user_records {
            writeln!(out, "{}", decode_line(&user, &record.sequence_number))?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn aggregate(args: AggregateArgs) -> Result<ExitCode, Error> {
    let input = read_input(args.file.as_ref())?;
    let mut aggregator = Aggregator::with_max_size(args.max_size)?;
    // Kinesis records: (outer partition key, outer explicit hash key, `data` text).
    let mut out: Vec<(String, Option<String>, String)> = Vec::new();
    let finished = |r: AggregatedRecord| {
        (
            r.partition_key,
            Some(r.explicit_hash_key),
            STANDARD.encode(&r.data),
        )
    };
    let flush = |aggregator: &mut Aggregator, out: &mut Vec<_>| {
        out.extend(aggregator.finish().map(finished));
    };
    for (n, line) in String::from_utf8(input)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: &str| format!("line {}: {what}", n + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| at(&e.to_string()))?;
        let pk = v["partitionKey"]
            .as_str()
            .ok_or_else(|| at("no string `partitionKey`"))?;
        if let Some(raw) = v["rawData"].as_str() {
            flush(&mut aggregator, &mut out);
            out.push((pk.to_owned(), None, raw.to_owned()));
            continue;
        }
        let ehk = v["explicitHashKey"].as_str();
        let data = match (v["data"].as_str(), v["text"].as_str()) {
            (Some(b64), _) => STANDARD
                .decode(b64)
                .map_err(|e| at(&format!("`data` is not base64: {e}")))?,
            (None, Some(text)) => text.as_bytes().to_vec(),
            (None, None) => return Err(at("needs `data` (base64), `text` or `rawData`").into()),
        };
        if args.plain || v["plain"].as_bool() == Some(true) {
            flush(&mut aggregator, &mut out);
            out.push((
                pk.to_owned(),
                ehk.map(str::to_owned),
                STANDARD.encode(&data),
            ));
            continue;
        }
        if args
            .per_aggregate
            .is_some_and(|max| aggregator.len() as u64 >= max)
        {
            flush(&mut aggregator, &mut out);
        }
        let full = aggregator
            .add(pk, ehk, &data)
            .map_err(|e| at(&e.to_string()))?;
        out.extend(full.map(finished));
    }
    flush(&mut aggregator, &mut out);

    let mut stdout = std::io::stdout().lock();
    if args.put_records {
        let entries: Vec<Value> = out
            .into_iter()
            .map(|(pk, ehk, data)| {
                let mut e = json!({"Data": data, "PartitionKey": pk});
                if let Some(ehk) = ehk {
                    e["ExplicitHashKey"] = ehk.into();
                }
                e
            })
            .collect();
        serde_json::to_writer(&mut stdout, &json!({ "Records": entries }))?;
        writeln!(stdout)?;
        return Ok(ExitCode::SUCCESS);
    }
    let region = args.stream_arn.split(':').nth(3).unwrap_or("us-east-1");
    let records: Vec<Value> = out
        .into_iter()
        .enumerate()
        .map(|(i, (pk, _ehk, data))| {
            let seq = format!("49590000000000000000000000000000000000000000000000{:06}", i + 1);
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": pk,
                    "sequenceNumber": seq,
                    "data": data,
                    "approximateArrivalTimestamp": ((args.arrival * 1000.0).round() + i as f64) / 1000.0,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("{}:{seq}", args.shard_id),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::123456789012:role/kinesis-deagg",
                "awsRegion": region,
                "eventSourceARN": args.stream_arn,
            })
        })
        .collect();
    let mut event = json!({ "Records": records });
    if let (Some(start), Some(end)) = (args.window_start, args.window_end) {
        let state: Value = match &args.state {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => json!({}),
        };
        if !state.is_object() {
            return Err("--state: the file must hold a JSON object".into());
        }
        let fields = json!({
            "window": {"start": start, "end": end},
            "state": state,
            "shardId": args.shard_id,
            "eventSourceARN": args.stream_arn,
            "isFinalInvokeForWindow": args.final_invoke,
            "isWindowTerminatedEarly": false,
        });
        if let (Value::Object(e), Value::Object(f)) = (&mut event, fields) {
            e.extend(f);
        }
    }
    serde_json::to_writer_pretty(&mut stdout, &event)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}
