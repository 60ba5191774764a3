//! The user's code: the [`Transform`] trait, the [`RecordContext`] it receives, [`json`] for
//! typed records, and the built-in transforms.

use std::future::Future;
use std::io::Write;
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytestring::ByteString;
use serde::de::DeserializeOwned;

use crate::event::EventRecord;
use crate::kpl::UserRecord;
use crate::metrics::Metrics;

/// The error a transform returns: anything that is an error (the same type as
/// `lambda_runtime::Error`).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What a transform knows about the user record it is given, besides the record itself.
///
/// All user records of a batch share its Kinesis records and metrics behind one reference
/// count, so a context costs one increment to make: it is made once per user record, up to a
/// few hundred thousand times per invocation, with no allocation. A context kept after its
/// transform call keeps the batch, and so the invocation body, alive.
#[derive(Clone, Debug)]
pub struct RecordContext {
    batch: Arc<Batch>,
    /// The Kinesis record's place in the batch.
    index: usize,
    /// The sub-sequence number plus one, so that a context is 24 bytes: it is moved with
    /// every transform call (at 40 bytes W2 ran 8% more instructions, mostly in `memcpy`).
    sub_sequence_number: Option<NonZeroU64>,
}

/// What the user records of one batch share.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) records: Vec<EventRecord>,
    /// Why each record is passed through, if it is: set when the record is reached.
    pub(crate) passed_through: Box<[OnceLock<Arc<str>>]>,
    pub(crate) metrics: Metrics,
}

impl Batch {
    pub(crate) fn new(records: Vec<EventRecord>) -> Arc<Self> {
        Arc::new(Batch {
            passed_through: records.iter().map(|_| OnceLock::new()).collect(),
            records,
            metrics: Metrics::default(),
        })
    }
}

impl RecordContext {
    /// A context for a record of sequence number `sequence_number`, everything else unknown.
    /// Mostly for tests of transforms.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::transform::RecordContext;
    /// let ctx = RecordContext::new("4959").with_sub_sequence_number(3);
    /// assert_eq!(ctx.idempotency_key(), "4959:3");
    /// assert_eq!(ctx.shard_id(), None);
    /// ```
    pub fn new(sequence_number: &str) -> Self {
        let record = EventRecord {
            sequence_number: sequence_number.into(),
            partition_key: ByteString::new(),
            data: Ok(bytes::Bytes::new()),
            approximate_arrival: None,
            shard_id: None,
            event_source_arn: None,
        };
        RecordContext::of(&Batch::new(vec![record]), 0, None)
    }

    /// The context of a user record of Kinesis record `index` of `batch`.
    pub(crate) fn of(batch: &Arc<Batch>, index: usize, sub_sequence_number: Option<u64>) -> Self {
        let context = RecordContext {
            batch: batch.clone(),
            index,
            sub_sequence_number: None,
        };
        match sub_sequence_number {
            Some(n) => context.with_sub_sequence_number(n),
            None => context,
        }
    }

    /// The Kinesis record's place in the batch.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The Kinesis record that holds the user record.
    fn record(&self) -> &EventRecord {
        &self.batch.records[self.index]
    }

    /// The same context for user record `n` of the aggregate. (`u64::MAX`, which no
    /// aggregate reaches, reads back as none.)
    pub fn with_sub_sequence_number(mut self, n: u64) -> Self {
        self.set_sub_sequence_number(Some(n));
        self
    }

    /// Makes this the context of another user record of the same Kinesis record (no
    /// reference count taken, as a new context would).
    pub(crate) fn set_sub_sequence_number(&mut self, n: Option<u64>) {
        self.sub_sequence_number = n.and_then(|n| NonZeroU64::new(n.wrapping_add(1)));
    }

    /// Sequence number of the Kinesis record holding the user record: what Lambda is told
    /// when the user record fails.
    pub fn sequence_number(&self) -> &str {
        &self.record().sequence_number
    }

    /// Position of the user record in its aggregate; `None` for a record that was not one.
    pub fn sub_sequence_number(&self) -> Option<u64> {
        self.sub_sequence_number.map(|n| n.get() - 1)
    }

    /// The shard, from the event's `eventID`.
    pub fn shard_id(&self) -> Option<&str> {
        self.record().shard_id.as_deref()
    }

    /// The stream's ARN (`eventSourceARN`).
    pub fn stream_arn(&self) -> Option<&str> {
        self.record().event_source_arn.as_deref()
    }

    /// When Kinesis received the Kinesis record.
    pub fn approximate_arrival(&self) -> Option<SystemTime> {
        self.record().approximate_arrival
    }

    /// True when the user record came out of a KPL aggregate (so it has a sub-sequence
    /// number).
    pub fn aggregated(&self) -> bool {
        self.sub_sequence_number.is_some()
    }

    /// Set when the record is delivered raw although it looked like something else (a corrupt
    /// aggregate or invalid base64 under `DEAGG_ON_CORRUPT=passthrough`, or a checksum
    /// mismatch): the reason, as logged.
    pub fn passed_through(&self) -> Option<&str> {
        self.batch.passed_through[self.index]
            .get()
            .map(|why| &**why)
    }

    /// Counters for the invocation's metrics document, shared by all user records of the
    /// batch: `ctx.metrics().add("OrdersStored", 1.0)`.
    pub fn metrics(&self) -> &Metrics {
        &self.batch.metrics
    }

    /// A key that names this user record across retries: the sequence number, plus
    /// `:<sub-sequence number>` for a user record of an aggregate.
    ///
    /// When user record k of an aggregate fails, Lambda retries the whole Kinesis record and
    /// user records 0..k-1 are seen again, so a transform with side effects should remember
    /// this key (or make its effect idempotent some other way).
    pub fn idempotency_key(&self) -> String {
        match self.sub_sequence_number() {
            Some(sub) => format!("{}:{sub}", self.sequence_number()),
            None => self.sequence_number().to_string(),
        }
    }
}

/// Your code: called once per user record, in order within a shard (and within a partition
/// key in the concurrent mode).
///
/// Return `Err` to fail the user record: the Kinesis record that holds it is reported to
/// Lambda, which retries from there. A panic is caught and counts as a failure too.
///
/// Any `async` closure (or function) taking `(UserRecord, RecordContext)` is a transform (and
/// [`json`] makes one of a closure taking the record's data already parsed into your type):
///
/// ```
/// use kinesis_deagg::kpl::UserRecord;
/// use kinesis_deagg::transform::{RecordContext, Transform};
///
/// let count_bytes = |record: UserRecord, ctx: RecordContext| async move {
///     if record.data().is_empty() {
///         return Err(format!("{} is empty", ctx.idempotency_key()).into());
///     }
///     Ok::<(), kinesis_deagg::transform::Error>(())
/// };
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let empty = UserRecord::plain("k", None, bytes::Bytes::new());
/// assert!(rt.block_on(count_bytes.call(empty, RecordContext::new("1"))).is_err());
/// ```
pub trait Transform {
    /// Handles one user record, and says what a sink delivers for it (`Ok(())` is
    /// [`Output::Same`]: the user record as it came).
    fn call(
        &self,
        record: UserRecord,
        context: RecordContext,
    ) -> impl Future<Output = Result<Output, Error>>;
}

impl<F, Fut, O, E> Transform for F
where
    F: Fn(UserRecord, RecordContext) -> Fut,
    Fut: Future<Output = Result<O, E>>,
    O: Into<Output>,
    E: Into<Error>,
{
    async fn call(&self, record: UserRecord, context: RecordContext) -> Result<Output, Error> {
        self(record, context)
            .await
            .map(Into::into)
            .map_err(Into::into)
    }
}

/// What a transform hands on to the [sink](crate::sink) for a user record it accepted.
/// Without a sink it is ignored.
///
/// A transform returning `()` delivers the user record as it came; one returning a
/// [`UserRecord`] delivers that one, and one returning an `Option` delivers nothing for
/// `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// The user record as it came.
    #[default]
    Same,
    /// The same keys with this data.
    Data(bytes::Bytes),
    /// This user record instead.
    Record(UserRecord),
    /// Nothing: the user record is filtered out.
    Drop,
}

impl From<()> for Output {
    fn from((): ()) -> Self {
        Output::Same
    }
}

impl From<UserRecord> for Output {
    fn from(record: UserRecord) -> Self {
        Output::Record(record)
    }
}

impl<O: Into<Output>> From<Option<O>> for Output {
    fn from(output: Option<O>) -> Self {
        output.map_or(Output::Drop, Into::into)
    }
}

/// A transform of typed records: each user record's data is read as one JSON document of
/// type `T` (with `serde_json`) and handed to `f` with its context.
///
/// A user record that is not a `T` fails without reaching `f`, like any transform error: the
/// Kinesis record holding it is reported to Lambda, and the batch logs, with its sequence
/// number, `user record <key> is not a valid <T>: <serde's reason>` (`<key>` is the
/// [idempotency key](RecordContext::idempotency_key), which names the user record within its
/// aggregate). To acknowledge JSON of another shape instead, take a `#[serde(untagged)]` enum
/// whose last variant holds a [`serde_json::Value`]; to acknowledge data that is not JSON at
/// all, or to see the partition key, write a plain [`Transform`] and parse the data yourself.
///
/// # Examples
///
/// ```
/// use kinesis_deagg::transform::{self, RecordContext};
/// use kinesis_deagg::{Processor, Settings, event::KinesisEvent};
///
/// #[derive(serde::Deserialize)]
/// struct Order {
///     id: u64,
///     total_cents: u64,
/// }
///
/// let transform = transform::json(|order: Order, ctx: RecordContext| async move {
///     if order.total_cents == 0 {
///         return Err(format!("order {} ({}) is free", order.id, ctx.idempotency_key()));
///     }
///     ctx.metrics().add("OrderCents", order.total_cents as f64);
///     Ok(())
/// });
/// let processor = Processor::new(transform, Settings::default());
/// // {"id":1,"total_cents":250}, then {"id":"two"}.
/// let event = KinesisEvent::from_slice(br#"{"Records":[
///   {"kinesis":{"sequenceNumber":"1","data":"eyJpZCI6MSwidG90YWxfY2VudHMiOjI1MH0="}},
///   {"kinesis":{"sequenceNumber":"2","data":"eyJpZCI6InR3byJ9"}}]}"#).unwrap();
/// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
/// let outcome = rt.block_on(processor.handle(&event, None)).unwrap();
/// let failure = outcome.failure.unwrap();
/// assert_eq!(failure.sequence_number, "2");
/// assert!(failure.reason.to_string().contains("user record 2 is not a valid Order: invalid type"));
/// assert_eq!(outcome.metrics["OrderCents"], 250.0);
/// ```
pub fn json<T, F, Fut, O, E>(f: F) -> Json<T, F>
where
    T: DeserializeOwned,
    F: Fn(T, RecordContext) -> Fut,
    Fut: Future<Output = Result<O, E>>,
    O: Into<Output>,
    E: Into<Error>,
{
    Json {
        f,
        type_name: short_type_name(std::any::type_name::<T>()),
        _record: PhantomData,
    }
}

/// The transform [`json`] makes: a function of typed records behind a JSON parser.
pub struct Json<T, F> {
    f: F,
    /// `T`'s name without its module paths, for errors.
    type_name: Arc<str>,
    /// `fn() -> T`: a `Json` holds no `T`, so it is `Send` and `Sync` whatever `T` is.
    _record: PhantomData<fn() -> T>,
}

impl<T, F: Clone> Clone for Json<T, F> {
    fn clone(&self) -> Self {
        Json {
            f: self.f.clone(),
            type_name: self.type_name.clone(),
            _record: PhantomData,
        }
    }
}

impl<T, F> std::fmt::Debug for Json<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Json")
            .field("type", &self.type_name)
            .finish_non_exhaustive()
    }
}

impl<T, F, Fut, O, E> Transform for Json<T, F>
where
    T: DeserializeOwned,
    F: Fn(T, RecordContext) -> Fut,
    Fut: Future<Output = Result<O, E>>,
    O: Into<Output>,
    E: Into<Error>,
{
    async fn call(&self, record: UserRecord, context: RecordContext) -> Result<Output, Error> {
        let value = serde_json::from_slice::<T>(record.data()).map_err(|e| {
            format!(
                "user record {} is not a valid {}: {e}",
                context.idempotency_key(),
                self.type_name
            )
        })?;
        (self.f)(value, context)
            .await
            .map(Into::into)
            .map_err(Into::into)
    }
}

/// A type's name as [`std::any::type_name`] gives it, without module paths:
/// `alloc::vec::Vec<my_app::Order>` becomes `Vec<Order>`.
fn short_type_name(full: &str) -> Arc<str> {
    let mut short = String::with_capacity(full.len());
    let mut segment = String::new();
    for c in full.chars() {
        // `{{closure}}` is a segment of the path of a type declared in a function.
        if c.is_alphanumeric() || matches!(c, '_' | ':' | '{' | '}') {
            segment.push(c);
        } else {
            short.push_str(segment.rsplit("::").next().unwrap_or_default());
            segment.clear();
            short.push(c);
        }
    }
    short.push_str(segment.rsplit("::").next().unwrap_or_default());
    short.into()
}

/// The transforms that ship with the binary, chosen with `DEAGG_TRANSFORM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Builtin {
    /// One structured log line per user record (data as UTF-8 when it is, else base64,
    /// truncated beyond `DEAGG_LOG_MAX_BYTES`).
    Log,
    /// The `decode` JSON line of each user record on stdout.
    Echo,
    /// Fails any user record whose data is not one valid JSON document.
    Json,
    /// Reads every byte of every user record and acknowledges it: for benchmarks and for
    /// draining a stream.
    Discard,
}

/// A [`Builtin`] with its settings, ready to run.
#[derive(Clone, Copy, Debug)]
pub struct BuiltinTransform {
    kind: Builtin,
    log_max_bytes: usize,
}

impl BuiltinTransform {
    /// The built-in `kind`; `log_max_bytes` bounds the data shown by `log`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kinesis_deagg::kpl::UserRecord;
    /// use kinesis_deagg::transform::{Builtin, BuiltinTransform, RecordContext, Transform};
    /// let json = BuiltinTransform::new(Builtin::Json, 256);
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let bad = UserRecord::plain("k", None, "{oops".into());
    /// assert!(rt.block_on(json.call(bad, RecordContext::new("1"))).is_err());
    /// ```
    pub fn new(kind: Builtin, log_max_bytes: usize) -> Self {
        BuiltinTransform {
            kind,
            log_max_bytes,
        }
    }
}

impl Transform for BuiltinTransform {
    async fn call(&self, record: UserRecord, context: RecordContext) -> Result<Output, Error> {
        match self.kind {
            Builtin::Log => {
                tracing::info!(
                    sequence_number = context.sequence_number(),
                    sub_sequence_number = context.sub_sequence_number(),
                    partition_key = record.partition_key(),
                    explicit_hash_key = record.explicit_hash_key(),
                    bytes = record.data().len(),
                    // A string, so that text logs quote it (and escape what it holds).
                    data = show(record.data(), self.log_max_bytes).as_str(),
                    "user record"
                );
            }
            Builtin::Echo => {
                let line = decode_line(&record, context.sequence_number());
                // A closed stdout is this record's failure, not a panic.
                writeln!(std::io::stdout().lock(), "{line}")?;
            }
            Builtin::Json => {
                serde_json::from_slice::<serde::de::IgnoredAny>(record.data())
                    .map_err(|e| format!("user record is not one JSON document: {e}"))?;
            }
            Builtin::Discard => {
                let sum = record.data().iter().fold(0u8, |a, b| a.wrapping_add(*b));
                std::hint::black_box(sum);
            }
        }
        Ok(Output::Same)
    }
}

/// The JSON line `kinesis-deagg decode` and the `echo` transform print for a user record:
/// `sequenceNumber`, `subSequenceNumber` (null when not aggregated), `partitionKey`,
/// `explicitHashKey` (null when absent), `data` in standard base64, and `text`, the data
/// when it is UTF-8 (null otherwise).
///
/// # Examples
///
/// ```
/// use kinesis_deagg::kpl::UserRecord;
/// use kinesis_deagg::transform::decode_line;
/// let line = decode_line(&UserRecord::plain("k", None, "hi".into()), "42");
/// let v: serde_json::Value = serde_json::from_str(&line).unwrap();
/// assert_eq!(v, serde_json::json!({"sequenceNumber": "42", "subSequenceNumber": null,
///     "partitionKey": "k", "explicitHashKey": null, "data": "aGk=", "text": "hi"}));
/// ```
pub fn decode_line(record: &UserRecord, sequence_number: &str) -> String {
    serde_json::json!({
        "sequenceNumber": sequence_number,
        "subSequenceNumber": record.sub_sequence_number(),
        "partitionKey": record.partition_key(),
        "explicitHashKey": record.explicit_hash_key(),
        "data": STANDARD.encode(record.data()),
        "text": std::str::from_utf8(record.data()).ok(),
    })
    .to_string()
}

/// Data for a log line: UTF-8 text when it is, else `base64:...`, cut at `max` bytes.
fn show(data: &[u8], max: usize) -> String {
    let cut = &data[..data.len().min(max)];
    let mut shown = match std::str::from_utf8(cut) {
        Ok(text) => text.to_owned(),
        // A cut through a multi-byte character is still text: show the valid prefix.
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&cut[..e.valid_up_to()]).into_owned()
        }
        Err(_) => format!("base64:{}", STANDARD.encode(cut)),
    };
    if cut.len() < data.len() {
        shown.push_str(&format!("... ({} bytes in all)", data.len()));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_shows_text_as_text_binary_as_base64_and_truncates() {
        assert_eq!(show(b"hello", 10), "hello");
        assert_eq!(show(b"hello world", 5), "hello... (11 bytes in all)");
        assert_eq!(show(&[0xFF, 0x00], 10), "base64:/wA=");
        // "é" is two bytes; cutting after the first keeps the text readable.
        assert_eq!(show("aé".as_bytes(), 2), "a... (3 bytes in all)");
    }

    #[tokio::test]
    async fn json_accepts_one_document_and_rejects_the_rest() {
        let json = BuiltinTransform::new(Builtin::Json, 0);
        for (data, ok) in [
            (&b"{\"a\":1}"[..], true),
            (b" [1] ", true),
            (b"1 2", false),
            (b"", false),
        ] {
            let r = json
                .call(
                    UserRecord::plain("k", None, data.into()),
                    RecordContext::new("1"),
                )
                .await;
            assert_eq!(r.is_ok(), ok, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn type_names_lose_their_module_paths() {
        assert_eq!(&*short_type_name("my_app::Order"), "Order");
        assert_eq!(&*short_type_name("u64"), "u64");
        assert_eq!(&*short_type_name("t::main::{{closure}}::Order"), "Order");
        assert_eq!(
            &*short_type_name("alloc::vec::Vec<my_app::orders::Order>"),
            "Vec<Order>"
        );
        assert_eq!(
            &*short_type_name("(a::B, std::collections::HashMap<String, c::D>)"),
            "(B, HashMap<String, D>)"
        );
    }

    #[tokio::test]
    async fn json_hands_typed_records_on_and_names_the_ones_that_do_not_parse() {
        #[derive(serde::Deserialize)]
        struct Order {
            id: u64,
        }
        let seen = std::cell::RefCell::new(Vec::new());
        let t = json(|o: Order, c: RecordContext| {
            seen.borrow_mut().push((o.id, c.idempotency_key()));
            async { Ok::<(), Error>(()) }
        });
        let ctx = RecordContext::new("77").with_sub_sequence_number(2);
        let ok = UserRecord::plain("k", None, br#"{"id":5}"#[..].into());
        t.call(ok, ctx.clone()).await.unwrap();
        assert_eq!(*seen.borrow(), [(5, "77:2".to_string())]);
        let bad = UserRecord::plain("k", None, br#"{"id":5} {}"#[..].into());
        let e = t.call(bad, ctx).await.unwrap_err().to_string();
        assert!(
            e.starts_with("user record 77:2 is not a valid Order: trailing characters"),
            "{e}"
        );
        assert_eq!(seen.borrow().len(), 1);
        assert_eq!(format!("{t:?}"), r#"Json { type: "Order", .. }"#);
    }

    #[tokio::test]
    async fn an_untagged_enum_with_a_catch_all_acknowledges_json_of_another_shape() {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Message {
            Order { id: u64 },
            Other(serde_json::Value),
        }
        let t = json(|m: Message, _| async move {
            match m {
                Message::Order { id } if id > 0 => Ok(()),
                Message::Order { .. } => Err("order 0"),
                Message::Other(v) if v.is_object() => Ok(()),
                Message::Other(_) => Err("not an object"),
            }
        });
        let call = |data: &'static [u8]| {
            t.call(
                UserRecord::plain("k", None, data.into()),
                RecordContext::new("1"),
            )
        };
        assert!(call(br#"{"id":1}"#).await.is_ok());
        assert!(call(br#"{"id":0}"#).await.is_err());
        assert!(call(br#"{"kind":"ping"}"#).await.is_ok());
        let e = call(b"ping").await.unwrap_err().to_string();
        assert!(
            e.starts_with("user record 1 is not a valid Message: "),
            "{e}"
        );
    }

    #[test]
    fn idempotency_keys_differ_per_user_record() {
        let c = RecordContext::new("9");
        assert_eq!(c.idempotency_key(), "9");
        assert_eq!(c.with_sub_sequence_number(0).idempotency_key(), "9:0");
    }
}
