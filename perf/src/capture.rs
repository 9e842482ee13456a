//! A minimal packet capture for tests and experiments: an AF_PACKET socket on one interface of
//! a host, counting the frames that match a predicate for a while, or sending crafted frames.
//! (tcpdump would do for the capture, but it is a package more for a single check.) The one
//! syscall-heavy module of this crate besides the testbed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::testbed::{Testbed, TestbedError};

/// Starts counting, on `host`'s `ifname`, the frames (in both directions) for which `matches`
/// holds, for `duration`; join the handle for the count.
pub fn count_frames(
    tb: &Testbed,
    host: &str,
    ifname: &str,
    duration: Duration,
    matches: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<std::io::Result<usize>>>, TestbedError> {
    let ifname =
        std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    spawn_capture(tb, host, move |ready| {
        let mut count = 0;
        let deadline = Instant::now() + duration;
        capture(
            &ifname,
            false,
            ready,
            &mut || Instant::now() < deadline,
            &mut |frame: &[u8]| {
                if matches(frame) {
                    count += 1;
                }
            },
        )
        .map(|()| count)
    })
}

/// One frame that [`record_frames`] kept or [`read_pcap`] read.
#[derive(Debug, Clone)]
pub struct Frame {
    /// When it was read: since the capture started ([`record_frames`]), or the file's timestamp
    /// ([`read_pcap`]).
    pub at: Duration,
    /// The frame, Ethernet header first, as the socket returned it (at most 2048 bytes; veths
    /// in a testbed have offloads off, so frames are never larger than the MTU).
    pub bytes: Vec<u8>,
}

/// Starts recording, on `host`'s `ifname`, the frames (in both directions) for which `matches`
/// holds, for `duration`; join the handle for them, in the order they were read. For sizing
/// packets from a capture: one allocation per frame kept, so keep the traffic light.
pub fn record_frames(
    tb: &Testbed,
    host: &str,
    ifname: &str,
    duration: Duration,
    matches: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<std::io::Result<Vec<Frame>>>>, TestbedError> {
    let ifname =
        std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    spawn_capture(tb, host, move |ready| {
        let started = Instant::now();
        let deadline = started + duration;
        let mut frames = Vec::new();
        capture(
            &ifname,
            false,
            ready,
            &mut || Instant::now() < deadline,
            &mut |frame: &[u8]| {
                if matches(frame) {
                    frames.push(Frame {
                        at: started.elapsed(),
                        bytes: frame.to_vec(),
                    });
                }
            },
        )
        .map(|()| frames)
    })
}

/// Starts writing, on `host`'s `ifname`, the frames (in both directions) for which `matches`
/// holds to a pcap file at `path` (Ethernet, stamped with the wall clock, so that they line up
/// with the processes' logs; each cut to `snaplen` bytes if given) until `stop` is set; join the
/// handle for the number of frames written. Read it back with [`read_pcap`], or with Wireshark.
pub fn record_pcap(
    tb: &Testbed,
    host: &str,
    ifname: &str,
    stop: Arc<AtomicBool>,
    path: &std::path::Path,
    snaplen: Option<usize>,
    matches: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<std::io::Result<u64>>>, TestbedError> {
    use pcap_file::pcap::{PcapPacket, PcapWriter};
    let ifname =
        std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    // The file's snap length stays the default 65535 whatever `snaplen`: a cut frame is one
    // whose captured length is below its original one (pcap-file refuses an original length
    // above the file's snap length, which tcpdump -s writes).
    let mut w = PcapWriter::new(file).map_err(std::io::Error::other)?;
    spawn_capture(tb, host, move |ready| {
        let mut written = 0;
        let failed = std::cell::RefCell::new(None);
        capture(
            &ifname,
            false,
            ready,
            &mut || failed.borrow().is_none() && !stop.load(Ordering::Relaxed),
            &mut |frame: &[u8]| {
                if !matches(frame) {
                    return;
                }
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let kept = &frame[..snaplen.unwrap_or(frame.len()).min(frame.len())];
                // Frames are at most 2048 bytes (the capture's buffer).
                match w.write_packet(&PcapPacket::new(at, frame.len() as u32, kept)) {
                    Ok(_) => written += 1,
                    Err(e) => *failed.borrow_mut() = Some(std::io::Error::other(e)),
                }
            },
        )?;
        if let Some(e) = failed.into_inner() {
            return Err(e);
        }
        w.into_writer().into_inner().map_err(|e| e.into_error())?;
        Ok(written)
    })
}

/// The frames of a pcap file of Ethernet frames, each [`Frame::at`] its timestamp (since the
/// Unix epoch in what [`record_pcap`] writes).
pub fn read_pcap(path: &std::path::Path) -> Result<Vec<Frame>, String> {
    let error = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| error(&e))?;
    let mut r =
        pcap_file::pcap::PcapReader::new(std::io::BufReader::new(file)).map_err(|e| error(&e))?;
    let mut frames = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.map_err(|e| error(&e))?;
        frames.push(Frame {
            at: p.timestamp,
            bytes: p.data.into_owned(),
        });
    }
    Ok(frames)
}

/// Hands every frame `host`'s `ifname` receives (not the ones it sends: a capture point that
/// watches one direction of a busy link stays cheap) to `on_frame(&mut watcher, frame)` until
/// `stop` is set; join the handle for the watcher. For a capture point that runs as long as an
/// experiment.
pub fn watch_incoming<W: Send + 'static>(
    tb: &Testbed,
    host: &str,
    ifname: &str,
    stop: Arc<AtomicBool>,
    mut watcher: W,
    on_frame: fn(&mut W, &[u8]),
) -> Result<std::thread::JoinHandle<std::io::Result<std::io::Result<W>>>, TestbedError> {
    let ifname =
        std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    spawn_capture(tb, host, move |ready| {
        capture(
            &ifname,
            true,
            ready,
            &mut || !stop.load(Ordering::Relaxed),
            &mut |f: &[u8]| on_frame(&mut watcher, f),
        )
        .map(|()| watcher)
    })
}

/// Runs `body` on a thread inside `host` and returns once it has said (through the sender it
/// is given) that its socket is bound, or has ended, or after 5 s: frames sent after the
/// return are seen.
fn spawn_capture<T: Send + 'static>(
    tb: &Testbed,
    host: &str,
    body: impl FnOnce(mpsc::Sender<()>) -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<T>>, TestbedError> {
    let (ready, bound) = mpsc::channel();
    let handle = tb.spawn_in(host, move || body(ready))?;
    // An error before the bind drops the sender; the handle then carries the error.
    let _ = bound.recv_timeout(Duration::from_secs(5));
    Ok(handle)
}

/// A packet socket (every protocol) bound to `ifname`.
fn packet_socket(ifname: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked, and owned from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifname` is a valid C string for the call.
    let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain integers.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` lives for the call and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends the frames `next` gives (Ethernet header first, any source MAC) out of `host`'s
/// `ifname` through a packet socket, as fast as the socket takes them, until it gives `None`;
/// join the handle for how many were sent. For hostile input that needs a new source MAC or
/// address in every frame.
pub fn inject_frames(
    tb: &Testbed,
    host: &str,
    ifname: &str,
    mut next: impl FnMut() -> Option<Vec<u8>> + Send + 'static,
) -> Result<std::thread::JoinHandle<std::io::Result<std::io::Result<u64>>>, TestbedError> {
    let ifname =
        std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    tb.spawn_in(host, move || {
        let fd = packet_socket(&ifname)?;
        let mut sent = 0;
        while let Some(frame) = next() {
            // SAFETY: `frame` is a live buffer of the length passed.
            let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(e);
                }
                // The device queue is full: this frame is not sent; go on.
                std::thread::yield_now();
            } else {
                sent += 1;
            }
        }
        Ok(sent)
    })
}

/// Reads frames from a packet socket on `ifname` until `keep_going` says no; `ready` hears
/// once the socket is bound.
fn capture(
    ifname: &std::ffi::CStr,
    incoming_only: bool,
    ready: mpsc::Sender<()>,
    keep_going: &mut dyn FnMut() -> bool,
    on_frame: &mut dyn FnMut(&[u8]),
) -> std::io::Result<()> {
    let fd = packet_socket(ifname)?;
    if incoming_only {
        let one: libc::c_int = 1;
        // SAFETY: `one` lives for the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: `timeout` lives for the call and its size is passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let _ = ready.send(());
    let mut buf = [0u8; 2048];
    while keep_going() {
        // SAFETY: `buf` is a live buffer of the length passed.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            on_frame(&buf[..n as usize]);
        }
    }
    Ok(())
}
