//! The crate's one error type: why a query text was refused, where, and what would have been
//! accepted there. Evaluation never fails (missing or mistyped values are *undefined*), so
//! parsing is the only fallible step.

/// What class of problem a [`ParseError`] reports, for callers that map errors to status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The text does not follow the grammar.
    Syntax,
    /// The text is longer than [`MAX_QUERY_LEN`](crate::MAX_QUERY_LEN) characters.
    TooLong,
    /// Parentheses, unary operators, function calls or operator chains nest deeper than the
    /// evaluator is willing to recurse.
    TooDeep,
    /// Well-formed, but not a query IoT Hub runs: an unknown function, a wrong number of
    /// arguments, an aggregate outside SELECT, a projection that is not grouped.
    Invalid,
}

/// A query the parser refused.
///
/// `position` counts characters (Unicode scalar values, not bytes) from the start of the text,
/// starting at 0, so it can be shown under the query as a caret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid query at character {position}: expected {expected}; {message}")]
pub struct ParseError {
    pub position: usize,
    /// What the parser would have accepted at `position`, e.g. `FROM` or `one of: AND, OR`.
    pub expected: String,
    /// What it found instead, or why it refused what it found.
    pub message: String,
    pub kind: ParseErrorKind,
}
