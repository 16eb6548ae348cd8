//! Compiles the C++ shim (the class NIXL sees) together with the `cxx` bridge,
//! and shapes the cdylib's export table.

fn main() {
    let shim = ["src/ffi/shim/engine.cc", "src/ffi/shim/plugin.cc"];
    let version = format!("\"{}\"", env!("CARGO_PKG_VERSION"));
    cxx_build::bridge("src/ffi/bridge.rs")
        .files(shim)
        .include("nixl-headers")
        .include("src/ffi/shim")
        .std("c++20")
        .flag("-fvisibility=hidden")
        .flag("-fvisibility-inlines-hidden")
        .flag_if_supported("-Wno-unused-parameter")
        .define("MOONCAKE_RS_VERSION", version.as_str())
        .compile("mooncake_shim");

    // Only the two NIXL entry points are exported (rustc's own version script
    // already hides Rust symbols; ours hides the C++ runtime helpers that cxx
    // and libstdc++ templates would otherwise leak), and nothing inside the
    // plugin may be interposed by a symbol of the same name elsewhere in NIXL.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={manifest}/src/ffi/exports.map");

    for path in shim.iter().chain(&[
        "src/ffi/bridge.rs",
        "src/ffi/shim/engine.h",
        "src/ffi/exports.map",
    ]) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=nixl-headers");
}
