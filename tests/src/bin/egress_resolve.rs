//! The DNS workload of the integration tests: joins a cgroup and a network namespace, puts a
//! given file over `/etc/resolv.conf` in a mount namespace of its own, then resolves names
//! through glibc's `getaddrinfo()`, as applications do, and optionally connects to what it
//! got.
//!
//! Usage: `egress-resolve [--cgroup DIR] --netns NAME --resolv-conf FILE [--nsswitch FILE]
//! [--family 4|6|any] [--connect PORT [--udp] [--timeout-ms MS] [--hold-ms MS]] [--count N]
//! [--pause-ms MS] [--quiet] [--latencies] [--] NAME...`
//!
//! Each round resolves every NAME in turn (`getaddrinfo(NAME, NULL)` with `ai_family` from
//! `--family`, default any, `ai_socktype = SOCK_STREAM` so that each address comes once, and
//! no flags: no `AI_ADDRCONFIG`, so `--family any` asks for A and AAAA whatever addresses the
//! namespace has) and prints one JSON line per lookup, unless `--quiet`:
//! - `{"name":"api.egress.test","addrs":["192.0.2.10","2001:db8::10"]}`, in glibc's order;
//! - `{"name":"nothing.egress.test","error":"EAI_NONAME","message":"Name or service not known"}`.
//!
//! With `--connect PORT`, each successful lookup is followed by a TCP `connect()` (at most
//! `--timeout-ms`, default 1000) to the first address at PORT, or with `--udp` a UDP socket's
//! `connect()` and one `send()`; with `--hold-ms MS` the TCP connection writes `before\n`, stays
//! open MS, writes `after\n`, and only then counts as ok; and the line gets `"connect":"ok"` or the errno's name
//! (`"connect":"EPERM"` is the filter's denial).
//!
//! `--count N` runs N rounds (default 1), `--pause-ms MS` apart. The last line is always the
//! summary: `{"rounds":N,"lookups":L,"lookup_errors":{"EAI_NONAME":1},"connects_ok":C,
//! "connect_errors":{"EPERM":2},"first_addrs":{"192.0.2.10":3}}`, where `first_addrs` counts
//! the first address of each successful lookup (the one `--connect` uses).
//!
//! `--latencies` times each `getaddrinfo()` call (`CLOCK_MONOTONIC`, whole microseconds; a
//! failed lookup too, the connection after it not): each lookup line gets `"latency_us":312`
//! and the summary `"latency_us":{"p50":..,"p99":..,"max":..}` over all lookups of all rounds
//! (nearest rank). Without it the output is as above, field for field.
//!
//! The process also gets a UTS namespace with the host name `egress-resolve`: glibc takes the
//! default search domain from the host name when resolv.conf names none, and a host named
//! `vm.example.com` would otherwise add `NAME.example.com` queries after an NXDOMAIN.
//! `--nsswitch FILE` goes over `/etc/nsswitch.conf` too (`hosts: files dns`, so that no
//! systemd-resolved or mDNS module of the host answers instead). glibc caches nothing without
//! nscd: every lookup is a query. Exits non-zero only when it cannot set itself up.

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The command line.
struct Args {
    resolv_conf: PathBuf,
    nsswitch: Option<PathBuf>,
    family: libc::c_int,
    connect: Option<u16>,
    udp: bool,
    timeout: Duration,
    /// `--hold-ms`: keep each TCP connection this long, writing before and after.
    hold: Option<Duration>,
    count: u64,
    pause: Duration,
    quiet: bool,
    /// `--latencies`: time each lookup.
    latencies: bool,
    names: Vec<String>,
}

const USAGE: &str = "usage: egress-resolve [--cgroup DIR] --netns NAME --resolv-conf FILE \
     [--nsswitch FILE] [--family 4|6|any] [--connect PORT [--udp] [--timeout-ms MS] \
     [--hold-ms MS]] \
     [--count N] [--pause-ms MS] [--quiet] [--latencies] [--] NAME...";

/// Parses the command line, joining the cgroup and the network namespace as it meets them.
fn parse() -> Args {
    let mut args = std::env::args().skip(1);
    let mut resolv_conf = None;
    let mut out = Args {
        resolv_conf: PathBuf::new(),
        nsswitch: None,
        family: libc::AF_UNSPEC,
        connect: None,
        udp: false,
        timeout: Duration::from_secs(1),
        hold: None,
        count: 1,
        pause: Duration::ZERO,
        quiet: false,
        latencies: false,
        names: Vec::new(),
    };
    let mut netns = false;
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{arg} needs {what}\n{USAGE}"))
        };
        let number =
            |v: String| -> u64 { v.parse().unwrap_or_else(|e| panic!("{v}: {e}\n{USAGE}")) };
        match arg.as_str() {
            "--cgroup" => egress_tests::join_cgroup(&value("DIR")),
            "--netns" => {
                egress_tests::enter_netns(&value("NAME"));
                netns = true;
            }
            "--resolv-conf" => resolv_conf = Some(PathBuf::from(value("FILE"))),
            "--nsswitch" => out.nsswitch = Some(PathBuf::from(value("FILE"))),
            "--family" => {
                out.family = match value("4, 6 or any").as_str() {
                    "4" => libc::AF_INET,
                    "6" => libc::AF_INET6,
                    "any" => libc::AF_UNSPEC,
                    other => panic!("--family {other}\n{USAGE}"),
                }
            }
            "--connect" => {
                out.connect = Some(
                    value("PORT")
                        .parse()
                        .unwrap_or_else(|e| panic!("--connect: {e}")),
                );
            }
            "--udp" => out.udp = true,
            "--timeout-ms" => out.timeout = Duration::from_millis(number(value("MS"))),
            "--hold-ms" => out.hold = Some(Duration::from_millis(number(value("MS")))),
            "--count" => out.count = number(value("N")),
            "--pause-ms" => out.pause = Duration::from_millis(number(value("MS"))),
            "--quiet" => out.quiet = true,
            "--latencies" => out.latencies = true,
            "--" => out.names.extend(args.by_ref()),
            flag if flag.starts_with("--") => panic!("unknown option {flag}\n{USAGE}"),
            name => out.names.push(name.to_owned()),
        }
    }
    // Without --netns it would resolve in the caller's namespace, the host's: never.
    assert!(netns, "--netns is required\n{USAGE}");
    out.resolv_conf = resolv_conf.unwrap_or_else(|| panic!("--resolv-conf is required\n{USAGE}"));
    assert!(!out.names.is_empty(), "no NAME\n{USAGE}");
    out
}

fn main() {
    let args = parse();
    private_files(&args.resolv_conf, args.nsswitch.as_deref());
    let mut summary = Summary::default();
    for round in 0..args.count {
        if round > 0 && !args.pause.is_zero() {
            std::thread::sleep(args.pause);
        }
        for name in &args.names {
            let line = lookup_and_connect(&args, name, &mut summary);
            if !args.quiet {
                println!("{line}");
            }
        }
    }
    summary.rounds = args.count;
    println!("{}", summary.to_json(args.latencies));
}

/// What all rounds came to.
#[derive(Default)]
struct Summary {
    rounds: u64,
    lookups: u64,
    lookup_errors: BTreeMap<String, u64>,
    connects_ok: u64,
    connect_errors: BTreeMap<String, u64>,
    first_addrs: BTreeMap<String, u64>,
    /// With `--latencies`: every lookup's time, in microseconds.
    latencies_us: Vec<u64>,
}

impl Summary {
    /// The summary line; with `latencies`, the lookups' time percentiles at its end.
    fn to_json(&self, latencies: bool) -> Line {
        let mut line = Line(vec![
            ("rounds", json!(self.rounds)),
            ("lookups", json!(self.lookups)),
            ("lookup_errors", json!(self.lookup_errors)),
            ("connects_ok", json!(self.connects_ok)),
            ("connect_errors", json!(self.connect_errors)),
            ("first_addrs", json!(self.first_addrs)),
        ]);
        if latencies {
            let mut sorted = self.latencies_us.clone();
            sorted.sort_unstable();
            // Nearest rank: the smallest value with at least q of all at or below it.
            let rank = |q: f64| {
                let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
                sorted.get(i - 1).copied().unwrap_or(0)
            };
            line.0.push((
                "latency_us",
                json!({"p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0)}),
            ));
        }
        line
    }
}

/// A JSON object printed with its keys in the order given (serde_json's own objects sort
/// them), so that a line starts with its name.
struct Line(Vec<(&'static str, Value)>);

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (key, value)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}:{value}", Value::from(*key))?;
        }
        f.write_str("}")
    }
}

/// One lookup of `name`, and the connection after it with `--connect`: its JSON line.
fn lookup_and_connect(args: &Args, name: &str, summary: &mut Summary) -> Line {
    summary.lookups += 1;
    let started = Instant::now();
    let result = getaddrinfo(name, args.family);
    let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let latency = args.latencies.then(|| {
        summary.latencies_us.push(took_us);
        ("latency_us", json!(took_us))
    });
    let addrs = match result {
        Ok(addrs) => addrs,
        Err((error, message)) => {
            *summary.lookup_errors.entry(error.clone()).or_default() += 1;
            let mut line = Line(vec![
                ("name", json!(name)),
                ("error", json!(error)),
                ("message", json!(message)),
            ]);
            line.0.extend(latency);
            return line;
        }
    };
    let mut line = Line(vec![
        ("name", json!(name)),
        (
            "addrs",
            json!(addrs.iter().map(ToString::to_string).collect::<Vec<_>>()),
        ),
    ]);
    line.0.extend(latency);
    let Some(first) = addrs.first() else {
        return line;
    };
    *summary.first_addrs.entry(first.to_string()).or_default() += 1;
    if let Some(port) = args.connect {
        let target = SocketAddr::new(*first, port);
        let outcome = if args.udp {
            udp_send(target)
        } else {
            TcpStream::connect_timeout(&target, args.timeout)
                .and_then(|stream| hold(stream, args.hold))
        };
        let verdict = match outcome {
            Ok(()) => {
                summary.connects_ok += 1;
                "ok".to_owned()
            }
            Err(e) => {
                let name = errno_name(&e);
                *summary.connect_errors.entry(name.clone()).or_default() += 1;
                name
            }
        };
        line.0.push(("connect", json!(verdict)));
    }
    line
}

/// With `--hold-ms`: writes `before\n` on the connection, waits, writes `after\n` (the
/// server can tell that a connection made before some change still carried data after it).
fn hold(mut stream: TcpStream, hold: Option<Duration>) -> std::io::Result<()> {
    use std::io::Write as _;
    let Some(hold) = hold else {
        return Ok(());
    };
    stream.write_all(b"before\n")?;
    std::thread::sleep(hold);
    stream.write_all(b"after\n")?;
    stream.flush()
}

/// A UDP socket connected to `target`, and one datagram sent on it.
fn udp_send(target: SocketAddr) -> std::io::Result<()> {
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(target)?;
    socket.send(b"egress-resolve")?;
    Ok(())
}

/// The addresses glibc's `getaddrinfo(name, NULL)` gives for `family`, in its order, or the
/// error's name (`EAI_NONAME`, ...) and message.
fn getaddrinfo(name: &str, family: libc::c_int) -> Result<Vec<IpAddr>, (String, String)> {
    let c_name = CString::new(name).map_err(|e| ("EAI_NONAME".to_owned(), e.to_string()))?;
    // SAFETY: addrinfo is plain data; zeroed is the documented way to start hints.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = family;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: a NUL-terminated name, no service, valid hints and a place for the result.
    let ret = unsafe { libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut list) };
    if ret != 0 {
        let errno = std::io::Error::last_os_error();
        // SAFETY: gai_strerror returns a static string for any code.
        let message = unsafe { CStr::from_ptr(libc::gai_strerror(ret)) }
            .to_string_lossy()
            .into_owned();
        let message = if ret == libc::EAI_SYSTEM {
            format!("{message}: {errno}")
        } else {
            message
        };
        return Err((gai_name(ret), message));
    }
    let mut addrs = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getaddrinfo returned, not freed yet.
        let ai = unsafe { &*entry };
        match ai.ai_family {
            libc::AF_INET => {
                // SAFETY: for AF_INET, ai_addr points to a sockaddr_in.
                let sin = unsafe { &*ai.ai_addr.cast::<libc::sockaddr_in>() };
                addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
            libc::AF_INET6 => {
                // SAFETY: for AF_INET6, ai_addr points to a sockaddr_in6.
                let sin6 = unsafe { &*ai.ai_addr.cast::<libc::sockaddr_in6>() };
                addrs.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
        entry = ai.ai_next;
    }
    // SAFETY: the list getaddrinfo returned, freed once.
    unsafe { libc::freeaddrinfo(list) };
    Ok(addrs)
}

/// The name of a `getaddrinfo()` error code.
fn gai_name(code: libc::c_int) -> String {
    let name = match code {
        libc::EAI_NONAME => "EAI_NONAME",
        libc::EAI_AGAIN => "EAI_AGAIN",
        libc::EAI_FAIL => "EAI_FAIL",
        libc::EAI_NODATA => "EAI_NODATA",
        libc::EAI_FAMILY => "EAI_FAMILY",
        libc::EAI_SOCKTYPE => "EAI_SOCKTYPE",
        libc::EAI_SERVICE => "EAI_SERVICE",
        libc::EAI_MEMORY => "EAI_MEMORY",
        libc::EAI_SYSTEM => "EAI_SYSTEM",
        libc::EAI_OVERFLOW => "EAI_OVERFLOW",
        libc::EAI_BADFLAGS => "EAI_BADFLAGS",
        other => return format!("EAI({other})"),
    };
    name.to_owned()
}

/// The errno name of a connection's error (`EPERM`, `ECONNREFUSED`, ...); `ETIMEDOUT` for
/// std's own connect timeout, which carries no errno.
fn errno_name(e: &std::io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return if e.kind() == std::io::ErrorKind::TimedOut {
            "ETIMEDOUT".to_owned()
        } else {
            format!("{:?}", e.kind())
        };
    };
    let name = match code {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::ENOBUFS => "ENOBUFS",
        libc::EAGAIN => "EAGAIN",
        libc::EINPROGRESS => "EINPROGRESS",
        other => return format!("errno {other}"),
    };
    name.to_owned()
}

/// Gives the process mount and UTS namespaces of its own, with `resolv_conf` over
/// `/etc/resolv.conf` (and `nsswitch` over `/etc/nsswitch.conf`) and the host name
/// `egress-resolve`. `/` is made private first, so that the bind mounts stay in this
/// namespace (on a host whose `/` is shared, they would otherwise show up on the host).
fn private_files(resolv_conf: &Path, nsswitch: Option<&Path>) {
    // SAFETY: unshare has no memory preconditions; the process is still single-threaded,
    // which CLONE_NEWNS needs.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) };
    assert_eq!(
        ret,
        0,
        "unshare(CLONE_NEWNS | CLONE_NEWUTS): {}",
        std::io::Error::last_os_error()
    );
    mount(None, Path::new("/"), libc::MS_REC | libc::MS_PRIVATE);
    // A bind mount needs its target: the kernel guests' root file system has no /etc files.
    for target in ["/etc/resolv.conf", "/etc/nsswitch.conf"] {
        if !Path::new(target).exists() {
            let _ = std::fs::create_dir_all("/etc");
            std::fs::write(target, b"").unwrap_or_else(|e| panic!("creating {target}: {e}"));
        }
    }
    mount(
        Some(resolv_conf),
        Path::new("/etc/resolv.conf"),
        libc::MS_BIND,
    );
    if let Some(nsswitch) = nsswitch {
        mount(
            Some(nsswitch),
            Path::new("/etc/nsswitch.conf"),
            libc::MS_BIND,
        );
    }
    let host = b"egress-resolve";
    // SAFETY: a buffer of its own length.
    let ret = unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
    assert_eq!(ret, 0, "sethostname: {}", std::io::Error::last_os_error());
}

/// `mount(source, target, NULL, flags, NULL)`: a bind mount with a source, a propagation
/// change without.
fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL");
    let source_c = source.map(c);
    let target_c = c(target);
    // SAFETY: NUL-terminated paths (or NULL), no file system type or data.
    let ret = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        ret,
        0,
        "mount({source:?}, {}): {}",
        target.display(),
        std::io::Error::last_os_error()
    );
}
