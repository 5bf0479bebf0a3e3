//! A two-instruction `XDP_PASS` program attached to the pod ends of the lab's
//! veths. A veth hands frames that its peer sent with `XDP_TX` (xlb's TCP
//! resets and ICMP errors go back out the interface they came in on) to
//! the receiving end only when that end has an XDP program: with GRO alone
//! they sit in its ring unflushed. A real NIC has no such condition; this
//! program makes the lab's veth behave like one. Loaded with raw `bpf(2)`
//! calls so the lab needs no object file.

use std::ffi::CString;
use std::os::fd::{FromRawFd as _, OwnedFd};

use crate::LabError;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// `r0 = XDP_PASS (2); exit`, as `struct bpf_insn`s.
const PROGRAM: [[u8; 8]; 2] = [
    [0xb7, 0x00, 0, 0, 2, 0, 0, 0], // BPF_ALU64 | BPF_MOV | BPF_K, r0, imm 2
    [0x95, 0x00, 0, 0, 0, 0, 0, 0], // BPF_JMP | BPF_EXIT
];

/// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills
/// the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The head of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// An attached pass-through program; detached when dropped (or when its
/// interface goes away with its namespace).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of bpf_attr
    // and its exact size is passed; the kernel reads at most that many bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).expect("bpf(2) returned an fd");
    // SAFETY: bpf(2) just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attach `XDP_PASS` to `interface` in the calling thread's network
/// namespace (call it through [`crate::in_netns`]).
pub fn attach(interface: &str) -> Result<XdpPass, LabError> {
    let failed = |what: &str, source| {
        LabError::io(format!("{what} (XDP_PASS program for {interface})"), source)
    };
    let name = CString::new(interface).expect("interface names have no NUL");
    // SAFETY: `name` is a valid C string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(failed(
            "finding the interface",
            std::io::Error::last_os_error(),
        ));
    }
    let license = c"GPL";
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_XDP,
        prog_name: *b"xlb_lab_pass\0\0\0\0",
        ..ProgLoadAttr::default()
    };
    let program = bpf(BPF_PROG_LOAD, &mut load).map_err(|source| failed("loading", source))?;
    let mut link = LinkCreateAttr {
        prog_fd: std::os::fd::AsRawFd::as_raw_fd(&program) as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    let link = bpf(BPF_LINK_CREATE, &mut link).map_err(|source| failed("attaching", source))?;
    Ok(XdpPass { _link: link })
}
