//! The proxy's two BPF steering programs, compiled by build.rs with clang and loaded with libbpf
//! (statically linked by `libxdp-sys`): the only module that loads and configures them.
//!
//! - [`ReuseportSteering`] (`bpf/reuseport_cid.c`, an `SK_REUSEPORT` program): the workers'
//!   UDP sockets form one SO_REUSEPORT group, and the program hands each QUIC short-header
//!   packet to the socket of the worker its destination connection ID names (the ID's first two
//!   bytes are a route value, looked up in a 65,536-entry route table). Long headers and
//!   anything the program cannot place are left to the kernel's 4-tuple hash.
//! - [`TunSteering`] (`bpf/tun_steer.c`, a socket filter attached with `TUNSETSTEERINGEBPF`,
//!   include/uapi/linux/if_tun.h): a multi-queue TUN device hands each packet the host sends
//!   into it to the queue of the worker serving its destination address; addresses nobody
//!   serves go to queue 0.
//!
//! Threading: both types are `Send + Sync`. After loading, every operation is one `bpf(2)`,
//! `setsockopt(2)` or `ioctl(2)` on a descriptor, which the kernel serialises; libbpf's object
//! is touched again only when the value is dropped.
//!
//! Lifetime: attaching gives the kernel its own reference to the program (and through it to its
//! maps), so a group or device keeps steering with the last configuration after the value is
//! dropped, until its sockets or queues are closed or another program replaces it. Dropping
//! only ends the ability to change the maps.
//!
//! libbpf prints nothing (its verifier log included) unless `MIMIQ_LIBXDP_LOG=1`, as for the
//! switch's XDP program; failures are reported as errors naming what failed and the errno.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::ptr::NonNull;

/// The `SK_REUSEPORT` program's object.
static REUSEPORT_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reuseport_cid.o"));
/// The TUN steering program's object.
static TUN_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tun_steer.o"));

/// Entries in the route table: one per 16-bit route value.
pub const ROUTE_TABLE_LEN: usize = 65_536;
/// Workers a reuseport group can steer to (the size of the program's socket array).
pub const MAX_WORKERS: u32 = 256;

/// `TUNSETSTEERINGEBPF`, `_IOR('T', 224, int)` (include/uapi/linux/if_tun.h).
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
/// `BPF_ANY` (include/uapi/linux/bpf.h): create or update.
const BPF_ANY: u64 = 0;
/// Indices in the reuseport program's `counters` (bpf/reuseport_cid.c).
const COUNTER_STEERED: u32 = 0;
const COUNTER_FALLBACK: u32 = 1;

/// The SK_REUSEPORT program steering short-header packets to the worker that owns their
/// connection ID.
pub struct ReuseportSteering {
    /// Owns the program and the maps; their descriptors below live as long as it.
    _object: Object,
    prog_fd: RawFd,
    workers: Map,
    counters: Map,
}

impl ReuseportSteering {
    /// Loads the program with `table` (65,536 entries: route value → worker) in its route table.
    pub fn load(table: &[u32]) -> Result<ReuseportSteering, String> {
        if table.len() != ROUTE_TABLE_LEN {
            return Err(format!(
                "the reuseport route table has {} entries, not {ROUTE_TABLE_LEN}",
                table.len()
            ));
        }
        let what = "the SK_REUSEPORT steering program";
        let object = Object::load(REUSEPORT_OBJECT, what)?;
        let prog_fd = object.program_fd("reuseport_cid", what)?;
        let routes = object.map("route_table", 4, 4, false, what)?;
        let workers = object.map("workers", 4, 8, false, what)?;
        let counters = object.map("counters", 4, 8, true, what)?;
        routes.fill_u32_array(table)?;
        Ok(ReuseportSteering {
            _object: object,
            prog_fd,
            workers,
            counters,
        })
    }

    /// Puts worker `worker`'s socket into the group's socket array (after the socket is bound).
    pub fn register(&self, worker: u32, socket: RawFd) -> Result<(), String> {
        if worker >= MAX_WORKERS {
            return Err(format!(
                "cannot register worker {worker}'s socket: the reuseport socket array holds \
                 workers 0 to {}",
                MAX_WORKERS - 1
            ));
        }
        let fd = u64::try_from(socket)
            .map_err(|_| format!("cannot register worker {worker}'s socket: bad fd {socket}"))?;
        self.workers
            .update(&worker.to_ne_bytes(), &fd.to_ne_bytes())
            .map_err(|e| {
                format!(
                    "cannot put worker {worker}'s socket (fd {socket}) into the reuseport socket \
                     array: {e}"
                )
            })
    }

    /// Attaches the program to the SO_REUSEPORT group of `socket` (setsockopt
    /// SO_ATTACH_REUSEPORT_EBPF with the program fd).
    pub fn attach(&self, socket: RawFd) -> Result<(), String> {
        let prog_fd: libc::c_int = self.prog_fd;
        // SAFETY: SO_ATTACH_REUSEPORT_EBPF reads one int (the program's fd) from the pointer,
        // which points to a live c_int of the size passed; a bad `socket` is EBADF/ENOTSOCK,
        // not undefined behaviour.
        let rc = unsafe {
            libc::setsockopt(
                socket,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_EBPF,
                (&prog_fd as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!(
                "cannot attach the SK_REUSEPORT steering program to socket fd {socket}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Packets steered by connection ID, and packets left to the kernel's hash, so far (sums of
    /// the per-CPU counters).
    pub fn counters(&self) -> (u64, u64) {
        let sum = |index: u32| {
            let mut values = vec![0u8; self.counters.value_buf_len];
            match self.counters.lookup(&index.to_ne_bytes(), &mut values) {
                Ok(true) => values
                    .chunks_exact(8)
                    .map(|v| u64::from_ne_bytes(v.try_into().unwrap_or([0; 8])))
                    .sum(),
                // An array always has its entries; a failed lookup reads as nothing counted.
                Ok(false) | Err(_) => 0,
            }
        };
        (sum(COUNTER_STEERED), sum(COUNTER_FALLBACK))
    }
}

/// The TUN steering program: packets to an address go to the queue of the worker serving it.
pub struct TunSteering {
    /// Owns the program and the map; their descriptors below live as long as it.
    _object: Object,
    prog_fd: RawFd,
    owners: Map,
}

impl TunSteering {
    /// Loads the program, with no address assigned (everything goes to queue 0).
    pub fn load() -> Result<TunSteering, String> {
        let what = "the TUN steering program";
        let object = Object::load(TUN_OBJECT, what)?;
        let prog_fd = object.program_fd("tun_steer", what)?;
        let owners = object.map("owners", 16, 4, false, what)?;
        Ok(TunSteering {
            _object: object,
            prog_fd,
            owners,
        })
    }

    /// Attaches to a TUN queue's descriptor (ioctl TUNSETSTEERINGEBPF with a pointer to the
    /// program fd; one queue's fd is enough for the device).
    pub fn attach(&self, tun: RawFd) -> Result<(), String> {
        let prog_fd: libc::c_int = self.prog_fd;
        // SAFETY: TUNSETSTEERINGEBPF reads one int (the program's fd) through the pointer, which
        // points to a live c_int; a descriptor that is not a TUN queue is an error return.
        let rc =
            unsafe { libc::ioctl(tun, TUNSETSTEERINGEBPF as _, &prog_fd as *const libc::c_int) };
        if rc < 0 {
            return Err(format!(
                "cannot attach the TUN steering program to fd {tun} (TUNSETSTEERINGEBPF): {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Packets to `addr` go to queue `queue` from now on.
    pub fn assign(&self, addr: IpAddr, queue: u32) -> Result<(), String> {
        self.owners
            .update(&owner_key(addr), &queue.to_ne_bytes())
            .map_err(|e| format!("cannot steer {addr} to TUN queue {queue}: {e}"))
    }

    /// Forgets `addr` (no error if absent).
    pub fn release(&self, addr: IpAddr) {
        // ENOENT (absent) is the only failure a hash map's delete has with a key of its size.
        let _ = self.owners.delete(&owner_key(addr));
    }

    /// The queue `addr` is assigned to.
    pub fn owner(&self, addr: IpAddr) -> Option<u32> {
        let mut queue = [0u8; 4];
        match self.owners.lookup(&owner_key(addr), &mut queue) {
            Ok(true) => Some(u32::from_ne_bytes(queue)),
            Ok(false) | Err(_) => None,
        }
    }
}

// Workers share the steering objects (see the module docs).
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<ReuseportSteering>();
    shared::<TunSteering>();
};

/// The `owners` key of `addr`: the IPv6 address, or the IPv4 address mapped into IPv6
/// (RFC 4291, section 2.5.5.2), as bpf/tun_steer.c builds it from the packet. (An IPv6 packet
/// to an IPv4-mapped address would share the IPv4 address's entry; no such packet is routed.)
fn owner_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A loaded libbpf object; closing it (on drop) closes its program and map descriptors.
struct Object(NonNull<libxdp_sys::bpf_object>);

// SAFETY: the pointer is used by libbpf only while the object is being built (`load`, `map`,
// `program_fd`, called by the constructors before the value is shared) and in `Drop`, which has
// exclusive access. Everything reachable through `&self` afterwards is a syscall on a
// descriptor, which the kernel makes safe from any thread. libbpf has no thread affinity.
unsafe impl Send for Object {}
// SAFETY: as for Send: no libbpf call goes through a shared reference once it exists.
unsafe impl Sync for Object {}

impl Object {
    /// Opens `image` (an ELF object in memory) and loads its programs and maps into the kernel.
    fn load(image: &'static [u8], what: &str) -> Result<Object, String> {
        mimiq_dataplane::port::xsk::quiet_libxdp();
        // SAFETY: `image` is a static byte slice, so it outlives the object (libbpf parses the
        // ELF image in place); NULL options are allowed.
        let ptr = unsafe {
            libxdp_sys::bpf_object__open_mem(image.as_ptr().cast(), image.len(), std::ptr::null())
        };
        // libbpf 1.x returns NULL and sets errno on failure.
        let Some(ptr) = NonNull::new(ptr) else {
            return Err(format!(
                "cannot open {what}'s object: {}",
                io::Error::last_os_error()
            ));
        };
        // From here on, dropping `object` closes what libbpf made.
        let object = Object(ptr);
        // SAFETY: `ptr` is an opened, not yet loaded object that we own.
        let rc = unsafe { libxdp_sys::bpf_object__load(ptr.as_ptr()) };
        if rc != 0 {
            return Err(format!(
                "cannot load {what}: {} (MIMIQ_LIBXDP_LOG=1 prints libbpf's log)",
                errno_text(rc)
            ));
        }
        Ok(object)
    }

    /// The descriptor of the loaded program `name`.
    fn program_fd(&self, name: &str, what: &str) -> Result<RawFd, String> {
        let cname = CString::new(name).map_err(|_| format!("bad program name {name:?}"))?;
        // SAFETY: the object is loaded and ours; `cname` is a valid C string for the call. The
        // program pointer belongs to the object and is used before it could be closed.
        let fd = unsafe {
            let prog =
                libxdp_sys::bpf_object__find_program_by_name(self.0.as_ptr(), cname.as_ptr());
            if prog.is_null() {
                -libc::ENOENT
            } else {
                libxdp_sys::bpf_program__fd(prog)
            }
        };
        if fd < 0 {
            return Err(format!(
                "{what} has no loaded program {name}: {}",
                errno_text(fd)
            ));
        }
        Ok(fd)
    }

    /// The map `name`, checked to have the key and value sizes the callers use; `per_cpu` for
    /// a per-CPU map, whose lookups copy one value per possible CPU.
    fn map(
        &self,
        name: &'static str,
        key_len: usize,
        value_len: usize,
        per_cpu: bool,
        what: &str,
    ) -> Result<Map, String> {
        let cname = CString::new(name).map_err(|_| format!("bad map name {name:?}"))?;
        // SAFETY: the object is loaded and ours; `cname` is a valid C string for the call. The
        // map pointer belongs to the object and is only read here.
        let (fd, sizes) = unsafe {
            let map = libxdp_sys::bpf_object__find_map_by_name(self.0.as_ptr(), cname.as_ptr());
            if map.is_null() {
                (-libc::ENOENT, (0, 0))
            } else {
                (
                    libxdp_sys::bpf_map__fd(map),
                    (
                        libxdp_sys::bpf_map__key_size(map) as usize,
                        libxdp_sys::bpf_map__value_size(map) as usize,
                    ),
                )
            }
        };
        if fd < 0 {
            return Err(format!("{what} has no map {name}: {}", errno_text(fd)));
        }
        if sizes != (key_len, value_len) {
            return Err(format!(
                "{what}'s map {name} has {}-byte keys and {}-byte values, not {key_len} and \
                 {value_len}",
                sizes.0, sizes.1
            ));
        }
        let value_buf_len = if per_cpu {
            value_len.next_multiple_of(8) * possible_cpus()?
        } else {
            value_len
        };
        Ok(Map {
            fd,
            name,
            key_len,
            value_buf_len,
        })
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: we own the object (opened by `load`) and close it once; the descriptors the
        // owning value copied out of it are not used after this.
        unsafe { libxdp_sys::bpf_object__close(self.0.as_ptr()) };
    }
}

/// A map of a loaded object: its descriptor (owned by the [`Object`]) and the key and value
/// sizes it was created with, against which every access is checked.
struct Map {
    fd: RawFd,
    name: &'static str,
    key_len: usize,
    /// The bytes of one value as the kernel copies it in or out: the map's value size, or for a
    /// per-CPU map one value per possible CPU, each padded to 8 bytes.
    value_buf_len: usize,
}

impl Map {
    /// Creates or replaces the entry `key`.
    fn update(&self, key: &[u8], value: &[u8]) -> Result<(), io::Error> {
        self.check(key.len(), Some(value.len()))?;
        // SAFETY: key and value are live buffers of exactly the sizes the kernel reads (checked
        // above against the sizes libbpf created the map with).
        let rc = unsafe {
            libxdp_sys::bpf_map_update_elem(
                self.fd,
                key.as_ptr().cast(),
                value.as_ptr().cast(),
                BPF_ANY,
            )
        };
        errno_result(rc)
    }

    /// Deletes the entry `key`.
    fn delete(&self, key: &[u8]) -> Result<(), io::Error> {
        self.check(key.len(), None)?;
        // SAFETY: key is a live buffer of exactly the map's key size.
        let rc = unsafe { libxdp_sys::bpf_map_delete_elem(self.fd, key.as_ptr().cast()) };
        errno_result(rc)
    }

    /// Copies the entry `key` into `value` (for a per-CPU map, every CPU's value); `false` when
    /// there is none.
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<bool, io::Error> {
        self.check(key.len(), Some(value.len()))?;
        // SAFETY: key is a live buffer of the map's key size; value is a live, writable buffer
        // of exactly the bytes the kernel writes (checked above).
        let rc = unsafe {
            libxdp_sys::bpf_map_lookup_elem(self.fd, key.as_ptr().cast(), value.as_mut_ptr().cast())
        };
        match errno_result(rc) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `values[i]` at index `i` of an array of u32 (one `BPF_MAP_UPDATE_BATCH` call,
    /// or one update per entry where the kernel has no batch operation for arrays).
    fn fill_u32_array(&self, values: &[u32]) -> Result<(), String> {
        let failed = |e: io::Error| format!("cannot fill the map {}: {e}", self.name);
        self.check(4, Some(4)).map_err(failed)?;
        let len = u32::try_from(values.len())
            .map_err(|_| format!("cannot fill the map {}: too many values", self.name))?;
        let keys: Vec<u32> = (0..len).collect();
        let mut count = len;
        // SAFETY: keys and values are live arrays of `count` u32 each, the map's key and value
        // size (checked above); `count` is a live u32 the call updates; NULL options are
        // allowed.
        let rc = unsafe {
            libxdp_sys::bpf_map_update_batch(
                self.fd,
                keys.as_ptr().cast(),
                values.as_ptr().cast(),
                &mut count,
                std::ptr::null(),
            )
        };
        if errno_result(rc).is_ok() && count == len {
            return Ok(());
        }
        for (key, value) in keys.iter().zip(values) {
            self.update(&key.to_ne_bytes(), &value.to_ne_bytes())
                .map_err(failed)?;
        }
        Ok(())
    }

    /// Refuses buffers of other sizes than the map's (a programming error, reported rather than
    /// letting the kernel read or write past them).
    fn check(&self, key_len: usize, value_len: Option<usize>) -> Result<(), io::Error> {
        if key_len != self.key_len || value_len.is_some_and(|v| v != self.value_buf_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "map {} takes {}-byte keys and {}-byte values, not {key_len} and {}",
                    self.name,
                    self.key_len,
                    self.value_buf_len,
                    value_len.unwrap_or(self.value_buf_len)
                ),
            ));
        }
        Ok(())
    }
}

/// The number of CPUs the kernel may ever bring up, one value each in a per-CPU map.
fn possible_cpus() -> Result<usize, String> {
    unsafe extern "C" {
        // libbpf is linked statically into libxdp-sys, whose bindings leave this one out.
        fn libbpf_num_possible_cpus() -> libc::c_int;
    }
    // SAFETY: no arguments; libbpf reads /sys/devices/system/cpu/possible once and caches it.
    let n = unsafe { libbpf_num_possible_cpus() };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("cannot count the possible CPUs: {}", errno_text(n)))
}

/// libbpf's convention: 0, or a negative errno.
fn errno_result(rc: libc::c_int) -> Result<(), io::Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc.saturating_abs()))
    }
}

fn errno_text(rc: libc::c_int) -> String {
    io::Error::from_raw_os_error(rc.saturating_abs()).to_string()
}
