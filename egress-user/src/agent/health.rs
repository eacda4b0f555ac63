//! Whether the agent can do its job, for `GET /healthz`: a liveness probe that answers 200
//! while the process merely runs would keep a broken agent in place. It fails (503, one line
//! per problem) when:
//! - a proxy listener's accept loop ended (redirected connections are then refused);
//! - the control socket's accept loop ended (`egress status`, `reload`, `create` cannot reach
//!   the agent);
//! - the proxy turned connections away in the last seconds because every place it has holds
//!   a connection that is serving requests (see [`crate::proxy::Admission`]);
//! - the descriptors the agent has open eat into the reserve kept for the control plane
//!   ([`crate::fds::Budget`]), or cannot even be counted.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
};

use crate::{fds, proxy::Admission};

/// The agent's health, shared by the tasks that can fail and the metrics endpoint.
#[derive(Debug)]
pub struct Health {
    /// The descriptor budget in force.
    pub budget: fds::Budget,
    /// The proxy's connections.
    pub admission: Arc<Admission>,
    listeners: AtomicUsize,
    listeners_down: AtomicUsize,
    control_down: AtomicBool,
}

impl Health {
    /// Health for an agent with this budget and admission.
    pub fn new(budget: fds::Budget, admission: Arc<Admission>) -> Self {
        Self {
            budget,
            admission,
            listeners: AtomicUsize::new(0),
            listeners_down: AtomicUsize::new(0),
            control_down: AtomicBool::new(false),
        }
    }

    /// Shares out the descriptor limit for an agent that holds what it has open now (one
    /// generation's programs, maps and links, the listeners, the runtime), and logs how. A
    /// reload opens a new generation before it closes the old, so it is taken to need as
    /// many again.
    pub fn measure() -> Self {
        let limit = fds::nofile_limit().map_or(1024, |l| l.soft);
        let held = fds::open_fds().unwrap_or(0);
        let budget = fds::Budget::new(limit, held, held);
        tracing::info!(
            limit = budget.limit,
            held,
            reserve = budget.reserve,
            proxy_connections = budget.proxy_connections,
            "descriptors: the proxy may hold {} app connections; {} are kept for the control \
             socket, reloads and metrics",
            budget.proxy_connections,
            budget.reserve
        );
        let limits = crate::proxy::Limits::for_connections(budget.proxy_connections);
        Self::new(budget, Arc::new(Admission::new(limits)))
    }

    /// A proxy listener started.
    pub fn listener_started(&self) {
        self.listeners.fetch_add(1, Relaxed);
    }

    /// A proxy listener's accept loop ended.
    pub fn listener_stopped(&self) {
        self.listeners_down.fetch_add(1, Relaxed);
    }

    /// The control socket's accept loop ended.
    pub fn control_stopped(&self) {
        self.control_down.store(true, Relaxed);
    }

    /// The connection and descriptor fields of `egress status`'s proxy line.
    pub fn proxy_status(&self) -> crate::control::ProxyStatus {
        let stats = self.admission.stats();
        let n = |v: usize| v as u64;
        crate::control::ProxyStatus {
            connections: n(stats.open),
            connections_limit: n(stats.limit),
            connections_refused: stats.refused,
            connections_evicted: stats.evicted,
            open_fds: fds::open_fds().map_or(0, n),
            fds_limit: n(self.budget.limit),
            ..Default::default()
        }
    }

    /// What keeps the agent from doing its job now; empty: healthy.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let down = self.listeners_down.load(Relaxed);
        if down > 0 {
            let all = self.listeners.load(Relaxed);
            out.push(format!(
                "proxy: {down} of {all} listeners stopped accepting"
            ));
        }
        if self.control_down.load(Relaxed) {
            out.push("control socket: stopped accepting".to_owned());
        }
        let stats = self.admission.stats();
        if stats.refusing {
            out.push(format!(
                "proxy: refusing connections: all {} places hold connections serving requests",
                stats.limit
            ));
        }
        match fds::open_fds() {
            Ok(open) if self.budget.under_pressure(open) => out.push(format!(
                "descriptors: {open} open of a limit of {}, into the {} kept for the control \
                 plane",
                self.budget.limit, self.budget.reserve
            )),
            Ok(_) => {}
            Err(e) => out.push(format!("descriptors: cannot count them: {e}")),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Limits;

    #[test]
    fn each_failure_is_a_problem_with_its_reason() {
        let admission = Arc::new(Admission::new(Limits {
            connections: 1,
            pending_per_source: 1,
        }));
        let budget = fds::Budget::new(1 << 20, 0, 0);
        let health = Health::new(budget, admission.clone());
        health.listener_started();
        health.listener_started();
        assert_eq!(health.problems(), Vec::<String>::new());

        health.listener_stopped();
        let held = admission
            .admit(std::net::Ipv4Addr::LOCALHOST.into(), false)
            .expect("room");
        held.served();
        assert!(
            admission
                .admit(std::net::Ipv4Addr::LOCALHOST.into(), false)
                .is_none()
        );
        health.control_stopped();
        assert_eq!(
            health.problems(),
            [
                "proxy: 1 of 2 listeners stopped accepting",
                "control socket: stopped accepting",
                "proxy: refusing connections: all 1 places hold connections serving requests",
            ]
        );

        // A limit the agent's own descriptors already fill.
        let tight = Health::new(fds::Budget::new(8, 0, 0), admission);
        let problems = tight.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("descriptors: ") && p.ends_with("control plane")),
            "{problems:?}"
        );
    }
}
