//! Fuzz target for the query language: arbitrary text goes through `parse` and
//! `parse_condition`; whatever parses must print to text that parses back to the same tree
//! (unless the printed text, with its escapes and spaces, is over `MAX_QUERY_LEN`), and must
//! evaluate against a twin without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use twinhub_query::{MAX_QUERY_LEN, parse, parse_condition};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let twin = json!({
        "deviceId": "d1",
        "tags": {"location": {"plant": "Redmond43"}, "list": [1, "two", {"k": 3}]},
        "properties": {
            "desired": {"$version": 2, "$metadata": {"$lastUpdated": "2024-01-01T00:00:00Z"}},
            "reported": {"temp": 21.5, "$version": 5}
        },
        "version": 7
    });
    match parse(text) {
        Ok(query) => {
            let printed = query.to_string();
            match parse(&printed) {
                // Printing escapes control characters and spaces lists: it may outgrow the limit.
                Err(_) if printed.chars().count() > MAX_QUERY_LEN => {}
                Ok(again) => assert_eq!(again, query, "{text:?} printed as {printed:?}"),
                Err(error) => panic!("{text:?} printed as {printed:?}, which fails: {error}"),
            }
            let _ = query.matches(&twin);
            let _ = query.project(&twin);
            let _ = query.aggregate([&twin, &twin]);
        }
        Err(error) => assert!(error.position <= text.chars().count(), "{error}"),
    }
    if let Ok(expr) = parse_condition(text) {
        let _ = expr.evaluate(&twin);
        let printed = expr.to_string();
        if printed.chars().count() <= MAX_QUERY_LEN {
            assert_eq!(
                parse_condition(&printed),
                Ok(expr),
                "{text:?} printed as {printed:?}"
            );
        }
    }
});
