//! Binding: a parsed statement checked against the tenant's schema and turned into a
//! [`Bound`] query whose expressions address row positions. Everything outside the
//! subset is refused here, naming the construct and where it is.
//!
//! One file, about 750 lines: one `Binder` walks every construct of the SQL subset, and
//! each refusal is next to the case it refuses.

use sqlparser::ast::{
    self, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    LimitClause, ObjectNamePart, OrderByKind, OrderBySort, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, Spanned, Statement, TableFactor, UnaryOperator,
};

use super::expr::{ArithOp, CmpOp, Expr, Metric};
use super::{position, QueryError, QueryErrorKind};
use crate::schema::TableSchema;
use crate::tenant::Tenant;
use crate::value::Value;

/// Items a SELECT list may name (a table has at most 256 columns).
pub const MAX_SELECT_ITEMS: usize = 512;
/// Expressions a GROUP BY may list.
pub const MAX_GROUP_KEYS: usize = 32;
/// Keys an ORDER BY may list.
pub const MAX_SORT_KEYS: usize = 32;

/// What the caller asked to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExplainMode {
    /// Run and return rows.
    Run,
    /// `EXPLAIN SELECT …`: the plan only, nothing runs.
    PlanOnly,
    /// `EXPLAIN ANALYZE SELECT …`: run, return the plan with per-stage figures.
    Analyze,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    /// `COUNT(*)` when the argument is `None`.
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

impl AggFunc {
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count => "count",
            AggFunc::Sum => "sum",
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub func: AggFunc,
    /// Over table rows; `None` for `COUNT(*)`.
    pub arg: Option<Expr>,
}

/// GROUP BY and aggregates. After aggregation a row is the group keys followed by the
/// aggregate values; HAVING, the projection and ORDER BY address that row.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    pub group_by: Vec<Expr>,
    pub aggregates: Vec<Aggregate>,
    pub having: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub expr: Expr,
    pub desc: bool,
    pub nulls_first: bool,
}

/// A query bound to one table incarnation.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub table: String,
    pub table_version: u64,
    /// The migration whose new shape the query reads (dual read): the table's rows
    /// are transformed as they are read, until its cutover.
    pub dual_read: Option<u64>,
    pub filter: Option<Expr>,
    pub aggregation: Option<Aggregation>,
    pub output_names: Vec<String>,
    pub projection: Vec<Expr>,
    pub order_by: Vec<SortKey>,
    pub limit: Option<Expr>,
    pub offset: Option<Expr>,
    pub explain: ExplainMode,
    /// Names of the row positions expressions address (for EXPLAIN).
    pub row_names: Vec<String>,
    pub output_row_names: Vec<String>,
}

impl Bound {
    /// Items of `IN` lists compared one by one on every row, `filter` standing for the
    /// query's own (the execution's copy with its value sets).
    pub fn in_list_comparisons(&self, filter: Option<&Expr>) -> usize {
        let aggregation = self.aggregation.iter().flat_map(|a| {
            a.group_by
                .iter()
                .chain(a.aggregates.iter().filter_map(|g| g.arg.as_ref()))
                .chain(&a.having)
        });
        filter
            .or(self.filter.as_ref())
            .into_iter()
            .chain(&self.projection)
            .chain(self.order_by.iter().map(|k| &k.expr))
            .chain(aggregation)
            .map(Expr::in_list_items)
            .sum()
    }
}

pub fn bind(tenant: &Tenant, statement: &Statement) -> Result<Bound, QueryError> {
    let (query, explain) = match statement {
        Statement::Query(q) => (q, ExplainMode::Run),
        Statement::Explain {
            statement, analyze, ..
        } => match &**statement {
            Statement::Query(q) => (
                q,
                if *analyze {
                    ExplainMode::Analyze
                } else {
                    ExplainMode::PlanOnly
                },
            ),
            other => return Err(not_a_select(other)),
        },
        other => return Err(not_a_select(other)),
    };
    let at = query.span();
    if query.with.is_some() {
        return Err(QueryError::unsupported("WITH", at));
    }
    if query.fetch.is_some() || !query.locks.is_empty() || query.for_clause.is_some() {
        return Err(QueryError::unsupported(
            "FETCH, FOR and locking clauses",
            at,
        ));
    }
    if query.settings.is_some() || query.format_clause.is_some() || !query.pipe_operators.is_empty()
    {
        return Err(QueryError::unsupported(
            "SETTINGS, FORMAT and pipe operators",
            at,
        ));
    }
    let select = match &*query.body {
        SetExpr::Select(s) => s,
        SetExpr::SetOperation { .. } => {
            return Err(QueryError::unsupported("UNION, INTERSECT and EXCEPT", at))
        }
        other => return Err(QueryError::unsupported(format!("{other}"), other.span())),
    };
    let sat = select.span();
    if select.distinct.is_some() {
        return Err(QueryError::unsupported("SELECT DISTINCT", sat));
    }
    if select.top.is_some() || select.into.is_some() {
        return Err(QueryError::unsupported("TOP and INTO", sat));
    }
    if !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.connect_by.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || !select.named_window.is_empty()
        || select.qualify.is_some()
        || select.exclude.is_some()
    {
        return Err(QueryError::unsupported("this SELECT clause", sat));
    }
    let (table, aliases) = from_table(tenant, select)?;
    let mut binder = Binder {
        schema: table.schema,
        aliases,
        agg: None,
        clause: "WHERE",
    };
    let filter = select
        .selection
        .as_ref()
        .map(|e| binder.bind(e))
        .transpose()?;

    let group_exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs.clone(),
        other => return Err(QueryError::unsupported(format!("{other}"), sat)),
    };
    let projection_has_aggregate = select.projection.iter().any(|item| match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
            contains_aggregate(e)
        }
        _ => false,
    });
    let order_exprs: Vec<&ast::OrderByExpr> = match &query.order_by {
        None => Vec::new(),
        Some(o) => match &o.kind {
            OrderByKind::Expressions(exprs) if o.interpolate.is_none() => exprs.iter().collect(),
            _ => return Err(QueryError::unsupported("ORDER BY ALL and INTERPOLATE", at)),
        },
    };
    // Commas are no operators, so lists are bounded apart: every row compares, groups
    // or evaluates each item (20,000 sort keys took 3 ms a row).
    for (clause, items, limit) in [
        ("SELECT", select.projection.len(), MAX_SELECT_ITEMS),
        ("GROUP BY", group_exprs.len(), MAX_GROUP_KEYS),
        ("ORDER BY", order_exprs.len(), MAX_SORT_KEYS),
    ] {
        if items > limit {
            return Err(QueryError::new(
                QueryErrorKind::TooComplex,
                format!("{clause} lists {items} items, above the limit of {limit}"),
            ));
        }
    }
    let is_aggregate = !group_exprs.is_empty()
        || select.having.is_some()
        || projection_has_aggregate
        || order_exprs.iter().any(|o| contains_aggregate(&o.expr));
    if is_aggregate {
        binder.clause = "GROUP BY";
        let group_by = group_exprs
            .iter()
            .map(|e| binder.bind(e))
            .collect::<Result<Vec<_>, _>>()?;
        binder.agg = Some(AggContext {
            group_by,
            group_names: group_exprs.iter().map(output_name).collect(),
            aggregates: Vec::new(),
        });
    }

    binder.clause = "SELECT";
    let mut output_names = Vec::new();
    let mut projection = Vec::new();
    let mut aliases = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::UnnamedExpr(e) => {
                output_names.push(output_name(e));
                projection.push(binder.bind(e)?);
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                output_names.push(alias.value.clone());
                aliases.push((alias.value.clone(), projection.len()));
                projection.push(binder.bind(expr)?);
            }
            SelectItem::Wildcard(options) | SelectItem::QualifiedWildcard(_, options)
                if *options == Default::default() =>
            {
                if let SelectItem::QualifiedWildcard(kind, _) = item {
                    let name = match kind {
                        SelectItemQualifiedWildcardKind::ObjectName(name) => name.to_string(),
                        SelectItemQualifiedWildcardKind::Expr(e) => e.to_string(),
                    };
                    if !binder.aliases.contains(&name) {
                        return Err(QueryError::invalid(format!(
                            "{name}.* names no table of this query{}",
                            position(item.span())
                        )));
                    }
                }
                if binder.agg.is_some() {
                    return Err(QueryError::invalid(format!(
                        "SELECT * cannot be used with GROUP BY or aggregates{}; list the grouped columns",
                        position(item.span())
                    )));
                }
                for (i, c) in table.schema.live_columns() {
                    output_names.push(c.name.clone());
                    projection.push(Expr::Column(i));
                }
                // Each `*` names every column: the list is bounded as written out.
                if projection.len() > MAX_SELECT_ITEMS {
                    return Err(QueryError::new(
                        QueryErrorKind::TooComplex,
                        format!(
                            "SELECT lists more than {MAX_SELECT_ITEMS} items once each * is \
                             written out as its columns, above the limit of {MAX_SELECT_ITEMS}"
                        ),
                    ));
                }
            }
            other => return Err(QueryError::unsupported(format!("{other}"), other.span())),
        }
    }

    binder.clause = "HAVING";
    let having = select.having.as_ref().map(|e| binder.bind(e)).transpose()?;

    binder.clause = "ORDER BY";
    let mut order_by = Vec::new();
    for o in order_exprs {
        if o.with_fill.is_some() {
            return Err(QueryError::unsupported("WITH FILL", o.span()));
        }
        let desc = match o.options.sort {
            None | Some(OrderBySort::Asc) => false,
            Some(OrderBySort::Desc) => true,
            Some(OrderBySort::Using(_)) => {
                return Err(QueryError::unsupported("ORDER BY … USING", o.span()))
            }
        };
        let alias = match &o.expr {
            ast::Expr::Identifier(id) => aliases.iter().find(|(a, _)| *a == id.value),
            _ => None,
        };
        let expr = match alias {
            Some((_, i)) => projection[*i].clone(),
            None => binder.bind(&o.expr)?,
        };
        if expr.is_constant() {
            return Err(QueryError::new(
                QueryErrorKind::Unsupported,
                format!(
                    "ORDER BY needs a column, an alias or an expression over columns{}; positions such as ORDER BY 1 are not supported",
                    position(o.expr.span())
                ),
            ));
        }
        order_by.push(SortKey {
            expr,
            desc,
            // NULL sorts as the smallest value (as SQLite does) unless told otherwise.
            nulls_first: o.options.nulls_first.unwrap_or(!desc),
        });
    }

    binder.clause = "LIMIT";
    let (limit, offset) = match &query.limit_clause {
        None => (None, None),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => (
            limit
                .as_ref()
                .map(|e| binder.bind_constant(e))
                .transpose()?,
            offset
                .as_ref()
                .map(|o| binder.bind_constant(&o.value))
                .transpose()?,
        ),
        Some(other) => return Err(QueryError::unsupported(format!("{other}"), at)),
    };

    let row_names: Vec<String> = table
        .schema
        .columns
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let (aggregation, output_row_names) = match binder.agg {
        None => (None, row_names.clone()),
        Some(agg) => {
            let mut names = agg.group_names;
            names.extend(agg.aggregates.iter().map(|a| match &a.arg {
                None => "count(*)".to_string(),
                Some(arg) => format!("{}({})", a.func.name(), arg.render(&row_names)),
            }));
            (
                Some(Aggregation {
                    group_by: agg.group_by,
                    aggregates: agg.aggregates,
                    having,
                }),
                names,
            )
        }
    };
    Ok(Bound {
        table: table.schema.name.clone(),
        table_version: table.version,
        dual_read: table.dual_read,
        filter,
        aggregation,
        output_names,
        projection,
        order_by,
        limit,
        offset,
        explain,
        row_names,
        output_row_names,
    })
}

fn not_a_select(statement: &Statement) -> QueryError {
    let text = statement.to_string();
    let verb = text.split_whitespace().next().unwrap_or("this statement");
    QueryError::new(
        QueryErrorKind::Unsupported,
        format!(
            "{verb} is not supported: /ask runs one SELECT; write rows with POST /v1/tenants/:t/tables/:table/rows"
        ),
    )
}

/// The table a query reads, as reads see it.
struct ReadTable<'t> {
    /// Its shape: the new one while a migration of it runs (dual read).
    schema: &'t TableSchema,
    /// The incarnation whose rows are read.
    version: u64,
    dual_read: Option<u64>,
}

/// The one table of the FROM clause, and the names it may be referred to by.
fn from_table<'t>(
    tenant: &'t Tenant,
    select: &ast::Select,
) -> Result<(ReadTable<'t>, Vec<String>), QueryError> {
    let [from] = select.from.as_slice() else {
        return Err(match select.from.len() {
            0 => QueryError::invalid("the query needs FROM <table>"),
            _ => QueryError::unsupported("a FROM list of several tables", select.span()),
        });
    };
    if let Some(join) = from.joins.first() {
        return Err(QueryError::unsupported("JOIN", join.span()));
    }
    let TableFactor::Table {
        name, alias, args, ..
    } = &from.relation
    else {
        return Err(QueryError::unsupported(
            "a FROM item other than a table name",
            from.relation.span(),
        ));
    };
    let [ObjectNamePart::Identifier(ident)] = name.0.as_slice() else {
        return Err(QueryError::unsupported(
            "a qualified table name",
            name.span(),
        ));
    };
    if args.is_some() {
        return Err(QueryError::unsupported("table functions", name.span()));
    }
    let table = tenant.table(&ident.value).map_err(|_| {
        let known: Vec<&str> = tenant.tables().map(|t| t.schema().name.as_str()).collect();
        QueryError::new(
            QueryErrorKind::UnknownTable,
            format!(
                "table {:?} does not exist{}; this tenant has: {}",
                ident.value,
                position(ident.span),
                if known.is_empty() {
                    "no tables".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    })?;
    let mut names = vec![ident.value.clone()];
    if let Some(a) = alias {
        if !a.columns.is_empty() {
            return Err(QueryError::unsupported(
                "column aliases on a table",
                a.name.span,
            ));
        }
        names.push(a.name.value.clone());
    }
    let migration = tenant
        .migrations()
        .active(&ident.value)
        .filter(|m| m.table_version == table.version());
    let read = ReadTable {
        schema: migration.map_or(table.schema(), |m| m.target_schema()),
        version: table.version(),
        dual_read: migration.map(|m| m.info.id),
    };
    Ok((read, names))
}

/// The output column name of an unaliased select item.
fn output_name(e: &ast::Expr) -> String {
    super::with_stack(|| match e {
        ast::Expr::Identifier(id) => id.value.clone(),
        ast::Expr::CompoundIdentifier(parts) => {
            parts.last().map_or_else(String::new, |p| p.value.clone())
        }
        ast::Expr::Function(f) => f.name.to_string().to_ascii_lowercase(),
        ast::Expr::Nested(e) => output_name(e),
        _ => "?column?".to_string(),
    })
}

struct AggContext {
    group_by: Vec<Expr>,
    group_names: Vec<String>,
    aggregates: Vec<Aggregate>,
}

struct Binder<'a> {
    schema: &'a TableSchema,
    /// The table's name and alias.
    aliases: Vec<String>,
    /// Set once the query aggregates: expressions then address aggregated rows.
    agg: Option<AggContext>,
    /// The clause being bound, for messages.
    clause: &'static str,
}

impl Binder<'_> {
    /// Binds over table rows, ignoring any aggregation.
    fn bind_row(&mut self, e: &ast::Expr) -> Result<Expr, QueryError> {
        let agg = self.agg.take();
        let out = self.bind(e);
        self.agg = agg;
        out
    }

    fn bind_constant(&mut self, e: &ast::Expr) -> Result<Expr, QueryError> {
        let bound = self.bind_row(e)?;
        if !bound.is_constant() {
            return Err(QueryError::invalid(format!(
                "{} must be a number or a parameter, not an expression over columns{}",
                self.clause,
                position(e.span())
            )));
        }
        Ok(bound)
    }

    fn bind(&mut self, e: &ast::Expr) -> Result<Expr, QueryError> {
        super::with_stack(|| self.bind_node(e))
    }

    #[expect(clippy::expect_used, reason = "checked on the lines above")]
    fn bind_node(&mut self, e: &ast::Expr) -> Result<Expr, QueryError> {
        if self.agg.is_some() && !contains_aggregate(e) {
            // In an aggregating query an expression is a group key, a constant, or
            // built from those and aggregates.
            if let Ok(row) = self.bind_row(e) {
                let agg = self.agg.as_ref().expect("checked above");
                if let Some(i) = agg.group_by.iter().position(|g| *g == row) {
                    return Ok(Expr::Column(i));
                }
                if row.is_constant() {
                    return Ok(row);
                }
            }
        }
        let b = |s: &mut Self, e: &ast::Expr| s.bind(e).map(Box::new);
        Ok(match e {
            ast::Expr::Identifier(id) => self.column(id, e)?,
            ast::Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                [table, column] if self.aliases.contains(&table.value) => self.column(column, e)?,
                [table, _] => {
                    return Err(QueryError::invalid(format!(
                        "{:?}{} is not the table of this query ({})",
                        table.value,
                        position(table.span),
                        self.aliases.join(" or ")
                    )))
                }
                _ => return Err(QueryError::unsupported(format!("the name {e}"), e.span())),
            },
            ast::Expr::Value(v) => match &v.value {
                ast::Value::Placeholder(p) => {
                    // `$n` tokens were checked by normalization; the parser also builds
                    // placeholders from other syntax (`:name`, `?`), which we refuse.
                    match p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) if n >= 1 => Expr::Param(n - 1),
                        _ => {
                            return Err(QueryError::new(
                                QueryErrorKind::Params,
                                format!(
                                    "placeholder {p:?}{} is not supported; write $1, $2, …",
                                    position(v.span)
                                ),
                            ))
                        }
                    }
                }
                ast::Value::Boolean(x) => Expr::Const(Value::Bool(*x)),
                ast::Value::Null => Expr::Const(Value::Null),
                other => {
                    return Err(QueryError::unsupported(
                        format!("the literal {other}"),
                        v.span,
                    ))
                }
            },
            ast::Expr::Nested(inner) => self.bind(inner)?,
            ast::Expr::UnaryOp { op, expr } => match op {
                UnaryOperator::Minus => Expr::Neg(b(self, expr)?),
                UnaryOperator::Plus => self.bind(expr)?,
                UnaryOperator::Not => Expr::Not(b(self, expr)?),
                other => {
                    return Err(QueryError::unsupported(
                        format!("operator {other}"),
                        e.span(),
                    ))
                }
            },
            ast::Expr::BinaryOp { left, op, right } => {
                let (l, r) = (b(self, left)?, b(self, right)?);
                match op {
                    BinaryOperator::Plus => Expr::Arith(ArithOp::Add, l, r),
                    BinaryOperator::Minus => Expr::Arith(ArithOp::Sub, l, r),
                    BinaryOperator::Multiply => Expr::Arith(ArithOp::Mul, l, r),
                    BinaryOperator::Divide => Expr::Arith(ArithOp::Div, l, r),
                    BinaryOperator::Modulo => Expr::Arith(ArithOp::Mod, l, r),
                    BinaryOperator::Eq => Expr::Cmp(CmpOp::Eq, l, r),
                    BinaryOperator::NotEq => Expr::Cmp(CmpOp::NotEq, l, r),
                    BinaryOperator::Lt => Expr::Cmp(CmpOp::Lt, l, r),
                    BinaryOperator::LtEq => Expr::Cmp(CmpOp::LtEq, l, r),
                    BinaryOperator::Gt => Expr::Cmp(CmpOp::Gt, l, r),
                    BinaryOperator::GtEq => Expr::Cmp(CmpOp::GtEq, l, r),
                    BinaryOperator::And => Expr::And(l, r),
                    BinaryOperator::Or => Expr::Or(l, r),
                    BinaryOperator::LtDashGt => self.distance(Metric::L2, l, r)?,
                    BinaryOperator::Spaceship => self.distance(Metric::Cosine, l, r)?,
                    other => {
                        return Err(QueryError::unsupported(
                            format!("operator {other}"),
                            e.span(),
                        ))
                    }
                }
            }
            ast::Expr::IsNull(inner) => Expr::IsNull(b(self, inner)?, false),
            ast::Expr::IsNotNull(inner) => Expr::IsNull(b(self, inner)?, true),
            ast::Expr::In {
                expr,
                target: ast::InTarget::List(list),
                negated,
                global: false,
            } => Expr::InList(
                b(self, expr)?,
                list.iter()
                    .map(|x| self.bind(x))
                    .collect::<Result<_, _>>()?,
                *negated,
            ),
            ast::Expr::Between {
                expr,
                negated,
                low,
                high,
            } => Expr::Between(b(self, expr)?, b(self, low)?, b(self, high)?, *negated),
            ast::Expr::Like {
                negated,
                any: false,
                expr,
                pattern,
                escape_char: None,
            } => Expr::Like(b(self, expr)?, b(self, pattern)?, *negated),
            ast::Expr::Function(f) => self.aggregate(f, e)?,
            other => {
                return Err(QueryError::unsupported(
                    format!("the expression {other}"),
                    other.span(),
                ))
            }
        })
    }

    /// A distance between two vectors: a column operand must be a vector column (a
    /// parameter may be a vector, or text decoded once when the query starts).
    fn distance(&self, metric: Metric, l: Box<Expr>, r: Box<Expr>) -> Result<Expr, QueryError> {
        if self.agg.is_none() {
            for side in [&l, &r] {
                if let Expr::Column(c) = **side {
                    let column = &self.schema.columns[c];
                    if !matches!(column.ty, crate::value::ColumnType::Vector(_)) {
                        return Err(QueryError::invalid(format!(
                            "{} needs vectors, but column {:?} is {}",
                            metric.symbol(),
                            column.name,
                            column.ty
                        )));
                    }
                }
            }
        }
        Ok(Expr::Distance(metric, l, r))
    }

    fn column(&self, id: &ast::Ident, whole: &ast::Expr) -> Result<Expr, QueryError> {
        let Some(c) = self.schema.column(&id.value) else {
            let known: Vec<&str> = self
                .schema
                .live_columns()
                .map(|(_, c)| c.name.as_str())
                .collect();
            return Err(QueryError::invalid(format!(
                "column {:?}{} does not exist in table {:?}; its columns: {}",
                id.value,
                position(id.span),
                self.schema.name,
                known.join(", ")
            )));
        };
        if self.agg.is_some() {
            return Err(QueryError::invalid(format!(
                "column {:?}{} must appear in GROUP BY or be used in an aggregate function",
                id.value,
                position(whole.span())
            )));
        }
        Ok(Expr::Column(c))
    }

    #[expect(clippy::expect_used, reason = "checked on the lines above")]
    fn aggregate(&mut self, f: &ast::Function, whole: &ast::Expr) -> Result<Expr, QueryError> {
        let name = f.name.to_string().to_ascii_lowercase();
        let func = match name.as_str() {
            "count" => AggFunc::Count,
            "sum" => AggFunc::Sum,
            "avg" => AggFunc::Avg,
            "min" => AggFunc::Min,
            "max" => AggFunc::Max,
            _ => {
                return Err(QueryError::unsupported(
                    format!("function {name} (supported: count, sum, avg, min, max)"),
                    whole.span(),
                ))
            }
        };
        if self.agg.is_none() {
            return Err(QueryError::invalid(format!(
                "aggregate function {name}{} is not allowed in {}",
                position(whole.span()),
                self.clause
            )));
        }
        if f.filter.is_some()
            || f.over.is_some()
            || !f.within_group.is_empty()
            || f.null_treatment.is_some()
            || !matches!(f.parameters, FunctionArguments::None)
        {
            return Err(QueryError::unsupported(
                format!("{name} with FILTER, OVER or WITHIN GROUP"),
                whole.span(),
            ));
        }
        let FunctionArguments::List(list) = &f.args else {
            return Err(QueryError::invalid(format!(
                "{name}{} needs one argument",
                position(whole.span())
            )));
        };
        if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            return Err(QueryError::unsupported(
                format!("{name}(DISTINCT …) and argument clauses"),
                whole.span(),
            ));
        }
        let arg = match list.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] if func == AggFunc::Count => None,
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] => {
                if contains_aggregate(arg) {
                    return Err(QueryError::invalid(format!(
                        "aggregate functions cannot be nested{}",
                        position(arg.span())
                    )));
                }
                Some(self.bind_row(arg)?)
            }
            _ => {
                return Err(QueryError::invalid(format!(
                    "{name}{} takes exactly one argument{}",
                    position(whole.span()),
                    if func == AggFunc::Count { " or *" } else { "" }
                )))
            }
        };
        let aggregate = Aggregate { func, arg };
        let agg = self.agg.as_mut().expect("checked above");
        let position = match agg.aggregates.iter().position(|a| *a == aggregate) {
            Some(p) => p,
            None => {
                agg.aggregates.push(aggregate);
                agg.aggregates.len() - 1
            }
        };
        Ok(Expr::Column(agg.group_by.len() + position))
    }
}

/// Whether an expression calls a function (only aggregates are supported).
fn contains_aggregate(e: &ast::Expr) -> bool {
    super::with_stack(|| match e {
        ast::Expr::Function(_) => true,
        ast::Expr::Nested(x)
        | ast::Expr::UnaryOp { expr: x, .. }
        | ast::Expr::IsNull(x)
        | ast::Expr::IsNotNull(x) => contains_aggregate(x),
        ast::Expr::BinaryOp { left, right, .. } => {
            contains_aggregate(left) || contains_aggregate(right)
        }
        ast::Expr::In {
            expr,
            target: ast::InTarget::List(list),
            ..
        } => contains_aggregate(expr) || list.iter().any(contains_aggregate),
        ast::Expr::Between {
            expr, low, high, ..
        } => contains_aggregate(expr) || contains_aggregate(low) || contains_aggregate(high),
        ast::Expr::Like { expr, pattern, .. } => {
            contains_aggregate(expr) || contains_aggregate(pattern)
        }
        _ => false,
    })
}
