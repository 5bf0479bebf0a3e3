//! Ctrl-C, SIGTERM or SIGHUP: a signal handler writes the signal number into
//! a pipe; a thread reading it raises [`interrupted`] so the demo can stop
//! the agent and remove the lab the normal way, and if that has not ended
//! the process within `GRACE`, removes every namespace and scratch directory
//! this process created (with the processes inside) itself and exits.
//!
//! A handler rather than a blocked mask plus `sigwait`: children inherit a
//! blocked mask (std keeps it across spawn), and an agent that cannot see
//! SIGTERM never prints its counters. Caught signals revert to their default
//! in a child at exec, so the children are unaffected.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// How long the normal shutdown gets before the lab is removed by force.
const GRACE: Duration = Duration::from_secs(15);

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once a signal asked us to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the fd is the pipe's write end
    // (or -1, which write rejects), and `byte` lives for the call.
    unsafe {
        libc::write(
            PIPE_WRITE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

pub fn teardown_on_interrupt() -> anyhow::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        anyhow::bail!(
            "could not create the signal pipe: {}",
            std::io::Error::last_os_error()
        );
    }
    let [read_end, write_end] = fds;
    PIPE_WRITE.store(write_end, Ordering::Relaxed);

    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; zeroed is a valid empty value,
        // and `on_signal` only calls async-signal-safe functions.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            anyhow::bail!(
                "could not install a handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    std::thread::Builder::new()
        .name("teardown".to_owned())
        .spawn(move || {
            let mut byte = 0u8;
            // SAFETY: reads one byte into `byte` from the pipe's read end.
            let read = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
            if read != 1 {
                return;
            }
            let signal = i32::from(byte);
            INTERRUPTED.store(true, Ordering::Relaxed);
            eprintln!("\nxtask: interrupted (signal {signal}): stopping");
            // Not a poll: a deadline for the main thread's own cleanup.
            std::thread::sleep(GRACE);
            eprintln!("xtask: still running after {GRACE:?}: removing the lab by force");
            xlb_tests::netns::remove_owned_by(std::process::id());
            let _ = std::io::stderr().flush();
            std::process::exit(128 + signal);
        })?;
    Ok(())
}
