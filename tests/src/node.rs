//! [`Node`]: a Kubernetes node's container runtime around a [`Sandbox`], for the pods tests
//! (`cargo xtask test --step pods`, which installs the Debian packages it runs).
//!
//! - containerd (with runc and the CNI plugins) runs with its root, state, socket, CNI
//!   configuration and logs in the sandbox's temporary directory, inside the sandbox's
//!   network namespace (`nsenter --net`, not `ip netns exec`, which would remount `/sys` and
//!   hide the cgroup mounts);
//! - pods are created through the CRI (`k8s-cri`, containerd's gRPC API), as kubelet does:
//!   `RunPodSandbox`, then one container; [`Pod::exec`] runs a command in it (`ExecSync`);
//! - their network is the CNI `ptp` plugin: a veth pair from each pod into the node's
//!   namespace, the pod's address from `203.0.113.192/26` (TEST-NET-3, more specific than the
//!   sandbox's `203.0.113.0/24`), its default route to the node's end. The node's own
//!   addresses (192.0.2.1, ...) are reachable from a pod, nothing else is: the node's
//!   namespace has no route out;
//! - their cgroups are below the sandbox's cgroup (`cgroup_parent`), the managed cgroup of
//!   an agent started on the sandbox, as kubepods is on a node;
//! - the one image (Debian's static busybox, `FROM scratch`, built offline with buildah's vfs
//!   driver and imported with `ctr`) is both the pause image and the workload's.
//!
//! Everything is removed on drop, also when the test fails: the pods (through the CRI), the
//! shims and containerd, the mounts below the temporary directory, and the cgroups the
//! runtime made in the cgroup v1 hierarchies (the sandbox removes its cgroup v2 tree).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest, DnsConfig,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest, VersionRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

use crate::{Sandbox, eventually, run_ok};

/// The image every pod runs (and its pause container): static busybox.
pub const IMAGE: &str = "localhost/egress-test-busybox:1";
/// The pods' addresses (TEST-NET-3; the `ptp` plugin's host-local range).
pub const POD_SUBNET: &str = "203.0.113.192/26";

/// A container runtime on a sandbox; see the module documentation.
pub struct Node<'a> {
    sandbox: &'a Sandbox,
    dir: PathBuf,
    socket: PathBuf,
    containerd: Option<Child>,
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    pods: Vec<String>,
    /// The nameservers of the pods created from now on (the CRI's `dns_config`, which
    /// containerd writes into the pod's resolv.conf); none: containerd's default.
    pub dns_servers: Vec<String>,
}

/// A pod sandbox with one running container.
pub struct Pod {
    /// The pod sandbox's id.
    pub id: String,
    /// Its container's id.
    pub container: String,
    /// `namespace/name`.
    pub name: String,
    /// The container's cgroup (cgroup v2 id), as the kernel's events name it.
    pub cgroup_id: u64,
    /// The pod's address, which the CNI gave it.
    pub ip: std::net::IpAddr,
    /// Its container's first process, on the host.
    pub pid: u32,
    /// When `RunPodSandbox` returned: the sandbox was ready (its network and cgroup made),
    /// its container not created yet.
    pub sandbox_ready: (Instant, std::time::SystemTime),
}

impl Pod {
    /// The pod's network namespace, for `nsenter --net` (through its container's process).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// Its container's cgroup directory (cgroup v2), whose `cgroup.procs` a process joins to
    /// be one of the pod's, as the kernel and the agent see it.
    pub fn cgroup_dir(&self) -> PathBuf {
        cgroup_dir_of(u64::from(self.pid))
    }
}

/// What a command run in a pod did.
#[derive(Debug)]
pub struct Exec {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl<'a> Node<'a> {
    /// Starts containerd on `sandbox` and imports the image. Panics with containerd's log when
    /// it does not answer.
    pub fn start(sandbox: &'a Sandbox) -> Self {
        Self::start_with_subnet(sandbox, POD_SUBNET)
    }

    /// [`Node::start`], the pods' addresses from `subnet` (for more pods than [`POD_SUBNET`]
    /// holds).
    pub fn start_with_subnet(sandbox: &'a Sandbox, subnet: &str) -> Self {
        let dir = sandbox.dir("node");
        for sub in ["root", "state", "cni", "ipam", "logs", "buildah"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("creating {}/{sub}: {e}", dir.display()));
        }
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(&config, containerd_config(&dir, &socket)).expect("writing containerd's config");
        fs::write(dir.join("cni/10-pods.conflist"), cni_config(&dir, subnet))
            .expect("writing the CNI config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd's log");
        let containerd = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", sandbox.name))
            .arg("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting containerd: {e} (`cargo xtask test --step pods` installs it)")
            });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the CRI client");
        let client = runtime
            .block_on(async { RuntimeServiceClient::new(egress_user::cri::channel(&socket)) });
        let node = Self {
            sandbox,
            dir,
            socket,
            containerd: Some(containerd),
            runtime,
            client,
            pods: Vec::new(),
            dns_servers: Vec::new(),
        };
        let answered = eventually(Duration::from_secs(30), || {
            let mut client = node.client.clone();
            node.runtime
                .block_on(client.version(VersionRequest {
                    version: "v1".into(),
                }))
                .is_ok()
        });
        assert!(
            answered,
            "containerd did not answer on its CRI socket within 30 s; {}",
            node.log()
        );
        node.import_image();
        node
    }

    /// containerd's CRI socket (what `egress run --cri-socket` takes).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A second CRI socket in front of containerd's that answers the first client at once and
    /// every later one only after `delay`: a runtime slow to answer an agent's pod watch (its
    /// second client, after the listing at start). Removed on drop.
    pub fn slow_socket(&self, delay: Duration) -> SlowSocket {
        SlowSocket::start(self.dir.join("slow.sock"), self.socket.clone(), delay)
    }

    /// containerd's log so far, for failure messages.
    pub fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        format!(
            "containerd's log ({}), last lines:\n{}",
            self.dir.join("containerd.log").display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Builds [`IMAGE`] with buildah (offline, `FROM scratch`) and imports it into containerd.
    fn import_image(&self) {
        let storage = self.dir.join("buildah");
        let buildah = || {
            let mut cmd = Command::new("buildah");
            cmd.args(["--storage-driver", "vfs", "--root"])
                .arg(storage.join("root"))
                .arg("--runroot")
                .arg(storage.join("run"));
            cmd
        };
        let container = run_ok(buildah().args(["from", "scratch"]), "buildah from scratch");
        let container = container.trim();
        run_ok(
            buildah().args(["copy", container, "/bin/busybox", "/bin/busybox"]),
            "buildah copy busybox",
        );
        run_ok(
            buildah().args([
                "config",
                "--cmd",
                "/bin/busybox sleep 2147483647",
                container,
            ]),
            "buildah config",
        );
        run_ok(
            buildah().args(["commit", "-q", container, IMAGE]),
            "buildah commit",
        );
        let archive = self.dir.join("image.tar");
        run_ok(
            buildah()
                .args(["push", IMAGE])
                .arg(format!("oci-archive:{}:{IMAGE}", archive.display())),
            "buildah push",
        );
        run_ok(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(&archive),
            "ctr images import",
        );
    }

    /// Runs a pod `namespace/name` (a uid of its own) whose container sleeps, and waits until
    /// it runs.
    pub fn pod(&mut self, namespace: &str, name: &str) -> Pod {
        let uid = format!("{}-{namespace}-{name}", self.sandbox.name);
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            dns_config: (!self.dns_servers.is_empty()).then(|| DnsConfig {
                servers: self.dns_servers.clone(),
                searches: Vec::new(),
                options: vec!["timeout:2".into(), "attempts:2".into()],
            }),
            log_directory: self.dir.join("logs").join(&uid).display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/kubepods/pod{uid}", self.cgroup_parent()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut client = self.client.clone();
        let id = self
            .runtime
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox {namespace}/{name}: {e}; {}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        let sandbox_ready = (Instant::now(), std::time::SystemTime::now());
        self.pods.push(id.clone());
        let container = self
            .runtime
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "main".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: IMAGE.into(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/busybox".into(), "sleep".into(), "2147483647".into()],
                    log_path: "main.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config),
            }))
            .unwrap_or_else(|e| {
                panic!("CreateContainer in {namespace}/{name}: {e}; {}", self.log())
            })
            .into_inner()
            .container_id;
        self.runtime
            .block_on(client.start_container(StartContainerRequest {
                container_id: container.clone(),
            }))
            .unwrap_or_else(|e| {
                panic!("StartContainer in {namespace}/{name}: {e}; {}", self.log())
            });
        let status = self
            .runtime
            .block_on(client.container_status(ContainerStatusRequest {
                container_id: container.clone(),
                verbose: true,
            }))
            .unwrap_or_else(|e| panic!("ContainerStatus in {namespace}/{name}: {e}"))
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(status.info.get("info").map_or("{}", String::as_str))
                .expect("ContainerStatus info is JSON");
        let pid = info["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no pid in the container's status: {info}"));
        let sandbox = self
            .runtime
            .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            }))
            .unwrap_or_else(|e| panic!("PodSandboxStatus {namespace}/{name}: {e}"))
            .into_inner();
        let ip = sandbox
            .status
            .and_then(|s| s.network)
            .and_then(|n| n.ip.parse().ok())
            .unwrap_or_else(|| panic!("{namespace}/{name} has no address from the CNI"));
        Pod {
            ip,
            pid: u32::try_from(pid).expect("a pid"),
            cgroup_id: cgroup_id_of(pid),
            sandbox_ready,
            id,
            container,
            name: format!("{namespace}/{name}"),
        }
    }

    /// `nc` from the pod's busybox to `addr`: exit 0 once connected (the sinks close at once),
    /// non-zero with the reason on stderr when refused.
    pub fn connect(&self, pod: &Pod, addr: std::net::SocketAddr) -> Exec {
        self.exec(
            pod,
            &[
                "/bin/busybox",
                "nc",
                "-w",
                "3",
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ],
            Duration::from_secs(10),
        )
    }

    /// Asserts that the pod connects to `addr`.
    pub fn assert_connects(&self, pod: &Pod, addr: std::net::SocketAddr) {
        let out = self.connect(pod, addr);
        assert_eq!(out.exit_code, 0, "{} to {addr}: {out:?}", pod.name);
    }

    /// Asserts that the pod's connect() to `addr` fails with EPERM.
    pub fn assert_refused(&self, pod: &Pod, addr: std::net::SocketAddr) {
        let out = self.connect(pod, addr);
        assert_ne!(
            out.exit_code, 0,
            "{} to {addr} connected: {out:?}",
            pod.name
        );
        assert!(
            out.stderr.contains("Operation not permitted"),
            "{} to {addr}: refused at connect() with EPERM, not {out:?}",
            pod.name
        );
    }

    /// Runs `argv` in the pod's container (the CRI's `ExecSync`, at most `timeout`).
    pub fn exec(&self, pod: &Pod, argv: &[&str], timeout: Duration) -> Exec {
        let mut client = self.client.clone();
        let out = self
            .runtime
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: pod.container.clone(),
                cmd: argv.iter().map(|a| (*a).to_owned()).collect(),
                timeout: timeout.as_secs() as i64,
            }))
            .unwrap_or_else(|e| panic!("ExecSync {argv:?} in {}: {e}; {}", pod.name, self.log()))
            .into_inner();
        Exec {
            exit_code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stops and removes a pod, as kubelet does when it is deleted.
    pub fn delete(&mut self, pod: Pod) {
        self.remove(&pod.id);
        self.pods.retain(|id| *id != pod.id);
    }

    fn remove(&self, id: &str) {
        let mut client = self.client.clone();
        let stop = self
            .runtime
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }));
        let remove = self
            .runtime
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }));
        if let Err(e) = stop.map(drop).and(remove.map(drop)) {
            eprintln!("cleanup: removing pod sandbox {id}: {e}");
        }
    }

    /// The pods' cgroup parent, relative to the cgroup root: the sandbox's cgroup.
    fn cgroup_parent(&self) -> String {
        let root = egress_user::cgroup::cgroup2_mount().expect("a cgroup v2 mount");
        let relative = self
            .sandbox
            .cgroup
            .strip_prefix(&root)
            .expect("the sandbox's cgroup is below the cgroup v2 mount");
        format!("/{}", relative.display())
    }
}

impl Drop for Node<'_> {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.pods) {
            self.remove(&id);
        }
        if let Some(mut containerd) = self.containerd.take() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(containerd.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(containerd.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = containerd.kill();
            let _ = containerd.wait();
        }
        // The shims outlive containerd; theirs are the ones started with this socket.
        let _ = Command::new("pkill")
            .args(["-9", "-f"])
            .arg(format!("containerd-shim.*{}", self.socket.display()))
            .status();
        unmount_below(&self.dir);
        remove_v1_cgroups(&self.cgroup_parent());
    }
}

/// The cgroup v2 id (the directory's inode) of process `pid`'s cgroup.
fn cgroup_id_of(pid: u64) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let dir = cgroup_dir_of(pid);
    fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
}

/// The cgroup v2 directory of process `pid`.
fn cgroup_dir_of(pid: u64) -> PathBuf {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/cgroup: {e}"));
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/{pid}/cgroup: {text}"));
    egress_user::cgroup::cgroup2_mount()
        .expect("a cgroup v2 mount")
        .join(path.trim_start_matches('/'))
}

/// Unmounts everything mounted below `dir` (the snapshots, the pods' shm), deepest first.
fn unmount_below(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// Removes the cgroups the runtime made below `parent` in the cgroup v1 hierarchies of a
/// hybrid layout (runc makes the pods' cgroups in every one).
fn remove_v1_cgroups(parent: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(parent.trim_start_matches('/'));
        if dir.is_dir() && !dir.join("cgroup.controllers").exists() {
            remove_tree(&dir);
            // The runtime made its parents too; the last pods test to finish removes them
            // (a parent another test still uses is not empty, and stays).
            for ancestor in dir.ancestors().skip(1) {
                if ancestor == hierarchy.path() || fs::remove_dir(ancestor).is_err() {
                    break;
                }
            }
        }
    }
}

/// Removes a tree of cgroup directories, leaves first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("cleanup: removing {}: {e}", dir.display());
    }
}

/// containerd's configuration: everything in `dir`, the CRI plugin as the facts of this
/// machine kind need it (see docs/testing.md).
fn containerd_config(dir: &Path, socket: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # runc cannot write oom_score_adj here (no CAP_SYS_RESOURCE in the bounding set).
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
"#,
        socket = socket.display()
    )
}

/// The pods' network: the `ptp` plugin with host-local addresses from `subnet`.
fn cni_config(dir: &Path, subnet: &str) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "egress-test-pods",
  "plugins": [
    {{
      "type": "ptp",
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{}/ipam",
        "ranges": [[{{"subnet": "{subnet}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }}
  ]
}}
"#,
        dir.display()
    )
}

/// See [`Node::slow_socket`]: forwards each connection to the runtime's socket on its own
/// threads, holding back every one but the first for the delay.
pub struct SlowSocket {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How many held-back connections have been let through.
    let_through: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl SlowSocket {
    fn start(path: PathBuf, runtime: PathBuf, delay: Duration) -> Self {
        use std::{
            os::unix::net::{UnixListener, UnixStream},
            sync::{
                Arc,
                atomic::{AtomicBool, AtomicUsize, Ordering},
            },
        };
        let _ = fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let let_through = Arc::new(AtomicUsize::new(0));
        let counted = let_through.clone();
        let accept = std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let runtime = runtime.clone();
                let counted = counted.clone();
                std::thread::spawn(move || {
                    if n > 0 {
                        std::thread::sleep(delay);
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    let Ok(upstream) = UnixStream::connect(&runtime) else {
                        return;
                    };
                    let pipe = |mut from: UnixStream, mut to: UnixStream| {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        })
                    };
                    let (Ok(c), Ok(u)) = (client.try_clone(), upstream.try_clone()) else {
                        return;
                    };
                    pipe(c, upstream);
                    pipe(u, client);
                });
            }
        });
        Self {
            path,
            stop,
            let_through,
            accept: Some(accept),
        }
    }

    /// The socket's path (what `egress run --cri-socket` takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many held-back clients have been let through to the runtime so far.
    pub fn let_through(&self) -> usize {
        self.let_through.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SlowSocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}
