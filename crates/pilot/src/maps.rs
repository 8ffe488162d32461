//! Protobuf map fields (`Struct.fields`, `filter_metadata`, RBAC `policies`, …) are `HashMap`s
//! in the generated types, and their wire encoding follows the map's iteration order. The xDS
//! server versions a resource by a hash of its bytes, so two builds of the same resource must
//! encode alike: every map pilot builds shares one hasher seed, and the same inserts in the same
//! order then iterate — and encode — in the same order within this process.

use std::collections::HashMap;
use std::hash::RandomState;
use std::sync::LazyLock;

static SEED: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// An empty map with the process-wide seed.
pub fn map<K, V>() -> HashMap<K, V> {
    HashMap::with_hasher(SEED.clone())
}

/// A map of `entries`, inserted in order, with the process-wide seed.
pub fn map_of<K: std::hash::Hash + Eq, V>(
    entries: impl IntoIterator<Item = (K, V)>,
) -> HashMap<K, V> {
    let mut m = map();
    m.extend(entries);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_inserts_iterate_alike() {
        let keys: Vec<String> = (0..64).map(|i| format!("key-{i}")).collect();
        let a = map_of(keys.iter().map(|k| (k.clone(), 1)));
        let b = map_of(keys.iter().map(|k| (k.clone(), 1)));
        assert!(a.keys().eq(b.keys()));
    }
}
