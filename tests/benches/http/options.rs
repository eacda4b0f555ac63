//! The http bench's command line: its options, their defaults, and the contenders.

use std::path::PathBuf;

use crate::common;

pub const USAGE: &str = "usage: cargo bench -p egress-tests --bench http -- [--rounds N] [--seconds N] \
     [--warmup N] [--connections N] [--rate N] [--rate-connections N] [--rate-seconds N] \
     [--contenders direct,egress,egress-pod,envoy] [--upstream-cpu load|proxy|any] \
     [--rate-upstream-cpu load|proxy|any] [--nice N] [--agent-log FILTER] \
     [--envoy PATH] [--oha PATH] [--no-rate] [--out DIR]";

/// Where nginx runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UpstreamCpu {
    /// With the load generator, so a proxy has its CPU to itself.
    Load,
    /// With the proxies.
    Proxy,
    /// Wherever the scheduler likes.
    Any,
}

/// The contenders.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Direct,
    Egress,
    /// The egress agent's proxy serving a containerd pod, from inside the pod's network
    /// namespace (feature `pods`).
    EgressPod,
    Envoy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Egress => "egress proxy",
            Self::EgressPod => "egress proxy, from a pod",
            Self::Envoy => "Envoy",
        }
    }
}

/// Command-line options.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub warmup: u64,
    pub connections: u32,
    pub rate: u32,
    pub rate_connections: u32,
    pub rate_seconds: u64,
    pub contenders: Vec<Kind>,
    pub upstream_cpu: UpstreamCpu,
    /// Where nginx runs during the fixed-rate runs.
    pub rate_upstream_cpu: UpstreamCpu,
    pub nice: i32,
    pub agent_log: Option<String>,
    pub envoy: Option<PathBuf>,
    pub oha: Option<PathBuf>,
    pub no_rate: bool,
    /// Where to write `http.md` and `http.json` (besides printing the report).
    pub out: Option<PathBuf>,
    /// The arguments as given, less `--bench` and the tool paths `cargo xtask` adds: what
    /// goes after `cargo xtask bench http --` to repeat the run.
    pub shown_args: Vec<String>,
}

pub fn parse(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 5,
        seconds: 5,
        warmup: 1,
        connections: 50,
        rate: 1000,
        rate_connections: 16,
        rate_seconds: 5,
        contenders: if cfg!(feature = "pods") {
            vec![Kind::Direct, Kind::Egress, Kind::EgressPod, Kind::Envoy]
        } else {
            vec![Kind::Direct, Kind::Egress, Kind::Envoy]
        },
        upstream_cpu: UpstreamCpu::Load,
        rate_upstream_cpu: UpstreamCpu::Proxy,
        nice: -10,
        agent_log: None,
        envoy: None,
        oha: None,
        no_rate: false,
        out: None,
        shown_args: Vec::new(),
    };
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) || arg == "--bench" {
            continue;
        }
        skip_value = arg == "--envoy" || arg == "--oha" || arg == "--out";
        if !skip_value {
            options.shown_args.push(arg.clone());
        }
    }
    let mut args = common::Flags::new(args, USAGE);
    while let Some(arg) = args.next() {
        let flag = arg.as_str();
        match flag {
            // cargo bench passes --bench to a harness = false target.
            "--bench" => {}
            "--rounds" => options.rounds = args.number::<u64>(flag) as usize,
            "--seconds" => options.seconds = args.number::<u64>(flag),
            "--warmup" => options.warmup = args.number::<u64>(flag),
            "--connections" => options.connections = args.number::<u64>(flag) as u32,
            "--rate" => options.rate = args.number::<u64>(flag) as u32,
            "--rate-connections" => {
                options.rate_connections = args.number::<u64>(flag) as u32;
            }
            "--rate-seconds" => options.rate_seconds = args.number::<u64>(flag),
            "--contenders" => {
                options.contenders = args
                    .value(flag)
                    .split(',')
                    .map(|c| match c {
                        "direct" => Kind::Direct,
                        "egress" => Kind::Egress,
                        "egress-pod" => Kind::EgressPod,
                        "envoy" => Kind::Envoy,
                        other => panic!("--contenders: unknown {other:?}; {USAGE}"),
                    })
                    .collect();
            }
            "--upstream-cpu" | "--rate-upstream-cpu" => {
                let place = match args.value(flag).as_str() {
                    "load" => UpstreamCpu::Load,
                    "proxy" => UpstreamCpu::Proxy,
                    "any" => UpstreamCpu::Any,
                    other => panic!("{flag} load|proxy|any, not {other:?}"),
                };
                if flag == "--upstream-cpu" {
                    options.upstream_cpu = place;
                } else {
                    options.rate_upstream_cpu = place;
                }
            }
            "--nice" => options.nice = args.number(flag),
            "--agent-log" => options.agent_log = Some(args.value(flag)),
            "--envoy" => options.envoy = Some(args.value(flag).into()),
            "--oha" => options.oha = Some(args.value(flag).into()),
            "--no-rate" => options.no_rate = true,
            "--out" => options.out = Some(args.value(flag).into()),
            other => panic!("unknown argument {other:?}; {USAGE}"),
        }
    }
    assert!(
        options.rounds >= 1 && options.seconds >= 1 && options.rate_seconds >= 1,
        "{USAGE}"
    );
    assert!(
        !options.contenders.is_empty()
            && (options.no_rate || options.contenders[0] == Kind::Direct),
        "--contenders must start with direct unless --no-rate (metric 6 subtracts direct's latency)"
    );
    assert!(
        cfg!(feature = "pods") || !options.contenders.contains(&Kind::EgressPod),
        "the egress-pod contender needs the bench built with `--features pods` (`cargo xtask \
         bench http` does)"
    );
    if options.contenders.contains(&Kind::Envoy) && options.envoy.is_none() {
        panic!(
            "--envoy PATH is needed for the Envoy contender (`cargo xtask bench http` installs it)"
        );
    }
    if !options.no_rate && options.oha.is_none() {
        panic!(
            "--oha PATH is needed for metric 6 (`cargo xtask bench http` installs it), or --no-rate"
        );
    }
    options
}
