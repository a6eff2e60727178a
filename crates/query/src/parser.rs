//! The grammar: query text to [`Query`] (or a bare condition to [`Expr`]), built on winnow over
//! the text itself, with no separate lexer.
//!
//! Error reporting follows the "furthest failure" rule: every token test that fails, including
//! the optional ones (`AND`? `GROUP BY`?), records what it wanted at its offset in a shared
//! [`Tracker`], and the error shown lists everything wanted at the furthest offset reached.
//! Problems that are not a matter of a missing token (an unknown function, a bad escape, too
//! much nesting) are *fatal*: recorded once, with their own message, and reported instead.

use std::cell::{Cell, RefCell};

use serde_json::Number;
use winnow::ModalResult;
use winnow::Parser;
use winnow::Stateful;
use winnow::error::{EmptyError, ErrMode};
use winnow::stream::Stream;
use winnow::token::take_while;

use crate::MAX_QUERY_LEN;
use crate::ast::{
    Aggregate, BinaryOp, Expr, From, Function, Literal, Path, Query, Segment, Select, SelectItem,
    UnaryOp, is_ident_continue, is_ident_start, is_keyword,
};
use crate::error::{ParseError, ParseErrorKind};

/// How deep parentheses, unary operators, calls and array literals may nest while parsing.
/// Each level costs a handful of stack frames, so this keeps hostile input from overflowing the
/// stack.
pub const MAX_NESTING: usize = 64;

/// The deepest expression tree a query may produce (operator chains such as `a + b + c` count
/// one level per operator). The evaluator and printer recurse over the tree, so it is bounded.
/// `AND` and `OR` chains are flat lists and cost one level however long they are.
pub const MAX_DEPTH: usize = 128;

type Input<'s, 't> = Stateful<&'s str, &'t Tracker<'s>>;
type PResult<T> = ModalResult<T, EmptyError>;

/// Shared, interior-mutable parse state. Backtracking resets the input but not this, which is
/// what lets it remember the furthest failure.
#[derive(Debug)]
struct Tracker<'s> {
    src: &'s str,
    furthest: Cell<usize>,
    expected: RefCell<Vec<&'static str>>,
    fatal: RefCell<Option<Fatal>>,
    nesting: Cell<usize>,
}

#[derive(Debug)]
struct Fatal {
    offset: usize,
    kind: ParseErrorKind,
    expected: String,
    message: String,
}

impl<'s> Tracker<'s> {
    fn new(src: &'s str) -> Self {
        Tracker {
            src,
            furthest: Cell::new(0),
            expected: RefCell::new(Vec::new()),
            fatal: RefCell::new(None),
            nesting: Cell::new(0),
        }
    }

    fn char_position(&self, byte_offset: usize) -> usize {
        self.src
            .get(..byte_offset)
            .map_or(0, |prefix| prefix.chars().count())
    }

    fn into_error(self) -> ParseError {
        if let Some(fatal) = self.fatal.take() {
            return ParseError {
                position: self.char_position(fatal.offset),
                expected: fatal.expected,
                message: fatal.message,
                kind: fatal.kind,
            };
        }
        let offset = self.furthest.get();
        let expected = self.expected.take();
        let mut described: Vec<String> = expected.iter().map(|what| describe(what)).collect();
        described.dedup();
        let expected = match described.len() {
            0 => "a valid query".to_owned(),
            1 => described.remove(0),
            _ => format!("one of {}", described.join(", ")),
        };
        ParseError {
            position: self.char_position(offset),
            expected,
            message: format!("found {}", found_at(self.src, offset)),
            kind: ParseErrorKind::Syntax,
        }
    }
}

/// Keywords and classes ("an expression") read as they are; symbols are quoted.
fn describe(what: &str) -> String {
    if what.chars().all(|c| c.is_ascii_alphabetic() || c == ' ') {
        what.to_owned()
    } else {
        format!("'{what}'")
    }
}

/// A short rendering of the token at `offset`, for "found ...".
fn found_at(src: &str, offset: usize) -> String {
    let rest = src.get(offset..).unwrap_or("");
    let mut chars = rest.chars();
    let Some(first) = chars.next() else {
        return "end of query".to_owned();
    };
    let token: String = if is_ident_continue(first) {
        rest.chars().take_while(|&c| is_ident_continue(c)).collect()
    } else {
        first.to_string()
    };
    let shown: String = token.chars().take(32).collect();
    // Debug formatting quotes the token and escapes control characters.
    format!("{shown:?}")
}

fn offset(i: &Input<'_, '_>) -> usize {
    i.state.src.len() - i.input.len()
}

/// Records that `what` was wanted here and fails, letting the caller backtrack.
fn expected<T>(i: &Input<'_, '_>, what: &'static str) -> PResult<T> {
    let tracker = i.state;
    let at = offset(i);
    let furthest = tracker.furthest.get();
    if at > furthest {
        tracker.furthest.set(at);
        let mut list = tracker.expected.borrow_mut();
        list.clear();
        list.push(what);
    } else if at == furthest {
        let mut list = tracker.expected.borrow_mut();
        if !list.contains(&what) {
            list.push(what);
        }
    }
    Err(ErrMode::Backtrack(EmptyError))
}

/// Records an error that no alternative can repair, and cuts.
fn fatal<T>(
    tracker: &Tracker<'_>,
    at: usize,
    kind: ParseErrorKind,
    expected: impl Into<String>,
    message: impl Into<String>,
) -> PResult<T> {
    let mut slot = tracker.fatal.borrow_mut();
    if slot.is_none() {
        *slot = Some(Fatal {
            offset: at,
            kind,
            expected: expected.into(),
            message: message.into(),
        });
    }
    Err(ErrMode::Cut(EmptyError))
}

fn ws(i: &mut Input<'_, '_>) -> PResult<()> {
    take_while(0.., char::is_whitespace).void().parse_next(i)
}

/// The identifier-like word at the cursor (after whitespace), without consuming or recording.
fn peek_word<'s>(i: &mut Input<'s, '_>) -> PResult<Option<&'s str>> {
    ws(i)?;
    let rest: &'s str = i.input;
    if !rest.chars().next().is_some_and(is_ident_start) {
        return Ok(None);
    }
    let len = rest
        .char_indices()
        .find(|&(_, c)| !is_ident_continue(c))
        .map_or(rest.len(), |(at, _)| at);
    Ok(rest.get(..len))
}

fn take_bytes<'s>(i: &mut Input<'s, '_>, len: usize) -> &'s str {
    i.next_slice(len)
}

/// Whether the next word is `keyword` (case-insensitively); consumes it if so. Records nothing.
fn try_keyword(i: &mut Input<'_, '_>, keyword: &str) -> PResult<bool> {
    match peek_word(i)? {
        Some(word) if word.eq_ignore_ascii_case(keyword) => {
            take_bytes(i, word.len());
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Like [`try_keyword`], but records the keyword as expected when it is absent.
fn opt_keyword(i: &mut Input<'_, '_>, keyword: &'static str) -> PResult<bool> {
    if try_keyword(i, keyword)? {
        return Ok(true);
    }
    let _: PResult<()> = expected(i, keyword);
    Ok(false)
}

fn keyword(i: &mut Input<'_, '_>, keyword: &'static str) -> PResult<()> {
    if try_keyword(i, keyword)? {
        Ok(())
    } else {
        expected(i, keyword)
    }
}

/// Whether the input continues with `symbol` (after whitespace); consumes it if so.
fn try_symbol(i: &mut Input<'_, '_>, symbol: &str) -> PResult<bool> {
    ws(i)?;
    if i.input.starts_with(symbol) {
        take_bytes(i, symbol.len());
        Ok(true)
    } else {
        Ok(false)
    }
}

fn opt_symbol(i: &mut Input<'_, '_>, symbol: &'static str) -> PResult<bool> {
    if try_symbol(i, symbol)? {
        return Ok(true);
    }
    let _: PResult<()> = expected(i, symbol);
    Ok(false)
}

fn symbol(i: &mut Input<'_, '_>, symbol: &'static str) -> PResult<()> {
    if try_symbol(i, symbol)? {
        Ok(())
    } else {
        expected(i, symbol)
    }
}

/// Runs `parse` one nesting level deeper, refusing to go past [`MAX_NESTING`].
fn nested<'s, T>(
    i: &mut Input<'s, '_>,
    parse: impl FnOnce(&mut Input<'s, '_>) -> PResult<T>,
) -> PResult<T> {
    let tracker = i.state;
    let depth = tracker.nesting.get() + 1;
    if depth > MAX_NESTING {
        return fatal(
            tracker,
            offset(i),
            ParseErrorKind::TooDeep,
            format!("at most {MAX_NESTING} levels of nesting"),
            "the expression nests too deeply",
        );
    }
    tracker.nesting.set(depth);
    let result = parse(i);
    tracker.nesting.set(depth - 1);
    result
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

fn check_length(text: &str) -> Result<(), ParseError> {
    // A byte count within the limit settles it without walking the characters.
    if text.len() <= MAX_QUERY_LEN {
        return Ok(());
    }
    let chars = text.chars().count();
    if chars <= MAX_QUERY_LEN {
        return Ok(());
    }
    Err(ParseError {
        position: MAX_QUERY_LEN,
        expected: format!("a query of at most {MAX_QUERY_LEN} characters"),
        message: format!("the query has {chars} characters"),
        kind: ParseErrorKind::TooLong,
    })
}

fn run<'s, T>(
    text: &'s str,
    parse: impl FnOnce(&mut Input<'s, '_>) -> PResult<T>,
) -> Result<T, ParseError> {
    check_length(text)?;
    let tracker = Tracker::new(text);
    let mut input = Stateful {
        input: text,
        state: &tracker,
    };
    let result = parse(&mut input);
    match result {
        Ok(value) => Ok(value),
        Err(_) => Err(tracker.into_error()),
    }
}

pub(crate) fn parse_query(text: &str) -> Result<Query, ParseError> {
    run(text, query)
}

pub(crate) fn parse_condition(text: &str) -> Result<Expr, ParseError> {
    run(text, |i| {
        ws(i)?;
        let start = offset(i);
        let mut expr = or_expr(i)?;
        end_of_query(i)?;
        check_depth(i, &expr, start)?;
        strip_expr(&mut expr, From::Devices);
        Ok(expr)
    })
}

fn end_of_query(i: &mut Input<'_, '_>) -> PResult<()> {
    ws(i)?;
    if i.input.is_empty() {
        Ok(())
    } else {
        expected(i, "end of query")
    }
}

// ---------------------------------------------------------------------------------------------
// Query structure
// ---------------------------------------------------------------------------------------------

fn query(i: &mut Input<'_, '_>) -> PResult<Query> {
    keyword(i, "SELECT")?;
    let top = if try_keyword(i, "TOP")? {
        Some(top_count(i)?)
    } else {
        None
    };
    let mut item_offsets = Vec::new();
    let select = if opt_symbol(i, "*")? {
        Select::All
    } else {
        let mut items = Vec::new();
        loop {
            ws(i)?;
            item_offsets.push(offset(i));
            items.push(select_item(i)?);
            if !opt_symbol(i, ",")? {
                break;
            }
        }
        Select::Items(items)
    };
    keyword(i, "FROM")?;
    let from = collection(i)?;
    let where_ = if opt_keyword(i, "WHERE")? {
        ws(i)?;
        let start = offset(i);
        let expr = or_expr(i)?;
        check_depth(i, &expr, start)?;
        Some(expr)
    } else {
        None
    };
    ws(i)?;
    let group_offset = offset(i);
    let mut group_by = Vec::new();
    if try_keyword(i, "GROUP")? {
        keyword(i, "BY")?;
        loop {
            group_by.push(bare_path(i)?);
            if !opt_symbol(i, ",")? {
                break;
            }
        }
    } else {
        let _: PResult<()> = expected(i, "GROUP BY");
    }
    end_of_query(i)?;

    let mut query = Query {
        top,
        select,
        from,
        where_,
        group_by,
    };
    strip_query(&mut query);
    validate_projection(i, &query, &item_offsets, group_offset)?;
    Ok(query)
}

fn top_count(i: &mut Input<'_, '_>) -> PResult<u64> {
    ws(i)?;
    let at = offset(i);
    let digits = i.input.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return expected(i, "a row count");
    }
    let text = take_bytes(i, digits);
    match text.parse::<u64>() {
        Ok(count) => Ok(count),
        Err(_) => fatal(
            i.state,
            at,
            ParseErrorKind::Invalid,
            "a row count that fits in 64 bits",
            format!("found {text}"),
        ),
    }
}

fn select_item(i: &mut Input<'_, '_>) -> PResult<SelectItem> {
    let at = offset(i);
    let expr = match peek_word(i)? {
        Some(word) if followed_by_paren(i, word) => {
            if let Some(aggregate) = Aggregate::ALL
                .into_iter()
                .find(|aggregate| aggregate.name().eq_ignore_ascii_case(word))
            {
                take_bytes(i, word.len());
                let expr = aggregate_call(i, aggregate, at)?;
                check_depth(i, &expr, at)?;
                expr
            } else {
                return fatal(
                    i.state,
                    at,
                    ParseErrorKind::Invalid,
                    "a property path or an aggregate (COUNT, AVG, SUM, MIN, MAX)",
                    format!("'{word}' cannot be selected"),
                );
            }
        }
        _ => Expr::Path(bare_path(i)?),
    };
    let alias = if opt_keyword(i, "AS")? {
        Some(alias(i)?)
    } else {
        None
    };
    Ok(SelectItem { expr, alias })
}

/// Whether `word`, at the cursor, is followed by `(`: a call rather than a path.
fn followed_by_paren(i: &Input<'_, '_>, word: &str) -> bool {
    i.input
        .get(word.len()..)
        .is_some_and(|rest| rest.trim_start().starts_with('('))
}

fn aggregate_call(i: &mut Input<'_, '_>, aggregate: Aggregate, at: usize) -> PResult<Expr> {
    symbol(i, "(")?;
    if aggregate == Aggregate::Count {
        if try_symbol(i, ")")? {
            return Ok(Expr::Aggregate(Aggregate::Count, None));
        }
        return fatal(
            i.state,
            at,
            ParseErrorKind::Invalid,
            "COUNT()",
            "COUNT takes no arguments",
        );
    }
    let argument = nested(i, |i| {
        ws(i)?;
        if i.input.starts_with(')') {
            return fatal(
                i.state,
                at,
                ParseErrorKind::Invalid,
                format!("{}(expression)", aggregate.name()),
                format!("{} takes one argument", aggregate.name()),
            );
        }
        or_expr(i)
    })?;
    symbol(i, ")")?;
    Ok(Expr::Aggregate(aggregate, Some(Box::new(argument))))
}

fn alias(i: &mut Input<'_, '_>) -> PResult<String> {
    match peek_word(i)? {
        Some(word) if !is_keyword(word) => {
            take_bytes(i, word.len());
            Ok(word.to_owned())
        }
        _ => expected(i, "an alias"),
    }
}

fn collection(i: &mut Input<'_, '_>) -> PResult<From> {
    keyword(i, "devices")?;
    if !try_symbol(i, ".")? {
        return Ok(From::Devices);
    }
    if opt_keyword(i, "modules")? {
        Ok(From::DevicesModules)
    } else if opt_keyword(i, "jobs")? {
        Ok(From::DevicesJobs)
    } else {
        Err(ErrMode::Backtrack(EmptyError))
    }
}

/// A path in a position where nothing else may stand (GROUP BY, a SELECT item).
fn bare_path(i: &mut Input<'_, '_>) -> PResult<Path> {
    match peek_word(i)? {
        Some(word) if !is_keyword(word) => {
            take_bytes(i, word.len());
            path_rest(i, word)
        }
        _ => expected(i, "a property path"),
    }
}

/// The segments after a path's first word.
fn path_rest(i: &mut Input<'_, '_>, first: &str) -> PResult<Path> {
    let mut segments = vec![Segment::Field(first.to_owned())];
    loop {
        let checkpoint = i.checkpoint();
        if try_symbol(i, ".")? {
            ws(i)?;
            let len = i
                .input
                .char_indices()
                .find(|&(_, c)| !is_ident_continue(c))
                .map_or(i.input.len(), |(at, _)| at);
            if len == 0 {
                return expected(i, "a property name");
            }
            segments.push(Segment::Field(take_bytes(i, len).to_owned()));
        } else if try_symbol(i, "[")? {
            ws(i)?;
            let at = offset(i);
            let segment = match i.input.chars().next() {
                Some(quote @ ('\'' | '"')) => Segment::Field(string_body(i, quote)?),
                Some(c) if c.is_ascii_digit() => {
                    let digits = i.input.bytes().take_while(u8::is_ascii_digit).count();
                    let text = take_bytes(i, digits);
                    match text.parse::<u64>() {
                        Ok(index) => Segment::Index(index),
                        Err(_) => {
                            return fatal(
                                i.state,
                                at,
                                ParseErrorKind::Invalid,
                                "an array index that fits in 64 bits",
                                format!("found {text}"),
                            );
                        }
                    }
                }
                _ => return expected(i, "an array index or a quoted property name"),
            };
            symbol(i, "]")?;
            segments.push(segment);
        } else {
            i.reset(&checkpoint);
            return Ok(Path { segments });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Expressions, lowest precedence first: OR, AND, NOT, comparison/IN, + -, * / %, unary, primary
// ---------------------------------------------------------------------------------------------

fn or_expr(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let first = and_expr(i)?;
    if !opt_keyword(i, "OR")? {
        return Ok(first);
    }
    let mut operands = vec![first, and_expr(i)?];
    while opt_keyword(i, "OR")? {
        operands.push(and_expr(i)?);
    }
    Ok(Expr::Or(operands))
}

fn and_expr(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let first = not_expr(i)?;
    if !opt_keyword(i, "AND")? {
        return Ok(first);
    }
    let mut operands = vec![first, not_expr(i)?];
    while opt_keyword(i, "AND")? {
        operands.push(not_expr(i)?);
    }
    Ok(Expr::And(operands))
}

fn not_expr(i: &mut Input<'_, '_>) -> PResult<Expr> {
    if try_keyword(i, "NOT")? {
        let operand = nested(i, not_expr)?;
        return Ok(Expr::Unary(UnaryOp::Not, Box::new(operand)));
    }
    comparison(i)
}

enum ComparisonOp {
    Binary(BinaryOp),
    In { negated: bool },
}

fn comparison_op(i: &mut Input<'_, '_>) -> PResult<Option<ComparisonOp>> {
    ws(i)?;
    const SYMBOLS: [(&str, BinaryOp); 7] = [
        ("<=", BinaryOp::Le),
        ("<>", BinaryOp::Ne),
        ("<", BinaryOp::Lt),
        (">=", BinaryOp::Ge),
        (">", BinaryOp::Gt),
        ("!=", BinaryOp::Ne),
        ("=", BinaryOp::Eq),
    ];
    for (text, op) in SYMBOLS {
        if try_symbol(i, text)? {
            return Ok(Some(ComparisonOp::Binary(op)));
        }
    }
    if try_keyword(i, "IN")? {
        return Ok(Some(ComparisonOp::In { negated: false }));
    }
    if try_keyword(i, "NIN")? {
        return Ok(Some(ComparisonOp::In { negated: true }));
    }
    let _: PResult<()> = expected(i, "an operator");
    Ok(None)
}

fn comparison(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let mut left = additive(i)?;
    while let Some(op) = comparison_op(i)? {
        left = match op {
            ComparisonOp::Binary(op) => {
                let right = additive(i)?;
                Expr::Binary(op, Box::new(left), Box::new(right))
            }
            ComparisonOp::In { negated } => {
                symbol(i, "[")?;
                let list = nested(i, |i| list_items(i, "]"))?;
                Expr::In {
                    expr: Box::new(left),
                    list,
                    negated,
                }
            }
        };
    }
    Ok(left)
}

/// Comma-separated expressions up to and including `close`; the opening bracket is consumed.
fn list_items(i: &mut Input<'_, '_>, close: &'static str) -> PResult<Vec<Expr>> {
    let mut items = Vec::new();
    if try_symbol(i, close)? {
        return Ok(items);
    }
    loop {
        items.push(or_expr(i)?);
        if opt_symbol(i, ",")? {
            continue;
        }
        symbol(i, close)?;
        return Ok(items);
    }
}

fn additive(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let mut left = multiplicative(i)?;
    loop {
        let op = if try_symbol(i, "+")? {
            BinaryOp::Add
        } else if try_symbol(i, "-")? {
            BinaryOp::Sub
        } else {
            let _: PResult<()> = expected(i, "an operator");
            return Ok(left);
        };
        let right = multiplicative(i)?;
        left = Expr::Binary(op, Box::new(left), Box::new(right));
    }
}

fn multiplicative(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let mut left = unary(i)?;
    loop {
        let op = if try_symbol(i, "*")? {
            BinaryOp::Mul
        } else if try_symbol(i, "/")? {
            BinaryOp::Div
        } else if try_symbol(i, "%")? {
            BinaryOp::Rem
        } else {
            let _: PResult<()> = expected(i, "an operator");
            return Ok(left);
        };
        let right = unary(i)?;
        left = Expr::Binary(op, Box::new(left), Box::new(right));
    }
}

fn unary(i: &mut Input<'_, '_>) -> PResult<Expr> {
    let op = if try_symbol(i, "-")? {
        UnaryOp::Neg
    } else if try_symbol(i, "+")? {
        UnaryOp::Plus
    } else {
        return primary(i);
    };
    ws(i)?;
    // A sign straight before a number is part of the literal: `-5` is the constant -5.
    if i.input.starts_with(|c: char| c.is_ascii_digit()) {
        let number = number(i)?;
        let number = if op == UnaryOp::Neg {
            negate(&number)
        } else {
            number
        };
        return Ok(Expr::Literal(Literal::Number(number)));
    }
    let operand = nested(i, unary)?;
    Ok(Expr::Unary(op, Box::new(operand)))
}

fn negate(number: &Number) -> Number {
    if let Some(value) = number.as_u64() {
        if value == 0 {
            return Number::from(0u64);
        }
        if let Some(negated) = 0i64.checked_sub_unsigned(value) {
            return Number::from(negated);
        }
    }
    let value = number.as_f64().unwrap_or(0.0);
    Number::from_f64(-value).unwrap_or_else(|| Number::from(0u64))
}

fn primary(i: &mut Input<'_, '_>) -> PResult<Expr> {
    ws(i)?;
    let at = offset(i);
    let Some(first) = i.input.chars().next() else {
        return expected(i, "an expression");
    };
    match first {
        '(' => {
            take_bytes(i, 1);
            let inner = nested(i, or_expr)?;
            symbol(i, ")")?;
            Ok(inner)
        }
        '[' => {
            take_bytes(i, 1);
            let items = nested(i, |i| list_items(i, "]"))?;
            Ok(Expr::Array(items))
        }
        '\'' | '"' => Ok(Expr::Literal(Literal::String(string_body(i, first)?))),
        c if c.is_ascii_digit() => Ok(Expr::Literal(Literal::Number(number(i)?))),
        c if is_ident_start(c) => {
            let Some(word) = peek_word(i)? else {
                return expected(i, "an expression");
            };
            if let Some(literal) = keyword_literal(word) {
                take_bytes(i, word.len());
                return Ok(Expr::Literal(literal));
            }
            if is_keyword(word) {
                return expected(i, "an expression");
            }
            if followed_by_paren(i, word) {
                take_bytes(i, word.len());
                return call(i, word, at);
            }
            take_bytes(i, word.len());
            Ok(Expr::Path(path_rest(i, word)?))
        }
        _ => expected(i, "an expression"),
    }
}

fn keyword_literal(word: &str) -> Option<Literal> {
    if word.eq_ignore_ascii_case("true") {
        Some(Literal::Bool(true))
    } else if word.eq_ignore_ascii_case("false") {
        Some(Literal::Bool(false))
    } else if word.eq_ignore_ascii_case("null") {
        Some(Literal::Null)
    } else if word.eq_ignore_ascii_case("undefined") {
        Some(Literal::Undefined)
    } else {
        None
    }
}

fn call(i: &mut Input<'_, '_>, name: &str, at: usize) -> PResult<Expr> {
    let Some(function) = Function::from_name(name) else {
        let is_aggregate = Aggregate::ALL
            .into_iter()
            .any(|aggregate| aggregate.name().eq_ignore_ascii_case(name));
        let message = if is_aggregate {
            format!("the aggregate {name} is allowed only in the SELECT list")
        } else {
            format!("'{name}' is not a function of the IoT Hub query language")
        };
        return fatal(
            i.state,
            at,
            ParseErrorKind::Invalid,
            "a known function",
            message,
        );
    };
    symbol(i, "(")?;
    let arguments = nested(i, |i| list_items(i, ")"))?;
    let (min, max) = function.arity();
    let count = arguments.len();
    if count < min || count > max {
        let wanted = match (min, max) {
            (min, usize::MAX) => format!("at least {min} argument(s)"),
            (min, max) if min == max => format!("{min} argument(s)"),
            (min, max) => format!("{min} to {max} arguments"),
        };
        return fatal(
            i.state,
            at,
            ParseErrorKind::Invalid,
            wanted,
            format!("{} was given {count}", function.name()),
        );
    }
    Ok(Expr::Call(function, arguments))
}

/// A number literal: `0x1F`, `42`, `2.5`, `1e-3`. Integers that fit 64 bits stay integers.
fn number(i: &mut Input<'_, '_>) -> PResult<Number> {
    let at = offset(i);
    let rest = i.input;
    let bytes = rest.as_bytes();
    if bytes.len() > 2 && bytes[0] == b'0' && (bytes[1] == b'x' || bytes[1] == b'X') {
        let digits = bytes[2..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits > 0 {
            let text = take_bytes(i, 2 + digits);
            return match u64::from_str_radix(&text[2..], 16) {
                Ok(value) => Ok(Number::from(value)),
                Err(_) => fatal(
                    i.state,
                    at,
                    ParseErrorKind::Invalid,
                    "a hexadecimal number that fits in 64 bits",
                    format!("found {text}"),
                ),
            };
        }
    }
    let digits_from = |from: usize| {
        bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut len = digits_from(0);
    let mut is_float = false;
    if bytes.get(len) == Some(&b'.') && digits_from(len + 1) > 0 {
        len += 1 + digits_from(len + 1);
        is_float = true;
    }
    if matches!(bytes.get(len), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(len + 1), Some(b'+' | b'-')));
        let exponent = digits_from(len + 1 + sign);
        if exponent > 0 {
            len += 1 + sign + exponent;
            is_float = true;
        }
    }
    if len == 0 {
        return expected(i, "a number");
    }
    let text = take_bytes(i, len);
    if !is_float && let Ok(value) = text.parse::<u64>() {
        return Ok(Number::from(value));
    }
    match text.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(number) => Ok(number),
        None => fatal(
            i.state,
            at,
            ParseErrorKind::Invalid,
            "a finite number",
            format!("{text} is out of range"),
        ),
    }
}

/// A quoted string starting at the cursor; `quote` is its opening (and closing) character.
/// Escapes: `\'`, `\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t` and `\uXXXX` (surrogate pairs
/// combine).
fn string_body(i: &mut Input<'_, '_>, quote: char) -> PResult<String> {
    let start = offset(i);
    let rest = i.input;
    let mut value = String::new();
    let mut chars = rest.char_indices().skip(1);
    while let Some((at, c)) = chars.next() {
        if c == quote {
            take_bytes(i, at + c.len_utf8());
            return Ok(value);
        }
        if c != '\\' {
            value.push(c);
            continue;
        }
        let escape_at = start + at;
        let Some((_, escaped)) = chars.next() else {
            break;
        };
        let decoded = match escaped {
            '\'' | '"' | '\\' | '/' => escaped,
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let Some(unit) = hex4(&mut chars) else {
                    return bad_escape(i, escape_at);
                };
                if (0xD800..0xDC00).contains(&unit) {
                    // A high surrogate must be followed by `\u` and a low one.
                    let low = match (chars.next(), chars.next()) {
                        (Some((_, '\\')), Some((_, 'u'))) => hex4(&mut chars),
                        _ => None,
                    };
                    match low {
                        Some(low) if (0xDC00..0xE000).contains(&low) => {
                            let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            match char::from_u32(code) {
                                Some(c) => c,
                                None => return bad_escape(i, escape_at),
                            }
                        }
                        _ => return bad_escape(i, escape_at),
                    }
                } else {
                    match char::from_u32(unit) {
                        Some(c) => c,
                        None => return bad_escape(i, escape_at),
                    }
                }
            }
            _ => return bad_escape(i, escape_at),
        };
        value.push(decoded);
    }
    fatal(
        i.state,
        start,
        ParseErrorKind::Syntax,
        format!("a closing {quote}"),
        "the string is not terminated",
    )
}

fn hex4(chars: &mut impl Iterator<Item = (usize, char)>) -> Option<u32> {
    let mut unit = 0;
    for _ in 0..4 {
        let (_, c) = chars.next()?;
        unit = unit * 16 + c.to_digit(16)?;
    }
    Some(unit)
}

fn bad_escape<T>(i: &Input<'_, '_>, at: usize) -> PResult<T> {
    fatal(
        i.state,
        at,
        ParseErrorKind::Syntax,
        r#"an escape: \' \" \\ \/ \b \f \n \r \t or \uXXXX"#,
        "invalid escape sequence",
    )
}

// ---------------------------------------------------------------------------------------------
// Checks and rewrites after parsing
// ---------------------------------------------------------------------------------------------

/// Refuses trees deeper than [`MAX_DEPTH`]. The walk stops at the limit, so it is bounded too.
fn check_depth(i: &Input<'_, '_>, expr: &Expr, at: usize) -> PResult<()> {
    if depth_within(expr, MAX_DEPTH) {
        return Ok(());
    }
    fatal(
        i.state,
        at,
        ParseErrorKind::TooDeep,
        format!("an expression at most {MAX_DEPTH} operators deep"),
        "the expression is too deeply nested; use IN [..] or fewer chained operators",
    )
}

fn depth_within(expr: &Expr, budget: usize) -> bool {
    if budget == 0 {
        return false;
    }
    let below = budget - 1;
    match expr {
        Expr::Literal(_) | Expr::Path(_) => true,
        Expr::Unary(_, operand) => depth_within(operand, below),
        Expr::Binary(_, left, right) => depth_within(left, below) && depth_within(right, below),
        Expr::Array(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            items.iter().all(|item| depth_within(item, below))
        }
        Expr::In { expr, list, .. } => {
            depth_within(expr, below) && list.iter().all(|item| depth_within(item, below))
        }
        Expr::Aggregate(_, argument) => argument
            .as_deref()
            .is_none_or(|argument| depth_within(argument, below)),
    }
}

/// Whether `path` starts with the collection prefix of `from` and has more after it: such a
/// path has the prefix removed when parsed.
pub(crate) fn has_collection_prefix(path: &Path, from: From) -> bool {
    let prefix = from.prefix();
    path.segments.len() > prefix.len()
        && prefix
            .iter()
            .zip(&path.segments)
            .all(|(word, segment)| match segment {
                Segment::Field(name) => name.eq_ignore_ascii_case(word),
                Segment::Index(_) => false,
            })
}

fn strip_path(path: &mut Path, from: From) {
    if has_collection_prefix(path, from) {
        path.segments.drain(..from.prefix().len());
    }
}

fn strip_expr(expr: &mut Expr, from: From) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Path(path) => strip_path(path, from),
        Expr::Unary(_, operand) => strip_expr(operand, from),
        Expr::Binary(_, left, right) => {
            strip_expr(left, from);
            strip_expr(right, from);
        }
        Expr::Array(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            items.iter_mut().for_each(|item| strip_expr(item, from));
        }
        Expr::In { expr, list, .. } => {
            strip_expr(expr, from);
            list.iter_mut().for_each(|item| strip_expr(item, from));
        }
        Expr::Aggregate(_, argument) => {
            if let Some(argument) = argument {
                strip_expr(argument, from);
            }
        }
    }
}

fn strip_query(query: &mut Query) {
    let from = query.from;
    if let Select::Items(items) = &mut query.select {
        items
            .iter_mut()
            .for_each(|item| strip_expr(&mut item.expr, from));
    }
    if let Some(filter) = &mut query.where_ {
        strip_expr(filter, from);
    }
    query
        .group_by
        .iter_mut()
        .for_each(|path| strip_path(path, from));
}

/// In an aggregating query every selected path must be a grouping key, since one row stands
/// for many documents.
fn validate_projection(
    i: &Input<'_, '_>,
    query: &Query,
    item_offsets: &[usize],
    group_offset: usize,
) -> PResult<()> {
    let items = match &query.select {
        Select::All if !query.group_by.is_empty() => {
            return fatal(
                i.state,
                group_offset,
                ParseErrorKind::Invalid,
                "a projection list such as SELECT x, COUNT() AS n",
                "GROUP BY cannot be used with SELECT *",
            );
        }
        Select::All => return Ok(()),
        Select::Items(items) => items,
    };
    if !query.is_aggregate() {
        return Ok(());
    }
    for (item, &at) in items.iter().zip(item_offsets) {
        if let Expr::Path(path) = &item.expr
            && !query.group_by.contains(path)
        {
            return fatal(
                i.state,
                at,
                ParseErrorKind::Invalid,
                "an aggregate or a GROUP BY property",
                "this property is neither aggregated nor grouped",
            );
        }
    }
    Ok(())
}
