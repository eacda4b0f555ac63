//! `cargo xtask test --step deploy`: the Kubernetes manifests in `deploy/`, checked offline.
//!
//! No cluster and no network: the manifests are validated against the Kubernetes OpenAPI
//! schemas that the PyPI package `kubernetes-validate` ships, in strict mode (unknown fields
//! fail), for each version in [`KUBERNETES_VERSIONS`]. Then `deploy.py lint` checks what the
//! schemas cannot (duplicate keys, selectors, volume names, references between objects).
//!
//! So that the validator cannot pass everything unnoticed, each broken manifest in
//! `deploy/testdata/invalid/` must be rejected, with the message its `# expect:` lines name.
//! Then the policy documents of the ConfigMap are extracted and checked with `egress check`,
//! as the agent in the pod would read them. Last, seed 003's EgressRules with our apiVersion
//! added are checked against the schema of `deploy/crds.yaml` (`deploy.py crs`,
//! closed to unknown fields as strict field validation is) and with `egress check`, and each
//! file of broken objects in `deploy/testdata/invalid-egressrules/` must be refused by the
//! schema check with the messages it names.
//!
//! The validator lives in a venv under `target/deploy-tools/venv`, installed with the exact
//! versions in [`REQUIREMENTS`] and reused while its stamp file matches them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::env::{self, ChildEnv};

/// The validator and its dependencies, every version exact, so that a rerun on a new
/// machine validates with the same schemas and the same YAML loader.
const REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.3",
    "PyYAML==6.0.3",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];
/// What `kubernetes-validate --version` prints for the version in [`REQUIREMENTS`].
const VALIDATOR_VERSION: &str = "1.37.0";
/// The Kubernetes versions whose schemas every manifest must pass: an old release still in
/// wide use, and the newest the validator ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
/// The manifest holding the agent's policy, and the ConfigMap's name in it.
const POLICY_MANIFEST: &str = "configmap.yaml";
const POLICY_CONFIGMAP: &str = "egress-policy";
/// Seed 003's EgressRules, which must apply as objects with only our apiVersion added.
const SEED_003: &str = "egress-user/src/policy/seeds/tcp.yaml";
/// The CustomResourceDefinitions, whose schemas the example objects must match.
const CRDS_MANIFEST: &str = "crds.yaml";
/// The lint and extract helper, run with the venv's Python (which has PyYAML).
const HELPER: &str = include_str!("deploy.py");

/// Runs the step: install the validator, validate `deploy/*.yaml`, make sure each broken
/// manifest is rejected, and check the ConfigMap's policy with `egress check`.
pub fn run(child: &ChildEnv) -> Result<()> {
    let root = env::workspace_root();
    let deploy = root.join("deploy");
    let tools = root.join("target/deploy-tools");
    fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    let venv = install_validator(child, &tools)?;
    let helper = tools.join("deploy.py");
    fs::write(&helper, HELPER).with_context(|| format!("writing {}", helper.display()))?;
    let checker = Checker {
        validator: venv.join("bin/kubernetes-validate"),
        python: venv.join("bin/python"),
        helper,
    };

    // (b) The manifests, together (the lint resolves references across files).
    let manifests = yaml_files(&deploy)?;
    ensure!(
        !manifests.is_empty(),
        "no *.yaml manifests in {}",
        deploy.display()
    );
    let verdict = checker.check(child, &manifests)?;
    print!("{}", verdict.output);
    if !verdict.accepted {
        bail!(
            "the manifests in {} are invalid (see above)",
            deploy.display()
        );
    }
    report(&format!(
        "{} manifests valid (kubernetes-validate {VALIDATOR_VERSION}, strict, Kubernetes {}; lint)",
        manifests.len(),
        KUBERNETES_VERSIONS.join(", ")
    ));

    // (c) Each broken manifest alone must be rejected, for the reason it names.
    let invalid_dir = deploy.join("testdata/invalid");
    let invalid = yaml_files(&invalid_dir)?;
    ensure!(
        invalid.len() >= 2,
        "expected at least two broken manifests in {}, found {}",
        invalid_dir.display(),
        invalid.len()
    );
    for file in &invalid {
        let verdict = checker.check(child, std::slice::from_ref(file))?;
        let expected = rejected_as_expected(file, verdict.accepted, &verdict.output)?;
        report(&format!(
            "rejected as expected: {}: {}",
            relative(file),
            expected.join("; ")
        ));
    }

    // (d) The policy the pod would load, checked by the agent itself.
    let policy_dir = tools.join("policy");
    if policy_dir.exists() {
        fs::remove_dir_all(&policy_dir)
            .with_context(|| format!("removing {}", policy_dir.display()))?;
    }
    fs::create_dir_all(&policy_dir)
        .with_context(|| format!("creating {}", policy_dir.display()))?;
    let extracted = env::run_captured(
        checker
            .helper_command(child)
            .arg("extract")
            .arg(deploy.join(POLICY_MANIFEST))
            .arg(POLICY_CONFIGMAP)
            .arg(&policy_dir),
    )
    .with_context(|| format!("extracting the policy from deploy/{POLICY_MANIFEST}"))?;
    let files: Vec<&str> = extracted.lines().filter(|l| !l.is_empty()).collect();
    ensure!(
        !files.is_empty(),
        "ConfigMap {POLICY_CONFIGMAP} holds no policy file"
    );
    // Run from the policy directory so that errors name the ConfigMap's keys.
    env::run_streaming(
        child
            .command("cargo")
            .current_dir(&policy_dir)
            .args(["run", "--quiet", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .args(["-p", "egress-user", "--bin", "egress", "--", "check"])
            .args(&files),
    )
    .with_context(|| {
        format!(
            "`egress check` refused the policy of ConfigMap {POLICY_CONFIGMAP} in deploy/{POLICY_MANIFEST}"
        )
    })?;
    report(&format!(
        "policy of ConfigMap {POLICY_CONFIGMAP} ({} files: {}) passes `egress check`",
        files.len(),
        files.join(", ")
    ));
    // (e) Seed 003's EgressRules as objects against the CRD's schema, and with `egress check`;
    // the broken ones must be refused by the schema check, for the reasons they name.
    let crds = relative(&deploy.join(CRDS_MANIFEST));
    // Seed 003's EgressRules as Istio wrote them, with only our apiVersion added: what users
    // apply (`kubectl apply -n default -f`), made from the one copy of the seed.
    let examples_dir = tools.join("examples");
    fs::create_dir_all(&examples_dir)
        .with_context(|| format!("creating {}", examples_dir.display()))?;
    let seed = root.join(SEED_003);
    let seed_text =
        fs::read_to_string(&seed).with_context(|| format!("reading {}", seed.display()))?;
    let example = examples_dir.join("seed-003.yaml");
    fs::write(&example, with_api_version(&seed_text))
        .with_context(|| format!("writing {}", example.display()))?;
    let (ok, output) = run_combined(
        checker
            .helper_command(child)
            .arg("crs")
            .arg(&crds)
            .arg(relative(&example)),
    )?;
    print!("{output}");
    ensure!(
        ok,
        "seed 003's EgressRules do not match the schemas of {crds}"
    );
    env::run_streaming(
        child
            .command("cargo")
            .args([
                "run",
                "--quiet",
                "-p",
                "egress-user",
                "--bin",
                "egress",
                "--",
                "check",
            ])
            .arg(relative(&example)),
    )
    .context("`egress check` refused seed 003's EgressRules as objects")?;
    let broken = yaml_files(&deploy.join("testdata/invalid-egressrules"))?;
    ensure!(
        !broken.is_empty(),
        "no broken objects in deploy/testdata/invalid-egressrules"
    );
    for file in &broken {
        let (ok, output) = run_combined(
            checker
                .helper_command(child)
                .arg("crs")
                .arg(&crds)
                .arg(relative(file)),
        )?;
        let expected = rejected_as_expected(file, ok, &output)?;
        report(&format!(
            "rejected as expected: {}: {}",
            relative(file),
            expected.join("; ")
        ));
    }
    report(&format!(
        "seed 003's EgressRules ({SEED_003}) with our apiVersion match {crds} and pass `egress check`"
    ));
    report(&format!(
        "ok: {} manifests valid, {} broken manifests rejected, policy and examples checked",
        manifests.len(),
        invalid.len() + broken.len()
    ));
    Ok(())
}

/// Fails unless the broken `file` was refused (`accepted` false) with every message its
/// `# expect:` lines name (printing `output` when not); returns those messages. A file naming
/// none is an error: it could not tell one refusal from another.
fn rejected_as_expected(file: &Path, accepted: bool, output: &str) -> Result<Vec<String>> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let expected = expectations(&text);
    ensure!(
        !expected.is_empty(),
        "{} names no expected error (a `# expect: MESSAGE` line)",
        file.display()
    );
    if accepted {
        print!("{output}");
        bail!(
            "the checks accepted the broken file {}, so their verdict on deploy/ cannot be \
             trusted",
            relative(file)
        );
    }
    if let Some(message) = expected.iter().find(|m| !output.contains(m.as_str())) {
        print!("{output}");
        bail!(
            "{} was rejected, but not with {message:?}: it may be broken in another way",
            relative(file)
        );
    }
    Ok(expected)
}

/// `text` with `apiVersion: egress.dev/v1alpha1` before each `kind: EgressRule` line.
fn with_api_version(text: &str) -> String {
    text.lines()
        .map(|line| {
            if line == "kind: EgressRule" {
                format!("apiVersion: egress.dev/v1alpha1\n{line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

/// Prints one line of the step's own output.
fn report(line: &str) {
    println!("deploy: {line}");
}

/// `path` relative to the workspace root, for messages.
fn relative(path: &Path) -> String {
    path.strip_prefix(env::workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The `*.yaml` files directly in `dir`, in name order.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The venv with the validator, installed unless its stamp shows the pinned requirements and
/// the validator reports its version.
fn install_validator(child: &ChildEnv, tools: &Path) -> Result<PathBuf> {
    let item = format!("kubernetes-validate {VALIDATOR_VERSION}");
    let venv = tools.join("venv");
    let stamp = venv.join("egress-requirements.txt");
    let wanted = requirements_text();
    let validator = venv.join("bin/kubernetes-validate");
    let why = match fs::read_to_string(&stamp) {
        Ok(found) if found == wanted => match validator_version(child, &validator) {
            Ok(version) if version == VALIDATOR_VERSION => {
                report(&format!("{item}: ok (present in {})", relative(&venv)));
                return Ok(venv);
            }
            Ok(version) => format!("found version {version}"),
            Err(error) => format!("{error:#}"),
        },
        Ok(_) => "the pinned requirements changed".to_owned(),
        Err(_) => "not installed".to_owned(),
    };
    report(&format!(
        "{item}: installing into {} ({why})",
        relative(&venv)
    ));
    let started = Instant::now();
    env::run_streaming(
        child
            .command("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .context("creating the validator's venv (needs python3 with the venv module)")?;
    let requirements = tools.join("requirements.txt");
    fs::write(&requirements, &wanted)
        .with_context(|| format!("writing {}", requirements.display()))?;
    env::run_streaming(
        child
            .command(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--requirement")
            .arg(&requirements),
    )
    .context("installing the validator from PyPI")?;
    env::check_installed(&validator, VALIDATOR_VERSION, |v| {
        validator_version(child, v)
    })?;
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    report(&format!("{item}: installed in {:.0?}", started.elapsed()));
    Ok(venv)
}

/// [`REQUIREMENTS`] as a pip requirements file.
fn requirements_text() -> String {
    REQUIREMENTS.iter().map(|r| format!("{r}\n")).collect()
}

/// What `kubernetes-validate --version` prints, trimmed.
fn validator_version(child: &ChildEnv, validator: &Path) -> Result<String> {
    Ok(
        env::run_captured(child.command(validator).arg("--version"))?
            .trim()
            .to_owned(),
    )
}

/// The two checks every manifest set goes through.
struct Checker {
    validator: PathBuf,
    python: PathBuf,
    helper: PathBuf,
}

/// What [`Checker::check`] concluded, and everything the checks printed.
struct Verdict {
    accepted: bool,
    output: String,
}

impl Checker {
    fn helper_command(&self, child: &ChildEnv) -> Command {
        let mut command = child.command(&self.python);
        command.arg(&self.helper);
        command
    }

    /// Validates `files` against the schemas of every Kubernetes version, strictly, and
    /// lints them as one set.
    fn check(&self, child: &ChildEnv, files: &[PathBuf]) -> Result<Verdict> {
        let mut schema = child.command(&self.validator);
        schema.arg("--strict");
        for version in KUBERNETES_VERSIONS {
            schema.args(["--kubernetes-version", version]);
        }
        // Relative names: the messages then read `deploy/daemonset.yaml ...`.
        schema.args(files.iter().map(|f| relative(f)));
        let (schema_ok, schema_out) = run_combined(&mut schema)?;
        let report = SchemaReport::read(&schema_out);
        let schema_accepted = schema_ok
            && report.problems.is_empty()
            && report.passed >= files.len() * KUBERNETES_VERSIONS.len();

        let mut lint = self.helper_command(child);
        lint.arg("lint").args(files.iter().map(|f| relative(f)));
        let (lint_ok, lint_out) = run_combined(&mut lint)?;

        let mut output = schema_out;
        if !schema_accepted && report.problems.is_empty() {
            // Nothing failed, yet something is missing: say so rather than leave it silent.
            output.push_str(&format!(
                "kubernetes-validate passed {} resources; expected at least one per file and \
                 version ({})\n",
                report.passed,
                files.len() * KUBERNETES_VERSIONS.len()
            ));
        }
        output.push_str(&lint_out);
        Ok(Verdict {
            accepted: schema_accepted && lint_ok,
            output,
        })
    }
}

/// Runs `command` and returns whether it succeeded, with its stdout then its stderr.
fn run_combined(command: &mut Command) -> Result<(bool, String)> {
    let output = command
        .output()
        .with_context(|| format!("starting {}", env::describe(command)))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

/// kubernetes-validate's output, line by line.
///
/// Only `INFO FILE passed for resource ...` means a resource passed. Everything else counts
/// against the manifests, the `WARN` lines above all: for a kind or apiVersion it has no
/// schema for, the validator warns and still exits 0.
#[derive(Debug, Default, PartialEq, Eq)]
struct SchemaReport {
    passed: usize,
    problems: Vec<String>,
}

impl SchemaReport {
    fn read(output: &str) -> Self {
        let mut report = Self::default();
        for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.starts_with("INFO ") && line.contains(" passed for resource ") {
                report.passed += 1;
            } else {
                report.problems.push(line.to_owned());
            }
        }
        report
    }
}

/// The messages a broken manifest's `# expect: MESSAGE` lines name, in order.
fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.trim_start()
                .strip_prefix('#')?
                .trim_start()
                .strip_prefix("expect:")
        })
        .map(str::trim)
        .filter(|message| !message.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_info_passed_lines_count_as_passed() {
        let report = SchemaReport::read(
            "INFO deploy/a.yaml passed for resource namespace/egress-system against version 1.30\n\
             \n\
             INFO deploy/a.yaml passed for resource daemonset/egress against version 1.37\n",
        );
        assert_eq!(
            report,
            SchemaReport {
                passed: 2,
                problems: vec![]
            }
        );
    }

    #[test]
    fn warnings_errors_and_anything_else_are_problems() {
        let lines = [
            "WARN b.yaml Couldn't find schema for kind DaemonSet with api version app/v1 for kubernetes version 1.30",
            "ERROR b.yaml did not validate for resource daemonset/x against version 1.30: spec: 'selector' is a required property",
            "FATAL kubernetes-validate 1.37.0 does not support kubernetes version 9.0",
            "Couldn't parse YAML from file b.yaml: mapping values are not allowed here",
            "INFO b.yaml something else",
        ];
        let report = SchemaReport::read(&lines.join("\n"));
        assert_eq!(report.passed, 0);
        assert_eq!(report.problems, lines);
    }

    #[test]
    fn expectations_are_the_expect_comment_lines() {
        let text = "# A wrong type.\n\
                    # expect: 'thirty' is not of type 'integer'\n\
                    #   expect:   second one  \n\
                    # expect:\n\
                    apiVersion: apps/v1\n\
                    kind: DaemonSet # expect: not a whole-line comment\n";
        assert_eq!(
            expectations(text),
            ["'thirty' is not of type 'integer'", "second one"]
        );
        assert!(expectations("apiVersion: v1\nkind: ConfigMap\n").is_empty());
    }

    #[test]
    fn requirements_pin_every_package_exactly_and_include_the_validator() {
        for requirement in REQUIREMENTS {
            let (name, version) = requirement
                .split_once("==")
                .unwrap_or_else(|| panic!("{requirement} is not pinned with =="));
            assert!(!name.is_empty() && !version.is_empty(), "{requirement}");
        }
        assert!(
            REQUIREMENTS.contains(&format!("kubernetes-validate=={VALIDATOR_VERSION}").as_str())
        );
        assert_eq!(requirements_text().lines().count(), REQUIREMENTS.len());
    }

    /// The step's inputs are in the repository: a test fails here, in seconds, before the
    /// step would (for example after a rename).
    #[test]
    fn deploy_manifests_and_broken_examples_are_present() {
        let deploy = env::workspace_root().join("deploy");
        let manifests = yaml_files(&deploy).unwrap();
        assert!(manifests.iter().any(|f| f.ends_with(POLICY_MANIFEST)));
        let invalid = yaml_files(&deploy.join("testdata/invalid")).unwrap();
        assert!(invalid.len() >= 2);
        for file in invalid {
            let text = fs::read_to_string(&file).unwrap();
            assert!(
                !expectations(&text).is_empty(),
                "{} has no `# expect:` line",
                file.display()
            );
        }
    }
}
