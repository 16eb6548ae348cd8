// The NIXL backend plugin entry point: the table `nixl_plugin_init()` returns.
//
// Our own ABI-exact declarations, written from /work/shared/nixl-abi.md (see nixl_types.h). NIXL loads
// `libplugin_<NAME>.so` with dlopen(RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE), calls the C-linkage export
// `nixl_plugin_init` (required; may run several times per process, must return the same static table each time)
// and, when unloading, `nixl_plugin_fini` (optional; also may run several times).
#pragma once

#include "backend_engine.h"
#include "nixl_types.h"

// The only plugin API version NIXL 1.5 accepts; any other value fails the load.
#define NIXL_PLUGIN_API_VERSION 1

// Names of the exported entry points (C linkage, default visibility).
#define NIXL_PLUGIN_INIT_SYMBOL "nixl_plugin_init"
#define NIXL_PLUGIN_FINI_SYMBOL "nixl_plugin_fini"

// The plugin's function table (56 bytes).
struct nixlBackendPlugin {
    int api_version; // @0: must equal NIXL_PLUGIN_API_VERSION

    // @8: a new engine, or nullptr on failure (an engine with initErr set also fails creation).
    nixlBackendEngine *(*create_engine)(const nixlBackendInitParams *init_params);
    // @16: destroy an engine made by create_engine.
    void (*destroy_engine)(nixlBackendEngine *engine);
    // @24, @32: informational strings (never compared by NIXL).
    const char *(*get_plugin_name)();
    const char *(*get_plugin_version)();
    // @40: default backend options (name -> value), returned by value: a C++ function.
    nixl_b_params_t (*get_backend_options)();
    // @48: memory types the backend supports, returned by value: a C++ function.
    nixl_mem_list_t (*get_backend_mems)();
};

// Types of the two exports, for dlsym users.
using nixl_plugin_init_fn_t = nixlBackendPlugin *(*)();
using nixl_plugin_fini_fn_t = void (*)();
