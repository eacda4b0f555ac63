//! The world of the HTTP tests: upstreams at addresses the test assigned in its sandbox
//! (`httpbin.test` plain HTTP on 192.0.2.1:80, `secure.test` TLS on 192.0.2.1:443, and a TLS
//! server with a certificate from an untrusted CA, `rogue.test` on 198.51.100.1:443), a policy
//! for them, and an agent enforcing it inside the sandbox's network namespace.

use std::{fs, net::SocketAddr, path::PathBuf};

use crate::{
    Agent, Sandbox, V4_A, V4_B,
    policy::Rule,
    sa,
    upstream::{TestCa, Upstream},
};

/// The test's world: upstreams, a CA, a policy, and the agent enforcing it.
pub struct World {
    pub sb: Sandbox,
    pub dir: PathBuf,
    pub http: Upstream,
    pub tls: Upstream,
    pub rogue_tls: Upstream,
    pub agent: Option<Agent>,
    /// The `egress` binary.
    pub egress: &'static str,
    /// The probe binary.
    pub probe: &'static str,
}

/// The policy of the HTTP tests: two upstreams by name, one TLS origination, a rogue TLS
/// server, and an ExternalName alias. It starts with its EgressConfig.
pub fn policy() -> String {
    let config = crate::policy::config(
        "  caFiles: [ca.pem]\n  hosts:\n    httpbin.test: [192.0.2.1]\n    secure.test: [192.0.2.1]\n    rogue.test: [198.51.100.1]\n",
    );
    let rules: String = [
        ("httpbin", "httpbin.test", 80, "http"),
        ("secure", "secure.test", 443, "https"),
        ("rogue", "rogue.test", 443, "https"),
    ]
    .into_iter()
    .map(|(name, host, port, protocol)| Rule::new(name, host).port(port, protocol).to_string())
    .collect();
    config + &rules + ALIAS
}

/// `securebin`: a Kubernetes ExternalName Service for `secure.test`.
const ALIAS: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: securebin
spec:
  type: ExternalName
  externalName: secure.test
  ports:
  - port: 443
"#;

impl World {
    /// Starts the upstreams and an agent enforcing [`policy`]; `egress` and `probe` are the
    /// binaries (`egress_bin!()`, `probe_bin!()`).
    pub fn new(egress: &'static str, probe: &'static str) -> Self {
        let mut world = Self::without_agent(egress, probe);
        world.start_agent();
        world
    }

    /// The upstreams and the policy, no agent yet ([`World::start_agent`] starts one).
    pub fn without_agent(egress: &'static str, probe: &'static str) -> Self {
        let sb = Sandbox::new();
        let dir = sb.dir("http");
        let ca = TestCa::new(&["secure.test"]);
        // A server with a certificate for its own name, from a CA the agent does not trust.
        let rogue_ca = TestCa::new(&["rogue.test"]);
        fs::write(dir.join("ca.pem"), &ca.ca_pem).expect("ca.pem");
        fs::write(dir.join("policy.yaml"), policy()).expect("policy");
        let http = Upstream::http(&sb.name, sa(V4_A, 80));
        let tls = Upstream::tls(&sb.name, sa(V4_A, 443), &ca);
        let rogue_tls = Upstream::tls(&sb.name, sa(V4_B, 443), &rogue_ca);
        Self {
            sb,
            dir,
            http,
            tls,
            rogue_tls,
            agent: None,
            egress,
            probe,
        }
    }

    /// Starts an agent enforcing the policy (and waits for it to say whether it is ready).
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[], None);
    }

    /// [`World::start_agent`] with `extra` arguments and, given, a soft and hard open-file
    /// limit for the agent.
    pub fn start_agent_with(&mut self, extra: &[&str], nofile: Option<(u64, u64)>) {
        let policy = self.dir.join("policy.yaml");
        let args = self.sb.run_args(&policy, extra);
        let mut launch = self.sb.agent(self.egress).args(&args);
        if let Some((soft, hard)) = nofile {
            launch = launch.nofile(soft, hard);
        }
        self.agent = Some(launch.start());
    }

    /// The value of `series` in the agent's metrics, served at `127.0.0.1:port` in the sandbox.
    pub fn metric(&self, port: u16, series: &str) -> f64 {
        let (_, body) = self.sb.scrape(port, "/metrics");
        crate::sample(&body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// One request over its own connection to `addr`, from inside the managed cgroup.
    pub fn get(&self, addr: SocketAddr, host: &str, path: &str) -> Response {
        self.sb.get(self.probe, addr, host, path)
    }
}

impl Sandbox {
    /// `GET path` for `host` over its own connection to `addr`, by the probe (`probe_bin!()`)
    /// from inside the managed cgroup.
    pub fn get(&self, probe: &str, addr: SocketAddr, host: &str, path: &str) -> Response {
        let req =
            format!("GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n");
        Response::parse(&self.http(probe, &req, &[addr]))
    }
}

/// What the probe printed for one connection.
#[derive(Debug)]
pub struct Response {
    /// The probe's pid.
    pub pid: u32,
    pub peer: String,
    pub status: String,
    pub bytes: u64,
    pub text: String,
    pub raw: String,
}

impl Response {
    pub fn parse(out: &str) -> Self {
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or("")
                .to_owned()
        };
        let text = out
            .split_once("begin\n")
            .and_then(|(_, r)| r.rsplit_once("\nend"))
            .map_or("", |(t, _)| t);
        Self {
            pid: field("pid").parse().unwrap_or(0),
            peer: field("peer"),
            status: field("status"),
            bytes: field("bytes").parse().unwrap_or(0),
            text: text.to_owned(),
            raw: out.to_owned(),
        }
    }

    /// Fails the test, showing what the probe printed, unless the status code is `code`.
    pub fn assert_code(&self, code: u16) -> &Self {
        assert_eq!(self.code(), code, "{}", self.raw);
        self
    }

    /// Fails the test, showing what the probe printed, unless the body contains `needle`.
    pub fn assert_says(&self, needle: &str) -> &Self {
        assert!(self.text.contains(needle), "no {needle:?} in: {}", self.raw);
        self
    }

    /// Fails the test, showing what the probe printed, unless the app's socket named `peer`
    /// as its peer (`getpeername()`).
    pub fn assert_peer(&self, peer: &str) -> &Self {
        assert_eq!(self.peer, peer, "{}", self.raw);
        self
    }

    pub fn code(&self) -> u16 {
        self.status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}
