//! Running a VM (or any command) with a timeout, capturing its output.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished (or killed) command left.
#[derive(Debug)]
pub struct Output {
    /// None when it was killed on the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// Whether it exited by itself with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// A readable account for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\nelapsed: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            match self.status {
                Some(s) => s.to_string(),
                None => "killed on timeout".into(),
            },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn wait_or_kill(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A child with stdin closed whose stdout and stderr are being read.
struct Captured {
    child: Child,
    start: Instant,
    out: Option<thread::JoinHandle<String>>,
    err: Option<thread::JoinHandle<String>>,
}

impl Captured {
    fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().map(reader);
        let err = child.stderr.take().map(reader);
        Ok(Self {
            child,
            start,
            out,
            err,
        })
    }

    /// The output, once the child ended with `status` (`None`: killed).
    fn finish(self, status: Option<ExitStatus>) -> Output {
        let elapsed = self.start.elapsed();
        let join = |h: Option<thread::JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        Output {
            status,
            stdout: join(self.out),
            stderr: join(self.err),
            elapsed,
        }
    }
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr; kills it after
/// `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let mut c = Captured::spawn(&mut cmd)?;
    let status = wait_or_kill(&mut c.child, timeout)?;
    Ok(c.finish(status))
}

/// Sends `signal` to `child`, which must not have been waited for yet
/// (then its pid still names it).
#[allow(unsafe_code)]
pub fn signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: kill(2) has no memory effects; the caller has not reaped
    // `child`, so `pid` still names it.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// [`run`], also measuring the command's peak resident set size: returns
/// its output and `ru_maxrss` in KiB, which `wait4` reports for the whole
/// process (all its threads) over its whole life. Reading VmHWM from
/// /proc instead would race with the exit.
#[allow(unsafe_code)]
pub fn run_peak_rss(mut cmd: Command, timeout: Duration) -> io::Result<(Output, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let mut c = Captured::spawn(&mut cmd)?;
    let pid = libc::pid_t::try_from(c.child.id()).map_err(io::Error::other)?;
    let mut killed = false;
    let (raw, usage) = loop {
        let mut raw = 0;
        // SAFETY: `rusage` is plain integers, for which zero is valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child, which nothing else waits for (std's
        // `Child` is never waited on here); both pointers are to locals.
        let r = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (raw, usage);
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if !killed && c.start.elapsed() >= timeout {
            // Not reaped yet (wait4 said so), so the pid is still ours.
            c.child.kill()?;
            killed = true;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let output = c.finish((!killed).then(|| ExitStatus::from_raw(raw)));
    Ok((output, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Serializes VMs within one test binary: the machines have 2 cores, guest
/// ring 0 is emulated, and the kernel's AP start-up waits are wall-clock.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = run(c, Duration::from_secs(10)).expect("sh runs");
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        assert_eq!(o.status.and_then(|s| s.code()), Some(3));
        assert!(!o.success());
    }

    #[test]
    fn peak_rss_sees_what_the_command_touched() {
        // dd reads 64 MiB of zeros into one buffer: its peak RSS is at
        // least that.
        let mut c = Command::new("dd");
        c.args([
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
            "status=none",
        ]);
        let (o, kib) = run_peak_rss(c, Duration::from_secs(60)).expect("dd runs");
        assert!(o.success(), "{}", o.describe());
        assert!(kib >= 64 << 10, "{kib} KiB");
    }

    #[test]
    fn kills_on_timeout() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo started; exec sleep 30"]);
        let o = run(c, Duration::from_millis(300)).expect("sh runs");
        assert!(o.status.is_none());
        assert!(o.elapsed < Duration::from_secs(10));
        assert_eq!(o.stdout, "started\n");
        assert!(o.describe().contains("killed on timeout"));
    }
}
