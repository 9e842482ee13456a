//! The AF_XDP traffic generator (`mimiq-perf gen`).
//!
//! - `gen send`: numbered, timestamped UDP probes over IPv4 or IPv6 on one AF_XDP queue, at a
//!   rate in packets or bits per second (or as fast as the TX ring takes them), over N flows
//!   (addresses or ports varied), with one frame size or a weighted mix (IMIX), for a count or
//!   a duration ([`send`]); or the frames of a pcap file, looped, with their addresses
//!   rewritten ([`replay`]).
//! - `gen recv`: counts probes, detects loss, reordering and duplicates per flow from the
//!   sequence numbers, records one-way latency from the send time into an HdrHistogram; prints a
//!   summary, writes JSON and an HdrHistogram interval log ([`recv`]).
//! - `gen reflect`: a bare AF_XDP reflector, the ceiling any forwarding pipeline is measured
//!   against ([`reflect`]).
//!
//! The cores are sans-IO and tested without root: frame templates and the probe
//! ([`probe`]), the token bucket and size mixes ([`rate`]), numbering and the sequence tracker
//! ([`seq`]). [`send`] and [`recv`] are the thin AF_XDP shells over `mimiq_dataplane::port`.
//!
//! Threading: each command polls one socket per thread (the reflector: two sockets); with
//! `--queues N`, `send` and `recv` run N such threads, one per queue, each pinned to its core
//! ([`on_queues`]). Panics: none on input; a frame from the network that is not a probe is
//! counted in `other_frames`.

pub mod cli;
pub mod probe;
pub mod rate;
pub mod recv;
pub mod reflect;
pub mod replay;
pub mod send;
pub mod seq;

/// CLOCK_MONOTONIC in nanoseconds: the send time in probes and the receive time they are
/// compared with (the same clock on both ends, since they share the machine).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local we pass; CLOCK_MONOTONIC
    // always exists on Linux, so it cannot fail (a vDSO call, no syscall).
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of this process so far, (user, system) in milliseconds, from getrusage(2).
pub fn cpu_time_ms() -> (u64, u64) {
    // SAFETY: getrusage writes one `rusage` into the zeroed local we pass, which lives for the
    // call; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    (ms(usage.ru_utime), ms(usage.ru_stime))
}

/// Runs `run` once per config, each on a thread of its own (the i-th pinned to `cores[i]` when
/// given), under a stop flag of the group's: set when `stop` is, or when one of them fails.
/// `run` gets the group's flag and a `bound` callback to call once its socket is bound;
/// `ready` is called once every one has. Returns the results in order, or the first error
/// (`thread_error` makes one of a thread that could not be pinned or panicked).
pub fn on_queues<C: Sync, R: Send, E: Send>(
    configs: &[C],
    cores: &[usize],
    stop: &std::sync::atomic::AtomicBool,
    ready: &mut dyn FnMut(),
    thread_error: fn(String) -> E,
    run: impl Fn(&C, &std::sync::atomic::AtomicBool, &mut dyn FnMut()) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let group_stop = AtomicBool::new(false);
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let handles: Vec<_> = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let (bound_tx, group_stop, run) = (bound_tx.clone(), &group_stop, &run);
                let core = cores.get(i).copied();
                scope.spawn(move || {
                    if let Some(id) = core {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                            group_stop.store(true, Ordering::Relaxed);
                            return Err(thread_error(format!(
                                "cannot pin thread {i} to core {id}"
                            )));
                        }
                    }
                    let result = run(config, group_stop, &mut || {
                        let _ = bound_tx.send(());
                    });
                    if result.is_err() {
                        group_stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        drop(bound_tx);
        let mut bound = 0;
        while handles.iter().any(|h| !h.is_finished()) {
            if stop.load(Ordering::Relaxed) {
                group_stop.store(true, Ordering::Relaxed);
            }
            while bound_rx.try_recv().is_ok() {
                bound += 1;
                if bound == configs.len() {
                    ready();
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(thread_error("a thread panicked".into())))
            })
            .collect()
    })
}
