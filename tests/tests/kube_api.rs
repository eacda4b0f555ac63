//! EgressRule objects in a real Kubernetes API (etcd and the CRD server, see
//! `egress_tests::kube_api`) and the agent that watches them, with the namespace cases run
//! from real containerd pods (`egress_tests::node`): `cargo xtask test --step kube-api`.
//!
//! Each test runs in its own sandbox: the API's servers, containerd and the agent all live in
//! its network namespace (the test's thread enters it too, to talk to the API), which has no
//! route out.

use std::time::{Duration, Instant};

use egress_tests::{
    Sandbox, V4_A, V4_B, assert_accepted, egress_bin, enter_netns, eventually,
    kube_api::{ApiServer, documents, egress_rules, runtime},
    node::Node,
    policy::config,
    sa,
};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};

const EGRESS: &str = egress_bin!();
/// The agent's quiet period before it applies a burst of changes (`cluster::QUIET`).
const QUIET: Duration = Duration::from_millis(100);

/// Seed 003's five EgressRules, as written, with our `apiVersion`.
fn seed_003() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../egress-user/src/policy/seeds/tcp.yaml"
    ))
    .expect("reading seed 003's rules");
    let mut rules = documents(&text);
    for rule in &mut rules {
        rule["apiVersion"] = "egress.dev/v1alpha1".into();
    }
    rules
}

/// An EgressRule named `name` with `spec`, as JSON.
fn rule(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "egress.dev/v1alpha1",
        "kind": "EgressRule",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// The CRD's schema takes seed 003's rules as written (with TEST-NET ranges) and refuses, with the field and why,
/// what `egress check` refuses and a schema can say: a CIDR with host bits, an address that
/// is not one, ports out of range, an unknown protocol, no ports, a port twice, tcp ports on a
/// host name and http ports on a CIDR, a reversed or http port range, and (with strict field
/// validation, kubectl's default) an unknown field. A port range is taken as written.
#[test]
fn the_schema_refuses_what_egress_check_refuses() {
    let sb = Sandbox::new();
    enter_netns(&sb.name);
    let api = ApiServer::start(&sb.dir("api"));
    runtime().block_on(async {
        api.apply_crds().await;
        let rules: Api<DynamicObject> =
            Api::namespaced_with(api.client().await, "default", &egress_rules());
        for document in seed_003_test_net() {
            let object: DynamicObject = serde_json::from_value(document).expect("an object");
            let name = object.metadata.name.clone().unwrap_or_default();
            rules
                .create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("seed 003's {name} refused: {e}\n{}", api.logs()));
        }
        assert_eq!(
            rules
                .list(&Default::default())
                .await
                .expect("list")
                .items
                .len(),
            5
        );

        let tcp = |service: &str, port: i64, protocol: &str| {
            serde_json::json!({"destination": {"service": service},
                               "ports": [{"port": port, "protocol": protocol}]})
        };
        let refused = [
            (
                "host-bits",
                tcp("192.0.2.1/24", 443, "tcp"),
                "no bits past its prefix",
            ),
            (
                "bad-prefix",
                tcp("192.0.2.0/33", 443, "tcp"),
                "no bits past its prefix",
            ),
            (
                "bad-address",
                tcp("192.0.2.256", 443, "tcp"),
                "valid IPv4 address",
            ),
            (
                "space",
                tcp("a b.test", 80, "http"),
                "spec.destination.service",
            ),
            (
                "port-zero",
                tcp("192.0.2.0/24", 0, "tcp"),
                "spec.ports[0].port",
            ),
            (
                "port-high",
                tcp("192.0.2.0/24", 65536, "tcp"),
                "spec.ports[0].port",
            ),
            (
                "sctp",
                tcp("192.0.2.0/24", 443, "sctp"),
                "spec.ports[0].protocol",
            ),
            (
                "cidr-http",
                tcp("192.0.2.0/24", 80, "http"),
                "tcp/udp ports",
            ),
            (
                "no-ports",
                serde_json::json!({"destination": {"service": "192.0.2.0/24"}, "ports": []}),
                "spec.ports",
            ),
            (
                "twice",
                serde_json::json!({"destination": {"service": "192.0.2.0/24"},
                    "ports": [{"port": 443, "protocol": "tcp"}, {"port": 443, "protocol": "TCP"}]}),
                "once per protocol",
            ),
            (
                "mixed",
                serde_json::json!({"destination": {"service": "192.0.2.0/24"},
                    "ports": [{"port": 443, "protocol": "tcp"}, {"port": 80, "protocol": "http"}]}),
                "all tcp/udp",
            ),
            (
                "range-reversed",
                serde_json::json!({"destination": {"service": "192.0.2.0/24"},
                    "ports": [{"port": 8999, "endPort": 8000, "protocol": "tcp"}]}),
                "endPort is below port",
            ),
            (
                "range-http",
                serde_json::json!({"destination": {"service": "api.example.test"},
                    "ports": [{"port": 8000, "endPort": 8010, "protocol": "http"}]}),
                "a port range is tcp or udp",
            ),
        ];
        for (name, spec, want) in refused {
            let object: DynamicObject =
                serde_json::from_value(rule(name, spec.clone())).expect("an object");
            match rules.create(&PostParams::default(), &object).await {
                Ok(_) => panic!("the API accepted {name}: {spec}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{name}: the API's refusal does not say {want:?}: {e}"
                ),
            }
        }

        // An FQDN rule (a host name with tcp ports) is taken.
        let fqdn: DynamicObject =
            serde_json::from_value(rule("host-tcp", tcp("api.example.test", 443, "tcp")))
                .expect("an object");
        rules
            .create(&PostParams::default(), &fqdn)
            .await
            .expect("the API takes an FQDN rule");

        // A port range is taken, and kept as written (not pruned by the schema).
        let range = serde_json::json!({"destination": {"service": "192.0.2.0/24"},
            "ports": [{"port": 8000, "endPort": 8999, "protocol": "tcp"}]});
        let object: DynamicObject =
            serde_json::from_value(rule("range", range)).expect("an object");
        rules
            .create(&PostParams::default(), &object)
            .await
            .expect("a port range refused");
        let stored = rules.get("range").await.expect("get range");
        assert_eq!(
            stored.data["spec"]["ports"][0]["endPort"], 8999,
            "{stored:?}"
        );

        // An unknown field: refused with strict field validation (kubectl's default).
        let mut unknown = rule("unknown-field", tcp("192.0.2.0/24", 443, "tcp"));
        unknown["spec"]["destinaton"] = serde_json::json!({"service": "198.51.100.0/24"});
        // As `kubectl apply --server-side` sends it (kubectl's default is strict).
        let e = rules
            .patch(
                "unknown-field",
                &kube::api::PatchParams::apply("egress-tests").validation_strict(),
                &kube::api::Patch::Apply(&unknown),
            )
            .await
            .expect_err("the API accepted an unknown field under strict validation");
        assert!(e.to_string().contains("destinaton"), "{e}");
        // Nothing refused was stored: seed 003's five, the FQDN rule and the range.
        assert_eq!(
            rules
                .list(&Default::default())
                .await
                .expect("list")
                .items
                .len(),
            7
        );
    });
}

/// Seed 003's ranges, in TEST-NET: the five rules' destinations (192.0.2.0/25 is the first).
const SEED_RANGES: [&str; 5] = [
    "192.0.2.0/25",
    "198.51.100.0/25",
    "203.0.113.0/26",
    "198.18.0.0/24",
    "198.19.0.0/24",
];

/// Seed 003's five EgressRules with TEST-NET ranges in place of the site's.
fn seed_003_test_net() -> Vec<serde_json::Value> {
    let mut rules = seed_003();
    for (rule, range) in rules.iter_mut().zip(SEED_RANGES) {
        rule["spec"]["destination"]["service"] = range.into();
    }
    rules
}

/// The agent's rules of `namespace` in force (`egress get egressrules -n NS -o json`).
fn in_force(sb: &Sandbox, namespace: &str) -> Vec<serde_json::Value> {
    let (ok, out, err) = sb.ctl(
        EGRESS,
        &["get", "egressrules", "-n", namespace, "-o", "json"],
    );
    assert!(ok.success(), "{out}{err}");
    serde_json::from_str(&out).expect("egress get -o json")
}

/// `status.nodes` of the EgressRule `namespace/name`.
fn node_statuses(api: &ApiServer, namespace: &str, name: &str) -> Vec<serde_json::Value> {
    runtime().block_on(async {
        let object = api
            .rules(namespace)
            .await
            .get(name)
            .await
            .expect("reading the rule");
        object.data["status"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    })
}

/// Seed 003 applied as EgressRule objects in namespace `default` (as `kubectl apply -f -n
/// default` would) allows its ranges to the pods of `default` only: a real containerd pod of
/// `default` reaches a sink in the first range, a pod of `other` is refused at connect(), and
/// the sinks count exactly the allowed connections. `egress get` shows each rule with its
/// object and resourceVersion as the source, and each object's status says it is in force on
/// this node for its generation. An object the schema takes but the agent refuses (https on
/// a port the node's file makes http for that host) is marked Refused with the agent's message, and the valid ones stay
/// in force. Deleting the five objects (as the seed's cleanup does) denies again.
#[test]
fn egress_rules_in_the_api_hold_for_their_namespace_only() {
    let sb = Sandbox::new();
    enter_netns(&sb.name);
    let api = ApiServer::start(&sb.dir("api"));
    let rt = runtime();
    rt.block_on(api.apply_crds());
    let [a443, a9090] = sb.sinks(V4_A, [443, 9090]);
    let [b443] = sb.sinks(V4_B, [443]);
    let policy = sb.policy_file(
        "p.yaml",
        &(config("  mode: enforce\n")
            + "kind: EgressRule\nmetadata: {name: conflict-http}\nspec:\n  destination: \
               {service: conflict.test}\n  ports: [{port: 8080, protocol: http}]\n"),
    );
    let mut node = Node::start(&sb);
    let web = node.pod("default", "sleep");
    let other = node.pod("other", "sleep");
    let args = [
        "--policy".to_owned(),
        policy.display().to_string(),
        "--pin-dir".to_owned(),
        sb.pin_dir.display().to_string(),
        "--cri-socket".to_owned(),
        node.socket().display().to_string(),
        "--kubeconfig".to_owned(),
        api.kubeconfig.display().to_string(),
        "--node-name".to_owned(),
        "node-a".to_owned(),
    ];
    let agent = sb.agent(EGRESS).args(&args).start();
    node.assert_refused(&web, sa(V4_A, 443));

    let applied = Instant::now();
    rt.block_on(async {
        for rule in seed_003_test_net() {
            api.create_rule("default", &rule).await;
        }
    });
    let enforced = eventually(Duration::from_secs(10), || {
        in_force(&sb, "default").len() == 5
    });
    assert!(
        enforced,
        "the five rules are not in force:\n{}",
        agent.log()
    );
    eprintln!(
        "seed 003 as objects: in force {:?} after the first create",
        applied.elapsed()
    );
    // The CRD server serves no core Services (404): the agent says so once and goes on with
    // the EgressRules (a Service watch that held them back would have failed the wait above).
    let log = agent.log();
    assert_eq!(
        log.matches("the API server does not serve Services")
            .count(),
        1,
        "{log}"
    );
    node.assert_connects(&web, sa(V4_A, 443));
    node.assert_connects(&web, sa(V4_B, 443));
    node.assert_refused(&web, sa(V4_A, 9090));
    node.assert_refused(&other, sa(V4_A, 443));
    node.assert_refused(&other, sa(V4_B, 443));
    assert_accepted(&[(&a443, 1), (&b443, 1), (&a9090, 0)]);
    let rules = in_force(&sb, "default");
    let range1 = rules
        .iter()
        .find(|r| r["name"] == "wikipedia-range1")
        .unwrap_or_else(|| panic!("no wikipedia-range1 in {rules:?}"));
    let source = range1["source"].as_str().unwrap_or_default();
    assert!(
        source.starts_with("EgressRule default/wikipedia-range1 (resourceVersion "),
        "{range1}"
    );
    assert!(in_force(&sb, "other").is_empty());
    let written = eventually(Duration::from_secs(10), || {
        node_statuses(&api, "default", "wikipedia-range1")
            .iter()
            .any(|n| {
                n["node"] == "node-a" && n["state"] == "InForce" && n["observedGeneration"] == 1
            })
    });
    assert!(
        written,
        "status: {:?}\n{}",
        node_statuses(&api, "default", "wikipedia-range1"),
        agent.log()
    );

    // Valid for the schema, refused by the agent: port 8080 of conflict.test is http in the
    // node's file and https here. The valid rules stay in force.
    let conflict = serde_json::json!({
        "apiVersion": "egress.dev/v1alpha1",
        "kind": "EgressRule",
        "metadata": {"name": "conflict"},
        "spec": {"destination": {"service": "conflict.test"}, "ports": [{"port": 8080, "protocol": "https"}]},
    });
    rt.block_on(api.create_rule("default", &conflict));
    let mut statuses = Vec::new();
    let refused = eventually(Duration::from_secs(10), || {
        statuses = node_statuses(&api, "default", "conflict");
        statuses
            .iter()
            .any(|n| n["node"] == "node-a" && n["state"] == "Refused")
    });
    assert!(refused, "status: {statuses:?}\n{}", agent.log());
    let message = statuses[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("EgressRule default/conflict")
            && message.contains("a host's port has one protocol"),
        "{message}"
    );
    assert!(
        agent.log().contains("EgressRule refused on this node"),
        "{}",
        agent.log()
    );
    // The refusal's Kubernetes Event: the CRD server does not serve events.k8s.io, which the
    // agent says once (the Event itself is unit-tested against a mock API in cluster.rs).
    assert!(
        eventually(Duration::from_secs(10), || agent
            .log()
            .contains("the API refused an Event")),
        "{}",
        agent.log()
    );
    assert_eq!(in_force(&sb, "default").len(), 5);
    node.assert_connects(&web, sa(V4_A, 443));
    assert_accepted(&[(&a443, 2)]);

    // Deleted, as the seed's `istioctl delete egressrule ... -n default`: denied again.
    rt.block_on(async {
        let rules = api.rules("default").await;
        for rule in seed_003_test_net() {
            let name = rule["metadata"]["name"]
                .as_str()
                .expect("a name")
                .to_owned();
            rules
                .delete(&name, &DeleteParams::default())
                .await
                .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
        }
    });
    let gone = eventually(Duration::from_secs(10), || {
        in_force(&sb, "default").is_empty()
    });
    assert!(gone, "{:?}\n{}", in_force(&sb, "default"), agent.log());
    node.assert_refused(&web, sa(V4_A, 443));
    assert_accepted(&[(&a443, 2), (&b443, 1), (&a9090, 0)]);
}

/// `egress get egressrules -n NS -o json` of the agent at `socket`: each rule's name and what
/// it allows, sorted.
fn allows(socket: &std::path::Path, namespace: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new(EGRESS)
        .args([
            "get",
            "egressrules",
            "-n",
            namespace,
            "-o",
            "json",
            "--socket",
        ])
        .arg(socket)
        .output()
        .expect("running egress get");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("egress get -o json");
    let mut rules: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["allows"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    rules.sort();
    rules
}

/// The agent's generation (`egress status -o json`).
fn generation(socket: &std::path::Path) -> u64 {
    let out = std::process::Command::new(EGRESS)
        .args(["status", "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .expect("running egress status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {status}"))
}

/// An EgressRule `name` allowing 192.0.2.0/24 on `port`.
fn port_rule(name: &str, port: u16) -> serde_json::Value {
    rule(
        name,
        serde_json::json!({"destination": {"service": "192.0.2.0/24"},
                           "ports": [{"port": port, "protocol": "tcp"}]}),
    )
}

/// Sets the port of the EgressRule `name` (a merge patch, as `kubectl patch` does).
async fn set_port(rules: &Api<DynamicObject>, name: &str, port: u16) {
    let patch = serde_json::json!({"spec": {"ports": [{"port": port, "protocol": "tcp"}]}});
    rules
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap_or_else(|e| panic!("patching {name}: {e}"));
}

/// Two agents ("nodes" with their own cgroups, pins, sockets and state) watch one API and
/// end with exactly its policy, whatever happens on the way:
///
/// - 1,000 updates of one object in a burst reach each agent as a few generations, and the
///   last update is in force on both within a bounded time (printed);
/// - the API server stopped: both keep the policy in force; an agent killed and started again
///   while the API is down enforces the objects last in force (from its state directory);
///   the API back: changes made after it returns reach both;
/// - an agent killed in the middle of a burst and started again ends with the burst's last
///   update;
/// - both agents' entries are in each object's status, side by side.
#[test]
fn agents_end_with_exactly_the_apis_policy() {
    let sb = Sandbox::new();
    enter_netns(&sb.name);
    let mut api = ApiServer::start(&sb.dir("api"));
    let rt = runtime();
    rt.block_on(api.apply_crds());
    let agent = |node: &str| {
        let dir = sb.dir(node);
        std::fs::create_dir_all(&dir).expect("node directory");
        let port = if node == "node-a" { 15101 } else { 15102 };
        let policy = sb.policy_file(
            &format!("{node}.yaml"),
            &config(&format!("  proxy:\n    port: {port}\n")),
        );
        let args = vec![
            "--policy".to_owned(),
            policy.display().to_string(),
            "--cgroup".to_owned(),
            sb.cgroup.join(node).display().to_string(),
            "--create-cgroup".to_owned(),
            "--pin-dir".to_owned(),
            sb.pin_dir.join(node).display().to_string(),
            "--state-dir".to_owned(),
            dir.join("state").display().to_string(),
            "--socket".to_owned(),
            dir.join("egress.sock").display().to_string(),
            "--kubeconfig".to_owned(),
            api.kubeconfig.display().to_string(),
            "--node-name".to_owned(),
            node.to_owned(),
        ];
        (args, dir.join("egress.sock"))
    };
    let (args_a, sock_a) = agent("node-a");
    let (args_b, sock_b) = agent("node-b");
    let mut agent_a = sb.agent(EGRESS).args(&args_a).start();
    let mut agent_b = sb.agent(EGRESS).args(&args_b).start();

    // A burst of 1,000 updates of one object.
    let rules = rt.block_on(api.rules("team"));
    rt.block_on(api.create_rule("team", &port_rule("burst", 1000)));
    let want = |port: u16| vec![("burst".to_owned(), format!("192.0.2.0/24 {port}/tcp"))];
    let agree = |port: u16, within: Duration| {
        eventually(within, || {
            allows(&sock_a, "team") == want(port) && allows(&sock_b, "team") == want(port)
        })
    };
    assert!(
        agree(1000, Duration::from_secs(10)),
        "{}\n{}",
        agent_a.log(),
        agent_b.log()
    );
    let (gen_a, gen_b) = (generation(&sock_a), generation(&sock_b));
    let started = Instant::now();
    // The sender's own pauses: under load (the other tests, CI) a PATCH can take longer than
    // the agent's quiet period, and then the agent rightly applies what it has.
    let pauses = rt.block_on(async {
        let mut pauses = 0;
        let mut last = Instant::now();
        for port in 1001..=2000 {
            set_port(&rules, "burst", port).await;
            if last.elapsed() >= QUIET {
                pauses += 1;
            }
            last = Instant::now();
        }
        pauses
    });
    let sent = Instant::now();
    assert!(
        agree(2000, Duration::from_secs(10)),
        "{:?} {:?}\n{}",
        allows(&sock_a, "team"),
        allows(&sock_b, "team"),
        agent_a.log()
    );
    let in_force = sent.elapsed();
    let generations = [generation(&sock_a) - gen_a, generation(&sock_b) - gen_b];
    eprintln!(
        "1,000 updates sent in {:?} ({pauses} pauses of {QUIET:?} or more between them); the \
         last in force on both agents {in_force:?} after it was sent; generations: node-a {}, \
         node-b {}",
        sent - started,
        generations[0],
        generations[1]
    );
    // A few generations, not 1,000: each one ends a burst of changes at least QUIET long (the
    // agent applies once changes stop for QUIET, or MAX_DELAY after a burst's first change;
    // the exact timeline is `cluster.rs`'s paused-time test), so no more than the time the
    // changes were seen over, in QUIET steps.
    let window = (sent - started) + in_force;
    let bound = (window.as_millis() / QUIET.as_millis()) as u64 + 2;
    assert!(
        generations.iter().all(|&g| g >= 1 && g <= bound),
        "{generations:?} generations for 1,000 updates over {window:?} (at most {bound}); \
         node-a's applies:\n{}",
        agent_a
            .log()
            .lines()
            .filter(|l| l.contains("EgressRules applied"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let statuses = eventually(Duration::from_secs(10), || {
        let nodes = node_statuses(&api, "team", "burst");
        let generation_now =
            rt.block_on(async { rules.get("burst").await.expect("get").metadata.generation });
        ["node-a", "node-b"].iter().all(|node| {
            nodes.iter().any(|n| {
                n["node"] == *node
                    && n["state"] == "InForce"
                    && n["observedGeneration"].as_i64() == generation_now
            })
        })
    });
    assert!(statuses, "{:?}", node_statuses(&api, "team", "burst"));

    // The API server down: nothing changes; an agent restarted meanwhile keeps the objects.
    rt.block_on(api.create_rule("team", &port_rule("kept", 3000)));
    assert!(eventually(Duration::from_secs(10), || allows(
        &sock_a, "team"
    )
    .len()
        == 2
        && allows(&sock_b, "team").len() == 2));
    api.stop_server();
    std::thread::sleep(Duration::from_secs(2));
    let before = allows(&sock_a, "team");
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(allows(&sock_b, "team"), before);
    agent_a.signal(9);
    let _ = agent_a.wait();
    agent_a = sb.agent(EGRESS).args(&args_a).start();
    assert_eq!(
        allows(&sock_a, "team"),
        before,
        "restarted with the API down:\n{}",
        agent_a.log()
    );
    api.start_server();
    // Changed after the API is back: both follow.
    rt.block_on(async {
        let rules = api.rules("team").await;
        rules
            .delete("kept", &DeleteParams::default())
            .await
            .expect("deleting kept");
    });
    assert!(
        agree(2000, Duration::from_secs(30)),
        "{:?} {:?}\n{}\n{}",
        allows(&sock_a, "team"),
        allows(&sock_b, "team"),
        agent_a.log(),
        agent_b.log()
    );

    // An agent killed in the middle of a burst.
    std::thread::scope(|s| {
        // Its own client and runtime on its own thread (which is in the sandbox's network
        // namespace, as the thread that started it).
        let burst = s.spawn(|| {
            runtime().block_on(async {
                let rules = api.rules("team").await;
                for port in 4001..=4300 {
                    set_port(&rules, "burst", port).await;
                }
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        agent_b.signal(9);
        let _ = agent_b.wait();
        burst.join().expect("the burst");
    });
    agent_b = sb.agent(EGRESS).args(&args_b).start();
    assert!(
        agree(4300, Duration::from_secs(30)),
        "{:?} {:?}\n{}",
        allows(&sock_a, "team"),
        allows(&sock_b, "team"),
        agent_b.log()
    );
    drop((agent_a, agent_b));
}
