// Umbrella header for a NIXL 1.5 backend plugin, with compile-time checks of every size and offset that
// /work/shared/nixl-abi.md fixes (x86-64 Linux, libstdc++ cxx11 ABI, C++20). If one of these fails, the
// toolchain or standard library does not produce NIXL's layout and the plugin would corrupt memory.
// The vtable slot order cannot be checked at compile time; the backend test checks it at run time.
#pragma once

#include <cstddef>
#include <type_traits>

#include "backend_engine.h"
#include "backend_plugin.h"
#include "nixl_descriptors.h"
#include "nixl_types.h"

#if !defined(__x86_64__) || !defined(__linux__) || !defined(__GLIBCXX__) || !_GLIBCXX_USE_CXX11_ABI
#error "the NIXL plugin ABI declared here is x86-64 Linux with libstdc++ and the cxx11 string ABI"
#endif
#if defined(_GLIBCXX_DEBUG)
#error "_GLIBCXX_DEBUG changes the layout of std containers and breaks the NIXL ABI"
#endif

// Friend of the classes with non-public members, so their offsets can be checked here.
struct nixl_abi_layout_check {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
    // Enums: all int-sized.
    static_assert(sizeof(nixl_status_t) == 4 && alignof(nixl_status_t) == 4);
    static_assert(sizeof(nixl_mem_t) == 4 && alignof(nixl_mem_t) == 4);
    static_assert(sizeof(nixl_xfer_op_t) == 4 && alignof(nixl_xfer_op_t) == 4);
    static_assert(std::is_same_v<std::underlying_type_t<nixl_thread_sync_t>, int>);
    static_assert(std::is_same_v<std::underlying_type_t<nixl_cost_t>, int>);
    static_assert(NIXL_SUCCESS == 0 && NIXL_IN_PROG == 1 && NIXL_ERR_NO_TELEMETRY == -12);
    static_assert(DRAM_SEG == 0 && FILE_SEG == 4 && NIXL_READ == 0 && NIXL_WRITE == 1);
    static_assert(static_cast<int>(nixl_thread_sync_t::NIXL_THREAD_SYNC_RW) == 2);

    // nixlBackendPlugin (56 bytes).
    static_assert(sizeof(nixlBackendPlugin) == 56 && alignof(nixlBackendPlugin) == 8);
    static_assert(offsetof(nixlBackendPlugin, api_version) == 0);
    static_assert(offsetof(nixlBackendPlugin, create_engine) == 8);
    static_assert(offsetof(nixlBackendPlugin, destroy_engine) == 16);
    static_assert(offsetof(nixlBackendPlugin, get_plugin_name) == 24);
    static_assert(offsetof(nixlBackendPlugin, get_plugin_version) == 32);
    static_assert(offsetof(nixlBackendPlugin, get_backend_options) == 40);
    static_assert(offsetof(nixlBackendPlugin, get_backend_mems) == 48);

    // nixlBackendInitParams (96 bytes).
    static_assert(sizeof(nixlBackendInitParams) == 96 && alignof(nixlBackendInitParams) == 8);
    static_assert(offsetof(nixlBackendInitParams, localAgent) == 0);
    static_assert(offsetof(nixlBackendInitParams, type) == 32);
    static_assert(offsetof(nixlBackendInitParams, customParams) == 64);
    static_assert(offsetof(nixlBackendInitParams, enableProgTh) == 72);
    static_assert(offsetof(nixlBackendInitParams, pthrDelay) == 80);
    static_assert(offsetof(nixlBackendInitParams, syncMode) == 88);
    static_assert(offsetof(nixlBackendInitParams, enableTelemetry_) == 92);

    // nixlBackendEngine (208 bytes, vptr at 0).
    static_assert(std::is_polymorphic_v<nixlBackendEngine> && std::is_abstract_v<nixlBackendEngine>);
    static_assert(std::has_virtual_destructor_v<nixlBackendEngine>);
    static_assert(sizeof(nixlBackendEngine) == 208 && alignof(nixlBackendEngine) == 8);
    static_assert(offsetof(nixlBackendEngine, backendType) == 8);
    static_assert(offsetof(nixlBackendEngine, customParams) == 40);
    static_assert(offsetof(nixlBackendEngine, telemetryEvents_) == 96);
    static_assert(offsetof(nixlBackendEngine, telemetryEventsMutex_) == 120);
    static_assert(offsetof(nixlBackendEngine, initErr) == 160);
    static_assert(offsetof(nixlBackendEngine, localAgent) == 168);
    static_assert(offsetof(nixlBackendEngine, enableTelemetry_) == 200);
    static_assert(sizeof(nixlBackendTelemetryEvent) == 16);

    // nixlBackendMD (16 bytes), nixlBackendReqH (8 bytes).
    static_assert(sizeof(nixlBackendMD) == 16 && std::has_virtual_destructor_v<nixlBackendMD>);
    static_assert(offsetof(nixlBackendMD, isPrivateMD) == 8);
    static_assert(sizeof(nixlBackendReqH) == 8 && std::has_virtual_destructor_v<nixlBackendReqH>);

    // nixlBackendOptionalArgs (72 bytes).
    static_assert(sizeof(nixlBackendOptionalArgs) == 72);
    static_assert(offsetof(nixlBackendOptionalArgs, notifMsg) == 0);
    static_assert(offsetof(nixlBackendOptionalArgs, hasNotif) == 32);
    static_assert(offsetof(nixlBackendOptionalArgs, customParam) == 40);

    // Descriptors (no vptr).
    static_assert(!std::is_polymorphic_v<nixlBasicDesc> && !std::is_polymorphic_v<nixlRemoteMetaDesc>);
    static_assert(sizeof(nixlBasicDesc) == 24);
    static_assert(offsetof(nixlBasicDesc, addr) == 0);
    static_assert(offsetof(nixlBasicDesc, len) == 8);
    static_assert(offsetof(nixlBasicDesc, devId) == 16);
    static_assert(sizeof(nixlBlobDesc) == 56 && offsetof(nixlBlobDesc, metaInfo) == 24);
    static_assert(sizeof(nixlMetaDesc) == 32 && offsetof(nixlMetaDesc, metadataP) == 24);
    static_assert(sizeof(nixlRemoteMetaDesc) == 64 && offsetof(nixlRemoteMetaDesc, remoteAgent) == 32);

    // nixlDescList<T> (40 bytes): vptr@0, type@8, descs@16, for every instantiation a backend sees.
#define NIXL_ABI_CHECK_DESC_LIST(T)                                                                          \
    static_assert(std::is_polymorphic_v<nixlDescList<T>> && sizeof(nixlDescList<T>) == 40);                  \
    static_assert(offsetof(nixlDescList<T>, type) == 8 && offsetof(nixlDescList<T>, descs) == 16)
    NIXL_ABI_CHECK_DESC_LIST(nixlMetaDesc);
    NIXL_ABI_CHECK_DESC_LIST(nixlRemoteMetaDesc);
    NIXL_ABI_CHECK_DESC_LIST(nixlBlobDesc);
    NIXL_ABI_CHECK_DESC_LIST(nixlBasicDesc);
#undef NIXL_ABI_CHECK_DESC_LIST
#pragma GCC diagnostic pop
};
