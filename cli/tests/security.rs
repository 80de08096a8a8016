//! Tokens and roles on a real cluster: every gRPC method called with every role and with no
//! token gets exactly the method table's answer; revoked, forged and expired tokens are
//! refused; exec batch jobs need admin or the exec grant; a Raft message whose `from` is not
//! the node its peer token names is dropped and counted.

mod common;
use std::time::Duration;

use common::*;
use shoal_coordinator::tls::TlsFiles;
use shoal_core::auth::{Access, Role, Token, TokenKey, METHODS};

/// The admin's certificate (a client's channel; what it may do is its token's role).
fn admin_tls(c: &UpCluster) -> TlsFiles {
    TlsFiles::load(&c.dir().join("ca"), "admin").unwrap().unwrap()
}

/// Methods whose request or reply is a stream.
const CLIENT_STREAMING: [&str; 3] = ["/shoal.v1.Coordinator/PutObjects", "/shoal.v1.RaftTransport/SendStream", "/shoal.v1.RaftTransport/Stream"];
const SERVER_STREAMING: [&str; 2] = ["/shoal.v1.Coordinator/GetObject", "/grpc.health.v1.Health/Watch"];

/// Calls `path` with an empty request (every field at its default) and `token`; Ok(()) when
/// the guard let it through (the method may still refuse the empty request), else the
/// guard's status.
async fn call(addr: &str, tls: &TlsFiles, path: &'static str, token: Option<&str>) -> Result<(), tonic::Status> {
    let channel = shoal_coordinator::tls::endpoint(addr, Some(tls)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    let p = path.as_str();
    let result = if CLIENT_STREAMING.contains(&p) {
        grpc.client_streaming(with_token(tonic::Request::new(tokio_stream::iter(Vec::<()>::new())), token), path, codec).await.map(|_| ())
    } else if SERVER_STREAMING.contains(&p) {
        grpc.server_streaming(with_token(tonic::Request::new(()), token), path, codec).await.map(|_| ())
    } else {
        grpc.unary(with_token(tonic::Request::new(()), token), path, codec).await.map(|_| ())
    };
    match result {
        Err(s) if s.metadata().get("shoal-guard").is_some() => Err(s),
        _ => Ok(()),
    }
}

fn with_token<T>(mut r: tonic::Request<T>, token: Option<&str>) -> tonic::Request<T> {
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn create(c: &UpCluster, role: &str, extra: &[&str]) -> String {
    let v = json(c.cmd(&["token", "create", "--role", role, "--name", &format!("test {role}"), "--json"]).args(extra));
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn every_method_with_every_role_gets_the_tables_answer() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    let addr = c.endpoints();
    let tls = admin_tls(&c);
    let ca = c.dir().join("ca");
    let admin = std::fs::read_to_string(ca.join("admin.token")).unwrap().trim().to_string();
    let key = TokenKey::load(&ca.join("token.key")).unwrap();
    let operator = create(&c, "operator", &[]);
    let viewer = create(&c, "viewer", &[]);
    let worker = create(&c, "worker", &[]);
    let peer = key.peer_token(1);
    let forged = Token { id: Token::parse(&admin).unwrap().id, secret: [7; 32] }.to_string();
    let other_cluster_peer = TokenKey::generate().peer_token(1);
    let callers: Vec<(&str, Option<Role>, Option<&str>)> = vec![
        ("no token", None, None),
        ("admin", Some(Role::Admin), Some(&admin)),
        ("operator", Some(Role::Operator), Some(&operator)),
        ("viewer", Some(Role::Viewer), Some(&viewer)),
        ("worker", Some(Role::Worker), Some(&worker)),
        ("peer", Some(Role::Peer), Some(&peer)),
        ("forged", None, Some(&forged)),
        ("another cluster's peer", None, Some(&other_cluster_peer)),
    ];
    // A peer shows its node's certificate (a peer token on another's is refused: see below).
    let node1 = TlsFiles::load(&c.dir().join("credentials/coordinator-1"), "node").unwrap().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut checked = 0;
    for (path, access) in METHODS {
        for (who, role, token) in &callers {
            let allowed = match access {
                Access::Open => true,
                Access::Roles(roles) => role.is_some_and(|r| roles.contains(&r)),
            };
            let tls = if *who == "peer" { &node1 } else { &tls };
            let got = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), call(&addr, tls, path, *token)).await }).unwrap_or_else(|_| panic!("{path} as {who}: no answer"));
            match (allowed, got) {
                (true, Ok(())) => {}
                (true, Err(s)) => panic!("{path} as {who}: refused ({:?} {}) though the table allows it", s.code(), s.message()),
                (false, Ok(())) => panic!("{path} as {who}: let through though the table refuses it"),
                (false, Err(s)) => {
                    let want = if role.is_some() { tonic::Code::PermissionDenied } else { tonic::Code::Unauthenticated };
                    assert_eq!(s.code(), want, "{path} as {who}: {}", s.message());
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, METHODS.len() * callers.len());
    // An unknown method is refused to everyone, admin included.
    let e = rt.block_on(call(&addr, &tls, "/shoal.v1.Coordinator/NoSuchMethod", Some(&admin))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let status = json(&mut c.cmd(&["status", "--json"]));
    let node = &status["coordinators"][0];
    assert_eq!((&node["auth"], &node["tls"]), (&serde_json::json!("tokens"), &serde_json::json!(true)), "{status}");
    assert!(node["refused_calls"].as_u64().unwrap() > 100, "{status}");
}

#[test]
fn revoked_expired_and_unknown_tokens_are_refused_and_exec_needs_a_grant() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    let as_token = |t: &str, args: &[&str]| {
        let mut cmd = c.cmd(args);
        cmd.env("SHOAL_TOKEN", t);
        cmd
    };
    // A viewer reads, cannot write, and is refused from the revocation's commit on.
    let viewer = create(&c, "viewer", &[]);
    ok(&mut as_token(&viewer, &["job", "list"]));
    let e = fails(as_token(&viewer, &["data", "import", "tiny", "--json"]).args(write_tiny_idx(c.tmp.path())));
    assert!(e.contains("a viewer token may not call"), "{e}");
    let id = Token::parse(&viewer).unwrap().id;
    let listed = json(&mut c.cmd(&["token", "list", "--json"]));
    let row = listed["tokens"].as_array().unwrap().iter().find(|t| t["id"] == id.as_str()).unwrap().clone();
    assert_eq!((row["role"].as_str(), row["revoked_ms"].as_u64()), (Some("viewer"), Some(0)), "{listed}");
    assert!(!listed.to_string().contains(&viewer[23..]), "a listing never shows a secret");
    ok(&mut c.cmd(&["token", "revoke", &id]));
    let e = fails(&mut as_token(&viewer, &["job", "list"]));
    assert!(e.contains("revoked"), "{e}");
    // The last admin token cannot be revoked (nobody could manage the cluster after).
    let admin_id = Token::parse(std::fs::read_to_string(c.dir().join("ca/admin.token")).unwrap().trim()).unwrap().id;
    let e = fails(&mut c.cmd(&["token", "revoke", &admin_id]));
    assert!(e.contains("last admin token"), "{e}");
    // A token with a one-second life works, then does not.
    let brief = create(&c, "viewer", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let e = fails(&mut as_token(&brief, &["job", "list"]));
    assert!(e.contains("expired"), "{e}");
    // A token of the right shape that the cluster never made; a malformed SHOAL_TOKEN.
    let e = fails(&mut as_token(&Token::generate().to_string(), &["job", "list"]));
    assert!(e.contains("unknown token"), "{e}");
    let e = fails(&mut as_token("hunter2", &["job", "list"]));
    assert!(e.contains("SHOAL_TOKEN") && e.contains("not a shoal token"), "{e}");

    // exec batch jobs run commands on every worker: an operator needs the exec grant.
    let files = write_tiny_idx(c.tmp.path());
    ok(c.cmd(&["data", "import", "tiny"]).args(&files));
    let spec = c.write_spec(
        "exec.toml",
        "name = \"x\"\nkind = \"batch\"\n[input]\ndataset = \"tiny\"\n[operator]\nkind = \"exec\"\ncommand = [\"/bin/cp\", \"{input}\", \"{output}\"]\n[output]\ndataset = \"copied\"\n[cluster]\nworkers = 1\n",
    );
    let operator = create(&c, "operator", &[]);
    let e = fails(as_token(&operator, &["job", "submit"]).arg(&spec));
    assert!(e.contains("exec grant"), "{e}");
    let granted = create(&c, "operator", &["--grant", "exec"]);
    ok(as_token(&granted, &["job", "submit"]).arg(&spec));
    ok(c.cmd(&["job", "submit"]).arg(&spec));
    // A pipeline with an exec step is the same.
    let pipeline = c.write_spec("p.toml", "name = \"p\"\n[[step]]\nname = \"x\"\nkind = \"batch\"\nspec = \"exec.toml\"\n");
    let e = fails(as_token(&operator, &["pipeline", "submit"]).arg(&pipeline));
    assert!(e.contains("exec grant"), "{e}");
    ok(as_token(&granted, &["pipeline", "submit"]).arg(&pipeline));
}

/// Every worker shares the worker token (and certificate); what says which worker a call is
/// for is the key its registration gave it. A heartbeat for a worker gets its assignment and
/// its ring key, so without the key it is refused, as is every other call made for a worker.
#[test]
fn a_worker_token_cannot_act_for_another_worker() {
    let c = UpCluster::start_with(&["--workers", "1"]);
    let id = wait_for("the worker to register", Duration::from_secs(30), || {
        let s = json(&mut c.cmd(&["status", "--json"]));
        s["workers"][0]["id"].as_str().map(str::to_string)
    });
    let ca = c.dir().join("ca");
    let worker_token = std::fs::read_to_string(ca.join("worker.token")).unwrap().trim().to_string();
    let key = TokenKey::load(&ca.join("token.key")).unwrap();
    let hex = |k: [u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let tls = TlsFiles::load(&c.worker_credentials(), "worker").unwrap().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt.block_on(async { shoal_coordinator::tls::endpoint(&c.endpoints(), Some(&tls)).unwrap().connect().await.unwrap() });
    let mut rpc = shoal_proto::coordinator_client::CoordinatorClient::new(channel);
    fn with_key<T>(msg: T, token: &str, key: Option<String>) -> tonic::Request<T> {
        let mut r = with_token(tonic::Request::new(msg), Some(token));
        if let Some(k) = key {
            r.metadata_mut().insert(shoal_core::auth::WORKER_KEY_HEADER, k.parse().unwrap());
        }
        r
    }
    let wt = worker_token.as_str();
    let beat = || shoal_proto::HeartbeatRequest { worker_id: id.clone(), job_id: 0, generation: 0 };
    let refused_before = json(&mut c.cmd(&["status", "--json"]))["coordinators"][0]["refused_calls"].as_u64().unwrap();
    for (what, k) in [("no key", None), ("another worker's key", Some(hex(key.worker_key("w-999")))), ("a malformed key", Some("00".into()))] {
        let e = rt.block_on(rpc.heartbeat(with_key(beat(), wt, k))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {}", e.message());
        assert!(e.message().contains(&id) && e.metadata().get("shoal-guard").is_none(), "{what}: {}", e.message());
    }
    // The same for the calls that report, commit or leave for a worker.
    let e = rt.block_on(rpc.deregister(with_key(shoal_proto::DeregisterRequest { worker_id: id.clone() }, wt, None))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let report = shoal_proto::TaskReport { worker_id: id.clone(), job_id: 1, ..Default::default() };
    let e = rt.block_on(rpc.report_task(with_key(report, wt, Some(hex(key.worker_key("w-999")))))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let metrics = shoal_proto::MetricChunkReport { worker_id: id.clone(), ..Default::default() };
    let e = rt.block_on(rpc.record_metrics(with_key(metrics, wt, None))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    // Refused calls are counted; the worker is still there and idle (nothing it was sent
    // for it was taken).
    let s = json(&mut c.cmd(&["status", "--json"]));
    assert!(s["coordinators"][0]["refused_calls"].as_u64().unwrap() >= refused_before + 6, "{s}");
    assert_eq!((s["workers"][0]["id"].as_str(), s["workers"][0]["state"].as_str()), (Some(id.as_str()), Some("idle")), "{s}");
    // With the key its registration gave it, the same heartbeat is answered.
    let reply = rt.block_on(rpc.heartbeat(with_key(beat(), wt, Some(hex(key.worker_key(&id)))))).unwrap().into_inner();
    assert!(!reply.unknown_worker, "{reply:?}");
}

#[test]
fn a_raft_message_must_come_from_the_node_its_token_names() {
    use protobuf::Message as _;
    let c = UpCluster::start_with(&["--workers", "0"]);
    let addr = c.endpoints();
    let key = TokenKey::load(&c.dir().join("ca/token.key")).unwrap();
    let status = json(&mut c.cmd(&["status", "--json"]));
    let cluster_id = status["coordinators"][0]["cluster_id"].as_str().unwrap().to_string();
    let dropped = || json(&mut c.cmd(&["status", "--json"]))["coordinators"][0]["dropped_raft_messages"].as_u64().unwrap();
    let before = dropped();
    // Node 2's certificate (the folder's CA issues it as `shoal ca issue --node 2` would).
    let layout = shoal_cluster::Layout::new(c.dir());
    layout.issue_credentials(&[2]).unwrap();
    let node2 = TlsFiles::load(&layout.node_credentials(2), "node").unwrap().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A peer token on a certificate that names another process: refused by the guard.
        for (tls, token) in [(admin_tls(&c), key.peer_token(2)), (node2.clone(), key.peer_token(1))] {
            let channel = shoal_coordinator::tls::endpoint(&addr, Some(&tls)).unwrap().connect().await.unwrap();
            let bearer = shoal_coordinator::client::Bearer::new(Some(&token)).unwrap();
            let mut client = shoal_proto::raft_transport_client::RaftTransportClient::with_interceptor(channel, bearer);
            let e = client.hello(shoal_proto::PeerHello { cluster_id: cluster_id.clone(), node_id: 2, ..Default::default() }).await.unwrap_err();
            assert!(e.code() == tonic::Code::PermissionDenied && e.message().contains("peer token on a certificate of"), "{e:?}");
        }
        let channel = shoal_coordinator::tls::endpoint(&addr, Some(&node2)).unwrap().connect().await.unwrap();
        let bearer = shoal_coordinator::client::Bearer::new(Some(&key.peer_token(2))).unwrap();
        let mut client = shoal_proto::raft_transport_client::RaftTransportClient::with_interceptor(channel, bearer);
        // Node 2's connection, a message that says it is from node 3.
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        (m.from, m.to, m.term) = (3, 1, 99);
        let env = shoal_proto::RaftEnvelope { cluster_id: cluster_id.clone(), message: m.write_to_bytes().unwrap() };
        let e = client.send(env).await.unwrap_err();
        assert!(e.message().contains("on node 2's connection"), "{}", e.message());
        // And a hello that claims another node.
        let hello = shoal_proto::PeerHello { cluster_id, node_id: 3, ..Default::default() };
        let e = client.hello(hello).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    });
    assert_eq!(dropped(), before + 2, "both counted");
    // The forged term changed nothing: the node still leads in term 1... or the term it had.
    let after = json(&mut c.cmd(&["status", "--json"]));
    assert_eq!(after["coordinators"][0]["term"], status["coordinators"][0]["term"], "{after}");
}

#[test]
fn only_clients_with_a_certificate_of_the_clusters_ca_get_in() {
    let c = UpCluster::start_with(&["--workers", "0"]);
    let addr = c.endpoints();
    let admin = std::fs::read_to_string(c.dir().join("ca/admin.token")).unwrap().trim().to_string();
    let ca = std::fs::read(c.dir().join("ca/ca.crt")).unwrap();
    // Another cluster's CA and admin certificate.
    let other = tempfile::tempdir().unwrap();
    ok(shoal().args(["ca", "init", "--dir"]).arg(other.path()));
    let foreign = TlsFiles::load(other.path(), "admin").unwrap().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let status = |ch: Result<tonic::transport::Channel, tonic::transport::Error>, token: &str| {
            let token = token.to_string();
            async move {
                let ch = ch.map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
                let mut client = shoal_proto::coordinator_client::CoordinatorClient::new(ch);
                client.get_status(with_token(tonic::Request::new(shoal_proto::StatusRequest::default()), Some(&token))).await
            }
        };
        // The admin's own certificate and token: in.
        status(shoal_coordinator::tls::endpoint(&addr, Some(&admin_tls(&c))).unwrap().connect().await, &admin).await.unwrap();
        // Plaintext: no answer a client could take for the server's.
        let e = status(shoal_coordinator::tls::endpoint(&addr, None).unwrap().connect().await, &admin).await.unwrap_err();
        assert!(e.metadata().get("shoal-guard").is_none(), "a plaintext call got as far as the guard: {e:?}");
        // TLS that trusts the CA but shows no certificate: the handshake ends, the guard refuses
        // everything but the health service (Kubernetes' probes have no certificate).
        let anonymous = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca)).domain_name("shoal");
        let ep = tonic::transport::Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(anonymous).unwrap();
        let e = status(ep.connect().await, &admin).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("certificate"), "{}", e.message());
        let mut health = tonic_health::pb::health_client::HealthClient::new(ep.connect().await.unwrap());
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        // Another cluster's certificate: refused in the handshake, whatever the token.
        let with_foreign = shoal_coordinator::tls::endpoint(&addr, Some(&foreign)).unwrap();
        let e = status(with_foreign.connect().await, &admin).await.unwrap_err();
        assert!(e.metadata().get("shoal-guard").is_none(), "a foreign certificate got as far as the guard: {e:?}");
    });
    // A client certificate issued for a person, with an operator token, through the CLI.
    let out = c.tmp.path().join("alice");
    ok(shoal().args(["ca", "issue", "--client", "alice", "--dir"]).arg(c.dir().join("ca")).arg("--out").arg(&out));
    let token = create(&c, "operator", &[]);
    let listed = json(shoal().args(["job", "list", "--json", "--endpoints", &addr]).env("SHOAL_TOKEN", &token).env("SHOAL_CLIENT_CREDENTIALS", &out).env("HOME", c.tmp.path()));
    assert!(listed.is_array(), "{listed}");
    // The same without a certificate: plaintext, which the TLS listener does not speak.
    let e = fails(shoal().args(["job", "list", "--endpoints", &addr]).env("SHOAL_TOKEN", &token).env("HOME", c.tmp.path()));
    assert!(!e.is_empty());
}

#[test]
fn servers_start_only_with_credentials_or_insecure_and_insecure_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], says: &[&str]| {
        let out = run(shoal().args(args).arg("--data").arg(tmp.path().join("d")).arg("--store").arg(tmp.path().join("s")).env_remove("SHOAL_CREDENTIALS"));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{args:?} started");
        for s in says {
            assert!(err.contains(s), "{args:?}: {err}");
        }
    };
    refused(&["serve", "coordinator", "--listen", "127.0.0.1:0"], &["--credentials", "--insecure"]);
    // A folder with tokens but no certificate would serve plaintext: refused too.
    let layout = shoal_cluster::Layout::new(tmp.path().join("cluster"));
    layout.issue_credentials(&[1]).unwrap();
    let tokens_only = tmp.path().join("tokens-only");
    std::fs::create_dir(&tokens_only).unwrap();
    for f in ["token.key", "bootstrap.pb"] {
        std::fs::copy(layout.node_credentials(1).join(f), tokens_only.join(f)).unwrap();
    }
    let tokens_only = tokens_only.display().to_string();
    refused(&["serve", "coordinator", "--listen", "127.0.0.1:0", "--credentials", &tokens_only], &["no certificate", "--insecure"]);
    let worker = |extra: &[&str]| {
        let mut args = vec!["serve", "worker", "--endpoints", "127.0.0.1:1", "--threads", "1"];
        args.extend_from_slice(extra);
        run(shoal().args(&args).arg("--store").arg(tmp.path().join("s")).env_remove("SHOAL_CREDENTIALS"))
    };
    let out = worker(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--credentials") && err.contains("--insecure"), "{err}");

    // --insecure starts, and says so in its log.
    let addr_file = tmp.path().join("addr");
    let log = tmp.path().join("insecure.log");
    let mut p = Proc::spawn(
        shoal().args(["serve", "coordinator", "--insecure", "--listen", "127.0.0.1:0", "--addr-file"]).arg(&addr_file).arg("--data").arg(tmp.path().join("d")).arg("--store").arg(tmp.path().join("s")),
        &log,
    );
    wait_for("the insecure coordinator", Duration::from_secs(20), || std::fs::read_to_string(&addr_file).ok());
    wait_for("its warning", Duration::from_secs(10), || std::fs::read_to_string(&log).ok().filter(|l| l.contains("--insecure") && l.contains("WARN")));
    p.kill();
}

/// `up --insecure`: no CA and no credentials, every process started with --insecure (each
/// logs its warning), calls answered without a token, a job over the TCP ring; and a folder
/// keeps the mode of its first `up`, either way.
#[test]
fn up_insecure_starts_without_credentials_and_a_folder_keeps_its_mode() {
    let c = UpCluster::start_with(&["--insecure", "--workers", "2"]);
    assert!(!c.dir().join("ca").exists() && !c.dir().join("credentials").exists(), "--insecure made credentials");
    c.import_mnist("mnist");
    let spec = c.write_spec("tcp.toml", &format!("{}[aggregation]\ntransport = \"tcp\"\n", mnist_spec("mnist", 1, 1000, 3, "[16]")));
    let j = json(c.cmd(&["job", "submit", "--follow", "--json"]).arg(&spec).env_remove("SHOAL_TOKEN"));
    assert_eq!((j["state"].as_str(), j["transport"].as_str()), (Some("succeeded"), Some("tcp")), "{j}");
    for log in [c.dir().join("coordinators/1/log"), c.dir().join("workers/1/log"), c.dir().join("workers/2/log")] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("WARN") && text.contains("--insecure"), "{}: no warning: {text}", log.display());
    }
    ok(shoal().arg("down").arg("--dir").arg(c.dir()));
    let e = fails(shoal().args(["up", "--workers", "0", "--dir"]).arg(c.dir()));
    assert!(e.contains("--insecure"), "{e}");

    let secure = UpCluster::start(0);
    ok(shoal().arg("down").arg("--dir").arg(secure.dir()));
    let e = fails(shoal().args(["up", "--insecure", "--workers", "0", "--dir"]).arg(secure.dir()));
    assert!(e.contains("with credentials"), "{e}");
}

/// Every file under `dir`, links not followed.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn no_name_or_path_in_a_request_leads_out_of_the_store() {
    use shoal_proto::coordinator_client::CoordinatorClient;
    use shoal_proto::*;
    let c = UpCluster::start(0);
    let outside = c.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"outside").unwrap();
    // A link in the store to a folder outside it (as a careless admin might leave one).
    std::fs::create_dir_all(c.store().join("datasets")).unwrap();
    std::os::unix::fs::symlink(&outside, c.store().join("datasets/link")).unwrap();
    let [x, y] = write_tiny_idx(c.tmp.path());
    json(c.cmd(&["data", "import", "tiny", "--json"]).arg(&x).arg(&y));

    let addr = c.endpoints().split(',').next().unwrap().to_string();
    let tls = admin_tls(&c);
    let admin = std::fs::read_to_string(c.dir().join("ca/admin.token")).unwrap();
    let token = Some(admin.trim());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut refused: Vec<(String, tonic::Status)> = Vec::new();
    rt.block_on(async {
        let channel = shoal_coordinator::tls::endpoint(&addr, Some(&tls)).unwrap().connect().await.unwrap();
        let mut api = CoordinatorClient::new(channel);
        let mut expect_refused = |what: String, r: Result<(), tonic::Status>| match r {
            Ok(()) => panic!("{what}: accepted"),
            Err(s) => refused.push((what, s)),
        };
        // Store keys: written through the coordinator ...
        for key in ["datasets/../../outside/evil", "/tmp/evil", "datasets/d/import-1/../../../../outside/evil", "datasets/link/import-1/evil", "incoming/../outside/evil"] {
            let chunk = ObjectChunk { key: key.into(), data: b"evil".to_vec(), last: true };
            let r = api.put_objects(with_token(tonic::Request::new(tokio_stream::iter(vec![chunk])), token)).await;
            expect_refused(format!("PutObjects {key}"), r.map(|_| ()));
        }
        // ... read through it (a reply stream fails at its first item at the latest) ...
        for key in ["../outside/secret", "datasets/../../outside/secret", "datasets/link/secret", "/etc/passwd"] {
            let r = match api.get_object(with_token(tonic::Request::new(GetObjectRequest { key: key.into() }), token)).await {
                Err(s) => Err(s),
                Ok(stream) => match stream.into_inner().message().await {
                    Ok(Some(chunk)) => panic!("GetObject {key}: read {:?}", String::from_utf8_lossy(&chunk.data)),
                    Ok(None) => Ok(()),
                    Err(s) => Err(s),
                },
            };
            expect_refused(format!("GetObject {key}"), r);
        }
        // ... and removed through it.
        for folder in ["datasets/link/import-1", "datasets/../..", "datasets/tiny/../../outside"] {
            let r = api.drop_import(with_token(tonic::Request::new(DropImportRequest { folder: folder.into() }), token)).await;
            expect_refused(format!("DropImport {folder}"), r.map(|_| ()));
        }
        // Names that become folders: datasets (and their shards' paths) and models.
        for (name, path) in [("../evil", "datasets/../evil/import-1/s.bin"), ("/evil", "/evil/s.bin"), ("good", "datasets/good/../../../outside/secret"), ("good", "datasets/link/import-1/s.bin")] {
            let shard = ShardInfo { path: path.into(), records: 1, blake3: "0".repeat(64), bytes: 784 };
            let info = DatasetInfo { name: name.into(), feature_shape: vec![28, 28], classes: 10, feature_dtype: "u8".into(), shards: vec![shard], records: 1, ..Default::default() };
            let r = api.register_dataset(with_token(tonic::Request::new(RegisterDatasetRequest { dataset: Some(info), request_id: format!("r-{name}-{path}") }), token)).await;
            expect_refused(format!("RegisterDataset {name} {path}"), r.map(|_| ()));
        }
        for name in ["../evil", "/evil", "a/b", ".."] {
            let r = api.register_model(with_token(tonic::Request::new(RegisterModelRequest { name: name.into(), job_id: 1, request_id: format!("m-{name}") }), token)).await;
            expect_refused(format!("RegisterModel {name}"), r.map(|_| ()));
        }
        // Specs: a training job's dataset, a batch job's output and import files, a pipeline's
        // and a template's name.
        let train = mnist_spec("../evil", 1, 400, 1, "[8]");
        let batch_import = |files: &str, output: &str| format!("name = \"i\"\nkind = \"batch\"\n[input]\ndataset = \"tiny\"\n[operator]\nkind = \"import\"\nfiles = [{files}]\nformat = \"csv\"\nlabel = \"y\"\n[output]\ndataset = \"{output}\"\n");
        for (what, spec) in [
            ("a training dataset", train.clone()),
            ("import files", batch_import("\"incoming/../../outside/secret\"", "d")),
            ("absolute import files", batch_import("\"/etc/passwd\"", "d")),
            ("import files through a link", batch_import("\"incoming/../datasets/link/secret\"", "d")),
            ("a batch output", batch_import("\"incoming/d/a.csv\"", "../evil")),
        ] {
            let r = api.submit_job(with_token(tonic::Request::new(SubmitJobRequest { spec_toml: spec.clone(), request_id: format!("j-{what}") }), token)).await;
            expect_refused(format!("SubmitJob with {what}"), r.map(|_| ()));
        }
        let scheduled = mnist_spec("tiny", 1, 400, 1, "[8]").replace("name = \"test-mlp\"", "name = \"../evil\"") + "[schedule]\ncron = \"0 3 * * *\"\n";
        let r = api.schedule_job(with_token(tonic::Request::new(SubmitJobRequest { spec_toml: scheduled, request_id: "t".into() }), token)).await;
        expect_refused("ScheduleJob named ../evil".into(), r.map(|_| ()));
        let pipeline = format!("name = \"../evil\"\n[[step]]\nname = \"train\"\nkind = \"train\"\n[step.spec]\n{}", train.replace("[", "[step.spec."));
        let r = api.submit_pipeline(with_token(tonic::Request::new(SubmitPipelineRequest { spec_toml: pipeline, request_id: "p".into() }), token)).await;
        expect_refused("SubmitPipeline named ../evil".into(), r.map(|_| ()));
    });
    for (what, s) in &refused {
        assert!(matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition), "{what}: {s:?}");
    }
    // The CLI's own names too.
    let out = run(c.cmd(&["data", "import", "../evil"]).arg(&x).arg(&y));
    assert!(!out.status.success(), "data import ../evil");

    // Nothing was written, read into the cluster or removed outside the store.
    assert_eq!(files_under(&outside), vec![outside.join("secret")]);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"outside");
    let evil: Vec<_> = files_under(c.tmp.path()).into_iter().filter(|p| p.to_string_lossy().contains("evil")).collect();
    assert!(evil.is_empty(), "{evil:?}");
    assert!(c.store().join("datasets/link").is_symlink());
}

/// The entries of every audit segment in the store, by file.
fn audit_segments(c: &UpCluster) -> Vec<(std::path::PathBuf, shoal_proto::AuditSegmentFile)> {
    use shoal_proto::Message;
    let mut files: Vec<_> = std::fs::read_dir(c.store().join("audit")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), shoal_proto::AuditSegmentFile::decode(&std::fs::read(&p).unwrap()[..]).unwrap())).collect()
}

#[test]
fn the_audit_trail_names_who_did_what_and_verify_finds_a_modified_and_a_removed_entry() {
    use shoal_proto::Message;
    let c = UpCluster::start(0);
    let [x, y] = write_tiny_idx(c.tmp.path());
    json(c.cmd(&["data", "import", "tiny", "--json"]).arg(&x).arg(&y));
    let operator = create(&c, "operator", &[]);
    let operator_id = Token::parse(&operator).unwrap().id;
    json(c.cmd(&["data", "import", "tiny2", "--json"]).arg(&x).arg(&y).env("SHOAL_TOKEN", &operator));
    // A mutation the state refuses is kept too, with why.
    let refused = run(&mut c.cmd(&["model", "register", "m", "--job", "999"]));
    assert!(!refused.status.success());
    // Removals from the store that no state records: an import dropped (as a failed import
    // does), unreferenced folders collected.
    for folder in ["datasets/junk/import-1/", "datasets/junk/import-2/"] {
        std::fs::create_dir_all(c.store().join(folder)).unwrap();
        std::fs::write(c.store().join(folder).join("shard-00000.safetensors"), b"x").unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = shoal_coordinator::tls::endpoint(&c.endpoints(), Some(&admin_tls(&c))).unwrap().connect().await.unwrap();
        let token = std::fs::read_to_string(c.dir().join("ca/admin.token")).unwrap();
        let req = with_token(tonic::Request::new(shoal_proto::DropImportRequest { folder: "datasets/junk/import-1".into() }), Some(token.trim()));
        shoal_proto::coordinator_client::CoordinatorClient::new(channel).drop_import(req).await.unwrap();
    });
    assert!(!c.store().join("datasets/junk/import-1").exists());
    let gc = json(&mut c.cmd(&["data", "gc", "--min-age-s", "0", "--json"]));
    assert_eq!(gc["removed"], serde_json::json!(["datasets/junk/import-2"]), "{gc}");

    let list = || json(&mut c.cmd(&["audit", "list", "--json"]))["entries"].as_array().unwrap().clone();
    let entries = list();
    let find = |what: &str| entries.iter().find(|e| e["what"].as_str().unwrap().starts_with(what)).unwrap_or_else(|| panic!("no {what} in {entries:#?}")).clone();
    let admin_id = Token::parse(std::fs::read_to_string(c.dir().join("ca/admin.token")).unwrap().trim()).unwrap().id;
    let import = find("import_dataset: tiny@1");
    assert_eq!((import["actor"].as_str().unwrap(), import["role"].as_str().unwrap(), import["method"].as_str().unwrap(), import["outcome"].as_str().unwrap()), (admin_id.as_str(), "admin", "RegisterDataset", "ok"), "{import}");
    assert!(!import["request_id"].as_str().unwrap().is_empty());
    let by_operator = find("import_dataset: tiny2");
    assert_eq!((by_operator["actor"].as_str().unwrap(), by_operator["role"].as_str().unwrap()), (operator_id.as_str(), "operator"));
    assert_eq!(find("bootstrap_tokens")["actor"], "cluster");
    assert!(find("create_token")["what"].as_str().unwrap().contains(&operator_id));
    assert!(find("register_model: m from job 999")["outcome"].as_str().unwrap().contains("999"));
    assert_eq!((find("drop_import: datasets/junk/import-1")["role"].as_str(), find("collect_datasets: datasets/junk/import-2")["role"].as_str()), (Some("admin"), Some("admin")));
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // --since: nothing from the future; everything from an hour ago.
    assert!(json(&mut c.cmd(&["audit", "list", "--json", "--since", "2999-01-01T00:00:00Z"]))["entries"].as_array().unwrap().is_empty());
    assert_eq!(json(&mut c.cmd(&["audit", "list", "--json", "--since", "1h"]))["entries"].as_array().unwrap().len(), entries.len());

    // The leader seals the entries into segments in the store within seconds.
    wait_for("the entries to be sealed", Duration::from_secs(20), || (audit_segments(&c).iter().map(|(_, f)| f.entries.len()).sum::<usize>() >= entries.len()).then_some(()));
    let verify = || {
        let out = run(&mut c.cmd(&["audit", "verify", "--json"]));
        (out.status.success(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let (whole, v) = verify();
    assert!(whole && v["ok"] == true && v["entries"].as_u64().unwrap() >= entries.len() as u64, "{v}");

    // An entry edited in its segment: named.
    let segments = audit_segments(&c);
    let (path, file) = segments.iter().find(|(_, f)| f.entries.iter().any(|e| e.what.starts_with("import_dataset: tiny2"))).unwrap().clone();
    let original = std::fs::read(&path).unwrap();
    let at = file.entries.iter().position(|e| e.what.starts_with("import_dataset: tiny2")).unwrap();
    let mut edited = file.clone();
    edited.entries[at].actor = admin_id.clone();
    std::fs::write(&path, edited.encode_to_vec()).unwrap();
    let (whole, v) = verify();
    let seq = file.entries[at].seq;
    assert!(!whole && v["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains(&format!("entry {seq} was modified"))), "{v}");
    // Even with its hash recomputed, and the next entry's link: the state's head disagrees.
    edited.entries[at].hash = shoal_coordinator::state::audit::entry_hash(&edited.entries[at]);
    std::fs::write(&path, edited.encode_to_vec()).unwrap();
    let (whole, v) = verify();
    assert!(!whole, "{v}");
    // An entry removed: named.
    let mut removed = file.clone();
    removed.entries.remove(at);
    std::fs::write(&path, removed.encode_to_vec()).unwrap();
    let (whole, v) = verify();
    assert!(!whole && v["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains(&format!("entries {seq}-{seq} are missing"))), "{v}");
    // A whole segment removed: named.
    std::fs::remove_file(&path).unwrap();
    let (whole, v) = verify();
    assert!(!whole && v["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("cannot be read")), "{v}");
    std::fs::write(&path, original).unwrap();
    assert!(verify().0, "restored");
}

#[test]
fn doctor_security_reports_what_a_cluster_exposes() {
    let c = UpCluster::start(1);
    let doctor = |cmd: &mut std::process::Command| {
        let out = run(cmd);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        let found: Vec<(String, String)> = v["findings"].as_array().unwrap().iter().map(|f| (f["level"].as_str().unwrap().to_string(), f["what"].as_str().unwrap().to_string())).collect();
        (out.status.success(), found)
    };
    let has = |found: &[(String, String)], level: &str, text: &str| found.iter().any(|(l, w)| l == level && w.contains(text));
    // `up`'s cluster: TLS and tokens everywhere, on loopback: nothing that exposes it; tokens
    // without expiry are named.
    let (clean, found) = doctor(&mut c.cmd(&["doctor", "security", "--json"]));
    assert!(clean, "{found:#?}");
    assert!(has(&found, "ok", "mutual TLS, tokens on every call") && has(&found, "ok", "ranks prove their generation"), "{found:#?}");
    assert!(!has(&found, "warn", "data plane") && !has(&found, "warn", "/metrics"), "{found:#?}");
    assert!(has(&found, "ok", "/metrics and the dashboard over HTTPS") && has(&found, "ok", "a token required"), "{found:#?}");
    assert!(has(&found, "warn", "never expires"), "{found:#?}");
    assert!(has(&found, "ok", "certificates, none within 30 days of its end"), "{found:#?}");
    // A certificate issued for 10 days: named as ending soon (a warning, not an exposure).
    let ca = c.dir().join("ca");
    let e = fails(shoal().args(["ca", "issue", "--client", "brief", "--days", "0", "--dir"]).arg(&ca).arg("--out").arg(c.dir().join("credentials/brief")));
    assert!(e.contains("--days 0"), "{e}");
    ok(shoal().args(["ca", "issue", "--client", "brief", "--days", "10", "--dir"]).arg(&ca).arg("--out").arg(c.dir().join("credentials/brief")));
    let (clean, found) = doctor(&mut c.cmd(&["doctor", "security", "--json"]));
    assert!(clean && has(&found, "warn", "brief/client.crt expires in "), "{found:#?}");
    // A secret others may read: named, and the exit code says so.
    let key = c.dir().join("credentials/worker/worker.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, found) = doctor(&mut c.cmd(&["doctor", "security", "--json"]));
    assert!(!ok && has(&found, "high", "worker.key"), "{found:#?}");

    // A coordinator started with --insecure: plaintext and no token checks, both named.
    let tmp = tempfile::tempdir().unwrap();
    let addr_file = tmp.path().join("addr");
    let mut p = Proc::spawn(
        shoal().args(["serve", "coordinator", "--insecure", "--listen", "127.0.0.1:0", "--addr-file"]).arg(&addr_file).arg("--data").arg(tmp.path().join("d")).arg("--store").arg(tmp.path().join("s")),
        &tmp.path().join("insecure.log"),
    );
    let addr = wait_for("the insecure coordinator", Duration::from_secs(20), || std::fs::read_to_string(&addr_file).ok());
    let (ok, found) = wait_for("the insecure coordinator's status", Duration::from_secs(20), || {
        let r = doctor(shoal().args(["doctor", "security", "--json", "--endpoints", &addr]).arg("--dir").arg(tmp.path()));
        r.1.iter().any(|(_, w)| w.contains("coordinator 1")).then_some(r)
    });
    assert!(!ok && has(&found, "high", "serves plaintext") && has(&found, "high", "checks no tokens"), "{found:#?}");
    // A worker without credentials: its data plane is named.
    let mut w = Proc::spawn(
        shoal().args(["serve", "worker", "--insecure", "--endpoints", &addr, "--listen", "127.0.0.1:0", "--store"]).arg(tmp.path().join("s")),
        &tmp.path().join("worker.log"),
    );
    let (_, found) = wait_for("the plaintext worker in the doctor's report", Duration::from_secs(30), || {
        let r = doctor(shoal().args(["doctor", "security", "--json", "--endpoints", &addr]).arg("--dir").arg(tmp.path()));
        r.1.iter().any(|(_, f)| f.contains("data plane")).then_some(r)
    });
    assert!(has(&found, "warn", "plaintext and unauthenticated"), "{found:#?}");
    w.kill();
    p.kill();
}

/// The certificate a TLS server at `addr` presents (checked against the CA in `ca`).
fn served_certificate(addr: &str, ca: &std::path::Path) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).ok()? {
        roots.add(c.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), rustls::pki_types::ServerName::try_from("shoal").ok()?).ok()?;
    let mut sock = std::net::TcpStream::connect(addr).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).ok()?;
    }
    Some(conn.peer_certificates()?.first()?.to_vec())
}

#[test]
fn certificates_rotate_without_a_restart() {
    let c = UpCluster::start(0);
    let ca = c.dir().join("ca/ca.crt");
    let grpc = c.endpoints().split(',').next().unwrap().to_string();
    let http = std::fs::read_to_string(c.dir().join("coordinators/1/http.addr")).unwrap().trim().to_string();
    let before = [served_certificate(&grpc, &ca).unwrap(), served_certificate(&http, &ca).unwrap()];
    assert_eq!(before[0], before[1], "both listeners present the node's certificate");
    // A new certificate for node 1, written over the running coordinator's (a second later:
    // file times may be that coarse).
    std::thread::sleep(Duration::from_millis(1100));
    let folder = c.dir().join("credentials/coordinator-1");
    ok(shoal().args(["ca", "issue", "--node", "1", "--dir"]).arg(c.dir().join("ca")).arg("--out").arg(&folder));
    let after = wait_for("both listeners to present the new certificate", Duration::from_secs(15), || {
        let now = [served_certificate(&grpc, &ca)?, served_certificate(&http, &ca)?];
        (now[0] != before[0] && now[1] != before[1]).then_some(now)
    });
    assert_eq!(after[0], std::fs::read(folder.join("node.crt")).ok().and_then(|pem| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&pem).ok().map(|d| d.to_vec())
    }).unwrap(), "the certificate now in the folder");
    // Calls go on, with the new certificate, without a restart.
    let pid_before = json(&mut c.cmd(&["status", "--json"]))["coordinators"][0]["pid"].clone();
    ok(&mut c.cmd(&["token", "list"]));
    assert_eq!(json(&mut c.cmd(&["status", "--json"]))["coordinators"][0]["pid"], pid_before);
    // A pair that does not load (a key of another certificate) leaves the one in use.
    std::thread::sleep(Duration::from_millis(1100));
    let other = c.tmp.path().join("other");
    ok(shoal().args(["ca", "issue", "--node", "2", "--dir"]).arg(c.dir().join("ca")).arg("--out").arg(&other));
    std::fs::copy(other.join("node.key"), folder.join("node.key")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(served_certificate(&grpc, &ca).unwrap(), after[0], "a mismatched pair must not replace the certificate");
    ok(&mut c.cmd(&["token", "list"]));
}
