//! The deploy files: the Kubernetes base renders (`kubectl kustomize`), validates against a
//! recent Kubernetes version's schemas (`kubernetes-validate --strict`, from PyPI; `.ci/run`
//! installs it) and passes `cluster/deploy/kubernetes/check.py` (the coordinators' safe
//! start of issue "Acknowledged means kept", advertised addresses, quorum budget, non-root);
//! the readiness probe's /ready (and the gRPC health service) answer once a coordinator knows
//! a leader; `credentials.sh` makes the Secrets the base mounts, and they hold folders a
//! server starts with.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The base rendered: by `kubectl kustomize` where kubectl is installed, else the resources
/// the kustomization lists, concatenated (the base has no patches or generators).
fn render() -> String {
    let base = repo().join("cluster/deploy/kubernetes");
    if on_path("kubectl").is_some() {
        return ok(Command::new("kubectl").arg("kustomize").arg(&base));
    }
    eprintln!("kubectl is not installed: rendering the base by concatenating its resources");
    let k = std::fs::read_to_string(base.join("kustomization.yaml")).unwrap();
    let files: Vec<&str> = k.lines().skip_while(|l| !l.starts_with("resources:")).skip(1).take_while(|l| l.trim_start().starts_with("- ")).map(|l| l.trim_start()[2..].trim()).collect();
    assert!(!files.is_empty(), "no resources in {k}");
    files.iter().map(|f| std::fs::read_to_string(base.join(f)).unwrap()).collect::<Vec<_>>().join("\n---\n")
}

/// kubernetes-validate and the Python next to it (its venv has PyYAML).
fn validator() -> (PathBuf, PathBuf) {
    let kv = on_path("kubernetes-validate").expect("kubernetes-validate is not installed: `pip install kubernetes-validate` (.ci/run puts it in target/tools/k8s on PATH)");
    let python = kv.parent().unwrap().join("python3");
    (kv.clone(), if python.is_file() { python } else { PathBuf::from("python3") })
}

fn check(python: &Path, file: &Path) -> std::process::Output {
    run(Command::new(python).arg(repo().join("cluster/deploy/kubernetes/check.py")).arg(file))
}

#[test]
fn the_kubernetes_base_renders_validates_and_starts_coordinators_safely() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, render()).unwrap();
    let (kv, python) = validator();
    let out = ok(Command::new(&kv).args(["--strict"]).arg(&rendered));
    for kind in ["statefulset/shoal-coordinator", "deployment/shoal-worker", "poddisruptionbudget/shoal-coordinator", "persistentvolumeclaim/shoal-store"] {
        assert!(out.contains(&format!("passed for resource {kind}")), "{kind} not validated: {out}");
    }
    let good = check(&python, &rendered);
    assert!(good.status.success(), "{}{}", String::from_utf8_lossy(&good.stdout), String::from_utf8_lossy(&good.stderr));

    // The checker fails where the start would be unsafe: replicas joining as learners, pods
    // started one by one, a budget that gives up the quorum, a worker advertising a wildcard.
    let text = std::fs::read_to_string(&rendered).unwrap();
    for (from, to, says) in [
        ("--initial-state new", "--initial-state join", "--initial-state must be new"),
        ("podManagementPolicy: Parallel", "podManagementPolicy: OrderedReady", "in parallel"),
        ("minAvailable: 2", "minAvailable: 1", "PodDisruptionBudget"),
        ("$(POD_IP):7500", "0.0.0.0:7500", "advertise"),
        ("--credentials /credentials/coordinator-", "--credentials /elsewhere/coordinator-", "coordinators need --credentials"),
        ("- --credentials", "- --insecure", "--insecure serves plaintext"),
        ("defaultMode: 256", "defaultMode: 420", "Secret volume"),
        ("path: coordinator-3/node.key", "path: coordinator-3/other.key", "lacks coordinator-3/node.key"),
        ("path: /ready", "path: /metrics", "readiness must be /ready"),
        ("scheme: HTTPS", "scheme: HTTP", "readiness over HTTPS"),
    ] {
        assert!(text.contains(from), "the rendered base lacks {from:?}");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let out = check(&python, &bad);
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains(says), "{from} -> {to}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn the_s3_overlay_moves_the_store_to_a_bucket_with_credentials_only_in_the_servers() {
    let kubectl = on_path("kubectl").expect("kubectl is not installed: the overlay needs `kubectl kustomize` to render (.ci/run installs kubernetes-client)");
    let text = ok(Command::new(kubectl).arg("kustomize").arg(repo().join("cluster/deploy/kubernetes-s3")));
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("s3.yaml");
    std::fs::write(&rendered, &text).unwrap();
    let (kv, python) = validator();
    let out = ok(Command::new(&kv).args(["--strict"]).arg(&rendered));
    assert!(out.contains("passed for resource statefulset/shoal-coordinator") && out.contains("passed for resource deployment/shoal-worker"), "{out}");
    assert!(!out.contains("persistentvolumeclaim/shoal-store") && !text.contains("mountPath: /store"), "the shared volume is gone: {text}");
    assert!(text.contains("store: s3://"), "{text}");
    let good = check(&python, &rendered);
    assert!(good.status.success(), "{}{}", String::from_utf8_lossy(&good.stdout), String::from_utf8_lossy(&good.stderr));
    // Without the credentials' Secret the servers could not reach the bucket.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text.replacen("name: shoal-store-credentials", "name: something-else", 1)).unwrap();
    let out = check(&python, &bad);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("credentials"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_coordinators_health_says_serving_once_a_leader_is_known() {
    let c = UpCluster::start(0);
    let endpoint = c.endpoints().split(',').next().unwrap().to_string();
    // Kubernetes' readiness probe: /ready on the HTTP port, with no token.
    let http = std::fs::read_to_string(c.dir().join("coordinators/1/http.addr")).unwrap();
    // HTTPS (a probe with `scheme: HTTPS` checks no certificate; this client does).
    let ca_file = c.dir().join("ca/ca.crt");
    let ready = || (https_get(http.trim(), "/ready", &ca_file, None).ok()?.0 == 200).then_some(());
    wait_for("/ready to answer 200", std::time::Duration::from_secs(20), ready);
    // A gRPC client with TLS that checks the server and shows no certificate (grpc-health-probe).
    let ca = std::fs::read(c.dir().join("ca/ca.crt")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca)).domain_name("shoal");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{endpoint}")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut last = None;
        for _ in 0..50 {
            let r = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
            last = Some(r.status);
            if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let named = client.check(tonic_health::pb::HealthCheckRequest { service: "shoal.v1.Coordinator".into() }).await.unwrap().into_inner().status;
        (last, named)
    });
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(status, (Some(serving), serving));
}

/// The documents of a YAML file as JSON (PyYAML, beside kubernetes-validate), a Secret's
/// data decoded to hex.
fn yaml_docs(python: &Path, file: &Path) -> Vec<serde_json::Value> {
    const TO_JSON: &str = "import sys, yaml, json, base64\n\
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
for d in docs:\n    if d.get('kind') == 'Secret':\n        d['data'] = {k: base64.b64decode(v).hex() for k, v in d.get('data', {}).items()}\n\
print(json.dumps(docs))\n";
    serde_json::from_str(&ok(Command::new(python).arg("-c").arg(TO_JSON).arg(file))).unwrap()
}

/// A Secret's files.
fn secret_files(doc: &serde_json::Value) -> std::collections::BTreeMap<String, Vec<u8>> {
    let hex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    doc["data"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), hex(v.as_str().unwrap()))).collect()
}

#[test]
fn credentials_sh_makes_the_secrets_the_base_mounts_and_servers_start_from_them() {
    let kubectl = on_path("kubectl").expect("kubectl is not installed (.ci/run installs kubernetes-client)");
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin");
    let out = run(Command::new(repo().join("cluster/deploy/kubernetes/credentials.sh")).arg(&admin).env("SHOAL", env!("CARGO_BIN_EXE_shoal")).env("PATH", format!("{}:{}", kubectl.parent().unwrap().display(), std::env::var("PATH").unwrap())));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let yaml = dir.path().join("secrets.yaml");
    std::fs::write(&yaml, &text).unwrap();
    let (kv, python) = validator();
    let v = ok(Command::new(&kv).args(["--strict"]).arg(&yaml));
    assert!(v.contains("passed for resource secret/shoal-coordinator-credentials") && v.contains("passed for resource secret/shoal-worker-credentials"), "{v}");

    let secrets: std::collections::BTreeMap<String, _> = yaml_docs(&python, &yaml).iter().map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), secret_files(d))).collect();
    // Every item of the coordinators' volume names a key of the Secret; laid out as the
    // kubelet does (0400), each replica's folder is one `serve coordinator` accepts.
    let rendered = dir.path().join("base.yaml");
    std::fs::write(&rendered, render()).unwrap();
    let base = yaml_docs(&python, &rendered);
    let sts = base.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let volume = sts["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "credentials").unwrap();
    let coordinators = &secrets[volume["secret"]["secretName"].as_str().unwrap()];
    let mount = dir.path().join("mount");
    for item in volume["secret"]["items"].as_array().unwrap() {
        let key = item["key"].as_str().unwrap();
        let path = mount.join(item["path"].as_str().unwrap());
        shoal_core::auth::write_secret_file(&path, coordinators.get(key).unwrap_or_else(|| panic!("the Secret lacks {key}"))).unwrap();
    }
    for id in 1..=3u64 {
        let folder = mount.join(format!("coordinator-{id}"));
        shoal_coordinator::server::AuthConfig::load(&folder).unwrap();
        let tls = shoal_coordinator::tls::TlsFiles::load(&folder, "node").unwrap().expect("a certificate");
        assert_eq!(tls.cert, coordinators[&format!("node-{id}.crt")]);
    }
    let workers = &secrets["shoal-worker-credentials"];
    let worker = dir.path().join("worker");
    for (k, v) in workers {
        shoal_core::auth::write_secret_file(&worker.join(k), v).unwrap();
    }
    shoal_cluster::credentials::load_token(&worker.join(shoal_cluster::credentials::WORKER_TOKEN_FILE)).unwrap();
    assert!(shoal_coordinator::tls::TlsFiles::load(&worker, "worker").unwrap().is_some());
    // The admin's folder keeps the token that reaches the cluster.
    assert!(shoal_cluster::credentials::read_token(&admin.join(shoal_cluster::credentials::ADMIN_TOKEN_FILE)).is_some());
}
