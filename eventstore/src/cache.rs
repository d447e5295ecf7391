//! A bounded, shared map from a stream (or saga) to the latest state a transaction of
//! this process committed for it, with that state's version.
//!
//! Writers fill it only after their commit ([`StoreTransaction::after_commit`]), so
//! every entry is a state that was really stored; it can only be *behind* the database
//! (another process wrote since), never ahead of it. Whoever trusts an entry without
//! reading must therefore write in a way that fails when the version moved on (the
//! unique `(stream_id, stream_version)` index, a version-guarded update) and drop the
//! entry when it does.
//!
//! A writer also records the state it writes as *pending* before it commits
//! ([`VersionedCache::pending`]). The next writer of the stream can take the stream's
//! lock the moment the commit releases it, before the first writer has put its state
//! here as committed, and a later write in the same transaction sees its own; either
//! way the pending state is the right one if its version is in the database, which
//! one indexed read (or a version-guarded write) tells. An older state put late never
//! replaces a newer one.
//!
//! [`StoreTransaction::after_commit`]: crate::StoreTransaction::after_commit

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::StoreTransaction;

/// Cheap to clone; clones share the entries. The least recently used entry goes first
/// when it is full.
pub struct VersionedCache<V> {
    entries: Arc<Mutex<LruCache<String, Cached<V>>>>,
}

/// An entry: a state at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached<V> {
    pub version: i64,
    pub value: V,
    /// Put after its transaction committed; otherwise written by a transaction that
    /// may not have committed (yet), and true only if its version is stored.
    pub committed: bool,
}

impl<V> Clone for VersionedCache<V> {
    fn clone(&self) -> Self {
        VersionedCache {
            entries: self.entries.clone(),
        }
    }
}

impl<V> std::fmt::Debug for VersionedCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionedCache")
            .field("len", &lock(&self.entries).len())
            .finish()
    }
}

impl<V: Clone> VersionedCache<V> {
    /// Holds at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        VersionedCache {
            entries: Arc::new(Mutex::new(LruCache::new(capacity))),
        }
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<Cached<V>> {
        self.lock().get(key).cloned()
    }

    /// Records `value` at `version` as written by a transaction not yet committed.
    pub fn pending(&self, key: &str, version: i64, value: V) {
        self.set(key, version, value, false);
    }

    /// Records `value` at `version` as committed, unless the entry already holds a newer
    /// version (two commits' actions can run in either order).
    pub fn put(&self, key: &str, version: i64, value: V) {
        self.set(key, version, value, true);
    }

    fn set(&self, key: &str, version: i64, value: V, committed: bool) {
        let entry = Cached {
            version,
            value,
            committed,
        };
        let mut entries = self.lock();
        match entries.get_mut(key) {
            Some(old) if old.version > version => {}
            Some(old) => *old = entry,
            None => {
                entries.put(key.to_owned(), entry);
            }
        }
    }

    /// Records `value` at `version` as what `transaction` writes: pending now, committed
    /// once (and only if) the transaction commits.
    pub fn write_through(
        &self,
        transaction: &mut StoreTransaction<'_>,
        key: &str,
        version: i64,
        value: V,
    ) where
        V: Send + 'static,
    {
        self.pending(key, version, value.clone());
        let (cache, key) = (self.clone(), key.to_owned());
        transaction.after_commit(move || cache.put(&key, version, value));
    }

    /// Forgets `key`: its entry turned out to be behind the database.
    pub fn remove(&self, key: &str) {
        self.lock().pop(key);
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<String, Cached<V>>> {
        lock(&self.entries)
    }
}

fn lock<V>(
    entries: &Mutex<LruCache<String, Cached<V>>>,
) -> MutexGuard<'_, LruCache<String, Cached<V>>> {
    // A panic elsewhere while holding the lock leaves whole entries only.
    entries.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: i64, value: &'static str, committed: bool) -> Option<Cached<&'static str>> {
        Some(Cached {
            version,
            value,
            committed,
        })
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let cache = VersionedCache::new(2);
        cache.put("a", 2, "two");
        cache.put("a", 1, "one");
        assert_eq!(cache.get("a"), entry(2, "two", true));
        cache.put("a", 3, "three");
        assert_eq!(cache.get("a"), entry(3, "three", true));
        cache.remove("a");
        assert_eq!(cache.get("a"), None);
    }

    #[test]
    fn a_pending_version_is_marked_until_it_is_put_as_committed() {
        let cache = VersionedCache::new(2);
        cache.put("a", 1, "one");
        cache.pending("a", 2, "two");
        assert_eq!(cache.get("a"), entry(2, "two", false));
        cache.put("a", 1, "one again, late");
        assert_eq!(cache.get("a"), entry(2, "two", false));
        cache.put("a", 2, "two");
        assert_eq!(cache.get("a"), entry(2, "two", true));
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let cache = VersionedCache::new(2);
        cache.put("a", 1, "a");
        cache.put("b", 1, "b");
        assert!(cache.get("a").is_some());
        cache.put("c", 1, "c");
        assert_eq!(cache.get("b"), None, "b was used least recently");
        assert!(cache.get("a").is_some() && cache.get("c").is_some());
    }
}
