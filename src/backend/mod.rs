//! The backend: NIXL's semantics, with no I/O of its own.
//!
//! [`Engine`] is the object behind the C++ shim. It owns the options, the
//! metadata objects handed to NIXL, the known peers and their routes, the
//! request slab and the progress worker. It decides *what* must move and
//! *when a request is done*; the transports (reached only through
//! [`crate::transport`]'s seam) decide *how*.

pub mod engine;
pub mod options;
pub mod progress;
pub mod requests;

pub use crate::common::{AgentName, Endpoint, Error, Result, Status};
pub use engine::{Desc, Engine, EngineConfig, MdId, ReqId};
