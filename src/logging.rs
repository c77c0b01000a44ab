//! Log lines that are lines: text from a client or the database (a
//! payload, a bad request, an error PostgreSQL quoted) is logged as data,
//! with its line breaks and other control characters escaped, so that no
//! one can print a line of their own into the server's log.

use std::fmt;

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, Writer};

/// The text format's fields, `name=value`, each value escaped. (The JSON
/// format escapes by itself.)
pub fn escaped_fields() -> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> + 'static {
    format::debug_fn(|writer: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug| {
        // `%` fields print their Display text through Debug: the text as it
        // came, which is what needs escaping.
        let text = format!("{value:?}");
        if field.name() != "message" {
            write!(writer, "{}=", field.name())?;
        }
        escape(&text, writer)
    })
    .delimited(" ")
}

/// `text` with every character that could end or rewrite a line escaped.
pub fn escape(text: &str, out: &mut impl fmt::Write) -> fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            '\u{2028}' | '\u{2029}' => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            c if c.is_control() => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_and_control_characters_are_escaped() {
        let mut out = String::new();
        escape("x\n2026-12-04T10:00:00Z  INFO forged\r\t\u{1b}[31m\u{2028}é", &mut out).unwrap();
        assert_eq!(out, "x\\n2026-12-04T10:00:00Z  INFO forged\\r\\t\\u{1b}[31m\\u{2028}é");
    }
}
