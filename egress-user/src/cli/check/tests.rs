//! `egress check` as a user runs it: what it prints on stdout and stderr, and its exit code.

use clap::Parser;

use super::*;
use crate::policy::{ca::testing as ca_testing, dns::DEFAULT_RESOLV_CONF};
use crate::testing::TempDir;

/// A resolv.conf in `dir` with two resolvers.
fn resolv_conf(dir: &TempDir) -> PathBuf {
    dir.file(
        "resolv.conf",
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\n",
    )
}

/// Stands in for the lead's `Command` enum, to test the clap wiring of [`CheckArgs`].
#[derive(clap::Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: CheckArgs,
}

const GOOD: &str = "\
kind: EgressRule
metadata: {name: wikipedia-range1}
spec:
  destination: {service: 91.198.174.192/27}
  ports:
    - {port: 443, protocol: tcp}
";

/// `egress check FILES --resolv-conf RESOLV_CONF`.
fn check_files(files: Vec<PathBuf>, resolv_conf: PathBuf) -> CheckArgs {
    CheckArgs {
        files,
        default: false,
        resolv_conf: ResolvConf { path: resolv_conf },
    }
}

fn check(args: &CheckArgs) -> (ExitCode, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(args, &mut out, &mut err).expect("writing to a Vec cannot fail");
    (
        code,
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(err).expect("utf-8"),
    )
}

#[test]
fn valid_file_prints_the_policy_and_succeeds() {
    let dir = TempDir::new("check");
    let path = dir.file("good.yaml", GOOD);
    let args = check_files(vec![path.clone()], resolv_conf(&dir));
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(err, "");
    let origin = format!("({}:1)", path.display());
    assert!(
        out.starts_with(&format!(
            "mode: enforce\nbypass: 127.0.0.0/8, ::1/128\ndns: 192.0.2.53, 2001:db8::53 (from \
                 {})\nrules: 1\n",
            args.resolv_conf.path.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("wikipedia-range1  91.198.174.192/27  443/tcp  "),
        "{out}"
    );
    assert!(
        out.contains(&format!("443/tcp  {origin}\nhttp rules: 0\n")),
        "{out}"
    );
    assert_eq!(run(&args).expect("run"), ExitCode::SUCCESS);
}

#[test]
fn invalid_files_print_every_error_and_fail() {
    let dir = TempDir::new("check");
    let good = dir.file("a.yaml", GOOD);
    let bad = dir.file(
        "b.yaml",
        GOOD.replace("443,", "0,").replace("tcp}", "sctp}"),
    );
    let missing = dir.0.join("missing.yaml");
    let args = check_files(vec![good, bad.clone(), missing.clone()], resolv_conf(&dir));
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    let bad = bad.display();
    assert_eq!(lines.len(), 4, "{err}");
    assert_eq!(
        lines[0],
        format!(
            "{bad}:2: metadata.name: duplicate name `wikipedia-range1` (the first is at {}:2)",
            dir.0.join("a.yaml").display()
        )
    );
    assert_eq!(
        lines[1],
        format!("{bad}:6: spec.ports[0].port: 0 is not a valid port (1-65535)")
    );
    assert!(
        lines[2].starts_with(&format!(
            "{bad}:6: spec.ports[0].protocol: unknown protocol `sctp`"
        )),
        "{err}"
    );
    assert!(
        lines[3].starts_with(&format!(
            "{}:1: cannot read the policy file: No such file or directory",
            missing.display()
        )),
        "{err}"
    );
    assert_eq!(run(&args).expect("run"), ExitCode::FAILURE);
}

/// Every policy document of both seeds, verbatim: the five EgressRules of seed 003
/// ("Control Egress TCP Traffic") and the two Services of seed 000 ("Configuring Egress
/// with Envoy").
fn seeds() -> String {
    let seeds = crate::policy::seeds::TCP.to_owned() + "---\n";
    seeds + crate::policy::seeds::SERVICES
}

#[test]
fn both_seeds_check_clean() {
    let dir = TempDir::new("check");
    let path = dir.file("seeds.yaml", seeds());
    let args = check_files(vec![path.clone()], resolv_conf(&dir));
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert_eq!(err, "");
    let f = path.display();
    let r = args.resolv_conf.path.display();
    assert_eq!(
            out,
            format!(
                "\
mode: enforce
bypass: 127.0.0.0/8, ::1/128
dns: 192.0.2.53, 2001:db8::53 (from {r})
rules: 5
wikipedia-range1  91.198.174.192/27   443/tcp  ({f}:1)
wikipedia-range2  103.102.166.224/27  443/tcp  ({f}:11)
wikipedia-range3  198.35.26.96/27     443/tcp  ({f}:21)
wikipedia-range4  208.80.153.224/27   443/tcp  ({f}:31)
wikipedia-range5  208.80.154.224/27   443/tcp  ({f}:41)
http rules: 0
aliases: 2
alias httpbin (httpbin, httpbin.default, httpbin.default.svc, httpbin.default.svc.cluster.local) -> httpbin.org 80/http                                ({f}:51)
alias securegoogle (securegoogle, securegoogle.default, securegoogle.default.svc, securegoogle.default.svc.cluster.local) -> www.google.com 443/https  ({f}:61)
proxy: port 15001
caFiles: none
hosts: 0
"
            )
        );
}

#[test]
fn wide_ipv6_rules_get_a_note_about_nat64_and_6to4() {
    let dir = TempDir::new("check");
    let doc = |name: &str, destination: &str| {
        GOOD.replace("wikipedia-range1", name)
            .replace("91.198.174.192/27", destination)
    };
    let text = format!(
        "{}---\n{}---\n{}",
        doc("wide", "\"::/0\""),
        doc("v4", "192.0.2.0/24"),
        doc("global", "2000::/3")
    );
    let path = dir.file("wide.yaml", &text);
    let args = check_files(vec![path.clone()], resolv_conf(&dir));
    let (code, _, err) = check(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    let f = path.display();
    assert_eq!(
        err,
        format!(
            "{f}:1: note: rule `wide` (::/0) contains NAT64 (64:ff9b::/96) and \
                 6to4 (2002::/16) destinations, which the kernel judges by the IPv4 rules as \
                 their embedded IPv4 address, not by this rule\n\
                 {f}:15: note: rule `global` (2000::/3) contains 6to4 (2002::/16) destinations, \
                 which the kernel judges by the IPv4 rules as their embedded IPv4 address, not \
                 by this rule\n"
        )
    );
}

#[test]
fn default_policy_checks_clean() {
    let dir = TempDir::new("check");
    let args = CheckArgs {
        files: Vec::new(),
        default: true,
        resolv_conf: ResolvConf {
            path: resolv_conf(&dir),
        },
    };
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert!(out.contains("wikipedia-range5  208.80.154.224/27"), "{out}");
    assert!(out.contains(&format!("({DEFAULT_POLICY_NAME}:")), "{out}");
    // The default policy names no resolvers: resolv.conf's are in force.
    assert!(
        out.contains(&format!(
            "\ndns: 192.0.2.53, 2001:db8::53 (from {})\n",
            args.resolv_conf.path.display()
        )),
        "{out}"
    );
}

#[test]
fn resolv_conf_problems_are_warnings_and_a_missing_one_allows_no_dns() {
    let dir = TempDir::new("check");
    let path = dir.file("good.yaml", GOOD);
    let bogus = dir.file("resolv.conf", "nameserver 192.0.2.53\nnameserver bogus\n");
    let missing = dir.0.join("no-resolv.conf");
    let (r, m) = (bogus.display(), missing.display());
    // The resolv.conf, the warning about it and the dns line it makes.
    let cases = [
        (
            &bogus,
            format!("{r}:2: `bogus` is not an IP address; this nameserver is not allowed"),
            format!("192.0.2.53 (from {r})"),
        ),
        (
            &missing,
            format!("{m}: not found; no DNS resolver is allowed"),
            format!("none (from {m})"),
        ),
    ];
    for (resolv_conf, warning, dns) in cases {
        let (code, out, err) = check(&check_files(vec![path.clone()], resolv_conf.clone()));
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert_eq!(err, format!("warning: {warning}\n"));
        assert!(out.contains(&format!("\ndns: {dns}\n")), "{out}");
    }
}

#[test]
fn an_unreadable_resolv_conf_fails_the_check() {
    let dir = TempDir::new("check");
    let path = dir.file("good.yaml", GOOD);
    let args = check_files(vec![path], dir.0.clone());
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(out, "");
    assert!(
        err.starts_with(&format!(
            "egress check: reading the DNS resolvers from {}: ",
            dir.0.display()
        )),
        "{err}"
    );
}

#[test]
fn resolvers_named_by_the_policy_win_over_resolv_conf() {
    let dir = TempDir::new("check");
    let path = dir.file(
        "config.yaml",
        "kind: EgressConfig\nspec:\n  dns:\n    resolvers: [192.0.2.1]\n",
    );
    let args = CheckArgs {
        // With a rule, so that no warning about an empty policy comes.
        files: vec![path.clone(), dir.file("good.yaml", GOOD)],
        default: false,
        // Not even read: a directory would fail the check otherwise.
        resolv_conf: ResolvConf {
            path: dir.0.clone(),
        },
    };
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert_eq!(err, "");
    assert!(
        out.contains(&format!("\ndns: 192.0.2.1 (from {}:3)\n", path.display())),
        "{out}"
    );
}

#[test]
fn nothing_to_check_is_a_usage_error() {
    let args = check_files(Vec::new(), PathBuf::from(DEFAULT_RESOLV_CONF));
    let (code, out, err) = check(&args);
    assert_eq!(code, ExitCode::from(USAGE_ERROR));
    assert_eq!(out, "");
    assert!(err.contains("nothing to check"), "{err}");
    // clap refuses it before run() is reached, and refuses files with --default too.
    assert!(Cli::try_parse_from(["check"]).is_err());
    assert!(Cli::try_parse_from(["check", "--default", "a.yaml"]).is_err());
    let parsed = Cli::try_parse_from(["check", "a.yaml", "b.yaml"]).expect("valid");
    assert_eq!(
        parsed.args.files,
        [PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
    );
    assert!(
        Cli::try_parse_from(["check", "--default"])
            .expect("valid")
            .args
            .default
    );
    let parsed =
        Cli::try_parse_from(["check", "--resolv-conf", "/tmp/r.conf", "a.yaml"]).expect("valid");
    assert_eq!(parsed.args.resolv_conf.path, PathBuf::from("/tmp/r.conf"));
    if std::env::var_os("EGRESS_RESOLV_CONF").is_none() {
        let parsed = Cli::try_parse_from(["check", "a.yaml"]).expect("valid");
        assert_eq!(
            parsed.args.resolv_conf.path,
            PathBuf::from(DEFAULT_RESOLV_CONF)
        );
    }
}

/// `egress check FILES` with the directory's resolv.conf, on another thread: a check that
/// blocks (on a FIFO) fails the test after 5 s instead of hanging it.
fn check_promptly(dir: &TempDir, files: Vec<PathBuf>) -> (ExitCode, String, String) {
    let args = check_files(files, resolv_conf(dir));
    crate::policy::read::promptly(move || check(&args))
}

#[test]
fn a_fifo_policy_file_fails_promptly() {
    let dir = TempDir::new("check");
    let fifo = dir.0.join("policy.yaml");
    crate::policy::read::mkfifo(&fifo);
    let (code, out, err) = check_promptly(&dir, vec![fifo.clone()]);
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "{}:1: cannot read the policy file: it is a FIFO (named pipe), not a regular file\n",
            fifo.display()
        )
    );
}

#[test]
fn ca_files_that_are_not_ca_files_fail_the_check_at_their_line() {
    let dir = TempDir::new("check");
    let d = dir.0.display().to_string();
    let mut cases = ca_testing::unusable(&dir.0);
    // Relative to the policy file's directory, where there is no such file.
    cases.push((
        "ca.pem".to_owned(),
        format!("`ca.pem` ({d}/ca.pem): cannot read it: No such file or directory (os error 2)"),
    ));
    for (ca, message) in cases {
        let path = dir.file("config.yaml", ca_testing::config_naming(&ca));
        let (code, out, err) = check_promptly(&dir, vec![path.clone()]);
        assert_eq!(code, ExitCode::FAILURE, "{ca}");
        assert_eq!(out, "", "{ca}");
        assert_eq!(
            err,
            format!("{}:4: spec.caFiles[0]: CA file {message}\n", path.display()),
            "{ca}"
        );
    }
}

#[test]
fn an_empty_policy_passes_with_a_warning() {
    let dir = TempDir::new("check");
    let path = dir.file("empty.yaml", "# rules to come\n");
    let (code, out, err) = check_promptly(&dir, vec![path.clone()]);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert_eq!(
        err,
        format!(
            "{}:1: warning: the policy allows no destination (no EgressRule or Service in any \
             file): every connection outside the bypass ranges and DNS will be denied\n",
            path.display()
        )
    );
    assert!(out.contains("\nrules: 0\n"), "{out}");
}

/// A policy the kernel maps could not hold fails the check, as it would fail `egress run`:
/// a port range over every port, in more scopes than its keys fit; nothing goes to stdout.
#[test]
fn a_port_range_too_wide_for_its_scopes_fails_the_check_naming_the_rule() {
    let dir = TempDir::new("check");
    let mut yaml = String::from(
        "kind: EgressRule\nmetadata: {name: every-port}\nspec:\n  destination: {service: \
         192.0.2.0/24}\n  ports:\n    - {port: 1, endPort: 65535, protocol: tcp}\n",
    );
    for i in 0..20 {
        yaml.push_str(&format!(
            "---\nkind: EgressRule\nmetadata: {{name: web, namespace: ns{i}}}\nspec:\n  \
             destination: {{service: 198.51.100.0/24}}\n  ports: [{{port: 443, protocol: tcp}}]\n"
        ));
    }
    let path = dir.file("wide.yaml", &yaml);
    let (code, out, err) = check(&check_files(vec![path.clone()], resolv_conf(&dir)));
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "egress check: rule `every-port` ({}:1): ports 1-65535/tcp take the policy past \
             1048576 rule keys (a range needs one key per port, destination and scope, here 22 \
             scopes); narrow the range or the scopes it is in\n",
            path.display()
        )
    );
    // In one scope it fits, and shows as a range.
    let one = dir.file(
        "one.yaml",
        &yaml[..yaml.find("---").expect("a second document")],
    );
    let (code, out, err) = check(&check_files(vec![one], resolv_conf(&dir)));
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    assert!(
        out.contains("every-port  192.0.2.0/24  1-65535/tcp  "),
        "{out}"
    );
}
