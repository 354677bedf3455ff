//! Hotplug latency benchmark (issue 6), not a timed test: one `pvmm` with
//! `--api-socket` and `--serial file=PATH` runs the test kernel's hotplug
//! suite (`tk.tests=hotplug tk.hotplug=N`); the bench does N add/remove
//! cycles of a dma-test device through the API (one HTTP/1.1 exchange on
//! the Unix socket per request, `integration_tests::api_vm`) and measures:
//! - add: the add-device request leaves -> the guest's `# hotplug: found`
//!   line is in the serial file (polled);
//! - remove: the remove-device round trip, which is answered after the
//!   guest's eject;
//! - client: a `vmm.ping` round trip, the cost of one HTTP exchange, which
//!   both figures above include.
//!
//! Prints median, min and max of each. `PVMM_BENCH_RUNS` sets N (default
//! 15).
//!
//! Run: `cargo bench -p integration-tests --bench hotplug`.

use std::time::{Duration, Instant};

use integration_tests::api_vm::{request, ApiVm};
use integration_tests::artifacts;

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

fn main() {
    if !artifacts::require_kvm() {
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
    let mut vm = ApiVm::start(
        "hotplug-bench",
        &format!("console=ttyS0 tk.tests=hotplug tk.hotplug={runs} tk.hotplug_ms=600000"),
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    let timed = |method: &str, route: &str, body: Option<&str>| {
        let start = Instant::now();
        let (code, answer) = vm.request(method, route, body);
        assert!((200..300).contains(&code), "{route}: {code} {answer}");
        start.elapsed()
    };

    let (mut add, mut remove, mut client) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        client.push(timed("GET", "vmm.ping", None));

        let found = vm.count("# hotplug: found");
        let ejected = vm.count("# hotplug: ejected");
        let body = format!(r#"{{"kind":"dma-test","id":"bench{i}","iommu":"pviommu"}}"#);
        let start = Instant::now();
        // The request on its own thread, so that the guest's line is seen
        // as soon as it is printed.
        let adder = {
            let socket = vm.socket.clone();
            std::thread::spawn(move || request(&socket, "PUT", "vm.add-device", Some(&body)))
        };
        let seen = vm.wait_count("# hotplug: found", found, Duration::from_secs(30));
        add.push(seen - start);
        let (code, answer) = adder.join().expect("add-device thread");
        assert_eq!(code, 200, "add-device bench{i}: {answer}");
        // The guest's DMA checks are done before the device goes away.
        vm.wait_count("# hotplug: s2 dma ok", i, Duration::from_secs(30));

        let id = format!(r#"{{"id":"bench{i}"}}"#);
        remove.push(timed("PUT", "vm.remove-device", Some(&id)));
        // The VMM answers once the guest writes B0EJ; the guest prints its
        // line just after.
        vm.wait_count("# hotplug: ejected", ejected, Duration::from_secs(30));
    }
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
    let status = vm.wait_exit();
    assert!(status.success(), "pvmm ended with {status}");

    println!("hotplug latency, {runs} add/remove cycles of a dma-test device in one VM:");
    summary("add-device request -> guest prints \"found\"", &mut add);
    summary("remove-device round trip (incl. guest eject)", &mut remove);
    summary("client cost: one vmm.ping round trip", &mut client);
}
