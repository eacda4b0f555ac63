//! `cargo xtask bench xdp`: what the XDP backstop costs a packet (issue 19, item 3): its
//! program's run time per TCP SYN at 10,000 rules and at 1,000,000 keys, judged allowed and
//! denied, against a packet it passes without a lookup.
//!
//! # Method
//! - For each size, a fresh [`Sandbox`] (network namespace with no route out, cgroup, pin
//!   directory) with a pod network behind a veth ([`PodNet`]); the policy (`N` CIDR+port
//!   rules in 198.18.0.0/15, /29 to /32, and the target `192.0.2.1/32` port 8080 last; for
//!   1,000,000 keys, 100,000 /32 rules of 10 ports each) put in force with `pipeline::apply`
//!   and the backstop on the veth's host end, as `egress run --xdp-iface` does.
//! - The kernel runs the attached program on a packet the bench builds, `--repeat` times in a
//!   row (`BPF_PROG_TEST_RUN`), and returns the mean time per run: the program alone, no
//!   driver or stack. Three packets, all Ethernet + IPv4 + TCP from the pod's address: a SYN
//!   to `192.0.2.1:8080` (allowed by the target rule: the bypass trie, then the rule trie,
//!   counted), a SYN to `192.0.2.1:9090` (no rule: both tries miss; counted, reported as an
//!   event, dropped), and an ACK (a segment that opens nothing: passed before any lookup; the
//!   floor, which includes the test run's own per-run cost). The policy has no FQDN rules, so
//!   no learned-address lookup follows a miss.
//! - `--rounds` rounds, each one run of every packet at every size, the order rotating;
//!   reported: median and min-max over rounds of the ns per run.
//! - Then packets and bytes per second through a veth ([`pps`]): each size's sandbox has
//!   three more pod networks, two whose veths carry an XDP program that passes every packet
//!   (what the veth's XDP mode costs whatever the program: in the driver, the kernel's
//!   default, and generic, on the skb, the mode the agent attaches the backstop in) and one
//!   without XDP. Each pod floods a UDP sink of its own in the node's namespace (`192.0.2.1`,
//!   ports 9996-9999, which the target rule allows over UDP) for `--pps-window`, then writes
//!   to a TCP sink of its own (ports 9986-9989) over one connection for as long; `--pps-rounds`
//!   rounds, the order of the pods rotating; reported: the datagrams the sink received and
//!   the sender sent per second, the TCP stream's Gbit/s received, median and min-max over
//!   rounds, and the ratios to the pod without XDP in the same round.
//!
//! # Checks
//! The bench stops with an error when a run's verdict is not the expected one (`XDP_PASS`
//! for the allowed SYN and the ACK, `XDP_DROP` for the denied SYN), or when the target rule's
//! `allowed` counter and the `(no rule)` row's `denied` counter did not move by exactly the
//! SYNs run; in the flood, when a sink received nothing, a stream's sink did not receive every
//! byte written, or the target rule's `allowed` counter did not move by one SYN per stream
//! plus at least what the backstop's UDP sink received and at most what its pod sent (the
//! other pods move no counter).
//!
//! # Options (after `cargo bench -p egress-tests --bench xdp --`)
//! `--rounds N` (20), `--repeat N` (1,000,000 runs per measurement), `--keys N,N` (10000,1000000),
//! `--pps-rounds N` (10; 0: no flood), `--pps-window MS` (500), `--out DIR` (also write `xdp.md`
//! and `xdp.json` there).

#[path = "../common/mod.rs"]
mod common;
mod pps;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    loaded_programs,
};
use common::{spread, summary, thousands};
use egress_common::ROW_NO_RULE;
use egress_tests::{PodNet, Sandbox, in_netns};
use egress_user::{
    loader::{Enforcer, PassAllXdp, PinDir},
    pipeline,
    policy::{Mode, Origin, Policy, PortRule, Protocol, Rule, default_bypass},
};
use ipnet::{IpNet, Ipv4Net};

const USAGE: &str = "usage: cargo bench -p egress-tests --bench xdp -- [--rounds N] [--repeat N] \
                     [--keys N,N] [--pps-rounds N] [--pps-window MS] [--out DIR]";

/// The allowed destination and its port; another port no rule allows.
const TARGET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
/// The UDP sinks of the flood, which the target rule allows: one per pod of [`FLOODED`].
const SINK_PORTS: [u16; FLOODED.len()] = [9996, 9997, 9998, 9999];
/// The flood's pods, in the order of [`SINK_PORTS`]: the name of each, its key in the JSON,
/// and the XDP program on its veth (`None` for the backstop on the first, `Some(None)` for
/// no program on the last).
const FLOODED: [(&str, &str, Option<Option<XdpMode>>); 4] = [
    ("behind the backstop (generic mode)", "backstop", None),
    (
        "behind an XDP program that passes all, driver mode",
        "pass_all_driver",
        Some(Some(XdpMode::Driver)),
    ),
    (
        "behind an XDP program that passes all, generic (skb) mode",
        "pass_all_generic",
        Some(Some(XdpMode::Skb)),
    ),
    ("without XDP", "without", Some(None)),
];
/// The TCP sinks of the stream, which the target rule allows: one per pod of [`FLOODED`].
const STREAM_PORTS: [u16; FLOODED.len()] = [9986, 9987, 9988, 9989];
/// The pod without XDP, whose rate the others' are divided by.
const WITHOUT: usize = FLOODED.len() - 1;
const TARGET_RULE: &str = "target";
/// The packets' source: an address of the pod's network.
const SOURCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Ports the generated rules spread over.
const PORTS: [u16; 10] = [80, 443, 8080, 5432, 6379, 9200, 3306, 8443, 25, 53];

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Options {
    rounds: usize,
    repeat: u32,
    keys: Vec<usize>,
    pps_rounds: usize,
    pps_window: Duration,
    out: Option<std::path::PathBuf>,
}

fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 20,
        repeat: 1_000_000,
        keys: vec![10_000, 1_000_000],
        pps_rounds: 10,
        pps_window: Duration::from_millis(500),
        out: None,
    };
    let mut args = common::Flags::new(args, USAGE);
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            "--bench" => {}
            "--rounds" => options.rounds = args.number(flag),
            "--repeat" => options.repeat = args.number(flag),
            "--keys" => {
                options.keys = args
                    .value(flag)
                    .split(',')
                    .map(|n| {
                        n.parse()
                            .unwrap_or_else(|_| panic!("--keys: {n:?} is not a number; {USAGE}"))
                    })
                    .collect();
            }
            "--pps-rounds" => options.pps_rounds = args.number(flag),
            "--pps-window" => options.pps_window = Duration::from_millis(args.number(flag)),
            "--out" => options.out = Some(args.dir(flag)),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(
        options.rounds >= 1 && options.repeat >= 1 && !options.pps_window.is_zero(),
        "{USAGE}"
    );
    for &keys in &options.keys {
        assert!(
            (3..=16_384).contains(&keys) || (keys <= 1_000_000 && keys.is_multiple_of(10)),
            "--keys: up to 16,384, or a multiple of 10 up to 1,000,000 (rules of 10 ports)"
        );
    }
    options
}

fn main() -> std::process::ExitCode {
    common::bench_main("xdp", |args| run(&parse(args)))
}

/// A rule named `name` allowing `destination` on `ports` (TCP).
fn rule(line: usize, name: String, destination: IpNet, ports: &[u16]) -> Rule {
    Rule {
        scope: None,
        name,
        origin: Origin {
            file: "<bench>".into(),
            line,
        },
        destination,
        ports: ports.iter().map(|&port| PortRule::tcp(port)).collect(),
    }
}

/// The target rule: TCP to the target port and to the stream's sinks, UDP to the flood's.
fn target_rule(line: usize) -> Rule {
    let mut target = rule(
        line,
        TARGET_RULE.into(),
        Ipv4Net::new(TARGET, 32).expect("/32").into(),
        &std::iter::once(PORT)
            .chain(STREAM_PORTS)
            .collect::<Vec<_>>(),
    );
    target.ports.extend(
        SINK_PORTS
            .iter()
            .map(|&port| PortRule::new(port, Protocol::Udp)),
    );
    target
}

/// A policy of `keys` (network, port) keys, the target's three last. Up to 16,384: a rule of
/// one port per /29 slot of 198.18.0.0/15 (prefix 29 to 32); above, /32 rules of 10 ports.
fn policy(keys: usize) -> Policy {
    let target = 1 + SINK_PORTS.len() + STREAM_PORTS.len();
    let mut rules: Vec<Rule> = if keys <= 16_384 {
        (0..keys - target)
            .map(|i| {
                let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i as u32) * 8;
                let net = Ipv4Net::new(Ipv4Addr::from(base), 29 + (i % 4) as u8).expect("<= 32");
                rule(
                    i + 1,
                    format!("r{i}"),
                    net.into(),
                    &[PORTS[i % PORTS.len()]],
                )
            })
            .collect()
    } else {
        (0..keys / PORTS.len() - 1)
            .map(|i| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
                let net = Ipv4Net::new(ip, 32).expect("/32");
                rule(i + 1, format!("r{i}"), net.into(), &PORTS)
            })
            .collect()
    };
    rules.push(target_rule(keys));
    Policy {
        mode: Mode::Enforce,
        bypass: default_bypass(),
        rules: rules.into_iter().map(std::sync::Arc::new).collect(),
        ..Policy::default()
    }
}

/// One size: its sandbox, the pod network whose veth carries the backstop, one whose veth
/// carries an XDP program that passes everything and one whose veth carries none, the
/// generation in force and its XDP program.
struct World {
    keys: usize,
    enforcer: Enforcer,
    program: aya::programs::ProgramFd,
    // Dropped in this order: the pod networks before their sandbox.
    pod: PodNet,
    /// The flood's other pods ([`FLOODED`]), with the program on each one's veth.
    others: Vec<(Option<PassAllXdp>, PodNet)>,
    sb: Sandbox,
}

impl World {
    fn start(keys: usize) -> Self {
        let sb = Sandbox::new();
        let pod = PodNet::new(&sb);
        let others = FLOODED[1..]
            .iter()
            .map(|(_, _, program)| {
                let net = PodNet::new(&sb);
                let program = program
                    .flatten()
                    .map(|mode| pps::pass_all(&sb.name, net.host_iface(), mode));
                (program, net)
            })
            .collect();
        let mut target = sb.target();
        target.xdp_ifaces = vec![pod.host_iface().to_owned()];
        let policy = policy(keys);
        let started = Instant::now();
        let enforcer = in_netns(&sb.name, move || pipeline::apply(&target, &policy))
            .unwrap_or_else(|e| panic!("{keys} keys: loading the policy: {e}"));
        eprintln!(
            "bench xdp: {} keys in force in {:.1} s",
            thousands(keys),
            started.elapsed().as_secs_f64()
        );
        let pin = PinDir::new(&sb.pin_dir)
            .links_dir()
            .join(format!("xdp-{}", pod.host_iface()));
        let link: FdLink = PinnedLink::from_pin(&pin)
            .unwrap_or_else(|e| panic!("opening {}: {e}", pin.display()))
            .into();
        let id = link
            .info()
            .unwrap_or_else(|e| panic!("link info of {}: {e}", pin.display()))
            .program_id();
        let program = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .unwrap_or_else(|| panic!("the XDP program {id} is not loaded"))
            .fd()
            .unwrap_or_else(|e| panic!("opening the XDP program {id}: {e}"));
        Self {
            keys,
            enforcer,
            program,
            pod,
            others,
            sb,
        }
    }

    /// The target rule's `allowed` and the `(no rule)` row's `denied`.
    fn counts(&self) -> (u64, u64) {
        let rows = self
            .enforcer
            .counters()
            .unwrap_or_else(|e| panic!("reading the counters: {e}"));
        let allowed = rows
            .iter()
            .find(|r| r.name == TARGET_RULE)
            .map_or(0, |r| r.counters.allowed);
        let denied = rows
            .iter()
            .find(|r| r.row == ROW_NO_RULE)
            .map_or(0, |r| r.counters.denied);
        (allowed, denied)
    }

    /// Runs the program `repeat` times on `packet` in the sandbox's namespace; returns the
    /// verdict and the mean ns per run.
    fn run(&self, packet: &[u8], repeat: u32) -> (u32, u32) {
        let fd = self.program.as_fd().as_raw_fd();
        let packet = packet.to_vec();
        in_netns(&self.sb.name, move || test_run(fd, &packet, repeat))
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of the XDP program: {e}"))
    }
}

/// `BPF_PROG_TEST_RUN`'s part of `union bpf_attr` (linux/bpf.h), padded as the kernel's.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs program `fd` on `packet` `repeat` times; returns its last verdict and the kernel's
/// mean time per run in ns.
fn test_run(fd: i32, packet: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd).expect("an fd"),
        data_size_in: u32::try_from(packet.len()).expect("a small packet"),
        data_size_out: u32::try_from(out.len()).expect("a small buffer"),
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: the attribute and both buffers outlive the call, and their sizes are given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}

/// An Ethernet + IPv4 + TCP segment from [`SOURCE`] to `dst:port` with TCP `flags`.
fn packet(dst: Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // destination MAC
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // source MAC
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = p.len();
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&SOURCE.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p[ip_start..ip_start + 20]);
    p[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes()); // sequence
    p.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The packets run by `BPF_PROG_TEST_RUN`: name, bytes, the verdict each must get.
type Packets = [(&'static str, Vec<u8>, u32); 3];

/// The packets, their names and the verdict each must get.
fn packets() -> Packets {
    [
        (
            "SYN, allowed (rule key)",
            packet(TARGET, PORT, TCP_SYN),
            XDP_PASS,
        ),
        (
            "SYN, denied (no rule)",
            packet(TARGET, DENIED_PORT, TCP_SYN),
            XDP_DROP,
        ),
        (
            "ACK (opens nothing: no lookup)",
            packet(TARGET, PORT, TCP_ACK),
            XDP_PASS,
        ),
    ]
}

fn run(options: &Options) {
    let started = Instant::now();
    let worlds: Vec<World> = options.keys.iter().map(|&k| World::start(k)).collect();
    let packets = packets();
    let before: Vec<(u64, u64)> = worlds.iter().map(World::counts).collect();
    // ns per run: [world][packet][round].
    let mut ns = vec![vec![Vec::new(); packets.len()]; worlds.len()];
    eprintln!(
        "bench xdp: {} rounds of {} runs per packet and size...",
        options.rounds,
        thousands(options.repeat as usize)
    );
    for round in 0..options.rounds {
        let cells = worlds.len() * packets.len();
        for k in (0..cells).map(|k| (k + round) % cells) {
            let (w, p) = (k / packets.len(), k % packets.len());
            let (name, packet, want) = &packets[p];
            let (verdict, duration) = worlds[w].run(packet, options.repeat);
            assert_eq!(
                verdict, *want,
                "{} keys, {name}: XDP verdict {verdict}, expected {want}",
                worlds[w].keys
            );
            ns[w][p].push(f64::from(duration));
        }
    }
    // Every SYN was judged and counted: the allowed ones on the target rule, the denied
    // ones on the (no rule) row.
    let syns = options.rounds as u64 * u64::from(options.repeat);
    for (world, (allowed0, denied0)) in worlds.iter().zip(&before) {
        let (allowed, denied) = world.counts();
        assert_eq!(
            (allowed - allowed0, denied - denied0),
            (syns, syns),
            "{} keys: the counters moved by (allowed, denied) = ({}, {}), not {syns} each",
            world.keys,
            allowed - allowed0,
            denied - denied0
        );
    }
    let flooded = (options.pps_rounds > 0).then(|| flood(options, &worlds));
    report(
        options,
        &worlds,
        (&packets, &ns),
        flooded.as_ref(),
        started.elapsed().as_secs_f64(),
    );
}

/// Per size, each of the [`FLOODED`] pods' datagrams per second, one per round: received by
/// its sink, and sent; and per round, received by each to received by the pod [`WITHOUT`] XDP.
struct Flooded {
    received: Vec<Vec<Vec<f64>>>,
    sent: Vec<Vec<Vec<f64>>>,
    ratio: Vec<Vec<Vec<f64>>>,
    /// The same for the TCP stream: bytes per second received, and the ratios.
    stream: Vec<Vec<Vec<f64>>>,
    stream_ratio: Vec<Vec<Vec<f64>>>,
}

/// The flood through each size's two pods' veths ([`pps`]).
fn flood(options: &Options, worlds: &[World]) -> Flooded {
    eprintln!(
        "bench xdp: {} rounds of a {} ms UDP flood through each pod's veth...",
        options.pps_rounds,
        options.pps_window.as_millis()
    );
    let seconds = options.pps_window.as_secs_f64();
    let mut flooded = Flooded {
        received: Vec::new(),
        sent: Vec::new(),
        ratio: Vec::new(),
        stream: Vec::new(),
        stream_ratio: Vec::new(),
    };
    for world in worlds {
        let sinks = SINK_PORTS.map(|port| pps::udp_sink(&world.sb.name, sink(port)));
        let stream_sinks = STREAM_PORTS.map(|port| pps::tcp_sink(&world.sb.name, sink(port)));
        let pods: Vec<&PodNet> = std::iter::once(&world.pod)
            .chain(world.others.iter().map(|(_, net)| net))
            .collect();
        let mut received = vec![Vec::new(); pods.len()];
        let mut sent = vec![Vec::new(); pods.len()];
        let mut ratio = vec![Vec::new(); pods.len()];
        let mut stream = vec![Vec::new(); pods.len()];
        let mut stream_ratio = vec![Vec::new(); pods.len()];
        // What the backstop's pod got through and sent, in all: its judged datagrams lie
        // between the two.
        let (mut through, mut offered) = (0, 0);
        let (allowed0, _) = world.counts();
        for round in 0..options.pps_rounds {
            let mut per_second = vec![0.0; pods.len()];
            let mut bytes_per_second = vec![0.0; pods.len()];
            for i in (0..pods.len()).map(|k| (k + round) % pods.len()) {
                let before = sinks[i].received();
                let n = pps::flood(pods[i].pod_netns(), sink(SINK_PORTS[i]), options.pps_window);
                let got = drained(|| sinks[i].received()) - before;
                assert!(
                    got > 0,
                    "{} keys: the sink on port {} received none of {n} datagrams",
                    world.keys,
                    SINK_PORTS[i]
                );
                if i == 0 {
                    (through, offered) = (through + got, offered + n);
                }
                per_second[i] = got as f64 / seconds;
                received[i].push(per_second[i]);
                sent[i].push(n as f64 / seconds);

                let before = stream_sinks[i].received();
                let written = pps::stream(
                    pods[i].pod_netns(),
                    sink(STREAM_PORTS[i]),
                    options.pps_window,
                );
                let got = drained(|| stream_sinks[i].received()) - before;
                assert_eq!(
                    got, written,
                    "{} keys: the TCP sink on port {} received {got} of the {written} bytes written",
                    world.keys, STREAM_PORTS[i]
                );
                bytes_per_second[i] = got as f64 / seconds;
                stream[i].push(bytes_per_second[i]);
            }
            for (ratio, rate) in stream_ratio.iter_mut().zip(&bytes_per_second) {
                ratio.push(rate / bytes_per_second[WITHOUT]);
            }
            for (ratio, rate) in ratio.iter_mut().zip(&per_second) {
                ratio.push(rate / per_second[WITHOUT]);
            }
        }
        // Besides the datagrams, the SYN of each round's stream.
        let judged = world.counts().0 - allowed0 - options.pps_rounds as u64;
        assert!(
            (through..=offered).contains(&judged),
            "{} keys: the backstop counted {judged} datagrams allowed (besides {} SYNs); its pod \
             sent {offered} and its sink received {through}",
            world.keys,
            options.pps_rounds
        );
        flooded.received.push(received);
        flooded.sent.push(sent);
        flooded.ratio.push(ratio);
        flooded.stream.push(stream);
        flooded.stream_ratio.push(stream_ratio);
    }
    flooded
}

/// The flood's sink on `port`, in the node's namespace.
fn sink(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(TARGET, port)
}

/// What a sink has `received` once it stopped receiving (it drains what the sender queued).
fn drained(received: impl Fn() -> u64) -> u64 {
    let mut last = received();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let now = received();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

fn report(
    options: &Options,
    worlds: &[World],
    (packets, ns): (&Packets, &[Vec<Vec<f64>>]),
    flooded: Option<&Flooded>,
    seconds: f64,
) {
    let mut out = String::from("\n## The XDP backstop: ns per packet (`BPF_PROG_TEST_RUN`)\n\n");
    out.push_str(&common::machine_line());
    out.push_str(&format!(
        "- command: `cargo xtask bench xdp` ({} rounds of {} runs per packet and size, in {seconds:.0} s)\n\
         - the program attached to a pod veth's host end by `pipeline::apply` (as `--xdp-iface`), run by the \
         kernel on an Ethernet + IPv4 + TCP packet from the pod; mean ns per run of each measurement, \
         median (min-max) over rounds\n\n",
        options.rounds,
        thousands(options.repeat as usize),
    ));
    out.push_str("| packet |");
    for w in worlds {
        out.push_str(&format!(" {} keys |", thousands(w.keys)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(worlds.len()));
    out.push('\n');
    let mut json_rows = Vec::new();
    for (p, (name, _, _)) in packets.iter().enumerate() {
        out.push_str(&format!("| {name} |"));
        let mut by_keys = serde_json::Map::new();
        for (w, world) in worlds.iter().enumerate() {
            let s = summary(ns[w][p].iter().copied());
            out.push_str(&format!(" {:.0} ({:.0}-{:.0}) |", s.0, s.1, s.2));
            by_keys.insert(world.keys.to_string(), spread(s));
        }
        out.push('\n');
        json_rows.push(serde_json::json!({ "packet": name, "ns_per_run": by_keys }));
    }
    // The slower of the two SYNs at each size (the denied one also reports an event).
    let syn = |w: usize| {
        summary(ns[w][0].iter().copied())
            .0
            .max(summary(ns[w][1].iter().copied()).0)
    };
    let target = match worlds.iter().position(|w| w.keys == 10_000) {
        Some(w) => format!(
            "{:.0} ns, {}",
            syn(w),
            if syn(w) <= 100.0 { "met" } else { "missed" }
        ),
        None => "not measured in this run (--keys without 10000)".to_owned(),
    };
    let worst = (0..worlds.len()).map(syn).fold(0.0, f64::max);
    out.push_str(&format!(
        "\nTarget: <= 100 ns per SYN at 10,000 rules: {target}. The slowest SYN median at any size: {worst:.0} ns.\n"
    ));
    let flood_json = flooded.map(|f| flood_report(&mut out, options, worlds, f));
    let json = serde_json::json!({
        "bench": "xdp",
        "machine": common::machine_json(),
        "rounds": options.rounds,
        "repeat": options.repeat,
        "packets": json_rows,
        "flood": flood_json,
        "seconds": seconds,
    });
    common::publish(options.out.as_deref(), "xdp", &out, &json);
}

/// The flood's section of the report; its JSON.
fn flood_report(
    out: &mut String,
    options: &Options,
    worlds: &[World],
    f: &Flooded,
) -> serde_json::Value {
    out.push_str(&format!(
        "\n### Packets per second through a pod's veth, with the backstop and without\n\n\
         - a UDP flood (64-byte frames, {} datagrams per `sendmmsg`) from a pod to a sink of its own \
         in the node's namespace, for {} ms, {} rounds, the four pods rotating: one behind the \
         backstop, two behind an XDP program that only returns `XDP_PASS` (what a veth's XDP mode \
         costs, whatever the program: in the driver, the kernel's default on a veth, and generic, \
         on the skb, as the agent attaches the backstop), one without XDP; they share the node and the policy; the backstop \
         judges every datagram (a TCP segment only when it opens a connection)\n\
         - datagrams per second received by the sink (sent by the pod), median (min-max) over \
         rounds; a ratio divides two pods' received rates of the same round\n\n",
        pps::BATCH,
        options.pps_window.as_millis(),
        options.pps_rounds,
    ));
    out.push_str("| pod's veth |");
    for w in worlds {
        out.push_str(&format!(" {} keys |", thousands(w.keys)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(worlds.len()));
    out.push('\n');
    let kpps = |v: &[f64]| {
        let s = summary(v.iter().copied());
        format!("{:.0}k ({:.0}k-{:.0}k)", s.0 / 1e3, s.1 / 1e3, s.2 / 1e3)
    };
    for (i, (name, _, _)) in FLOODED.iter().enumerate() {
        out.push_str(&format!("| {name}: received/s (sent/s) |"));
        for w in 0..worlds.len() {
            let sent = summary(f.sent[w][i].iter().copied()).0;
            out.push_str(&format!(
                " {} ({:.0}k) |",
                kpps(&f.received[w][i]),
                sent / 1e3
            ));
        }
        out.push('\n');
    }
    let ratios = |out: &mut String, what: &str, ratio: &[Vec<Vec<f64>>]| {
        for (r, (name, _, _)) in FLOODED[..WITHOUT].iter().enumerate() {
            out.push_str(&format!("| {what}, {name} / without XDP, same round |"));
            for by_pod in ratio {
                let s = summary(by_pod[r].iter().copied());
                out.push_str(&format!(" {:.3}x ({:.3}-{:.3}) |", s.0, s.1, s.2));
            }
            out.push('\n');
        }
    };
    ratios(out, "received", &f.ratio);
    for (i, (name, _, _)) in FLOODED.iter().enumerate() {
        out.push_str(&format!("| TCP stream {name}: Gbit/s received |"));
        for w in 0..worlds.len() {
            let s = summary(f.stream[w][i].iter().map(|b| b * 8.0 / 1e9));
            out.push_str(&format!(" {:.2} ({:.2}-{:.2}) |", s.0, s.1, s.2));
        }
        out.push('\n');
    }
    ratios(out, "TCP stream", &f.stream_ratio);
    let mut by_keys = serde_json::Map::new();
    for (w, world) in worlds.iter().enumerate() {
        let pods: serde_json::Map<String, serde_json::Value> = FLOODED
            .iter()
            .enumerate()
            .map(|(i, (_, key, _))| {
                let side = serde_json::json!({
                    "received_per_s": spread(summary(f.received[w][i].iter().copied())),
                    "sent_per_s": spread(summary(f.sent[w][i].iter().copied())),
                    "ratio_to_without": spread(summary(f.ratio[w][i].iter().copied())),
                    "stream_bytes_per_s": spread(summary(f.stream[w][i].iter().copied())),
                    "stream_ratio_to_without": spread(summary(f.stream_ratio[w][i].iter().copied())),
                });
                ((*key).to_owned(), side)
            })
            .collect();
        by_keys.insert(world.keys.to_string(), pods.into());
    }
    serde_json::json!({
        "window_ms": options.pps_window.as_millis() as u64,
        "rounds": options.pps_rounds,
        "batch": pps::BATCH,
        "by_keys": by_keys,
    })
}
