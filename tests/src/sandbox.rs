//! [`Sandbox`]: one test's private world (a network namespace with no route out, a cgroup, a
//! pin directory, a run directory and a temporary directory), removed on drop, even when the
//! test fails; and the `egress run` arguments that keep an agent inside it.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::sh;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One test's private world: a network namespace, a cgroup and a pin directory, unique to
/// this process and test, removed on drop.
pub struct Sandbox {
    /// Namespace name (also the leaf name of the cgroup and pin directory).
    pub name: String,
    /// The managed cgroup for this test.
    pub cgroup: PathBuf,
    /// The pin directory for this test.
    pub pin_dir: PathBuf,
    /// The agent's state directory and control socket live here (`state/`, `egress.sock`).
    pub run_dir: PathBuf,
    /// The test's temporary directory (policies, resolv.conf, hosts files, ...), removed with
    /// the sandbox: [`Sandbox::dir`], [`Sandbox::tmp`].
    tmp: tempfile::TempDir,
}

impl Sandbox {
    /// Creates the sandbox. Panics (with the reason) when not root or the kernel lacks
    /// something the tests need: these tests never skip silently.
    pub fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the integration tests load eBPF programs and must run as root (use `cargo xtask test`)"
        );
        let name = format!(
            "egt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // 0755 as a directory made with create_dir_all would be, not TempDir's 0700: some
        // workloads read files here after dropping root.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .permissions(fs::Permissions::from_mode(0o755))
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory: {e}"));
        sh(&["ip", "netns", "add", &name]);
        let sandbox = Self {
            tmp,
            cgroup: egress_user::cgroup::cgroup2_mount()
                .expect("the tests need a cgroup v2 mount")
                .join("egress-tests")
                .join(&name),
            pin_dir: Path::new(egress_user::loader::BPFFS_MOUNT)
                .join("egress-tests")
                .join(&name),
            run_dir: Path::new("/run/egress-tests").join(&name),
            name,
        };
        // From here on Drop cleans up whatever was made.
        let n = sandbox.name.as_str();
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        // A veth pair with both ends inside the namespace: somewhere to put addresses, and no
        // way out of the namespace (this kernel has no dummy driver).
        sh(&[
            "ip", "-n", n, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        sh(&["ip", "-n", n, "link", "set", "d0", "up"]);
        sh(&["ip", "-n", n, "link", "set", "d1", "up"]);
        for addr in ["192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24"] {
            sh(&["ip", "-n", n, "addr", "add", addr, "dev", "d0"]);
        }
        for addr in ["2001:db8::1/64", "2001:db8:1::1/64"] {
            sh(&[
                "ip", "-n", n, "-6", "addr", "add", addr, "dev", "d0", "nodad",
            ]);
        }
        fs::create_dir_all(&sandbox.cgroup)
            .unwrap_or_else(|e| panic!("creating {}: {e}", sandbox.cgroup.display()));
        // bpffs is not mounted at boot: mount it as the agent does, so that a test which makes
        // or reads pins before any agent ran works on a fresh machine too.
        egress_user::loader::ensure_bpffs().unwrap_or_else(|e| {
            panic!(
                "mounting bpffs at {}: {e}",
                egress_user::loader::BPFFS_MOUNT
            )
        });
        sandbox
    }

    /// Writes the hosts file `ip netns exec` gives processes in this namespace
    /// (`/etc/netns/NAME/hosts`): made-up names for the test's own addresses.
    pub fn hosts(&self, lines: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        fs::create_dir_all(&dir).expect("creating /etc/netns/NAME");
        fs::write(
            dir.join("hosts"),
            format!("127.0.0.1 localhost\n::1 localhost\n{lines}\n"),
        )
        .expect("writing hosts");
    }

    /// Adds many addresses at once (`ip -batch`).
    pub fn add_addrs(&self, cidrs: &[String]) {
        let batch: String = cidrs
            .iter()
            .map(|c| format!("addr add {c} dev d0 nodad\n"))
            .collect();
        let file = self.tmp().join("addrs.batch");
        fs::write(&file, batch).expect("batch file");
        sh(&[
            "ip",
            "-n",
            &self.name,
            "-batch",
            file.to_str().expect("utf-8"),
        ]);
    }

    /// Adds an address to the sandbox's interface (`ip addr add ... dev d0`).
    pub fn add_addr(&self, cidr: &str) {
        sh(&[
            "ip", "-n", &self.name, "addr", "add", cidr, "dev", "d0", "nodad",
        ]);
    }

    /// The target for the loader.
    pub fn target(&self) -> egress_user::loader::Target {
        egress_user::loader::Target {
            pin_dir: self.pin_dir.clone(),
            cgroup: self.cgroup.clone(),
            xdp_ifaces: Vec::new(),
        }
    }

    /// The cgroup id of the managed cgroup.
    pub fn cgroup_id(&self) -> u64 {
        egress_user::cgroup::id(&self.cgroup).expect("cgroup id")
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// The sandbox's temporary directory, removed with it.
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// The directory `name` in the sandbox's temporary directory, created (with its parents)
    /// if it is not there yet: for a test's policies and other files, removed with the
    /// sandbox.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.tmp().join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    }

    /// Writes `yaml` as the file `name` in the sandbox's policy directory (`policies/` in its
    /// temporary directory) and returns its path.
    pub fn policy_file(&self, name: &str, yaml: &str) -> PathBuf {
        crate::policy_file(&self.dir("policies"), name, yaml)
    }

    /// The agent's state directory in this sandbox.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    /// The agent's control socket in this sandbox.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("egress.sock")
    }

    /// `egress run` arguments for this sandbox: `--policy POLICY`, its `--cgroup`,
    /// `--pin-dir`, `--state-dir` and `--socket` (unless `extra` has one), then `extra`. Every
    /// agent a test starts uses these, so none touches the host's default paths.
    pub fn run_args<'a>(&'a self, policy: &'a Path, extra: &[&'a str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--policy".into(),
            policy.display().to_string(),
            "--cgroup".into(),
            self.cgroup.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let given: Vec<&str> = extra.to_vec();
        args = self.agent_args_given(args, &given);
        args
    }

    /// `args` with this sandbox's `--state-dir`, `--socket` and `--resolv-conf` added, unless
    /// given.
    pub(crate) fn agent_args<S: AsRef<str>>(&self, args: &[S]) -> Vec<String> {
        let out: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let given: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        self.agent_args_given(out.clone(), &given)
    }

    fn agent_args_given(&self, mut out: Vec<String>, given: &[&str]) -> Vec<String> {
        let has = |flag: &str| {
            given
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !has("--state-dir") {
            out.push("--state-dir".into());
            out.push(self.state_dir().display().to_string());
        }
        if !has("--socket") {
            out.push("--socket".into());
            out.push(self.socket().display().to_string());
        }
        if !has("--resolv-conf") {
            // The host's resolv.conf would add its nameservers as a `(dns)` rule: the tests
            // see the same policy on every machine only with a resolv.conf of their own,
            // empty unless a test says otherwise.
            out.push("--resolv-conf".into());
            out.push(self.resolv_conf().display().to_string());
        }
        out
    }

    /// The sandbox's own resolv.conf (`--resolv-conf` of its agents), created empty: no DNS
    /// unless a test writes nameservers into it.
    pub fn resolv_conf(&self) -> PathBuf {
        let path = self.run_dir.join("resolv.conf");
        if !path.exists() {
            fs::create_dir_all(&self.run_dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", self.run_dir.display()));
            fs::write(&path, "# egress tests: no nameservers\n")
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        path
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = egress_user::loader::unload(&self.pin_dir) {
            eprintln!("cleanup: unloading {}: {e:#}", self.pin_dir.display());
        }
        let _ = fs::remove_dir(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.run_dir);
        let kill = self.cgroup.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(kill, "1");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cgroup.exists()
            && remove_cgroup_tree(&self.cgroup).is_err()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Removes a cgroup and the cgroups below it, deepest first (a cgroup with a child cannot be
/// removed): a test may leave one made by `egress run --create-cgroup` below its sandbox's.
fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)?.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path)
}
