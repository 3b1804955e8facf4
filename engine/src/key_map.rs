//! The ordered map a table keeps its rows in: a B+ tree from [`Key`] to a value whose
//! nodes hold up to 64 entries in plain vectors (keys side by side, values side by side).
//!
//! Why not the standard library's `BTreeMap`: `oc-bench memory` found about 110 bytes of
//! its B-tree per stored row. Its nodes hold 11 entries and a full node splits in the
//! middle wherever the new key goes, so keys that arrive in order (the usual primary
//! key: an id, a timestamp) leave every node about half full. Here a full node that
//! overflows at its last (or first) position keeps its old entries together and starts
//! a new node beside them, so rows written in key order, or in reverse order, fill their
//! nodes; an overflow anywhere else splits in the middle. Wider nodes also mean fewer
//! levels: 4 instead of 6 or 7 for a million keys, each level a likely cache miss.
//!
//! Invariants ([`KeyMap::check`] asserts them in tests): keys ascend across each node
//! and the whole tree; an inner node's key `i` separates child `i` (keys below it) from
//! child `i + 1` (keys at or above it); every leaf is at the same depth; every inner
//! node has at least two children and every leaf but a root one at least one entry. A
//! removal that leaves a node under a quarter full joins it with a neighbour (and splits
//! the join in the middle if it overflows), so deletes do not leave a sparse tree.

use std::ops::Bound;

use crate::key::Key;

/// Most entries in a leaf.
const LEAF_CAPACITY: usize = 64;
/// Most children of an inner node.
const INNER_CAPACITY: usize = 64;
/// A leaf below this many entries after a removal is joined with a neighbour.
const LEAF_MINIMUM: usize = LEAF_CAPACITY / 4;
/// An inner node below this many children after a removal is joined with a neighbour.
const INNER_MINIMUM: usize = INNER_CAPACITY / 4;

/// An ordered map from [`Key`] to `V` (see the module doc).
#[derive(Clone, Debug)]
pub struct KeyMap<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Clone, Debug)]
enum Node<V> {
    Leaf(Leaf<V>),
    Inner(Inner<V>),
}

#[derive(Clone, Debug)]
struct Leaf<V> {
    keys: Vec<Key>,
    values: Vec<V>,
}

/// `keys.len() + 1 == children.len()`.
#[derive(Clone, Debug)]
struct Inner<V> {
    keys: Vec<Key>,
    children: Vec<Node<V>>,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap::new()
    }
}

/// Makes room for one more element in a vector that holds at most `most` at rest and
/// one more for a moment (before its node splits), growing by doubling but never past
/// `most + 1`: a node's vectors stay within their capacity however they were built.
fn room_for_one<T>(v: &mut Vec<T>, most: usize) {
    if v.len() == v.capacity() {
        let target = (v.len() * 2).clamp(4, most + 1);
        v.reserve_exact(target.max(v.len() + 1) - v.len());
    }
}

/// A vector for the right half of a split: the elements of `from` at `at..`, with room
/// for a full node.
fn split_off<T>(from: &mut Vec<T>, at: usize, most: usize) -> Vec<T> {
    let mut right = Vec::with_capacity(most + 1);
    right.extend(from.drain(at..));
    right
}

impl<V> Node<V> {
    /// Entries of a leaf, children of an inner node.
    fn width(&self) -> usize {
        match self {
            Node::Leaf(leaf) => leaf.keys.len(),
            Node::Inner(inner) => inner.children.len(),
        }
    }

    fn is_underfull(&self) -> bool {
        match self {
            Node::Leaf(leaf) => leaf.keys.len() < LEAF_MINIMUM,
            Node::Inner(inner) => inner.children.len() < INNER_MINIMUM,
        }
    }

    /// Splits an overflowing node (one more than its capacity) in two, given where the
    /// entry or child that overflowed it went; returns the separator and the right half.
    #[expect(clippy::expect_used, reason = "an overflowing inner node has keys")]
    fn split(&mut self, inserted_at: usize) -> (Key, Node<V>) {
        match self {
            Node::Leaf(leaf) => {
                let len = leaf.keys.len();
                let at = if inserted_at == len - 1 {
                    len - 1
                } else if inserted_at == 0 {
                    1
                } else {
                    len / 2
                };
                let keys = split_off(&mut leaf.keys, at, LEAF_CAPACITY);
                let values = split_off(&mut leaf.values, at, LEAF_CAPACITY);
                (keys[0].clone(), Node::Leaf(Leaf { keys, values }))
            }
            Node::Inner(inner) => {
                // Each side keeps at least two children.
                let len = inner.children.len();
                let at = if inserted_at == len - 1 {
                    len - 2
                } else if inserted_at == 1 {
                    2
                } else {
                    len / 2
                };
                let children = split_off(&mut inner.children, at, INNER_CAPACITY);
                let keys = split_off(&mut inner.keys, at, INNER_CAPACITY);
                let separator = inner.keys.pop().expect("a split inner node keeps a key");
                (separator, Node::Inner(Inner { keys, children }))
            }
        }
    }

    /// Whether the node holds one more than its capacity.
    fn overflows(&self) -> bool {
        match self {
            Node::Leaf(leaf) => leaf.keys.len() > LEAF_CAPACITY,
            Node::Inner(inner) => inner.children.len() > INNER_CAPACITY,
        }
    }
}

impl<V> Inner<V> {
    /// The child whose range holds `key`.
    fn child_for(&self, key: &Key) -> usize {
        prefetch(&self.keys);
        self.keys.partition_point(|separator| separator <= key)
    }

    /// Joins child `left + 1` into child `left`, or, when the two hold more than one
    /// node can, shares their entries evenly between them.
    fn join_children(&mut self, left: usize) {
        let separator = self.keys.remove(left);
        let right = self.children.remove(left + 1);
        let node = &mut self.children[left];
        match (node, right) {
            (Node::Leaf(l), Node::Leaf(r)) => {
                l.keys.extend(r.keys);
                l.values.extend(r.values);
            }
            (Node::Inner(l), Node::Inner(r)) => {
                l.keys.push(separator);
                l.keys.extend(r.keys);
                l.children.extend(r.children);
            }
            _ => unreachable!("every leaf is at the same depth"),
        }
        let node = &mut self.children[left];
        if node.width() > node_capacity(node) {
            let middle = node.width() / 2;
            let (separator, right) = node.split(middle);
            self.keys.insert(left, separator);
            self.children.insert(left + 1, right);
        }
        shrink(&mut self.children[left]);
    }

    /// Rebalances child `i` after a removal left it under its minimum.
    fn repair(&mut self, i: usize) {
        if self.children.len() < 2 {
            return;
        }
        let left = if i + 1 < self.children.len() {
            i
        } else {
            i - 1
        };
        self.join_children(left);
    }
}

/// Where `key` is in a node's keys, or would go.
fn search(keys: &[Key], key: &Key) -> Result<usize, usize> {
    prefetch(keys);
    keys.binary_search(key)
}

/// Asks the CPU for every cache line of `keys` at once. A binary search over a node's
/// keys is a chain of dependent loads, each a likely cache miss in a large table (in
/// `perf` of `oc-bench engine` at 256 writers, 74 % of the insert's samples were on one
/// load in that search); requested together, the misses overlap.
#[inline]
fn prefetch(keys: &[Key]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let start = keys.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(keys);
        let mut offset = 0;
        while offset < bytes {
            // SAFETY: the address is inside `keys`; a prefetch only hints, it neither
            // faults nor changes memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
            offset += LINE;
        }
        if bytes > 0 {
            // SAFETY: as above: the last byte of `keys`, whose line the steps above
            // miss when `keys` does not start on a line.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(bytes - 1)) };
        }
    }
}

fn node_capacity<V>(node: &Node<V>) -> usize {
    match node {
        Node::Leaf(_) => LEAF_CAPACITY,
        Node::Inner(_) => INNER_CAPACITY,
    }
}

/// Gives back what a join grew a node's vectors to beyond a full node.
fn shrink<V>(node: &mut Node<V>) {
    match node {
        Node::Leaf(leaf) => {
            leaf.keys.shrink_to(LEAF_CAPACITY + 1);
            leaf.values.shrink_to(LEAF_CAPACITY + 1);
        }
        Node::Inner(inner) => {
            inner.keys.shrink_to(INNER_CAPACITY + 1);
            inner.children.shrink_to(INNER_CAPACITY + 1);
        }
    }
}

impl<V> KeyMap<V> {
    pub fn new() -> Self {
        KeyMap {
            root: Node::Leaf(Leaf {
                keys: Vec::new(),
                values: Vec::new(),
            }),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        let mut node = &self.root;
        loop {
            match node {
                Node::Inner(inner) => node = &inner.children[inner.child_for(key)],
                Node::Leaf(leaf) => {
                    return search(&leaf.keys, key).ok().map(|i| &leaf.values[i]);
                }
            }
        }
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// Inserts `value` at `key`, returning the value it replaces. `before` sees the key,
    /// the value there now (if any) and the new one, just before the new one goes in:
    /// a caller keeping other structures in step with the map does it in the same walk.
    pub fn upsert(
        &mut self,
        key: Key,
        value: V,
        before: impl FnOnce(&Key, Option<&V>, &V),
    ) -> Option<V> {
        let (replaced, split) = insert_into(&mut self.root, key, value, before);
        if let Some((separator, right)) = split {
            let left = std::mem::replace(
                &mut self.root,
                Node::Inner(Inner {
                    keys: Vec::new(),
                    children: Vec::new(),
                }),
            );
            let mut keys = Vec::with_capacity(INNER_CAPACITY + 1);
            keys.push(separator);
            let mut children = Vec::with_capacity(INNER_CAPACITY + 1);
            children.push(left);
            children.push(right);
            self.root = Node::Inner(Inner { keys, children });
        }
        if replaced.is_none() {
            self.len += 1;
        }
        replaced
    }

    pub fn insert(&mut self, key: Key, value: V) -> Option<V> {
        self.upsert(key, value, |_, _, _| {})
    }

    #[expect(clippy::expect_used, reason = "the loop's condition")]
    pub fn remove(&mut self, key: &Key) -> Option<V> {
        let removed = remove_from(&mut self.root, key)?;
        self.len -= 1;
        while let Node::Inner(inner) = &mut self.root {
            if inner.children.len() > 1 {
                break;
            }
            let only = inner.children.pop().expect("an inner node has a child");
            self.root = only;
        }
        Some(removed)
    }

    /// Entries in key order from `start` on.
    pub fn range_from(&self, start: Bound<&Key>) -> Iter<'_, V> {
        let mut stack = Vec::new();
        let mut node = &self.root;
        loop {
            match node {
                Node::Inner(inner) => {
                    let i = match start {
                        Bound::Included(k) | Bound::Excluded(k) => inner.child_for(k),
                        Bound::Unbounded => 0,
                    };
                    stack.push((inner.children.as_slice(), i + 1));
                    node = &inner.children[i];
                }
                Node::Leaf(leaf) => {
                    let at = match start {
                        Bound::Included(k) => leaf.keys.partition_point(|x| x < k),
                        Bound::Excluded(k) => leaf.keys.partition_point(|x| x <= k),
                        Bound::Unbounded => 0,
                    };
                    return Iter {
                        stack,
                        keys: &leaf.keys[at..],
                        values: &leaf.values[at..],
                    };
                }
            }
        }
    }

    pub fn iter(&self) -> Iter<'_, V> {
        self.range_from(Bound::Unbounded)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub fn last_key(&self) -> Option<&Key> {
        let mut node = &self.root;
        loop {
            match node {
                Node::Inner(inner) => node = inner.children.last()?,
                Node::Leaf(leaf) => return leaf.keys.last(),
            }
        }
    }

    /// Asserts the invariants in the module doc; returns the depth.
    #[cfg(test)]
    fn check(&self) -> usize {
        fn walk<V>(
            node: &Node<V>,
            low: Option<&Key>,
            high: Option<&Key>,
            root: bool,
        ) -> (usize, usize) {
            let in_range = |k: &Key| low.is_none_or(|l| l <= k) && high.is_none_or(|h| k < h);
            match node {
                Node::Leaf(leaf) => {
                    assert_eq!(leaf.keys.len(), leaf.values.len());
                    assert!(leaf.keys.len() <= LEAF_CAPACITY);
                    assert!(root || !leaf.keys.is_empty(), "a non-root leaf is empty");
                    assert!(leaf.keys.capacity() <= LEAF_CAPACITY + 1);
                    assert!(leaf.keys.windows(2).all(|w| w[0] < w[1]));
                    assert!(leaf.keys.iter().all(in_range));
                    (1, leaf.keys.len())
                }
                Node::Inner(inner) => {
                    assert_eq!(inner.keys.len() + 1, inner.children.len());
                    assert!(inner.children.len() >= 2, "an inner node has one child");
                    assert!(inner.children.len() <= INNER_CAPACITY);
                    assert!(inner.children.capacity() <= INNER_CAPACITY + 1);
                    assert!(inner.keys.windows(2).all(|w| w[0] < w[1]));
                    assert!(inner.keys.iter().all(in_range));
                    let mut depth = None;
                    let mut len = 0;
                    for (i, child) in inner.children.iter().enumerate() {
                        let lo = if i == 0 {
                            low
                        } else {
                            Some(&inner.keys[i - 1])
                        };
                        let hi = inner.keys.get(i).or(high);
                        let (d, n) = walk(child, lo, hi, false);
                        assert!(
                            depth.is_none_or(|depth| depth == d),
                            "leaves at different depths"
                        );
                        depth = Some(d);
                        len += n;
                    }
                    (depth.unwrap_or(0) + 1, len)
                }
            }
        }
        let (depth, len) = walk(&self.root, None, None, true);
        assert_eq!(len, self.len);
        depth
    }

    /// (leaves, entries): how full the leaves are.
    #[cfg(test)]
    fn leaf_fill(&self) -> (usize, usize) {
        fn walk<V>(node: &Node<V>, out: &mut (usize, usize)) {
            match node {
                Node::Leaf(leaf) => {
                    out.0 += 1;
                    out.1 += leaf.keys.len();
                }
                Node::Inner(inner) => inner.children.iter().for_each(|c| walk(c, out)),
            }
        }
        let mut out = (0, 0);
        walk(&self.root, &mut out);
        out
    }
}

/// Inserts into the subtree at `node`; returns the replaced value and, when the node
/// overflowed, the separator and new right sibling its parent must take.
fn insert_into<V>(
    node: &mut Node<V>,
    key: Key,
    value: V,
    before: impl FnOnce(&Key, Option<&V>, &V),
) -> (Option<V>, Option<(Key, Node<V>)>) {
    let inserted_at = match node {
        Node::Leaf(leaf) => match search(&leaf.keys, &key) {
            Ok(i) => {
                before(&leaf.keys[i], Some(&leaf.values[i]), &value);
                return (Some(std::mem::replace(&mut leaf.values[i], value)), None);
            }
            Err(i) => {
                before(&key, None, &value);
                room_for_one(&mut leaf.keys, LEAF_CAPACITY);
                room_for_one(&mut leaf.values, LEAF_CAPACITY);
                leaf.keys.insert(i, key);
                leaf.values.insert(i, value);
                i
            }
        },
        Node::Inner(inner) => {
            let i = inner.child_for(&key);
            let (replaced, split) = insert_into(&mut inner.children[i], key, value, before);
            let Some((separator, right)) = split else {
                return (replaced, None);
            };
            room_for_one(&mut inner.keys, INNER_CAPACITY);
            room_for_one(&mut inner.children, INNER_CAPACITY);
            inner.keys.insert(i, separator);
            inner.children.insert(i + 1, right);
            i + 1
        }
    };
    if node.overflows() {
        (None, Some(node.split(inserted_at)))
    } else {
        (None, None)
    }
}

fn remove_from<V>(node: &mut Node<V>, key: &Key) -> Option<V> {
    match node {
        Node::Leaf(leaf) => {
            let i = search(&leaf.keys, key).ok()?;
            leaf.keys.remove(i);
            Some(leaf.values.remove(i))
        }
        Node::Inner(inner) => {
            let i = inner.child_for(key);
            let removed = remove_from(&mut inner.children[i], key)?;
            if inner.children[i].is_underfull() {
                inner.repair(i);
            }
            Some(removed)
        }
    }
}

/// Entries in key order, from a [`KeyMap`].
pub struct Iter<'a, V> {
    /// Per inner level above the current leaf: its children and the next one to visit.
    stack: Vec<(&'a [Node<V>], usize)>,
    keys: &'a [Key],
    values: &'a [V],
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a Key, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let (Some((key, keys)), Some((value, values))) =
                (self.keys.split_first(), self.values.split_first())
            {
                self.keys = keys;
                self.values = values;
                return Some((key, value));
            }
            // The leaf is done: the next one is the leftmost leaf of the nearest
            // ancestor's next child.
            let mut node = loop {
                let (children, next) = self.stack.last_mut()?;
                if let Some(child) = children.get(*next) {
                    *next += 1;
                    break child;
                }
                self.stack.pop();
            };
            loop {
                match node {
                    Node::Inner(inner) => {
                        self.stack.push((inner.children.as_slice(), 1));
                        node = &inner.children[0];
                    }
                    Node::Leaf(leaf) => {
                        self.keys = &leaf.keys;
                        self.values = &leaf.values;
                        break;
                    }
                }
            }
        }
    }
}

impl<'a, V> IntoIterator for &'a KeyMap<V> {
    type Item = (&'a Key, &'a V);
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Iter<'a, V> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn key(n: u32) -> Key {
        Key::from_slice(&n.to_be_bytes())
    }

    /// The map against the standard library's, after each step of `ops`.
    fn agrees(ops: &[(bool, u32)], check_every: usize) {
        let mut map = KeyMap::new();
        let mut model = BTreeMap::new();
        for (step, &(insert, k)) in ops.iter().enumerate() {
            if insert {
                let mut seen = None;
                let old = map.upsert(key(k), step, |_, old, new| {
                    seen = Some((old.copied(), *new))
                });
                assert_eq!(seen, Some((model.get(&k).copied(), step)));
                assert_eq!(old, model.insert(k, step));
            } else {
                assert_eq!(map.remove(&key(k)), model.remove(&k));
            }
            if step % check_every == 0 {
                map.check();
            }
        }
        map.check();
        assert_eq!(map.len(), model.len());
        let all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let expected: Vec<_> = model.iter().map(|(k, v)| (key(*k), *v)).collect();
        assert_eq!(all, expected);
        assert_eq!(
            map.last_key(),
            model.keys().next_back().map(|k| key(*k)).as_ref()
        );
        for probe in (0..=ops.len() as u32 + 2).step_by(7) {
            assert_eq!(map.get(&key(probe)), model.get(&probe));
            let from: Vec<_> = map
                .range_from(Bound::Included(&key(probe)))
                .map(|(_, v)| *v)
                .take(100)
                .collect();
            let expected: Vec<_> = model.range(probe..).map(|(_, v)| *v).take(100).collect();
            assert_eq!(from, expected, "from {probe} included");
            let after: Vec<_> = map
                .range_from(Bound::Excluded(&key(probe)))
                .map(|(_, v)| *v)
                .take(100)
                .collect();
            let expected: Vec<_> = model
                .range((Bound::Excluded(probe), Bound::Unbounded))
                .map(|(_, v)| *v)
                .take(100)
                .collect();
            assert_eq!(after, expected, "after {probe}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn agrees_with_the_standard_map(
            ops in (0.2f64..0.9).prop_flat_map(|inserts| {
                prop::collection::vec((prop::bool::weighted(inserts), 0u32..3000), 0..6000)
            })
        ) {
            agrees(&ops, 97);
        }
    }

    #[test]
    fn keys_in_order_or_in_reverse_fill_their_leaves() {
        for reverse in [false, true] {
            let n = 100_000u32;
            let mut map = KeyMap::new();
            for i in 0..n {
                let k = if reverse { n - i } else { i };
                map.insert(key(k), ());
            }
            let depth = map.check();
            let (leaves, entries) = map.leaf_fill();
            assert_eq!(entries, n as usize);
            // Every leaf but one at each end is full.
            assert!(
                leaves <= (n as usize).div_ceil(LEAF_CAPACITY) + 2,
                "{leaves} leaves, reverse {reverse}"
            );
            assert!(depth <= 4, "depth {depth}");
        }
    }

    #[test]
    fn random_keys_fill_their_leaves_more_than_half() {
        let mut map = KeyMap::new();
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..100_000 {
            // xorshift: a fixed, well-spread sequence.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            map.insert(key(x), ());
        }
        map.check();
        let (leaves, entries) = map.leaf_fill();
        assert!(
            entries * 100 / (leaves * LEAF_CAPACITY) >= 60,
            "{entries} in {leaves} leaves"
        );
    }

    #[test]
    fn removing_most_keys_keeps_the_tree_dense() {
        let n = 50_000u32;
        let mut map = KeyMap::new();
        for i in 0..n {
            map.insert(key(i), i);
        }
        // Every key but each tenth, in a shuffled order, then the rest.
        let mut doomed: Vec<u32> = (0..n).filter(|i| i % 10 != 0).collect();
        let mut x = 0x2545_f491_u32;
        for i in (1..doomed.len()).rev() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            doomed.swap(i, x as usize % (i + 1));
        }
        for i in doomed {
            assert_eq!(map.remove(&key(i)), Some(i));
        }
        map.check();
        let (leaves, entries) = map.leaf_fill();
        assert_eq!(entries, 5_000);
        assert!(
            entries >= leaves * LEAF_MINIMUM,
            "{entries} in {leaves} leaves"
        );
        for i in (0..n).step_by(10) {
            assert_eq!(map.remove(&key(i)), Some(i));
        }
        assert_eq!(map.check(), 1);
        assert!(map.is_empty());
        assert_eq!(map.iter().count(), 0);
        assert_eq!(map.last_key(), None);
    }
}
