//! The protobuf of an aggregate, read in place.
//!
//! Why not prost: it decodes an aggregate into a `Vec` of messages, each user record's data a
//! new `Bytes` (a reference-count increment) and a `Vec` of tags, from which the user records
//! would then be built: about a third of deaggregation's time on small user records (W2).
//! This reader keeps only offsets into the aggregate and makes each user record's `Bytes`
//! once. It accepts exactly what prost accepts (unknown fields and groups skipped,
//! last value wins for a repeated scalar, the same varint and nesting limits): property tests
//! compare the two on arbitrary input (`tests.rs`).

use std::ops::Range;

/// A field's wire type (the low 3 bits of its key).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WireType {
    Varint,
    SixtyFourBit,
    LengthDelimited,
    StartGroup,
    EndGroup,
    ThirtyTwoBit,
}

/// prost's limit on nested messages and groups.
const RECURSION_LIMIT: u32 = 100;

/// A cursor over one message: `buf[pos..end]`, offsets absolute in the aggregate.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], range: Range<usize>) -> Self {
        Reader {
            buf,
            pos: range.start,
            end: range.end,
        }
    }

    fn has_more(&self) -> bool {
        self.pos < self.end
    }

    /// Most varints of an aggregate are one byte (keys, indices, short lengths) or two (the
    /// lengths of user records up to 16 KiB): those cases are inlined, the rest is not.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, String> {
        match self.buf[..self.end].get(self.pos..) {
            Some(&[byte, ..]) if byte < 0x80 => {
                self.pos += 1;
                Ok(u64::from(byte))
            }
            Some(&[low, high, ..]) if high < 0x80 => {
                self.pos += 2;
                Ok(u64::from(low & 0x7F) | u64::from(high) << 7)
            }
            _ => self.long_varint(),
        }
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf[..self.end].get(self.pos) else {
                return Err(format!("truncated varint at byte {}", self.pos));
            };
            self.pos += 1;
            // The 10th byte may only hold the 64th bit.
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(format!("invalid varint ending at byte {}", self.pos))
    }

    #[inline(always)]
    fn key(&mut self) -> Result<(u32, WireType), String> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| format!("invalid key value: {key}"))?;
        let wire_type = match key & 7 {
            0 => WireType::Varint,
            1 => WireType::SixtyFourBit,
            2 => WireType::LengthDelimited,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::ThirtyTwoBit,
            other => return Err(format!("invalid wire type value: {other}")),
        };
        let tag = key >> 3;
        if tag == 0 {
            return Err("invalid tag value: 0".into());
        }
        Ok((tag, wire_type))
    }

    /// The payload of a length-delimited field.
    #[inline(always)]
    fn length_delimited(&mut self) -> Result<Range<usize>, String> {
        let len = self.varint()?;
        let start = self.pos;
        match usize::try_from(len).ok().filter(|&l| l <= self.end - start) {
            Some(len) => {
                self.pos += len;
                Ok(start..self.pos)
            }
            None => Err(format!(
                "length {len} at byte {start} runs past the end ({})",
                self.end
            )),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if self.end - self.pos < n {
            return Err(format!("truncated fixed-width field at byte {}", self.pos));
        }
        self.pos += n;
        Ok(())
    }

    /// Skips a field this reader does not know, as prost does (`depth` is what is left of
    /// the recursion limit).
    fn skip(&mut self, tag: u32, wire_type: WireType, depth: u32) -> Result<(), String> {
        if depth == 0 {
            return Err("recursion limit reached".into());
        }
        match wire_type {
            WireType::Varint => self.varint().map(drop),
            WireType::SixtyFourBit => self.advance(8),
            WireType::ThirtyTwoBit => self.advance(4),
            WireType::LengthDelimited => self.length_delimited().map(drop),
            WireType::StartGroup => loop {
                if !self.has_more() {
                    return Err(format!("group {tag} is not closed"));
                }
                match self.key()? {
                    (end, WireType::EndGroup) if end == tag => return Ok(()),
                    (_, WireType::EndGroup) => return Err("unexpected end group tag".into()),
                    (inner, wire_type) => self.skip(inner, wire_type, depth - 1)?,
                }
            },
            WireType::EndGroup => Err("unexpected end group tag".into()),
        }
    }

    /// Reads the fields of one message, handing the known ones to `field`, which returns
    /// false for a tag it does not know.
    fn fields(
        &mut self,
        depth: u32,
        mut field: impl FnMut(&mut Self, u32, WireType) -> Result<bool, String>,
    ) -> Result<(), String> {
        while self.has_more() {
            let (tag, wire_type) = self.key()?;
            if !field(self, tag, wire_type)? {
                self.skip(tag, wire_type, depth)?;
            }
        }
        Ok(())
    }
}

fn expect(tag: u32, actual: WireType, expected: WireType) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "field {tag}: invalid wire type {actual:?} (expected {expected:?})"
        ))
    }
}

/// One `Record` of the aggregate in 16 bytes, as an aggregate may hold a million of them
/// (a 4.4 MB aggregate of empty user records holds 733,000): indices as `u32`, offsets into
/// the body. An index of `u32::MAX - 1` or more is beyond any table (an entry takes at least
/// 2 bytes of a body below 4 GiB) and is kept as [`HUGE`]; the aggregate keeps the first such
/// value of each field, for the error message.
#[derive(Clone, Copy, Debug)]
pub(super) struct RawRecord {
    /// [`ABSENT`] when the field is.
    pub partition_key_index: u32,
    /// [`ABSENT`] when the field is.
    pub explicit_hash_key_index: u32,
    /// [`ABSENT`] when the field is.
    pub data_start: u32,
    pub data_end: u32,
}

/// A field that is not there.
pub(super) const ABSENT: u32 = u32::MAX;
/// An index beyond every table.
pub(super) const HUGE: u32 = u32::MAX - 1;

/// An `AggregatedRecord`, as offsets into the bytes it was read from.
#[derive(Default)]
pub(super) struct RawAggregate {
    pub partition_key_table: Vec<Range<usize>>,
    pub explicit_hash_key_table: Vec<Range<usize>>,
    pub records: Vec<RawRecord>,
    /// The first [`HUGE`] partition key and explicit hash key index, as read.
    pub first_huge: [Option<u64>; 2],
}

/// Reads an `AggregatedRecord` (`messages.proto`) from `body`, or says why it is not one.
pub(super) fn read_aggregate(body: &[u8]) -> Result<RawAggregate, String> {
    if body.len() >= HUGE as usize {
        return Err(format!(
            "an aggregate of {} bytes is beyond 4 GiB",
            body.len()
        ));
    }
    let mut aggregate = RawAggregate::default();
    // A growing list of records would be copied as it grows, twice its size at the last copy
    // (25 MB of live heap at once for 733,000 records instead of 12): large aggregates are
    // counted first, which costs one quick pass over the top-level fields.
    if body.len() >= COUNT_FIRST_BYTES {
        aggregate.records.reserve_exact(count_records(body));
    }
    let depth = RECURSION_LIMIT;
    Reader::new(body, 0..body.len()).fields(depth, |r, tag, wire_type| {
        match tag {
            1..=3 => expect(tag, wire_type, WireType::LengthDelimited)?,
            _ => return Ok(false),
        }
        let range = r.length_delimited()?;
        match tag {
            1 => aggregate.partition_key_table.push(range),
            2 => aggregate.explicit_hash_key_table.push(range),
            _ => {
                let n = aggregate.records.len();
                let record = read_record(body, range, depth - 1, &mut aggregate.first_huge)
                    .map_err(|e| format!("user record {n}: {e}"))?;
                aggregate.records.push(record);
            }
        }
        Ok(true)
    })?;
    Ok(aggregate)
}

/// Aggregates of this size or more have their records counted before they are read.
const COUNT_FIRST_BYTES: usize = 256 * 1024;

/// The number of top-level `records` fields of `body`, as far as it reads.
pub(super) fn count_records(body: &[u8]) -> usize {
    let (mut reader, mut n) = (Reader::new(body, 0..body.len()), 0);
    // The fields of an aggregate are all length-delimited and numbered 1 to 3 (one-byte
    // keys), and most are shorter than 16 KiB (one- or two-byte lengths): those are skipped
    // here, the rest by the general decoding below. (A field that runs past the end is
    // counted: the count only sizes a reservation.)
    let mut pos = 0;
    while let Some(&key @ (0x0A | 0x12 | 0x1A)) = body.get(pos) {
        let (len, used) = match body.get(pos + 1..) {
            Some(&[low, ..]) if low < 0x80 => (usize::from(low), 1),
            Some(&[low, high, ..]) if high < 0x80 => {
                (usize::from(low & 0x7F) | usize::from(high) << 7, 2)
            }
            _ => break,
        };
        n += usize::from(key == 0x1A);
        pos += 1 + used + len;
    }
    reader.pos = pos;
    while reader.has_more() {
        let Ok((tag, wire_type)) = reader.key() else {
            break;
        };
        n += usize::from(tag == 3 && wire_type == WireType::LengthDelimited);
        if reader.skip(tag, wire_type, RECURSION_LIMIT).is_err() {
            break;
        }
    }
    n
}

/// An index as kept in a [`RawRecord`].
fn index(value: u64) -> u32 {
    u32::try_from(value).map_or(HUGE, |v| v.min(HUGE))
}

/// A record; an index kept as [`HUGE`] is noted in `first_huge` (by field) if it is the first.
fn read_record(
    body: &[u8],
    range: Range<usize>,
    depth: u32,
    first_huge: &mut [Option<u64>; 2],
) -> Result<RawRecord, String> {
    let mut record = RawRecord {
        partition_key_index: ABSENT,
        explicit_hash_key_index: ABSENT,
        data_start: ABSENT,
        data_end: ABSENT,
    };
    Reader::new(body, range).fields(depth, |r, tag, wire_type| {
        match tag {
            1 | 2 => {
                expect(tag, wire_type, WireType::Varint)?;
                let value = r.varint()?;
                let kept = index(value);
                if kept == HUGE {
                    first_huge[tag as usize - 1].get_or_insert(value);
                }
                if tag == 1 {
                    record.partition_key_index = kept;
                } else {
                    record.explicit_hash_key_index = kept;
                }
            }
            3 => {
                expect(tag, wire_type, WireType::LengthDelimited)?;
                // Offsets below 4 GiB: the body is.
                let data = r.length_delimited()?;
                record.data_start = data.start as u32;
                record.data_end = data.end as u32;
            }
            4 => {
                // Tags are checked like any message, then ignored.
                expect(tag, wire_type, WireType::LengthDelimited)?;
                let tag_range = r.length_delimited()?;
                Reader::new(body, tag_range)
                    .fields(depth - 1, |r, tag, wire_type| match tag {
                        1 | 2 => {
                            expect(tag, wire_type, WireType::LengthDelimited)?;
                            r.length_delimited().map(|_| true)
                        }
                        _ => Ok(false),
                    })
                    .map_err(|e| format!("a tag: {e}"))?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(record)
}
