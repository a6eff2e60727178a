//! Canonical query text: `Display` for [`Query`], [`Expr`], [`Path`] and [`Literal`], written so
//! that parsing the printed text gives back the same tree (`parse(&q.to_string()) == Ok(q)`).
//!
//! Keywords come out upper-case, strings single-quoted, and parentheses only where precedence
//! needs them. Paths the parser would misread (a first segment that is a keyword or not an
//! identifier, or one that starts with the collection's own prefix) are written behind the
//! collection prefix, which the parser strips again.

use std::fmt::{self, Display, Formatter, Write as _};

use crate::ast::{
    BinaryOp, Expr, From, Literal, Path, Query, Segment, Select, SelectItem, UnaryOp,
    is_plain_identifier, is_plain_member,
};
use crate::parser::has_collection_prefix;

/// Binding strength, loosest first. An operand printed where a tighter level is required gets
/// parentheses.
mod prec {
    pub const TOP: u8 = 0;
    pub const OR: u8 = 1;
    pub const AND: u8 = 2;
    pub const NOT: u8 = 3;
    pub const COMPARISON: u8 = 4;
    pub const ADDITIVE: u8 = 5;
    pub const MULTIPLICATIVE: u8 = 6;
    pub const UNARY: u8 = 7;
    pub const PRIMARY: u8 = 8;
}

fn precedence(expr: &Expr) -> u8 {
    match expr {
        Expr::Or(_) => prec::OR,
        Expr::And(_) => prec::AND,
        Expr::Unary(UnaryOp::Not, _) => prec::NOT,
        Expr::In { .. } => prec::COMPARISON,
        Expr::Binary(op, ..) if op.is_comparison() => prec::COMPARISON,
        Expr::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => prec::ADDITIVE,
        Expr::Binary(..) => prec::MULTIPLICATIVE,
        Expr::Unary(..) => prec::UNARY,
        Expr::Literal(_)
        | Expr::Path(_)
        | Expr::Array(_)
        | Expr::Call(..)
        | Expr::Aggregate(..) => prec::PRIMARY,
    }
}

struct Printer<'f, 'w> {
    out: &'f mut Formatter<'w>,
    from: From,
}

impl Printer<'_, '_> {
    fn expr(&mut self, expr: &Expr, min: u8) -> fmt::Result {
        if precedence(expr) < min {
            self.out.write_char('(')?;
            self.expr(expr, prec::TOP)?;
            return self.out.write_char(')');
        }
        match expr {
            Expr::Literal(literal) => write!(self.out, "{literal}"),
            Expr::Path(path) => write_path(self.out, path, self.from),
            Expr::Array(items) => {
                self.out.write_char('[')?;
                self.list(items)?;
                self.out.write_char(']')
            }
            Expr::Unary(UnaryOp::Not, operand) => {
                self.out.write_str("NOT ")?;
                self.expr(operand, prec::NOT)
            }
            Expr::Unary(op, operand) => {
                self.out
                    .write_char(if *op == UnaryOp::Neg { '-' } else { '+' })?;
                // A sign written straight before a number would fold into the literal, so the
                // number gets a sign of its own (`-+5`, `--5`). Not parentheses: they cost the
                // parser a nesting level the text it came from may not have spent.
                if let Expr::Literal(Literal::Number(number)) = operand.as_ref() {
                    let number = number.to_string();
                    if !number.starts_with('-') {
                        self.out.write_char('+')?;
                    }
                    return self.out.write_str(&number);
                }
                self.expr(operand, prec::UNARY)
            }
            Expr::Binary(op, left, right) => {
                let level = precedence(expr);
                self.expr(left, level)?;
                write!(self.out, " {} ", op.symbol())?;
                self.expr(right, level + 1)
            }
            Expr::And(operands) => self.chain(operands, " AND ", prec::AND + 1),
            Expr::Or(operands) => self.chain(operands, " OR ", prec::OR + 1),
            Expr::In {
                expr,
                list,
                negated,
            } => {
                self.expr(expr, prec::COMPARISON)?;
                self.out
                    .write_str(if *negated { " NIN [" } else { " IN [" })?;
                self.list(list)?;
                self.out.write_char(']')
            }
            Expr::Call(function, arguments) => {
                write!(self.out, "{}(", function.name())?;
                self.list(arguments)?;
                self.out.write_char(')')
            }
            Expr::Aggregate(aggregate, argument) => {
                write!(self.out, "{}(", aggregate.name())?;
                if let Some(argument) = argument {
                    self.expr(argument, prec::TOP)?;
                }
                self.out.write_char(')')
            }
        }
    }

    fn chain(&mut self, operands: &[Expr], separator: &str, min: u8) -> fmt::Result {
        for (index, operand) in operands.iter().enumerate() {
            if index > 0 {
                self.out.write_str(separator)?;
            }
            self.expr(operand, min)?;
        }
        Ok(())
    }

    fn list(&mut self, items: &[Expr]) -> fmt::Result {
        for (index, item) in items.iter().enumerate() {
            if index > 0 {
                self.out.write_str(", ")?;
            }
            self.expr(item, prec::TOP)?;
        }
        Ok(())
    }

    fn item(&mut self, item: &SelectItem) -> fmt::Result {
        self.expr(&item.expr, prec::TOP)?;
        if let Some(alias) = &item.alias {
            write!(self.out, " AS {alias}")?;
        }
        Ok(())
    }
}

fn write_path(out: &mut Formatter<'_>, path: &Path, from: From) -> fmt::Result {
    let bare_start = match path.segments.first() {
        Some(Segment::Field(name)) => is_plain_identifier(name),
        _ => false,
    };
    let mut segments = path.segments.iter();
    if bare_start && !has_collection_prefix(path, from) {
        if let Some(Segment::Field(name)) = segments.next() {
            out.write_str(name)?;
        }
    } else {
        out.write_str(&from.prefix().join("."))?;
    }
    for segment in segments {
        match segment {
            Segment::Field(name) if is_plain_member(name) => write!(out, ".{name}")?,
            Segment::Field(name) => {
                out.write_char('[')?;
                write_string(out, name)?;
                out.write_char(']')?;
            }
            Segment::Index(index) => write!(out, "[{index}]")?,
        }
    }
    Ok(())
}

/// A single-quoted string literal. Quotes, backslashes and control characters are escaped;
/// everything else is written as is.
fn write_string(out: &mut Formatter<'_>, value: &str) -> fmt::Result {
    out.write_char('\'')?;
    for c in value.chars() {
        match c {
            '\'' => out.write_str("\\'")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() => write!(out, "\\u{:04x}", u32::from(c))?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('\'')
}

impl Display for Literal {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Undefined => f.write_str("undefined"),
            Literal::Null => f.write_str("null"),
            Literal::Bool(value) => write!(f, "{value}"),
            Literal::Number(number) => write!(f, "{number}"),
            Literal::String(value) => write_string(f, value),
        }
    }
}

/// Prints a path as it would appear in a `FROM devices` query.
impl Display for Path {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write_path(f, self, From::Devices)
    }
}

/// Prints the expression as a condition for [`parse_condition`](crate::parse_condition), that
/// is with paths as in a `FROM devices` query.
impl Display for Expr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        Printer {
            out: f,
            from: From::Devices,
        }
        .expr(self, prec::TOP)
    }
}

impl Display for From {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix().join("."))
    }
}

impl Display for Query {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let from = self.from;
        let mut printer = Printer { out: f, from };
        printer.out.write_str("SELECT ")?;
        if let Some(top) = self.top {
            write!(printer.out, "TOP {top} ")?;
        }
        match &self.select {
            Select::All => printer.out.write_char('*')?,
            Select::Items(items) => {
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        printer.out.write_str(", ")?;
                    }
                    printer.item(item)?;
                }
            }
        }
        write!(printer.out, " FROM {from}")?;
        if let Some(filter) = &self.where_ {
            printer.out.write_str(" WHERE ")?;
            printer.expr(filter, prec::TOP)?;
        }
        if !self.group_by.is_empty() {
            printer.out.write_str(" GROUP BY ")?;
            for (index, path) in self.group_by.iter().enumerate() {
                if index > 0 {
                    printer.out.write_str(", ")?;
                }
                write_path(printer.out, path, from)?;
            }
        }
        Ok(())
    }
}
