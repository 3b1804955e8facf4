//! CRC-32C of a concatenation from the CRCs of its parts, in about a microsecond
//! whatever the parts' lengths, so a large frame's body is read once to seal it
//! (`frame::stamp_with_body_crc`).
//!
//! `crc32c::crc32c_combine` computes the same value, but it builds its operator for
//! the second part's length by squaring 32×32 bit matrices, which took 8.6 µs for a
//! 256 KiB part here: as long as reading the part again. This is the method of zlib
//! 1.2.12's `crc32_combine` (Mark Adler): multiply the first CRC by x^(8·len) modulo
//! the polynomial, with x^(2^k) modulo the polynomial precomputed for every k.

/// The CRC-32C polynomial, bit-reflected (as `crc32c` and the log's frames use it).
const POLY: u32 = 0x82F6_3B78;

/// `a · b` modulo the polynomial, both bit-reflected (x^0 is the top bit).
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut product = 0;
    loop {
        if a & m != 0 {
            product ^= b;
            if a & (m - 1) == 0 {
                return product;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `X2N[k]` is x^(2^k) modulo the polynomial.
const X2N: [u32; 64] = {
    let mut table = [0u32; 64];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 64 {
        table[k] = p;
        p = multiply(p, p);
        k += 1;
    }
    table
};

/// x^(8·bytes) modulo the polynomial: the operator that appends `bytes` zero bytes.
fn zeros_operator(bytes: usize) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut n = bytes as u64;
    let mut k = 3; // 8·bytes = bytes · 2^3
    while n != 0 {
        if n & 1 != 0 {
            p = multiply(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC-32C of `A` followed by `B`, from `crc32c(A)`, `crc32c(B)` and `B`'s length.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    multiply(zeros_operator(len_b), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn combines_as_one_pass_over_both_parts_would() {
        let bytes: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for split in [0, 1, 3, 4095, 4096, 65_536, 262_080, 299_999, 300_000] {
            let (a, b) = bytes.split_at(split);
            assert_eq!(
                combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                crc32c::crc32c(&bytes),
                "split at {split}"
            );
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_crates_combine(a: u32, b: u32, len in 0usize..(1 << 26)) {
            prop_assert_eq!(combine(a, b, len), crc32c::crc32c_combine(a, b, len));
        }

        #[test]
        fn any_split_of_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), at: usize) {
            let at = at % (bytes.len() + 1);
            let (a, b) = bytes.split_at(at);
            prop_assert_eq!(combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()), crc32c::crc32c(&bytes));
        }
    }
}
