//! The node's pods, learned from the container runtime (`egress run --cri-socket`): polled
//! every second, so that kernel events name `namespace/pod` instead of a bare cgroup id.
//!
//! While the runtime does not answer (it restarts, or is not there yet), the last pods known
//! stay known and one warning says so; events of pods not known yet name their cgroup only.

#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::cri::{self, Pod, PodName, PodsByCgroup, Runtime};

/// The node's ready pods, and their pods by cgroup id.
#[derive(Debug, Default, PartialEq)]
pub struct NodePods {
    pub pods: Vec<Pod>,
    pub by_cgroup: PodsByCgroup,
    /// Each pod's own cgroup id (not its containers') and namespace, sorted: what scopes it.
    pub scoped: Vec<(u64, String)>,
}

/// How often the runtime is asked for its pods.
const POLL: Duration = Duration::from_secs(1);
/// A runtime that takes longer than this to list its pods is treated as not answering.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How far below a pod's cgroup its containers' cgroups are looked for (cgroupfs:
/// `pod<uid>/<container>`; systemd: `...-pod<uid>.slice/cri-containerd-<id>.scope`).
const CONTAINER_DEPTH: usize = 2;

/// The pods by cgroup id, kept current by a task that polls the runtime.
pub struct PodWatch {
    pods: watch::Receiver<Arc<NodePods>>,
}

impl PodWatch {
    /// Starts polling the runtime on `socket` (on the current tokio runtime); the pods'
    /// cgroups are below `cgroup_root`, the cgroup v2 mount.
    pub fn start(socket: PathBuf, cgroup_root: PathBuf) -> Self {
        let (tx, pods) = watch::channel(Arc::new(NodePods::default()));
        tokio::spawn(poll(Runtime::new(&socket), socket, cgroup_root, tx));
        Self { pods }
    }

    /// The pod whose cgroup (or a container's below it) is `cgroup_id`, if known.
    pub fn pod(&self, cgroup_id: u64) -> Option<Arc<PodName>> {
        self.pods.borrow().by_cgroup.get(&cgroup_id).cloned()
    }

    /// The pods now.
    pub fn now(&self) -> Arc<NodePods> {
        self.pods.borrow().clone()
    }

    /// Waits until the pods change (forever, once the poller is gone).
    pub async fn changed(&mut self) {
        if self.pods.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn poll(
    mut runtime: Runtime,
    socket: PathBuf,
    cgroup_root: PathBuf,
    tx: watch::Sender<Arc<NodePods>>,
) {
    let mut tick = tokio::time::interval(POLL);
    let mut failing = false;
    let mut count = None;
    loop {
        tick.tick().await;
        let listed = tokio::time::timeout(ANSWER_WITHIN, runtime.pods(&cgroup_root))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {ANSWER_WITHIN:?}",
                    socket.display()
                )
            })
            .and_then(|r| r.map_err(|e| e.to_string()));
        match listed {
            Ok(pods) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(socket = %socket.display(), "pods: the container runtime answers again");
                }
                if count != Some(pods.len()) {
                    tracing::info!(pods = pods.len(), "pods: ready pods on this node");
                    count = Some(pods.len());
                }
                let by_cgroup = cri::by_cgroup(&pods, CONTAINER_DEPTH);
                let scoped = cri::pod_cgroups(&pods);
                let now = NodePods {
                    pods,
                    by_cgroup,
                    scoped,
                };
                tx.send_if_modified(|current| {
                    let changed = **current != now;
                    if changed {
                        *current = Arc::new(now);
                    }
                    changed
                });
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    error = %e,
                    "pods: cannot list the node's pods; events name the pods known so far, others by cgroup id only"
                );
            }
            Err(_) => {}
        }
    }
}
