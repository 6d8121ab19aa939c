//! Keep passwords and tokens out of what a program prints.
//!
//! ferrymq's own messages never echo a secret (`Secret` prints `***`, URLs are shown
//! redacted, errors name the parameter, not its value). Text that other code renders
//! is another matter: a TOML parser's error quotes the offending source line — with the
//! URL and its password on it — and a client library may log what it was given.
//! [`Secrets`] collects the secret values a program was handed (from URLs and config
//! text) so that such text can be scrubbed before it is shown.
//!
//! ```
//! use ferrymq::redact::Secrets;
//!
//! let mut secrets = Secrets::new();
//! secrets.add_text("redis://app:hunter2@cache:6379/orders?token=abc123");
//! assert_eq!(
//!     secrets.scrub("connect redis://app:hunter2@cache:6379/orders?token=abc123 failed"),
//!     "connect redis://app:***@cache:6379/orders?token=*** failed"
//! );
//! ```

use std::fmt;

use ferrymq_core::config::is_secret_param;

/// What replaces a secret.
const REDACTED: &str = "***";

/// Secrets shorter than this are only scrubbed where they stand alone (between
/// non-alphanumeric characters), so a one-letter password does not garble a message.
const SHORT: usize = 4;

/// A set of secret values to scrub out of text. `Debug` shows only how many.
#[derive(Clone, Default)]
pub struct Secrets {
    values: Vec<String>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} values)", self.values.len())
    }
}

impl Secrets {
    /// No secrets yet.
    pub fn new() -> Self {
        Secrets::default()
    }

    /// Whether nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Add one secret value (and its percent-decoded form).
    pub fn add(&mut self, value: &str) {
        for v in [value.to_string(), percent_decode(value)] {
            if !v.is_empty() && v != REDACTED && !self.values.contains(&v) {
                self.values.push(v);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    /// Add the secrets of every URL in `text`: the password of its user info, and the
    /// values of query parameters whose names look secret (`password`, `token`,
    /// `sasl.password`, `aws_secret_access_key` ... see
    /// [`is_secret_param`]). Read without a
    /// URL parser, so a URL that does not parse (a bad port, several hosts) is
    /// covered too.
    pub fn add_text(&mut self, text: &str) {
        let mut rest = text;
        while let Some(at) = rest.find("://") {
            let after = &rest[at + 3..];
            let end = after
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
                .unwrap_or(after.len());
            self.add_url_tail(&after[..end]);
            rest = &after[end..];
        }
    }

    /// `tail` is a URL after its `scheme://`.
    fn add_url_tail(&mut self, tail: &str) {
        let authority_end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        if let Some((userinfo, _host)) = authority.rsplit_once('@') {
            if let Some((_user, password)) = userinfo.split_once(':') {
                self.add(password);
            }
        }
        if let Some((_, query)) = tail.split_once('?') {
            let query = query.split('#').next().unwrap_or_default();
            for pair in query.split('&') {
                if let Some((name, value)) = pair.split_once('=') {
                    if is_secret_param(&percent_decode(name)) {
                        self.add(value);
                    }
                }
            }
        }
    }

    /// Add the secrets of a config value: values under secret-looking keys (strings,
    /// numbers, whole sub-tables), and the secrets of every URL string in it.
    pub fn add_json(&mut self, value: &serde_json::Value) {
        match value {
            serde_json::Value::String(s) => self.add_text(s),
            serde_json::Value::Array(items) => items.iter().for_each(|v| self.add_json(v)),
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    if is_secret_param(key) {
                        self.add_all_leaves(v);
                    }
                    self.add_json(v);
                }
            }
            _ => {}
        }
    }

    fn add_all_leaves(&mut self, value: &serde_json::Value) {
        match value {
            serde_json::Value::String(s) => self.add(s),
            serde_json::Value::Number(n) => self.add(&n.to_string()),
            serde_json::Value::Array(items) => items.iter().for_each(|v| self.add_all_leaves(v)),
            serde_json::Value::Object(map) => map.values().for_each(|v| self.add_all_leaves(v)),
            _ => {}
        }
    }

    /// Add the secrets of TOML source text: what [`add_json`](Self::add_json) finds
    /// in it when it parses, and, line by line, `key = value` with a secret-looking
    /// key and every URL — so a file with a syntax error is covered too.
    pub fn add_toml(&mut self, text: &str) {
        if let Ok(value) = toml::from_str::<serde_json::Value>(text) {
            self.add_json(&value);
        }
        self.add_text(text);
        for line in text.lines() {
            // Inline tables hold several `key = value` pairs on one line.
            for part in line.split([',', '{', '}']) {
                if let Some((key, value)) = part.split_once('=') {
                    let key = key.trim().trim_matches(['"', '\'']);
                    let key = key.rsplit('.').next().unwrap_or(key);
                    if is_secret_param(key) {
                        let value = value.trim().trim_matches(['"', '\'']).trim();
                        self.add(value);
                    }
                }
            }
        }
    }

    /// `text` with every collected secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.values {
            out = if secret.chars().count() >= SHORT {
                out.replace(secret.as_str(), REDACTED)
            } else {
                replace_standalone(&out, secret)
            };
        }
        out
    }
}

/// Replace `needle` where it is not part of a longer word.
fn replace_standalone(haystack: &str, needle: &str) -> String {
    let mut out = String::with_capacity(haystack.len());
    let mut rest = haystack;
    let mut prev: Option<char> = None;
    while let Some(at) = rest.find(needle) {
        let before = rest[..at].chars().next_back().or(prev);
        let after = rest[at + needle.len()..].chars().next();
        let alone = |c: Option<char>| c.map_or(true, |c| !c.is_alphanumeric());
        out.push_str(&rest[..at]);
        if alone(before) && alone(after) {
            out.push_str(REDACTED);
        } else {
            out.push_str(needle);
        }
        prev = needle.chars().next_back();
        rest = &rest[at + needle.len()..];
    }
    out.push_str(rest);
    out
}

/// `%XX` decoded (and nothing else); invalid escapes and non-UTF-8 results are kept
/// as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(value as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_that_do_not_parse_are_covered() {
        let mut s = Secrets::new();
        s.add_text("kafka://u:p%40ss@h1:9092,h2:9092/orders?sasl.password=two&group=g");
        s.add_text("redis://:hunter2@h:99999/q");
        let shown = s.scrub("p%40ss p@ss two hunter2 group=g");
        assert_eq!(shown, "*** *** *** *** group=g");
    }

    #[test]
    fn short_secrets_only_where_they_stand_alone() {
        let mut s = Secrets::new();
        s.add("ab");
        assert_eq!(s.scrub("redis://u:ab@h tab ab"), "redis://u:***@h tab ***");
    }

    #[test]
    fn toml_keys_and_inline_tables() {
        let mut s = Secrets::new();
        s.add_toml(
            "a = { backend = \"redis\", password = \"pw-one\" }\n\
             [b]\nsasl.password = 'pw-two'\nurl = \"redis://x:pw-three@h/q\"\n\
             [c]\npassword = \"unterminated",
        );
        assert_eq!(
            s.scrub("pw-one pw-two pw-three unterminated"),
            "*** *** *** ***"
        );
    }

    #[test]
    fn json_secret_keys_any_type() {
        let mut s = Secrets::new();
        s.add_json(&serde_json::json!({"password": 987654, "x": {"api_key": ["k-1"]}}));
        assert_eq!(s.scrub("987654 k-1"), "*** ***");
        assert!(!format!("{s:?}").contains("987654"));
    }
}
