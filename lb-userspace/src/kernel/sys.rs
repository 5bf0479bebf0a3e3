//! The agent's raw system calls: every `bpf_attr` it builds itself and every
//! libc call, each behind a safe function. The only file of the agent's
//! library (tests aside) with `unsafe`; aya does the rest of the bpf() calls.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

use aya::Pod;

/// `BPF_MAP_DELETE_ELEM` from `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// `BPF_MAP_GET_NEXT_KEY` from `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}
const _: () = assert!(std::mem::size_of::<ElemAttr>() == 32);

/// The key after `key` (the first key with `None`) of the map `map`, whose
/// keys must be `K`s; `None` past the last key. aya's iterator cannot start
/// from a given key.
pub fn bpf_map_get_next_key<K: Pod + Default>(
    map: BorrowedFd<'_>,
    key: Option<&K>,
) -> io::Result<Option<K>> {
    let mut next = K::default();
    let attr = ElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
        _pad: 0,
        key: key.map_or(0, |key| std::ptr::from_ref(key) as u64),
        next_key: std::ptr::from_mut(&mut next) as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_GET_NEXT_KEY attribute: the fd is an
    // open map whose key size is size_of::<K>() (the caller's typed map
    // checked it), `key` is null or points to a live K, and `next_key`
    // points to a K (plain data: any bytes are valid) the kernel may write.
    // All outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_NEXT_KEY,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        return Ok(Some(next));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(error)
}

/// Deletes `key` from the map `map`, whose keys must be `K`s (aya has no
/// delete for maps of maps). A key already absent is an error (ENOENT).
pub fn bpf_map_delete_elem<K: Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        next_key: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_DELETE_ELEM attribute: the fd is an
    // open map whose key size is size_of::<K>() (the caller's typed map
    // checked it) and `key` points to a live K the kernel only reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Every IPv4 and IPv6 address of every interface, with the interface's
/// name, in the kernel's order. IPv6 addresses carry their scope id (non-zero
/// for link-local ones).
pub fn interface_addresses() -> io::Result<Vec<(String, std::net::IpAddr, u32)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocates into `head`;
    // we pass a valid out-pointer and free the list below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a non-null node of the list getifaddrs returned,
        // which stays valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr owned by the list.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let (address, scope) = if family == libc::AF_INET {
            // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
            let addr_be = unsafe {
                (*entry.ifa_addr.cast::<libc::sockaddr_in>())
                    .sin_addr
                    .s_addr
            };
            let address = std::net::Ipv4Addr::from(addr_be.to_ne_bytes());
            (std::net::IpAddr::V4(address), 0)
        } else if family == libc::AF_INET6 {
            // SAFETY: the family is AF_INET6, so the sockaddr is a sockaddr_in6.
            let sin6 = unsafe { *entry.ifa_addr.cast::<libc::sockaddr_in6>() };
            let address = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            (std::net::IpAddr::V6(address), sin6.sin6_scope_id)
        } else {
            continue;
        };
        // SAFETY: ifa_name is a non-null NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        found.push((name, address, scope));
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once;
    // nothing borrowed from it outlives this point (names were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// Index of interface `name`, if it exists.
pub fn if_nametoindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Name of the interface with index `ifindex`, if it exists.
pub fn if_indextoname(ifindex: u32) -> Option<String> {
    let mut buffer = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buffer` has the IF_NAMESIZE bytes if_indextoname may write.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    Some(String::from_utf8_lossy(&buffer[..end]).into_owned())
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds, 0 if it cannot be read.
pub fn monotonic_coarse_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid out-pointer; CLOCK_MONOTONIC_COARSE exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    if rc != 0 {
        return 0;
    }
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    seconds * 1_000_000_000 + nanos
}

/// Lifts RLIMIT_MEMLOCK (kernels before 5.11 charge BPF maps to it).
pub fn remove_memlock_limit() -> io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (as Go programs do
/// at start) and returns the soft limit now in force. Table swaps hold a
/// descriptor per new table until one batch call publishes them
/// (`kernel::maps::write`): more descriptors mean fewer calls, each of
/// which waits for an RCU grace period.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads a valid rlimit struct that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    limit.rlim_cur
}

/// Hands the heap's free pages back to the kernel (glibc's
/// `malloc_trim(0)`). A big apply frees far more than it keeps (the
/// parse's events, the plan's ops, the previous generation), in chunks
/// between live ones that glibc would otherwise keep resident for good;
/// trimming releases the free pages inside the heap too, not only its top.
/// Returns whether any memory was released. Does nothing on other libcs.
pub fn release_free_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists,
        // under its locks; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// Makes every thread allocate from glibc's one main heap
/// (`mallopt(M_ARENA_MAX, 1)`); call it before any thread starts. Each
/// thread that allocates otherwise gets an arena of its own, and what a
/// big apply or the first cluster list leaves live in several of them
/// keeps more pages resident (measured at 10,000 Services from the
/// Kubernetes source: 64 MiB resident and a 78 MiB peak with arenas per
/// thread, 61 and 67 with one). The agent's few threads rarely allocate
/// at the same time. Does nothing on other libcs.
pub fn one_heap_arena() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX
        // takes effect for threads that have no arena yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The magic number of the filesystem `path` is on (statfs's f_type).
pub fn fs_magic(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    // SAFETY: all-zero is a valid statfs; statfs writes into it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out-pointer; both
    // outlive the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width and sign vary by architecture; the magic is 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as u64 & 0xffff_ffff)
}

/// Registers `inner`, which owns its descriptor, with tokio for readability.
pub fn async_readable<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor; it stays open and the same for as
    // long as the AsyncFd owns `inner`, and nothing else closes it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    };
    registered.map_err(Into::into)
}

/// Moves this thread (only) into the network namespace `namespace` (an
/// open `/proc/PID/ns/net` or `/run/netns/NAME`). Needs CAP_SYS_ADMIN.
pub fn setns_net(namespace: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns on an open namespace descriptor changes only the calling
    // thread's network namespace; no memory is involved.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buffer` from the kernel's random source (getrandom(2)).
pub fn getrandom(buffer: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory for the call's duration.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        filled += got.unsigned_abs();
    }
    Ok(())
}

/// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`),
/// close-on-exec, non-blocking if asked, and bound to the multicast
/// `groups` when there are any.
pub fn netlink_socket(
    protocol: libc::c_int,
    groups: u32,
    nonblocking: bool,
) -> io::Result<OwnedFd> {
    let mut kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
    if nonblocking {
        kind |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, kind, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor this function just opened and nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if groups == 0 {
        return Ok(socket);
    }
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid start.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address.nl_groups = groups;
    // SAFETY: `address` is a valid sockaddr_nl of the length given, alive
    // for the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// send(2) of one datagram; the bytes sent.
pub fn send(socket: BorrowedFd<'_>, message: &[u8]) -> io::Result<usize> {
    // SAFETY: `message` is valid for reads of its length during the call.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// recv(2) of one datagram into `buffer`; the bytes received.
pub fn recv(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of its length during the call.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
        )
    };
    usize::try_from(received).map_err(|_| io::Error::last_os_error())
}

/// `BPF_MAP_UPDATE_BATCH` from `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (`BPF_MAP_*_BATCH` commands).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] = values[i]` in order with one `BPF_MAP_UPDATE_BATCH`
/// call (BPF_ANY) to the map `map`, whose key and value sizes must be
/// those of `K` and `V` (callers pass the fd of an aya map typed with
/// exactly them). On failure, how many pairs were written first (0 after
/// EFAULT, when the kernel's count is not reliable) and the error.
pub fn bpf_map_update_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    let count = keys.len().min(values.len());
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(count).unwrap_or(u32::MAX),
        map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_UPDATE_BATCH attribute: `map_fd` is
    // an open map whose key and value sizes are size_of::<K>() and
    // size_of::<V>() (see above), and `keys` and `values` point to at least
    // `count` initialized elements each, which outlive the call. The kernel
    // only reads them, and writes `count` in `attr`, which is live and
    // mutable.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    let written = if error.raw_os_error() == Some(libc::EFAULT) {
        0
    } else {
        (attr.count as usize).min(count)
    };
    Err((written, error))
}

/// The system's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// A shared, writable mapping of part of a `BPF_F_MMAPABLE` map, unmapped
/// on drop. The datapath reads the same memory concurrently, so it is only
/// written through atomic stores.
pub struct SharedMapping {
    base: std::ptr::NonNull<libc::c_void>,
    length: usize,
}

impl SharedMapping {
    /// Maps `length` bytes of the map `map` from byte `offset`, which must
    /// be page-aligned and inside the map's page-rounded size.
    pub fn new(map: BorrowedFd<'_>, offset: usize, length: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        // SAFETY: a new shared mapping of `length` bytes of the map's fd at
        // `offset` (the kernel checks alignment and range); it aliases no
        // Rust memory and is unmapped by Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(base).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { base, length })
    }

    /// Stores `value` at byte `at` of the mapping (4-byte aligned, inside it).
    pub fn store_u32(&self, at: usize, value: u32) {
        use std::sync::atomic::{AtomicU32, Ordering};
        assert!(
            at.is_multiple_of(4) && at + 4 <= self.length,
            "store at {at} of {}",
            self.length
        );
        // SAFETY: `at` is inside the mapping and 4-byte aligned (the mapping
        // is page-aligned), checked above; the memory stays mapped while
        // `self` lives. Other writers and the datapath only ever access it
        // whole (atomically), so a shared atomic reference is sound.
        let cell = unsafe { &*self.base.as_ptr().cast::<u8>().add(at).cast::<AtomicU32>() };
        cell.store(value, Ordering::Relaxed);
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`length` are exactly the mapping `new` made, and no
        // reference into it outlives `self` (store_u32's is temporary).
        unsafe { libc::munmap(self.base.as_ptr(), self.length) };
    }
}
