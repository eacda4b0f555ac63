//! The Kubernetes API as a policy source (`egress run --kubeconfig FILE` or `--in-cluster`):
//! the EgressRule objects of every namespace (deploy/crds.yaml), each scoped to its namespace,
//! beside the node's policy files.
//!
//! - [`Cluster::spawn`] runs kube-rs's watcher on `egressrules.egress.dev`: a full list, then a
//!   watch; after an error or an API outage it lists again from scratch (with backoff), and the
//!   list replaces what the agent had, so an object deleted meanwhile is gone and none is
//!   counted twice. Each change publishes a [`Snapshot`]; the agent's loop takes the latest
//!   once the changes have been quiet for [`QUIET`] (at most [`MAX_DELAY`] after the first),
//!   so a burst of updates becomes a few generations.
//! - Each object becomes a policy document (its `spec` as written, its namespace as
//!   `metadata.namespace`), checked by the same code as a file; the agent leaves out an
//!   object that is invalid alone or with the rest ([`Verdict::Refused`]), and keeps the
//!   others in force.
//! - Until the first list has arrived the agent enforces the objects that were in force when
//!   it last ran ([`Store`]'s `egressrules.json`), so a restart with the API down changes
//!   nothing.
//! - [`StatusWriter`] writes each object's verdict on this node under `status.nodes`, with
//!   server-side apply and a field manager of this node's own, so nodes never overwrite each
//!   other's entries.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _};
use kube::{
    Client, Config,
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{policy::PolicySource, state::Store};

/// The EgressRule API group and version.
pub const API_VERSION: &str = "egress.dev/v1alpha1";
/// How long the objects must stay unchanged before the agent applies them.
pub const QUIET: Duration = Duration::from_millis(100);
/// The longest a change waits for a burst to end.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// How many status writes are in flight at once.
const STATUS_CONCURRENCY: usize = 8;

/// How the agent reaches the API.
#[derive(Clone, Debug)]
pub enum Connect {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
}

/// The EgressRule resource.
pub fn egress_rules() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("egress.dev", "v1alpha1", "EgressRule"),
        "egressrules",
    )
}

/// One EgressRule object, as the agent judges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleObject {
    /// Its namespace: the pods it applies to.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// `spec`, as the API has it.
    pub spec: serde_json::Value,
}

impl RuleObject {
    /// From the API's object; `None` without a namespace or name.
    fn from_dynamic(object: &DynamicObject) -> Option<Self> {
        let meta = &object.metadata;
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or(0),
            spec: object.data.get("spec").cloned().unwrap_or_default(),
        })
    }

    /// Whether `other` is this object with the same spec (its status or labels may differ).
    fn same_spec(&self, other: &Self) -> bool {
        self.uid == other.uid && self.generation == other.generation && self.spec == other.spec
    }

    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// The name its policy document goes by in messages and in `egress get`'s SOURCE column.
    pub fn source_name(&self) -> String {
        format!(
            "EgressRule {}/{} (resourceVersion {})",
            self.namespace, self.name, self.resource_version
        )
    }

    /// The object as a policy document: JSON (which is YAML), one field a line, so that a
    /// message's line number points at the field.
    pub fn document(&self) -> Vec<u8> {
        let document = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "EgressRule",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self.spec,
        });
        serde_json::to_vec_pretty(&document).expect("a JSON value serialises")
    }

    /// The object as a policy source.
    pub fn source(&self) -> PolicySource {
        PolicySource::Text {
            name: self.source_name(),
            bytes: self.document(),
        }
    }
}

/// The objects as the watch last saw them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Whether a full list has arrived (until then, the objects last in force stay).
    pub synced: bool,
    /// By namespace and name.
    pub rules: Arc<BTreeMap<(String, String), RuleObject>>,
}

/// What the agent made of one object on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In force from this generation of the agent's policy.
    InForce,
    /// Left out, and why (`SOURCE:LINE: message`, one per line).
    Refused(String),
}

/// The watch, the status writer and what the agent last judged.
pub struct Cluster {
    connect: Connect,
    /// This node's name, in `status.nodes`.
    pub node: String,
    snapshots: Option<watch::Receiver<Snapshot>>,
    status: Option<mpsc::UnboundedSender<StatusUpdate>>,
    /// The verdict written (or being written) for each object, by uid: only a change is
    /// written again. The writer removes an entry whose write failed.
    written: Arc<Mutex<HashMap<String, (Verdict, i64)>>>,
    /// When the first change of the burst being waited for was seen.
    first_change: Option<tokio::time::Instant>,
}

impl Cluster {
    /// A cluster source for node `node`; nothing runs until [`Cluster::spawn`].
    pub fn new(connect: Connect, node: String) -> Self {
        Self {
            connect,
            node,
            snapshots: None,
            status: None,
            written: Arc::default(),
            first_change: None,
        }
    }

    /// Starts the watch and the status writer on the current tokio runtime.
    pub fn spawn(&mut self) {
        let (tx, rx) = watch::channel(Snapshot::default());
        let (status_tx, status_rx) = mpsc::unbounded_channel();
        let connect = self.connect.clone();
        let node = self.node.clone();
        let written = self.written.clone();
        tokio::spawn(async move {
            let client = loop {
                match client(&connect).await {
                    Ok(client) => break client,
                    Err(e) => {
                        tracing::error!(error = %e, "kubernetes: no client; trying again in 5 s (the policy in force stays)");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            };
            tokio::spawn(write_statuses(client.clone(), node, status_rx, written));
            watch_rules(client, tx).await;
        });
        self.snapshots = Some(rx);
        self.status = Some(status_tx);
    }

    /// Waits until the objects changed and then stayed unchanged for [`QUIET`] (or
    /// [`MAX_DELAY`] passed), and returns them. Cancel-safe. Never returns without a watch.
    pub async fn changed(&mut self) -> Snapshot {
        let Some(rx) = self.snapshots.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let Some(first) = self.first_change else {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                self.first_change = Some(tokio::time::Instant::now());
                continue;
            };
            let deadline = (tokio::time::Instant::now() + QUIET).min(first + MAX_DELAY);
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    self.first_change = None;
                    return rx.borrow_and_update().clone();
                }
                more = rx.changed() => if more.is_err() {
                    self.first_change = None;
                    return rx.borrow_and_update().clone();
                },
            }
        }
    }

    /// Writes the verdicts that changed since they were last written, and returns those.
    pub fn report<'a>(
        &self,
        verdicts: &'a [(&'a RuleObject, Verdict)],
    ) -> Vec<(&'a RuleObject, &'a Verdict)> {
        let mut changed = Vec::new();
        let Some(status) = &self.status else {
            return changed;
        };
        let mut written = self.written.lock().expect("status map");
        for (object, verdict) in verdicts {
            let now = (verdict.clone(), object.generation);
            if written.get(&object.uid) == Some(&now) {
                continue;
            }
            written.insert(object.uid.clone(), now);
            changed.push((*object, verdict));
            let _ = status.send(StatusUpdate {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                uid: object.uid.clone(),
                generation: object.generation,
                resource_version: object.resource_version.clone(),
                verdict: verdict.clone(),
            });
        }
        changed
    }

    /// Forgets the verdicts of objects that are gone.
    pub fn forget_others(&self, snapshot: &Snapshot) {
        let uids: std::collections::HashSet<&str> =
            snapshot.rules.values().map(|r| r.uid.as_str()).collect();
        self.written
            .lock()
            .expect("status map")
            .retain(|uid, _| uids.contains(uid.as_str()));
    }
}

/// A client for `connect`.
async fn client(connect: &Connect) -> anyhow::Result<Client> {
    use anyhow::Context as _;
    let config = match connect {
        Connect::Kubeconfig(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        Connect::InCluster => Config::incluster().context("the in-cluster configuration")?,
    };
    Client::try_from(config).context("a Kubernetes client")
}

/// Lists and watches the EgressRules of every namespace, publishing each change, for good.
async fn watch_rules(client: Client, tx: watch::Sender<Snapshot>) {
    let api: Api<DynamicObject> = Api::all_with(client, &egress_rules());
    let mut rules: BTreeMap<(String, String), RuleObject> = BTreeMap::new();
    // A re-list's objects, until it is complete.
    let mut listing: Option<BTreeMap<(String, String), RuleObject>> = None;
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => {
                tracing::error!("kubernetes: the EgressRule watch ended");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kubernetes: watching EgressRules; listing again (the policy in force stays)");
                continue;
            }
        };
        let publish = match event {
            watcher::Event::Init => {
                listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let (Some(listing), Some(rule)) =
                    (listing.as_mut(), RuleObject::from_dynamic(&object))
                {
                    listing.insert(rule.key(), rule);
                }
                false
            }
            watcher::Event::InitDone => {
                let mut listed = listing.take().unwrap_or_default();
                // An object whose spec did not change keeps the resourceVersion it was judged
                // at: a status write is not a change of the policy.
                for (key, rule) in &mut listed {
                    if let Some(old) = rules.get(key)
                        && old.same_spec(rule)
                    {
                        rule.clone_from(old);
                    }
                }
                rules = listed;
                tracing::info!(objects = rules.len(), "kubernetes: listed the EgressRules");
                true
            }
            watcher::Event::Apply(object) => match RuleObject::from_dynamic(&object) {
                // Its status written (by this agent or another): not a change of the policy.
                Some(rule)
                    if rules
                        .get(&rule.key())
                        .is_some_and(|old| old.same_spec(&rule)) =>
                {
                    false
                }
                Some(rule) => {
                    rules.insert(rule.key(), rule);
                    true
                }
                None => false,
            },
            watcher::Event::Delete(object) => RuleObject::from_dynamic(&object)
                .is_some_and(|rule| rules.remove(&rule.key()).is_some()),
        };
        if publish {
            tx.send_replace(Snapshot {
                synced: true,
                rules: Arc::new(rules.clone()),
            });
        }
    }
}

/// One object's verdict on this node, to write.
#[derive(Clone, Debug)]
struct StatusUpdate {
    namespace: String,
    name: String,
    uid: String,
    generation: i64,
    resource_version: String,
    verdict: Verdict,
}

/// Writes each object's `status.nodes` entry for `node`, latest verdict first, a few at once.
async fn write_statuses(
    client: Client,
    node: String,
    mut rx: mpsc::UnboundedReceiver<StatusUpdate>,
    written: Arc<Mutex<HashMap<String, (Verdict, i64)>>>,
) {
    let manager = format!("egress-agent/{node}");
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        // The latest verdict of each object only.
        let mut latest: HashMap<String, StatusUpdate> = HashMap::new();
        for update in batch.drain(..) {
            latest.insert(update.uid.clone(), update);
        }
        futures::stream::iter(latest.into_values())
            .for_each_concurrent(STATUS_CONCURRENCY, |update| {
                let (client, node, manager, written) = (
                    client.clone(),
                    node.clone(),
                    manager.clone(),
                    written.clone(),
                );
                async move {
                    if let Err(e) = write_status(client, &node, &manager, &update).await {
                        // Written again at the next change of the objects.
                        written.lock().expect("status map").remove(&update.uid);
                        if !matches!(&e, kube::Error::Api(s) if s.code == 404) {
                            tracing::warn!(
                                object = %format!("{}/{}", update.namespace, update.name),
                                error = %e,
                                "kubernetes: writing an EgressRule's status"
                            );
                        }
                    }
                }
            })
            .await;
    }
}

async fn write_status(
    client: Client,
    node: &str,
    manager: &str,
    update: &StatusUpdate,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, &update.namespace, &egress_rules());
    let (state, message) = match &update.verdict {
        Verdict::InForce => ("InForce", String::new()),
        Verdict::Refused(message) => ("Refused", message.clone()),
    };
    let mut entry = serde_json::json!({
        "node": node,
        "state": state,
        "observedGeneration": update.generation,
        "resourceVersion": update.resource_version,
        "lastTransitionTime": crate::control::rfc3339(std::time::SystemTime::now()),
    });
    if !message.is_empty() {
        entry["message"] = message.into();
    }
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "EgressRule",
        "metadata": {"name": update.name, "namespace": update.namespace, "uid": update.uid},
        "status": {"nodes": [entry]},
    });
    api.patch_status(
        &update.name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The objects in force when the agent last ran, from the state directory; none when there
/// is no record or it cannot be read (said in the log).
pub fn restore(store: &Store) -> Vec<RuleObject> {
    let path = store.cluster_rules_path();
    let read = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        read => read.map_err(|e| e.to_string()),
    };
    read.and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .unwrap_or_else(|error| {
            tracing::error!(file = %path.display(), %error, "kubernetes: the EgressRules last in force cannot be read; starting without them until the API answers");
            Vec::new()
        })
}

/// Records `rules` as the objects in force, crash-safely.
///
/// # Errors
/// The file cannot be written.
pub fn persist(store: &Store, rules: &[RuleObject]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(rules).map_err(std::io::Error::other)?;
    crate::state::write_atomic(&store.cluster_rules_path(), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(spec: serde_json::Value) -> RuleObject {
        RuleObject {
            namespace: "team-a".to_owned(),
            name: "web".to_owned(),
            uid: "u1".to_owned(),
            resource_version: "42".to_owned(),
            generation: 3,
            spec,
        }
    }

    #[test]
    fn an_object_is_a_rule_of_its_namespace() {
        let rule = object(serde_json::json!({
            "destination": {"service": "192.0.2.0/24"},
            "ports": [{"port": 443, "protocol": "tcp"}],
        }));
        let policy = crate::policy::load_sources(&[(rule.source_name(), rule.document())])
            .expect("a valid object is a valid policy");
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(policy.rules[0].name, "web");
        assert_eq!(policy.rules[0].scope.as_deref(), Some("team-a"));
        assert_eq!(
            policy.rules[0].origin.file,
            "EgressRule team-a/web (resourceVersion 42)"
        );
    }

    #[test]
    fn an_invalid_object_is_reported_by_its_name_and_the_field_line() {
        let rule = object(serde_json::json!({
            "destination": {"service": "192.0.2.1/24"},
            "ports": [{"port": 443, "protocol": "tcp"}],
        }));
        let errors = crate::policy::load_sources(&[(rule.source_name(), rule.document())])
            .expect_err("a CIDR with host bits is refused");
        let text = errors.to_string();
        let line = String::from_utf8(rule.document())
            .expect("UTF-8")
            .lines()
            .position(|l| l.contains("192.0.2.1/24"))
            .expect("the service line")
            + 1;
        assert!(
            text.starts_with(&format!(
                "EgressRule team-a/web (resourceVersion 42):{line}: spec.destination.service"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_status_write_is_not_a_change_of_the_spec() {
        let rule = object(serde_json::json!({"destination": {"service": "192.0.2.0/24"}}));
        let mut written = rule.clone();
        written.resource_version = "43".to_owned();
        assert!(rule.same_spec(&written));
        let mut edited = written.clone();
        edited.generation = 4;
        edited.spec = serde_json::json!({"destination": {"service": "198.51.100.0/24"}});
        assert!(!rule.same_spec(&edited));
        let mut recreated = rule.clone();
        recreated.uid = "u2".to_owned();
        assert!(!rule.same_spec(&recreated));
    }
}
