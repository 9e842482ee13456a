//! What mimiq's tests share, and nothing else: no production binary links this crate.
//!
//! Tests that wait for something another process or thread does (a counter published on an
//! interval, a lease running out, a binding reaching a switch) poll for it until a deadline with
//! [`eventually`], instead of sleeping a fixed time and then asserting: a sleep is too short on a
//! loaded machine and too long on an idle one. Floods are accounted for with the kernel's own
//! drops ([`udp_rcvbuf_errors`]). Single-threaded, no I/O; nothing here panics.
#![forbid(unsafe_code)]

use std::fmt;
use std::time::{Duration, Instant};

/// The first poll waits this long; each further wait doubles, up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(5);
/// The longest wait between two polls.
const MAX_POLL: Duration = Duration::from_millis(100);

/// Calls `attempt` until it returns `Ok`, or until `within` has passed since the call; then
/// returns the last error, with how long and how often it tried. `attempt` runs at least once,
/// and once more at the deadline, so a condition that holds by then is never missed.
///
/// The error of `attempt` should say what it saw (the counter's value, the state), so that a
/// timeout reads as a diagnosis: `eventually(Duration::from_secs(5), || if n() == 6 { Ok(()) }
/// else { Err(format!("{} refused", n())) })`.
pub fn eventually<T, E: fmt::Display>(
    within: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, TimedOut<E>> {
    let start = Instant::now();
    let deadline = start + within;
    let mut wait = FIRST_POLL;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match attempt() {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(TimedOut {
                last,
                within,
                attempts,
            });
        }
        std::thread::sleep(wait.min(deadline - now));
        wait = (wait * 2).min(MAX_POLL);
    }
}

/// A condition that did not come true in time: the last error seen.
#[derive(Debug)]
pub struct TimedOut<E> {
    /// What the last attempt returned.
    pub last: E,
    /// How long [`eventually`] waited.
    pub within: Duration,
    /// How many times it tried.
    pub attempts: u32,
}

impl<E: fmt::Display> fmt::Display for TimedOut<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not within {:?} ({} attempts); last: {}",
            self.within, self.attempts, self.last
        )
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for TimedOut<E> {}

/// The UDP `RcvbufErrors` counter (datagrams the kernel dropped for a full receive buffer) in
/// the text of a network namespace's /proc/net/snmp; `None` if the text has none.
pub fn udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn returns_the_first_success_without_waiting_for_the_deadline() {
        let calls = Cell::new(0);
        let started = Instant::now();
        let got = eventually(Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                Ok(calls.get())
            } else {
                Err("not yet")
            }
        });
        assert_eq!(got.unwrap(), 3);
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn a_condition_that_never_holds_reports_its_last_error_after_the_deadline() {
        let calls = Cell::new(0u32);
        let started = Instant::now();
        let err = eventually(Duration::from_millis(50), || -> Result<(), String> {
            calls.set(calls.get() + 1);
            Err(format!("seen {}", calls.get()))
        })
        .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(err.attempts, calls.get());
        assert!(err.attempts >= 2, "tried again at the deadline");
        assert_eq!(err.last, format!("seen {}", calls.get()));
        assert!(err.to_string().contains("last: seen"), "{err}");
    }

    #[test]
    fn a_zero_deadline_still_tries_once() {
        assert_eq!(eventually(Duration::ZERO, || Ok::<_, &str>(7)).unwrap(), 7);
        assert_eq!(
            eventually(Duration::ZERO, || Err::<(), _>("no"))
                .unwrap_err()
                .attempts,
            1
        );
    }

    #[test]
    fn the_udp_receive_buffer_drops_are_read_from_snmp_text() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 0 7 12 5 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 9 0\n";
        assert_eq!(udp_rcvbuf_errors(snmp), Some(5));
        assert_eq!(udp_rcvbuf_errors("Ip: Forwarding\nIp: 1\n"), None);
        assert_eq!(udp_rcvbuf_errors("Udp: RcvbufErrors\nUdp: x\n"), None);
    }
}
