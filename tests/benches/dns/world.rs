//! One agent's world: a [`Sandbox`], the bench's DNS server in it as the resolver of the
//! sandbox's resolv.conf, and `egress run` on a policy; and what the bench reads from it (the
//! learned entries, the maps' kernel memory, the agent's memory and CPU time).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use egress_common::{Learned, maps};
use egress_tests::{Agent, DnsServer, Family, Resolve, Resolved, Sandbox, resolv_conf_text, sa};
use egress_user::loader::{PinDir, learned::LearnedMaps};

use crate::common::procfs::{cpu_seconds, status_kib};

/// The `egress` CLI and the glibc workload, built by `cargo bench` in the release profile.
pub const EGRESS: &str = env!("CARGO_BIN_EXE_egress-cli");
const RESOLVE: &str = env!("CARGO_BIN_EXE_egress-resolve");

/// The resolver of every world's resolv.conf: the bench's DNS server, on the sandbox's veth.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// One learned entry: (scope id, port in host order, protocol, address, value).
pub type Entry = (u64, u16, u8, IpAddr, Learned);

/// A sandbox with its DNS server and its agent. Fields drop in order: the agent, then the
/// server's threads (inside the namespace), then the sandbox.
pub struct World {
    pub agent: Agent,
    pub dns: DnsServer,
    pub resolv: PathBuf,
    pub sb: Sandbox,
}

impl World {
    /// A fresh sandbox with `addrs` (CIDRs) on its veth besides the resolver's, the DNS
    /// server at [`RESOLVER`]:53 (its zone empty), the resolv.conf naming it (which the agent
    /// reads: its resolver, allowed by the implicit `(dns)` rule), and an agent on `policy`.
    pub fn start(name: &str, policy: &str, addrs: &[String]) -> Self {
        let sb = Sandbox::new();
        let mut all = vec![format!("{RESOLVER}/32")];
        all.extend(addrs.iter().cloned());
        sb.add_addrs(&all);
        let dns = sb.dns_server(sa(RESOLVER, 53));
        let resolv = sb.resolv_conf();
        // glibc's defaults would retry a lost datagram after 5 s; 2 s is enough on one host.
        fs::write(
            &resolv,
            resolv_conf_text(&[IpAddr::V4(RESOLVER)], "timeout:2 attempts:2"),
        )
        .unwrap_or_else(|e| panic!("{name}: writing {}: {e}", resolv.display()));
        let policy = sb.policy_file("policy.yaml", policy);
        let agent = sb
            .agent(EGRESS)
            .policy(&policy, &["--no-watch"])
            .log("info")
            .start();
        Self {
            agent,
            dns,
            resolv,
            sb,
        }
    }

    /// Runs `egress-resolve` in the managed cgroup with this world's resolv.conf, one A query
    /// per lookup (`--family 4`), each timed (`--latencies`); `run` adds its options and runs
    /// it. `lookups` bounds how long it may take: 30 s plus 20 ms a lookup (a hundred times
    /// what one takes here), after which the bench kills it (`cgroup.kill` of the managed
    /// cgroup, where only the workload runs), so that a resolver that stopped answering fails
    /// the bench at once instead of after 4 s (2 tries of 2 s) for each of 10,000 names.
    pub fn resolve(&self, lookups: usize, run: impl FnOnce(Resolve<'_>) -> Resolved) -> Resolved {
        let limit = Duration::from_secs(30)
            + Duration::from_millis(20) * u32::try_from(lookups).unwrap_or(u32::MAX);
        let kill = self.sb.cgroup.join("cgroup.kill");
        let (done, wait) = mpsc::channel::<()>();
        // Returns when `done` is dropped: after the run, or while a failed run unwinds.
        let watchdog = thread::spawn(move || {
            if wait.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                eprintln!(
                    "bench dns: egress-resolve ran past {limit:?} for {lookups} lookups (the resolver \
                     stopped answering? see any panic above); killing it"
                );
                let _ = fs::write(&kill, "1");
            }
        });
        let got = run(self
            .sb
            .resolve(RESOLVE, &self.resolv)
            .family(Family::V4)
            .latencies());
        drop(done);
        let _ = watchdog.join();
        got
    }

    /// Every entry of `LEARNED_V4` and `LEARNED_V6`.
    pub fn learned(&self) -> Vec<Entry> {
        LearnedMaps::open(&PinDir::new(&self.sb.pin_dir))
            .unwrap_or_else(|e| panic!("opening the learned maps: {e}"))
            .entries()
    }

    /// The kernel memory of a pinned map (`bytes_memlock` of `bpftool map show`): for a
    /// hash map without preallocation, what its entries take now.
    pub fn map_bytes(&self, map: &str) -> u64 {
        let pin = PinDir::new(&self.sb.pin_dir).map(map);
        let out = Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(&pin)
            .arg("-j")
            .output()
            .unwrap_or_else(|e| panic!("running bpftool (Debian package bpftool): {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "bpftool map show pinned {}: {text}{}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool's JSON ({e}): {text}"));
        json["bytes_memlock"]
            .as_u64()
            .unwrap_or_else(|| panic!("no bytes_memlock in {text}"))
    }

    /// What the learned state costs now.
    pub fn footprint(&self) -> Footprint {
        let pid = self.agent.pid();
        Footprint {
            entries_v4: self.learned().iter().filter(|e| e.3.is_ipv4()).count(),
            map_v4_bytes: self.map_bytes(maps::LEARNED_V4),
            map_v6_bytes: self.map_bytes(maps::LEARNED_V6),
            rss_kib: status_kib(pid, "VmRSS"),
            hwm_kib: status_kib(pid, "VmHWM"),
        }
    }

    /// The agent's CPU time so far (user plus system, all threads), in seconds.
    pub fn agent_cpu_s(&self) -> f64 {
        cpu_seconds(self.agent.pid())
    }

    /// The `allowed` counter of rule `name` (`egress status -o json`).
    pub fn allowed(&self, name: &str) -> u64 {
        let status = self.sb.status_json(EGRESS);
        egress_tests::status_row(&status, name)["allowed"]
            .as_u64()
            .unwrap_or_else(|| panic!("no allowed count for {name}: {status:#}"))
    }
}

/// The learned entries, the learned maps' kernel memory and the agent's memory at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// Entries of `LEARNED_V4`.
    pub entries_v4: usize,
    /// `bytes_memlock` of `LEARNED_V4` and `LEARNED_V6`.
    pub map_v4_bytes: u64,
    pub map_v6_bytes: u64,
    /// The agent's `VmRSS` and `VmHWM` (peak), KiB.
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The `i`-th address after `base` (`base + i`), in 198.18.0.0/15 as the caller picks `base`.
pub fn nth(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    let ip = u32::from(base) + u32::try_from(i).expect("a small index");
    let ip = Ipv4Addr::from(ip);
    assert!(
        matches!(ip.octets(), [198, 18 | 19, _, _]),
        "{ip} is outside 198.18.0.0/15"
    );
    ip
}
