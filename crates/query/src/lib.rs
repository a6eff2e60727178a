//! The IoT Hub query language for twinhub: `SELECT ... FROM devices [WHERE ...] [GROUP BY ...]`
//! text is parsed into a [`Query`], which then filters ([`Query::matches`]), projects
//! ([`Query::project`]) and aggregates ([`Query::aggregate`]) twin JSON documents. No I/O: the
//! server's query endpoint streams twins from the store through these calls and pages the rows.
//!
//! Semantics follow the IoT Hub documentation, which inherits them from the DocumentDB SQL
//! dialect: a path to a missing property is *undefined*; comparing with undefined, or comparing
//! values of different types, or objects and arrays, is undefined too; `NOT`, `AND` and `OR`
//! pass undefined along (`false AND x` is still false, `true OR x` still true); and a document
//! matches only when the WHERE condition is exactly `true`. Property names match exactly first
//! and, failing that, ignoring ASCII case, as IoT Hub does (`SELECT DeviceId` reads `deviceId`).
//!
//! ```
//! use serde_json::json;
//!
//! let query = twinhub_query::parse(
//!     "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'",
//! )?;
//! let twin = json!({"deviceId": "d1", "tags": {"location": {"plant": "Redmond43"}}});
//! assert!(query.matches(&twin));
//! assert_eq!(twinhub_query::parse(&query.to_string())?, query);
//! # Ok::<(), twinhub_query::ParseError>(())
//! ```

mod aggregate;
mod ast;
mod display;
mod error;
mod eval;
mod parser;

use serde_json::Value;

pub use ast::{
    Aggregate, BinaryOp, Expr, From, Function, Literal, Path, Query, Segment, Select, SelectItem,
    UnaryOp,
};
pub use error::{ParseError, ParseErrorKind};
pub use parser::{MAX_DEPTH, MAX_NESTING};

/// The longest query text accepted, in characters. IoT Hub documents the same limit.
pub const MAX_QUERY_LEN: usize = 8192;

/// Parses a query such as `SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'`.
///
/// Keywords, collection names and function names are case-insensitive. A path may carry the
/// collection as a prefix (`devices.jobs.jobId` in a `FROM devices.jobs` query); the prefix is
/// removed, so the AST's paths address the document itself.
pub fn parse(query: &str) -> Result<Query, ParseError> {
    parser::parse_query(query)
}

/// Parses a bare condition, the WHERE part without the keyword: a job's `queryCondition`
/// (`deviceId IN ['d1', 'd2']`) or a route condition. Paths are read as in `FROM devices`.
pub fn parse_condition(condition: &str) -> Result<Expr, ParseError> {
    parser::parse_condition(condition)
}

impl Query {
    /// Whether `doc` passes the WHERE clause (a query without one matches everything).
    ///
    /// Evaluation borrows from `doc` and the query, and allocates only for functions that
    /// build strings (`LOWER`, `CONCAT`...) or arrays, so it can run over a whole fleet.
    pub fn matches(&self, doc: &Value) -> bool {
        self.where_
            .as_ref()
            .is_none_or(|filter| filter.matches(doc))
    }

    /// Whether the query produces aggregated rows (an aggregate in SELECT, or GROUP BY) rather
    /// than one row per matching document.
    pub fn is_aggregate(&self) -> bool {
        if !self.group_by.is_empty() {
            return true;
        }
        match &self.select {
            Select::All => false,
            Select::Items(items) => items
                .iter()
                .any(|item| matches!(item.expr, Expr::Aggregate(..))),
        }
    }

    /// The result row for one document, without checking WHERE: the document itself for
    /// `SELECT *`, otherwise an object with one member per selected value, keyed by its alias,
    /// else by the property's name as the document spells it, else (an unnamed aggregate) `$1`,
    /// `$2`... Undefined values are left out. For an aggregating query this is the row of a
    /// group holding just `doc`.
    pub fn project(&self, doc: &Value) -> Value {
        aggregate::project(self, doc)
    }

    /// Runs the whole query over `docs`: filters them with WHERE, then either projects each
    /// match or, for an aggregating query, groups and aggregates them. `TOP n` limits the rows.
    ///
    /// Without GROUP BY an aggregating query yields exactly one row, even over no documents
    /// (`COUNT()` is then 0); with GROUP BY it yields one row per group, in order of each
    /// group's first document. Documents whose grouping property is undefined form a group of
    /// their own, whose row leaves that property out.
    pub fn aggregate<'d>(&self, docs: impl IntoIterator<Item = &'d Value>) -> Vec<Value> {
        aggregate::run(self, docs)
    }

    /// For an aggregating query, a fold that takes documents one at a time and keeps only
    /// the groups, so a scan over many documents holds none of them. `None` for a query that
    /// does not aggregate.
    pub fn aggregation(&self) -> Option<Aggregation<'_>> {
        match &self.select {
            Select::Items(items) if self.is_aggregate() => Some(Aggregation {
                query: self,
                grouper: aggregate::Grouper::new(self, items),
            }),
            _ => None,
        }
    }
}

/// A streaming aggregate; see [`Query::aggregation`].
pub struct Aggregation<'q> {
    query: &'q Query,
    grouper: aggregate::Grouper<'q>,
}

impl Aggregation<'_> {
    /// Folds one document in, if it matches the query's WHERE.
    pub fn add(&mut self, doc: &Value) {
        if self.query.matches(doc) {
            self.grouper.add(doc);
        }
    }

    /// Groups so far (one, without GROUP BY).
    pub fn groups(&self) -> usize {
        self.grouper.groups()
    }

    /// The result rows, as [`Query::aggregate`] gives them.
    pub fn finish(self) -> Vec<Value> {
        let limit = self
            .query
            .top
            .map_or(usize::MAX, |top| usize::try_from(top).unwrap_or(usize::MAX));
        let mut rows = self.grouper.finish();
        rows.truncate(limit);
        rows
    }
}

impl Expr {
    /// Whether the expression evaluates to exactly `true` on `doc`.
    pub fn matches(&self, doc: &Value) -> bool {
        matches!(eval::eval(self, doc), eval::Val::Bool(true))
    }

    /// The expression's value on `doc`, or `None` when it is undefined.
    pub fn evaluate(&self, doc: &Value) -> Option<Value> {
        eval::eval(self, doc).into_json()
    }
}
