//! The verbs library, loaded at run time, and safe owners of its objects.
//!
//! The library is `$NIXL_MOONCAKE_IBVERBS_LIB` when set, else
//! `libibverbs.so.1`, opened with `dlopen` (through `libloading`) at the
//! first RDMA use, never when the plugin loads: a host without rdma-core
//! runs the plugin over TCP, and `ldd` of the plugin names no verbs
//! library. The four data-path calls that `verbs.h` defines inline
//! (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`)
//! are made the way the header makes them, through `context->ops`; where
//! the header's macros redirect to another exported symbol we call that
//! symbol (`ibv_query_port` is the exported compat entry point,
//! `ibv_reg_mr_iova2` registers with relaxed ordering).
//!
//! Every object the library hands out is owned by one Rust value that
//! destroys it on drop ([`Context`], [`Pd`], [`Mr`], [`CompChannel`],
//! [`Cq`], [`Qp`]); children hold an `Arc` of their parent, so the
//! destruction order is the one the library requires. Almost all of the
//! transport's `unsafe` lives in this module.
//!
//! We declare the ABI ourselves ([`sys`]) rather than use a crate: the
//! maintained crates either link libibverbs at build time (`ibverbs`,
//! `rdma-sys`) or need cmake and clang to build a C shim
//! (`rdma-mummy-sys`).

pub mod sys;

#[cfg(test)]
mod tests;

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::Arc;

use crate::common::{Error, Result};
use crate::vendor_lib::VendorLib;

/// The environment variable that names another verbs library file (a fake
/// for tests, or an rdma-core outside the loader's search path).
pub const LIBRARY_ENV: &str = "NIXL_MOONCAKE_IBVERBS_LIB";

/// rdma-core's verbs library, found through the loader's search path.
pub const DEFAULT_LIBRARY: &str = "libibverbs.so.1";

/// Declares the table of entry points: field = "symbol" (args) -> ret.
macro_rules! entry_points {
    ($($field:ident = $symbol:literal ($($arg:ty),*) -> $ret:ty;)*) => {
        /// The verbs entry points we call, looked up by name (`dlsym` gives
        /// the default symbol version, the current ABI).
        pub struct Api {
            $(
                #[doc = concat!("`", $symbol, "`")]
                pub $field: unsafe extern "C" fn($($arg),*) -> $ret,
            )*
            /// `ibv_reg_mr_iova2` (rdma-core 24 and later; else `ibv_reg_mr`
            /// without relaxed ordering).
            pub reg_mr_iova2: Option<
                unsafe extern "C" fn(*mut sys::Pd, *mut c_void, usize, u64, c_uint) -> *mut sys::Mr,
            >,
            /// `ibv_reg_dmabuf_mr` (rdma-core 34 and later): registers a
            /// dmabuf, e.g. GPU memory the CUDA driver exported (GPUDirect
            /// RDMA).
            pub reg_dmabuf_mr: Option<
                unsafe extern "C" fn(*mut sys::Pd, u64, usize, u64, c_int, c_int) -> *mut sys::Mr,
            >,
            /// `_ibv_query_gid_ex` (rdma-core 32 and later): the GID's type
            /// and network device.
            pub query_gid_ex: Option<
                unsafe extern "C" fn(*mut sys::Context, u32, u32, *mut sys::GidEntry, u32, usize) -> c_int,
            >,
        }

        impl Api {
            fn load(lib: &libloading::Library) -> std::result::Result<Api, String> {
                Ok(Api {
                    $($field: {
                        // SAFETY: the function type is verbs.h's signature
                        // of this symbol; the pointer is used only while the
                        // library stays loaded (forever: kept in a static).
                        let f = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                                concat!($symbol, "\0").as_bytes(),
                            )
                        };
                        *f.map_err(|e| format!("it has no `{}`: {e}", $symbol))?
                    },)*
                    // SAFETY: as above, for the optional symbols.
                    reg_mr_iova2: unsafe { lib.get(b"ibv_reg_mr_iova2\0") }.ok().map(|f| *f),
                    // SAFETY: as above.
                    reg_dmabuf_mr: unsafe { lib.get(b"ibv_reg_dmabuf_mr\0") }.ok().map(|f| *f),
                    // SAFETY: as above.
                    query_gid_ex: unsafe { lib.get(b"_ibv_query_gid_ex\0") }.ok().map(|f| *f),
                })
            }
        }
    };
}

entry_points! {
    get_device_list = "ibv_get_device_list"(*mut c_int) -> *mut *mut sys::Device;
    free_device_list = "ibv_free_device_list"(*mut *mut sys::Device) -> ();
    get_device_name = "ibv_get_device_name"(*mut sys::Device) -> *const c_char;
    open_device = "ibv_open_device"(*mut sys::Device) -> *mut sys::Context;
    close_device = "ibv_close_device"(*mut sys::Context) -> c_int;
    query_device = "ibv_query_device"(*mut sys::Context, *mut sys::DeviceAttr) -> c_int;
    query_port = "ibv_query_port"(*mut sys::Context, u8, *mut sys::PortAttr) -> c_int;
    query_gid = "ibv_query_gid"(*mut sys::Context, u8, c_int, *mut sys::Gid) -> c_int;
    alloc_pd = "ibv_alloc_pd"(*mut sys::Context) -> *mut sys::Pd;
    dealloc_pd = "ibv_dealloc_pd"(*mut sys::Pd) -> c_int;
    reg_mr = "ibv_reg_mr"(*mut sys::Pd, *mut c_void, usize, c_int) -> *mut sys::Mr;
    dereg_mr = "ibv_dereg_mr"(*mut sys::Mr) -> c_int;
    create_comp_channel = "ibv_create_comp_channel"(*mut sys::Context) -> *mut sys::CompChannel;
    destroy_comp_channel = "ibv_destroy_comp_channel"(*mut sys::CompChannel) -> c_int;
    create_cq = "ibv_create_cq"(*mut sys::Context, c_int, *mut c_void, *mut sys::CompChannel, c_int) -> *mut sys::Cq;
    destroy_cq = "ibv_destroy_cq"(*mut sys::Cq) -> c_int;
    get_cq_event = "ibv_get_cq_event"(*mut sys::CompChannel, *mut *mut sys::Cq, *mut *mut c_void) -> c_int;
    ack_cq_events = "ibv_ack_cq_events"(*mut sys::Cq, c_uint) -> ();
    create_qp = "ibv_create_qp"(*mut sys::Pd, *mut sys::QpInitAttr) -> *mut sys::Qp;
    modify_qp = "ibv_modify_qp"(*mut sys::Qp, *mut sys::QpAttr, c_int) -> c_int;
    destroy_qp = "ibv_destroy_qp"(*mut sys::Qp) -> c_int;
    wc_status_str = "ibv_wc_status_str"(c_int) -> *const c_char;
}

/// The loaded library: its entry points and the file it came from.
pub struct Verbs {
    /// The entry points.
    pub api: Api,
    /// The file that was loaded.
    pub path: String,
    _lib: libloading::Library,
}

static VERBS: VendorLib<Verbs> = VendorLib::new(LIBRARY_ENV, DEFAULT_LIBRARY, "verbs");

/// Makes the library load from `path` instead of what the environment
/// says (for Rust tests, whose threads start before they could set it).
/// Returns false when it was loaded (or another path chosen) already.
pub fn use_library(path: &str) -> bool {
    VERBS.use_library(path)
}

/// The verbs library, loaded on the first call.
///
/// # Errors
/// [`Error::NotSupported`] saying why RDMA cannot be used here (no library,
/// a symbol missing). The outcome of the first call is kept.
pub fn verbs() -> Result<&'static Verbs> {
    // A test process loads only the fake, once a test chose it: engines of
    // other tests (protocol=auto) see a host without RDMA meanwhile.
    #[cfg(test)]
    if VERBS.get().is_none() && !VERBS.chosen() {
        return Err(Error::NotSupported(
            "RDMA is unavailable: no test chose the fake verbs library yet".into(),
        ));
    }
    VERBS
        .get_or_load(load)
        .as_ref()
        .map_err(|why| Error::NotSupported(format!("RDMA is unavailable: {why}")))
}

fn load(path: String, lib: libloading::Library) -> std::result::Result<Verbs, String> {
    let api = Api::load(&lib).map_err(|e| format!("{path} is not a usable verbs library: {e}"))?;
    log::info!("Mooncake: verbs library {path} loaded for RDMA");
    Ok(Verbs {
        api,
        path,
        _lib: lib,
    })
}

/// `errno` of the calling thread, as an `io::Error`.
fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// An error of verbs call `what`: the return code when it is an errno,
/// else the thread's errno.
fn call_error(what: &str, rc: c_int) -> Error {
    let why = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        last_os_error()
    };
    Error::Backend(format!("{what} failed: {why}"))
}

impl Verbs {
    /// The name of a work completion status (`ibv_wc_status_str`).
    pub fn status_str(&self, status: c_int) -> String {
        // SAFETY: returns a pointer to a static string for any value.
        let p = unsafe { (self.api.wc_status_str)(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: a static NUL-terminated string of the library.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        format!("{s} ({status})")
    }

    /// The devices the library sees, by name, with the pointer to open each.
    ///
    /// # Errors
    /// When the library cannot list devices (no kernel support counts as
    /// an empty list on most builds).
    pub fn devices(&'static self) -> Result<DeviceList> {
        let mut n: c_int = 0;
        // SAFETY: the out-pointer is a live local.
        let list = unsafe { (self.api.get_device_list)(&mut n) };
        if list.is_null() {
            return Err(Error::NotSupported(format!(
                "RDMA is unavailable: ibv_get_device_list failed: {}",
                last_os_error()
            )));
        }
        Ok(DeviceList {
            verbs: self,
            list,
            len: n.max(0) as usize,
        })
    }
}

/// The device list of `ibv_get_device_list`, freed on drop.
pub struct DeviceList {
    verbs: &'static Verbs,
    list: *mut *mut sys::Device,
    len: usize,
}

impl DeviceList {
    /// Number of devices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The name of device `i` (`ibv_get_device_name`).
    pub fn name(&self, i: usize) -> String {
        assert!(i < self.len);
        // SAFETY: `i` is inside the list the library returned, which stays
        // allocated until drop; the name is a string inside the device.
        unsafe {
            let dev = *self.list.add(i);
            let p = (self.verbs.api.get_device_name)(dev);
            if p.is_null() {
                return String::new();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }

    /// The sysfs directory of device `i` (`ibdev_path`).
    pub fn ibdev_path(&self, i: usize) -> String {
        assert!(i < self.len);
        // SAFETY: as in `name`; `ibdev_path` is a NUL-terminated array
        // inside the device struct.
        unsafe {
            let dev = *self.list.add(i);
            CStr::from_ptr((*dev).ibdev_path.as_ptr())
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Opens device `i`.
    ///
    /// # Errors
    /// When `ibv_open_device` fails.
    pub fn open(&self, i: usize) -> Result<Arc<Context>> {
        assert!(i < self.len);
        // SAFETY: a device of the live list; the context does not borrow
        // the list (devices live as long as the library).
        let ctx = unsafe { (self.verbs.api.open_device)(*self.list.add(i)) };
        if ctx.is_null() {
            return Err(call_error(&format!("ibv_open_device({})", self.name(i)), 0));
        }
        Ok(Arc::new(Context {
            verbs: self.verbs,
            ptr: ctx,
            name: self.name(i),
        }))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        unsafe { (self.verbs.api.free_device_list)(self.list) }
    }
}

/// An open device (`ibv_context`), closed on drop.
pub struct Context {
    verbs: &'static Verbs,
    ptr: *mut sys::Context,
    name: String,
}

// SAFETY: verbs objects may be used from any thread (the library locks
// internally; the data-path calls are thread-safe per the verbs contract).
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// The library.
    pub fn verbs(&self) -> &'static Verbs {
        self.verbs
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ibv_query_device`.
    ///
    /// # Errors
    /// When the query fails.
    pub fn query_device(&self) -> Result<sys::DeviceAttr> {
        // SAFETY: all-zero is a valid DeviceAttr (integers and arrays).
        let mut attr: sys::DeviceAttr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a live out-struct of the header's layout.
        let rc = unsafe { (self.verbs.api.query_device)(self.ptr, &mut attr) };
        if rc != 0 {
            return Err(call_error(&format!("ibv_query_device({})", self.name), rc));
        }
        Ok(attr)
    }

    /// `ibv_query_port` (the exported compat entry point, on a zeroed
    /// struct, as the header's inline does when there is no extended op).
    ///
    /// # Errors
    /// When the query fails.
    pub fn query_port(&self, port: u8) -> Result<sys::PortAttr> {
        let mut attr = sys::PortAttr::default();
        // SAFETY: a live context and a live, zeroed out-struct.
        let rc = unsafe { (self.verbs.api.query_port)(self.ptr, port, &mut attr) };
        if rc != 0 {
            return Err(call_error(
                &format!("ibv_query_port({}, {port})", self.name),
                rc,
            ));
        }
        Ok(attr)
    }

    /// GID table entry `index` of `port`: its GID, type and network device
    /// (`_ibv_query_gid_ex`), or only the GID (`ibv_query_gid`; type and
    /// device unknown) on an older library. `None` for an empty or invalid
    /// entry.
    pub fn query_gid(&self, port: u8, index: u32) -> Option<GidInfo> {
        if let Some(ex) = self.verbs.api.query_gid_ex {
            let mut e = sys::GidEntry::default();
            // SAFETY: a live context and a live out-struct whose size we pass.
            let rc = unsafe {
                ex(
                    self.ptr,
                    port as u32,
                    index,
                    &mut e,
                    0,
                    std::mem::size_of::<sys::GidEntry>(),
                )
            };
            if rc != 0 || e.gid == sys::Gid::default() {
                return None;
            }
            return Some(GidInfo {
                index,
                gid: e.gid,
                gid_type: Some(e.gid_type),
                ifindex: (e.ndev_ifindex != 0).then_some(e.ndev_ifindex),
            });
        }
        let mut gid = sys::Gid::default();
        // SAFETY: a live context and a live out-union.
        let rc = unsafe { (self.verbs.api.query_gid)(self.ptr, port, index as c_int, &mut gid) };
        (rc == 0 && gid != sys::Gid::default()).then_some(GidInfo {
            index,
            gid,
            gid_type: None,
            ifindex: None,
        })
    }

    /// A protection domain.
    ///
    /// # Errors
    /// When `ibv_alloc_pd` fails.
    pub fn alloc_pd(self: &Arc<Self>) -> Result<Arc<Pd>> {
        // SAFETY: a live context.
        let pd = unsafe { (self.verbs.api.alloc_pd)(self.ptr) };
        if pd.is_null() {
            return Err(call_error(&format!("ibv_alloc_pd({})", self.name), 0));
        }
        Ok(Arc::new(Pd {
            ctx: self.clone(),
            ptr: pd,
        }))
    }

    /// A completion channel (its fd becomes readable when an armed CQ gets
    /// a completion).
    ///
    /// # Errors
    /// When `ibv_create_comp_channel` fails.
    pub fn comp_channel(self: &Arc<Self>) -> Result<Arc<CompChannel>> {
        // SAFETY: a live context.
        let ch = unsafe { (self.verbs.api.create_comp_channel)(self.ptr) };
        if ch.is_null() {
            return Err(call_error(
                &format!("ibv_create_comp_channel({})", self.name),
                0,
            ));
        }
        Ok(Arc::new(CompChannel {
            ctx: self.clone(),
            ptr: ch,
        }))
    }

    /// A completion queue of at least `entries` entries, reporting to
    /// `channel` when armed.
    ///
    /// # Errors
    /// When `ibv_create_cq` fails.
    pub fn create_cq(
        self: &Arc<Self>,
        entries: usize,
        channel: Option<&Arc<CompChannel>>,
    ) -> Result<Arc<Cq>> {
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.ptr);
        let n = c_int::try_from(entries).unwrap_or(c_int::MAX);
        // SAFETY: a live context and channel (kept alive by the Cq).
        let cq = unsafe { (self.verbs.api.create_cq)(self.ptr, n, std::ptr::null_mut(), ch, 0) };
        if cq.is_null() {
            return Err(call_error(
                &format!("ibv_create_cq({}, {entries})", self.name),
                0,
            ));
        }
        Ok(Arc::new(Cq {
            ctx: self.clone(),
            channel: channel.cloned(),
            ptr: cq,
        }))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child holds an Arc of this context, so none is left.
        let rc = unsafe { (self.verbs.api.close_device)(self.ptr) };
        if rc != 0 {
            log::warn!("Mooncake: ibv_close_device({}) failed: {rc}", self.name);
        }
    }
}

/// One GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidInfo {
    /// Its index in the port's table.
    pub index: u32,
    /// The GID.
    pub gid: sys::Gid,
    /// `IBV_GID_TYPE_*` when the library reports it.
    pub gid_type: Option<u32>,
    /// The network device it belongs to (RoCE), when reported.
    pub ifindex: Option<u32>,
}

/// A protection domain, deallocated on drop.
pub struct Pd {
    ctx: Arc<Context>,
    ptr: *mut sys::Pd,
}

// SAFETY: see Context.
unsafe impl Send for Pd {}
// SAFETY: see Context.
unsafe impl Sync for Pd {}

impl Pd {
    /// The device.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Registers `[addr, addr + len)` with `access` (`IBV_ACCESS_*`):
    /// through `ibv_reg_mr_iova2` with the address as iova when the library
    /// has it (which honours relaxed ordering), else `ibv_reg_mr` without
    /// the optional flags.
    ///
    /// # Errors
    /// When the library refuses (too long, no memory, bad flags).
    ///
    /// # Safety
    /// The range must stay mapped until the region is dropped; with remote
    /// access flags, peers may write it whenever they hold the rkey.
    pub unsafe fn reg_mr(self: &Arc<Self>, addr: u64, len: usize, access: c_int) -> Result<Mr> {
        let api = &self.ctx.verbs.api;
        let ptr = match api.reg_mr_iova2 {
            // SAFETY: the caller keeps the range mapped; a live PD.
            Some(f) => unsafe { f(self.ptr, addr as *mut c_void, len, addr, access as c_uint) },
            None => {
                let plain = access & !sys::ACCESS_RELAXED_ORDERING;
                // SAFETY: as above.
                unsafe { (api.reg_mr)(self.ptr, addr as *mut c_void, len, plain) }
            }
        };
        if ptr.is_null() {
            return Err(call_error(
                &format!("ibv_reg_mr({}, {addr:#x}, {len} bytes)", self.ctx.name),
                0,
            ));
        }
        // SAFETY: a live MR the library just returned.
        Ok(unsafe { self.mr(ptr, addr, len) })
    }

    /// Our handle of `ptr`, an MR registered on this PD for addresses
    /// `[addr, addr + len)`.
    ///
    /// # Safety
    /// `ptr` is a live MR the library returned, owned by the result.
    unsafe fn mr(self: &Arc<Self>, ptr: *mut sys::Mr, addr: u64, len: usize) -> Mr {
        // SAFETY: a live MR (the caller's promise).
        let (lkey, rkey) = unsafe { ((*ptr).lkey, (*ptr).rkey) };
        Mr {
            pd: self.clone(),
            ptr,
            addr,
            len,
            lkey,
            rkey,
        }
    }

    /// Registers `len` bytes of dmabuf `fd` from byte `offset` on, as
    /// addresses `[iova, iova + len)` (`ibv_reg_dmabuf_mr`), with `access`
    /// (again without relaxed ordering when the kernel refuses the flag).
    /// The descriptor may be closed once this returned.
    ///
    /// # Errors
    /// When the library has no `ibv_reg_dmabuf_mr`, or refuses (a kernel or
    /// NIC without dmabuf support, a range past the buffer).
    ///
    /// # Safety
    /// The buffer must stay allocated until the region is dropped; with
    /// remote access flags, peers may write it whenever they hold the rkey.
    pub unsafe fn reg_dmabuf_mr(
        self: &Arc<Self>,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        access: c_int,
    ) -> Result<Mr> {
        let what = || {
            format!(
                "ibv_reg_dmabuf_mr({}, +{offset}, {len} bytes)",
                self.ctx.name
            )
        };
        let Some(f) = self.ctx.verbs.api.reg_dmabuf_mr else {
            return Err(Error::NotSupported(format!(
                "{}: the verbs library has no ibv_reg_dmabuf_mr",
                what()
            )));
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a live PD and descriptor; the caller keeps the buffer.
        let mut ptr = unsafe { f(self.ptr, offset, len, iova, fd.as_raw_fd(), access) };
        if ptr.is_null()
            && access & sys::ACCESS_RELAXED_ORDERING != 0
            && last_os_error().raw_os_error() == Some(libc::EINVAL)
        {
            let plain = access & !sys::ACCESS_RELAXED_ORDERING;
            // SAFETY: as above.
            ptr = unsafe { f(self.ptr, offset, len, iova, fd.as_raw_fd(), plain) };
        }
        if ptr.is_null() {
            return Err(call_error(&what(), 0));
        }
        // SAFETY: a live MR the library just returned.
        Ok(unsafe { self.mr(ptr, iova, len) })
    }

    /// An RC queue pair on `send_cq`/`recv_cq` with capacities `cap`
    /// (the library may raise them; the result says what it gave).
    ///
    /// # Errors
    /// When `ibv_create_qp` fails.
    pub fn create_rc_qp(
        self: &Arc<Self>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        cap: sys::QpCap,
    ) -> Result<Qp> {
        let mut init = sys::QpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: send_cq.ptr,
            recv_cq: recv_cq.ptr,
            srq: std::ptr::null_mut(),
            cap,
            qp_type: sys::QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a live PD and CQs (kept alive by the Qp), a live init attr.
        let qp = unsafe { (self.ctx.verbs.api.create_qp)(self.ptr, &mut init) };
        if qp.is_null() {
            return Err(call_error(
                &format!("ibv_create_qp({}, {cap:?})", self.ctx.name),
                0,
            ));
        }
        // SAFETY: a live QP the library returned.
        let qp_num = unsafe { (*qp).qp_num };
        Ok(Qp {
            pd: self.clone(),
            send_cq: send_cq.clone(),
            recv_cq: recv_cq.clone(),
            ptr: qp,
            qp_num,
            cap: init.cap,
        })
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc of it: none is left.
        let rc = unsafe { (self.ctx.verbs.api.dealloc_pd)(self.ptr) };
        if rc != 0 {
            log::warn!("Mooncake: ibv_dealloc_pd({}) failed: {rc}", self.ctx.name);
        }
    }
}

/// A registered memory region, deregistered on drop (after which a peer's
/// access with its rkey fails on the NIC).
pub struct Mr {
    pd: Arc<Pd>,
    ptr: *mut sys::Mr,
    /// First byte (also the iova peers address).
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// The key for local work requests.
    pub lkey: u32,
    /// The key peers use.
    pub rkey: u32,
}

// SAFETY: see Context.
unsafe impl Send for Mr {}
// SAFETY: see Context.
unsafe impl Sync for Mr {}

impl Mr {
    /// The protection domain.
    pub fn pd(&self) -> &Arc<Pd> {
        &self.pd
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: the MR is deregistered once; the caller drained the work
        // using it before dropping it (see the transport's registration).
        let rc = unsafe { (self.pd.ctx.verbs.api.dereg_mr)(self.ptr) };
        if rc != 0 {
            log::warn!(
                "Mooncake: ibv_dereg_mr({}, {:#x}) failed: {rc}",
                self.pd.ctx.name,
                self.addr
            );
        }
    }
}

/// A completion channel, destroyed on drop.
pub struct CompChannel {
    ctx: Arc<Context>,
    ptr: *mut sys::CompChannel,
}

// SAFETY: see Context.
unsafe impl Send for CompChannel {}
// SAFETY: see Context.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    /// The fd that becomes readable when an event is pending.
    pub fn fd(&self) -> c_int {
        // SAFETY: a live channel; `fd` is set at creation and never changes.
        unsafe { (*self.ptr).fd }
    }

    /// Takes one pending event (`ibv_get_cq_event`, blocking unless the fd
    /// was made non-blocking) and acknowledges it on `cq`. Returns false
    /// when none could be taken.
    pub fn take_event(&self, cq: &Cq) -> bool {
        let mut got: *mut sys::Cq = std::ptr::null_mut();
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: a live channel and live out-pointers.
        let rc = unsafe { (self.ctx.verbs.api.get_cq_event)(self.ptr, &mut got, &mut ctx) };
        if rc != 0 || got.is_null() {
            return false;
        }
        // The channel serves one CQ in this transport.
        debug_assert_eq!(got, cq.ptr);
        // SAFETY: a live CQ; one event acknowledged per event taken.
        unsafe { (self.ctx.verbs.api.ack_cq_events)(got, 1) };
        true
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ on it holds an Arc of it: none is left.
        let rc = unsafe { (self.ctx.verbs.api.destroy_comp_channel)(self.ptr) };
        if rc != 0 {
            log::warn!(
                "Mooncake: ibv_destroy_comp_channel({}) failed: {rc}",
                self.ctx.name
            );
        }
    }
}

/// A completion queue, destroyed on drop.
pub struct Cq {
    ctx: Arc<Context>,
    channel: Option<Arc<CompChannel>>,
    ptr: *mut sys::Cq,
}

// SAFETY: see Context.
unsafe impl Send for Cq {}
// SAFETY: see Context.
unsafe impl Sync for Cq {}

impl Cq {
    /// Its completion channel.
    pub fn channel(&self) -> Option<&Arc<CompChannel>> {
        self.channel.as_ref()
    }

    /// The number of entries the library gave it.
    pub fn entries(&self) -> usize {
        // SAFETY: a live CQ; `cqe` is set at creation.
        unsafe { (*self.ptr).cqe }.max(0) as usize
    }

    /// `ibv_poll_cq` into `out`: the number of completions written.
    ///
    /// # Errors
    /// When the poll fails (a CQ in error).
    pub fn poll(&self, out: &mut [sys::Wc]) -> Result<usize> {
        let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
        // SAFETY: the ops table of a live context; a live CQ; `out` has room
        // for `n` entries.
        let rc = unsafe {
            match (*self.ctx.ptr).ops.poll_cq {
                Some(f) => f(self.ptr, n, out.as_mut_ptr()),
                None => -1,
            }
        };
        if rc < 0 {
            return Err(Error::Backend(format!(
                "ibv_poll_cq({}) failed: {rc}",
                self.ctx.name
            )));
        }
        Ok(rc as usize)
    }

    /// `ibv_req_notify_cq`: the next completion signals the channel.
    ///
    /// # Errors
    /// When arming fails.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: the ops table of a live context; a live CQ.
        let rc = unsafe {
            match (*self.ctx.ptr).ops.req_notify_cq {
                Some(f) => f(self.ptr, 0),
                None => -1,
            }
        };
        if rc != 0 {
            return Err(call_error(
                &format!("ibv_req_notify_cq({})", self.ctx.name),
                rc,
            ));
        }
        Ok(())
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP on it holds an Arc of it; its events were acked.
        let rc = unsafe { (self.ctx.verbs.api.destroy_cq)(self.ptr) };
        if rc != 0 {
            log::warn!("Mooncake: ibv_destroy_cq({}) failed: {rc}", self.ctx.name);
        }
    }
}

/// A reliable-connected queue pair, destroyed on drop.
pub struct Qp {
    pd: Arc<Pd>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    ptr: *mut sys::Qp,
    /// Its number, as peers address it.
    pub qp_num: u32,
    /// The capacities the library gave it.
    pub cap: sys::QpCap,
}

// SAFETY: see Context.
unsafe impl Send for Qp {}
// SAFETY: see Context.
unsafe impl Sync for Qp {}

impl Qp {
    /// Its send completion queue.
    pub fn send_cq(&self) -> &Arc<Cq> {
        &self.send_cq
    }

    /// Its receive completion queue.
    pub fn recv_cq(&self) -> &Arc<Cq> {
        &self.recv_cq
    }

    /// `ibv_modify_qp` with the attributes of `mask`.
    ///
    /// # Errors
    /// When the library refuses the transition.
    pub fn modify(&self, attr: &sys::QpAttr, mask: c_int, what: &str) -> Result<()> {
        let mut attr = *attr;
        // SAFETY: a live QP and attr struct.
        let rc = unsafe { (self.pd.ctx.verbs.api.modify_qp)(self.ptr, &mut attr, mask) };
        if rc != 0 {
            return Err(call_error(
                &format!(
                    "ibv_modify_qp({}, qp {}, {what})",
                    self.pd.ctx.name, self.qp_num
                ),
                rc,
            ));
        }
        Ok(())
    }

    /// Posts the chain of send work requests starting at `wr`.
    ///
    /// # Errors
    /// When the library refuses one (queue full, bad state): the error and
    /// the refused work request (`bad_wr`; null when the library did not
    /// say). The ones before it in the chain were posted; from it on, none.
    ///
    /// # Safety
    /// The chain's `next` pointers and SGE lists must be valid for the
    /// call; the local memory they name must stay registered, and (except
    /// for inline sends) untouched, until the work completes.
    pub unsafe fn post_send(
        &self,
        wr: *mut sys::SendWr,
    ) -> std::result::Result<(), (Error, *mut sys::SendWr)> {
        let mut bad: *mut sys::SendWr = std::ptr::null_mut();
        // SAFETY: the ops table of a live context; the caller vouches for
        // the chain.
        let rc = unsafe {
            match (*self.pd.ctx.ptr).ops.post_send {
                Some(f) => f(self.ptr, wr, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            let e = call_error(&format!("ibv_post_send(qp {})", self.qp_num), rc);
            return Err((e, bad));
        }
        Ok(())
    }

    /// Posts the chain of receive work requests starting at `wr`.
    ///
    /// # Errors
    /// As [`Self::post_send`].
    ///
    /// # Safety
    /// The chain and its buffers must stay valid and registered until the
    /// receives complete.
    pub unsafe fn post_recv(&self, wr: &mut sys::RecvWr) -> Result<()> {
        let mut bad: *mut sys::RecvWr = std::ptr::null_mut();
        // SAFETY: as in post_send.
        let rc = unsafe {
            match (*self.pd.ctx.ptr).ops.post_recv {
                Some(f) => f(self.ptr, wr, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(call_error(
                &format!("ibv_post_recv(qp {})", self.qp_num),
                rc,
            ));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the owner moved it to ERR and drained it
        // before dropping (see the transport's endpoint).
        let rc = unsafe { (self.pd.ctx.verbs.api.destroy_qp)(self.ptr) };
        if rc != 0 {
            log::warn!(
                "Mooncake: ibv_destroy_qp({}, qp {}) failed: {rc}",
                self.pd.ctx.name,
                self.qp_num
            );
        }
    }
}
