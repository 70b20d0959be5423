//! What dst-server's `--metrics` and `dst-mount --status --format prometheus` share of the
//! Prometheus text exposition format.

/// A label value with `\`, `"` and newlines escaped, as the text format wants.
pub fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backslashes_quotes_and_newlines_are_escaped() {
        assert_eq!(label_value("a \"b\"\\c\nd"), "a \\\"b\\\"\\\\c\\nd");
        assert_eq!(label_value("plain"), "plain");
    }
}
