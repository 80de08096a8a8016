//! The worker's listener for ring connections (`Incoming`).
//!
//! Connections are made through the worker's collective listener (`Incoming`): a rank dials
//! the next rank's listener and says who it is (job, generation, rank); the listener hands the
//! connection to the task of that generation, which waits for it. Peers are not trusted: each
//! hello is read on a thread of its own under a deadline (a silent connection delays nobody
//! else), a hello for a (job, generation, rank) that already has a connection waiting is
//! refused rather than taking its place, and every length read from the wire is checked
//! against what the operation expects before anything is allocated.
//!
//! With credentials (`secure`), every connection is mutual TLS, and the hello is followed by a
//! proof of membership in the generation (a MAC of its ring key over the connection's TLS
//! exporter and the hello). The listener cannot check it before the task claims the
//! connection (it learns the key with its assignment), so a few connections may wait under one
//! rank; the task takes the first whose proof holds and closes the others.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::super::secure::{hello_proof, same_mac, DataPlaneTls, Link, RingKey};
use super::{write_all, POLL};
use crate::WorkerError;

const HELLO_MAGIC: &[u8; 8] = b"SHOALRNG";
pub(super) const HELLO_LEN: usize = 32;
/// Connections parked for tasks that have not claimed them yet.
const MAX_PARKED: usize = 64;
/// With TLS, connections waiting under one rank until its task checks their proofs: an
/// impostor's cannot shut the real one out.
const MAX_CANDIDATES: usize = 4;
/// How long a new connection has to send its hello (a peer sends it right after connecting);
/// a silent one is closed when it runs out.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Hellos being read at once. A connection beyond it closes the oldest one still silent, so a
/// flood neither spawns threads without bound nor shuts out a peer that says hello at once.
pub(super) const MAX_HANDSHAKES: usize = 64;
/// The most ranks a hello may announce.
pub(super) const MAX_WORLD: u32 = 1 << 16;

pub(super) type Key = (u64, u64, u32);

/// What a dialing rank says first: who it is, in which ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub job: u64,
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(HELLO_MAGIC);
        b[8..16].copy_from_slice(&self.job.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..28].copy_from_slice(&self.rank.to_le_bytes());
        b[28..32].copy_from_slice(&self.world.to_le_bytes());
        b
    }

    /// Checked before anything is done with it: ours, and a rank inside a ring of 2 or more.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, String> {
        if &b[..8] != HELLO_MAGIC {
            return Err("not a ring hello".into());
        }
        let h = Hello {
            job: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            generation: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            rank: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
            world: u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")),
        };
        if !(2..=MAX_WORLD).contains(&h.world) || h.rank >= h.world {
            return Err(format!("rank {} of a ring of {} ranks", h.rank, h.world));
        }
        Ok(h)
    }
}

/// A ring hello's bytes: (job, generation, rank, world).
pub fn encode_hello(job: u64, generation: u64, rank: u32, world: u32) -> [u8; HELLO_LEN] {
    Hello { job, generation, rank, world }.encode()
}

/// What a connection's first bytes say, checked as the listener checks them (the fuzz
/// harness's way in).
pub fn decode_hello(bytes: &[u8]) -> Result<(u64, u64, u32, u32), String> {
    let b: &[u8; HELLO_LEN] = bytes.get(..HELLO_LEN).and_then(|b| b.try_into().ok()).ok_or("a hello is 32 bytes")?;
    Hello::decode(b).map(|h| (h.job, h.generation, h.rank, h.world))
}

pub(super) struct Parked {
    stream: Link,
    world: u32,
    at: Instant,
    /// With TLS: the hello's bytes, the dialer's proof and the connection's exporter.
    hello: [u8; HELLO_LEN],
    proof: Option<[u8; 32]>,
    binding: Option<[u8; 32]>,
}

/// The worker's listener for ring connections, and the connections waiting for their task.
pub struct Incoming {
    address: String,
    pub(super) parked: Mutex<HashMap<Key, Vec<Parked>>>,
    /// With credentials: TLS on every connection, a client certificate of the cluster required.
    pub(super) tls: Option<Arc<DataPlaneTls>>,
    arrived: Condvar,
    /// Connections whose hello is being read, by arrival number (oldest first), each a handle
    /// to close it by.
    handshakes: Mutex<BTreeMap<u64, TcpStream>>,
    /// Hello threads alive, closed ones that have yet to exit included.
    pub(super) hello_threads: AtomicUsize,
    /// Connections refused for want of a proof of membership.
    refused: AtomicUsize,
}

impl Incoming {
    /// Serves `listener` on a thread of its own for as long as the process lives.
    pub fn start(listener: TcpListener) -> std::io::Result<Arc<Incoming>> {
        Incoming::start_with(listener, None)
    }

    /// Likewise, over TLS when `tls` is given.
    pub fn start_with(listener: TcpListener, tls: Option<Arc<DataPlaneTls>>) -> std::io::Result<Arc<Incoming>> {
        let address = listener.local_addr()?.to_string();
        let me = Arc::new(Incoming {
            address,
            parked: Mutex::new(HashMap::new()),
            tls,
            arrived: Condvar::new(),
            handshakes: Mutex::new(BTreeMap::new()),
            hello_threads: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new().name("ring-listener".into()).spawn(move || {
            let mut arrivals = 0u64;
            for stream in listener.incoming() {
                let Some(me) = weak.upgrade() else { return };
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors, say: do not spin on it.
                        tracing::debug!(error = %e, "ring listener: accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                // Closed connections leave their threads at once; this only waits out a burst.
                while me.hello_threads.load(Ordering::Acquire) >= 2 * MAX_HANDSHAKES {
                    std::thread::sleep(Duration::from_millis(1));
                }
                arrivals += 1;
                me.greet(arrivals, stream);
            }
        })?;
        Ok(me)
    }

    /// Reads connection `id`'s hello on a thread of its own, so that the accept loop never
    /// waits on a peer.
    fn greet(self: &Arc<Incoming>, id: u64, stream: TcpStream) {
        let Ok(handle) = stream.try_clone() else { return };
        {
            let mut handshakes = self.handshakes.lock().expect("handshakes lock");
            if handshakes.len() >= MAX_HANDSHAKES {
                if let Some((_, oldest)) = handshakes.pop_first() {
                    tracing::warn!(peer = ?oldest.peer_addr().ok(), "ring listener: too many connections without a hello; closing the oldest");
                    let _ = oldest.shutdown(Shutdown::Both);
                }
            }
            handshakes.insert(id, handle);
        }
        self.hello_threads.fetch_add(1, Ordering::AcqRel);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("ring-hello".into()).spawn(move || {
            me.handshake(id, stream);
            me.hello_threads.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "ring listener: cannot start a hello thread; closing the connection");
            self.hello_threads.fetch_sub(1, Ordering::AcqRel);
            self.handshakes.lock().expect("handshakes lock").remove(&id);
        }
    }

    fn handshake(&self, id: u64, stream: TcpStream) {
        /// The link, the hello, and with TLS the dialer's proof and the connection's binding.
        type Greeted = (Link, [u8; HELLO_LEN], Option<[u8; 32]>, Option<[u8; 32]>);
        let peer = stream.peer_addr().ok();
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let greeted = (|| -> Result<Greeted, String> {
            let mut link = match &self.tls {
                Some(tls) => tls.accept(stream, deadline)?,
                None => Link::Plain(stream),
            };
            let mut hello = [0u8; HELLO_LEN];
            read_exact_by(&mut link, &mut hello, deadline)?;
            if !link.is_tls() {
                return Ok((link, hello, None, None));
            }
            let mut proof = [0u8; 32];
            read_exact_by(&mut link, &mut proof, deadline)?;
            let binding = link.binding();
            // The dialer sends nothing more until this acknowledgement, so rustls holds no
            // data of the ring's when the keys are taken out of it.
            write_all(&mut link, &[1], 0, deadline, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
            Ok((link.seal()?, hello, Some(proof), binding))
        })();
        // Closed for a newer connection meanwhile (the accept loop took it out): drop it.
        if self.handshakes.lock().expect("handshakes lock").remove(&id).is_none() {
            return;
        }
        match greeted.and_then(|(link, bytes, proof, binding)| Hello::decode(&bytes).map(|h| (link, h, bytes, proof, binding))) {
            Ok((link, h, bytes, proof, binding)) => self.park(h, link, bytes, proof, binding),
            Err(why) => tracing::debug!(?peer, why, "ring listener: no valid hello; closing the connection"),
        }
    }

    fn park(&self, h: Hello, stream: Link, hello: [u8; HELLO_LEN], proof: Option<[u8; 32]>, binding: Option<[u8; 32]>) {
        let key = (h.job, h.generation, h.rank);
        let mut parked = self.parked.lock().expect("parked lock");
        // Without TLS the first connection keeps its place: a newcomer must not take over a
        // ring. With it, the task keeps the one whose proof holds.
        let room = if proof.is_some() { MAX_CANDIDATES } else { 1 };
        if parked.get(&key).is_some_and(|c| c.len() >= room) {
            tracing::warn!(peer = ?stream.tcp().peer_addr().ok(), job = h.job, generation = h.generation, rank = h.rank,
                "ring listener: another connection for a rank that already has one waiting; refused");
            return;
        }
        if parked.len() >= MAX_PARKED {
            // Unclaimed for a minute: a task that never came. Make room.
            parked.retain(|_, c| {
                c.retain(|p| p.at.elapsed() < Duration::from_secs(60));
                !c.is_empty()
            });
        }
        if parked.len() >= MAX_PARKED && !parked.contains_key(&key) {
            tracing::warn!(job = h.job, generation = h.generation, rank = h.rank, "ring listener: too many unclaimed connections; refused");
            return;
        }
        parked.entry(key).or_default().push(Parked { stream, world: h.world, at: Instant::now(), hello, proof, binding });
        self.arrived.notify_all();
    }

    /// The address peers dial.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Connections refused because their proof of membership did not hold.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// The connection of rank `key.2` of (job `key.0`, generation `key.1`), a ring of `world`;
    /// with TLS, the first whose proof of membership holds under `ring_key`.
    pub(super) fn take(&self, key: Key, world: usize, ring_key: Option<&RingKey>, deadline: Instant, cancel: &AtomicBool) -> Result<Link, WorkerError> {
        if self.tls.is_some() && ring_key.is_none() {
            return Err(WorkerError::Collective("this worker's ring listener speaks TLS, and its assignment brought no ring key".into()));
        }
        let mut parked = self.parked.lock().expect("parked lock");
        loop {
            while let Some(p) = parked.get_mut(&key).and_then(|c| (!c.is_empty()).then(|| c.remove(0))) {
                if parked.get(&key).is_some_and(|c| c.is_empty()) {
                    parked.remove(&key);
                }
                let member = match (ring_key, p.binding, p.proof) {
                    (None, None, None) => true,
                    (Some(k), Some(binding), Some(proof)) => same_mac(&proof, &hello_proof(k, &binding, &p.hello)),
                    _ => false,
                };
                if !member {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = ?p.stream.tcp().peer_addr().ok(), job = key.0, generation = key.1, rank = key.2,
                        "ring listener: a connection without a valid proof of membership in the generation; refused");
                    continue;
                }
                if p.world as usize != world {
                    return Err(WorkerError::Collective(format!("rank {} dialed a ring of {} ranks; this one has {world}", key.2, p.world)));
                }
                return Ok(p.stream);
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(WorkerError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WorkerError::Collective(format!("rank {} did not connect (job {}, generation {})", key.2, key.0, key.1)));
            }
            parked = self.arrived.wait_timeout(parked, (deadline - now).min(POLL)).expect("parked lock").0;
        }
    }
}

/// Fills `b` by `deadline` (a byte at a time would not keep a connection open).
pub(super) fn read_exact_by(s: &mut Link, b: &mut [u8], deadline: Instant) -> Result<(), String> {
    let mut filled = 0;
    while filled < b.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no hello within {HELLO_TIMEOUT:?}"));
        }
        s.tcp().set_read_timeout(Some(left.min(POLL))).map_err(|e| e.to_string())?;
        match s.read(&mut b[filled..]) {
            Ok(0) => return Err("closed before its hello".into()),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
