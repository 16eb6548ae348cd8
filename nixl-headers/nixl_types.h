// Basic NIXL types shared by the agent and its backend plugins.
//
// Our own ABI-exact declarations, written from /work/shared/nixl-abi.md (NIXL 1.5 plugin ABI; x86-64 Linux,
// libstdc++ with the cxx11 string ABI, C++20). Not NIXL's header: only what a backend plugin needs. Every enum
// below is int-sized; the names of `nixl_mem_t`, `nixl_xfer_op_t`, `nixl_cost_t` and `nixlAgentOptionalArgs`
// appear in mangled virtual-method names, so they must stay exactly as spelled here.
#pragma once

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

// Result of every engine operation. Plain (unscoped) enum, values fixed by the ABI.
enum nixl_status_t {
    NIXL_IN_PROG = 1,                 // posted, still in flight: poll checkXfer
    NIXL_SUCCESS = 0,
    NIXL_ERR_NOT_POSTED = -1,
    NIXL_ERR_INVALID_PARAM = -2,
    NIXL_ERR_BACKEND = -3,            // generic backend failure (also the default of optional methods)
    NIXL_ERR_NOT_FOUND = -4,
    NIXL_ERR_MISMATCH = -5,
    NIXL_ERR_NOT_ALLOWED = -6,
    NIXL_ERR_REPOST_ACTIVE = -7,      // agent-side: repost while the previous post is in flight
    NIXL_ERR_UNKNOWN = -8,
    NIXL_ERR_NOT_SUPPORTED = -9,
    NIXL_ERR_REMOTE_DISCONNECT = -10, // makes the agent drop the remote (unloadMD + disconnect)
    NIXL_ERR_CANCELED = -11,
    NIXL_ERR_NO_TELEMETRY = -12,
};

// Memory segment kinds a descriptor list / registration refers to.
enum nixl_mem_t {
    DRAM_SEG = 0, // host memory; devId is 0
    VRAM_SEG = 1, // GPU memory; devId is the GPU index
    BLK_SEG = 2,
    OBJ_SEG = 3,
    FILE_SEG = 4,
};

// Transfer direction, seen from the initiator: READ pulls remote -> local, WRITE pushes local -> remote.
enum nixl_xfer_op_t {
    NIXL_READ = 0,
    NIXL_WRITE = 1,
};

// Agent thread-safety mode (nixlBackendInitParams::syncMode). Under RW the const engine methods run
// concurrently; the engine must be thread-safe on its own in every mode.
enum class nixl_thread_sync_t : int {
    NIXL_THREAD_SYNC_NONE = 0,
    NIXL_THREAD_SYNC_STRICT = 1,
    NIXL_THREAD_SYNC_RW = 2,
};

// How estimateXferCost computed its estimate.
enum class nixl_cost_t : int {
    ANALYTICAL_BACKEND = 0,
};

// A backend name, e.g. "Mooncake" (the <NAME> of libplugin_<NAME>.so).
using nixl_backend_t = std::string;

// Backend parameters: user options at creation, per-region answers of queryMem.
using nixl_b_params_t = std::unordered_map<std::string, std::string>;

// Memory types a backend supports.
using nixl_mem_list_t = std::vector<nixl_mem_t>;

// Received notifications: (sender agent's name, message bytes; may be empty or contain NUL).
using notif_list_t = std::vector<std::pair<std::string, std::string>>;

// Agent-side optional arguments, only ever passed by pointer to a backend (estimateXferCost).
struct nixlAgentOptionalArgs;
using nixl_opt_args_t = nixlAgentOptionalArgs;
