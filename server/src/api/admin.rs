//! The Admin service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert, pb,
    status::{invalid, to_status},
};
use crate::bus::{Bus, DEFAULT_TENANT, RedriveSelection, validate_group_name};

/// Implements nerve.v1.Admin.
pub struct AdminApi {
    bus: Arc<Bus>,
}

impl AdminApi {
    /// Wraps the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        AdminApi { bus }
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
        let r = request.into_inner();
        if r.id.is_empty() {
            return Err(invalid("id", "is required"));
        }
        let source = (!r.source.is_empty()).then_some(r.source.as_str());
        let event = self
            .bus
            .get_event(DEFAULT_TENANT, &r.id, source)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetEventResponse {
            event: Some(convert::stored_to_pb(&event)),
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self
            .bus
            .list_groups(DEFAULT_TENANT)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|g| pb::GroupInfo {
                    name: g.stats.key.name,
                    types: g.stats.config.selection.type_strings(),
                    pending: g.stats.pending,
                    lag: g.lag,
                    consumers: g.stats.consumers,
                    dead_letters: g.dead_letters,
                    max_attempts: g.stats.config.max_attempts,
                })
                .collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let r = request.into_inner();
        group_name(&r.group)?;
        let deleted = self
            .bus
            .delete_group(DEFAULT_TENANT, &r.group)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteGroupResponse { deleted }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let r = request.into_inner();
        group_name(&r.group)?;
        let limit = page_size(r.page_size)?;
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| invalid("page_token", "is not a token returned by ListDeadLetters"))?
        };
        let letters = self
            .bus
            .dead_letters(DEFAULT_TENANT, &r.group, after, limit)
            .await
            .map_err(to_status)?;
        let next_page_token = if letters.len() == limit {
            letters
                .last()
                .map(|(d, _)| d.sequence.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters
                .into_iter()
                .map(|(d, e)| pb::DeadLetter {
                    event: Some(convert::stored_to_pb(&e)),
                    group: d.group,
                    attempts: d.attempts,
                    reason: d.reason,
                    dead_lettered_time: Some(convert::time_to_pb(d.dead_lettered_at)),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let r = request.into_inner();
        group_name(&r.group)?;
        let selection = match (r.all, r.sequences.is_empty()) {
            (true, true) => RedriveSelection::All,
            (false, false) => RedriveSelection::Sequences(r.sequences),
            (true, false) => return Err(invalid("sequences", "must be empty when all is set")),
            (false, true) => {
                return Err(invalid(
                    "sequences",
                    "name dead letters to redrive, or set all",
                ));
            }
        };
        let redriven = self
            .bus
            .redrive(DEFAULT_TENANT, &r.group, selection)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RedriveDeadLettersResponse { redriven }))
    }

    async fn list_event_types(
        &self,
        _request: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        let types = self
            .bus
            .event_types(DEFAULT_TENANT)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListEventTypesResponse {
            types: types
                .into_iter()
                .map(|t| pb::EventTypeInfo {
                    r#type: t.event_type,
                    count: t.count,
                    first_sequence: t.first_sequence,
                    last_sequence: t.last_sequence,
                    last_time: Some(convert::time_to_pb(t.last_recorded_at)),
                })
                .collect(),
        }))
    }
}
