// Port of NIXL's mooncake_backend_test (test/unit/plugins/mooncake in ai-dynamo/nixl) to our plugin.
//
// Usage: mooncake_backend_test <path to libplugin_Mooncake.so>
//
// Loads the plugin the way NIXL does (dlopen RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE, then nixl_plugin_init),
// checks the plugin table, then, once with enableProgTh=false and once with true, creates two engines
// ("Agent1", "Agent2") and drives them the way the NIXL agent does: conn info exchange (only engine 1 loads
// engine 2's), a genNotif round trip, 64 x 1 MiB DRAM regions per side, WRITE and READ with and without
// notification, with and without handle reuse, 10 iterations each, byte-identical buffers and exactly one
// notification ("Agent1", "test") per notifying iteration. Extra passes: loopback (Agent1 -> Agent1 through
// loadLocalMD), the reverse direction (Agent2 -> Agent1) with binary and empty payloads, and agent-style
// teardown (deregisterMem, unloadMD remote, unloadMD loopback, destroy_engine, nixl_plugin_fini).
// With NIXL_MOONCAKE_CUDA_LIB naming the fake CUDA driver of tests/fakes/cuda, a third pass runs the same
// sequence over VRAM: regions allocated with cuMemAlloc_v2 on the fake's device 0 (Agent1) and 1 (Agent2),
// registered as VRAM_SEG with their devId, filled and checked through the fake's CPU view of device memory
// (fake_cuda_shadow). Without it that pass is skipped with a line saying so.
// Prints one line per phase and "mooncake_backend_test: PASS" at the end; exits 1 on the first failure.

#include "nixl_plugin_abi.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// nixlDescList's out-of-line members, which libnixl would supply.
#include "nixl_desc_list_defs.h"

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kNumRegions = 64;
constexpr size_t kRegionLen = 1 << 20;
constexpr int kIterations = 10;
constexpr auto kXferTimeout = std::chrono::seconds(30);
constexpr auto kNotifTimeout = std::chrono::seconds(10);
constexpr auto kNoExtraNotifWait = std::chrono::milliseconds(50);
constexpr auto kPollSleep = std::chrono::microseconds(50);

const std::string kAgent1 = "Agent1";
const std::string kAgent2 = "Agent2";
const std::string kBackendType = "Mooncake";

[[noreturn]] void fail(const std::string &msg) {
    std::fflush(stdout);
    std::fprintf(stderr, "mooncake_backend_test: FAIL: %s\n", msg.c_str());
    std::fflush(stderr);
    std::exit(1);
}

const char *statusStr(nixl_status_t s) {
    switch (s) {
    case NIXL_IN_PROG: return "NIXL_IN_PROG";
    case NIXL_SUCCESS: return "NIXL_SUCCESS";
    case NIXL_ERR_NOT_POSTED: return "NIXL_ERR_NOT_POSTED";
    case NIXL_ERR_INVALID_PARAM: return "NIXL_ERR_INVALID_PARAM";
    case NIXL_ERR_BACKEND: return "NIXL_ERR_BACKEND";
    case NIXL_ERR_NOT_FOUND: return "NIXL_ERR_NOT_FOUND";
    case NIXL_ERR_MISMATCH: return "NIXL_ERR_MISMATCH";
    case NIXL_ERR_NOT_ALLOWED: return "NIXL_ERR_NOT_ALLOWED";
    case NIXL_ERR_REPOST_ACTIVE: return "NIXL_ERR_REPOST_ACTIVE";
    case NIXL_ERR_UNKNOWN: return "NIXL_ERR_UNKNOWN";
    case NIXL_ERR_NOT_SUPPORTED: return "NIXL_ERR_NOT_SUPPORTED";
    case NIXL_ERR_REMOTE_DISCONNECT: return "NIXL_ERR_REMOTE_DISCONNECT";
    case NIXL_ERR_CANCELED: return "NIXL_ERR_CANCELED";
    case NIXL_ERR_NO_TELEMETRY: return "NIXL_ERR_NO_TELEMETRY";
    }
    return "unknown nixl_status_t";
}

std::string where(const char *file, int line) { return std::string(file) + ":" + std::to_string(line) + ": "; }

#define CHECK(cond, msg)                                                                                          \
    do {                                                                                                          \
        if (!(cond)) fail(where(__FILE__, __LINE__) + "check failed: " #cond ": " + std::string(msg));           \
    } while (0)

#define CHECK_OK(expr)                                                                                            \
    do {                                                                                                          \
        const nixl_status_t check_ok_status_ = (expr);                                                            \
        if (check_ok_status_ != NIXL_SUCCESS)                                                                     \
            fail(where(__FILE__, __LINE__) + #expr " returned " + statusStr(check_ok_status_));                   \
    } while (0)

#define CHECK_STATUS(expr, want)                                                                                  \
    do {                                                                                                          \
        const nixl_status_t check_status_ = (expr);                                                               \
        if (check_status_ != (want))                                                                              \
            fail(where(__FILE__, __LINE__) + #expr " returned " + statusStr(check_status_) + ", expected " +      \
                 statusStr(want));                                                                                \
    } while (0)

// Printable form of a possibly binary payload.
std::string printable(const std::string &s) {
    std::string out = "\"";
    for (char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            out += static_cast<char>(c);
        } else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        }
    }
    return out + "\"";
}

double msSince(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The vtable slot of a virtual member function, from its Itanium-ABI pointer-to-member representation
// (ptr = 1 + byte offset in the vtable for a virtual function).
template <class M> long vtableSlot(M pmf) {
    static_assert(sizeof(M) == 2 * sizeof(void *));
    struct {
        uintptr_t ptr;
        ptrdiff_t adj;
    } rep;
    std::memcpy(&rep, &pmf, sizeof rep);
    if ((rep.ptr & 1) == 0 || rep.adj != 0) return -1;
    return static_cast<long>((rep.ptr - 1) / sizeof(void *));
}

// Self-check of the vtable order declared in nixl-headers/backend_engine.h (sizes and offsets are
// static_asserts in nixl_plugin_abi.h).
void checkVtableLayout() {
    using E = nixlBackendEngine;
    using RemoteView = nixl_status_t (E::*)(const nixl_remote_meta_dlist_t &, void *&, const nixl_opt_b_args_t *)
        const;
    using LocalView = nixl_status_t (E::*)(const nixl_meta_dlist_t &, void *&, const nixl_opt_b_args_t *) const;
    const std::pair<const char *, long> slots[] = {
        {"supportsRemote", vtableSlot(&E::supportsRemote)},
        {"supportsLocal", vtableSlot(&E::supportsLocal)},
        {"supportsNotif", vtableSlot(&E::supportsNotif)},
        {"getSupportedMems", vtableSlot(&E::getSupportedMems)},
        {"registerMem", vtableSlot(&E::registerMem)},
        {"deregisterMem", vtableSlot(&E::deregisterMem)},
        {"connect", vtableSlot(&E::connect)},
        {"disconnect", vtableSlot(&E::disconnect)},
        {"unloadMD", vtableSlot(&E::unloadMD)},
        {"prepXfer", vtableSlot(&E::prepXfer)},
        {"postXfer", vtableSlot(&E::postXfer)},
        {"checkXfer", vtableSlot(&E::checkXfer)},
        {"releaseReqH", vtableSlot(&E::releaseReqH)},
        {"prepMemView(remote)", vtableSlot(static_cast<RemoteView>(&E::prepMemView))},
        {"prepMemView(local)", vtableSlot(static_cast<LocalView>(&E::prepMemView))},
        {"releaseMemView", vtableSlot(&E::releaseMemView)},
        {"getPublicData", vtableSlot(&E::getPublicData)},
        {"getConnInfo", vtableSlot(&E::getConnInfo)},
        {"loadRemoteConnInfo", vtableSlot(&E::loadRemoteConnInfo)},
        {"loadRemoteMD", vtableSlot(&E::loadRemoteMD)},
        {"loadLocalMD", vtableSlot(&E::loadLocalMD)},
        {"getNotifs", vtableSlot(&E::getNotifs)},
        {"genNotif", vtableSlot(&E::genNotif)},
        {"queryMem", vtableSlot(&E::queryMem)},
        {"estimateXferCost", vtableSlot(&E::estimateXferCost)},
    };
    long expected = 2; // slots 0 and 1 are the destructors
    for (const auto &[name, slot] : slots) {
        CHECK(slot == expected, std::string("nixlBackendEngine::") + name + " is in vtable slot " +
                                    std::to_string(slot) + ", the ABI says " + std::to_string(expected));
        ++expected;
    }
    CHECK(vtableSlot(&nixl_meta_dlist_t::resize) == 2 && vtableSlot(&nixl_meta_dlist_t::addDesc) == 3 &&
              vtableSlot(&nixl_meta_dlist_t::getIndex) == 4,
          "nixlDescList vtable order must be dtors, resize, addDesc, getIndex");
}

// Fills a buffer with a pattern unique to `seed` (and to every 8-byte word within the buffer).
void fillPattern(char *buf, size_t len, uint64_t seed) {
    uint64_t base = seed * 0x9E3779B97F4A7C15ULL;
    base ^= base >> 29;
    base *= 0xBF58476D1CE4E5B9ULL;
    const size_t words = len / sizeof(uint64_t);
    auto *w = reinterpret_cast<uint64_t *>(buf);
    for (size_t i = 0; i < words; ++i) w[i] = base ^ ((i + 1) * 0xD6E8FEB86659FD93ULL);
    for (size_t i = words * sizeof(uint64_t); i < len; ++i) buf[i] = static_cast<char>(base >> (i % 8 * 8));
}

// Sleeps a little between polls.
void pollPause() { std::this_thread::sleep_for(kPollSleep); }

// ---------------------------------------------------------------------------------------------------------------
// Plugin and engines.

struct Plugin {
    void *lib = nullptr;
    nixl_plugin_init_fn_t init = nullptr;
    nixl_plugin_fini_fn_t fini = nullptr;
    nixlBackendPlugin *table = nullptr;
};

Plugin loadPlugin(const char *path) {
    Plugin p;
    p.lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!p.lib) fail(std::string("dlopen(") + path + ") failed: " + dlerror());
    p.init = reinterpret_cast<nixl_plugin_init_fn_t>(dlsym(p.lib, NIXL_PLUGIN_INIT_SYMBOL));
    CHECK(p.init != nullptr, "the plugin does not export nixl_plugin_init");
    p.fini = reinterpret_cast<nixl_plugin_fini_fn_t>(dlsym(p.lib, NIXL_PLUGIN_FINI_SYMBOL));
    p.table = p.init();
    CHECK(p.table != nullptr, "nixl_plugin_init returned null");
    CHECK(p.table->api_version == NIXL_PLUGIN_API_VERSION,
          "api_version is " + std::to_string(p.table->api_version) + ", NIXL requires 1");
    CHECK(p.table->create_engine && p.table->destroy_engine && p.table->get_plugin_name &&
              p.table->get_plugin_version && p.table->get_backend_options && p.table->get_backend_mems,
          "a function pointer of the plugin table is null");
    return p;
}

void checkPluginTable(Plugin &p) {
    const char *name = p.table->get_plugin_name();
    const char *version = p.table->get_plugin_version();
    CHECK(name != nullptr && *name != '\0', "get_plugin_name returned null or empty");
    CHECK(version != nullptr && *version != '\0', "get_plugin_version returned null or empty");
    std::printf("plugin: name %s, version %s, nixl_plugin_fini %s\n", name, version,
                p.fini ? "exported" : "absent");

    const nixl_b_params_t options = p.table->get_backend_options();
    std::string keys;
    for (const auto &[k, v] : options) keys += " " + k + "=" + printable(v);
    std::printf("plugin: backend options:%s\n", keys.c_str());
    for (const char *key : {"protocol", "ip_addr", "port", "device_name"})
        CHECK(options.count(key) == 1, std::string("get_backend_options lacks the key \"") + key + "\"");

    const nixl_mem_list_t mems = p.table->get_backend_mems();
    CHECK(std::find(mems.begin(), mems.end(), DRAM_SEG) != mems.end(), "get_backend_mems lacks DRAM_SEG");

    // NIXL's get_plugin_params loads, queries and unloads; create_backend then loads again: the plugin must
    // survive fini + init and hand out the same static table.
    if (p.fini) p.fini();
    nixlBackendPlugin *again = p.init();
    CHECK(again == p.table, "nixl_plugin_init returned a different table after nixl_plugin_fini");
    std::printf("plugin: table OK (init/fini/init returns the same table)\n");
}

nixlBackendEngine *createEngine(const Plugin &p, const std::string &agent, bool progTh, std::string &connInfo) {
    nixlBackendEngine *engine = nullptr;
    {
        nixl_b_params_t customParams; // empty: the plugin's defaults; dies right after create_engine
        nixlBackendInitParams params;
        params.localAgent = agent;
        params.type = kBackendType;
        params.customParams = &customParams;
        params.enableProgTh = progTh;
        params.pthrDelay = 0;
        params.syncMode = nixl_thread_sync_t::NIXL_THREAD_SYNC_RW;
        params.enableTelemetry_ = false;
        engine = p.table->create_engine(&params);
    }
    CHECK(engine != nullptr, "create_engine(" + agent + ") returned null");
    CHECK(!engine->getInitErr(), "create_engine(" + agent + ") set initErr");
    CHECK(engine->getType() == kBackendType, "backendType is \"" + engine->getType() + "\", expected Mooncake");
    CHECK(engine->getCustomParams().empty(), "customParams must be a copy of the (empty) user map");
    CHECK(engine->supportsRemote(), "supportsRemote() is false");
    CHECK(engine->supportsLocal(), "supportsLocal() is false");
    CHECK(engine->supportsNotif(), "supportsNotif() is false");
    const nixl_mem_list_t mems = engine->getSupportedMems();
    CHECK(std::find(mems.begin(), mems.end(), DRAM_SEG) != mems.end(), "getSupportedMems lacks DRAM_SEG");

    // What the agent does right after creation: getConnInfo once (remote-capable), connect(own name) (local).
    CHECK_OK(engine->getConnInfo(connInfo));
    CHECK(!connInfo.empty(), "getConnInfo(" + agent + ") returned an empty string");
    CHECK_OK(engine->connect(agent));
    return engine;
}

// Drains `engine`'s notifications into `out`.
void pollNotifs(nixlBackendEngine *engine, notif_list_t &out) {
    notif_list_t fresh;
    CHECK_OK(engine->getNotifs(fresh));
    for (auto &n : fresh) out.push_back(std::move(n));
}

// Waits until `engine` has received `count` notifications (bounded), then checks that no more arrive.
notif_list_t waitNotifs(nixlBackendEngine *engine, size_t count, const std::string &what) {
    notif_list_t got;
    const auto deadline = Clock::now() + kNotifTimeout;
    while (got.size() < count) {
        pollNotifs(engine, got);
        if (got.size() >= count) break;
        if (Clock::now() > deadline)
            fail(what + ": got " + std::to_string(got.size()) + " of " + std::to_string(count) +
                 " notifications within 10 s");
        pollPause();
    }
    std::this_thread::sleep_for(kNoExtraNotifWait);
    pollNotifs(engine, got);
    CHECK(got.size() == count, what + ": expected exactly " + std::to_string(count) + " notifications, got " +
                                   std::to_string(got.size()));
    return got;
}

void expectNotif(const std::pair<std::string, std::string> &n, const std::string &sender, const std::string &msg,
                 const std::string &what) {
    CHECK(n.first == sender && n.second == msg, what + ": notification (" + printable(n.first) + ", " +
                                                    printable(n.second) + "), expected (" + printable(sender) +
                                                    ", " + printable(msg) + ")");
}

// ---------------------------------------------------------------------------------------------------------------
// GPU memory on the fake CUDA driver (the VRAM pass).

struct FakeGpu {
    using CUresult = int;
    CUresult (*init)(unsigned) = nullptr;
    CUresult (*deviceGet)(int *, int) = nullptr;
    CUresult (*primaryCtxRetain)(void **, int) = nullptr;
    CUresult (*ctxSetCurrent)(void *) = nullptr;
    CUresult (*memAlloc)(unsigned long long *, size_t) = nullptr;
    CUresult (*memFree)(unsigned long long) = nullptr;
    void *(*shadow)(unsigned long long) = nullptr;
};

// The fake driver named by NIXL_MOONCAKE_CUDA_LIB (the same library the plugin loads), or null.
const FakeGpu *fakeGpu() {
    static FakeGpu gpu;
    static bool tried = false, ok = false;
    if (tried) return ok ? &gpu : nullptr;
    tried = true;
    const char *path = std::getenv("NIXL_MOONCAKE_CUDA_LIB");
    void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;
    if (!lib || !dlsym(lib, "fake_cuda_shadow")) return nullptr;
    auto sym = [&](auto &fn, const char *name) { fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name)); };
    sym(gpu.init, "cuInit");
    sym(gpu.deviceGet, "cuDeviceGet");
    sym(gpu.primaryCtxRetain, "cuDevicePrimaryCtxRetain");
    sym(gpu.ctxSetCurrent, "cuCtxSetCurrent");
    sym(gpu.memAlloc, "cuMemAlloc_v2");
    sym(gpu.memFree, "cuMemFree_v2");
    sym(gpu.shadow, "fake_cuda_shadow");
    ok = gpu.init && gpu.init(0) == 0;
    return ok ? &gpu : nullptr;
}

// The memory type of the pass that runs (DRAM, or VRAM on the fake driver).
nixl_mem_t g_mem = DRAM_SEG;

// ---------------------------------------------------------------------------------------------------------------
// Regions and transfers.

struct Region {
    char *buf = nullptr;  // the address NIXL sees (a device pointer for VRAM)
    char *view = nullptr; // where this harness reads and writes it (the fake's CPU view for VRAM)
    uint64_t dev = 0;     // devId
    size_t len = 0;
    nixlBackendMD *md = nullptr;     // from registerMem
    nixlBackendMD *loopMd = nullptr; // from loadLocalMD
    std::string publicData;          // from getPublicData
};

// Allocates a region's memory: malloc'd host memory, or (VRAM pass) device memory of device `dev`.
void allocRegion(Region &r, size_t len, uint64_t dev) {
    r.len = len;
    if (g_mem == DRAM_SEG) {
        r.buf = r.view = static_cast<char *>(std::malloc(len));
        CHECK(r.buf != nullptr, "malloc failed");
    } else {
        const FakeGpu *gpu = fakeGpu();
        int d = 0;
        void *ctx = nullptr;
        unsigned long long ptr = 0;
        CHECK(gpu->deviceGet(&d, static_cast<int>(dev)) == 0 && gpu->primaryCtxRetain(&ctx, d) == 0 &&
                  gpu->ctxSetCurrent(ctx) == 0 && gpu->memAlloc(&ptr, len) == 0,
              "cuMemAlloc_v2 on the fake driver failed");
        r.buf = reinterpret_cast<char *>(static_cast<uintptr_t>(ptr));
        r.view = static_cast<char *>(gpu->shadow(ptr));
        r.dev = dev;
        CHECK(r.view != nullptr, "the fake driver has no view of its own allocation");
    }
    std::memset(r.view, 0, len);
}

void freeRegion(Region &r) {
    if (g_mem == DRAM_SEG)
        std::free(r.buf);
    else
        CHECK(fakeGpu()->memFree(reinterpret_cast<uintptr_t>(r.buf)) == 0, "cuMemFree_v2 failed");
}

// Registers `n` regions (on device `dev` in the VRAM pass) the way the agent does: registerMem, loadLocalMD,
// getPublicData.
std::vector<Region> registerRegions(nixlBackendEngine *engine, int n, size_t len, uint64_t dev) {
    std::vector<Region> regions(static_cast<size_t>(n));
    for (Region &r : regions) {
        allocRegion(r, len, dev);
        const nixlBlobDesc desc(reinterpret_cast<uintptr_t>(r.buf), len, r.dev, "");
        CHECK_OK(engine->registerMem(desc, g_mem, r.md));
        CHECK(r.md != nullptr, "registerMem returned a null metadata object");
        CHECK_OK(engine->loadLocalMD(r.md, r.loopMd));
        CHECK(r.loopMd != nullptr, "loadLocalMD returned a null metadata object");
        CHECK_OK(engine->getPublicData(r.md, r.publicData));
        CHECK(!r.publicData.empty(), "getPublicData returned an empty string");
    }
    return regions;
}

// Loads `remote`'s regions (owned by `remoteAgent`) into `engine`, as the agent does for a remote's metadata.
std::vector<nixlBackendMD *> loadRemoteRegions(nixlBackendEngine *engine, const std::vector<Region> &remote,
                                               const std::string &remoteAgent) {
    std::vector<nixlBackendMD *> mds;
    for (const Region &r : remote) {
        const nixlBlobDesc desc(reinterpret_cast<uintptr_t>(r.buf), r.len, r.dev, r.publicData);
        nixlBackendMD *md = nullptr;
        CHECK_OK(engine->loadRemoteMD(desc, g_mem, remoteAgent, md));
        CHECK(md != nullptr, "loadRemoteMD returned a null metadata object");
        mds.push_back(md);
    }
    return mds;
}

// One side of a transfer: the buffers and the metadata objects that describe them to the initiator.
struct Side {
    std::vector<char *> bufs;  // addresses in the descriptors
    std::vector<char *> views; // where the harness fills and checks them
    std::vector<uint64_t> devs;
    std::vector<size_t> lens;
    std::vector<nixlBackendMD *> mds;
};

Side makeSide(const std::vector<Region> &regions, size_t from, size_t to, bool loopback,
              const std::vector<nixlBackendMD *> *remoteMds = nullptr) {
    Side s;
    for (size_t i = from; i < to; ++i) {
        s.bufs.push_back(regions[i].buf);
        s.views.push_back(regions[i].view);
        s.devs.push_back(regions[i].dev);
        s.lens.push_back(regions[i].len);
        s.mds.push_back(remoteMds ? (*remoteMds)[i] : loopback ? regions[i].loopMd : regions[i].md);
    }
    return s;
}

void fillList(nixl_meta_dlist_t &list, const Side &side) {
    for (size_t i = 0; i < side.bufs.size(); ++i)
        list.addDesc(
            nixlMetaDesc(reinterpret_cast<uintptr_t>(side.bufs[i]), side.lens[i], side.devs[i], side.mds[i]));
}

// Where the first difference between dst and src lies, or "" when all buffers are identical.
std::string compareBuffers(const std::vector<char *> &dst, const std::vector<char *> &src,
                           const std::vector<size_t> &lens) {
    for (size_t i = 0; i < dst.size(); ++i) {
        if (std::memcmp(dst[i], src[i], lens[i]) == 0) continue;
        size_t off = 0;
        while (off < lens[i] && dst[i][off] == src[i][off]) ++off;
        return "buffer " + std::to_string(i) + " differs first at byte " + std::to_string(off);
    }
    return "";
}

struct Matrix {
    const char *label;
    nixlBackendEngine *initiator;
    std::string initiatorAgent;
    nixlBackendEngine *notifReceiver; // the engine of remoteAgent
    std::string remoteAgent;
    const Side *local;
    const Side *remote;
    std::vector<nixl_xfer_op_t> ops;
    std::vector<bool> notifModes;
    int iterations;
    std::string notifMsg;
    // Poll the receiver's getNotifs while the transfer is in flight (allowed without a progress thread). With
    // a progress thread the receiver is left alone until checkXfer reports completion.
    bool pollReceiverWhileWaiting;
};

uint64_t g_patternSeed = 1;

void runMatrix(const Matrix &m) {
    nixl_meta_dlist_t localList(g_mem), remoteList(g_mem);
    fillList(localList, *m.local);
    fillList(remoteList, *m.remote);
    CHECK(localList.descCount() == remoteList.descCount() && !localList.isEmpty(), "bad descriptor lists");

    for (nixl_xfer_op_t op : m.ops) {
        const char *opName = op == NIXL_WRITE ? "WRITE" : "READ";
        // WRITE pushes local -> remote, READ pulls remote -> local.
        const Side &src = op == NIXL_WRITE ? *m.local : *m.remote;
        const Side &dst = op == NIXL_WRITE ? *m.remote : *m.local;
        for (bool withNotif : m.notifModes) {
            for (bool reuse : {false, true}) {
                const std::string what = std::string(m.label) + " " + opName + " notif=" +
                                         (withNotif ? "1" : "0") + " reuse=" + (reuse ? "1" : "0");
                const auto t0 = Clock::now();
                nixlBackendOptionalArgs opt;
                opt.hasNotif = withNotif;
                opt.notifMsg = m.notifMsg;
                nixlBackendReqH *handle = nullptr;
                auto prep = [&] {
                    handle = nullptr;
                    CHECK_OK(m.initiator->prepXfer(op, localList, remoteList, m.remoteAgent, handle, &opt));
                    CHECK(handle != nullptr, what + ": prepXfer returned a null handle");
                };
                if (reuse) prep();
                for (int iter = 0; iter < m.iterations; ++iter) {
                    const std::string it = what + " iteration " + std::to_string(iter);
                    for (size_t i = 0; i < src.bufs.size(); ++i) {
                        fillPattern(src.views[i], src.lens[i], g_patternSeed++);
                        std::memset(dst.views[i], 0, dst.lens[i]);
                    }
                    if (!reuse) prep();

                    nixl_status_t st = m.initiator->postXfer(op, localList, remoteList, m.remoteAgent, handle, &opt);
                    CHECK(st == NIXL_SUCCESS || st == NIXL_IN_PROG, it + ": postXfer returned " + statusStr(st));
                    bool done = st == NIXL_SUCCESS;
                    notif_list_t notifs;
                    const auto deadline = Clock::now() + kXferTimeout;
                    while (!done) {
                        st = m.initiator->checkXfer(handle);
                        if (st == NIXL_SUCCESS) {
                            done = true;
                            break;
                        }
                        CHECK(st == NIXL_IN_PROG, it + ": checkXfer returned " + statusStr(st));
                        if (m.pollReceiverWhileWaiting && withNotif && notifs.empty()) {
                            pollNotifs(m.notifReceiver, notifs);
                            if (!notifs.empty()) {
                                // The notification must follow the data.
                                const std::string diff = compareBuffers(dst.views, src.views, dst.lens);
                                CHECK(diff.empty(), it + ": notification arrived before the data: " + diff);
                            }
                        }
                        if (Clock::now() > deadline) fail(it + ": transfer still in progress after 30 s");
                        pollPause();
                    }
                    const std::string diff = compareBuffers(dst.views, src.views, dst.lens);
                    CHECK(diff.empty(), it + ": data mismatch after completion: " + diff);

                    if (withNotif) {
                        const auto notifDeadline = Clock::now() + kNotifTimeout;
                        while (notifs.empty()) {
                            pollNotifs(m.notifReceiver, notifs);
                            if (!notifs.empty()) break;
                            if (Clock::now() > notifDeadline) fail(it + ": no notification within 10 s");
                            pollPause();
                        }
                        pollNotifs(m.notifReceiver, notifs); // an immediate duplicate would show up here
                        CHECK(notifs.size() == 1,
                              it + ": expected exactly 1 notification, got " + std::to_string(notifs.size()));
                        expectNotif(notifs[0], m.initiatorAgent, m.notifMsg, it);
                    }
                    if (!reuse) CHECK_OK(m.initiator->releaseReqH(handle));
                }
                if (reuse) CHECK_OK(m.initiator->releaseReqH(handle));

                // Nothing may trail in: no notification at all without hasNotif, no duplicate with it.
                std::this_thread::sleep_for(kNoExtraNotifWait);
                notif_list_t extra;
                pollNotifs(m.notifReceiver, extra);
                CHECK(extra.empty(), what + ": " + std::to_string(extra.size()) + " unexpected notification(s), " +
                                         "first from " + printable(extra.empty() ? "" : extra[0].first));
                std::printf("  %s: %d iterations x %zu x %zu bytes OK (%.0f ms)\n", what.c_str(), m.iterations,
                            src.bufs.size(), src.lens[0], msSince(t0));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// One full pass: two engines, the NIXL test sequence, extras, teardown.

void runPass(const Plugin &p, bool progTh) {
    std::printf("== pass enableProgTh=%s, memory %s ==\n", progTh ? "true" : "false",
                g_mem == DRAM_SEG ? "DRAM" : "VRAM (fake CUDA driver)");

    std::string conn1, conn2;
    nixlBackendEngine *e1 = createEngine(p, kAgent1, progTh, conn1);
    nixlBackendEngine *e2 = createEngine(p, kAgent2, progTh, conn2);
    std::printf("engines: created %s (conn info %zu bytes) and %s (conn info %zu bytes)\n", kAgent1.c_str(),
                conn1.size(), kAgent2.c_str(), conn2.size());

    // Conn info exchange: as in NIXL's test, only engine 1 loads engine 2's. Loading the same info again is a
    // no-op.
    CHECK_OK(e1->loadRemoteConnInfo(kAgent2, conn2));
    CHECK_OK(e1->loadRemoteConnInfo(kAgent2, conn2));
    CHECK_OK(e1->connect(kAgent2));
    std::printf("conn info: %s loaded %s's, connected\n", kAgent1.c_str(), kAgent2.c_str());

    // genNotif round trip: engine 2 never loaded engine 1's info and still receives it.
    CHECK_OK(e1->genNotif(kAgent2, "notification"));
    {
        const notif_list_t got = waitNotifs(e2, 1, "genNotif Agent1 -> Agent2");
        expectNotif(got[0], kAgent1, "notification", "genNotif Agent1 -> Agent2");
    }
    std::printf("genNotif: Agent1 -> Agent2 OK\n");

    // 64 x 1 MiB per side, registered like the agent does.
    std::vector<Region> r1 = registerRegions(e1, kNumRegions, kRegionLen, 0);
    std::vector<Region> r2 = registerRegions(e2, kNumRegions, kRegionLen, g_mem == VRAM_SEG ? 1 : 0);
    std::vector<nixlBackendMD *> remoteOn1 = loadRemoteRegions(e1, r2, kAgent2);
    std::printf("memory: %d x %zu bytes registered per engine, %zu remote MDs loaded on %s\n", kNumRegions,
                kRegionLen, remoteOn1.size(), kAgent1.c_str());

    // Cross-engine handles, as NIXL's own test uses them: engine 1 asked for the public data of a registration
    // engine 2 returned answers for exactly that region (which then loads on engine 1 as Agent2's); no other call
    // acts on the foreign handle.
    {
        std::string viaE1;
        CHECK_OK(e1->getPublicData(r2[0].md, viaE1));
        CHECK(viaE1 == r2[0].publicData, "engine 1 answered getPublicData of engine 2's handle with other data");
        const nixlBlobDesc desc(reinterpret_cast<uintptr_t>(r2[0].buf), r2[0].len, r2[0].dev, viaE1);
        nixlBackendMD *md = nullptr;
        CHECK_OK(e1->loadRemoteMD(desc, g_mem, kAgent2, md));
        CHECK_OK(e1->unloadMD(md));
        CHECK_STATUS(e1->deregisterMem(r2[0].md), NIXL_ERR_NOT_FOUND);
        CHECK_STATUS(e2->unloadMD(remoteOn1[0]), NIXL_ERR_NOT_FOUND);
    }
    std::printf("handles: engine 2's handle resolved by engine 1 to engine 2's region; foreign deregister refused\n");

    // The NIXL test matrix: WRITE/READ x notif x reuse, 10 iterations, Agent1 -> Agent2.
    const Side local1 = makeSide(r1, 0, r1.size(), false);
    const Side remote2 = makeSide(r2, 0, r2.size(), false, &remoteOn1);
    runMatrix(Matrix{"Agent1->Agent2", e1, kAgent1, e2, kAgent2, &local1, &remote2, {NIXL_WRITE, NIXL_READ},
                     {false, true}, kIterations, "test", !progTh});
    std::printf("transfers: Agent1 -> Agent2 matrix OK\n");

    // Loopback: Agent1 -> "Agent1", first half of engine 1's regions against the second half (loadLocalMD).
    CHECK_OK(e1->genNotif(kAgent1, "self"));
    {
        const notif_list_t got = waitNotifs(e1, 1, "genNotif Agent1 -> Agent1");
        expectNotif(got[0], kAgent1, "self", "genNotif Agent1 -> Agent1");
    }
    const size_t half = r1.size() / 2;
    const Side loopLocal = makeSide(r1, 0, half, false);
    const Side loopRemote = makeSide(r1, half, r1.size(), true);
    runMatrix(Matrix{"Agent1->Agent1", e1, kAgent1, e1, kAgent1, &loopLocal, &loopRemote, {NIXL_WRITE, NIXL_READ},
                     {false, true}, 3, "loopback", true});
    std::printf("loopback: genNotif and transfers OK\n");

    // Reverse direction: engine 2 loads engine 1's info; binary and empty payloads must arrive intact.
    CHECK_OK(e2->loadRemoteConnInfo(kAgent1, conn1));
    const std::string binary("bin\0ary\xff\x01", 9);
    CHECK_OK(e2->genNotif(kAgent1, binary));
    CHECK_OK(e2->genNotif(kAgent1, ""));
    {
        notif_list_t got = waitNotifs(e1, 2, "genNotif Agent2 -> Agent1");
        std::sort(got.begin(), got.end());
        expectNotif(got[0], kAgent2, "", "genNotif Agent2 -> Agent1 (empty)");
        expectNotif(got[1], kAgent2, binary, "genNotif Agent2 -> Agent1 (binary)");
    }
    std::vector<nixlBackendMD *> remoteOn2 = loadRemoteRegions(e2, r1, kAgent1);
    const Side local2 = makeSide(r2, 0, r2.size(), false);
    const Side remote1 = makeSide(r1, 0, r1.size(), false, &remoteOn2);
    runMatrix(Matrix{"Agent2->Agent1", e2, kAgent2, e1, kAgent1, &local2, &remote1, {NIXL_WRITE, NIXL_READ}, {true},
                     2, binary, !progTh});
    std::printf("reverse: Agent2 -> Agent1 genNotif (binary, empty) and transfers OK\n");

    // Teardown in the agent's destruction order: deregisterMem (local), unloadMD (remote), unloadMD (loopback),
    // then destroy the engines.
    for (const Region &r : r1) CHECK_OK(e1->deregisterMem(r.md));
    for (const Region &r : r2) CHECK_OK(e2->deregisterMem(r.md));
    for (nixlBackendMD *md : remoteOn1) CHECK_OK(e1->unloadMD(md));
    for (nixlBackendMD *md : remoteOn2) CHECK_OK(e2->unloadMD(md));
    for (const Region &r : r1) CHECK_OK(e1->unloadMD(r.loopMd));
    for (const Region &r : r2) CHECK_OK(e2->unloadMD(r.loopMd));
    p.table->destroy_engine(e1);
    p.table->destroy_engine(e2);
    for (Region &r : r1) freeRegion(r);
    for (Region &r : r2) freeRegion(r);
    std::printf("teardown: deregistered, unloaded, engines destroyed\n");
}

} // namespace

int main(int argc, char **argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <path to libplugin_Mooncake.so>\n", argv[0]);
        return 2;
    }
    const auto t0 = Clock::now();
    checkVtableLayout();
    std::printf("abi: header vtable order OK\n");

    Plugin plugin = loadPlugin(argv[1]);
    std::printf("plugin: loaded %s\n", argv[1]);
    checkPluginTable(plugin);

    for (bool progTh : {false, true}) runPass(plugin, progTh);
    if (fakeGpu()) {
        g_mem = VRAM_SEG;
        runPass(plugin, true);
        g_mem = DRAM_SEG;
    } else {
        std::printf("== pass memory VRAM: skipped (NIXL_MOONCAKE_CUDA_LIB does not name the fake CUDA driver) ==\n");
    }

    if (plugin.fini) plugin.fini();
    dlclose(plugin.lib); // RTLD_NODELETE: stays mapped, as in NIXL
    std::printf("mooncake_backend_test: PASS (%.1f s)\n", msSince(t0) / 1000.0);
    return 0;
}
