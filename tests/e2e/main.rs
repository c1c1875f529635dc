//! End-to-end tests: real servers, real gRPC connections. In-process servers use the embedded backend,
//! or Postgres + Redis with NERVE_TEST_BACKEND=redis (scripts/test.sh runs the behaviour tests both ways).

mod admin;
mod durability;
mod failover;
mod filters;
mod groups;
mod harness;
mod health;
mod injected_store;
mod observability;
mod publish;
mod readme;
mod replay;
mod request_reply;
mod security;
mod store_conformance;
mod stream_conformance;
mod subscribe;
