//! AF_XDP ports (xsk-rs over libxdp). The only module of the crate that talks to AF_XDP.
//!
//! All sockets of one worker share one UMEM ([`open`]), so frames move between its ports by
//! descriptor, without a copy. The UMEM holds `2 × ring_size` frames per port: enough to keep
//! every fill ring full while as many frames again sit in TX rings or in the worker's hands.
//!
//! Ownership invariant (what makes the `unsafe` calls below sound): every [`FrameDesc`] of the
//! UMEM is in exactly one place at a time — the worker's free list, a fill ring, an RX ring,
//! a burst the worker is processing, a TX ring, or a completion ring. Frames enter the kernel
//! only through [`XskPort::tx_burst`] and [`XskPort::reclaim`], which take them out of the
//! worker's hands, and leave it only through [`XskPort::rx_burst`] and [`XskPort::reclaim`].
//! The type keeps the rest of it: a [`FrameDesc`] is the token of its frame, neither `Copy` nor
//! `Clone`, and only `unsafe` code can make one (xsk-rs as vendored here:
//! vendor/xsk-rs/MIMIQ-PATCH.md), so safe code cannot hold a frame the kernel or another thread
//! holds. The empty slots the rings write into live only in each port's `scratch`, which is read
//! no further than a ring has just filled it.
//!
//! Copy mode, the only mode on veth, copies each frame once in the kernel on RX (into the UMEM)
//! and once on TX (into an skb); zero-copy drivers copy nothing.

use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::xdp_prog::{self, KernelPass, XdpProgram};
use super::{FrameMemory, Port, XdpStats};
use crate::config::{CopyMode, HugePages, XdpMode};

/// How to open AF_XDP sockets.
#[derive(Debug, Clone)]
pub struct XskConfig {
    /// Native (driver) XDP, or the generic SKB-mode fallback.
    pub xdp_mode: XdpMode,
    /// Copy, zero-copy, or whatever the driver offers.
    pub copy_mode: CopyMode,
    /// Entries in each RX, TX, fill and completion ring (a power of two).
    pub ring_size: u32,
    /// UMEM frame size in bytes (2048 or 4096).
    pub frame_size: u32,
    /// Back the UMEM with huge pages: always, never, or when the system has them.
    pub huge_pages: HugePages,
    /// Preferred busy polling with this budget (packets per poll); off when `None`.
    pub busy_poll_budget: Option<u16>,
    /// What the XDP program leaves to the kernel.
    pub kernel_pass: KernelPass,
}

/// Why ports could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Ring or frame sizes the kernel would refuse.
    #[error("invalid ring or frame size: {0}")]
    BadSize(String),
    /// The UMEM could not be created (memory, locked-memory limit, huge pages).
    #[error("cannot create UMEM of {frames} frames: {reason}")]
    Umem { frames: u32, reason: String },
    /// The interface does not exist in this network namespace.
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// The interface has fewer RX queues than the worker's queue number.
    #[error("interface {iface} has no queue {queue}: it has {count} RX queue(s), 0 to {} (ethtool -L {iface} combined N adds more where the driver allows)", count.saturating_sub(1))]
    NoSuchQueue {
        iface: String,
        queue: u32,
        count: u32,
    },
    /// Another AF_XDP socket (or XDP program) already holds the queue.
    #[error("interface {iface} queue {queue} is already in use by another AF_XDP socket or XDP program ({reason})")]
    Busy {
        iface: String,
        queue: u32,
        reason: String,
    },
    /// Zero-copy was asked for and the driver does not offer it.
    #[error("zero-copy was requested but interface {0} does not support it (use copy_mode = \"copy\" or \"auto\")")]
    ZeroCopyUnsupported(String),
    /// Anything else the kernel refused.
    #[error("cannot bind AF_XDP socket on {iface} queue {queue}: {reason}")]
    Bind {
        iface: String,
        queue: u32,
        reason: String,
    },
}

/// The UMEM of one worker.
pub struct XskMemory {
    umem: Umem,
    len_bytes: usize,
}

impl FrameMemory for XskMemory {
    type Frame = FrameDesc;

    #[inline]
    fn len(&self, frame: &FrameDesc) -> usize {
        frame.lengths().data()
    }

    type Bytes<'a> = xsk_rs::umem::frame::DataMut<'a>;

    #[inline]
    fn data_mut<'a>(&'a mut self, frame: &'a mut FrameDesc) -> Self::Bytes<'a> {
        // SAFETY: `frame` came from this UMEM (module invariant) and is in the worker's hands,
        // not in any ring, so neither the kernel nor another reference touches its memory; the
        // borrow of `self` for 'a keeps the UMEM mapped.
        unsafe { self.umem.data_mut(frame) }
    }

    #[inline]
    fn set_len(&mut self, frame: &mut FrameDesc, len: usize) -> usize {
        // SAFETY: as in `data_mut`: the frame is this UMEM's and in the worker's hands.
        let mut data = unsafe { self.umem.data_mut(frame) };
        data.cursor().set_pos(len);
        data.len()
    }

    #[inline]
    fn adjust_head(&mut self, frame: &mut FrameDesc, delta: isize) -> bool {
        self.umem.adjust_head(frame, delta)
    }
}

/// One AF_XDP socket: one queue of one interface.
pub struct XskPort {
    name: String,
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    umem_len_bytes: usize,
    scratch: Vec<FrameDesc>,
    invalid_rx_descs: u64,
    tx_in_flight: u64,
    ring_size: u32,
    busy_poll: bool,
    /// Last: dropped after the socket, so the program is detached once no socket needs it.
    _program: Arc<XdpProgram>,
}

/// How long a busy queue is retried at start: the kernel releases the socket of a process that
/// exited shortly after it exits.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens one socket per `(interface, queue)` on a shared UMEM. Returns the ports, the UMEM, and
/// the frames not yet given to the kernel (the worker's initial free list).
pub fn open(
    queues: &[(String, u32)],
    config: &XskConfig,
) -> Result<(Vec<XskPort>, XskMemory, Vec<FrameDesc>), OpenError> {
    quiet_libxdp();
    let ring = QueueSize::new(config.ring_size)
        .map_err(|e| OpenError::BadSize(format!("ring_size {}: {e}", config.ring_size)))?;
    let frame_size = FrameSize::new(config.frame_size)
        .map_err(|e| OpenError::BadSize(format!("frame_size {}: {e}", config.frame_size)))?;
    let umem_config = UmemConfig::builder()
        .frame_size(frame_size)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()
        .map_err(|e| OpenError::BadSize(e.to_string()))?;
    let frames = u32::try_from(queues.len())
        .ok()
        .and_then(|n| n.checked_mul(2 * config.ring_size))
        .and_then(NonZeroU32::new)
        .ok_or_else(|| OpenError::BadSize("no queues, or too many frames".into()))?;
    let umem_error = |e: xsk_rs::umem::UmemCreateError| OpenError::Umem {
        frames: frames.get(),
        reason: format!(
            "{e}: {}",
            std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
        ),
    };
    let (umem, mut free) = match config.huge_pages {
        HugePages::On => Umem::new(umem_config, frames, true).map_err(umem_error)?,
        HugePages::Off => Umem::new(umem_config, frames, false).map_err(umem_error)?,
        HugePages::Auto => match Umem::new(umem_config, frames, true) {
            Ok(umem) => {
                tracing::info!("UMEM of {frames} frames on huge pages");
                umem
            }
            Err(_) => {
                tracing::debug!("no huge pages free for the UMEM; using normal pages");
                Umem::new(umem_config, frames, false).map_err(umem_error)?
            }
        },
    };
    let len_bytes = frames.get() as usize * config.frame_size as usize;

    let xdp_flags = match config.xdp_mode {
        XdpMode::Native => XdpFlags::XDP_FLAGS_DRV_MODE,
        XdpMode::Skb => XdpFlags::XDP_FLAGS_SKB_MODE,
    };
    let bind_flags = BindFlags::XDP_USE_NEED_WAKEUP
        | match config.copy_mode {
            CopyMode::Auto => BindFlags::empty(),
            CopyMode::Copy => BindFlags::XDP_COPY,
            CopyMode::ZeroCopy => BindFlags::XDP_ZEROCOPY,
        };
    let socket_config = SocketConfig::builder()
        .rx_queue_size(ring)
        .tx_queue_size(ring)
        .xdp_flags(xdp_flags)
        .bind_flags(bind_flags)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .build();

    // libxdp attaches or reuses the XDP program of an interface when a socket is created; two
    // workers doing that at once for the same interface race (one sees EBUSY). Sockets are
    // created one at a time, process-wide; this is start-up only, never the packet path.
    static CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serialised = CREATE.lock().unwrap_or_else(|p| p.into_inner());
    let mut ports = Vec::with_capacity(queues.len());
    for (iface, queue) in queues {
        let ifname: Interface = iface
            .parse()
            .map_err(|_| OpenError::NoSuchInterface(iface.clone()))?;
        let count = rx_queues(iface);
        if count > 0 && *queue >= count {
            return Err(OpenError::NoSuchQueue {
                iface: iface.clone(),
                queue: *queue,
                count,
            });
        }
        // Our own XDP program feeds the sockets (libxdp's default one is inhibited above).
        let program = xdp_prog::attach(iface, config.xdp_mode, &config.kernel_pass)?;
        // A queue whose last socket belonged to a process that just exited (a restart) stays
        // busy until the kernel has released that socket, a moment later: retried for up to
        // BUSY_WAIT; a queue still busy after that has another owner.
        let busy_since = std::time::Instant::now();
        let (tx, rx, rings) = loop {
            // SAFETY: `umem` outlives the socket (each queue holds a clone of it), and the
            // frames handed to the socket's rings below follow the module's ownership invariant.
            let created = unsafe { Socket::new(socket_config, &umem, &ifname, *queue) };
            match created.map_err(|e| bind_error(iface, *queue, config, e)) {
                Ok(sockets) => break sockets,
                Err(OpenError::Busy { .. }) if busy_since.elapsed() < BUSY_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        program.register_socket(*queue, rx.fd().as_raw_fd())?;
        if let Some(budget) = config.busy_poll_budget {
            prefer_busy_poll(rx.fd().as_raw_fd(), budget).map_err(|e| OpenError::Bind {
                iface: iface.clone(),
                queue: *queue,
                reason: format!("preferred busy polling: {e}"),
            })?;
        }
        let Some((mut fill, comp)) = rings else {
            return Err(OpenError::Busy {
                iface: iface.clone(),
                queue: *queue,
                reason: "the UMEM already has a socket on this queue".into(),
            });
        };
        let give = (config.ring_size as usize).min(free.len());
        // SAFETY: the frames come from the free list of this UMEM and nowhere else holds them.
        let given = unsafe { fill.produce(&free[free.len() - give..]) };
        free.truncate(free.len() - given);
        ports.push(XskPort {
            name: iface.clone(),
            rx,
            tx,
            fill,
            comp,
            umem_len_bytes: len_bytes,
            scratch: (0..config.ring_size).map(|_| empty_slot()).collect(),
            invalid_rx_descs: 0,
            tx_in_flight: 0,
            ring_size: config.ring_size,
            busy_poll: config.busy_poll_budget.is_some(),
            _program: program,
        });
    }
    Ok((ports, XskMemory { umem, len_bytes }, free))
}

/// An empty scratch slot for a ring to write a descriptor into.
fn empty_slot() -> FrameDesc {
    // SAFETY: the slot stays in a port's `scratch`, which is read only up to the count a ring's
    // `consume` has just filled; an empty slot is never used as a frame.
    unsafe { FrameDesc::empty() }
}

/// Takes the frame out of a scratch slot that a ring has filled, leaving an empty slot.
#[inline]
fn take(slot: &mut FrameDesc) -> FrameDesc {
    std::mem::replace(slot, empty_slot())
}

/// The RX queues of `iface` (`/sys/class/net/<iface>/queues/rx-<n>`); 0 if unknown.
fn rx_queues(iface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues")).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
            .count() as u32
    })
}

impl XskMemory {
    /// The UMEM's size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// A second handle on the same UMEM, for the slow-path thread. Sound because a handle
    /// touches a frame's bytes only while it owns the frame's descriptor (module invariant):
    /// the worker gives a frame up when it pushes it onto the slow-path ring and gets it back
    /// from the return ring, so no two threads access a frame at once.
    pub fn share(&self) -> XskMemory {
        XskMemory {
            umem: self.umem.clone(),
            len_bytes: self.len_bytes,
        }
    }
}

impl XskPort {
    /// RX descriptors the kernel handed over that pointed outside the UMEM (dropped).
    pub fn invalid_rx_descs(&self) -> u64 {
        self.invalid_rx_descs
    }

    /// Frames queued by [`Port::tx_burst`] whose completion [`Port::reclaim`] has not seen yet
    /// (in the TX ring, in the kernel, or in the completion ring). A sender that stops calls
    /// `reclaim` until this is 0 to know that the kernel has sent everything it was given.
    pub fn tx_in_flight(&self) -> u64 {
        self.tx_in_flight
    }

    /// The socket's descriptor, readable when frames were received (for a caller's own poll).
    pub fn rx_fd(&self) -> std::os::fd::RawFd {
        self.rx.fd().as_raw_fd()
    }
}

impl Port for XskPort {
    type Frame = FrameDesc;
    type Memory = XskMemory;

    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, out: &mut Vec<FrameDesc>, max: usize) -> usize {
        let max = max.min(self.scratch.len());
        // SAFETY: the descriptors written into `scratch` are frames the kernel hands back to us;
        // from here on they are in the worker's hands (module invariant).
        let n = unsafe { self.rx.consume(&mut self.scratch[..max]) };
        let mut taken = 0;
        for desc in &mut self.scratch[..n] {
            // Validate kernel-provided descriptors once, here at the ring boundary.
            if desc.addr() + desc.lengths().data() <= self.umem_len_bytes {
                out.push(take(desc));
                taken += 1;
            } else {
                self.invalid_rx_descs += 1;
            }
        }
        taken
    }

    fn tx_burst(&mut self, frames: &mut Vec<FrameDesc>) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let room = (self.tx.nb_free(frames.len() as u32) as usize).min(frames.len());
        // SAFETY: the frames are from this worker's UMEM and in its hands; after this call the
        // ones taken are in the TX ring and removed from `frames` below.
        let sent = unsafe { self.tx.produce(&frames[..room]) };
        frames.drain(..sent);
        self.tx_in_flight += sent as u64;
        if self.tx.needs_wakeup() {
            // Errors here are transient (EAGAIN, ENOBUFS are filtered by xsk-rs); the next
            // reclaim kicks again.
            let _ = self.tx.wakeup();
        }
        sent
    }

    fn reclaim(&mut self, free: &mut Vec<FrameDesc>) {
        // SAFETY: completed descriptors are frames the kernel has finished transmitting; they
        // return to the worker's free list.
        let done = unsafe { self.comp.consume(&mut self.scratch) };
        free.extend(self.scratch[..done].iter_mut().map(take));
        self.tx_in_flight = self.tx_in_flight.saturating_sub(done as u64);
        if !free.is_empty() {
            let room = (self.fill.nb_free(free.len() as u32) as usize).min(free.len());
            // SAFETY: frames of this UMEM from the free list; the ones given are removed below.
            let given = unsafe { self.fill.produce(&free[free.len() - room..]) };
            free.truncate(free.len() - given);
        }
        // With preferred busy polling the application drives the driver: poll every time.
        if self.busy_poll || self.fill.needs_wakeup() {
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
        }
        // Copy mode transmits inside sendto, at most a batch per call: kick again while frames
        // wait, and only then (an idle worker makes no syscalls here).
        if self.tx_in_flight > 0 && self.tx.needs_wakeup() {
            let _ = self.tx.wakeup();
        }
    }

    fn frames_in_kernel(&mut self) -> usize {
        let in_fill = self.ring_size.saturating_sub(self.fill.nb_free_exact());
        in_fill as usize + self.tx_in_flight as usize
    }

    fn xdp_stats(&self) -> Option<XdpStats> {
        let s = self.rx.fd().xdp_statistics().ok()?;
        Some(XdpStats {
            rx_dropped: s.rx_dropped(),
            rx_invalid_descs: s.rx_invalid_descs() + self.invalid_rx_descs,
            tx_invalid_descs: s.tx_invalid_descs(),
            rx_ring_full: s.rx_ring_full(),
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs(),
            tx_ring_empty_descs: s.tx_ring_empty_descs(),
        })
    }

    fn wait_rx(ports: &mut [Self], timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = ports
            .iter()
            .map(|p| libc::pollfd {
                fd: p.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // ppoll, not poll: a nanosecond timeout, so a worker can sleep until a delayed frame is
        // due instead of spinning through the last millisecond.
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `fds` is a live, correctly sized array of pollfd and `ts` a live timespec for
        // the duration of the call; the descriptors belong to sockets owned by `ports`; a null
        // signal mask keeps the thread's mask.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            );
        }
    }
}

/// Sets SO_PREFER_BUSY_POLL, SO_BUSY_POLL (20 µs) and SO_BUSY_POLL_BUDGET on an AF_XDP socket.
fn prefer_busy_poll(fd: i32, budget: u16) -> std::io::Result<()> {
    for (option, value) in [
        (libc::SO_PREFER_BUSY_POLL, 1),
        (libc::SO_BUSY_POLL, 20),
        (libc::SO_BUSY_POLL_BUDGET, i32::from(budget)),
    ] {
        // SAFETY: `value` is a live i32 for the duration of the call and its size is passed;
        // `fd` is the socket's descriptor, open while the socket lives.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// libxdp and libbpf print their progress (and their fallbacks, such as loading the XDP program
/// without the multi-program dispatcher, and the verifier's log) on stderr. The switch and the
/// proxy (its steering programs, `masque-fastpath/src/steer.rs`) report failures themselves from
/// the error codes, so their printing is off unless `MIMIQ_LIBXDP_LOG=1`.
pub fn quiet_libxdp() {
    unsafe extern "C" {
        // libbpf is linked statically into libxdp-sys, which does not export this binding.
        fn libbpf_set_print(
            print: Option<unsafe extern "C" fn(u32, *const libc::c_char, *mut libc::c_void) -> i32>,
        ) -> Option<unsafe extern "C" fn(u32, *const libc::c_char, *mut libc::c_void) -> i32>;
    }
    if std::env::var("MIMIQ_LIBXDP_LOG").as_deref() == Ok("1") {
        return;
    }
    // SAFETY: both setters store a function pointer (NULL: print nothing) in a global that the
    // libraries read before printing; every caller stores the same value (NULL), valid forever,
    // so a race between two callers cannot leave anything else there.
    unsafe {
        libxdp_sys::libxdp_set_print(None);
        libbpf_set_print(None);
    }
}

fn bind_error(
    iface: &str,
    queue: u32,
    config: &XskConfig,
    err: xsk_rs::socket::SocketCreateError,
) -> OpenError {
    let io = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<std::io::Error>());
    let os = io.and_then(std::io::Error::raw_os_error);
    let reason = match io {
        Some(io) => format!("{err}: {io}"),
        None => err.to_string(),
    };
    match os {
        Some(libc::ENODEV) | Some(libc::ENXIO) => OpenError::NoSuchInterface(iface.to_string()),
        Some(libc::EBUSY) | Some(libc::EEXIST) => OpenError::Busy {
            iface: iface.to_string(),
            queue,
            reason,
        },
        Some(libc::EOPNOTSUPP) if config.copy_mode == CopyMode::ZeroCopy => {
            OpenError::ZeroCopyUnsupported(iface.to_string())
        }
        _ => OpenError::Bind {
            iface: iface.to_string(),
            queue,
            reason,
        },
    }
}
