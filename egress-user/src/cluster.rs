//! The Kubernetes API as a policy source (`egress run --kubeconfig FILE` or `--in-cluster`):
//! the EgressRule objects of every namespace (deploy/crds.yaml) and the ExternalName Services
//! (aliases), each scoped to its namespace, beside the node's policy files.
//!
//! - [`Cluster::spawn`] runs kube-rs's watcher on `egressrules.egress.dev` and one on core
//!   `services`: a full list, then a watch; after an error or an API outage it lists again from
//!   scratch (with backoff), and the list replaces what the agent had, so an object deleted
//!   meanwhile is gone and none is counted twice. The agent applies nothing from the API until
//!   both kinds have been listed.
//! - Only a Service of `type: ExternalName` counts, and only its name, namespace,
//!   `externalName` and `ports[].port` (the fields an alias means; the API server's defaults
//!   such as `targetPort` are not read). Anyone who may create Services in a namespace can
//!   therefore open egress for that namespace's pods, to the `externalName` on those ports,
//!   just as with an EgressRule there.
//! - An API server that does not serve Services (404) is logged once and asked again every
//!   [`ABSENT_RETRY`]; the agent goes on with none from the API. A Service list the agent may
//!   not read (403: its ClusterRole lacks `services`) is logged once, and the Services last
//!   listed stay. Each change publishes a [`Snapshot`]; the agent's loop takes the latest
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
/// How often the agent asks again for a kind the API server does not serve.
pub const ABSENT_RETRY: Duration = Duration::from_secs(60);

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

/// The core v1 Service resource.
fn services() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Service"), "services")
}

/// The kinds of objects the agent reads from the API.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Kind {
    /// `egressrules.egress.dev`.
    #[default]
    EgressRule,
    /// A core v1 Service of `type: ExternalName`: an alias.
    Service,
}

impl Kind {
    /// Every kind, each watched on its own.
    const ALL: [Self; 2] = [Self::EgressRule, Self::Service];

    /// Its API resource.
    fn resource(self) -> ApiResource {
        match self {
            Self::EgressRule => egress_rules(),
            Self::Service => services(),
        }
    }

    /// Its plural, for messages.
    fn plural(self) -> &'static str {
        match self {
            Self::EgressRule => "EgressRules",
            Self::Service => "Services",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EgressRule => "EgressRule",
            Self::Service => "Service",
        })
    }
}

/// An object's identity in a [`Snapshot`]: namespace, name and kind.
pub type ObjectKey = (String, String, Kind);

/// One EgressRule object, or one ExternalName Service, as the agent judges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleObject {
    /// EgressRule or Service (records written before Services were read have none).
    #[serde(default)]
    pub kind: Kind,
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
    /// `spec`, as the API has it (a Service's: only the fields an alias means).
    pub spec: Spec,
}

/// An object's `spec` as compact JSON text, keys sorted: about 150 bytes for an EgressRule,
/// where a `serde_json::Value` of it (three B-tree maps) took about 2 KiB, in each of the
/// copies the agent keeps (the watches', the snapshot's, the objects in force). Two specs are
/// equal when their values are (the text is canonical).
#[derive(Clone, Debug)]
pub struct Spec(Box<serde_json::value::RawValue>);

impl Spec {
    /// `value` as canonical text.
    pub fn new(value: &serde_json::Value) -> Self {
        // A `Value`'s maps are sorted, and its numbers and strings print one way.
        Self(serde_json::value::to_raw_value(value).expect("a JSON value serialises"))
    }

    /// The spec as a JSON value.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).expect("a spec's text is JSON it printed itself")
    }
}

impl PartialEq for Spec {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Spec {}

impl Serialize for Spec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Spec {
    /// Any JSON value, made canonical (a record written pretty, or by an older agent, reads
    /// as the same spec as the API's).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(|value| Self::new(&value))
    }
}

impl RuleObject {
    /// From the API's object; `None` without a namespace or name, or for a Service that is
    /// not of type ExternalName.
    fn from_dynamic(kind: Kind, object: &DynamicObject) -> Option<Self> {
        let meta = &object.metadata;
        let spec = object.data.get("spec").cloned().unwrap_or_default();
        let spec = match kind {
            Kind::EgressRule => spec,
            Kind::Service => alias_spec(&spec)?,
        };
        Some(Self {
            kind,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or(0),
            spec: Spec::new(&spec),
        })
    }

    /// Whether `other` is this object with the same spec (its status or labels may differ).
    fn same_spec(&self, other: &Self) -> bool {
        self.uid == other.uid && self.generation == other.generation && self.spec == other.spec
    }

    /// Namespace, name and kind.
    pub fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone(), self.kind)
    }

    /// The name its policy document goes by in messages and in `egress get`'s SOURCE column.
    pub fn source_name(&self) -> String {
        format!(
            "{} {}/{} (resourceVersion {})",
            self.kind, self.namespace, self.name, self.resource_version
        )
    }

    /// The object as a policy document: JSON (which is YAML), one field a line, so that a
    /// message's line number points at the field.
    pub fn document(&self) -> Vec<u8> {
        let api_version = match self.kind {
            Kind::EgressRule => API_VERSION,
            Kind::Service => "v1",
        };
        let document = serde_json::json!({
            "apiVersion": api_version,
            "kind": self.kind.to_string(),
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self.spec.value(),
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

/// A Service's `spec` reduced to what an alias means (`type`, `externalName`,
/// `ports[].port`); `None` unless it is of type ExternalName.
fn alias_spec(spec: &serde_json::Value) -> Option<serde_json::Value> {
    if spec.get("type").and_then(serde_json::Value::as_str) != Some("ExternalName") {
        return None;
    }
    let mut alias = serde_json::json!({"type": "ExternalName"});
    if let Some(name) = spec.get("externalName") {
        alias["externalName"] = name.clone();
    }
    if let Some(ports) = spec.get("ports").and_then(serde_json::Value::as_array) {
        alias["ports"] = ports
            .iter()
            .map(|p| serde_json::json!({"port": p.get("port").cloned().unwrap_or_default()}))
            .collect();
    }
    Some(alias)
}

/// The objects as the watches last saw them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Whether every kind has been listed (until then, the objects last in force stay).
    pub synced: bool,
    /// By namespace, name and kind; each object shared with the watches' map and the
    /// agent's objects in force (10,000 objects are kept once, not three times).
    pub rules: Arc<BTreeMap<ObjectKey, Arc<RuleObject>>>,
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
    /// The watches' objects, and their changes.
    snapshots: Option<(watch::Receiver<()>, Arc<Publisher>)>,
    status: Option<mpsc::UnboundedSender<StatusUpdate>>,
    /// The verdict written (or being written) for each object, by uid: only a change is
    /// written again. The writer removes an entry whose write failed.
    written: Arc<Mutex<HashMap<String, (Verdict, i64)>>>,
    /// When the first and the latest change of the burst being waited for were seen. Kept
    /// here, not in [`Cluster::changed`]'s future, which the agent's loop drops whenever
    /// another event comes first (a denied connect, a pod, a control call): the quiet period
    /// runs from the latest change, not from the latest wake-up.
    burst: Option<(tokio::time::Instant, tokio::time::Instant)>,
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
            burst: None,
        }
    }

    /// Starts the watch and the status writer on the current tokio runtime.
    pub fn spawn(&mut self) {
        let (publisher, rx) = Publisher::new();
        let watched = publisher.clone();
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
            for kind in Kind::ALL {
                tokio::spawn(watch_kind(
                    client.clone(),
                    kind,
                    publisher.clone(),
                    ABSENT_RETRY,
                ));
            }
        });
        self.snapshots = Some((rx, watched));
        self.status = Some(status_tx);
    }

    /// Waits until the objects changed and then stayed unchanged for [`QUIET`] (or
    /// [`MAX_DELAY`] passed), and returns them. Cancel-safe. Never returns without a watch.
    pub async fn changed(&mut self) -> Snapshot {
        let Some((rx, publisher)) = self.snapshots.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let Some((first, latest)) = self.burst else {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let now = tokio::time::Instant::now();
                self.burst = Some((now, now));
                continue;
            };
            let deadline = (latest + QUIET).min(first + MAX_DELAY);
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    self.burst = None;
                    rx.borrow_and_update();
                    return publisher.snapshot();
                }
                more = rx.changed() => {
                    if more.is_err() {
                        self.burst = None;
                        return publisher.snapshot();
                    }
                    self.burst = Some((first, tokio::time::Instant::now()));
                }
            }
        }
    }

    /// Writes the verdicts that changed since they were last written (an EgressRule's in its
    /// status; a refusal also as a Kubernetes Event on the object), and returns those.
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
                kind: object.kind,
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

/// The objects of every kind as the watches see them: the watch tasks change them in place
/// (a change costs a map insertion, not a copy of every object, so 10,000 creates stay
/// linear), and the agent copies them once a burst of changes has settled.
pub struct Publisher {
    /// Told of each change, once every kind is listed.
    tx: watch::Sender<()>,
    /// Each kind's objects, once listed.
    kinds: Mutex<BTreeMap<Kind, BTreeMap<ObjectKey, Arc<RuleObject>>>>,
}

impl Publisher {
    /// An empty one, and the receiver of its changes.
    fn new() -> (Arc<Self>, watch::Receiver<()>) {
        let (tx, rx) = watch::channel(());
        (
            Arc::new(Self {
                tx,
                kinds: Mutex::default(),
            }),
            rx,
        )
    }

    /// Calls `change` on the objects of `kind` (`None` until listed); when it says it changed
    /// them and every kind is listed, the agent is told. Returns what `change` returned.
    fn update(
        &self,
        kind: Kind,
        change: impl FnOnce(&mut Option<BTreeMap<ObjectKey, Arc<RuleObject>>>) -> bool,
    ) -> bool {
        let mut kinds = self.kinds.lock().expect("watched objects");
        let mut objects = kinds.remove(&kind);
        let changed = change(&mut objects);
        if let Some(objects) = objects {
            kinds.insert(kind, objects);
        }
        if changed && kinds.len() == Kind::ALL.len() {
            self.tx.send_replace(());
        }
        changed
    }

    /// A copy of every kind's objects (the objects themselves shared).
    fn snapshot(&self) -> Snapshot {
        let kinds = self.kinds.lock().expect("watched objects");
        Snapshot {
            synced: kinds.len() == Kind::ALL.len(),
            rules: Arc::new(
                kinds
                    .values()
                    .flat_map(|objects| objects.iter().map(|(k, o)| (k.clone(), o.clone())))
                    .collect(),
            ),
        }
    }
}

/// Whether the API server serves core v1 Services, from its discovery document (`GET
/// /api/v1`): `Some(false)` when it answers 404 there (as the CRD server does, with a body
/// that is no `Status`, so the watch's error has no code) or lists no `services`; `None` when
/// it cannot be told.
async fn serves_services(client: &Client) -> Option<bool> {
    let request = http::Request::get("/api/v1")
        .body(Vec::new())
        .expect("a valid request");
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .ok()?;
    match response.status() {
        http::StatusCode::NOT_FOUND => Some(false),
        status if status.is_success() => {
            let body = response.into_body().collect_bytes().await.ok()?;
            let list: serde_json::Value = serde_json::from_slice(&body).ok()?;
            let resources = list.get("resources")?.as_array()?;
            Some(
                resources
                    .iter()
                    .any(|r| r.get("name") == Some(&"services".into())),
            )
        }
        _ => None,
    }
}

/// The HTTP status of an API's refusal, if the watch failed with one.
fn refusal(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

/// Lists and watches the objects of `kind` in every namespace, publishing each change, for
/// good. For Services, a 404 (an API server without them) means none, asked again every
/// `absent_retry` ([`ABSENT_RETRY`]), and a 403 means the last ones listed; each is logged
/// once.
async fn watch_kind(client: Client, kind: Kind, publisher: Arc<Publisher>, absent_retry: Duration) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
    let mut absent_logged = false;
    'watch: loop {
        // A re-list's objects, until it is complete.
        let mut listing: Option<BTreeMap<ObjectKey, Arc<RuleObject>>> = None;
        let mut forbidden_logged = false;
        let mut stream = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        loop {
            let event = match stream.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => {
                    tracing::error!("kubernetes: the {} watch ended", kind.plural());
                    return;
                }
                Err(e) if kind == Kind::Service && refusal(&e) == Some(403) => {
                    if !forbidden_logged {
                        tracing::error!(
                            error = %e,
                            "kubernetes: the agent may not read Services (its ClusterRole needs services get/list/watch, see deploy/rbac.yaml); the Services last listed stay"
                        );
                        forbidden_logged = true;
                        // Never listed: none, so that the EgressRules are not held back.
                        publisher.update(kind, |objects| {
                            objects.is_none() && objects.insert(BTreeMap::new()).is_empty()
                        });
                    }
                    continue;
                }
                Err(e)
                    if kind == Kind::Service && serves_services(&client).await == Some(false) =>
                {
                    if !absent_logged {
                        tracing::warn!(
                            error = %e,
                            "kubernetes: the API server does not serve Services; ExternalName aliases come from the node's policy files only (asking again every {} s)",
                            absent_retry.as_secs()
                        );
                        absent_logged = true;
                        publisher.update(kind, |objects| {
                            *objects = Some(BTreeMap::new());
                            true
                        });
                    }
                    tokio::time::sleep(absent_retry).await;
                    continue 'watch;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes: watching {}; listing again (the policy in force stays)", kind.plural());
                    continue;
                }
            };
            match event {
                watcher::Event::Init => listing = Some(BTreeMap::new()),
                watcher::Event::InitApply(object) => {
                    if let (Some(listing), Some(rule)) =
                        (listing.as_mut(), RuleObject::from_dynamic(kind, &object))
                    {
                        listing.insert(rule.key(), Arc::new(rule));
                    }
                }
                watcher::Event::InitDone => {
                    let mut listed = listing.take().unwrap_or_default();
                    let count = listed.len();
                    publisher.update(kind, |objects| {
                        // An object whose spec did not change keeps the resourceVersion it was
                        // judged at: a status write is not a change of the policy.
                        if let Some(old) = objects.as_ref() {
                            for (key, rule) in &mut listed {
                                if let Some(old) = old.get(key)
                                    && old.same_spec(rule)
                                {
                                    rule.clone_from(old);
                                }
                            }
                        }
                        *objects = Some(listed);
                        true
                    });
                    absent_logged = false;
                    forbidden_logged = false;
                    tracing::info!(objects = count, "kubernetes: listed the {}", kind.plural());
                }
                watcher::Event::Apply(object) => match RuleObject::from_dynamic(kind, &object) {
                    Some(rule) => {
                        publisher.update(kind, |objects| {
                            let Some(objects) = objects.as_mut() else {
                                return false;
                            };
                            // Its status written (by this agent or another): not a change of
                            // the policy.
                            if objects
                                .get(&rule.key())
                                .is_some_and(|old| old.same_spec(&rule))
                            {
                                return false;
                            }
                            objects.insert(rule.key(), Arc::new(rule));
                            true
                        });
                    }
                    // A Service no longer of type ExternalName is no alias any more.
                    None => remove(&publisher, kind, &object),
                },
                watcher::Event::Delete(object) => remove(&publisher, kind, &object),
            }
        }
    }
}

/// Removes `object` from the objects of `kind`.
fn remove(publisher: &Publisher, kind: Kind, object: &DynamicObject) {
    let (Some(namespace), Some(name)) = (&object.metadata.namespace, &object.metadata.name) else {
        return;
    };
    let key = (namespace.clone(), name.clone(), kind);
    publisher.update(kind, |objects| {
        objects
            .as_mut()
            .is_some_and(|objects| objects.remove(&key).is_some())
    });
}

/// One object's verdict on this node, to write.
#[derive(Clone, Debug)]
struct StatusUpdate {
    kind: Kind,
    namespace: String,
    name: String,
    uid: String,
    generation: i64,
    resource_version: String,
    verdict: Verdict,
}

/// Writes each EgressRule's `status.nodes` entry for `node`, latest verdict first, a few at
/// once, and records a refusal as a Warning Event (reason `Refused`) on the object, for
/// `kubectl describe` and `kubectl get events`.
async fn write_statuses(
    client: Client,
    node: String,
    mut rx: mpsc::UnboundedReceiver<StatusUpdate>,
    written: Arc<Mutex<HashMap<String, (Verdict, i64)>>>,
) {
    let manager = format!("egress-agent/{node}");
    let events = Arc::new(Events::new(client.clone(), &node));
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        // The latest verdict of each object only.
        let mut latest: HashMap<String, StatusUpdate> = HashMap::new();
        for update in batch.drain(..) {
            latest.insert(update.uid.clone(), update);
        }
        futures::stream::iter(latest.into_values())
            .for_each_concurrent(STATUS_CONCURRENCY, |update| {
                let (client, node, manager, written, events) = (
                    client.clone(),
                    node.clone(),
                    manager.clone(),
                    written.clone(),
                    events.clone(),
                );
                async move {
                    if update.kind == Kind::EgressRule
                        && let Err(e) = write_status(client, &node, &manager, &update).await
                    {
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
                    if let Verdict::Refused(message) = &update.verdict {
                        events.refused(&update, message).await;
                    }
                }
            })
            .await;
    }
}

/// The agent's Kubernetes Events (`events.k8s.io/v1`): one Warning per refusal.
struct Events {
    recorder: kube::runtime::events::Recorder,
    /// Whether the API refused an Event already (said once: an API server without Events, or
    /// a ClusterRole without them, is no reason to fill the log).
    failed: std::sync::atomic::AtomicBool,
}

/// The most an Event's note may hold (the API's limit is 1 kB).
const EVENT_NOTE_MAX: usize = 1024;

impl Events {
    fn new(client: Client, node: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "egress-agent".to_owned(),
            instance: Some(node.to_owned()),
        };
        Self {
            recorder: kube::runtime::events::Recorder::new(client, reporter),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records that this node refused `update`'s object, with the agent's `message`.
    async fn refused(&self, update: &StatusUpdate, message: &str) {
        use kube::runtime::events::{Event, EventType};
        let mut note = message.to_owned();
        if note.len() > EVENT_NOTE_MAX {
            let mut end = EVENT_NOTE_MAX - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "Refused".to_owned(),
            note: Some(note),
            action: "Enforce".to_owned(),
            secondary: None,
        };
        let (api_version, kind) = match update.kind {
            Kind::EgressRule => (API_VERSION, "EgressRule"),
            Kind::Service => ("v1", "Service"),
        };
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            name: Some(update.name.clone()),
            namespace: Some(update.namespace.clone()),
            uid: Some(update.uid.clone()),
            resource_version: Some(update.resource_version.clone()),
            ..Default::default()
        };
        if let Err(e) = self.recorder.publish(&event, &regarding).await
            && !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                error = %e,
                "kubernetes: the API refused an Event (refusals are still in the objects' status and the agent's log; said once)"
            );
        }
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
pub fn persist(store: &Store, rules: &[Arc<RuleObject>]) -> std::io::Result<()> {
    let rules: Vec<&RuleObject> = rules.iter().map(AsRef::as_ref).collect();
    let bytes = serde_json::to_vec(&rules).map_err(std::io::Error::other)?;
    crate::state::write_atomic(&store.cluster_rules_path(), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(spec: serde_json::Value) -> RuleObject {
        RuleObject {
            kind: Kind::EgressRule,
            namespace: "team-a".to_owned(),
            name: "web".to_owned(),
            uid: "u1".to_owned(),
            resource_version: "42".to_owned(),
            generation: 3,
            spec: Spec::new(&spec),
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
    fn a_spec_is_kept_as_canonical_text_and_stored_as_json() {
        let value = serde_json::json!({"ports": [{"protocol": "tcp", "port": 443}],
                                       "destination": {"service": "192.0.2.0/24"}});
        let spec = Spec::new(&value);
        assert_eq!(spec.value(), value);
        // Written pretty, keys in another order (an older agent's record): the same spec.
        let pretty: Spec = serde_json::from_str(
            "{\n  \"destination\": {\"service\": \"192.0.2.0/24\"},\n  \"ports\": [{\"port\": 443, \"protocol\": \"tcp\"}]\n}",
        )
        .expect("a JSON object");
        assert_eq!(pretty, spec);
        assert_ne!(
            Spec::new(&serde_json::json!({"ports": [{"port": 80}]})),
            spec
        );
        // The store holds the object as JSON, not as a string of JSON, as before.
        let rule = object(value.clone());
        let stored: serde_json::Value = serde_json::to_value(&rule).expect("serialises");
        assert_eq!(stored["spec"], value);
        let back: RuleObject = serde_json::from_value(stored).expect("deserialises");
        assert_eq!(back, rule);
        // The policy document is the spec's value, one field a line.
        let document = String::from_utf8(rule.document()).expect("UTF-8");
        assert!(
            document.contains(
                "\"spec\": {\n    \"destination\": {\n      \"service\": \"192.0.2.0/24\""
            ),
            "{document}"
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
        edited.spec =
            Spec::new(&serde_json::json!({"destination": {"service": "198.51.100.0/24"}}));
        assert!(!rule.same_spec(&edited));
        let mut recreated = rule.clone();
        recreated.uid = "u2".to_owned();
        assert!(!rule.same_spec(&recreated));
    }

    /// A request the mock API server received.
    #[derive(Clone, Debug)]
    struct Seen {
        method: http::Method,
        uri: String,
        /// The body, as JSON (`null` when empty or not JSON).
        body: serde_json::Value,
    }

    /// A mock API server: `respond` answers each request with a status and a body; a watch
    /// request's body is then streamed from `events` (the first watch only; later ones stay
    /// open with nothing).
    fn mock_client(
        respond: impl Fn(&Seen) -> (u16, serde_json::Value) + Send + Sync + 'static,
        events: mpsc::UnboundedReceiver<serde_json::Value>,
    ) -> Client {
        use bytes::Bytes;
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        type Chunks =
            futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>;
        let events = Arc::new(Mutex::new(Some(events)));
        let respond = Arc::new(respond);
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (events, respond) = (events.clone(), respond.clone());
            async move {
                let (parts, body) = request.into_parts();
                let uri = parts.uri.to_string();
                let body: Chunks = if uri.contains("watch=true") {
                    match events.lock().expect("events").take() {
                        Some(rx) => tokio_stream_of(rx),
                        None => futures::stream::pending().boxed(),
                    }
                } else {
                    let bytes = body.collect_bytes().await.unwrap_or_default();
                    let seen = Seen {
                        method: parts.method,
                        uri,
                        body: serde_json::from_slice(&bytes).unwrap_or_default(),
                    };
                    let (code, value) = respond(&seen);
                    let bytes = Bytes::from(serde_json::to_vec(&value).expect("JSON"));
                    let response = http::Response::builder()
                        .status(code)
                        .body(StreamBody::new(
                            futures::stream::iter([Ok(Frame::data(bytes))]).boxed(),
                        ))
                        .expect("a response");
                    return Ok::<_, std::convert::Infallible>(response);
                };
                Ok(http::Response::builder()
                    .status(200)
                    .body(StreamBody::new(body))
                    .expect("a response"))
            }
        });
        Client::new(service, "default")
    }

    /// Each event as one line of a watch response.
    fn tokio_stream_of(
        mut rx: mpsc::UnboundedReceiver<serde_json::Value>,
    ) -> futures::stream::BoxStream<
        'static,
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    > {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(|event| {
                let mut line = serde_json::to_vec(&event).expect("JSON");
                line.push(b'\n');
                Ok(hyper::body::Frame::data(bytes::Bytes::from(line)))
            })
            .boxed()
    }

    fn service(
        namespace: &str,
        name: &str,
        rv: &str,
        spec: serde_json::Value,
    ) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "resourceVersion": rv},
            "spec": spec,
        })
    }

    fn external(name: &str) -> serde_json::Value {
        // As the API server returns it, with the defaults it fills in.
        serde_json::json!({
            "type": "ExternalName",
            "externalName": name,
            "sessionAffinity": "None",
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
        })
    }

    fn list(items: &[serde_json::Value]) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ServiceList",
            "metadata": {"resourceVersion": "10"},
            "items": items,
        })
    }

    /// A Services watch against the mock, with the EgressRules already listed (none).
    fn watch_services(client: Client, absent_retry: Duration) -> Watched {
        let (publisher, rx) = Publisher::new();
        publisher.update(Kind::EgressRule, |objects| {
            *objects = Some(BTreeMap::new());
            true
        });
        tokio::spawn(watch_kind(
            client,
            Kind::Service,
            publisher.clone(),
            absent_retry,
        ));
        Watched { rx, publisher }
    }

    struct Watched {
        rx: watch::Receiver<()>,
        publisher: Arc<Publisher>,
    }

    /// The objects after the next change, within 10 s.
    async fn next(watched: &mut Watched) -> Snapshot {
        tokio::time::timeout(Duration::from_secs(10), watched.rx.changed())
            .await
            .expect("a change within 10 s")
            .expect("the watch is running");
        watched.publisher.snapshot()
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .rules
            .keys()
            .map(|(ns, name, kind)| format!("{kind} {ns}/{name}"))
            .collect()
    }

    #[tokio::test]
    async fn external_name_services_are_aliases_of_their_namespace_and_follow_the_watch() {
        let (events, rx) = mpsc::unbounded_channel();
        let client = mock_client(
            |_| {
                (
                    200,
                    list(&[
                        service("team-a", "httpbin", "5", external("httpbin.test")),
                        service(
                            "team-a",
                            "web",
                            "6",
                            serde_json::json!({"type": "ClusterIP", "clusterIP": "192.0.2.53",
                                               "ports": [{"port": 80}]}),
                        ),
                    ]),
                )
            },
            rx,
        );
        let mut snapshots = watch_services(client, ABSENT_RETRY);
        let listed = next(&mut snapshots).await;
        assert!(listed.synced);
        assert_eq!(
            names(&listed),
            ["Service team-a/httpbin"],
            "a ClusterIP Service is no alias"
        );
        let object = listed.rules.values().next().expect("one");
        assert_eq!(
            object.spec.value(),
            serde_json::json!({"type": "ExternalName", "externalName": "httpbin.test",
                               "ports": [{"port": 80}]}),
            "only what an alias means is read"
        );
        let policy = crate::policy::load_sources(&[(object.source_name(), object.document())])
            .expect("the Service is a valid alias");
        assert_eq!(policy.aliases.len(), 1);
        let alias = &policy.aliases[0];
        assert_eq!(
            (
                alias.name.as_str(),
                alias.namespace.as_str(),
                alias.scope.as_deref()
            ),
            ("httpbin", "team-a", Some("team-a")),
            "the alias is for its namespace's pods only"
        );
        assert_eq!(alias.ports, [80]);
        assert_eq!(
            alias.origin.file,
            "Service team-a/httpbin (resourceVersion 5)"
        );

        events
            .send(serde_json::json!({"type": "ADDED",
                "object": service("team-b", "api", "11", external("api.test"))}))
            .expect("watching");
        assert_eq!(
            names(&next(&mut snapshots).await),
            ["Service team-a/httpbin", "Service team-b/api"]
        );
        events
            .send(serde_json::json!({"type": "MODIFIED",
                "object": service("team-a", "httpbin", "12",
                    serde_json::json!({"type": "ClusterIP", "ports": [{"port": 80}]}))}))
            .expect("watching");
        assert_eq!(
            names(&next(&mut snapshots).await),
            ["Service team-b/api"],
            "a Service changed to ClusterIP is no alias any more"
        );
        events
            .send(serde_json::json!({"type": "DELETED",
                "object": service("team-b", "api", "13", external("api.test"))}))
            .expect("watching");
        assert!(next(&mut snapshots).await.rules.is_empty());
    }

    #[tokio::test]
    async fn an_api_server_without_services_means_none_and_is_asked_again() {
        let lists = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = lists.clone();
        let (_events, rx) = mpsc::unbounded_channel();
        let client = mock_client(
            move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // What the CRD server answers for /api/...: its paths, not a `Status`.
                (404, serde_json::json!({"paths": ["/apis", "/healthz"]}))
            },
            rx,
        );
        let mut snapshots = watch_services(client, Duration::from_millis(50));
        let snapshot = next(&mut snapshots).await;
        assert!(snapshot.synced, "the EgressRules are not held back");
        assert!(snapshot.rules.is_empty());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Each round is a list and a discovery request.
        while lists.load(std::sync::atomic::Ordering::SeqCst) < 6 {
            assert!(tokio::time::Instant::now() < deadline, "asked again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !snapshots.rx.has_changed().expect("running"),
            "a 404 again publishes nothing new (no reload every minute)"
        );
    }

    #[tokio::test]
    async fn a_forbidden_service_list_keeps_the_services_last_listed() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let (events, rx) = mpsc::unbounded_channel();
        let client = mock_client(
            move |_| {
                if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    (
                        200,
                        list(&[service("team-a", "httpbin", "5", external("httpbin.test"))]),
                    )
                } else {
                    (
                        403,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "message": "services is forbidden",
                            "reason": "Forbidden", "code": 403}),
                    )
                }
            },
            rx,
        );
        let mut snapshots = watch_services(client, ABSENT_RETRY);
        assert_eq!(
            names(&next(&mut snapshots).await),
            ["Service team-a/httpbin"]
        );
        // The watch expires (410 Gone): the watcher lists again, and is refused.
        events
            .send(
                serde_json::json!({"type": "ERROR", "object": {"kind": "Status",
                "apiVersion": "v1", "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": 410}}),
            )
            .expect("watching");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "listed again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The refusal is handled (and logged) right after the list; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let snapshot = snapshots.publisher.snapshot();
        assert!(snapshot.synced);
        assert_eq!(
            names(&snapshot),
            ["Service team-a/httpbin"],
            "the Services last listed stay"
        );
    }

    #[tokio::test]
    async fn a_failing_service_list_on_a_server_with_services_holds_the_policy() {
        let (_events, rx) = mpsc::unbounded_channel();
        let client = mock_client(
            |seen| {
                if seen.uri.ends_with("/api/v1") {
                    (
                        200,
                        serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1",
                            "resources": [{"name": "services", "namespaced": true,
                                           "kind": "Service", "verbs": ["list", "watch"]}]}),
                    )
                } else {
                    (
                        500,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "message": "etcd is down", "code": 500}),
                    )
                }
            },
            rx,
        );
        let mut snapshots = watch_services(client, Duration::from_millis(50));
        assert!(
            tokio::time::timeout(Duration::from_secs(2), snapshots.rx.changed())
                .await
                .is_err(),
            "nothing is published until the Services are listed: {:?}",
            names(&snapshots.publisher.snapshot())
        );
    }

    fn refused(kind: Kind, name: &str, message: &str) -> StatusUpdate {
        StatusUpdate {
            kind,
            namespace: "team-a".to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            generation: 2,
            resource_version: "7".to_owned(),
            verdict: Verdict::Refused(message.to_owned()),
        }
    }

    /// Runs the status writer on `updates` against a mock that answers every request with
    /// `code` for Events and 200 otherwise; returns what the mock received.
    async fn write_all(updates: Vec<StatusUpdate>, events_code: u16) -> Vec<Seen> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let (_events, rx) = mpsc::unbounded_channel();
        let client = mock_client(
            move |request| {
                recorded.lock().expect("seen").push(request.clone());
                if request.uri.contains("/events") {
                    (
                        events_code,
                        serde_json::json!({"kind": "Status", "code": events_code}),
                    )
                } else {
                    (200, request.body.clone())
                }
            },
            rx,
        );
        let (tx, updates_rx) = mpsc::unbounded_channel();
        let count = updates.len();
        for update in updates {
            tx.send(update).expect("the writer runs");
        }
        drop(tx);
        let written = Arc::new(Mutex::new(HashMap::new()));
        tokio::time::timeout(
            Duration::from_secs(10),
            write_statuses(client, "node-a".to_owned(), updates_rx, written),
        )
        .await
        .expect("the writer ends when its channel closes");
        let seen = seen.lock().expect("seen").clone();
        assert!(seen.len() >= count, "{seen:?}");
        seen
    }

    #[tokio::test]
    async fn a_refusal_is_a_warning_event_on_the_object_beside_its_status() {
        let long = "x".repeat(3000);
        let seen = write_all(
            vec![
                refused(
                    Kind::EgressRule,
                    "web",
                    "EgressRule team-a/web: a host's port has one protocol",
                ),
                refused(Kind::Service, "httpbin", &long),
            ],
            201,
        )
        .await;
        let status: Vec<&Seen> = seen.iter().filter(|s| s.uri.contains("/status")).collect();
        assert_eq!(
            status.len(),
            1,
            "a status for the EgressRule only: {seen:?}"
        );
        assert_eq!(status[0].method, http::Method::PATCH);
        assert!(
            status[0]
                .uri
                .starts_with("/apis/egress.dev/v1alpha1/namespaces/team-a/egressrules/web/status")
        );
        assert_eq!(status[0].body["status"]["nodes"][0]["state"], "Refused");

        let events: Vec<&Seen> = seen.iter().filter(|s| s.uri.contains("/events")).collect();
        assert_eq!(events.len(), 2, "{seen:?}");
        for event in &events {
            assert_eq!(event.method, http::Method::POST);
            assert!(
                event
                    .uri
                    .starts_with("/apis/events.k8s.io/v1/namespaces/team-a/events"),
                "{}",
                event.uri
            );
            let body = &event.body;
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "Refused");
            assert_eq!(body["reportingController"], "egress-agent");
            assert_eq!(body["reportingInstance"], "node-a");
            assert_eq!(body["regarding"]["namespace"], "team-a");
        }
        let web = events
            .iter()
            .find(|e| e.body["regarding"]["name"] == "web")
            .expect("an Event for web");
        assert_eq!(web.body["regarding"]["kind"], "EgressRule");
        assert_eq!(web.body["regarding"]["apiVersion"], API_VERSION);
        assert_eq!(web.body["regarding"]["uid"], "uid-web");
        assert_eq!(
            web.body["note"],
            "EgressRule team-a/web: a host's port has one protocol"
        );
        let httpbin = events
            .iter()
            .find(|e| e.body["regarding"]["name"] == "httpbin")
            .expect("an Event for the Service");
        assert_eq!(httpbin.body["regarding"]["kind"], "Service");
        let note = httpbin.body["note"].as_str().expect("a note");
        assert!(
            note.len() <= EVENT_NOTE_MAX && note.ends_with("..."),
            "{}",
            note.len()
        );
    }

    #[tokio::test]
    async fn an_api_without_events_still_gets_the_status() {
        let seen = write_all(vec![refused(Kind::EgressRule, "web", "refused")], 404).await;
        assert!(
            seen.iter()
                .any(|s| s.uri.contains("/egressrules/web/status")),
            "{seen:?}"
        );
        assert!(seen.iter().any(|s| s.uri.contains("/events")), "{seen:?}");
    }

    #[tokio::test]
    async fn a_change_is_applied_after_the_quiet_period_however_often_the_wait_is_dropped() {
        let (publisher, rx) = Publisher::new();
        let mut cluster = Cluster::new(Connect::InCluster, "node-a".to_owned());
        cluster.snapshots = Some((rx, publisher.clone()));
        for kind in Kind::ALL {
            publisher.update(kind, |objects| {
                *objects = Some(BTreeMap::new());
                true
            });
        }
        let sent = tokio::time::Instant::now();
        // As the agent's loop does when other events keep coming: the wait is dropped every
        // 10 ms and started again.
        let snapshot = loop {
            if let Ok(snapshot) =
                tokio::time::timeout(Duration::from_millis(10), cluster.changed()).await
            {
                break snapshot;
            }
            assert!(sent.elapsed() < MAX_DELAY, "the quiet period never ended");
        };
        assert!(snapshot.synced);
        let waited = sent.elapsed();
        assert!(
            waited >= QUIET && waited < QUIET * 3,
            "applied {waited:?} after the change (quiet period {QUIET:?})"
        );
    }

    /// A change every 10 ms for 3 s (in paused time, so the timeline is exact): a snapshot
    /// at most every [`MAX_DELAY`] while the burst lasts, none sooner than [`QUIET`] after the
    /// previous, and the last one holds the burst's last change.
    #[tokio::test(start_paused = true)]
    async fn a_continuous_burst_is_applied_once_per_max_delay_and_its_end_once() {
        let (publisher, rx) = Publisher::new();
        let mut cluster = Cluster::new(Connect::InCluster, "node-a".to_owned());
        cluster.snapshots = Some((rx, publisher.clone()));
        for kind in Kind::ALL {
            publisher.update(kind, |objects| {
                *objects = Some(BTreeMap::new());
                true
            });
        }
        // Settle the listing's own change first.
        cluster.changed().await;
        let start = tokio::time::Instant::now();
        let changes = 300;
        let changer = {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                for port in 1..=changes {
                    publisher.update(Kind::EgressRule, |objects| {
                        let rule = object(serde_json::json!({"ports": [{"port": port}]}));
                        objects
                            .as_mut()
                            .expect("listed")
                            .insert(rule.key(), Arc::new(rule));
                        true
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let mut applied = Vec::new();
        let last = loop {
            let snapshot = cluster.changed().await;
            applied.push(start.elapsed());
            let port = snapshot
                .rules
                .values()
                .next()
                .map(|r| r.spec.value()["ports"][0]["port"].clone());
            if port == Some(changes.into()) {
                break snapshot;
            }
            assert!(applied.len() < 10, "applied at {applied:?}");
        };
        assert_eq!(last.rules.len(), 1);
        changer.await.expect("the changes");
        // 3 s of changes: one snapshot per second of burst, and the burst's end.
        assert!((3..=5).contains(&applied.len()), "applied at {applied:?}");
        let mut previous = Duration::ZERO;
        for at in &applied {
            let gap = *at - previous;
            assert!(
                gap >= QUIET && gap <= MAX_DELAY + Duration::from_millis(20),
                "applied at {applied:?}"
            );
            previous = *at;
        }
    }
}
