//! The pods on this node, from the container runtime's CRI socket (containerd's
//! `/run/containerd/containerd.sock`), as node agents such as Tetragon and Falco learn them:
//! every ready pod sandbox, its namespace, name and uid, and the cgroup its containers run
//! in, so that a kernel event's cgroup id can be named `namespace/pod`.
//!
//! The pod's cgroup is the sandbox's `cgroup_parent`, which the runtime reports in the
//! sandbox's verbose status: a path below the cgroup v2 root with the cgroupfs driver
//! (`/kubepods/besteffort/pod<uid>`), a slice name with the systemd driver
//! (`kubepods-besteffort-pod<uid>.slice`, nested as systemd nests slices). Its containers'
//! cgroups are the directories below it.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// A pod's identity, as events and logs name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One ready pod, where its cgroup is and its network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The runtime's id of the pod's sandbox.
    pub id: String,
    pub name: PodName,
    /// The pod's cgroup directory (below the cgroup v2 mount).
    pub cgroup: PathBuf,
    /// A path to the pod's network namespace (`/proc/PID/ns/net` of the sandbox's process, or
    /// the runtime's bind mount); `None` for a pod on the host's network.
    pub netns: Option<PathBuf>,
}

/// The cgroup ids of the pods' cgroups and of every cgroup below them (their containers'),
/// each with its pod.
pub type PodsByCgroup = HashMap<u64, Arc<PodName>>;

/// Why the pods could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("the container runtime at {socket}: {status}")]
    Call {
        socket: PathBuf,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("pod sandbox {id}: the runtime's status has no cgroup parent")]
    NoCgroup { id: String },
}

/// A CRI client on the runtime's socket. It connects when first used and again after the
/// runtime restarts.
#[derive(Clone)]
pub struct Runtime {
    socket: PathBuf,
    client: RuntimeServiceClient<Channel>,
    /// The pods of the last listing, by sandbox id: a ready sandbox's cgroup and network
    /// namespace do not change, so only new sandboxes cost a status call.
    known: HashMap<String, Pod>,
}

impl Runtime {
    /// A client for the runtime listening on `socket` (which need not exist yet).
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            client: RuntimeServiceClient::new(channel(socket)),
            known: HashMap::new(),
        }
    }

    /// The ready pods, with their cgroups below `cgroup_root` (the cgroup v2 mount).
    pub async fn pods(&mut self, cgroup_root: &Path) -> Result<Vec<Pod>, CriError> {
        let call = |status| CriError::Call {
            socket: self.socket.clone(),
            status: Box::new(status),
        };
        let sandboxes = self
            .client
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    state: Some(PodSandboxStateValue {
                        state: PodSandboxState::SandboxReady.into(),
                    }),
                    ..Default::default()
                }),
            })
            .await
            .map_err(call)?
            .into_inner()
            .items;
        let mut pods = Vec::with_capacity(sandboxes.len());
        for sandbox in sandboxes {
            if let Some(pod) = self.known.get(&sandbox.id) {
                pods.push(pod.clone());
                continue;
            }
            let Some(metadata) = sandbox.metadata else {
                continue;
            };
            let status = self
                .client
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.id.clone(),
                    verbose: true,
                })
                .await
                .map_err(call)?
                .into_inner();
            let info = status
                .info
                .get("info")
                .and_then(|info| serde_json::from_str::<serde_json::Value>(info).ok())
                .unwrap_or_default();
            let Some(parent) = cgroup_parent(&info) else {
                return Err(CriError::NoCgroup { id: sandbox.id });
            };
            pods.push(Pod {
                netns: netns(&info),
                id: sandbox.id,
                name: PodName {
                    namespace: metadata.namespace,
                    name: metadata.name,
                    uid: metadata.uid,
                },
                cgroup: cgroup_root.join(cgroup_path(&parent)),
            });
        }
        self.known = pods.iter().map(|p| (p.id.clone(), p.clone())).collect();
        Ok(pods)
    }
}

/// The sandbox's `cgroup_parent`, from the runtime's verbose sandbox status.
fn cgroup_parent(info: &serde_json::Value) -> Option<String> {
    info["config"]["linux"]["cgroup_parent"]
        .as_str()
        .filter(|parent| !parent.is_empty())
        .map(str::to_owned)
}

/// The sandbox's network namespace, from the runtime's verbose sandbox status: none when its
/// runtime spec joins no network namespace of its own (a pod on the host's network); else the
/// namespace of its process (`/proc/PID/ns/net`, which an agent with the host's PID namespace
/// can open wherever it runs), or the path the spec names when there is no process id.
fn netns(info: &serde_json::Value) -> Option<PathBuf> {
    let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array()?;
    let network = namespaces
        .iter()
        .find(|ns| ns["type"].as_str() == Some("network"))?;
    match info["pid"].as_u64() {
        Some(pid) if pid > 0 => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        _ => network["path"].as_str().map(PathBuf::from),
    }
}

/// A gRPC channel to the runtime's Unix socket; it connects when first used, and again
/// after the runtime restarts.
pub fn channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        },
    ))
}

/// The path below the cgroup root of a sandbox's `cgroup_parent`: as it is with the cgroupfs
/// driver, expanded as systemd nests a slice with the systemd driver (`a-b-c.slice` is
/// `a.slice/a-b.slice/a-b-c.slice`).
pub fn cgroup_path(parent: &str) -> PathBuf {
    let Some(stem) = parent.strip_suffix(".slice").filter(|s| !s.contains('/')) else {
        return PathBuf::from(parent.trim_start_matches('/'));
    };
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    path
}

/// Every pod's cgroup and the cgroups below it (its containers', at most `depth` levels
/// down), by cgroup id (the directory's inode, what `bpf_get_current_cgroup_id` reports).
/// A cgroup that went away meanwhile is left out.
pub fn by_cgroup(pods: &[Pod], depth: usize) -> PodsByCgroup {
    let mut map = PodsByCgroup::new();
    for pod in pods {
        let name = Arc::new(pod.name.clone());
        walk(&pod.cgroup, depth, &mut |id| {
            map.insert(id, name.clone());
        });
    }
    map
}

/// kubelet's names for the cgroup of all pods: systemd cgroup driver, cgroupfs.
const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// The cgroup that holds a node's pods: the nearest ancestor of the pods' cgroups (`pods`)
/// named as kubelet names it (`kubepods.slice` under the systemd cgroup driver, `kubepods`
/// under cgroupfs), the same for every pod; with no pods yet, the one of those directly below
/// `root` (the cgroup v2 mount) that exists.
///
/// # Errors
/// A pod outside such a cgroup, pods under two of them (give `--cgroup`), or no pods and
/// neither cgroup exists.
pub fn kubepods(root: &Path, pods: &[&Path]) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for pod in pods {
        let Some(top) = pod.ancestors().skip(1).find(|a| {
            a.file_name()
                .is_some_and(|n| KUBEPODS.iter().any(|k| n == *k))
        }) else {
            anyhow::bail!("pod cgroup {} is in no kubepods cgroup", pod.display());
        };
        if !found.iter().any(|f| f == top) {
            found.push(top.to_owned());
        }
    }
    match found.as_slice() {
        [one] => return Ok(one.clone()),
        [] => {}
        many => anyhow::bail!(
            "the pods' cgroups are under several kubepods cgroups ({})",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    KUBEPODS
        .iter()
        .map(|name| root.join(name))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no pods yet, and neither {root}/kubepods.slice (systemd cgroup driver) nor \
                 {root}/kubepods (cgroupfs) exists",
                root = root.display()
            )
        })
}

/// The cgroup ids of each pod's cgroup and of the cgroups below it (its containers', at most
/// `depth` levels down), with the pod's namespace, sorted: what puts the pod in its scope (a
/// container the list has is found in one lookup, a newer one by its pod's). A cgroup that
/// went away is left out.
pub fn pod_cgroups(pods: &[Pod], depth: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for pod in pods {
        walk(&pod.cgroup, depth, &mut |id| {
            out.push((id, pod.name.namespace.clone()));
        });
    }
    out.sort_unstable();
    out
}

fn walk(dir: &Path, depth: usize, found: &mut impl FnMut(u64)) {
    let Ok(metadata) = fs::metadata(dir) else {
        return;
    };
    found(metadata.ino());
    if depth == 0 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), depth - 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn cgroupfs_parents_are_paths_and_systemd_slices_nest() {
        assert_eq!(
            cgroup_path("/kubepods/besteffort/pod1234"),
            PathBuf::from("kubepods/besteffort/pod1234")
        );
        assert_eq!(
            cgroup_path("kubepods-besteffort-pod1234.slice"),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice"
            )
        );
        assert_eq!(
            cgroup_path("kubepods.slice"),
            PathBuf::from("kubepods.slice")
        );
    }

    #[test]
    fn a_pods_cgroup_and_its_containers_map_to_the_pod() {
        let root = TempDir::new("cri");
        let pod_dir = root.join("kubepods/pod1");
        for c in ["c1", "c2/deeper"] {
            fs::create_dir_all(pod_dir.join(c)).unwrap();
        }
        let name = PodName {
            namespace: "team-a".into(),
            name: "web".into(),
            uid: "1".into(),
        };
        let pods = [
            Pod {
                id: "a".into(),
                name: name.clone(),
                cgroup: pod_dir.clone(),
                netns: None,
            },
            Pod {
                id: "b".into(),
                name: PodName {
                    name: "gone".into(),
                    ..name.clone()
                },
                cgroup: root.join("kubepods/missing"),
                netns: None,
            },
        ];
        let map = by_cgroup(&pods, 1);
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        for dir in [pod_dir.clone(), pod_dir.join("c1"), pod_dir.join("c2")] {
            assert_eq!(
                map.get(&ino(&dir)).map(|n| n.to_string()),
                Some("team-a/web".into())
            );
        }
        assert!(
            !map.contains_key(&ino(&pod_dir.join("c2/deeper"))),
            "deeper than asked"
        );
        assert_eq!(map.len(), 3, "the missing pod's cgroup adds nothing");
    }

    #[test]
    fn the_sandbox_status_names_cgroup_and_network_namespace() {
        let info: serde_json::Value = serde_json::from_str(
            r#"{"pid": 4242, "config": {"linux": {"cgroup_parent": "/kubepods/pod1"}},
                "runtimeSpec": {"linux": {"namespaces": [
                    {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}}"#,
        )
        .unwrap();
        assert_eq!(cgroup_parent(&info).as_deref(), Some("/kubepods/pod1"));
        assert_eq!(netns(&info), Some(PathBuf::from("/proc/4242/ns/net")));
        // Without a process id, the path of the spec.
        let mut no_pid = info.clone();
        no_pid["pid"] = serde_json::Value::Null;
        assert_eq!(netns(&no_pid), Some(PathBuf::from("/var/run/netns/cni-1")));
        // hostNetwork: no network namespace of its own.
        let host: serde_json::Value = serde_json::from_str(
            r#"{"pid": 7, "config": {"linux": {"cgroup_parent": ""}},
                "runtimeSpec": {"linux": {"namespaces": [{"type": "pid"}]}}}"#,
        )
        .unwrap();
        assert_eq!(netns(&host), None);
        assert_eq!(cgroup_parent(&host), None);
    }

    #[test]
    fn the_pods_cgroup_comes_from_the_pods_or_kubelets_layout() {
        let root = TempDir::new("kubepods");
        // No pods, no kubelet cgroup: an error saying what was looked for.
        let err = kubepods(&root, &[]).unwrap_err().to_string();
        assert!(
            err.contains("kubepods.slice") && err.contains("kubepods (cgroupfs)"),
            "{err}"
        );
        fs::create_dir_all(root.join("kubepods")).unwrap();
        assert_eq!(kubepods(&root, &[]).unwrap(), root.join("kubepods"));
        fs::create_dir_all(root.join("kubepods.slice")).unwrap();
        assert_eq!(kubepods(&root, &[]).unwrap(), root.join("kubepods.slice"));
        // Pods tell, whatever exists, wherever their kubepods cgroup is.
        let pod = root.join("kubepods/besteffort/pod1");
        let other = root.join("kubepods/pod2");
        assert_eq!(
            kubepods(&root, &[&pod, &other]).unwrap(),
            root.join("kubepods")
        );
        let systemd = root
            .join("node/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3.slice");
        assert_eq!(
            kubepods(&root, &[&systemd]).unwrap(),
            root.join("node/kubepods.slice")
        );
        let err = kubepods(&root, &[&pod, &systemd]).unwrap_err().to_string();
        assert!(err.contains("several"), "{err}");
        let stray = root.join("elsewhere/pod4");
        let err = kubepods(&root, &[&stray]).unwrap_err().to_string();
        assert!(err.contains("in no kubepods cgroup"), "{err}");
    }
}
