//! The Admin service.

use std::sync::Arc;

use prost::Message as _;
use tonic::{Request, Response, Status};

use super::event_bus::principal;
use super::{
    convert, pb,
    status::{invalid, to_status},
};
use crate::{
    auth::{Auth, AuthError, Principal},
    bus::{
        Bus, BusError, DEFAULT_TENANT, GroupSummary, Page, RedriveSelection, validate_group_name,
    },
    event::check_text,
    store::{AuditQuery, Publisher},
};

/// Implements nerve.v1.Admin.
pub struct AdminApi {
    bus: Arc<Bus>,
    auth: Arc<Auth>,
}

impl AdminApi {
    /// Ends a page of a listing by name: cut short to fit one message, with the token of the next
    /// page (the name it starts after), empty when no more follow.
    fn finish_page<T: prost::Message>(
        &self,
        mut items: Vec<T>,
        next_after: Option<String>,
        name: impl Fn(&T) -> &str,
    ) -> (Vec<T>, String) {
        let fits = self
            .bus
            .limits()
            .page_fits(items.iter().map(|i| i.encoded_len()));
        if fits < items.len() {
            items.truncate(fits);
            let token = items.last().map(|last| name(last).to_owned());
            return (items, token.unwrap_or_default());
        }
        (items, next_after.unwrap_or_default())
    }

    /// Wraps the bus; every call is checked with `auth`.
    pub fn new(bus: Arc<Bus>, auth: Arc<Auth>) -> Self {
        AdminApi { bus, auth }
    }

    /// Checks an admin action on a resource (`groups/<name>`, `types/<type>`, `publishers/<id>`, `audit`).
    fn allow(&self, principal: &Principal, action: &str, resource: &str) -> Result<(), Status> {
        self.auth
            .check(principal, action, resource, |e| e.admin(resource))
            .map_err(|e: AuthError| to_status(e.into()))
    }

    /// Runs an admin change (allowed already) to its end on a task of its own, and records it in the
    /// audit log once it has run, with the error as the reason when it failed. A caller that goes
    /// away (its deadline, a reset) no longer cuts a change between its steps, such as a redrive
    /// between putting letters back and removing them, nor leaves one that took effect unrecorded.
    async fn change<T: Send + 'static>(
        &self,
        principal: &Principal,
        action: &'static str,
        resource: String,
        work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
    ) -> Result<T, Status> {
        let (auth, principal) = (self.auth.clone(), principal.clone());
        tokio::spawn(async move {
            let done = work.await;
            let reason = match &done {
                Ok(_) => String::new(),
                Err(status) => format!("failed: {:?}: {}", status.code(), status.message()),
            };
            auth.record(&principal, action, &resource, "allowed", &reason);
            done
        })
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("{action} did not finish: {e}"))))
    }
}

fn publisher_to_pb(p: Publisher) -> pb::Publisher {
    pb::Publisher {
        principal: p.principal,
        types: p.types,
        sources: p.sources,
        description: p.description,
        update_time: Some(convert::time_to_pb(p.updated_at)),
    }
}

fn publisher_from_pb(p: Option<pb::Publisher>, tenant: &str) -> Result<Publisher, Status> {
    let p = p.ok_or_else(|| invalid("publisher", "is required"))?;
    Ok(Publisher {
        tenant: tenant.to_owned(),
        principal: p.principal,
        types: p.types,
        sources: p.sources,
        description: p.description,
        updated_at: chrono::Utc::now(),
    })
}

/// Reads a list call's page size and token (the last name of the previous page).
fn page_request(size: u32, page_token: &str) -> Result<(usize, &str), Status> {
    let limit = page_size(size)?;
    check_text("page_token", page_token).map_err(|e| to_status(e.into()))?;
    Ok((limit, page_token))
}

fn group_to_pb(g: GroupSummary) -> pb::GroupInfo {
    pb::GroupInfo {
        name: g.stats.key.name,
        types: g.stats.config.selection.type_strings(),
        pending: g.stats.pending,
        lag: g.lag,
        consumers: g.stats.consumers,
        dead_letters: g.dead_letters,
        max_attempts: g.stats.config.max_attempts,
    }
}

fn group_name(name: &str) -> Result<(), Status> {
    validate_group_name(name, "group").map_err(|e| to_status(e.into()))
}

fn page_size(n: u32) -> Result<usize, Status> {
    match n {
        0 => Ok(100),
        1..=1000 => Ok(n as usize),
        _ => Err(invalid("page_size", "must be at most 1000")),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::GetEventResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        if r.id.is_empty() {
            return Err(invalid("id", "is required"));
        }
        for (field, value) in [("id", &r.id), ("source", &r.source)] {
            check_text(field, value).map_err(|e| to_status(e.into()))?;
        }
        let source = (!r.source.is_empty()).then_some(r.source.as_str());
        // an event the caller may not see is answered as NOT_FOUND; a call that found only such
        // events is audited once, not once for each of them (any number may share the id)
        let hidden = std::sync::Mutex::new(None);
        let event = self
            .bus
            .get_event(&principal.tenant, &r.id, source, |e| {
                let resource = format!("types/{}", e.event.event_type);
                let visible = self.auth.permits(&principal, |e| e.admin(&resource));
                if !visible {
                    hidden
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(resource);
                }
                visible
            })
            .await;
        let hidden = hidden.into_inner().unwrap_or_else(|p| p.into_inner());
        if let (Err(BusError::NotFound(_)), Some(resource)) = (&event, hidden) {
            let _ = self.allow(&principal, "admin.get_event", &resource);
        }
        let event = event.map_err(to_status)?;
        Ok(Response::new(pb::GetEventResponse {
            event: Some(convert::stored_to_pb(&event)),
        }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let (limit, after) = page_request(r.page_size, &r.page_token)?;
        let page = self
            .bus
            .list_groups(&principal.tenant, after, limit, |name| {
                let resource = format!("groups/{name}");
                self.auth.permits(&principal, |e| e.admin(&resource))
            })
            .await
            .map_err(to_status)?;
        let groups = page.items.into_iter().map(group_to_pb).collect();
        let (groups, next_page_token) = self.finish_page(groups, page.next_after, |g| &g.name);
        Ok(Response::new(pb::ListGroupsResponse {
            groups,
            next_page_token,
        }))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        group_name(&r.group)?;
        self.allow(
            &principal,
            "admin.get_group",
            &format!("groups/{}", r.group),
        )?;
        let group = self
            .bus
            .group(&principal.tenant, &r.group)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetGroupResponse {
            group: Some(group_to_pb(group)),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        group_name(&r.group)?;
        let resource = format!("groups/{}", r.group);
        self.allow(&principal, "admin.delete_group", &resource)?;
        let (bus, tenant) = (self.bus.clone(), principal.tenant.clone());
        let deleted = self
            .change(&principal, "admin.delete_group", resource, async move {
                bus.delete_group(&tenant, &r.group).await.map_err(to_status)
            })
            .await?;
        Ok(Response::new(pb::DeleteGroupResponse { deleted }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        group_name(&r.group)?;
        self.allow(
            &principal,
            "admin.list_dead_letters",
            &format!("groups/{}", r.group),
        )?;
        let limit = page_size(r.page_size)?;
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| invalid("page_token", "is not a token returned by ListDeadLetters"))?
        };
        let (letters, next_after) = self
            .bus
            .dead_letters(&principal.tenant, &r.group, after, limit)
            .await
            .map_err(to_status)?;
        let mut letters: Vec<(u64, pb::DeadLetter)> = letters
            .into_iter()
            .map(|(d, e)| {
                let letter = pb::DeadLetter {
                    event: Some(convert::stored_to_pb(&e)),
                    group: d.group,
                    attempts: d.attempts,
                    reason: d.reason,
                    dead_lettered_time: Some(convert::time_to_pb(d.dead_lettered_at)),
                };
                (d.sequence, letter)
            })
            .collect();
        // large letters end a page early, so it fits one message: counted encoded, since a reason
        // (up to 1 KiB, each NUL in it escaped to 5 bytes) can outweigh its event
        let fits = self
            .bus
            .limits()
            .page_fits(letters.iter().map(|(_, l)| l.encoded_len()));
        // a page cut short goes on after its last letter (a page holds at least one)
        let next_after = match fits.checked_sub(1).and_then(|last| letters.get(last)) {
            Some((sequence, _)) if fits < letters.len() => Some(*sequence),
            _ => next_after,
        };
        letters.truncate(fits);
        let next_page_token = next_after.map(|s| s.to_string()).unwrap_or_default();
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(|(_, l)| l).collect(),
            next_page_token,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        group_name(&r.group)?;
        let resource = format!("groups/{}", r.group);
        self.allow(&principal, "admin.redrive_dead_letters", &resource)?;
        let selection = match (r.all, r.sequences.is_empty()) {
            (true, true) => RedriveSelection::All,
            (false, false) => RedriveSelection::Sequences(r.sequences.into_iter().collect()),
            (true, false) => return Err(invalid("sequences", "must be empty when all is set")),
            (false, true) => {
                return Err(invalid(
                    "sequences",
                    "name dead letters to redrive, or set all",
                ));
            }
        };
        let (bus, tenant) = (self.bus.clone(), principal.tenant.clone());
        let redriven = self
            .change(
                &principal,
                "admin.redrive_dead_letters",
                resource,
                async move {
                    bus.redrive(&tenant, &r.group, selection)
                        .await
                        .map_err(to_status)
                },
            )
            .await?;
        Ok(Response::new(pb::RedriveDeadLettersResponse { redriven }))
    }

    async fn list_event_types(
        &self,
        request: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let (limit, after) = page_request(r.page_size, &r.page_token)?;
        let page = self
            .bus
            .event_types(&principal.tenant, after, limit, |event_type| {
                let resource = format!("types/{event_type}");
                self.auth.permits(&principal, |e| e.admin(&resource))
            })
            .await
            .map_err(to_status)?;
        let types = page
            .items
            .into_iter()
            .map(|t| pb::EventTypeInfo {
                r#type: t.event_type,
                count: t.count,
                first_sequence: t.first_sequence,
                last_sequence: t.last_sequence,
                last_time: Some(convert::time_to_pb(t.last_recorded_at)),
            })
            .collect();
        let (types, next_page_token) = self.finish_page(types, page.next_after, |t| &t.r#type);
        Ok(Response::new(pb::ListEventTypesResponse {
            types,
            next_page_token,
        }))
    }

    async fn register_publisher(
        &self,
        request: Request<pb::RegisterPublisherRequest>,
    ) -> Result<Response<pb::RegisterPublisherResponse>, Status> {
        let principal = principal(&request)?;
        let publisher = publisher_from_pb(request.into_inner().publisher, &principal.tenant)?;
        let resource = format!("publishers/{}", publisher.principal);
        self.allow(&principal, "admin.register_publisher", &resource)?;
        let auth = self.auth.clone();
        let publisher = self
            .change(
                &principal,
                "admin.register_publisher",
                resource,
                async move {
                    auth.put_publisher(&publisher, false)
                        .await
                        .map_err(|e| to_status(e.into()))?;
                    Ok(publisher)
                },
            )
            .await?;
        Ok(Response::new(pb::RegisterPublisherResponse {
            publisher: Some(publisher_to_pb(publisher)),
        }))
    }

    async fn update_publisher(
        &self,
        request: Request<pb::UpdatePublisherRequest>,
    ) -> Result<Response<pb::UpdatePublisherResponse>, Status> {
        let principal = principal(&request)?;
        let publisher = publisher_from_pb(request.into_inner().publisher, &principal.tenant)?;
        let resource = format!("publishers/{}", publisher.principal);
        self.allow(&principal, "admin.update_publisher", &resource)?;
        let auth = self.auth.clone();
        let publisher = self
            .change(&principal, "admin.update_publisher", resource, async move {
                auth.put_publisher(&publisher, true)
                    .await
                    .map_err(|e| to_status(e.into()))?;
                Ok(publisher)
            })
            .await?;
        Ok(Response::new(pb::UpdatePublisherResponse {
            publisher: Some(publisher_to_pb(publisher)),
        }))
    }

    async fn list_publishers(
        &self,
        request: Request<pb::ListPublishersRequest>,
    ) -> Result<Response<pb::ListPublishersResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        let (limit, after) = page_request(r.page_size, &r.page_token)?;
        let mut publishers = self
            .auth
            .publishers(&principal.tenant)
            .await
            .map_err(|e| to_status(e.into()))?;
        publishers.sort_by(|a, b| a.principal.cmp(&b.principal));
        let page = Page::after(
            publishers,
            |p| &p.principal,
            after,
            limit,
            |p| {
                let resource = format!("publishers/{}", p.principal);
                self.auth.permits(&principal, |e| e.admin(&resource))
            },
        );
        let publishers = page.items.into_iter().map(publisher_to_pb).collect();
        let (publishers, next_page_token) =
            self.finish_page(publishers, page.next_after, |p| &p.principal);
        Ok(Response::new(pb::ListPublishersResponse {
            publishers,
            next_page_token,
        }))
    }

    async fn remove_publisher(
        &self,
        request: Request<pb::RemovePublisherRequest>,
    ) -> Result<Response<pb::RemovePublisherResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        if r.principal.is_empty() {
            return Err(invalid("principal", "is required"));
        }
        let resource = format!("publishers/{}", r.principal);
        // authorized first, so a refusal is audited whatever was sent
        self.allow(&principal, "admin.remove_publisher", &resource)?;
        check_text("principal", &r.principal).map_err(|e| to_status(e.into()))?;
        let (auth, tenant) = (self.auth.clone(), principal.tenant.clone());
        let removed = self
            .change(&principal, "admin.remove_publisher", resource, async move {
                auth.remove_publisher(&tenant, &r.principal)
                    .await
                    .map_err(|e| to_status(e.into()))
            })
            .await?;
        Ok(Response::new(pb::RemovePublisherResponse { removed }))
    }

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let principal = principal(&request)?;
        let r = request.into_inner();
        self.allow(&principal, "admin.list_audit_records", "audit")?;
        // records keep control characters escaped: a filter holding one matches nothing
        check_text("principal", &r.principal).map_err(|e| to_status(e.into()))?;
        let limit = page_size(r.page_size)?;
        let after_id = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| invalid("page_token", "is not a token returned by ListAuditRecords"))?
        };
        if !matches!(
            r.outcome.as_str(),
            "" | "allowed" | "denied" | "unauthenticated"
        ) {
            return Err(invalid(
                "outcome",
                "must be empty, \"allowed\", \"denied\" or \"unauthenticated\"",
            ));
        }
        // calls that never authenticated have no tenant; the default tenant's admins see them
        let mut tenants = vec![principal.tenant.clone()];
        if principal.tenant == DEFAULT_TENANT {
            tenants.push(String::new());
        }
        let mut records = self
            .auth
            .audit_records(&AuditQuery {
                tenants,
                after_id,
                principal: (!r.principal.is_empty()).then_some(r.principal),
                outcome: (!r.outcome.is_empty()).then_some(r.outcome),
                // one more than the page, so an exactly full last page says no more follow
                limit: limit + 1,
            })
            .await
            .map_err(|e| to_status(e.into()))?;
        let mut more = records.len() > limit;
        records.truncate(limit);
        let mut records: Vec<pb::AuditRecord> = records
            .into_iter()
            .map(|a| pb::AuditRecord {
                id: a.id,
                time: Some(convert::time_to_pb(a.time)),
                principal: a.principal,
                action: a.action,
                resource: a.resource,
                outcome: a.outcome,
                reason: a.reason,
            })
            .collect();
        // large records end a page early, so it fits one message: a refused type is recorded as sent
        // (cut, with control characters escaped), several KiB each
        let fits = self
            .bus
            .limits()
            .page_fits(records.iter().map(|r| r.encoded_len()));
        more |= fits < records.len();
        records.truncate(fits);
        let next_page_token = if more {
            records.last().map(|a| a.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records,
            next_page_token,
        }))
    }
}
