//! The node's pods, learned from the container runtime (`egress run --cri-socket`): polled
//! every second, and at once when a cgroup appears below the managed one (inotify): a new
//! pod's cgroup is made when its sandbox starts, before its containers, so the agent puts the
//! pod in its namespace's scope and opens its proxy listeners before the pod's workload runs.
//! Kernel events name `namespace/pod` instead of a bare cgroup id.
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
    /// The cgroup ids of each pod and its containers, with the pod's namespace, sorted: what
    /// scopes it.
    pub scoped: Vec<(u64, String)>,
}

impl NodePods {
    /// The pods as listed, with their cgroups (and their containers') found now.
    pub fn new(pods: Vec<Pod>) -> Self {
        let by_cgroup = cri::by_cgroup(&pods, CONTAINER_DEPTH);
        let scoped = cri::pod_cgroups(&pods, CONTAINER_DEPTH);
        Self {
            pods,
            by_cgroup,
            scoped,
        }
    }
}

/// How often the runtime is asked for its pods.
const POLL: Duration = Duration::from_secs(1);
/// After a new cgroup appeared, how often the runtime is asked, [`BURST`] times: the sandbox
/// is listed as ready a moment after its cgroup exists.
const BURST_POLL: Duration = Duration::from_millis(5);
/// How many quick polls follow a new cgroup.
const BURST: u32 = 200;
/// A runtime that takes longer than this to list its pods is treated as not answering.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How far below a pod's cgroup its containers' cgroups are looked for (cgroupfs:
/// `pod<uid>/<container>`; systemd: `...-pod<uid>.slice/cri-containerd-<id>.scope`).
pub const CONTAINER_DEPTH: usize = 2;

/// The pods by cgroup id, kept current by a task that polls the runtime.
pub struct PodWatch {
    pods: watch::Receiver<Arc<NodePods>>,
}

impl PodWatch {
    /// Starts polling the runtime on `socket` (on the current tokio runtime); the pods'
    /// cgroups are below `cgroup_root`, the cgroup v2 mount, and new ones appear below
    /// `managed` (watched with inotify; without it, the runtime is polled every second only).
    /// Until the runtime's first answer, the pods are `known`: those the agent started with
    /// (already in their scopes), never "none", which would take every pod out of its scope.
    pub fn start(
        socket: PathBuf,
        cgroup_root: PathBuf,
        managed: &std::path::Path,
        known: Arc<NodePods>,
    ) -> Self {
        let (tx, pods) = watch::channel(known);
        let (wake, woken) = tokio::sync::mpsc::channel(1);
        let watcher = new_cgroups(managed, wake)
            .map_err(|e| {
                tracing::warn!(cgroup = %managed.display(), error = %e, "pods: cannot watch for new pod cgroups; the runtime is asked every second only");
            })
            .ok();
        let polling = Polling {
            runtime: Runtime::new(&socket),
            socket,
            cgroup_root,
            tx,
            woken,
            _watcher: watcher,
        };
        tokio::spawn(poll(polling));
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

/// The node's pods now, asked of the runtime on `socket` once, waiting at most
/// [`ANSWER_WITHIN`]; none (and a warning) when it does not answer: the pods then have the
/// node-wide rules only until the watch knows them.
pub fn initial(socket: &std::path::Path) -> Vec<Pod> {
    let listed = crate::cgroup::cgroup2_mount()
        .map_err(|e| e.to_string())
        .and_then(|root| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                tokio::time::timeout(ANSWER_WITHIN, Runtime::new(socket).pods(&root))
                    .await
                    .map_err(|_| format!("no answer within {ANSWER_WITHIN:?}"))?
                    .map_err(|e| e.to_string())
            })
        });
    match listed {
        Ok(pods) => {
            tracing::info!(pods = pods.len(), "pods: ready pods on this node at start");
            pods
        }
        Err(error) => {
            tracing::warn!(socket = %socket.display(), %error, "pods: cannot list the node's pods at start; they have the node-wide rules only until the runtime answers");
            Vec::new()
        }
    }
}

/// What the polling task holds.
struct Polling {
    runtime: Runtime,
    socket: PathBuf,
    cgroup_root: PathBuf,
    tx: watch::Sender<Arc<NodePods>>,
    /// Wake-ups from the cgroup watch.
    woken: tokio::sync::mpsc::Receiver<()>,
    /// The inotify watch on the managed cgroup, kept alive.
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Watches `managed` and every cgroup below it for new directories (a pod's or container's
/// cgroup); each sends a wake-up on `wake`.
fn new_cgroups(
    managed: &std::path::Path,
    wake: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && e.kind.is_create()
        {
            // A full channel already holds a wake-up.
            let _ = wake.try_send(());
        }
    })?;
    watcher.watch(managed, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

async fn poll(p: Polling) {
    let Polling {
        mut runtime,
        socket,
        cgroup_root,
        tx,
        mut woken,
        _watcher,
    } = p;
    let mut tick = tokio::time::interval(POLL);
    let mut failing = false;
    let mut count = None;
    let mut burst = 0u32;
    loop {
        if burst > 0 {
            burst -= 1;
            tokio::select! {
                () = tokio::time::sleep(BURST_POLL) => {}
                Some(()) = woken.recv() => burst = BURST,
            }
        } else {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = woken.recv() => burst = BURST,
            }
        }
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
                let now = NodePods::new(pods);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Until the runtime answers, the watch holds the pods the agent started with, not "no
    /// pods": the agent's first sync would otherwise take every pod out of its scope (found
    /// as a restarted agent's pods refused for the moment the runtime took to answer).
    #[tokio::test]
    async fn the_pods_known_at_start_stay_known_while_the_runtime_does_not_answer() {
        let dir = std::env::temp_dir().join(format!("egress-podwatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let known = Arc::new(NodePods {
            pods: Vec::new(),
            by_cgroup: PodsByCgroup::from([(
                7,
                Arc::new(PodName {
                    namespace: "default".into(),
                    name: "web".into(),
                    uid: "u1".into(),
                }),
            )]),
            scoped: vec![(7, "default".into())],
        });
        let watch = PodWatch::start(
            dir.join("no-runtime.sock"),
            dir.clone(),
            &dir,
            known.clone(),
        );
        assert_eq!(watch.now(), known);
        assert_eq!(watch.pod(7).map(|p| p.name.clone()), Some("web".into()));
        // The first poll (at once) and the next (after POLL) fail: nothing changes.
        tokio::time::sleep(POLL + Duration::from_millis(200)).await;
        assert_eq!(watch.now(), known);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
