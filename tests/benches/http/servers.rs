//! The bench's long-running processes, each started inside the sandbox's network namespace
//! (`nsenter --net`, which, unlike `ip netns exec`, leaves the cgroup2 and bpffs mounts
//! visible), pinned with `taskset`, its output going to a log file rather than a pipe the
//! bench would have to drain on some CPU: nginx (the upstream), Envoy and the egress agent.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use egress_tests::{Sandbox, V4_A, in_netns, upstream::TestCa};

/// The name the upstream answers for, and the rules allow.
pub const HOST: &str = "bench.test";
/// nginx's `stub_status`, on loopback inside the namespace (never a proxied port).
pub const STATUS_ADDR: &str = "127.0.0.1:8081";
/// Envoy's listeners and admin, on loopback inside the namespace.
pub const ENVOY_PLAIN: &str = "127.0.0.1:10080";
pub const ENVOY_TLS: &str = "127.0.0.1:10443";
const ENVOY_ADMIN: &str = "127.0.0.1:9901";
/// The body every request gets: 1 KB.
pub const BODY_BYTES: usize = 1024;

/// Where a process runs: a CPU (`None`: any) and a nice value.
#[derive(Clone, Copy, Debug)]
pub struct Pin {
    pub cpu: Option<usize>,
    /// Below 0 favours the bench's processes over whatever else this shared machine runs (a
    /// build on the proxies' CPU would otherwise take half of it, at random moments); all of
    /// them get the same value, so no contender is favoured over another.
    pub nice: i32,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    /// For messages.
    pub name: &'static str,
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `program args` in `netns`, placed by `pin`, with its output in `log`.
    fn spawn(
        name: &'static str,
        netns: &str,
        pin: Pin,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = pinned_in_netns(netns, pin);
        cmd.arg(program).args(args);
        configure(&mut cmd);
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: starting {}: {e}", program.display()));
        Self { name, child, log }
    }

    /// Its process id: `taskset` and `nsenter` exec in place, so this is the server's own.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with its log, if it has exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}); its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 40)
            );
        }
    }

    /// Waits until `ready` says so, or panics with the log after `timeout`.
    fn wait_until(&mut self, timeout: Duration, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{} was not ready after {timeout:?}; its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 40)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nice -n NICE taskset -c CPU nsenter --net=/run/netns/NETNS`, to which the program and its
/// arguments are appended; each execs the next, so the process id is the program's.
pub fn pinned_in_netns(netns: &str, pin: Pin) -> Command {
    pinned_in(Path::new(&format!("/run/netns/{netns}")), pin)
}

/// `nice`, `taskset` and `nsenter --net=NET`: what follows runs in the network namespace at
/// `net` (a name's `/run/netns/` file, or a pod's `/proc/PID/ns/net`).
pub fn pinned_in(net: &Path, pin: Pin) -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", &pin.nice.to_string()]);
    if let Some(cpu) = pin.cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg("nsenter").arg(format!("--net={}", net.display()));
    cmd
}

/// The processes whose parent is `parent` (from `/proc/*/stat`, field 4).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// nginx, the upstream: `192.0.2.1:80` plain and `:443` TLS with the test CA's certificate,
/// one worker, keep-alive, no access log, a fixed 1 KB body; `stub_status` on loopback.
pub struct Nginx {
    /// Stopped when the bench drops this.
    daemon: Daemon,
    netns: String,
}

impl Nginx {
    /// Writes its prefix directory (config, certificate, key) under `dir` and starts it.
    pub fn start(dir: &Path, netns: &str, pin: Pin, ca: &TestCa) -> Self {
        let prefix = dir.join("nginx");
        for sub in ["logs", "tmp"] {
            fs::create_dir_all(prefix.join(sub)).expect("nginx prefix");
        }
        let chain: String = ca
            .chain
            .iter()
            .map(|cert| pem("CERTIFICATE", cert))
            .collect();
        fs::write(prefix.join("server.pem"), chain).expect("server.pem");
        fs::write(
            prefix.join("server.key"),
            pem("PRIVATE KEY", ca.key.secret_der()),
        )
        .expect("server.key");
        let p = prefix.display();
        let body = "x".repeat(BODY_BYTES - 1);
        let conf = format!(
            r#"# Written by the http bench; never the system nginx config.
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    default_type text/plain;
    ssl_session_cache shared:bench:1m;
    server {{
        listen {V4_A}:80 backlog=4096;
        listen {V4_A}:443 ssl backlog=4096;
        server_name {HOST};
        ssl_certificate {p}/server.pem;
        ssl_certificate_key {p}/server.key;
        location / {{ return 200 "{body}\n"; }}
    }}
    server {{
        listen {STATUS_ADDR};
        location = /status {{ stub_status; }}
    }}
}}
"#
        );
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf).expect("nginx.conf");
        let mut daemon = Daemon::spawn(
            "nginx",
            netns,
            pin,
            Path::new("nginx"),
            &[
                "-p",
                &prefix.display().to_string(),
                "-c",
                &conf_path.display().to_string(),
                "-g",
                "daemon off;",
            ],
            prefix.join("logs/stderr.log"),
            |_| {},
        );
        let netns = netns.to_owned();
        daemon.wait_until(Duration::from_secs(10), |_| {
            get(&netns, STATUS_ADDR.parse().expect("addr"), HOST, "/status").is_ok()
        });
        Self { daemon, netns }
    }

    /// Moves nginx (its master and worker processes) to `cpu` (`None`: any CPU).
    pub fn move_to(&self, cpu: Option<usize>) {
        let master = self.daemon.pid();
        let mut pids = vec![master];
        pids.extend(children(master));
        for pid in pids {
            // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let cpus = thread::available_parallelism().map_or(1, |n| n.get());
            for c in (0..cpus).filter(|&c| cpu.is_none_or(|cpu| cpu == c)) {
                // SAFETY: c < CPU_SETSIZE on a 2-CPU machine (and any other we run on).
                unsafe { libc::CPU_SET(c, &mut set) };
            }
            // SAFETY: a valid set of the size we pass, for a process we started.
            let ret =
                unsafe { libc::sched_setaffinity(pid as i32, size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(
                ret,
                0,
                "moving nginx ({pid}) to CPU {cpu:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Requests nginx has answered (its `stub_status` counter, which counts this one too).
    pub fn requests(&self) -> u64 {
        let (status, body) = get(
            &self.netns,
            STATUS_ADDR.parse().expect("addr"),
            HOST,
            "/status",
        )
        .unwrap_or_else(|e| panic!("nginx stub_status: {e}"));
        assert_eq!(status, 200, "nginx stub_status: {body}");
        // "Active connections: 1 \nserver accepts handled requests\n 5 5 100 \n..."
        body.lines()
            .skip_while(|line| !line.starts_with("server accepts handled requests"))
            .nth(1)
            .and_then(|line| line.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("nginx stub_status: no request count in {body:?}"))
    }
}

/// Envoy, one worker: `ENVOY_PLAIN` forwards Host bench.test to `192.0.2.1:80`, `ENVOY_TLS`
/// forwards Host bench.test:443 to `192.0.2.1:443` over TLS (SNI bench.test, the test CA as
/// the only trusted CA, the name checked); upstream connections pooled (Envoy's default).
/// Any other Host gets Envoy's 404, as egress answers 403: both check the Host.
pub fn start_envoy(bin: &Path, dir: &Path, netns: &str, pin: Pin, ca: &Path) -> Daemon {
    let listener = |name: &str, addr: &str, domains: &str, cluster: &str| {
        let (ip, port) = addr.split_once(':').expect("ip:port");
        format!(
            r#"
  - name: {name}
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: {name}
              domains: [{domains}]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    let cluster = |name: &str, port: u16, tls: &str| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {V4_A}, port_value: {port}}}}}}}{tls}"#
        )
    };
    let tls = format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {HOST}
        common_tls_context:
          validation_context:
            trusted_ca: {{filename: {}}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: {HOST}}}"#,
        ca.display()
    );
    let (admin_ip, admin_port) = ENVOY_ADMIN.split_once(':').expect("ip:port");
    let config = format!(
        "# Written by the http bench.\nadmin:\n  address: {{socket_address: {{address: {admin_ip}, port_value: {admin_port}}}}}\n\
         static_resources:\n  listeners:{}{}\n  clusters:{}{}\n",
        listener(
            "plain",
            ENVOY_PLAIN,
            &format!("\"{HOST}\", \"{HOST}:80\""),
            "upstream_plain"
        ),
        listener("tls", ENVOY_TLS, &format!("\"{HOST}:443\""), "upstream_tls"),
        cluster("upstream_plain", 80, ""),
        cluster("upstream_tls", 443, &tls),
    );
    let path = dir.join("envoy.yaml");
    fs::write(&path, config).expect("envoy.yaml");
    let mut daemon = Daemon::spawn(
        "envoy",
        netns,
        pin,
        bin,
        &[
            "-c",
            &path.display().to_string(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        dir.join("envoy.log"),
        |_| {},
    );
    let netns = netns.to_owned();
    daemon.wait_until(Duration::from_secs(30), |_| {
        get(
            &netns,
            ENVOY_ADMIN.parse().expect("addr"),
            "admin",
            "/ready",
        )
        .is_ok_and(|(status, _)| status == 200)
    });
    daemon
}

/// The egress agent (`egress run`) enforcing `policy` on the sandbox's cgroup, with its log
/// at `log_level` (`None`: the agent's default). Started like `Sandbox::agent`, but pinned and
/// logging to a file: at tens of thousands of requests a second its per-request lines would
/// otherwise cost the bench a reader thread on someone's CPU.
pub fn start_egress(
    bin: &Path,
    dir: &Path,
    sandbox: &Sandbox,
    pin: Pin,
    policy: &Path,
    extra: &[String],
    log_level: Option<&str>,
) -> Daemon {
    let mut daemon = Daemon::spawn(
        "egress",
        &sandbox.name,
        pin,
        bin,
        &[
            "run",
            "--policy",
            &policy.display().to_string(),
            "--cgroup",
            &sandbox.cgroup.display().to_string(),
            "--pin-dir",
            &sandbox.pin_dir.display().to_string(),
        ]
        .into_iter()
        .chain(extra.iter().map(String::as_str))
        .collect::<Vec<_>>(),
        dir.join("egress.log"),
        |cmd| {
            cmd.env_remove(egress_user::telemetry::LOG_ENV);
            if let Some(level) = log_level {
                cmd.env(egress_user::telemetry::LOG_ENV, level);
            }
        },
    );
    daemon.wait_until(Duration::from_secs(30), |d| d.log_text().contains("ready"));
    daemon
}

/// One `GET` over a fresh connection from inside `netns` (on a thread that enters it):
/// the status and the body (with the response head).
pub fn get(
    netns: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let (host, path) = (host.to_owned(), path.to_owned());
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        Ok((status, body))
    })
}

/// DER bytes as a PEM block.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
