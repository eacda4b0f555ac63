//! The proxy inside each pod: the kernel rewrites a pod's connection to an HTTP egress port to
//! the proxy's loopback address, which inside the pod's network namespace is the pod's own
//! loopback. So the agent opens the proxy's listeners there (Istio ambient's in-pod design):
//! a thread joins the pod's namespace, binds `127.0.0.1` and `[::1]` on the proxy port, and
//! the agent marks and serves them like its own. No other pod and no host process can reach
//! them. The pod's upstream connections are made from sockets of the same namespace, so a
//! proxied request leaves with the pod's address, under the CNI's own policy for the pod.
//!
//! Until a pod's listener is there (the agent has not seen the pod yet, or a process of the
//! pod holds the proxy port), the kernel refuses the pod's connections meant for the proxy
//! (`proxy-absent`, `proxy-foreign`), never sending them anywhere else. Listeners go away
//! with their pod.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::Arc,
    time::Instant,
};

use crate::{
    cri::{Pod, PodName},
    netns::Netns,
    proxy::{BoxFuture, Origin, Sockets},
};

use super::{
    dns::DnsListeners,
    listeners::{self, ProxyListeners},
};

/// Makes a pod's upstream sockets inside its namespace.
struct PodSockets(Arc<Netns>);

impl Sockets for PodSockets {
    fn tcp(&self, v6: bool) -> BoxFuture<io::Result<tokio::net::TcpSocket>> {
        let ns = self.0.clone();
        Box::pin(async move {
            ns.run_async(move || {
                if v6 {
                    tokio::net::TcpSocket::new_v6()
                } else {
                    tokio::net::TcpSocket::new_v4()
                }
            })
            .await?
        })
    }
}

/// One pod's namespace, its listeners and the tasks that serve them.
pub struct PodNet {
    pub pod: Arc<PodName>,
    /// The namespace's cookie.
    pub netns: u64,
    pub origin: Arc<Origin>,
    ns: Arc<Netns>,
    /// The bound listeners (duplicates of those served), to mark again in a new generation.
    pub bound: Vec<TcpListener>,
    /// Addresses not bound yet, with why.
    pub missing: Vec<(SocketAddr, String)>,
    /// The serving tasks, stopped when the pod goes.
    tasks: Vec<tokio::task::AbortHandle>,
    /// When the agent first saw the pod.
    pub seen: Instant,
    /// The DNS listeners of FQDN rules and aliases inside the pod: the pod's queries teach
    /// its namespace's scope.
    dns: DnsListeners,
}

impl Drop for PodNet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PodNet {
    /// Joins the pod's network namespace at `path`. `None` when it is the agent's own (a pod
    /// on the host's network, served by the agent's own listeners).
    fn open(pod: &Pod, path: &Path, host: Option<u64>) -> io::Result<Option<Self>> {
        let ns = Arc::new(Netns::open(path)?);
        let netns = ns.cookie();
        if Some(netns) == host {
            return Ok(None);
        }
        let origin = Arc::new(Origin {
            netns,
            sockets: Arc::new(PodSockets(ns.clone())),
            namespace: Some(pod.name.namespace.clone()),
            pod: Some(pod.name.to_string()),
        });
        Ok(Some(Self {
            pod: Arc::new(pod.name.clone()),
            netns,
            origin,
            ns: ns.clone(),
            bound: Vec::new(),
            missing: Vec::new(),
            tasks: Vec::new(),
            seen: Instant::now(),
            dns: DnsListeners::in_pod(pod.name.namespace.clone(), ns),
        }))
    }

    /// Binds the addresses of `port` not bound yet, inside the pod; returns the new listeners
    /// (the caller marks and serves them). One the pod holds itself stays missing: the kernel
    /// refuses the pod's connections meant for the proxy (`proxy-foreign`) while it does.
    fn bind(&mut self, port: u16) -> Vec<TcpListener> {
        let wanted: Vec<SocketAddr> = if self.bound.is_empty() && self.missing.is_empty() {
            ProxyListeners::addresses(port).to_vec()
        } else {
            self.missing.iter().map(|(a, _)| *a).collect()
        };
        let mut new = Vec::new();
        let mut missing = Vec::new();
        for address in wanted {
            let bound = self.ns.run(move || listeners::listen(address));
            match bound.and_then(|r| r) {
                Ok(listener) => new.push(listener),
                // A pod without IPv6 on its loopback: its IPv6 redirects are refused.
                Err(e) if address.is_ipv6() && listeners::no_ipv6(&e) => {}
                Err(e) => {
                    let error = e.to_string();
                    let first = !self
                        .missing
                        .iter()
                        .any(|(a, why)| *a == address && *why == error);
                    if first {
                        tracing::warn!(
                            pod = %self.pod,
                            %address,
                            %error,
                            "proxy: cannot listen inside the pod (a process of the pod holds the proxy port?); its connections meant for the proxy are refused until the agent can"
                        );
                    }
                    missing.push((address, error));
                }
            }
        }
        self.missing = missing;
        new
    }

    /// Keeps `task` to stop it when the pod goes, and a duplicate of its listener.
    fn serving(&mut self, listener: &TcpListener, task: tokio::task::AbortHandle) {
        match listener.try_clone() {
            Ok(dup) => self.bound.push(dup),
            Err(e) => tracing::warn!(error = %e, "proxy: keeping a pod listener's descriptor"),
        }
        self.tasks.push(task);
    }
}

/// Every pod's namespace the agent serves, by sandbox id.
#[derive(Default)]
pub struct PodNets {
    nets: HashMap<String, PodNet>,
    /// Sandboxes whose namespace could not be joined, with the error (said once).
    failed: HashMap<String, String>,
    /// Sandboxes on the agent's own network namespace (the host's network).
    on_host: std::collections::HashSet<String>,
}

/// What the agent does with a listener opened in a pod: mark it as the agent's, then serve it.
pub trait Serve {
    /// Marks `listener` as the agent's in the kernel.
    ///
    /// # Errors
    /// The kernel's map cannot be written.
    fn mark(&self, listener: &TcpListener) -> anyhow::Result<()>;
    /// Serves `listener` for the pod of `origin`; the handle stops it.
    fn serve(&self, listener: TcpListener, origin: Arc<Origin>) -> tokio::task::AbortHandle;
}

impl PodNets {
    /// Brings the pods' listeners in line with `pods`: opens them for new pods, binds what was
    /// missing, and closes those of pods that went. Returns the namespaces that went (their
    /// upstream pools can go). `host` is the agent's own namespace's cookie.
    pub fn sync(
        &mut self,
        pods: &[Pod],
        port: u16,
        host: Option<u64>,
        serve: &impl Serve,
    ) -> Vec<u64> {
        let mut gone = Vec::new();
        self.nets.retain(|id, net| {
            let keep = pods.iter().any(|p| p.id == *id);
            if !keep {
                tracing::info!(pod = %net.pod, "proxy: the pod is gone; its listeners are closed");
                gone.push(net.netns);
            }
            keep
        });
        self.failed.retain(|id, _| pods.iter().any(|p| p.id == *id));
        self.on_host.retain(|id| pods.iter().any(|p| p.id == *id));
        for pod in pods {
            let Some(path) = &pod.netns else {
                continue;
            };
            if self.on_host.contains(&pod.id) {
                continue;
            }
            if !self.nets.contains_key(&pod.id) {
                match PodNet::open(pod, path, host) {
                    Ok(Some(net)) => {
                        self.failed.remove(&pod.id);
                        self.nets.insert(pod.id.clone(), net);
                    }
                    Ok(None) => {
                        self.on_host.insert(pod.id.clone());
                        continue;
                    }
                    Err(e) => {
                        let error = e.to_string();
                        if self.failed.get(&pod.id) != Some(&error) {
                            tracing::error!(pod = %pod.name, netns = %path.display(), %error, "proxy: cannot join the pod's network namespace; its connections meant for the proxy are refused");
                            self.failed.insert(pod.id.clone(), error);
                        }
                        continue;
                    }
                }
            }
            let net = self.nets.get_mut(&pod.id).expect("inserted above");
            if !net.bound.is_empty() && net.missing.is_empty() {
                continue;
            }
            for listener in net.bind(port) {
                if let Err(e) = serve.mark(&listener) {
                    tracing::error!(pod = %net.pod, error = %e, "proxy: marking a pod listener");
                    continue;
                }
                let task = match listener.try_clone() {
                    Ok(served) => serve.serve(served, net.origin.clone()),
                    Err(e) => {
                        tracing::error!(pod = %net.pod, error = %e, "proxy: a pod listener");
                        continue;
                    }
                };
                net.serving(&listener, task);
            }
            if !net.bound.is_empty() && net.missing.is_empty() {
                tracing::info!(
                    pod = %net.pod,
                    netns = net.netns,
                    after_ms = net.seen.elapsed().as_millis(),
                    "proxy: listening inside the pod"
                );
            }
        }
        gone
    }

    /// Brings every pod's DNS listeners in line with the generation in force (see
    /// [`DnsListeners::sync`]); on the agent's runtime.
    pub fn sync_dns(&mut self, enforcer: &crate::loader::Enforcer) {
        for net in self.nets.values_mut() {
            net.dns.sync(enforcer);
        }
    }

    /// The listeners bound inside pods, to mark again in a new generation.
    pub fn bound(&self) -> impl Iterator<Item = &TcpListener> {
        self.nets.values().flat_map(|n| n.bound.iter())
    }

    /// The pods served, with their namespace's cookie and whether every listener is there.
    pub fn served(&self) -> impl Iterator<Item = &PodNet> {
        self.nets.values()
    }
}
