//! Compiles `src/fused.cpp`, the C face of the libtorch ops that tch does not wrap (the
//! fused Adam kernel, cuDNN's flags), against the headers of the libtorch that torch-sys links. Every
//! libtorch has them, with or without CUDA.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/fused.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys says where libtorch is (DEP_TCH_LIBTORCH_LIB)"),
    );
    let include = lib.parent().expect("libtorch's lib folder has a parent").join("include");
    assert!(
        include.join("ATen/ops/_fused_adam.h").exists(),
        "{} lacks ATen/ops/_fused_adam.h: a libtorch of 2.4 or later is needed",
        include.display()
    );
    cc::Build::new()
        .cpp(true)
        .file("src/fused.cpp")
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .warnings(false)
        .extra_warnings(false)
        .compile("layerwise_nn_fused");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}
