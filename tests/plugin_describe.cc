// Loads a NIXL backend plugin the way NIXL does and prints, as JSON, what it
// reports about itself through the plugin table (name, version, API version,
// options, memory types) and through a created engine (capabilities).
// Usage: plugin_describe <plugin.so>
#include <dlfcn.h>

#include <cstdio>
#include <string>

#include "nixl_plugin_abi.h"

namespace {

std::string json_string(const std::string &s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "\"";
}

const char *bool_json(bool b) { return b ? "true" : "false"; }

} // namespace

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <plugin.so>\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!lib) {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 1;
    }
    auto init = reinterpret_cast<nixl_plugin_init_fn_t>(dlsym(lib, NIXL_PLUGIN_INIT_SYMBOL));
    if (!init) {
        std::fprintf(stderr, "no %s\n", NIXL_PLUGIN_INIT_SYMBOL);
        return 1;
    }
    nixlBackendPlugin *plugin = init();
    if (!plugin) {
        std::fprintf(stderr, "nixl_plugin_init returned null\n");
        return 1;
    }

    std::string out = "{";
    out += "\"api_version\": " + std::to_string(plugin->api_version);
    out += ", \"name\": " + json_string(plugin->get_plugin_name());
    out += ", \"version\": " + json_string(plugin->get_plugin_version());
    out += ", \"fini_exported\": " + std::string(bool_json(dlsym(lib, NIXL_PLUGIN_FINI_SYMBOL) != nullptr));
    out += ", \"options\": {";
    bool first = true;
    for (const auto &[k, v] : plugin->get_backend_options()) {
        out += (first ? "" : ", ") + json_string(k) + ": " + json_string(v);
        first = false;
    }
    out += "}, \"mems\": [";
    first = true;
    for (nixl_mem_t m : plugin->get_backend_mems()) {
        out += (first ? "" : ", ") + std::to_string(static_cast<int>(m));
        first = false;
    }
    out += "]";

    nixl_b_params_t params;
    nixlBackendInitParams ip;
    ip.localAgent = "describe";
    ip.type = "Mooncake";
    ip.customParams = &params;
    ip.enableProgTh = false;
    nixlBackendEngine *engine = plugin->create_engine(&ip);
    if (!engine || engine->getInitErr()) {
        std::fprintf(stderr, "create_engine failed\n");
        return 1;
    }
    out += ", \"supports_remote\": " + std::string(bool_json(engine->supportsRemote()));
    out += ", \"supports_local\": " + std::string(bool_json(engine->supportsLocal()));
    out += ", \"supports_notifications\": " + std::string(bool_json(engine->supportsNotif()));
    out += ", \"engine_mems\": [";
    first = true;
    for (nixl_mem_t m : engine->getSupportedMems()) {
        out += (first ? "" : ", ") + std::to_string(static_cast<int>(m));
        first = false;
    }
    out += "]}";
    plugin->destroy_engine(engine);

    // Creation with an invalid option value must fail (null or initErr).
    params["protocol"] = "carrier-pigeon";
    nixlBackendEngine *bad = plugin->create_engine(&ip);
    bool refused = !bad || bad->getInitErr();
    if (bad) plugin->destroy_engine(bad);
    if (!refused) {
        std::fprintf(stderr, "create_engine accepted protocol=carrier-pigeon\n");
        return 1;
    }
    std::printf("%s\n", out.c_str());
    return 0;
}
