//! YAML configuration files (session files, the agent policy) with errors that name the file,
//! the line and the field.

use serde::de::DeserializeOwned;

/// A file that could not be used, with where.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: String, line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    Semantic { path: String, message: String },
}

/// Parses `text`; `origin` names the file in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, YamlError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // An unknown map key shows as `?` in the path: name the map instead.
        let field = e.path().to_string().trim_end_matches(".?").to_string();
        let located = locate(text, e.path());
        let inner = e.into_inner();
        let (line, column) = match (located, inner.location()) {
            (Some(at), Some(l)) if at.0 == l.line() => (l.line(), l.column()),
            (Some(at), _) => at,
            (None, Some(l)) => (l.line(), l.column()),
            (None, None) => (0, 0),
        };
        let message = strip_location(&inner.to_string());
        // A key or value the message quotes (an unknown variant, say) pins the line down further.
        let (line, column) = match quoted(&message).and_then(|q| find_from(text, line, q)) {
            Some(at) => at,
            None => (line, column),
        };
        // serde_norway may start its message with its own form of the path ("tokens: ...").
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && field.starts_with(prefix) => rest.to_string(),
            _ => message,
        };
        let message = if field.is_empty() || field == "." { message } else { format!("field `{field}`: {message}") };
        YamlError::Invalid { path: origin.to_string(), line, column, message }
    })
}

/// The line and column where a field path (`scope.connect[1]`) is written. serde_norway gives
/// no position for errors raised while converting a value (a bad duration or destination), so
/// the path serde_path_to_error recorded is looked up in the text: keys by their `key:` at a
/// deeper indentation than their parent, block sequence items by their `- `, flow sequences
/// (`[a, b]`) by the line they are written on.
fn locate(text: &str, path: &serde_path_to_error::Path) -> Option<(usize, usize)> {
    use serde_path_to_error::Segment;
    let lines: Vec<&str> = text.lines().collect();
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let is_content = |l: &str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let mut at: Option<usize> = None;
    for segment in path.iter() {
        let start = at.map_or(0, |i| i + 1);
        let parent_indent = at.map(|i| indent_of(lines[i]));
        match segment {
            Segment::Map { key } => {
                if at.is_some_and(|i| lines[i].contains('{')) {
                    continue; // a flow mapping on the parent's line
                }
                let block = format!("{key}:");
                let hit = lines.iter().enumerate().skip(start).take_while(|(i, l)| {
                    *i == start || !is_content(l) || parent_indent.is_none_or(|p| indent_of(l) > p)
                });
                let hit = hit.filter(|(_, l)| is_content(l)).find(|(_, l)| {
                    let t = l.trim_start().trim_start_matches("- ");
                    t.starts_with(&block) || t.starts_with(&format!("\"{key}\":"))
                });
                at = Some(hit?.0);
            }
            Segment::Seq { index } => {
                let Some(parent) = at else { return None };
                if lines[parent].contains('[') {
                    continue; // a flow sequence on the key's line
                }
                let p = indent_of(lines[parent]);
                let items = lines
                    .iter()
                    .enumerate()
                    .skip(parent + 1)
                    .filter(|(_, l)| is_content(l))
                    .take_while(|(_, l)| indent_of(l) > p || (indent_of(l) == p && l.trim_start().starts_with('-')))
                    .filter(|(_, l)| l.trim_start().starts_with('-') && indent_of(l) <= p + 2)
                    .nth(*index);
                at = Some(items?.0);
            }
            _ => {}
        }
    }
    at.map(|i| (i + 1, indent_of(lines[i]) + 1))
}

/// The first `backticked` word of a message.
fn quoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len]).filter(|q| !q.is_empty())
}

/// The first line at or after `line` (1-based) that contains `needle` as a key or value.
fn find_from(text: &str, line: usize, needle: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().skip(line.saturating_sub(1)).find_map(|(i, l)| {
        let col = l.find(needle)?;
        let before = l[..col].chars().last();
        let after = l[col + needle.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'));
        (boundary(before) && boundary(after)).then_some((i + 1, col + 1))
    })
}

/// serde_norway appends " at line L column C"; the location is reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}
