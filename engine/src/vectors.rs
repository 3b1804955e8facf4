//! The distance kernels of vector search. A vector is stored once, in its row (as
//! little-endian floats, FORMAT.md §5), and an exact kNN scan reads it there: the
//! kernels take either floats or those bytes ([`Floats`]), one code path for both, so
//! a distance computed from a row and from a decoded value agree to the bit.

/// A vector as the kernels read it, eight floats at a time.
pub trait Floats {
    fn count(&self) -> usize;
    /// Floats `8 * chunk .. 8 * chunk + 8`.
    fn eight(&self, chunk: usize) -> [f32; 8];
    fn at(&self, i: usize) -> f32;
}

impl Floats for [f32] {
    fn count(&self) -> usize {
        self.len()
    }

    #[inline]
    fn eight(&self, chunk: usize) -> [f32; 8] {
        let mut out = [0.0; 8];
        out.copy_from_slice(&self[8 * chunk..8 * chunk + 8]);
        out
    }

    fn at(&self, i: usize) -> f32 {
        self[i]
    }
}

/// A row's vector: its floats as little-endian bytes (`ValueRef::Vector`), read in
/// place (a row's buffer keeps no alignment for `f32`; on x86-64 this is a plain
/// unaligned load).
pub struct LeFloats<'a>(pub &'a [u8]);

impl Floats for LeFloats<'_> {
    fn count(&self) -> usize {
        self.0.len() / 4
    }

    #[inline]
    fn eight(&self, chunk: usize) -> [f32; 8] {
        let mut out = [0.0; 8];
        for (x, b) in out
            .iter_mut()
            .zip(self.0[32 * chunk..32 * chunk + 32].chunks_exact(4))
        {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        out
    }

    fn at(&self, i: usize) -> f32 {
        let b = &self.0[4 * i..4 * i + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Squared Euclidean distance. Eight independent accumulators let the compiler keep
/// the loop in SIMD registers without reassociating floating-point sums itself.
pub fn l2_squared<A: Floats + ?Sized, B: Floats + ?Sized>(a: &A, b: &B) -> f32 {
    debug_assert_eq!(a.count(), b.count());
    let n = a.count().min(b.count());
    let mut acc = [0.0f32; 8];
    for chunk in 0..n / 8 {
        let (x, y) = (a.eight(chunk), b.eight(chunk));
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in n / 8 * 8..n {
        let d = a.at(i) - b.at(i);
        sum += d * d;
    }
    sum
}

/// Dot product, the same way.
pub fn dot<A: Floats + ?Sized, B: Floats + ?Sized>(a: &A, b: &B) -> f32 {
    debug_assert_eq!(a.count(), b.count());
    let n = a.count().min(b.count());
    let mut acc = [0.0f32; 8];
    for chunk in 0..n / 8 {
        let (x, y) = (a.eight(chunk), b.eight(chunk));
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in n / 8 * 8..n {
        sum += a.at(i) * b.at(i);
    }
    sum
}

/// The smallest sum of squares the `f32` kernels are trusted with: what squares below
/// `f32`'s normal range (about 1.2e-38) lose, at most 4096 of them (the largest
/// dimension), is under a billionth of it.
const SMALLEST_F32_SUM: f32 = 1e-25;

/// Squared Euclidean distance as kNN ranks by: [`l2_squared`] for every pair whose
/// sum stays well inside `f32`'s range, computed again in `f64` for the others (a sum
/// that overflows, with components beyond about 1e19, or one so small that squares
/// fall below `f32`'s normal floats). No pair of `f32` vectors of the largest
/// dimension overflows `f64`.
pub fn l2_rank<A: Floats + ?Sized, B: Floats + ?Sized>(a: &A, b: &B) -> f64 {
    let rank = l2_squared(a, b);
    if rank.is_finite() && rank >= SMALLEST_F32_SUM {
        return f64::from(rank);
    }
    (0..a.count().min(b.count()))
        .map(|i| {
            let d = f64::from(a.at(i)) - f64::from(b.at(i));
            d * d
        })
        .sum()
}

/// Cosine distance `1 - cos(a, b)`; `None` when either vector is all zeroes (the
/// angle is undefined). In `f32` for every pair whose norms stay well inside its
/// range, in `f64` for the others (components beyond about 1e9, or below about 1e-12),
/// as [`l2_rank`] does.
pub fn cosine_distance<A: Floats + ?Sized, B: Floats + ?Sized>(a: &A, b: &B) -> Option<f64> {
    let (aa, bb, across) = (dot(a, a), dot(b, b), dot(a, b));
    let norms = aa * bb;
    if aa >= SMALLEST_F32_SUM && bb >= SMALLEST_F32_SUM && norms.is_finite() && across.is_finite() {
        return Some(f64::from(1.0 - across / norms.sqrt()));
    }
    let (aa, bb) = (dot_f64(a, a), dot_f64(b, b));
    let norms = aa * bb;
    (norms > 0.0).then(|| 1.0 - dot_f64(a, b) / norms.sqrt())
}

/// [`dot`] in `f64`, one float at a time (the rare pairs out of `f32`'s range).
fn dot_f64<A: Floats + ?Sized, B: Floats + ?Sized>(a: &A, b: &B) -> f64 {
    (0..a.count().min(b.count()))
        .map(|i| f64::from(a.at(i)) * f64::from(b.at(i)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
            let (a, b) = (a.as_slice(), b.as_slice());
            prop_assert!((f64::from(l2_squared(a, b)) - l2).abs() <= tolerance(l2));
            prop_assert!((f64::from(dot(a, b)) - d).abs() <= tolerance(d) + 1e-2);
            // Read from a row's bytes, the same bits.
            let le: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
            let le = LeFloats(&le);
            prop_assert_eq!(l2_squared(a, &le).to_bits(), l2_squared(a, b).to_bits());
            prop_assert_eq!(dot(a, &le).to_bits(), dot(a, b).to_bits());
            prop_assert_eq!(
                cosine_distance(a, &le).map(f64::to_bits),
                cosine_distance(a, b).map(f64::to_bits)
            );
        }
    }

    #[test]
    fn cosine_distance_is_undefined_for_a_zero_vector() {
        assert_eq!(cosine_distance(&[0.0, 0.0][..], &[1.0, 0.0][..]), None);
        let d = cosine_distance(&[1.0, 0.0][..], &[0.0, 2.0][..]).expect("defined");
        assert!((d - 1.0).abs() < 1e-6);
        let d = cosine_distance(&[1.0, 1.0][..], &[2.0, 2.0][..]).expect("defined");
        assert!(d.abs() < 1e-6);
    }
}
