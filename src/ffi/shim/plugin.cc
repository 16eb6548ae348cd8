// The plugin table NIXL receives from nixl_plugin_init (exported by Rust,
// which calls mooncake_rs_shim_plugin below).
#include <string>
#include <unordered_map>

#include "engine.h"
#include "nixl-mooncake-rs/src/ffi/bridge.rs.h"

namespace {

nixlBackendEngine *create_engine(const nixlBackendInitParams *init) noexcept {
    try {
        return new mooncake_rs::ShimEngine(init);
    } catch (const std::exception &e) {
        mooncake_rs::log_error("create_engine", e.what());
    } catch (...) {
        mooncake_rs::log_error("create_engine", "unknown C++ exception");
    }
    return nullptr;
}

void destroy_engine(nixlBackendEngine *engine) noexcept {
    delete engine; // the Rust engine's Drop cannot throw; a panic there aborts by design of cxx
}

const char *plugin_name() noexcept { return "Mooncake"; }

const char *plugin_version() noexcept { return MOONCAKE_RS_VERSION; }

nixl_b_params_t backend_options() noexcept {
    try {
        nixl_b_params_t out;
        for (const auto &o : mooncake_rs::option_defaults())
            out.emplace(std::string(o.name.data(), o.name.size()), std::string(o.value.data(), o.value.size()));
        return out;
    } catch (const std::exception &e) {
        mooncake_rs::log_error("get_backend_options", e.what());
        return {};
    }
}

nixl_mem_list_t backend_mems() noexcept {
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

nixlBackendPlugin plugin = {
    NIXL_PLUGIN_API_VERSION, create_engine, destroy_engine, plugin_name, plugin_version, backend_options,
    backend_mems,
};

} // namespace

extern "C" nixlBackendPlugin *mooncake_rs_shim_plugin() noexcept { return &plugin; }
