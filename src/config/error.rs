//! Errors raised while loading or validating the two user-edited files.
//!
//! Every variant names the file, and where the YAML parser knows it, the line, so that
//! `goms check-config` and a gateway refusing a live edit print `file:line: reason`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not valid YAML, or a key or value is refused; `line` is 1-based.
    #[error("{path}:{line}:{column}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },

    /// A problem that has no single position in the file (an empty document, say).
    #[error("{path}: {reason}")]
    Whole { path: PathBuf, reason: String },

    /// A setting that has no default is missing.
    #[error("{0}")]
    Missing(String),

    /// A `GOMS__*` environment override could not be applied.
    #[error("environment override (GOMS__*): {0}")]
    Environment(String),
}

impl ConfigError {
    /// An override refused when merged. A mistyped variable is named as the user wrote it,
    /// with the closest variable that exists.
    pub(crate) fn environment(reason: &str) -> Self {
        let reason = unique_expected_keys(reason);
        let Some((unknown, candidates)) = unknown_field(&reason) else {
            return ConfigError::Environment(reason);
        };
        let section = reason
            .split("for key `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .map(|key| format!("{}__", env_name(key)))
            .unwrap_or_default();
        let mut message = format!("GOMS__{section}{} is not a setting", env_name(unknown));
        if let Some(candidate) = closest(unknown, &candidates) {
            message.push_str(&format!(
                "; did you mean GOMS__{section}{}?",
                env_name(candidate)
            ));
        }
        ConfigError::Environment(message)
    }

    /// Turns a YAML deserialisation error of the file `text` into a positioned error,
    /// adding a "did you mean" hint when serde refused an unknown key, and saying so plainly
    /// when the parser stopped at a tab.
    pub(crate) fn from_yaml(
        path: &std::path::Path,
        text: &str,
        error: serde_norway::Error,
    ) -> Self {
        let reason = with_suggestion(&unique_expected_keys(&strip_position(&error.to_string())));
        match error.location() {
            Some(location) => ConfigError::Invalid {
                path: path.to_path_buf(),
                line: location.line(),
                column: location.column(),
                reason: explain_tab(text, location.line(), location.column()).unwrap_or(reason),
            },
            None => ConfigError::Whole {
                path: path.to_path_buf(),
                reason,
            },
        }
    }
}

/// serde_norway appends " at line L column C" to its messages; the position is
/// printed once, in front, by [`ConfigError::Invalid`].
fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(index) => message[..index].to_string(),
        None => message.to_string(),
    }
}

/// YAML forbids tabs in indentation, and the parser says only "found character that cannot
/// start any token". When the character at the error's position (1-based line and column) is
/// a tab, or the line is indented with one, says that instead.
fn explain_tab(text: &str, line: usize, column: usize) -> Option<String> {
    let content = text.lines().nth(line.checked_sub(1)?)?;
    let at_error = content.chars().nth(column.saturating_sub(1)) == Some('\t');
    let indent = &content[..content.len() - content.trim_start().len()];
    let tab_column = if at_error {
        column
    } else {
        indent.find('\t')? + 1
    };
    Some(format!(
        "a tab at column {tab_column}: YAML indentation cannot use tabs; indent with spaces"
    ))
}

/// serde lists a key and its aliases (`amqpAddr`, `amqpaddr`) as separate expected keys; a
/// user needs each key once.
fn unique_expected_keys(reason: &str) -> String {
    let Some(start) = reason.find("expected one of ") else {
        return reason.to_string();
    };
    let (head, list) = reason.split_at(start + "expected one of ".len());
    let mut seen: Vec<String> = Vec::new();
    let mut keys = Vec::new();
    for key in list.split(", ") {
        let lower = key.to_lowercase();
        if !seen.contains(&lower) {
            seen.push(lower);
            keys.push(key);
        }
    }
    format!("{head}{}", keys.join(", "))
}

/// serde's "unknown field `x`, expected one of `a`, `b`" lists every key; a user
/// who typed `etcAddr` wants to read `did you mean `etcdAddr`?`.
fn with_suggestion(reason: &str) -> String {
    let Some((unknown, candidates)) = unknown_field(reason) else {
        return reason.to_string();
    };
    match closest(unknown, &candidates) {
        Some(candidate) => format!("{reason}; did you mean `{candidate}`?"),
        None => reason.to_string(),
    }
}

/// The unknown key of serde's "unknown field `x`, expected one of `a`, `b`", and the keys
/// it expected.
fn unknown_field(reason: &str) -> Option<(&str, Vec<&str>)> {
    let start = reason.find("unknown field `")?;
    let rest = &reason[start + "unknown field `".len()..];
    let (unknown, expected) = rest.split_once('`')?;
    let expected = expected.split(" for key `").next().unwrap_or(expected);
    let candidates = expected
        .split('`')
        .enumerate()
        .filter(|(index, _)| index % 2 == 1)
        .map(|(_, name)| name)
        .collect();
    Some((unknown, candidates))
}

/// The candidate within 3 edits of `unknown`, ignoring case, if any.
fn closest<'a>(unknown: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|candidate| {
            (
                edit_distance(&unknown.to_lowercase(), &candidate.to_lowercase()),
                *candidate,
            )
        })
        .min()
        .filter(|(distance, _)| *distance <= 3)
        .map(|(_, candidate)| candidate)
}

/// A setting's name as a `GOMS__*` variable spells it: `gateway.httpPort` -> `GATEWAY__HTTP_PORT`.
fn env_name(key: &str) -> String {
    let mut name = String::new();
    for (index, part) in key.split('.').enumerate() {
        if index > 0 {
            name.push_str("__");
        }
        for c in part.chars() {
            if c.is_ascii_uppercase() {
                name.push('_');
            }
            name.push(c.to_ascii_uppercase());
        }
    }
    name
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_known_key() {
        let reason =
            "unknown field `etcAddr`, expected one of `callServiceKey`, `etcdAddr`, `esAddr`";
        assert!(with_suggestion(reason).ends_with("did you mean `etcdAddr`?"));
    }

    #[test]
    fn a_key_and_its_alias_are_listed_once() {
        let reason = "unknown field `x`, expected one of `esAddr`, `amqpAddr`, `amqpaddr`, `log`";
        assert_eq!(
            unique_expected_keys(reason),
            "unknown field `x`, expected one of `esAddr`, `amqpAddr`, `log`"
        );
    }

    #[test]
    fn a_tab_in_the_indentation_is_named() {
        let text = "services:\n\tuser:\n    login: /login\n";
        let reason = explain_tab(text, 2, 1).expect("a tab at line 2");
        assert!(reason.contains("column 1"), "{reason}");
        assert!(reason.contains("cannot use tabs"), "{reason}");
        assert_eq!(explain_tab(text, 3, 5), None);
    }

    #[test]
    fn a_mistyped_variable_is_named_with_the_closest_one() {
        let reason = "unknown field `httpProt`, expected one of `httpPort`, `listenHost`, \
                      `limits` for key `gateway`";
        assert_eq!(
            ConfigError::environment(reason).to_string(),
            "environment override (GOMS__*): GOMS__GATEWAY__HTTP_PROT is not a setting; \
             did you mean GOMS__GATEWAY__HTTP_PORT?"
        );
        let nested =
            "unknown field `bodyByte`, expected one of `bodyBytes` for key `gateway.limits`";
        assert!(ConfigError::environment(nested)
            .to_string()
            .ends_with("did you mean GOMS__GATEWAY__LIMITS__BODY_BYTES?"));
    }

    #[test]
    fn no_suggestion_when_nothing_is_close() {
        let reason = "unknown field `zzzzzzzzzz`, expected one of `callServiceKey`, `etcdAddr`";
        assert_eq!(with_suggestion(reason), reason);
    }
}
