/*
 * fake_cuda.c - a FAKE of the NVIDIA CUDA driver library (libcuda.so.1) for
 * tests on machines without a GPU.
 *
 * It exports the real driver API names with the real x86-64 Linux ABI
 * (CUresult = int, CUdevice = int, CUdeviceptr = unsigned long long, opaque
 * context/stream/event pointers, CUipcMemHandle = 64 bytes passed by value,
 * the CUDA 12 struct layouts of the VMM API) and the real numeric values of
 * enums and error codes, so a harness written against the real driver (the
 * plugin through dlopen(NIXL_MOONCAKE_CUDA_LIB), Python through ctypes, C
 * programs) runs on it unchanged. No cuda.h is needed: the types are declared
 * below.
 *
 * What is modelled
 *  - Devices: FAKE_CUDA_DEVICES of them (default 2), "Fake GPU <n>", 80 GiB,
 *    unified addressing. Before a successful cuInit every call except cuInit,
 *    cuDriverGetVersion, cuGetErrorName/String and cuGetProcAddress* returns
 *    CUDA_ERROR_NOT_INITIALIZED.
 *  - Contexts: one primary context per device (retain/release refcounted;
 *    when the count drops to zero, or on cuDevicePrimaryCtxReset_v2, its
 *    streams, cuMemAlloc memory, IPC imports and pinned host memory are
 *    destroyed and its sticky error is cleared). The current context is per
 *    thread (a stack: cuCtxSetCurrent/Push/Pop). Calls that need a context
 *    (allocation, streams, events, copies, IPC, cuMemCreate/cuMemMap,
 *    cuMemGetAddressRange, pinned host memory) return
 *    CUDA_ERROR_INVALID_CONTEXT (201) on a thread without one, and
 *    CUDA_ERROR_CONTEXT_IS_DESTROYED (709) when the thread's current primary
 *    context has been released to zero. Frees, destroys and pointer attribute
 *    queries need no context.
 *  - Device memory: every cuMemAlloc_v2 allocation is a memfd (named
 *    "fake-cuda:<buffer id>:<ordinal>:<handle types>", size rounded up to the
 *    page size) mapped twice: PROT_NONE at the "device address" handed to the
 *    caller, so ANY CPU access to a device pointer dies with SIGSEGV as on a
 *    real GPU, and read-write at a hidden "shadow" address through which the
 *    fake copies. A table of regions (device allocations, IPC imports, VMM
 *    mappings, pinned/registered host ranges) is kept under a rwlock; copies
 *    hold it for reading while they run, so freeing/unmapping waits for them.
 *    Freed device ranges are replaced by anonymous PROT_NONE mappings and kept
 *    (a ring of 1024) so a stale device pointer still faults and is never
 *    reused for host memory. Pointers the fake does not own are host memory
 *    and are read/written directly.
 *  - Copies: synchronous copies (cuMemcpy, cuMemcpy{HtoD,DtoH,DtoD}_v2,
 *    cuMemsetD8_v2) first wait for the legacy NULL stream and the blocking
 *    streams of the context, then run before returning; a range that crosses
 *    the end of an allocation (or touches freed/unmapped device addresses, or
 *    VMM memory without cuMemSetAccess) gives CUDA_ERROR_INVALID_VALUE.
 *    Asynchronous copies are only queued; the stream's worker thread runs
 *    them later, in FIFO order; a bad range then sets the context's STICKY
 *    error CUDA_ERROR_ILLEGAL_ADDRESS (700), returned afterwards by
 *    cuEventQuery/Synchronize, cuStreamQuery/Synchronize, cuCtxSynchronize
 *    and every call that needs the context, until the primary context is
 *    reset or released to zero. Copies spanning adjacent VMM chunks of one
 *    reservation are allowed, as on the real driver.
 *  - Streams: one worker thread per stream (and one for each context's NULL
 *    stream, also used for CU_STREAM_LEGACY (1) and CU_STREAM_PER_THREAD (2)).
 *    Legacy default stream semantics: work on the NULL stream waits for prior
 *    work of blocking streams and vice versa (CU_STREAM_NON_BLOCKING = 1
 *    opts out). cuStreamDestroy_v2 waits for the stream's queued work and
 *    joins the worker. Workers block all signals; workers of live streams at
 *    process exit are simply abandoned.
 *  - Events: cuEventRecord is queued; the event completes when the worker
 *    reaches it. A never-recorded event is complete. cuStreamWaitEvent works.
 *  - Pointer attributes (cuPointerGetAttribute(s)): real attribute numbers
 *    1-4, 6-16. For memory the fake does not own cuPointerGetAttributes
 *    succeeds and zero-fills (DEVICE_ORDINAL = -2) while cuPointerGetAttribute
 *    returns CUDA_ERROR_INVALID_VALUE, as the real driver.
 *  - Legacy IPC: the 64-byte handle carries a magic, the exporter's pid and
 *    memfd number, size, buffer id and ordinal. cuIpcOpenMemHandle_v2 takes
 *    the memfd from the exporter with pidfd_open + pidfd_getfd (needs ptrace
 *    rights over the exporter), checks the memfd's name against the buffer
 *    id, and maps it (PROT_NONE + shadow). Opening it again in the same
 *    process returns the same pointer (refcounted); a handle of the same
 *    process gives CUDA_ERROR_INVALID_CONTEXT; a dead exporter or an fd that
 *    cannot be taken gives CUDA_ERROR_INVALID_HANDLE.
 *  - VMM: granularity 2 MiB; cuMemCreate makes a memfd; cuMemAddressReserve
 *    reserves PROT_NONE address space; cuMemMap maps the memfd there
 *    (MAP_FIXED) plus a shadow; cuMemSetAccess must be called before copies;
 *    cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR) returns a dup of the
 *    memfd, cuMemImportFromShareableHandle dups the caller's fd. The buffer id
 *    travels in the memfd's name, so importer and exporter see the same
 *    CU_POINTER_ATTRIBUTE_BUFFER_ID. FABRIC and Win32 handles: NOT_SUPPORTED.
 *  - GPUDirect RDMA: CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED (124) is 1;
 *    cuMemGetHandleForAddressRange(DMA_BUF_FD) gives a new descriptor of the
 *    cuMemAlloc allocation's memfd (owned by the caller) for a range that
 *    starts at the allocation's base, page-aligned in size, within it (the
 *    fake's limit: a real dmabuf may start anywhere page-aligned); other
 *    ranges, VMM memory and flags other than 0: CUDA_ERROR_INVALID_VALUE /
 *    NOT_SUPPORTED; while FAKE_CUDA_NO_DMABUF is set or
 *    fake_cuda_refuse_dmabuf(1) holds: NOT_SUPPORTED. A NIC
 *    fake (tests/fakes/ibverbs) maps it with ibv_reg_dmabuf_mr.
 *    cuFlushGPUDirectRDMAWrites(TARGET_CURRENT_CTX, TO_OWNER or
 *    TO_ALL_DEVICES) needs a context and is counted (fake_cuda_rdma_flushes).
 *
 * Environment knobs (read at the first successful cuInit)
 *  FAKE_CUDA_DEVICES=n            number of devices (default 2, max 64; 0 makes
 *                                 cuInit return CUDA_ERROR_NO_DEVICE)
 *  FAKE_CUDA_COPY_DELAY_US=us     stream workers sleep that long before each
 *                                 async copy (default 0)
 *  FAKE_CUDA_FAIL_AFTER_COPIES=n  after n successful copies the next copy
 *                                 fails with CUDA_ERROR_ILLEGAL_ADDRESS
 *
 * Control functions (exported, for tests; not part of CUDA)
 *  void fake_cuda_set_copy_delay_us(unsigned us)
 *  void fake_cuda_fail_after_copies(long n, int cuda_error)
 *        after n more successful copies (sync or async) the next one fails
 *        with cuda_error (0 means 700); one-shot; n < 0 disarms. Errors
 *        700..799 are sticky on the context, as on the real driver.
 *  void fake_cuda_pause_streams(int paused)
 *        while paused, no stream worker starts a new operation (deterministic
 *        "copy still pending" states without sleeping).
 *  unsigned long long fake_cuda_copies(void), fake_cuda_bytes_copied(void)
 *        successful copies (not memsets) and their bytes.
 *  unsigned long long fake_cuda_pending_copies(void)
 *        asynchronous copies queued on a stream and not yet run.
 *  unsigned long long fake_cuda_live_allocations(void)
 *        cuMemAlloc allocations + pinned host allocations + host
 *        registrations + VMM physical allocations (created or imported, alive
 *        while a handle or a mapping holds them) + VMM address reservations.
 *  unsigned long long fake_cuda_live_ipc_imports(void)   legacy IPC mappings
 *  unsigned long long fake_cuda_live_vmm_imports(void)   mappings of imported VMM chunks
 *  unsigned long long fake_cuda_live_streams(void)       user-created streams
 *  unsigned long long fake_cuda_rdma_flushes(void)       cuFlushGPUDirectRDMAWrites calls
 *  void fake_cuda_refuse_dmabuf(int refuse)              dmabuf exports fail while set
 *  unsigned long long fake_cuda_live_events(void)
 *  void *fake_cuda_shadow(unsigned long long dptr)
 *        TEST-ONLY escape hatch: the CPU-accessible shadow address of a device
 *        pointer (the pointer itself for pinned host memory, NULL if not
 *        owned), to fill/check device memory quickly. Never use it in code
 *        under test.
 *
 * Not modelled: kernels, modules, cuCtxCreate (only primary contexts),
 * memory pools, managed memory, timing events, fork() after cuInit (as with
 * the real driver, a forked child must not use the parent's state).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define FC_API __attribute__((visibility("default")))

/* ------------------------------------------------------------------------ */
/* CUDA driver API types (x86-64 Linux ABI of CUDA 12)                       */
/* ------------------------------------------------------------------------ */
typedef int CUresult;
typedef int CUdevice;
typedef struct fake_ctx *CUcontext;
typedef struct fake_stream *CUstream;
typedef struct fake_event *CUevent;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;                 /* CU_MEM_ALLOCATION_TYPE_PINNED = 1 */
    int requestedHandleTypes; /* CUmemAllocationHandleType bitmask */
    CUmemLocation location;   /* CU_MEM_LOCATION_TYPE_DEVICE = 1 */
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

_Static_assert(sizeof(CUipcMemHandle) == 64, "CUipcMemHandle");
_Static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp");
_Static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc");

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_ALREADY_MAPPED = 208,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

enum {
    CU_POINTER_ATTRIBUTE_CONTEXT = 1,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
    CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3,
    CU_POINTER_ATTRIBUTE_HOST_POINTER = 4,
    CU_POINTER_ATTRIBUTE_SYNC_MEMOPS = 6,
    CU_POINTER_ATTRIBUTE_BUFFER_ID = 7,
    CU_POINTER_ATTRIBUTE_IS_MANAGED = 8,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11,
    CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12,
    CU_POINTER_ATTRIBUTE_MAPPED = 13,
    CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES = 14,
    CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE = 15,
    CU_POINTER_ATTRIBUTE_ACCESS_FLAGS = 16,
};
enum { CU_MEMORYTYPE_HOST = 1, CU_MEMORYTYPE_DEVICE = 2 };
enum { CU_STREAM_NON_BLOCKING = 1 };
enum {
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1,
    CU_MEM_HANDLE_TYPE_WIN32 = 2,
    CU_MEM_HANDLE_TYPE_WIN32_KMT = 4,
    CU_MEM_HANDLE_TYPE_FABRIC = 8,
};
enum { CU_MEM_ACCESS_FLAGS_PROT_NONE = 0, CU_MEM_ACCESS_FLAGS_PROT_READ = 1, CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 };

#define FC_MAX_DEVICES 64
#define FC_GRANULARITY (2ull << 20)
#define FC_TOTAL_MEM (80ull << 30)
#define FC_QUARANTINE 1024
#define FC_DRIVER_VERSION 12040
#define FC_CTX_STACK 32
#define FC_IPC_MAGIC 0x4b414646u /* "FFAK" */

/* ------------------------------------------------------------------------ */
/* State                                                                     */
/* ------------------------------------------------------------------------ */
struct op;

struct fake_ctx {
    int ordinal;
    atomic_int refs;   /* primary context retain count (changed under g_mu) */
    atomic_int sticky; /* sticky error, 0 if none */
    unsigned flags;
    pthread_mutex_t mu; /* streams list and null_stream */
    struct fake_stream *streams;
    struct fake_stream *null_stream;
};

struct fake_stream {
    atomic_int refs;
    struct fake_ctx *ctx;
    unsigned flags;
    int is_null;
    pthread_t thr;
    pthread_mutex_t mu; /* queue, stop, enq_seq */
    pthread_cond_t cv;
    struct op *head, *tail;
    int stop;
    uint64_t enq_seq;
    uint64_t done_seq; /* under g_prog_mu */
    struct fake_stream *ctx_next; /* under ctx->mu */
    struct fake_stream *reg_next; /* under g_mu */
};

struct fake_event {
    atomic_int refs;
    struct fake_ctx *ctx;
    unsigned flags;
    uint64_t rec_seq, done_seq; /* under g_prog_mu */
    struct fake_event *reg_next; /* under g_mu */
};

enum { OP_COPY, OP_MEMSET, OP_EVENT, OP_WAIT_STREAM, OP_WAIT_EVENT };
enum { SIDE_ANY = 0, SIDE_OWNED = 1 };

struct op {
    struct op *next;
    int type;
    uint64_t seq;
    uintptr_t dst, src;
    size_t n;
    int dmode, smode;
    unsigned char val;
    struct fake_event *ev; /* OP_EVENT, OP_WAIT_EVENT: holds a reference */
    uint64_t ev_seq;
    struct fake_stream *ws; /* OP_WAIT_STREAM: holds a reference */
    uint64_t wseq;
};

enum { R_DEV, R_IPC, R_VMM, R_HOST, R_HOSTREG };

struct phys; struct resv;

struct region {
    struct region *next;
    int kind;
    uintptr_t base;
    size_t size;     /* requested size (VMM: mapping size) */
    size_t map_size; /* mapped size */
    char *shadow;
    struct fake_ctx *ctx;
    int ordinal;
    unsigned long long buffer_id;
    int fd;
    int refs; /* R_IPC open count */
    int sync_memops;
    struct phys *phys;
    struct resv *resv;
    uint64_t rd_mask, wr_mask; /* R_VMM access per device */
};

struct phys {
    struct phys *next;
    unsigned long long handle;
    int handle_refs;
    int map_count;
    int fd;
    size_t size;
    int ordinal;
    int imported;
    unsigned long long buffer_id;
    unsigned long long types;
    unsigned char rdma;
    CUmemAllocationProp prop;
};

struct resv {
    struct resv *next;
    uintptr_t base;
    size_t size;
};

struct ipc_wire {
    uint32_t magic;
    int32_t pid;
    int32_t fd;
    int32_t ordinal;
    uint64_t size;
    uint64_t map_size;
    uint64_t buffer_id;
    uint8_t pad[24];
};
_Static_assert(sizeof(struct ipc_wire) == 64, "ipc_wire");

/* Lock order: g_mu -> ctx->mu -> stream->mu -> g_prog_mu; g_mu -> g_rw.
 * Nothing takes g_mu or a ctx/stream mutex while holding g_rw. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int g_inited;
static int g_ndev;
static int g_ctx_ready;
static struct fake_ctx g_ctx[FC_MAX_DEVICES];
static struct fake_stream *g_streams;
static struct fake_event *g_events;
static atomic_ullong g_live_streams, g_live_events;

static pthread_mutex_t g_prog_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_prog_cv = PTHREAD_COND_INITIALIZER;
static int g_paused;

static pthread_rwlock_t g_rw = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
static struct region *g_regions;
static struct phys *g_phys;
static struct resv *g_resv;
static struct { uintptr_t base; size_t len; } g_quar[FC_QUARANTINE];
static unsigned g_quar_count, g_quar_next;

static atomic_ullong g_used[FC_MAX_DEVICES];
static atomic_ullong g_copies, g_bytes;
static atomic_llong g_pending; /* async copies queued, not yet run */
static atomic_long g_fail_after = -1;
static atomic_int g_fail_err = CUDA_ERROR_ILLEGAL_ADDRESS;
static atomic_uint g_delay_us;
static atomic_ullong g_bufctr, g_handlectr;

static __thread struct fake_ctx *t_stack[FC_CTX_STACK];
static __thread int t_depth;

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */
static int inited(void) { return atomic_load_explicit(&g_inited, memory_order_acquire); }
#define REQUIRE_INIT() do { if (!inited()) return CUDA_ERROR_NOT_INITIALIZED; } while (0)

static struct fake_ctx *cur_ctx(void) { return t_depth > 0 ? t_stack[t_depth - 1] : NULL; }

static CUresult get_ctx(struct fake_ctx **out, int ignore_sticky)
{
    REQUIRE_INIT();
    struct fake_ctx *c = cur_ctx();
    if (!c)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (atomic_load(&c->refs) <= 0)
        return CUDA_ERROR_CONTEXT_IS_DESTROYED;
    if (!ignore_sticky) {
        int s = atomic_load(&c->sticky);
        if (s)
            return s;
    }
    *out = c;
    return CUDA_SUCCESS;
}

static int dev_ok(CUdevice d) { return d >= 0 && d < g_ndev; }

static struct fake_ctx *ctx_from_handle(CUcontext h)
{
    uintptr_t p = (uintptr_t)h, b = (uintptr_t)g_ctx;
    if (p < b || p >= b + (uintptr_t)g_ndev * sizeof(struct fake_ctx) || (p - b) % sizeof(struct fake_ctx))
        return NULL;
    return h;
}

static void set_sticky(struct fake_ctx *c, int err)
{
    int zero = 0;
    atomic_compare_exchange_strong(&c->sticky, &zero, err);
}

static size_t page_size(void)
{
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static unsigned long long new_buffer_id(void)
{
    unsigned long long n = atomic_fetch_add(&g_bufctr, 1) + 1;
    return ((unsigned long long)(unsigned)getpid() << 32) | (n & 0xffffffffull);
}

static long env_long(const char *name, long dflt, long lo, long hi)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return dflt;
    return v;
}

static int reserve_mem(int dev, size_t n)
{
    unsigned long long old = atomic_fetch_add(&g_used[dev], n);
    if (old + n > FC_TOTAL_MEM) {
        atomic_fetch_sub(&g_used[dev], n);
        return -1;
    }
    return 0;
}

static void unreserve_mem(int dev, size_t n) { atomic_fetch_sub(&g_used[dev], n); }

static int overlaps(uintptr_t a, size_t n, uintptr_t b, size_t m) { return a < b + m && b < a + n; }

/* ------------------------------------------------------------------------ */
/* Region table (g_rw)                                                       */
/* ------------------------------------------------------------------------ */
static int is_host_kind(int k) { return k == R_HOST || k == R_HOSTREG; }

static uintptr_t region_end(const struct region *r)
{
    return r->base + (is_host_kind(r->kind) ? r->size : r->map_size);
}

static struct region *find_region_locked(uintptr_t a)
{
    for (struct region *r = g_regions; r; r = r->next)
        if (a >= r->base && a < region_end(r))
            return r;
    return NULL;
}

static void region_unlink_locked(struct region *r)
{
    for (struct region **pp = &g_regions; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            return;
        }
}

static void anon_none_fixed(uintptr_t base, size_t len)
{
    void *m = mmap((void *)base, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (m == MAP_FAILED)
        munmap((void *)base, len);
}

/* Keep a freed device range PROT_NONE so it faults and is not reused. */
static void retire_range_locked(uintptr_t base, size_t len)
{
    void *m = mmap((void *)base, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (m == MAP_FAILED) {
        munmap((void *)base, len);
        return;
    }
    if (g_quar_count == FC_QUARANTINE)
        munmap((void *)g_quar[g_quar_next].base, g_quar[g_quar_next].len);
    else
        g_quar_count++;
    g_quar[g_quar_next].base = base;
    g_quar[g_quar_next].len = len;
    g_quar_next = (g_quar_next + 1) % FC_QUARANTINE;
}

static void phys_maybe_free_locked(struct phys *p)
{
    if (p->handle_refs > 0 || p->map_count > 0)
        return;
    for (struct phys **pp = &g_phys; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    close(p->fd);
    if (!p->imported)
        unreserve_mem(p->ordinal, p->size);
    free(p);
}

static struct phys *phys_find_locked(unsigned long long h)
{
    for (struct phys *p = g_phys; p; p = p->next)
        if (p->handle == h && p->handle_refs > 0)
            return p;
    return NULL;
}

static void region_destroy_locked(struct region *r)
{
    region_unlink_locked(r);
    switch (r->kind) {
    case R_DEV:
    case R_IPC:
        retire_range_locked(r->base, r->map_size);
        munmap(r->shadow, r->map_size);
        close(r->fd);
        if (r->kind == R_DEV)
            unreserve_mem(r->ordinal, r->map_size);
        break;
    case R_VMM:
        anon_none_fixed(r->base, r->map_size); /* stays part of the reservation */
        munmap(r->shadow, r->map_size);
        r->phys->map_count--;
        phys_maybe_free_locked(r->phys);
        break;
    case R_HOST:
        munmap((void *)r->base, r->map_size);
        break;
    case R_HOSTREG:
        break;
    }
    free(r);
}

/* Whether [a, a+n) touches device address space that is not usable memory. */
static int dead_zone_locked(uintptr_t a, size_t n)
{
    for (struct region *r = g_regions; r; r = r->next)
        if (!is_host_kind(r->kind) && overlaps(a, n, r->base, r->map_size))
            return 1;
    for (struct resv *v = g_resv; v; v = v->next)
        if (overlaps(a, n, v->base, v->size))
            return 1;
    for (unsigned i = 0; i < g_quar_count; i++)
        if (overlaps(a, n, g_quar[i].base, g_quar[i].len))
            return 1;
    return 0;
}

static CUresult check_side_locked(uintptr_t a, size_t n, int write, int mode)
{
    if (a + n < a)
        return CUDA_ERROR_INVALID_VALUE;
    struct region *r = find_region_locked(a);
    if (!r) {
        if (mode == SIDE_OWNED || a == 0 || dead_zone_locked(a, n))
            return CUDA_ERROR_INVALID_VALUE;
        return CUDA_SUCCESS;
    }
    if (is_host_kind(r->kind))
        return CUDA_SUCCESS;
    uintptr_t end = a + n;
    for (;;) {
        if (r->kind == R_VMM && !(write ? r->wr_mask : r->rd_mask))
            return CUDA_ERROR_INVALID_VALUE; /* cuMemSetAccess not done */
        if (end <= r->base + r->size)
            return CUDA_SUCCESS;
        if (r->kind != R_VMM)
            return CUDA_ERROR_INVALID_VALUE; /* crosses the allocation end */
        struct region *nx = find_region_locked(r->base + r->size);
        if (!nx || nx->kind != R_VMM || nx->resv != r->resv || nx->base != r->base + r->size)
            return CUDA_ERROR_INVALID_VALUE;
        r = nx;
    }
}

static char *xlate_locked(uintptr_t a, size_t *avail)
{
    struct region *r = find_region_locked(a);
    if (!r || is_host_kind(r->kind)) {
        *avail = SIZE_MAX;
        return (char *)a;
    }
    *avail = r->base + r->size - a;
    return r->shadow + (a - r->base);
}

static CUresult injection(void)
{
    long v = atomic_load(&g_fail_after);
    while (v >= 0) {
        if (v == 0) {
            if (atomic_compare_exchange_weak(&g_fail_after, &v, -1))
                return atomic_load(&g_fail_err);
        } else if (atomic_compare_exchange_weak(&g_fail_after, &v, v - 1)) {
            return CUDA_SUCCESS;
        }
    }
    return CUDA_SUCCESS;
}

/* Validates and performs a copy (or memset); *injected tells an injected failure. */
static CUresult do_copy(uintptr_t dst, uintptr_t src, size_t n, int dmode, int smode, int is_set,
                        unsigned char val, int *injected)
{
    CUresult rc;
    *injected = 0;
    pthread_rwlock_rdlock(&g_rw);
    rc = check_side_locked(dst, n, 1, dmode);
    if (!rc && !is_set)
        rc = check_side_locked(src, n, 0, smode);
    if (!rc && !is_set) {
        rc = injection();
        *injected = rc != 0;
    }
    if (!rc) {
        size_t left = n;
        while (left) {
            size_t ad, as = SIZE_MAX;
            char *pd = xlate_locked(dst, &ad);
            char *ps = is_set ? NULL : xlate_locked(src, &as);
            size_t k = left;
            if (k > ad)
                k = ad;
            if (k > as)
                k = as;
            if (is_set)
                memset(pd, val, k);
            else
                memmove(pd, ps, k);
            dst += k;
            src += k;
            left -= k;
        }
    }
    pthread_rwlock_unlock(&g_rw);
    if (!rc && !is_set) {
        atomic_fetch_add(&g_copies, 1);
        atomic_fetch_add(&g_bytes, n);
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Streams and events                                                        */
/* ------------------------------------------------------------------------ */
static void stream_unref(struct fake_stream *s)
{
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
    }
}

static void event_unref(struct fake_event *e)
{
    if (atomic_fetch_sub(&e->refs, 1) == 1)
        free(e);
}

static void op_free(struct op *o)
{
    if (o->ev)
        event_unref(o->ev);
    if (o->ws)
        stream_unref(o->ws);
    free(o);
}

static void sleep_us(unsigned us)
{
    struct timespec ts = { us / 1000000u, (long)(us % 1000000u) * 1000L };
    while (nanosleep(&ts, &ts) && errno == EINTR)
        ;
}

static void exec_op(struct fake_stream *s, struct op *o)
{
    struct fake_ctx *c = s->ctx;
    switch (o->type) {
    case OP_COPY:
    case OP_MEMSET: {
        if (atomic_load(&c->sticky))
            break; /* a faulted context runs nothing more */
        unsigned d = atomic_load(&g_delay_us);
        if (d && o->type == OP_COPY)
            sleep_us(d);
        int inj;
        CUresult rc = do_copy(o->dst, o->src, o->n, o->dmode, o->smode, o->type == OP_MEMSET, o->val, &inj);
        if (rc)
            set_sticky(c, inj ? rc : CUDA_ERROR_ILLEGAL_ADDRESS);
        break;
    }
    case OP_EVENT:
        break;
    case OP_WAIT_STREAM:
        pthread_mutex_lock(&g_prog_mu);
        while (o->ws->done_seq < o->wseq)
            pthread_cond_wait(&g_prog_cv, &g_prog_mu);
        pthread_mutex_unlock(&g_prog_mu);
        break;
    case OP_WAIT_EVENT:
        pthread_mutex_lock(&g_prog_mu);
        while (o->ev->done_seq < o->ev_seq)
            pthread_cond_wait(&g_prog_cv, &g_prog_mu);
        pthread_mutex_unlock(&g_prog_mu);
        break;
    }
}

static void *stream_worker(void *arg)
{
    struct fake_stream *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        struct op *o = s->head;
        if (!o) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        s->head = o->next;
        if (!s->head)
            s->tail = NULL;
        pthread_mutex_unlock(&s->mu);

        pthread_mutex_lock(&g_prog_mu);
        while (g_paused)
            pthread_cond_wait(&g_prog_cv, &g_prog_mu);
        pthread_mutex_unlock(&g_prog_mu);

        exec_op(s, o);
        if (o->type == OP_COPY)
            atomic_fetch_sub(&g_pending, 1);

        pthread_mutex_lock(&g_prog_mu);
        s->done_seq = o->seq;
        if (o->type == OP_EVENT && o->ev->done_seq < o->ev_seq)
            o->ev->done_seq = o->ev_seq;
        pthread_cond_broadcast(&g_prog_cv);
        pthread_mutex_unlock(&g_prog_mu);
        op_free(o);
    }
    return NULL;
}

static struct fake_stream *stream_new(struct fake_ctx *c, unsigned flags, int is_null)
{
    struct fake_stream *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    atomic_init(&s->refs, 1);
    s->ctx = c;
    s->flags = flags;
    s->is_null = is_null;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&s->thr, NULL, stream_worker, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
        return NULL;
    }
    pthread_setname_np(s->thr, is_null ? "fakecuda-null" : "fakecuda-strm");
    return s;
}

static void stream_stop_join(struct fake_stream *s)
{
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thr, NULL);
}

static uint64_t stream_enq_seq(struct fake_stream *s)
{
    pthread_mutex_lock(&s->mu);
    uint64_t v = s->enq_seq;
    pthread_mutex_unlock(&s->mu);
    return v;
}

static void wait_stream_seq(struct fake_stream *s, uint64_t seq)
{
    pthread_mutex_lock(&g_prog_mu);
    while (s->done_seq < seq)
        pthread_cond_wait(&g_prog_cv, &g_prog_mu);
    pthread_mutex_unlock(&g_prog_mu);
}

static CUresult get_null_stream(struct fake_ctx *c, struct fake_stream **out)
{
    pthread_mutex_lock(&c->mu);
    if (!c->null_stream)
        c->null_stream = stream_new(c, 0, 1);
    struct fake_stream *s = c->null_stream;
    if (s)
        atomic_fetch_add(&s->refs, 1);
    pthread_mutex_unlock(&c->mu);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *out = s;
    return CUDA_SUCCESS;
}

/* A referenced stream for handle h (NULL/legacy/per-thread: c's NULL stream). */
static CUresult resolve_stream(CUstream h, struct fake_ctx *c, struct fake_stream **out)
{
    uintptr_t v = (uintptr_t)h;
    if (v == 0 || v == 1 || v == 2)
        return get_null_stream(c, out);
    struct fake_stream *found = NULL;
    pthread_mutex_lock(&g_mu);
    for (struct fake_stream *s = g_streams; s; s = s->reg_next)
        if (s == h) {
            found = s;
            atomic_fetch_add(&s->refs, 1);
            break;
        }
    pthread_mutex_unlock(&g_mu);
    if (!found)
        return CUDA_ERROR_INVALID_HANDLE;
    *out = found;
    return CUDA_SUCCESS;
}

static struct fake_event *event_get(CUevent h)
{
    struct fake_event *found = NULL;
    if (!h)
        return NULL;
    pthread_mutex_lock(&g_mu);
    for (struct fake_event *e = g_events; e; e = e->reg_next)
        if (e == h) {
            found = e;
            atomic_fetch_add(&e->refs, 1);
            break;
        }
    pthread_mutex_unlock(&g_mu);
    return found;
}

static int add_wait(struct op ***tail, struct fake_stream *t)
{
    uint64_t seq = stream_enq_seq(t);
    pthread_mutex_lock(&g_prog_mu);
    int done = t->done_seq >= seq;
    pthread_mutex_unlock(&g_prog_mu);
    if (done)
        return 0;
    struct op *w = calloc(1, sizeof *w);
    if (!w)
        return -1;
    w->type = OP_WAIT_STREAM;
    w->ws = t;
    atomic_fetch_add(&t->refs, 1);
    w->wseq = seq;
    **tail = w;
    *tail = &w->next;
    return 0;
}

/* Queues o on s (taking ownership of o), with the implicit waits of the
 * legacy default stream. */
static CUresult enqueue(struct fake_stream *s, struct op *o)
{
    struct fake_ctx *c = s->ctx;
    struct op *waits = NULL, **wt = &waits;
    int oom = 0;
    pthread_mutex_lock(&c->mu);
    if (s->is_null) {
        for (struct fake_stream *t = c->streams; t && !oom; t = t->ctx_next)
            if (!(t->flags & CU_STREAM_NON_BLOCKING))
                oom = add_wait(&wt, t);
    } else if (!(s->flags & CU_STREAM_NON_BLOCKING) && c->null_stream) {
        oom = add_wait(&wt, c->null_stream);
    }
    pthread_mutex_lock(&s->mu);
    CUresult rc = oom ? CUDA_ERROR_OUT_OF_MEMORY : s->stop ? CUDA_ERROR_INVALID_HANDLE : CUDA_SUCCESS;
    if (!rc) {
        *wt = o;
        o->next = NULL;
        if (o->type == OP_COPY)
            atomic_fetch_add(&g_pending, 1);
        for (struct op *x = waits; x; x = x->next)
            x->seq = ++s->enq_seq;
        if (s->tail)
            s->tail->next = waits;
        else
            s->head = waits;
        s->tail = o;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_unlock(&c->mu);
    if (rc) {
        while (waits) {
            struct op *n = waits->next;
            op_free(waits);
            waits = n;
        }
        op_free(o);
    }
    return rc;
}

/* Waits for everything queued so far on the streams of c (legacy_only: the
 * NULL stream and the blocking streams). */
static CUresult drain_ctx(struct fake_ctx *c, int legacy_only)
{
    pthread_mutex_lock(&c->mu);
    size_t n = c->null_stream ? 1 : 0;
    for (struct fake_stream *t = c->streams; t; t = t->ctx_next)
        n++;
    struct fake_stream **arr = n ? calloc(n, sizeof *arr) : NULL;
    uint64_t *seqs = n ? calloc(n, sizeof *seqs) : NULL;
    if (n && (!arr || !seqs)) {
        pthread_mutex_unlock(&c->mu);
        free(arr);
        free(seqs);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    size_t k = 0;
    if (c->null_stream)
        arr[k++] = c->null_stream;
    for (struct fake_stream *t = c->streams; t; t = t->ctx_next)
        if (!legacy_only || !(t->flags & CU_STREAM_NON_BLOCKING))
            arr[k++] = t;
    for (size_t i = 0; i < k; i++) {
        atomic_fetch_add(&arr[i]->refs, 1);
        seqs[i] = stream_enq_seq(arr[i]);
    }
    pthread_mutex_unlock(&c->mu);
    for (size_t i = 0; i < k; i++) {
        wait_stream_seq(arr[i], seqs[i]);
        stream_unref(arr[i]);
    }
    free(arr);
    free(seqs);
    return CUDA_SUCCESS;
}

/* Destroys the context's resources; g_mu held. */
static void ctx_teardown_locked(struct fake_ctx *c)
{
    pthread_mutex_lock(&c->mu);
    struct fake_stream *list = c->streams, *ns = c->null_stream;
    c->streams = NULL;
    c->null_stream = NULL;
    pthread_mutex_unlock(&c->mu);
    for (struct fake_stream *s = list; s; s = s->ctx_next)
        for (struct fake_stream **pp = &g_streams; *pp; pp = &(*pp)->reg_next)
            if (*pp == s) {
                *pp = s->reg_next;
                break;
            }
    while (list) {
        struct fake_stream *next = list->ctx_next;
        stream_stop_join(list);
        atomic_fetch_sub(&g_live_streams, 1);
        stream_unref(list);
        list = next;
    }
    if (ns) {
        stream_stop_join(ns);
        stream_unref(ns);
    }
    pthread_rwlock_wrlock(&g_rw);
    for (;;) {
        struct region *r;
        for (r = g_regions; r; r = r->next)
            if (r->ctx == c && r->kind != R_VMM)
                break;
        if (!r)
            break;
        region_destroy_locked(r);
    }
    pthread_rwlock_unlock(&g_rw);
    atomic_store(&c->sticky, 0);
}

/* ------------------------------------------------------------------------ */
/* Initialisation, version, errors                                           */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuInit(unsigned int flags)
{
    if (flags)
        return CUDA_ERROR_INVALID_VALUE;
    if (inited())
        return CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    CUresult rc = CUDA_SUCCESS;
    if (!inited()) {
        long n = env_long("FAKE_CUDA_DEVICES", 2, 0, FC_MAX_DEVICES);
        if (n <= 0) {
            rc = CUDA_ERROR_NO_DEVICE;
        } else {
            g_ndev = (int)n;
            if (!g_ctx_ready) {
                for (int i = 0; i < FC_MAX_DEVICES; i++) {
                    g_ctx[i].ordinal = i;
                    pthread_mutex_init(&g_ctx[i].mu, NULL);
                }
                g_ctx_ready = 1;
            }
            long d = env_long("FAKE_CUDA_COPY_DELAY_US", -1, 0, UINT_MAX);
            if (d >= 0)
                atomic_store(&g_delay_us, (unsigned)d);
            long f = env_long("FAKE_CUDA_FAIL_AFTER_COPIES", -1, 0, LONG_MAX);
            if (f >= 0) {
                atomic_store(&g_fail_err, CUDA_ERROR_ILLEGAL_ADDRESS);
                atomic_store(&g_fail_after, f);
            }
            atomic_store_explicit(&g_inited, 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

FC_API CUresult cuDriverGetVersion(int *v)
{
    if (!v)
        return CUDA_ERROR_INVALID_VALUE;
    *v = FC_DRIVER_VERSION;
    return CUDA_SUCCESS;
}

static const struct { int code; const char *name, *str; } g_errs[] = {
    { 0, "CUDA_SUCCESS", "no error" },
    { 1, "CUDA_ERROR_INVALID_VALUE", "invalid argument" },
    { 2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory" },
    { 3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error" },
    { 4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down" },
    { 34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library" },
    { 46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable" },
    { 100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected" },
    { 101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal" },
    { 200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid" },
    { 201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context" },
    { 205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed" },
    { 206, "CUDA_ERROR_UNMAP_FAILED", "unmapping of buffer object failed" },
    { 208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped" },
    { 211, "CUDA_ERROR_NOT_MAPPED", "resource not mapped" },
    { 214, "CUDA_ERROR_ECC_UNCORRECTABLE", "uncorrectable ECC error encountered" },
    { 217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", "peer access is not supported between these two devices" },
    { 304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS" },
    { 400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle" },
    { 401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state" },
    { 500, "CUDA_ERROR_NOT_FOUND", "named symbol not found" },
    { 600, "CUDA_ERROR_NOT_READY", "device not ready" },
    { 700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered" },
    { 702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated" },
    { 704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled" },
    { 705, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED", "peer access has not been enabled" },
    { 708, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "cannot set while device is active in this process" },
    { 709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed" },
    { 710, "CUDA_ERROR_ASSERT", "device-side assert triggered" },
    { 712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped" },
    { 713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region" },
    { 716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address" },
    { 719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure" },
    { 800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted" },
    { 801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported" },
    { 909, "CUDA_ERROR_TIMEOUT", "wait operation timed out" },
    { 999, "CUDA_ERROR_UNKNOWN", "unknown error" },
};

static CUresult err_lookup(CUresult e, const char **p, int name)
{
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof g_errs / sizeof g_errs[0]; i++)
        if (g_errs[i].code == e) {
            *p = name ? g_errs[i].name : g_errs[i].str;
            return CUDA_SUCCESS;
        }
    *p = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

FC_API CUresult cuGetErrorName(CUresult e, const char **p) { return err_lookup(e, p, 1); }
FC_API CUresult cuGetErrorString(CUresult e, const char **p) { return err_lookup(e, p, 0); }

/* ------------------------------------------------------------------------ */
/* cuGetProcAddress: dlsym on this very library                              */
/* ------------------------------------------------------------------------ */
static pthread_once_t g_self_once = PTHREAD_ONCE_INIT;
static void *g_self;
static void *g_self_base;

static void self_init(void)
{
    Dl_info info;
    if (dladdr((void *)&g_self_once, &info) && info.dli_fname) {
        g_self_base = info.dli_fbase;
        g_self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    }
}

static void *self_sym(const char *name)
{
    pthread_once(&g_self_once, self_init);
    if (!g_self)
        return NULL;
    void *p = dlsym(g_self, name);
    Dl_info info;
    if (!p || !dladdr(p, &info) || info.dli_fbase != g_self_base)
        return NULL; /* only this library's own symbols */
    return p;
}

static CUresult proc_address(const char *symbol, void **pfn, int version, int *status)
{
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    void *p = NULL;
    if (strncmp(symbol, "cu", 2) == 0 && strlen(symbol) < 200) {
        char name[256];
        if (strcmp(symbol, "cuGetProcAddress") == 0 && version >= 12000)
            p = self_sym("cuGetProcAddress_v2");
        if (!p)
            p = self_sym(symbol);
        if (!p) {
            snprintf(name, sizeof name, "%s_v2", symbol);
            p = self_sym(name);
        }
    }
    if (status)
        *status = p ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS / _SYMBOL_NOT_FOUND */
    if (!p)
        return CUDA_ERROR_NOT_FOUND;
    *pfn = p;
    return CUDA_SUCCESS;
}

FC_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags,
                                   int *symbolStatus)
{
    (void)flags;
    return proc_address(symbol, pfn, cudaVersion, symbolStatus);
}

FC_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags)
{
    (void)flags;
    return proc_address(symbol, pfn, cudaVersion, NULL);
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuDeviceGetCount(int *n)
{
    REQUIRE_INIT();
    if (!n)
        return CUDA_ERROR_INVALID_VALUE;
    *n = g_ndev;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGet(CUdevice *d, int ordinal)
{
    REQUIRE_INIT();
    if (!d)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGetName(char *name, int len, CUdevice d)
{
    REQUIRE_INIT();
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "Fake GPU %d", d);
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGetAttribute(int *pi, int attrib, CUdevice d)
{
    REQUIRE_INIT();
    if (!pi || attrib <= 0 || attrib > 200)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    int v = 0;
    switch (attrib) {
    case 1: v = 1024; break;  /* MAX_THREADS_PER_BLOCK */
    case 10: v = 32; break;   /* WARP_SIZE */
    case 16: v = 132; break;  /* MULTIPROCESSOR_COUNT */
    case 19: v = 1; break;    /* CAN_MAP_HOST_MEMORY */
    case 33: v = d; break;    /* PCI_BUS_ID */
    case 41: v = 1; break;    /* UNIFIED_ADDRESSING */
    case 75: v = 9; break;    /* COMPUTE_CAPABILITY_MAJOR */
    case 76: v = 0; break;    /* COMPUTE_CAPABILITY_MINOR */
    case 102: v = 1; break;   /* VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */
    case 103: v = 1; break;   /* HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED */
    case 110: v = 1; break;   /* GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED */
    case 116: v = 1; break;   /* GPU_DIRECT_RDMA_SUPPORTED */
    case 124: v = 1; break;   /* DMA_BUF_SUPPORTED */
    default: v = 0; break;
    }
    *pi = v;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGetPCIBusId(char *pci, int len, CUdevice d)
{
    REQUIRE_INIT();
    if (!pci || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(pci, (size_t)len, "00000000:%02X:00.0", d);
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d)
{
    REQUIRE_INIT();
    if (!u)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    memset(u, 0, sizeof *u);
    memcpy(u->bytes, "FAKECUDA", 8);
    u->bytes[15] = (char)d;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }

FC_API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d)
{
    REQUIRE_INIT();
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = FC_TOTAL_MEM;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDeviceCanAccessPeer(int *can, CUdevice d, CUdevice peer)
{
    REQUIRE_INIT();
    if (!can)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d) || !dev_ok(peer))
        return CUDA_ERROR_INVALID_DEVICE;
    *can = d != peer;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice d)
{
    REQUIRE_INIT();
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    atomic_fetch_add(&g_ctx[d].refs, 1);
    pthread_mutex_unlock(&g_mu);
    *pctx = &g_ctx[d];
    return CUDA_SUCCESS;
}

FC_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d)
{
    REQUIRE_INIT();
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    struct fake_ctx *c = &g_ctx[d];
    if (atomic_load(&c->refs) <= 0)
        rc = CUDA_ERROR_INVALID_CONTEXT;
    else if (atomic_fetch_sub(&c->refs, 1) == 1)
        ctx_teardown_locked(c);
    pthread_mutex_unlock(&g_mu);
    return rc;
}

FC_API CUresult cuDevicePrimaryCtxReset_v2(CUdevice d)
{
    REQUIRE_INIT();
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    ctx_teardown_locked(&g_ctx[d]);
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

FC_API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned int *flags, int *active)
{
    REQUIRE_INIT();
    if (!flags || !active)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    *flags = g_ctx[d].flags;
    *active = atomic_load(&g_ctx[d].refs) > 0;
    return CUDA_SUCCESS;
}

FC_API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned int flags)
{
    REQUIRE_INIT();
    if (!dev_ok(d))
        return CUDA_ERROR_INVALID_DEVICE;
    g_ctx[d].flags = flags;
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxSetCurrent(CUcontext h)
{
    REQUIRE_INIT();
    if (!h) {
        if (t_depth > 0)
            t_depth--;
        return CUDA_SUCCESS;
    }
    struct fake_ctx *c = ctx_from_handle(h);
    if (!c)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth == 0)
        t_depth = 1;
    t_stack[t_depth - 1] = c;
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxGetCurrent(CUcontext *p)
{
    REQUIRE_INIT();
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    *p = cur_ctx();
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxPushCurrent_v2(CUcontext h)
{
    REQUIRE_INIT();
    struct fake_ctx *c = ctx_from_handle(h);
    if (!c)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth >= FC_CTX_STACK)
        return CUDA_ERROR_OUT_OF_MEMORY;
    t_stack[t_depth++] = c;
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxPopCurrent_v2(CUcontext *p)
{
    REQUIRE_INIT();
    if (t_depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    struct fake_ctx *c = t_stack[--t_depth];
    if (p)
        *p = c;
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxGetDevice(CUdevice *d)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    if (!d)
        return CUDA_ERROR_INVALID_VALUE;
    *d = c->ordinal;
    return CUDA_SUCCESS;
}

FC_API CUresult cuCtxSynchronize(void)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    rc = drain_ctx(c, 0);
    if (rc)
        return rc;
    return atomic_load(&c->sticky);
}

/* ------------------------------------------------------------------------ */
/* Device memory                                                             */
/* ------------------------------------------------------------------------ */
static int new_memfd(size_t len, unsigned long long bufid, int ordinal, unsigned long long types)
{
    char name[96];
    snprintf(name, sizeof name, "fake-cuda:%016llx:%d:%llx", bufid, ordinal, types);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)len)) {
        close(fd);
        return -1;
    }
    return fd;
}

static int memfd_identity(int fd, unsigned long long *bufid, int *ordinal, unsigned long long *types)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, buf, sizeof buf - 1);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return sscanf(buf, "/memfd:fake-cuda:%llx:%d:%llx", bufid, ordinal, types) == 3 ? 0 : -1;
}

/* Maps fd PROT_NONE at the device address (at `fixed` if non-zero) and RW
 * at a shadow address. */
static int map_pair(int fd, size_t len, uintptr_t fixed, uintptr_t *base, char **shadow)
{
    void *d = mmap(fixed ? (void *)fixed : NULL, len, PROT_NONE, MAP_SHARED | (fixed ? MAP_FIXED : 0), fd, 0);
    if (d == MAP_FAILED)
        return -1;
    void *sh = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sh == MAP_FAILED) {
        if (fixed)
            anon_none_fixed(fixed, len);
        else
            munmap(d, len);
        return -1;
    }
    *base = (uintptr_t)d;
    *shadow = sh;
    return 0;
}

FC_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!dptr || !size)
        return CUDA_ERROR_INVALID_VALUE;
    if (size > FC_TOTAL_MEM)
        return CUDA_ERROR_OUT_OF_MEMORY;
    size_t len = round_up(size, page_size());
    if (reserve_mem(c->ordinal, len))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct region *r = calloc(1, sizeof *r);
    unsigned long long id = new_buffer_id();
    int fd = r ? new_memfd(len, id, c->ordinal, 0) : -1;
    if (fd < 0 || map_pair(fd, len, 0, &r->base, &r->shadow)) {
        if (fd >= 0)
            close(fd);
        free(r);
        unreserve_mem(c->ordinal, len);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    r->kind = R_DEV;
    r->size = size;
    r->map_size = len;
    r->ctx = c;
    r->ordinal = c->ordinal;
    r->buffer_id = id;
    r->fd = fd;
    pthread_rwlock_wrlock(&g_rw);
    r->next = g_regions;
    g_regions = r;
    pthread_rwlock_unlock(&g_rw);
    *dptr = r->base;
    return CUDA_SUCCESS;
}

static struct region *find_exact(uintptr_t base, int kind, struct fake_ctx **ctx)
{
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked(base);
    if (r && (r->kind != kind || r->base != base))
        r = NULL;
    if (r && ctx)
        *ctx = r->ctx;
    pthread_rwlock_unlock(&g_rw);
    return r;
}

FC_API CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    REQUIRE_INIT();
    if (!dptr)
        return CUDA_SUCCESS;
    struct fake_ctx *c = NULL;
    if (!find_exact(dptr, R_DEV, &c))
        return CUDA_ERROR_INVALID_VALUE;
    drain_ctx(c, 0); /* implicit synchronisation, as the real driver */
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked(dptr);
    if (r && r->kind == R_DEV && r->base == dptr) {
        region_destroy_locked(r);
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    rc = CUDA_ERROR_NOT_FOUND;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked(dptr);
    if (r && !is_host_kind(r->kind)) {
        if (pbase)
            *pbase = r->base;
        if (psize)
            *psize = r->size;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemGetInfo_v2(size_t *pfree, size_t *ptotal)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    unsigned long long used = atomic_load(&g_used[c->ordinal]);
    if (pfree)
        *pfree = used >= FC_TOTAL_MEM ? 0 : FC_TOTAL_MEM - used;
    if (ptotal)
        *ptotal = FC_TOTAL_MEM;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Pinned host memory                                                        */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuMemHostAlloc(void **pp, size_t size, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!pp || !size || (flags & ~7u))
        return CUDA_ERROR_INVALID_VALUE;
    size_t len = round_up(size, page_size());
    struct region *r = calloc(1, sizeof *r);
    void *m = r ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : MAP_FAILED;
    if (m == MAP_FAILED) {
        free(r);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    r->kind = R_HOST;
    r->base = (uintptr_t)m;
    r->size = size;
    r->map_size = len;
    r->ctx = c;
    r->ordinal = c->ordinal;
    r->buffer_id = new_buffer_id();
    r->fd = -1;
    pthread_rwlock_wrlock(&g_rw);
    r->next = g_regions;
    g_regions = r;
    pthread_rwlock_unlock(&g_rw);
    *pp = m;
    return CUDA_SUCCESS;
}

FC_API CUresult cuMemAllocHost_v2(void **pp, size_t size) { return cuMemHostAlloc(pp, size, 0); }

FC_API CUresult cuMemFreeHost(void *p)
{
    REQUIRE_INIT();
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked((uintptr_t)p);
    if (p && r && r->kind == R_HOST && r->base == (uintptr_t)p) {
        region_destroy_locked(r);
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!p || !size || (flags & ~0xfu) || (uintptr_t)p + size < (uintptr_t)p)
        return CUDA_ERROR_INVALID_VALUE;
    struct region *r = calloc(1, sizeof *r);
    if (!r)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_rwlock_wrlock(&g_rw);
    for (struct region *x = g_regions; x && !rc; x = x->next)
        if (overlaps((uintptr_t)p, size, x->base, region_end(x) - x->base))
            rc = is_host_kind(x->kind) ? CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED : CUDA_ERROR_INVALID_VALUE;
    if (!rc && dead_zone_locked((uintptr_t)p, size))
        rc = CUDA_ERROR_INVALID_VALUE;
    if (!rc) {
        r->kind = R_HOSTREG;
        r->base = (uintptr_t)p;
        r->size = size;
        r->map_size = size;
        r->ctx = c;
        r->ordinal = c->ordinal;
        r->buffer_id = new_buffer_id();
        r->fd = -1;
        r->next = g_regions;
        g_regions = r;
    }
    pthread_rwlock_unlock(&g_rw);
    if (rc)
        free(r);
    return rc;
}

FC_API CUresult cuMemHostUnregister(void *p)
{
    REQUIRE_INIT();
    CUresult rc = CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked((uintptr_t)p);
    if (p && r && r->kind == R_HOSTREG && r->base == (uintptr_t)p) {
        region_destroy_locked(r);
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *pd, void *p, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!pd || flags)
        return CUDA_ERROR_INVALID_VALUE;
    rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked((uintptr_t)p);
    if (r && is_host_kind(r->kind)) {
        *pd = (CUdeviceptr)(uintptr_t)p;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Copies                                                                    */
/* ------------------------------------------------------------------------ */
static CUresult sync_copy(uintptr_t dst, uintptr_t src, size_t n, int dmode, int smode, int is_set,
                          unsigned char val)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!n)
        return CUDA_SUCCESS;
    if (!dst || (!is_set && !src))
        return CUDA_ERROR_INVALID_VALUE;
    rc = drain_ctx(c, 1); /* the legacy NULL stream and the blocking streams */
    if (rc)
        return rc;
    int sticky = atomic_load(&c->sticky);
    if (sticky)
        return sticky;
    int inj;
    rc = do_copy(dst, src, n, dmode, smode, is_set, val, &inj);
    if (rc >= 700 && rc < 800)
        set_sticky(c, rc);
    return rc;
}

FC_API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
    return sync_copy(dst, src, n, SIDE_ANY, SIDE_ANY, 0, 0);
}

FC_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n)
{
    return sync_copy(dst, (uintptr_t)src, n, SIDE_OWNED, SIDE_ANY, 0, 0);
}

FC_API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n)
{
    return sync_copy((uintptr_t)dst, src, n, SIDE_ANY, SIDE_OWNED, 0, 0);
}

FC_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
    return sync_copy(dst, src, n, SIDE_OWNED, SIDE_OWNED, 0, 0);
}

FC_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n)
{
    return sync_copy(dst, 0, n, SIDE_OWNED, SIDE_ANY, 1, v);
}

static int owned(uintptr_t a)
{
    pthread_rwlock_rdlock(&g_rw);
    int r = find_region_locked(a) != NULL;
    pthread_rwlock_unlock(&g_rw);
    return r;
}

static CUresult async_copy(uintptr_t dst, uintptr_t src, size_t n, CUstream h, int dmode, int smode, int is_set,
                           unsigned char val)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    struct fake_stream *s;
    rc = resolve_stream(h, c, &s);
    if (rc)
        return rc;
    int sticky = atomic_load(&s->ctx->sticky);
    if (sticky)
        rc = sticky;
    else if (!n)
        rc = CUDA_SUCCESS;
    else if (!dst || (!is_set && !src) || (dmode == SIDE_OWNED && !owned(dst)) ||
             (!is_set && smode == SIDE_OWNED && !owned(src)))
        rc = CUDA_ERROR_INVALID_VALUE;
    else {
        struct op *o = calloc(1, sizeof *o);
        if (!o) {
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        } else {
            o->type = is_set ? OP_MEMSET : OP_COPY;
            o->dst = dst;
            o->src = src;
            o->n = n;
            o->dmode = dmode;
            o->smode = smode;
            o->val = val;
            rc = enqueue(s, o);
        }
    }
    stream_unref(s);
    return rc;
}

FC_API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h)
{
    return async_copy(dst, src, n, h, SIDE_ANY, SIDE_ANY, 0, 0);
}

FC_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream h)
{
    return async_copy(dst, (uintptr_t)src, n, h, SIDE_OWNED, SIDE_ANY, 0, 0);
}

FC_API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream h)
{
    return async_copy((uintptr_t)dst, src, n, h, SIDE_ANY, SIDE_OWNED, 0, 0);
}

FC_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h)
{
    return async_copy(dst, src, n, h, SIDE_OWNED, SIDE_OWNED, 0, 0);
}

FC_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream h)
{
    return async_copy(dst, 0, n, h, SIDE_OWNED, SIDE_ANY, 1, v);
}

/* ------------------------------------------------------------------------ */
/* Stream and event API                                                      */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuStreamCreate(CUstream *ph, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!ph || (flags & ~(unsigned)CU_STREAM_NON_BLOCKING))
        return CUDA_ERROR_INVALID_VALUE;
    struct fake_stream *s = stream_new(c, flags, 0);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mu);
    pthread_mutex_lock(&c->mu);
    s->ctx_next = c->streams;
    c->streams = s;
    pthread_mutex_unlock(&c->mu);
    s->reg_next = g_streams;
    g_streams = s;
    pthread_mutex_unlock(&g_mu);
    atomic_fetch_add(&g_live_streams, 1);
    *ph = s;
    return CUDA_SUCCESS;
}

FC_API CUresult cuStreamCreateWithPriority(CUstream *ph, unsigned int flags, int priority)
{
    (void)priority;
    return cuStreamCreate(ph, flags);
}

FC_API CUresult cuStreamDestroy_v2(CUstream h)
{
    REQUIRE_INIT();
    uintptr_t v = (uintptr_t)h;
    if (v == 0 || v == 1 || v == 2)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fake_stream *found = NULL;
    pthread_mutex_lock(&g_mu);
    for (struct fake_stream **pp = &g_streams; *pp; pp = &(*pp)->reg_next)
        if (*pp == h) {
            found = h;
            *pp = found->reg_next;
            break;
        }
    if (found) {
        struct fake_ctx *c = found->ctx;
        pthread_mutex_lock(&c->mu);
        for (struct fake_stream **pp = &c->streams; *pp; pp = &(*pp)->ctx_next)
            if (*pp == found) {
                *pp = found->ctx_next;
                break;
            }
        pthread_mutex_unlock(&c->mu);
    }
    pthread_mutex_unlock(&g_mu);
    if (!found)
        return CUDA_ERROR_INVALID_HANDLE;
    stream_stop_join(found); /* runs what is queued, then the worker exits */
    atomic_fetch_sub(&g_live_streams, 1);
    stream_unref(found);
    return CUDA_SUCCESS;
}

FC_API CUresult cuStreamSynchronize(CUstream h)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    struct fake_stream *s;
    rc = resolve_stream(h, c, &s);
    if (rc)
        return rc;
    wait_stream_seq(s, stream_enq_seq(s));
    rc = atomic_load(&s->ctx->sticky);
    stream_unref(s);
    return rc;
}

FC_API CUresult cuStreamQuery(CUstream h)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    struct fake_stream *s;
    rc = resolve_stream(h, c, &s);
    if (rc)
        return rc;
    rc = atomic_load(&s->ctx->sticky);
    if (!rc) {
        uint64_t q = stream_enq_seq(s);
        pthread_mutex_lock(&g_prog_mu);
        rc = s->done_seq >= q ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
        pthread_mutex_unlock(&g_prog_mu);
    }
    stream_unref(s);
    return rc;
}

FC_API CUresult cuStreamWaitEvent(CUstream h, CUevent ev, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (flags & ~1u)
        return CUDA_ERROR_INVALID_VALUE;
    struct fake_event *e = event_get(ev);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fake_stream *s;
    rc = resolve_stream(h, c, &s);
    if (rc) {
        event_unref(e);
        return rc;
    }
    pthread_mutex_lock(&g_prog_mu);
    uint64_t seq = e->rec_seq;
    int done = e->done_seq >= seq;
    pthread_mutex_unlock(&g_prog_mu);
    if (done) {
        event_unref(e);
    } else {
        struct op *o = calloc(1, sizeof *o);
        if (!o) {
            event_unref(e);
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        } else {
            o->type = OP_WAIT_EVENT;
            o->ev = e;
            o->ev_seq = seq;
            rc = enqueue(s, o);
        }
    }
    stream_unref(s);
    return rc;
}

FC_API CUresult cuEventCreate(CUevent *pe, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!pe || (flags & ~0xfu))
        return CUDA_ERROR_INVALID_VALUE;
    struct fake_event *e = calloc(1, sizeof *e);
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    atomic_init(&e->refs, 1);
    e->ctx = c;
    e->flags = flags;
    pthread_mutex_lock(&g_mu);
    e->reg_next = g_events;
    g_events = e;
    pthread_mutex_unlock(&g_mu);
    atomic_fetch_add(&g_live_events, 1);
    *pe = e;
    return CUDA_SUCCESS;
}

FC_API CUresult cuEventDestroy_v2(CUevent h)
{
    REQUIRE_INIT();
    struct fake_event *found = NULL;
    pthread_mutex_lock(&g_mu);
    for (struct fake_event **pp = &g_events; *pp; pp = &(*pp)->reg_next)
        if (*pp == h) {
            found = h;
            *pp = found->reg_next;
            break;
        }
    pthread_mutex_unlock(&g_mu);
    if (!found)
        return CUDA_ERROR_INVALID_HANDLE;
    atomic_fetch_sub(&g_live_events, 1);
    event_unref(found); /* a pending record keeps it alive until it completes */
    return CUDA_SUCCESS;
}

FC_API CUresult cuEventRecord(CUevent ev, CUstream h)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    struct fake_event *e = event_get(ev);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fake_stream *s;
    rc = resolve_stream(h, c, &s);
    if (rc) {
        event_unref(e);
        return rc;
    }
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        event_unref(e);
        stream_unref(s);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    o->type = OP_EVENT;
    o->ev = e;
    pthread_mutex_lock(&g_prog_mu);
    uint64_t seq = o->ev_seq = ++e->rec_seq;
    pthread_mutex_unlock(&g_prog_mu);
    atomic_fetch_add(&e->refs, 1); /* keep e for the failure path below */
    rc = enqueue(s, o);
    if (rc) {
        pthread_mutex_lock(&g_prog_mu);
        if (e->done_seq < seq)
            e->done_seq = seq;
        pthread_cond_broadcast(&g_prog_cv);
        pthread_mutex_unlock(&g_prog_mu);
    }
    event_unref(e);
    stream_unref(s);
    return rc;
}

FC_API CUresult cuEventQuery(CUevent ev)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    struct fake_event *e = event_get(ev);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    rc = atomic_load(&e->ctx->sticky);
    if (!rc) {
        pthread_mutex_lock(&g_prog_mu);
        rc = e->done_seq >= e->rec_seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
        pthread_mutex_unlock(&g_prog_mu);
    }
    event_unref(e);
    return rc;
}

FC_API CUresult cuEventSynchronize(CUevent ev)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 1);
    if (rc)
        return rc;
    struct fake_event *e = event_get(ev);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&g_prog_mu);
    while (e->done_seq < e->rec_seq)
        pthread_cond_wait(&g_prog_cv, &g_prog_mu);
    pthread_mutex_unlock(&g_prog_mu);
    rc = atomic_load(&e->ctx->sticky);
    event_unref(e);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Pointer attributes                                                        */
/* ------------------------------------------------------------------------ */
static size_t attr_size(int a)
{
    switch (a) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
        return 8;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
    case CU_POINTER_ATTRIBUTE_MAPPED:
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        return 4;
    default:
        return 0;
    }
}

static CUresult attr_get_locked(const struct region *r, uintptr_t p, int a, void *data, int single)
{
    size_t sz = attr_size(a);
    if (!sz || !data)
        return CUDA_ERROR_INVALID_VALUE;
    if (!r) {
        if (single)
            return CUDA_ERROR_INVALID_VALUE;
        memset(data, 0, sz);
        if (a == CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)
            *(int *)data = -2;
        return CUDA_SUCCESS;
    }
    int dev = !is_host_kind(r->kind);
    switch (a) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
        *(CUcontext *)data = r->kind == R_VMM ? NULL : r->ctx;
        break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned *)data = dev ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        *(CUdeviceptr *)data = p;
        break;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (dev && single)
            return CUDA_ERROR_INVALID_VALUE;
        *(void **)data = dev ? NULL : (void *)p;
        break;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
        *(int *)data = r->sync_memops;
        break;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        *(unsigned long long *)data = r->buffer_id;
        break;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
        *(int *)data = 0;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *(int *)data = r->ordinal;
        break;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *(int *)data = r->kind == R_DEV;
        break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        *(CUdeviceptr *)data = r->base;
        break;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
        *(size_t *)data = r->size;
        break;
    case CU_POINTER_ATTRIBUTE_MAPPED:
        *(int *)data = 1;
        break;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
        *(unsigned long long *)data = r->kind == R_VMM ? r->phys->types : 0;
        break;
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(int *)data = r->kind == R_VMM ? r->phys->rdma : dev;
        break;
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        *(int *)data = r->kind != R_VMM ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                       : r->wr_mask     ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                       : r->rd_mask     ? CU_MEM_ACCESS_FLAGS_PROT_READ
                                        : CU_MEM_ACCESS_FLAGS_PROT_NONE;
        break;
    }
    return CUDA_SUCCESS;
}

FC_API CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr)
{
    REQUIRE_INIT();
    pthread_rwlock_rdlock(&g_rw);
    CUresult rc = attr_get_locked(find_region_locked(ptr), ptr, attribute, data, 1);
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuPointerGetAttributes(unsigned int n, int *attributes, void **data, CUdeviceptr ptr)
{
    REQUIRE_INIT();
    if (!n || !attributes || !data)
        return CUDA_ERROR_INVALID_VALUE;
    for (unsigned i = 0; i < n; i++)
        if (!attr_size(attributes[i]))
            return CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked(ptr);
    CUresult rc = CUDA_SUCCESS;
    for (unsigned i = 0; i < n && !rc; i++)
        if (data[i])
            rc = attr_get_locked(r, ptr, attributes[i], data[i], 0);
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuPointerSetAttribute(const void *value, int attribute, CUdeviceptr ptr)
{
    REQUIRE_INIT();
    if (!value || attribute != CU_POINTER_ATTRIBUTE_SYNC_MEMOPS)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked(ptr);
    if (r) {
        r->sync_memops = *(const int *)value != 0;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Legacy IPC                                                                */
/* ------------------------------------------------------------------------ */
FC_API CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr dptr)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!h)
        return CUDA_ERROR_INVALID_VALUE;
    struct ipc_wire w;
    memset(&w, 0, sizeof w);
    rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked(dptr);
    if (r && r->kind == R_DEV && r->base == dptr) {
        w.magic = FC_IPC_MAGIC;
        w.pid = getpid();
        w.fd = r->fd;
        w.ordinal = r->ordinal;
        w.size = r->size;
        w.map_size = r->map_size;
        w.buffer_id = r->buffer_id;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    if (!rc)
        memcpy(h->reserved, &w, sizeof w);
    return rc;
}

static struct region *find_import_locked(unsigned long long bufid)
{
    for (struct region *r = g_regions; r; r = r->next)
        if (r->kind == R_IPC && r->buffer_id == bufid)
            return r;
    return NULL;
}

FC_API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!pdptr || (flags & ~1u))
        return CUDA_ERROR_INVALID_VALUE;
    struct ipc_wire w;
    memcpy(&w, handle.reserved, sizeof w);
    if (w.magic != FC_IPC_MAGIC || !w.size || w.map_size < w.size)
        return CUDA_ERROR_INVALID_VALUE;
    if (w.pid == getpid())
        return CUDA_ERROR_INVALID_CONTEXT;

    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_import_locked(w.buffer_id);
    if (r) {
        r->refs++;
        *pdptr = r->base;
    }
    pthread_rwlock_unlock(&g_rw);
    if (r)
        return CUDA_SUCCESS;

    int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)w.pid, 0);
    if (pidfd < 0)
        return CUDA_ERROR_INVALID_HANDLE;
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, w.fd, 0);
    close(pidfd);
    if (fd < 0)
        return CUDA_ERROR_INVALID_HANDLE;
    unsigned long long bufid, types;
    int ord;
    struct stat st;
    if (memfd_identity(fd, &bufid, &ord, &types) || bufid != w.buffer_id || fstat(fd, &st) ||
        (uint64_t)st.st_size < w.map_size) {
        close(fd);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    r = calloc(1, sizeof *r);
    if (!r || map_pair(fd, w.map_size, 0, &r->base, &r->shadow)) {
        free(r);
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    r->kind = R_IPC;
    r->size = w.size;
    r->map_size = w.map_size;
    r->ctx = c;
    r->ordinal = c->ordinal;
    r->buffer_id = w.buffer_id;
    r->fd = fd;
    r->refs = 1;
    pthread_rwlock_wrlock(&g_rw);
    struct region *other = find_import_locked(w.buffer_id);
    if (other) { /* a concurrent open won */
        other->refs++;
        *pdptr = other->base;
        munmap((void *)r->base, r->map_size);
        munmap(r->shadow, r->map_size);
        close(fd);
        free(r);
    } else {
        r->next = g_regions;
        g_regions = r;
        *pdptr = r->base;
    }
    pthread_rwlock_unlock(&g_rw);
    return CUDA_SUCCESS;
}

FC_API CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    REQUIRE_INIT();
    struct fake_ctx *c = NULL;
    if (!find_exact(dptr, R_IPC, &c))
        return CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked(dptr);
    int last = r && r->kind == R_IPC && r->base == dptr && r->refs == 1;
    if (r && r->kind == R_IPC && r->base == dptr && r->refs > 1)
        r->refs--;
    pthread_rwlock_unlock(&g_rw);
    if (!last)
        return CUDA_SUCCESS;
    drain_ctx(c, 0);
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    r = find_region_locked(dptr);
    if (r && r->kind == R_IPC && r->base == dptr) {
        if (--r->refs == 0)
            region_destroy_locked(r);
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Virtual memory management                                                 */
/* ------------------------------------------------------------------------ */
static CUresult check_prop(const CUmemAllocationProp *prop)
{
    if (!prop || prop->type != 1 || prop->location.type != 1)
        return CUDA_ERROR_INVALID_VALUE;
    if (!dev_ok(prop->location.id))
        return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

FC_API CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop, int option)
{
    REQUIRE_INIT();
    if (!g || (option != 0 && option != 1))
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_prop(prop);
    if (rc)
        return rc;
    *g = FC_GRANULARITY;
    return CUDA_SUCCESS;
}

FC_API CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
                            unsigned long long flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (!h || flags || !size || size % FC_GRANULARITY)
        return CUDA_ERROR_INVALID_VALUE;
    rc = check_prop(prop);
    if (rc)
        return rc;
    unsigned long long types = (unsigned)prop->requestedHandleTypes;
    if (types & (CU_MEM_HANDLE_TYPE_WIN32 | CU_MEM_HANDLE_TYPE_WIN32_KMT | CU_MEM_HANDLE_TYPE_FABRIC))
        return CUDA_ERROR_NOT_SUPPORTED;
    if (types & ~(unsigned long long)CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_INVALID_VALUE;
    int ord = prop->location.id;
    if (size > FC_TOTAL_MEM || reserve_mem(ord, size))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct phys *p = calloc(1, sizeof *p);
    unsigned long long id = new_buffer_id();
    int fd = p ? new_memfd(size, id, ord, types) : -1;
    if (fd < 0) {
        free(p);
        unreserve_mem(ord, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    p->handle = 0xfc00000000000000ull | (atomic_fetch_add(&g_handlectr, 1) + 1);
    p->handle_refs = 1;
    p->fd = fd;
    p->size = size;
    p->ordinal = ord;
    p->buffer_id = id;
    p->types = types;
    p->rdma = prop->allocFlags.gpuDirectRDMACapable;
    p->prop = *prop;
    pthread_rwlock_wrlock(&g_rw);
    p->next = g_phys;
    g_phys = p;
    pthread_rwlock_unlock(&g_rw);
    *h = p->handle;
    return CUDA_SUCCESS;
}

FC_API CUresult cuMemRelease(CUmemGenericAllocationHandle h)
{
    REQUIRE_INIT();
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct phys *p = phys_find_locked(h);
    if (p) {
        p->handle_refs--;
        phys_maybe_free_locked(p);
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                    unsigned long long flags)
{
    REQUIRE_INIT();
    if (!ptr || !size || size % FC_GRANULARITY || flags || (alignment & (alignment - 1)))
        return CUDA_ERROR_INVALID_VALUE;
    size_t align = alignment < FC_GRANULARITY ? FC_GRANULARITY : alignment;
    if (size + align < size)
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct resv *v = calloc(1, sizeof *v);
    if (!v)
        return CUDA_ERROR_OUT_OF_MEMORY;
    const int mf = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    uintptr_t base = 0;
    if (addr && addr % align == 0) {
        void *m = mmap((void *)(uintptr_t)addr, size, PROT_NONE, mf | MAP_FIXED_NOREPLACE, -1, 0);
        if (m != MAP_FAILED) {
            if ((uintptr_t)m == addr)
                base = addr;
            else
                munmap(m, size);
        }
    }
    if (!base) {
        void *m = mmap(NULL, size + align, PROT_NONE, mf, -1, 0);
        if (m == MAP_FAILED) {
            free(v);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        uintptr_t s0 = (uintptr_t)m, end = s0 + size + align;
        base = (s0 + align - 1) & ~(uintptr_t)(align - 1);
        if (base > s0)
            munmap(m, base - s0);
        if (end > base + size)
            munmap((void *)(base + size), end - base - size);
    }
    v->base = base;
    v->size = size;
    pthread_rwlock_wrlock(&g_rw);
    v->next = g_resv;
    g_resv = v;
    pthread_rwlock_unlock(&g_rw);
    *ptr = base;
    return CUDA_SUCCESS;
}

FC_API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    REQUIRE_INIT();
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    for (struct resv **pp = &g_resv; *pp; pp = &(*pp)->next) {
        struct resv *v = *pp;
        if (v->base != ptr || v->size != size)
            continue;
        int mapped = 0;
        for (struct region *r = g_regions; r; r = r->next)
            if (r->kind == R_VMM && r->resv == v)
                mapped = 1;
        if (!mapped) { /* unmap first, or it is an error */
            *pp = v->next;
            retire_range_locked(v->base, v->size);
            free(v);
            rc = CUDA_SUCCESS;
        }
        break;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                         unsigned long long flags)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (flags || offset || !size || size % FC_GRANULARITY || ptr % FC_GRANULARITY || ptr + size < ptr)
        return CUDA_ERROR_INVALID_VALUE;
    struct region *r = calloc(1, sizeof *r);
    if (!r)
        return CUDA_ERROR_OUT_OF_MEMORY;
    rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct phys *p = phys_find_locked(h);
    struct resv *v = NULL;
    if (p && size <= p->size)
        for (v = g_resv; v; v = v->next)
            if (ptr >= v->base && ptr + size <= v->base + v->size)
                break;
    if (v) {
        int busy = 0;
        for (struct region *x = g_regions; x; x = x->next)
            if (x->kind == R_VMM && overlaps(ptr, size, x->base, x->map_size))
                busy = 1;
        if (!busy) {
            if (map_pair(p->fd, size, ptr, &r->base, &r->shadow)) {
                rc = CUDA_ERROR_OUT_OF_MEMORY;
            } else {
                r->kind = R_VMM;
                r->size = size;
                r->map_size = size;
                r->ordinal = p->ordinal;
                r->buffer_id = p->buffer_id;
                r->fd = -1;
                r->phys = p;
                r->resv = v;
                p->map_count++;
                r->next = g_regions;
                g_regions = r;
                r = NULL;
                rc = CUDA_SUCCESS;
            }
        }
    }
    pthread_rwlock_unlock(&g_rw);
    free(r);
    return rc;
}

FC_API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    REQUIRE_INIT();
    if (!size || ptr + size < ptr)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_SUCCESS;
    int found = 0;
    pthread_rwlock_wrlock(&g_rw);
    for (struct region *r = g_regions; r; r = r->next)
        if (r->kind == R_VMM && overlaps(ptr, size, r->base, r->map_size)) {
            if (r->base < ptr || r->base + r->map_size > ptr + size)
                rc = CUDA_ERROR_INVALID_VALUE; /* partial unmap */
            found = 1;
        }
    if (!found)
        rc = CUDA_ERROR_INVALID_VALUE;
    while (!rc) {
        struct region *r;
        for (r = g_regions; r; r = r->next)
            if (r->kind == R_VMM && overlaps(ptr, size, r->base, r->map_size))
                break;
        if (!r)
            break;
        region_destroy_locked(r);
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    REQUIRE_INIT();
    if (!desc || !count || !size || ptr + size < ptr)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < count; i++) {
        if (desc[i].location.type != 1)
            return CUDA_ERROR_INVALID_VALUE;
        if (!dev_ok(desc[i].location.id))
            return CUDA_ERROR_INVALID_DEVICE;
        if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_NONE && desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            return CUDA_ERROR_INVALID_VALUE;
    }
    CUresult rc = CUDA_SUCCESS;
    pthread_rwlock_wrlock(&g_rw);
    /* the whole range must be mapped */
    for (uintptr_t a = ptr; a < ptr + size;) {
        struct region *r = find_region_locked(a);
        if (!r || r->kind != R_VMM) {
            rc = CUDA_ERROR_INVALID_VALUE;
            break;
        }
        a = r->base + r->map_size;
    }
    for (uintptr_t a = ptr; !rc && a < ptr + size;) {
        struct region *r = find_region_locked(a);
        for (size_t i = 0; i < count; i++) {
            uint64_t bit = 1ull << desc[i].location.id;
            if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_NONE) {
                r->rd_mask &= ~bit;
                r->wr_mask &= ~bit;
            } else if (desc[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READ) {
                r->rd_mask |= bit;
                r->wr_mask &= ~bit;
            } else {
                r->rd_mask |= bit;
                r->wr_mask |= bit;
            }
        }
        a = r->base + r->map_size;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr)
{
    REQUIRE_INIT();
    if (!h)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_wrlock(&g_rw);
    struct region *r = find_region_locked((uintptr_t)addr);
    if (r && r->kind == R_VMM) {
        r->phys->handle_refs++;
        *h = r->phys->handle;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle h)
{
    REQUIRE_INIT();
    if (!prop)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_rwlock_rdlock(&g_rw);
    struct phys *p = phys_find_locked(h);
    if (p) {
        *prop = p->prop;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemExportToShareableHandle(void *shareableHandle, CUmemGenericAllocationHandle h, int handleType,
                                             unsigned long long flags)
{
    REQUIRE_INIT();
    if (!shareableHandle || flags)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc;
    pthread_rwlock_rdlock(&g_rw);
    struct phys *p = phys_find_locked(h);
    if (!p) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else if (handleType == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) {
        if (!(p->types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) {
            rc = CUDA_ERROR_NOT_SUPPORTED;
        } else {
            int fd = dup(p->fd); /* owned by the caller, no FD_CLOEXEC */
            rc = fd < 0 ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
            if (fd >= 0)
                *(int *)shareableHandle = fd;
        }
    } else if (handleType == CU_MEM_HANDLE_TYPE_FABRIC || handleType == CU_MEM_HANDLE_TYPE_WIN32 ||
               handleType == CU_MEM_HANDLE_TYPE_WIN32_KMT) {
        rc = CUDA_ERROR_NOT_SUPPORTED;
    } else {
        rc = CUDA_ERROR_INVALID_VALUE;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *osHandle, int shHandleType)
{
    REQUIRE_INIT();
    if (!h)
        return CUDA_ERROR_INVALID_VALUE;
    if (shHandleType == CU_MEM_HANDLE_TYPE_FABRIC || shHandleType == CU_MEM_HANDLE_TYPE_WIN32 ||
        shHandleType == CU_MEM_HANDLE_TYPE_WIN32_KMT)
        return CUDA_ERROR_NOT_SUPPORTED;
    if (shHandleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_INVALID_VALUE;
    int fd = (int)(intptr_t)osHandle;
    unsigned long long bufid, types;
    int ord;
    struct stat st;
    if (fd < 0 || memfd_identity(fd, &bufid, &ord, &types) || fstat(fd, &st) || st.st_size <= 0 ||
        (size_t)st.st_size % FC_GRANULARITY)
        return CUDA_ERROR_INVALID_VALUE;
    struct phys *p = calloc(1, sizeof *p);
    int nfd = p ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (nfd < 0) {
        free(p);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    p->handle = 0xfc00000000000000ull | (atomic_fetch_add(&g_handlectr, 1) + 1);
    p->handle_refs = 1;
    p->fd = nfd;
    p->size = (size_t)st.st_size;
    p->ordinal = ord;
    p->imported = 1;
    p->buffer_id = bufid;
    p->types = types;
    p->rdma = 0;
    p->prop.type = 1;
    p->prop.requestedHandleTypes = (int)types;
    p->prop.location.type = 1;
    p->prop.location.id = ord;
    pthread_rwlock_wrlock(&g_rw);
    p->next = g_phys;
    g_phys = p;
    pthread_rwlock_unlock(&g_rw);
    *h = p->handle;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Test control functions (not CUDA)                                         */
/* ------------------------------------------------------------------------ */
FC_API void fake_cuda_set_copy_delay_us(unsigned us) { atomic_store(&g_delay_us, us); }

FC_API void fake_cuda_fail_after_copies(long n, int cuda_error)
{
    atomic_store(&g_fail_err, cuda_error ? cuda_error : CUDA_ERROR_ILLEGAL_ADDRESS);
    atomic_store(&g_fail_after, n < 0 ? -1 : n);
}

FC_API void fake_cuda_pause_streams(int paused)
{
    pthread_mutex_lock(&g_prog_mu);
    g_paused = paused != 0;
    pthread_cond_broadcast(&g_prog_cv);
    pthread_mutex_unlock(&g_prog_mu);
}

FC_API unsigned long long fake_cuda_copies(void) { return atomic_load(&g_copies); }
FC_API unsigned long long fake_cuda_bytes_copied(void) { return atomic_load(&g_bytes); }
FC_API unsigned long long fake_cuda_pending_copies(void) { return (unsigned long long)atomic_load(&g_pending); }

FC_API unsigned long long fake_cuda_live_allocations(void)
{
    unsigned long long n = 0;
    pthread_rwlock_rdlock(&g_rw);
    for (struct region *r = g_regions; r; r = r->next)
        n += r->kind == R_DEV || r->kind == R_HOST || r->kind == R_HOSTREG;
    for (struct phys *p = g_phys; p; p = p->next)
        n++;
    for (struct resv *v = g_resv; v; v = v->next)
        n++;
    pthread_rwlock_unlock(&g_rw);
    return n;
}

FC_API unsigned long long fake_cuda_live_ipc_imports(void)
{
    unsigned long long n = 0;
    pthread_rwlock_rdlock(&g_rw);
    for (struct region *r = g_regions; r; r = r->next)
        n += r->kind == R_IPC;
    pthread_rwlock_unlock(&g_rw);
    return n;
}

/* ------------------------------------------------------------------------ */
/* GPUDirect RDMA                                                            */
/* ------------------------------------------------------------------------ */
static atomic_ullong g_rdma_flushes;
static atomic_int g_no_dmabuf;

FC_API void fake_cuda_refuse_dmabuf(int refuse) { atomic_store(&g_no_dmabuf, refuse); }

FC_API CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr dptr, size_t size, int handleType,
                                              unsigned long long flags)
{
    REQUIRE_INIT();
    if (!handle || handleType != 1 /* CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD */ || flags || !size ||
        size % page_size())
        return CUDA_ERROR_INVALID_VALUE;
    if (getenv("FAKE_CUDA_NO_DMABUF") || atomic_load(&g_no_dmabuf))
        return CUDA_ERROR_NOT_SUPPORTED;
    CUresult rc;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked((uintptr_t)dptr);
    if (!r || r->kind == R_HOST || r->kind == R_HOSTREG) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else if (r->kind != R_DEV) {
        rc = CUDA_ERROR_NOT_SUPPORTED; /* the fake's limit: VMM, IPC imports */
    } else if ((uintptr_t)dptr != r->base || size > r->map_size) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else {
        int fd = fcntl(r->fd, F_DUPFD_CLOEXEC, 0);
        rc = fd < 0 ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
        if (fd >= 0)
            *(int *)handle = fd;
    }
    pthread_rwlock_unlock(&g_rw);
    return rc;
}

FC_API CUresult cuFlushGPUDirectRDMAWrites(int target, int scope)
{
    struct fake_ctx *c;
    CUresult rc = get_ctx(&c, 0);
    if (rc)
        return rc;
    if (target != 0 || (scope != 100 && scope != 200))
        return CUDA_ERROR_INVALID_VALUE;
    atomic_fetch_add(&g_rdma_flushes, 1);
    return CUDA_SUCCESS;
}

FC_API unsigned long long fake_cuda_rdma_flushes(void) { return atomic_load(&g_rdma_flushes); }

/* Mappings of VMM chunks imported from a shareable handle (another process's memory). */
FC_API unsigned long long fake_cuda_live_vmm_imports(void)
{
    unsigned long long n = 0;
    pthread_rwlock_rdlock(&g_rw);
    for (struct region *r = g_regions; r; r = r->next)
        n += r->kind == R_VMM && r->phys && r->phys->imported;
    pthread_rwlock_unlock(&g_rw);
    return n;
}

FC_API unsigned long long fake_cuda_live_streams(void) { return atomic_load(&g_live_streams); }
FC_API unsigned long long fake_cuda_live_events(void) { return atomic_load(&g_live_events); }

FC_API void *fake_cuda_shadow(unsigned long long dptr)
{
    void *p = NULL;
    pthread_rwlock_rdlock(&g_rw);
    struct region *r = find_region_locked(dptr);
    if (r)
        p = is_host_kind(r->kind) ? (void *)(uintptr_t)dptr : r->shadow + (dptr - r->base);
    pthread_rwlock_unlock(&g_rw);
    return p;
}
