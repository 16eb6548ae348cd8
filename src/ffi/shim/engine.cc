// Forwarding of every nixlBackendEngine method into Rust (see engine.h).
#include "engine.h"

#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "nixl-mooncake-rs/src/ffi/bridge.rs.h"

namespace mooncake_rs {
namespace {

rust::Slice<const uint8_t> bytes(const std::string &s) {
    return {reinterpret_cast<const uint8_t *>(s.data()), s.size()};
}

std::string to_string(const rust::Vec<uint8_t> &v) {
    return {reinterpret_cast<const char *>(v.data()), v.size()};
}

uint64_t md_id(const nixlBackendMD *md) {
    auto *ours = dynamic_cast<const ShimMD *>(md);
    return ours ? ours->id : 0; // 0 is never a valid id: Rust reports it
}

// Deletes `md` when engine `self` made it: NIXL never uses a metadata object
// again after deregisterMem or unloadMD, whatever the outcome; an object
// another engine made stays that engine's (the call failed with NOT_FOUND).
void release_md(const void *self, nixlBackendMD *md) {
    auto *ours = dynamic_cast<ShimMD *>(md);
    if (ours != nullptr && ours->owner == self) delete ours;
}

// Descriptors a thread's prepXfer buffers keep room for between calls.
constexpr size_t kPrepDescsKept = 64 << 10;

// Fills `out` (kept per thread and reused: a prep of thousands of
// descriptors then costs no fresh pages) with the descriptors of `list`.
void flatten(const nixl_meta_dlist_t &list, std::vector<XferDesc> &out) {
    out.clear();
    out.reserve(static_cast<size_t>(list.descCount()));
    // Consecutive descriptors nearly always share one metadata object.
    const nixlBackendMD *last = nullptr;
    uint64_t last_id = 0;
    for (int i = 0; i < list.descCount(); ++i) {
        const nixlMetaDesc &d = list[i];
        if (d.metadataP != last || i == 0) {
            last = d.metadataP;
            last_id = md_id(last);
        }
        out.push_back(XferDesc{static_cast<uint64_t>(d.addr), static_cast<uint64_t>(d.len), last_id});
    }
}

// Runs one forwarded call; no exception ever leaves it.
template <class F> nixl_status_t guarded(const char *what, F &&f) noexcept {
    try {
        return f();
    } catch (const std::exception &e) {
        log_error(what, e.what());
    } catch (...) {
        log_error(what, "unknown C++ exception");
    }
    return NIXL_ERR_UNKNOWN;
}

} // namespace

void log_error(const char *what, const char *detail) noexcept {
    try {
        std::string msg = std::string(what) + ": " + detail;
        shim_log_error(bytes(msg));
    } catch (...) {
        // Nothing left to report with.
    }
}

ShimEngine::ShimEngine(const nixlBackendInitParams *init) : nixlBackendEngine(init) {
    try {
        std::vector<Param> params;
        if (init->customParams) {
            for (const auto &[key, value] : *init->customParams) {
                Param p;
                for (char c : key) p.key.push_back(static_cast<uint8_t>(c));
                for (char c : value) p.value.push_back(static_cast<uint8_t>(c));
                params.push_back(std::move(p));
            }
        }
        engine_.emplace(engine_new(bytes(init->localAgent), {params.data(), params.size()}, init->enableProgTh,
                                   init->pthrDelay));
    } catch (const std::exception &e) {
        // The one log line of a failed creation (the Rust side returns why\n        // without logging); this covers allocation failures too.
        log_error("create_engine", e.what());
        initErr = true;
    } catch (...) {
        log_error("create_engine", "unknown C++ exception");
        initErr = true;
    }
}

ShimEngine::~ShimEngine() = default;

#define ENGINE_OR_FAIL                                                                                            \
    if (!engine_) return NIXL_ERR_BACKEND;                                                                         \
    const Engine &e = **engine_

nixl_mem_list_t ShimEngine::getSupportedMems() const {
    try {
        // VRAM always, whether or not a CUDA driver exists here: finding out
        // would load it (and call cuInit) while NIXL only lists memory types,
        // before a caller may fork. Without a driver, registerMem(VRAM) fails
        // with NIXL_ERR_NOT_SUPPORTED and a log line saying why.
        return {DRAM_SEG, VRAM_SEG};
    } catch (...) {
        return {};
    }
}

nixl_status_t ShimEngine::registerMem(const nixlBlobDesc &mem, const nixl_mem_t &nixl_mem, nixlBackendMD *&out) {
    return guarded("registerMem", [&] {
        ENGINE_OR_FAIL;
        auto md = std::make_unique<ShimMD>(true, this);
        auto rc = static_cast<nixl_status_t>(mooncake_rs::register_mem(
            e, mem.addr, mem.len, mem.devId, static_cast<int32_t>(nixl_mem), md->id));
        if (rc == NIXL_SUCCESS) out = md.release();
        return rc;
    });
}

nixl_status_t ShimEngine::deregisterMem(nixlBackendMD *meta) {
    return guarded("deregisterMem", [&] {
        ENGINE_OR_FAIL;
        auto rc = static_cast<nixl_status_t>(deregister_mem(e, md_id(meta)));
        release_md(this, meta);
        return rc;
    });
}

nixl_status_t ShimEngine::connect(const std::string &remote_agent) {
    return guarded("connect", [&] {
        ENGINE_OR_FAIL;
        return static_cast<nixl_status_t>(mooncake_rs::connect(e, bytes(remote_agent)));
    });
}

nixl_status_t ShimEngine::disconnect(const std::string &remote_agent) {
    return guarded("disconnect", [&] {
        ENGINE_OR_FAIL;
        return static_cast<nixl_status_t>(mooncake_rs::disconnect(e, bytes(remote_agent)));
    });
}

nixl_status_t ShimEngine::unloadMD(nixlBackendMD *input) {
    return guarded("unloadMD", [&] {
        ENGINE_OR_FAIL;
        auto rc = static_cast<nixl_status_t>(unload_md(e, md_id(input)));
        release_md(this, input);
        return rc;
    });
}

nixl_status_t ShimEngine::prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle, const nixl_opt_b_args_t *) const {
    return guarded("prepXfer", [&] {
        ENGINE_OR_FAIL;
        thread_local std::vector<XferDesc> l, r;
        flatten(local, l);
        flatten(remote, r);
        auto h = std::make_unique<ShimReqH>(0);
        auto rc = static_cast<nixl_status_t>(prep_xfer(e, static_cast<int32_t>(op), {l.data(), l.size()},
                                                       {r.data(), r.size()}, bytes(remote_agent), h->id));
        for (auto *v : {&l, &r}) {
            if (v->capacity() > kPrepDescsKept) std::vector<XferDesc>().swap(*v); // a rare huge prep
        }
        if (rc == NIXL_SUCCESS) handle = h.release();
        return rc;
    });
}

nixl_status_t ShimEngine::postXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle, const nixl_opt_b_args_t *opt_args) const {
    return guarded("postXfer", [&] {
        ENGINE_OR_FAIL;
        if (!handle) { // not prepped (the agent always preps; be defensive)
            auto rc = prepXfer(op, local, remote, remote_agent, handle, opt_args);
            if (rc != NIXL_SUCCESS) return rc;
        }
        auto *h = dynamic_cast<ShimReqH *>(handle);
        bool has_notif = opt_args && opt_args->hasNotif;
        rust::Slice<const uint8_t> msg = has_notif ? bytes(opt_args->notifMsg) : rust::Slice<const uint8_t>();
        return static_cast<nixl_status_t>(post_xfer(e, h ? h->id : 0, has_notif, msg));
    });
}

nixl_status_t ShimEngine::checkXfer(nixlBackendReqH *handle) const {
    return guarded("checkXfer", [&] {
        ENGINE_OR_FAIL;
        auto *h = dynamic_cast<ShimReqH *>(handle);
        return static_cast<nixl_status_t>(check_xfer(e, h ? h->id : 0));
    });
}

nixl_status_t ShimEngine::releaseReqH(nixlBackendReqH *handle) const {
    return guarded("releaseReqH", [&] {
        ENGINE_OR_FAIL;
        auto *h = dynamic_cast<ShimReqH *>(handle);
        auto rc = static_cast<nixl_status_t>(release_req(e, h ? h->id : 0));
        if (rc >= 0) delete handle;
        return rc;
    });
}

nixl_status_t ShimEngine::getPublicData(const nixlBackendMD *meta, std::string &str) const {
    return guarded("getPublicData", [&] {
        ENGINE_OR_FAIL;
        rust::Vec<uint8_t> out;
        auto rc = static_cast<nixl_status_t>(get_public_data(e, md_id(meta), out));
        if (rc == NIXL_SUCCESS) str = to_string(out);
        return rc;
    });
}

nixl_status_t ShimEngine::getConnInfo(std::string &str) const {
    return guarded("getConnInfo", [&] {
        ENGINE_OR_FAIL;
        rust::Vec<uint8_t> out;
        auto rc = static_cast<nixl_status_t>(get_conn_info(e, out));
        if (rc == NIXL_SUCCESS) str = to_string(out);
        return rc;
    });
}

nixl_status_t ShimEngine::loadRemoteConnInfo(const std::string &remote_agent, const std::string &conn) {
    return guarded("loadRemoteConnInfo", [&] {
        ENGINE_OR_FAIL;
        return static_cast<nixl_status_t>(load_remote_conn_info(e, bytes(remote_agent), bytes(conn)));
    });
}

nixl_status_t ShimEngine::loadRemoteMD(const nixlBlobDesc &input, const nixl_mem_t &nixl_mem,
                                       const std::string &remote_agent, nixlBackendMD *&output) {
    return guarded("loadRemoteMD", [&] {
        ENGINE_OR_FAIL;
        auto md = std::make_unique<ShimMD>(false, this);
        auto rc = static_cast<nixl_status_t>(load_remote_md(e, input.addr, input.len, static_cast<int32_t>(nixl_mem),
                                                            bytes(input.metaInfo), bytes(remote_agent), md->id));
        if (rc == NIXL_SUCCESS) output = md.release();
        return rc;
    });
}

nixl_status_t ShimEngine::loadLocalMD(nixlBackendMD *input, nixlBackendMD *&output) {
    return guarded("loadLocalMD", [&] {
        ENGINE_OR_FAIL;
        auto md = std::make_unique<ShimMD>(false, this);
        auto rc = static_cast<nixl_status_t>(load_local_md(e, md_id(input), md->id));
        if (rc == NIXL_SUCCESS) output = md.release();
        return rc;
    });
}

nixl_status_t ShimEngine::getNotifs(notif_list_t &notif_list) {
    return guarded("getNotifs", [&] {
        ENGINE_OR_FAIL;
        rust::Vec<NotifOut> out;
        auto rc = static_cast<nixl_status_t>(get_notifs(e, out));
        for (const auto &n : out) notif_list.emplace_back(to_string(n.agent), to_string(n.msg));
        return rc;
    });
}

nixl_status_t ShimEngine::genNotif(const std::string &remote_agent, const std::string &msg) const {
    return guarded("genNotif", [&] {
        ENGINE_OR_FAIL;
        return static_cast<nixl_status_t>(gen_notif(e, bytes(remote_agent), bytes(msg)));
    });
}

} // namespace mooncake_rs
