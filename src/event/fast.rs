//! The fast path for reading an event: a validating scan of the JSON that builds the same
//! raw records as the serde path, for the events Lambda actually sends.
//!
//! Why: with serde_json, most of the time on small plain records went to scanning the
//! `data` strings byte by byte for escapes and checking them as UTF-8, although base64 text
//! can hold neither. Here a `data` string is found with `memchr` and checked by the base64
//! decoder alone.
//!
//! The fast path only ever answers for JSON it fully checked. Anything unusual (an escape in
//! a string, a duplicate field, deep nesting, a number serde_json would refuse, text that is
//! neither base64 nor valid JSON, any syntax error) gives up, and the caller reads the event
//! with serde, which then decides, with its messages. Property tests hold the two paths
//! equal.

use std::borrow::Cow;
use std::ops::Range;

use memchr::memchr2;

use super::{EventRecord, FromJsonStr, Lenient, Loose, RawKinesis, RawRecord, Repeated, Text};

/// True unless a text the base64 decoder refused is not even a JSON string (a control
/// character or invalid UTF-8 in it): the fast path never checked that, serde must decide.
pub(super) fn refused_texts_are_json(records: &[EventRecord]) -> bool {
    records
        .iter()
        .all(|r| !matches!(&r.data, Err(bad) if !is_json_string(&bad.raw)))
}

/// Whether `text` may stand between the quotes of a JSON string (escapes aside): UTF-8
/// without control characters.
fn is_json_string(text: &[u8]) -> bool {
    !text.iter().any(|&b| b < 0x20) && std::str::from_utf8(text).is_ok()
}

/// The most records a Lambda Kinesis event holds (its largest batch size).
const MAX_BATCH: usize = 10_000;

/// Deeper than this, give up (serde_json itself stops at 128).
const MAX_DEPTH: usize = 100;

/// Where a record's sequence number and partition key stand, from the start of the body
/// (`0..0` for an empty one).
pub(super) type Strings = [Range<usize>; 2];

/// The records of an event and where their strings stand (see [`read`]).
pub(super) type Records = (Vec<EventRecord>, Vec<Strings>);

/// The records of the event in `json`, their `data` still to decode and their sequence
/// numbers and partition keys still to make (empty: see [`Strings`]). `None`: read it the
/// serde way.
///
/// Each record's `data` text is handed to `text` (with the record's index and where the text
/// stands) as soon as the record is read, before the next one is: the text was just scanned,
/// so it is still in the cache, and `text` may decode it in place, since the scan never looks
/// back. (Read first and decoded after, each text came from memory twice.) For the same
/// reason `text` may cut off the front of `json` up to the end of the text: it says how many
/// bytes it cut (0 to cut nothing), and every place after that is counted from the new front.
///
/// The tumbling-window fields beside `Records` (see [`super::WINDOW_FIELDS`]) come back as
/// the text of a JSON object holding them alone, for serde to read: a state is small next
/// to the records (Lambda caps it at 1 MB), and is copied once.
pub(super) fn read<J: AsRef<[u8]> + ?Sized>(
    json: &mut J,
    mut text: impl FnMut(&mut J, usize, Range<usize>) -> usize,
) -> Option<(Records, Vec<u8>)> {
    let mut records = None;
    let mut extras = Vec::new();
    let mut scan = Scanner::new(json.as_ref(), 0);
    scan.eat(b'{')?;
    if scan.eat(b'}').is_none() {
        loop {
            let key = scan.checked_string()?;
            scan.eat(b':')?;
            if key != b"Records" {
                let start = scan.pos;
                scan.skip(1)?;
                if super::WINDOW_FIELDS.iter().any(|f| f.as_bytes() == key) {
                    extras.push(if extras.is_empty() { b'{' } else { b',' });
                    extras.push(b'"');
                    extras.extend_from_slice(key);
                    extras.extend_from_slice(b"\":");
                    extras.extend_from_slice(&scan.json[start..scan.pos]);
                }
            } else if records.is_some() {
                return None; // serde: duplicate field
            } else {
                let (read, end) = read_records(json, scan.pos, &mut text)?;
                records = Some(read);
                scan = Scanner::new(json.as_ref(), end);
            }
            if scan.eat(b',').is_none() {
                scan.eat(b'}')?;
                break;
            }
        }
    }
    scan.ws();
    if scan.pos != scan.json.len() {
        return None; // trailing characters
    }
    if !extras.is_empty() {
        extras.push(b'}');
    }
    Some((records?, extras))
}

/// The `Records` array at `pos`, read as the serde path reads it, and where it ends (from the
/// front `json` then has: see [`read`] on cutting it). Each record is read by a scanner of its
/// own, so that `text` may change what is behind it.
fn read_records<J: AsRef<[u8]> + ?Sized>(
    json: &mut J,
    pos: usize,
    text: &mut impl FnMut(&mut J, usize, Range<usize>) -> usize,
) -> Option<(Records, usize)> {
    let (mut records, mut strings) = (Vec::new(), Vec::new());
    let mut repeated = Repeated::default();
    // How much `text` cut off the front, in all.
    let mut cut = 0;
    let mut scan = Scanner::new(json.as_ref(), pos);
    scan.eat(b'[')?;
    if scan.eat(b']').is_some() {
        return Some(((records, strings), scan.pos));
    }
    loop {
        let first = scan.peek()?;
        let start = scan.pos;
        let raw = match first {
            b'{' => Lenient::Object(scan.record()?),
            _ => Lenient::Not(scan.skip(2)?),
        };
        // A record serde refuses fails the event: serde says how.
        let (record, borrowed) = EventRecord::from_raw(raw, &mut repeated).ok()?;
        // Where a string stands in what `scan` reads. Copies are never made here (no
        // escapes); were one, serde would read the event.
        let at = |s: &Cow<[u8]>| match s {
            Cow::Borrowed(s) => {
                let start = s.as_ptr() as usize - scan.json.as_ptr() as usize;
                Some(start..start + s.len())
            }
            Cow::Owned(_) => None,
        };
        // The same from the start of the body, an empty (or absent) string nowhere.
        let string_at = |s: &Cow<[u8]>| match s.is_empty() {
            true => Some(0..0),
            false => at(s).map(|r| r.start + cut..r.end + cut),
        };
        let (seq, pk) = (&borrowed.sequence_number, &borrowed.partition_key);
        strings.push([string_at(seq)?, string_at(pk)?]);
        let data_at = match &borrowed.data {
            Some(Text(data)) => Some(at(data)?),
            None => None,
        };
        if records.is_empty() {
            // The records of an event are much alike: room for as many more as the rest of
            // the body would hold of the first (never more than Lambda's largest batch), so
            // that the lists are not copied as they grow.
            let like_it = (scan.json.len() - scan.pos) / (scan.pos - start) + 1;
            records.reserve(like_it.min(MAX_BATCH));
            strings.reserve(like_it.min(MAX_BATCH));
        }
        let mut pos = scan.pos;
        records.push(record);
        if let Some(data_at) = data_at {
            let cut_now = text(json, records.len() - 1, data_at);
            pos -= cut_now;
            cut += cut_now;
        }
        scan = Scanner::new(json.as_ref(), pos);
        if scan.eat(b',').is_none() {
            scan.eat(b']')?;
            return Some(((records, strings), scan.pos));
        }
    }
}

struct Scanner<'a> {
    json: &'a [u8],
    pos: usize,
}

/// Where the first `"`, `\` or control character of `bytes` is, and whether every byte before
/// it is ASCII (then it needs no UTF-8 check). Sixteen bytes at a time (SSE2 through `wide`).
fn string_end(bytes: &[u8]) -> Option<(usize, bool)> {
    use wide::u8x16;
    let (quote, backslash, last_control) =
        (u8x16::splat(b'"'), u8x16::splat(b'\\'), u8x16::splat(0x1F));
    let mut high = 0;
    let mut chunks = bytes.chunks_exact(16);
    for (i, chunk) in (&mut chunks).enumerate() {
        let x = u8x16::from(<[u8; 16]>::try_from(chunk).ok()?);
        let special = x.simd_eq(quote) | x.simd_eq(backslash) | x.min(last_control).simd_eq(x);
        let (flags, non_ascii) = (special.to_bitmask(), x.to_bitmask());
        if flags != 0 {
            let at = flags.trailing_zeros();
            let before = non_ascii & ((1 << at) - 1);
            return Some((i * 16 + at as usize, high | before == 0));
        }
        high |= non_ascii;
    }
    tail_end(bytes, chunks.remainder(), high == 0)
}

/// [`string_end`] in the last bytes of the event, fewer than sixteen (`tail`): rare, so kept
/// out of the way of the loop.
#[cold]
fn tail_end(bytes: &[u8], tail: &[u8], ascii: bool) -> Option<(usize, bool)> {
    let at = tail
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    Some((
        bytes.len() - tail.len() + at,
        ascii && tail[..at].is_ascii(),
    ))
}

/// Powers of ten up to the largest [`scan_number`] divides by, each exact in an `f64`.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// How many of the first bytes of `bytes` are number characters, and their value if they are
/// a plain decimal of at most 15 digits (`0`, `12`, `1764000000.123`: no sign, no exponent, no
/// leading zero); anything else is left to serde_json.
///
/// Why: serde_json took about 350 instructions for each record's timestamp (a deserializer
/// set up per number); this is one pass. The value is the same: the digits as an integer
/// (below 2^53) and the power of ten are both exact in an `f64`, so the one division is
/// correctly rounded, as serde_json's result is (it divides the same two numbers; with its
/// `float_roundtrip` feature it rounds correctly by other means).
fn scan_number(bytes: &[u8]) -> (usize, Option<f64>) {
    let (mut len, mut n, mut digits, mut point, mut plain) = (0, 0u64, 0, None, true);
    for &b in bytes {
        match b {
            b'0'..=b'9' => {
                n = n.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                digits += 1;
            }
            b'.' if point.is_none() => point = Some(digits),
            b'-' | b'+' | b'.' | b'e' | b'E' => plain = false,
            _ => break,
        }
        len += 1;
    }
    let whole_digits = point.unwrap_or(digits);
    let fraction_digits = digits - whole_digits;
    let plain = plain
        && whole_digits > 0
        && (bytes[0] != b'0' || whole_digits == 1)
        && point.is_none_or(|_| fraction_digits > 0)
        && digits < POW10.len();
    (len, plain.then(|| n as f64 / POW10[fraction_digits]))
}

impl<'a> Scanner<'a> {
    fn new(json: &'a [u8], pos: usize) -> Self {
        Scanner { json, pos }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.json.get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.json.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        // Most tokens follow the last one at once (or after the peek that chose them).
        if self.json.get(self.pos) != Some(&byte) {
            self.ws();
        }
        (*self.json.get(self.pos)? == byte).then(|| self.pos += 1)
    }

    /// A string's bytes, unchecked, when it has no escape.
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.json[self.pos..];
        let end = memchr2(b'"', b'\\', rest)?;
        if rest[end] == b'\\' {
            return None;
        }
        self.pos += end + 1;
        Some(&rest[..end])
    }

    /// A string's bytes, without escapes or control characters, and whether they are all
    /// ASCII; not yet checked as UTF-8.
    #[inline(always)]
    fn string_bytes(&mut self) -> Option<(&'a [u8], bool)> {
        self.eat(b'"')?;
        let rest = &self.json[self.pos..];
        let (len, ascii) = string_end(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.pos += len + 1;
        Some((&rest[..len], ascii))
    }

    /// A string's bytes as JSON requires them (UTF-8, no control characters), here also
    /// without escapes.
    #[inline(always)]
    fn checked_string(&mut self) -> Option<&'a [u8]> {
        let (bytes, ascii) = self.string_bytes()?;
        // Most strings are ASCII: only the others are checked as UTF-8.
        (ascii || std::str::from_utf8(bytes).is_ok()).then_some(bytes)
    }

    /// A number, the very value the serde path reads: a plain decimal (the timestamps) read
    /// here, anything else converted by serde_json itself (which also checks the grammar and
    /// refuses what overflows).
    fn number(&mut self) -> Option<f64> {
        self.ws();
        let start = self.pos;
        let (len, plain) = scan_number(&self.json[start..]);
        self.pos += len;
        plain.or_else(
            || match serde_json::from_slice(&self.json[start..self.pos]).ok()? {
                Loose::<std::sync::Arc<str>>::Num(n) => Some(n),
                _ => None,
            },
        )
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        self.json[self.pos..]
            .starts_with(word)
            .then(|| self.pos += word.len())
    }

    /// Skips any value, checking it; says what kind it was, in the words of `Loose`.
    ///
    /// Inlined for the common case, a string (the fields of a record that are not kept).
    #[inline(always)]
    fn skip(&mut self, depth: usize) -> Option<&'static str> {
        match self.peek()? {
            b'"' => self.checked_string().map(|_| "a string"),
            _ => self.skip_other(depth),
        }
    }

    /// [`skip`](Self::skip) on anything but a string.
    fn skip_other(&mut self, depth: usize) -> Option<&'static str> {
        Some(match self.peek()? {
            b'{' => self
                .object(depth + 1, |scan, _| scan.skip(depth + 1).map(drop))
                .map(|()| "an object")?,
            b'[' => self
                .array(depth + 1, |scan| scan.skip(depth + 1).map(drop))
                .map(|()| "an array")?,
            b't' => self.literal(b"true").map(|()| "a boolean")?,
            b'f' => self.literal(b"false").map(|()| "a boolean")?,
            b'n' => self.literal(b"null").map(|()| "null")?,
            _ => self.number().map(|_| "a number")?,
        })
    }

    /// An object, each field's value read by `field` (given the key).
    fn object(
        &mut self,
        depth: usize,
        mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.sequence(depth, b'{', b'}', |scan| {
            let key = scan.checked_string()?;
            scan.eat(b':')?;
            field(scan, key)
        })
    }

    fn array(&mut self, depth: usize, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.sequence(depth, b'[', b']', element)
    }

    /// `open`, items separated by commas, `close`.
    fn sequence(
        &mut self,
        depth: usize,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.eat(open)?;
        if self.eat(close).is_some() {
            return Some(());
        }
        loop {
            item(self)?;
            if self.eat(b',').is_none() {
                return self.eat(close);
            }
        }
    }

    /// A field's value as serde reads an `Option<Loose<S>>`: `null` is `None`.
    fn loose<S>(
        &mut self,
        depth: usize,
        text: impl FnOnce(&mut Self) -> Option<S>,
    ) -> Option<Option<Loose<S>>> {
        Some(Some(match self.peek()? {
            b'"' => Loose::Str(text(self)?),
            b'n' => return self.literal(b"null").map(|()| None),
            b'-' | b'0'..=b'9' => Loose::Num(self.number()?),
            _ => Loose::Other(self.skip(depth)?),
        }))
    }

    fn loose_str<S: FromJsonStr<'a>>(&mut self, depth: usize) -> Option<Option<Loose<S>>> {
        self.loose(depth, |scan| S::from_checked_bytes(scan.checked_string()?))
    }

    /// A `data` field: its text is checked later, by the base64 decoder.
    fn loose_text(&mut self, depth: usize) -> Option<Option<Loose<Text<'a>>>> {
        self.loose(depth, |scan| scan.raw_string().map(|raw| Text(raw.into())))
    }

    /// One record object (Lambda's or `get-records`' shape).
    fn record(&mut self) -> Option<RawRecord<'a>> {
        let mut raw = RawRecord::default();
        let mut seen = Seen::default();
        self.object(2, |scan, key| match key {
            b"kinesis" => seen.set(0, &mut raw.kinesis, scan.kinesis()?),
            b"eventID" => seen.set(1, &mut raw.event_id, scan.loose_str(3)?),
            b"eventSourceARN" => seen.set(2, &mut raw.event_source_arn, scan.loose_str(3)?),
            b"SequenceNumber" => {
                seen.set(3, &mut raw.get_records_sequence_number, scan.loose_str(3)?)
            }
            b"PartitionKey" => seen.set(4, &mut raw.get_records_partition_key, scan.loose_str(3)?),
            b"Data" => seen.set(5, &mut raw.get_records_data, scan.loose_text(3)?),
            b"ApproximateArrivalTimestamp" => {
                let slot = &mut raw.get_records_approximate_arrival_timestamp;
                seen.set(6, slot, scan.loose_str(3)?)
            }
            _ => scan.skip(3).map(drop),
        })?;
        // With a `kinesis` object, `Data` is read but never decoded: check its text here.
        if let (Some(Lenient::Object(_)), Some(Loose::Str(text))) =
            (&raw.kinesis, &raw.get_records_data)
            && !is_json_string(&text.0)
        {
            return None;
        }
        Some(raw)
    }

    /// The `kinesis` field of a Lambda record, as serde reads an `Option<Lenient<..>>`.
    fn kinesis(&mut self) -> Option<Option<Lenient<RawKinesis<'a>>>> {
        let mut raw = RawKinesis::default();
        let mut seen = Seen::default();
        match self.peek()? {
            b'{' => {}
            b'n' => return self.literal(b"null").map(|()| None),
            _ => return Some(Some(Lenient::Not(self.skip(3)?))),
        }
        self.object(3, |scan, key| match key {
            b"sequenceNumber" => seen.set(0, &mut raw.sequence_number, scan.loose_str(4)?),
            b"partitionKey" => seen.set(1, &mut raw.partition_key, scan.loose_str(4)?),
            b"data" => seen.set(2, &mut raw.data, scan.loose_text(4)?),
            b"approximateArrivalTimestamp" => seen.set(
                3,
                &mut raw.approximate_arrival_timestamp,
                scan.loose_str(4)?,
            ),
            _ => scan.skip(4).map(drop),
        })?;
        Some(Some(Lenient::Object(raw)))
    }
}

/// Which known fields an object had: serde refuses a duplicate one.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    /// Stores the value of field number `field`, unless the object had that field already.
    #[inline(always)]
    fn set<T>(&mut self, field: u8, slot: &mut T, value: T) -> Option<()> {
        let bit = 1 << field;
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        *slot = value;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::KinesisEvent;

    /// The oracle: whenever the fast path answers, serde reads the same records.
    fn agrees(json: &[u8]) -> Result<(), TestCaseError> {
        // `Deserialize` is the serde path alone.
        let slow = serde_json::from_slice::<KinesisEvent>(json).ok();
        prop_assert_eq!(&KinesisEvent::from_slice(json).ok(), &slow);
        prop_assert_eq!(&KinesisEvent::from_owned(json).ok(), &slow);
        Ok(())
    }

    const KEYS: &[&str] = &[
        "kinesis",
        "eventID",
        "eventSourceARN",
        "SequenceNumber",
        "PartitionKey",
        "Data",
        "ApproximateArrivalTimestamp",
        "sequenceNumber",
        "partitionKey",
        "data",
        "approximateArrivalTimestamp",
        "eventSource",
        "kin\\u0065sis",
        "dat\\u0061",
        "Records",
    ];

    /// Values the fast path reads: strings, numbers and the rest.
    const VALUES: &[&str] = &[
        r#""aGk=""#,
        r#""aGk""#,
        r#""!!""#,
        "12",
        "-0",
        "1.5e3",
        "1545084650.987",
        "-1",
        "18446744073709551616",
        "true",
        "false",
        "null",
        "[1,[2,{}]]",
        r#"{"a":{"b":[]}}"#,
        r#""""#,
        r#""shardId-000000000006:49590""#,
        "\"\u{e9}\"",
        r#""arn:aws:kinesis:us-east-1:1:stream/s""#,
    ];

    /// Values that send the event to serde: escapes, bad strings, numbers, syntax.
    const ODD_VALUES: &[&str] = &[
        r#""aG\u0073=""#,
        r#""\/""#,
        "1e400",
        "\"\t\"",
        "\"\u{1}\"",
        "01",
        "1.",
        "+1",
        ".5",
        "[1,]",
        "tru",
    ];

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", " ", "\n\t", "\r\n  "])
    }

    /// Any value, mostly one the fast path reads.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            20 => prop::sample::select(VALUES).prop_map(String::from),
            1 => prop::sample::select(ODD_VALUES).prop_map(String::from),
        ]
    }

    /// `"key":value`, mostly with a typical value, else any value, a second time, or not at all.
    fn field(key: &'static str, typical: BoxedStrategy<String>) -> BoxedStrategy<Vec<String>> {
        let pair = move |v: String| format!("\"{key}\":{v}");
        prop_oneof![
            20 => typical.prop_map(move |v| vec![pair(v)]),
            4 => value().prop_map(move |v| vec![pair(v)]),
            1 => (value(), value()).prop_map(move |(a, b)| vec![pair(a), pair(b)]),
            2 => Just(vec![]),
        ]
        .boxed()
    }

    fn typical(values: &'static [&'static str]) -> BoxedStrategy<String> {
        prop::sample::select(values).prop_map(String::from).boxed()
    }

    /// An object of the given fields and some unknown ones, in any order, with any spacing.
    fn object(fields: Vec<BoxedStrategy<Vec<String>>>) -> BoxedStrategy<String> {
        let unknown =
            (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("\"{k}\":{v}"));
        (fields, prop::collection::vec(unknown, 0..2), ws())
            .prop_flat_map(|(fields, unknown, w)| {
                let all: Vec<String> = fields.into_iter().flatten().chain(unknown).collect();
                Just(all)
                    .prop_shuffle()
                    .prop_map(move |all| format!("{{{w}{}}}", all.join(&format!(",{w}"))))
            })
            .boxed()
    }

    fn event() -> impl Strategy<Value = String> {
        let data = &[
            r#""aGk=""#,
            r#""aGk""#,
            r#""""#,
            r#""!!""#,
            r#""eyJhIjoxfQ==""#,
        ][..];
        let kinesis = object(vec![
            field("sequenceNumber", typical(&[r#""49590""#, r#""1""#])),
            field("partitionKey", typical(&[r#""pk""#, r#""""#])),
            field("data", typical(data)),
            field(
                "approximateArrivalTimestamp",
                typical(&["1764000000.123", "1545084650.987", "1764000000", "0.5"]),
            ),
        ]);
        let lambda = object(vec![
            field("kinesis", kinesis),
            field(
                "eventID",
                typical(&[r#""shardId-000000000006:49590""#, r#""noshard""#]),
            ),
            field(
                "eventSourceARN",
                typical(&[r#""arn:aws:kinesis:us-east-1:1:stream/s""#]),
            ),
        ]);
        let get_records = object(vec![
            field("SequenceNumber", typical(&[r#""7""#])),
            field("PartitionKey", typical(&[r#""k""#])),
            field("Data", typical(data)),
            field("ApproximateArrivalTimestamp", typical(&["1764000000"])),
        ]);
        let record = prop_oneof![6 => lambda, 2 => get_records, 1 => value()];
        // A tumbling window's fields, odd ones and repeated ones among them.
        let window = object(vec![
            field(
                "window",
                typical(&[
                    r#"{"start":"2020-12-09T07:04:00Z","end":"2020-12-09T07:06:00Z"}"#,
                    r#"{"start":"2020-12-09T07:04:00Z"}"#,
                    "null",
                ]),
            ),
            field(
                "state",
                typical(&["{}", r#"{"1":282,"k":{"a":[1.5,null]}}"#, "null", "[1]"]),
            ),
            field("shardId", typical(&[r#""shardId-000000000006""#, "5"])),
            field(
                "eventSourceARN",
                typical(&[r#""arn:aws:kinesis:us-east-1:1:stream/s""#]),
            ),
            field(
                "isFinalInvokeForWindow",
                typical(&["true", "false", "null"]),
            ),
            field("isWindowTerminatedEarly", typical(&["false", "true"])),
        ]);
        let top = (
            prop::collection::vec(record, 0..5),
            ws(),
            any::<bool>(),
            window,
        );
        top.prop_map(|(records, w, other, window)| {
            let other = if other {
                r#""other":[1,{"x":null}],"#
            } else {
                ""
            };
            let window = window[1..window.len() - 1].trim();
            let window = match window {
                "" => String::new(),
                fields => format!("{fields},"),
            };
            format!(
                "{w}{{{other}{window}\"Records\":[{w}{}]}}{w}",
                records.join(",")
            )
        })
    }

    /// A typical Lambda record, with `data` of `n` bytes.
    fn lambda_record(seq: usize, n: usize) -> String {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n]);
        format!(
            r#"{{"kinesis":{{"kinesisSchemaVersion":"1.0","partitionKey":"pk{seq}","sequenceNumber":"4959{seq:052}","data":"{data}","approximateArrivalTimestamp":1764000000.{seq:03}}},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":"shardId-000000000000:4959{seq:052}","eventName":"aws:kinesis:record","invokeIdentityArn":"arn:aws:iam::1:role/r","awsRegion":"us-east-1","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
        )
    }

    /// Non-ASCII bytes at the same places in two chunks, before the end: not ASCII.
    #[test]
    fn string_end_sees_non_ascii_at_the_same_place_in_two_chunks() {
        let mut bytes = [b'a'; 40];
        (bytes[3], bytes[19], bytes[21]) = (0xff, 0xff, b'"');
        assert_eq!(string_end(&bytes), Some((21, false)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn string_end_finds_the_first_quote_backslash_or_control(bytes in prop::collection::vec(
            prop_oneof![8 => 0x20u8..0x80, 1 => 0x80u8..=0xff, 1 => Just(b'"'), 1 => Just(b'\\'), 1 => 0u8..0x20], 0..40)) {
            let naive = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            let naive = naive.map(|end| (end, bytes[..end].is_ascii()));
            prop_assert_eq!(string_end(&bytes), naive);
        }

        /// Plain decimals read here are exactly what serde_json reads; what serde_json
        /// refuses is never read here.
        #[test]
        fn plain_decimals_are_read_as_serde_json_reads_them(text in "-?[0-9]{0,17}(\\.[0-9]{0,17})?") {
            let serde = serde_json::from_str::<f64>(&text).ok();
            let (len, plain) = scan_number(format!("{text},").as_bytes());
            prop_assert_eq!(len, text.len());
            if let Some(n) = plain {
                prop_assert_eq!(Some(n.to_bits()), serde.map(f64::to_bits), "{}", text);
            }
        }

        #[test]
        fn the_fast_path_reads_what_serde_reads(json in event()) {
            agrees(json.as_bytes())?;
        }

        /// Any byte changed, inserted or removed in a real event.
        #[test]
        fn damaged_events_are_read_alike(at in 0usize..2000, byte in any::<u8>(), how in 0..3) {
            let mut json = format!(r#"{{"Records":[{},{}]}}"#, lambda_record(1, 10), lambda_record(2, 0))
                .into_bytes();
            let at = at % json.len();
            match how {
                0 => json[at] = byte,
                1 => json.insert(at, byte),
                _ => drop(json.remove(at)),
            }
            agrees(&json)?;
        }
    }

    #[test]
    fn the_window_fields_are_kept_and_nothing_else() {
        let json = br#"{"Records":[],"window":{"start":"a","end":"b"},"state":{"n":[1]},"other":5,"isFinalInvokeForWindow":true}"#;
        let (_, extras) = read(&mut &json[..], |_, _, _| 0).unwrap();
        assert_eq!(
            std::str::from_utf8(&extras).unwrap(),
            r#"{"window":{"start":"a","end":"b"},"state":{"n":[1]},"isFinalInvokeForWindow":true}"#
        );
        let event = KinesisEvent::from_slice(json).unwrap();
        assert!(event.window.as_ref().unwrap().is_final_invoke_for_window);
        assert_eq!(Some(event), serde_json::from_slice(json).ok());
    }

    /// The fast path on an event alone: its records, and how many `data` texts it found.
    fn read_alone(json: &[u8]) -> Option<(Vec<EventRecord>, usize)> {
        let mut texts = 0;
        let ((records, _), _) = read(&mut &json[..], |_, _, _| {
            texts += 1;
            0
        })?;
        Some((records, texts))
    }

    /// The oracle above means something only if the fast path often answers.
    #[test]
    fn generated_events_often_take_the_fast_path() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut fast, mut with_data) = (0, 0);
        for _ in 0..1000 {
            let json = event().new_tree(&mut runner).unwrap().current();
            if let Some((_, texts)) = read_alone(json.as_bytes()) {
                fast += 1;
                with_data += (texts > 0) as usize;
            }
        }
        // 276 and 71 when written; serde refuses most of the others as well.
        assert!(
            fast > 200 && with_data > 40,
            "fast path: {fast}, with data: {with_data}"
        );
    }

    #[test]
    fn timestamps_are_read_without_serde_json_and_the_rest_with_it() {
        let read = |text: &str| scan_number(text.as_bytes()).1;
        assert_eq!(read("1764000000.002"), Some(1_764_000_000.002));
        assert_eq!(read("0"), Some(0.0));
        assert_eq!(read("999999999999999"), Some(999_999_999_999_999.0));
        // Sixteen digits, a sign, an exponent: serde_json's.
        for other in ["1234567890123456", "1.234567890123456", "-1", "1e3"] {
            assert_eq!(read(other), None, "{other}");
        }
        // Not numbers at all.
        for bad in ["", ".", "1.", ".5", "01", "1.2.3"] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }

    #[test]
    fn lambda_events_take_the_fast_path() {
        let records: Vec<String> = (0..50).map(|i| lambda_record(i, i * 7)).collect();
        let json = format!(r#"{{"Records":[{}]}}"#, records.join(","));
        let (records, texts) =
            read_alone(json.as_bytes()).expect("a Lambda event took the slow path");
        assert_eq!((records.len(), texts), (50, 50));
        agrees(json.as_bytes()).unwrap();
        // A timestamp as text (as `aws kinesis get-records` may print it) too.
        let record = lambda_record(1, 3).replace("1764000000.001", r#""2025-11-24T16:00:00Z""#);
        let json = format!(r#"{{"Records":[{record}]}}"#);
        assert!(read_alone(json.as_bytes()).is_some(), "{json}");
        agrees(json.as_bytes()).unwrap();
        // A record as `aws kinesis get-records` prints it, and `null` for what may be absent.
        for record in [
            r#"{"SequenceNumber":"1","PartitionKey":"p","Data":"aGk="}"#,
            r#"{"kinesis":{"sequenceNumber":"1","partitionKey":null,"data":"aGk="}}"#,
            r#"{"kinesis":null,"SequenceNumber":"1","Data":"aGk="}"#,
        ] {
            let json = format!(r#"{{"Records":[{record}]}}"#);
            assert!(read_alone(json.as_bytes()).is_some(), "{json}");
            agrees(json.as_bytes()).unwrap();
        }
        for file in std::fs::read_dir("events").unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "json")
                && !path.to_string_lossy().contains("expected")
            {
                let json = std::fs::read(&path).unwrap();
                assert!(
                    read_alone(&json).is_some(),
                    "{} took the slow path",
                    path.display()
                );
            }
        }
    }

    /// The lists are sized from the first record, for as many as the rest of the body would
    /// hold of it, and never for more than Lambda's largest batch.
    #[test]
    fn the_lists_are_sized_once_from_the_first_record() {
        let capacities = |json: &str| {
            let ((records, strings), _) = read(&mut json.as_bytes(), |_, _, _| 0).unwrap();
            assert_eq!(records.len(), strings.len());
            (records.len(), records.capacity(), strings.capacity())
        };
        for n in [1, 2, 10, 100, 1_000] {
            // Records of one length: `pk1000`... and four digits of timestamp.
            let records: Vec<String> = (1_000..1_000 + n).map(|i| lambda_record(i, 30)).collect();
            let json = format!(r#"{{"Records":[{}]}}"#, records.join(","));
            let (len, records, strings) = capacities(&json);
            assert_eq!(len, n);
            // Room for them all (the commas between them make it a little more; a `Vec` holds
            // 4 at least).
            for capacity in [records, strings] {
                let most = (n + n / 100 + 1).max(4);
                assert!((n..=most).contains(&capacity), "{n}: {capacity}");
            }
        }
        // A small first record before a big one.
        let json = format!(
            r#"{{"Records":[{{"kinesis":{{"sequenceNumber":"1"}}}},{}]}}"#,
            lambda_record(1, 1_000_000)
        );
        let (len, records, strings) = capacities(&json);
        assert_eq!(len, 2);
        // (`strings` holds the first record's when it is sized.)
        assert!(records.max(strings) <= MAX_BATCH + 1, "{records} {strings}");
    }

    /// Strings that are not ASCII are checked as UTF-8: long ones of two-byte characters, and a
    /// bad byte far into a `data` text or a long string, are read as serde reads them.
    #[test]
    fn long_strings_are_checked_as_utf8() {
        let long = "\u{e9}".repeat(50_000); // 100 KB of two-byte characters
        for odd in [0, 1] {
            let pad = "x".repeat(odd);
            let json = format!(
                r#"{{"Records":[{},{{"kinesis":{{"sequenceNumber":"2","partitionKey":"{pad}{long}","data":"aGk="}}}}]}}"#,
                lambda_record(1, 100_000)
            );
            assert!(read_alone(json.as_bytes()).is_some());
            agrees(json.as_bytes()).unwrap();
            for bad_at in [json.len() / 4, json.len() - 300] {
                let mut bad = json.clone().into_bytes();
                bad[bad_at] = 0xff;
                agrees(&bad).unwrap();
                assert!(KinesisEvent::from_slice(&bad).is_err());
            }
        }
    }

    /// Big and small texts, refused ones among them, decoded in place: the same records as
    /// serde.
    #[test]
    fn big_events_decode_in_place_alike() {
        let mut records: Vec<String> = [100_000, 5, 200_000, 0, 150_000, 90_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| lambda_record(i, n))
            .collect();
        records.insert(
            1,
            r#"{"kinesis":{"sequenceNumber":"7","data":"!!"}}"#.into(),
        );
        records.push(r#"{"kinesis":{"sequenceNumber":"8","data":"aGk"}}"#.into());
        records.push(r#"{"kinesis":{"sequenceNumber":"9","data":"%%"}}"#.into());
        // Refused far into a long text: many chunks were decoded before it, then put back.
        let long = lambda_record(10, 99_999).replacen("eHh4\",", "eHh!\",", 1);
        records.push(long);
        // Data that decodes to a control character and to quotes.
        records.push(r#"{"kinesis":{"sequenceNumber":"11","data":"AAAA"}}"#.into());
        records.push(r#"{"kinesis":{"sequenceNumber":"12","data":"IiIi"}}"#.into());
        records.push(r#"{"kinesis":{"sequenceNumber":"13","data":"ok"}}"#.into());
        let json = format!(r#"{{"Records":[{}]}}"#, records.join(","));
        agrees(json.as_bytes()).unwrap();
        let event = KinesisEvent::from_owned(json.as_bytes()).unwrap();
        assert_eq!(event.records[3].data.as_ref().unwrap().len(), 200_000);
        assert_eq!(&event.records[7].data.as_ref().unwrap()[..], b"hi");
        let refused = event.records[9].data.as_ref().err().map(|e| &e.raw[..]);
        assert_eq!(refused.map(<[u8]>::len), Some(133_332));
        assert!(refused.is_some_and(|raw| raw.starts_with(b"eHh4") && raw.ends_with(b"eHh!")));

        // A text that is not even a JSON string, after the big ones: serde reads the body as
        // it came, all decoded texts put back, and says what it says of that body.
        let bad = json.replacen(r#""data":"ok""#, "\"data\":\"o\u{1}k\"", 1);
        let serde = serde_json::from_str::<KinesisEvent>(&bad).unwrap_err();
        let ours = KinesisEvent::from_owned(bad.as_bytes()).unwrap_err();
        assert_eq!(ours.to_string(), format!("not a Kinesis event: {serde}"));

        // The fast path gives up after the big texts were decoded (an escape in the last
        // text, characters after the event): serde reads the body as it came.
        let escaped = json.replacen(r#""data":"ok""#, r#""data":"o\u006b""#, 1);
        assert!(read_alone(escaped.as_bytes()).is_none());
        agrees(escaped.as_bytes()).unwrap();
        let trailing = format!("{json} x");
        let serde = serde_json::from_str::<KinesisEvent>(&trailing).unwrap_err();
        let ours = KinesisEvent::from_owned(trailing.as_bytes()).unwrap_err();
        assert_eq!(ours.to_string(), format!("not a Kinesis event: {serde}"));
    }

    /// `from_owned_each` hands over the data of 16 KiB or more, in order, as soon as each is
    /// read: the very buffers the event's records then hold. If the fast path gives up later,
    /// the event is serde's, in other buffers.
    #[test]
    fn big_data_is_handed_over_early() {
        use crate::event::EARLY_MIN;
        let sizes = [EARLY_MIN, 5, 200_000, EARLY_MIN - 1, 0, 90_000];
        let records: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| lambda_record(i, n))
            .collect();
        let json = format!(r#"{{"Records":[{}]}}"#, records.join(","));
        // The event and what was handed over early; the event is serde's.
        let read = |json: &str| {
            let mut early = Vec::new();
            let event = KinesisEvent::from_owned_each(json.as_bytes(), |d| early.push(d.clone()));
            let event = event.unwrap();
            assert_eq!(Some(&event), serde_json::from_str(json).ok().as_ref());
            (event, early)
        };
        let (event, early) = read(&json);
        let data = event.records.iter().map(|r| r.data.as_ref().unwrap());
        let big: Vec<&bytes::Bytes> = data.filter(|d| d.len() >= EARLY_MIN).collect();
        assert_eq!(big.len(), 3);
        assert_eq!(early.len(), 3);
        for (early, data) in early.iter().zip(big) {
            assert_eq!((early.as_ptr(), early.len()), (data.as_ptr(), data.len()));
        }

        // Text that is not base64 but is a JSON string (a space in it), and an unused `Data`
        // beside `kinesis`: problems of their records, not of the event, read on the fast
        // path too.
        let odd = json.replacen(
            "]}",
            r#",{"kinesis":{"sequenceNumber":"7","data":"a b"}},{"kinesis":{"sequenceNumber":"8"},"Data":"a b"}]}"#,
            1,
        );
        let (event, early) = read(&odd);
        assert_eq!(event.records[6].data.as_ref().unwrap_err().raw, "a b");
        let data = event.records.iter().filter_map(|r| r.data.as_ref().ok());
        let big = data.filter(|d| d.len() >= EARLY_MIN);
        assert!(early.iter().zip(big).all(|(e, d)| e.as_ptr() == d.as_ptr()));
        assert_eq!(early.len(), 3);

        let escaped = json.replacen(r#""partitionKey":"pk5""#, r#""partitionKey":"pk\u0035""#, 1);
        let (event, early) = read(&escaped);
        assert_eq!(early.len(), 2, "those before the escape");
        for data in event.records.iter().map(|r| r.data.as_ref().unwrap()) {
            assert!(early.iter().all(|e| e.as_ptr() != data.as_ptr()));
        }
    }

    #[test]
    fn what_serde_decides_takes_the_slow_path() {
        for json in [
            r#"{"Records":[{"kinesis":{"sequenceNumber":"1","data":"aG\u0073="}}]}"#, // escape
            r#"{"Records":[{"kinesis":{"data":"aGk="}}]}"#, // no sequence number
            r#"{"Records":[],"Records":[]}"#,               // duplicate
            r#"{"Records":[{"kinesis":{"sequenceNumber":"1","sequenceNumber":"2"}}]}"#,
            r#"{"Records":[{"kinesis":{"sequenceNumber":"1","data":"\u0001"}}]}"#,
            r#"{"Records":[]} x"#,
            // Found by the fuzzer: an unused `Data` beside `kinesis`, not a JSON string.
            "{\"Records\":[{\"kinesis\":{\"sequenceNumber\":\"1\"},\"Data\":\"a\nb\"}]}",
            r#"{"Records":[{"kinesis":{"sequenceNumber":"1","approximateArrivalTimestamp":1e400}}]}"#,
        ] {
            assert!(read_alone(json.as_bytes()).is_none(), "{json}");
        }
        let deep = format!(
            r#"{{"Records":[],"x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(read_alone(deep.as_bytes()).is_none());
        // Nested as deep as `MAX_DEPTH` in all, and one deeper.
        for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
            let nested = |n: usize| {
                let (open, close) = (open.repeat(n), close.repeat(n));
                let record =
                    format!(r#"{{"kinesis":{{"sequenceNumber":"1"}},"x":{open}0{close}}}"#);
                format!(r#"{{"Records":[{record}]}}"#)
            };
            let levels = MAX_DEPTH - 3; // the event, `Records` and the record around them
            assert!(read_alone(nested(levels).as_bytes()).is_some(), "{open}");
            assert!(
                read_alone(nested(levels + 1).as_bytes()).is_none(),
                "{open}"
            );
        }
        // Not base64, but a JSON string: the record's problem, read on the fast path.
        let json = br#"{"Records":[{"kinesis":{"sequenceNumber":"1","data":"!!"}}]}"#;
        assert!(read_alone(json).is_some());
        let bad = &KinesisEvent::from_owned(&json[..]).unwrap().records[0];
        assert_eq!(bad.data.as_ref().unwrap_err().raw, "!!");
    }
}
