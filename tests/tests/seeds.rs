//! Seed 000's requests as written: `curl http://httpbin/headers` and
//! `curl http://securegoogle:443`, by real `curl` resolving through glibc, on a host, with the
//! aliases' names answered by the agent's DNS path (issue 18, item 4). The world is the HTTP
//! tests' (`httpbin.test` plain on 192.0.2.1:80, `secure.test` TLS on 192.0.2.1:443), plus a
//! DNS server of the sandbox's as the resolver that knows neither alias name. Needs `curl`, so
//! the kernel matrix's guests (which have none) leave this file out; the kernel meets it only
//! as `fqdn.rs` does.

use std::{fs, net::IpAddr, path::Path, process::Command};

use egress_tests::{egress_bin, probe_bin, resolv_conf_text, sa, world::World};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// The resolver of the sandbox's resolv.conf.
const RESOLVER: &str = "192.0.2.53";

/// Seed 000's two Services, with our upstreams' names.
const ALIASES: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: httpbin
spec:
  type: ExternalName
  externalName: httpbin.test
  ports:
  - port: 80
---
apiVersion: v1
kind: Service
metadata:
  name: securegoogle
spec:
  type: ExternalName
  externalName: secure.test
  ports:
  - port: 443
";

/// `curl ARGS` from the sandbox's managed cgroup and network namespace, with the sandbox's
/// resolv.conf as `/etc/resolv.conf` (in a mount namespace of its own): (success, stdout,
/// stderr).
fn curl(w: &World, resolv: &Path, args: &[&str]) -> (bool, String, String) {
    let nsswitch = w.sb.dir("curl").join("nsswitch.conf");
    fs::write(&nsswitch, "hosts: files dns\n").expect("nsswitch.conf");
    let script = format!(
        "echo $$ > {cgroup}/cgroup.procs && exec unshare --mount --propagation private sh -c \
         'mount --bind {resolv} /etc/resolv.conf && mount --bind {nsswitch} /etc/nsswitch.conf \
         && exec nsenter --net=/run/netns/{netns} curl -sS -m 5 \"$@\"' curl {args}",
        cgroup = w.sb.cgroup.display(),
        resolv = resolv.display(),
        nsswitch = nsswitch.display(),
        netns = w.sb.name,
        args = args.join(" "),
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("running curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn seed_000s_curl_commands_work_as_written() {
    let mut w = World::without_agent(EGRESS, PROBE);
    w.sb.add_addr(&format!("{RESOLVER}/32"));
    let dns =
        w.sb.dns_server(sa(RESOLVER.parse::<IpAddr>().expect("ip"), 53));
    let resolv = w.sb.resolv_conf();
    fs::write(
        &resolv,
        resolv_conf_text(&[RESOLVER.parse().expect("ip")], "timeout:2 attempts:2"),
    )
    .expect("resolv.conf");
    let policy = w.dir.join("policy.yaml");
    let mut yaml = fs::read_to_string(&policy).expect("policy");
    yaml.push_str(ALIASES);
    fs::write(&policy, yaml).expect("policy");
    w.start_agent();

    // $ curl http://httpbin/headers
    let (ok, out, err) = curl(&w, &resolv, &["http://httpbin/headers"]);
    assert!(
        ok,
        "curl http://httpbin/headers: {err}\n{}",
        w.agent().log()
    );
    assert!(
        out.contains("upstream saw host=httpbin.test path=/headers sni=-"),
        "{out}"
    );
    // $ curl http://securegoogle:443 (plain HTTP from the app, TLS to the upstream)
    let (ok, out, err) = curl(&w, &resolv, &["http://securegoogle:443/"]);
    assert!(
        ok,
        "curl http://securegoogle:443: {err}\n{}",
        w.agent().log()
    );
    assert!(out.contains("sni=secure.test"), "{out}");
    let tls = w.tls.seen();
    assert_eq!(tls.len(), 1);
    assert_eq!(tls[0].sni.as_deref(), Some("secure.test"));
    // The resolver was never asked for the aliases' names: the agent answered them.
    assert_eq!(dns.queries_for("httpbin"), 0);
    assert_eq!(dns.queries_for("securegoogle"), 0);
    // The upstreams saw one request each, through the proxy (the log names the alias).
    let log = w.agent().log();
    assert!(
        log.lines()
            .any(|l| l.contains("path=/headers") && l.contains("status=200")),
        "{log}"
    );
}
