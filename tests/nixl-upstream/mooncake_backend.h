// Stand-in for NIXL's src/plugins/mooncake/mooncake_backend.h, so that NIXL's own unmodified
// test/unit/plugins/mooncake/mooncake_backend_test.cpp builds against this project's plugin
// (scripts/nixl-upstream-test.sh compiles and runs it).
//
// NIXL's test constructs `new nixlMooncakeEngine(&init)` and uses it as a nixlBackendEngine. Here that class is
// a thin forwarder: its constructor loads libplugin_Mooncake.so the way libnixl does (dlopen with
// RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE, then the exported `nixl_plugin_init`), creates the real engine through
// the plugin's `create_engine`, and every virtual call goes to that engine unchanged; the destructor hands it
// to `destroy_engine`. Metadata objects and request handles are the plugin's own, passed through as they are.
//
// The plugin's path is $MOONCAKE_PLUGIN_PATH (required). Only our own ABI declarations (nixl-headers/) are used.
#pragma once

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring> // NIXL's header brings it; the test relies on it
#include <string>

#include "nixl_plugin_abi.h"

// nixlDescList's out-of-line members, which libnixl supplies to NIXL's own build of this test.
#include "../nixl_desc_list_defs.h"

class nixlMooncakeEngine : public nixlBackendEngine {
    nixlBackendPlugin *plugin_ = nullptr;
    nixlBackendEngine *engine_ = nullptr;

    // The plugin's table, loaded once per process like libnixl's plugin manager does.
    static nixlBackendPlugin *loadPlugin() {
        static nixlBackendPlugin *table = [] {
            const char *path = std::getenv("MOONCAKE_PLUGIN_PATH");
            if (!path || !*path) {
                std::fprintf(stderr, "mooncake_backend.h: set MOONCAKE_PLUGIN_PATH to libplugin_Mooncake.so\n");
                return static_cast<nixlBackendPlugin *>(nullptr);
            }
            void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
            if (!lib) {
                std::fprintf(stderr, "mooncake_backend.h: dlopen(%s): %s\n", path, dlerror());
                return static_cast<nixlBackendPlugin *>(nullptr);
            }
            auto init = reinterpret_cast<nixl_plugin_init_fn_t>(dlsym(lib, "nixl_plugin_init"));
            nixlBackendPlugin *t = init ? init() : nullptr;
            if (!t || t->api_version != NIXL_PLUGIN_API_VERSION) {
                std::fprintf(stderr, "mooncake_backend.h: %s has no usable nixl_plugin_init\n", path);
                return static_cast<nixlBackendPlugin *>(nullptr);
            }
            return t;
        }();
        return table;
    }

public:
    explicit nixlMooncakeEngine(const nixlBackendInitParams *init) : nixlBackendEngine(init) {
        plugin_ = loadPlugin();
        engine_ = plugin_ ? plugin_->create_engine(init) : nullptr;
        initErr = engine_ == nullptr || engine_->getInitErr();
    }
    ~nixlMooncakeEngine() override {
        if (engine_) plugin_->destroy_engine(engine_);
    }

    bool supportsRemote() const override { return engine_->supportsRemote(); }
    bool supportsLocal() const override { return engine_->supportsLocal(); }
    bool supportsNotif() const override { return engine_->supportsNotif(); }
    nixl_mem_list_t getSupportedMems() const override { return engine_->getSupportedMems(); }

    nixl_status_t registerMem(const nixlBlobDesc &mem, const nixl_mem_t &nixl_mem, nixlBackendMD *&out) override {
        return engine_->registerMem(mem, nixl_mem, out);
    }
    nixl_status_t deregisterMem(nixlBackendMD *meta) override { return engine_->deregisterMem(meta); }
    nixl_status_t connect(const std::string &remote_agent) override { return engine_->connect(remote_agent); }
    nixl_status_t disconnect(const std::string &remote_agent) override { return engine_->disconnect(remote_agent); }
    nixl_status_t unloadMD(nixlBackendMD *input) override { return engine_->unloadMD(input); }

    nixl_status_t prepXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local, const nixl_meta_dlist_t &remote,
                           const std::string &remote_agent, nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *opt_args = nullptr) const override {
        return engine_->prepXfer(op, local, remote, remote_agent, handle, opt_args);
    }
    nixl_status_t postXfer(const nixl_xfer_op_t &op, const nixl_meta_dlist_t &local, const nixl_meta_dlist_t &remote,
                           const std::string &remote_agent, nixlBackendReqH *&handle,
                           const nixl_opt_b_args_t *opt_args = nullptr) const override {
        return engine_->postXfer(op, local, remote, remote_agent, handle, opt_args);
    }
    nixl_status_t checkXfer(nixlBackendReqH *handle) const override { return engine_->checkXfer(handle); }
    nixl_status_t releaseReqH(nixlBackendReqH *handle) const override { return engine_->releaseReqH(handle); }

    nixl_status_t getPublicData(const nixlBackendMD *meta, std::string &str) const override {
        return engine_->getPublicData(meta, str);
    }
    nixl_status_t getConnInfo(std::string &str) const override { return engine_->getConnInfo(str); }
    nixl_status_t loadRemoteConnInfo(const std::string &agent, const std::string &info) override {
        return engine_->loadRemoteConnInfo(agent, info);
    }
    nixl_status_t loadRemoteMD(const nixlBlobDesc &input, const nixl_mem_t &nixl_mem, const std::string &agent,
                               nixlBackendMD *&output) override {
        return engine_->loadRemoteMD(input, nixl_mem, agent, output);
    }
    nixl_status_t loadLocalMD(nixlBackendMD *input, nixlBackendMD *&output) override {
        return engine_->loadLocalMD(input, output);
    }
    nixl_status_t getNotifs(notif_list_t &list) override { return engine_->getNotifs(list); }
    nixl_status_t genNotif(const std::string &agent, const std::string &msg) const override {
        return engine_->genNotif(agent, msg);
    }
};
