//! `[notify] webhook`: a local HTTP receiver gets a POST within 2 s when a job succeeds,
//! diverges or stalls, each event with one `event_id` (repeats carry the same one), and the
//! job's status marks the events delivered.

mod common;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Every POST the receiver took: when, and its JSON body.
type Received = Arc<Mutex<Vec<(Instant, serde_json::Value)>>>;

/// An HTTP receiver on loopback that answers 200 to every POST; returns its URL.
fn receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got: Received = Arc::default();
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut len = 0usize;
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            if let Ok(v) = serde_json::from_slice(&body) {
                sink.lock().unwrap().push((Instant::now(), v));
            }
            let _ = r.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

/// The first POST of `event` for job `id`, waiting up to `timeout`.
fn event(got: &Received, id: &str, event: &str, timeout: Duration) -> (Instant, serde_json::Value) {
    wait_for(&format!("a {event} event of job {id}"), timeout, || {
        got.lock().unwrap().iter().find(|(_, v)| v["job_id"].as_u64() == id.parse::<u64>().ok() && v["event"] == event).cloned()
    })
}

/// Distinct events (by kind and job) never come with two different ids.
fn one_id_per_event(got: &Received) {
    let got = got.lock().unwrap();
    let mut ids: std::collections::BTreeMap<(String, String), std::collections::BTreeSet<String>> = Default::default();
    for (_, v) in got.iter() {
        ids.entry((v["job_id"].to_string(), v["event"].to_string())).or_default().insert(v["event_id"].as_str().unwrap().to_string());
    }
    for (k, set) in ids {
        assert_eq!(set.len(), 1, "{k:?} came with ids {set:?}");
    }
}

#[test]
fn a_webhook_hears_of_success_divergence_and_a_stall_within_2_s() {
    let (url, got) = receiver();
    let notify = format!("[notify]\nwebhook = \"{url}\"\nstall_s = 1\n");
    // Rank 0's gradient of step 30 gets a NaN: a job that reaches it diverges.
    let c = UpCluster::start_env(&["--workers", "2"], &[("SHOAL_FAILPOINTS", "nan-gradient@30=0")]);
    c.import_mnist("mnist");

    // 16 steps: succeeds before step 30.
    let ok_spec = c.write_spec("ok.toml", &(mnist_spec("mnist", 2, 1024, 1, "[32]") + &notify));
    let done = c.submit_follow(&ok_spec);
    let ended = Instant::now();
    assert_eq!(done["state"], "succeeded", "{done}");
    let id = done["id"].to_string();
    let (at, body) = event(&got, &id, "succeeded", Duration::from_secs(10));
    assert!(at <= ended + Duration::from_secs(2), "the POST came {:?} after the job ended", at.duration_since(ended));
    assert_eq!(body["state"], "succeeded", "{body}");
    assert_eq!(body["step"], 16, "{body}");
    assert!(body["event_id"].as_str().unwrap().contains(&id), "{body}");
    let status = c.wait_job(&id, "the event marked delivered", Duration::from_secs(10), |j| j["events"][0]["delivered"] == true);
    assert_eq!(status["events"].as_array().unwrap().len(), 1, "{status}");

    // 96 steps: diverges at step 30.
    let nan_spec = c.write_spec("nan.toml", &(mnist_spec("mnist", 3, 4096, 1, "[32]") + &notify));
    // `--follow` exits 1 for a job that fails: its JSON is on stdout all the same.
    let out = run(c.cmd(&["job", "submit", "--follow", "--json"]).arg(&nan_spec));
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ended = Instant::now();
    assert_eq!(failed["state"], "failed", "{failed}");
    let (at, body) = event(&got, &failed["id"].to_string(), "diverged", Duration::from_secs(10));
    assert!(at <= ended + Duration::from_secs(2), "{body}");
    assert!(body["error"].as_str().unwrap().contains("diverged"), "{body}");

    // No [notify]: nothing is sent.
    let quiet = c.submit_follow(&c.write_spec("quiet.toml", &mnist_spec("mnist", 1, 1024, 1, "[32]")));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!got.lock().unwrap().iter().any(|(_, v)| v["job_id"] == quiet["id"]), "a job without [notify] was announced");
    drop(c);

    // Steps of 1.5 s with stall_s = 1: the job stalls (and is cancelled).
    let c = UpCluster::start_env(&["--workers", "2"], &[("SHOAL_FAILPOINTS", "step-delay-ms=1500")]);
    c.import_mnist("mnist");
    let slow = c.write_spec("slow.toml", &(mnist_spec("mnist", 1, 1024, 1, "[32]") + &notify));
    let id = json(c.cmd(&["job", "submit", "--json"]).arg(&slow))["id"].to_string();
    let (_, body) = event(&got, &id, "stalled", Duration::from_secs(30));
    assert_eq!(body["state"], "running", "{body}");
    ok(&mut c.cmd(&["job", "cancel", &id]));
    c.wait_end(&id);
    one_id_per_event(&got);

    // A webhook that is not http://HOST:PORT/PATH is refused at submission.
    let bad = c.write_spec("bad.toml", &(mnist_spec("mnist", 1, 1024, 1, "[32]") + "[notify]\nwebhook = \"https://example.org\"\n"));
    let err = fails(c.cmd(&["job", "submit"]).arg(&bad));
    assert!(err.contains("notify.webhook"), "{err}");
}

/// At least once across a leader failover: the leaders here never mark an event delivered (a
/// fault point: as if each died right after its POST), so after the leader is killed the new
/// one sends the event again, with the same `event_id`.
#[test]
fn a_new_leader_sends_an_undelivered_event_again_with_the_same_id() {
    let (url, got) = receiver();
    let c = UpCluster::start_env(&["--coordinators", "3", "--workers", "2"], &[("SHOAL_FAILPOINTS", "notify-unmarked")]);
    c.import_mnist("mnist");
    let spec = c.write_spec("ok.toml", &(mnist_spec("mnist", 1, 1024, 1, "[32]") + &format!("[notify]\nwebhook = \"{url}\"\n")));
    let done = c.submit_follow(&spec);
    let id = done["id"].to_string();
    let (_, first) = event(&got, &id, "succeeded", Duration::from_secs(10));
    let status = json(&mut c.cmd(&["status", "--json"]));
    let leader = status["coordinators"].as_array().unwrap().iter().find(|r| r["role"] == "leader").expect("a leader").clone();
    // SAFETY: signalling a process this test's cluster started.
    assert_eq!(unsafe { libc::kill(leader["pid"].as_i64().unwrap() as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let again = wait_for("the event from the new leader", Duration::from_secs(30), || {
        got.lock().unwrap().iter().find(|(at, v)| *at > killed + Duration::from_millis(1500) && v["job_id"].as_u64() == id.parse::<u64>().ok()).cloned()
    });
    assert_eq!(again.1["event_id"], first["event_id"], "a repeat carries the event's id");
    one_id_per_event(&got);
}
