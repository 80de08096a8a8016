//! The data folder's identity: which cluster and replica it belongs to.

use super::*;

/// Reads, checks or (new folder) writes the data folder's identity; returns the cluster id.
pub(super) fn check_identity(cfg: &CoordinatorConfig) -> Result<String, CoordError> {
    let path = cfg.data_dir.join("identity.pb");
    let shown = cfg.data_dir.display();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id = ReplicaIdentity::decode(&bytes[..]).map_err(|e| CoordError::Identity(format!("{}: corrupt: {e}", path.display())))?;
            if id.node_id != cfg.id {
                return Err(CoordError::Identity(format!(
                    "{shown} holds the state of replica {} of cluster {}; refusing to run it as replica {}",
                    id.node_id, id.cluster_id, cfg.id
                )));
            }
            if let Some(c) = cfg.cluster_id.as_ref().filter(|c| **c != id.cluster_id) {
                return Err(CoordError::Identity(format!("{shown} belongs to cluster {}, not {c}", id.cluster_id)));
            }
            Ok(id.cluster_id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cfg.initial == InitialState::Existing && !cfg.data_dir.join("raft.log").exists() {
                return Err(CoordError::Identity(format!(
                    "{shown} holds no state, but replica {} belongs to an existing cluster: its log and votes are gone (a wiped or wrong folder). \
                     Rejoining as if it never voted could elect two leaders; remove the replica from the group and add a new one instead",
                    cfg.id
                )));
            }
            let cluster_id = cfg.cluster_id.clone().unwrap_or_else(|| {
                let peers: Vec<String> = cfg.peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
                blake3::hash(peers.join(",").as_bytes()).to_hex()[..16].to_string()
            });
            let id = ReplicaIdentity { cluster_id: cluster_id.clone(), node_id: cfg.id };
            shoal_core::fsutil::write_atomic(&path, &id.encode_to_vec()).map_err(|e| CoordError::Io(e.to_string()))?;
            Ok(cluster_id)
        }
        Err(e) => Err(CoordError::Io(format!("{}: {e}", path.display()))),
    }
}
