//! End-to-end tests: real servers, real gRPC connections, the embedded backend.

mod admin;
mod durability;
mod filters;
mod groups;
mod harness;
mod health;
mod publish;
mod readme;
mod replay;
mod request_reply;
mod store_conformance;
mod subscribe;
