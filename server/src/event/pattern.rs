use std::fmt;

/// Longest event type or pattern accepted, in bytes.
pub const MAX_TYPE_LEN: usize = 255;
const MAX_SEGMENTS: usize = 32;

fn valid_segment(segment: &str) -> bool {
    let mut chars = segment.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks an event type: dot-separated segments of `[A-Za-z0-9][A-Za-z0-9_-]*`, e.g. `workflow.task.created.v1`.
pub fn validate_type(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_TYPE_LEN {
        return Err(format!("longer than {MAX_TYPE_LEN} bytes"));
    }
    let segments: Vec<&str> = value.split('.').collect();
    if segments.len() > MAX_SEGMENTS {
        return Err(format!("more than {MAX_SEGMENTS} segments"));
    }
    match segments.iter().find(|s| !valid_segment(s)) {
        Some(bad) => Err(format!(
            "segment {bad:?} is not [A-Za-z0-9][A-Za-z0-9_-]* (types are dot-separated segments such as workflow.task.created.v1)"
        )),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `>`: one or more trailing segments.
    Rest,
}

/// A type pattern: literal segments, `*` for one segment, `>` (last only) for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypePattern {
    text: String,
    segments: Vec<Segment>,
}

impl TypePattern {
    /// Parses a pattern such as `workflow.*.created.>`.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() {
            return Err("must not be empty".into());
        }
        if value.len() > MAX_TYPE_LEN {
            return Err(format!("longer than {MAX_TYPE_LEN} bytes"));
        }
        let parts: Vec<&str> = value.split('.').collect();
        if parts.len() > MAX_SEGMENTS {
            return Err(format!("more than {MAX_SEGMENTS} segments"));
        }
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "*" => Segment::One,
                ">" if i + 1 == parts.len() => Segment::Rest,
                ">" => return Err("'>' may only be the last segment".into()),
                s if valid_segment(s) => Segment::Literal(s.to_owned()),
                s => {
                    return Err(format!(
                        "segment {s:?} is not '*', '>' or [A-Za-z0-9][A-Za-z0-9_-]*"
                    ));
                }
            });
        }
        Ok(TypePattern {
            text: value.to_owned(),
            segments,
        })
    }

    /// Tells whether the pattern has no wildcards.
    pub fn literal(&self) -> Option<&str> {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
            .then_some(self.text.as_str())
    }

    /// Tells whether `event_type` matches.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut parts = event_type.split('.');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Tells whether every type `other` matches is matched by this pattern too.
    pub fn covers(&self, other: &TypePattern) -> bool {
        covers(&self.segments, &other.segments)
    }

    /// Tells whether some type is matched by both patterns.
    pub fn overlaps(&self, other: &TypePattern) -> bool {
        overlaps(&self.segments, &other.segments)
    }

    /// Returns the pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn covers(wide: &[Segment], narrow: &[Segment]) -> bool {
    match (wide.split_first(), narrow.split_first()) {
        (None, None) => true,
        // `>` takes one or more segments: whatever `narrow` has left, as long as something is left
        (Some((Segment::Rest, _)), Some(_)) => true,
        (Some((Segment::One, w)), Some((Segment::One | Segment::Literal(_), n))) => covers(w, n),
        (Some((Segment::Literal(a), w)), Some((Segment::Literal(b), n))) => a == b && covers(w, n),
        _ => false,
    }
}

fn overlaps(a: &[Segment], b: &[Segment]) -> bool {
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        (Some((Segment::Rest, _)), Some(_)) | (Some(_), Some((Segment::Rest, _))) => true,
        (Some((Segment::Literal(x), a)), Some((Segment::Literal(y), b))) => {
            x == y && overlaps(a, b)
        }
        (Some((_, a)), Some((_, b))) => overlaps(a, b),
        _ => false,
    }
}

impl fmt::Display for TypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> TypePattern {
        TypePattern::parse(p).expect("valid pattern")
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(pattern("a.*.c").matches("a.b.c"));
        assert!(!pattern("a.*.c").matches("a.b.x.c"));
        assert!(!pattern("a.*").matches("a"));
    }

    #[test]
    fn rest_matches_one_or_more_trailing_segments() {
        assert!(pattern("a.>").matches("a.b"));
        assert!(pattern("a.>").matches("a.b.c.v1"));
        assert!(!pattern("a.>").matches("a"));
        assert!(pattern(">").matches("anything.at.all"));
    }

    #[test]
    fn literal_patterns_match_only_themselves() {
        assert!(pattern("a.b").matches("a.b"));
        assert!(!pattern("a.b").matches("a.b.c"));
        assert!(!pattern("a.b").matches("a"));
    }

    #[test]
    fn covers_and_overlaps_follow_the_matched_sets() {
        let covers = |a: &str, b: &str| pattern(a).covers(&pattern(b));
        let overlaps = |a: &str, b: &str| pattern(a).overlaps(&pattern(b));
        assert!(covers(">", "a.>"));
        assert!(covers("a.>", "a.b.*"));
        assert!(covers("a.*", "a.b"));
        assert!(covers("a.b", "a.b"));
        assert!(!covers("a.>", ">"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("a.b", "a.*"));
        assert!(!covers("a.*", "a.b.c"));
        assert!(overlaps("a.>", ">"));
        assert!(overlaps("a.*.c", "a.b.*"));
        assert!(!overlaps("a.*", "b.>"));
        assert!(!overlaps("a.b", "a.b.c"));
        assert!(!overlaps("a.*", "a"));
    }

    #[test]
    fn rejects_bad_grammar() {
        for bad in ["", "a..b", "a.>.c", "a:b", "a.{b}", "a b", ".a", "a.", "a*"] {
            assert!(
                TypePattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        for bad in ["a.*", "a.>", "a:b", "x{", "", "a..b", "-a"] {
            assert!(validate_type(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(validate_type("workflow.task.created.v1").is_ok());
    }
}
