//! The deploy files: the Kubernetes base renders (`kubectl kustomize`), validates against a
//! recent Kubernetes version's schemas (`kubernetes-validate --strict`, from PyPI; `.ci/run`
//! installs it) and passes `cluster/deploy/kubernetes/check.py` (the coordinators' safe
//! start of issue "Acknowledged means kept", advertised addresses, quorum budget, non-root);
//! the readiness probe's gRPC health service answers SERVING on a coordinator with a leader.

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
fn the_coordinators_grpc_health_says_serving_once_a_leader_is_known() {
    let c = UpCluster::start(0);
    let endpoint = c.endpoints().split(',').next().unwrap().to_string();
    // As Kubernetes' probe does: TLS that checks the server, with no client certificate.
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
