//! The syntax tree the parser builds and the evaluator walks: a [`Query`] with its SELECT, FROM,
//! WHERE and GROUP BY parts, and the [`Expr`] tree of conditions and projections.
//!
//! Paths are stored with the FROM collection's prefix (`devices.`, `devices.jobs.`...) already
//! stripped, so the evaluator reads them straight off the document it is given.

use serde_json::Number;

/// A parsed IoT Hub query: `SELECT ... FROM ... [WHERE ...] [GROUP BY ...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `SELECT TOP n`: the most rows the query returns.
    pub top: Option<u64>,
    pub select: Select,
    pub from: From,
    /// The filter; `None` means every document matches.
    pub where_: Option<Expr>,
    /// Grouping keys; empty without GROUP BY.
    pub group_by: Vec<Path>,
}

/// The projection list of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// `SELECT *`: each matching document as it is.
    All,
    /// `SELECT a, b AS c, COUNT() AS n`. Each item's expression is an [`Expr::Path`] or an
    /// [`Expr::Aggregate`]; the parser accepts nothing else.
    Items(Vec<SelectItem>),
}

/// One projected value and the name it gets in the result row.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectItem {
    pub expr: Expr,
    /// The `AS` name: an identifier that is not a keyword.
    pub alias: Option<String>,
}

/// The collection a query runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum From {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    DevicesModules,
    /// `FROM devices.jobs`: per-device job records.
    DevicesJobs,
}

impl From {
    /// The path segments that name this collection, also accepted as a prefix on paths
    /// (`devices.jobs.jobId` in a `FROM devices.jobs` query means `jobId`).
    pub fn prefix(self) -> &'static [&'static str] {
        match self {
            From::Devices => &["devices"],
            From::DevicesModules => &["devices", "modules"],
            From::DevicesJobs => &["devices", "jobs"],
        }
    }
}

/// A property path into a document: `tags.location.plant`, `properties.reported.$metadata`,
/// `tags['odd-key']`, `properties.reported.list[0]`.
///
/// The first segment is always a [`Segment::Field`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    pub segments: Vec<Segment>,
}

impl Path {
    /// A path of plain field names, e.g. `Path::fields(["tags", "location"])`.
    pub fn fields<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Path {
            segments: names
                .into_iter()
                .map(|name| Segment::Field(name.into()))
                .collect(),
        }
    }

    /// The last field name in the path: the default key of a projected value.
    pub fn last_field(&self) -> Option<&str> {
        self.segments
            .iter()
            .rev()
            .find_map(|segment| match segment {
                Segment::Field(name) => Some(name.as_str()),
                Segment::Index(_) => None,
            })
    }
}

/// One step of a [`Path`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// An object member: `.name` or `['name']`.
    Field(String),
    /// An array element: `[3]`.
    Index(u64),
}

/// An expression: a condition in WHERE, a projection in SELECT.
///
/// `And` and `Or` hold two or more operands, so a long chain of conditions stays a flat list
/// instead of a deep tree that every walk would have to recurse through.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Literal),
    Path(Path),
    /// `[a, b, c]`.
    Array(Vec<Expr>),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    /// `expr IN [..]`, or `expr NIN [..]` when `negated`.
    In {
        expr: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Call(Function, Vec<Expr>),
    /// An aggregate; only valid as a SELECT item. `COUNT()` has no argument, the others one.
    Aggregate(Aggregate, Option<Box<Expr>>),
}

/// A constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Undefined,
    Null,
    Bool(bool),
    /// Integers stay integers (`5`), decimals and exponents are floats (`5.0`, `5e0`).
    Number(Number),
    String(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Not,
    /// Arithmetic negation, `-x`. A minus sign directly before a number literal is folded into
    /// the literal instead.
    Neg,
    /// `+x`: numbers pass through, anything else is undefined.
    Plus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Eq,
    /// `!=`, also written `<>`.
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinaryOp {
    /// The operator's canonical spelling.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Eq => "=",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Rem => "%",
        }
    }

    pub(crate) fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }
}

/// The aggregates of a SELECT list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Count,
    Avg,
    Sum,
    Min,
    Max,
}

impl Aggregate {
    pub const ALL: [Aggregate; 5] = [
        Aggregate::Count,
        Aggregate::Avg,
        Aggregate::Sum,
        Aggregate::Min,
        Aggregate::Max,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Count => "COUNT",
            Aggregate::Avg => "AVG",
            Aggregate::Sum => "SUM",
            Aggregate::Min => "MIN",
            Aggregate::Max => "MAX",
        }
    }
}

/// The built-in scalar functions: the twin and routing functions of the IoT Hub query
/// language, plus the Cosmos-style spellings `STARTSWITH`/`ENDSWITH` and `ARRAY_CONTAINS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    IsDefined,
    IsNull,
    IsBool,
    IsNumber,
    IsString,
    IsArray,
    IsObject,
    IsPrimitive,
    AsNumber,
    StartsWith,
    EndsWith,
    Contains,
    IndexOf,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    ArrayContains,
    Abs,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    Square,
    Exp,
    Power,
}

impl Function {
    pub const ALL: [Function; 27] = [
        Function::IsDefined,
        Function::IsNull,
        Function::IsBool,
        Function::IsNumber,
        Function::IsString,
        Function::IsArray,
        Function::IsObject,
        Function::IsPrimitive,
        Function::AsNumber,
        Function::StartsWith,
        Function::EndsWith,
        Function::Contains,
        Function::IndexOf,
        Function::Concat,
        Function::Length,
        Function::Lower,
        Function::Upper,
        Function::Substring,
        Function::ArrayContains,
        Function::Abs,
        Function::Ceiling,
        Function::Floor,
        Function::Sign,
        Function::Sqrt,
        Function::Square,
        Function::Exp,
        Function::Power,
    ];

    /// The canonical (printed) name.
    pub fn name(self) -> &'static str {
        match self {
            Function::IsDefined => "IS_DEFINED",
            Function::IsNull => "IS_NULL",
            Function::IsBool => "IS_BOOL",
            Function::IsNumber => "IS_NUMBER",
            Function::IsString => "IS_STRING",
            Function::IsArray => "IS_ARRAY",
            Function::IsObject => "IS_OBJECT",
            Function::IsPrimitive => "IS_PRIMITIVE",
            Function::AsNumber => "AS_NUMBER",
            Function::StartsWith => "STARTSWITH",
            Function::EndsWith => "ENDSWITH",
            Function::Contains => "CONTAINS",
            Function::IndexOf => "INDEX_OF",
            Function::Concat => "CONCAT",
            Function::Length => "LENGTH",
            Function::Lower => "LOWER",
            Function::Upper => "UPPER",
            Function::Substring => "SUBSTRING",
            Function::ArrayContains => "ARRAY_CONTAINS",
            Function::Abs => "ABS",
            Function::Ceiling => "CEILING",
            Function::Floor => "FLOOR",
            Function::Sign => "SIGN",
            Function::Sqrt => "SQRT",
            Function::Square => "SQUARE",
            Function::Exp => "EXP",
            Function::Power => "POWER",
        }
    }

    /// Looks a function up by name, case-insensitively. The routing documentation spells the
    /// string predicates `STARTS_WITH`/`ENDS_WITH`; both spellings are accepted.
    pub fn from_name(name: &str) -> Option<Function> {
        if name.eq_ignore_ascii_case("STARTS_WITH") {
            return Some(Function::StartsWith);
        }
        if name.eq_ignore_ascii_case("ENDS_WITH") {
            return Some(Function::EndsWith);
        }
        Function::ALL
            .into_iter()
            .find(|function| function.name().eq_ignore_ascii_case(name))
    }

    /// The fewest and most arguments the function takes.
    pub fn arity(self) -> (usize, usize) {
        match self {
            Function::IsDefined
            | Function::IsNull
            | Function::IsBool
            | Function::IsNumber
            | Function::IsString
            | Function::IsArray
            | Function::IsObject
            | Function::IsPrimitive
            | Function::AsNumber
            | Function::Length
            | Function::Lower
            | Function::Upper
            | Function::Abs
            | Function::Ceiling
            | Function::Floor
            | Function::Sign
            | Function::Sqrt
            | Function::Square
            | Function::Exp => (1, 1),
            Function::StartsWith
            | Function::EndsWith
            | Function::Contains
            | Function::IndexOf
            | Function::Power => (2, 2),
            Function::Substring => (2, 3),
            Function::ArrayContains => (2, 3),
            Function::Concat => (2, usize::MAX),
        }
    }
}

/// Words the grammar reserves: they cannot start a path or be an alias. After a dot any word is
/// a field name (`tags.from` is fine).
pub(crate) const KEYWORDS: [&str; 16] = [
    "SELECT",
    "TOP",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "TRUE",
    "FALSE",
    "NULL",
    "UNDEFINED",
];

pub(crate) fn is_keyword(word: &str) -> bool {
    KEYWORDS
        .iter()
        .any(|keyword| keyword.eq_ignore_ascii_case(word))
}

/// Characters that may start an identifier: letters, `_` and `$` (`$metadata`, `$version`).
pub(crate) fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

pub(crate) fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Whether `word` can be written bare as the first segment of a path or as an alias.
pub(crate) fn is_plain_identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(is_ident_start) && chars.all(is_ident_continue) && !is_keyword(word)
}

/// Whether `name` can be written bare after a dot: `tags.1st` is a valid path.
pub(crate) fn is_plain_member(name: &str) -> bool {
    !name.is_empty() && name.chars().all(is_ident_continue)
}
