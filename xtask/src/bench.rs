//! `cargo xtask bench [NAME]`: set-up, then the benchmarks, as root, with their output streamed.
//!
//! Each benchmark is a `harness = false` bench target of the `egress-tests` package, run with
//! `cargo bench` (the release profile); this module only prepares the machine and starts it.
//! What a benchmark measures and how is documented in its own file (`tests/benches/*.rs`).
//!
//! Without a name it runs all of them, one after the other, each with its results written to
//! `target/bench-results/` (`--out`), then `egress-bench-report` turns those into
//! `docs/benchmarks.md` and its plots.
//!
//! The tools come first: Debian packages with apt-get, and the ones Debian lacks (Envoy, oha)
//! under `target/bench-tools/` ([`tools`]).

mod tools;

use std::ffi::OsString;

use anyhow::{Context as _, Result, ensure};
use clap::{Args, ValueEnum};

use crate::{
    env::{self, ChildEnv},
    kube_api, setup,
};

/// Debian packages the netfilter contenders need, with a command each provides. Their rules
/// are only ever loaded inside the benchmark's own network namespaces: the host's firewall is
/// never touched.
const NETFILTER_PACKAGES: &[(&str, &str)] =
    &[("iptables", "iptables-nft-restore"), ("nftables", "nft")];
/// Debian packages the HTTP benchmark needs: the upstream and the load generator. Its nginx
/// runs with its own prefix and config; the system's nginx service is never started.
const HTTP_PACKAGES: &[(&str, &str)] = &[("nginx", "nginx"), ("wrk", "wrk")];
/// The font docs/benchmarks.md's plots are drawn with.
// Off Debian the font file itself is looked for (an absolute path replaces the directory).
const PLOT_PACKAGES: &[(&str, &str)] = &[(
    "fonts-dejavu-core",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)];
/// Where `cargo xtask bench` (all) leaves each benchmark's report and numbers.
const RESULTS_DIR: &str = "target/bench-results";

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct Options {
    #[command(flatten)]
    setup: setup::Options,

    /// The benchmark to run; without one, all of them in one run, then docs/benchmarks.md
    /// and its plots are written from their results.
    #[arg(value_enum)]
    bench: Option<Bench>,

    /// Arguments for the benchmark (after `--`), e.g. `--rounds 9 --no-netfilter`; the
    /// benchmark's main.rs documents them. Not with all benchmarks.
    #[arg(last = true, value_name = "BENCH_ARGS")]
    args: Vec<OsString>,
}

/// The benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// connect() cost with 10,000 CIDR+port rules against no filter, iptables-nft and an nft
    /// set; rule scaling from 1,000 to 1,000,000 keys for each; and the program's run time
    /// per invocation (tests/benches/connect/).
    Connect,
    /// The HTTP egress proxy against no proxy and Envoy: req/s and p99 for plain HTTP and TLS
    /// origination, latency added at 1000 req/s, RSS and CPU (tests/benches/http/).
    Http,
    /// Reload to enforced: `egress reload` round trip and file change to new verdict at 10,
    /// 1,000 and 10,000 rules; start-up and reload time at 100,000 rules and 1M keys
    /// (tests/benches/reload/).
    Reload,
    /// Instructions per request on the HTTP proxy's path, counted by callgrind: stable
    /// between runs, for comparing commits (tests/benches/instructions/).
    Instructions,
    /// EgressRules from a real Kubernetes API (etcd and the CRD server, as the kube-api test
    /// step builds them): apply to enforced in a containerd pod, p50/p99, and the agent's
    /// memory with 10,000 objects, then with 1,000 pods too (tests/benches/kube/).
    Kube,
    /// FQDN rules: DNS answer latency through the agent against direct, connects to learned
    /// addresses against CIDR-allowed ones, and 10,000 names with rotating answers
    /// (tests/benches/dns/).
    Dns,
    /// The XDP backstop's run time per packet (`BPF_PROG_TEST_RUN`): a SYN allowed and one
    /// denied, at 10,000 rules and 1,000,000 keys; and a pod's UDP datagrams and TCP bytes
    /// per second through its veth with the backstop, without XDP, and with a program that
    /// only passes in each XDP mode (tests/benches/xdp/).
    Xdp,
    /// A pod under a real containerd: from its sandbox ready to its scope enforced and its
    /// proxy listeners open, and the agent's memory per pod (tests/benches/pods/).
    Pods,
}

impl Bench {
    /// The bench target in the egress-tests package.
    fn target(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Http => "http",
            Self::Reload => "reload",
            Self::Instructions => "instructions",
            Self::Kube => "kube",
            Self::Dns => "dns",
            Self::Xdp => "xdp",
            Self::Pods => "pods",
        }
    }

    /// Debian packages this benchmark needs beyond what `setup` installs.
    fn packages(self, args: &[OsString]) -> Vec<(&'static str, &'static str)> {
        match self {
            Self::Connect if args.iter().any(|arg| arg == "--no-netfilter") => Vec::new(),
            Self::Connect => NETFILTER_PACKAGES.to_vec(),
            // The pod contender runs its clients in a containerd pod.
            Self::Http => [HTTP_PACKAGES, setup::POD_PACKAGES].concat(),
            // Only the agent, its CLI and a workload of the egress-tests package.
            Self::Reload => Vec::new(),
            Self::Instructions => vec![("valgrind", "valgrind")],
            // Its pod runs under containerd.
            Self::Kube => setup::POD_PACKAGES.to_vec(),
            // bpftool reads the learned maps' memory.
            Self::Dns => vec![("bpftool", "bpftool")],
            Self::Xdp => Vec::new(),
            Self::Pods => setup::POD_PACKAGES.to_vec(),
        }
    }

    /// Cargo features of the egress-tests package this benchmark needs.
    fn features(self) -> &'static [&'static str] {
        match self {
            // The pod contender (a containerd pod through the CRI client).
            Self::Http => &["--features", "pods"],
            Self::Kube => &["--features", "kube-api"],
            Self::Pods => &["--features", "pods"],
            Self::Connect | Self::Reload | Self::Instructions | Self::Dns | Self::Xdp => &[],
        }
    }

    /// Installs the tools this benchmark needs that Debian lacks; returns the arguments that
    /// tell the benchmark where they are.
    fn tools(self, child: &ChildEnv, args: &[OsString]) -> Result<Vec<OsString>> {
        let mut paths = Vec::new();
        if self == Self::Kube {
            // etcd and the CRD server, built once and cached (as for the kube-api test step).
            let parts = kube_api::prepare(child)?;
            paths.extend(["--etcd".into(), parts.etcd.into_os_string()]);
            paths.extend(["--apiserver".into(), parts.server.into_os_string()]);
            return Ok(paths);
        }
        if self != Self::Http {
            return Ok(paths);
        }
        // `--contenders direct,egress` leaves Envoy out; `--no-rate` leaves oha out.
        let contenders = args.iter().skip_while(|arg| *arg != "--contenders").nth(1);
        if contenders.is_none_or(|list| list.to_string_lossy().contains("envoy")) {
            let envoy = tools::envoy(child, || {
                setup::debian_packages(child, &[("python3-venv", "python3")])
            })?;
            paths.extend(["--envoy".into(), envoy.into_os_string()]);
        }
        if !args.iter().any(|arg| arg == "--no-rate") {
            paths.extend(["--oha".into(), tools::oha(child)?.into_os_string()]);
        }
        Ok(paths)
    }
}

/// Runs set-up, installs the benchmark's own packages, then `cargo bench` of the benchmark;
/// without a benchmark named, all of them and the report.
pub fn run(options: &Options) -> Result<()> {
    env::require_root("the benchmarks")?;
    let child = setup::run(&options.setup)?;
    let Some(bench) = options.bench else {
        ensure!(
            options.args.is_empty(),
            "arguments after `--` go to one benchmark: name it (`cargo xtask bench connect -- ...`)"
        );
        return run_all(&child);
    };
    setup::debian_packages(&child, &bench.packages(&options.args))?;
    let tool_args = bench.tools(&child, &options.args)?;
    run_bench(&child, bench, &tool_args, &options.args)
}

/// `cargo bench` of one benchmark with `args`.
fn run_bench(
    child: &ChildEnv,
    bench: Bench,
    tool_args: &[OsString],
    args: &[OsString],
) -> Result<()> {
    let mut command = child.command("cargo");
    command
        .args(["bench", "--package", "egress-tests"])
        .args(bench.features())
        .arg("--bench")
        .arg(bench.target())
        .arg("--")
        .args(tool_args)
        .args(args);
    eprintln!("bench: {}", env::describe(&command));
    env::run_streaming(&mut command)
        .with_context(|| format!("benchmark `{}` failed", bench.target()))
}

/// Every benchmark with its default settings, each writing its results to [`RESULTS_DIR`];
/// then docs/benchmarks.md. A benchmark that fails does not stop the others: the page says it
/// did not run, and the command fails at the end.
fn run_all(child: &ChildEnv) -> Result<()> {
    let all = Bench::value_variants();
    let mut packages: Vec<(&str, &str)> = PLOT_PACKAGES.to_vec();
    for bench in all {
        packages.extend(bench.packages(&[]));
    }
    setup::debian_packages(child, &packages)?;
    let results = env::workspace_root().join(RESULTS_DIR);
    if results.exists() {
        std::fs::remove_dir_all(&results)
            .with_context(|| format!("clearing {}", results.display()))?;
    }
    // Build the report tool first: a compile error should not come after 15 minutes of runs.
    const REPORT_TOOL: [&str; 6] = [
        "--package",
        "egress-tests",
        "--features",
        "plots",
        "--bin",
        "egress-bench-report",
    ];
    let report_tool = || {
        let mut command = child.command("cargo");
        command.args(["run", "--quiet"]).args(REPORT_TOOL).arg("--");
        command
    };
    env::run_streaming(child.command("cargo").arg("build").args(REPORT_TOOL))?;
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    for &bench in all {
        let tool_args = bench.tools(child, &[])?;
        let out = [OsString::from("--out"), results.clone().into_os_string()];
        if let Err(e) = run_bench(child, bench, &tool_args, &out) {
            eprintln!("bench: {e:#}");
            failed.push(bench.target());
        }
    }
    eprintln!("bench: all benchmarks took {:.0?}", started.elapsed());
    env::run_streaming(
        report_tool()
            .arg(&results)
            .arg(env::workspace_root().join("docs"))
            .arg("cargo xtask bench"),
    )?;
    ensure!(
        failed.is_empty(),
        "benchmarks that failed: {}",
        failed.join(", ")
    );
    Ok(())
}
