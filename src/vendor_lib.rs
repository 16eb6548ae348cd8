//! A vendor library loaded at run time (the CUDA driver, the verbs
//! library), never linked: which file to load, and the outcome of loading
//! it, kept for the life of the process.
//!
//! The file is the one a test chose ([`VendorLib::use_library`]), else the
//! one the environment variable names, else the default name (found through
//! the loader's search path).

use std::sync::OnceLock;

/// One vendor library and what loading it gave (`T`, or why not).
pub struct VendorLib<T> {
    env: &'static str,
    default: &'static str,
    what: &'static str,
    chosen: OnceLock<String>,
    loaded: OnceLock<Result<T, String>>,
}

impl<T> VendorLib<T> {
    /// The library `what` (for messages), named by the environment variable
    /// `env`, else `default`.
    pub const fn new(env: &'static str, default: &'static str, what: &'static str) -> Self {
        VendorLib {
            env,
            default,
            what,
            chosen: OnceLock::new(),
            loaded: OnceLock::new(),
        }
    }

    /// Makes the library load from `path` instead of what the environment
    /// says (for Rust tests, whose threads start before they could set it).
    /// Returns false when it was loaded (or another path chosen) already.
    pub fn use_library(&self, path: &str) -> bool {
        self.loaded.get().is_none() && self.chosen.set(path.to_owned()).is_ok()
    }

    /// True once a test chose the file.
    pub fn chosen(&self) -> bool {
        self.chosen.get().is_some()
    }

    /// The outcome of loading, if it was tried (never loads).
    pub fn get(&self) -> Option<&Result<T, String>> {
        self.loaded.get()
    }

    /// The outcome of loading, loading on the first call: opens the file,
    /// then `init` makes `T` of it (its path and the open library). The
    /// error says which file and why.
    pub fn get_or_load(
        &self,
        init: impl FnOnce(String, libloading::Library) -> Result<T, String>,
    ) -> &Result<T, String> {
        self.loaded.get_or_init(|| {
            let path = self
                .chosen
                .get()
                .cloned()
                .or_else(|| std::env::var(self.env).ok().filter(|p| !p.is_empty()))
                .unwrap_or_else(|| self.default.to_owned());
            // SAFETY: loading a vendor library runs its initialisers, which
            // have no preconditions; a file named by the environment (or a
            // test) is trusted as the vendor's would be.
            let lib = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("the {} library {path} cannot be loaded ({e})", self.what))?;
            init(path, lib)
        })
    }
}
