//! Inputs the fuzz harnesses found that crashed shoal, each kept as a test. Every one of
//! these was a replica killed by a single raft message (raft-rs trusts its peers and answers
//! an impossible message with a panic); `Core::step` now drops them, and counts them in
//! `dropped_raft_messages`.

use raft::eraftpb::{Entry, Message, MessageType};

fn message(kind: MessageType, term: u64, f: impl FnOnce(&mut Message)) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = 2;
    m.to = 1;
    m.term = term;
    f(&mut m);
    m
}

fn dropped(m: Message) {
    let (mut core, _) = shoal_fuzz::replica();
    let what = format!("{m:?}");
    assert!(!shoal_fuzz::deliver(&mut core, m), "taken: {what}");
    // The replica goes on: it still answers a well-formed heartbeat.
    assert!(shoal_fuzz::deliver(&mut core, message(MessageType::MsgHeartbeat, 1, |_| {})));
}

#[test]
fn a_heartbeat_committing_past_the_log() {
    dropped(message(MessageType::MsgHeartbeat, 1, |m| m.commit = 1));
    dropped(message(MessageType::MsgHeartbeat, 0, |m| m.commit = 1));
}

#[test]
fn a_vote_without_a_term() {
    dropped(message(MessageType::MsgRequestPreVote, 0, |_| {}));
    dropped(message(MessageType::MsgRequestVote, 0, |_| {}));
}

#[test]
fn an_append_after_an_entry_without_a_term() {
    dropped(message(MessageType::MsgAppend, 1, |m| {
        m.index = 1;
        m.set_entries(vec![Entry { index: 2, term: 1, ..Default::default() }].into());
    }));
}

#[test]
fn entries_out_of_sequence() {
    dropped(message(MessageType::MsgAppend, 2, |m| {
        m.set_entries(vec![Entry { index: 3, term: 1, ..Default::default() }].into());
    }));
}

#[test]
fn requests_a_follower_would_forward_with_a_term() {
    dropped(message(MessageType::MsgReadIndex, 1, |_| {}));
    dropped(message(MessageType::MsgPropose, 0, |_| {}));
    dropped(message(MessageType::MsgTransferLeader, 1, |_| {}));
}

/// A carriage return inside a record's last cell made the CSV reader write past the records
/// it had counted (an index out of bounds: an import killed the process).
#[test]
fn a_carriage_return_alone_inside_a_csv_line() {
    let text = b"a,b,label\n1,2,0\n3,4,\r1\n";
    let e = shoal_core::csv::records_from_csv("f.csv", text, "label", &[]).unwrap_err().to_string();
    assert!(e.contains("carriage return") || e.contains("cells"), "{e}");
    assert!(shoal_core::csv::records_from_csv_target("f.csv", text, "label").is_err());
    shoal_fuzz::csv(text);
}
