//! Every way the policy changes (SIGHUP, a change of the policy files, `egress reload`,
//! `egress create`, `egress delete`) takes one path, [`Agent::apply`]: the whole policy is
//! built from its sources ([`sources::build`]) and validated first; an invalid one changes
//! nothing and the error is logged and counted. A valid one goes to the proxy first (so a
//! removed host is refused at once) and then to the kernel as a new generation
//! ([`pipeline::change`]: new rule tries alone when only rules changed, else new maps and
//! programs), swapped in atomically; if the kernel refuses it, the proxy gets the old policy
//! back.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::{
    control::Response,
    loader, pipeline,
    policy::PolicySource,
    proxy::Proxy,
    state::{self, Kind},
};

use super::{
    Agent,
    error::{ChangeError, chain},
    sources::{self, Built},
};

impl Agent {
    /// Reads the policy sources again and applies them; unless `force`, only if their bytes
    /// changed. Returns the generation in force.
    pub(super) fn reload(&mut self, force: bool, why: &str) -> Result<u32, ChangeError> {
        let start = std::time::Instant::now();
        let read = sources::read(self.sources(), &self.settings.resolv_conf);
        if !force && read.digest == self.digest {
            if let Some(error) = self.last_error.take() {
                // A broken file removed, or put back as it was: the sources are again those of
                // the policy in force, so the last failure no longer describes them.
                tracing::info!(
                    why,
                    generation = self.generation(),
                    previous_error = %error.lines().next().unwrap_or(""),
                    "policy sources are back to the policy in force; the last reload error is cleared"
                );
            } else {
                tracing::debug!(why, "policy sources unchanged; nothing to reload");
            }
            return Ok(self.generation());
        }
        self.apply(read, start, why)
    }

    /// Validates the sources `read` (from `start`) as a whole and puts them in force. Every
    /// outcome is logged and counted.
    fn apply(
        &mut self,
        read: sources::Read,
        start: std::time::Instant,
        why: &str,
    ) -> Result<u32, ChangeError> {
        let generation = self.generation();
        let built = read.build(&self.settings.resolv_conf);
        let build_ms = start.elapsed().as_secs_f64() * 1e3;
        let result = built
            .map_err(ChangeError::from)
            .and_then(|built| self.put_in_force(built));
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(new) => {
                self.reloads_ok += 1;
                self.last_error = None;
                tracing::info!(
                    why,
                    generation = new,
                    build_ms = format!("{build_ms:.1}"),
                    total_ms = format!("{:.1}", start.elapsed().as_secs_f64() * 1e3),
                    rules = self.policy.rules.len(),
                    http_rules = self.policy.http_rules.len(),
                    aliases = self.policy.aliases.len(),
                    dns_resolvers = self.policy.dns.resolvers.len(),
                    "reloaded: new policy in force"
                );
            }
            Err(e) => {
                let message = chain(e);
                self.reloads_failed += 1;
                for line in message.lines() {
                    tracing::error!(why, error = %line, "reload: error");
                }
                self.last_error = Some(message);
                tracing::error!(
                    why,
                    generation,
                    "reload failed; the running policy stays in force"
                );
            }
        }
        // What the reload built and freed (megabytes at 10,000 rules) goes back to the kernel
        // once changes stop.
        crate::memory::release_soon();
        result
    }

    /// The proxy, then the kernel; the proxy gets the old policy back if the kernel refuses.
    fn put_in_force(&mut self, built: Built) -> Result<u32, ChangeError> {
        built.log_warnings();
        let Built { policy, digest, .. } = built;
        if policy.proxy.port != self.policy.proxy.port {
            return Err(ChangeError::ProxyPort {
                from: self.policy.proxy.port,
                to: policy.proxy.port,
            });
        }
        let start = std::time::Instant::now();
        let proxy = {
            // Counts of the rules that stay go on (`egress status`, like the kernel's rows).
            let previous = self.proxies.borrow();
            Proxy::builder(&policy)
                .counting_after(&previous)
                // The number the kernel will give it (the agent alone moves generations on);
                // set again from the kernel's answer below.
                .generation(loader::next_generation(self.generation()))
                .build()?
        };
        let previous = self.proxies.send_replace(Arc::new(proxy));
        let settings = &self.settings;
        let mut listeners = settings.listeners.bound();
        listeners.extend(self.pod_nets.bound());
        let proxy_ms = start.elapsed().as_secs_f64() * 1e3;
        let enforced = tokio::task::block_in_place(|| {
            pipeline::change(
                &mut self.enforcer,
                &settings.target,
                &settings.kernel,
                &policy,
                &listeners,
                &self.pods,
            )
        });
        match enforced {
            Ok(way) => {
                tracing::info!(
                    ?way,
                    generation = self.enforcer.generation(),
                    proxy_ms = format!("{proxy_ms:.1}"),
                    kernel_ms = format!("{:.1}", start.elapsed().as_secs_f64() * 1e3 - proxy_ms),
                    "kernel: policy in force"
                );
                self.proxies
                    .borrow()
                    .set_generation(self.enforcer.generation());
                self.generation_changed();
                // A policy that gained FQDN rules or resolvers gets its DNS listeners now.
                self.dns.sync(&self.enforcer);
                self.pod_nets.sync_dns(&self.enforcer);
                let old = std::mem::replace(&mut self.policy, policy);
                self.digest = digest;
                // Freeing a 10,000-rule policy and proxy takes milliseconds: not on the way
                // to the answer.
                drop_elsewhere((old, previous));
                Ok(self.generation())
            }
            Err(e) => {
                self.proxies.send_replace(previous);
                Err(e.into())
            }
        }
    }

    /// `egress create`: adds the documents of `text`, if the whole policy with them is valid
    /// and the kernel takes it; otherwise nothing changes, on disk or in force.
    pub(super) fn create(
        &mut self,
        origin: &str,
        text: &str,
        namespace: Option<&str>,
    ) -> Result<Response, ChangeError> {
        let nothing = |e: ChangeError| ChangeError::NothingCreated(Box::new(e));
        let docs = state::split_in(origin, text, namespace).map_err(|e| nothing(e.into()))?;
        // With -n, what is checked and kept is the documents put in that namespace.
        let text = match namespace {
            Some(_) => state::join(&docs),
            None => text.to_owned(),
        };
        if docs.is_empty() {
            return Err(ChangeError::NoDocuments {
                origin: origin.to_owned(),
            });
        }
        let old = self
            .settings
            .store
            .documents()
            .map_err(ChangeError::Store)?;
        let mut candidate = self.sources();
        candidate.push(PolicySource::Text {
            name: origin.to_owned(),
            bytes: text.as_bytes().to_vec(),
        });
        // Validated whole before anything is written; its warnings are logged by the reload
        // that follows.
        sources::build(candidate, &self.settings.resolv_conf).map_err(|e| nothing(e.into()))?;
        let mut new = old.clone();
        new.extend(docs.iter().cloned());
        let names = describe(&docs);
        self.change_store(&old, &new, &format!("create {names}"))
            .map(|generation| Response::Applied {
                generation,
                message: format!("created {names}"),
            })
    }

    /// `egress delete`: removes created documents by name; all of them or none.
    pub(super) fn delete(
        &mut self,
        kind: Kind,
        names: &[String],
        namespace: Option<&str>,
    ) -> Result<Response, ChangeError> {
        // Without -n: node-wide rules, and Services of `default` (as Kubernetes has it).
        let namespace = match kind {
            Kind::EgressRule => namespace.map(str::to_owned),
            Kind::Service => Some(namespace.unwrap_or("default").to_owned()),
        };
        let this = |d: &state::Document, name: &String| {
            d.kind == kind && &d.name == name && d.namespace == namespace
        };
        let shown = |name: &str| match (kind, namespace.as_deref()) {
            (Kind::Service, Some(ns)) => super::status::service_name(ns, name),
            (_, ns) => crate::policy::scoped_name(ns, name).into_owned(),
        };
        let old = self
            .settings
            .store
            .documents()
            .map_err(ChangeError::Store)?;
        let mut problems = Vec::new();
        for name in names {
            if old.iter().any(|d| this(d, name)) {
                continue;
            }
            let name = shown(name);
            problems.push(match self.origin_of(kind, &name) {
                Some(origin) => format!(
                    "{kind} `{name}` comes from {origin}, not from `egress create`; edit that file"
                ),
                None => format!("no {kind} named `{name}`"),
            });
        }
        if !problems.is_empty() {
            return Err(ChangeError::NothingDeleted(problems));
        }
        let (gone, new): (Vec<_>, Vec<_>) = old
            .iter()
            .cloned()
            .partition(|d| names.iter().any(|n| this(d, n)));
        let names = describe(&gone);
        self.change_store(&old, &new, &format!("delete {names}"))
            .map(|generation| Response::Applied {
                generation,
                message: format!("deleted {names}"),
            })
    }

    /// Saves `new` as the created documents and applies the result; puts `old` back on disk if
    /// the policy cannot be applied.
    fn change_store(
        &mut self,
        old: &[state::Document],
        new: &[state::Document],
        why: &str,
    ) -> Result<u32, ChangeError> {
        self.settings.store.save(new).map_err(ChangeError::Save)?;
        self.reload(true, why).inspect_err(|_| {
            if let Err(e) = self.settings.store.save(old) {
                tracing::error!(error = %e, "putting the created rules back failed");
            }
        })
    }
}

/// Drops `value` on a short-lived thread of its own (a large policy takes milliseconds to
/// free). If no thread can be started, the closure, and `value` with it, is dropped here.
pub(super) fn drop_elsewhere<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("egress-drop".into())
        .spawn(move || drop(value));
}

/// `egressrule/a, service/b` for messages.
fn describe(docs: &[state::Document]) -> String {
    docs.iter()
        .map(|d| {
            let name = match (d.kind, d.namespace.as_deref()) {
                (Kind::Service, Some(ns)) => super::status::service_name(ns, &d.name),
                (_, ns) => crate::policy::scoped_name(ns, &d.name).into_owned(),
            };
            format!("{}/{name}", d.kind)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
