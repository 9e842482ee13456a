//! mimiq's own XDP program (`dataplane/bpf/xdp_mimiq.c`, compiled by build.rs with clang): the
//! only module that loads, attaches and configures XDP programs.
//!
//! Every frame goes to the AF_XDP socket of its RX queue, except what the role leaves to the
//! kernel ([`KernelPass`]): ARP, IPv6 neighbour discovery, frames for the host's own addresses.
//! One program per interface per process, shared by the workers' sockets on that interface
//! (`Arc`); the last socket to go detaches it.
//!
//! A switch killed with SIGKILL leaves its program attached. A lock file per interface and
//! network namespace (`/run/mimiq/xdp/<netns inode>-<ifindex>.lock`, held while the program is
//! ours; the kernel releases it when the process dies) tells a leftover, which a new switch
//! replaces, from a program a live switch still owns, which it refuses to touch.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, Weak};

use super::xsk::OpenError;
use crate::config::XdpMode;

/// The compiled program.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xdp_mimiq.o"));

/// The program's name, as the kernel shows it.
pub const PROGRAM_NAME: &str = "xdp_mimiq";

const PASS_ARP: u32 = 1;
const PASS_ND: u32 = 2;

/// What reaches the kernel instead of the switch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPass {
    /// ARP frames.
    pub arp: bool,
    /// ICMPv6 router/neighbour solicitations and advertisements and redirects.
    pub nd: bool,
    /// Frames whose IP destination is one of these (the host's own addresses).
    pub addresses: Vec<IpAddr>,
    /// Only UDP datagrams to this port go to the sockets, everything else to the kernel (the
    /// MASQUE proxy's AF_XDP datapath); the fields above are then not used.
    pub udp_port: Option<u16>,
}

/// The program attached to one interface.
pub struct XdpProgram {
    prog: ProgPtr,
    obj: ObjPtr,
    ifname: String,
    ifindex: i32,
    mode: libxdp_sys::xdp_attach_mode,
    xsks_map_fd: i32,
    _lock: File,
}

/// `*mut xdp_program` is owned by exactly one `XdpProgram`; libxdp has no thread affinity.
struct ProgPtr(*mut libxdp_sys::xdp_program);
// SAFETY: the pointer is only used through `&XdpProgram`/drop, and every libxdp call on it is
// made while holding `REGISTRY` or from `Drop` (exclusive), so no two threads use it at once.
unsafe impl Send for ProgPtr {}
// SAFETY: as above: shared references never call into libxdp except under `REGISTRY`.
unsafe impl Sync for ProgPtr {}

/// The program's `*mut bpf_object`, which libxdp does not close for programs made from an
/// object the caller opened.
struct ObjPtr(*mut libxdp_sys::bpf_object);
// SAFETY: as for ProgPtr: only touched under REGISTRY or in Drop.
unsafe impl Send for ObjPtr {}
// SAFETY: as for ProgPtr.
unsafe impl Sync for ObjPtr {}

static REGISTRY: Mutex<Option<HashMap<i32, Weak<XdpProgram>>>> = Mutex::new(None);

/// The program on `ifname` for this process: the one already attached by another worker, or a
/// new one, configured with `pass` (the first attach decides the configuration).
pub fn attach(
    ifname: &str,
    mode: XdpMode,
    pass: &KernelPass,
) -> Result<Arc<XdpProgram>, OpenError> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let registry = registry.get_or_insert_with(HashMap::new);
    let ifindex = ifindex(ifname)?;
    if let Some(live) = registry.get(&ifindex).and_then(Weak::upgrade) {
        return Ok(live);
    }
    let program = Arc::new(XdpProgram::attach(ifname, ifindex, mode, pass)?);
    registry.insert(ifindex, Arc::downgrade(&program));
    Ok(program)
}

impl XdpProgram {
    /// Directs queue `queue`'s frames to the AF_XDP socket `xsk_fd`.
    pub fn register_socket(&self, queue: u32, xsk_fd: i32) -> Result<(), OpenError> {
        // SAFETY: key and value are live u32/i32 for the call; the map fd belongs to our
        // program's object, open while `self` lives.
        let rc = unsafe {
            libxdp_sys::bpf_map_update_elem(
                self.xsks_map_fd,
                (&queue as *const u32).cast(),
                (&xsk_fd as *const i32).cast(),
                0,
            )
        };
        if rc != 0 {
            return Err(OpenError::Bind {
                iface: self.ifname.clone(),
                queue,
                reason: format!(
                    "cannot register the socket in the XDP program: {}",
                    errno_text(rc)
                ),
            });
        }
        Ok(())
    }

    fn attach(
        ifname: &str,
        ifindex: i32,
        mode: XdpMode,
        pass: &KernelPass,
    ) -> Result<Self, OpenError> {
        let busy = |reason: String| OpenError::Busy {
            iface: ifname.to_string(),
            queue: 0,
            reason,
        };
        let lock = take_lock(ifindex).map_err(busy)?;
        remove_leftover(ifname, ifindex)?;

        // SAFETY: OBJECT is a static byte slice that outlives the object; NULL opts are allowed.
        let obj = unsafe {
            libxdp_sys::bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len(), std::ptr::null())
        };
        // SAFETY: libbpf returns NULL (errno set) on failure in libbpf 1.x; checked here.
        if obj.is_null() {
            return Err(attach_error(
                ifname,
                "cannot open the XDP program object".into(),
            ));
        }
        let section = CString::new("xdp").expect("constant has no NUL");
        // SAFETY: `obj` is a valid, unloaded bpf_object; libxdp takes ownership of it.
        let prog = unsafe { libxdp_sys::xdp_program__from_bpf_obj(obj, section.as_ptr()) };
        // SAFETY: libxdp_get_error accepts any pointer libxdp returned.
        let err = unsafe { libxdp_sys::libxdp_get_error(prog.cast()) };
        if prog.is_null() || err != 0 {
            // SAFETY: the object is ours and no program references it.
            unsafe { libxdp_sys::bpf_object__close(obj) };
            return Err(attach_error(
                ifname,
                format!("cannot load the XDP program: {}", errno_text(err as i32)),
            ));
        }
        let mode = match mode {
            XdpMode::Native => libxdp_sys::xdp_attach_mode_XDP_MODE_NATIVE,
            XdpMode::Skb => libxdp_sys::xdp_attach_mode_XDP_MODE_SKB,
        };
        // SAFETY: `prog` is a valid program; attach loads it into the kernel and attaches it.
        let rc = unsafe { libxdp_sys::xdp_program__attach(prog, ifindex, mode, 0) };
        if rc != 0 {
            // SAFETY: closing a program we own, not attached, then its object.
            unsafe {
                libxdp_sys::xdp_program__close(prog);
                libxdp_sys::bpf_object__close(obj);
            }
            let text = errno_text(rc);
            return Err(if rc == -libc::EEXIST || rc == -libc::EBUSY {
                busy(format!("the interface has another XDP program ({text})"))
            } else {
                attach_error(ifname, format!("cannot attach the XDP program: {text}"))
            });
        }
        let program = XdpProgram {
            prog: ProgPtr(prog),
            obj: ObjPtr(obj),
            ifname: ifname.to_string(),
            ifindex,
            mode,
            xsks_map_fd: -1,
            _lock: lock,
        };
        // From here on, Drop detaches the program if configuring it fails.
        let mut program = program;
        program.xsks_map_fd = program.map_fd("xsks_map")?;
        program.configure(pass)?;
        Ok(program)
    }

    fn map_fd(&self, name: &str) -> Result<i32, OpenError> {
        let cname = CString::new(name).expect("map names have no NUL");
        // SAFETY: the program owns its bpf_object while it lives; the name is a valid C string.
        let fd = unsafe {
            let obj = libxdp_sys::xdp_program__bpf_obj(self.prog.0);
            libxdp_sys::bpf_object__find_map_fd_by_name(obj, cname.as_ptr())
        };
        if fd < 0 {
            return Err(attach_error(
                &self.ifname,
                format!("the XDP program has no map {name}"),
            ));
        }
        Ok(fd)
    }

    fn configure(&self, pass: &KernelPass) -> Result<(), OpenError> {
        let flags = if pass.arp { PASS_ARP } else { 0 } | if pass.nd { PASS_ND } else { 0 };
        self.update(
            &self.map_fd("pass_flags")?,
            &0u32.to_ne_bytes(),
            &flags.to_ne_bytes(),
        )?;
        // The program compares with the port as it is on the wire.
        let port = u32::from(pass.udp_port.unwrap_or(0).to_be());
        self.update(
            &self.map_fd("udp_port")?,
            &0u32.to_ne_bytes(),
            &port.to_ne_bytes(),
        )?;
        let (v4, v6) = (self.map_fd("kernel_v4")?, self.map_fd("kernel_v6")?);
        for addr in &pass.addresses {
            match addr {
                // The program compares with the address as it is on the wire.
                IpAddr::V4(a) => self.update(&v4, &a.octets(), &[1])?,
                IpAddr::V6(a) => self.update(&v6, &a.octets(), &[1])?,
            }
        }
        Ok(())
    }

    fn update(&self, fd: &i32, key: &[u8], value: &[u8]) -> Result<(), OpenError> {
        // SAFETY: key and value point to live buffers of the sizes the map was created with
        // (checked by the kernel against the map's key and value sizes: a mismatch is EINVAL,
        // not a read out of bounds, because the sizes in the C source match these types).
        let rc = unsafe {
            libxdp_sys::bpf_map_update_elem(*fd, key.as_ptr().cast(), value.as_ptr().cast(), 0)
        };
        if rc != 0 {
            return Err(attach_error(
                &self.ifname,
                format!("cannot configure the XDP program: {}", errno_text(rc)),
            ));
        }
        Ok(())
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        // SAFETY: we own the program; it was attached to `ifindex` in `mode` by us.
        unsafe {
            libxdp_sys::xdp_program__detach(self.prog.0, self.ifindex, self.mode, 0);
            libxdp_sys::xdp_program__close(self.prog.0);
            libxdp_sys::bpf_object__close(self.obj.0);
        }
    }
}

/// Takes the per-interface lock that says "a live mimiq-switch owns this interface's program".
/// The locks live in `xdp/` under the runtime directory systemd gives the unit
/// (`$RUNTIME_DIRECTORY`, its first entry), `/run/mimiq` without one.
fn take_lock(ifindex: i32) -> Result<File, String> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    let runtime = std::env::var("RUNTIME_DIRECTORY")
        .ok()
        .and_then(|dirs| dirs.split(':').next().map(std::path::PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| "/run/mimiq".into());
    let dir = &runtime.join("xdp");
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("{netns}-{ifindex}.lock"));
    let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err("another mimiq-switch owns this interface (its lock is held)".into())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// Detaches an `xdp_mimiq` program that a dead switch left on the interface. Called with the
/// interface's lock held, so no live switch owns it.
fn remove_leftover(ifname: &str, ifindex: i32) -> Result<(), OpenError> {
    // SAFETY: get_from_ifindex returns an owned multiprog or an error pointer, checked below;
    // it is closed on every path.
    unsafe {
        let mp = libxdp_sys::xdp_multiprog__get_from_ifindex(ifindex);
        if mp.is_null() || libxdp_sys::libxdp_get_error(mp.cast()) != 0 {
            return Ok(()); // nothing attached
        }
        let main = libxdp_sys::xdp_multiprog__main_prog(mp);
        let name = if main.is_null() {
            String::new()
        } else {
            CStr::from_ptr(libxdp_sys::xdp_program__name(main))
                .to_string_lossy()
                .into_owned()
        };
        let result = if libxdp_sys::xdp_multiprog__is_legacy(mp) && name == PROGRAM_NAME {
            tracing::info!("replacing the XDP program a stopped mimiq-switch left on {ifname}");
            match libxdp_sys::xdp_multiprog__detach(mp) {
                0 => Ok(()),
                rc => Err(attach_error(
                    ifname,
                    format!("cannot remove the leftover XDP program: {}", errno_text(rc)),
                )),
            }
        } else {
            Ok(()) // someone else's program: attach reports it as busy
        };
        libxdp_sys::xdp_multiprog__close(mp);
        result
    }
}

fn ifindex(ifname: &str) -> Result<i32, OpenError> {
    let c = CString::new(ifname).map_err(|_| OpenError::NoSuchInterface(ifname.to_string()))?;
    // SAFETY: `c` is a valid C string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(OpenError::NoSuchInterface(ifname.to_string()));
    }
    i32::try_from(index).map_err(|_| OpenError::NoSuchInterface(ifname.to_string()))
}

fn attach_error(ifname: &str, reason: String) -> OpenError {
    OpenError::Bind {
        iface: ifname.to_string(),
        queue: 0,
        reason,
    }
}

fn errno_text(rc: i32) -> String {
    std::io::Error::from_raw_os_error(rc.abs()).to_string()
}
