//! The bench process and its threads: CPU placement, and signals (the lab
//! is removed on Ctrl-C; children get their signals back).

use super::{progs, topology};

/// Move the node namespaces' ingress NAPI threads (`napi/xb-g-*`, threaded
/// by the lab) to CPU 1, away from the generator on CPU 0, so every system
/// gets the same split of the two cores. Best effort.
pub(super) fn pin_node_napi_threads() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(&format!("napi/{}-", topology::NODE_GEN_IF)) {
            continue;
        }
        progs::pin_thread(pid, 1);
    }
}

/// Children inherit the signal mask (std's spawn keeps it), and this
/// process blocks SIGINT/SIGTERM for [`teardown_on_interrupt`]: clear the
/// mask in `command`'s child so the agent and nginx still stop on SIGTERM.
pub fn unblock_signals(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only calls
    // sigemptyset and sigprocmask, which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Ctrl-C / SIGTERM: remove this process's namespaces (which kills the
/// agent and nginx inside them) and exit, rather than leave the lab behind.
/// Signals are blocked in every thread and taken by one of its own, so this
/// must run before any other thread starts.
pub(super) fn teardown_on_interrupt() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal numbers are valid;
    // pthread_sigmask only reads it.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "could not block SIGINT/SIGTERM");
    std::thread::Builder::new()
        .name("teardown".to_owned())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` and `signal` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            eprintln!("\nxlb-bench: interrupted (signal {signal}): removing the lab");
            xlb_tests::netns::remove_owned_by(std::process::id());
            std::process::exit(128 + signal);
        })?;
    Ok(())
}
