//! A row as the engine holds it: one buffer holding the values encoded exactly as the
//! log and checkpoints encode a row (FORMAT.md §5: a `u16` value count, then each
//! value). Writing a row to the log is a copy; reading one from the log or a checkpoint
//! is one check and one copy; in memory it is a single allocation, where a `Vec<Value>`
//! was one for the vector and one more per text value (the allocator was a quarter of
//! the samples in a profile of `oc-bench engine`, and resident memory twice the bytes
//! stored).
//!
//! Every constructor checks or produces a well-formed encoding (known tags, lengths in
//! bounds, text that is UTF-8), so reading a value back needs no error path.
//!
//! The allocation is exactly the encoding, behind a thin pointer: its length is not
//! kept anywhere but walked from the value headers when the whole encoding is wanted
//! (the log, a checkpoint, usage). A `Box<[u8]>` kept it in a second word of every
//! entry of the table's tree: 8 of each leaf entry's 40 bytes, which an insert shifts
//! and a batch's path prefetch asks the CPU for (`oc-bench engine`: the tree waits on
//! those cache lines), and 8 bytes of every stored row. A length stored at the front
//! of the allocation instead would cost the row the same 8 bytes and more where the
//! allocator rounds the larger block up (`oc-bench memory`: 16 more bytes a row of
//! 216 encoded bytes). Reading values walks from the front anyway and needs no length.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::value::{ColumnType, Value};

// Value tags (FORMAT.md §5).
const V_NULL: u8 = 0;
const V_BOOL: u8 = 1;
const V_INT: u8 = 2;
const V_FLOAT: u8 = 3;
const V_TEXT: u8 = 4;
const V_JSON: u8 = 5;
const V_VECTOR: u8 = 6;

/// A stored row: see the module documentation. Points at an allocation of exactly
/// [`Row::encoded`]'s bytes, which never change.
pub struct Row(NonNull<u8>);

// SAFETY: a `Row` owns its allocation alone (as a `Box<[u8]>` does) and never writes
// to it after it is built.
unsafe impl Send for Row {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for Row {}

/// One value of a stored row, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(&'a str),
    Json(&'a str),
    /// The floats as little-endian bytes: a row's buffer keeps no alignment for `f32`.
    Vector(&'a [u8]),
}

/// The length of a value's encoding from its tag and, for the counted kinds, its
/// count (FORMAT.md §5).
fn value_len(tag: u8, counted: impl FnOnce() -> usize) -> usize {
    match tag {
        V_NULL => 1,
        V_BOOL => 2,
        V_INT | V_FLOAT => 9,
        V_VECTOR => 5 + 4 * counted(),
        _ => 5 + counted(),
    }
}

/// The length of the well-formed value encoding at `p`.
///
/// # Safety
/// `p` points at a value encoding that a row's constructor checked or produced, inside
/// that row's allocation.
unsafe fn value_len_at(p: *const u8) -> usize {
    // SAFETY: a well-formed value starts with its tag, and a counted one's next 4
    // bytes are its count; `[u8; N]` reads need no alignment.
    unsafe {
        value_len(p.read(), || {
            u32::from_le_bytes(p.add(1).cast::<[u8; 4]>().read()) as usize
        })
    }
}

/// The length of the well-formed row encoding at `p`: its count and every value's.
///
/// # Safety
/// `p` points at a row's allocation (see [`Row`]).
unsafe fn row_len_at(p: *const u8) -> usize {
    // SAFETY: a row's encoding starts with its `u16` count, and each of that many
    // values follows the last inside the allocation.
    unsafe {
        let count = u16::from_le_bytes(p.cast::<[u8; 2]>().read());
        let mut at = 2;
        for _ in 0..count {
            at += value_len_at(p.add(at));
        }
        at
    }
}

/// Appends a value's encoding (FORMAT.md §5); [`Value::stored_bytes`] is its length.
fn encode_value(out: &mut Vec<u8>, v: &Value) {
    let bytes32 = |out: &mut Vec<u8>, tag: u8, len: usize| {
        out.push(tag);
        let len = u32::try_from(len).unwrap_or_else(|_| panic!("{len} items do not fit a u32"));
        out.extend_from_slice(&len.to_le_bytes());
    };
    match v {
        Value::Null => out.push(V_NULL),
        Value::Bool(b) => out.extend_from_slice(&[V_BOOL, u8::from(*b)]),
        Value::Int(i) => {
            out.push(V_INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(V_FLOAT);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Text(s) | Value::Json(s) => {
            bytes32(
                out,
                if matches!(v, Value::Text(_)) {
                    V_TEXT
                } else {
                    V_JSON
                },
                s.len(),
            );
            out.extend_from_slice(s.as_bytes());
        }
        Value::Vector(v) => {
            bytes32(out, V_VECTOR, v.len());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// The length of the well-formed value encoded at the start of `bytes`, or what is
/// wrong with it.
fn check_value(bytes: &[u8]) -> Result<usize, String> {
    let Some((&tag, rest)) = bytes.split_first() else {
        return Err("needs a value tag, no bytes left".into());
    };
    let fixed = |n: usize| {
        if rest.len() < n {
            Err(format!("needs {n} more bytes, {} left", rest.len()))
        } else {
            Ok(1 + n)
        }
    };
    let counted = |unit: usize| -> Result<(usize, &[u8]), String> {
        let Some((len, body)) = rest.split_first_chunk::<4>() else {
            return Err(format!("needs 4 more bytes, {} left", rest.len()));
        };
        let n = (u32::from_le_bytes(*len) as usize)
            .checked_mul(unit)
            .ok_or("vector too long")?;
        if body.len() < n {
            return Err(format!("needs {n} more bytes, {} left", body.len()));
        }
        Ok((5 + n, &body[..n]))
    };
    match tag {
        V_NULL => Ok(1),
        // Only 0 and 1 were ever written; a row keeps its bytes, so its digest would
        // differ from a copy's that re-encoded another byte as `true`.
        V_BOOL => match rest.first() {
            Some(0 | 1) => Ok(2),
            Some(b) => Err(format!("bad bool byte {b}")),
            None => fixed(1),
        },
        V_INT | V_FLOAT => fixed(8),
        V_TEXT | V_JSON => {
            let (len, text) = counted(1)?;
            std::str::from_utf8(text).map_err(|_| "text is not UTF-8".to_string())?;
            Ok(len)
        }
        V_VECTOR => Ok(counted(4)?.0),
        other => Err(format!("bad value tag {other}")),
    }
}

/// Writes one row's values, in column order (see [`Row::build`]).
pub(crate) struct RowWriter<'a> {
    out: &'a mut Vec<u8>,
    count: usize,
}

impl RowWriter<'_> {
    pub(crate) fn value(&mut self, v: &Value) {
        encode_value(self.out, v);
        self.count += 1;
    }

    /// The first `n` values of `row` (all of them when it holds fewer), copied as
    /// they are encoded, NULL in each slot `dead` marks (see [`Row::copy_values`]).
    pub(crate) fn values_of(&mut self, row: &Row, n: usize, dead: &[bool]) {
        self.count += row.copy_values(n, dead, self.out);
    }

    /// A text value straight from borrowed text (no `String` on the way).
    pub(crate) fn text(&mut self, s: &str) {
        self.out.push(V_TEXT);
        let len = u32::try_from(s.len()).unwrap_or_else(|_| panic!("{} bytes of text", s.len()));
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.count += 1;
    }
}

thread_local! {
    /// Where rows and keys are encoded before they are copied out at their exact size,
    /// so building one costs one allocation, not a growing buffer's several.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, emptied.
fn with_scratch<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let result = f(&mut buf);
            // A row over the limit is built before it is refused: not kept that large.
            if buf.capacity() > 2 * crate::limits::MAX_ROW_BYTES {
                *buf = Vec::new();
            }
            result
        }
        // Only a nested call finds it taken; it gets a buffer of its own.
        Err(_) => f(&mut Vec::new()),
    })
}

impl Row {
    /// Encodes values into a row.
    pub fn from_values(values: &[Value]) -> Row {
        let built = Row::build(|w| {
            values.iter().for_each(|v| w.value(v));
            Ok::<(), std::convert::Infallible>(())
        });
        match built {
            Ok(row) => row,
            Err(never) => match never {},
        }
    }

    /// A row from the values `f` writes, or `f`'s error.
    pub(crate) fn build<E>(f: impl FnOnce(&mut RowWriter) -> Result<(), E>) -> Result<Row, E> {
        with_scratch(|out| {
            out.extend_from_slice(&[0, 0]);
            let mut w = RowWriter { out, count: 0 };
            f(&mut w)?;
            let count = u16::try_from(w.count)
                .unwrap_or_else(|_| panic!("{} values do not fit a row", w.count));
            out[..2].copy_from_slice(&count.to_le_bytes());
            Ok(Row::copy_of(out))
        })
    }

    /// Reads the row encoded at the start of untrusted `bytes`: the row and the bytes it
    /// took, or what is wrong (`at` is the offset of the fault within `bytes`).
    pub(crate) fn read(bytes: &[u8]) -> Result<(Row, usize), (usize, String)> {
        let Some((count, _)) = bytes.split_first_chunk::<2>() else {
            return Err((0, format!("needs 2 more bytes, {} left", bytes.len())));
        };
        let mut at = 2;
        for _ in 0..u16::from_le_bytes(*count) {
            at += check_value(&bytes[at..]).map_err(|why| (at, why))?;
        }
        Ok((Row::copy_of(&bytes[..at]), at))
    }

    /// A row holding a copy of `encoding`, which a constructor above checked or
    /// produced: [`row_len_at`] walks it to exactly its length.
    fn copy_of(encoding: &[u8]) -> Row {
        let layout = Row::layout(encoding.len());
        // SAFETY: every encoding holds at least its 2-byte count, so the size is not
        // zero.
        let Some(ptr) = NonNull::new(unsafe { alloc(layout) }) else {
            handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds `encoding.len()` bytes, and a fresh allocation
        // cannot overlap the source.
        unsafe {
            std::ptr::copy_nonoverlapping(encoding.as_ptr(), ptr.as_ptr(), encoding.len());
        }
        // Checked before the pointer becomes a `Row`, whose drop would free it with
        // the walked length.
        // SAFETY: the allocation holds the copied encoding.
        debug_assert_eq!(unsafe { row_len_at(ptr.as_ptr()) }, encoding.len());
        Row(ptr)
    }

    #[expect(clippy::expect_used, reason = "rows are bounded far below isize::MAX")]
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, 1).expect("a row's length fits a layout")
    }

    /// The row's encoding, value count included: what the log and checkpoints hold.
    pub fn encoded(&self) -> &[u8] {
        // SAFETY: the allocation holds a well-formed encoding of exactly the walked
        // length, unchanged while `self` lives.
        unsafe {
            let p = self.0.as_ptr();
            std::slice::from_raw_parts(p, row_len_at(p))
        }
    }

    /// The values' encodings without the count.
    pub fn encoded_values(&self) -> &[u8] {
        &self.encoded()[2..]
    }

    /// Asks the CPU for the cache lines of the `bytes` bytes from the row's start,
    /// without waiting for its first line as [`Row::encoded`]'s walk would: a scan asks
    /// for a later row while it reads this one. Past a short row's end the hint fills
    /// lines of whatever the heap holds there; it reads nothing into the program.
    pub(crate) fn prefetch(&self, bytes: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let start = self.0.as_ptr().cast::<i8>().cast_const();
            for offset in (0..bytes).step_by(64) {
                // SAFETY: a prefetch only hints: it neither faults nor reads into the
                // program, wherever the address points (`wrapping_add`: no pointer
                // arithmetic past the allocation is assumed in bounds).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bytes;
    }

    /// The encodings of the first `n` values (all of them when the row holds fewer):
    /// a row a migration converted, read in the shape it had before.
    pub fn encoded_prefix(&self, n: usize) -> &[u8] {
        let all = self.encoded_values();
        if n >= self.len() {
            return all;
        }
        let mut rest = all;
        for _ in 0..n {
            rest = &rest[ValueRef::encoded_len(rest)..];
        }
        &all[..all.len() - rest.len()]
    }

    /// Appends the encodings of the first `n` values (all of them when the row holds
    /// fewer) to `out`, with NULL in place of each slot `dead` marks (a dropped
    /// column's: no shape reads it, so a copy need not keep its value); returns how
    /// many. `dead` is empty when no slot is.
    pub(crate) fn copy_values(&self, n: usize, dead: &[bool], out: &mut Vec<u8>) -> usize {
        let n = n.min(self.len());
        if dead.is_empty() {
            out.extend_from_slice(self.encoded_prefix(n));
            return n;
        }
        let mut rest = self.encoded_values();
        for i in 0..n {
            let len = ValueRef::encoded_len(rest);
            if dead.get(i).copied().unwrap_or(false) {
                out.push(V_NULL);
            } else {
                out.extend_from_slice(&rest[..len]);
            }
            rest = &rest[len..];
        }
        n
    }

    /// Bytes of the first `n` values with each slot `dead` marks taken as the NULL a
    /// write stores there (one byte): what the row limit holds a row to, whatever a
    /// migration keeps in those slots until its cutover.
    pub fn shape_bytes(&self, n: usize, dead: impl Fn(usize) -> bool) -> usize {
        let mut rest = self.encoded_values();
        let mut bytes = 0;
        for i in 0..n.min(self.len()) {
            let len = ValueRef::encoded_len(rest);
            bytes += if dead(i) { 1 } else { len };
            rest = &rest[len..];
        }
        bytes
    }

    /// Bytes of the values as stored: what row size limits and usage count.
    pub fn stored_bytes(&self) -> usize {
        self.encoded().len() - 2
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        // SAFETY: every row's allocation starts with its 2-byte count.
        usize::from(u16::from_le_bytes(unsafe {
            self.0.as_ptr().cast::<[u8; 2]>().read()
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn values(&self) -> Values<'_> {
        Values {
            // SAFETY: the first value follows the 2-byte count (or the allocation ends
            // there, and `left` is 0).
            next: unsafe { self.0.as_ptr().add(2) },
            left: self.len(),
            row: PhantomData,
        }
    }

    /// Value `column`. Rows are checked against their table's schema when they come
    /// in, so a column of the schema is always there; past the end reads as NULL.
    pub fn get(&self, column: usize) -> ValueRef<'_> {
        debug_assert!(
            column < self.len(),
            "column {column} of a {}-value row",
            self.len()
        );
        self.values().nth(column).unwrap_or(ValueRef::Null)
    }

    pub fn to_values(&self) -> Vec<Value> {
        self.values().map(ValueRef::to_value).collect()
    }

    /// The order-preserving key (`value.rs`) of the values in `columns`, in that order.
    pub fn key(&self, columns: &[usize]) -> Vec<u8> {
        with_scratch(|out| {
            self.encode_key(columns, out);
            out.to_vec()
        })
    }

    /// The same as the B-trees hold it: a short key is not allocated at all.
    pub(crate) fn tree_key(&self, columns: &[usize]) -> crate::key::Key {
        with_scratch(|out| {
            self.encode_key(columns, out);
            crate::key::Key::from_slice(out)
        })
    }

    /// The length of [`Row::key`], computed without building the key.
    pub fn key_len(&self, columns: &[usize]) -> usize {
        columns.iter().map(|&c| self.get(c).key_len()).sum()
    }

    fn encode_key(&self, columns: &[usize], out: &mut Vec<u8>) {
        for &c in columns {
            self.get(c).encode_key(out);
        }
    }

    /// Non-null vector values.
    pub fn vectors(&self) -> usize {
        self.values()
            .filter(|v| matches!(v, ValueRef::Vector(_)))
            .count()
    }
}

impl From<Vec<Value>> for Row {
    fn from(values: Vec<Value>) -> Row {
        Row::from_values(&values)
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        let layout = Row::layout(self.encoded().len());
        // SAFETY: allocated in `copy_of` with this same layout (the encoding's
        // length, walked again), and dropped once.
        unsafe { dealloc(self.0.as_ptr(), layout) }
    }
}

impl Clone for Row {
    fn clone(&self) -> Row {
        Row::copy_of(self.encoded())
    }
}

impl PartialEq for Row {
    fn eq(&self, other: &Row) -> bool {
        self.encoded() == other.encoded()
    }
}

impl Eq for Row {}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.values()).finish()
    }
}

/// The values of a row, in column order. Walks the row from its front without its
/// length (see the module documentation).
pub struct Values<'a> {
    /// The next value's encoding, when `left` is not 0.
    next: *const u8,
    left: usize,
    row: PhantomData<&'a Row>,
}

impl<'a> Values<'a> {
    /// Takes the next value's encoding, when one is left.
    fn take(&mut self) -> Option<&'a [u8]> {
        self.left = self.left.checked_sub(1)?;
        // SAFETY: `left` was not 0, so `next` points at one of the row's well-formed
        // values, inside the allocation the row borrowed for 'a holds; the one after
        // it (or the allocation's end) is `len` bytes on.
        unsafe {
            let len = value_len_at(self.next);
            let bytes = std::slice::from_raw_parts(self.next, len);
            self.next = self.next.add(len);
            Some(bytes)
        }
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<ValueRef<'a>> {
        self.take().map(|bytes| ValueRef::decode(bytes).0)
    }

    fn nth(&mut self, n: usize) -> Option<ValueRef<'a>> {
        for _ in 0..n {
            self.take()?;
        }
        self.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Values<'_> {}

impl<'a> ValueRef<'a> {
    fn word(bytes: &[u8]) -> [u8; 8] {
        let mut w = [0; 8];
        w.copy_from_slice(&bytes[1..9]);
        w
    }

    fn counted(bytes: &[u8]) -> usize {
        u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize
    }

    /// The length of the value encoded at the start of `bytes` (checked at the row's
    /// construction).
    fn encoded_len(bytes: &[u8]) -> usize {
        value_len(bytes[0], || Self::counted(bytes))
    }

    /// The value encoded at the start of `bytes` (checked at the row's construction),
    /// and its length.
    fn decode(bytes: &'a [u8]) -> (ValueRef<'a>, usize) {
        let text = |len: usize| {
            let body = &bytes[5..5 + len];
            // SAFETY: every row's text was checked to be UTF-8 when the row was built
            // (`check_value`) or came from a `String` (`encode_value`), and rows are
            // immutable.
            unsafe { std::str::from_utf8_unchecked(body) }
        };
        match bytes[0] {
            V_NULL => (ValueRef::Null, 1),
            V_BOOL => (ValueRef::Bool(bytes[1] != 0), 2),
            V_INT => (ValueRef::Int(i64::from_le_bytes(Self::word(bytes))), 9),
            V_FLOAT => (
                ValueRef::Float(f64::from_bits(u64::from_le_bytes(Self::word(bytes)))),
                9,
            ),
            V_TEXT => {
                let n = Self::counted(bytes);
                (ValueRef::Text(text(n)), 5 + n)
            }
            V_JSON => {
                let n = Self::counted(bytes);
                (ValueRef::Json(text(n)), 5 + n)
            }
            _ => {
                let n = 4 * Self::counted(bytes);
                (ValueRef::Vector(&bytes[5..5 + n]), 5 + n)
            }
        }
    }

    pub fn is_null(self) -> bool {
        matches!(self, ValueRef::Null)
    }

    /// The floats of a vector value.
    pub fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    pub fn to_value(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Text(s) => Value::Text(s.to_string()),
            ValueRef::Json(s) => Value::Json(s.to_string()),
            ValueRef::Vector(b) => Value::Vector(Self::floats(b).collect()),
        }
    }

    /// Whether a column of type `ty` (NULL allowed or not) can hold this value: the
    /// type, a vector's dimension, finite numbers.
    pub fn fits(self, ty: ColumnType, nullable: bool) -> bool {
        match (self, ty) {
            (ValueRef::Null, _) => nullable,
            (ValueRef::Bool(_), ColumnType::Bool)
            | (ValueRef::Int(_), ColumnType::Int)
            | (ValueRef::Text(_), ColumnType::Text)
            | (ValueRef::Json(_), ColumnType::Json) => true,
            (ValueRef::Float(f), ColumnType::Float) => f.is_finite(),
            (ValueRef::Vector(v), ColumnType::Vector(dim)) => {
                v.len() == 4 * dim as usize && Self::floats(v).all(f32::is_finite)
            }
            _ => false,
        }
    }

    /// The kind of a value, for messages (never the value: it may be large).
    pub fn kind(self) -> &'static str {
        match self {
            ValueRef::Null => "null",
            ValueRef::Bool(_) => "bool",
            ValueRef::Int(_) => "int",
            ValueRef::Float(f) if f.is_finite() => "float",
            ValueRef::Float(_) => "non-finite float",
            ValueRef::Text(_) => "text",
            ValueRef::Json(_) => "json",
            ValueRef::Vector(v) if Self::floats(v).all(f32::is_finite) => "vector",
            ValueRef::Vector(_) => "non-finite vector",
        }
    }

    /// Bytes [`ValueRef::encode_key`] appends.
    pub fn key_len(self) -> usize {
        match self {
            ValueRef::Null => 1,
            ValueRef::Bool(_) => 2,
            ValueRef::Int(_) | ValueRef::Float(_) => 9,
            ValueRef::Text(s) => 3 + s.len() + s.bytes().filter(|&b| b == 0).count(),
            ValueRef::Json(_) | ValueRef::Vector(_) => {
                unreachable!("schema validation keeps json and vector out of keys")
            }
        }
    }

    /// Appends the order-preserving encoding of a keyable value (see `value.rs`).
    pub fn encode_key(self, out: &mut Vec<u8>) {
        match self {
            ValueRef::Null => out.push(0x00),
            ValueRef::Bool(b) => out.extend_from_slice(&[0x01, u8::from(b)]),
            ValueRef::Int(i) => {
                out.push(0x02);
                out.extend_from_slice(&((i as u64) ^ (1 << 63)).to_be_bytes());
            }
            ValueRef::Float(f) => {
                out.push(0x03);
                let f = if f == 0.0 { 0.0 } else { f };
                let bits = f.to_bits();
                let ordered = if bits >> 63 == 1 {
                    !bits
                } else {
                    bits | (1 << 63)
                };
                out.extend_from_slice(&ordered.to_be_bytes());
            }
            ValueRef::Text(s) => {
                out.push(0x04);
                for &b in s.as_bytes() {
                    if b == 0 {
                        out.extend_from_slice(&[0x00, 0xFF]);
                    } else {
                        out.push(b);
                    }
                }
                out.extend_from_slice(&[0x00, 0x00]);
            }
            ValueRef::Json(_) | ValueRef::Vector(_) => {
                unreachable!("schema validation keeps json and vector out of keys")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            ".{0,20}".prop_map(Value::Text),
            ".{0,20}".prop_map(Value::Json),
            prop::collection::vec(any::<f32>(), 0..6).prop_map(Value::Vector),
        ]
    }

    proptest! {
        /// A row reads back as the values it was built from, whole and one at a time,
        /// and reading its own encoding takes exactly that encoding.
        #[test]
        fn a_row_round_trips_its_values(values in prop::collection::vec(value(), 0..8)) {
            let row = Row::from_values(&values);
            let same = |a: &Value, b: &Value| match (a, b) {
                (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
                (Value::Vector(x), Value::Vector(y)) => {
                    x.iter().map(|f| f.to_bits()).eq(y.iter().map(|f| f.to_bits()))
                }
                _ => a == b,
            };
            let back = row.to_values();
            prop_assert_eq!(back.len(), values.len());
            for (i, v) in values.iter().enumerate() {
                prop_assert!(same(&back[i], v));
                prop_assert!(same(&row.get(i).to_value(), v));
            }
            prop_assert_eq!(row.stored_bytes(), values.iter().map(Value::stored_bytes).sum::<usize>());
            let mut encoded = row.encoded().to_vec();
            encoded.extend_from_slice(b"trailing");
            let (read, len) = Row::read(&encoded).expect("its own encoding");
            prop_assert_eq!((read, len), (row.clone(), row.encoded().len()));
        }

        /// A row's encoding with one byte changed and cut anywhere either reads as a
        /// row or gives an error: never a panic, and a row read from it re-encodes to
        /// exactly the bytes it took.
        #[test]
        fn reading_damaged_rows_never_panics(
            values in prop::collection::vec(value(), 0..6),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = Row::from_values(&values).encoded().to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            bytes.truncate(cut.index(bytes.len() + 1));
            if let Ok((row, len)) = Row::read(&bytes) {
                prop_assert_eq!(row.encoded(), &bytes[..len]);
                let again = Row::from_values(&row.to_values());
                prop_assert_eq!(again.encoded(), &bytes[..len]);
            }
        }
    }

    #[test]
    fn malformed_rows_are_refused_with_the_offset_of_the_fault() {
        // Two values announced, one present.
        let one = Row::from_values(&[Value::Int(1)]);
        let mut bytes = one.encoded().to_vec();
        bytes[0] = 2;
        assert_eq!(
            Row::read(&bytes).map(|_| ()),
            Err((11, "needs a value tag, no bytes left".into()))
        );
        // Text that is not UTF-8.
        let text = Row::from_values(&[Value::Text("ab".into())]);
        let mut bytes = text.encoded().to_vec();
        bytes[7] = 0xFF;
        assert_eq!(
            Row::read(&bytes).map(|_| ()),
            Err((2, "text is not UTF-8".into()))
        );
        // A length past the end, and an unknown tag.
        assert!(Row::read(&[1, 0, V_TEXT, 9, 0, 0, 0, b'a'])
            .is_err_and(|(at, why)| at == 2 && why.contains("needs 9 more bytes")));
        assert_eq!(
            Row::read(&[1, 0, 9]).map(|_| ()),
            Err((2, "bad value tag 9".into()))
        );
        assert_eq!(
            Row::read(&[1, 0, V_BOOL, 2]).map(|_| ()),
            Err((2, "bad bool byte 2".into()))
        );
        assert!(Row::read(&[1, 0, V_VECTOR, 0xFF, 0xFF, 0xFF, 0xFF])
            .is_err_and(|(_, why)| why.contains("more bytes")));
    }

    /// The walk that finds a row's length (it is stored nowhere) over counts of every
    /// width: long text and vectors, and the most values a row can hold.
    #[test]
    fn rows_find_their_length_from_their_values() {
        let long_text = "é".repeat(40_000);
        let shapes: Vec<Vec<Value>> = vec![
            vec![],
            vec![Value::Null; 256],
            vec![Value::Text(long_text.clone()), Value::Int(7)],
            vec![
                Value::Vector(vec![0.5; 4096]),
                Value::Json("{}".into()),
                Value::Null,
            ],
            (0..256).map(|i| Value::Text("x".repeat(i))).collect(),
        ];
        for values in shapes {
            let row = Row::from_values(&values);
            let expected = 2 + values.iter().map(Value::stored_bytes).sum::<usize>();
            assert_eq!(row.encoded().len(), expected);
            assert_eq!(row.stored_bytes(), expected - 2);
            assert_eq!(
                (row.len(), row.values().len()),
                (values.len(), values.len())
            );
            assert!(row
                .values()
                .map(ValueRef::to_value)
                .eq(values.iter().cloned()));
            assert_eq!(row.values().nth(values.len()), None);
            let copy = row.clone();
            drop(row);
            assert_eq!(copy.to_values(), values);
        }
        let a = Row::from_values(&[Value::Text(long_text.clone())]);
        let mut other = long_text;
        other.pop();
        other.push('f');
        assert_ne!(a, Row::from_values(&[Value::Text(other)]));
        assert_eq!(a, a.clone());
    }

    #[test]
    fn keys_from_a_row_match_keys_from_its_values() {
        let values = vec![
            Value::Int(-5),
            Value::Text("a\0b".into()),
            Value::Float(-0.0),
            Value::Bool(true),
            Value::Null,
        ];
        let row = Row::from_values(&values);
        let columns = [3, 1, 0, 2, 4];
        let key = crate::value::encode_key(columns.iter().map(|&c| &values[c]));
        assert_eq!(row.key(&columns), key);
        assert_eq!(row.key_len(&columns), key.len());
        assert_eq!(row.tree_key(&columns).as_bytes(), key);
        assert_eq!(row.tree_key(&[0]).as_bytes(), row.key(&[0]));
    }
}
