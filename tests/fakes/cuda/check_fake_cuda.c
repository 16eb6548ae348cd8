/*
 * check_fake_cuda.c - tests the fake CUDA driver (fake_cuda.c) itself.
 *
 * Linked directly against libfakecuda.so (scripts/build-fakes.sh --check
 * builds and runs it). Exit status 0 when everything passed; otherwise every
 * failed check is printed to stderr and the status is 1.
 *
 * Cross-process tests re-execute this program (/proc/self/exe) with a role
 * argument (--child-legacy, --child-vmm, --child-env, --child-nodev) and talk
 * to it over a SOCK_SEQPACKET socketpair. Every wait is bounded (poll
 * timeouts, children run under alarm()); "still pending" states are made
 * deterministic with fake_cuda_pause_streams, not with sleeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ---- the CUDA driver API as the real cuda.h declares it (x86-64) ---- */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage; unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

CUresult cuInit(unsigned);
CUresult cuDriverGetVersion(int *);
CUresult cuGetErrorName(CUresult, const char **);
CUresult cuGetErrorString(CUresult, const char **);
CUresult cuGetProcAddress_v2(const char *, void **, int, unsigned long long, int *);
CUresult cuGetProcAddress(const char *, void **, int, unsigned long long);
CUresult cuDeviceGetCount(int *);
CUresult cuDeviceGet(CUdevice *, int);
CUresult cuDeviceGetName(char *, int, CUdevice);
CUresult cuDeviceGetAttribute(int *, int, CUdevice);
CUresult cuDeviceTotalMem_v2(size_t *, CUdevice);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice);
CUresult cuDevicePrimaryCtxReset_v2(CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuCtxGetCurrent(CUcontext *);
CUresult cuCtxPushCurrent_v2(CUcontext);
CUresult cuCtxPopCurrent_v2(CUcontext *);
CUresult cuCtxGetDevice(CUdevice *);
CUresult cuCtxSynchronize(void);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemGetAddressRange_v2(CUdeviceptr *, size_t *, CUdeviceptr);
CUresult cuMemHostAlloc(void **, size_t, unsigned);
CUresult cuMemFreeHost(void *);
CUresult cuMemHostRegister_v2(void *, size_t, unsigned);
CUresult cuMemHostUnregister(void *);
CUresult cuMemcpy(CUdeviceptr, CUdeviceptr, size_t);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void *, size_t);
CUresult cuMemcpyDtoH_v2(void *, CUdeviceptr, size_t);
CUresult cuMemcpyDtoD_v2(CUdeviceptr, CUdeviceptr, size_t);
CUresult cuMemsetD8_v2(CUdeviceptr, unsigned char, size_t);
CUresult cuMemcpyAsync(CUdeviceptr, CUdeviceptr, size_t, CUstream);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void *, size_t, CUstream);
CUresult cuMemcpyDtoHAsync_v2(void *, CUdeviceptr, size_t, CUstream);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, size_t, CUstream);
CUresult cuStreamCreate(CUstream *, unsigned);
CUresult cuStreamDestroy_v2(CUstream);
CUresult cuStreamSynchronize(CUstream);
CUresult cuStreamQuery(CUstream);
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned);
CUresult cuEventCreate(CUevent *, unsigned);
CUresult cuEventDestroy_v2(CUevent);
CUresult cuEventRecord(CUevent, CUstream);
CUresult cuEventQuery(CUevent);
CUresult cuEventSynchronize(CUevent);
CUresult cuPointerGetAttribute(void *, int, CUdeviceptr);
CUresult cuPointerGetAttributes(unsigned, int *, void **, CUdeviceptr);
CUresult cuPointerSetAttribute(const void *, int, CUdeviceptr);
CUresult cuIpcGetMemHandle(CUipcMemHandle *, CUdeviceptr);
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *, CUipcMemHandle, unsigned);
CUresult cuIpcCloseMemHandle(CUdeviceptr);
CUresult cuMemGetAllocationGranularity(size_t *, const CUmemAllocationProp *, int);
CUresult cuMemCreate(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
CUresult cuMemRelease(CUmemGenericAllocationHandle);
CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemAddressFree(CUdeviceptr, size_t);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemSetAccess(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *, void *);
CUresult cuMemExportToShareableHandle(void *, CUmemGenericAllocationHandle, int, unsigned long long);
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *, void *, int);

void fake_cuda_set_copy_delay_us(unsigned);
void fake_cuda_fail_after_copies(long, int);
void fake_cuda_pause_streams(int);
unsigned long long fake_cuda_copies(void);
unsigned long long fake_cuda_bytes_copied(void);
unsigned long long fake_cuda_live_allocations(void);
unsigned long long fake_cuda_live_ipc_imports(void);
unsigned long long fake_cuda_live_vmm_imports(void);
unsigned long long fake_cuda_live_streams(void);
unsigned long long fake_cuda_live_events(void);
void *fake_cuda_shadow(unsigned long long);
CUresult cuMemGetHandleForAddressRange(void *, CUdeviceptr, size_t, int, unsigned long long);
CUresult cuFlushGPUDirectRDMAWrites(int, int);
unsigned long long fake_cuda_rdma_flushes(void);

enum {
    A_CONTEXT = 1, A_MEMTYPE = 2, A_DEVPTR = 3, A_HOSTPTR = 4, A_SYNC_MEMOPS = 6, A_BUFFER_ID = 7, A_MANAGED = 8,
    A_ORDINAL = 9, A_LEGACY_IPC = 10, A_RANGE_START = 11, A_RANGE_SIZE = 12, A_MAPPED = 13, A_HANDLE_TYPES = 14,
};
#define MiB (1024ull * 1024ull)
#define GRAN (2 * MiB)

/* ---- checking helpers ---- */
static int failures;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);           \
            failures++;                                                               \
        }                                                                             \
    } while (0)
#define CK(call, want)                                                                \
    do {                                                                              \
        int r_ = (call);                                                              \
        if (r_ != (want)) {                                                           \
            fprintf(stderr, "FAIL %s:%d: %s returned %d, expected %d\n", __FILE__,    \
                    __LINE__, #call, r_, (want));                                     \
            failures++;                                                               \
        }                                                                             \
    } while (0)
#define OK(call) CK(call, 0)
/* for set-up steps the rest of a test depends on */
#define REQ(call)                                                                     \
    do {                                                                              \
        int r_ = (call);                                                              \
        if (r_ != 0) {                                                                \
            fprintf(stderr, "FATAL %s:%d: %s returned %d\n", __FILE__, __LINE__,      \
                    #call, r_);                                                       \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static void fill(unsigned char *p, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 31u + (unsigned)seed * 7u + (i >> 9));
}

static int matches(const unsigned char *p, size_t n, int seed, size_t offset)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)((i + offset) * 31u + (unsigned)seed * 7u + ((i + offset) >> 9)))
            return 0;
    return 1;
}

static unsigned char *xmalloc(size_t n)
{
    unsigned char *p = malloc(n);
    if (!p) {
        fprintf(stderr, "FATAL: out of memory\n");
        exit(1);
    }
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Waits at most 60 s for a child; kills it past that. */
static int wait_child(pid_t pid, int *st)
{
    for (int i = 0; i < 6000; i++) {
        pid_t r = waitpid(pid, st, WNOHANG);
        if (r == pid)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
        poll(NULL, 0, 10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, st, 0);
    fprintf(stderr, "child %d timed out\n", (int)pid);
    return -1;
}

/* Whether a CPU access to p dies with SIGSEGV (checked in a forked child). */
static int faults(CUdeviceptr p, int write)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return 0;
    if (pid == 0) {
        struct rlimit rl = { 0, 0 };
        setrlimit(RLIMIT_CORE, &rl);
        alarm(20);
        volatile unsigned char *q = (volatile unsigned char *)(uintptr_t)p;
        if (write)
            *q = 1;
        else
            (void)*q;
        _exit(0);
    }
    int st = 0;
    if (wait_child(pid, &st))
        return 0;
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV;
}

static int send_msg(int sock, const void *buf, size_t len, int fd)
{
    struct iovec iov = { (void *)buf, len };
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct msghdr m = { 0 };
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&u, 0, sizeof u);
        m.msg_control = u.b;
        m.msg_controllen = sizeof u.b;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    return sendmsg(sock, &m, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

/* Receives exactly one message of len bytes within 30 s. */
static int recv_msg(int sock, void *buf, size_t len, int *fd)
{
    struct pollfd p = { sock, POLLIN, 0 };
    int r;
    do
        r = poll(&p, 1, 30000);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        return -1;
    struct iovec iov = { buf, len };
    union { char b[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct msghdr m = { 0 };
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    if (n != (ssize_t)len)
        return -1;
    if (fd) {
        *fd = -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(fd, CMSG_DATA(c), sizeof(int));
        if (*fd < 0)
            return -1;
    }
    return 0;
}

/* Starts this program again with a role; *sock gets the parent's end. */
static pid_t spawn(const char *role, int *sock, char **envp)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv))
        return -1;
    fcntl(sv[0], F_SETFD, FD_CLOEXEC);
    char fdarg[16];
    snprintf(fdarg, sizeof fdarg, "%d", sv[1]);
    char *args[] = { "check_fake_cuda", (char *)role, fdarg, NULL };
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        execve("/proc/self/exe", args, envp ? envp : environ);
        _exit(127);
    }
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        return -1;
    }
    *sock = sv[0];
    return pid;
}

static int finish_child(pid_t pid, const char *what)
{
    int st = 0;
    if (wait_child(pid, &st) || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "FAIL: %s child ended badly (status 0x%x)\n", what, st);
        failures++;
        return -1;
    }
    return 0;
}

/* ======================================================================== */
/* Children                                                                 */
/* ======================================================================== */
#define LEG_N (4 * MiB + 100)
struct legacy_msg { CUipcMemHandle h; unsigned long long bufid; unsigned long long size; };
struct vmm_msg { unsigned long long bufid; unsigned long long size; };

static int child_setup(CUcontext *ctx)
{
    alarm(60);
    return cuInit(0) || cuDevicePrimaryCtxRetain(ctx, 0) || cuCtxSetCurrent(*ctx);
}

static int child_legacy(int sock)
{
    CUcontext ctx;
    CUdeviceptr d;
    if (child_setup(&ctx) || cuMemAlloc_v2(&d, LEG_N))
        return 10;
    unsigned char *buf = xmalloc(LEG_N);
    fill(buf, LEG_N, 1);
    struct legacy_msg m = { 0 };
    m.size = LEG_N;
    if (cuMemcpyHtoD_v2(d, buf, LEG_N) || cuIpcGetMemHandle(&m.h, d) ||
        cuPointerGetAttribute(&m.bufid, A_BUFFER_ID, d))
        return 11;
    if (send_msg(sock, &m, sizeof m, -1))
        return 12;
    char c;
    if (recv_msg(sock, &c, 1, NULL) || c != 'G')
        return 13;
    memset(buf, 0, LEG_N);
    if (cuMemcpyDtoH_v2(buf, d, LEG_N))
        return 14;
    size_t half = LEG_N / 2;
    char verdict = matches(buf, half, 1, 0) && matches(buf + half, LEG_N - half, 2, 0) ? 'K' : 'F';
    if (send_msg(sock, &verdict, 1, -1))
        return 15;
    if (recv_msg(sock, &c, 1, NULL) || c != 'Q')
        return 16;
    free(buf);
    if (cuMemFree_v2(d) || cuDevicePrimaryCtxRelease_v2(0))
        return 17;
    return 0;
}

static int child_vmm(int sock)
{
    CUcontext ctx;
    if (child_setup(&ctx))
        return 10;
    CUmemAllocationProp prop = { 0 };
    prop.type = 1;
    prop.requestedHandleTypes = 1;
    prop.location.type = 1;
    prop.location.id = 0;
    size_t n = 2 * GRAN;
    CUmemGenericAllocationHandle h;
    CUdeviceptr va;
    CUmemAccessDesc acc = { { 1, 0 }, 3 };
    if (cuMemCreate(&h, n, &prop, 0) || cuMemAddressReserve(&va, n, 0, 0, 0) || cuMemMap(va, n, 0, h, 0) ||
        cuMemSetAccess(va, n, &acc, 1))
        return 11;
    unsigned char *buf = xmalloc(n);
    fill(buf, n, 3);
    struct vmm_msg m = { 0, n };
    int fd = -1;
    if (cuMemcpyHtoD_v2(va, buf, n) || cuPointerGetAttribute(&m.bufid, A_BUFFER_ID, va) ||
        cuMemExportToShareableHandle(&fd, h, 1, 0))
        return 12;
    if (send_msg(sock, &m, sizeof m, fd))
        return 13;
    close(fd);
    char c;
    if (recv_msg(sock, &c, 1, NULL) || c != 'G')
        return 14;
    if (cuMemcpyDtoH_v2(buf, va, n))
        return 15;
    char verdict = matches(buf, n / 2, 3, 0) && matches(buf + n / 2, n / 2, 4, 0) ? 'K' : 'F';
    if (send_msg(sock, &verdict, 1, -1))
        return 16;
    if (recv_msg(sock, &c, 1, NULL) || c != 'Q')
        return 17;
    free(buf);
    if (cuMemUnmap(va, n) || cuMemRelease(h) || cuMemAddressFree(va, n) || cuDevicePrimaryCtxRelease_v2(0))
        return 18;
    return 0;
}

/* FAKE_CUDA_DEVICES=3 FAKE_CUDA_FAIL_AFTER_COPIES=1 */
static int child_env(void)
{
    CUcontext ctx;
    int n = 0;
    if (child_setup(&ctx) || cuDeviceGetCount(&n) || n != 3)
        return 10;
    CUdeviceptr d;
    char b[16] = { 0 };
    if (cuMemAlloc_v2(&d, 16) || cuMemcpyHtoD_v2(d, b, 16))
        return 11;
    if (cuMemcpyHtoD_v2(d, b, 16) != 700 || cuCtxSynchronize() != 700)
        return 12;
    return 0;
}

/* FAKE_CUDA_DEVICES=0 */
static int child_nodev(void)
{
    alarm(60);
    int n;
    if (cuInit(0) != 100 || cuDeviceGetCount(&n) != 3)
        return 10;
    return 0;
}

/* ======================================================================== */
/* Tests in this process                                                    */
/* ======================================================================== */
static CUcontext g_c0, g_c1;

static void test_preinit(void)
{
    int n, v;
    CUdeviceptr d;
    const char *s;
    void *fn;
    int st = -1;
    CK(cuDeviceGetCount(&n), 3);
    CK(cuMemAlloc_v2(&d, 16), 3);
    CK(cuCtxSetCurrent(NULL), 3);
    OK(cuDriverGetVersion(&v));
    CHECK(v == 12040);
    OK(cuGetErrorName(700, &s));
    CHECK(s && !strcmp(s, "CUDA_ERROR_ILLEGAL_ADDRESS"));
    OK(cuGetErrorString(201, &s));
    CHECK(s && !strcmp(s, "invalid device context"));
    CK(cuGetErrorName(12345, &s), 1);
    CHECK(s == NULL);
    OK(cuGetProcAddress_v2("cuMemAlloc", &fn, 12040, 0, &st));
    CHECK(fn == (void *)cuMemAlloc_v2 && st == 0);
    OK(cuGetProcAddress_v2("cuInit", &fn, 12040, 0, &st));
    CHECK(fn == (void *)cuInit);
    OK(cuGetProcAddress_v2("cuGetProcAddress", &fn, 12040, 0, &st));
    CHECK(fn == (void *)cuGetProcAddress_v2);
    OK(cuGetProcAddress("cuStreamDestroy", &fn, 12040, 0));
    CHECK(fn == (void *)cuStreamDestroy_v2);
    CK(cuGetProcAddress_v2("cuNoSuchFunction", &fn, 12040, 0, &st), 500);
    CHECK(fn == NULL && st == 1);
    CK(cuGetProcAddress_v2("fake_cuda_copies", &fn, 12040, 0, &st), 500);
}

static void test_env_children(void)
{
    /* environments for the children: ours minus FAKE_CUDA_*, plus overrides */
    size_t n = 0;
    while (environ[n])
        n++;
    char **e_env = calloc(n + 4, sizeof *e_env), **e_nodev = calloc(n + 2, sizeof *e_nodev);
    if (!e_env || !e_nodev)
        exit(1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "FAKE_CUDA_", 10)) {
            e_env[k] = e_nodev[k] = environ[i];
            k++;
        }
    e_env[k] = "FAKE_CUDA_DEVICES=3";
    e_env[k + 1] = "FAKE_CUDA_FAIL_AFTER_COPIES=1";
    e_nodev[k] = "FAKE_CUDA_DEVICES=0";
    int sock;
    pid_t pid = spawn("--child-env", &sock, e_env);
    CHECK(pid > 0);
    if (pid > 0) {
        close(sock);
        finish_child(pid, "env (FAKE_CUDA_DEVICES=3 FAKE_CUDA_FAIL_AFTER_COPIES=1)");
    }
    pid = spawn("--child-nodev", &sock, e_nodev);
    CHECK(pid > 0);
    if (pid > 0) {
        close(sock);
        finish_child(pid, "nodev (FAKE_CUDA_DEVICES=0)");
    }
    free(e_env);
    free(e_nodev);
}

static void test_devices_and_contexts(void)
{
    int n, v;
    char name[64];
    size_t total;
    CUdevice d;
    CUcontext c;
    OK(cuDeviceGetCount(&n));
    CHECK(n == 2);
    OK(cuDeviceGet(&d, 1));
    CHECK(d == 1);
    CK(cuDeviceGet(&d, 2), 101);
    OK(cuDeviceGetName(name, sizeof name, 1));
    CHECK(!strcmp(name, "Fake GPU 1"));
    OK(cuDeviceGetAttribute(&v, 41, 0));
    CHECK(v == 1);
    OK(cuDeviceGetAttribute(&v, 33, 1));
    CHECK(v == 1);
    OK(cuDeviceGetAttribute(&v, 5, 0));
    CHECK(v == 0);
    OK(cuDeviceTotalMem_v2(&total, 0));
    CHECK(total == 80ull << 30);

    /* no current context yet */
    CUdeviceptr p;
    CUstream s;
    void *hp;
    OK(cuCtxGetCurrent(&c));
    CHECK(c == NULL);
    CK(cuMemAlloc_v2(&p, 16), 201);
    CK(cuStreamCreate(&s, 0), 201);
    CK(cuMemHostAlloc(&hp, 16, 0), 201);
    CK(cuCtxGetDevice(&d), 201);
    CK(cuCtxSynchronize(), 201);

    REQ(cuDevicePrimaryCtxRetain(&g_c0, 0));
    REQ(cuDevicePrimaryCtxRetain(&g_c1, 1));
    CHECK(g_c0 != g_c1);
    OK(cuDevicePrimaryCtxRetain(&c, 0));
    CHECK(c == g_c0);
    OK(cuDevicePrimaryCtxRelease_v2(0));
    OK(cuCtxPushCurrent_v2(g_c1));
    OK(cuCtxGetDevice(&d));
    CHECK(d == 1);
    OK(cuCtxPopCurrent_v2(&c));
    CHECK(c == g_c1);
    CK(cuCtxPopCurrent_v2(&c), 201);
    REQ(cuCtxSetCurrent(g_c0));
    OK(cuCtxGetDevice(&d));
    CHECK(d == 0);
    CK(cuCtxSetCurrent((CUcontext)(uintptr_t)0x1234), 201);
}

static void test_memory(void)
{
    size_t n = MiB + 123;
    CUdeviceptr d, d2;
    REQ(cuMemAlloc_v2(&d, n));
    REQ(cuMemAlloc_v2(&d2, n));
    unsigned char *a = xmalloc(n), *b = xmalloc(n);
    fill(a, n, 5);
    unsigned long long c0 = fake_cuda_copies(), b0 = fake_cuda_bytes_copied();

    /* attributes */
    unsigned memtype = 0;
    int ordinal = -1, legacy = -1, mapped = -1, managed = -1;
    CUcontext ctx = NULL;
    CUdeviceptr start = 0, devptr = 0;
    size_t rsize = 0;
    unsigned long long bufid = 0, bufid2 = 0, types = 99;
    void *hostp = (void *)1;
    int attrs[] = { A_CONTEXT, A_MEMTYPE, A_DEVPTR, A_HOSTPTR, A_BUFFER_ID, A_MANAGED, A_ORDINAL,
                    A_LEGACY_IPC, A_RANGE_START, A_RANGE_SIZE, A_MAPPED, A_HANDLE_TYPES };
    void *vals[] = { &ctx, &memtype, &devptr, &hostp, &bufid, &managed, &ordinal,
                     &legacy, &start, &rsize, &mapped, &types };
    OK(cuPointerGetAttributes(12, attrs, vals, d + 100));
    CHECK(ctx == g_c0 && memtype == 2 && devptr == d + 100 && hostp == NULL && bufid != 0 && managed == 0);
    CHECK(ordinal == 0 && legacy == 1 && start == d && rsize == n && mapped == 1 && types == 0);
    OK(cuPointerGetAttribute(&bufid2, A_BUFFER_ID, d2));
    CHECK(bufid2 != bufid);
    CK(cuPointerGetAttribute(&hostp, A_HOSTPTR, d), 1);
    int one = 1, sync = 0;
    OK(cuPointerSetAttribute(&one, A_SYNC_MEMOPS, d));
    OK(cuPointerGetAttribute(&sync, A_SYNC_MEMOPS, d));
    CHECK(sync == 1);

    /* foreign (host) pointer */
    memtype = 77;
    ordinal = 77;
    bufid = 77;
    OK(cuPointerGetAttributes(12, attrs, vals, (CUdeviceptr)(uintptr_t)a));
    CHECK(memtype == 0 && ordinal == -2 && bufid == 0 && ctx == NULL && start == 0);
    CK(cuPointerGetAttribute(&memtype, A_MEMTYPE, (CUdeviceptr)(uintptr_t)a), 1);
    /* attributes need no current context */
    REQ(cuCtxSetCurrent(NULL));
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, d));
    CHECK(memtype == 2);
    CK(cuMemGetAddressRange_v2(&start, &rsize, d), 201);
    CK(cuMemcpyHtoD_v2(d, a, 1), 201);
    REQ(cuCtxSetCurrent(g_c0));

    /* copies */
    OK(cuMemcpyHtoD_v2(d, a, n));
    CHECK(memcmp(fake_cuda_shadow(d), a, n) == 0);
    memset(b, 0, n);
    OK(cuMemcpyDtoH_v2(b, d, n));
    CHECK(memcmp(a, b, n) == 0);
    OK(cuMemcpyDtoH_v2(b, d + 1000, 10));
    CHECK(memcmp(b, a + 1000, 10) == 0);
    CK(cuMemcpyHtoD_v2(d + n - 10, a, 11), 1); /* crosses the end */
    OK(cuMemcpyHtoD_v2(d + n - 10, a, 10));
    CK(cuMemcpyHtoD_v2((CUdeviceptr)(uintptr_t)b, a, 10), 1); /* dst is not device memory */
    CK(cuMemcpyDtoH_v2(b, (CUdeviceptr)(uintptr_t)a, 10), 1);
    OK(cuMemcpyDtoD_v2(d2, d, n));
    CHECK(memcmp(fake_cuda_shadow(d2), fake_cuda_shadow(d), n) == 0);
    OK(cuMemcpy((CUdeviceptr)(uintptr_t)b, d2 + 5, 100));
    CHECK(memcmp(b, (unsigned char *)fake_cuda_shadow(d) + 5, 100) == 0);
    OK(cuMemsetD8_v2(d + 10, 0xab, 100));
    CHECK(((unsigned char *)fake_cuda_shadow(d))[10] == 0xab && ((unsigned char *)fake_cuda_shadow(d))[109] == 0xab);
    CK(cuMemsetD8_v2(d + n - 5, 0, 6), 1);
    CHECK(fake_cuda_copies() - c0 == 6); /* failed copies and memsets do not count */
    CHECK(fake_cuda_bytes_copied() - b0 == 3 * n + 10 + 10 + 100);

    /* address range */
    CUdeviceptr base;
    size_t size;
    OK(cuMemGetAddressRange_v2(&base, &size, d + 777));
    CHECK(base == d && size == n);
    CK(cuMemGetAddressRange_v2(&base, &size, (CUdeviceptr)(uintptr_t)a), 500);

    /* the CPU cannot touch device memory */
    CHECK(faults(d, 0));
    CHECK(faults(d + n - 1, 1));

    /* free */
    CK(cuMemFree_v2(d + 16), 1);
    OK(cuMemFree_v2(d2));
    CK(cuPointerGetAttribute(&memtype, A_MEMTYPE, d2), 1);
    CK(cuMemcpyHtoD_v2(d2, a, 1), 1);
    CK(cuMemcpy((CUdeviceptr)(uintptr_t)b, d2, 1), 1);
    CK(cuMemFree_v2(d2), 1);
    CHECK(faults(d2, 0));
    CHECK(fake_cuda_shadow(d2) == NULL);
    OK(cuMemFree_v2(d));
    free(a);
    free(b);
}

static void test_async(void)
{
    size_t n = 256 * 1024;
    CUstream s, sb;
    CUevent e, e2;
    CUdeviceptr d, d2;
    REQ(cuStreamCreate(&s, 1));
    REQ(cuStreamCreate(&sb, 0));
    REQ(cuEventCreate(&e, 0));
    REQ(cuEventCreate(&e2, 2));
    REQ(cuMemAlloc_v2(&d, n));
    REQ(cuMemAlloc_v2(&d2, n));
    CHECK(fake_cuda_live_streams() == 2);
    unsigned char *a = xmalloc(n), *b = xmalloc(n);
    fill(a, n, 7);
    OK(cuEventQuery(e)); /* never recorded: complete */
    OK(cuEventSynchronize(e));

    /* queued, not run: deterministic with paused workers */
    fake_cuda_pause_streams(1);
    OK(cuMemcpyHtoDAsync_v2(d, a, n, s));
    OK(cuEventRecord(e, s));
    CK(cuEventQuery(e), 600);
    CK(cuStreamQuery(s), 600);
    poll(NULL, 0, 20); /* nothing may change while paused */
    CK(cuEventQuery(e), 600);
    CHECK(memcmp(fake_cuda_shadow(d), a, n) != 0);
    fake_cuda_pause_streams(0);
    OK(cuEventSynchronize(e));
    OK(cuEventQuery(e));
    OK(cuStreamQuery(s));
    CHECK(memcmp(fake_cuda_shadow(d), a, n) == 0);

    /* injected delay: completion is reported only after the copy */
    fake_cuda_set_copy_delay_us(30000);
    memset(b, 0, n);
    double t0 = now_s();
    OK(cuMemcpyDtoHAsync_v2(b, d, n, s));
    OK(cuEventRecord(e, s));
    OK(cuEventSynchronize(e));
    CHECK(now_s() - t0 >= 0.029);
    CHECK(memcmp(a, b, n) == 0);

    /* unified cuMemcpyAsync and DtoD */
    OK(cuMemcpyAsync(d2, d, n, s));
    OK(cuMemcpyDtoDAsync_v2(d2 + 10, d, 10, s));
    OK(cuStreamSynchronize(s));
    CHECK(memcmp((unsigned char *)fake_cuda_shadow(d2) + 20, a + 20, n - 20) == 0);
    CHECK(memcmp((unsigned char *)fake_cuda_shadow(d2) + 10, a, 10) == 0);

    /* legacy default stream orders against blocking streams: an event
     * recorded on one stream right after a (delayed) copy on the other must
     * not complete before that copy */
    unsigned char *a2 = xmalloc(n);
    fill(a2, n, 8);
    CUevent en;
    REQ(cuEventCreate(&en, 0));
    OK(cuMemcpyHtoDAsync_v2(d, a2, n, NULL));
    OK(cuEventRecord(en, sb));
    OK(cuEventSynchronize(en));
    CHECK(memcmp(fake_cuda_shadow(d), a2, n) == 0);
    OK(cuMemcpyHtoDAsync_v2(d, a, n, sb));
    OK(cuEventRecord(en, NULL));
    OK(cuEventSynchronize(en));
    CHECK(memcmp(fake_cuda_shadow(d), a, n) == 0);
    OK(cuEventDestroy_v2(en));
    /* and a synchronous copy waits for the blocking stream */
    OK(cuMemcpyHtoDAsync_v2(d, a2, n, sb));
    memset(b, 0, n);
    OK(cuMemcpyDtoH_v2(b, d, n));
    CHECK(memcmp(a2, b, n) == 0);

    /* cuStreamWaitEvent: s waits for an event recorded on sb */
    OK(cuMemcpyHtoDAsync_v2(d2, a, n, sb));
    OK(cuEventRecord(e2, sb));
    OK(cuStreamWaitEvent(s, e2, 0));
    memset(b, 0, n);
    OK(cuMemcpyDtoHAsync_v2(b, d2, n, s));
    OK(cuStreamSynchronize(s));
    CHECK(memcmp(a, b, n) == 0);

    /* cuMemFree waits for pending copies of the context */
    memset(b, 0, n);
    OK(cuMemcpyDtoHAsync_v2(b, d, n, s));
    OK(cuMemFree_v2(d));
    CHECK(memcmp(a2, b, n) == 0);
    fake_cuda_set_copy_delay_us(0);

    /* bad handles */
    CK(cuMemcpyHtoDAsync_v2(d2, a, 1, (CUstream)(uintptr_t)0x5678), 400);
    CK(cuEventQuery((CUevent)(uintptr_t)0x5678), 400);
    CK(cuMemcpyHtoDAsync_v2((CUdeviceptr)(uintptr_t)b, a, 1, s), 1); /* not device memory */

    OK(cuEventDestroy_v2(e));
    OK(cuEventDestroy_v2(e2));
    OK(cuStreamDestroy_v2(s));
    OK(cuStreamDestroy_v2(sb));
    CK(cuStreamDestroy_v2(s), 400);
    CHECK(fake_cuda_live_streams() == 0);
    OK(cuMemFree_v2(d2));
    free(a);
    free(a2);
    free(b);
}

static void test_sticky_and_injection(void)
{
    unsigned char a[256], b[256];
    fill(a, sizeof a, 9);
    CUdeviceptr d, d1;
    CUstream s;
    CUevent e;

    /* non-sticky injected error on device 0 */
    REQ(cuMemAlloc_v2(&d, MiB));
    unsigned long long c0 = fake_cuda_copies();
    fake_cuda_fail_after_copies(2, 1);
    OK(cuMemcpyHtoD_v2(d, a, 10));
    OK(cuMemcpyHtoD_v2(d, a, 10));
    CK(cuMemcpyHtoD_v2(d, a, 10), 1);
    OK(cuMemcpyHtoD_v2(d, a, 10));
    CHECK(fake_cuda_copies() - c0 == 3);
    OK(cuCtxSynchronize());
    OK(cuMemFree_v2(d));

    /* an async copy past the end of an allocation: sticky ILLEGAL_ADDRESS */
    REQ(cuCtxSetCurrent(g_c1));
    REQ(cuMemAlloc_v2(&d1, MiB));
    REQ(cuStreamCreate(&s, 1));
    REQ(cuEventCreate(&e, 0));
    fake_cuda_pause_streams(1);
    OK(cuMemcpyHtoDAsync_v2(d1 + MiB - 10, a, 100, s)); /* accepted at the call */
    OK(cuEventRecord(e, s));
    fake_cuda_pause_streams(0);
    CK(cuStreamSynchronize(s), 700);
    CK(cuEventSynchronize(e), 700);
    CK(cuEventQuery(e), 700);
    CK(cuCtxSynchronize(), 700);
    CK(cuMemcpyHtoD_v2(d1, a, 10), 700);
    CK(cuMemAlloc_v2(&d, 10), 700);
    CK(cuMemcpyHtoDAsync_v2(d1, a, 10, s), 700);
    /* the other device's context is unaffected */
    REQ(cuCtxSetCurrent(g_c0));
    OK(cuCtxSynchronize());
    REQ(cuCtxSetCurrent(g_c1));
    /* reset: everything of the context is gone, the error too */
    OK(cuDevicePrimaryCtxReset_v2(1));
    OK(cuCtxSynchronize());
    CK(cuStreamDestroy_v2(s), 400);
    CK(cuPointerGetAttribute(&c0, A_BUFFER_ID, d1), 1);
    CHECK(faults(d1, 0));
    OK(cuEventQuery(e));
    OK(cuEventDestroy_v2(e));

    /* injected sticky error on an async copy */
    REQ(cuMemAlloc_v2(&d1, MiB));
    fake_cuda_fail_after_copies(0, 700);
    OK(cuMemcpyHtoDAsync_v2(d1, a, 10, NULL));
    CK(cuStreamSynchronize(NULL), 700);
    OK(cuDevicePrimaryCtxReset_v2(1));
    /* and on a synchronous one */
    REQ(cuMemAlloc_v2(&d1, MiB));
    fake_cuda_fail_after_copies(1, 700);
    OK(cuMemcpyHtoD_v2(d1, a, 10));
    CK(cuMemcpyDtoH_v2(b, d1, 10), 700);
    CK(cuCtxSynchronize(), 700);
    OK(cuDevicePrimaryCtxReset_v2(1));
    OK(cuCtxSynchronize());
    REQ(cuCtxSetCurrent(g_c0));
}

/* GPUDirect RDMA: a dmabuf of device memory is the allocation's memory. */
static void test_dmabuf(void)
{
    REQ(cuCtxSetCurrent(g_c0));
    int v = 0;
    OK(cuDeviceGetAttribute(&v, 124, 0));
    CHECK(v == 1);
    CUdeviceptr d = 0;
    size_t len = 3 * 4096;
    REQ(cuMemAlloc_v2(&d, len));
    unsigned char src[4096];
    fill(src, sizeof src, 5);
    OK(cuMemcpyHtoD_v2(d + 4096, src, sizeof src));
    int fd = -1;
    OK(cuMemGetHandleForAddressRange(&fd, d, len, 1, 0));
    CHECK(fd >= 0);
    if (fd >= 0) {
        unsigned char *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        CHECK(m != MAP_FAILED && matches(m + 4096, sizeof src, 5, 0));
        if (m != MAP_FAILED)
            munmap(m, len);
        close(fd);
    }
    CK(cuMemGetHandleForAddressRange(&fd, d + 4096, 4096, 1, 0), 1);   /* the fake's limit */
    CK(cuMemGetHandleForAddressRange(&fd, d, 100, 1, 0), 1);           /* not whole pages */
    CK(cuMemGetHandleForAddressRange(&fd, d, len, 2, 0), 1);           /* not DMA_BUF_FD */
    CK(cuMemGetHandleForAddressRange(&fd, d, 8 * 4096, 1, 0), 1);      /* past the allocation */
    unsigned long long f = fake_cuda_rdma_flushes();
    OK(cuFlushGPUDirectRDMAWrites(0, 100));
    CK(cuFlushGPUDirectRDMAWrites(0, 7), 1);
    CHECK(fake_cuda_rdma_flushes() == f + 1);
    OK(cuMemFree_v2(d));
}

static void test_host_memory(void)
{
    void *hp = NULL;
    REQ(cuMemHostAlloc(&hp, 10000, 0));
    unsigned memtype = 0;
    int ordinal = -1;
    void *hostp = NULL;
    CUcontext ctx = NULL;
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, (CUdeviceptr)(uintptr_t)hp + 5));
    OK(cuPointerGetAttribute(&ordinal, A_ORDINAL, (CUdeviceptr)(uintptr_t)hp));
    OK(cuPointerGetAttribute(&hostp, A_HOSTPTR, (CUdeviceptr)(uintptr_t)hp));
    OK(cuPointerGetAttribute(&ctx, A_CONTEXT, (CUdeviceptr)(uintptr_t)hp));
    CHECK(memtype == 1 && ordinal == 0 && hostp == hp && ctx == g_c0);
    CUdeviceptr d;
    REQ(cuMemAlloc_v2(&d, 10000));
    fill(hp, 10000, 11);
    OK(cuMemcpyHtoDAsync_v2(d, hp, 10000, NULL));
    OK(cuStreamSynchronize(NULL));
    CHECK(matches(fake_cuda_shadow(d), 10000, 11, 0));
    OK(cuMemFree_v2(d));
    OK(cuMemFreeHost(hp));
    CK(cuMemFreeHost(hp), 1);

    unsigned char *buf = aligned_alloc(4096, 8192);
    REQ(buf ? 0 : 2);
    OK(cuMemHostRegister_v2(buf, 8192, 0));
    CK(cuMemHostRegister_v2(buf + 4096, 100, 0), 712);
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, (CUdeviceptr)(uintptr_t)buf + 8000));
    CHECK(memtype == 1);
    OK(cuMemHostUnregister(buf));
    CK(cuMemHostUnregister(buf), 713);
    CK(cuPointerGetAttribute(&memtype, A_MEMTYPE, (CUdeviceptr)(uintptr_t)buf), 1);
    free(buf);
}

static CUmemAllocationProp vmm_prop(int types, int dev)
{
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = 1;
    p.requestedHandleTypes = types;
    p.location.type = 1;
    p.location.id = dev;
    return p;
}

static void test_vmm_local(void)
{
    CUmemAllocationProp pfd = vmm_prop(1, 0), pnone = vmm_prop(0, 0), pfab = vmm_prop(8, 0);
    size_t g = 0;
    OK(cuMemGetAllocationGranularity(&g, &pfd, 0));
    CHECK(g == GRAN);
    CUmemGenericAllocationHandle h1, h2, h3;
    CK(cuMemCreate(&h1, g + 1, &pfd, 0), 1);
    CK(cuMemCreate(&h1, g, &pfab, 0), 801);
    REQ(cuMemCreate(&h1, g, &pfd, 0));
    REQ(cuMemCreate(&h2, g, &pnone, 0));
    int fd = -1;
    CK(cuMemExportToShareableHandle(&fd, h2, 1, 0), 801);
    CK(cuMemExportToShareableHandle(&fd, h1, 8, 0), 801);

    CUdeviceptr va;
    REQ(cuMemAddressReserve(&va, 2 * g, 0, 0, 0));
    CHECK(va % g == 0);
    REQ(cuMemMap(va, g, 0, h1, 0));
    REQ(cuMemMap(va + g, g, 0, h2, 0));
    CK(cuMemMap(va, g, 0, h2, 0), 1); /* already mapped there */
    unsigned char *a = xmalloc(4096), *b = xmalloc(4096);
    fill(a, 4096, 12);
    CK(cuMemcpyHtoD_v2(va, a, 10), 1); /* no access yet */
    CUmemAccessDesc acc = { { 1, 0 }, 3 };
    OK(cuMemSetAccess(va, 2 * g, &acc, 1));
    OK(cuMemcpyHtoD_v2(va + g - 100, a, 200)); /* spans both chunks */
    CHECK(memcmp((unsigned char *)fake_cuda_shadow(va + g - 100), a, 100) == 0);
    CHECK(memcmp(fake_cuda_shadow(va + g), a + 100, 100) == 0);
    memset(b, 0, 4096);
    OK(cuMemcpyDtoH_v2(b, va + g - 100, 200));
    CHECK(memcmp(a, b, 200) == 0);
    CK(cuMemcpyHtoD_v2(va + 2 * g - 10, a, 11), 1); /* past the reservation's last chunk */

    unsigned long long id1 = 0, id2 = 0, types1 = 0, types2 = 9;
    int legacy = -1, ordinal = -1;
    CUdeviceptr start = 0;
    size_t rsize = 0;
    unsigned memtype = 0;
    OK(cuPointerGetAttribute(&id1, A_BUFFER_ID, va + 5));
    OK(cuPointerGetAttribute(&id2, A_BUFFER_ID, va + g + 5));
    CHECK(id1 && id2 && id1 != id2);
    OK(cuPointerGetAttribute(&types1, A_HANDLE_TYPES, va));
    OK(cuPointerGetAttribute(&types2, A_HANDLE_TYPES, va + g));
    CHECK(types1 == 1 && types2 == 0);
    OK(cuPointerGetAttribute(&legacy, A_LEGACY_IPC, va));
    OK(cuPointerGetAttribute(&ordinal, A_ORDINAL, va));
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, va));
    OK(cuPointerGetAttribute(&start, A_RANGE_START, va + g + 5));
    OK(cuPointerGetAttribute(&rsize, A_RANGE_SIZE, va + g + 5));
    CHECK(legacy == 0 && ordinal == 0 && memtype == 2 && start == va + g && rsize == g);
    CUdeviceptr base;
    size_t size;
    OK(cuMemGetAddressRange_v2(&base, &size, va + g + 5));
    CHECK(base == va + g && size == g);
    CHECK(faults(va, 0));
    CHECK(faults(va + g, 1));

    OK(cuMemRetainAllocationHandle(&h3, (void *)(uintptr_t)(va + 5)));
    CHECK(h3 == h1);
    OK(cuMemRelease(h3));

    /* in-process export/import of the fd sees the same memory */
    REQ(cuMemExportToShareableHandle(&fd, h1, 1, 0));
    CUmemGenericAllocationHandle hi;
    OK(cuMemImportFromShareableHandle(&hi, (void *)(uintptr_t)fd, 1));
    close(fd);
    CUdeviceptr va2;
    REQ(cuMemAddressReserve(&va2, g, 0, 0, 0));
    CHECK(fake_cuda_live_vmm_imports() == 0);
    OK(cuMemMap(va2, g, 0, hi, 0));
    CHECK(fake_cuda_live_vmm_imports() == 1);
    OK(cuMemRelease(hi)); /* the mapping keeps it alive */
    OK(cuMemSetAccess(va2, g, &acc, 1));
    OK(cuMemcpyDtoH_v2(b, va2 + g - 100, 100));
    CHECK(memcmp(a, b, 100) == 0);
    OK(cuPointerGetAttribute(&id2, A_BUFFER_ID, va2));
    CHECK(id2 == id1);
    OK(cuMemUnmap(va2, g));
    CHECK(fake_cuda_live_vmm_imports() == 0);
    OK(cuMemAddressFree(va2, g));

    CK(cuMemAddressFree(va, 2 * g), 1); /* still mapped */
    CK(cuMemUnmap(va, g + 4096), 1);     /* partial chunk */
    OK(cuMemUnmap(va, g));
    CK(cuPointerGetAttribute(&memtype, A_MEMTYPE, va), 1);
    CK(cuMemcpyHtoD_v2(va, a, 1), 1);
    CHECK(faults(va, 0));
    CK(cuMemUnmap(va, g), 1);
    OK(cuMemUnmap(va + g, g));
    OK(cuMemRelease(h1));
    OK(cuMemRelease(h2));
    CK(cuMemRelease(h1), 1);
    OK(cuMemAddressFree(va, 2 * g));
    free(a);
    free(b);
}

static void test_legacy_ipc(void)
{
    CUdeviceptr d, p, p2;
    CUipcMemHandle h;
    REQ(cuMemAlloc_v2(&d, 4096));
    CK(cuIpcGetMemHandle(&h, d + 1), 1); /* not the base */
    OK(cuIpcGetMemHandle(&h, d));
    CK(cuIpcOpenMemHandle_v2(&p, h, 1), 201); /* own handle */
    OK(cuMemFree_v2(d));

    int sock;
    pid_t pid = spawn("--child-legacy", &sock, NULL);
    REQ(pid > 0 ? 0 : 1);
    struct legacy_msg m;
    if (recv_msg(sock, &m, sizeof m, NULL)) {
        fprintf(stderr, "FAIL: no handle from the legacy IPC exporter\n");
        failures++;
        close(sock);
        finish_child(pid, "legacy IPC");
        return;
    }
    REQ(cuCtxSetCurrent(g_c1)); /* import on device 1 */
    CK(cuIpcOpenMemHandle_v2(&p, m.h, 7), 1);
    REQ(cuIpcOpenMemHandle_v2(&p, m.h, 1));
    OK(cuIpcOpenMemHandle_v2(&p2, m.h, 1));
    CHECK(p2 == p);
    CHECK(fake_cuda_live_ipc_imports() == 1);
    unsigned long long bufid = 0;
    int ordinal = -1, legacy = -1;
    unsigned memtype = 0;
    CUdeviceptr start = 0;
    size_t rsize = 0;
    CUcontext ctx = NULL;
    OK(cuPointerGetAttribute(&bufid, A_BUFFER_ID, p + 10));
    OK(cuPointerGetAttribute(&ordinal, A_ORDINAL, p));
    OK(cuPointerGetAttribute(&legacy, A_LEGACY_IPC, p));
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, p));
    OK(cuPointerGetAttribute(&start, A_RANGE_START, p + 10));
    OK(cuPointerGetAttribute(&rsize, A_RANGE_SIZE, p + 10));
    OK(cuPointerGetAttribute(&ctx, A_CONTEXT, p));
    CHECK(bufid == m.bufid && ordinal == 1 && legacy == 0 && memtype == 2);
    CHECK(start == p && rsize == m.size && ctx == g_c1);
    CHECK(faults(p, 0));

    size_t n = m.size, half = n / 2;
    unsigned char *buf = xmalloc(n);
    memset(buf, 0, n);
    OK(cuMemcpyDtoH_v2(buf, p, n));
    CHECK(matches(buf, n, 1, 0)); /* bytes exporter -> importer */
    fill(buf, n - half, 2);
    OK(cuMemcpyHtoDAsync_v2(p + half, buf, n - half, NULL));
    OK(cuStreamSynchronize(NULL));
    char c = 'G', verdict = 0;
    CHECK(send_msg(sock, &c, 1, -1) == 0);
    CHECK(recv_msg(sock, &verdict, 1, NULL) == 0);
    CHECK(verdict == 'K'); /* bytes importer -> exporter */

    OK(cuIpcCloseMemHandle(p));
    CHECK(fake_cuda_live_ipc_imports() == 1);
    OK(cuIpcCloseMemHandle(p));
    CHECK(fake_cuda_live_ipc_imports() == 0);
    CK(cuIpcCloseMemHandle(p), 1);
    CHECK(faults(p, 0));
    c = 'Q';
    CHECK(send_msg(sock, &c, 1, -1) == 0);
    close(sock);
    finish_child(pid, "legacy IPC exporter");
    CK(cuIpcOpenMemHandle_v2(&p, m.h, 1), 400); /* exporter is gone */
    REQ(cuCtxSetCurrent(g_c0));
    free(buf);
}

static void test_vmm_ipc(void)
{
    int sock, fd = -1;
    pid_t pid = spawn("--child-vmm", &sock, NULL);
    REQ(pid > 0 ? 0 : 1);
    struct vmm_msg m;
    if (recv_msg(sock, &m, sizeof m, &fd)) {
        fprintf(stderr, "FAIL: no fd from the VMM exporter\n");
        failures++;
        close(sock);
        finish_child(pid, "VMM IPC");
        return;
    }
    CUmemGenericAllocationHandle h;
    CK(cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)fd, 8), 801);
    REQ(cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)fd, 1));
    close(fd);
    size_t n = m.size;
    CUdeviceptr va;
    REQ(cuMemAddressReserve(&va, n, 0, 0, 0));
    REQ(cuMemMap(va, n, 0, h, 0));
    unsigned char *buf = xmalloc(n);
    CK(cuMemcpyDtoH_v2(buf, va, 16), 1); /* no cuMemSetAccess yet */
    CUmemAccessDesc acc = { { 1, 0 }, 3 };
    OK(cuMemSetAccess(va, n, &acc, 1));
    unsigned long long bufid = 0, types = 0;
    int legacy = -1;
    unsigned memtype = 0;
    OK(cuPointerGetAttribute(&bufid, A_BUFFER_ID, va + 100));
    OK(cuPointerGetAttribute(&types, A_HANDLE_TYPES, va));
    OK(cuPointerGetAttribute(&legacy, A_LEGACY_IPC, va));
    OK(cuPointerGetAttribute(&memtype, A_MEMTYPE, va));
    CHECK(bufid == m.bufid && types == 1 && legacy == 0 && memtype == 2);
    memset(buf, 0, n);
    OK(cuMemcpyDtoH_v2(buf, va, n));
    CHECK(matches(buf, n, 3, 0)); /* exporter -> importer */
    fill(buf, n / 2, 4);
    OK(cuMemcpyHtoD_v2(va + n / 2, buf, n / 2));
    char c = 'G', verdict = 0;
    CHECK(send_msg(sock, &c, 1, -1) == 0);
    CHECK(recv_msg(sock, &verdict, 1, NULL) == 0);
    CHECK(verdict == 'K'); /* importer -> exporter */
    OK(cuMemUnmap(va, n));
    OK(cuMemRelease(h));
    OK(cuMemAddressFree(va, n));
    c = 'Q';
    CHECK(send_msg(sock, &c, 1, -1) == 0);
    close(sock);
    finish_child(pid, "VMM IPC exporter");
    free(buf);
}

struct worker_arg { int id; int errors; };

static void *worker(void *p)
{
    struct worker_arg *w = p;
    CUdeviceptr d;
    /* a new thread has no current context */
    if (cuMemAlloc_v2(&d, 64) != 201)
        w->errors++;
    if (cuCtxSetCurrent(w->id % 2 ? g_c1 : g_c0)) {
        w->errors++;
        return NULL;
    }
    size_t n = 64 * 1024;
    unsigned char *a = xmalloc(n), *b = xmalloc(n);
    CUstream s;
    CUevent e;
    if (cuStreamCreate(&s, 1) || cuEventCreate(&e, 0) || cuMemAlloc_v2(&d, n)) {
        w->errors++;
        return NULL;
    }
    for (int i = 0; i < 50; i++) {
        fill(a, n, w->id * 100 + i);
        memset(b, 0, n);
        if (cuMemcpyHtoDAsync_v2(d, a, n, s) || cuMemcpyDtoHAsync_v2(b, d, n, s) || cuEventRecord(e, s) ||
            cuEventSynchronize(e) || memcmp(a, b, n))
            w->errors++;
    }
    if (cuEventDestroy_v2(e) || cuStreamDestroy_v2(s) || cuMemFree_v2(d))
        w->errors++;
    free(a);
    free(b);
    return NULL;
}

static void test_threads(void)
{
    enum { N = 6 };
    pthread_t t[N];
    struct worker_arg w[N];
    for (int i = 0; i < N; i++) {
        w[i].id = i;
        w[i].errors = 0;
        REQ(pthread_create(&t[i], NULL, worker, &w[i]));
    }
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        if (w[i].errors) {
            fprintf(stderr, "FAIL: thread %d had %d errors\n", i, w[i].errors);
            failures++;
        }
    }
}

static void test_release(void)
{
    CUdeviceptr d;
    CUdevice dev;
    REQ(cuCtxSetCurrent(g_c1));
    REQ(cuMemAlloc_v2(&d, 4096));
    OK(cuDevicePrimaryCtxRelease_v2(1)); /* refcount 0: destroyed */
    CK(cuPointerGetAttribute(&dev, A_ORDINAL, d), 1);
    CK(cuCtxGetDevice(&dev), 709);
    CK(cuMemAlloc_v2(&d, 16), 709);
    CK(cuDevicePrimaryCtxRelease_v2(1), 201);
    REQ(cuCtxSetCurrent(g_c0));
    OK(cuDevicePrimaryCtxRelease_v2(0));
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "--child-legacy"))
        return child_legacy(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "--child-vmm"))
        return child_vmm(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "--child-env"))
        return child_env();
    if (argc == 3 && !strcmp(argv[1], "--child-nodev"))
        return child_nodev();

    /* a known configuration, inherited by the IPC children */
    setenv("FAKE_CUDA_DEVICES", "2", 1);
    unsetenv("FAKE_CUDA_COPY_DELAY_US");
    unsetenv("FAKE_CUDA_FAIL_AFTER_COPIES");

    test_preinit();
    test_env_children();
    REQ(cuInit(0));
    CK(cuInit(1), 1);
    test_devices_and_contexts();
    test_memory();
    test_async();
    test_sticky_and_injection();
    test_host_memory();
    test_dmabuf();
    test_vmm_local();
    test_legacy_ipc();
    test_vmm_ipc();
    test_threads();
    test_release();

    unsigned long long la = fake_cuda_live_allocations(), li = fake_cuda_live_ipc_imports(),
                       ls = fake_cuda_live_streams(), le = fake_cuda_live_events();
    if (la || li || ls || le) {
        fprintf(stderr, "FAIL: leaks: %llu allocations, %llu imports, %llu streams, %llu events\n", la, li, ls, le);
        failures++;
    }
    if (failures) {
        fprintf(stderr, "check_fake_cuda: %d check(s) FAILED\n", failures);
        return 1;
    }
    fprintf(stderr, "check_fake_cuda: all checks passed (%llu copies, %llu bytes)\n", fake_cuda_copies(),
            fake_cuda_bytes_copied());
    return 0;
}
