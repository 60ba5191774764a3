//! Properties of the KPL core over arbitrary inputs.

mod common;

use kinesis_deagg::kpl::{Aggregator, Deaggregated, deaggregate};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,8}",
        "\\PC{0,20}",
        "\\PC{200,300}",
    ]
}

fn hash_key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![Just(None), any::<u128>().prop_map(|h| Some(h.to_string()))]
}

fn user_record() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let data = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => proptest::collection::vec(any::<u8>(), 3000..6000),
    ];
    (key(), hash_key(), data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn aggregate_then_deaggregate_is_the_identity(
        users in proptest::collection::vec(user_record(), 1..40),
        limit in prop_oneof![Just(8 * 1024usize), Just(1 << 20), 7000usize..20_000],
    ) {
        let mut agg = Aggregator::with_max_size(limit).unwrap();
        let mut records = Vec::new();
        for (pk, ehk, data) in &users {
            records.extend(agg.add(pk, ehk.as_deref(), data).unwrap());
        }
        records.extend(agg.finish());
        let mut back = Vec::new();
        for r in &records {
            prop_assert!(r.data.len() + r.partition_key.len() <= limit);
            let Ok(Deaggregated::Aggregated(u)) = deaggregate(r.data.clone()) else {
                return Err(TestCaseError::fail("not an aggregate"));
            };
            let u: Vec<_> = u.collect();
            prop_assert_eq!(u.len(), r.user_records);
            for (i, u) in u.iter().enumerate() {
                prop_assert_eq!(u.sub_sequence_number(), Some(i as u64));
            }
            back.extend(u.into_iter().map(|u| (
                u.partition_key().to_owned(),
                u.explicit_hash_key().map(str::to_owned),
                u.data().to_vec(),
            )));
        }
        prop_assert_eq!(back, users);
    }

    #[test]
    fn a_record_that_fits_alone_is_never_refused_and_no_aggregate_exceeds_its_limit(
        sizes in proptest::collection::vec(0usize..2000, 1..60),
        limit in 64usize..4096,
    ) {
        let mut agg = Aggregator::with_max_size(limit).unwrap();
        for (i, n) in sizes.iter().enumerate() {
            let pk = format!("k{}", i % 7);
            match agg.add(&pk, None, vec![1; *n]) {
                Ok(Some(r)) => prop_assert!(r.data.len() + r.partition_key.len() <= limit),
                Ok(None) => {}
                Err(_) => {
                    // Refused: it must not fit even alone.
                    let mut alone = Aggregator::with_max_size(limit).unwrap();
                    prop_assert!(alone.add(&pk, None, vec![1; *n]).is_err());
                }
            }
            prop_assert!(agg.size() <= limit);
        }
    }

    #[test]
    fn deaggregating_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = deaggregate(data.into());
    }

    #[test]
    fn arbitrary_protobuf_with_a_good_checksum_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = deaggregate(common::envelope(&body).into());
    }
}
