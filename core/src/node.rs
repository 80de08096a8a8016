//! This process's name in a cluster (`coordinator-1`, or a worker's id such as `w2` once it
//! has registered), for the `node` field of its structured logs and its metrics' labels.

use std::sync::RwLock;

static NODE: RwLock<String> = RwLock::new(String::new());

/// Names this process (again, when a worker registers anew).
pub fn set_node(name: &str) {
    let mut node = NODE.write().unwrap_or_else(|e| e.into_inner());
    node.clear();
    node.push_str(name);
}

/// This process's name; empty until it is set.
pub fn node() -> String {
    NODE.read().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_name_is_set_and_replaced() {
        super::set_node("w1");
        assert_eq!(super::node(), "w1");
        super::set_node("w12");
        assert_eq!(super::node(), "w12");
    }
}
