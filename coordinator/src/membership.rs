//! The rules of the coordinator group's membership, sans IO: when a replica with an empty
//! folder may vote, and which changes of the group keep it safe and live. The shell and the
//! simulation both call these, so the simulation checks the same rules that run.

use std::collections::BTreeSet;

use shoal_proto::PeerHello;

/// What a replica starting on an empty folder with `--initial-state new` does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FreshStart {
    /// Not enough peers have confirmed yet: ask again.
    Wait { confirmed: usize, needed: usize },
    /// Enough peers are as new as this replica: no entry can have been committed without one
    /// of them holding it, so this replica may vote.
    Start,
    /// The group has a log: this replica's votes and entries are gone (a wiped or lost
    /// folder), and voting again could elect a leader without acknowledged writes.
    Refuse(String),
}

/// How many other voters must confirm they are fresh before a replica with an empty folder
/// votes, in a group of `voters` (itself included). A committed entry is held by a majority;
/// if this replica was one of them and lost its folder, the others of that majority still
/// hold it, and every set of `voters - majority + 1` other replicas includes one of them.
/// A single replica has nobody to ask (and nothing to protect beyond its own folder).
pub fn fresh_confirmations_needed(voters: usize) -> usize {
    if voters <= 1 {
        return 0;
    }
    voters - (voters / 2 + 1) + 1
}

/// Decides a fresh start from what peers said: `fresh` are the peers that are themselves
/// fresh (they answered so, or asked this replica while waiting), `answers` everything else
/// heard from peers, by id.
pub fn fresh_start(me: u64, voters: &BTreeSet<u64>, fresh: &BTreeSet<u64>, answers: &[PeerHello]) -> FreshStart {
    // Any replica of the cluster with a log will do (refusing is always safe), also one the
    // peer list does not name (the group may have changed since it was written).
    if let Some(h) = answers.iter().find(|h| !h.fresh && (h.commit > 0 || h.last_index > 0 || h.term > 0)) {
        return FreshStart::Refuse(format!(
            "this replica's folder holds no state, but its group has a log (replica {} is at term {}, commit index {}): \
             this replica's votes and entries are gone (a wiped or lost folder), and voting again could lose acknowledged writes. \
             Replace it: `shoal coordinator remove {me}`, then `shoal coordinator add HOST:PORT`, and start the new replica \
             (it gets a new id) with `--initial-state join`: it joins as a learner and catches up from a snapshot",
            h.node_id, h.term, h.commit
        ));
    }
    let needed = fresh_confirmations_needed(voters.len());
    let confirmed = fresh.iter().filter(|id| **id != me && voters.contains(id)).count();
    if confirmed >= needed {
        FreshStart::Start
    } else {
        FreshStart::Wait { confirmed, needed }
    }
}

/// A change of the group that the leader is asked to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    AddLearner(u64),
    Promote(u64),
    Remove(u64),
}

/// etcd's strict reconfiguration check: the group after `change` must have a quorum of
/// voters that are live now (`live`: recently heard by the leader, itself included). The
/// error names the replicas that are not.
pub fn check_live_quorum(voters: &[u64], change: Change, live: &BTreeSet<u64>) -> Result<(), String> {
    let mut next: BTreeSet<u64> = voters.iter().copied().collect();
    match change {
        // A learner does not vote: the quorum does not change.
        Change::AddLearner(_) => return Ok(()),
        Change::Promote(id) => {
            next.insert(id);
        }
        Change::Remove(id) => {
            next.remove(&id);
        }
    }
    if next.is_empty() {
        return Err("the group would have no voter left; a group needs one".into());
    }
    let quorum = next.len() / 2 + 1;
    let up: Vec<u64> = next.iter().copied().filter(|v| live.contains(v)).collect();
    if up.len() >= quorum {
        return Ok(());
    }
    let down: Vec<String> = next.iter().filter(|v| !live.contains(v)).map(|v| format!("replica {v}")).collect();
    let what = match change {
        Change::Promote(id) => format!("promoting replica {id}"),
        Change::Remove(id) => format!("removing replica {id}"),
        Change::AddLearner(_) => unreachable!("returned above"),
    };
    Err(format!(
        "{what} would leave voters {next:?} with {} live, fewer than the {quorum} a quorum needs: {} not heard from; \
         bring {} back first (`--force` skips this check, for disaster recovery only)",
        up.len(),
        down.join(", "),
        if down.len() == 1 { "it" } else { "them" }
    ))
}

/// Where a leader that is asked to leave hands its role: a live voter whose log matches the
/// leader's last index (raft-rs holds every proposal while a transfer is pending, so a
/// transfer to a dead or lagging voter stalls writes). `matched` gives a peer's match index.
pub fn transfer_target(me: u64, voters: &[u64], live: &BTreeSet<u64>, last_index: u64, matched: impl Fn(u64) -> u64) -> Result<u64, String> {
    let others: Vec<u64> = voters.iter().copied().filter(|v| *v != me).collect();
    if others.is_empty() {
        return Err(format!("replica {me} is the last voter; a group needs one"));
    }
    if let Some(t) = others.iter().copied().find(|v| live.contains(v) && matched(*v) >= last_index) {
        return Ok(t);
    }
    let why: Vec<String> = others
        .iter()
        .map(|v| if !live.contains(v) { format!("replica {v} is not heard from") } else { format!("replica {v} is {} entries behind", last_index.saturating_sub(matched(*v))) })
        .collect();
    Err(format!("no live voter has caught up to hand the lead to ({}); retry once one has", why.join(", ")))
}

/// Whether a replica can be reached at `address` by its peers: a numeric HOST:PORT with a
/// port and a host that names one machine (not 0.0.0.0 or ::).
pub fn check_dialable(address: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = address.parse().map_err(|_| format!("{address:?} is not an address (HOST:PORT with a numeric host)"))?;
    if a.port() == 0 {
        return Err(format!("{address:?} has port 0: no peer can dial it (give the port the replica will listen on)"));
    }
    if a.ip().is_unspecified() {
        return Err(format!("{address:?} is an unspecified host: no peer can dial it (give the replica's own address)"));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    fn hello(id: u64, fresh: bool, commit: u64) -> PeerHello {
        PeerHello { node_id: id, fresh, commit, term: if fresh { 0 } else { 2 }, last_index: commit, ..Default::default() }
    }

    #[test]
    fn enough_fresh_peers_that_every_majority_has_one() {
        assert_eq!([1, 2, 3, 4, 5, 7].map(fresh_confirmations_needed), [0, 1, 2, 2, 3, 4]);
        // Brute force: for every group size and every set of confirmers of that size, each
        // majority holding the wiped replica still has another member among the confirmers.
        for n in 2..=7usize {
            let need = fresh_confirmations_needed(n);
            let q = n / 2 + 1;
            for confirmers in 0u32..(1 << (n - 1)) {
                if confirmers.count_ones() as usize != need {
                    continue;
                }
                // Replica n-1 is the wiped one; majorities including it.
                for m in 0u32..(1 << (n - 1)) {
                    if m.count_ones() as usize + 1 >= q {
                        assert!(m & confirmers != 0, "n={n}: confirmers {confirmers:b} miss majority {m:b}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_fresh_replica_waits_starts_or_refuses() {
        let voters = set(&[1, 2, 3]);
        assert_eq!(fresh_start(2, &voters, &set(&[1]), &[]), FreshStart::Wait { confirmed: 1, needed: 2 });
        assert_eq!(fresh_start(2, &voters, &set(&[1, 3]), &[]), FreshStart::Start);
        // The group has a log: refused, whatever else said fresh.
        let v = fresh_start(2, &voters, &set(&[3]), &[hello(1, false, 57)]);
        let FreshStart::Refuse(why) = v else { panic!("{v:?}") };
        assert!(why.contains("commit index 57") && why.contains("shoal coordinator remove 2") && why.contains("--initial-state join"), "{why}");
        // A replica that answers from another group does not count.
        assert_eq!(fresh_start(2, &voters, &set(&[1, 9]), &[]), FreshStart::Wait { confirmed: 1, needed: 2 });
        assert_eq!(fresh_start(1, &set(&[1]), &set(&[]), &[]), FreshStart::Start);
    }

    #[test]
    fn changes_keep_a_live_quorum() {
        let voters = [1, 2, 3];
        // Replica 3 is down: removing a healthy follower leaves 2 voters, 1 live.
        let e = check_live_quorum(&voters, Change::Remove(2), &set(&[1, 2])).unwrap_err();
        assert!(e.contains("replica 3 not heard from") && e.contains("--force"), "{e}");
        // Removing the dead one is fine.
        check_live_quorum(&voters, Change::Remove(3), &set(&[1, 2])).unwrap();
        check_live_quorum(&voters, Change::AddLearner(4), &set(&[1])).unwrap();
        // Promoting a live learner with one voter down: 4 voters, 3 live.
        check_live_quorum(&voters, Change::Promote(4), &set(&[1, 2, 4])).unwrap();
        assert!(check_live_quorum(&voters, Change::Promote(4), &set(&[1, 2])).is_err());
        assert!(check_live_quorum(&[1], Change::Remove(1), &set(&[1])).is_err());
    }

    #[test]
    fn the_lead_goes_only_to_a_live_voter_that_caught_up() {
        let live = set(&[1, 2]);
        assert_eq!(transfer_target(1, &[1, 2, 3], &live, 10, |_| 10), Ok(2));
        let e = transfer_target(1, &[1, 2, 3], &live, 10, |v| if v == 2 { 7 } else { 10 }).unwrap_err();
        assert!(e.contains("replica 2 is 3 entries behind") && e.contains("replica 3 is not heard from"), "{e}");
        assert!(transfer_target(1, &[1], &live, 10, |_| 10).is_err());
    }

    #[test]
    fn only_dialable_addresses_join() {
        assert!(check_dialable("127.0.0.1:7400").is_ok());
        assert!(check_dialable("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(check_dialable("0.0.0.0:7400").unwrap_err().contains("unspecified"));
        assert!(check_dialable("[::]:7400").unwrap_err().contains("unspecified"));
        assert!(check_dialable("localhost:7400").unwrap_err().contains("numeric host"));
    }
}
