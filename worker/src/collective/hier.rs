//! The hierarchical collective, for a generation whose ranks span hosts with several ranks on
//! some of them: shared memory within each host, a raw-TCP ring between the hosts' leaders.
//!
//! Hosts are ordered by their lowest rank, and a host's ranks by rank; a host's leader is its
//! lowest rank. An all-reduce is three collectives, so its order of summation is fixed by the
//! placement alone:
//!
//! 1. within each host, the shm all-reduce of its ranks' buffers (`reference_sum` over the
//!    host's ranks in rank order);
//! 2. between the leaders, the TCP ring's all-reduce of the host sums (`reference_sum` over the
//!    hosts in host order);
//! 3. within each host again, an shm all-reduce where the leader gives the result and every
//!    other rank `-0.0`: `x + -0.0 == x` for every x (signed zeros and NaN included), so it is
//!    an exact broadcast and every rank of every host ends with the same bytes.
//!
//! The result differs from a flat ring's in its last bits (another order); a job that needs
//! bits independent of the placement uses `lanes`, whose sums are exact in any order.

use super::{Collective, MAX_GATHER_BYTES};
use crate::WorkerError;

pub struct Hierarchical {
    rank: usize,
    world: usize,
    /// The ranks of each host, hosts in order of their lowest rank.
    hosts: Vec<Vec<usize>>,
    local: Box<dyn Collective>,
    /// The ring of host leaders; on leaders only.
    leaders: Option<Box<dyn Collective>>,
}

/// The ranks of each host for per-rank host ids, hosts in order of their lowest rank.
pub fn host_groups(hosts: &[String]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (rank, h) in hosts.iter().enumerate() {
        match groups.iter_mut().find(|(id, _)| id == h) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((h.clone(), vec![rank])),
        }
    }
    groups.into_iter().map(|(_, ranks)| ranks).collect()
}

impl Hierarchical {
    /// `local`: this host's ranks (local rank = position in `hosts[host]`); `leaders`: the
    /// leaders' ring (leader i = host i), present exactly when this rank leads its host.
    pub fn new(rank: usize, world: usize, hosts: Vec<Vec<usize>>, local: Box<dyn Collective>, leaders: Option<Box<dyn Collective>>) -> Result<Hierarchical, WorkerError> {
        let host = hosts.iter().position(|h| h.contains(&rank)).ok_or_else(|| WorkerError::Collective(format!("rank {rank} is on no host")))?;
        let leads = hosts[host][0] == rank;
        if leads != leaders.is_some() || local.world() != hosts[host].len() {
            return Err(WorkerError::Collective(format!("rank {rank}: the hierarchical collective was joined with the wrong sub-collectives")));
        }
        Ok(Hierarchical { rank, world, hosts, local, leaders })
    }

    /// Rank 0 of the host's `buf` on every rank of the host, in pieces the local all-gather
    /// carries, its length first.
    fn local_broadcast_bytes(&mut self, buf: &mut Vec<u8>) -> Result<(), WorkerError> {
        let mut len = (buf.len() as u64).to_le_bytes().to_vec();
        self.local.broadcast(&mut len, 0)?;
        let n = u64::from_le_bytes(len.as_slice().try_into().map_err(|_| WorkerError::Collective("a bad length in a host broadcast".into()))?) as usize;
        let leads = self.local.rank() == 0;
        let mut out = Vec::with_capacity(if leads { 0 } else { n.min(1 << 30) });
        let mut at = 0;
        while at < n {
            let end = (at + MAX_GATHER_BYTES).min(n);
            let mut piece = if leads { buf[at..end].to_vec() } else { Vec::new() };
            self.local.broadcast(&mut piece, 0)?;
            if piece.len() != end - at {
                return Err(WorkerError::Collective(format!("a host broadcast piece of {} bytes where {} were expected", piece.len(), end - at)));
            }
            if !leads {
                out.extend_from_slice(&piece);
            }
            at = end;
        }
        if !leads {
            *buf = out;
        }
        Ok(())
    }
}

fn pack(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 8).sum());
    for i in items {
        out.extend_from_slice(&(i.len() as u64).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

fn unpack(mut b: &[u8], count: usize) -> Result<Vec<Vec<u8>>, WorkerError> {
    let bad = || WorkerError::Collective("a malformed host gather".into());
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, rest) = b.split_first_chunk::<8>().ok_or_else(bad)?;
        let len = u64::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(bad());
        }
        out.push(rest[..len].to_vec());
        b = &rest[len..];
    }
    if !b.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// The collective of one rank alone (a host with one rank of the generation).
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn name(&self) -> &'static str {
        "solo"
    }

    fn all_reduce(&mut self, _buf: &mut [f32]) -> Result<(), WorkerError> {
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        Ok(vec![mine])
    }
}

impl Collective for Hierarchical {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn name(&self) -> &'static str {
        "hierarchical"
    }

    fn parts(&self) -> Option<(&'static str, &'static str)> {
        Some(("shm", "tcp"))
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        self.local.all_reduce(buf)?;
        if let Some(ring) = self.leaders.as_mut() {
            ring.all_reduce(buf)?;
        } else {
            buf.fill(-0.0);
        }
        if self.local.world() > 1 {
            self.local.all_reduce(buf)?;
        }
        Ok(())
    }

    fn all_gather_bytes(&mut self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, WorkerError> {
        let here = self.local.all_gather_bytes(mine)?;
        let mut all = Vec::new();
        if let Some(ring) = self.leaders.as_mut() {
            let hosts = ring.all_gather_bytes(pack(&here))?;
            all = pack(&hosts);
        }
        if self.local.world() > 1 {
            self.local_broadcast_bytes(&mut all)?;
        }
        let hosts = unpack(&all, self.hosts.len())?;
        let mut out = vec![Vec::new(); self.world];
        for (h, packed) in hosts.iter().enumerate() {
            let ranks = &self.hosts[h];
            for (r, bytes) in ranks.iter().zip(unpack(packed, ranks.len())?) {
                out[*r] = bytes;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_grouped_in_order_of_their_lowest_rank() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(host_groups(&h(&["b", "a", "b", "a", "c"])), vec![vec![0, 2], vec![1, 3], vec![4]]);
        assert_eq!(host_groups(&h(&["a"])), vec![vec![0]]);
    }

    #[test]
    fn a_packed_gather_round_trips_and_a_malformed_one_is_an_error() {
        let items = vec![b"one".to_vec(), Vec::new(), vec![7; 300]];
        assert_eq!(unpack(&pack(&items), 3).unwrap(), items);
        assert!(unpack(&pack(&items), 2).is_err(), "bytes left over");
        assert!(unpack(&pack(&items)[..10], 3).is_err(), "cut short");
    }

    /// 5 ranks on hosts [a, b, a, b, a]: a's ranks 0, 2, 4 and b's 1, 3 over shared memory,
    /// leaders 0 and 1 over a TCP ring, all in this process.
    #[test]
    fn the_sum_is_the_documented_order_and_every_rank_has_the_same_bytes() {
        use super::super::shm::ShmRing;
        use super::super::testing::{inputs, tcp_rings};
        use super::super::{reference_sum, Wire};
        use std::sync::{atomic::AtomicBool, Arc};
        use std::time::Duration;
        let names: Vec<String> = ["a", "b", "a", "b", "a"].iter().map(|s| s.to_string()).collect();
        let groups = host_groups(&names);
        let world = names.len();
        let data = inputs(world, 1001, 3);
        let mut leader_rings: Vec<Option<Box<dyn Collective>>> = tcp_rings(2, Wire::F32, Duration::from_secs(10)).into_iter().map(|r| Some(Box::new(r) as Box<dyn Collective>)).collect();
        let pid = std::process::id();
        let out: Vec<(Vec<f32>, Vec<Vec<u8>>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let groups = groups.clone();
                    let h = groups.iter().position(|g| g.contains(&r)).unwrap();
                    let leaders = if groups[h][0] == r { leader_rings[h].take() } else { None };
                    let mut buf = data[r].clone();
                    s.spawn(move || {
                        let local_rank = groups[h].iter().position(|&q| q == r).unwrap();
                        let name = format!("shoal-test-hier-{pid}-{h}");
                        let local = ShmRing::open(local_rank, groups[h].len(), &name, Duration::from_secs(10), Arc::new(AtomicBool::new(false))).unwrap();
                        let mut c = Hierarchical::new(r, 5, groups.clone(), Box::new(local), leaders).unwrap();
                        c.all_reduce(&mut buf).unwrap();
                        let g = c.all_gather_bytes(vec![r as u8; 2 * r]).unwrap();
                        let mut floats = vec![r as f32; 300_000];
                        c.broadcast_floats(&mut floats, 3).unwrap();
                        assert!(floats.iter().all(|&v| v == 3.0));
                        (buf, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let a = reference_sum(&[data[0].clone(), data[2].clone(), data[4].clone()]);
        let b = reference_sum(&[data[1].clone(), data[3].clone()]);
        let want = reference_sum(&[a, b]);
        for (r, (buf, g)) in out.iter().enumerate() {
            assert!(buf.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "rank {r}");
            assert_eq!(*g, (0..world).map(|q| vec![q as u8; 2 * q]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn adding_negative_zero_is_exact() {
        for x in [0.0f32, -0.0, 1.5, -3.25e-40, f32::INFINITY, f32::NEG_INFINITY, f32::MAX] {
            assert_eq!((x + -0.0).to_bits(), x.to_bits(), "{x}");
        }
        assert!((f32::NAN + -0.0).is_nan());
    }
}
