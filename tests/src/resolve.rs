//! Running `egress-resolve` (glibc's `getaddrinfo()` against a resolv.conf the test gives,
//! then optionally a connection to the first address) from a test, and reading its JSON
//! lines. The binary's own doc comment (src/bin/egress_resolve.rs) says what it does.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{Sandbox, workload_command};

/// The address family `egress-resolve` asks glibc for (`--family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `AF_UNSPEC`: glibc sends an A and an AAAA query.
    Any,
    /// `AF_INET`: an A query only.
    V4,
    /// `AF_INET6`: an AAAA query only.
    V6,
}

/// One lookup `egress-resolve` reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The name looked up.
    pub name: String,
    /// The addresses in glibc's order, or the error's name (`EAI_NONAME`, `EAI_NODATA`,
    /// `EAI_AGAIN`, ...).
    pub addrs: Result<Vec<IpAddr>, String>,
    /// With `--connect`: `Ok` or the errno's name (`EPERM` for the filter's denial). `None`
    /// without `--connect` or when the lookup failed.
    pub connect: Option<Result<(), String>>,
    /// With [`Resolve::latencies`]: how long the `getaddrinfo()` call took, in microseconds.
    pub latency_us: Option<u64>,
}

/// Percentiles of the lookups' `getaddrinfo()` times, in microseconds (nearest rank), from
/// [`Resolve::latencies`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// The slowest lookup.
    pub max: u64,
}

/// The summary line of an `egress-resolve` run: every round counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rounds run (`--count`).
    pub rounds: u64,
    /// Lookups made (rounds times names).
    pub lookups: u64,
    /// Failed lookups by error name.
    pub lookup_errors: BTreeMap<String, u64>,
    /// Connections (or UDP sends) that succeeded.
    pub connects_ok: u64,
    /// Failed connections by errno name.
    pub connect_errors: BTreeMap<String, u64>,
    /// How often each address came first in a successful lookup.
    pub first_addrs: BTreeMap<IpAddr, u64>,
    /// With [`Resolve::latencies`]: the lookups' times over all rounds.
    pub latency_us: Option<Latencies>,
}

/// Everything an `egress-resolve` run printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Its lookups in order (none with [`Resolve::quiet`]).
    pub lookups: Vec<Lookup>,
    /// Its summary.
    pub summary: Summary,
}

/// An `egress-resolve` run about to start, from [`Sandbox::resolve`]; options as builder
/// methods, then [`Resolve::run`].
pub struct Resolve<'a> {
    sandbox: &'a Sandbox,
    bin: String,
    resolv_conf: PathBuf,
    cgroup: Option<PathBuf>,
    args: Vec<String>,
}

impl Sandbox {
    /// `egress-resolve` (`bin` is [`resolve_bin!()`](crate::resolve_bin)) in this sandbox's
    /// namespace and managed cgroup, resolving through the nameservers of `resolv_conf`
    /// (e.g. [`Sandbox::resolv_conf`], the agent's own, with
    /// [`resolv_conf_text`](crate::dns_server::resolv_conf_text) written into it).
    pub fn resolve(&self, bin: &str, resolv_conf: &Path) -> Resolve<'_> {
        Resolve {
            sandbox: self,
            bin: bin.to_owned(),
            resolv_conf: resolv_conf.to_owned(),
            cgroup: Some(self.cgroup.clone()),
            args: Vec::new(),
        }
    }
}

impl Resolve<'_> {
    /// Runs in `cgroup` instead of the managed one, or in the caller's (`None`: outside the
    /// filter).
    pub fn cgroup(mut self, cgroup: Option<&Path>) -> Self {
        self.cgroup = cgroup.map(Path::to_owned);
        self
    }

    /// Asks for `family` only (default [`Family::Any`]).
    pub fn family(mut self, family: Family) -> Self {
        let value = match family {
            Family::Any => "any",
            Family::V4 => "4",
            Family::V6 => "6",
        };
        self.args.extend(["--family".into(), value.into()]);
        self
    }

    /// After each lookup, connects over TCP to the first address at `port`.
    pub fn connect(mut self, port: u16) -> Self {
        self.args.extend(["--connect".into(), port.to_string()]);
        self
    }

    /// With [`Resolve::connect`]: a connected UDP socket and one datagram instead of TCP.
    pub fn udp(mut self) -> Self {
        self.args.push("--udp".into());
        self
    }

    /// The TCP connect timeout (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.args
            .extend(["--timeout-ms".into(), timeout.as_millis().to_string()]);
        self
    }

    /// With [`Resolve::connect`] over TCP: writes `before\n`, keeps the connection `hold`,
    /// then writes `after\n`; ok only if both writes went through.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.args
            .extend(["--hold-ms".into(), hold.as_millis().to_string()]);
        self
    }

    /// Runs `rounds` rounds over the names (default 1), `pause` apart.
    pub fn rounds(mut self, rounds: u64, pause: Duration) -> Self {
        self.args.extend([
            "--count".into(),
            rounds.to_string(),
            "--pause-ms".into(),
            pause.as_millis().to_string(),
        ]);
        self
    }

    /// Prints the summary only (for many rounds).
    pub fn quiet(mut self) -> Self {
        self.args.push("--quiet".into());
        self
    }

    /// Times each `getaddrinfo()` call: [`Lookup::latency_us`] and [`Summary::latency_us`].
    pub fn latencies(mut self) -> Self {
        self.args.push("--latencies".into());
        self
    }

    /// Runs it on `names` to its end and parses what it printed; fails the test with its
    /// output if it fails or prints something else.
    pub fn run(self, names: &[&str]) -> Resolved {
        let nsswitch = self.sandbox.dir("egress-resolve").join("nsswitch.conf");
        if !nsswitch.exists() {
            fs::write(&nsswitch, "hosts: files dns\n")
                .unwrap_or_else(|e| panic!("writing {}: {e}", nsswitch.display()));
        }
        let mut cmd: Command =
            workload_command(&self.bin, self.cgroup.as_deref(), &self.sandbox.name);
        cmd.arg("--resolv-conf")
            .arg(&self.resolv_conf)
            .arg("--nsswitch")
            .arg(&nsswitch)
            .args(&self.args)
            .arg("--")
            .args(names);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running egress-resolve: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "egress-resolve {names:?} failed ({}): {stdout}{stderr}",
            out.status
        );
        parse(&stdout)
            .unwrap_or_else(|| panic!("egress-resolve printed {stdout:?}; stderr: {stderr}"))
    }
}

/// `egress-resolve`'s output: lookup lines, then the summary line.
fn parse(stdout: &str) -> Option<Resolved> {
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .ok()?;
    let summary = lines.pop()?;
    let counts = |v: &Value| -> Option<BTreeMap<String, u64>> {
        v.as_object()?
            .iter()
            .map(|(k, n)| Some((k.clone(), n.as_u64()?)))
            .collect()
    };
    let summary = Summary {
        rounds: summary["rounds"].as_u64()?,
        lookups: summary["lookups"].as_u64()?,
        lookup_errors: counts(&summary["lookup_errors"])?,
        connects_ok: summary["connects_ok"].as_u64()?,
        connect_errors: counts(&summary["connect_errors"])?,
        first_addrs: counts(&summary["first_addrs"])?
            .into_iter()
            .map(|(k, n)| Some((k.parse().ok()?, n)))
            .collect::<Option<_>>()?,
        latency_us: match summary.get("latency_us") {
            None => None,
            Some(l) => Some(Latencies {
                p50: l["p50"].as_u64()?,
                p99: l["p99"].as_u64()?,
                max: l["max"].as_u64()?,
            }),
        },
    };
    let lookups = lines.iter().map(lookup).collect::<Option<_>>()?;
    Some(Resolved { lookups, summary })
}

/// One lookup line.
fn lookup(line: &Value) -> Option<Lookup> {
    let name = line["name"].as_str()?.to_owned();
    let addrs = match line.get("addrs") {
        Some(addrs) => Ok(addrs
            .as_array()?
            .iter()
            .map(|a| a.as_str()?.parse().ok())
            .collect::<Option<_>>()?),
        None => Err(line["error"].as_str()?.to_owned()),
    };
    let connect = match line.get("connect") {
        None => None,
        Some(Value::String(ok)) if ok == "ok" => Some(Ok(())),
        Some(Value::String(errno)) => Some(Err(errno.clone())),
        Some(_) => return None,
    };
    let latency_us = match line.get("latency_us") {
        None => None,
        Some(us) => Some(us.as_u64()?),
    };
    Some(Lookup {
        name,
        addrs,
        connect,
        latency_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_parses() {
        let out = concat!(
            r#"{"name":"a.test","addrs":["192.0.2.10","2001:db8::a"],"connect":"EPERM"}"#,
            "\n",
            r#"{"name":"b.test","error":"EAI_NONAME","message":"Name or service not known"}"#,
            "\n",
            r#"{"rounds":1,"lookups":2,"lookup_errors":{"EAI_NONAME":1},"connects_ok":0,"#,
            r#""connect_errors":{"EPERM":1},"first_addrs":{"192.0.2.10":1}}"#,
            "\n"
        );
        let got = parse(out).expect("parses");
        assert_eq!(
            got.lookups,
            [
                Lookup {
                    name: "a.test".into(),
                    addrs: Ok(vec![
                        "192.0.2.10".parse().expect("ip"),
                        "2001:db8::a".parse().expect("ip")
                    ]),
                    connect: Some(Err("EPERM".into())),
                    latency_us: None,
                },
                Lookup {
                    name: "b.test".into(),
                    addrs: Err("EAI_NONAME".into()),
                    connect: None,
                    latency_us: None,
                },
            ]
        );
        assert_eq!(got.summary.lookups, 2);
        assert_eq!(got.summary.connect_errors["EPERM"], 1);
        assert_eq!(
            got.summary.first_addrs[&"192.0.2.10".parse::<IpAddr>().expect("ip")],
            1
        );
        assert_eq!(got.summary.latency_us, None);
        assert!(parse("not json\n").is_none());
    }

    #[test]
    fn latencies_parse() {
        let out = concat!(
            r#"{"name":"a.test","addrs":["192.0.2.10"],"latency_us":312}"#,
            "\n",
            r#"{"name":"b.test","error":"EAI_NONAME","message":"Name or service not known","latency_us":90}"#,
            "\n",
            r#"{"rounds":1,"lookups":2,"lookup_errors":{"EAI_NONAME":1},"connects_ok":0,"#,
            r#""connect_errors":{},"first_addrs":{"192.0.2.10":1},"#,
            r#""latency_us":{"p50":90,"p99":312,"max":312}}"#,
            "\n"
        );
        let got = parse(out).expect("parses");
        assert_eq!(
            got.lookups.iter().map(|l| l.latency_us).collect::<Vec<_>>(),
            [Some(312), Some(90)]
        );
        assert_eq!(
            got.summary.latency_us,
            Some(Latencies {
                p50: 90,
                p99: 312,
                max: 312
            })
        );
    }
}
