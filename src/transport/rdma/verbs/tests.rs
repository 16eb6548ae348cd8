//! The ABI check: every size, offset and constant of [`super::sys`]
//! against the system's `<infiniband/verbs.h>` (Debian's `libibverbs-dev`),
//! by compiling and running a C program that prints the header's values.

use super::sys::LAYOUT;

/// The header we check against.
const HEADER: &str = "/usr/include/infiniband/verbs.h";

#[test]
fn layout_matches_the_system_header() {
    if !std::path::Path::new(HEADER).exists() {
        // The test command installs the header and sets this, so there the
        // check always runs.
        assert!(
            std::env::var_os("NIXL_MOONCAKE_REQUIRE_VERBS_HEADER").is_none(),
            "{HEADER} is missing (apt-get install libibverbs-dev)"
        );
        eprintln!("SKIPPED: {HEADER} is missing (apt-get install libibverbs-dev)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("verbs-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\nint main(void) {\n",
    );
    for (expr, _) in LAYOUT {
        c.push_str(&format!(
            "    printf(\"%llu\\n\", (unsigned long long)({expr}));\n"
        ));
    }
    c.push_str("    return 0;\n}\n");
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, c).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "compiling the layout probe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = std::process::Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let values: Vec<u64> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(values.len(), LAYOUT.len());
    let wrong: Vec<String> = LAYOUT
        .iter()
        .zip(&values)
        .filter(|((_, ours), theirs)| ours != *theirs)
        .map(|((expr, ours), theirs)| format!("{expr}: verbs.h says {theirs}, we say {ours}"))
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    assert!(wrong.is_empty(), "ABI mismatches:\n{}", wrong.join("\n"));
    eprintln!(
        "{} sizes, offsets and constants match {HEADER}",
        LAYOUT.len()
    );
}
