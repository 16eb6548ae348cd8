//! The request slab: live transfer handles, with no fixed cap.
//!
//! A handle id packs a slab index (low 32 bits) with a generation stamp (high
//! 32 bits, never 0), so a stale or forged id is refused instead of reaching
//! another request that reuses the slot.

use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use slab::Slab;

/// Slab of values addressed by generation-stamped ids.
#[derive(Debug)]
pub struct RequestSlab<T> {
    slots: Mutex<Slab<(u32, T)>>,
    generation: AtomicU32,
}

impl<T> Default for RequestSlab<T> {
    fn default() -> Self {
        RequestSlab {
            slots: Mutex::new(Slab::new()),
            generation: AtomicU32::new(0),
        }
    }
}

impl<T: Clone> RequestSlab<T> {
    /// Stores a value and returns its id (never 0).
    pub fn insert(&self, value: T) -> u64 {
        let generation = loop {
            let g = self
                .generation
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if g != 0 {
                break g;
            }
        };
        let index = self.slots.lock().insert((generation, value));
        let index = u32::try_from(index).expect("fewer than 2^32 live requests");
        (u64::from(generation) << 32) | u64::from(index)
    }

    /// The value under `id`, if it is live.
    pub fn get(&self, id: u64) -> Option<T> {
        let (generation, index) = split(id);
        match self.slots.lock().get(index) {
            Some((g, v)) if *g == generation => Some(v.clone()),
            _ => None,
        }
    }

    /// Removes and returns the value under `id`, if it is live.
    pub fn remove(&self, id: u64) -> Option<T> {
        let (generation, index) = split(id);
        let mut slots = self.slots.lock();
        match slots.get(index) {
            Some((g, _)) if *g == generation => Some(slots.remove(index).1),
            _ => None,
        }
    }

    /// Removes every value (used at engine teardown).
    pub fn drain(&self) -> Vec<T> {
        self.slots.lock().drain().map(|(_, v)| v).collect()
    }

    /// Number of live values.
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    /// True when no value is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn split(id: u64) -> (u32, usize) {
    ((id >> 32) as u32, (id & 0xffff_ffff) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_nonzero_and_stale_ids_are_refused() {
        let slab = RequestSlab::default();
        let a = slab.insert("a");
        assert_ne!(a, 0);
        assert_eq!(slab.get(a), Some("a"));
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        // Same slot, new generation: the old id must not reach "b".
        assert_eq!(a & 0xffff_ffff, b & 0xffff_ffff);
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get(b), Some("b"));
        assert_eq!(slab.get(0), None);
        assert_eq!(slab.get(u64::MAX), None);
    }

    #[test]
    fn has_no_fixed_cap() {
        let slab = RequestSlab::default();
        let ids: Vec<u64> = (0..100_000).map(|i| slab.insert(i)).collect();
        assert_eq!(slab.len(), 100_000);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(slab.get(*id), Some(i));
        }
        for id in ids {
            slab.remove(id).unwrap();
        }
        assert!(slab.is_empty());
    }

    #[test]
    fn concurrent_inserts_get_distinct_ids() {
        let slab = std::sync::Arc::new(RequestSlab::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let slab = slab.clone();
                std::thread::spawn(move || {
                    (0..2000)
                        .map(|i| slab.insert(t * 10_000 + i))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 8000);
    }
}
