//! Bad input on the coordinator's Raft port: garbage, another cluster's messages, messages
//! from nodes that are no members or for another node, oversized messages. Each is refused
//! and counted; the replica keeps its state and keeps serving.

use std::collections::BTreeMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use shoal_coordinator::{serve, CoordinatorConfig};
use shoal_proto::coordinator_client::CoordinatorClient;
use shoal_proto::raft_transport_client::RaftTransportClient;
use shoal_proto::{RaftEnvelope, StatusRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_raft_messages_are_refused_counted_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cfg = CoordinatorConfig {
        id: 1,
        peers: BTreeMap::from([(1, addr.clone())]),
        data_dir: tmp.path().join("data"),
        store: shoal_core::store::Store::local(tmp.path().join("store")),
        lease: Duration::from_secs(5),
        cluster_id: Some("c1".into()),
        initial: shoal_coordinator::InitialState::New,
        snapshot_every: 100,
        build: "test".into(),
        auth: None,
        tls: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(cfg, listener, async move {
        let _ = stopped.await;
    }));
    let url = format!("http://{addr}");
    let mut status = CoordinatorClient::connect(url.clone()).await;
    for _ in 0..50 {
        if status.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = CoordinatorClient::connect(url.clone()).await;
    }
    let mut status = status.unwrap();
    let leader = || async {
        for _ in 0..50 {
            let s = CoordinatorClient::connect(format!("http://{addr}")).await.unwrap().get_status(StatusRequest { state_hash: true, members_only: false }).await.unwrap().into_inner();
            if s.node.as_ref().unwrap().role == "leader" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader");
    };
    let before = leader().await.node.unwrap();
    assert_eq!(before.cluster_id, "c1");

    let mut raft = RaftTransportClient::connect(url.clone()).await.unwrap();
    let msg = |from: u64, to: u64| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = from;
        m.to = to;
        m.term = before.term + 100;
        m.write_to_bytes().unwrap()
    };
    let cases = [
        ("garbage", RaftEnvelope { message: vec![0xff; 64], cluster_id: "c1".into() }, "not a raft message"),
        ("other cluster", RaftEnvelope { message: msg(2, 1), cluster_id: "c2".into() }, "cluster"),
        ("unknown node", RaftEnvelope { message: msg(99, 1), cluster_id: "c1".into() }, "no member"),
        ("for another node", RaftEnvelope { message: msg(1, 7), cluster_id: "c1".into() }, "for node 7"),
    ];
    for (what, env, want) in cases {
        let e = raft.send(env).await.expect_err(what);
        assert!(e.message().contains(want), "{what}: {}", e.message());
    }
    // Larger than the port accepts: refused by gRPC before it is even parsed.
    let huge = RaftEnvelope { message: vec![0; 65 << 20], cluster_id: "c1".into() };
    let e = raft.clone().max_encoding_message_size(usize::MAX).send(huge).await.expect_err("oversized");
    assert!(matches!(e.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Unknown | tonic::Code::Internal), "{e:?}");

    // An oversized client request is refused too (over the coordinator port's 64 MiB limit),
    // and a merely large one (over one Raft command's 16 MiB) with an error that says so.
    let mut client = CoordinatorClient::connect(url.clone()).await.unwrap().max_encoding_message_size(usize::MAX);
    let big = |n: usize| shoal_proto::RegisterDatasetRequest { dataset: Some(shoal_proto::DatasetInfo { name: "x".repeat(n), ..Default::default() }), request_id: String::new() };
    let e = client.register_dataset(big(65 << 20)).await.expect_err("oversized");
    assert!(matches!(e.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal | tonic::Code::Unknown), "{e:?}");
    let e = client.register_dataset(big(20 << 20)).await.expect_err("too large for one command");
    assert!(e.message().contains("at most 16777216 bytes"), "{}", e.message());

    let after = status.get_status(StatusRequest { state_hash: true, members_only: false }).await.unwrap().into_inner().node.unwrap();
    assert_eq!(after.dropped_raft_messages, 4);
    assert_eq!((after.role.as_str(), after.term), ("leader", before.term), "a forged higher term must not unseat the leader");
    assert_eq!(after.state_hash, before.state_hash, "refused input changed the state");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
