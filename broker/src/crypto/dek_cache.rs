//! The bounded, expiring cache of unwrapped DEKs. Entries are zeroized when they leave it:
//! evicted, expired (a sweep removes them within [`DekCache::sweep_interval`] of their TTL),
//! or purged with their secret when it is deleted or destroyed.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::{WrappedDek, DEK_LEN};

/// Counters of the DEK cache, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that went to the HSM.
    pub misses: u64,
    /// Entries currently held.
    pub entries: usize,
}

struct CacheEntry {
    dek: Zeroizing<[u8; DEK_LEN]>,
    /// The secret it opens, so that the secret's deletion purges it.
    path: Box<str>,
    at: Instant,
}

/// Bounded, expiring cache of unwrapped DEKs, keyed by the wrapped form (so a re-wrap or a
/// tampered row never hits a wrong entry). Entries zeroize on eviction.
pub struct DekCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
    ttl: Duration,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<Vec<u8>, CacheEntry>,
    order: VecDeque<Vec<u8>>,
    hits: u64,
    misses: u64,
}

impl CacheInner {
    /// Keeps the entries `keep` accepts; returns how many left.
    fn retain(&mut self, keep: impl Fn(&CacheEntry) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| keep(e));
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
        before - self.map.len()
    }
}

impl std::fmt::Debug for DekCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekCache")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl DekCache {
    /// A cache of at most `capacity` DEKs, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        DekCache {
            inner: Mutex::default(),
            capacity,
            ttl,
        }
    }

    /// How long an entry is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often [`DekCache::purge_expired`] should run so that no entry outlives its TTL by
    /// more than this: a tenth of the TTL, between 100 ms and 30 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    fn key(w: &WrappedDek) -> Vec<u8> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(w.kek_id.as_bytes());
        h.update((w.iv.len() as u32).to_be_bytes());
        h.update(&w.iv);
        h.update(&w.ciphertext);
        h.finalize().to_vec()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, w: &WrappedDek) -> Option<Zeroizing<[u8; DEK_LEN]>> {
        let key = Self::key(w);
        let mut g = self.lock();
        let hit = match g.map.get(&key) {
            Some(e) if e.at.elapsed() <= self.ttl => Some(e.dek.clone()),
            Some(_) => {
                g.map.remove(&key);
                None
            }
            None => None,
        };
        if hit.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        hit
    }

    pub(super) fn put(&self, path: &str, w: &WrappedDek, dek: &Zeroizing<[u8; DEK_LEN]>) {
        if self.capacity == 0 {
            return;
        }
        let key = Self::key(w);
        let mut g = self.lock();
        while g.map.len() >= self.capacity {
            match g.order.pop_front() {
                Some(old) => {
                    g.map.remove(&old);
                }
                None => break,
            }
        }
        let entry = CacheEntry {
            dek: dek.clone(),
            path: path.into(),
            at: Instant::now(),
        };
        if g.map.insert(key.clone(), entry).is_none() {
            g.order.push_back(key);
        }
    }

    /// The entry for `w`, if fresh, without counting a hit or a miss.
    #[cfg(test)]
    fn peek(&self, w: &WrappedDek) -> Option<Zeroizing<[u8; DEK_LEN]>> {
        self.lock()
            .map
            .get(&Self::key(w))
            .filter(|e| e.at.elapsed() <= self.ttl)
            .map(|e| e.dek.clone())
    }

    /// After a re-wrap is stored: the DEK cached under its old wrapped form (if any) is now
    /// cached under the new one, so a hot secret stays a cache hit and no copy of the DEK is
    /// kept under a form that no longer exists. Nothing is added for a DEK that was not cached.
    pub fn rekey(&self, old: &WrappedDek, new: &WrappedDek) {
        let (old_key, new_key) = (Self::key(old), Self::key(new));
        let mut g = self.lock();
        let Some(entry) = g.map.remove(&old_key) else {
            return;
        };
        g.order.retain(|k| *k != old_key);
        if g.map.insert(new_key.clone(), entry).is_none() {
            g.order.push_back(new_key);
        }
    }

    /// Removes (and zeroizes) the entries past their TTL; returns how many.
    pub fn purge_expired(&self) -> usize {
        let ttl = self.ttl;
        self.lock().retain(|e| e.at.elapsed() <= ttl)
    }

    /// Removes (and zeroizes) the DEKs of every version of `path`; returns how many.
    pub fn purge_path(&self, path: &str) -> usize {
        self.lock().retain(|e| &*e.path != path)
    }

    /// Drops every entry (zeroizing them).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.order.clear();
    }

    /// Hit/miss counters and size.
    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            hits: g.hits,
            misses: g.misses,
            entries: g.map.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyhaven_hsm::KekId;

    fn w(b: u8) -> WrappedDek {
        WrappedDek {
            kek_id: KekId([b; 16]),
            iv: vec![b; 12],
            ciphertext: vec![b; 48],
        }
    }

    #[test]
    fn cache_is_bounded_and_expires() {
        let c = DekCache::new(2, Duration::from_millis(50));
        let dek = Zeroizing::new([7u8; DEK_LEN]);
        c.put("a", &w(1), &dek);
        c.put("a", &w(2), &dek);
        c.put("a", &w(3), &dek);
        assert_eq!(c.stats().entries, 2);
        assert!(c.get(&w(1)).is_none(), "oldest evicted");
        assert!(c.get(&w(3)).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get(&w(3)).is_none(), "expired");
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
    }

    #[test]
    fn expired_entries_are_swept_without_a_lookup() {
        let c = DekCache::new(8, Duration::from_millis(200));
        let dek = Zeroizing::new([7u8; DEK_LEN]);
        c.put("a", &w(1), &dek);
        std::thread::sleep(Duration::from_millis(250));
        c.put("b", &w(2), &dek);
        assert_eq!(c.purge_expired(), 1);
        assert_eq!(c.stats().entries, 1);
        assert!(c.peek(&w(2)).is_some(), "a fresh entry stays");
        // The eviction order forgot the swept entry: filling up evicts the live one only
        // when the cache is really full.
        assert_eq!(c.lock().order.len(), 1);
        assert_eq!(c.sweep_interval(), Duration::from_millis(100));
        assert_eq!(
            DekCache::new(1, Duration::from_secs(300)).sweep_interval(),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn purging_a_path_removes_every_version_of_it_and_nothing_else() {
        let c = DekCache::new(8, Duration::from_secs(60));
        let dek = Zeroizing::new([7u8; DEK_LEN]);
        c.put("shop/db", &w(1), &dek);
        c.put("shop/db", &w(2), &dek);
        c.put("shop/db2", &w(3), &dek);
        assert_eq!(c.purge_path("shop/db"), 2);
        assert!(c.peek(&w(1)).is_none() && c.peek(&w(2)).is_none());
        assert!(
            c.peek(&w(3)).is_some(),
            "another path (a prefix match) stays"
        );
        assert_eq!(c.purge_path("shop/db"), 0);
        // Rekeyed entries keep their path.
        c.rekey(&w(3), &w(4));
        assert_eq!(c.purge_path("shop/db2"), 1);
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn rekey_moves_a_cached_dek_and_adds_nothing_otherwise() {
        let c = DekCache::new(4, Duration::from_secs(60));
        let dek = Zeroizing::new([7u8; DEK_LEN]);
        c.put("a", &w(1), &dek);
        c.rekey(&w(1), &w(2));
        assert!(c.peek(&w(1)).is_none(), "the old form is gone");
        assert_eq!(c.peek(&w(2)).unwrap(), dek);
        c.rekey(&w(3), &w(4));
        assert!(c.peek(&w(4)).is_none(), "an uncached DEK is not added");
        assert_eq!(c.stats().entries, 1);
        assert_eq!(
            (c.stats().hits, c.stats().misses),
            (0, 0),
            "peek counts nothing"
        );
    }
}
