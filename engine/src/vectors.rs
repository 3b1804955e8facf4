//! Contiguous storage of one `vector(dim)` column, so an exact nearest-neighbour search
//! is one pass over a flat `f32` slab: no pointer chasing, no per-row allocation, and
//! a loop the compiler vectorises.
//!
//! Every row with a non-null vector owns a slot. A deleted row's slot goes on a free
//! list and is reused; slots never move, so a scan that yields and resumes by slot
//! number sees every row that exists for its whole duration exactly once.

use ahash::AHashMap;

use crate::key::Key;

/// The vectors of one column, by slot.
#[derive(Debug, Clone)]
pub struct VectorColumn {
    /// Position of the column in the table's schema.
    column: usize,
    dim: usize,
    /// `slot * dim ..` holds the slot's vector.
    data: Vec<f32>,
    /// The primary key owning each slot; `None` for a free slot.
    owners: Vec<Option<Key>>,
    slot_of: AHashMap<Key, u32>,
    free: Vec<u32>,
}

impl VectorColumn {
    pub fn new(column: usize, dim: usize) -> Self {
        VectorColumn {
            column,
            dim,
            data: Vec::new(),
            owners: Vec::new(),
            slot_of: AHashMap::new(),
            free: Vec::new(),
        }
    }

    pub fn column(&self) -> usize {
        self.column
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Slots in use or free: the range a scan walks.
    pub fn slots(&self) -> usize {
        self.owners.len()
    }

    /// The owner and vector of a slot, `None` if it is free.
    pub fn slot(&self, slot: usize) -> Option<(&Key, &[f32])> {
        let owner = self.owners.get(slot)?.as_ref()?;
        Some((owner, &self.data[slot * self.dim..(slot + 1) * self.dim]))
    }

    /// The live slots in `from..to` with their owners and vectors, in slot order.
    pub fn live_slots(&self, from: usize, to: usize) -> impl Iterator<Item = (&Key, &[f32])> + '_ {
        let to = to.min(self.owners.len());
        let from = from.min(to);
        self.owners[from..to]
            .iter()
            .zip(self.data[from * self.dim..to * self.dim].chunks_exact(self.dim))
            .filter_map(|(owner, v)| owner.as_ref().map(|k| (k, v)))
    }

    /// Sets (or with `None` clears) the vector of the row with primary key `key`.
    pub fn set(&mut self, key: &Key, vector: Option<&[f32]>) {
        match vector {
            Some(vector) => self.slot_for(key).copy_from_slice(vector),
            None => self.remove(key),
        }
    }

    /// The same from a row's little-endian bytes (`ValueRef::Vector`).
    pub fn set_le_bytes(&mut self, key: &Key, vector: Option<&[u8]>) {
        match vector {
            Some(bytes) => {
                let slot = self.slot_for(key);
                debug_assert_eq!(
                    bytes.len(),
                    4 * slot.len(),
                    "rows are validated against the schema"
                );
                for (x, b) in slot.iter_mut().zip(crate::row::ValueRef::floats(bytes)) {
                    *x = b;
                }
            }
            None => self.remove(key),
        }
    }

    /// The floats of `key`'s slot, taking a free or new slot if it has none.
    fn slot_for(&mut self, key: &Key) -> &mut [f32] {
        let slot = match self.slot_of.get(key) {
            Some(&slot) => slot as usize,
            None => {
                let slot = match self.free.pop() {
                    Some(slot) => slot as usize,
                    None => {
                        self.owners.push(None);
                        self.data.resize(self.data.len() + self.dim, 0.0);
                        self.owners.len() - 1
                    }
                };
                self.owners[slot] = Some(key.clone());
                self.slot_of.insert(key.clone(), slot as u32);
                slot
            }
        };
        &mut self.data[slot * self.dim..(slot + 1) * self.dim]
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.slot_of.remove(key) {
            self.owners[slot as usize] = None;
            self.free.push(slot);
        }
    }

    /// The vector of the row with primary key `key`, if it has one.
    pub fn get(&self, key: &Key) -> Option<&[f32]> {
        let slot = *self.slot_of.get(key)? as usize;
        Some(&self.data[slot * self.dim..(slot + 1) * self.dim])
    }

    /// Vectors stored.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }
}

/// Squared Euclidean distance. Eight independent accumulators let the compiler keep
/// the loop in SIMD registers without reassociating floating-point sums itself.
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += (x - y) * (x - y);
    }
    sum
}

/// Dot product, the same way.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += x * y;
    }
    sum
}

/// Cosine distance `1 - cos(a, b)`; `None` when either vector is all zeroes (the
/// angle is undefined).
pub fn cosine_distance(a: &[f32], b: &[f32]) -> Option<f32> {
    let norms = dot(a, a) * dot(b, b);
    (norms > 0.0).then(|| 1.0 - dot(a, b) / norms.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> Key {
        Key::new(vec![n])
    }

    #[test]
    fn slots_are_reused_and_never_move() {
        let mut col = VectorColumn::new(1, 2);
        col.set(&key(1), Some(&[1.0, 1.0]));
        col.set(&key(2), Some(&[2.0, 2.0]));
        col.set(&key(3), Some(&[3.0, 3.0]));
        col.remove(&key(2));
        assert_eq!(col.len(), 2);
        assert!(col.slot(1).is_none());
        assert_eq!(col.live_slots(0, 10).count(), 2);
        assert_eq!(
            col.slot(2).map(|(k, v)| (k.clone(), v.to_vec())),
            Some((key(3), vec![3.0, 3.0]))
        );
        col.set(&key(4), Some(&[4.0, 4.0]));
        assert_eq!(col.slots(), 3, "the free slot was reused");
        assert_eq!(col.slot(1).map(|(k, _)| k.clone()), Some(key(4)));
        col.set(&key(4), Some(&[5.0, 5.0]));
        assert_eq!(col.slot(1).map(|(_, v)| v.to_vec()), Some(vec![5.0, 5.0]));
        col.set(&key(4), None);
        assert_eq!(col.len(), 2);
    }

    proptest! {
        #[test]
        fn kernels_match_a_plain_f64_computation(
            pairs in proptest::collection::vec((-100.0f32..100.0, -100.0f32..100.0), 1..70)
        ) {
            let a: Vec<f32> = pairs.iter().map(|p| p.0).collect();
            let b: Vec<f32> = pairs.iter().map(|p| p.1).collect();
            let l2: f64 = pairs.iter().map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
            let d: f64 = pairs.iter().map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            let tolerance = |want: f64| 1e-3 * (1.0 + want.abs());
            prop_assert!((f64::from(l2_squared(&a, &b)) - l2).abs() <= tolerance(l2));
            prop_assert!((f64::from(dot(&a, &b)) - d).abs() <= tolerance(d) + 1e-2);
        }
    }

    #[test]
    fn cosine_distance_is_undefined_for_a_zero_vector() {
        assert_eq!(cosine_distance(&[0.0, 0.0], &[1.0, 0.0]), None);
        let d = cosine_distance(&[1.0, 0.0], &[0.0, 2.0]).expect("defined");
        assert!((d - 1.0).abs() < 1e-6);
        let d = cosine_distance(&[1.0, 1.0], &[2.0, 2.0]).expect("defined");
        assert!(d.abs() < 1e-6);
    }
}
