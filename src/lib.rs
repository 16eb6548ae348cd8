//! A NIXL backend plugin, installed as `libplugin_Mooncake.so` and loaded by
//! NIXL as backend "Mooncake", with its own transfer engine.
//!
//! Data flows one way through four layers:
//!
//! ```text
//! NIXL agent -> ffi (C++ shim + cxx bridge) -> backend::Engine -> transport::*
//! ```
//!
//! - [`ffi`](crate::ffi): the boundary; translates calls, catches panics.
//! - [`backend`]: NIXL's semantics (registry, peers, requests, notifications,
//!   progress); decides what moves and when a request is done.
//! - [`wire`]: versioned encodings of everything that crosses to a peer.
//! - [`transport`]: how bytes move (in-process copy today).
#![allow(non_snake_case)] // the library name must be `plugin_Mooncake`
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod backend;
mod ffi;
pub mod logging;
pub mod transport;
pub mod wire;

pub use ffi::{nixl_plugin_fini, nixl_plugin_init};
