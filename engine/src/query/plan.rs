//! The planner: picks how rows are found (primary-key point or range, secondary-index
//! point or range, full scan, vector kNN) and how they are ordered (by the access
//! path itself, by sorting, by a top-k heap), and says why.
//!
//! Only top-level `AND`ed conditions of the form `column op <constant>` (a parameter,
//! a literal or arithmetic on them), `column IN (…)` and `column BETWEEN … AND …` steer
//! the access path. The whole WHERE clause is still evaluated on every row the path
//! yields, so the path only has to never miss a row, and a bound whose value turns out
//! unusable at run time (NULL, the wrong type) widens or empties the range safely.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use super::bind::{bind, Bound};
use super::expr::{CmpOp, Expr, Metric};
use super::normalize::{Normalized, MAX_NESTING};
use super::{QueryError, QueryErrorKind};
use crate::schema::TableSchema;
use crate::table::ScanTarget;
use crate::tenant::Tenant;
use crate::value::{ColumnType, Value};

/// The parser's own bound on its recursion (deeper input is refused, not a stack
/// overflow): a backstop above [`MAX_NESTING`], which `normalize` checks on tokens first,
/// because the parser counts some levels twice.
const PARSER_RECURSION_LIMIT: usize = 2 * MAX_NESTING;

/// How rows are found.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// A walk of the primary key or an index: the leading columns fixed by `eq`, then
    /// optionally the next column fixed by an IN list or bounded by a range.
    Keys {
        target: ScanTarget,
        /// Types of the target's columns, in key order (bounds are converted to them).
        key_types: Vec<ColumnType>,
        eq: Vec<Expr>,
        in_list: Option<Vec<Expr>>,
        /// (bound, inclusive)
        lower: Option<(Expr, bool)>,
        upper: Option<(Expr, bool)>,
    },
    /// An exact nearest-neighbour scan of every row's vector in a vector column.
    Knn {
        column: usize,
        query: Expr,
        metric: Metric,
    },
}

/// How the output gets its ORDER BY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderBy {
    /// No ORDER BY: rows stream out in access order.
    Unordered,
    /// The access path already yields rows in ORDER BY order; LIMIT stops the scan.
    ByAccess,
    /// Sort everything (or keep the best OFFSET+LIMIT rows when there is a LIMIT).
    Sort,
    /// The kNN scan ranks by distance itself.
    Knn,
}

/// A planned query: what the plan cache holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub query: Bound,
    pub access: Access,
    pub order: OrderBy,
    /// The access path in words, with the reason it was chosen.
    pub access_detail: String,
    /// The normalized text (the cache key).
    pub normalized: String,
    /// Parameters the caller must send (`$1..$n`).
    pub user_params: usize,
}

impl Prepared {
    /// Calls `f` on every expression of the plan and every sub-expression.
    pub fn visit_exprs(&self, f: &mut impl FnMut(&Expr)) {
        let q = &self.query;
        let mut roots: Vec<&Expr> = Vec::new();
        roots.extend(q.filter.iter());
        roots.extend(q.projection.iter());
        roots.extend(q.order_by.iter().map(|k| &k.expr));
        roots.extend(q.limit.iter());
        roots.extend(q.offset.iter());
        if let Some(a) = &q.aggregation {
            roots.extend(a.group_by.iter());
            roots.extend(a.aggregates.iter().filter_map(|a| a.arg.as_ref()));
            roots.extend(a.having.iter());
        }
        match &self.access {
            Access::Keys {
                eq,
                in_list,
                lower,
                upper,
                ..
            } => {
                roots.extend(eq.iter());
                roots.extend(in_list.iter().flatten());
                roots.extend(lower.iter().chain(upper.iter()).map(|(e, _)| e));
            }
            Access::Knn { query, .. } => roots.push(query),
        }
        for root in roots {
            root.visit(f);
        }
    }
}

/// A parser message with the placeholder it found (`found: $3`) shown as the literal
/// the caller wrote there, when normalizing put it in its place.
fn as_written(message: &str, normalized: &Normalized) -> String {
    const FOUND: &str = "found: $";
    let Some(at) = message.find(FOUND) else {
        return message.to_string();
    };
    let digits_at = at + FOUND.len();
    let digits = message[digits_at..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    let literal = message[digits_at..digits_at + digits]
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(normalized.user_params + 1))
        .and_then(|i| normalized.literals.get(i));
    let Some(literal) = literal else {
        return message.to_string();
    };
    let shown = match literal {
        Value::Text(t) => {
            let t: String = t.chars().take(64).collect();
            format!("'{}'", t.replace('\'', "''"))
        }
        other => other.to_json().to_string(),
    };
    format!(
        "{}found: {shown}{}",
        &message[..at],
        &message[digits_at + digits..]
    )
}

/// Parses, binds and plans a normalized query against the tenant's schema.
pub fn prepare(tenant: &Tenant, normalized: &Normalized) -> Result<Prepared, QueryError> {
    // The syntax tree lives and dies in here: parsing, binding and dropping it recurse
    // over its depth, inside a stack of its own (a plan-cache miss only).
    super::with_plan_stack(|| prepare_on_this_stack(tenant, normalized))
}

fn prepare_on_this_stack(tenant: &Tenant, normalized: &Normalized) -> Result<Prepared, QueryError> {
    let dialect = PostgreSqlDialect {};
    let statements = Parser::new(&dialect)
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .with_tokens_with_locations(normalized.tokens.clone())
        .parse_statements()
        .map_err(|e| match e {
            ParserError::RecursionLimitExceeded => QueryError::new(
                QueryErrorKind::TooComplex,
                format!("the query nests too deep for the parser (parentheses, NOT, function calls: at most {MAX_NESTING} levels); flatten it"),
            ),
            e => QueryError::new(
                QueryErrorKind::Syntax,
                format!("SQL syntax error: {}", as_written(&e.to_string(), normalized)),
            ),
        })?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => {
            return Err(QueryError::new(
                QueryErrorKind::Syntax,
                "the query is empty",
            ))
        }
        _ => {
            return Err(QueryError::new(
                QueryErrorKind::Unsupported,
                "send one statement per request",
            ))
        }
    };
    let mut query = bind(tenant, statement)?;
    let table = tenant
        .table(&query.table)
        .map_err(|e| QueryError::new(QueryErrorKind::UnknownTable, e.to_string()))?;
    let (access, order, access_detail) = match query.dual_read {
        None => choose(table.schema(), &query, true),
        Some(id) => dual_read_plan(tenant, table, &mut query, id)?,
    };
    Ok(Prepared {
        query,
        access,
        order,
        access_detail,
        normalized: normalized.text.clone(),
        user_params: normalized.user_params,
    })
}

/// The plan of a query that reads a table's new shape while migration `id` runs on it
/// (dual read): the rows are the old ones, transformed as they are read. Their key is
/// the same (a migration never changes it); an old index serves only if every column
/// it indexes keeps its values (the table maintains it over the old shape); the new
/// indexes are not complete until the cutover. The kNN scan reads vectors as stored,
/// not in the new shape, so an ORDER BY distance sorts the rows read instead, leaving
/// out those without a distance as the kNN path does.
fn dual_read_plan(
    tenant: &Tenant,
    table: &crate::table::Table,
    query: &mut Bound,
    id: u64,
) -> Result<(Access, OrderBy, String), QueryError> {
    let migration = tenant
        .migrations()
        .active(&query.table)
        .filter(|m| m.info.id == id)
        .ok_or_else(|| {
            QueryError::new(
                QueryErrorKind::TableChanged,
                format!(
                    "migration {id} of table {:?} ended meanwhile; retry",
                    query.table
                ),
            )
        })?;
    let mut schema = migration.target_schema().clone();
    let mut old_ids = Vec::new();
    schema.indexes.clear();
    for (old_id, index) in table.schema().indexes.iter().enumerate() {
        let columns: Option<Vec<usize>> = index
            .columns
            .iter()
            .map(|&c| migration.unchanged_position(c))
            .collect();
        if let Some(columns) = columns {
            schema.indexes.push(crate::schema::IndexDef {
                name: index.name.clone(),
                columns,
            });
            old_ids.push(old_id);
        }
    }
    // Where the new shape's own table would take the kNN path, the sort must leave
    // out what kNN leaves out.
    if let (Access::Knn { .. }, [key]) = (&choose(&schema, query, true).0, &*query.order_by) {
        let has_distance = Expr::IsNull(Box::new(key.expr.clone()), true);
        query.filter = Some(match query.filter.take() {
            Some(f) => Expr::And(Box::new(f), Box::new(has_distance)),
            None => has_distance,
        });
    }
    let (mut access, order, detail) = choose(&schema, query, false);
    if let Access::Keys {
        target: ScanTarget::Index(i),
        ..
    } = &mut access
    {
        *i = old_ids[*i];
    }
    let detail = format!(
        "{detail}; dual read: migration {id} runs on this table, so each row read is \
         transformed to its new shape (until its cutover only the key and the indexes of \
         columns it keeps as they are serve)"
    );
    Ok((access, order, detail))
}

/// One condition that can bound a key column.
enum Condition<'a> {
    Cmp(CmpOp, &'a Expr),
    In(&'a [Expr]),
}

/// The conditions on each column, from the top-level AND of `filter`.
fn conditions(filter: Option<&Expr>, columns: usize) -> Vec<Vec<Condition<'_>>> {
    fn walk<'a>(e: &'a Expr, out: &mut Vec<Vec<Condition<'a>>>) {
        super::with_stack(|| match e {
            Expr::And(a, b) => {
                walk(a, out);
                walk(b, out);
            }
            Expr::Cmp(op, a, b) => match (&**a, &**b) {
                (Expr::Column(c), v) if v.is_constant() => out[*c].push(Condition::Cmp(*op, v)),
                (v, Expr::Column(c)) if v.is_constant() => {
                    out[*c].push(Condition::Cmp(op.flipped(), v))
                }
                _ => {}
            },
            Expr::Between(x, lo, hi, false) => {
                if let (Expr::Column(c), true, true) = (&**x, lo.is_constant(), hi.is_constant()) {
                    out[*c].push(Condition::Cmp(CmpOp::GtEq, lo));
                    out[*c].push(Condition::Cmp(CmpOp::LtEq, hi));
                }
            }
            Expr::InList(x, list, false) => {
                if let Expr::Column(c) = &**x {
                    if list.iter().all(Expr::is_constant) {
                        out[*c].push(Condition::In(list));
                    }
                }
            }
            _ => {}
        })
    }
    let mut out: Vec<Vec<Condition>> = (0..columns).map(|_| Vec::new()).collect();
    if let Some(f) = filter {
        walk(f, &mut out);
    }
    out
}

/// A candidate access path over one key and how good it is.
struct Candidate {
    target: ScanTarget,
    columns: Vec<usize>,
    eq: Vec<Expr>,
    in_list: Option<Vec<Expr>>,
    lower: Option<(Expr, bool)>,
    upper: Option<(Expr, bool)>,
}

impl Candidate {
    fn over(target: ScanTarget, columns: &[usize], conds: &[Vec<Condition>]) -> Self {
        let mut c = Candidate {
            target,
            columns: columns.to_vec(),
            eq: Vec::new(),
            in_list: None,
            lower: None,
            upper: None,
        };
        for &col in columns {
            let eq = conds[col].iter().find_map(|k| match k {
                Condition::Cmp(CmpOp::Eq, v) => Some((*v).clone()),
                _ => None,
            });
            match eq {
                Some(v) => c.eq.push(v),
                None => {
                    c.in_list = conds[col].iter().find_map(|k| match k {
                        Condition::In(list) => Some(list.to_vec()),
                        _ => None,
                    });
                    if c.in_list.is_none() {
                        for k in &conds[col] {
                            match k {
                                Condition::Cmp(CmpOp::Gt, v) if c.lower.is_none() => {
                                    c.lower = Some(((*v).clone(), false))
                                }
                                Condition::Cmp(CmpOp::GtEq, v) if c.lower.is_none() => {
                                    c.lower = Some(((*v).clone(), true))
                                }
                                Condition::Cmp(CmpOp::Lt, v) if c.upper.is_none() => {
                                    c.upper = Some(((*v).clone(), false))
                                }
                                Condition::Cmp(CmpOp::LtEq, v) if c.upper.is_none() => {
                                    c.upper = Some(((*v).clone(), true))
                                }
                                _ => {}
                            }
                        }
                    }
                    break;
                }
            }
        }
        c
    }

    /// Every key column fixed: at most one row per key (primary) or one key (index).
    fn is_point(&self) -> bool {
        self.eq.len() + usize::from(self.in_list.is_some()) == self.columns.len()
    }

    fn score(&self) -> u32 {
        let primary = self.target == ScanTarget::Primary;
        let mut s = 10 * self.eq.len() as u32;
        if self.in_list.is_some() {
            s += 8;
        }
        s += 4 * (u32::from(self.lower.is_some()) + u32::from(self.upper.is_some()));
        if self.is_point() {
            s += if primary { 1000 } else { 500 };
        }
        if s > 0 && primary {
            s += 1;
        }
        s
    }

    /// Whether the walk yields rows already in the order of `keys` (ascending,
    /// NULLs first, as keys are encoded).
    fn orders(&self, keys: &[super::bind::SortKey]) -> bool {
        self.in_list.is_none()
            && !keys.is_empty()
            && keys.iter().enumerate().all(|(i, k)| {
                !k.desc
                    && k.nulls_first
                    && self
                        .columns
                        .get(self.eq.len() + i)
                        .is_some_and(|&c| k.expr == Expr::Column(c))
            })
    }
}

/// The access path and order of a bound query; `knn`: whether a vector column's store
/// may serve an ORDER BY distance (not over a shape the store does not hold).
fn choose(schema: &TableSchema, q: &Bound, knn: bool) -> (Access, OrderBy, String) {
    let names = &q.row_names;
    let render = |e: &Expr| e.render(names);
    if knn && q.aggregation.is_none() && q.limit.is_some() {
        if let [key] = q.order_by.as_slice() {
            if let Expr::Distance(metric, a, b) = &key.expr {
                let vector = |e: &Expr| match e {
                    Expr::Column(c) if matches!(schema.columns[*c].ty, ColumnType::Vector(_)) => {
                        Some(*c)
                    }
                    _ => None,
                };
                let pick = match (vector(a), vector(b)) {
                    (Some(c), None) if b.is_constant() => Some((c, (**b).clone())),
                    (None, Some(c)) if a.is_constant() => Some((c, (**a).clone())),
                    _ => None,
                };
                if let (Some((column, query)), false) = (pick, key.desc) {
                    let detail = format!(
                        "vector kNN: exact {} scan of every row's {}, keeping the nearest OFFSET+LIMIT{}",
                        if *metric == Metric::L2 { "L2" } else { "cosine" },
                        names[column],
                        if q.filter.is_some() { "; WHERE checked on each candidate that would enter the top k" } else { "" }
                    );
                    return (
                        Access::Knn {
                            column,
                            query,
                            metric: *metric,
                        },
                        OrderBy::Knn,
                        detail,
                    );
                }
            }
        }
    }

    let conds = conditions(q.filter.as_ref(), schema.columns.len());
    let mut candidates = vec![Candidate::over(
        ScanTarget::Primary,
        &schema.primary_key,
        &conds,
    )];
    for (i, index) in schema.indexes.iter().enumerate() {
        candidates.push(Candidate::over(
            ScanTarget::Index(i),
            &index.columns,
            &conds,
        ));
    }
    let target_name = |t: ScanTarget| match t {
        ScanTarget::Primary => "primary key".to_string(),
        ScanTarget::Index(i) => format!("index {}", schema.indexes[i].name),
    };
    let key_cols = |c: &Candidate| {
        c.columns
            .iter()
            .map(|&i| names[i].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ordering = q.aggregation.is_none() && !q.order_by.is_empty();
    // Best by score; on a tie, the one that also yields the ORDER BY order.
    let best = candidates
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| {
            (
                c.score(),
                ordering && c.orders(&q.order_by),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i)
        .unwrap_or(0);
    let mut chosen = candidates.swap_remove(best);
    let detail = if chosen.score() > 0 {
        let mut fixed: Vec<String> = chosen
            .eq
            .iter()
            .zip(&chosen.columns)
            .map(|(v, &c)| format!("{} = {}", names[c], render(v)))
            .collect();
        let next = chosen
            .columns
            .get(chosen.eq.len())
            .map(|&c| names[c].as_str());
        if let (Some(list), Some(n)) = (&chosen.in_list, next) {
            fixed.push(format!(
                "{n} IN ({})",
                list.iter().map(&render).collect::<Vec<_>>().join(", ")
            ));
        }
        if let (Some((v, inc)), Some(n)) = (&chosen.lower, next) {
            fixed.push(format!(
                "{n} {} {}",
                if *inc { ">=" } else { ">" },
                render(v)
            ));
        }
        if let (Some((v, inc)), Some(n)) = (&chosen.upper, next) {
            fixed.push(format!(
                "{n} {} {}",
                if *inc { "<=" } else { "<" },
                render(v)
            ));
        }
        let kind = match (chosen.is_point(), chosen.target) {
            (true, ScanTarget::Primary) => "point lookup",
            (true, _) => "point scan",
            _ => "range scan",
        };
        format!(
            "{} {kind} on ({}): {}",
            target_name(chosen.target),
            key_cols(&chosen),
            fixed.join(" AND ")
        )
    } else {
        // No usable condition: walk in ORDER BY order if some key gives it (LIMIT
        // then stops the walk early), else scan the primary key.
        let ordered = ordering
            .then(|| {
                std::iter::once(Candidate::over(
                    ScanTarget::Primary,
                    &schema.primary_key,
                    &conds,
                ))
                .chain(schema.indexes.iter().enumerate().map(|(i, index)| {
                    Candidate::over(ScanTarget::Index(i), &index.columns, &conds)
                }))
                .find(|c| c.orders(&q.order_by))
            })
            .flatten();
        match ordered {
            Some(c) => {
                chosen = c;
                format!(
                    "full walk of {} ({}) in ORDER BY order: no WHERE condition on a key column{}",
                    target_name(chosen.target),
                    key_cols(&chosen),
                    if q.limit.is_some() { "; LIMIT stops the walk" } else { "" }
                )
            }
            None => format!(
                "full scan: no WHERE condition fixes or bounds the leading column of the primary key ({}) or of an index",
                key_cols(&chosen)
            ),
        }
    };
    let order = if q.order_by.is_empty() {
        OrderBy::Unordered
    } else if q.aggregation.is_none() && chosen.orders(&q.order_by) {
        OrderBy::ByAccess
    } else {
        OrderBy::Sort
    };
    let key_types = chosen
        .columns
        .iter()
        .map(|&c| schema.columns[c].ty)
        .collect();
    (
        Access::Keys {
            target: chosen.target,
            key_types,
            eq: chosen.eq,
            in_list: chosen.in_list,
            lower: chosen.lower,
            upper: chosen.upper,
        },
        order,
        detail,
    )
}
