//! [`PodNet`]: a second network namespace (the "pod") wired to a [`Sandbox`] (the "node") by a
//! veth pair, as a container runtime wires a pod to its host. Traffic from the pod reaches the
//! node through the node's end of the pair (`hv<N>`), which is where a program that filters
//! pods from the host side (XDP) attaches.
//!
//! Addressing (all inside the documentation ranges, none of it routable anywhere else):
//! - the pod's end, `pv`, has `203.0.113.<200+k>/32` and `2001:db8:2::<200+k>/128` (`k` the
//!   pod's number in this process, mod 50), and the link-local `fe80::2`;
//! - the node's end, `hv<N>`, has no address but the link-local `fe80::1`;
//! - the pod's routes are `default dev pv` (IPv4, on-link: the node answers ARP for its own
//!   addresses on any interface) and `default via fe80::1 dev pv` (IPv6);
//! - the node's routes back are `203.0.113.<200+k>/32 dev hv<N>` (more specific than the
//!   203.0.113.0/24 on `d0`, so it wins) and `2001:db8:2::<200+k>/128 via fe80::2 dev hv<N>`.
//!
//! So the pod reaches the node's own addresses (192.0.2.1, 198.51.100.1, 203.0.113.1,
//! 2001:db8::1, 2001:db8:1::1), and the node reaches the pod's, with no forwarding anywhere.
//! The pod's only interface leads into the node's namespace, which has no route out.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{Sandbox, sh};

static NEXT_POD: AtomicUsize = AtomicUsize::new(0);

/// A pod network namespace attached to a sandbox by a veth pair; deleted on drop.
pub struct PodNet {
    netns: String,
    node: String,
    host_iface: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl PodNet {
    /// The node's link-local address on its end of the pair (the pod's IPv6 next hop).
    pub const HOST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    /// The pod's link-local address (the node's IPv6 next hop back).
    pub const POD_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
    /// The name of the pod's end of the pair, in the pod's namespace.
    pub const POD_IFACE: &'static str = "pv";

    /// Creates the pod's namespace and wires it to `node`. Panics with the failing command
    /// when something cannot be made; whatever was made is removed on drop all the same.
    pub fn new(node: &Sandbox) -> Self {
        let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
        let k = (n % 50) as u8;
        let netns = format!("egt{}p{n}", std::process::id());
        sh(&["ip", "netns", "add", &netns]);
        let pod = Self {
            host_iface: format!("hv{n}"),
            node: node.name.clone(),
            v4: Ipv4Addr::new(203, 0, 113, 200 + k),
            v6: Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x200 + u16::from(k)),
            netns,
        };
        // From here on Drop cleans up.
        let (p, h, node) = (
            pod.netns.as_str(),
            pod.host_iface.as_str(),
            pod.node.as_str(),
        );
        let (v4, v6) = (format!("{}/32", pod.v4), format!("{}/128", pod.v6));
        let (host_gw, pod_gw) = (Self::HOST_LL.to_string(), Self::POD_LL.to_string());
        let (host_ll, pod_ll) = (format!("{host_gw}/64"), format!("{pod_gw}/64"));
        sh(&["ip", "-n", p, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", node, "link", "add", h, "type", "veth", "peer", "name", "pv", "netns", p,
        ]);
        sh(&[
            "ip", "-n", node, "-6", "addr", "add", &host_ll, "dev", h, "nodad",
        ]);
        sh(&["ip", "-n", p, "addr", "add", &v4, "dev", "pv"]);
        sh(&[
            "ip", "-n", p, "-6", "addr", "add", &v6, "dev", "pv", "nodad",
        ]);
        sh(&[
            "ip", "-n", p, "-6", "addr", "add", &pod_ll, "dev", "pv", "nodad",
        ]);
        sh(&["ip", "-n", node, "link", "set", h, "up"]);
        sh(&["ip", "-n", p, "link", "set", "pv", "up"]);
        sh(&["ip", "-n", p, "route", "add", "default", "dev", "pv"]);
        sh(&[
            "ip", "-n", p, "-6", "route", "add", "default", "via", &host_gw, "dev", "pv",
        ]);
        sh(&["ip", "-n", node, "route", "add", &v4, "dev", h]);
        sh(&[
            "ip", "-n", node, "-6", "route", "add", &v6, "via", &pod_gw, "dev", h,
        ]);
        pod
    }

    /// The node's end of the veth pair (`hv<N>`), in the sandbox's namespace: where traffic
    /// from the pod enters the node.
    pub fn host_iface(&self) -> &str {
        &self.host_iface
    }

    /// The pod's network namespace (for `--netns`, [`enter_netns`](crate::enter_netns), or a
    /// sink inside the pod).
    pub fn pod_netns(&self) -> &str {
        &self.netns
    }

    /// The pod's IPv4 address (the source of what it sends over IPv4).
    pub fn pod_v4(&self) -> Ipv4Addr {
        self.v4
    }

    /// The pod's IPv6 address (the source of what it sends over IPv6).
    pub fn pod_v6(&self) -> Ipv6Addr {
        self.v6
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        // Deleting the namespace destroys `pv`, and with it its peer in the node's namespace;
        // delete the node's end first anyway, so it is gone when drop returns.
        let _ = Command::new("ip")
            .args(["-n", &self.node, "link", "del", &self.host_iface])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
