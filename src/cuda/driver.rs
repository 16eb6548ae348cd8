//! Loading the CUDA driver library and the table of its entry points.
//!
//! The library is `$NIXL_MOONCAKE_CUDA_LIB` when set, else `libcuda.so.1`,
//! opened with `dlopen` (through `libloading`) the first time GPU memory is
//! used, never when the plugin loads: a host without a GPU, or a process
//! that only lists memory types before it forks, never touches it. Every
//! entry point is looked up by its explicit versioned name (`_v2` where the
//! driver's ABI has one), so the ABI we call is the one we declare whatever
//! `cuda.h` a caller compiled against. A missing library or symbol, or a
//! failing `cuInit`, is an error with the reason, never a panic.
//!
//! We write our own loader rather than use `cudarc`, whose dynamic loading
//! panics when the library or a symbol is missing and takes no path.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

use crate::common::{Error, Result};
use crate::vendor_lib::VendorLib;

/// The environment variable that names another driver library file (a
/// fake for tests, or a driver outside the loader's search path).
pub const LIBRARY_ENV: &str = "NIXL_MOONCAKE_CUDA_LIB";

/// The driver's file name, found through the loader's search path.
pub const DEFAULT_LIBRARY: &str = "libcuda.so.1";

/// `CUresult`: 0 is success.
pub type CuResult = c_int;
/// `CUdevice`: a device ordinal.
pub type CuDevice = c_int;
/// `CUdeviceptr`: a device address (unified addressing).
pub type CuDevicePtr = u64;
/// `CUcontext`, `CUstream`, `CUevent`: opaque handles.
pub type Handle = *mut c_void;

/// `CUDA_SUCCESS`.
pub const SUCCESS: CuResult = 0;
/// `CUDA_ERROR_NOT_READY`: queued work has not finished yet.
pub const NOT_READY: CuResult = 600;
/// `CUDA_ERROR_NO_DEVICE`.
pub const NO_DEVICE: CuResult = 100;

/// `CU_STREAM_NON_BLOCKING`: no implicit synchronisation with the legacy
/// default stream (a caller's kernels never wait for our copies).
pub const STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_MEMHOSTALLOC_PORTABLE`: pinned host memory usable from every context.
pub const MEMHOSTALLOC_PORTABLE: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`: the cheapest event.
pub const EVENT_DISABLE_TIMING: c_uint = 2;

/// `CU_POINTER_ATTRIBUTE_*` values we query.
pub mod attr {

    /// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE` (a `CUmemorytype`, 4 bytes).
    pub const MEMORY_TYPE: i32 = 2;
    /// `CU_POINTER_ATTRIBUTE_BUFFER_ID` (8 bytes, unique per allocation).
    pub const BUFFER_ID: i32 = 7;
    /// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL` (4 bytes).
    pub const DEVICE_ORDINAL: i32 = 9;
    /// `CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE` (4 bytes).
    pub const IS_LEGACY_IPC_CAPABLE: i32 = 10;
    /// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR` (8 bytes).
    pub const RANGE_START: i32 = 11;
    /// `CU_POINTER_ATTRIBUTE_RANGE_SIZE` (8 bytes).
    pub const RANGE_SIZE: i32 = 12;
}

/// `CU_MEMORYTYPE_DEVICE`.
pub const MEMORYTYPE_DEVICE: u32 = 2;

/// Declares the table of required entry points: field, exported symbol,
/// argument types (all return `CUresult`).
macro_rules! entry_points {
    ($($field:ident = $symbol:literal ($($arg:ty),*);)*) => {
        /// The driver's entry points we call, looked up by versioned name.
        pub struct Api {
            $(
                #[doc = concat!("`", $symbol, "`")]
                pub $field: unsafe extern "C" fn($($arg),*) -> CuResult,
            )*
        }

        impl Api {
            fn load(lib: &libloading::Library) -> std::result::Result<Api, String> {
                Ok(Api {
                    $($field: {
                        // SAFETY: the function type is the driver API's
                        // signature of this exact (versioned) symbol on
                        // x86-64/aarch64 Linux; the pointer is copied out
                        // and used only while the library stays loaded
                        // (forever: the driver is kept in a static).
                        let f = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> CuResult>(
                                concat!($symbol, "\0").as_bytes(),
                            )
                        };
                        *f.map_err(|e| format!("it has no `{}`: {e}", $symbol))?
                    },)*
                })
            }
        }
    };
}

entry_points! {
    init = "cuInit"(c_uint);
    get_error_name = "cuGetErrorName"(CuResult, *mut *const c_char);
    device_get = "cuDeviceGet"(*mut CuDevice, c_int);
    device_get_count = "cuDeviceGetCount"(*mut c_int);
    primary_ctx_retain = "cuDevicePrimaryCtxRetain"(*mut Handle, CuDevice);
    ctx_get_current = "cuCtxGetCurrent"(*mut Handle);
    ctx_set_current = "cuCtxSetCurrent"(Handle);
    pointer_get_attributes = "cuPointerGetAttributes"(c_uint, *mut c_int, *mut *mut c_void, CuDevicePtr);
    stream_create = "cuStreamCreate"(*mut Handle, c_uint);
    stream_destroy = "cuStreamDestroy_v2"(Handle);
    stream_synchronize = "cuStreamSynchronize"(Handle);
    memcpy_async = "cuMemcpyAsync"(CuDevicePtr, CuDevicePtr, usize, Handle);
    event_create = "cuEventCreate"(*mut Handle, c_uint);
    event_record = "cuEventRecord"(Handle, Handle);
    event_synchronize = "cuEventSynchronize"(Handle);
    event_destroy = "cuEventDestroy_v2"(Handle);
    mem_host_alloc = "cuMemHostAlloc"(*mut *mut c_void, usize, c_uint);
    mem_free_host = "cuMemFreeHost"(*mut c_void);
}

/// `cuIpcGetMemHandle`.
type IpcGet = unsafe extern "C" fn(*mut IpcHandle, CuDevicePtr) -> CuResult;
/// `cuIpcOpenMemHandle_v2`.
type IpcOpen = unsafe extern "C" fn(*mut CuDevicePtr, IpcHandle, c_uint) -> CuResult;
/// `cuIpcCloseMemHandle`.
type IpcClose = unsafe extern "C" fn(CuDevicePtr) -> CuResult;

/// `CUipcMemHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcHandle {
    /// The handle's bytes.
    pub reserved: [u8; 64],
}

/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
pub const IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

/// The CUDA IPC entry points: optional (a driver without them, or with
/// IPC disabled, still serves GPU memory, only not across processes by IPC).
pub struct Ipc {
    /// `cuIpcGetMemHandle`.
    pub get_mem_handle: IpcGet,
    /// `cuIpcOpenMemHandle` (`_v2`).
    pub open_mem_handle: IpcOpen,
    /// `cuIpcCloseMemHandle`.
    pub close_mem_handle: IpcClose,
}

/// `CUmemGenericAllocationHandle`.
pub type MemHandle = u64;
/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`.
pub const HANDLE_TYPE_POSIX_FD: c_int = 1;
/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub const LOCATION_TYPE_DEVICE: c_int = 1;
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`.
pub const ACCESS_READWRITE: c_int = 3;

/// `CUmemAccessDesc`: who may access a mapped range, and how.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AccessDesc {
    /// `CUmemLocation.type`.
    pub location_type: c_int,
    /// `CUmemLocation.id` (the device ordinal).
    pub location_id: c_int,
    /// `CUmemAccess_flags`.
    pub flags: c_int,
}

/// `cuMemRetainAllocationHandle(handle*, addr)`.
type VmmRetain = unsafe extern "C" fn(*mut MemHandle, *mut c_void) -> CuResult;
/// `cuMemExportToShareableHandle(out, handle, type, flags)`.
type VmmExport = unsafe extern "C" fn(*mut c_void, MemHandle, c_int, u64) -> CuResult;
/// `cuMemImportFromShareableHandle(handle*, os handle, type)`.
type VmmImport = unsafe extern "C" fn(*mut MemHandle, *mut c_void, c_int) -> CuResult;
/// `cuMemRelease(handle)`.
type VmmRelease = unsafe extern "C" fn(MemHandle) -> CuResult;
/// `cuMemAddressReserve(ptr*, size, alignment, addr, flags)`.
type VmmReserve =
    unsafe extern "C" fn(*mut CuDevicePtr, usize, usize, CuDevicePtr, u64) -> CuResult;
/// `cuMemAddressFree(ptr, size)`.
type VmmFree = unsafe extern "C" fn(CuDevicePtr, usize) -> CuResult;
/// `cuMemMap(ptr, size, offset, handle, flags)`.
type VmmMap = unsafe extern "C" fn(CuDevicePtr, usize, usize, MemHandle, u64) -> CuResult;
/// `cuMemUnmap(ptr, size)`.
type VmmUnmap = unsafe extern "C" fn(CuDevicePtr, usize) -> CuResult;
/// `cuMemSetAccess(ptr, size, desc*, count)`.
type VmmSetAccess = unsafe extern "C" fn(CuDevicePtr, usize, *const AccessDesc, usize) -> CuResult;

/// The virtual memory management entry points used to share VMM memory
/// across processes by POSIX file descriptors: optional, like [`Ipc`].
pub struct Vmm {
    /// `cuMemRetainAllocationHandle(handle*, addr)`.
    pub retain: VmmRetain,
    /// `cuMemExportToShareableHandle(out, handle, type, flags)`.
    pub export: VmmExport,
    /// `cuMemImportFromShareableHandle(handle*, os handle, type)`.
    pub import: VmmImport,
    /// `cuMemRelease(handle)`.
    pub release: VmmRelease,
    /// `cuMemAddressReserve(ptr*, size, alignment, addr, flags)`.
    pub reserve: VmmReserve,
    /// `cuMemAddressFree(ptr, size)`.
    pub free: VmmFree,
    /// `cuMemMap(ptr, size, offset, handle, flags)`.
    pub map: VmmMap,
    /// `cuMemUnmap(ptr, size)`.
    pub unmap: VmmUnmap,
    /// `cuMemSetAccess(ptr, size, desc*, count)`.
    pub set_access: VmmSetAccess,
}

impl Vmm {
    fn load(lib: &libloading::Library) -> Option<Vmm> {
        let get = |name: &str| optional(lib, name, name);
        let (retain, export, import) = (
            get("cuMemRetainAllocationHandle")?,
            get("cuMemExportToShareableHandle")?,
            get("cuMemImportFromShareableHandle")?,
        );
        let (release, reserve, free) = (
            get("cuMemRelease")?,
            get("cuMemAddressReserve")?,
            get("cuMemAddressFree")?,
        );
        let (map, unmap, set_access) =
            (get("cuMemMap")?, get("cuMemUnmap")?, get("cuMemSetAccess")?);
        // SAFETY: the pointers are the driver's entry points of these names
        // for CUDA 12 (none has a versioned variant), whose signatures the
        // field types declare.
        unsafe {
            use std::mem::transmute as t;
            Some(Vmm {
                retain: t::<*mut c_void, VmmRetain>(retain),
                export: t::<*mut c_void, VmmExport>(export),
                import: t::<*mut c_void, VmmImport>(import),
                release: t::<*mut c_void, VmmRelease>(release),
                reserve: t::<*mut c_void, VmmReserve>(reserve),
                free: t::<*mut c_void, VmmFree>(free),
                map: t::<*mut c_void, VmmMap>(map),
                unmap: t::<*mut c_void, VmmUnmap>(unmap),
                set_access: t::<*mut c_void, VmmSetAccess>(set_access),
            })
        }
    }
}

/// `cuMemGetHandleForAddressRange(handle*, dptr, size, type, flags)`.
type RangeHandle = unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, c_int, u64) -> CuResult;
/// `cuDeviceGetAttribute(value*, attribute, device)`.
type DeviceAttribute = unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult;
/// `cuFlushGPUDirectRDMAWrites(target, scope)`.
type FlushRdmaWrites = unsafe extern "C" fn(c_int, c_int) -> CuResult;

/// `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`.
pub const RANGE_HANDLE_DMA_BUF_FD: c_int = 1;
/// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
pub const ATTRIBUTE_DMA_BUF_SUPPORTED: c_int = 124;
/// `CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING` (a
/// `CUGPUDirectRDMAWritesOrdering`: 0 none, 100 owner, 200 all devices).
pub const ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING: c_int = 118;
/// `CU_GPU_DIRECT_RDMA_WRITES_ORDERING_OWNER`.
pub const ORDERING_OWNER: c_int = 100;
/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX`.
pub const FLUSH_TARGET_CURRENT_CTX: c_int = 0;
/// `CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER`.
pub const FLUSH_TO_OWNER: c_int = 100;

/// The entry points for GPUDirect RDMA (a NIC reading and writing GPU
/// memory): optional, like [`Ipc`] (`cuMemGetHandleForAddressRange` came
/// with CUDA 11.7, `cuFlushGPUDirectRDMAWrites` with 11.3).
pub struct Gdr {
    /// `cuMemGetHandleForAddressRange(handle*, dptr, size, type, flags)`.
    pub range_handle: RangeHandle,
    /// `cuDeviceGetAttribute(value*, attribute, device)`.
    pub device_attribute: DeviceAttribute,
    /// `cuFlushGPUDirectRDMAWrites(target, scope)`, when the driver has it.
    pub flush: Option<FlushRdmaWrites>,
}

impl Gdr {
    fn load(lib: &libloading::Library) -> Option<Gdr> {
        let get = |name: &str| optional(lib, name, name);
        let range_handle = get("cuMemGetHandleForAddressRange")?;
        let device_attribute = get("cuDeviceGetAttribute")?;
        let flush = get("cuFlushGPUDirectRDMAWrites");
        // SAFETY: the pointers are the driver's entry points of these names
        // for CUDA 12 (none has a versioned variant), whose signatures the
        // field types declare.
        unsafe {
            use std::mem::transmute as t;
            Some(Gdr {
                range_handle: t::<*mut c_void, RangeHandle>(range_handle),
                device_attribute: t::<*mut c_void, DeviceAttribute>(device_attribute),
                flush: flush.map(|f| t::<*mut c_void, FlushRdmaWrites>(f)),
            })
        }
    }
}

/// The CUDA version whose entry points `cuGetProcAddress` is asked for.
const PROC_VERSION: c_int = 12000;

/// `cuGetProcAddress_v2`.
type GetProcAddress =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;

/// Looks up optional entry point `name` (its base name, without version
/// suffix): through `cuGetProcAddress_v2` when the driver has it (which
/// picks the version for CUDA 12), else by the versioned exported symbol
/// `exported`. `None` when neither has it.
fn optional(lib: &libloading::Library, name: &str, exported: &str) -> Option<*mut c_void> {
    // SAFETY: the type is the signature of `cuGetProcAddress_v2` (CUDA 12).
    let gpa = unsafe { lib.get::<GetProcAddress>(b"cuGetProcAddress_v2\0") };
    if let Ok(gpa) = gpa {
        let cname = std::ffi::CString::new(name).ok()?;
        let (mut p, mut status): (*mut c_void, c_int) = (std::ptr::null_mut(), 0);
        // SAFETY: a NUL-terminated name and live out-pointers; the driver
        // only writes them.
        let rc = unsafe { gpa(cname.as_ptr(), &mut p, PROC_VERSION, 0, &mut status) };
        if rc == SUCCESS && status == 0 && !p.is_null() {
            return Some(p);
        }
    }
    let sym = format!("{exported}\0");
    // SAFETY: only the address is taken; the caller gives it its type.
    let f = unsafe { lib.get::<*mut c_void>(sym.as_bytes()) }.ok()?;
    let p = *f;
    (!p.is_null()).then_some(p)
}

impl Ipc {
    fn load(lib: &libloading::Library) -> Option<Ipc> {
        let get = optional(lib, "cuIpcGetMemHandle", "cuIpcGetMemHandle")?;
        let open = optional(lib, "cuIpcOpenMemHandle", "cuIpcOpenMemHandle_v2")?;
        let close = optional(lib, "cuIpcCloseMemHandle", "cuIpcCloseMemHandle")?;
        // SAFETY: the pointers are the driver's entry points of these names
        // for CUDA 12, whose signatures the field types declare.
        unsafe {
            Some(Ipc {
                get_mem_handle: std::mem::transmute::<*mut c_void, IpcGet>(get),
                open_mem_handle: std::mem::transmute::<*mut c_void, IpcOpen>(open),
                close_mem_handle: std::mem::transmute::<*mut c_void, IpcClose>(close),
            })
        }
    }
}

/// The loaded driver: the library (kept loaded for the life of the
/// process) and its entry points.
pub struct Driver {
    /// The entry points.
    pub api: Api,
    /// The IPC entry points, when the driver has them.
    pub ipc: Option<Ipc>,
    /// The VMM sharing entry points, when the driver has them.
    pub vmm: Option<Vmm>,
    /// The GPUDirect RDMA entry points, when the driver has them.
    pub gdr: Option<Gdr>,
    /// Number of devices `cuDeviceGetCount` reported.
    pub devices: i32,
    /// The file that was loaded.
    pub path: String,
    _lib: libloading::Library,
}

static DRIVER: VendorLib<Driver> = VendorLib::new(LIBRARY_ENV, DEFAULT_LIBRARY, "CUDA driver");

/// Makes the driver load from `path` instead of what the environment says,
/// for harnesses that cannot set the environment before their threads
/// start (Rust tests). Returns false when the driver was loaded (or
/// another path chosen) already.
pub fn use_library(path: &str) -> bool {
    DRIVER.use_library(path)
}

/// The driver, loaded and initialised (`cuInit`) on the first call.
///
/// # Errors
/// [`Error::NotSupported`] saying why GPU memory cannot be used here: no
/// library, a symbol missing, or `cuInit` failing (no device). The outcome
/// of the first call is kept: later calls give the same answer.
pub fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_load(load)
        .as_ref()
        .map_err(|why| Error::NotSupported(format!("GPU memory is unavailable: {why}")))
}

/// True once the driver was loaded successfully (never loads it).
pub fn loaded() -> bool {
    matches!(DRIVER.get(), Some(Ok(_)))
}

fn load(path: String, lib: libloading::Library) -> std::result::Result<Driver, String> {
    let api = Api::load(&lib).map_err(|e| format!("{path} is not a usable CUDA driver: {e}"))?;
    let ipc = Ipc::load(&lib);
    let vmm = Vmm::load(&lib);
    let gdr = Gdr::load(&lib);
    let mut driver = Driver {
        api,
        ipc,
        vmm,
        gdr,
        devices: 0,
        path,
        _lib: lib,
    };
    // SAFETY: cuInit takes flags by value (0 is the only valid value).
    let rc = unsafe { (driver.api.init)(0) };
    if rc != SUCCESS {
        return Err(format!(
            "cuInit failed in {}: {}",
            driver.path,
            driver.describe(rc)
        ));
    }
    let mut n = 0;
    // SAFETY: the out-pointer is a live local.
    let rc = unsafe { (driver.api.device_get_count)(&mut n) };
    if rc != SUCCESS || n <= 0 {
        return Err(format!(
            "the CUDA driver {} reports no device ({})",
            driver.path,
            driver.describe(rc)
        ));
    }
    driver.devices = n;
    log::info!(
        "CUDA driver {} loaded: {n} device(s) for GPU memory",
        driver.path
    );
    Ok(driver)
}

impl Driver {
    /// `NAME (code)` of a driver result, e.g. `CUDA_ERROR_ILLEGAL_ADDRESS (700)`.
    pub fn describe(&self, rc: CuResult) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: the out-pointer is a live local; on success the driver
        // stores a pointer to a static NUL-terminated string.
        let ok = unsafe { (self.api.get_error_name)(rc, &mut name) } == SUCCESS;
        if ok && !name.is_null() {
            // SAFETY: see above: a static C string owned by the driver.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
            format!("{name} ({rc})")
        } else {
            format!("CUDA error {rc}")
        }
    }

    /// `Ok` for success, else [`Error::Backend`] saying which call failed
    /// (`what`) and with what driver error.
    ///
    /// # Errors
    /// As above.
    pub fn check(&self, rc: CuResult, what: &str) -> Result<()> {
        if rc == SUCCESS {
            Ok(())
        } else {
            Err(Error::Backend(format!(
                "{what} failed: {}",
                self.describe(rc)
            )))
        }
    }
}
