// NIXL memory descriptors and descriptor lists, as a backend plugin sees them.
//
// Our own ABI-exact declarations, written from /work/shared/nixl-abi.md (see nixl_types.h). Descriptors are
// plain data with inline constructors. `nixlDescList<T>` is polymorphic and its out-of-line members live in
// NIXL's libnixl_build.so, which the plugin does not link: the plugin only reads lists handed to it (the inline
// accessors below) and must never construct, copy or destroy one. A test harness that builds lists supplies
// its own definitions of the declared members.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "nixl_types.h"

class nixlBackendMD; // a backend's per-region metadata object (backend_engine.h)

// One contiguous memory range (24 bytes, no vptr): address, length, device id (GPU index for VRAM, 0 for DRAM).
class nixlBasicDesc {
public:
    uintptr_t addr = 0; // @0
    size_t len = 0;     // @8
    uint64_t devId = 0; // @16

    nixlBasicDesc() = default;
    nixlBasicDesc(const uintptr_t &a, const size_t &l, const uint64_t &dev) : addr(a), len(l), devId(dev) {}
};

// A range plus an opaque blob (56 bytes). On registerMem `metaInfo` is the user's string; on loadRemoteMD it is
// exactly what the remote engine's getPublicData produced.
class nixlBlobDesc : public nixlBasicDesc {
public:
    std::string metaInfo; // @24

    nixlBlobDesc() = default;
    nixlBlobDesc(const uintptr_t &a, const size_t &l, const uint64_t &dev, const std::string &meta = std::string())
        : nixlBasicDesc(a, l, dev), metaInfo(meta) {}
    nixlBlobDesc(const nixlBasicDesc &desc, const std::string &meta) : nixlBasicDesc(desc), metaInfo(meta) {}
};

// A range plus the backend metadata object that covers it (32 bytes): ours from registerMem (local side) or
// from loadRemoteMD / loadLocalMD (remote side).
class nixlMetaDesc : public nixlBasicDesc {
public:
    nixlBackendMD *metadataP = nullptr; // @24

    nixlMetaDesc() = default;
    nixlMetaDesc(const uintptr_t &a, const size_t &l, const uint64_t &dev, nixlBackendMD *md = nullptr)
        : nixlBasicDesc(a, l, dev), metadataP(md) {}
    nixlMetaDesc(const nixlBasicDesc &desc, nixlBackendMD *md) : nixlBasicDesc(desc), metadataP(md) {}
};

// A meta descriptor that also names the remote agent (64 bytes); only used by prepMemView (vtable slot 15).
class nixlRemoteMetaDesc : public nixlMetaDesc {
public:
    std::string remoteAgent; // @32

    nixlRemoteMetaDesc() = default;
    nixlRemoteMetaDesc(const nixlMetaDesc &desc, const std::string &agent) : nixlMetaDesc(desc), remoteAgent(agent) {}
};

// A typed list of descriptors (40 bytes): vptr@0, `type`@8, `descs`@16.
// Vtable (after the two destructor slots): resize, addDesc, getIndex. None of them, nor the constructors and
// destructor, is defined here, so no vtable or out-of-line code is emitted in a TU that only reads lists.
template <class T> class nixlDescList {
    friend struct nixl_abi_layout_check;

protected:
    nixl_mem_t type;      // @8
    std::vector<T> descs; // @16

public:
    explicit nixlDescList(const nixl_mem_t &mem_type, const int &init_size = 0);
    // Copying would need NIXL's out-of-line code; never needed by a backend.
    nixlDescList(const nixlDescList &) = delete;
    nixlDescList &operator=(const nixlDescList &) = delete;
    virtual ~nixlDescList();

    virtual void resize(const size_t &count);
    virtual void addDesc(const T &desc);
    virtual int getIndex(const nixlBasicDesc &query) const; // index of an equal descriptor, or < 0

    // Inline reads: all a backend needs.
    nixl_mem_t getType() const { return type; }
    int descCount() const { return static_cast<int>(descs.size()); }
    bool isEmpty() const { return descs.empty(); }
    const T &operator[](int index) const { return descs[static_cast<size_t>(index)]; }
    typename std::vector<T>::const_iterator begin() const { return descs.begin(); }
    typename std::vector<T>::const_iterator end() const { return descs.end(); }
};

using nixl_meta_dlist_t = nixlDescList<nixlMetaDesc>;
using nixl_remote_meta_dlist_t = nixlDescList<nixlRemoteMetaDesc>;
using nixl_reg_dlist_t = nixlDescList<nixlBlobDesc>;
