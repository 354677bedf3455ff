//! Hotplug latency benchmark (issue 6), not a timed test: one `pvmm` with
//! `--api-socket` and `--serial file=PATH` runs the test kernel's hotplug
//! suite (`tk.tests=hotplug tk.hotplug=N`); the bench does N add/remove
//! cycles of a dma-test device through the API with `pvmm-remote` (the api
//! crate's hyper client) and measures:
//! - add: the add-device request leaves -> the guest's `# hotplug: found`
//!   line is in the serial file (polled);
//! - remove: the remove-device round trip, which is answered after the
//!   guest's eject;
//! - client: a `vmm.ping` round trip, the cost of starting `pvmm-remote`
//!   and one HTTP exchange, which both figures above include.
//!
//! Prints median, min and max of each. `PVMM_BENCH_RUNS` sets N (default
//! 15); `PVMM_REMOTE` names a `pvmm-remote` binary, else it is built next
//! to `pvmm` (same target directory and profile).
//!
//! Run: `cargo bench -p integration-tests --bench hotplug`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{artifacts, run};

/// `pvmm-remote`: `PVMM_REMOTE`, else built beside `pvmm`.
fn pvmm_remote(pvmm: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("PVMM_REMOTE") {
        return PathBuf::from(p);
    }
    let profile_dir = pvmm.parent().expect("pvmm lives in <target>/<profile>/");
    let target_dir = profile_dir.parent().expect("a target directory");
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(artifacts::workspace_root())
        .args(["build", "-p", "api", "--bin", "pvmm-remote", "--target-dir"])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            c.arg("--release");
        }
        Some(other) => {
            c.args(["--profile", other]);
        }
        None => panic!("no profile directory in {}", pvmm.display()),
    }
    let out = run::run(c, Duration::from_secs(600)).expect("cargo runs");
    assert!(out.success(), "building pvmm-remote:\n{}", out.describe());
    profile_dir.join("pvmm-remote")
}

/// Median, min and max in milliseconds.
fn summary(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = if samples.len() % 2 == 1 {
        ms(samples[samples.len() / 2])
    } else {
        (ms(samples[samples.len() / 2 - 1]) + ms(samples[samples.len() / 2])) / 2.0
    };
    println!(
        "{name:<48} median {median:7.2} ms  min {:7.2} ms  max {:7.2} ms  (n={})",
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

struct Bench {
    remote: PathBuf,
    socket: PathBuf,
    serial: PathBuf,
}

impl Bench {
    fn remote(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.remote);
        c.arg("--api-socket").arg(&self.socket).args(args);
        c
    }

    /// Runs `pvmm-remote ARGS`, which must succeed; returns its wall time.
    /// A blocking wait, not `run::run`, whose exit poll is 5 ms coarse.
    fn call(&self, args: &[&str]) -> Duration {
        let start = Instant::now();
        let out = self.remote(args).output().expect("pvmm-remote runs");
        let elapsed = start.elapsed();
        assert!(
            out.status.success(),
            "pvmm-remote {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        elapsed
    }

    fn count(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .matches(text)
            .count()
    }

    /// Polls the serial file until `text` occurs more than `seen` times;
    /// returns when it saw it.
    fn wait_count(&self, text: &str, seen: usize, timeout: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if self.count(text) > seen {
                return Instant::now();
            }
            assert!(
                start.elapsed() < timeout,
                "no new {text:?} on the serial port:\n{}",
                std::fs::read_to_string(&self.serial).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn main() {
    if !artifacts::kvm_usable() {
        println!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    let runs: usize = match std::env::var("PVMM_BENCH_RUNS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("PVMM_BENCH_RUNS={v:?}: expected a positive count")),
        Err(_) => 15,
    };
    let pvmm = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir();
    let id = std::process::id();
    let bench = Bench {
        remote: pvmm_remote(&pvmm),
        socket: dir.join(format!("pvmm-hotplug-bench-{id}.sock")),
        serial: dir.join(format!("pvmm-hotplug-bench-{id}.log")),
    };
    let _ = std::fs::remove_file(&bench.socket);
    let _ = std::fs::remove_file(&bench.serial);
    let mut vm = Command::new(&pvmm)
        .arg("--api-socket")
        .arg(&bench.socket)
        .arg("--serial")
        .arg(format!("file={}", bench.serial.display()))
        .args([
            "--cmdline",
            &format!("console=ttyS0 tk.tests=hotplug tk.hotplug={runs} tk.hotplug_ms=600000"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("pvmm starts");
    bench.wait_count("# hotplug: ready", 0, Duration::from_secs(60));

    let (mut add, mut remove, mut client) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        client.push(bench.call(&["ping"]));

        let found = bench.count("# hotplug: found");
        let dma = bench.count("# hotplug: dma ok");
        let spec = format!("kind=dma-test,id=bench{i},iommu=pviommu");
        let start = Instant::now();
        let mut adder = bench
            .remote(&["add-device", &spec])
            .stdout(Stdio::null())
            .spawn()
            .expect("pvmm-remote starts");
        let seen = bench.wait_count("# hotplug: found", found, Duration::from_secs(30));
        add.push(seen - start);
        assert!(
            adder.wait().expect("pvmm-remote ends").success(),
            "add-device {spec} failed"
        );
        // The guest's DMA check is done before the device goes away.
        bench.wait_count("# hotplug: dma ok", dma, Duration::from_secs(30));

        let ejected = bench.count("# hotplug: ejected");
        remove.push(bench.call(&["remove-device", &format!("bench{i}")]));
        // The VMM answers once the guest writes B0EJ; the guest prints its
        // line just after.
        bench.wait_count("# hotplug: ejected", ejected, Duration::from_secs(30));
    }
    bench.wait_count("ok 1 - hotplug", 0, Duration::from_secs(30));
    let status = vm.wait().expect("pvmm ends");
    assert!(status.success(), "pvmm ended with {status}");
    let _ = std::fs::remove_file(&bench.socket);
    let _ = std::fs::remove_file(&bench.serial);

    println!("hotplug latency, {runs} add/remove cycles of a dma-test device in one VM:");
    summary("add-device request -> guest prints \"found\"", &mut add);
    summary("remove-device round trip (incl. guest eject)", &mut remove);
    summary("client cost: pvmm-remote ping round trip", &mut client);
}
