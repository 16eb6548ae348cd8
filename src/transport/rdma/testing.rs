//! Test support: the fake verbs library of `tests/fakes/ibverbs`, built by
//! `scripts/build-fakes.sh` and made the verbs library of this test
//! process, with its test controls (byte counters, live objects, faults).
//!
//! Its devices are the default ones (`FAKE_IBV_DEVICES` unset): two RoCE
//! NICs, `fake_mlx5_0` (127.0.0.1) and `fake_mlx5_1` (127.0.0.2).

use std::ffi::{CString, c_char, c_int, c_uint};
use std::sync::OnceLock;

use parking_lot::{Mutex, MutexGuard};

/// Tests that inject faults into the (process-wide) fake, or that a fault
/// would disturb, hold this (a dropped link also shows as a port that is
/// down).
static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Runs the caller alone among the tests that take this.
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock()
}

/// The fake library's test controls.
pub struct FakeNic {
    bytes: unsafe extern "C" fn(*const c_char, c_int) -> u64,
    live_qps: unsafe extern "C" fn() -> c_int,
    live_mrs: unsafe extern "C" fn() -> c_int,
    live_dmabuf_mrs: unsafe extern "C" fn() -> c_int,
    refuse_dmabuf: unsafe extern "C" fn(c_int),
    refused_registrations: unsafe extern "C" fn() -> c_int,
    drop_link: unsafe extern "C" fn(*const c_char, c_int),
    corrupt_rkeys: unsafe extern "C" fn(c_uint),
    set_delay_us: unsafe extern "C" fn(c_uint),
    /// The library's path.
    pub path: String,
    _lib: libloading::Library,
}

static FAKE: OnceLock<FakeNic> = OnceLock::new();

/// The fake verbs library, built on first use and made the library of
/// this process (before anything loaded one).
pub fn fake() -> &'static FakeNic {
    FAKE.get_or_init(|| {
        let path = crate::common::fakes::fake_path("NIXL_MOONCAKE_IBVERBS_LIB");
        assert!(
            super::verbs::use_library(&path),
            "a verbs library was loaded before the fake was chosen"
        );
        // SAFETY: the fake has no initialisers with preconditions; it is
        // the same file (and so the same instance) the plugin loads.
        let lib = unsafe { libloading::Library::new(&path) }.expect("load the fake");
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the fake's exported test control of this name and
                // signature (tests/fakes/ibverbs/fake_ibverbs.c).
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.expect($name)
            };
        }
        FakeNic {
            bytes: sym!("fake_ibv_bytes"),
            live_qps: sym!("fake_ibv_live_qps"),
            live_mrs: sym!("fake_ibv_live_mrs"),
            live_dmabuf_mrs: sym!("fake_ibv_live_dmabuf_mrs"),
            refuse_dmabuf: sym!("fake_ibv_refuse_dmabuf"),
            refused_registrations: sym!("fake_ibv_refused_registrations"),
            drop_link: sym!("fake_ibv_drop_link"),
            corrupt_rkeys: sym!("fake_ibv_corrupt_rkeys"),
            set_delay_us: sym!("fake_ibv_set_delay_us"),
            path,
            _lib: lib,
        }
    })
}

impl FakeNic {
    /// Payload bytes device `dev` moved as initiator (`served` false) or
    /// target (true).
    pub fn bytes(&self, dev: &str, served: bool) -> u64 {
        let dev = CString::new(dev).unwrap();
        // SAFETY: a NUL-terminated name.
        unsafe { (self.bytes)(dev.as_ptr(), served as c_int) }
    }

    /// QPs not yet destroyed in this process.
    pub fn live_qps(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.live_qps)() }
    }

    /// MRs not yet deregistered in this process.
    pub fn live_mrs(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.live_mrs)() }
    }

    /// MRs of dmabufs (GPU memory) not yet deregistered in this process.
    pub fn live_dmabuf_mrs(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.live_dmabuf_mrs)() }
    }

    /// Makes `ibv_reg_dmabuf_mr` fail (as a NIC or kernel without dmabuf
    /// support) while `refuse` holds.
    pub fn refuse_dmabuf(&self, refuse: bool) {
        // SAFETY: plain value.
        unsafe { (self.refuse_dmabuf)(refuse as c_int) }
    }

    /// Memory registrations that failed in this process.
    pub fn refused_registrations(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.refused_registrations)() }
    }

    /// Cuts (or restores) every link of device `dev`.
    pub fn drop_link(&self, dev: &str, dropped: bool) {
        let dev = CString::new(dev).unwrap();
        // SAFETY: a NUL-terminated name.
        unsafe { (self.drop_link)(dev.as_ptr(), dropped as c_int) }
    }

    /// Every work request waits `us` before it executes.
    pub fn set_delay_us(&self, us: u32) {
        // SAFETY: plain value.
        unsafe { (self.set_delay_us)(us) }
    }

    /// The next `n` RDMA requests of this process carry a wrong rkey.
    pub fn corrupt_rkeys(&self, n: u32) {
        // SAFETY: plain value.
        unsafe { (self.corrupt_rkeys)(n) }
    }
}
