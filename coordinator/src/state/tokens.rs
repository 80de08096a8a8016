//! Access tokens in the replicated state: ids, roles and keyed hashes (never a secret).
//! Revoking one takes effect on each replica as it applies the revocation.

use shoal_core::auth::{Caller, Role, Token, TokenKey, GRANTS, GRANT_EXEC};
use shoal_proto::{TokenBootstrap, TokenRecord};

use super::{ApplyError, ApplyOutput, ApplyResult, StateMachine};

/// Tokens the state holds at most (live ones; revoked and expired ones go after a week).
pub const MAX_TOKENS: usize = 10_000;
const KEEP_DEAD_MS: u64 = 7 * 24 * 3600 * 1000;

fn check_record(t: &TokenRecord) -> Result<(), ApplyError> {
    if !Token::valid_id(&t.id) {
        return Err(ApplyError::invalid(format!("token id {:?} is not 16 hex digits", t.id)));
    }
    Role::parse(&t.role).map_err(ApplyError::invalid)?;
    if t.hash.len() != 32 {
        return Err(ApplyError::invalid(format!("token {}: the hash has {} bytes, not 32", t.id, t.hash.len())));
    }
    if let Some(g) = t.grants.iter().find(|g| !GRANTS.contains(&g.as_str())) {
        return Err(ApplyError::invalid(format!("unknown grant {g:?} (expected {})", GRANTS.join(", "))));
    }
    if t.name.len() > 200 {
        return Err(ApplyError::invalid("a token's name takes at most 200 bytes"));
    }
    Ok(())
}

fn live(t: &TokenRecord, now_ms: u64) -> bool {
    t.revoked_ms == 0 && (t.expires_ms == 0 || now_ms < t.expires_ms)
}

impl StateMachine {
    /// Whether the cluster's first tokens are in (before that, a coordinator checks tokens
    /// against its own bootstrap file).
    pub fn tokens_bootstrapped(&self) -> bool {
        self.tokens_bootstrapped
    }

    /// Every token, by id.
    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    /// Who `token` is, checked against `records` (the state's, or a bootstrap file's before
    /// the state has any) at `now_ms`.
    pub fn authenticate<'a>(records: impl IntoIterator<Item = &'a TokenRecord>, key: &TokenKey, token: &Token, now_ms: u64) -> Result<Caller, String> {
        let t = records.into_iter().find(|t| t.id == token.id).ok_or_else(|| format!("unknown token {}", token.id))?;
        if !key.matches(&token.secret, &t.hash) {
            return Err(format!("token {} does not match its record", token.id));
        }
        if t.revoked_ms != 0 {
            return Err(format!("token {} was revoked", token.id));
        }
        if t.expires_ms != 0 && now_ms >= t.expires_ms {
            return Err(format!("token {} expired", token.id));
        }
        let role = Role::parse(&t.role).map_err(|e| e.to_string())?;
        Ok(Caller { id: t.id.clone(), role, exec: role == Role::Admin || t.grants.iter().any(|g| g == GRANT_EXEC), node: None })
    }

    pub(super) fn bootstrap_tokens(&mut self, b: TokenBootstrap) -> ApplyResult {
        if self.tokens_bootstrapped {
            return Err(ApplyError::conflict("the cluster's first tokens are in already"));
        }
        for t in &b.tokens {
            check_record(t)?;
        }
        for mut t in b.tokens {
            t.created_ms = self.now_ms;
            t.ttl_ms = 0;
            self.tokens.insert(t.id.clone(), t);
        }
        self.tokens_bootstrapped = true;
        Ok(ApplyOutput::None)
    }

    pub(super) fn create_token(&mut self, mut t: TokenRecord) -> ApplyResult {
        check_record(&t)?;
        if self.tokens.contains_key(&t.id) {
            return Err(ApplyError::conflict(format!("there is a token {} already", t.id)));
        }
        let now = self.now_ms;
        self.tokens.retain(|_, old| live(old, now) || old.revoked_ms.max(old.expires_ms).saturating_add(KEEP_DEAD_MS) > now);
        if self.tokens.len() >= MAX_TOKENS {
            return Err(ApplyError::conflict(format!("the cluster holds {MAX_TOKENS} tokens; revoke some first")));
        }
        t.created_ms = now;
        t.expires_ms = if t.ttl_ms == 0 { 0 } else { now.saturating_add(t.ttl_ms) };
        t.ttl_ms = 0;
        t.revoked_ms = 0;
        // Created through the API, so the cluster is past its bootstrap.
        self.tokens_bootstrapped = true;
        self.tokens.insert(t.id.clone(), t.clone());
        Ok(ApplyOutput::Token(Box::new(t)))
    }

    pub(super) fn revoke_token(&mut self, id: &str) -> ApplyResult {
        let now = self.now_ms;
        let t = self.tokens.get(id).ok_or_else(|| ApplyError::not_found(format!("there is no token {id}")))?;
        if t.revoked_ms == 0 && t.role == Role::Admin.as_str() && !self.tokens.values().any(|o| o.id != id && o.role == Role::Admin.as_str() && live(o, now)) {
            return Err(ApplyError::conflict(format!("token {id} is the last admin token; create another admin token first")));
        }
        let t = self.tokens.get_mut(id).expect("checked above");
        if t.revoked_ms == 0 {
            // Never 0, which means "not revoked".
            t.revoked_ms = now.max(1);
        }
        Ok(ApplyOutput::Token(Box::new(t.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::cmd;
    use shoal_proto::command::Kind;

    fn apply(sm: &mut StateMachine, c: shoal_proto::Command) -> ApplyResult {
        let index = sm.applied_index + 1;
        sm.apply(index, c)
    }

    fn record(key: &TokenKey, role: &str) -> (Token, TokenRecord) {
        let t = Token::generate();
        let r = TokenRecord { id: t.id.clone(), role: role.into(), name: format!("{role} token"), hash: key.hash(&t.secret).to_vec(), ..Default::default() };
        (t, r)
    }

    #[test]
    fn bootstrap_once_then_create_authenticate_expire_and_revoke() {
        let key = TokenKey::generate();
        let mut sm = StateMachine::default();
        let (admin, admin_rec) = record(&key, "admin");
        let (worker, worker_rec) = record(&key, "worker");
        assert!(!sm.tokens_bootstrapped());
        apply(&mut sm, cmd(Kind::BootstrapTokens(TokenBootstrap { tokens: vec![admin_rec.clone(), worker_rec] }))).unwrap();
        assert!(sm.tokens_bootstrapped());
        // A second bootstrap (another replica's, after a new leader) changes nothing.
        let (_, other) = record(&key, "admin");
        assert!(matches!(apply(&mut sm, cmd(Kind::BootstrapTokens(TokenBootstrap { tokens: vec![other] }))), Err(ApplyError::Conflict(_))));
        assert_eq!(sm.tokens().count(), 2);
        let who = StateMachine::authenticate(sm.tokens(), &key, &admin, 1).unwrap();
        assert_eq!((who.role, who.exec), (Role::Admin, true));
        let w = StateMachine::authenticate(sm.tokens(), &key, &worker, 1).unwrap();
        assert_eq!((w.role, w.exec), (Role::Worker, false));
        // Another cluster's key, a wrong secret, an unknown id.
        assert!(StateMachine::authenticate(sm.tokens(), &TokenKey::generate(), &admin, 1).unwrap_err().contains("does not match"));
        let forged = Token { id: admin.id.clone(), secret: Token::generate().secret };
        assert!(StateMachine::authenticate(sm.tokens(), &key, &forged, 1).is_err());
        assert!(StateMachine::authenticate(sm.tokens(), &key, &Token::generate(), 1).unwrap_err().contains("unknown token"));

        // An operator token with the exec grant and a one-minute life.
        let (op, mut op_rec) = record(&key, "operator");
        op_rec.grants = vec!["exec".into()];
        op_rec.ttl_ms = 60_000;
        let mut c = cmd(Kind::CreateToken(op_rec.clone()));
        c.proposed_unix_ms = 1_000_000;
        let ApplyOutput::Token(made) = apply(&mut sm, c).unwrap() else { panic!() };
        assert_eq!((made.created_ms, made.expires_ms), (1_000_000, 1_060_000));
        let who = StateMachine::authenticate(sm.tokens(), &key, &op, 1_059_999).unwrap();
        assert_eq!((who.role, who.exec), (Role::Operator, true));
        assert!(StateMachine::authenticate(sm.tokens(), &key, &op, 1_060_000).unwrap_err().contains("expired"));
        assert!(matches!(apply(&mut sm, cmd(Kind::CreateToken(op_rec))), Err(ApplyError::Conflict(_))), "an id twice");

        // Revocation holds from the entry on; the last admin token cannot go.
        let e = apply(&mut sm, cmd(Kind::RevokeToken(admin.id.clone()))).unwrap_err();
        assert!(e.to_string().contains("last admin token"), "{e}");
        let (admin2, admin2_rec) = record(&key, "admin");
        apply(&mut sm, cmd(Kind::CreateToken(admin2_rec))).unwrap();
        apply(&mut sm, cmd(Kind::RevokeToken(admin.id.clone()))).unwrap();
        assert!(StateMachine::authenticate(sm.tokens(), &key, &admin, 2).unwrap_err().contains("revoked"));
        assert!(StateMachine::authenticate(sm.tokens(), &key, &admin2, 2).is_ok());
        assert!(matches!(apply(&mut sm, cmd(Kind::RevokeToken("0123456789abcdef".into()))), Err(ApplyError::NotFound(_))));

        // Tokens and the bootstrap mark survive a snapshot.
        let back = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
        assert_eq!(back.tokens().cloned().collect::<Vec<_>>(), sm.tokens().cloned().collect::<Vec<_>>());
        assert!(back.tokens_bootstrapped());
        assert!(StateMachine::authenticate(back.tokens(), &key, &admin, 2).unwrap_err().contains("revoked"));
    }

    #[test]
    fn malformed_records_are_refused() {
        let key = TokenKey::generate();
        let mut sm = StateMachine::default();
        let (_, good) = record(&key, "viewer");
        for (bad, why) in [
            (TokenRecord { id: "xyz".into(), ..good.clone() }, "16 hex digits"),
            (TokenRecord { role: "peer".into(), ..good.clone() }, "unknown role"),
            (TokenRecord { hash: vec![1; 31], ..good.clone() }, "31 bytes"),
            (TokenRecord { grants: vec!["root".into()], ..good.clone() }, "unknown grant"),
        ] {
            let e = apply(&mut sm, cmd(Kind::CreateToken(bad))).unwrap_err();
            assert!(matches!(&e, ApplyError::Invalid(m) if m.contains(why)), "{e:?}");
        }
        assert_eq!(sm.tokens().count(), 0);
    }
}
