//! Normalization: the text a plan is cached under. Literals (numbers and strings)
//! become placeholders numbered after the caller's own (`$n+1`, `$n+2`, …) and their
//! values become extra parameters; unquoted words are lower-cased; whitespace and
//! comments collapse. `WHERE id = 7` and `where id=8` share one plan.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use super::{position, QueryError, QueryErrorKind};
use crate::value::Value;

/// Placeholders a query may use.
pub const MAX_PARAMS: usize = 4096;
/// Bytes of SQL text accepted.
pub const MAX_SQL_BYTES: usize = 64 * 1024;

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
    };
    for TokenWithSpan { token, span } in tokens {
        let token = match token {
            Token::Whitespace(_) | Token::EOF => continue,
            Token::Number(text, _) => {
                let value = match text.parse::<i64>() {
                    Ok(i) => Value::Int(i),
                    Err(_) => match text.parse::<f64>() {
                        Ok(f) if f.is_finite() => Value::Float(f),
                        _ => {
                            return Err(QueryError::new(
                                QueryErrorKind::Syntax,
                                format!("number {text:?}{} is out of range", position(span)),
                            ))
                        }
                    },
                };
                out.literal(value)
            }
            Token::SingleQuotedString(text) => out.literal(Value::Text(text)),
            Token::Word(mut word) if word.quote_style.is_none() => {
                word.value.make_ascii_lowercase();
                Token::Word(word)
            }
            other => other,
        };
        if !out.text.is_empty() {
            out.text.push(' ');
        }
        out.text.push_str(&token.to_string());
        out.tokens.push(TokenWithSpan { token, span });
    }
    Ok(out)
}

impl Normalized {
    fn literal(&mut self, value: Value) -> Token {
        self.literals.push(value);
        Token::Placeholder(format!("${}", self.user_params + self.literals.len()))
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
