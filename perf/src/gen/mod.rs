//! The AF_XDP traffic generator (`mimiq-perf gen`).
//!
//! - `gen send`: numbered, timestamped UDP probes over IPv4 or IPv6 on one AF_XDP queue, at a
//!   rate in packets or bits per second (or as fast as the TX ring takes them), over N flows
//!   (addresses or ports varied), with one frame size or a weighted mix (IMIX), for a count or
//!   a duration ([`send`]).
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
//! Threading: each command is one thread polling one socket (the reflector: two). Panics: none
//! on input; a frame from the network that is not a probe is counted in `other_frames`.

pub mod cli;
pub mod probe;
pub mod rate;
pub mod recv;
pub mod reflect;
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
