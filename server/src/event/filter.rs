use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Event, TypePattern};

/// Deepest nesting of all/any/not accepted.
pub const MAX_FILTER_DEPTH: usize = 8;
/// Most filter nodes accepted in one filter.
pub const MAX_FILTER_NODES: usize = 64;

/// A server-side filter in the dialects of the CloudEvents Subscriptions API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Filter(pub FilterKind);

/// The dialects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterKind {
    Exact(BTreeMap<String, String>),
    Prefix(BTreeMap<String, String>),
    Suffix(BTreeMap<String, String>),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
}

fn valid_attribute_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Filter {
    /// Checks names, values, depth and size; returns the offending path and reason. A value may be as
    /// long as an event's attribute may be (`max_value_bytes`, `limits.max_attribute_bytes`): a longer
    /// one could match no event.
    pub fn validate(&self, max_value_bytes: usize) -> Result<(), (String, String)> {
        let mut nodes = 0;
        self.check(String::new(), 1, &mut nodes, max_value_bytes)
    }

    fn check(
        &self,
        path: String,
        depth: usize,
        nodes: &mut usize,
        max_value_bytes: usize,
    ) -> Result<(), (String, String)> {
        *nodes += 1;
        if *nodes > MAX_FILTER_NODES {
            return Err((
                path,
                format!("filter has more than {MAX_FILTER_NODES} nodes"),
            ));
        }
        if depth > MAX_FILTER_DEPTH {
            return Err((path, format!("filter nests deeper than {MAX_FILTER_DEPTH}")));
        }
        // paths name the protobuf fields: open.filter.any.filters[0].exact.attributes["x"]
        let dialect = match &self.0 {
            FilterKind::Exact(_) => "exact",
            FilterKind::Prefix(_) => "prefix",
            FilterKind::Suffix(_) => "suffix",
            FilterKind::All(_) => "all",
            FilterKind::Any(_) => "any",
            FilterKind::Not(_) => "negate",
        };
        let path = format!("{path}.{dialect}");
        match &self.0 {
            FilterKind::Exact(map) | FilterKind::Prefix(map) | FilterKind::Suffix(map) => {
                if map.is_empty() {
                    return Err((path, "names no attribute".into()));
                }
                // each attribute counts as a node: one `exact` of 400,000 names would otherwise fill
                // the message limit, and be stored and copied with the group and its presence
                *nodes += map.len() - 1;
                if *nodes > MAX_FILTER_NODES {
                    return Err((
                        path,
                        format!(
                            "filter has more than {MAX_FILTER_NODES} nodes (each attribute counts as one)"
                        ),
                    ));
                }
                for (name, value) in map {
                    if !valid_attribute_name(name) {
                        return Err((
                            format!("{path}.attributes[{name:?}]"),
                            "attribute names are [a-z0-9]{1,20}".into(),
                        ));
                    }
                    if value.len() > max_value_bytes {
                        return Err((
                            format!("{path}.attributes[{name:?}]"),
                            format!(
                                "value longer than {max_value_bytes} bytes \
                                 (limits.max_attribute_bytes: no attribute is longer)"
                            ),
                        ));
                    }
                }
                Ok(())
            }
            FilterKind::All(list) | FilterKind::Any(list) => {
                if list.is_empty() {
                    return Err((path, "needs at least one nested filter".into()));
                }
                for (i, f) in list.iter().enumerate() {
                    f.check(
                        format!("{path}.filters[{i}]"),
                        depth + 1,
                        nodes,
                        max_value_bytes,
                    )?;
                }
                Ok(())
            }
            FilterKind::Not(inner) => inner.check(path, depth + 1, nodes, max_value_bytes),
        }
    }

    /// Tells whether the event passes.
    pub fn matches(&self, event: &Event) -> bool {
        let each = |map: &BTreeMap<String, String>, test: fn(&str, &str) -> bool| {
            map.iter().all(|(name, value)| {
                event
                    .attribute(name)
                    .is_some_and(|actual| test(&actual, value))
            })
        };
        match &self.0 {
            FilterKind::Exact(map) => each(map, |a, v| a == v),
            FilterKind::Prefix(map) => each(map, |a, v| a.starts_with(v)),
            FilterKind::Suffix(map) => each(map, |a, v| a.ends_with(v)),
            FilterKind::All(list) => list.iter().all(|f| f.matches(event)),
            FilterKind::Any(list) => list.iter().any(|f| f.matches(event)),
            FilterKind::Not(inner) => !inner.matches(event),
        }
    }
}

/// What a subscription receives: type patterns (empty = every type) and an optional filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub types: Vec<TypePattern>,
    pub filter: Option<Filter>,
}

impl Selection {
    /// Tells whether the event type matches the patterns.
    pub fn matches_type(&self, event_type: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|p| p.matches(event_type))
    }

    /// Tells whether the event is selected.
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_type(&event.event_type)
            && self.filter.as_ref().is_none_or(|f| f.matches(event))
    }

    /// Returns the patterns as written.
    pub fn type_strings(&self) -> Vec<String> {
        self.types.iter().map(|t| t.as_str().to_owned()).collect()
    }

    /// Whether both select the same type patterns, in any order.
    pub fn same_types(&self, other: &Selection) -> bool {
        let set = |s: &Selection| {
            s.types
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect::<std::collections::BTreeSet<_>>()
        };
        set(self) == set(other)
    }

    /// Serializes for storage with a durable group.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "types": self.type_strings(), "filter": self.filter }).to_string()
    }

    /// Parses what [`Selection::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Stored {
            types: Vec<String>,
            filter: Option<Filter>,
        }
        let stored: Stored = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Selection {
            types: stored
                .types
                .iter()
                .map(|t| TypePattern::parse(t))
                .collect::<Result<_, _>>()?,
            filter: stored.filter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(k: &str, v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(k.to_owned(), v.to_owned())])
    }

    fn event() -> Event {
        Event {
            id: "1".into(),
            source: "//planner".into(),
            event_type: "task.created".into(),
            spec_version: "1.0".into(),
            subject: Some("task-42".into()),
            ..Event::default()
        }
    }

    #[test]
    fn dialects_compare_attributes() {
        let e = event();
        assert!(Filter(FilterKind::Exact(map("subject", "task-42"))).matches(&e));
        assert!(Filter(FilterKind::Prefix(map("source", "//plan"))).matches(&e));
        assert!(Filter(FilterKind::Suffix(map("type", ".created"))).matches(&e));
        assert!(!Filter(FilterKind::Exact(map("dataschema", "x"))).matches(&e));
        let not = Filter(FilterKind::Not(Box::new(Filter(FilterKind::Exact(map(
            "subject", "task-42",
        ))))));
        assert!(!not.matches(&e));
    }

    const LIMIT: usize = 1024;

    #[test]
    fn a_value_may_be_as_long_as_an_attribute() {
        let long = |n: usize| Filter(FilterKind::Exact(map("subject", &"s".repeat(n))));
        long(4096).validate(4096).expect("as long as the limit");
        let (path, reason) = long(4097).validate(4096).expect_err("one byte more");
        assert_eq!(path, r#".exact.attributes["subject"]"#);
        assert!(reason.contains("longer than 4096 bytes"), "{reason}");
    }

    #[test]
    fn rejects_deep_and_empty_filters() {
        let mut f = Filter(FilterKind::Exact(map("subject", "x")));
        for _ in 0..MAX_FILTER_DEPTH {
            f = Filter(FilterKind::Not(Box::new(f)));
        }
        assert!(f.validate(LIMIT).is_err());
        assert!(Filter(FilterKind::All(vec![])).validate(LIMIT).is_err());
        assert!(
            Filter(FilterKind::Exact(map("Bad-Name", "x")))
                .validate(LIMIT)
                .is_err()
        );
    }

    #[test]
    fn each_attribute_counts_as_a_node() {
        let attributes = |n: usize| -> BTreeMap<String, String> {
            (0..n).map(|i| (format!("a{i}"), "x".to_owned())).collect()
        };
        Filter(FilterKind::Exact(attributes(MAX_FILTER_NODES)))
            .validate(LIMIT)
            .expect("as many attributes as nodes");
        let (path, reason) = Filter(FilterKind::Exact(attributes(MAX_FILTER_NODES + 1)))
            .validate(LIMIT)
            .expect_err("one more");
        assert_eq!(path, ".exact");
        assert!(reason.contains("each attribute counts as one"), "{reason}");
        // with the nodes around it
        let nested = Filter(FilterKind::All(vec![Filter(FilterKind::Prefix(
            attributes(MAX_FILTER_NODES),
        ))]));
        assert!(nested.validate(LIMIT).is_err());
    }
}
