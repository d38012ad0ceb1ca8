//! The ECS RPC API client: signing, transport, typed errors, retry policy and the actions the
//! executor needs.

pub mod sign;
