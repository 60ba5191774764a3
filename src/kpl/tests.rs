use super::*;
use crate::kpl::messages::{AggregatedRecord as Pb, Record};
use prost::Message;

/// Magic, the protobuf bytes, and their MD5: a well-formed envelope around any bytes.
fn envelope(protobuf: &[u8]) -> Bytes {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(protobuf);
    out.extend_from_slice(&Md5::digest(protobuf));
    out.into()
}

fn record(pk: Option<u64>, ehk: Option<u64>, data: Option<&'static [u8]>) -> Record {
    Record {
        partition_key_index: pk,
        explicit_hash_key_index: ehk,
        data: data.map(Bytes::from_static),
        tags: vec![],
    }
}

fn message(pks: &[&'static [u8]], ehks: &[&'static [u8]], records: Vec<Record>) -> Bytes {
    envelope(
        &Pb {
            partition_key_table: pks.iter().map(|k| Bytes::from_static(k)).collect(),
            explicit_hash_key_table: ehks.iter().map(|k| Bytes::from_static(k)).collect(),
            records,
        }
        .encode_to_vec(),
    )
}

/// The user records of `d`, which must split as an aggregate.
#[track_caller]
fn aggregated(d: Bytes) -> UserRecords {
    match deaggregate(d) {
        Ok(Deaggregated::Aggregated(users)) => users,
        other => panic!("not an aggregate: {other:?}"),
    }
}

#[test]
fn data_without_the_magic_is_one_plain_record() {
    for data in [&b""[..], b"x", b"{\"json\":1}", &[0xF3, 0x89, 0x9A]] {
        let data = Bytes::copy_from_slice(data);
        assert_eq!(deaggregate(data.clone()), Ok(Deaggregated::Plain(data)));
    }
}

#[test]
fn magic_with_16_bytes_or_fewer_after_it_is_plain() {
    for extra in [0, 1, 15, 16] {
        let mut d = MAGIC.to_vec();
        d.extend(std::iter::repeat_n(7u8, extra));
        let d = Bytes::from(d);
        assert_eq!(
            deaggregate(d.clone()),
            Ok(Deaggregated::Plain(d)),
            "{extra}"
        );
    }
}

#[test]
fn a_checksum_mismatch_passes_the_data_through_unchanged_and_says_so() {
    let good = message(&[b"k"], &[], vec![record(Some(0), None, Some(b"v"))]);
    let mut bad = good.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    let bad = Bytes::from(bad);
    assert_eq!(
        deaggregate(bad.clone()),
        Ok(Deaggregated::ChecksumMismatch(bad))
    );
}

#[test]
fn skipping_the_checksum_decodes_without_checking_it() {
    let good = message(&[b"k"], &[], vec![record(Some(0), None, Some(b"v"))]);
    let mut bad = good.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    let Ok(Deaggregated::Aggregated(users)) = deaggregate_with(bad.into(), false) else {
        panic!("expected an aggregate")
    };
    let users: Vec<_> = users.collect();
    assert_eq!(&users[0].data()[..], b"v");
}

#[test]
fn a_verified_aggregate_that_is_not_protobuf_is_an_error() {
    // 0xFF is not a valid tag (field 31, wire type 7).
    let err = deaggregate(envelope(&[0xFF, 0xFF, 0xFF])).unwrap_err();
    assert!(matches!(err, DeaggError::Protobuf { .. }), "{err}");
}

#[test]
fn a_truncated_aggregate_with_a_matching_checksum_is_an_error() {
    let full = message(
        &[b"key"],
        &[],
        vec![record(Some(0), None, Some(b"some data"))],
    );
    let protobuf = &full[MAGIC.len()..full.len() - DIGEST_LEN];
    let err = deaggregate(envelope(&protobuf[..protobuf.len() - 3])).unwrap_err();
    assert!(matches!(err, DeaggError::Protobuf { .. }), "{err}");
}

#[test]
fn a_partition_key_index_out_of_range_fails_the_whole_aggregate() {
    let d = message(
        &[b"k"],
        &[],
        vec![
            record(Some(0), None, Some(b"a")),
            record(Some(1), None, Some(b"b")),
        ],
    );
    let err = deaggregate(d).unwrap_err();
    assert_eq!(
        err,
        DeaggError::PartitionKeyIndexOutOfRange {
            sub_sequence_number: 1,
            index: 1,
            table_len: 1
        }
    );
    assert_eq!(
        err.to_string(),
        "user record 1: partition key index 1 is out of range (table has 1 keys)"
    );
}

#[test]
fn an_index_beyond_4_gib_is_out_of_range_not_missing() {
    let d = message(&[b"k"], &[], vec![record(Some(1 << 40), None, Some(b"a"))]);
    assert_eq!(
        deaggregate(d).unwrap_err(),
        DeaggError::PartitionKeyIndexOutOfRange {
            sub_sequence_number: 0,
            index: 1 << 40,
            table_len: 1
        }
    );
}

#[test]
fn an_explicit_hash_key_index_out_of_range_fails_the_whole_aggregate() {
    let d = message(&[b"k"], &[b"1"], vec![record(Some(0), Some(3), Some(b"a"))]);
    assert!(matches!(
        deaggregate(d),
        Err(DeaggError::ExplicitHashKeyIndexOutOfRange { index: 3, .. })
    ));
}

#[test]
fn a_missing_required_field_is_an_error_naming_it() {
    let no_pk = message(&[b"k"], &[], vec![record(None, None, Some(b"a"))]);
    assert_eq!(
        deaggregate(no_pk),
        Err(DeaggError::MissingField {
            sub_sequence_number: 0,
            field: "partition_key_index"
        })
    );
    let no_data = message(&[b"k"], &[], vec![record(Some(0), None, None)]);
    assert_eq!(
        deaggregate(no_data),
        Err(DeaggError::MissingField {
            sub_sequence_number: 0,
            field: "data"
        })
    );
}

#[test]
fn present_but_empty_data_is_an_empty_user_record() {
    let d = message(&[b"k"], &[], vec![record(Some(0), None, Some(b""))]);
    let users = aggregated(d);
    let users: Vec<_> = users.collect();
    assert!(users[0].data().is_empty());
}

#[test]
fn a_partition_key_that_is_not_utf8_is_replaced_and_flagged() {
    let d = message(
        &[b"ok", b"bad\xFF"],
        &[],
        vec![
            record(Some(0), None, Some(b"a")),
            record(Some(1), None, Some(b"b")),
        ],
    );
    let users = aggregated(d);
    let users: Vec<_> = users.collect();
    assert!(!users[0].has_lossy_keys());
    assert_eq!(users[1].partition_key(), "bad\u{FFFD}");
    assert!(users[1].has_lossy_keys());
}

/// The key tables are checked as UTF-8 in one piece (`KeyTable::of_aggregate`): two keys that
/// are each cut in the middle of a character, but whole together, are still each invalid.
#[test]
fn keys_that_are_valid_only_together_are_each_replaced_and_flagged() {
    let d = message(
        &[b"ok", b"\xC3"],
        &[b"\xA9", b"7"],
        vec![
            record(Some(0), Some(1), Some(b"a")),
            record(Some(1), Some(0), Some(b"b")),
        ],
    );
    let users = aggregated(d);
    let users: Vec<_> = users.collect();
    assert_eq!(
        (users[0].partition_key(), users[0].explicit_hash_key()),
        ("ok", Some("7"))
    );
    assert!(!users[0].has_lossy_keys());
    assert_eq!(users[1].partition_key(), "\u{FFFD}");
    assert_eq!(users[1].explicit_hash_key(), Some("\u{FFFD}"));
    assert!(users[1].has_lossy_keys());
}

#[test]
fn zero_sub_records_is_an_empty_aggregate_not_a_plain_record() {
    // An empty protobuf message is zero bytes, so give it a table to be longer than 16 bytes.
    let d = message(&[b"a-partition-key-nobody-uses"], &[], vec![]);
    assert_eq!(
        deaggregate(d),
        Ok(Deaggregated::Aggregated(UserRecords::none()))
    );
}

#[test]
fn the_explicit_hash_key_is_reported_only_for_sub_records_that_have_one() {
    let d = message(
        &[b"k0", b"k1"],
        &[b"123"],
        vec![
            record(Some(0), Some(0), Some(b"a")),
            record(Some(1), None, Some(b"b")),
        ],
    );
    let users = aggregated(d);
    let users: Vec<_> = users.collect();
    assert_eq!(users[0].explicit_hash_key(), Some("123"));
    // The official Python and Node modules would say "123" here.
    assert_eq!(users[1].explicit_hash_key(), None);
    assert_eq!(
        users
            .iter()
            .map(|u| u.sub_sequence_number())
            .collect::<Vec<_>>(),
        [Some(0), Some(1)]
    );
}

#[test]
fn user_record_data_is_a_slice_of_the_input_buffer() {
    let d = message(&[b"k"], &[], vec![record(Some(0), None, Some(b"payload"))]);
    let range = d.as_ptr_range();
    let users = aggregated(d.clone());
    let users: Vec<_> = users.collect();
    assert!(range.contains(&users[0].data().as_ptr()), "data was copied");
}

#[test]
fn tags_are_decoded_and_ignored() {
    let mut r = record(Some(0), None, Some(b"a"));
    r.tags.push(messages::Tag {
        key: Some("t".into()),
        value: None,
    });
    let users = aggregated(message(&[b"k"], &[], vec![r]));
    let users: Vec<_> = users.collect();
    assert_eq!(users.len(), 1);
}

#[test]
fn the_aggregator_writes_what_the_kpl_writes_outside() {
    let mut agg = Aggregator::new();
    agg.add("first", None, b"1").unwrap();
    agg.add("second", Some("99"), b"2").unwrap();
    let r = agg.finish().unwrap();
    assert_eq!(r.partition_key, "a");
    let md5_first = u128::from_be_bytes(Md5::digest(b"first").into());
    assert_eq!(r.explicit_hash_key, md5_first.to_string());
    assert!(agg.finish().is_none());
}

#[test]
fn the_aggregator_dedupes_keys_in_its_tables() {
    let mut agg = Aggregator::new();
    for _ in 0..3 {
        agg.add("same", Some("5"), b"x").unwrap();
    }
    let r = agg.finish().unwrap();
    let m = Pb::decode(&r.data[4..r.data.len() - 16]).unwrap();
    assert_eq!(m.partition_key_table.len(), 1);
    assert_eq!(m.explicit_hash_key_table.len(), 1);
    assert_eq!(m.records.len(), 3);
}

#[test]
fn the_aggregator_rejects_what_cannot_fit_and_bad_hash_keys() {
    let mut agg = Aggregator::with_max_size(100).unwrap();
    assert!(matches!(
        agg.add("k", None, [0u8; 100]),
        Err(AggregateError::TooLarge { limit: 100, .. })
    ));
    assert!(matches!(
        agg.add("k", Some("12x"), b""),
        Err(AggregateError::InvalidExplicitHashKey(_))
    ));
    let too_big = (u128::MAX).to_string() + "0";
    assert!(agg.add("k", Some(&too_big), b"").is_err());
    assert!(agg.is_empty());
}

#[test]
fn the_aggregator_fills_to_exactly_its_limit() {
    // Find the data length at which one record fills an aggregate exactly, and check the
    // boundary on both sides.
    let limit = 1000;
    let mut agg = Aggregator::with_max_size(limit).unwrap();
    let fits = (0..limit)
        .rev()
        .find(|&n| agg.add("k", None, vec![0; n]).is_ok())
        .unwrap();
    let r = agg.finish().unwrap();
    assert_eq!(r.data.len() + r.partition_key.len(), limit);
    assert!(agg.add("k", None, vec![0; fits + 1]).is_err());
}

#[test]
fn a_second_record_that_fills_the_aggregate_exactly_joins_it() {
    let limit = 1000;
    // The aggregator after a small record and one of `n` bytes, and what the second finished.
    let two = |n: usize| {
        let mut agg = Aggregator::with_max_size(limit).unwrap();
        assert!(agg.add("k", None, b"first").unwrap().is_none());
        let finished = agg.add("k", None, vec![0; n]);
        (agg, finished)
    };
    let n = (0..limit)
        .rev()
        .find(|&n| matches!(two(n).1, Ok(None)))
        .unwrap();
    let (mut agg, _) = two(n);
    assert_eq!((agg.len(), agg.size()), (2, limit));
    let r = agg.finish().unwrap();
    assert_eq!(r.data.len() + r.partition_key.len(), limit);
    assert_eq!(agg.size(), 0);
    // One byte more, and the second record starts the next aggregate.
    let (agg, finished) = two(n + 1);
    assert_eq!(finished.unwrap().unwrap().user_records, 1);
    assert_eq!(agg.len(), 1);
}

#[test]
fn the_default_aggregator_fills_one_mebibyte_and_counts_its_records() {
    let mut agg = Aggregator::new();
    let mut added = 0;
    let finished = loop {
        if let Some(r) = agg.add("k", None, [7u8; 1024]).unwrap() {
            break r;
        }
        added += 1;
        assert_eq!(agg.len(), added);
    };
    assert_eq!(finished.user_records, added);
    // Full to within one user record: the one that did not fit starts the next aggregate.
    let size = finished.data.len() + finished.partition_key.len();
    assert!(size <= 1 << 20 && size > (1 << 20) - 1100, "{size}");
    assert_eq!(agg.len(), 1);
}

/// The in-place reader (`wire.rs`) against prost on the same bytes: both accept or both
/// reject, and what they accept reads the same.
mod wire_matches_prost {
    use proptest::prelude::*;

    use super::*;
    use crate::kpl::messages::Tag;

    fn same(body: &[u8]) -> Result<(), TestCaseError> {
        let ours = wire::read_aggregate(body);
        let theirs = Pb::decode(body);
        prop_assert_eq!(
            ours.is_ok(),
            theirs.is_ok(),
            "ours {:?}",
            ours.as_ref().err()
        );
        if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
            let read = |t: &[std::ops::Range<usize>]| -> Vec<Vec<u8>> {
                t.iter().map(|r| body[r.clone()].to_vec()).collect()
            };
            let bytes = |t: &[Bytes]| -> Vec<Vec<u8>> { t.iter().map(|b| b.to_vec()).collect() };
            prop_assert_eq!(
                read(&ours.partition_key_table),
                bytes(&theirs.partition_key_table)
            );
            prop_assert_eq!(
                read(&ours.explicit_hash_key_table),
                bytes(&theirs.explicit_hash_key_table)
            );
            prop_assert_eq!(ours.records.len(), theirs.records.len());
            for (o, t) in ours.records.iter().zip(&theirs.records) {
                // An index as kept: absent, exact, or beyond every table.
                let kept = |index: Option<u64>| match index {
                    None => wire::ABSENT,
                    Some(i) => u32::try_from(i).map_or(wire::HUGE, |i| i.min(wire::HUGE)),
                };
                prop_assert_eq!(o.partition_key_index, kept(t.partition_key_index));
                prop_assert_eq!(o.explicit_hash_key_index, kept(t.explicit_hash_key_index));
                let data = (o.data_start != wire::ABSENT)
                    .then(|| body[o.data_start as usize..o.data_end as usize].to_vec());
                prop_assert_eq!(data, t.data.as_ref().map(|d| d.to_vec()));
            }
        }
        Ok(())
    }

    /// A user record holding an unknown field of groups nested `n` deep: both readers refuse
    /// it past the same depth.
    #[test]
    fn nested_groups_are_refused_at_the_same_depth() {
        for n in 90..110 {
            let mut record = vec![0x08, 0x00, 0x1A, 0x01, b'x'];
            record.extend(std::iter::repeat_n(0x2B, n)); // field 5, start group
            record.extend(std::iter::repeat_n(0x2C, n)); // field 5, end group
            let mut body = vec![0x0A, 0x01, b'k', 0x1A];
            prost::encoding::encode_varint(record.len() as u64, &mut body);
            body.extend(record);
            same(&body).unwrap();
        }
        // The same inside a tag of a user record; and a tag whose key is not bytes.
        for n in (90..110).map(Some).chain([None]) {
            let tag = match n {
                Some(n) => [vec![0x2B; n], vec![0x2C; n]].concat(),
                None => vec![0x08, 0x01],
            };
            let mut record = vec![0x08, 0x00, 0x1A, 0x01, b'x', 0x22];
            prost::encoding::encode_varint(tag.len() as u64, &mut record);
            record.extend(tag);
            let mut body = vec![0x0A, 0x01, b'k', 0x1A];
            prost::encoding::encode_varint(record.len() as u64, &mut body);
            body.extend(record);
            same(&body).unwrap();
        }
    }

    /// Valid aggregates with tags, then some bytes of arbitrary fields (unknown tags, groups,
    /// repeated scalars) appended at the top level.
    fn aggregate() -> impl Strategy<Value = Vec<u8>> {
        let key = prop::collection::vec(any::<u8>(), 0..4);
        let record = (
            prop::option::of(0u64..4),
            prop::option::of(any::<u64>()),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
            prop::collection::vec(
                (prop::option::of(key.clone()), prop::option::of(key.clone())),
                0..2,
            ),
        )
            .prop_map(|(pk, ehk, data, tags)| Record {
                partition_key_index: pk,
                explicit_hash_key_index: ehk,
                data: data.map(Bytes::from),
                tags: tags
                    .into_iter()
                    .map(|(k, v)| Tag {
                        key: k.map(Bytes::from),
                        value: v.map(Bytes::from),
                    })
                    .collect(),
            });
        (
            prop::collection::vec(key.clone(), 0..3),
            prop::collection::vec(key, 0..2),
            prop::collection::vec(record, 0..4),
            prop::collection::vec(any::<u8>(), 0..6),
        )
            .prop_map(|(pks, ehks, records, tail)| {
                let mut out = Pb {
                    partition_key_table: pks.into_iter().map(Bytes::from).collect(),
                    explicit_hash_key_table: ehks.into_iter().map(Bytes::from).collect(),
                    records,
                }
                .encode_to_vec();
                out.extend(tail);
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..64)) {
            same(&body)?;
        }

        #[test]
        fn on_aggregates_with_unknown_fields(body in aggregate()) {
            same(&body)?;
        }

        #[test]
        fn on_aggregates_with_a_byte_changed(body in aggregate(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut body = body;
            if !body.is_empty() {
                let i = at.index(body.len());
                body[i] = byte;
            }
            same(&body)?;
        }

        #[test]
        fn on_aggregates_cut_short(body in aggregate(), at in any::<prop::sample::Index>()) {
            let cut = at.index(body.len() + 1);
            same(&body[..cut])?;
        }
    }

    #[test]
    fn on_ten_byte_varints() {
        // Field 5 as a varint of 10 bytes: the 10th may only hold the 64th bit.
        for last in [0x00, 0x01, 0x02, 0x7F, 0x80] {
            let mut body = vec![0x28];
            body.extend([0xFF; 9]);
            body.push(last);
            same(&body).unwrap();
        }
    }

    #[test]
    fn on_groups_nested_to_the_recursion_limit() {
        // Field 5 as groups nested n deep: prost accepts 99 levels at the top, not 100.
        for n in [1, 98, 99, 100, 101] {
            let mut body = vec![0x2B; n]; // start group 5
            body.extend(vec![0x2C; n]); // end group 5
            same(&body).unwrap();
        }
        // An end group without a start, and a group left open.
        same(&[0x2C]).unwrap();
        same(&[0x2B, 0x08, 0x01]).unwrap();
    }
}

/// `deaggregate_all` and `deaggregate_each` give what `deaggregate_with` gives record by
/// record, on batches mixing aggregates, wrong checksums, corrupt protobuf and plain data.
mod deaggregate_all_matches_one_by_one {
    use proptest::prelude::*;

    use super::*;

    /// An aggregate of `n` user records (at least one: an empty aggregator writes nothing).
    fn aggregate_of(n: usize, size: usize, seed: u8) -> Bytes {
        let mut agg = Aggregator::new();
        for i in 0..n.max(1) {
            agg.add(
                &format!("k{i}"),
                None,
                vec![seed.wrapping_add(i as u8); size],
            )
            .unwrap();
        }
        agg.finish().unwrap().data
    }

    /// One record of each kind, chosen by `kind`.
    fn record(kind: u8, n: usize, seed: u8) -> Bytes {
        let good = aggregate_of(n, 30, seed);
        match kind % 5 {
            0 => good,
            1 => {
                // The checksum no longer matches.
                let mut bad = good.to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                bad.into()
            }
            // A right checksum over bytes that are not an aggregate.
            2 => envelope(&[0xFF, 0xFF, seed]),
            3 => Bytes::from(vec![seed; n]),
            _ => Bytes::new(),
        }
    }

    /// Each result's kind, bytes and user records field by field: what `check` compares
    /// besides `PartialEq` (hand-written for `UserRecord`, so not to be the only check).
    type Seen = Result<(&'static str, Vec<u8>, Vec<Visible>), DeaggError>;

    fn seen(results: &[Result<Deaggregated, DeaggError>]) -> Vec<Seen> {
        results
            .iter()
            .map(|r| match r {
                Ok(Deaggregated::Plain(d)) => Ok(("plain", d.to_vec(), vec![])),
                Ok(Deaggregated::ChecksumMismatch(d)) => Ok(("mismatch", d.to_vec(), vec![])),
                Ok(Deaggregated::Aggregated(users)) => Ok((
                    "aggregated",
                    vec![],
                    users.clone().map(|u| visible(&u)).collect(),
                )),
                Err(e) => Err(e.clone()),
            })
            .collect()
    }

    fn assert_same(
        ours: &[Result<Deaggregated, DeaggError>],
        expected: &[Result<Deaggregated, DeaggError>],
    ) {
        assert_eq!(seen(ours), seen(expected));
        assert_eq!(ours, expected);
    }

    fn check(records: &[Bytes]) {
        for verify in [true, false] {
            let one_by_one: Vec<_> = records
                .iter()
                .map(|r| deaggregate_with(r.clone(), verify))
                .collect();
            assert_same(&deaggregate_all(records, verify), &one_by_one);
            let each: Vec<_> = deaggregate_each(records, verify).collect();
            assert_same(&each, &one_by_one);
            // Whatever the batch's size and the machine's cores, the helper thread's way.
            let shared: Vec<_> = Verifier::started()
                .deaggregate_each(records, verify)
                .collect();
            assert_same(&shared, &one_by_one);
        }
        // The aggregates pushed while the batch was read: all of them, some, or copies that
        // are not the batch's buffers (their verdicts must not be taken).
        for pushed in [
            records.to_vec(),
            records.iter().step_by(2).cloned().collect(),
            copies(records),
        ] {
            let mut verifier = Verifier::started();
            for data in &pushed {
                verifier.push(data);
            }
            let early: Vec<_> = verifier.deaggregate_each(records, true).collect();
            assert_same(&early, &one_by_one_verified(records));
        }
    }

    fn one_by_one_verified(records: &[Bytes]) -> Vec<Result<Deaggregated, DeaggError>> {
        records.iter().map(|r| deaggregate(r.clone())).collect()
    }

    /// Look-alikes in other buffers: the same length, one byte of the protobuf changed. Were
    /// a look-alike's digest taken for its record, a right checksum would be found wrong.
    fn copies(records: &[Bytes]) -> Vec<Bytes> {
        records
            .iter()
            .map(|r| {
                let mut copy = r.to_vec();
                if is_aggregated(&copy) {
                    copy[MAGIC.len()] ^= 1;
                }
                Bytes::from(copy)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn on_mixed_batches(kinds in prop::collection::vec((any::<u8>(), 0usize..20, any::<u8>()), 0..12)) {
            let records: Vec<Bytes> = kinds.iter().map(|&(k, n, s)| record(k, n, s)).collect();
            check(&records);
        }

        /// Left at any point, the helper thread's way lets go of every buffer of the batch.
        #[test]
        fn left_at_any_point(kinds in prop::collection::vec((any::<u8>(), 0usize..200, any::<u8>()), 0..12), taken in 0usize..12) {
            let records: Vec<Bytes> = kinds.iter().map(|&(k, n, s)| record(k, n, s)).collect();
            let mut shared = Verifier::started().deaggregate_each(&records, true);
            for _ in 0..taken {
                drop(shared.next());
            }
            drop(shared);
            prop_assert!(records.iter().filter(|r| !r.is_empty()).all(Bytes::is_unique));
        }
    }

    #[test]
    fn on_a_batch_big_enough_for_a_second_thread() {
        // 12 aggregates of ~40 KiB (past the 64 KiB threshold), one with a wrong checksum.
        let mut records: Vec<Bytes> = (0..12).map(|i| aggregate_of(200, 200, i)).collect();
        let mut bad = records[5].to_vec();
        bad[10] ^= 0x40;
        records[5] = bad.into();
        check(&records);
        assert!(matches!(
            deaggregate_all(&records, true)[5],
            Ok(Deaggregated::ChecksumMismatch(_))
        ));
    }

    /// Stopping before the end stops the second thread too: nothing keeps the batch's buffers
    /// (the runtime reuses the body's memory for the next event).
    #[test]
    fn a_batch_left_early_lets_go_of_its_buffers() {
        let records: Vec<Bytes> = (0..12).map(|i| aggregate_of(200, 200, i)).collect();
        let mut each = deaggregate_each(&records, true);
        assert!(matches!(each.next(), Some(Ok(Deaggregated::Aggregated(_)))));
        drop(each);
        assert!(records.iter().all(Bytes::is_unique));
    }
}

#[test]
fn a_protobuf_error_names_the_user_record_and_what_is_wrong() {
    let mut body = Pb {
        partition_key_table: vec![Bytes::from_static(b"k")],
        explicit_hash_key_table: vec![],
        records: vec![record(Some(0), None, Some(b"ok"))],
    }
    .encode_to_vec();
    // User record 1: partition key index 0, then `data` (field 3) as a varint, not bytes.
    body.extend([0x1A, 4, 0x08, 0x00, 0x18, 0x05]);
    let err = deaggregate(envelope(&body)).unwrap_err().to_string();
    assert!(
        err.contains("user record 1") && err.contains("field 3") && err.contains("wire type"),
        "{err}"
    );
}

#[test]
fn large_aggregates_are_counted_right_before_they_are_read() {
    // Lengths of one, two and three bytes, key table entries, and an unknown varint field
    // (whose key the quick pass does not know: the general decoding takes over).
    static BIG: [u8; 20_000] = [7; 20_000];
    let datas: [&'static [u8]; 4] = [b"", &BIG[..100], &BIG[..], b"x"];
    let mut body = Pb {
        partition_key_table: vec![Bytes::from_static(b"k"); 3],
        explicit_hash_key_table: vec![],
        records: datas
            .iter()
            .map(|d| record(Some(0), None, Some(d)))
            .collect(),
    }
    .encode_to_vec();
    assert_eq!(wire::count_records(&body), 4);
    body.extend([0x28, 0x01]); // field 5, varint 1
    body.extend(
        Pb {
            partition_key_table: vec![Bytes::from_static(b"k2")],
            records: vec![record(Some(0), None, Some(b"y")); 2],
            ..Pb::default()
        }
        .encode_to_vec(),
    );
    assert_eq!(wire::count_records(&body), 6);
    // Truncated in a record's length: what it read.
    assert_eq!(wire::count_records(&body[..body.len() - 2]), 6);
    // Records of exactly 128 bytes: each length's first byte is 0x80, not a length of its own.
    let exact = Pb {
        records: vec![record(Some(0), None, Some(&BIG[..124])); 3],
        ..Pb::default()
    }
    .encode_to_vec();
    assert_eq!(exact[1..3], [0x80, 0x01]);
    assert_eq!(wire::count_records(&exact), 3);
    // And of 16,384: three bytes of length, the second 0x80.
    let exact = Pb {
        records: vec![record(Some(0), None, Some(&BIG[..16_379])); 2],
        ..Pb::default()
    }
    .encode_to_vec();
    assert_eq!(exact[1..4], [0x80, 0x80, 0x01]);
    assert_eq!(wire::count_records(&exact), 2);
}

/// What a caller can see of a user record, field by field, without its `PartialEq`.
type Visible = (Option<u64>, String, Option<String>, Vec<u8>, bool);

fn visible(u: &UserRecord) -> Visible {
    (
        u.sub_sequence_number(),
        u.partition_key().to_owned(),
        u.explicit_hash_key().map(str::to_owned),
        u.data().to_vec(),
        u.has_lossy_keys(),
    )
}

/// A user record with the keys laid out in its own table: `prefix` before them, so that two
/// records with the same keys can keep them at different offsets.
fn laid_out(
    prefix: &str,
    sub: Option<u64>,
    pk: &str,
    ehk: Option<&str>,
    data: &'static [u8],
    lossy: bool,
) -> UserRecord {
    let mut keys = KeyTable::default();
    keys.push(prefix);
    let partition_key = keys.push(pk);
    let explicit_hash_key = ehk.map(|k| keys.push(k));
    UserRecord {
        sub_sequence_number: sub,
        keys: keys.text.into(),
        partition_key,
        explicit_hash_key,
        data: Bytes::from_static(data),
        lossy_keys: lossy,
    }
}

#[test]
fn user_records_are_equal_exactly_when_every_visible_field_is() {
    let base = || laid_out("", Some(3), "pk", Some("42"), b"data", false);
    // Equal: the same fields, the keys elsewhere in another table.
    let moved = laid_out("some other keys", Some(3), "pk", Some("42"), b"data", false);
    assert_eq!(visible(&moved), visible(&base()));
    assert_eq!(moved, base());
    assert_eq!(base(), base().clone());
    // Not equal: each field changed alone, in either order of comparison.
    let differing = [
        (
            "sub_sequence_number",
            laid_out("", Some(4), "pk", Some("42"), b"data", false),
        ),
        (
            "sub_sequence_number None",
            laid_out("", None, "pk", Some("42"), b"data", false),
        ),
        (
            "partition_key",
            laid_out("", Some(3), "pK", Some("42"), b"data", false),
        ),
        (
            "explicit_hash_key",
            laid_out("", Some(3), "pk", Some("43"), b"data", false),
        ),
        (
            "explicit_hash_key None",
            laid_out("", Some(3), "pk", None, b"data", false),
        ),
        (
            "data",
            laid_out("", Some(3), "pk", Some("42"), b"datA", false),
        ),
        (
            "lossy_keys",
            laid_out("", Some(3), "pk", Some("42"), b"data", true),
        ),
    ];
    for (field, other) in &differing {
        assert_ne!(visible(other), visible(&base()), "{field}");
        assert!(*other != base(), "differ in {field} only, yet equal");
        assert!(base() != *other, "differ in {field} only, yet equal");
    }
}

#[test]
fn a_user_records_debug_shows_every_visible_field() {
    let r = laid_out("x", Some(2), "pk", Some("42"), b"hi", true);
    assert_eq!(
        format!("{r:?}"),
        r#"UserRecord { sub_sequence_number: Some(2), partition_key: "pk", explicit_hash_key: Some("42"), data: b"hi", lossy_keys: true }"#
    );
    let plain = UserRecord::plain("k", None, Bytes::new());
    assert_eq!(
        format!("{plain:?}"),
        r#"UserRecord { sub_sequence_number: None, partition_key: "k", explicit_hash_key: None, data: b"", lossy_keys: false }"#
    );
}

#[test]
fn a_plain_user_record_holds_its_keys_and_data() {
    let data = Bytes::from_static(b"payload");
    let with = UserRecord::plain("user-1", Some("12345"), data.clone());
    assert_eq!(
        visible(&with),
        (
            None,
            "user-1".into(),
            Some("12345".into()),
            b"payload".to_vec(),
            false
        )
    );
    let without = UserRecord::plain("user-2", None, Bytes::new());
    assert_eq!(
        visible(&without),
        (None, "user-2".into(), None, Vec::new(), false)
    );
    let shared = UserRecord::plain_shared(Arc::from("shared-key"), data.clone());
    assert_eq!(
        visible(&shared),
        (None, "shared-key".into(), None, b"payload".to_vec(), false)
    );
}

#[test]
fn into_data_gives_the_payload_without_a_copy() {
    let data = Bytes::from(b"payload".to_vec());
    let r = UserRecord::plain("k", None, data.clone());
    let out = r.into_data();
    assert_eq!(&out[..], b"payload");
    assert_eq!(out.as_ptr(), data.as_ptr(), "copied");
    let d = message(&[b"k"], &[], vec![record(Some(0), None, Some(b"inside"))]);
    let mut users = aggregated(d);
    assert_eq!(&users.next().unwrap().into_data()[..], b"inside");
}

#[test]
fn the_hash_key_is_the_explicit_one_else_the_md5_of_the_partition_key() {
    // MD5s from RFC 1321's test suite, as 128-bit big-endian integers.
    let md5 = |hex: &str| u128::from_str_radix(hex, 16).unwrap();
    for (pk, hex) in [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
    ] {
        assert_eq!(effective_hash_key(pk, None), Some(md5(hex)), "{pk:?}");
        assert_eq!(
            UserRecord::plain(pk, None, Bytes::new()).hash_key(),
            Some(md5(hex))
        );
    }
    let max = u128::MAX.to_string();
    for (ehk, expected) in [
        ("0", Some(0)),
        ("1", Some(1)),
        ("2", Some(2)),
        ("12345678901234567890", Some(12345678901234567890)),
        (max.as_str(), Some(u128::MAX)),
        // 2^128: too large.
        ("340282366920938463463374607431768211456", None),
        ("", None),
        ("-1", None),
        // Rust's integer parser takes a sign; a hash key is digits only.
        ("+1", None),
        ("+0", None),
        (" 1", None),
        ("1 ", None),
        ("0x10", None),
        ("1e3", None),
    ] {
        assert_eq!(effective_hash_key("a", Some(ehk)), expected, "{ehk:?}");
        let r = UserRecord::plain("a", Some(ehk), Bytes::new());
        assert_eq!(r.hash_key(), expected, "{ehk:?}");
    }
}

#[test]
fn each_key_names_the_key_and_data_length_of_every_user_record_left() {
    let d = message(
        &[b"a", b"bb", b"a"],
        &[],
        vec![
            record(Some(1), None, Some(b"12345")),
            record(Some(0), None, Some(b"")),
            record(Some(2), None, Some(b"xy")),
            record(Some(1), None, Some(b"z")),
        ],
    );
    let mut users = aggregated(d);
    assert_eq!(users.key_count(), 3);
    let seen = |users: &UserRecords| {
        let mut seen = vec![];
        users.each_key(|k, key, len| seen.push((k, key.to_string(), len)));
        seen
    };
    let expected = |users: &UserRecords| -> Vec<(String, usize)> {
        users
            .clone()
            .map(|u| (u.partition_key().to_string(), u.data().len()))
            .collect()
    };
    let all = seen(&users);
    let ks: Vec<usize> = all.iter().map(|s| s.0).collect();
    assert_eq!(ks, [1, 0, 2, 1]);
    let keys: Vec<(String, usize)> = all.into_iter().map(|(_, k, n)| (k, n)).collect();
    assert_eq!(keys, expected(&users));
    assert_eq!(keys[0], ("bb".to_string(), 5));
    // Only what is left once some user records were taken.
    users.next();
    let rest: Vec<(String, usize)> = seen(&users).into_iter().map(|(_, k, n)| (k, n)).collect();
    assert_eq!(rest, expected(&users));
    assert_eq!(rest.len(), 3);
    // A plain record: one key, numbered 0; none once taken.
    let mut one = UserRecords::one(UserRecord::plain("p", None, Bytes::from_static(b"abc")));
    assert_eq!(seen(&one), [(0, "p".to_string(), 3)]);
    one.next();
    assert!(seen(&one).is_empty());
}

#[test]
fn lossy_keys_counts_only_the_user_records_left() {
    let d = message(
        &[b"\xff", b"ok"],
        &[],
        vec![
            record(Some(0), None, Some(b"1")),
            record(Some(1), None, Some(b"2")),
            record(Some(0), None, Some(b"3")),
        ],
    );
    let mut users = aggregated(d);
    assert_eq!(users.lossy_keys(), 2);
    users.next();
    assert_eq!(users.lossy_keys(), 1);
    assert_eq!((users.len(), users.size_hint()), (2, (2, Some(2))));
    users.next();
    users.next();
    assert_eq!(users.lossy_keys(), 0);
}

#[test]
fn user_records_are_equal_when_the_records_left_are_and_print_them() {
    let agg = |data: [&'static [u8]; 2]| {
        aggregated(message(
            &[b"k"],
            &[],
            vec![
                record(Some(0), None, Some(data[0])),
                record(Some(0), None, Some(data[1])),
            ],
        ))
    };
    let (a, b) = (agg([b"1", b"2"]), agg([b"1", b"3"]));
    assert_eq!(a, agg([b"1", b"2"]));
    // Same length, other data.
    assert_ne!(a, b);
    // The same records left: equal, whatever came before.
    let (mut a2, mut b2) = (a.clone(), agg([b"0", b"2"]));
    a2.next();
    b2.next();
    assert_eq!(a2, b2);
    assert_ne!(a2, a);
    let printed = format!("{a2:?}");
    assert!(
        printed.starts_with('[') && printed.contains("\"k\""),
        "{printed}"
    );
    assert_eq!(format!("{:?}", UserRecords::none()), "[]");
}
