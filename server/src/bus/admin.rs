use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};

use super::{Bus, BusError, BusResult};
use crate::{
    event::StoredEvent,
    store::{DeadLetter, EventTypeStats},
    stream::{GroupKey, GroupStats, StreamError},
};

/// A group with its backlog.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    pub stats: GroupStats,
    pub lag: u64,
    pub dead_letters: u64,
}

/// Which dead letters to redrive.
#[derive(Debug, Clone)]
pub enum RedriveSelection {
    All,
    Sequences(HashSet<u64>),
}

const REDRIVE_PAGE: usize = 500;

/// Event types read from the store at a time while a page of them is gathered.
const TYPE_SCAN: usize = 1_000;

/// One page of a listing in byte order of names.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The name the next page starts after, when items the caller may see follow this one.
    pub next_after: Option<String>,
}

impl<T> Page<T> {
    /// The first `limit` of `items` (in byte order of `name`) named after `after` that `may_see`
    /// lets through.
    pub fn after(
        items: impl IntoIterator<Item = T>,
        name: impl Fn(&T) -> &str,
        after: &str,
        limit: usize,
        may_see: impl Fn(&T) -> bool,
    ) -> Self {
        let items: Vec<T> = items
            .into_iter()
            .filter(|item| name(item) > after && may_see(item))
            .take(limit + 1)
            .collect();
        Self::of(items, limit, name)
    }

    /// The first `limit` of `items` (in byte order), which hold one more when another page follows.
    fn of(mut items: Vec<T>, limit: usize, name: impl Fn(&T) -> &str) -> Self {
        let more = items.len() > limit;
        items.truncate(limit);
        let next_after = items
            .last()
            .filter(|_| more)
            .map(|last| name(last).to_owned());
        Page { items, next_after }
    }
}

impl Bus {
    /// Finds a stored event by id among those `may_see` lets through; `source` is needed only when
    /// several sources used the id.
    pub async fn get_event(
        &self,
        tenant: &str,
        id: &str,
        source: Option<&str>,
        may_see: impl Fn(&StoredEvent) -> bool,
    ) -> BusResult<Arc<StoredEvent>> {
        // an event the caller may not see is answered as missing: nothing of it (its type, its
        // sources, that it exists) shows; those it may see are looked for past any number of others
        let mut found = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.find(tenant, id, source, after).await?;
            let Some(last) = page.last() else { break };
            after = last.sequence;
            let full = page.len() == crate::store::FIND_PAGE;
            found.extend(page.into_iter().filter(|e| may_see(e)));
            if !full || found.len() > crate::store::FIND_PAGE {
                break;
            }
        }
        match found.len() {
            0 => Err(BusError::NotFound(match source {
                Some(s) => format!("no event with id {id:?} from source {s:?}"),
                None => format!("no event with id {id:?}"),
            })),
            1 => Ok(found.remove(0)),
            _ => {
                // named within a status message clients take (sources may be long)
                let mut named = String::new();
                let mut left = found.len();
                for e in &found {
                    if !named.is_empty() && named.len() + e.event.source.len() > 512 {
                        break;
                    }
                    if !named.is_empty() {
                        named.push_str(", ");
                    }
                    named.push_str(&e.event.source);
                    left -= 1;
                }
                if left > 0 {
                    named.push_str(", and more");
                }
                Err(BusError::FailedPrecondition(format!(
                    "several sources used id {id:?} ({named}); pass source to choose"
                )))
            }
        }
    }

    /// A page of the durable groups named after `after` that `may_see` lets through (by name), with
    /// pending, lag, consumers and dead letters; the lag of the others is not counted (it scans what
    /// they have not received).
    pub async fn list_groups(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
        may_see: impl Fn(&str) -> bool,
    ) -> BusResult<Page<GroupSummary>> {
        let names = Page::after(
            self.streams.group_names(tenant).await?,
            |n| n.as_str(),
            after,
            limit,
            |n| may_see(n),
        );
        Ok(Page {
            items: self.group_summaries(tenant, &names.items).await?,
            // the names', not the last group's: a group deleted meanwhile is not on the page
            next_after: names.next_after,
        })
    }

    /// One durable group with pending, lag, consumers and dead letters, as [`Bus::list_groups`] gives it.
    pub async fn group(&self, tenant: &str, name: &str) -> BusResult<GroupSummary> {
        self.group_summaries(tenant, &[name.to_owned()])
            .await?
            .pop()
            .ok_or_else(|| BusError::NotFound(format!("group {name:?} does not exist")))
    }

    /// Whether a durable group of that name exists in the tenant.
    pub async fn group_exists(&self, tenant: &str, name: &str) -> BusResult<bool> {
        let key = GroupKey {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        };
        match self.streams.group_settings(&key).await {
            Ok(_) => Ok(true),
            Err(StreamError::NoSuchGroup(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Refuses to open a group that does not exist yet when its tenant already keeps
    /// `bus.max_groups_per_tenant` of them. Opens racing to create groups may pass it together.
    pub(crate) async fn room_for_group(&self, key: &GroupKey) -> BusResult<()> {
        if self.group_exists(&key.tenant, &key.name).await? {
            return Ok(());
        }
        let kept = self.streams.group_names(&key.tenant).await?.len();
        let most = self.settings.max_groups_per_tenant;
        if kept >= most {
            return Err(BusError::ResourceExhausted(format!(
                "the tenant keeps {kept} durable groups, the most bus.max_groups_per_tenant \
                 ({most}) allows: delete one (Admin.DeleteGroup) before opening group {:?}",
                key.name
            )));
        }
        Ok(())
    }

    /// The summaries of the named groups that exist.
    async fn group_summaries(
        &self,
        tenant: &str,
        names: &[String],
    ) -> BusResult<Vec<GroupSummary>> {
        let dead: HashMap<String, u64> = self
            .store
            .dead_letter_counts(tenant, names)
            .await?
            .into_iter()
            .collect();
        let mut items = Vec::with_capacity(names.len());
        for stats in self.streams.groups(tenant, names).await? {
            let mut lag = 0;
            for (selection, cursors) in &stats.positions {
                lag += self.store.count_after(tenant, *cursors, selection).await?;
            }
            items.push(GroupSummary {
                dead_letters: dead.get(&stats.key.name).copied().unwrap_or(0),
                lag,
                stats,
            });
        }
        Ok(items)
    }

    /// Deletes a group, its pending deliveries and its dead letters.
    pub async fn delete_group(&self, tenant: &str, group: &str) -> BusResult<bool> {
        let key = GroupKey {
            tenant: tenant.to_owned(),
            name: group.to_owned(),
        };
        Ok(self.streams.delete_group(&key).await?)
    }

    /// Lists a group's dead letters after a sequence, with their events, and the sequence the next
    /// page starts after when more follow.
    pub async fn dead_letters(
        &self,
        tenant: &str,
        group: &str,
        after: u64,
        limit: usize,
    ) -> BusResult<(Vec<(DeadLetter, Arc<StoredEvent>)>, Option<u64>)> {
        // one more than the page, so an exactly full last page says no more follow
        let mut letters = self
            .store
            .dead_letters(tenant, group, after, limit + 1)
            .await?;
        // a name that is no group (a typo) is not an empty list; letters a deleted group left (a
        // late one, on Redis) are still listed, so that they can be seen and deleted
        if letters.is_empty() && !self.group_exists(tenant, group).await? {
            return Err(BusError::NotFound(format!(
                "group {group:?} does not exist"
            )));
        }
        let more = letters.len() > limit;
        letters.truncate(limit);
        // the page's own last letter, even when its event is not there to show
        let next_after = letters.last().map(|d| d.sequence).filter(|_| more);
        let sequences: Vec<u64> = letters.iter().map(|d| d.sequence).collect();
        let events: HashMap<u64, Arc<StoredEvent>> = self
            .store
            .read_sequences(&sequences)
            .await?
            .into_iter()
            .map(|e| (e.sequence, e))
            .collect();
        let letters = letters
            .into_iter()
            .filter_map(|d| events.get(&d.sequence).cloned().map(|e| (d, e)))
            .collect();
        Ok((letters, next_after))
    }

    /// Sends dead letters back to their group only, due at once with fresh attempts; returns how many.
    pub async fn redrive(
        &self,
        tenant: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> BusResult<u64> {
        let key = GroupKey {
            tenant: tenant.to_owned(),
            name: group.to_owned(),
        };
        // the group as it is now: letters go back only into it, not into one created again under
        // the name while the pages are read
        let Some((group_selection, created_ns)) = self
            .streams
            .groups(tenant, std::slice::from_ref(&key.name))
            .await?
            .pop()
            .map(|g| (g.config.selection, g.created_ns))
        else {
            return Err(BusError::NotFound(format!(
                "group {group:?} does not exist"
            )));
        };
        // letters are read in sequence order: none after the last one named is needed
        let last_named = match &selection {
            RedriveSelection::All => None,
            RedriveSelection::Sequences(list) => Some(list.iter().max().copied().unwrap_or(0)),
        };
        let mut total = 0;
        let mut after = 0;
        loop {
            let letters = self
                .store
                .dead_letters(tenant, group, after, REDRIVE_PAGE)
                .await?;
            let Some(last) = letters.last() else { break };
            after = last.sequence;
            let chosen: Vec<&DeadLetter> = letters
                .iter()
                .filter(|d| match &selection {
                    RedriveSelection::All => true,
                    RedriveSelection::Sequences(list) => list.contains(&d.sequence),
                })
                .collect();
            if !chosen.is_empty() {
                let sequences: Vec<u64> = chosen.iter().map(|d| d.sequence).collect();
                // a letter of a type the group does not read (left from before groups kept their
                // types) would be requeued where no member claims it: it stays a letter
                let mut events = self.store.read_sequences(&sequences).await?;
                events.retain(|e| group_selection.matches_type(&e.event.event_type));
                // requeue before removing: a crash in between leaves a duplicate dead letter, never
                // a lost one. An event still pending stays a dead letter: a member is dead-lettering
                // it right now and will remove it from the group next. Each letter goes only as it
                // was listed: one the event got again since the requeue (a member gave up on it at
                // once) stays.
                let requeued: HashSet<u64> = self
                    .streams
                    .requeue(&key, created_ns, &events)
                    .await?
                    .into_iter()
                    .collect();
                let redriven: Vec<(u64, DateTime<Utc>)> = chosen
                    .iter()
                    .filter(|d| requeued.contains(&d.sequence))
                    .map(|d| (d.sequence, d.dead_lettered_at))
                    .collect();
                total += self
                    .store
                    .remove_dead_letters(tenant, group, &redriven)
                    .await?;
            }
            if letters.len() < REDRIVE_PAGE || last_named.is_some_and(|last| last <= after) {
                break;
            }
        }
        self.streams.wake_group(&key).await?;
        Ok(total)
    }

    /// A page of the stored event types named after `after` that `may_see` lets through.
    pub async fn event_types(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
        may_see: impl Fn(&str) -> bool,
    ) -> BusResult<Page<EventTypeStats>> {
        let mut items = Vec::new();
        let mut scanned = after.to_owned();
        loop {
            let chunk = self.store.event_types(tenant, &scanned, TYPE_SCAN).await?;
            let exhausted = chunk.len() < TYPE_SCAN;
            if let Some(last) = chunk.last() {
                scanned.clone_from(&last.event_type);
            }
            items.extend(chunk.into_iter().filter(|t| may_see(&t.event_type)));
            // one more than the page tells whether another follows
            if items.len() > limit || exhausted {
                break;
            }
        }
        Ok(Page::of(items, limit, |t| &t.event_type))
    }
}
