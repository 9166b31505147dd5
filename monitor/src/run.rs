//! `monitor run`: the task as a child process, bound to its session before its first
//! instruction.
//!
//! The child is forked by hand rather than with `std::process::Command`: it must stop between
//! fork and exec until the agent has bound its pid, and `Command::spawn` waits for the exec.
//! Everything the child needs is allocated before the fork, and it only calls
//! async-signal-safe functions (read, execvp, write, _exit) after it.

use std::{ffi::CString, os::fd::AsRawFd as _};

use anyhow::Context as _;

use crate::sessions::{
    client,
    protocol::{BindRequest, Request},
};

/// What `monitor run` runs: the session file, an id over the file's, the agent's control
/// socket, and the task's command line.
pub struct Task {
    pub file: std::path::PathBuf,
    pub id: Option<String>,
    pub control: std::path::PathBuf,
    pub command: Vec<String>,
}

/// Exit code when monitor itself fails before the task runs (as env(1) and timeout(1) do).
const EXIT_INTERNAL: i32 = 125;
/// Exit code when the command cannot be executed.
const EXIT_CANNOT_EXEC: i32 = 127;

pub fn run(args: Task) -> anyhow::Result<i32> {
    // Validate everything before forking: a bad session file never starts the task.
    let request = client::start_request(&args.file, args.id.clone(), BindRequest::default())?;
    let argv: Vec<CString> = args
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("the command contains a NUL byte")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let cannot_exec = format!("monitor run: cannot execute {}\n", args.command[0]);

    let (go_read, go_write) = std::io::pipe().context("pipe")?;
    // SAFETY: the child only calls async-signal-safe functions on memory prepared above.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if child == 0 {
        drop(go_write);
        let mut byte = 0u8;
        // SAFETY: reading one byte into a valid buffer.
        let n = unsafe { libc::read(go_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
        if n != 1 {
            // The parent could not register the session: never run the task unattributed.
            unsafe { libc::_exit(EXIT_INTERNAL) };
        }
        drop(go_read);
        // SAFETY: argv_ptrs is a NULL-terminated array of valid C strings.
        unsafe {
            libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
            libc::write(2, cannot_exec.as_ptr().cast(), cannot_exec.len());
            libc::_exit(EXIT_CANNOT_EXEC);
        }
    }
    drop(go_read);

    let request = match request {
        Request::Start { origin, file, id, env_tokens, .. } => {
            Request::Start { origin, file, id, env_tokens, bind: BindRequest { pid: Some(child as u32), cgroup: None } }
        }
        other => other,
    };
    let started = client::call(&args.control, &request);
    let id = match started {
        Ok(data) => {
            client::print_warnings("monitor run", &data);
            data["id"].as_str().unwrap_or_default().to_string()
        }
        Err(e) => {
            drop(go_write); // the child sees EOF and exits without running the task
            wait(child);
            return Err(e.into());
        }
    };
    // Interrupts from the terminal reach the task (same process group); monitor run waits for
    // it and reports, as system(3) does.
    ignore_interrupts();
    use std::io::Write as _;
    let go = (&go_write).write_all(b"g");
    drop(go_write);
    if let Err(e) = go {
        eprintln!("monitor run: could not start the task: {e}");
    }
    let status = wait(child);
    // The agent usually has ended the session already (it saw the root exit); either way it is over.
    match client::call(&args.control, &Request::End { id: id.clone(), reason: crate::event::EndReason::RootExited }) {
        Ok(_) => {}
        Err(client::ClientError::Refused(m)) if m.contains("already ended") => {}
        Err(e) => eprintln!("monitor run: ending session {id}: {e}"),
    }
    Ok(status)
}

/// Waits for the child; its exit code, or 128 + signal as a shell reports it.
fn wait(child: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return EXIT_INTERNAL;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        EXIT_INTERNAL
    }
}

fn ignore_interrupts() {
    // SAFETY: setting the disposition of two signals to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}
