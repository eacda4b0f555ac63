//! Hostile or mistaken input (issue 13): files that are not regular files or too large, CA
//! files that are not CA files, numbers that are not written in decimal, a bypass of
//! everything, a `%YAML` version we do not read, keyword values in any case, host names IDNA
//! folds, and an empty policy. Each refusal names `FILE:LINE`.

use std::path::{Path, PathBuf};

use super::{config::ConfigDir, *};
use crate::policy::ca::testing::{self as ca_testing, config_naming};
use crate::policy::read::{mkfifo, promptly};

/// The errors of loading `dir/policy/config.yaml` holding [`config_naming`] `ca`; never blocks
/// for more than 5 s.
fn ca_errors(files: &ConfigDir, ca: &str) -> Vec<String> {
    std::fs::write(&files.file, config_naming(ca)).expect("write");
    let file = files.file.clone();
    match promptly(move || load_files(&[file])) {
        Ok(policy) => panic!("{ca}: should be rejected, got:\n{policy}"),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn ca_files_that_cannot_be_ca_files_are_refused_at_their_line() {
    let files = ConfigDir::new("bad-ca");
    let f = files.file.display().to_string();
    let at = |message: &str| vec![format!("{f}:4: spec.caFiles[0]: CA file {message}")];

    let big = files.dir.join("big.pem");
    std::fs::File::create(&big)
        .and_then(|file| file.set_len(crate::policy::ca::MAX_CA_FILE_SIZE + 1))
        .expect("sparse file");
    let key = files.dir.join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let not_a_cert = files.dir.join("not-a-cert.pem");
    std::fs::write(
        &not_a_cert,
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");

    // A CA file named as it is, and the error it gets, quoting that name.
    let named = |ca: &str, why: &str| (ca.to_owned(), at(&format!("`{ca}`: {why}")));
    let path = |p: &Path| p.display().to_string();
    let mut cases: Vec<(String, Vec<String>)> = ca_testing::unusable(&files.dir)
        .into_iter()
        .map(|(ca, message)| (ca, at(&message)))
        .collect();
    cases.extend([
        named(
            &path(&big),
            "cannot read it: it is larger than the 4 MiB limit (4194305 bytes)",
        ),
        named(
            &path(&key),
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
        ),
        named(
            &path(&not_a_cert),
            "certificate 1 in it is not a usable CA certificate: ",
        ),
        // Relative to the policy file's directory, where there is no such file.
        (
            "ca.pem".to_owned(),
            at(&format!(
                "`ca.pem` ({}): cannot read it: No such file or directory (os error 2)",
                std::path::absolute(files.dir.join("policy/ca.pem"))
                    .expect("absolute")
                    .display()
            )),
        ),
    ]);
    for (ca, expected) in cases {
        let errors = ca_errors(&files, &ca);
        assert_eq!(errors.len(), 1, "{ca}: {errors:#?}");
        assert!(
            errors[0].starts_with(&expected[0]),
            "{ca}:\n{errors:#?}\n{expected:#?}"
        );
    }
}

#[test]
fn a_relative_ca_file_in_a_text_source_is_refused() {
    assert_rejected(
        &config_naming("certs/ca.pem"),
        "p.yaml:4: spec.caFiles[0]: `certs/ca.pem` is relative, and this policy is not a file it \
         could be relative to; give an absolute path",
    );
}

#[test]
fn a_policy_file_that_is_a_fifo_or_device_is_refused_without_blocking() {
    let files = ConfigDir::new("fifo-policy");
    let fifo = files.dir.join("fifo.yaml");
    mkfifo(&fifo);
    let paths = vec![fifo.clone(), PathBuf::from("/dev/zero")];
    let errors = promptly(move || load_files(&paths)).expect_err("refused");
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            format!(
                "{}:1: cannot read the policy file: it is a FIFO (named pipe), not a regular file",
                fifo.display()
            ),
            "/dev/zero:1: cannot read the policy file: it is a character device, not a regular \
             file"
                .to_owned(),
        ]
    );
    assert!(Path::new("/dev/zero").exists());
}

#[test]
fn ports_are_plain_decimal() {
    for (text, message) in [
        ("0x1bb", "`0x1bb` is not written in decimal; write 443"),
        ("0o673", "`0o673` is not written in decimal; write 443"),
        ("+443", "`+443` has a sign; write 443"),
        (
            "0443",
            "`0443` has a leading zero, which some YAML readers take as octal",
        ),
    ] {
        assert_rejected(
            &rule_with("443", text),
            &format!(
                "p.yaml:8: spec.ports[0].port: {message} (numbers are written in plain decimal \
                 here)"
            ),
        );
    }
    assert_eq!(
        loaded(&rule_with("443", "65535")).rules[0].ports[0].port,
        65535
    );
}

rejects! {
    bypass_everything_ipv4: "kind: EgressConfig\nspec:\n  bypass:\n    - 0.0.0.0/0\n"
        => "p.yaml:4: spec.bypass[0]: 0.0.0.0/0 would bypass every IPv4 destination: nothing \
            would be filtered, counted or reported there; to let traffic through while watching \
            it use `mode: audit`, and to stop filtering stop the agent";
    bypass_everything_ipv6: "kind: EgressConfig\nspec:\n  bypass: [127.0.0.0/8, \"::/0\"]\n"
        => "p.yaml:3: spec.bypass[1]: ::/0 would bypass every IPv6 destination";
    bypass_everything_in_halves: "kind: EgressConfig\nspec:\n  bypass: [0.0.0.0/1, 128.0.0.0/1]\n"
        => "p.yaml:3: spec.bypass: 0.0.0.0/0 would bypass every IPv4 destination";
    yaml_version_unknown: format!("%YAML 9.9\n---\n{RULE}")
        => "p.yaml:1: `%YAML 9.9`: policy files are YAML 1.2 (a `%YAML` directive may name 1.1 \
            or 1.2)";
    kind_is_a_name_not_a_keyword: RULE.replace("EgressRule", "egressrule")
        => "p.yaml:1: kind: unknown kind `egressrule`";
}

#[test]
fn wide_bypass_ranges_short_of_everything_load() {
    let policy = loaded("kind: EgressConfig\nspec:\n  bypass: [0.0.0.0/1, \"8000::/1\"]\n");
    assert_eq!(policy.bypass.len(), 2);
}

#[test]
fn yaml_1_1_and_1_2_directives_load() {
    for version in ["1.1", "1.2"] {
        let policy = loaded(&format!("%YAML {version}\n---\n{RULE}"));
        assert_eq!(policy.rules.len(), 1, "{version}");
    }
}

#[test]
fn keyword_values_are_read_in_any_case() {
    let policy = loaded(&format!(
        "kind: EgressConfig\nspec: {{mode: AUDIT, events: All}}\n---\n{}",
        rule_with("tcp", "TCP")
    ));
    assert_eq!(policy.mode, Mode::Audit);
    assert_eq!(policy.events, crate::policy::Events::All);
    assert_eq!(policy.rules[0].ports[0].protocol, Protocol::Tcp);
    assert_eq!(
        loaded("kind: EgressConfig\nspec: {mode: Enforce}\n").mode,
        Mode::Enforce
    );
}

#[test]
fn folded_host_names_are_refused_at_their_line() {
    let rule = "kind: EgressRule\nmetadata: {name: h}\nspec:\n  destination:\n    service: \
                \"exa\u{200b}mple.test\"\n  ports: [{port: 80, protocol: http}]\n";
    assert_rejected(
        rule,
        "p.yaml:5: spec.destination.service: `exa\\u{200b}mple.test` holds characters that IDNA \
         folds away (zero-width, fullwidth or other compatibility forms): it means \
         `example.test`; write that",
    );
}

#[test]
fn an_empty_policy_is_a_warning_not_an_error() {
    let warning = "the policy allows no destination (no EgressRule or Service in any file): \
                   every connection outside the bypass ranges and DNS will be denied";
    let empty = loaded("# nothing yet\n");
    assert_eq!(
        empty
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [format!("p.yaml:1: {warning}")]
    );
    // With an EgressConfig, the warning points at it.
    let config = loaded("# settings only\n---\nkind: EgressConfig\nspec: {mode: audit}\n");
    assert_eq!(
        config.warnings[0].to_string(),
        format!("p.yaml:3: {warning}")
    );
    assert!(loaded(RULE).warnings.is_empty());
}
