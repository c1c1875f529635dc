use std::collections::HashMap;

use crate::harness::*;
use nerve::api::pb::{self, filter::Filter as F, subscribe_request::Action};

fn values(pairs: &[(&str, &str)]) -> pb::AttributeValues {
    pb::AttributeValues {
        attributes: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

fn filter(f: F) -> pb::Filter {
    pb::Filter { filter: Some(f) }
}

fn tagged(id: &str, subject: &str, source: &str, region: &str) -> pb::Event {
    let mut e = event(id, "filter.x");
    e.subject = subject.into();
    e.source = source.into();
    e.extensions.insert(
        "region".into(),
        pb::ExtensionValue {
            value: Some(pb::extension_value::Value::StringValue(region.into())),
        },
    );
    e
}

async fn received_ids(server: &TestServer, f: pb::Filter) -> Vec<String> {
    let mut bus = server.bus();
    let mut o = open(&["filter.x"], "");
    o.start = earliest();
    o.filter = Some(f);
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let mut ids: Vec<String> = sub.until_caught_up().await.iter().map(id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn each_dialect_selects_on_the_server() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(
        &mut bus,
        vec![
            tagged("1", "order-1", "//shop/eu", "eu-west"),
            tagged("2", "order-2", "//shop/us", "us-east"),
            tagged("3", "invoice-3", "//billing/eu", "eu-central"),
        ],
    )
    .await;
    assert_eq!(
        received_ids(&server, filter(F::Exact(values(&[("subject", "order-2")])))).await,
        ["2"]
    );
    assert_eq!(
        received_ids(&server, filter(F::Prefix(values(&[("source", "//shop/")])))).await,
        ["1", "2"]
    );
    assert_eq!(
        received_ids(&server, filter(F::Suffix(values(&[("region", "-east")])))).await,
        ["2"]
    );
    assert_eq!(
        received_ids(&server, filter(F::Prefix(values(&[("region", "eu-")])))).await,
        ["1", "3"]
    );
    let all = F::All(pb::FilterList {
        filters: vec![
            filter(F::Prefix(values(&[("region", "eu-")]))),
            filter(F::Prefix(values(&[("subject", "order")]))),
        ],
    });
    assert_eq!(received_ids(&server, filter(all)).await, ["1"]);
    let any = F::Any(pb::FilterList {
        filters: vec![
            filter(F::Exact(values(&[("id", "1")]))),
            filter(F::Exact(values(&[("id", "3")]))),
        ],
    });
    assert_eq!(received_ids(&server, filter(any)).await, ["1", "3"]);
    let not = F::Negate(Box::new(filter(F::Exact(values(&[("region", "us-east")])))));
    assert_eq!(received_ids(&server, filter(not)).await, ["1", "3"]);
    // an attribute the event lacks never matches
    assert!(
        received_ids(&server, filter(F::Exact(values(&[("dataschema", "x")]))))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn filter_can_change_mid_stream() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = open(&["filter.x"], "");
    o.filter = Some(filter(F::Exact(values(&[("region", "eu-west")]))));
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    sub.until_caught_up().await;
    publish(
        &mut bus,
        vec![
            tagged("a", "s", "//x", "eu-west"),
            tagged("b", "s", "//x", "us-east"),
        ],
    )
    .await;
    assert_eq!(id(&sub.next_delivery().await), "a");
    sub.send(Action::SetFilter(pb::SetFilter {
        filter: Some(filter(F::Exact(values(&[("region", "us-east")])))),
    }))
    .await;
    sub.expect_idle(1).await;
    publish(
        &mut bus,
        vec![
            tagged("c", "s", "//x", "eu-west"),
            tagged("d", "s", "//x", "us-east"),
        ],
    )
    .await;
    assert_eq!(id(&sub.next_delivery().await), "d");
}

#[tokio::test]
async fn bad_filters_are_rejected() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut deep = filter(F::Exact(values(&[("subject", "x")])));
    for _ in 0..20 {
        deep = filter(F::Negate(Box::new(deep)));
    }
    let cases = [
        (deep, "deeper"),
        (
            filter(F::Exact(values(&[("Subject", "x")]))),
            "attribute names",
        ),
        (
            filter(F::Exact(values(&[(
                "subject'; DROP TABLE events; --",
                "x",
            )]))),
            "attribute names",
        ),
        (
            filter(F::All(pb::FilterList { filters: vec![] })),
            "at least one",
        ),
        (pb::Filter { filter: None }, "no dialect"),
    ];
    for (f, needle) in cases {
        let mut o = open(&["filter.x"], "");
        o.filter = Some(f);
        let status = Subscriber::open(&mut bus, o).await.err().expect("rejected");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    // the offending field is named by its protobuf path, dialects included
    let mut o = open(&["filter.x"], "");
    o.filter = Some(filter(F::Any(pb::FilterList {
        filters: vec![filter(F::Exact(values(&[("Subject", "x")])))],
    })));
    let status = Subscriber::open(&mut bus, o).await.err().expect("rejected");
    assert_eq!(
        violations(&status),
        [r#"open.filter.any.filters[0].exact.attributes["Subject"]"#],
        "{status:?}"
    );
}

/// A filter value may be as long as an event's attribute may be: with `limits.max_attribute_bytes`
/// raised, a long subject is selected by its whole value, and a value longer than any attribute can
/// be is refused naming it.
#[tokio::test]
async fn a_filter_value_may_be_as_long_as_the_attribute_limit() {
    let server = TestServer::start_with(|c| c.limits.max_attribute_bytes = 4096).await;
    let mut bus = server.bus();
    let long = "s".repeat(3000);
    publish(
        &mut bus,
        vec![
            tagged("long", &long, "//x", "eu"),
            tagged("short", "s", "//x", "eu"),
        ],
    )
    .await;
    assert_eq!(
        received_ids(&server, filter(F::Exact(values(&[("subject", &long)])))).await,
        ["long"]
    );
    let mut o = open(&["filter.x"], "");
    o.filter = Some(filter(F::Prefix(values(&[("subject", &"s".repeat(4097))]))));
    let status = Subscriber::open(&mut bus, o).await.err().expect("rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violations(&status),
        [r#"open.filter.prefix.attributes["subject"]"#],
        "{status:?}"
    );
    assert!(status.message().contains("4096 bytes"), "{status:?}");
}

/// A private stream whose filter matches nothing of a long history still hears its commands while it
/// reads that history: a close sent during the read ends it long before the history is read through.
#[tokio::test]
async fn a_history_that_matches_nothing_is_read_in_turns_with_the_commands() {
    use std::sync::atomic::Ordering::SeqCst;
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    // past the live tail (16,384 events), with the default window of 64: about 370 history pages
    publish_n(&mut bus, "scan", "scan.x", 40_000).await;
    let mut o = open(&["scan.x"], "");
    o.start = earliest();
    o.filter = Some(filter(F::Exact(values(&[("subject", "never")]))));
    let (reached, go) = injection.before_read.arm();
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    reached.wait("the stream reads its history").await;
    let before = injection.reads.load(SeqCst);
    sub.send(Action::Close(pb::Close {})).await;
    drop(go);
    sub.final_status().await.expect("closed");
    let read = injection.reads.load(SeqCst) - before;
    assert!(
        read < 100,
        "{read} history pages read before the close was heard"
    );
}

/// A durable group's filter passes over what it skips: its members get each matching event once,
/// from history and live, and the skipped ones are never pending (on Redis, a claim leases only what
/// the filter matches and moves the group's cursor past the rest).
#[tokio::test]
async fn a_groups_filter_passes_over_what_it_skips() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(
        &mut bus,
        vec![
            tagged("1", "order-1", "//shop", "eu"),
            tagged("2", "invoice-2", "//shop", "eu"),
            tagged("3", "order-3", "//shop", "eu"),
        ],
    )
    .await;
    let mut o = open(&["filter.x"], "orders");
    o.start = earliest();
    o.filter = Some(filter(F::Prefix(values(&[("subject", "order")]))));
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let history = sub.until_caught_up().await;
    let mut ids: Vec<String> = history.iter().map(id).collect();
    ids.sort();
    assert_eq!(ids, ["1", "3"]);
    let delivery_ids: Vec<String> = history.iter().map(|d| d.delivery_id.clone()).collect();
    sub.ack(&delivery_ids).await;
    // skipped ones alone, then a match after skipped ones
    publish(&mut bus, vec![tagged("4", "invoice-4", "//shop", "eu")]).await;
    publish(
        &mut bus,
        vec![
            tagged("5", "invoice-5", "//shop", "eu"),
            tagged("6", "order-6", "//shop", "eu"),
        ],
    )
    .await;
    let live = sub.next_delivery().await;
    assert_eq!((id(&live).as_str(), live.attempt), ("6", 1));
    sub.ack_one(&live).await;
    sub.expect_idle(2).await;
    let group = server
        .admin()
        .get_group(pb::GetGroupRequest {
            group: "orders".into(),
        })
        .await
        .expect("group")
        .into_inner()
        .group
        .expect("the group");
    assert_eq!((group.pending, group.lag), (0, 0), "{group:?}");
}
