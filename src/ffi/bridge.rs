//! The one list of calls that cross between the C++ shim and Rust.
//!
//! Every function returns a raw `nixl_status_t`, logs the reason of every
//! error it returns, and never lets a panic unwind into C++. Names, messages
//! and metadata cross as bytes, never as UTF-8 strings.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use log::{error, warn};

use crate::backend::options::OPTION_SPECS;
use crate::backend::{Desc, Engine, EngineConfig, Error, Status};
use crate::transport::Op;

#[cxx::bridge(namespace = "mooncake_rs")]
mod ffi {
    /// One flattened NIXL descriptor with the id of its metadata object.
    struct XferDesc {
        addr: u64,
        len: u64,
        md: u64,
    }

    /// One `customParams` entry.
    struct Param {
        key: Vec<u8>,
        value: Vec<u8>,
    }

    /// One received notification.
    struct NotifOut {
        agent: Vec<u8>,
        msg: Vec<u8>,
    }

    /// One backend option and its default.
    struct OptionDefault {
        name: String,
        value: String,
    }

    extern "Rust" {
        type Engine;

        fn engine_new(
            local_agent: &[u8],
            params: &[Param],
            progress_thread: bool,
            progress_delay_us: u64,
        ) -> Result<Box<Engine>>;
        fn option_defaults() -> Vec<OptionDefault>;
        fn shim_log_error(msg: &[u8]);

        fn get_conn_info(engine: &Engine, out: &mut Vec<u8>) -> i32;
        fn load_remote_conn_info(engine: &Engine, agent: &[u8], conn: &[u8]) -> i32;
        fn connect(engine: &Engine, agent: &[u8]) -> i32;
        fn disconnect(engine: &Engine, agent: &[u8]) -> i32;

        fn register_mem(
            engine: &Engine,
            addr: u64,
            len: u64,
            dev_id: u64,
            mem_type: i32,
            out_md: &mut u64,
        ) -> i32;
        fn deregister_mem(engine: &Engine, md: u64) -> i32;
        fn get_public_data(engine: &Engine, md: u64, out: &mut Vec<u8>) -> i32;
        fn load_remote_md(
            engine: &Engine,
            addr: u64,
            len: u64,
            mem_type: i32,
            meta: &[u8],
            agent: &[u8],
            out_md: &mut u64,
        ) -> i32;
        fn load_local_md(engine: &Engine, md: u64, out_md: &mut u64) -> i32;
        fn unload_md(engine: &Engine, md: u64) -> i32;

        fn prep_xfer(
            engine: &Engine,
            op: i32,
            local: &[XferDesc],
            remote: &[XferDesc],
            agent: &[u8],
            out_req: &mut u64,
        ) -> i32;
        fn post_xfer(engine: &Engine, req: u64, has_notif: bool, notif: &[u8]) -> i32;
        fn check_xfer(engine: &Engine, req: u64) -> i32;
        fn release_req(engine: &Engine, req: u64) -> i32;

        fn get_notifs(engine: &Engine, out: &mut Vec<NotifOut>) -> i32;
        fn gen_notif(engine: &Engine, agent: &[u8], msg: &[u8]) -> i32;
    }

    unsafe extern "C++" {
        include!("engine.h");
    }
}

/// Runs one call: turns its result into a status, logs errors, catches panics.
fn guard(what: &str, f: impl FnOnce() -> Result<Status, Error>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status.code(),
        Ok(Err(e)) => {
            match e {
                // Cancellation is what the caller asked for.
                Error::Canceled(_) => warn!("Mooncake: {what}: {e}"),
                _ => error!("Mooncake: {what}: {e}"),
            }
            e.status().code()
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            error!("Mooncake: {what}: internal error (panic: {why}); returning NIXL_ERR_UNKNOWN");
            Status::Unknown.code()
        }
    }
}

fn ok<T>(r: Result<T, Error>) -> Result<Status, Error> {
    r.map(|_| Status::Success)
}

fn engine_new(
    local_agent: &[u8],
    params: &[ffi::Param],
    progress_thread: bool,
    progress_delay_us: u64,
) -> Result<Box<Engine>, String> {
    crate::logging::init();
    let result = catch_unwind(|| {
        let params = params
            .iter()
            .map(|p| {
                let text = |b: &[u8], what: &str| {
                    String::from_utf8(b.to_vec()).map_err(|_| {
                        Error::InvalidParam(format!("backend option {what} is not valid UTF-8"))
                    })
                };
                Ok((text(&p.key, "name")?, text(&p.value, "value")?))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Engine::new(EngineConfig {
            local_agent: local_agent.to_vec(),
            params,
            progress_thread,
            progress_delay: Duration::from_micros(progress_delay_us),
        })
    });
    // The shim logs the error it receives (one line), so nothing is logged here.
    match result {
        Ok(Ok(engine)) => Ok(Box::new(engine)),
        Ok(Err(e)) => Err(format!("cannot create the Mooncake engine: {e}")),
        Err(_) => Err("cannot create the Mooncake engine: internal error (panic)".to_string()),
    }
}

fn option_defaults() -> Vec<ffi::OptionDefault> {
    OPTION_SPECS
        .iter()
        .map(|s| ffi::OptionDefault {
            name: s.name.into(),
            value: s.default.into(),
        })
        .collect()
}

fn shim_log_error(msg: &[u8]) {
    error!("Mooncake: {}", String::from_utf8_lossy(msg));
}

fn get_conn_info(engine: &Engine, out: &mut Vec<u8>) -> i32 {
    guard("getConnInfo", || {
        out.clear();
        out.extend_from_slice(engine.conn_info());
        Ok(Status::Success)
    })
}

fn load_remote_conn_info(engine: &Engine, agent: &[u8], conn: &[u8]) -> i32 {
    guard("loadRemoteConnInfo", || {
        ok(engine.load_remote_conn_info(agent, conn))
    })
}

fn connect(engine: &Engine, agent: &[u8]) -> i32 {
    guard("connect", || ok(engine.connect(agent)))
}

fn disconnect(engine: &Engine, agent: &[u8]) -> i32 {
    guard("disconnect", || ok(engine.disconnect(agent)))
}

fn mem_type(raw: i32) -> Result<u32, Error> {
    u32::try_from(raw).map_err(|_| Error::InvalidParam(format!("invalid memory type {raw}")))
}

fn register_mem(
    engine: &Engine,
    addr: u64,
    len: u64,
    dev_id: u64,
    mem: i32,
    out_md: &mut u64,
) -> i32 {
    guard("registerMem", || {
        *out_md = engine.register_mem(addr, len, mem_type(mem)?, dev_id)?;
        Ok(Status::Success)
    })
}

fn deregister_mem(engine: &Engine, md: u64) -> i32 {
    guard("deregisterMem", || ok(engine.deregister_mem(md)))
}

fn get_public_data(engine: &Engine, md: u64, out: &mut Vec<u8>) -> i32 {
    guard("getPublicData", || {
        *out = engine.public_data(md)?;
        Ok(Status::Success)
    })
}

fn load_remote_md(
    engine: &Engine,
    addr: u64,
    len: u64,
    mem: i32,
    meta: &[u8],
    agent: &[u8],
    out_md: &mut u64,
) -> i32 {
    guard("loadRemoteMD", || {
        *out_md = engine.load_remote_md(addr, len, mem_type(mem)?, meta, agent)?;
        Ok(Status::Success)
    })
}

fn load_local_md(engine: &Engine, md: u64, out_md: &mut u64) -> i32 {
    guard("loadLocalMD", || {
        *out_md = engine.load_local_md(md)?;
        Ok(Status::Success)
    })
}

fn unload_md(engine: &Engine, md: u64) -> i32 {
    guard("unloadMD", || ok(engine.unload_md(md)))
}

/// Converts `list` into `out` (cleared first).
fn descs_into(list: &[ffi::XferDesc], out: &mut Vec<Desc>) {
    out.clear();
    out.extend(list.iter().map(|d| Desc {
        addr: d.addr,
        len: d.len,
        md: d.md,
    }));
}

/// Descriptors a thread's `prep_xfer` buffers keep room for between calls.
const PREP_DESCS_KEPT: usize = 64 << 10;

thread_local! {
    /// Per-thread buffers of `prep_xfer`, reused so that a prep of thousands
    /// of descriptors costs no fresh pages.
    static PREP_DESCS: std::cell::RefCell<(Vec<Desc>, Vec<Desc>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

fn prep_xfer(
    engine: &Engine,
    op: i32,
    local: &[ffi::XferDesc],
    remote: &[ffi::XferDesc],
    agent: &[u8],
    out_req: &mut u64,
) -> i32 {
    guard("prepXfer", || {
        let op = match op {
            0 => Op::Read,
            1 => Op::Write,
            other => {
                return Err(Error::InvalidParam(format!(
                    "unknown transfer operation {other}"
                )));
            }
        };
        *out_req = PREP_DESCS.with_borrow_mut(|(l, r)| {
            descs_into(local, l);
            descs_into(remote, r);
            let id = engine.prep_xfer(op, l, r, agent);
            for v in [l, r] {
                if v.capacity() > PREP_DESCS_KEPT {
                    *v = Vec::new(); // a rare huge prep: give its memory back
                }
            }
            id
        })?;
        Ok(Status::Success)
    })
}

fn post_xfer(engine: &Engine, req: u64, has_notif: bool, notif: &[u8]) -> i32 {
    guard("postXfer", || {
        engine.post_xfer(req, has_notif.then_some(notif))
    })
}

fn check_xfer(engine: &Engine, req: u64) -> i32 {
    guard("checkXfer", || engine.check_xfer(req))
}

fn release_req(engine: &Engine, req: u64) -> i32 {
    guard("releaseReqH", || ok(engine.release_req(req)))
}

fn get_notifs(engine: &Engine, out: &mut Vec<ffi::NotifOut>) -> i32 {
    guard("getNotifs", || {
        out.extend(
            engine
                .get_notifs()
                .into_iter()
                .map(|(agent, msg)| ffi::NotifOut {
                    agent: agent.as_bytes().to_vec(),
                    msg,
                }),
        );
        Ok(Status::Success)
    })
}

fn gen_notif(engine: &Engine, agent: &[u8], msg: &[u8]) -> i32 {
    guard("genNotif", || ok(engine.gen_notif(agent, msg)))
}
