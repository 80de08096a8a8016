//! `[notify]`: the leader POSTs each job's undelivered events (`JobInfo.events`, appended by
//! the state machine as jobs end and by the leader's duties as they stall) to the job's
//! webhook, and proposes `event_delivered` once it answers 2xx. The events live in the
//! replicated state, so a new leader sends what the old one had not marked delivered:
//! delivery is at least once, and every delivery of an event carries its `event_id`.

use serde_json::json;

use super::*;

/// A POST takes at most this long (connect, send, status line).
const POST_TIMEOUT: Duration = Duration::from_secs(2);

/// One event's delivery on this leader.
#[derive(Default)]
pub(super) struct Try {
    in_flight: bool,
    /// Not before this (the monotonic clock, ms).
    next_at: u64,
    failures: u32,
}

/// Starts a POST for every undelivered event that is due. Called on the leader's ticks.
pub(super) fn deliver(shared: &Arc<Shared>) {
    let now = shared.now();
    let due: Vec<(u64, JobEvent, String, String, serde_json::Value)> = {
        let state = shared.state.read().expect("state lock");
        let mut due = Vec::new();
        for j in state.jobs().filter(|j| j.events.iter().any(|e| !e.delivered)) {
            let Some(notify) = shoal_core::JobSpec::parse(&j.spec_toml).ok().and_then(|s| s.notify) else { continue };
            let Some((host, path)) = notify.target() else { continue };
            let p = j.progress.clone().unwrap_or_default();
            for e in j.events.iter().filter(|e| !e.delivered) {
                let body = json!({
                    "event_id": e.event_id, "event": e.event, "job_id": j.id, "name": j.name, "group": j.group,
                    "state": j.state().label(), "generation": e.generation, "step": e.step, "total_steps": p.total_steps,
                    "loss": p.loss, "test_accuracy": if p.test_accuracy >= 0.0 { json!(p.test_accuracy) } else { serde_json::Value::Null },
                    "error": e.error, "unix_ms": e.unix_ms,
                });
                due.push((j.id, e.clone(), host.clone(), path.clone(), body));
            }
        }
        due
    };
    let mut tries = shared.outbox.lock().expect("outbox lock");
    tries.retain(|id, _| due.iter().any(|(_, e, ..)| &e.event_id == id));
    for (job_id, event, host, path, body) in due {
        let t = tries.entry(event.event_id.clone()).or_default();
        if t.in_flight || now < t.next_at {
            continue;
        }
        t.in_flight = true;
        let shared = shared.clone();
        tokio::spawn(async move {
            let result = post(&host, &path, &body.to_string()).await;
            let now = shared.now();
            let mut tries = shared.outbox.lock().expect("outbox lock");
            let t = tries.entry(event.event_id.clone()).or_default();
            t.in_flight = false;
            match result {
                // Test fault point: as if this leader died between the POST and the mark.
                Ok(()) if shoal_core::failpoint::hit("notify-unmarked", 0) => t.next_at = now + 1_000,
                Ok(()) => {
                    // Sent again in 5 s if the mark does not commit by then (at least once).
                    t.next_at = now + 5_000;
                    let cmd = Command { kind: Some(command::Kind::EventDelivered(EventDelivered { job_id, event_id: event.event_id.clone() })), ..Default::default() };
                    let (tx, _rx) = oneshot::channel();
                    let _ = shared.inbox.try_send(Input::Propose(cmd, tx));
                }
                Err(e) => {
                    t.failures += 1;
                    t.next_at = now + (500u64 << t.failures.min(6)).min(30_000);
                    tracing::warn!(job = job_id, event = %event.event_id, error = %e, "the [notify] webhook did not take the event; retrying");
                }
            }
        });
    }
}

/// POSTs `body` (JSON) to `http://host/path`; Ok on a 2xx answer.
async fn post(host: &str, path: &str, body: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host).await.map_err(|e| format!("{host}: {e}"))?;
        let req = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: shoal\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.map_err(|e| format!("no answer: {e}"))?;
        let status = std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse::<u16>().ok()).ok_or_else(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&head)))?;
        if (200..300).contains(&status) { Ok(()) } else { Err(format!("HTTP {status}")) }
    };
    tokio::time::timeout(POST_TIMEOUT, exchange).await.map_err(|_| format!("no answer in {POST_TIMEOUT:?}"))?
}
