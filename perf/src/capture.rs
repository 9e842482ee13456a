//! A minimal packet capture for tests and experiments: an AF_PACKET socket on one interface of
//! a host, counting the frames that match a predicate for a while. (tcpdump would do, but it is
//! a package more for a single check.) The one syscall-heavy module of this crate besides the
//! testbed.

use std::time::{Duration, Instant};

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
    let ifname = std::ffi::CString::new(ifname).map_err(|_| TestbedError::BadHostName(ifname.into()))?;
    tb.spawn_in(host, move || capture(&ifname, duration, &matches))
}

fn capture(ifname: &std::ffi::CStr, duration: Duration, matches: &dyn Fn(&[u8]) -> bool) -> std::io::Result<usize> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = (|| {
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
            libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: `timeout` lives for the call and its size is passed.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32);
        }
        let mut buf = [0u8; 2048];
        let mut count = 0;
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            // SAFETY: `buf` is a live buffer of the length passed.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && matches(&buf[..n as usize]) {
                count += 1;
            }
        }
        Ok(count)
    })();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}
