//! Metrics move with the traffic, and trace context travels with events.

use nerve::api::pb;

use crate::harness::{Subscriber, TestServer, event, open, publish};

/// The value of the series `name{labels}` where every given label matches, or 0.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\""))))
            .then(|| v.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

#[tokio::test]
async fn metrics_count_publishes_deliveries_failures_and_dead_letters() {
    let server = TestServer::start_with(|c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.group_sample_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let mut bus = server.bus();
    let before = server.scrape().await;
    let mut o = open(&["metrics.probe"], "metered");
    o.max_attempts = 1;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(
        &mut bus,
        vec![event("m1", "metrics.probe"), event("m2", "metrics.probe")],
    )
    .await;
    publish(&mut bus, vec![event("m1", "metrics.probe")]).await; // a retry: duplicate
    let first = sub.next_delivery().await;
    let second = sub.next_delivery().await;
    sub.ack_one(&first).await;
    // the second is nacked: one failure, and with max_attempts 1 it is dead-lettered on redelivery
    sub.send(pb::subscribe_request::Action::Nack(pb::Nack {
        delivery_ids: vec![second.delivery_id.clone()],
        ..Default::default()
    }))
    .await;
    let after = crate::harness::eventually("dead letter counted", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_dead_letters_total", &[("group", "metered")]) >= 1.0).then_some(text)
    })
    .await;
    let stored = [("type", "metrics.probe"), ("outcome", "stored")];
    let duplicate = [("type", "metrics.probe"), ("outcome", "duplicate")];
    assert_eq!(
        value(&after, "nerve_events_published_total", &stored)
            - value(&before, "nerve_events_published_total", &stored),
        2.0
    );
    assert_eq!(
        value(&after, "nerve_events_published_total", &duplicate),
        1.0
    );
    let delivered = [("type", "metrics.probe"), ("group", "metered")];
    assert_eq!(
        value(&after, "nerve_events_delivered_total", &delivered),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "nerve_delivery_failures_total",
            &[("group", "metered"), ("reason", "nack")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "nerve_delivery_latency_seconds_count",
            &[("group", "metered")]
        ) >= 2.0
    );
    assert!(value(&after, "nerve_store_commit_duration_seconds_count", &[]) >= 2.0);
    assert!(value(&after, "nerve_publish_duration_seconds_count", &[]) >= 2.0);
    assert!(value(&after, "nerve_subscriptions_active", &[("kind", "group")]) >= 1.0);
    assert_eq!(
        value(&after, "nerve_backend_up", &[("backend", "store")]),
        1.0
    );
    // the sampler reports the group's backlog
    crate::harness::eventually("group gauges", || async {
        let text = server.scrape().await;
        text.contains("nerve_group_pending{group=\"metered\"}")
            .then_some(())
    })
    .await;
}
