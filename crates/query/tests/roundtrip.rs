//! Property tests: the parser never panics, whatever the text; generated syntax trees print to
//! text that parses back to the same tree; and evaluating any parsed query never panics.

mod common;

use proptest::prelude::*;
use serde_json::{Number, Value, json};
use twinhub_query::{
    Aggregate, BinaryOp, Expr, From, Function, Literal, Path, Query, Segment, Select, SelectItem,
    UnaryOp, parse, parse_condition,
};

const KEYWORDS: [&str; 16] = [
    "select",
    "top",
    "from",
    "where",
    "group",
    "by",
    "as",
    "and",
    "or",
    "not",
    "in",
    "nin",
    "true",
    "false",
    "null",
    "undefined",
];

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<u64>().prop_map(Number::from),
        any::<i64>().prop_map(Number::from),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
        (-1000i32..1000)
            .prop_map(|n| Number::from_f64(f64::from(n) / 8.0).unwrap_or(Number::from(0))),
    ]
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        Just(Literal::Undefined),
        Just(Literal::Null),
        any::<bool>().prop_map(Literal::Bool),
        number().prop_map(Literal::Number),
        any::<String>().prop_map(Literal::String),
        "[a-z'\"\\\\ ]{0,6}".prop_map(Literal::String),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z_$][a-zA-Z0-9_$]{0,6}",
        proptest::sample::select(KEYWORDS.to_vec()).prop_map(str::to_owned),
        Just("devices".to_owned()),
        Just("jobs".to_owned()),
        Just("modules".to_owned()),
        "[0-9][a-z0-9]{0,3}",
        any::<String>(),
    ]
}

fn path() -> impl Strategy<Value = Path> {
    let segment = prop_oneof![
        3 => name().prop_map(Segment::Field),
        1 => any::<u64>().prop_map(Segment::Index),
    ];
    (name(), proptest::collection::vec(segment, 0..4)).prop_map(|(first, rest)| {
        let mut segments = vec![Segment::Field(first)];
        segments.extend(rest);
        Path { segments }
    })
}

fn binary_op() -> impl Strategy<Value = BinaryOp> {
    proptest::sample::select(vec![
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Rem,
    ])
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        literal().prop_map(Expr::Literal),
        path().prop_map(Expr::Path),
    ];
    leaf.prop_recursive(5, 48, 4, |inner| {
        let list = proptest::collection::vec(inner.clone(), 0..4);
        let function = proptest::sample::select(Function::ALL.to_vec()).prop_flat_map({
            let inner = inner.clone();
            move |function| {
                let (min, max) = function.arity();
                let max = max.min(min + 2);
                proptest::collection::vec(inner.clone(), min..=max)
                    .prop_map(move |arguments| Expr::Call(function, arguments))
            }
        });
        prop_oneof![
            (
                proptest::sample::select(vec![UnaryOp::Not, UnaryOp::Neg, UnaryOp::Plus]),
                inner.clone()
            )
                .prop_map(|(op, operand)| Expr::Unary(op, Box::new(operand))),
            (binary_op(), inner.clone(), inner.clone()).prop_map(|(op, l, r)| Expr::Binary(
                op,
                Box::new(l),
                Box::new(r)
            )),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
            (inner.clone(), list.clone(), any::<bool>()).prop_map(|(expr, list, negated)| {
                Expr::In {
                    expr: Box::new(expr),
                    list,
                    negated,
                }
            }),
            list.prop_map(Expr::Array),
            function,
        ]
    })
}

fn alias() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(
        "[a-zA-Z_][a-zA-Z0-9_]{0,6}".prop_filter("not a keyword", |alias| {
            !KEYWORDS
                .iter()
                .any(|keyword| keyword.eq_ignore_ascii_case(alias))
        }),
    )
}

fn aggregate_item() -> impl Strategy<Value = Expr> {
    prop_oneof![
        Just(Expr::Aggregate(Aggregate::Count, None)),
        (
            proptest::sample::select(vec![
                Aggregate::Avg,
                Aggregate::Sum,
                Aggregate::Min,
                Aggregate::Max
            ]),
            expr()
        )
            .prop_map(|(aggregate, argument)| Expr::Aggregate(aggregate, Some(Box::new(argument)))),
    ]
}

/// Queries the parser can produce: plain ones (SELECT * or paths) and aggregating ones whose
/// selected paths are all GROUP BY keys.
fn query() -> impl Strategy<Value = Query> {
    let from =
        proptest::sample::select(vec![From::Devices, From::DevicesModules, From::DevicesJobs]);
    let plain_select = prop_oneof![
        Just(Select::All),
        proptest::collection::vec((path(), alias()), 1..4).prop_map(|items| {
            Select::Items(
                items
                    .into_iter()
                    .map(|(path, alias)| SelectItem {
                        expr: Expr::Path(path),
                        alias,
                    })
                    .collect(),
            )
        }),
    ];
    let plain = (plain_select, Just(Vec::new()));
    let grouped = proptest::collection::vec(path(), 0..3).prop_flat_map(|group_by| {
        let keys = group_by.clone();
        let grouped_item = proptest::sample::select(if keys.is_empty() {
            vec![None]
        } else {
            keys.into_iter().map(Some).collect()
        });
        let item = prop_oneof![
            (grouped_item, alias()).prop_map(|(key, alias)| match key {
                Some(path) => SelectItem {
                    expr: Expr::Path(path),
                    alias
                },
                None => SelectItem {
                    expr: Expr::Aggregate(Aggregate::Count, None),
                    alias
                },
            }),
            (aggregate_item(), alias()).prop_map(|(expr, alias)| SelectItem { expr, alias }),
        ];
        (
            proptest::collection::vec(item, 1..4).prop_map(Select::Items),
            Just(group_by),
        )
    });
    (
        proptest::option::of(any::<u64>()),
        from,
        prop_oneof![plain, grouped],
        proptest::option::of(expr()),
    )
        .prop_map(|(top, from, (select, group_by), where_)| Query {
            top,
            select,
            from,
            where_,
            group_by,
        })
        .prop_filter("grouped queries need an aggregate or a key", |query| {
            query.group_by.is_empty() || matches!(query.select, Select::Items(_))
        })
}

/// Text built from the language's own tokens, so random inputs get past the first keyword.
fn query_like_text() -> impl Strategy<Value = String> {
    let token = proptest::sample::select(vec![
        "SELECT",
        "*",
        "FROM",
        "devices",
        "devices.jobs",
        "devices.modules",
        ".",
        "WHERE",
        "(",
        ")",
        "[",
        "]",
        ",",
        "'a'",
        "\"b\\\"\"",
        "1",
        "2.5e3",
        "0x1F",
        "-",
        "+",
        "NOT",
        "AND",
        "OR",
        "IN",
        "NIN",
        "=",
        "!=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "%",
        "/",
        "x",
        "tags",
        "properties.reported",
        "$metadata",
        "COUNT()",
        "SUM(",
        "GROUP BY",
        "AS",
        "n",
        "TOP 3",
        "IS_DEFINED(",
        "LOWER(",
        "CONCAT(",
        "ARRAY_CONTAINS(",
        "true",
        "null",
        "undefined",
        "'\\u00e9'",
        "'unterminated",
        "\\",
        "é",
        "[0]",
        "['k']",
    ]);
    proptest::collection::vec(token, 0..24).prop_map(|tokens| tokens.join(" "))
}

fn sample_docs() -> Vec<Value> {
    vec![
        common::docs_twin(),
        common::job("d", "j", "completed"),
        json!({"x": 1, "n": [1, 2], "tags": {"a": "b"}, "devices": {"x": true}}),
        json!(null),
        json!([1, {"x": 2}]),
    ]
}

/// Parsing the printed query must give the query back, and running it must not panic.
fn check_parsed(query: &Query) -> Result<(), TestCaseError> {
    let printed = query.to_string();
    let reparsed = parse(&printed);
    prop_assert_eq!(reparsed.as_ref(), Ok(query), "printed as {}", printed);
    let docs = sample_docs();
    for doc in &docs {
        let _ = query.matches(doc);
        let _ = query.project(doc);
    }
    let _ = query.aggregate(&docs);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        if let Ok(query) = parse(&text) {
            check_parsed(&query)?;
        }
        let _ = parse_condition(&text);
    }

    #[test]
    fn query_like_text_never_panics(text in query_like_text()) {
        if let Ok(query) = parse(&text) {
            check_parsed(&query)?;
        }
        if let Ok(expr) = parse_condition(&text) {
            let printed = expr.to_string();
            prop_assert_eq!(parse_condition(&printed), Ok(expr), "printed as {}", printed);
        }
    }

    #[test]
    fn generated_queries_round_trip(query in query()) {
        check_parsed(&query)?;
    }

    #[test]
    fn generated_conditions_round_trip(expr in expr()) {
        let printed = expr.to_string();
        prop_assert_eq!(parse_condition(&printed), Ok(expr.clone()), "printed as {}", printed);
        for doc in sample_docs() {
            let _ = expr.evaluate(&doc);
        }
    }

    #[test]
    fn errors_point_inside_the_text(text in query_like_text()) {
        if let Err(error) = parse(&text) {
            prop_assert!(error.position <= text.chars().count());
            prop_assert!(!error.expected.is_empty());
        }
    }
}
