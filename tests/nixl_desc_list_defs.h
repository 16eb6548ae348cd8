// Out-of-line members of nixlDescList, for test programs only. NIXL defines them in libnixl_build.so, which
// neither the plugin nor our C++ test programs link: the plugin only reads lists, a test program builds them, so
// it supplies these definitions. Include it from exactly one translation unit of a program (it instantiates
// nixlDescList<nixlMetaDesc>, the list type the backend interface passes).
#pragma once

#include <algorithm>
#include <cstddef>

#include "nixl_descriptors.h"

template <class T>
nixlDescList<T>::nixlDescList(const nixl_mem_t &mem_type, const int &init_size)
    : type(mem_type), descs(static_cast<size_t>(std::max(init_size, 0))) {}

template <class T> nixlDescList<T>::~nixlDescList() = default;

template <class T> void nixlDescList<T>::resize(const size_t &count) { descs.resize(count); }

template <class T> void nixlDescList<T>::addDesc(const T &desc) { descs.push_back(desc); }

template <class T> int nixlDescList<T>::getIndex(const nixlBasicDesc &query) const {
    for (size_t i = 0; i < descs.size(); ++i) {
        const nixlBasicDesc &d = descs[i];
        if (d.addr == query.addr && d.len == query.len && d.devId == query.devId) return static_cast<int>(i);
    }
    return NIXL_ERR_NOT_FOUND;
}

template class nixlDescList<nixlMetaDesc>;
