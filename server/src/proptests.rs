//! Property tests: request validation, the filter parser, type patterns, policies and credentials
//! never panic on arbitrary input, and what they accept is consistent.

use proptest::prelude::*;

use crate::{
    api::{convert, pb},
    auth::{jwt::JwtVerifier, policy::Policy, tls::peer_certificate},
    event::{TypePattern, validate_type},
};

/// One verifier for every case: an HMAC key in a directory that lives as long as the test binary.
fn verifier() -> &'static JwtVerifier {
    static VERIFIER: std::sync::OnceLock<(tempfile::TempDir, JwtVerifier)> =
        std::sync::OnceLock::new();
    &VERIFIER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let verifier = crate::auth::jwt::tests::hs_verifier(dir.path(), "");
            (dir, verifier)
        })
        .1
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}".prop_map(String::from),
        Just("*".to_owned()),
        Just(">".to_owned()),
        "[ -~]{0,3}".prop_map(String::from),
    ]
}

fn pattern_text() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..5).prop_map(|s| s.join("."))
}

fn attributes() -> impl Strategy<Value = pb::AttributeValues> {
    prop::collection::hash_map("[ -~]{0,12}", "[ -~]{0,12}", 0..4)
        .prop_map(|attributes| pb::AttributeValues { attributes })
}

/// How deep a filter nests: 1 for a leaf.
fn depth(f: &crate::event::Filter) -> usize {
    use crate::event::FilterKind as K;
    1 + match &f.0 {
        K::Exact(_) | K::Prefix(_) | K::Suffix(_) => 0,
        K::All(list) | K::Any(list) => list.iter().map(depth).max().unwrap_or(0),
        K::Not(inner) => depth(inner),
    }
}

fn filter() -> impl Strategy<Value = pb::Filter> {
    use pb::filter::Filter as F;
    let leaf = prop_oneof![
        attributes().prop_map(|v| pb::Filter {
            filter: Some(F::Exact(v))
        }),
        attributes().prop_map(|v| pb::Filter {
            filter: Some(F::Prefix(v))
        }),
        attributes().prop_map(|v| pb::Filter {
            filter: Some(F::Suffix(v))
        }),
        Just(pb::Filter { filter: None }),
    ];
    leaf.prop_recursive(24, 256, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|filters| pb::Filter {
                filter: Some(F::All(pb::FilterList { filters }))
            }),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|filters| pb::Filter {
                filter: Some(F::Any(pb::FilterList { filters }))
            }),
            inner.prop_map(|f| pb::Filter {
                filter: Some(F::Negate(Box::new(f)))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn accepted_types_are_safe_for_keys_and_sql(text in "[ -~]{0,40}") {
        if validate_type(&text).is_ok() {
            prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        }
    }

    #[test]
    fn covers_means_every_matched_type_is_matched(
        wide in pattern_text(),
        narrow in pattern_text(),
        candidate in prop::collection::vec("[a-c]{1,2}", 1..5),
    ) {
        let (Ok(wide), Ok(narrow)) = (TypePattern::parse(&wide), TypePattern::parse(&narrow)) else {
            return Ok(());
        };
        let candidate = candidate.join(".");
        if wide.covers(&narrow) && narrow.matches(&candidate) {
            prop_assert!(wide.matches(&candidate), "{wide} covers {narrow} but not {candidate}");
        }
        if wide.matches(&candidate) && narrow.matches(&candidate) {
            prop_assert!(wide.overlaps(&narrow), "{wide} and {narrow} both match {candidate}");
        }
    }

    #[test]
    fn the_filter_parser_never_panics_and_bounds_depth(f in filter()) {
        // any outcome but a panic; an accepted filter nests no deeper than the bus accepts, and the
        // bus's validation of it does not panic either
        if let Ok(parsed) = convert::filter_from_pb(f, "filter") {
            prop_assert!(depth(&parsed) <= crate::event::MAX_FILTER_DEPTH);
            let _ = parsed.validate(1024);
        }
    }

    #[test]
    fn event_validation_never_panics(
        id in "[ -~]{0,20}",
        source in "[ -~]{0,20}",
        event_type in "[ -~]{0,40}",
        subject in "[ -~]{0,20}",
        spec_version in prop_oneof![Just("1.0".to_owned()), "[ -~]{0,4}".prop_map(String::from)],
        priority in any::<i32>(),
        traceparent in "[ -~]{0,60}",
    ) {
        let e = pb::Event {
            id,
            source,
            r#type: event_type,
            subject,
            spec_version,
            priority,
            traceparent,
            ..Default::default()
        };
        let _ = convert::event_from_pb(e, "event");
    }

    #[test]
    fn policy_parsing_never_panics(text in "[ -~\n]{0,200}") {
        let _ = Policy::parse(&text);
    }

    #[test]
    fn certificate_parsing_never_panics(der in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = peer_certificate(&der);
    }

    #[test]
    fn token_verification_never_panics(
        header in "[A-Za-z0-9_-]{0,60}",
        body in "[A-Za-z0-9_-]{0,80}",
        signature in "[A-Za-z0-9_-]{0,40}",
        raw in "[ -~]{0,100}",
    ) {
        let token = format!("{header}.{body}.{signature}");
        prop_assert!(verifier().verify(&token).is_err());
        prop_assert!(verifier().verify(&raw).is_err());
    }
}
