// The NIXL backend engine interface: the abstract class a plugin's engine derives from, and its helper types.
//
// Our own ABI-exact declarations, written from /work/shared/nixl-abi.md (see nixl_types.h). libnixl calls the
// engine only through its vtable and reads a few data members directly, so the member order and the order of
// the virtual methods below are the ABI: do not add, remove or reorder any of them. Non-virtual inline
// accessors may be added freely. Everything here is inline or pure, so a plugin links nothing from NIXL.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "nixl_descriptors.h"
#include "nixl_types.h"

// Base of a backend's per-region metadata (16 bytes: vptr, isPrivateMD@8). The agent stores and hands back the
// pointers the engine gives it (registerMem, loadRemoteMD, loadLocalMD) but never dereferences or deletes them.
class nixlBackendMD {
    friend struct nixl_abi_layout_check;

protected:
    bool isPrivateMD; // true for local (registered) regions, false for remote ones; nothing depends on it

public:
    explicit nixlBackendMD(bool isPrivate) : isPrivateMD(isPrivate) {}
    virtual ~nixlBackendMD() = default;

    bool isPrivate() const { return isPrivateMD; }
};

// Base of a backend's transfer request handle (8 bytes: vptr only). Created by prepXfer, released by exactly one
// releaseReqH; the agent never dereferences or deletes it.
class nixlBackendReqH {
public:
    nixlBackendReqH() = default;
    virtual ~nixlBackendReqH() = default;
};

// Per-call options the agent passes to prepXfer/postXfer/prepMemView (72 bytes). Never null from the agent, but
// backends should accept null.
struct nixlBackendOptionalArgs {
    std::string notifMsg;    // @0: payload delivered to the remote agent after the transfer, if hasNotif
    bool hasNotif = false;   // @32
    std::string customParam; // @40: backend-specific free-form parameter
};
using nixl_opt_b_args_t = nixlBackendOptionalArgs;

// What create_engine receives (96 bytes). Valid only during create_engine: copy what must outlive it.
struct nixlBackendInitParams {
    std::string localAgent;                  // @0: this agent's name
    nixl_backend_t type;                     // @32: the backend name, "Mooncake"
    nixl_b_params_t *customParams = nullptr; // @64: the user's backend options
    bool enableProgTh = false;               // @72: backend should progress on its own (Python default: true)
    uint64_t pthrDelay = 0;                  // @80: progress thread delay in microseconds (Python: 0)
    nixl_thread_sync_t syncMode = nixl_thread_sync_t::NIXL_THREAD_SYNC_NONE; // @88
    bool enableTelemetry_ = false;           // @92
};

// One telemetry event as stored by the engine base (16 bytes). Layout only: NIXL 1.5.1 never drains the
// event vector, so a plugin must not push to it.
struct nixlBackendTelemetryEvent {
    uint32_t eventType; // an enum in NIXL
    uint64_t value;
};

// The abstract backend engine (208 bytes). libnixl reads backendType, customParams and initErr directly.
class nixlBackendEngine {
    friend struct nixl_abi_layout_check;

private:
    const nixl_backend_t backendType; // @8: copy of init->type
    nixl_b_params_t customParams;     // @40: copy of *init->customParams

    // Telemetry (layout only, never touched by the plugin).
    std::vector<nixlBackendTelemetryEvent> telemetryEvents_; // @96
    mutable std::mutex telemetryEventsMutex_;                // @120

protected:
    bool initErr;                 // @160: set true in the derived constructor to make creation fail
    const std::string localAgent; // @168: this agent's name
    const bool enableTelemetry_;  // @200

public:
    // Inline by ABI: the plugin supplies it. A null customParams is tolerated (NIXL never passes one).
    explicit nixlBackendEngine(const nixlBackendInitParams *init_params)
        : backendType(init_params->type),
          customParams(init_params->customParams ? *init_params->customParams : nixl_b_params_t()),
          initErr(false),
          localAgent(init_params->localAgent),
          enableTelemetry_(init_params->enableTelemetry_) {}

    nixlBackendEngine(const nixlBackendEngine &) = delete;
    nixlBackendEngine(nixlBackendEngine &&) = delete;
    nixlBackendEngine &operator=(const nixlBackendEngine &) = delete;
    nixlBackendEngine &operator=(nixlBackendEngine &&) = delete;

    // Non-virtual accessors (no effect on layout).
    bool getInitErr() const { return initErr; }
    const nixl_backend_t &getType() const { return backendType; }
    const nixl_b_params_t &getCustomParams() const { return customParams; }

    // ---- vtable, in slot order (slot = index from the vtable's address point) ----

    // Slots 0, 1: complete and deleting destructors.
    virtual ~nixlBackendEngine() = default;

    // Slots 2-4: capabilities. supportsRemote requires supportsNotif and a non-empty getConnInfo;
    // supportsLocal makes the agent call connect(<own name>) and loadLocalMD per registration.
    virtual bool supportsRemote() const = 0; // 2
    virtual bool supportsLocal() const = 0;  // 3
    virtual bool supportsNotif() const = 0;  // 4

    virtual nixl_mem_list_t getSupportedMems() const = 0; // 5

    // Slots 6, 7: local memory registration; `out` is our metadata object for the region.
    virtual nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &nixl_mem,
                                      nixlBackendMD *&out) = 0; // 6
    virtual nixl_status_t deregisterMem(nixlBackendMD *meta) = 0; // 7

    // Slots 8, 9: connection management (connect is optional for the agent: connect lazily).
    virtual nixl_status_t connect(const std::string &remote_agent) = 0;    // 8
    virtual nixl_status_t disconnect(const std::string &remote_agent) = 0; // 9

    // Slot 10: release an object from loadRemoteMD or loadLocalMD.
    virtual nixl_status_t unloadMD(nixlBackendMD *input) = 0; // 10

    // Slots 11-14: transfers. prepXfer once, postXfer possibly many times on the same handle, poll checkXfer
    // while IN_PROG, releaseReqH exactly once (cancel without blocking if still in flight).
    virtual nixl_status_t prepXfer(const nixl_xfer_op_t &operation, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle,
                                   const nixl_opt_b_args_t *opt_args = nullptr) const = 0; // 11
    virtual nixl_status_t postXfer(const nixl_xfer_op_t &operation, const nixl_meta_dlist_t &local,
                                   const nixl_meta_dlist_t &remote, const std::string &remote_agent,
                                   nixlBackendReqH *&handle,
                                   const nixl_opt_b_args_t *opt_args = nullptr) const = 0; // 12
    virtual nixl_status_t checkXfer(nixlBackendReqH *handle) const = 0;   // 13
    virtual nixl_status_t releaseReqH(nixlBackendReqH *handle) const = 0; // 14

    // Slots 15-17: memory views (device-side access); not supported by default.
    virtual nixl_status_t prepMemView(const nixl_remote_meta_dlist_t &, void *&,
                                      const nixl_opt_b_args_t * = nullptr) const { // 15
        return NIXL_ERR_NOT_SUPPORTED;
    }
    virtual nixl_status_t prepMemView(const nixl_meta_dlist_t &, void *&,
                                      const nixl_opt_b_args_t * = nullptr) const { // 16
        return NIXL_ERR_NOT_SUPPORTED;
    }
    virtual void releaseMemView(void *) const {} // 17

    // Slot 18: the blob a remote peer passes to its loadRemoteMD for one of our registrations.
    virtual nixl_status_t getPublicData(const nixlBackendMD *, std::string &) const { // 18
        return NIXL_ERR_BACKEND;
    }

    // Slots 19, 20: connection info, carried in the agent's metadata to the peers.
    virtual nixl_status_t getConnInfo(std::string &) const { return NIXL_ERR_BACKEND; } // 19
    virtual nixl_status_t loadRemoteConnInfo(const std::string &, const std::string &) { // 20
        return NIXL_ERR_BACKEND;
    }

    // Slot 21: build the remote-side object for a peer's region from its getPublicData blob (in metaInfo).
    virtual nixl_status_t loadRemoteMD(const nixlBlobDesc &, const nixl_mem_t &, const std::string &,
                                       nixlBackendMD *&) { // 21
        return NIXL_ERR_BACKEND;
    }

    // Slot 22: remote-side object for one of our own regions (loopback); must not borrow from its input.
    virtual nixl_status_t loadLocalMD(nixlBackendMD *, nixlBackendMD *&) { return NIXL_ERR_BACKEND; } // 22

    // Slots 23, 24: notifications. getNotifs appends (sender, msg) to the list it is given.
    virtual nixl_status_t getNotifs(notif_list_t &) { return NIXL_ERR_BACKEND; } // 23
    virtual nixl_status_t genNotif(const std::string &, const std::string &) const { // 24
        return NIXL_ERR_BACKEND;
    }

    // Slot 25: per-descriptor backend parameters of registrable memory.
    virtual nixl_status_t queryMem(const nixl_reg_dlist_t &,
                                   std::vector<std::optional<nixl_b_params_t>> &) const { // 25
        return NIXL_ERR_NOT_SUPPORTED;
    }

    // Slot 26: transfer cost estimate.
    virtual nixl_status_t estimateXferCost(const nixl_xfer_op_t &, const nixl_meta_dlist_t &,
                                           const nixl_meta_dlist_t &, const std::string &,
                                           nixlBackendReqH *const &, std::chrono::microseconds &,
                                           std::chrono::microseconds &, nixl_cost_t &,
                                           const nixl_opt_args_t * = nullptr) const { // 26
        return NIXL_ERR_NOT_SUPPORTED;
    }
};
