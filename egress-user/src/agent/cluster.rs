//! The Kubernetes API's EgressRule objects and ExternalName Services in the agent's policy
//! (see [`crate::cluster`]): which of them are in force, and what each EgressRule's status
//! says on this node.
//!
//! An object goes in when it is valid alone and with the rest of the policy. One that is not
//! is left out with the errors that name it, and the others go in: a user's mistake in one
//! namespace never holds back another namespace's change, nor takes the policy in force away.

#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::{
    cluster::{Cluster, ObjectKey, RuleObject, Snapshot, Verdict},
    control::{WireEvent, server::HubEvent},
    policy::{self, PolicySource},
};

use super::{Agent, error::ChangeError, sources::SourceError};

/// What the agent knows of the API's objects.
#[derive(Default)]
pub struct ClusterRules {
    /// The objects in the policy in force (shared with the watches' snapshot).
    pub in_force: Vec<Arc<RuleObject>>,
    /// Each object's verdict alone, by the [`policy::digest`] of its uid and resourceVersion
    /// (16 bytes, where the two strings took about 130): `Some(errors)` when invalid. Were two
    /// versions ever to share a digest, the whole policy's check still judges every object.
    alone: HashMap<u128, Option<String>>,
}

impl ClusterRules {
    /// Starts with the objects in force when the agent last ran.
    pub fn restored(in_force: Vec<RuleObject>) -> Self {
        Self {
            in_force: in_force.into_iter().map(Arc::new).collect(),
            alone: HashMap::new(),
        }
    }

    /// The policy sources of the objects in force, in namespace and name order.
    pub fn sources(&self) -> impl Iterator<Item = PolicySource> + '_ {
        self.in_force.iter().map(|rule| rule.source())
    }

    /// The source names of the objects in force (`EgressRule NS/NAME (resourceVersion N)`).
    pub fn source_names(&self) -> impl Iterator<Item = String> + '_ {
        self.in_force.iter().map(|rule| rule.source_name())
    }

    /// `rule` checked alone, as a policy of its own; remembered until it changes.
    fn alone(&mut self, rule: &RuleObject) -> Option<String> {
        let key = version_digest(rule);
        self.alone
            .entry(key)
            .or_insert_with(|| {
                policy::load_sources(&[(rule.source_name(), rule.document())])
                    .err()
                    .map(|errors| errors.to_string())
            })
            .clone()
    }
}

/// An object's version as 128 bits: its uid and resourceVersion.
fn version_digest(rule: &RuleObject) -> u128 {
    policy::digest(&(&rule.uid, &rule.resource_version))
}

impl Agent {
    /// Puts the objects of `snapshot` in force, each one that is valid, and writes each
    /// object's verdict. Before the first full list nothing changes.
    pub(super) fn sync_cluster(&mut self, cluster: &Cluster, snapshot: &Snapshot) {
        if !snapshot.synced {
            return;
        }
        let mut refused: Vec<(&RuleObject, Verdict)> = Vec::new();
        let mut candidates: Vec<Arc<RuleObject>> = Vec::with_capacity(snapshot.rules.len());
        for rule in snapshot.rules.values() {
            match self.cluster.alone(rule) {
                Some(errors) => refused.push((rule, Verdict::Refused(errors))),
                None => candidates.push(rule.clone()),
            }
        }
        // Forget the checks of objects gone or changed.
        let current: HashSet<u128> = snapshot.rules.values().map(|r| version_digest(r)).collect();
        self.cluster.alone.retain(|key, _| current.contains(key));

        let before = std::mem::replace(&mut self.cluster.in_force, candidates);
        let why = "EgressRule objects changed";
        let mut result = self.reload(false, why);
        // Objects the whole policy's errors name are left out, and the rest tried again.
        if let Err(ChangeError::Sources(SourceError::Invalid(errors))) = &result {
            let mut named: HashMap<String, Vec<String>> = HashMap::new();
            for diagnostic in &errors.0 {
                named
                    .entry(diagnostic.origin.file.clone())
                    .or_default()
                    .push(diagnostic.to_string());
            }
            let (bad, good): (Vec<Arc<RuleObject>>, Vec<Arc<RuleObject>>) = self
                .cluster
                .in_force
                .drain(..)
                .partition(|r| named.contains_key(&r.source_name()));
            self.cluster.in_force = good;
            if !bad.is_empty() {
                result = self.reload(false, why);
                let bad: HashMap<ObjectKey, String> = bad
                    .into_iter()
                    .map(|r| {
                        let errors = named[&r.source_name()].join("\n");
                        (r.key(), errors)
                    })
                    .collect();
                for (key, errors) in bad {
                    if let Some(rule) = snapshot.rules.get(&key) {
                        refused.push((rule, Verdict::Refused(errors)));
                    }
                }
            }
        }
        let mut verdicts = refused;
        match result {
            Ok(generation) => {
                if let Err(e) =
                    crate::cluster::persist(&self.settings.store, &self.cluster.in_force)
                {
                    tracing::error!(error = %e, "kubernetes: recording the EgressRules in force");
                }
                tracing::info!(
                    generation,
                    in_force = self.cluster.in_force.len(),
                    refused = verdicts.len(),
                    "kubernetes: EgressRules applied"
                );
                let in_force: HashSet<ObjectKey> = self
                    .cluster
                    .in_force
                    .iter()
                    .map(|rule| rule.key())
                    .collect();
                verdicts.extend(
                    snapshot
                        .rules
                        .values()
                        .filter(|r| in_force.contains(&r.key()))
                        .map(|r| (r.as_ref(), Verdict::InForce)),
                );
            }
            Err(_) => {
                // Logged by the reload; what was in force stays in force.
                self.cluster.in_force = before;
            }
        }
        cluster.forget_others(snapshot);
        for (rule, verdict) in cluster.report(&verdicts) {
            if let Verdict::Refused(errors) = verdict {
                tracing::warn!(
                    kind = %rule.kind,
                    object = %format!("{}/{}", rule.namespace, rule.name),
                    resource_version = %rule.resource_version,
                    errors = %errors,
                    "kubernetes: {} refused on this node; the rest of the policy is in force",
                    rule.kind
                );
                // `egress events --verdict refused` shows it beside the connections' verdicts.
                self.hub.publish(HubEvent::Policy(WireEvent {
                    time: crate::control::rfc3339(std::time::SystemTime::now()),
                    source: "policy".to_owned(),
                    verdict: "refused".to_owned(),
                    rule: format!("{}/{}", rule.namespace, rule.name),
                    generation: self.generation(),
                    reason: errors.lines().next().unwrap_or_default().to_owned(),
                    ..WireEvent::default()
                }));
            }
        }
    }
}
