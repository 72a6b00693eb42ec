//! What an audit log records of each event: the `log_inputs` / `log_outputs` choices
//! and the preview length ([`EventPolicy`]). Applied once, where the event is made (the
//! Python binding calls it for every backend and observer); redaction of the values
//! themselves is [`Redactor`](super::Redactor)'s.

/// The audit log's recording choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPolicy {
    /// Record tool arguments (`input_args`).
    pub log_inputs: bool,
    /// Record the start of tool results (`output_preview`).
    pub log_outputs: bool,
    /// Characters of the result kept in `output_preview`.
    pub preview_chars: usize,
}

impl Default for EventPolicy {
    fn default() -> Self {
        EventPolicy {
            log_inputs: true,
            log_outputs: true,
            preview_chars: 200,
        }
    }
}

impl EventPolicy {
    /// Whether tool arguments are recorded.
    #[must_use]
    pub fn keeps_inputs(&self) -> bool {
        self.log_inputs
    }

    /// What is recorded of a result's text: `None` when outputs are not logged, else
    /// its first [`preview_chars`](Self::preview_chars) characters (as Python's
    /// `text[:n]`: characters, never splitting one).
    #[must_use]
    pub fn preview<'a>(&self, output: &'a str) -> Option<&'a str> {
        self.log_outputs
            .then(|| first_chars(output, self.preview_chars))
    }
}

/// The first `n` characters of `s`.
fn first_chars(s: &str, n: usize) -> &str {
    if n >= s.len() {
        return s; // no more characters than bytes
    }
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_counts_characters_not_bytes() {
        let p = EventPolicy {
            preview_chars: 3,
            ..EventPolicy::default()
        };
        assert_eq!(p.preview("abcdef"), Some("abc"));
        assert_eq!(p.preview("héllo"), Some("hél"));
        assert_eq!(p.preview("😀😀😀😀"), Some("😀😀😀"));
        assert_eq!(p.preview("ab"), Some("ab"));
        assert_eq!(p.preview(""), Some(""));
        let zero = EventPolicy {
            preview_chars: 0,
            ..p
        };
        assert_eq!(zero.preview("abc"), Some(""));
    }

    #[test]
    fn outputs_off_records_no_preview_and_inputs_follow_their_switch() {
        let p = EventPolicy {
            log_inputs: false,
            log_outputs: false,
            preview_chars: 10,
        };
        assert_eq!(p.preview("secret result"), None);
        assert!(!p.keeps_inputs());
        assert!(EventPolicy::default().keeps_inputs());
    }
}
