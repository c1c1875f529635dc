use tonic::Code;

use crate::harness::*;
use nerve::api::pb;

#[tokio::test]
async fn replay_pages_through_ten_thousand_events_with_resume_tokens() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut expected = Vec::new();
    let mut batch = Vec::new();
    for i in 0..10_000 {
        let t = if i % 2 == 0 {
            "ledger.debit"
        } else {
            "ledger.credit"
        };
        batch.push(event(&format!("l{i}"), t));
        if batch.len() == 1000 {
            expected.extend(publish(&mut bus, std::mem::take(&mut batch)).await);
        }
    }
    // four calls of at most 2500 events, each resuming from the last token: the last one takes
    // exactly what is left
    let mut token = String::new();
    let mut seen = Vec::new();
    for call in 0..4 {
        let pages = collect_replay(
            bus.replay(pb::ReplayRequest {
                types: vec!["ledger.>".into()],
                limit: 2500,
                page_size: 500,
                resume_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("replay")
            .into_inner(),
        )
        .await;
        assert!(pages.iter().all(|p| p.events.len() <= 500));
        seen.extend(
            pages
                .iter()
                .flat_map(|p| p.events.iter().map(|e| e.sequence)),
        );
        let last = pages.last().expect("a page");
        token = last.resume_token.clone();
        assert_eq!(
            last.end_of_history,
            call == 3,
            "only the last call reaches the end, though its limit stopped it"
        );
    }
    assert_eq!(seen, expected, "all 10,000 in order, none twice");
}

#[tokio::test]
async fn replay_filters_by_type_source_subject_and_ranges() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut a = event("a", "shop.order.created");
    a.subject = "order-1".into();
    let mut b = event("b", "shop.order.paid");
    b.source = "//payments".into();
    let c = event("c", "shop.refund.created");
    let seqs = publish(&mut bus, vec![a, b, c]).await;
    let ids = |pages: Vec<pb::ReplayResponse>| -> Vec<String> {
        pages
            .iter()
            .flat_map(|p| p.events.iter().map(|e| e.id.clone()))
            .collect()
    };
    let run = |r: pb::ReplayRequest| {
        let mut bus = server.bus();
        async move { collect_replay(bus.replay(r).await.expect("replay").into_inner()).await }
    };
    assert_eq!(
        ids(run(pb::ReplayRequest {
            types: vec!["shop.*.created".into()],
            ..Default::default()
        })
        .await),
        ["a", "c"]
    );
    assert_eq!(
        ids(run(pb::ReplayRequest {
            source: "//payments".into(),
            ..Default::default()
        })
        .await),
        ["b"]
    );
    assert_eq!(
        ids(run(pb::ReplayRequest {
            subject: "order-1".into(),
            ..Default::default()
        })
        .await),
        ["a"]
    );
    assert_eq!(
        ids(run(pb::ReplayRequest {
            after_sequence: seqs[0],
            until_sequence: seqs[1],
            ..Default::default()
        })
        .await),
        ["b"]
    );
    let far_future = prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    };
    assert!(
        ids(run(pb::ReplayRequest {
            start_time: Some(far_future),
            ..Default::default()
        })
        .await)
        .is_empty()
    );
    assert_eq!(
        ids(run(pb::ReplayRequest {
            end_time: Some(far_future),
            ..Default::default()
        })
        .await)
        .len(),
        3
    );
    // an empty result still ends with a page that says so
    let pages = run(pb::ReplayRequest {
        types: vec!["nothing.here".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(pages.len(), 1);
    assert!(pages[0].end_of_history);
}

#[tokio::test]
async fn time_ranges_select_by_recorded_time_with_any_other_filter() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // four commits; events of one commit share its recorded time
    for (i, ids) in [&["a", "b"][..], &["c"], &["d", "e"], &["f"]]
        .iter()
        .enumerate()
    {
        let t = if i % 2 == 0 {
            "audit.kept"
        } else {
            "audit.other"
        };
        publish(&mut bus, ids.iter().map(|id| event(id, t)).collect()).await;
    }
    let replay = |r: pb::ReplayRequest| {
        let mut bus = server.bus();
        async move {
            collect_replay(bus.replay(r).await.expect("replay").into_inner())
                .await
                .into_iter()
                .flat_map(|p| p.events)
                .collect::<Vec<_>>()
        }
    };
    let all = replay(pb::ReplayRequest::default()).await;
    let at = |e: &pb::Event| {
        let t = e.recorded_time.expect("recorded time");
        (t.seconds, t.nanos)
    };
    let mut times: Vec<prost_types::Timestamp> = all
        .iter()
        .map(|e| e.recorded_time.expect("recorded time"))
        .collect();
    times.push(prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    });
    // every bound at an event's own time (the edges), with and without a type filter
    for start in &times {
        for end in times
            .iter()
            .filter(|end| (end.seconds, end.nanos) >= (start.seconds, start.nanos))
        {
            for types in [vec![], vec!["audit.kept".to_string()]] {
                let want: Vec<&str> = all
                    .iter()
                    .filter(|e| {
                        (at(e) >= (start.seconds, start.nanos))
                            && (at(e) < (end.seconds, end.nanos))
                            && (types.is_empty() || types[0] == e.r#type)
                    })
                    .map(|e| e.id.as_str())
                    .collect();
                let got = replay(pb::ReplayRequest {
                    start_time: Some(*start),
                    end_time: Some(*end),
                    types: types.clone(),
                    ..Default::default()
                })
                .await;
                let got: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
                assert_eq!(got, want, "from {start:?} before {end:?}, types {types:?}");
            }
        }
    }
    // a sequence bound narrows a time range further
    let of_c = all[2].recorded_time;
    let got = replay(pb::ReplayRequest {
        start_time: of_c,
        after_sequence: all[3].sequence,
        ..Default::default()
    })
    .await;
    assert_eq!(
        got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e", "f"]
    );
}

#[tokio::test]
async fn bad_replay_requests_are_invalid_argument() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    for (r, needle) in [
        (
            pb::ReplayRequest {
                resume_token: "garbage".into(),
                ..Default::default()
            },
            "resume_token",
        ),
        (
            pb::ReplayRequest {
                types: vec!["a:b".into()],
                ..Default::default()
            },
            "types[0]",
        ),
        (
            pb::ReplayRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ReplayRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 1,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "end_time",
        ),
        (
            pb::ReplayRequest {
                after_sequence: 5,
                until_sequence: 4,
                ..Default::default()
            },
            "until_sequence",
        ),
    ] {
        assert_status(bus.replay(r).await, Code::InvalidArgument, needle);
    }
}

/// A replay that starts past the stored head is refused, as Subscribe refuses such a start: a
/// position kept from a store since wiped would otherwise look like a finished history, and skip
/// the events up to it once they came. At the head itself the history simply ends.
#[tokio::test]
async fn a_replay_that_starts_past_the_head_is_out_of_range() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let head = *publish_n(&mut bus, "past", "past.x", 3)
        .await
        .last()
        .expect("published");
    let at_head = replay_pages(
        &mut bus,
        pb::ReplayRequest {
            after_sequence: head,
            ..Default::default()
        },
    )
    .await;
    assert!(page_sequences(&at_head).is_empty(), "{at_head:?}");
    assert!(at_head.last().expect("a page").end_of_history);
    for (request, field) in [
        (
            pb::ReplayRequest {
                after_sequence: head + 1,
                ..Default::default()
            },
            "after_sequence",
        ),
        (
            pb::ReplayRequest {
                resume_token: nerve::bus::encode_resume_token(head + 5),
                ..Default::default()
            },
            "resume_token",
        ),
    ] {
        // the refusal may come as the call's answer or as its stream's first message
        let first = match bus.replay(request).await {
            Ok(stream) => stream.into_inner().message().await,
            Err(status) => Err(status),
        };
        let status = assert_status(first, Code::OutOfRange, field);
        assert!(
            status
                .message()
                .contains(&format!("past the last stored sequence, {head}")),
            "{status:?}"
        );
    }
}

#[tokio::test]
async fn pages_are_full_even_when_matches_are_sparse() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // one match in every ten events: filling a page takes several store reads
    let events = (0..3000)
        .map(|i| {
            event(
                &format!("s{i}"),
                if i % 10 == 0 {
                    "sparse.hit"
                } else {
                    "sparse.miss"
                },
            )
        })
        .collect::<Vec<_>>();
    for chunk in events.chunks(500) {
        publish(&mut bus, chunk.to_vec()).await;
    }
    let pages = collect_replay(
        bus.replay(pb::ReplayRequest {
            types: vec!["sparse.*".into()],
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner(),
    )
    .await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.events.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 3000);
    let hits = collect_replay(
        bus.replay(pb::ReplayRequest {
            types: vec!["*.hit".into()],
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner(),
    )
    .await;
    let hit_sizes: Vec<usize> = hits.iter().map(|p| p.events.len()).collect();
    assert_eq!(hit_sizes.iter().sum::<usize>(), 300);
    assert!(
        hit_sizes[..hit_sizes.len() - 1].iter().all(|n| *n == 100),
        "every page but the last is full: {hit_sizes:?}"
    );
}

#[tokio::test]
async fn resuming_a_replay_open_to_the_future_while_publishers_commit_skips_nothing() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 500;
    let server = TestServer::start().await;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let mut bus = server.bus();
            tokio::spawn(async move {
                for i in 0..EACH {
                    publish(&mut bus, vec![event(&format!("f{p}-{i}"), "future.x")]).await;
                }
            })
        })
        .collect();
    let bus = server.bus();
    let mut token = String::new();
    let mut seen = std::collections::BTreeSet::new();
    // each call reads to the head and hands back a token; the next resumes from it, as a tailing reader does
    let replay_to_the_end = |token: String| {
        let mut bus = bus.clone();
        async move {
            let pages = collect_replay(
                bus.replay(pb::ReplayRequest {
                    until_sequence: u64::MAX,
                    resume_token: token,
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .expect("replay")
                .into_inner(),
            )
            .await;
            let last = pages.last().expect("a page").resume_token.clone();
            (page_sequences(&pages), last)
        }
    };
    while publishers.iter().any(|p| !p.is_finished()) {
        let (sequences, next) = replay_to_the_end(token).await;
        seen.extend(sequences);
        token = next;
    }
    let (sequences, _) = replay_to_the_end(token).await;
    seen.extend(sequences);
    for p in publishers {
        p.await.expect("publisher");
    }
    let total = (PUBLISHERS * EACH) as u64;
    let missing: Vec<u64> = (1..=total).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "resumed past {} events: {missing:?}",
        missing.len()
    );
}

/// A selection that matches little still answers page by page: after a bounded scan the replay sends
/// what it found, possibly nothing, with a token to continue from, rather than scanning the whole
/// history before its first answer (which a caller's deadline may not wait for).
#[tokio::test]
async fn a_selection_that_matches_little_answers_with_pages_while_it_scans() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // more than one page's scan of sequences (16 reads of 4,096) before the only match
    publish_n(&mut bus, "hay", "rare.x", 70_000).await;
    let mut needle = event("needle", "rare.x");
    needle.subject = "needle".into();
    let needle_seq = publish(&mut bus, vec![needle]).await[0];
    let request = pb::ReplayRequest {
        types: vec!["rare.x".into()],
        subject: "needle".into(),
        page_size: 100,
        ..Default::default()
    };
    let pages = replay_pages(&mut bus, request.clone()).await;
    let first = pages.first().expect("a page");
    assert!(
        first.events.is_empty() && !first.end_of_history && !first.resume_token.is_empty(),
        "the first page answers before the scan reaches the match: {} events, end {}",
        first.events.len(),
        first.end_of_history
    );
    assert_eq!(page_sequences(&pages), vec![needle_seq]);
    assert!(pages.last().expect("a page").end_of_history);
    // the empty page's token continues the scan where it stopped
    let resumed = replay_pages(
        &mut bus,
        pb::ReplayRequest {
            resume_token: first.resume_token.clone(),
            ..request
        },
    )
    .await;
    assert_eq!(page_sequences(&resumed), vec![needle_seq]);
}

/// Large events are read a page's bytes at a time: a replay asking for pages of 1,000 does not make
/// the server read 1,000 events of 600 KiB (600 MB) at once.
#[tokio::test]
async fn large_events_are_read_a_page_of_bytes_at_a_time() {
    use std::sync::atomic::Ordering::SeqCst;
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    let large = |i: usize| {
        let mut e = event(&format!("large-{i}"), "large.x");
        e.data = Some(pb::event::Data::BinaryData(vec![7; 600 << 10]));
        e
    };
    let mut stored = Vec::new();
    for chunk in (0..30).collect::<Vec<_>>().chunks(6) {
        stored.extend(publish(&mut bus, chunk.iter().map(|i| large(*i)).collect()).await);
    }
    let pages = replay_pages(
        &mut bus,
        pb::ReplayRequest {
            types: vec!["large.x".into()],
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page_sequences(&pages), stored);
    // a page carries 4 MiB: six such events, and one more to learn that the seventh does not fit
    let most = injection.most_events_read.load(SeqCst);
    assert!(most <= 7, "one read returned {most} events of 600 KiB");
}

/// A replay with an end and a subject filter ends at its end: the scan in spans stops there.
#[tokio::test]
async fn a_filtered_replay_with_an_end_reaches_it_and_ends() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut needle = event("needle", "ended.x");
    needle.subject = "needle".into();
    let needle_seq = publish(&mut bus, vec![needle]).await[0];
    let hay = publish_n(&mut bus, "hay", "ended.x", 9_000).await;
    let pages = tokio::time::timeout(
        WAIT,
        replay_pages(
            &mut bus,
            pb::ReplayRequest {
                subject: "needle".into(),
                until_sequence: hay[4_500],
                ..Default::default()
            },
        ),
    )
    .await
    .expect("the replay ends");
    assert_eq!(page_sequences(&pages), vec![needle_seq]);
    assert!(pages.last().expect("a page").end_of_history);
}

/// A type pattern that matches nothing of a long history reads it in large reads: the rows it
/// looks at, not the matches it finds, size them.
#[tokio::test]
async fn a_pattern_that_matches_nothing_reads_history_in_large_reads() {
    use std::sync::atomic::Ordering::SeqCst;
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    publish_n(&mut bus, "other", "other.x", 20_000).await;
    let before = injection.reads.load(SeqCst);
    let pages = replay_pages(
        &mut bus,
        pb::ReplayRequest {
            types: vec!["orders.>".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(page_sequences(&pages).is_empty());
    assert!(pages.last().expect("a page").end_of_history);
    let reads = injection.reads.load(SeqCst) - before;
    assert!(reads < 100, "{reads} reads for 20,000 events");
}

/// A replay whose limit ends on the last event that matches says it ended the history, though
/// events of other types (or tenants) come after it: by literal type, and by a pattern.
#[tokio::test]
async fn a_limit_that_ends_on_the_last_match_ends_the_history() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(
        &mut bus,
        vec![
            event("a1", "limit.a"),
            event("a2", "limit.a"),
            event("a3", "limit.a"),
            event("b1", "other.b"),
        ],
    )
    .await;
    for types in [vec!["limit.a".to_owned()], vec!["limit.*".to_owned()]] {
        let pages = replay_pages(
            &mut bus,
            pb::ReplayRequest {
                types: types.clone(),
                limit: 3,
                ..Default::default()
            },
        )
        .await;
        let last = pages.last().expect("a page");
        assert_eq!(pages.iter().map(|p| p.events.len()).sum::<usize>(), 3);
        assert!(last.end_of_history, "{types:?}: {last:?}");
        // and a limit short of the last match does not
        let pages = replay_pages(
            &mut bus,
            pb::ReplayRequest {
                types: types.clone(),
                limit: 2,
                ..Default::default()
            },
        )
        .await;
        assert!(!pages.last().expect("a page").end_of_history, "{types:?}");
    }
}

/// A start time not reached yet selects nothing: an event committed while the replay reads was
/// recorded before it, and is not returned (the replay's read is held until one is committed).
#[tokio::test]
async fn a_start_time_not_reached_yet_returns_nothing_committed_meanwhile() {
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("old", "ahead.x")]).await;
    let (reached, go) = injection.before_read.arm();
    let in_an_hour = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let request = pb::ReplayRequest {
        start_time: Some(prost_types::Timestamp::from(in_an_hour)),
        ..Default::default()
    };
    let mut replaying = tokio::spawn({
        let mut bus = server.bus();
        async move { replay_pages(&mut bus, request).await }
    });
    // the replay may end without reading at all; if it reads, an event commits before its read
    let pages = tokio::select! {
        () = reached.wait("the replay's read") => {
            publish(&mut bus, vec![event("late", "ahead.x")]).await;
            drop(go);
            replaying.await.expect("replay")
        }
        pages = &mut replaying => pages.expect("replay"),
    };
    assert_eq!(page_sequences(&pages), Vec::<u64>::new());
    assert!(pages.last().is_some_and(|p| p.end_of_history), "{pages:?}");
}
