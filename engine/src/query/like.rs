//! SQL `LIKE` in time linear in the text: the pattern becomes a bit-parallel automaton
//! (shift-and), one bit per pattern position, so each character of the text costs a
//! few word operations whatever the pattern holds. A backtracking matcher costs
//! text × pattern on `%a%a%a…b` and let one query hold a shard for minutes.
//!
//! A pattern without `_` (the usual `abc%`, `%abc`, `%abc%`) is matched without the
//! automaton: its first run of literals as a prefix, its last as a suffix, and those
//! between, in order, each where it first occurs (SIMD substring search): `%abc` costs
//! nothing per text byte, `%abc%` a fraction of what the automaton does.
//!
//! `%` matches any run of characters, `_` exactly one character (not one byte); there
//! is no escape character (the binder refuses `ESCAPE`). Matching is case-sensitive.

use std::cell::RefCell;

/// Characters a pattern may have. The automaton has one bit per literal or `_`, so
/// this bounds the words each text character costs.
pub const MAX_LIKE_PATTERN_CHARS: usize = 256;
/// Words of bits a state needs at most (one bit per element, plus bit 0).
const MAX_WORDS: usize = MAX_LIKE_PATTERN_CHARS / 64 + 1;
const NO_BITS: [u64; MAX_WORDS] = [0; MAX_WORDS];

/// A compiled pattern. Bit `j` of a state means "the first `j` non-`%` elements of the
/// pattern match a prefix of the text read so far".
#[derive(Debug, Clone)]
pub struct LikePattern {
    source: String,
    /// Elements that are not `%` (`k`); bit `k` set at the end means a match.
    elements: usize,
    words: usize,
    /// Bits `j` (1..=k) whose element is `_`.
    any: Vec<u64>,
    /// Bits `j` (0..=k) followed by a `%`: the state may stay there on any character.
    star: Vec<u64>,
    /// Bits `j` whose element is the ASCII character `c`, at `c * words`.
    ascii: Vec<u64>,
    /// The same for other characters, sorted by character (a binary search per
    /// text character: at most 8 steps for the 256 a pattern may have).
    other: Vec<(char, Vec<u64>)>,
    /// For a pattern without `_`: its runs of literals between the `%`s.
    runs: Option<Vec<String>>,
}

fn set(bits: &mut [u64], j: usize) {
    bits[j / 64] |= 1 << (j % 64);
}

impl LikePattern {
    /// Compiles a pattern; a pattern over [`MAX_LIKE_PATTERN_CHARS`] is refused.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let chars = pattern.chars().count();
        if chars > MAX_LIKE_PATTERN_CHARS {
            return Err(format!(
                "the LIKE pattern has {chars} characters, above the limit of {MAX_LIKE_PATTERN_CHARS}"
            ));
        }
        let elements = pattern.chars().filter(|&c| c != '%').count();
        let words = elements / 64 + 1;
        let mut p = LikePattern {
            source: pattern.to_string(),
            elements,
            words,
            any: vec![0; words],
            star: vec![0; words],
            ascii: vec![0; 128 * words],
            other: Vec::new(),
            runs: (!pattern.contains('_')).then(|| pattern.split('%').map(String::from).collect()),
        };
        let mut j = 0;
        for c in pattern.chars() {
            match c {
                '%' => set(&mut p.star, j),
                '_' => {
                    j += 1;
                    set(&mut p.any, j);
                }
                c => {
                    j += 1;
                    if c.is_ascii() {
                        let at = c as usize * words;
                        set(&mut p.ascii[at..at + words], j);
                    } else {
                        match p.other.binary_search_by_key(&c, |(o, _)| *o) {
                            Ok(at) => set(&mut p.other[at].1, j),
                            Err(at) => {
                                let mut bits = vec![0; words];
                                set(&mut bits, j);
                                p.other.insert(at, (c, bits));
                            }
                        }
                    }
                }
            }
        }
        debug_assert_eq!(j, elements);
        Ok(p)
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        match &self.runs {
            Some(runs) => matches_runs(runs, text.as_bytes()),
            None => self.matches_by_automaton(text),
        }
    }

    fn matches_by_automaton(&self, text: &str) -> bool {
        let w = self.words;
        let mut state = [0u64; MAX_WORDS];
        state[0] = 1;
        for c in text.chars() {
            let literal: &[u64] = if c.is_ascii() {
                &self.ascii[c as usize * w..(c as usize + 1) * w]
            } else {
                self.other
                    .binary_search_by_key(&c, |(o, _)| *o)
                    .map_or(&NO_BITS[..w], |at| &self.other[at].1)
            };
            let mut carry = 0;
            let mut alive = 0;
            for i in 0..w {
                let shifted = (state[i] << 1) | carry;
                carry = state[i] >> 63;
                let next = (shifted & (literal[i] | self.any[i])) | (state[i] & self.star[i]);
                state[i] = next;
                alive |= next;
            }
            if alive == 0 {
                return false;
            }
        }
        let k = self.elements;
        state[k / 64] & (1 << (k % 64)) != 0
    }
}

/// `text` against `runs`, a pattern without `_` split at its `%`s. Greedy is exact
/// here: with only `%` between them, each middle run may as well match where it first
/// occurs, which leaves the most text for the runs after it. Bytes match as characters
/// do: a run is whole UTF-8, so it cannot match from inside a character.
fn matches_runs(runs: &[String], text: &[u8]) -> bool {
    let [first, middle @ .., last] = runs else {
        return text == runs.first().map_or(&[][..], |r| r.as_bytes());
    };
    let Some(rest) = text.strip_prefix(first.as_bytes()) else {
        return false;
    };
    let Some(mut between) = rest.strip_suffix(last.as_bytes()) else {
        return false;
    };
    for run in middle.iter().filter(|r| !r.is_empty()) {
        match memchr::memmem::find(between, run.as_bytes()) {
            Some(at) => between = &between[at + run.len()..],
            None => return false,
        }
    }
    true
}

thread_local! {
    /// The last pattern compiled on this thread: a query's pattern is usually one
    /// parameter for every row, so it is compiled once, not once per row.
    static LAST: RefCell<Option<LikePattern>> = const { RefCell::new(None) };
}

/// `text LIKE pattern`, compiling the pattern only when it differs from the last one.
pub fn like(text: &str, pattern: &str) -> Result<bool, String> {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.as_ref().is_none_or(|p| p.source != pattern) {
            *last = Some(LikePattern::new(pattern)?);
        }
        Ok(last.as_ref().is_some_and(|p| p.matches(text)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook recursive definition, exponential but obviously right.
    fn reference(s: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('%', rest)) => (0..=s.len()).any(|i| reference(&s[i..], rest)),
            Some(('_', rest)) => !s.is_empty() && reference(&s[1..], rest),
            Some((c, rest)) => s.first() == Some(c) && reference(&s[1..], rest),
        }
    }

    fn like_ok(s: &str, p: &str) -> bool {
        like(s, p).expect("a pattern within the limit")
    }

    #[test]
    fn matches_percent_and_underscore() {
        for (s, p, want) in [
            ("abc", "a%", true),
            ("abc", "%c", true),
            ("abc", "a_c", true),
            ("abc", "a_", false),
            ("abc", "%", true),
            ("", "%", true),
            ("", "", true),
            ("a", "", false),
            ("", "_", false),
            ("aXbXc", "a%b%c", true),
            ("abc", "ABC", false),
            ("héllo", "h_llo", true),
            ("héllo", "h%o", true),
            ("mississippi", "%iss%ppi", true),
            ("mississippi", "%iss%ppx", false),
            ("abc", "abc", true),
            ("abcd", "abc", false),
            ("ab", "a%b%", true),
            ("aba", "ab%ba", false),
            ("abba", "ab%ba", true),
            ("aaa", "%aa%aa%", false),
            ("aaaa", "%aa%aa%", true),
        ] {
            assert_eq!(like_ok(s, p), want, "{s:?} LIKE {p:?}");
        }
    }

    #[test]
    fn patterns_longer_than_a_word_of_bits_match() {
        let p = "a_".repeat(100);
        let s = "ab".repeat(100);
        assert!(like_ok(&s, &p));
        assert!(!like_ok(&s[1..], &p));
        let wide = format!("{}%z", "_".repeat(70));
        assert!(like_ok(&format!("{}yyyz", "x".repeat(70)), &wide));
        assert!(!like_ok(&"x".repeat(75), &wide));
    }

    #[test]
    fn a_pattern_over_the_limit_is_refused_by_name() {
        let e = like("x", &"%".repeat(MAX_LIKE_PATTERN_CHARS + 1)).expect_err("refused");
        assert!(e.contains("256"), "{e}");
        assert!(like("x", &"%".repeat(MAX_LIKE_PATTERN_CHARS)).is_ok());
    }

    proptest! {
        #[test]
        fn agrees_with_the_recursive_definition(
            s in "[abé]{0,12}",
            p in "[abé%_]{0,8}",
        ) {
            let (sc, pc): (Vec<char>, Vec<char>) = (s.chars().collect(), p.chars().collect());
            prop_assert_eq!(like_ok(&s, &p), reference(&sc, &pc), "{:?} LIKE {:?}", s, p);
        }

        /// Patterns without `_` take the run matcher: the same answers.
        #[test]
        fn runs_agree_with_the_recursive_definition(
            s in "[abé]{0,12}",
            p in "[abé%]{0,8}",
        ) {
            let (sc, pc): (Vec<char>, Vec<char>) = (s.chars().collect(), p.chars().collect());
            prop_assert_eq!(like_ok(&s, &p), reference(&sc, &pc), "{:?} LIKE {:?}", s, p);
            let compiled = LikePattern::new(&p).expect("within the limit");
            prop_assert!(compiled.runs.is_some());
            prop_assert_eq!(compiled.matches(&s), compiled.matches_by_automaton(&s));
        }
    }
}
