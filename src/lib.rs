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
//! - [`backend`]: NIXL's semantics (metadata objects, peers, requests,
//!   progress); decides what moves and when a request is done.
//! - [`transport`]: how bytes move, one folder per transport behind one
//!   seam (in-process copy, cross-memory attach, TCP), and selection.
//! - [`wire`]: versioned encodings of everything that crosses to a peer.
//! - [`common`]: the vocabulary all of them share (errors, agent names,
//!   registered memory and pins, notifications, completions).
//! - [`cuda`]: GPU memory through the CUDA driver, loaded at run time on
//!   first use (registration checks, device copies); used by the backend
//!   and the transports, beside `common`.
#![allow(non_snake_case)] // the library name must be `plugin_Mooncake`
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod backend;
pub mod common;
pub mod cuda;
mod ffi;
pub mod logging;
pub mod transport;
pub mod vendor_lib;
pub mod wire;

pub use ffi::{nixl_plugin_fini, nixl_plugin_init};
