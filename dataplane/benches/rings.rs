//! The worker's SPSC rings: rtrb (wait-free SPSC) against crossbeam's ArrayQueue (lock-free
//! MPMC), one producer thread and one consumer thread, 8-byte items (a frame descriptor's size).
//!
//! `cargo bench -p mimiq-dataplane --bench rings`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ITEMS: u64 = 1_000_000;
const CAPACITY: usize = 1024;

fn rtrb_pair(items: u64) -> Duration {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(CAPACITY);
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        for i in 0..items {
            while tx.push(i).is_err() {
                std::hint::spin_loop();
            }
        }
    });
    let mut seen = 0;
    while seen < items {
        if let Ok(v) = rx.pop() {
            debug_assert_eq!(v, seen);
            seen += 1;
        } else {
            std::hint::spin_loop();
        }
    }
    producer.join().unwrap();
    start.elapsed()
}

fn crossbeam_pair(items: u64) -> Duration {
    let q = std::sync::Arc::new(crossbeam::queue::ArrayQueue::<u64>::new(CAPACITY));
    let tx = std::sync::Arc::clone(&q);
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        for i in 0..items {
            while tx.push(i).is_err() {
                std::hint::spin_loop();
            }
        }
    });
    let mut seen = 0;
    while seen < items {
        if let Some(v) = q.pop() {
            debug_assert_eq!(v, seen);
            seen += 1;
        } else {
            std::hint::spin_loop();
        }
    }
    producer.join().unwrap();
    start.elapsed()
}

fn rings(c: &mut Criterion) {
    let mut g = c.benchmark_group("spsc_cross_thread");
    g.throughput(Throughput::Elements(ITEMS));
    g.sample_size(10);
    g.bench_function("rtrb", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rtrb_pair(ITEMS)).sum())
    });
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| crossbeam_pair(ITEMS)).sum())
    });
    g.finish();
}

criterion_group!(benches, rings);
criterion_main!(benches);
