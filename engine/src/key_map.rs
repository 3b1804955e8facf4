//! The ordered map a table keeps its rows in: a B+ tree from [`Key`] to a value whose
//! nodes hold up to 64 entries in plain vectors (keys side by side, values side by side).
//!
//! Why not the standard library's `BTreeMap`: `oc-bench memory` found about 110 bytes of
//! its B-tree per stored row. Its nodes hold 11 entries and a full node splits in the
//! middle wherever the new key goes, so keys that arrive in order (the usual primary
//! key: an id, a timestamp) leave every node about half full. Here a node on the tree's
//! right edge that overflows at its last position keeps its old entries together and
//! starts a new node beside them, and likewise on the left edge at the first position,
//! so rows written in key order, or in reverse order, fill their nodes. Any other
//! overflowing leaf first moves entries to a neighbour with room, and only splits in
//! the middle when neither has any: keys in random order fill leaves about 86 % (about
//! 69 % when splitting at once). Wider nodes also mean fewer levels: 4 instead of 6 or
//! 7 for a million keys, each level a likely cache miss.
//!
//! Invariants ([`KeyMap::check`] checks them; a table's integrity check runs it): keys
//! ascend across the whole tree; an inner node's key `i` separates child `i` (keys below
//! it) from child `i + 1` (keys at or above it); every leaf is at the same depth; every
//! inner node has at least two children and every leaf but a root one at least one
//! entry; and every node off the tree's leftmost and rightmost paths holds at least a
//! quarter of its capacity (the edges may hold less: a new node there starts with one
//! entry or two children). A removal that leaves a node under a quarter full joins it
//! with a neighbour (and splits the join in the middle if it overflows).

use std::ops::Bound;

use crate::key::Key;

/// Most entries in a leaf and most children of an inner node.
const CAPACITY: usize = 64;

/// How wide a tree's nodes are: [`CAPACITY`] in a table; tests build narrow trees too,
/// so that a few thousand keys make a deep one.
#[derive(Clone, Copy, Debug)]
struct Shape {
    leaf: usize,
    inner: usize,
}

impl Shape {
    /// A leaf below this many entries after a removal is joined with a neighbour.
    fn leaf_minimum(self) -> usize {
        (self.leaf / 4).max(1)
    }

    /// An inner node below this many children after a removal is joined with a
    /// neighbour; one child is always too few.
    fn inner_minimum(self) -> usize {
        (self.inner / 4).max(2)
    }

    fn capacity<V>(self, node: &Node<V>) -> usize {
        match node {
            Node::Leaf(_) => self.leaf,
            Node::Inner(_) => self.inner,
        }
    }

    fn minimum<V>(self, node: &Node<V>) -> usize {
        match node {
            Node::Leaf(_) => self.leaf_minimum(),
            Node::Inner(_) => self.inner_minimum(),
        }
    }
}

/// Whether a node is on the tree's leftmost or rightmost path: only there does an
/// overflow at the node's first or last position mean keys arriving in order.
#[derive(Clone, Copy, Debug)]
struct Edges {
    leftmost: bool,
    rightmost: bool,
}

impl Edges {
    const ROOT: Edges = Edges {
        leftmost: true,
        rightmost: true,
    };
    /// For a split that must be in the middle whatever the position.
    const NONE: Edges = Edges {
        leftmost: false,
        rightmost: false,
    };

    /// The edges of child `i` of `children`.
    fn of_child(self, i: usize, children: usize) -> Edges {
        Edges {
            leftmost: self.leftmost && i == 0,
            rightmost: self.rightmost && i + 1 == children,
        }
    }
}

/// An ordered map from [`Key`] to `V` (see the module doc).
#[derive(Clone, Debug)]
pub struct KeyMap<V> {
    root: Node<V>,
    len: usize,
    shape: Shape,
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

    /// Splits an overflowing node (one more than its capacity) in two, given where the
    /// entry or child that overflowed it went and whether the node is on an edge of the
    /// tree; returns the separator and the right half.
    ///
    /// At the tree's right edge an overflow at the last position keeps the old entries
    /// together and gives the new one a node of its own (each side of an inner node
    /// keeps at least two children), and likewise at the left edge and the first
    /// position: keys arriving in order then fill their nodes. Anywhere else the node
    /// splits in the middle. Off the edges that rule would be wrong: keys arriving in
    /// reverse order just above a full leaf would land last in it every time, and each
    /// would get a leaf of its own.
    #[expect(clippy::expect_used, reason = "an overflowing inner node has keys")]
    fn split(&mut self, inserted_at: usize, edges: Edges, shape: Shape) -> (Key, Node<V>) {
        let len = self.width();
        let at = match self {
            Node::Leaf(_) if edges.rightmost && inserted_at == len - 1 => len - 1,
            Node::Leaf(_) if edges.leftmost && inserted_at == 0 => 1,
            Node::Inner(_) if edges.rightmost && inserted_at == len - 1 => len - 2,
            Node::Inner(_) if edges.leftmost && inserted_at == 1 => 2,
            _ => len / 2,
        };
        match self {
            Node::Leaf(leaf) => {
                let keys = split_off(&mut leaf.keys, at, shape.leaf);
                let values = split_off(&mut leaf.values, at, shape.leaf);
                (keys[0].clone(), Node::Leaf(Leaf { keys, values }))
            }
            Node::Inner(inner) => {
                let children = split_off(&mut inner.children, at, shape.inner);
                let keys = split_off(&mut inner.keys, at, shape.inner);
                let separator = inner.keys.pop().expect("a split inner node keeps a key");
                (separator, Node::Inner(Inner { keys, children }))
            }
        }
    }

    /// Gives back what a join grew the node's vectors to beyond a full node.
    fn shrink(&mut self, shape: Shape) {
        match self {
            Node::Leaf(leaf) => {
                leaf.keys.shrink_to(shape.leaf + 1);
                leaf.values.shrink_to(shape.leaf + 1);
            }
            Node::Inner(inner) => {
                inner.keys.shrink_to(shape.inner + 1);
                inner.children.shrink_to(shape.inner + 1);
            }
        }
    }
}

impl<V> Inner<V> {
    /// The child whose range holds `key`.
    fn child_for(&self, key: &Key) -> usize {
        prefetch(&self.keys);
        self.keys.partition_point(|separator| separator <= key)
    }

    /// Makes room in leaf `i`, overflowing with a new entry at `at`, by moving entries
    /// to a neighbour that has room (the right one first), so that the two hold
    /// about as many; false when it is not a leaf, neither neighbour has room, or the
    /// entry is at the tree's edge in the direction keys arriving in order take (the
    /// leaf is then split so that the next ones fill a new leaf). Under keys in random
    /// order this fills leaves fuller than splitting at once: `oc-bench memory
    /// --shuffled`.
    fn shift_to_a_sibling(&mut self, i: usize, at: usize, edges: Edges, shape: Shape) -> bool {
        let Node::Leaf(leaf) = &self.children[i] else {
            return false;
        };
        let width = leaf.keys.len();
        if (edges.rightmost && at == width - 1) || (edges.leftmost && at == 0) {
            return false;
        }
        let has_room = |node: &Node<V>| node.width() < shape.leaf;
        if self.children.get(i + 1).is_some_and(has_room) {
            let (left, right) = self.children.split_at_mut(i + 1);
            if let (Node::Leaf(l), Node::Leaf(r)) = (&mut left[i], &mut right[0]) {
                let total = l.keys.len() + r.keys.len();
                let keep = total.div_ceil(2);
                reserve_for(&mut r.keys, total - keep);
                reserve_for(&mut r.values, total - keep);
                r.keys.splice(0..0, l.keys.drain(keep..));
                r.values.splice(0..0, l.values.drain(keep..));
                self.keys[i] = r.keys[0].clone();
                return true;
            }
        }
        if i > 0 && has_room(&self.children[i - 1]) {
            let (left, right) = self.children.split_at_mut(i);
            if let (Node::Leaf(l), Node::Leaf(c)) = (&mut left[i - 1], &mut right[0]) {
                let total = l.keys.len() + c.keys.len();
                let moved = c.keys.len() - total / 2;
                reserve_for(&mut l.keys, total - total / 2);
                reserve_for(&mut l.values, total - total / 2);
                l.keys.extend(c.keys.drain(..moved));
                l.values.extend(c.values.drain(..moved));
                self.keys[i - 1] = c.keys[0].clone();
                return true;
            }
        }
        false
    }

    /// Rebalances child `i` after a removal left it under its minimum: joins it with a
    /// neighbour, or, when the two hold more than one node can, shares their entries
    /// evenly between them.
    fn repair(&mut self, i: usize, shape: Shape) {
        // An inner node has at least two children (the module doc).
        let left = if i + 1 < self.children.len() {
            i
        } else {
            i - 1
        };
        let separator = self.keys.remove(left);
        let right = self.children.remove(left + 1);
        match (&mut self.children[left], right) {
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
        if node.width() > shape.capacity(node) {
            let middle = node.width() / 2;
            let (separator, right) = node.split(middle, Edges::NONE, shape);
            self.keys.insert(left, separator);
            self.children.insert(left + 1, right);
        }
        self.children[left].shrink(shape);
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
/// load in that search); requested together, the misses overlap. A kNN scan asks for
/// the rows it reads next the same way.
#[inline]
pub(crate) fn prefetch<T>(keys: &[T]) {
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

impl<V> KeyMap<V> {
    pub fn new() -> Self {
        KeyMap::with_shape(Shape {
            leaf: CAPACITY,
            inner: CAPACITY,
        })
    }

    fn with_shape(shape: Shape) -> Self {
        assert!(shape.leaf >= 2, "a leaf splits into two non-empty halves");
        assert!(
            shape.inner >= 4,
            "an inner node splits into halves of two children"
        );
        KeyMap {
            root: Node::Leaf(Leaf {
                keys: Vec::new(),
                values: Vec::new(),
            }),
            len: 0,
            shape,
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

    /// Asks the CPU for every node on the paths to the leaves where `keys` are or would
    /// go, so that a caller about to insert these keys finds their paths in cache. In a
    /// table of millions of rows with random keys an insert waits on a cache miss at
    /// each of the lower levels, twice per level (the node's slot among its parent's
    /// children, then the node's keys), and once more for the values of its leaf. Here
    /// the paths are walked level by level, all keys at once: every key's next node
    /// slot is asked for before any is read, then each is read and its keys asked for
    /// before any are searched, so the misses of one level overlap. Only where the CPU
    /// takes such hints (x86-64); elsewhere the walk would be work for nothing.
    pub fn prefetch_paths(&self, keys: &[Key]) {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let mut nodes: Vec<&Node<V>> = vec![&self.root; keys.len()];
        loop {
            let mut descended = false;
            for (node, key) in nodes.iter_mut().zip(keys) {
                if let Node::Inner(inner) = *node {
                    // `child_for` without its own prefetch: the keys were asked for
                    // below, a level ago (the root's are in cache).
                    let child = &inner.children[inner.keys.partition_point(|s| s <= key)];
                    prefetch(std::slice::from_ref(child));
                    *node = child;
                    descended = true;
                }
            }
            if !descended {
                return;
            }
            for node in &nodes {
                match node {
                    Node::Inner(inner) => prefetch(&inner.keys),
                    Node::Leaf(leaf) => {
                        prefetch(&leaf.keys);
                        prefetch(&leaf.values);
                    }
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
        let shape = self.shape;
        let replaced = match insert_into(&mut self.root, Edges::ROOT, shape, key, value, before) {
            Inserted::Replaced(old) => Some(old),
            Inserted::Added => None,
            Inserted::Overflowed(at) => {
                self.grow(at);
                None
            }
        };
        if replaced.is_none() {
            self.len += 1;
        }
        replaced
    }

    /// Splits an overflowing root under a new one.
    fn grow(&mut self, at: usize) {
        let shape = self.shape;
        let (separator, right) = self.root.split(at, Edges::ROOT, shape);
        let left = std::mem::replace(
            &mut self.root,
            Node::Inner(Inner {
                keys: Vec::new(),
                children: Vec::new(),
            }),
        );
        let mut keys = Vec::with_capacity(shape.inner + 1);
        keys.push(separator);
        let mut children = Vec::with_capacity(shape.inner + 1);
        children.push(left);
        children.push(right);
        self.root = Node::Inner(Inner { keys, children });
    }

    pub fn insert(&mut self, key: Key, value: V) -> Option<V> {
        self.upsert(key, value, |_, _, _| {})
    }

    #[expect(clippy::expect_used, reason = "the loop's condition")]
    pub fn remove(&mut self, key: &Key) -> Option<V> {
        let removed = remove_from(&mut self.root, self.shape, key)?;
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

    /// Checks the invariants in the module doc, in one pass over the tree: keys ascend
    /// across nodes and separators, every leaf is at one depth, node widths are within
    /// bounds (every node off the tree's left and right edges holds at least its
    /// minimum), and the count matches. Returns the depth, or what is wrong.
    pub fn check(&self) -> Result<usize, String> {
        struct Walk<'a> {
            shape: Shape,
            /// The last key seen, in key order.
            last: Option<&'a Key>,
            entries: usize,
        }
        fn walk<'a, V>(
            w: &mut Walk<'a>,
            node: &'a Node<V>,
            edges: Edges,
            root: bool,
            (low, high): (Option<&'a Key>, Option<&'a Key>),
        ) -> Result<usize, String> {
            let width = node.width();
            if width > w.shape.capacity(node) {
                return Err(format!("a node holds {width}, over its capacity"));
            }
            let on_edge = edges.leftmost || edges.rightmost;
            if !root && !on_edge && width < w.shape.minimum(node) {
                return Err(format!(
                    "a node off the edges holds {width}, under its minimum"
                ));
            }
            // Every key of a subtree is at or above the separator on its left and below
            // the one on its right.
            let in_range =
                |key: &Key| low.is_none_or(|low| low <= key) && high.is_none_or(|high| key < high);
            match node {
                Node::Leaf(leaf) => {
                    if leaf.keys.len() != leaf.values.len() {
                        return Err("a leaf's keys and values differ in number".into());
                    }
                    if !root && leaf.keys.is_empty() {
                        return Err("a leaf other than the root is empty".into());
                    }
                    for key in &leaf.keys {
                        if w.last.is_some_and(|last| last >= key) {
                            return Err("keys out of order".into());
                        }
                        if !in_range(key) {
                            return Err("a key outside its separators".into());
                        }
                        w.last = Some(key);
                    }
                    w.entries += leaf.keys.len();
                    Ok(1)
                }
                Node::Inner(inner) => {
                    if inner.keys.len() + 1 != inner.children.len() {
                        return Err("an inner node's keys and children disagree".into());
                    }
                    if width < 2 {
                        return Err("an inner node has one child".into());
                    }
                    if !inner.keys.iter().all(in_range)
                        || !inner.keys.windows(2).all(|w| w[0] < w[1])
                    {
                        return Err("separators out of order".into());
                    }
                    let mut depth = None;
                    for (i, child) in inner.children.iter().enumerate() {
                        let left = i.checked_sub(1).map(|j| &inner.keys[j]).or(low);
                        let right = inner.keys.get(i).or(high);
                        // Worked out here, not with `Edges::of_child`: a mistake there
                        // would move the insert's split rule and this exemption together.
                        let child_edges = Edges {
                            leftmost: edges.leftmost && i == 0,
                            rightmost: edges.rightmost && i == width - 1,
                        };
                        let d = walk(w, child, child_edges, false, (left, right))?;
                        if depth.is_some_and(|depth| depth != d) {
                            return Err("leaves at different depths".into());
                        }
                        depth = Some(d);
                    }
                    Ok(depth.unwrap_or(0) + 1)
                }
            }
        }
        let mut w = Walk {
            shape: self.shape,
            last: None,
            entries: 0,
        };
        let depth = walk(&mut w, &self.root, Edges::ROOT, true, (None, None))?;
        if w.entries != self.len {
            return Err(format!("{} entries counted as {}", w.entries, self.len));
        }
        Ok(depth)
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

/// What an insert did to a subtree.
enum Inserted<V> {
    /// The key was there: its old value.
    Replaced(V),
    Added,
    /// The subtree's root now holds one more than its capacity; the new entry (or the
    /// new child) is at this position in it. Its parent makes room: by moving entries
    /// to a sibling or by splitting it.
    Overflowed(usize),
}

/// Inserts into the subtree at `node`.
fn insert_into<V>(
    node: &mut Node<V>,
    edges: Edges,
    shape: Shape,
    key: Key,
    value: V,
    before: impl FnOnce(&Key, Option<&V>, &V),
) -> Inserted<V> {
    let at = match node {
        Node::Leaf(leaf) => match search(&leaf.keys, &key) {
            Ok(i) => {
                before(&leaf.keys[i], Some(&leaf.values[i]), &value);
                return Inserted::Replaced(std::mem::replace(&mut leaf.values[i], value));
            }
            Err(i) => {
                before(&key, None, &value);
                room_for_one(&mut leaf.keys, shape.leaf);
                room_for_one(&mut leaf.values, shape.leaf);
                leaf.keys.insert(i, key);
                leaf.values.insert(i, value);
                i
            }
        },
        Node::Inner(inner) => {
            let i = inner.child_for(&key);
            let child_edges = edges.of_child(i, inner.children.len());
            let at = match insert_into(
                &mut inner.children[i],
                child_edges,
                shape,
                key,
                value,
                before,
            ) {
                Inserted::Overflowed(at) => at,
                done => return done,
            };
            if inner.shift_to_a_sibling(i, at, child_edges, shape) {
                return Inserted::Added;
            }
            let (separator, right) = inner.children[i].split(at, child_edges, shape);
            room_for_one(&mut inner.keys, shape.inner);
            room_for_one(&mut inner.children, shape.inner);
            inner.keys.insert(i, separator);
            inner.children.insert(i + 1, right);
            i + 1
        }
    };
    if node.width() > shape.capacity(node) {
        Inserted::Overflowed(at)
    } else {
        Inserted::Added
    }
}

/// Grows `v`'s capacity to hold `len` elements, exactly (not by doubling).
fn reserve_for<T>(v: &mut Vec<T>, len: usize) {
    v.reserve_exact(len.saturating_sub(v.len()));
}

fn remove_from<V>(node: &mut Node<V>, shape: Shape, key: &Key) -> Option<V> {
    match node {
        Node::Leaf(leaf) => {
            let i = search(&leaf.keys, key).ok()?;
            leaf.keys.remove(i);
            Some(leaf.values.remove(i))
        }
        Node::Inner(inner) => {
            let i = inner.child_for(key);
            let removed = remove_from(&mut inner.children[i], shape, key)?;
            let child = &inner.children[i];
            if child.width() < shape.minimum(child) {
                inner.repair(i, shape);
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

    /// Trees of nodes this narrow reach depth 5 or more with a few thousand keys, so the
    /// inner-node paths (splits at each position, joins, re-splits, the root's collapse)
    /// run in a short test. Their minimums are the floors (one entry, two children).
    const NARROW: Shape = Shape { leaf: 4, inner: 4 };
    /// Nodes with minimums above those floors (three), so that a node off the edges
    /// left too small is caught, and a leaf's join can overflow and re-split.
    const MEDIUM: Shape = Shape {
        leaf: 12,
        inner: 12,
    };

    fn full_width() -> Shape {
        KeyMap::<()>::new().shape
    }

    fn checked<V>(map: &KeyMap<V>) -> usize {
        match map.check() {
            Ok(depth) => depth,
            Err(e) => panic!("{e}"),
        }
    }

    /// The map against the standard library's, step by step.
    fn agrees(shape: Shape, ops: &[(bool, u32)], check_every: usize) {
        let mut map = KeyMap::with_shape(shape);
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
                checked(&map);
            }
        }
        checked(&map);
        assert_eq!(map.len(), model.len());
        let all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let expected: Vec<_> = model.iter().map(|(k, v)| (key(*k), *v)).collect();
        assert_eq!(all, expected);
        assert_eq!(
            map.last_key(),
            model.keys().next_back().map(|k| key(*k)).as_ref()
        );
        let top = model.keys().next_back().copied().unwrap_or(0) + 2;
        for probe in (0..=top).step_by(3) {
            assert_eq!(map.get(&key(probe)), model.get(&probe));
            assert_eq!(map.contains_key(&key(probe)), model.contains_key(&probe));
            let from: Vec<_> = map
                .range_from(Bound::Included(&key(probe)))
                .map(|(_, v)| *v)
                .take(50)
                .collect();
            let expected: Vec<_> = model.range(probe..).map(|(_, v)| *v).take(50).collect();
            assert_eq!(from, expected, "from {probe} included");
            let after: Vec<_> = map
                .range_from(Bound::Excluded(&key(probe)))
                .map(|(_, v)| *v)
                .take(50)
                .collect();
            let expected: Vec<_> = model
                .range((Bound::Excluded(probe), Bound::Unbounded))
                .map(|(_, v)| *v)
                .take(50)
                .collect();
            assert_eq!(after, expected, "after {probe}");
        }
        // Then every key, in a scattered order: joins, re-splits and the root's
        // collapse all the way down to one leaf.
        let keys: Vec<u32> = model.keys().copied().collect();
        let stride = (keys.len() * 5 / 8) | 1;
        let stride = (stride..)
            .find(|s| gcd(*s, keys.len().max(1)) == 1)
            .unwrap_or(1);
        for (step, i) in (0..keys.len()).map(|i| i * stride % keys.len()).enumerate() {
            let k = keys[i];
            assert_eq!(map.remove(&key(k)), model.remove(&k), "draining {k}");
            if step % check_every == 0 {
                checked(&map);
            }
        }
        assert!(map.is_empty());
        assert_eq!(checked(&map), 1);
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    /// Operations on keys below `keys`: inserts with a probability drawn per case, in
    /// runs that go up or down (as keys often arrive) or jump at random.
    fn operations(keys: u32, most: usize) -> impl Strategy<Value = Vec<(bool, u32)>> {
        let step = (
            prop::bool::ANY,
            0..keys,
            prop::sample::select(vec![1u32, 4, 32]),
            prop::sample::select(vec![-1i64, 0, 1]),
        );
        (0.2f64..0.9, prop::collection::vec(step, 0..most / 8)).prop_map(move |(inserts, runs)| {
            let mut ops = Vec::new();
            let mut coin = 0.0f64;
            for (_, start, len, direction) in runs {
                for i in 0..len {
                    coin = (coin + 0.618_034) % 1.0;
                    let k =
                        (i64::from(start) + direction * i64::from(i)).rem_euclid(i64::from(keys));
                    ops.push((coin < inserts, k as u32));
                }
            }
            ops
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn narrow_trees_agree_with_the_standard_map_at_every_step(
            ops in operations(600, 2_000)
        ) {
            agrees(NARROW, &ops, 1);
            agrees(MEDIUM, &ops, 1);
        }

        #[test]
        fn a_full_width_tree_agrees_with_the_standard_map(ops in operations(30_000, 20_000)) {
            agrees(full_width(), &ops, 501);
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
            let depth = checked(&map);
            let (leaves, entries) = map.leaf_fill();
            assert_eq!(entries, n as usize);
            // Every leaf but one at each end is full.
            assert!(
                leaves <= (n as usize).div_ceil(CAPACITY) + 2,
                "{leaves} leaves, reverse {reverse}"
            );
            assert!(depth <= 4, "depth {depth}");
        }
    }

    /// Keys in reverse order just above a full leaf land last in it each time: split
    /// as if they arrived in order, each would get a leaf of its own.
    #[test]
    fn keys_in_reverse_above_a_full_leaf_fill_their_leaves_at_least_half() {
        for shape in [NARROW, full_width()] {
            let mut map = KeyMap::with_shape(shape);
            for i in 0..shape.leaf as u32 {
                map.insert(key(i), ());
            }
            for i in (0..50_000u32).rev() {
                map.insert(key(1_000_000 + i), ());
            }
            checked(&map);
            let (leaves, entries) = map.leaf_fill();
            assert!(
                entries * 2 >= leaves * shape.leaf,
                "{entries} entries in {leaves} leaves of {}",
                shape.leaf
            );
        }
    }

    /// An overflowing leaf moves entries to a neighbour with room before it splits
    /// (splitting at once leaves about 69 % under random keys).
    #[test]
    fn random_keys_fill_their_leaves_four_fifths_full() {
        let mut map = KeyMap::new();
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..100_000 {
            // xorshift: a fixed, well-spread sequence.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            map.insert(key(x), ());
        }
        checked(&map);
        let (leaves, entries) = map.leaf_fill();
        assert!(
            entries * 100 / (leaves * CAPACITY) >= 80,
            "{entries} in {leaves} leaves"
        );
    }

    /// Asking for the paths of keys present and absent, short and long, in trees from
    /// an empty root leaf to several levels deep, never panics (it only reads).
    #[test]
    fn prefetching_paths_walks_every_tree_shape() {
        let long =
            |n: u32| Key::from_slice(format!("{n:08}-a key longer than its head").as_bytes());
        for shape in [NARROW, MEDIUM, full_width()] {
            let mut map = KeyMap::with_shape(shape);
            for n in 0..2_000u32 {
                if n.is_power_of_two() || n % 499 == 0 {
                    let keys: Vec<Key> = (0..40)
                        .map(|i| i * 101 % 4_000)
                        .map(|k| if k % 2 == 0 { key(k) } else { long(k) })
                        .collect();
                    map.prefetch_paths(&keys);
                    map.prefetch_paths(&[]);
                    checked(&map);
                }
                let k = n * 7 % 2_000;
                map.insert(if k % 3 == 0 { long(k) } else { key(k) }, n);
            }
        }
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
        checked(&map);
        let (leaves, entries) = map.leaf_fill();
        assert_eq!(entries, 5_000);
        assert!(
            entries >= leaves * map.shape.leaf_minimum(),
            "{entries} in {leaves} leaves"
        );
        for i in (0..n).step_by(10) {
            assert_eq!(map.remove(&key(i)), Some(i));
        }
        assert_eq!(checked(&map), 1);
        assert!(map.is_empty());
        assert_eq!(map.iter().count(), 0);
        assert_eq!(map.last_key(), None);
    }

    #[test]
    fn the_check_finds_a_broken_tree() {
        let mut map = KeyMap::with_shape(NARROW);
        for i in 0..100 {
            map.insert(key(i), ());
        }
        assert!(map.check().is_ok());
        let mut broken = map.clone();
        broken.len += 1;
        assert!(broken.check().is_err_and(|e| e.contains("entries counted")));
        let mut broken = map.clone();
        if let Node::Inner(inner) = &mut broken.root {
            inner.keys.swap(0, 1);
        }
        assert!(broken.check().is_err());

        // A leaf off the edges with fewer entries than its minimum.
        let mut map = KeyMap::with_shape(MEDIUM);
        for i in 0..1_000 {
            map.insert(key(i), ());
        }
        assert!(map.check().is_ok());
        let mut node = &mut map.root;
        while let Node::Inner(inner) = node {
            node = &mut inner.children[1];
        }
        let Node::Leaf(leaf) = node else {
            unreachable!("the loop ends on a leaf")
        };
        let removed = leaf.keys.len() - 1;
        leaf.keys.truncate(1);
        leaf.values.truncate(1);
        map.len -= removed;
        assert!(map.check().is_err_and(|e| e.contains("under its minimum")));
    }
}
