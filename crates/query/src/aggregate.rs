//! Result rows: projection of single documents and the GROUP BY / aggregate machinery behind
//! [`Query::aggregate`](crate::Query::aggregate) (`COUNT()`, `SUM`, `AVG`, `MIN`, `MAX`).
//!
//! Groups are found through a hash of their keys' JSON text and kept in order of first
//! appearance, so results are deterministic for a deterministic input order.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::ast::{Aggregate, Expr, Path, Query, Select, SelectItem};
use crate::eval::{Num, Val, compare, eval, lookup};

/// What to do for one SELECT item.
enum Plan<'q> {
    Path {
        path: &'q Path,
        alias: Option<&'q str>,
        /// Which GROUP BY key this path is, in an aggregating query.
        group_key: Option<usize>,
    },
    Aggregate {
        aggregate: Aggregate,
        argument: Option<&'q Expr>,
        name: Cow<'q, str>,
    },
    /// Any other expression (only a hand-built AST has one): its value, in per-document rows.
    Value { expr: &'q Expr, name: Cow<'q, str> },
}

fn plans<'q>(query: &'q Query, items: &'q [SelectItem]) -> Vec<Plan<'q>> {
    let mut unnamed = 0;
    let mut name_of = |item: &'q SelectItem| match &item.alias {
        Some(alias) => Cow::Borrowed(alias.as_str()),
        None => {
            unnamed += 1;
            Cow::Owned(format!("${unnamed}"))
        }
    };
    items
        .iter()
        .map(|item| match &item.expr {
            Expr::Aggregate(aggregate, argument) => Plan::Aggregate {
                aggregate: *aggregate,
                argument: argument.as_deref(),
                name: name_of(item),
            },
            Expr::Path(path) => Plan::Path {
                path,
                alias: item.alias.as_deref(),
                group_key: query.group_by.iter().position(|key| key == path),
            },
            expr => Plan::Value {
                expr,
                name: name_of(item),
            },
        })
        .collect()
}

/// The key a projected path gets: its alias, else the member name as the document spells it,
/// else the path's last member name.
fn path_key<'a>(path: &'a Path, alias: Option<&'a str>, found: Option<&'a str>) -> &'a str {
    alias.or(found).or_else(|| path.last_field()).unwrap_or("$")
}

pub(crate) fn project(query: &Query, doc: &Value) -> Value {
    let Select::Items(items) = &query.select else {
        return doc.clone();
    };
    if query.is_aggregate() {
        let mut grouper = Grouper::new(query, items);
        grouper.add(doc);
        return grouper
            .finish()
            .into_iter()
            .next()
            .unwrap_or_else(|| Value::Object(Map::new()));
    }
    let mut row = Map::new();
    for plan in plans(query, items) {
        match plan {
            Plan::Path { path, alias, .. } => {
                if let Some((value, found)) = lookup(doc, path) {
                    row.insert(path_key(path, alias, found).to_owned(), value.clone());
                }
            }
            Plan::Value { expr, name } => {
                if let Some(value) = eval(expr, doc).into_json() {
                    row.insert(name.into_owned(), value);
                }
            }
            Plan::Aggregate { .. } => {}
        }
    }
    Value::Object(row)
}

pub(crate) fn run<'d>(query: &Query, docs: impl IntoIterator<Item = &'d Value>) -> Vec<Value> {
    let limit = query
        .top
        .map_or(usize::MAX, |top| usize::try_from(top).unwrap_or(usize::MAX));
    let items = match &query.select {
        Select::Items(items) if query.is_aggregate() => items,
        _ => {
            return docs
                .into_iter()
                .filter(|doc| query.matches(doc))
                .take(limit)
                .map(|doc| project(query, doc))
                .collect();
        }
    };
    let mut grouper = Grouper::new(query, items);
    for doc in docs {
        if query.matches(doc) {
            grouper.add(doc);
        }
    }
    let mut rows = grouper.finish();
    rows.truncate(limit);
    rows
}

/// A running aggregate.
enum Accumulator {
    /// A grouped path: its value comes from the group key.
    Key,
    Count(u64),
    Sum {
        total: Num,
        valid: bool,
    },
    Avg {
        total: f64,
        count: u64,
        valid: bool,
    },
    Min(Option<Value>),
    Max(Option<Value>),
}

impl Accumulator {
    fn new(plan: &Plan<'_>) -> Accumulator {
        match plan {
            Plan::Path { .. } | Plan::Value { .. } => Accumulator::Key,
            Plan::Aggregate { aggregate, .. } => match aggregate {
                Aggregate::Count => Accumulator::Count(0),
                Aggregate::Sum => Accumulator::Sum {
                    total: Num::Int(0),
                    valid: true,
                },
                Aggregate::Avg => Accumulator::Avg {
                    total: 0.0,
                    count: 0,
                    valid: true,
                },
                Aggregate::Min => Accumulator::Min(None),
                Aggregate::Max => Accumulator::Max(None),
            },
        }
    }

    /// Folds one document's argument value in. Undefined values are skipped; SUM and AVG turn
    /// undefined for good when they meet a value that is not a number.
    fn add(&mut self, value: Val<'_>) {
        match self {
            Accumulator::Key => {}
            Accumulator::Count(count) => *count += 1,
            Accumulator::Sum { total, valid } => match value {
                Val::Undefined => {}
                Val::Num(number) => *total = total.add(number),
                _ => *valid = false,
            },
            Accumulator::Avg {
                total,
                count,
                valid,
            } => match value {
                Val::Undefined => {}
                Val::Num(number) => {
                    *total += number.as_f64();
                    *count += 1;
                }
                _ => *valid = false,
            },
            Accumulator::Min(best) => keep_if(best, value, Ordering::Less),
            Accumulator::Max(best) => keep_if(best, value, Ordering::Greater),
        }
    }

    fn result(&self) -> Option<Value> {
        match self {
            Accumulator::Key => None,
            Accumulator::Count(count) => Some(Value::from(*count)),
            Accumulator::Sum { total, valid } => valid.then(|| total.to_json()).flatten(),
            Accumulator::Avg {
                total,
                count,
                valid,
            } => {
                if *valid && *count > 0 {
                    Val::Num(Num::Float(*total / *count as f64)).into_json()
                } else {
                    None
                }
            }
            Accumulator::Min(best) | Accumulator::Max(best) => best.clone(),
        }
    }
}

/// MIN and MAX order primitives across types as null < booleans < numbers < strings; arrays,
/// objects and undefined are skipped.
fn keep_if(best: &mut Option<Value>, candidate: Val<'_>, wanted: Ordering) {
    if !candidate.is_primitive() {
        return;
    }
    let better = match best {
        None => true,
        Some(current) => total_order(&candidate, &Val::from_json(current)) == wanted,
    };
    if better {
        *best = candidate.into_json();
    }
}

fn total_order(left: &Val<'_>, right: &Val<'_>) -> Ordering {
    fn rank(value: &Val<'_>) -> u8 {
        match value {
            Val::Null => 0,
            Val::Bool(_) => 1,
            Val::Num(_) => 2,
            _ => 3,
        }
    }
    rank(left)
        .cmp(&rank(right))
        .then_with(|| compare(left, right).unwrap_or(Ordering::Equal))
}

struct Group {
    /// Each GROUP BY path's value in this group (None: undefined) and its member name, owned,
    /// so documents can be dropped as soon as they are folded in.
    keys: Vec<Option<(Value, Option<String>)>>,
    accumulators: Vec<Accumulator>,
}

pub(crate) struct Grouper<'q> {
    query: &'q Query,
    plans: Vec<Plan<'q>>,
    groups: Vec<Group>,
    index: HashMap<String, usize>,
    /// Reused buffer for the text of a document's group key.
    key_text: String,
}

impl<'q> Grouper<'q> {
    pub(crate) fn new(query: &'q Query, items: &'q [SelectItem]) -> Self {
        let mut grouper = Grouper {
            query,
            plans: plans(query, items),
            groups: Vec::new(),
            index: HashMap::new(),
            key_text: String::new(),
        };
        // Without GROUP BY everything is one group, and it exists even over no documents.
        if query.group_by.is_empty() {
            let group = grouper.new_group(Vec::new());
            grouper.groups.push(group);
        }
        grouper
    }

    fn new_group(&self, keys: Vec<Option<(Value, Option<String>)>>) -> Group {
        Group {
            keys,
            accumulators: self.plans.iter().map(Accumulator::new).collect(),
        }
    }

    /// How many groups there are so far.
    pub(crate) fn groups(&self) -> usize {
        self.groups.len()
    }

    pub(crate) fn add(&mut self, doc: &Value) {
        let slot = if self.query.group_by.is_empty() {
            0
        } else {
            self.key_text.clear();
            for path in &self.query.group_by {
                match lookup(doc, path) {
                    // Writing JSON into a String cannot fail.
                    Some((value, _)) => {
                        let _ = write!(self.key_text, "\u{1}{value}");
                    }
                    None => self.key_text.push('\u{0}'),
                }
            }
            match self.index.get(self.key_text.as_str()) {
                Some(&slot) => slot,
                None => {
                    let keys = self
                        .query
                        .group_by
                        .iter()
                        .map(|path| {
                            lookup(doc, path)
                                .map(|(value, found)| (value.clone(), found.map(str::to_owned)))
                        })
                        .collect();
                    let group = self.new_group(keys);
                    self.groups.push(group);
                    let slot = self.groups.len() - 1;
                    self.index.insert(self.key_text.clone(), slot);
                    slot
                }
            }
        };
        let Some(group) = self.groups.get_mut(slot) else {
            return;
        };
        for (plan, accumulator) in self.plans.iter().zip(&mut group.accumulators) {
            if let Plan::Aggregate { argument, .. } = plan {
                let value = argument.map_or(Val::Null, |argument| eval(argument, doc));
                accumulator.add(value);
            }
        }
    }

    pub(crate) fn finish(self) -> Vec<Value> {
        self.groups
            .iter()
            .map(|group| {
                let mut row = Map::new();
                for (plan, accumulator) in self.plans.iter().zip(&group.accumulators) {
                    match plan {
                        Plan::Path {
                            path,
                            alias,
                            group_key,
                        } => {
                            let key = group_key
                                .and_then(|index| group.keys.get(index))
                                .and_then(Option::as_ref);
                            if let Some((value, found)) = key {
                                row.insert(
                                    path_key(path, *alias, found.as_deref()).to_owned(),
                                    value.clone(),
                                );
                            }
                        }
                        Plan::Aggregate { name, .. } => {
                            if let Some(value) = accumulator.result() {
                                row.insert(name.to_string(), value);
                            }
                        }
                        // A value that is neither grouped nor aggregated has no single value
                        // for a group of documents.
                        Plan::Value { .. } => {}
                    }
                }
                Value::Object(row)
            })
            .collect()
    }
}
