//! Deaggregation allocates a few blocks per aggregate, none per user record (zero-copy data,
//! keys copied once into one table).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kinesis_deagg::kpl::{Aggregator, Deaggregated, deaggregate};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size(), Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_1_mib_aggregate_of_200_byte_records_costs_no_allocation_per_user_record() {
    // Every user record has its own partition key: the worst case for the key table.
    let mut agg = Aggregator::new();
    let full = (0..)
        .find_map(|i| agg.add(&format!("user-{i:06}"), None, [b'x'; 200]).unwrap())
        .unwrap();
    let (n, data) = (full.user_records, full.data);
    assert!(data.len() > 1_000_000);

    let (count0, bytes0) = (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed));
    let Ok(Deaggregated::Aggregated(users)) = deaggregate(data.clone()) else {
        panic!()
    };
    let (count, bytes) = (
        ALLOCATIONS.load(Relaxed) - count0,
        BYTES.load(Relaxed) - bytes0,
    );
    let users: Vec<_> = users.collect();

    assert_eq!(users.len(), n);
    // A handful of growing vectors and the key table, whatever the number of user records.
    assert!(count <= 64, "{count} allocations for {n} user records");
    // The data is not copied: every user record's data lies inside the aggregate's buffer.
    let range = data.as_ptr_range();
    assert!(users.iter().all(|u| range.contains(&u.data().as_ptr())));
    // Bookkeeping (records, key tables, user records) stays under three times the data
    // size; a copy of the data would add one more.
    assert!(
        bytes < 3 * data.len(),
        "{bytes} bytes allocated for a {} byte aggregate",
        data.len()
    );
}
