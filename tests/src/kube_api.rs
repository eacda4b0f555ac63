//! [`ApiServer`]: a real Kubernetes API for the `kube-api` test step: etcd and the CRD server
//! (`k8s.io/apiextensions-apiserver`, the API server's own CRD machinery), which
//! `cargo xtask test --step kube-api` builds from Debian's packaged Go sources and passes in
//! `EGRESS_TEST_ETCD` and `EGRESS_TEST_APISERVER`.
//!
//! Both listen on loopback ports picked free, with their data, certificates and logs in the
//! directory given; everything stops on drop. Authentication is by client certificate
//! (`--client-ca-file`); a certificate of group `system:masters` is always allowed (the CRD
//! server has no RBAC of its own to ask), so RBAC is not exercised here: the step checks
//! deploy/rbac.yaml offline.
//!
//! The CRD server serves `/apis/...` only (no `/api`, Pods, Services or Namespaces; see
//! ../shared/KUBERNETES.md), so objects are made with kube-rs's dynamic API, as the agent reads
//! them.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use kube::{
    Client, Config,
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The EgressRule resource (deploy/crds.yaml).
pub fn egress_rules() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("egress.dev", "v1alpha1", "EgressRule"),
        "egressrules",
    )
}

/// A client certificate and key, PEM.
struct Identity {
    cert: String,
    key: String,
}

/// etcd and the CRD server; see the module documentation.
pub struct ApiServer {
    dir: PathBuf,
    etcd: Option<Child>,
    server: Option<Child>,
    etcd_port: u16,
    etcd_peer_port: u16,
    /// The API's HTTPS port on 127.0.0.1.
    pub port: u16,
    ca_pem: String,
    serving: Identity,
    admin: Identity,
    /// A kubeconfig for `system:masters` (the tests' and the server's own).
    pub kubeconfig: PathBuf,
}

/// The binary named by `var`, with what to run when it is not set.
fn binary(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: `cargo xtask test --step kube-api` builds etcd and the CRD \
             server and sets it"
        )
    })
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("its address").port()
}

impl ApiServer {
    /// Starts etcd and the CRD server with their state under `dir`, and waits until the API
    /// answers `/readyz`. Panics with the servers' logs when it does not.
    pub fn start(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egress test cluster CA");
        let ca_pem = ca_params
            .self_signed(&ca_key)
            .expect("CA certificate")
            .pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let issue = |names: Vec<String>, cn: &str, org: Option<&str>, client: bool| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::new(names).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            if let Some(org) = org {
                params
                    .distinguished_name
                    .push(rcgen::DnType::OrganizationName, org);
            }
            params.extended_key_usages = vec![if client {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }];
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            Identity {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        };
        let serving = issue(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "egress-test-apiserver",
            None,
            false,
        );
        let admin = issue(
            Vec::new(),
            "egress-test-admin",
            Some("system:masters"),
            true,
        );
        let port = free_port();
        let mut api = Self {
            dir: dir.to_owned(),
            etcd: None,
            server: None,
            etcd_port: free_port(),
            etcd_peer_port: free_port(),
            port,
            ca_pem,
            serving,
            admin,
            kubeconfig: dir.join("admin.kubeconfig"),
        };
        api.write_files();
        api.start_etcd();
        api.start_server();
        api
    }

    fn write_files(&self) {
        let write = |name: &str, text: &str| {
            fs::write(self.dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"))
        };
        write("ca.pem", &self.ca_pem);
        write("serving.pem", &self.serving.cert);
        write("serving-key.pem", &self.serving.key);
        write("admin.pem", &self.admin.cert);
        write("admin-key.pem", &self.admin.key);
        write(
            "admin.kubeconfig",
            &self.kubeconfig_text("egress-test-admin"),
        );
    }

    /// A kubeconfig for this API with the admin's client certificate, the user named `user`.
    pub fn kubeconfig_text(&self, user: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: \
             https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: \
             {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: \
             {key}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: \
             {user}\ncurrent-context: test\n",
            port = self.port,
            ca = b64(&self.ca_pem),
            cert = b64(&self.admin.cert),
            key = b64(&self.admin.key),
        )
    }

    fn log(&self, name: &str) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .unwrap_or_else(|e| panic!("opening {name}: {e}"))
    }

    /// Starts etcd (again, on the same data).
    pub fn start_etcd(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let log = self.log("etcd.log");
        let child = Command::new(binary("EGRESS_TEST_ETCD"))
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.etcd = Some(child);
    }

    /// Starts the CRD server and waits for `/readyz`.
    pub fn start_server(&mut self) {
        let d = |name: &str| self.dir.join(name);
        let log = self.log("apiserver.log");
        let child = Command::new(binary("EGRESS_TEST_APISERVER"))
            .current_dir(&self.dir)
            .args([
                "--etcd-servers",
                &format!("http://127.0.0.1:{}", self.etcd_port),
            ])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &self.port.to_string(),
            ])
            .arg("--tls-cert-file")
            .arg(d("serving.pem"))
            .arg("--tls-private-key-file")
            .arg(d("serving-key.pem"))
            .arg("--client-ca-file")
            .arg(d("ca.pem"))
            .arg("--cert-dir")
            .arg(d("certs"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--authentication-kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--authorization-kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "--authentication-skip-lookup",
                "--enable-priority-and-fairness=false",
            ])
            .args([
                "--disable-admission-plugins",
                "NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,\
                 ValidatingAdmissionPolicy,ValidatingAdmissionWebhook",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("starting the CRD server");
        self.server = Some(child);
        self.wait_ready();
    }

    /// Stops the CRD server (etcd keeps the objects).
    pub fn stop_server(&mut self) {
        stop(self.server.take());
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let runtime = runtime();
        loop {
            let ready = runtime.block_on(async {
                let client = self.client().await;
                client
                    .request_text(
                        // The Service informer (for conversion webhooks) never syncs: the
                        // CRD server does not serve Services.
                        http::Request::get("/readyz?exclude=informer-sync")
                            .body(Vec::new())
                            .expect("request"),
                    )
                    .await
            });
            match ready {
                Ok(text) if text.trim() == "ok" => return,
                other => {
                    if let Some(server) = self.server.as_mut()
                        && let Ok(Some(status)) = server.try_wait()
                    {
                        panic!("the CRD server exited ({status}):\n{}", self.logs());
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        panic!(
                            "the CRD server is not ready after 60 s ({other:?}):\n{}",
                            self.logs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// The last lines of both logs, for a failure message.
    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- etcd.log ---\n{}\n--- apiserver.log ---\n{}",
            tail("etcd.log"),
            tail("apiserver.log")
        )
    }

    /// A client as the admin.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a client config");
        Client::try_from(config).expect("a client")
    }

    /// Creates the CRDs of `deploy/crds.yaml` and waits until each is established.
    pub async fn apply_crds(&self) {
        let text = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml"))
            .expect("reading deploy/crds.yaml");
        let client = self.client().await;
        let crds = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        );
        let api: Api<DynamicObject> = Api::all_with(client, &crds);
        let mut names = Vec::new();
        for document in documents(&text) {
            let object: DynamicObject =
                serde_json::from_value(document).expect("a CRD document as an object");
            let name = object.metadata.name.clone().expect("a CRD name");
            api.patch(
                &name,
                &PatchParams::apply("egress-tests").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| panic!("creating the CRD {name}: {e}"));
            names.push(name);
        }
        let started = Instant::now();
        for name in names {
            loop {
                let crd = api.get(&name).await.expect("reading the CRD back");
                let established = crd.data["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Established" && c["status"] == "True");
                if established {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the CRD {name} is not established after 30 s: {:?}",
                    crd.data["status"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The EgressRules of `namespace`.
    pub async fn rules(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client().await, namespace, &egress_rules())
    }

    /// Creates an EgressRule (a YAML document) in `namespace`; panics when the API refuses it.
    pub async fn create_rule(
        &self,
        namespace: &str,
        document: &serde_json::Value,
    ) -> DynamicObject {
        let object: DynamicObject =
            serde_json::from_value(document.clone()).expect("an EgressRule object");
        self.rules(namespace)
            .await
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating {document}: {e}"))
    }
}

/// Every document of a YAML stream, as JSON values.
pub fn documents(text: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple(text).expect("the YAML parses")
}

/// A current-thread runtime, for the blocking parts of the harness.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn stop(child: Option<Child>) {
    if let Some(mut child) = child {
        // SIGTERM, then SIGKILL if it lingers.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        stop(self.server.take());
        stop(self.etcd.take());
    }
}
