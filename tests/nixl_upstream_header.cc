// Keeps tests/nixl-upstream/mooncake_backend.h (the stand-in that lets NIXL's own unmodified
// mooncake_backend_test.cpp build against our plugin, scripts/nixl-upstream-test.sh) working in the normal test
// run, where NIXL's file is not available: it uses the header exactly as NIXL's test does. Two engines made with
// `new nixlMooncakeEngine(&init)`, a DRAM region on each, engine 1 asked for the public data of engine 2's
// handle (NIXL's cross-engine call), a WRITE with a notification, the bytes and the notification checked, and
// `delete` through the nixlBackendEngine pointer. Needs MOONCAKE_PLUGIN_PATH. Prints "PASS" at the end.
#include "nixl-upstream/mooncake_backend.h"

#include <chrono>
#include <thread>
#include <vector>

#define CHECK(cond)                                                                                            \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            std::fprintf(stderr, "nixl_upstream_header: check failed at line %d: %s\n", __LINE__, #cond);    \
            std::exit(1);                                                                                      \
        }                                                                                                      \
    } while (0)

static nixlBackendEngine *makeEngine(const char *name) {
    nixl_b_params_t params;
    nixlBackendInitParams init;
    init.localAgent = name;
    init.type = "Mooncake";
    init.customParams = &params;
    init.enableProgTh = true;
    auto *e = static_cast<nixlBackendEngine *>(new nixlMooncakeEngine(&init));
    CHECK(!e->getInitErr());
    return e;
}

int main() {
    nixlBackendEngine *e1 = makeEngine("Agent1");
    nixlBackendEngine *e2 = makeEngine("Agent2");
    std::string info;
    CHECK(e2->getConnInfo(info) == NIXL_SUCCESS);
    CHECK(e1->loadRemoteConnInfo("Agent2", info) == NIXL_SUCCESS);

    const size_t len = 1 << 20;
    std::vector<unsigned char> src(len), dst(len, 0);
    for (size_t i = 0; i < len; ++i) src[i] = static_cast<unsigned char>(i * 7 + 3);
    nixlBackendMD *md1 = nullptr, *md2 = nullptr, *remote = nullptr;
    CHECK(e1->registerMem(nixlBlobDesc(reinterpret_cast<uintptr_t>(src.data()), len, 0, ""), DRAM_SEG, md1) ==
          NIXL_SUCCESS);
    CHECK(e2->registerMem(nixlBlobDesc(reinterpret_cast<uintptr_t>(dst.data()), len, 0, ""), DRAM_SEG, md2) ==
          NIXL_SUCCESS);
    // NIXL's test asks engine 1 for the public data of engine 2's handle.
    std::string pub;
    CHECK(e1->getPublicData(md2, pub) == NIXL_SUCCESS);
    CHECK(e1->loadRemoteMD(nixlBlobDesc(reinterpret_cast<uintptr_t>(dst.data()), len, 0, pub), DRAM_SEG, "Agent2",
                           remote) == NIXL_SUCCESS);

    nixl_meta_dlist_t local(DRAM_SEG), far(DRAM_SEG);
    local.addDesc(nixlMetaDesc(reinterpret_cast<uintptr_t>(src.data()), len, 0, md1));
    far.addDesc(nixlMetaDesc(reinterpret_cast<uintptr_t>(dst.data()), len, 0, remote));
    nixl_opt_b_args_t opt;
    opt.notifMsg = "header-check";
    opt.hasNotif = true;
    nixlBackendReqH *h = nullptr;
    CHECK(e1->prepXfer(NIXL_WRITE, local, far, "Agent2", h, &opt) == NIXL_SUCCESS);
    nixl_status_t st = e1->postXfer(NIXL_WRITE, local, far, "Agent2", h, &opt);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (st == NIXL_IN_PROG && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        st = e1->checkXfer(h);
    }
    CHECK(st == NIXL_SUCCESS);
    CHECK(e1->releaseReqH(h) == NIXL_SUCCESS);
    CHECK(src == dst);
    notif_list_t notifs;
    while (notifs.empty() && std::chrono::steady_clock::now() < deadline) {
        CHECK(e2->getNotifs(notifs) == NIXL_SUCCESS);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    CHECK(notifs.size() == 1 && notifs.front().first == "Agent1" && notifs.front().second == "header-check");

    CHECK(e1->unloadMD(remote) == NIXL_SUCCESS);
    CHECK(e1->deregisterMem(md1) == NIXL_SUCCESS);
    CHECK(e2->deregisterMem(md2) == NIXL_SUCCESS);
    delete e1;
    delete e2;
    std::printf("nixl_upstream_header: PASS\n");
    return 0;
}
