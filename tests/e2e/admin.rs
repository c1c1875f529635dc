use tonic::Code;

use crate::harness::*;
use nerve::api::pb;

#[tokio::test]
async fn get_event_by_id_and_source() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut other = event("shared", "a.b");
    other.source = "//other".into();
    let seqs = publish(
        &mut bus,
        vec![event("shared", "a.b"), other, event("unique", "a.b")],
    )
    .await;
    let mut admin = server.admin();
    let found = admin
        .get_event(pb::GetEventRequest {
            id: "unique".into(),
            source: String::new(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(found.event.expect("event").sequence, seqs[2]);
    assert_status(
        admin
            .get_event(pb::GetEventRequest {
                id: "shared".into(),
                source: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "source",
    );
    let chosen = admin
        .get_event(pb::GetEventRequest {
            id: "shared".into(),
            source: "//other".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(chosen.event.expect("event").sequence, seqs[1]);
    assert_status(
        admin
            .get_event(pb::GetEventRequest {
                id: "missing".into(),
                source: String::new(),
            })
            .await,
        Code::NotFound,
        "missing",
    );
    assert_status(
        admin.get_event(pb::GetEventRequest::default()).await,
        Code::InvalidArgument,
        "id",
    );
}

#[tokio::test]
async fn lists_event_types_with_counts() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let seqs = publish(
        &mut bus,
        vec![
            event("1", "b.created"),
            event("2", "a.created"),
            event("3", "b.created"),
        ],
    )
    .await;
    let types = server
        .admin()
        .list_event_types(pb::ListEventTypesRequest::default())
        .await
        .expect("types")
        .into_inner()
        .types;
    let summary: Vec<(String, u64, u64, u64)> = types
        .iter()
        .map(|t| (t.r#type.clone(), t.count, t.first_sequence, t.last_sequence))
        .collect();
    assert_eq!(
        summary,
        [
            ("a.created".to_owned(), 1, seqs[1], seqs[1]),
            ("b.created".to_owned(), 2, seqs[0], seqs[2])
        ]
    );
}

/// A group's lag counts every matching event not yet handed out, whichever of its types it started on:
/// on Redis each type is a stream with a cursor of its own, and the group starts on a random one.
#[tokio::test]
async fn lag_counts_every_event_not_yet_handed_out_whatever_type_went_first() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish_n(&mut bus, "b", "lag.b", 5).await;
    publish_n(&mut bus, "a", "lag.a", 5).await;
    let mut admin = server.admin();
    // a few groups, so that on Redis some start on each stream
    for g in 0..6 {
        let name = format!("lagging-{g}");
        let mut o = open(&["lag.*"], &name);
        o.start = earliest();
        o.max_in_flight = 1;
        let mut member = Subscriber::open(&mut bus, o).await.expect("open");
        let _held = member.next_delivery().await;
        let groups = admin
            .list_groups(pb::ListGroupsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .groups;
        let group = groups
            .iter()
            .find(|i| i.name == name)
            .expect("the group is listed");
        assert_eq!(group.lag + group.pending, 10, "{group:?}");
        let got = admin
            .get_group(pb::GetGroupRequest {
                group: name.clone(),
            })
            .await
            .expect("get")
            .into_inner()
            .group;
        assert_eq!(got.as_ref(), Some(group), "GetGroup describes it as listed");
    }
}

/// Asserts the admin API no longer lists `group`, nor finds it.
async fn assert_group_gone(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    group: &str,
) {
    let groups = admin
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .groups;
    assert!(groups.iter().all(|g| g.name != group), "{groups:?}");
    assert_status(
        admin
            .get_group(pb::GetGroupRequest {
                group: group.to_owned(),
            })
            .await,
        Code::NotFound,
        "does not exist",
    );
}

#[tokio::test]
async fn a_deleted_groups_member_gets_nothing_more_and_its_stream_ends_not_found() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, open(&["doomed.x"], "doomed"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("k1", "doomed.x")]).await;
    let first = sub.next_delivery().await;
    sub.ack_one(&first).await;
    let mut admin = server.admin();
    let deleted = admin
        .delete_group(pb::DeleteGroupRequest {
            group: "doomed".into(),
        })
        .await
        .expect("delete")
        .into_inner()
        .deleted;
    assert!(deleted);
    publish(&mut bus, vec![event("k2", "doomed.x")]).await;
    // the member must not bring the group back (nor hand out its events) when it next claims
    let end = match sub.next_message(WAIT).await {
        Ok(Some(d)) => panic!("the deleted group delivered {:?}", id(&d)),
        Ok(None) => panic!("the member's stream is still open {WAIT:?} after the delete"),
        Err(status) => status,
    };
    assert_eq!(end.code(), Code::NotFound, "unexpected status: {end:?}");
    assert!(end.message().contains("doomed"), "{end:?}");
    assert_group_gone(&mut admin, "doomed").await;
}

#[tokio::test]
async fn a_group_keeps_its_types_until_deleted_and_comes_back_without_its_old_entries() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("old", "kept.a")]).await;
    let mut first = Subscriber::open(
        &mut bus,
        pb::SubscriptionOpen {
            start: earliest(),
            ack_deadline: millis(10),
            ..open(&["kept.a", "kept.c"], "g")
        },
    )
    .await
    .expect("open");
    assert_eq!(id(&first.next_delivery().await), "old");
    // not acked: the entry stays with the group, due again once its lease ends
    first.close();
    // the same types in another order are the same group; other types are refused, naming the
    // group's, so no member is handed types it did not ask for
    Subscriber::open(&mut bus, open(&["kept.c", "kept.a"], "g"))
        .await
        .expect("the same types")
        .close();
    let refused = Subscriber::open(&mut bus, open(&["kept.b"], "g")).await;
    let status = refused.err().expect("other types are refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("open.types") && status.message().contains("kept.a"),
        "{status:?}"
    );
    let deleted = server
        .admin()
        .delete_group(pb::DeleteGroupRequest { group: "g".into() })
        .await
        .expect("delete")
        .into_inner()
        .deleted;
    assert!(deleted);
    // a group of the same name is a new group: it takes new types, and nothing of the old one
    // comes back
    let mut again = Subscriber::open(&mut bus, open(&["kept.a", "kept.b"], "g"))
        .await
        .expect("open again");
    publish(&mut bus, vec![event("new", "kept.a")]).await;
    let d = again.next_delivery().await;
    assert_eq!((id(&d).as_str(), d.attempt), ("new", 1));
    again.ack_one(&d).await;
    again.expect_idle(3).await;
}

/// A member of a deleted group ends with NOT_FOUND at once, not when it next looks: a group created
/// again under the name is another group, with types the old member may not be allowed to read.
#[tokio::test]
async fn a_member_of_a_deleted_group_never_joins_a_group_created_again_under_its_name() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = open(&["z.task"], "reused");
    o.heartbeat_interval = Some(prost_types::Duration {
        seconds: 300,
        nanos: 0,
    });
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    assert!(
        server
            .admin()
            .delete_group(pb::DeleteGroupRequest {
                group: "reused".into()
            })
            .await
            .expect("delete")
            .into_inner()
            .deleted
    );
    Subscriber::open(&mut bus, open(&["z.secret"], "reused"))
        .await
        .expect("created again with other types")
        .close();
    publish(&mut bus, vec![event("secret", "z.secret")]).await;
    match member.next_message(WAIT).await {
        Err(status) => {
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert!(status.message().contains("reused"), "{status:?}");
        }
        Ok(delivery) => panic!("the old member went on: {delivery:?}"),
    }
}

/// An open racing a delete of the group it joins either joined the group the delete removed, and
/// ends NOT_FOUND, or made the group again after the delete, and is its member: it never ends while
/// the group it made stands.
#[tokio::test]
async fn an_open_racing_a_delete_ends_only_when_its_group_is_gone() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut admin = server.admin();
    let (mut stayed, mut ended) = (0, 0);
    for round in 0..50 {
        let (name, event_type) = (format!("raced{round}"), format!("raced.t{round}"));
        Subscriber::open(&mut bus, open(&[event_type.as_str()], &name))
            .await
            .expect("create")
            .close();
        let mut racing_bus = server.bus();
        let delete = admin.delete_group(pb::DeleteGroupRequest {
            group: name.clone(),
        });
        let join = Subscriber::open(&mut racing_bus, open(&[event_type.as_str()], &name));
        // sent in either order, so both outcomes come up
        let (deleted, member) = if round % 2 == 0 {
            tokio::join!(delete, join)
        } else {
            let (member, deleted) = tokio::join!(join, delete);
            (deleted, member)
        };
        assert!(deleted.expect("delete").into_inner().deleted, "{name}");
        let mut member = member.expect("open");
        let groups = admin
            .list_groups(pb::ListGroupsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .groups;
        if groups.iter().any(|g| g.name == name) {
            // the open made the group after the delete: its only member gets the group's events
            publish(&mut bus, vec![event(&format!("e{round}"), &event_type)]).await;
            match member.next_message(WAIT).await {
                Ok(Some(d)) => assert_eq!(id(&d), format!("e{round}")),
                other => panic!("{name} stands, but its member got {other:?}"),
            }
            stayed += 1;
        } else {
            match member.next_message(WAIT).await {
                Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
                other => panic!("{name} is gone, but its member got {other:?}"),
            }
            ended += 1;
        }
    }
    eprintln!("opens that made the group again: {stayed}; that joined the deleted one: {ended}");
}

#[tokio::test]
async fn delete_group_removes_it_and_redrive_of_unknown_group_is_not_found() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    Subscriber::open(&mut bus, open(&["x"], "doomed"))
        .await
        .expect("open")
        .close();
    let mut admin = server.admin();
    assert!(
        admin
            .delete_group(pb::DeleteGroupRequest {
                group: "doomed".into()
            })
            .await
            .expect("delete")
            .into_inner()
            .deleted
    );
    assert_group_gone(&mut admin, "doomed").await;
    assert_status(
        admin
            .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                group: "nope".into(),
                sequences: vec![],
                all: true,
            })
            .await,
        Code::NotFound,
        "nope",
    );
    // and so is listing its dead letters: a typo is not an empty list
    assert_status(
        admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                group: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        admin
            .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                group: "g".into(),
                sequences: vec![],
                all: false,
            })
            .await,
        Code::InvalidArgument,
        "sequences",
    );
}
