//! Normalization: the text a plan is cached under. Literals (numbers and strings)
//! become placeholders numbered after the caller's own (`$n+1`, `$n+2`, …) and their
//! values become extra parameters; unquoted words are lower-cased; whitespace and
//! comments collapse. `WHERE id = 7` and `where id=8` share one plan. The same number
//! written twice is one placeholder, so `SELECT g + 1 … GROUP BY g + 1` still selects
//! the expression it groups by.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::{position, QueryError, QueryErrorKind};
use crate::value::Value;
use ahash::AHashMap;

/// Placeholders a query may use.
pub const MAX_PARAMS: usize = 4096;
/// Bytes of SQL text accepted.
pub const MAX_SQL_BYTES: usize = 64 * 1024;
/// Operators (symbols and infix keywords) a query may use. A flat chain `a + a + … + a` needs no
/// parentheses yet parses into a tree as deep as it is long, and every later walk
/// (binding, evaluation, dropping) recurses over that depth: the limit is checked
/// here, on tokens, before any tree exists.
pub const MAX_QUERY_OPERATORS: usize = 500;
/// Levels a query may nest: parentheses (function calls' included) and prefix operators
/// (`NOT`, unary `-` and `+`) in a row, each a recursion of the parser. Counted here, on
/// tokens, so the limit is the same whatever the parser's own accounting (which counts
/// some constructs twice, and turns some overruns into a syntax error).
pub const MAX_NESTING: usize = 64;
/// Items a query may list outside parentheses, in all: its SELECT, GROUP BY and ORDER BY
/// lists at their limits (`bind.rs`).
pub const MAX_TOP_LEVEL_ITEMS: usize = 512 + 32 + 32;
/// `LIKE` operators a query (or all of a migration's expressions) may use. Each one
/// reads its whole text, up to a row's 256 KiB, for every row: 220 of them held a
/// shard for 57 ms a row, so one query's rows starved every other tenant's there.
pub const MAX_LIKE_PER_QUERY: usize = 16;
/// Items of `IN` lists a query compares one by one on every row, in all: 20,000 of
/// them over 130 KB texts took 120 ms a row (the deadline is checked between rows).
/// As many as the 500 operators allow of `=` comparisons. The lists of WHERE that
/// hold [`VALUE_SET_MIN`](super::expr::VALUE_SET_MIN) or more constants or parameters
/// of one kind are looked up in a set instead, and do not count.
pub const MAX_IN_LIST_COMPARISONS: usize = 256;

/// A query ready for the plan cache.
#[derive(Debug, Clone)]
pub struct Normalized {
    /// The cache key.
    pub text: String,
    /// The tokens to parse on a cache miss (literals already replaced; spans point
    /// into the caller's text, so errors show the caller's positions).
    pub tokens: Vec<TokenWithSpan>,
    /// The highest `$n` the caller wrote.
    pub user_params: usize,
    /// Values of the replaced literals, in placeholder order after the caller's.
    pub literals: Vec<Value>,
    /// `LIKE` (and `ILIKE`) operators in the text.
    pub likes: usize,
    /// Each literal's placeholder, to give a repeated one the same.
    placeholders: AHashMap<LiteralKey, usize>,
}

/// A number literal as written: an int, or the bits of a float (so `0.0` and `-0.0`,
/// or `1` and `1.0`, stay apart).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LiteralKey {
    Int(i64),
    Float(u64),
}

pub fn normalize(sql: &str) -> Result<Normalized, QueryError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(QueryError::new(
            QueryErrorKind::Syntax,
            format!(
                "the query is {} bytes, above the limit of {MAX_SQL_BYTES}",
                sql.len()
            ),
        ));
    }
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| QueryError::new(QueryErrorKind::Syntax, format!("SQL syntax error: {e}")))?;
    let mut user_params = 0;
    for t in &tokens {
        if let Token::Placeholder(p) = &t.token {
            let n = p
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=MAX_PARAMS).contains(n))
                .ok_or_else(|| {
                    QueryError::new(
                        QueryErrorKind::Params,
                        format!(
                            "placeholder {p:?}{} is not one of $1..${MAX_PARAMS}",
                            position(t.span)
                        ),
                    )
                })?;
            user_params = user_params.max(n);
        }
    }
    let mut out = Normalized {
        text: String::with_capacity(sql.len()),
        tokens: Vec::with_capacity(tokens.len()),
        user_params,
        literals: Vec::new(),
        likes: 0,
        placeholders: AHashMap::new(),
    };
    let mut operators = 0;
    let mut top_level_commas = 0;
    let mut nesting = Nesting::default();
    let mut tokens = tokens
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF))
        .peekable();
    while let Some(TokenWithSpan { token, span }) = tokens.next() {
        let token = match token {
            Token::Number(text, _) => out.number(&text, false, span)?,
            // `-7` after an operator, `(`, `,` or a clause keyword is one literal, so
            // `x IN (-1, -2, …)` costs no operators and shares its plan with `x IN (1, 2)`.
            Token::Minus if minus_is_unary(out.tokens.last().map(|t| &t.token)) => {
                match tokens.next_if(|t| matches!(t.token, Token::Number(..))) {
                    Some(TokenWithSpan {
                        token: Token::Number(text, _),
                        span: number,
                    }) => out.number(&text, true, span.union(&number))?,
                    _ => Token::Minus,
                }
            }
            Token::SingleQuotedString(text) => out.literal(Value::Text(text)),
            Token::Word(mut word) if word.quote_style.is_none() => {
                word.value.make_ascii_lowercase();
                Token::Word(word)
            }
            other => other,
        };
        // In prefix position only: the NOT of `x NOT LIKE y` or `IS NOT NULL` joins.
        let prefix = match &token {
            Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::NOT => {
                minus_is_unary(out.tokens.last().map(|t| &t.token))
            }
            Token::Minus | Token::Plus => minus_is_unary(out.tokens.last().map(|t| &t.token)),
            _ => false,
        };
        if nesting.next(&token, prefix) > MAX_NESTING {
            return Err(QueryError::new(
                QueryErrorKind::TooComplex,
                format!(
                    "the query nests deeper than {MAX_NESTING} levels{} (parentheses, NOT, \
                     function calls); flatten it",
                    position(span)
                ),
            ));
        }
        if matches!(&token, Token::Word(w) if w.quote_style.is_none()
            && matches!(w.keyword, Keyword::LIKE | Keyword::ILIKE))
        {
            out.likes += 1;
            if out.likes > MAX_LIKE_PER_QUERY {
                return Err(QueryError::new(
                    QueryErrorKind::TooComplex,
                    format!(
                        "the query uses more than {MAX_LIKE_PER_QUERY} LIKE operators{} (each \
                         reads its whole text for every row); combine the patterns, or narrow \
                         the rows with other conditions",
                        position(span)
                    ),
                ));
            }
        }
        // The lists outside parentheses (SELECT, GROUP BY, ORDER BY) are bounded by the
        // binder; their commas are counted here too, so a list far past those bounds
        // is refused before it is parsed (20,000 keys took 44 ms to parse).
        if token == Token::Comma && nesting.open.is_empty() {
            top_level_commas += 1;
            if top_level_commas > MAX_TOP_LEVEL_ITEMS {
                return Err(QueryError::new(
                    QueryErrorKind::TooComplex,
                    format!(
                        "the query lists more than {MAX_TOP_LEVEL_ITEMS} items outside \
                         parentheses{} (SELECT takes at most 512, GROUP BY and ORDER BY 32 \
                         each)",
                        position(span)
                    ),
                ));
            }
        }
        if is_operator(&token) {
            operators += 1;
            if operators > MAX_QUERY_OPERATORS {
                return Err(QueryError::new(
                    QueryErrorKind::TooComplex,
                    format!(
                        "the query uses more than {MAX_QUERY_OPERATORS} operators{} (the limit bounds the depth of its expression tree); split it or pass values as parameters",
                        position(span)
                    ),
                ));
            }
        }
        if !out.text.is_empty() {
            out.text.push(' ');
        }
        out.text.push_str(&token.to_string());
        out.tokens.push(TokenWithSpan { token, span });
    }
    Ok(out)
}

/// How deep the tokens so far nest: open parentheses, and the prefix operators in a
/// row before each operand (`NOT NOT (- x)` is four levels at `x`).
#[derive(Default)]
struct Nesting {
    /// The prefix run in front of each open parenthesis.
    open: Vec<usize>,
    /// Prefix operators in a row just before this token.
    run: usize,
    /// The sum of `open`.
    outer_runs: usize,
}

impl Nesting {
    /// Takes `token` (a prefix operator when `prefix`) and returns the depth there.
    fn next(&mut self, token: &Token, prefix: bool) -> usize {
        match token {
            Token::LParen => {
                self.open.push(self.run);
                self.outer_runs += self.run;
                self.run = 0;
            }
            Token::RParen => {
                let outer = self.open.pop().unwrap_or(0);
                self.outer_runs -= outer;
                self.run = 0;
            }
            _ if prefix => self.run += 1,
            _ => self.run = 0,
        }
        self.open.len() + self.outer_runs + self.run
    }
}

/// Keywords the parser reads as infix operators (sqlparser's precedence table for
/// PostgreSQL): each joins two expressions in a loop, not a recursion, so a chain of
/// them is not bounded by the parser's nesting limit.
const INFIX_KEYWORDS: [Keyword; 22] = [
    Keyword::OR,
    Keyword::AND,
    Keyword::XOR,
    Keyword::AT,
    Keyword::NOT,
    Keyword::NOTNULL,
    Keyword::IS,
    Keyword::GLOBAL,
    Keyword::IN,
    Keyword::BETWEEN,
    Keyword::OVERLAPS,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::RLIKE,
    Keyword::REGEXP,
    Keyword::MATCH,
    Keyword::GLOB,
    Keyword::SIMILAR,
    Keyword::MEMBER,
    Keyword::OPERATOR,
    Keyword::DIV,
    Keyword::COLLATE,
];

/// Whether a token can join expressions, and so add a level to the tree the parser
/// builds: every symbol and infix keyword, but not names (even those that are also
/// keywords, like `id` or `name`), parameters, commas or parentheses. Prefix operators
/// (`NOT`, `-`) and parentheses recurse in the parser, which bounds them itself.
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(w) => w.quote_style.is_none() && INFIX_KEYWORDS.contains(&w.keyword),
        Token::Placeholder(_)
        | Token::Comma
        | Token::LParen
        | Token::RParen
        | Token::SemiColon
        | Token::Whitespace(_)
        | Token::EOF => false,
        _ => true,
    }
}

/// Whether a `-` after `prev` negates what follows rather than subtracting it.
fn minus_is_unary(prev: Option<&Token>) -> bool {
    match prev {
        None => true,
        Some(Token::Word(w)) => {
            w.quote_style.is_none()
                && matches!(
                    w.keyword,
                    Keyword::SELECT
                        | Keyword::WHERE
                        | Keyword::WHEN
                        | Keyword::THEN
                        | Keyword::ELSE
                        | Keyword::BY
                        | Keyword::LIMIT
                        | Keyword::OFFSET
                        | Keyword::AND
                        | Keyword::OR
                        | Keyword::NOT
                        | Keyword::IN
                        | Keyword::BETWEEN
                        | Keyword::HAVING
                        | Keyword::LIKE
                )
        }
        Some(
            Token::LParen
            | Token::Comma
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod,
        ) => true,
        Some(_) => false,
    }
}

impl Normalized {
    fn number(
        &mut self,
        text: &str,
        negative: bool,
        span: sqlparser::tokenizer::Span,
    ) -> Result<Token, QueryError> {
        let signed;
        let text = if negative {
            signed = format!("-{text}");
            signed.as_str()
        } else {
            text
        };
        let value = match text.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Value::Float(f),
                // Digits only (and a point, an exponent): no hex, no separators.
                _ if !text
                    .trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
                {
                    return Err(QueryError::new(
                        QueryErrorKind::Syntax,
                        format!(
                            "number {text:?}{} is not a decimal number: write it in digits, \
                             without a 0x prefix or _ separators",
                            position(span)
                        ),
                    ))
                }
                _ => {
                    return Err(QueryError::new(
                        QueryErrorKind::Syntax,
                        format!("number {text:?}{} is out of range", position(span)),
                    ))
                }
            },
        };
        Ok(self.literal(value))
    }

    fn literal(&mut self, value: Value) -> Token {
        // Numbers only: a text may be read as a vector in one place and as a text in
        // another, which one parameter cannot be.
        let key = match &value {
            Value::Int(i) => Some(LiteralKey::Int(*i)),
            Value::Float(f) => Some(LiteralKey::Float(f.to_bits())),
            _ => None,
        };
        let next = self.literals.len() + 1;
        let n = match key {
            Some(key) => *self.placeholders.entry(key).or_insert(next),
            None => next,
        };
        if n == next {
            self.literals.push(value);
        }
        Token::Placeholder(format!("${}", self.user_params + n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_differing_only_in_literals_and_spacing_share_a_text() {
        let a = normalize("SELECT name FROM t WHERE id = 7 AND name = 'x'").expect("valid");
        let b = normalize("select  name\nfrom t -- comment\n where id=8 and NAME = 'it''s'")
            .expect("valid");
        assert_eq!(a.text, b.text);
        assert_eq!(a.text, "select name from t where id = $1 and name = $2");
        assert_eq!(b.literals, vec![Value::Int(8), Value::Text("it's".into())]);
    }

    #[test]
    fn a_literal_written_twice_is_one_placeholder_and_only_the_same_literal_is() {
        let n = normalize("SELECT g + 1, COUNT(*) FROM t WHERE s = 'a' OR s = 'a' GROUP BY g + 1")
            .expect("valid");
        assert_eq!(n.text.matches("$1").count(), 2, "{}", n.text);
        // Texts stay apart: one may be read as a vector and the other as a text.
        assert_eq!(
            n.literals,
            vec![
                Value::Int(1),
                Value::Text("a".into()),
                Value::Text("a".into())
            ]
        );
        // An int and the float it equals, or 0.0 and -0.0, are different literals.
        let n = normalize("SELECT 1, 1.0, 0.0, -0.0, -1, 1").expect("valid");
        assert_eq!(
            n.literals,
            vec![
                Value::Int(1),
                Value::Float(1.0),
                Value::Float(0.0),
                Value::Float(-0.0),
                Value::Int(-1)
            ]
        );
        assert_eq!(n.text, "select $1 , $2 , $3 , $4 , $5 , $1");
    }

    #[test]
    fn more_like_operators_than_the_limit_are_refused_by_name() {
        let query = |n: usize| {
            let likes = vec!["s NOT LIKE '%zz'"; n].join(" AND ");
            format!("SELECT id FROM t WHERE {likes}")
        };
        assert_eq!(
            normalize(&query(MAX_LIKE_PER_QUERY))
                .expect("at the limit")
                .likes,
            16
        );
        let e = normalize(&query(MAX_LIKE_PER_QUERY + 1)).expect_err("past it");
        assert_eq!(e.kind, QueryErrorKind::TooComplex);
        assert!(e.message.contains("16 LIKE"), "{}", e.message);
        // A word `like` in a string or a quoted name is not an operator.
        let n = normalize("SELECT \"like\" FROM t WHERE s = 'like'").expect("valid");
        assert_eq!(n.likes, 0);
    }

    #[test]
    fn literals_are_numbered_after_the_callers_placeholders() {
        let n = normalize("SELECT * FROM t WHERE a = $2 AND b > 1.5 LIMIT 10").expect("valid");
        assert_eq!(n.user_params, 2);
        assert_eq!(n.text, "select * from t where a = $2 and b > $3 limit $4");
        assert_eq!(n.literals, vec![Value::Float(1.5), Value::Int(10)]);
    }

    #[test]
    fn bad_placeholders_and_huge_numbers_are_refused() {
        assert_eq!(
            normalize("select $0").expect_err("refused").kind,
            QueryErrorKind::Params
        );
        assert_eq!(
            normalize("select $x").map(|_| ()).map_err(|e| e.kind).err(),
            Some(QueryErrorKind::Params)
        );
        let e = normalize("select 1e999").expect_err("refused");
        assert!(e.message.contains("out of range"), "{e}");
        assert!(normalize("select 'unterminated").is_err());
    }

    #[test]
    fn quoted_identifiers_keep_their_case() {
        let n = normalize("SELECT \"Name\" FROM T").expect("valid");
        assert_eq!(n.text, "select \"Name\" from t");
    }
}
