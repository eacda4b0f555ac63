//! The load generators: `wrk` (closed loop, as fast as it goes: metrics 4 and 5) and `oha`
//! (open loop at a fixed rate: metric 6), each started inside the sandbox's namespace, pinned
//! to the load CPU, and for the egress contender inside the managed cgroup; their output parsed
//! into numbers, or a panic saying what went wrong.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::servers::{Pin, pinned_in};

/// Where and how a load generator runs.
pub struct Target<'a> {
    /// The contender's name, for messages.
    pub name: &'a str,
    /// `http://address:port/`.
    pub url: &'a str,
    /// The Host header.
    pub host: &'a str,
    /// Its network namespace (for `nsenter --net`): the sandbox's, or the pod's.
    pub net: &'a Path,
    /// The cgroup it joins before it connects: the managed cgroup (egress), the pod's
    /// container's (egress from a pod).
    pub cgroup: Option<&'a Path>,
    pub pin: Pin,
    /// Where the generator's output goes.
    pub dir: &'a Path,
    /// What a failure may mean, appended to its message ("" for nothing).
    pub hint: &'a str,
}

impl Target<'_> {
    /// A command that runs `program args` in the target's cgroup (joined first, while `/sys`
    /// is still the host's), namespace and CPU.
    fn command(&self, program: &Path, args: &[String]) -> Command {
        let inner = pinned_in(self.net, self.pin);
        let mut cmd = match self.cgroup {
            Some(cgroup) => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                    .arg(cgroup.join("cgroup.procs"))
                    .arg(inner.get_program())
                    .args(inner.get_args());
                cmd
            }
            None => inner,
        };
        cmd.arg(program).args(args);
        cmd
    }

    /// Runs `program args` to completion (killed after `limit`) and returns its stdout;
    /// panics with its output if it fails.
    fn run(&self, program: &Path, args: &[String], limit: Duration) -> String {
        let out_path = self.dir.join("load.out");
        let err_path = self.dir.join("load.err");
        let file =
            |p: &PathBuf| fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut cmd = self.command(program, args);
        let shown = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(file(&out_path))
            .stderr(file(&err_path))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: starting {shown}: {e}", self.name));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{}: {shown} ran over {limit:?}: killed", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            status.success(),
            "{}: {shown} failed ({status}):\n{stdout}{stderr}\n{}",
            self.name,
            self.hint
        );
        stdout
    }
}

/// `program arg ...`, quoted enough to paste into a shell.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| {
            let w = w.to_string_lossy();
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
            {
                w.into_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One wrk run.
#[derive(Clone, Copy, Debug)]
pub struct WrkRun {
    /// Requests completed.
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// How wrk is run.
#[derive(Clone, Copy)]
pub struct Wrk {
    pub connections: u32,
    pub seconds: u64,
}

impl Wrk {
    fn args(self, target: &Target<'_>, seconds: u64) -> Vec<String> {
        vec![
            "-t1".into(),
            format!("-c{}", self.connections),
            format!("-d{seconds}s"),
            "--latency".into(),
            "-H".into(),
            format!("Host: {}", target.host),
            target.url.into(),
        ]
    }

    /// The command line of a run, for the report.
    pub fn shown(self, target: &Target<'_>) -> String {
        describe(&target.command(Path::new("wrk"), &self.args(target, self.seconds)))
    }

    /// Runs wrk for `seconds` and parses its report; panics on any error or non-2xx answer.
    pub fn run(self, target: &Target<'_>, seconds: u64) -> WrkRun {
        let args = self.args(target, seconds);
        let out = target.run(Path::new("wrk"), &args, Duration::from_secs(seconds + 30));
        parse_wrk(&out).unwrap_or_else(|e| {
            panic!(
                "{}: wrk {}: {e}; its output:\n{out}\n{}",
                target.name, target.url, target.hint
            )
        })
    }
}

/// Parses wrk 4's report. Socket errors and "Non-2xx or 3xx responses" (wrk's name for
/// status >= 400) are errors: the numbers of a contender that fails requests mean nothing.
fn parse_wrk(out: &str) -> Result<WrkRun, String> {
    let mut requests = None;
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in out.lines().map(str::trim) {
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            return Err(format!("socket errors ({})", errors.trim()));
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            return Err(format!("{} responses with status >= 400", n.trim()));
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = duration_ms(v.trim());
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = duration_ms(v.trim());
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.parse().ok();
        }
    }
    let run = WrkRun {
        requests: requests.ok_or("no request count")?,
        rps: rps.ok_or("no Requests/sec")?,
        p50_ms: p50.ok_or("no 50% latency")?,
        p99_ms: p99.ok_or("no 99% latency")?,
    };
    if run.requests == 0 {
        return Err("no request completed".into());
    }
    Ok(run)
}

/// wrk's `231.00us`, `1.20ms`, `2.00s`, `1.00m` as milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(number * scale)
}

/// One fixed-rate run.
#[derive(Clone, Copy, Debug)]
pub struct RateRun {
    /// Requests answered 2xx.
    pub requests: u64,
    /// The rate achieved.
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// How oha is run: `rate` requests a second over `connections` for `seconds`.
#[derive(Clone)]
pub struct Oha {
    pub bin: PathBuf,
    pub rate: u32,
    pub connections: u32,
    pub seconds: u64,
}

impl Oha {
    fn args(&self, target: &Target<'_>) -> Vec<String> {
        vec![
            "--no-tui".into(),
            "--output-format".into(),
            "json".into(),
            "-z".into(),
            format!("{}s", self.seconds),
            "-c".into(),
            self.connections.to_string(),
            "-q".into(),
            self.rate.to_string(),
            // Time each request from when it was due, not from when a connection was free: a
            // stall then shows in the percentiles instead of quietly lowering the rate.
            "--latency-correction".into(),
            // Finish the requests under way at the deadline instead of counting them as errors.
            "-w".into(),
            "--host".into(),
            target.host.into(),
            target.url.into(),
        ]
    }

    /// The command line of a run, for the report.
    pub fn shown(&self, target: &Target<'_>) -> String {
        describe(&target.command(&self.bin, &self.args(target)))
    }

    /// Runs oha and parses its JSON summary; panics on any error or non-2xx answer.
    pub fn run(&self, target: &Target<'_>) -> RateRun {
        let out = target.run(
            &self.bin,
            &self.args(target),
            Duration::from_secs(self.seconds + 30),
        );
        parse_oha(&out).unwrap_or_else(|e| {
            panic!(
                "{}: oha {}: {e}; its output:\n{out}\n{}",
                target.name, target.url, target.hint
            )
        })
    }
}

/// Parses oha's JSON summary (times in seconds). Any error or non-2xx status is an error.
fn parse_oha(out: &str) -> Result<RateRun, String> {
    let json: Value = serde_json::from_str(out).map_err(|e| format!("not JSON ({e})"))?;
    let object = |key: &str| json[key].as_object().cloned().unwrap_or_default();
    let errors: Vec<String> = object("errorDistribution")
        .iter()
        .map(|(error, n)| format!("{n} x {error}"))
        .collect();
    if !errors.is_empty() {
        return Err(format!("errors: {}", errors.join("; ")));
    }
    let mut ok = 0;
    for (status, n) in object("statusCodeDistribution") {
        let n = n
            .as_u64()
            .ok_or_else(|| format!("status {status}: count {n}"))?;
        if !status.starts_with('2') {
            return Err(format!("{n} responses with status {status}"));
        }
        ok += n;
    }
    if ok == 0 {
        return Err("no 2xx response".into());
    }
    let ms = |key: &str| {
        json["latencyPercentiles"][key]
            .as_f64()
            .map(|s| s * 1e3)
            .ok_or_else(|| format!("no latencyPercentiles.{key}"))
    };
    Ok(RateRun {
        requests: ok,
        rps: json["summary"]["requestsPerSec"]
            .as_f64()
            .ok_or("no summary.requestsPerSec")?,
        p50_ms: ms("p50")?,
        p90_ms: ms("p90")?,
        p99_ms: ms("p99")?,
    })
}
