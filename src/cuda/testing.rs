//! Test support: the fake CUDA driver of `tests/fakes/cuda`, built by
//! `scripts/build-fakes.sh` and selected for this test process, with the
//! calls a test needs to make and inspect "device" memory.
//!
//! Device memory of the fake faults on any CPU access, as a GPU's does; tests
//! fill and check it through the fake's shadow mapping
//! ([`FakeGpu::read`], [`FakeGpu::write`]), never the code under test.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use parking_lot::{Mutex, MutexGuard};

use super::driver::{self as api, CuDevice, CuDevicePtr, CuResult, Handle, MemHandle};

/// `CUmemAllocationProp` (32 bytes), for `cuMemCreate`.
#[repr(C)]
struct AllocProp {
    kind: c_int,
    handle_types: c_int,
    location_type: c_int,
    location_id: c_int,
    win32: *mut c_void,
    flags: [u8; 8],
}

/// The fake driver's calls used by tests.
pub struct FakeGpu {
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut Handle, CuDevice) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(Handle) -> CuResult,
    mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    shadow: unsafe extern "C" fn(CuDevicePtr) -> *mut c_void,
    set_copy_delay_us: unsafe extern "C" fn(c_uint),
    fail_after_copies: unsafe extern "C" fn(std::ffi::c_long, c_int),
    rdma_flushes: unsafe extern "C" fn() -> u64,
    refuse_dmabuf: unsafe extern "C" fn(c_int),
    pause_streams: unsafe extern "C" fn(c_int),
    copies: unsafe extern "C" fn() -> u64,
    pending_copies: unsafe extern "C" fn() -> u64,
    live_streams: unsafe extern "C" fn() -> u64,
    live_vmm_imports: unsafe extern "C" fn() -> u64,
    mem_create: unsafe extern "C" fn(*mut MemHandle, usize, *const AllocProp, u64) -> CuResult,
    /// Serialises tests that change the fake's global knobs (delay, pause).
    exclusive: Mutex<()>,
    _lib: libloading::Library,
}

static FAKE: OnceLock<FakeGpu> = OnceLock::new();

/// The fake driver, built on first use and made the driver of this process
/// (before anything loaded a driver).
pub fn fake() -> &'static FakeGpu {
    FAKE.get_or_init(|| {
        let path = crate::common::fakes::fake_path("NIXL_MOONCAKE_CUDA_LIB");
        assert!(
            super::use_library(&path),
            "a CUDA driver was loaded before the fake was chosen"
        );
        // SAFETY: the fake has no initialisers with preconditions.
        let lib = unsafe { libloading::Library::new(&path) }.expect("the fake loads");
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the types are the fake's (the driver API's)
                // signatures; the library stays loaded in the static.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .expect(concat!("the fake exports ", $name))
            };
        }
        FakeGpu {
            device_get: sym!("cuDeviceGet"),
            primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            ctx_set_current: sym!("cuCtxSetCurrent"),
            mem_alloc: sym!("cuMemAlloc_v2"),
            mem_free: sym!("cuMemFree_v2"),
            shadow: sym!("fake_cuda_shadow"),
            set_copy_delay_us: sym!("fake_cuda_set_copy_delay_us"),
            fail_after_copies: sym!("fake_cuda_fail_after_copies"),
            rdma_flushes: sym!("fake_cuda_rdma_flushes"),
            refuse_dmabuf: sym!("fake_cuda_refuse_dmabuf"),
            pause_streams: sym!("fake_cuda_pause_streams"),
            copies: sym!("fake_cuda_copies"),
            pending_copies: sym!("fake_cuda_pending_copies"),
            live_streams: sym!("fake_cuda_live_streams"),
            live_vmm_imports: sym!("fake_cuda_live_vmm_imports"),
            mem_create: sym!("cuMemCreate"),
            exclusive: Mutex::new(()),
            _lib: lib,
        }
    })
}

fn ok(rc: CuResult, what: &str) {
    assert_eq!(rc, 0, "{what} failed on the fake driver");
}

impl FakeGpu {
    /// Holds the fake's global knobs (delay, pause) and counters (pending
    /// copies) for one test.
    pub fn exclusive(&self) -> MutexGuard<'_, ()> {
        self.exclusive.lock()
    }

    /// Makes device `ordinal`'s primary context current on this thread.
    fn enter(&self, ordinal: i32) {
        super::driver().expect("the fake driver initialises");
        let (mut dev, mut ctx) = (0, std::ptr::null_mut());
        // SAFETY: out-pointers are live locals.
        unsafe {
            ok((self.device_get)(&mut dev, ordinal), "cuDeviceGet");
            ok(
                (self.primary_ctx_retain)(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            );
            ok((self.ctx_set_current)(ctx), "cuCtxSetCurrent");
        }
    }

    /// Allocates `len` bytes of memory of device `ordinal`.
    pub fn alloc(&self, ordinal: i32, len: usize) -> DeviceBuffer {
        self.enter(ordinal);
        let mut ptr = 0;
        // SAFETY: the out-pointer is a live local; a context is current.
        ok(unsafe { (self.mem_alloc)(&mut ptr, len) }, "cuMemAlloc_v2");
        DeviceBuffer { ptr, len }
    }

    /// Allocates `chunks` VMM chunks of `chunk` bytes each (a multiple of
    /// 2 MiB) on device `ordinal`, mapped side by side and accessible by
    /// that device; `shareable`: created with the POSIX file descriptor
    /// handle type (so they can be exported).
    pub fn alloc_vmm(
        &self,
        ordinal: i32,
        chunk: usize,
        chunks: usize,
        shareable: bool,
    ) -> VmmBuffer {
        self.enter(ordinal);
        let vmm = super::driver()
            .expect("the fake")
            .vmm
            .as_ref()
            .expect("VMM calls");
        let prop = AllocProp {
            kind: 1, // CU_MEM_ALLOCATION_TYPE_PINNED
            handle_types: if shareable {
                api::HANDLE_TYPE_POSIX_FD
            } else {
                0
            },
            location_type: api::LOCATION_TYPE_DEVICE,
            location_id: ordinal,
            win32: std::ptr::null_mut(),
            flags: [0; 8],
        };
        let len = chunk * chunks;
        let mut ptr = 0;
        // SAFETY: live out-pointers and property struct; the calls make,
        // map and open our own fresh memory.
        unsafe {
            ok((vmm.reserve)(&mut ptr, len, 0, 0, 0), "cuMemAddressReserve");
            for i in 0..chunks {
                let mut h = 0;
                ok((self.mem_create)(&mut h, chunk, &prop, 0), "cuMemCreate");
                ok(
                    (vmm.map)(ptr + (i * chunk) as u64, chunk, 0, h, 0),
                    "cuMemMap",
                );
                ok((vmm.release)(h), "cuMemRelease"); // the mapping holds it
            }
            let access = api::AccessDesc {
                location_type: api::LOCATION_TYPE_DEVICE,
                location_id: ordinal,
                flags: api::ACCESS_READWRITE,
            };
            ok((vmm.set_access)(ptr, len, &access, 1), "cuMemSetAccess");
        }
        VmmBuffer { ptr, len }
    }

    /// Mappings of VMM chunks imported from another process (or from a
    /// descriptor of ours) alive now.
    pub fn live_vmm_imports(&self) -> u64 {
        // SAFETY: a plain getter of the fake.
        unsafe { (self.live_vmm_imports)() }
    }

    fn shadow_of(&self, ptr: u64, len: usize) -> *mut u8 {
        // SAFETY: the fake returns the CPU view of its own allocation.
        let s = unsafe { (self.shadow)(ptr) }.cast::<u8>();
        assert!(
            !s.is_null() && len > 0,
            "{ptr:#x} is not fake device memory"
        );
        s
    }

    /// A copy of `len` bytes of device memory at `ptr`.
    pub fn read(&self, ptr: u64, len: usize) -> Vec<u8> {
        let s = self.shadow_of(ptr, len);
        // SAFETY: the shadow maps the allocation containing `ptr`, which the
        // test keeps alive and which is at least `len` bytes past it.
        unsafe { std::slice::from_raw_parts(s, len) }.to_vec()
    }

    /// Writes `data` into device memory at `ptr`.
    pub fn write(&self, ptr: u64, data: &[u8]) {
        let s = self.shadow_of(ptr, data.len());
        // SAFETY: as in `read`; no copy of ours runs on it meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), s, data.len()) };
    }

    /// Makes every asynchronous copy wait `us` microseconds first.
    pub fn set_copy_delay_us(&self, us: u32) {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.set_copy_delay_us)(us) }
    }

    /// After `n` more successful copies the next one fails with CUDA error
    /// `error` (one-shot; errors 700..799 are sticky on the context, as on
    /// the real driver). Disarmed when the guard is dropped.
    pub fn fail_after_copies(&'static self, n: i64, error: i32) -> Armed {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.fail_after_copies)(n as std::ffi::c_long, error) };
        Armed(self)
    }

    /// `cuFlushGPUDirectRDMAWrites` calls so far.
    pub fn rdma_flushes(&self) -> u64 {
        // SAFETY: a plain getter of the fake.
        unsafe { (self.rdma_flushes)() }
    }

    /// Makes dmabuf exports fail (as on a driver without dmabuf support)
    /// while the guard lives.
    pub fn refuse_dmabuf(&'static self) -> NoDmabuf {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.refuse_dmabuf)(1) };
        NoDmabuf(self)
    }

    /// While the guard lives, no stream starts another operation (dropping
    /// it resumes them, also when a test fails).
    pub fn pause_streams(&'static self) -> Paused {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.pause_streams)(1) };
        Paused(self)
    }

    /// Copies the fake has completed so far.
    pub fn copies(&self) -> u64 {
        // SAFETY: a plain getter of the fake.
        unsafe { (self.copies)() }
    }

    /// Asynchronous copies queued and not yet run.
    pub fn pending_copies(&self) -> u64 {
        // SAFETY: a plain getter of the fake.
        unsafe { (self.pending_copies)() }
    }

    /// Streams alive now.
    pub fn live_streams(&self) -> u64 {
        // SAFETY: a plain getter of the fake.
        unsafe { (self.live_streams)() }
    }
}

/// Streams paused until dropped (see [`FakeGpu::pause_streams`]).
pub struct Paused(&'static FakeGpu);

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.0.pause_streams)(0) }
    }
}

/// Dmabuf exports refused until dropped (see [`FakeGpu::refuse_dmabuf`]).
pub struct NoDmabuf(&'static FakeGpu);

impl Drop for NoDmabuf {
    fn drop(&mut self) {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.0.refuse_dmabuf)(0) }
    }
}

/// An injected copy failure, disarmed when dropped (see
/// [`FakeGpu::fail_after_copies`]).
pub struct Armed(&'static FakeGpu);

impl Drop for Armed {
    fn drop(&mut self) {
        // SAFETY: a plain setter of the fake.
        unsafe { (self.0.fail_after_copies)(-1, 0) }
    }
}

/// Device memory of the fake; freed on drop.
pub struct DeviceBuffer {
    /// The device address.
    pub ptr: u64,
    /// Its length.
    pub len: usize,
}

/// VMM chunks of the fake mapped side by side; unmapped and freed on drop.
pub struct VmmBuffer {
    /// The device address of the first chunk.
    pub ptr: u64,
    /// The length of all chunks.
    pub len: usize,
}

impl Drop for VmmBuffer {
    fn drop(&mut self) {
        let vmm = super::driver()
            .expect("the fake")
            .vmm
            .as_ref()
            .expect("VMM calls");
        // SAFETY: our own mappings and reservation, undone once.
        unsafe {
            ok((vmm.unmap)(self.ptr, self.len), "cuMemUnmap");
            ok((vmm.free)(self.ptr, self.len), "cuMemAddressFree");
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: our own allocation, freed once; frees need no context.
        let rc = unsafe { (fake().mem_free)(self.ptr) };
        ok(rc, "cuMemFree_v2");
    }
}
