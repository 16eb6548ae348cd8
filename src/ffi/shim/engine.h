// The C++ face NIXL sees: a nixlBackendEngine whose every method forwards to
// the Rust engine through the cxx bridge. No logic lives here: descriptor lists
// are flattened, strings passed as bytes, exceptions caught.
#pragma once

#include <cstdint>
#include <optional>

#include "nixl_plugin_abi.h"
#include "rust/cxx.h"

namespace mooncake_rs {

struct Engine; // the Rust engine (opaque)

// Our metadata object: the id of a registration or a loaded remote region,
// and the engine that made it (only that engine ever deletes it).
class ShimMD final : public nixlBackendMD {
public:
    ShimMD(bool is_private, const void *owner) : nixlBackendMD(is_private), owner(owner) {}
    uint64_t id = 0;
    const void *owner;
};

// Our request handle: the id of a request in the Rust request slab.
class ShimReqH final : public nixlBackendReqH {
public:
    explicit ShimReqH(uint64_t id) : id(id) {}
    uint64_t id;
};

class ShimEngine final : public nixlBackendEngine {
public:
    explicit ShimEngine(const nixlBackendInitParams *init);
    ~ShimEngine() override;

    bool supportsRemote() const override { return true; }
    bool supportsLocal() const override { return true; }
    bool supportsNotif() const override { return true; }
    nixl_mem_list_t getSupportedMems() const override;

    nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &nixl_mem, nixlBackendMD *&out) override;
    nixl_status_t deregisterMem(nixlBackendMD *meta) override;
    nixl_status_t connect(const std::string &remote_agent) override;
    nixl_status_t disconnect(const std::string &remote_agent) override;
    nixl_status_t unloadMD(nixlBackendMD *input) override;

    nixl_status_t prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                           const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                           nixlBackendReqH *&handle, const nixl_opt_b_args_t *opt_args) const override;
    nixl_status_t postXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local,
                           const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                           nixlBackendReqH *&handle, const nixl_opt_b_args_t *opt_args) const override;
    nixl_status_t checkXfer(nixlBackendReqH *handle) const override;
    nixl_status_t releaseReqH(nixlBackendReqH *handle) const override;

    nixl_status_t getPublicData(const nixlBackendMD *meta, std::string &str) const override;
    nixl_status_t getConnInfo(std::string &str) const override;
    nixl_status_t loadRemoteConnInfo(const std::string &remote_agent, const std::string &conn) override;
    nixl_status_t loadRemoteMD(const nixlBlobDesc &input, const nixl_mem_t &nixl_mem,
                               const std::string &remote_agent, nixlBackendMD *&output) override;
    nixl_status_t loadLocalMD(nixlBackendMD *input, nixlBackendMD *&output) override;
    nixl_status_t getNotifs(notif_list_t &notif_list) override;
    nixl_status_t genNotif(const std::string &remote_agent, const std::string &msg) const override;

private:
    std::optional<rust::Box<Engine>> engine_;
};

// Logs through the Rust logger (defined in engine.cc, never throws).
void log_error(const char *what, const char *detail) noexcept;

} // namespace mooncake_rs
