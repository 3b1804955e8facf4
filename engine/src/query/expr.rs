//! Bound expressions and their evaluation under SQL's three-valued logic.
//!
//! Types: int and float mix as numbers (int op int stays int, checked for overflow;
//! anything with a float is a float); text compares byte-wise; bool compares with bool;
//! json and vector values cannot be compared. A comparison with NULL is NULL, and a
//! WHERE or HAVING that is NULL drops the row. Errors name the types involved.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use crate::value::Value;
use crate::vectors::{cosine_distance, l2_rank, Floats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl CmpOp {
    /// The operator with its operands swapped (`a < b` is `b > a`).
    pub fn flipped(self) -> Self {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::LtEq => CmpOp::GtEq,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::GtEq => CmpOp::LtEq,
            other => other,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::NotEq => "!=",
            CmpOp::Lt => "<",
            CmpOp::LtEq => "<=",
            CmpOp::Gt => ">",
            CmpOp::GtEq => ">=",
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::NotEq => o != Ordering::Equal,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::LtEq => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::GtEq => o != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

impl ArithOp {
    fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Mod => "%",
        }
    }
}

/// A vector distance: `<->` (Euclidean) or `<=>` (cosine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    L2,
    Cosine,
}

impl Metric {
    pub fn symbol(self) -> &'static str {
        match self {
            Metric::L2 => "<->",
            Metric::Cosine => "<=>",
        }
    }

    /// The distance between two vectors of one dimension, in the form kNN ranks by
    /// (squared for L2: same order, no square root per row). Computed in `f32`, and in
    /// `f64` for the rare pair out of `f32`'s range (`vectors`), so a legal vector never
    /// gets an infinite or made-up distance.
    pub fn rank<B: Floats + ?Sized>(self, a: &[f32], b: &B) -> Option<f64> {
        match self {
            Metric::L2 => Some(l2_rank(a, b)),
            Metric::Cosine => cosine_distance(a, b),
        }
    }

    /// The distance users see, from the rank.
    pub fn distance_from_rank(self, rank: f64) -> f64 {
        match self {
            Metric::L2 => rank.sqrt(),
            Metric::Cosine => rank,
        }
    }
}

/// An expression bound to a row layout: `Column(i)` is the i-th value of the row it is
/// evaluated on (a table row, or group keys then aggregates after aggregation).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Column(usize),
    /// `$n` (0-based here): a caller's parameter or a literal moved out of the text.
    Param(usize),
    Const(Value),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    IsNull(Box<Expr>, bool),
    InList(Box<Expr>, Vec<Expr>, bool),
    /// A long `IN` list of one kind of value, sorted for a binary search: made for one
    /// execution by [`Expr::with_value_sets`], never part of a plan.
    InSet(Box<Expr>, Arc<ValueSet>, bool),
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    Like(Box<Expr>, Box<Expr>, bool),
    Distance(Metric, Box<Expr>, Box<Expr>),
}

/// `IN` lists shorter than this are checked value by value (as fast at this length).
pub const VALUE_SET_MIN: usize = 16;

/// The values of an `IN` list, all of one kind, sorted by [`compare`] (a total order
/// within a kind), and whether the list held NULL.
#[derive(Debug, PartialEq)]
pub struct ValueSet {
    sorted: Vec<Value>,
    has_null: bool,
    /// The list's first non-null value: comparing another kind with it is the error
    /// the list, checked in order, gives.
    first: Value,
}

impl ValueSet {
    /// None unless the non-null values are all numbers, all text or all booleans.
    fn new(values: Vec<Value>) -> Option<ValueSet> {
        let has_null = values.iter().any(Value::is_null);
        let mut sorted: Vec<Value> = values.into_iter().filter(|v| !v.is_null()).collect();
        let first = sorted.first()?.clone();
        if !sorted.iter().all(|v| same_kind(v, &first)) {
            return None;
        }
        let order = |a: &Value, b: &Value| compare(a, b).ok().flatten().unwrap_or(Ordering::Equal);
        sorted.sort_unstable_by(order);
        Some(ValueSet {
            sorted,
            has_null,
            first,
        })
    }

    /// `IN`'s answer for the non-null `v`, as checking the list in order gives it.
    fn contains(&self, v: &Value) -> Result<Option<bool>, String> {
        if !same_kind(v, &self.first) {
            // The first value the list would compare `v` with refuses it.
            compare(v, &self.first)?;
        }
        let found = self
            .sorted
            .binary_search_by(|item| compare(item, v).ok().flatten().unwrap_or(Ordering::Equal))
            .is_ok();
        Ok(if found {
            Some(true)
        } else if self.has_null {
            None
        } else {
            Some(false)
        })
    }
}

/// Whether [`compare`] orders `a` and `b` (numbers, text, booleans: each with its own).
fn same_kind(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (
            Value::Int(_) | Value::Float(_),
            Value::Int(_) | Value::Float(_)
        ) | (Value::Text(_), Value::Text(_))
            | (Value::Bool(_), Value::Bool(_))
    )
}

/// Where an expression reads its columns: a stored row, decoding only the values the
/// expression names, or values already decoded (an aggregated row, a test's).
pub trait Columns {
    fn column(&self, i: usize) -> Cow<'_, Value>;

    /// Whether reading a column copies it: a stored row's do, so a query sizes them
    /// against its memory budget before it reads them.
    const COPIES: bool = false;

    /// The heap bytes a copy of column `i` takes (`Self::COPIES` only).
    fn column_bytes(&self, _i: usize) -> usize {
        0
    }
}

impl Columns for [Value] {
    fn column(&self, i: usize) -> Cow<'_, Value> {
        Cow::Borrowed(&self[i])
    }
}

/// What a constant expression reads its (no) columns from.
pub const NO_COLUMNS: &[Value] = &[];

impl Columns for crate::row::Row {
    fn column(&self, i: usize) -> Cow<'_, Value> {
        Cow::Owned(self.get(i).to_value())
    }

    const COPIES: bool = true;

    fn column_bytes(&self, i: usize) -> usize {
        std::mem::size_of::<Value>()
            + match self.get(i) {
                crate::row::ValueRef::Text(s) | crate::row::ValueRef::Json(s) => s.len(),
                crate::row::ValueRef::Vector(v) => v.len(),
                _ => 0,
            }
    }
}

type Eval<'a> = Result<Cow<'a, Value>, String>;

impl Expr {
    /// Whether the expression reads no column (its value is fixed per query).
    pub fn is_constant(&self) -> bool {
        let mut constant = true;
        self.visit(&mut |e| constant &= !matches!(e, Expr::Column(_)));
        constant
    }

    /// Items of this expression's `IN` lists compared one by one (those made value sets
    /// are looked up instead).
    pub fn in_list_items(&self) -> usize {
        let mut items = 0;
        self.visit(&mut |e| {
            if let Expr::InList(_, list, _) = e {
                items += list.len();
            }
        });
        items
    }

    /// Calls `f` on this expression and every sub-expression.
    pub fn visit(&self, f: &mut impl FnMut(&Expr)) {
        super::with_stack(|| self.visit_node(f))
    }

    fn visit_node(&self, f: &mut impl FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Column(_) | Expr::Param(_) | Expr::Const(_) => {}
            Expr::Neg(e) | Expr::Not(e) | Expr::IsNull(e, _) | Expr::InSet(e, _, _) => e.visit(f),
            Expr::Arith(_, a, b)
            | Expr::Cmp(_, a, b)
            | Expr::And(a, b)
            | Expr::Or(a, b)
            | Expr::Like(a, b, _)
            | Expr::Distance(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::InList(e, list, _) => {
                e.visit(f);
                list.iter().for_each(|x| x.visit(f));
            }
            Expr::Between(e, lo, hi, _) => {
                e.visit(f);
                lo.visit(f);
                hi.visit(f);
            }
        }
    }

    /// This expression with each `IN` list of at least [`VALUE_SET_MIN`] constants or
    /// parameters of one kind (numbers, text or booleans) made a [`ValueSet`], for one
    /// execution with `params`; None when it has no such list. A row is then checked
    /// against such a list in log time, not value by value (4,096 values made a scan of
    /// 200,000 rows cost 4.2 s).
    pub fn with_value_sets(&self, params: &[Value]) -> Option<Expr> {
        let mut any = false;
        self.visit(&mut |e| {
            any |= matches!(e, Expr::InList(_, list, _) if list.len() >= VALUE_SET_MIN)
        });
        if !any {
            return None;
        }
        Some(self.set_in(params))
    }

    fn set_in(&self, params: &[Value]) -> Expr {
        super::with_stack(|| self.set_node(params))
    }

    fn set_node(&self, params: &[Value]) -> Expr {
        let b = |e: &Expr| Box::new(e.set_in(params));
        match self {
            Expr::Column(_) | Expr::Param(_) | Expr::Const(_) | Expr::InSet(..) => self.clone(),
            Expr::Neg(e) => Expr::Neg(b(e)),
            Expr::Not(e) => Expr::Not(b(e)),
            Expr::IsNull(e, n) => Expr::IsNull(b(e), *n),
            Expr::Arith(op, x, y) => Expr::Arith(*op, b(x), b(y)),
            Expr::Cmp(op, x, y) => Expr::Cmp(*op, b(x), b(y)),
            Expr::And(x, y) => Expr::And(b(x), b(y)),
            Expr::Or(x, y) => Expr::Or(b(x), b(y)),
            Expr::Like(x, y, n) => Expr::Like(b(x), b(y), *n),
            Expr::Distance(m, x, y) => Expr::Distance(*m, b(x), b(y)),
            Expr::Between(e, lo, hi, n) => Expr::Between(b(e), b(lo), b(hi), *n),
            Expr::InList(e, list, n) => {
                // Each parameter copied once, however often the list repeats it: `$1`
                // 20,000 times over a 130 KB text was 2.6 GB of copies.
                let mut taken = ahash::AHashSet::new();
                let values: Option<Vec<Value>> = list
                    .iter()
                    .filter(|item| !matches!(item, Expr::Param(i) if !taken.insert(*i)))
                    .map(|item| match item {
                        Expr::Const(v) => Some(v.clone()),
                        Expr::Param(i) => params.get(*i).cloned(),
                        _ => None,
                    })
                    .collect();
                match values.and_then(ValueSet::new) {
                    Some(set) if list.len() >= VALUE_SET_MIN => {
                        Expr::InSet(b(e), Arc::new(set), *n)
                    }
                    _ => Expr::InList(b(e), list.iter().map(|x| x.set_in(params)).collect(), *n),
                }
            }
        }
    }

    pub fn eval<'a, R: Columns + ?Sized>(&'a self, row: &'a R, params: &'a [Value]) -> Eval<'a> {
        super::with_stack(|| self.eval_node(row, params))
    }

    fn eval_node<'a, R: Columns + ?Sized>(&'a self, row: &'a R, params: &'a [Value]) -> Eval<'a> {
        Ok(match self {
            Expr::Column(i) => row.column(*i),
            Expr::Param(i) => Cow::Borrowed(&params[*i]),
            Expr::Const(v) => Cow::Borrowed(v),
            Expr::Neg(e) => Cow::Owned(match &*e.eval(row, params)? {
                Value::Null => Value::Null,
                Value::Int(i) => Value::Int(i.checked_neg().ok_or("integer overflow in -")?),
                Value::Float(f) => Value::Float(-f),
                other => return Err(format!("cannot negate {}", type_name(other))),
            }),
            Expr::Not(e) => Cow::Owned(bool_value(truth(&*e.eval(row, params)?)?.map(|b| !b))),
            Expr::Arith(op, a, b) => {
                Cow::Owned(arith(*op, &*a.eval(row, params)?, &*b.eval(row, params)?)?)
            }
            Expr::Cmp(op, a, b) => {
                let o = compare(&*a.eval(row, params)?, &*b.eval(row, params)?)?;
                Cow::Owned(bool_value(o.map(|o| op.holds(o))))
            }
            Expr::And(a, b) => {
                let left = truth(&*a.eval(row, params)?)?;
                if left == Some(false) {
                    return Ok(Cow::Owned(Value::Bool(false)));
                }
                let right = truth(&*b.eval(row, params)?)?;
                Cow::Owned(bool_value(match (left, right) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }))
            }
            Expr::Or(a, b) => {
                let left = truth(&*a.eval(row, params)?)?;
                if left == Some(true) {
                    return Ok(Cow::Owned(Value::Bool(true)));
                }
                let right = truth(&*b.eval(row, params)?)?;
                Cow::Owned(bool_value(match (left, right) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                }))
            }
            Expr::IsNull(e, negated) => {
                Cow::Owned(Value::Bool(e.eval(row, params)?.is_null() != *negated))
            }
            Expr::InList(e, list, negated) => {
                let v = e.eval(row, params)?;
                if v.is_null() {
                    return Ok(Cow::Owned(Value::Null));
                }
                let mut found = Some(false);
                for item in list {
                    match compare(&v, &*item.eval(row, params)?)? {
                        Some(Ordering::Equal) => {
                            found = Some(true);
                            break;
                        }
                        None => found = None,
                        Some(_) => {}
                    }
                }
                Cow::Owned(bool_value(found.map(|f| f != *negated)))
            }
            Expr::InSet(e, set, negated) => {
                let v = e.eval(row, params)?;
                if v.is_null() {
                    return Ok(Cow::Owned(Value::Null));
                }
                Cow::Owned(bool_value(set.contains(&v)?.map(|f| f != *negated)))
            }
            Expr::Between(e, lo, hi, negated) => {
                let v = e.eval(row, params)?;
                let above = compare(&v, &*lo.eval(row, params)?)?.map(|o| o != Ordering::Less);
                let below = compare(&v, &*hi.eval(row, params)?)?.map(|o| o != Ordering::Greater);
                let inside = match (above, below) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                };
                Cow::Owned(bool_value(inside.map(|i| i != *negated)))
            }
            Expr::Like(e, pattern, negated) => {
                match (&*e.eval(row, params)?, &*pattern.eval(row, params)?) {
                    (Value::Null, _) | (_, Value::Null) => Cow::Owned(Value::Null),
                    (Value::Text(s), Value::Text(p)) => {
                        Cow::Owned(Value::Bool(super::like::like(s, p)? != *negated))
                    }
                    (a, b) => {
                        return Err(format!(
                            "LIKE needs text on both sides, got {} LIKE {}",
                            type_name(a),
                            type_name(b)
                        ))
                    }
                }
            }
            Expr::Distance(metric, a, b) => {
                let (a, b) = (a.eval(row, params)?, b.eval(row, params)?);
                let (Some(a), Some(b)) = (as_vector(&a)?, as_vector(&b)?) else {
                    return Ok(Cow::Owned(Value::Null));
                };
                check_dims(&a, &b)?;
                Cow::Owned(match metric.rank(&a, &*b) {
                    Some(rank) => Value::Float(metric.distance_from_rank(rank)),
                    None => Value::Null,
                })
            }
        })
    }

    /// The expression as SQL, with column names (for EXPLAIN).
    pub fn render(&self, names: &[String]) -> String {
        super::with_stack(|| self.render_node(names))
    }

    fn render_node(&self, names: &[String]) -> String {
        let r = |e: &Expr| e.render(names);
        match self {
            Expr::Column(i) => names.get(*i).cloned().unwrap_or_else(|| format!("#{i}")),
            Expr::Param(i) => format!("${}", i + 1),
            Expr::Const(v) => match v {
                Value::Null => "NULL".into(),
                Value::Bool(b) => b.to_string().to_uppercase(),
                other => other.to_json().to_string(),
            },
            Expr::Neg(e) => format!("-{}", r(e)),
            Expr::Not(e) => format!("NOT {}", r(e)),
            Expr::Arith(op, a, b) => format!("({} {} {})", r(a), op.symbol(), r(b)),
            Expr::Cmp(op, a, b) => format!("{} {} {}", r(a), op.symbol(), r(b)),
            Expr::And(a, b) => format!("({} AND {})", r(a), r(b)),
            Expr::Or(a, b) => format!("({} OR {})", r(a), r(b)),
            Expr::IsNull(e, n) => format!("{} IS {}NULL", r(e), if *n { "NOT " } else { "" }),
            Expr::InList(e, list, n) => format!(
                "{} {}IN ({})",
                r(e),
                if *n { "NOT " } else { "" },
                list.iter().map(r).collect::<Vec<_>>().join(", ")
            ),
            Expr::InSet(e, set, n) => format!(
                "{} {}IN ({} values)",
                r(e),
                if *n { "NOT " } else { "" },
                set.sorted.len()
            ),
            Expr::Between(e, lo, hi, n) => format!(
                "{} {}BETWEEN {} AND {}",
                r(e),
                if *n { "NOT " } else { "" },
                r(lo),
                r(hi)
            ),
            Expr::Like(e, p, n) => {
                format!("{} {}LIKE {}", r(e), if *n { "NOT " } else { "" }, r(p))
            }
            Expr::Distance(m, a, b) => format!("{} {} {}", r(a), m.symbol(), r(b)),
        }
    }
}

fn bool_value(b: Option<bool>) -> Value {
    b.map_or(Value::Null, Value::Bool)
}

/// A condition's truth: `None` for NULL.
pub fn truth(v: &Value) -> Result<Option<bool>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(format!(
            "a condition must be a boolean, got {}",
            type_name(other)
        )),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Text(_) => "text",
        Value::Json(_) => "json",
        Value::Vector(_) => "vector",
    }
}

/// SQL comparison: `None` if either side is NULL, an error for types that do not
/// compare.
pub fn compare(a: &Value, b: &Value) -> Result<Option<Ordering>, String> {
    Ok(Some(match (a, b) {
        (Value::Null, _) | (_, Value::Null) => return Ok(None),
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        // Floats are always finite here (JSON numbers, checked arithmetic), so
        // `partial_cmp` is total; it also makes -0.0 equal 0.0 as SQL wants.
        (Value::Int(x), Value::Float(y)) => int_float_cmp(*x, *y),
        (Value::Float(x), Value::Int(y)) => int_float_cmp(*y, *x).reverse(),
        (Value::Float(x), Value::Float(y)) => float_cmp(*x, *y),
        (Value::Text(x), Value::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (x, y) => {
            return Err(format!(
                "cannot compare {} with {}",
                type_name(x),
                type_name(y)
            ))
        }
    }))
}

/// The order ORDER BY sorts non-null values in: numbers by value, text byte-wise,
/// false before true; values of different kinds by kind (never an error).
pub fn sort_cmp(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 2,
            Value::Text(_) => 3,
            Value::Json(_) => 4,
            Value::Vector(_) => 5,
        }
    }
    match (a, b) {
        (Value::Json(x), Value::Json(y)) => x.cmp(y),
        (Value::Vector(x), Value::Vector(y)) => x
            .iter()
            .map(|f| f.to_bits())
            .cmp(y.iter().map(|f| f.to_bits())),
        _ => match compare(a, b) {
            Ok(Some(o)) => o,
            _ => rank(a).cmp(&rank(b)),
        },
    }
}

fn float_cmp(x: f64, y: f64) -> Ordering {
    x.partial_cmp(&y).unwrap_or(Ordering::Equal)
}

/// `i` against `f` exactly, as SQLite compares them: not through `f64`, which rounds
/// integers past 2^53 (2^53 + 1 would equal 2^53 as a float).
fn int_float_cmp(i: i64, f: f64) -> Ordering {
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_TO_63 {
        return Ordering::Less;
    }
    if f < -TWO_TO_63 {
        return Ordering::Greater;
    }
    let whole = f.trunc();
    // In [-2^63, 2^63): the conversion is exact.
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => float_cmp(0.0, f - whole),
        unequal => unequal,
    }
}

fn arith(op: ArithOp, a: &Value, b: &Value) -> Result<Value, String> {
    let overflow = || format!("integer overflow in {}", op.symbol());
    Ok(match (a, b) {
        (Value::Null, _) | (_, Value::Null) => Value::Null,
        (Value::Int(x), Value::Int(y)) => Value::Int(match op {
            ArithOp::Add => x.checked_add(*y).ok_or_else(overflow)?,
            ArithOp::Sub => x.checked_sub(*y).ok_or_else(overflow)?,
            ArithOp::Mul => x.checked_mul(*y).ok_or_else(overflow)?,
            ArithOp::Div | ArithOp::Mod if *y == 0 => return Err("division by zero".into()),
            ArithOp::Div => x.checked_div(*y).ok_or_else(overflow)?,
            ArithOp::Mod => x.checked_rem(*y).ok_or_else(overflow)?,
        }),
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            let (x, y) = (as_f64(a), as_f64(b));
            let out = match op {
                ArithOp::Add => x + y,
                ArithOp::Sub => x - y,
                ArithOp::Mul => x * y,
                ArithOp::Div | ArithOp::Mod if y == 0.0 => return Err("division by zero".into()),
                ArithOp::Div => x / y,
                ArithOp::Mod => x % y,
            };
            if !out.is_finite() {
                return Err(format!("float overflow in {}", op.symbol()));
            }
            Value::Float(out)
        }
        (x, y) => {
            return Err(format!(
                "cannot apply {} to {} and {}",
                op.symbol(),
                type_name(x),
                type_name(y)
            ))
        }
    })
}

pub fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        _ => f64::NAN,
    }
}

/// A vector operand: a vector value, or text holding a JSON array (`'[1, 2]'`).
/// A vector written as text (`'[1, 2.5]'` in SQL): decoded once per query, when the
/// execution starts, never per row.
pub fn vector_from_text(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Vec<f32>>(s) {
        Ok(v) if v.iter().all(|f| f.is_finite()) => Ok(Value::Vector(v)),
        _ => {
            let shown: String = s.chars().take(40).collect();
            Err(format!(
                "{shown:?} is not a vector: write it as a JSON array of finite numbers"
            ))
        }
    }
}

pub fn as_vector(v: &Value) -> Result<Option<Cow<'_, [f32]>>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Vector(v) => Ok(Some(Cow::Borrowed(v))),
        // A parameter array of numbers that did not become a vector: say why.
        Value::Json(text) if numbers_out_of_f32(text) => Err(
            "a distance needs vectors, and this array holds a number a vector cannot: its \
             values are 32-bit floats, finite and within ±3.4e38"
                .to_string(),
        ),
        other => Err(format!(
            "a distance needs vectors, got {}",
            type_name(other)
        )),
    }
}

/// Whether JSON `text` is a non-empty array of numbers, one of them past `f32`'s range.
fn numbers_out_of_f32(text: &str) -> bool {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        return false;
    };
    let numbers: Option<Vec<f64>> = items.iter().map(serde_json::Value::as_f64).collect();
    numbers.is_some_and(|n| !n.is_empty() && n.iter().any(|f| !(*f as f32).is_finite()))
}

pub fn check_dims(a: &[f32], b: &[f32]) -> Result<(), String> {
    if a.len() == b.len() {
        Ok(())
    } else {
        Err(format!(
            "cannot measure the distance between vectors of {} and {} dimensions",
            a.len(),
            b.len()
        ))
    }
}

/// A parameter from the request's JSON: integers, floats, strings, booleans and null
/// map to their SQL values; an array of numbers is a vector; anything else is json.
pub fn param_from_json(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::Text(s.clone()),
        J::Array(items) => {
            let floats: Option<Vec<f32>> = items
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32).filter(|f| f.is_finite()))
                .collect();
            match floats {
                Some(v) if !v.is_empty() => Value::Vector(v),
                _ => Value::Json(json.to_string()),
            }
        }
        J::Object(_) => Value::Json(json.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(e: &Expr) -> Value {
        e.eval(NO_COLUMNS, &[]).expect("evaluates").into_owned()
    }

    /// A parameter array that could not be a vector says why a distance refuses it.
    #[test]
    fn an_array_past_f32s_range_is_refused_as_a_vector_saying_why() {
        let beyond = param_from_json(&serde_json::json!([1e39, 1.0]));
        let why = as_vector(&beyond).expect_err("not a vector");
        assert!(why.contains("32-bit floats"), "{why}");
        let words = param_from_json(&serde_json::json!(["a", "b"]));
        let why = as_vector(&words).expect_err("not a vector");
        assert!(why.contains("got json"), "{why}");
        let fine = param_from_json(&serde_json::json!([1.5, 2.0]));
        assert!(as_vector(&fine).expect("a vector").is_some());
    }

    fn c(v: Value) -> Box<Expr> {
        Box::new(Expr::Const(v))
    }

    #[test]
    fn ints_and_floats_compare_exactly_past_two_to_the_53() {
        use Ordering::*;
        let cmp = |i: i64, f: f64| compare(&Value::Int(i), &Value::Float(f)).expect("compares");
        let two_53 = 1i64 << 53;
        assert_eq!(cmp(two_53 + 1, two_53 as f64), Some(Greater));
        assert_eq!(cmp(two_53, two_53 as f64), Some(Equal));
        assert_eq!(
            cmp(i64::MAX - 1, i64::MAX as f64),
            Some(Less),
            "i64::MAX as f64 is 2^63"
        );
        assert_eq!(cmp(i64::MAX, 1e300), Some(Less));
        assert_eq!(cmp(i64::MIN, i64::MIN as f64), Some(Equal));
        assert_eq!(cmp(i64::MIN, -1e300), Some(Greater));
        assert_eq!(cmp(2, 2.5), Some(Less));
        assert_eq!(cmp(3, 2.5), Some(Greater));
        assert_eq!(cmp(-2, -2.5), Some(Greater));
        assert_eq!(cmp(-3, -2.5), Some(Less));
        assert_eq!(cmp(0, -0.0), Some(Equal));
        let reversed = compare(&Value::Float(two_53 as f64), &Value::Int(two_53 + 1));
        assert_eq!(reversed.expect("compares"), Some(Less));
    }

    /// A long `IN` list made a sorted set answers as the list checked in order does:
    /// the same truth, NULL and error, for lists of each kind, with NULLs, mixed kinds,
    /// ints beside floats, and values of every kind (parameters as well as constants).
    #[test]
    fn a_value_set_answers_as_its_list() {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just(Value::Null),
            (-20i64..20).prop_map(Value::Int),
            (-20i64..20).prop_map(|i| Value::Float(i as f64 / 2.0)),
            "[a-c]{0,2}".prop_map(Value::Text),
            any::<bool>().prop_map(Value::Bool),
        ];
        let numbers = prop_oneof![
            (-20i64..20).prop_map(Value::Int),
            (-20i64..20).prop_map(|i| Value::Float(i as f64 / 2.0)),
            Just(Value::Null),
        ];
        let texts = prop_oneof!["[a-c]{0,2}".prop_map(Value::Text), Just(Value::Null)];
        let list = prop_oneof![
            proptest::collection::vec(numbers, VALUE_SET_MIN..40),
            proptest::collection::vec(texts, VALUE_SET_MIN..40),
            proptest::collection::vec(value.clone(), VALUE_SET_MIN..40),
        ];
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(
                &(list, value, any::<bool>(), any::<bool>()),
                |(list, v, negated, as_params)| {
                    let items: Vec<Expr> = if as_params {
                        (0..list.len()).map(Expr::Param).collect()
                    } else {
                        list.iter().cloned().map(Expr::Const).collect()
                    };
                    let params = if as_params { list.clone() } else { vec![] };
                    let in_list = Expr::InList(c(v.clone()), items, negated);
                    let run = |e: &Expr| e.eval(NO_COLUMNS, &params).map(Cow::into_owned);
                    let with_sets = in_list.with_value_sets(&params).expect("rewritten");
                    let one_kind = list.iter().filter(|v| !v.is_null()).all(|x| {
                        list.iter()
                            .find(|v| !v.is_null())
                            .is_some_and(|first| same_kind(x, first))
                    }) && list.iter().any(|v| !v.is_null());
                    prop_assert_eq!(matches!(with_sets, Expr::InSet(..)), one_kind);
                    prop_assert_eq!(run(&with_sets), run(&in_list));
                    Ok(())
                },
            )
            .expect("same answers");
    }

    #[test]
    fn three_valued_logic() {
        let null = || c(Value::Null);
        let t = || c(Value::Bool(true));
        let f = || c(Value::Bool(false));
        assert_eq!(eval(&Expr::And(null(), f())), Value::Bool(false));
        assert_eq!(eval(&Expr::And(null(), t())), Value::Null);
        assert_eq!(eval(&Expr::Or(null(), t())), Value::Bool(true));
        assert_eq!(eval(&Expr::Or(null(), f())), Value::Null);
        assert_eq!(eval(&Expr::Not(null())), Value::Null);
        let in_list = |v: Value, negated| {
            Expr::InList(
                c(v),
                vec![Expr::Const(Value::Int(1)), Expr::Const(Value::Null)],
                negated,
            )
        };
        assert_eq!(eval(&in_list(Value::Int(1), false)), Value::Bool(true));
        assert_eq!(eval(&in_list(Value::Int(2), false)), Value::Null);
        assert_eq!(eval(&in_list(Value::Int(2), true)), Value::Null);
        assert_eq!(
            eval(&Expr::Cmp(CmpOp::Eq, c(Value::Int(1)), null())),
            Value::Null
        );
    }

    #[test]
    fn numbers_mix_and_integers_are_checked() {
        let arith = |op, a, b| {
            Expr::Arith(op, c(a), c(b))
                .eval(NO_COLUMNS, &[])
                .map(Cow::into_owned)
        };
        assert_eq!(
            arith(ArithOp::Div, Value::Int(7), Value::Int(2)),
            Ok(Value::Int(3))
        );
        assert_eq!(
            arith(ArithOp::Add, Value::Int(1), Value::Float(0.5)),
            Ok(Value::Float(1.5))
        );
        assert!(arith(ArithOp::Add, Value::Int(i64::MAX), Value::Int(1)).is_err());
        assert!(arith(ArithOp::Div, Value::Int(1), Value::Int(0)).is_err());
        let e = arith(ArithOp::Add, Value::Int(1), Value::Text("a".into())).expect_err("refused");
        assert!(e.contains("int and text"), "{e}");
        assert_eq!(
            compare(&Value::Int(2), &Value::Float(2.0)),
            Ok(Some(Ordering::Equal))
        );
        assert!(compare(&Value::Int(2), &Value::Text("2".into())).is_err());
    }

    #[test]
    fn params_from_json() {
        use serde_json::json;
        assert_eq!(param_from_json(&json!(3)), Value::Int(3));
        assert_eq!(param_from_json(&json!(3.5)), Value::Float(3.5));
        assert_eq!(
            param_from_json(&json!([1, 2.5])),
            Value::Vector(vec![1.0, 2.5])
        );
        assert_eq!(
            param_from_json(&json!(["a"])),
            Value::Json("[\"a\"]".into())
        );
        assert_eq!(
            param_from_json(&json!({"a": 1})),
            Value::Json("{\"a\":1}".into())
        );
    }
}
